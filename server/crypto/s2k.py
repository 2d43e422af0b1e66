"""String-to-key and passphrase-protected secret key material (RFC 4880 sections 3.7, 5.5.3)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

try:  # cryptography >= 43 keeps CFB among the "decrepit" modes
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - cryptography 42
    from cryptography.hazmat.primitives.ciphers.modes import CFB

from server.crypto.errors import InvalidKey, MalformedPacket, UnsupportedAlgorithm
from server.crypto.packets import HASH_NAME, SYM_KEY_SIZE

USAGE_SHA1 = 254          # encrypted, SHA-1 hash check (RFC 4880 section 5.5.3)
USAGE_CHECKSUM = 255      # encrypted, two-octet checksum
S2K_SIMPLE, S2K_SALTED, S2K_ITERATED, S2K_GNU = 0, 1, 3, 101
_BLOCK = 16               # AES, the only ciphers we accept for protected keys


@dataclass(frozen=True)
class Protection:
    """How secret MPIs are protected: usage, cipher, S2K and IV (RFC 4880 sections 3.7.1, 5.5.3)."""

    usage: int
    cipher: int
    s2k_type: int
    hash_algo: int
    salt: bytes
    count: int
    iv: bytes

    @property
    def is_stub(self) -> bool:
        """GnuPG's S2K 101 "gnu-dummy"/"divert-to-card": no secret material present."""
        return self.s2k_type == S2K_GNU


def read_protection(view: memoryview, pos: int) -> tuple[Protection, int]:
    """Parse the S2K usage octet and what follows it up to the encrypted data (RFC 4880 section 5.5.3)."""
    def need(count: int) -> None:
        if pos + count > len(view):
            raise MalformedPacket("truncated secret key protection")

    need(1)
    usage = view[pos]
    if usage not in (USAGE_SHA1, USAGE_CHECKSUM):
        raise UnsupportedAlgorithm("legacy secret key protection (S2K usage 1..253) is not supported")
    need(3)
    cipher, s2k_type, hash_algo = view[pos + 1], view[pos + 2], view[pos + 3]
    pos += 4
    salt, count = b"", 0
    if s2k_type == S2K_GNU:
        return Protection(usage, cipher, s2k_type, hash_algo, b"", 0, b""), len(view)
    if s2k_type in (S2K_SALTED, S2K_ITERATED):
        need(8)
        salt = bytes(view[pos:pos + 8])
        pos += 8
    if s2k_type == S2K_ITERATED:
        need(1)
        coded = view[pos]
        count = (16 + (coded & 15)) << ((coded >> 4) + 6)
        pos += 1
    elif s2k_type not in (S2K_SIMPLE, S2K_SALTED):
        raise UnsupportedAlgorithm(f"unsupported S2K type {s2k_type}")
    if cipher not in SYM_KEY_SIZE or hash_algo not in HASH_NAME:
        raise UnsupportedAlgorithm("secret key protected with an unsupported cipher or hash")
    need(_BLOCK)
    return Protection(usage, cipher, s2k_type, hash_algo, salt, count, bytes(view[pos:pos + _BLOCK])), pos + _BLOCK


def derive_key(protection: Protection, passphrase: bytes) -> bytes:
    """The S2K key: salted passphrase, iterated to ``count`` octets, hashed with 0-octet preloads (section 3.7.1.3)."""
    data = protection.salt + passphrase
    total = max(protection.count, len(data)) if protection.s2k_type == S2K_ITERATED else len(data)
    size = SYM_KEY_SIZE[protection.cipher]
    out = b""
    preload = 0
    while len(out) < size:
        hasher = hashlib.new(HASH_NAME[protection.hash_algo], b"\0" * preload)
        block = data * max(1, 65536 // len(data)) if data else b""
        remaining = total
        while remaining >= len(block) > 0:
            hasher.update(block)
            remaining -= len(block)
        full, rest = divmod(remaining, len(data)) if data else (0, 0)
        hasher.update(data * full + data[:rest])
        out += hasher.digest()
        preload += 1
    return out[:size]


def unprotect(protection: Protection, encrypted: bytes | memoryview, passphrase: bytes | None) -> bytes:
    """Decrypt protected secret MPIs and check their SHA-1 or checksum (RFC 4880 section 5.5.3)."""
    if passphrase is None:
        raise InvalidKey("secret key is passphrase-protected; a passphrase is required")
    key = derive_key(protection, passphrase)
    decryptor = Cipher(algorithms.AES(key), CFB(protection.iv)).decryptor()
    plain = decryptor.update(encrypted) + decryptor.finalize()
    if protection.usage == USAGE_SHA1:
        body, check = plain[:-20], plain[-20:]
        ok = len(plain) >= 20 and hashlib.sha1(body).digest() == check
    else:
        body, check = plain[:-2], plain[-2:]
        ok = len(plain) >= 2 and (sum(body) & 0xFFFF).to_bytes(2, "big") == check
    if not ok:
        raise InvalidKey("wrong passphrase or damaged secret key")
    return body
