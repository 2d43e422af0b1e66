"""Bearer tokens: compact JWS (RFC 7515) with HS256 (RFC 7518 3.2), tenant and SMART v2 scopes.

The server signs with a 256-bit key kept in ``DATA_DIR/keys/token.key`` (created on first use, mode 0600).
Claims: ``iss`` (telerad-bridge), ``sub``, ``tenant``, ``scope`` (space separated), ``iat``, ``exp``, ``jti``.

Scopes follow SMART App Launch v2 (``system/<Resource|*>.<c?r?u?d?s?>``, v1 ``.read``/``.write``/``.*``
accepted). DICOMweb is authorised as the FHIR resource ``ImagingStudy``: QIDO/WADO need ``r``+``s``
(or ``r``), STOW needs ``c``. The short scopes ``dicomweb.read`` and ``dicomweb.write`` grant the same.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import json
import os
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from server.errors import ErrorKind, ServerError

ISSUER = "telerad-bridge"
DEFAULT_SCOPE = "system/*.cruds"
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SCOPE = re.compile(r"^(system|user|patient)/(\*|[A-Z][A-Za-z]+)\.(\*|read|write|c?r?u?d?s?)$")


class Access(enum.Enum):
    """What an operation needs, as SMART v2 permission letters."""

    READ = "rs"
    SEARCH = "s"
    CREATE = "c"
    UPDATE = "u"
    DELETE = "d"


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: tenant and granted scopes."""

    subject: str
    tenant: str
    scopes: frozenset[str]

    def allows(self, resource: str, access: Access) -> bool:
        """True when a scope grants ``access`` on ``resource`` (SMART v2 scope semantics)."""
        short = {"dicomweb.read": (Access.READ, Access.SEARCH), "dicomweb.write": (Access.CREATE,)}
        for scope in self.scopes:
            if resource == "ImagingStudy" and access in short.get(scope, ()):
                return True
            m = _SCOPE.match(scope)
            if not m or m.group(1) != "system" or m.group(2) not in ("*", resource):
                continue
            perms = {"*": "cruds", "read": "rs", "write": "cud"}.get(m.group(3), m.group(3))
            if all(letter in perms for letter in access.value):
                return True
        return False


def validate_tenant(tenant: str) -> str:
    """A tenant name: letters, digits, dot, dash, underscore; at most 64 characters."""
    if not _TENANT.match(tenant):
        raise ServerError(ErrorKind.INVALID, f"invalid tenant name {tenant!r}")
    return tenant


def validate_scopes(scope: str) -> frozenset[str]:
    """The space-separated scopes of a token request, each a SMART scope or a DICOMweb short scope."""
    scopes = frozenset(scope.split())
    for s in scopes:
        if s not in ("dicomweb.read", "dicomweb.write") and not _SCOPE.match(s):
            raise ServerError(ErrorKind.INVALID, f"invalid scope {s!r}")
    return scopes


def load_or_create_key(data_dir: Path) -> bytes:
    """The token signing key of this data folder; created atomically with mode 0600 on first use."""
    key_dir = data_dir / "keys"
    path = key_dir / "token.key"
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    key_dir.mkdir(parents=True, exist_ok=True)
    tmp = key_dir / f".token.key.{uuid.uuid4().hex}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # never replace a key another process created meanwhile
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return bytes.fromhex(path.read_text().strip())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue(key: bytes, *, tenant: str, scope: str, subject: str = "admin", ttl_seconds: int, now: float | None = None) -> str:
    """A signed token for ``tenant`` with ``scope`` (RFC 7519 claims)."""
    validate_tenant(tenant)
    validate_scopes(scope)
    iat = int(now if now is not None else time.time())
    header = {"alg": "HS256", "typ": "JWT"}
    claims = {"iss": ISSUER, "sub": subject, "tenant": tenant, "scope": scope, "iat": iat,
              "exp": iat + ttl_seconds, "jti": uuid.uuid4().hex}
    signing_input = f"{_b64(json.dumps(header, separators=(',', ':')).encode())}.{_b64(json.dumps(claims, separators=(',', ':')).encode())}"
    sig = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(sig)}"


def verify(key: bytes, token: str, *, now: float | None = None) -> Principal:
    """The principal of a valid token; UNAUTHENTICATED for a malformed, forged or expired one."""
    bad = ServerError(ErrorKind.UNAUTHENTICATED, "invalid token")
    parts = token.split(".")
    if len(parts) != 3:
        raise bad
    signing_input = f"{parts[0]}.{parts[1]}".encode("ascii", "replace")
    try:
        header = json.loads(_unb64(parts[0]))
        claims = json.loads(_unb64(parts[1]))
        sig = _unb64(parts[2])
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad from exc
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        raise bad
    expected = hmac.new(key, signing_input, hashlib.sha256).digest()
    if not hmac.compare_digest(sig, expected):
        raise bad
    if not isinstance(claims, dict) or claims.get("iss") != ISSUER:
        raise bad
    exp = claims.get("exp")
    if not isinstance(exp, int) or exp <= (now if now is not None else time.time()):
        raise ServerError(ErrorKind.UNAUTHENTICATED, "token expired")
    tenant, scope = claims.get("tenant"), claims.get("scope")
    if not isinstance(tenant, str) or not isinstance(scope, str) or not _TENANT.match(tenant):
        raise bad
    return Principal(subject=str(claims.get("sub", "")), tenant=tenant, scopes=frozenset(scope.split()))
