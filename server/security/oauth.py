"""OAuth 2.0 client credentials (RFC 6749 4.4) per SMART Backend Services: client authentication and scopes.

Pure: no SQL and no web framework. The client registry is handed in (``ClientRegistry``, implemented by
``server.store.clients.ClientStore``); blocking work (scrypt, signatures, the registry) runs in the caller's
worker thread.

* Client secrets (``client_secret_basic``/``client_secret_post``, RFC 6749 2.3.1) are stored as scrypt
  hashes (RFC 7914) with a random salt: ``scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>``.
* Asymmetric client authentication (``private_key_jwt``, RFC 7523 2.2 + SMART Backend Services): a JWT
  signed RS384 (RFC 7518 3.3) or ES384 (RFC 7518 3.4) with a key of the client's registered JWK Set
  (RFC 7517); ``iss`` = ``sub`` = client_id, ``aud`` = the token endpoint URL, ``exp`` at most five minutes
  ahead, ``jti`` used once (kept by the registry until ``exp``).
* Granted scopes are the intersection of the requested and the registered SMART v2 system scopes.
"""

from __future__ import annotations

import base64
import enum
import functools
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote_plus

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from server.errors import ErrorKind, ServerError
from server.security.tokens import issue, validate_scopes, validate_tenant

GRANT_CLIENT_CREDENTIALS = "client_credentials"
ASSERTION_TYPE_JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ALGORITHMS = ("RS384", "ES384")
AUTH_METHODS = ("private_key_jwt", "client_secret_basic", "client_secret_post")
MAX_ASSERTION_LIFETIME = 300  # SMART Backend Services: exp no more than five minutes in the future
CLOCK_SKEW = 30  # seconds of tolerated clock difference for exp/nbf/iat
ACCESS_TOKEN_TTL = 300  # SMART Backend Services: "the recommended value is 300"
MIN_RSA_BITS = 2048
MAX_ASSERTION_BYTES = 16 * 1024

_SCRYPT_LOG_N, _SCRYPT_R, _SCRYPT_P = 14, 8, 1
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._~-]{1,64}$")
_SYSTEM_SCOPE = re.compile(r"^system/(\*|[A-Z][A-Za-z]+)\.(\*|read|write|c?r?u?d?s?)$")
_LETTERS = "cruds"
_SHORT_SCOPES = {"dicomweb.read": ("ImagingStudy", "rs"), "dicomweb.write": ("ImagingStudy", "c")}


class OAuthErrorCode(str, enum.Enum):
    """The error codes of a token error response (RFC 6749 5.2)."""

    INVALID_REQUEST = "invalid_request"
    INVALID_CLIENT = "invalid_client"
    INVALID_GRANT = "invalid_grant"
    UNAUTHORIZED_CLIENT = "unauthorized_client"
    UNSUPPORTED_GRANT_TYPE = "unsupported_grant_type"
    INVALID_SCOPE = "invalid_scope"


KIND_BY_OAUTH_ERROR = {
    OAuthErrorCode.INVALID_REQUEST: ErrorKind.INVALID,
    OAuthErrorCode.INVALID_CLIENT: ErrorKind.UNAUTHENTICATED,
    OAuthErrorCode.INVALID_GRANT: ErrorKind.INVALID,
    OAuthErrorCode.UNAUTHORIZED_CLIENT: ErrorKind.FORBIDDEN,
    OAuthErrorCode.UNSUPPORTED_GRANT_TYPE: ErrorKind.UNSUPPORTED,
    OAuthErrorCode.INVALID_SCOPE: ErrorKind.FORBIDDEN,
}


class OAuthError(ServerError):
    """A token request refused with an RFC 6749 5.2 error code (the message is its ``error_description``)."""

    def __init__(self, code: OAuthErrorCode, description: str) -> None:
        super().__init__(KIND_BY_OAUTH_ERROR[code], description)
        self.code = code


