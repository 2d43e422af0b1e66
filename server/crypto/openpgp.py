"""Signed and encrypted OpenPGP messages and detached signatures, as GnuPG 2.2 makes them (RFC 4880, RFC 3156).

Pure: bytes in, bytes out. The bulk work (AES-CFB, SHA-1 MDC, SHA-256, zlib, base64, CRC-24) runs in C
over whole buffers, never per byte in Python.
"""

from __future__ import annotations

import bz2
import os
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

try:  # cryptography >= 43 keeps CFB among the "decrepit" modes
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - cryptography 42
    from cryptography.hazmat.primitives.ciphers.modes import CFB

from server.crypto.armor import MESSAGE, SIGNATURE, armor, armor_kind, dearmor, is_armored
from server.crypto.errors import (BadSignature, MalformedPacket, NotEncrypted, NotSigned,
                                  TamperedMessage, UnknownSender, UnsupportedAlgorithm, WrongRecipientKey)
from server.crypto.keys import PublicKey, SecretKey, encryption_key, signing_key, verification_keys
from server.crypto.material import decrypt_session_key, encrypt_session_key, random_session_key, signing_hash
from server.crypto.packets import (SYM_KEY_SIZE, CompressAlgo, HashAlgo, Packet, SigType, SymAlgo, Tag, header,
                                   packet, read_packets)
from server.crypto.signatures import Signature, check, make_signature, new_hash, parse_signature

MICALG = "pgp-sha256"               # multipart/signed micalg of our detached signatures (RFC 3156 section 5)
MDC_HEADER = b"\xd3\x14"            # new-format tag 19, length 20 (RFC 4880 section 5.14)
SEIPD_VERSION = 1                   # RFC 4880 section 5.13
BLOCK = 16                          # AES block size
COMPRESS_LEVEL = 6
_PROBE = 65536                      # bytes compressed to decide whether compression pays
_MESSAGE_TAGS = {Tag.PKESK, Tag.SKESK, Tag.SEIPD, Tag.SED, Tag.MARKER}


@dataclass(frozen=True)
class Verified:
    """Who signed and when (RFC 4880 section 5.2.3.4); the fingerprint is the signer's primary key."""

    signer_fingerprint: str
    signature_time: datetime


@dataclass(frozen=True)
class Decrypted:
    """A decrypted message whose signature verified; text literal data keeps its CRLF line ends (section 5.9)."""

    data: bytes
    filename: bytes
    signer_fingerprint: str
    signature_time: datetime


def _cipher(sym: int, key: bytes) -> Cipher:
    """AES in OpenPGP CFB with an all-zero IV and no resync, for SEIPD (RFC 4880 section 13.9)."""
    return Cipher(algorithms.AES(key), CFB(bytes(BLOCK)))


def _worth_compressing(data: bytes) -> bool:
    """Skip compression of data that is already compressed (JPEG pixel data), as gpg does."""
    probe = data[:_PROBE]
    return len(probe) > 0 and len(zlib.compress(probe, 1)) < 0.9 * len(probe)


def _literal_header(data_len: int, filename: bytes, created: int) -> bytes:
    """Header and leading fields of a binary literal data packet (RFC 4880 section 5.9)."""
    name = filename[:255]
    fields = b"b" + bytes([len(name)]) + name + created.to_bytes(4, "big")
    return header(Tag.LITERAL, len(fields) + data_len) + fields


def _one_pass(sig_type: int, hash_algo: int, part) -> bytes:
    """A one-pass signature packet, last of its kind (RFC 4880 section 5.4)."""
    return packet(Tag.ONE_PASS_SIGNATURE, bytes([3, sig_type, hash_algo, part.algorithm]) + part.key_id + b"\x01")


def _sign(data: bytes, signer: SecretKey, sig_type: int, created: int) -> tuple[bytes, object, int]:
    """(signature packet body, signing key part, hash) over ``data`` (RFC 4880 section 5.2.4)."""
    part, private = signing_key(signer, now=created)
    hash_algo = signing_hash(part)
    hasher = new_hash(hash_algo)
    hasher.update(data)
    body = make_signature(sig_type=sig_type, signer=part, private=private, hash_algo=hash_algo,
                          hasher=hasher, created=created)
    return body, part, hash_algo


