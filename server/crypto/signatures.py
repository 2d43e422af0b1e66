"""v4 signature packets: parse, hash, make and check (RFC 4880 sections 5.2, 5.4)."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from server.crypto.errors import MalformedPacket, UnsupportedAlgorithm
from server.crypto.material import (KeyPart, hash_material, read_signature_values, sign_digest,
                                    verify_digest)
from server.crypto.packets import HASH_NAME, Sub, read_subpackets, subpacket

KNOWN_SUBPACKETS = frozenset(int(s) for s in Sub) | {4, 5, 6, 7, 10, 12, 20, 24, 26, 28, 29, 31}


@dataclass(frozen=True)
class Signature:
    """A parsed v4 signature packet (RFC 4880 section 5.2.3)."""

    sig_type: int
    algorithm: int
    hash_algo: int
    hashed_area: bytes                      # version .. hashed subpackets: the signed trailer
    hashed: tuple[tuple[int, bool, bytes], ...]
    unhashed: tuple[tuple[int, bool, bytes], ...]
    left16: bytes
    values: tuple[int, ...]

    def _first(self, kind: int, *, unhashed_ok: bool = False) -> bytes | None:
        for sub_kind, _critical, data in self.hashed + (self.unhashed if unhashed_ok else ()):
            if sub_kind == kind:
                return data
        return None

    def _int(self, kind: int) -> int | None:
        data = self._first(kind)
        return int.from_bytes(data, "big") if data else None

    @property
    def created(self) -> int:
        """Signature creation time, a required hashed subpacket (RFC 4880 section 5.2.3.4)."""
        value = self._int(Sub.CREATION_TIME)
        if value is None:
            raise MalformedPacket("signature without creation time")
        return value

    @property
    def expires_after(self) -> int | None:
        """Signature expiration, seconds after creation; 0 or absent means never (RFC 4880 section 5.2.3.10)."""
        return self._int(Sub.EXPIRATION_TIME) or None

    @property
    def key_expires_after(self) -> int | None:
        """Key expiration, seconds after key creation (RFC 4880 section 5.2.3.6)."""
        return self._int(Sub.KEY_EXPIRATION_TIME) or None

    @property
    def key_flags(self) -> int | None:
        """Key flags of a self-signature (RFC 4880 section 5.2.3.21)."""
        data = self._first(Sub.KEY_FLAGS)
        return data[0] if data else None

    @property
    def issuers(self) -> tuple[bytes, ...]:
        """Issuer fingerprints (RFC 9580 section 5.2.3.35) and key ids (RFC 4880 section 5.2.3.5)."""
        out = []
        for kind, _critical, data in self.hashed + self.unhashed:
            if kind == Sub.ISSUER_FINGERPRINT and len(data) == 21 and data[0] == 4:
                out.append(data[1:])
            elif kind == Sub.ISSUER and len(data) == 8:
                out.append(data)
        return tuple(out)

    @property
    def embedded(self) -> Signature | None:
        """The embedded primary key binding signature of a signing subkey (RFC 4880 section 5.2.3.26)."""
        data = self._first(Sub.EMBEDDED_SIGNATURE, unhashed_ok=True)
        return parse_signature(data) if data else None

    @property
    def has_unknown_critical(self) -> bool:
        """A critical subpacket we do not understand makes the signature invalid (RFC 4880 section 5.2.3.1)."""
        return any(critical and kind not in KNOWN_SUBPACKETS for kind, critical, _ in self.hashed)

    def issued_by(self, part: KeyPart) -> bool:
        """True when an issuer subpacket names ``part``."""
        return any(issuer in (part.fingerprint, part.key_id) for issuer in self.issuers)

    def trailer(self) -> bytes:
        """Hashed area, 0x04 0xFF and its length: what ends every v4 hash (RFC 4880 section 5.2.4)."""
        return self.hashed_area + b"\x04\xff" + len(self.hashed_area).to_bytes(4, "big")


def parse_signature(body: bytes | memoryview) -> Signature:
    """Parse a v4 signature packet body (RFC 4880 section 5.2.3)."""
    view = memoryview(body)
    if len(view) < 6:
        raise MalformedPacket("truncated signature packet")
    if view[0] != 4:
        raise UnsupportedAlgorithm(f"unsupported signature version {view[0]}")
    hashed_len = int.from_bytes(view[4:6], "big")
    pos = 6 + hashed_len
    if pos + 2 > len(view):
        raise MalformedPacket("truncated signature packet")
    unhashed_len = int.from_bytes(view[pos:pos + 2], "big")
    unhashed_end = pos + 2 + unhashed_len
    if unhashed_end + 2 > len(view):
        raise MalformedPacket("truncated signature packet")
    return Signature(
        sig_type=view[1], algorithm=view[2], hash_algo=view[3],
        hashed_area=bytes(view[:pos]),
        hashed=tuple(read_subpackets(view[6:pos])),
        unhashed=tuple(read_subpackets(view[pos + 2:unhashed_end])),
        left16=bytes(view[unhashed_end:unhashed_end + 2]),
        values=read_signature_values(view[2], view[unhashed_end + 2:]),
    )


def new_hash(hash_algo: int):
    """A hashlib object for an OpenPGP hash id (RFC 4880 section 9.4)."""
    try:
        return hashlib.new(HASH_NAME[hash_algo])
    except KeyError as exc:
        raise UnsupportedAlgorithm(f"unsupported hash algorithm {hash_algo}") from exc


def check(sig: Signature, part: KeyPart, hasher) -> bool:
    """Finish ``hasher`` (already fed with the signed data) and verify ``sig`` under ``part`` (section 5.2.4)."""
    if sig.has_unknown_critical:
        return False
    hasher.update(sig.trailer())
    digest = hasher.digest()
    if digest[:2] != sig.left16:
        return False
    return verify_digest(part, sig.hash_algo, digest, sig.values)


def key_hasher(sig: Signature | int, primary: KeyPart, *, uid: bytes | None = None,
               subkey: KeyPart | None = None):
    """Hash the key material a certification or binding signature covers (RFC 4880 section 5.2.4)."""
    hasher = new_hash(sig.hash_algo if isinstance(sig, Signature) else sig)
    hasher.update(hash_material(primary.body))
    if uid is not None:
        hasher.update(b"\xb4" + len(uid).to_bytes(4, "big") + uid)
    if subkey is not None:
        hasher.update(hash_material(subkey.body))
    return hasher


def make_signature(*, sig_type: int, signer: KeyPart, private: object, hash_algo: int, hasher,
                   hashed: list[bytes] = (), created: int | None = None) -> bytes:
    """A v4 signature packet body; issuer fingerprint + creation time hashed, key id unhashed (section 5.2.3)."""
    created = int(time.time()) if created is None else created
    subs = (subpacket(Sub.CREATION_TIME, created.to_bytes(4, "big"))
            + subpacket(Sub.ISSUER_FINGERPRINT, b"\x04" + signer.fingerprint) + b"".join(hashed))
    hashed_area = bytes([4, sig_type, signer.algorithm, hash_algo]) + len(subs).to_bytes(2, "big") + subs
    hasher.update(hashed_area + b"\x04\xff" + len(hashed_area).to_bytes(4, "big"))
    digest = hasher.digest()
    unhashed = subpacket(Sub.ISSUER, signer.key_id)
    return (hashed_area + len(unhashed).to_bytes(2, "big") + unhashed + digest[:2]
            + sign_digest(private, signer.algorithm, hash_algo, digest))