def _invalid_client(description: str = "client authentication failed") -> OAuthError:
    return OAuthError(OAuthErrorCode.INVALID_CLIENT, description)


# --- registered clients ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegisteredClient:
    """A client allowed to use the token endpoint: its tenant, registered scopes and credential."""

    client_id: str
    tenant: str
    scope: str
    secret_hash: str | None = None
    jwks: str | None = None  # the JWK Set as JSON text
    created: str = ""

    @property
    def auth_method(self) -> str:
        """``private_key_jwt`` for a client with a JWK Set, else ``client_secret``."""
        return "private_key_jwt" if self.jwks else "client_secret"


class ClientRegistry(Protocol):
    """What the token exchange needs from the client store."""

    def get(self, client_id: str) -> RegisteredClient | None:
        """The client with this id, or None."""

    def use_jti(self, client_id: str, jti: str, exp: int, now: int) -> bool:
        """Record ``jti`` of ``client_id`` until ``exp``; False when it was already used (a replay)."""


def new_client_id() -> str:
    """A random, URL-safe client identifier (RFC 6749 2.2)."""
    return secrets.token_hex(16)


def validate_client_id(client_id: str) -> str:
    """A client id as we issue them: 1 to 64 unreserved URL characters."""
    if not _CLIENT_ID.match(client_id):
        raise ServerError(ErrorKind.INVALID, f"invalid client id {client_id!r}")
    return client_id


def new_secret() -> str:
    """A random client secret with 256 bits of entropy."""
    return secrets.token_urlsafe(32)


def hash_secret(secret: str, *, salt: bytes | None = None) -> str:
    """The scrypt hash (RFC 7914) of a client secret, with parameters and salt, for storage."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode("utf-8"), salt=salt, n=2**_SCRYPT_LOG_N, r=_SCRYPT_R, p=_SCRYPT_P,
                            dklen=32)
    return f"scrypt${_SCRYPT_LOG_N}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


@functools.lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return hash_secret(secrets.token_urlsafe(32))


def verify_secret(secret: str, stored: str) -> bool:
    """True when ``secret`` matches the stored hash (constant-time comparison)."""
    try:
        scheme, log_n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt" or not 1 <= int(log_n) <= 20:
            return False
        expected = _unb64(digest)
        actual = hashlib.scrypt(secret.encode("utf-8"), salt=_unb64(salt), n=2 ** int(log_n), r=int(r), p=int(p),
                                dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


# --- JWK (RFC 7517/7518 6) -------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _uint(text: object) -> int:
    return int.from_bytes(_unb64(text), "big")  # type: ignore[arg-type]


def public_key(jwk: Mapping[str, object]) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    """The public key of an RSA or P-384 EC JWK (RFC 7518 6.2, 6.3); INVALID for anything else."""
    if "d" in jwk:
        raise ServerError(ErrorKind.INVALID, "the JWK holds a private key; register the public key only")
    try:
        if jwk.get("kty") == "RSA":
            key = rsa.RSAPublicNumbers(_uint(jwk["e"]), _uint(jwk["n"])).public_key()
            if key.key_size < MIN_RSA_BITS:
                raise ServerError(ErrorKind.INVALID, f"RSA keys need at least {MIN_RSA_BITS} bits")
            return key
        if jwk.get("kty") == "EC":
            if jwk.get("crv") != "P-384":
                raise ServerError(ErrorKind.INVALID, "EC keys must use the curve P-384 (ES384)")
            x, y = _unb64(jwk["x"]), _unb64(jwk["y"])  # type: ignore[arg-type]
            if len(x) != 48 or len(y) != 48:
                raise ServerError(ErrorKind.INVALID, "invalid P-384 coordinates")
            return ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"),
                                                 ec.SECP384R1()).public_key()
    except (KeyError, ValueError, TypeError) as exc:
        raise ServerError(ErrorKind.INVALID, "invalid JWK") from exc
    raise ServerError(ErrorKind.INVALID, "JWK kty must be RSA or EC")


def parse_jwks(text: str) -> str:
    """A JWK Set (or a single JWK) as canonical JWK Set JSON, each key checked with ``public_key``."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ServerError(ErrorKind.INVALID, "the JWK Set is not JSON") from exc
    if isinstance(doc, dict) and "kty" in doc:
        doc = {"keys": [doc]}
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list) or not keys or not all(isinstance(k, dict) for k in keys):
        raise ServerError(ErrorKind.INVALID, "a JWK Set needs a non-empty 'keys' list (RFC 7517 5)")
    for jwk in keys:
        public_key(jwk)
        if jwk.get("use", "sig") != "sig" or jwk.get("alg", "RS384" if jwk["kty"] == "RSA" else "ES384") not in ALGORITHMS:
            raise ServerError(ErrorKind.INVALID, "JWK 'use' must be sig and 'alg' RS384 or ES384")
    return json.dumps({"keys": keys}, separators=(",", ":"), sort_keys=True)