def encrypt_and_sign(data: bytes, recipients: Sequence[PublicKey | SecretKey], signer: SecretKey, *,
                     filename: bytes = b"", compress: bool = True, now: int | None = None) -> bytes:
    """Armored signed+encrypted message as ``gpg --sign --encrypt`` makes it (RFC 4880 section 11.3).

    PKESK v3 per recipient, SEIPD v1 with MDC and AES-256 holding [ZLIB compressed packet of]
    one-pass signature, binary literal data and a SHA-256 binary signature. Compression is skipped when
    a probe shows the data does not compress.
    """
    if not recipients:
        raise ValueError("at least one recipient is needed")
    created = int(time.time()) if now is None else now
    parts = [encryption_key(r, now=created) for r in recipients]
    sig_body, sig_part, hash_algo = _sign(data, signer, SigType.BINARY, created)
    pieces = [_one_pass(SigType.BINARY, hash_algo, sig_part), _literal_header(len(data), filename, created),
              data, packet(Tag.SIGNATURE, sig_body)]
    if compress and _worth_compressing(data):
        compressor = zlib.compressobj(COMPRESS_LEVEL)
        body = b"".join([bytes([CompressAlgo.ZLIB])] + [compressor.compress(p) for p in pieces]
                        + [compressor.flush()])
        pieces = [packet(Tag.COMPRESSED, body)]
    session_key = random_session_key(SymAlgo.AES256)
    prefix = os.urandom(BLOCK)
    prefix += prefix[-2:]
    mdc = MDC_HEADER + _mdc_hash(prefix, pieces)
    head = b"".join(packet(Tag.PKESK, encrypt_session_key(part, SymAlgo.AES256, session_key)) for part in parts)
    plain_len = len(prefix) + sum(len(p) for p in pieces) + len(mdc)
    head += header(Tag.SEIPD, 1 + plain_len) + bytes([SEIPD_VERSION])
    out = bytearray(len(head) + plain_len + BLOCK)     # update_into wants block size - 1 spare octets
    out[:len(head)] = head
    view, pos = memoryview(out), len(head)
    encryptor = _cipher(SymAlgo.AES256, session_key).encryptor()
    for piece in [prefix, *pieces, mdc]:
        pos += encryptor.update_into(piece, view[pos:])
    view.release()
    del out[pos:]
    return armor(MESSAGE, out)


def _mdc_hash(prefix: bytes, pieces: Sequence[bytes]) -> bytes:
    """SHA-1 over prefix, plaintext and the MDC packet header (RFC 4880 section 5.14)."""
    hasher = new_hash(HashAlgo.SHA1)
    hasher.update(prefix)
    for piece in pieces:
        hasher.update(piece)
    hasher.update(MDC_HEADER)
    return hasher.digest()


def _binary(data: bytes, expected_kind: str) -> bytes:
    """Dearmor when armored; refuse another armor kind."""
    if not is_armored(data):
        return data
    kind = armor_kind(data)
    if kind != expected_kind:
        if expected_kind == MESSAGE:
            raise NotEncrypted(f"expected an encrypted OpenPGP message, got PGP {kind}")
        raise MalformedPacket(f"expected PGP {expected_kind}, got PGP {kind}")
    return dearmor(data)[1]


def _packets(data: bytes | memoryview) -> list[Packet]:
    try:
        return list(read_packets(data))
    except (IndexError, ValueError) as exc:
        raise MalformedPacket("malformed OpenPGP packets") from exc


def _open_session(pkesks: list[Packet], my_keys: Sequence[SecretKey]) -> tuple[int, bytes]:
    """Find a PKESK one of our keys opens (RFC 4880 section 5.1); key id 0 means try every key."""
    for pkt in pkesks:
        body = memoryview(pkt.body)
        if len(body) < 10 or body[0] != 3:
            continue
        key_id, algorithm = bytes(body[1:9]), body[9]
        for key in my_keys:
            for use in key.public().uses:
                if use.part.algorithm != algorithm or key_id not in (use.part.key_id, bytes(8)):
                    continue
                private = key.private_for(use.part)
                opened = decrypt_session_key(use.part, private, body[10:]) if private is not None else None
                if opened is not None:
                    return opened
    raise WrongRecipientKey()


