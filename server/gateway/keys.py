"""Site keys: one OpenPGP key pair per tenant in ``DATA_DIR/keys/<tenant>/`` (an edge: file I/O).

    secret.asc  the armored transferable secret key, unprotected (mode 0600, folder 0700)
    public.asc  the armored transferable public key (what the directory operator publishes)

Files are written atomically (temporary file, fsync, rename, fsync of the folder). An existing key is never
replaced unless asked (``force``); a secret key readable by group or others is refused when loaded.
The key material itself is made and read by ``server.crypto`` (RFC 4880 sections 11.1, 11.2).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from server.crypto import (OpenPGPError, SecretKey, encryption_key, export_public_key, export_secret_key,
                           generate_key, import_secret_key)
from server.crypto.keys import signing_key
from server.errors import ErrorKind, ServerError
from server.security.tokens import validate_tenant

SECRET_FILE = "secret.asc"
PUBLIC_FILE = "public.asc"
KEY_BITS = (3072, 4096)
_ADDRESS = re.compile(r"^[^\s@<>\"]+@[^\s@<>\"]+\.[^\s@<>\"]+$")


def key_dir(data_dir: Path, tenant: str) -> Path:
    """The key folder of a tenant (the tenant name is validated: it becomes a path element)."""
    return Path(data_dir) / "keys" / validate_tenant(tenant)


def user_id(address: str, name: str | None = None) -> str:
    """The User ID ``Name <address>`` (RFC 4880 section 5.11; RFC 5322 name-addr)."""
    if not _ADDRESS.match(address):
        raise ServerError(ErrorKind.INVALID, f"not a mail address: {address!r}", parameter="--address")
    if name is not None and (not name.strip() or any(c in name for c in "<>\r\n")):
        raise ServerError(ErrorKind.INVALID, f"invalid name {name!r}", parameter="--name")
    return f"{name.strip()} <{address}>" if name else f"<{address}>"


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_usable(key: SecretKey) -> None:
    """INVALID unless we hold the secret of a usable signing key and of a usable encryption subkey."""
    try:
        signing_key(key)
        part = encryption_key(key)
    except OpenPGPError as exc:
        raise ServerError(ErrorKind.INVALID, f"key {key.fingerprint} cannot be used: {exc.message}") from exc
    if key.private_for(part) is None:
        raise ServerError(ErrorKind.INVALID, f"key {key.fingerprint}: the secret of its encryption subkey is missing")


def _refuse_existing(secret: Path, tenant: str) -> None:
    if secret.exists():
        raise ServerError(ErrorKind.CONFLICT, f"tenant {tenant!r} already has a key ({secret}); use --force to "
                                              "replace it")


def save_key(data_dir: Path, tenant: str, key: SecretKey, *, force: bool = False) -> Path:
    """Store ``key`` as the tenant's key; CONFLICT when one exists and ``force`` is not set."""
    folder = key_dir(data_dir, tenant)
    secret = folder / SECRET_FILE
    if not force:
        _refuse_existing(secret, tenant)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
        folder.chmod(0o700)
        _write_atomic(secret, export_secret_key(key), 0o600)
        _write_atomic(folder / PUBLIC_FILE, export_public_key(key), 0o644)
        _fsync_dir(folder)
    except OSError as exc:
        raise ServerError(ErrorKind.INTERNAL, f"cannot write the key of {tenant!r}: {exc.strerror}") from exc
    return folder


def init_key(data_dir: Path, tenant: str, address: str, *, name: str | None = None, bits: int = 3072,
             force: bool = False) -> SecretKey:
    """Generate (RSA, certify+sign primary and encryption subkey) and store a tenant's key pair."""
    if bits not in KEY_BITS:
        raise ServerError(ErrorKind.INVALID, f"key size must be one of {KEY_BITS}", parameter="--bits")
    uid = user_id(address, name)
    if not force:
        _refuse_existing(key_dir(data_dir, tenant) / SECRET_FILE, tenant)
    key = generate_key(uid, bits=bits)
    save_key(data_dir, tenant, key, force=force)
    return key


def import_key(data_dir: Path, tenant: str, data: bytes, *, passphrase: bytes | None = None,
               force: bool = False) -> SecretKey:
    """Import an existing secret key (armored or binary, e.g. ``gpg --export-secret-keys``) as the tenant's key.

    A passphrase-protected key is unlocked with ``passphrase`` and stored unprotected (mode 0600).
    """
    try:
        key = import_secret_key(data, passphrase=passphrase)
    except OpenPGPError as exc:
        raise ServerError(ErrorKind.INVALID, f"cannot import the secret key: {exc.message}") from exc
    _check_usable(key)
    save_key(data_dir, tenant, key, force=force)
    return key


def load_key(data_dir: Path, tenant: str) -> SecretKey:
    """The tenant's secret key; NOT_FOUND when missing, SECURITY when group/others may read it."""
    folder = key_dir(data_dir, tenant)
    secret = folder / SECRET_FILE
    try:
        folder_mode = folder.stat().st_mode
        file_stat = secret.stat()
    except FileNotFoundError as exc:
        raise ServerError(ErrorKind.NOT_FOUND, f"tenant {tenant!r} has no key ({secret}); create one with "
                                               "`telerad keys init` or `telerad keys import`") from exc
    if stat.S_IMODE(folder_mode) & 0o077 or stat.S_IMODE(file_stat.st_mode) & 0o077:
        raise ServerError(ErrorKind.SECURITY,
                          f"permissions of {secret} are too open (folder {stat.S_IMODE(folder_mode):o}, file "
                          f"{stat.S_IMODE(file_stat.st_mode):o}); need 0700 and 0600")
    try:
        return import_secret_key(secret.read_bytes())
    except OSError as exc:
        raise ServerError(ErrorKind.INTERNAL, f"cannot read {secret}: {exc.strerror}") from exc
    except OpenPGPError as exc:
        raise ServerError(ErrorKind.INVALID, f"{secret} holds no usable secret key: {exc.message}") from exc


def public_key_text(data_dir: Path, tenant: str) -> str:
    """The armored public key of the tenant (from its secret key, so the two never disagree)."""
    return export_public_key(load_key(data_dir, tenant)).decode("ascii")