def jwk_of(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, kid: str | None = None) -> dict:
    """The public JWK of an RSA or P-384 key (for registering a client; RFC 7518 6)."""
    if isinstance(key, rsa.RSAPublicKey):
        nums = key.public_numbers()
        n_len = (nums.n.bit_length() + 7) // 8
        jwk = {"kty": "RSA", "alg": "RS384", "n": _b64(nums.n.to_bytes(n_len, "big")),
               "e": _b64(nums.e.to_bytes((nums.e.bit_length() + 7) // 8, "big"))}
    else:
        pub = key.public_numbers()
        jwk = {"kty": "EC", "alg": "ES384", "crv": "P-384", "x": _b64(pub.x.to_bytes(48, "big")),
               "y": _b64(pub.y.to_bytes(48, "big"))}
    if kid:
        jwk["kid"] = kid
    jwk["use"] = "sig"
    return jwk


# --- client assertions (RFC 7523, SMART Backend Services) ------------------------------------------------


def sign_assertion(private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, claims: Mapping[str, object], *,
                   alg: str, kid: str | None = None) -> str:
    """A compact JWS of ``claims`` signed with ``alg`` (the client side of ``private_key_jwt``)."""
    header = {"alg": alg, "typ": "JWT", **({"kid": kid} if kid else {})}
    signing_input = (f"{_b64(json.dumps(header, separators=(',', ':')).encode())}."
                     f"{_b64(json.dumps(dict(claims), separators=(',', ':')).encode())}").encode("ascii")
    if alg == "RS384" and isinstance(private_key, rsa.RSAPrivateKey):
        sig = private_key.sign(signing_input, padding.PKCS1v15(), hashes.SHA384())
    elif alg == "ES384" and isinstance(private_key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(private_key.sign(signing_input, ec.ECDSA(hashes.SHA384())))
        sig = r.to_bytes(48, "big") + s.to_bytes(48, "big")
    else:
        raise ServerError(ErrorKind.INVALID, f"cannot sign {alg} with this key")
    return f"{signing_input.decode('ascii')}.{_b64(sig)}"


@dataclass(frozen=True)
class Assertion:
    """A decoded, not yet verified client assertion."""

    header: dict
    claims: dict
    signing_input: bytes
    signature: bytes

    @property
    def client_id(self) -> str:
        """The client the assertion claims to come from (``sub``, RFC 7523 3 B)."""
        sub = self.claims.get("sub")
        return sub if isinstance(sub, str) else ""


def decode_assertion(assertion: str) -> Assertion:
    """The parts of a compact JWS (RFC 7515 7.1); INVALID_CLIENT when it is not one."""
    if len(assertion) > MAX_ASSERTION_BYTES:
        raise _invalid_client("client_assertion too large")
    parts = assertion.split(".")
    if len(parts) != 3:
        raise _invalid_client("client_assertion is not a compact JWS")
    try:
        header = json.loads(_unb64(parts[0]))
        claims = json.loads(_unb64(parts[1]))
        signature = _unb64(parts[2])
    except (ValueError, UnicodeDecodeError) as exc:
        raise _invalid_client("client_assertion is not a compact JWS") from exc
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise _invalid_client("client_assertion is not a JWT")
    return Assertion(header, claims, f"{parts[0]}.{parts[1]}".encode("ascii"), signature)


def _verify_signature(key: object, alg: str, signing_input: bytes, signature: bytes) -> bool:
    try:
        if alg == "RS384" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA384())
            return True
        if alg == "ES384" and isinstance(key, ec.EllipticCurvePublicKey):
            if len(signature) != 96:
                return False
            der = encode_dss_signature(int.from_bytes(signature[:48], "big"), int.from_bytes(signature[48:], "big"))
            key.verify(der, signing_input, ec.ECDSA(hashes.SHA384()))
            return True
    except InvalidSignature:
        return False
    return False


def _candidate_keys(jwks: str, alg: str, kid: object) -> list[object]:
    kty = "RSA" if alg == "RS384" else "EC"
    out = []
    for jwk in json.loads(jwks)["keys"]:
        if jwk.get("kty") != kty or jwk.get("alg", alg) != alg or jwk.get("use", "sig") != "sig":
            continue
        if kid is not None and jwk.get("kid") != kid:
            continue
        out.append(public_key(jwk))
    return out


def verify_assertion(assertion: Assertion, client: RegisteredClient, audience: str, *, now: float) -> tuple[str, int]:
    """Check a client assertion of ``client`` (RFC 7523 3, SMART Backend Services); its ``(jti, exp)``.

    INVALID_CLIENT for a wrong algorithm, an unknown key, a bad signature, a wrong ``iss``/``sub``/``aud``,
    an expired assertion or one that lives longer than five minutes. The caller checks ``jti`` replay.
    """
    alg = assertion.header.get("alg")
    if alg not in ALGORITHMS:
        raise _invalid_client(f"client_assertion alg must be one of {', '.join(ALGORITHMS)}")
    if not client.jwks:
        raise _invalid_client("the client has no registered public key")
    keys = _candidate_keys(client.jwks, alg, assertion.header.get("kid"))
    if not keys:
        raise _invalid_client("no registered key matches the client_assertion's kid and alg")
    if not any(_verify_signature(k, alg, assertion.signing_input, assertion.signature) for k in keys):
        raise _invalid_client("client_assertion signature is invalid")
    claims = assertion.claims
    if claims.get("iss") != client.client_id or claims.get("sub") != client.client_id:
        raise _invalid_client("client_assertion iss and sub must be the client_id")
    aud = claims.get("aud")
    if not (aud == audience or (isinstance(aud, list) and audience in aud)):
        raise _invalid_client("client_assertion aud must be the token endpoint URL")
    exp = claims.get("exp")
    if not isinstance(exp, int) or isinstance(exp, bool):
        raise _invalid_client("client_assertion needs a numeric exp")
    if exp <= now - CLOCK_SKEW:
        raise _invalid_client("client_assertion expired")
    if exp > now + MAX_ASSERTION_LIFETIME + CLOCK_SKEW:
        raise _invalid_client("client_assertion exp must be at most five minutes ahead")
    nbf = claims.get("nbf")
    if isinstance(nbf, (int, float)) and nbf > now + CLOCK_SKEW:
        raise _invalid_client("client_assertion not yet valid")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti or len(jti) > 255:
        raise _invalid_client("client_assertion needs a jti (at most 255 characters)")
    return jti, exp


# --- scopes (SMART App Launch v2 scopes) -----------------------------------------------------------------


def _scope_parts(scope: str) -> tuple[str, str] | None:
    """(resource or *, permission letters) of a system scope or DICOMweb short scope, else None."""
    if scope in _SHORT_SCOPES:
        return _SHORT_SCOPES[scope]
    m = _SYSTEM_SCOPE.match(scope)
    if not m:
        return None
    perms = {"*": "cruds", "read": "rs", "write": "cud"}.get(m.group(2), m.group(2))
    return m.group(1), perms


def _covers(registered: tuple[str, str], requested: tuple[str, str]) -> bool:
    return registered[0] in ("*", requested[0]) and set(requested[1]) <= set(registered[1])


def grant_scopes(requested: str, registered: str) -> str:
    """The requested scopes narrowed to what the client is registered for (SMART v2 semantics).

    A requested scope a registered one covers is granted as written; otherwise each pair of a requested and a
    registered scope grants their intersection (``system/*.rs`` ∩ ``system/Task.cruds`` = ``system/Task.rs``).
    Non-system scopes are never granted. INVALID_SCOPE when nothing is left or a scope is malformed.
    """
    try:
        validate_scopes(requested)
    except ServerError as exc:
        raise OAuthError(OAuthErrorCode.INVALID_SCOPE, exc.message) from exc
    have = [p for p in (_scope_parts(s) for s in registered.split()) if p]
    granted: list[str] = []
    for scope in requested.split():
        want = _scope_parts(scope)
        if want is None:
            continue
        if any(_covers(reg, want) for reg in have):
            granted.append(scope)
            continue
        for reg in have:
            if reg[0] != "*" and want[0] != "*" and reg[0] != want[0]:
                continue
            resource = want[0] if reg[0] == "*" else reg[0]
            letters = "".join(c for c in _LETTERS if c in want[1] and c in reg[1])
            if letters:
                granted.append(f"system/{resource}.{letters}")
    out = list(dict.fromkeys(granted))
    if not out:
        raise OAuthError(OAuthErrorCode.INVALID_SCOPE, "none of the requested scopes is granted to this client")
    return " ".join(out)


def validate_registration(tenant: str, scope: str) -> tuple[str, str]:
    """The tenant and scopes of a new client: system scopes or DICOMweb short scopes only."""
    validate_tenant(tenant)
    scopes = validate_scopes(scope)
    if not scopes:
        raise ServerError(ErrorKind.INVALID, "a client needs at least one scope")
    for s in scopes:
        if _scope_parts(s) is None:
            raise ServerError(ErrorKind.INVALID, f"scope {s!r}: clients get system/ scopes only")
    return tenant, " ".join(s for s in scope.split() if s)


# --- the token request (RFC 6749 4.4.2, 2.3; SMART Backend Services) ------------------------------------


@dataclass(frozen=True)
class TokenRequest:
    """The parameters of one token request, parsed from the form and the Authorization header."""

    params: Mapping[str, str]
    basic: tuple[str, str] | None = None  # (client_id, client_secret) from HTTP Basic (RFC 6749 2.3.1)


@dataclass(frozen=True)
class TokenResponse:
    """A successful access token response (RFC 6749 5.1)."""

    access_token: str
    expires_in: int
    scope: str
    token_type: str = "bearer"

    def body(self) -> dict:
        """The JSON body."""
        return {"access_token": self.access_token, "token_type": self.token_type, "expires_in": self.expires_in,
                "scope": self.scope}


def parse_form(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The form parameters; INVALID_REQUEST for a parameter given twice (RFC 6749 3.2)."""
    out: dict[str, str] = {}
    for name, value in pairs:
        if name in out:
            raise OAuthError(OAuthErrorCode.INVALID_REQUEST, f"parameter {name!r} given more than once")
        out[name] = value
    return out


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """(client_id, client_secret) of ``Authorization: Basic`` (RFC 7617, form-urlencoded parts: RFC 6749 2.3.1)."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError) as exc:
        raise OAuthError(OAuthErrorCode.INVALID_CLIENT, "malformed Basic credentials") from exc
    user, sep, password = decoded.partition(":")
    if not sep:
        raise OAuthError(OAuthErrorCode.INVALID_CLIENT, "malformed Basic credentials")
    return unquote_plus(user), unquote_plus(password)


def _authenticate(request: TokenRequest, clients: ClientRegistry, audience: str, now: float) -> RegisteredClient:
    params = request.params
    assertion_type = params.get("client_assertion_type")
    assertion = params.get("client_assertion")
    post_secret = params.get("client_secret")
    methods = sum(x is not None for x in (request.basic, assertion or assertion_type, post_secret))
    if methods > 1:
        raise OAuthError(OAuthErrorCode.INVALID_REQUEST, "use exactly one client authentication method")
    if assertion_type is not None or assertion is not None:
        if assertion_type != ASSERTION_TYPE_JWT_BEARER:
            raise OAuthError(OAuthErrorCode.INVALID_REQUEST,
                             f"client_assertion_type must be {ASSERTION_TYPE_JWT_BEARER}")
        if not assertion:
            raise OAuthError(OAuthErrorCode.INVALID_REQUEST, "client_assertion is missing")
        decoded = decode_assertion(assertion)
        client_id = decoded.client_id
        if "client_id" in params and params["client_id"] != client_id:
            raise _invalid_client("client_id does not match the client_assertion")
        client = clients.get(client_id) if _CLIENT_ID.match(client_id) else None
        if client is None:
            raise _invalid_client("unknown client")
        jti, exp = verify_assertion(decoded, client, audience, now=now)
        if not clients.use_jti(client.client_id, jti, exp, int(now)):
            raise _invalid_client("client_assertion jti was already used")
        return client
    if request.basic is not None:
        client_id, secret = request.basic
        if "client_id" in params and params["client_id"] != client_id:
            raise OAuthError(OAuthErrorCode.INVALID_REQUEST, "client_id does not match the Basic credentials")
    elif post_secret is not None:
        client_id, secret = params.get("client_id", ""), post_secret
        if not client_id:
            raise OAuthError(OAuthErrorCode.INVALID_REQUEST, "client_secret needs client_id")
    else:
        raise _invalid_client("client authentication required (client_secret_basic, client_secret_post or "
                              "private_key_jwt)")
    client = clients.get(client_id) if _CLIENT_ID.match(client_id) else None
    stored = client.secret_hash if client is not None and client.secret_hash else None
    # an unknown client costs the same scrypt as a known one: response times do not reveal client ids
    if not verify_secret(secret, stored or _dummy_hash()) or stored is None:
        raise _invalid_client()
    return client  # type: ignore[return-value]


def exchange(request: TokenRequest, *, clients: ClientRegistry, key: bytes, audience: str,
             now: float | None = None, ttl_seconds: int = ACCESS_TOKEN_TTL) -> TokenResponse:
    """Authenticate the client and issue an access token for the granted scopes (RFC 6749 4.4).

    Blocking (scrypt, signature checks, the registry): call from a worker thread.
    """
    now = time.time() if now is None else now
    grant_type = request.params.get("grant_type")
    if not grant_type:
        raise OAuthError(OAuthErrorCode.INVALID_REQUEST, "grant_type is missing")
    client = _authenticate(request, clients, audience, now)
    if grant_type != GRANT_CLIENT_CREDENTIALS:
        raise OAuthError(OAuthErrorCode.UNSUPPORTED_GRANT_TYPE, "only grant_type=client_credentials is supported")
    requested = request.params.get("scope")
    if requested is None or not requested.strip():
        raise OAuthError(OAuthErrorCode.INVALID_REQUEST, "scope is missing (SMART Backend Services 'scope')")
    scope = grant_scopes(requested, client.scope)
    token = issue(key, tenant=client.tenant, scope=scope, subject=client.client_id, ttl_seconds=ttl_seconds,
                  now=now)
    return TokenResponse(access_token=token, expires_in=ttl_seconds, scope=scope)