def _decrypt_seipd(body: memoryview, sym: int, key: bytes) -> memoryview:
    """Decrypt a SEIPD body and check its quick check and MDC (RFC 4880 sections 5.13, 5.14)."""
    if len(body) < 1 or body[0] != SEIPD_VERSION:
        raise UnsupportedAlgorithm("unsupported SEIPD version")
    if sym not in SYM_KEY_SIZE:
        raise UnsupportedAlgorithm(f"unsupported cipher {sym}")
    if len(body) < 1 + BLOCK + 2 + 22:
        raise MalformedPacket("truncated encrypted data")
    decryptor = _cipher(sym, key).decryptor()
    plain = decryptor.update(body[1:])
    tail = decryptor.finalize()  # empty: CFB is a stream mode
    plain = memoryview(plain + tail if tail else plain)
    if plain[BLOCK - 2:BLOCK] != plain[BLOCK:BLOCK + 2]:
        raise TamperedMessage("encrypted data fails the quick check (wrong key or tampered)")
    if plain[-22:-20] != MDC_HEADER:
        raise TamperedMessage("modification detection code missing")
    hasher = new_hash(HashAlgo.SHA1)
    hasher.update(plain[:-20])
    if hasher.digest() != plain[-20:]:
        raise TamperedMessage()
    return plain[BLOCK + 2:-22]


def _decompress(body: memoryview) -> bytes:
    """Inflate a compressed data packet: ZIP (raw deflate), ZLIB or BZip2 (RFC 4880 section 5.6)."""
    if len(body) < 1:
        raise MalformedPacket("empty compressed packet")
    algo, data = body[0], body[1:]
    try:
        if algo == CompressAlgo.NONE:
            return bytes(data)
        if algo == CompressAlgo.ZIP:
            return zlib.decompressobj(-15).decompress(data)
        if algo == CompressAlgo.ZLIB:
            return zlib.decompressobj().decompress(data)
        if algo == CompressAlgo.BZIP2:
            return bz2.decompress(data)
    except (zlib.error, OSError, ValueError) as exc:
        raise MalformedPacket("bad compressed data") from exc
    raise UnsupportedAlgorithm(f"unsupported compression algorithm {algo}")


def _literal(body: memoryview) -> tuple[int, bytes, memoryview]:
    """(format, filename, data) of a literal data packet (RFC 4880 section 5.9)."""
    if len(body) < 6 or len(body) < 6 + body[1]:
        raise MalformedPacket("truncated literal data packet")
    name_len = body[1]
    return body[0], bytes(body[2:2 + name_len]), body[6 + name_len:]


def _canonical_text(data: bytes | memoryview) -> bytes:
    """Line endings as CRLF for text signatures (RFC 4880 section 5.2.1, type 0x01)."""
    return bytes(data).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _verify(sigs: list[Signature], data: bytes | memoryview, known: Sequence[PublicKey | SecretKey],
            now: int | None) -> Verified:
    """Require a good signature by a known sender; any failing known signature is BadSignature (section 5.2.4)."""
    if not sigs:
        raise NotSigned()
    result = None
    for sig in sigs:
        match = _issuer(sig, known)
        if match is None:
            continue
        key, use = match
        if sig.sig_type not in (SigType.BINARY, SigType.TEXT):
            raise BadSignature(f"unexpected signature type 0x{sig.sig_type:02x}")
        hasher = new_hash(sig.hash_algo)
        hasher.update(_canonical_text(data) if sig.sig_type == SigType.TEXT else data)
        if not check(sig, use.part, hasher):
            raise BadSignature()
        created = sig.created
        now = int(time.time()) if now is None else now
        if sig.expires_after is not None and now >= created + sig.expires_after:
            raise BadSignature("signature expired")
        for problem in (key.public().primary.problem(at) for at in (created, now)):
            if problem is not None:  # valid when signed and still valid now (no backdating an expired key)
                raise problem
        for problem in (use.problem(created), use.problem(now)):
            if problem is not None:
                raise problem
        result = result or Verified(key.public().fingerprint, datetime.fromtimestamp(created, UTC))
    if result is None:
        issuers = ", ".join(i.hex().upper() for s in sigs for i in s.issuers)
        raise UnknownSender(f"unknown sender (signed by {issuers or 'an unnamed key'})")
    return result


def _issuer(sig: Signature, known: Sequence[PublicKey | SecretKey]):
    for key in known:
        for use in verification_keys(key):
            if sig.issued_by(use.part):
                return key, use
    return None


def _signatures(packets: list[Packet]) -> list[Signature]:
    """The v4 signatures; only unsupported ones (v3, RFC 4880 section 5.2.2) is UnsupportedAlgorithm."""
    sigs, unsupported = [], None
    for pkt in packets:
        if pkt.tag == Tag.SIGNATURE:
            try:
                sigs.append(parse_signature(pkt.body))
            except UnsupportedAlgorithm as exc:
                unsupported = exc
    if not sigs and unsupported is not None:
        raise unsupported
    return sigs


def _open_plaintext(plain: memoryview | bytes, known: Sequence[PublicKey | SecretKey], now: int | None) -> Decrypted:
    """Unpack [compressed] one-pass signatures, literal data, signatures and verify (RFC 4880 section 11.3)."""
    packets = _packets(plain)
    for _ in range(4):
        if len(packets) == 1 and packets[0].tag == Tag.COMPRESSED:
            packets = _packets(_decompress(memoryview(packets[0].body)))
    literals = [p for p in packets if p.tag == Tag.LITERAL]
    if len(literals) != 1 or any(p.tag not in (Tag.LITERAL, Tag.SIGNATURE, Tag.ONE_PASS_SIGNATURE, Tag.MARKER)
                                 for p in packets):
        raise MalformedPacket("encrypted data is not one signed literal message")
    _format, filename, data = _literal(memoryview(literals[0].body))
    verified = _verify(_signatures(packets), data, known, now)
    return Decrypted(bytes(data), filename, verified.signer_fingerprint, verified.signature_time)


def decrypt_and_verify(armored_or_binary: bytes, my_keys: Sequence[SecretKey],
                       known_senders: Sequence[PublicKey | SecretKey], *, now: int | None = None) -> Decrypted:
    """Decrypt with one of ``my_keys`` and verify a signature by one of ``known_senders`` (RFC 4880 section 11.3).

    Never returns unverified plaintext: every failure raises an OpenPGPError subclass.
    """
    binary = _binary(armored_or_binary, MESSAGE)
    packets = _packets(binary)
    if not packets or any(p.tag not in _MESSAGE_TAGS for p in packets):
        raise NotEncrypted()
    encrypted = [p for p in packets if p.tag in (Tag.SEIPD, Tag.SED)]
    if len(encrypted) != 1:
        raise NotEncrypted("expected exactly one encrypted data packet")
    if encrypted[0].tag == Tag.SED:
        raise TamperedMessage("encrypted data without integrity protection (no MDC) is refused")
    sym, key = _open_session([p for p in packets if p.tag == Tag.PKESK], my_keys)
    plain = _decrypt_seipd(memoryview(encrypted[0].body), sym, key)
    try:
        return _open_plaintext(plain, known_senders, now)
    except MalformedPacket as exc:  # after a good MDC, broken inner packets mean a bad sender
        raise MalformedPacket(f"malformed signed content: {exc.message}") from exc


def sign_detached(data: bytes, signer: SecretKey, *, text: bool = False, now: int | None = None) -> bytes:
    """Armored detached signature, binary (0x00) or text (0x01) with CRLF canonicalisation (RFC 3156 section 5)."""
    created = int(time.time()) if now is None else now
    sig_type = SigType.TEXT if text else SigType.BINARY
    body, _part, _hash = _sign(_canonical_text(data) if text else data, signer, sig_type, created)
    return armor(SIGNATURE, packet(Tag.SIGNATURE, body))


def verify_detached(data: bytes, signature: bytes, known_senders: Sequence[PublicKey | SecretKey], *,
                    now: int | None = None) -> Verified:
    """Verify an armored or binary detached signature over ``data`` (RFC 4880 section 11.4, RFC 3156 section 5)."""
    packets = _packets(_binary(signature, SIGNATURE))
    if not packets or any(p.tag != Tag.SIGNATURE for p in packets):
        raise MalformedPacket("not a detached OpenPGP signature")
    return _verify(_signatures(packets), data, known_senders, now)


__all__ = ["MICALG", "Decrypted", "Verified", "encrypt_and_sign", "decrypt_and_verify", "sign_detached",
           "verify_detached"]
