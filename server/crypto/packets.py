"""OpenPGP packet framing, MPIs, subpackets and algorithm tables (RFC 4880 sections 3, 4, 5.2.3, 9)."""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass

from server.crypto.errors import MalformedPacket


class Tag(enum.IntEnum):
    """Packet tags (RFC 4880 section 4.3)."""

    PKESK = 1
    SIGNATURE = 2
    SKESK = 3
    ONE_PASS_SIGNATURE = 4
    SECRET_KEY = 5
    PUBLIC_KEY = 6
    SECRET_SUBKEY = 7
    COMPRESSED = 8
    SED = 9
    MARKER = 10
    LITERAL = 11
    TRUST = 12
    USER_ID = 13
    PUBLIC_SUBKEY = 14
    USER_ATTRIBUTE = 17
    SEIPD = 18
    MDC = 19


class PubKeyAlgo(enum.IntEnum):
    """Public-key algorithms (RFC 4880 section 9.1, RFC 6637 section 5, RFC 9580 section 9.1)."""

    RSA = 1
    RSA_ENCRYPT = 2
    RSA_SIGN = 3
    ELGAMAL = 16
    DSA = 17
    ECDH = 18
    ECDSA = 19
    EDDSA = 22


class SymAlgo(enum.IntEnum):
    """Symmetric algorithms we implement (RFC 4880 section 9.2)."""

    AES128 = 7
    AES192 = 8
    AES256 = 9


SYM_KEY_SIZE = {SymAlgo.AES128: 16, SymAlgo.AES192: 24, SymAlgo.AES256: 32}


class HashAlgo(enum.IntEnum):
    """Hash algorithms (RFC 4880 section 9.4); hashlib names in HASH_NAME."""

    SHA1 = 2
    SHA256 = 8
    SHA384 = 9
    SHA512 = 10
    SHA224 = 11


HASH_NAME = {HashAlgo.SHA1: "sha1", HashAlgo.SHA256: "sha256", HashAlgo.SHA384: "sha384",
             HashAlgo.SHA512: "sha512", HashAlgo.SHA224: "sha224"}


class CompressAlgo(enum.IntEnum):
    """Compression algorithms (RFC 4880 section 9.3)."""

    NONE = 0
    ZIP = 1
    ZLIB = 2
    BZIP2 = 3


class SigType(enum.IntEnum):
    """Signature types (RFC 4880 section 5.2.1)."""

    BINARY = 0x00
    TEXT = 0x01
    GENERIC_CERT = 0x10
    PERSONA_CERT = 0x11
    CASUAL_CERT = 0x12
    POSITIVE_CERT = 0x13
    SUBKEY_BINDING = 0x18
    PRIMARY_KEY_BINDING = 0x19
    DIRECT_KEY = 0x1F
    KEY_REVOCATION = 0x20
    SUBKEY_REVOCATION = 0x28
    CERT_REVOCATION = 0x30


CERTIFICATIONS = frozenset({SigType.GENERIC_CERT, SigType.PERSONA_CERT, SigType.CASUAL_CERT,
                            SigType.POSITIVE_CERT})


class Sub(enum.IntEnum):
    """Signature subpacket types (RFC 4880 section 5.2.3.1)."""

    CREATION_TIME = 2
    EXPIRATION_TIME = 3
    KEY_EXPIRATION_TIME = 9
    PREFERRED_SYMMETRIC = 11
    ISSUER = 16
    PREFERRED_HASH = 21
    PREFERRED_COMPRESSION = 22
    KEYSERVER_PREFS = 23
    PRIMARY_USER_ID = 25
    KEY_FLAGS = 27
    FEATURES = 30
    EMBEDDED_SIGNATURE = 32
    ISSUER_FINGERPRINT = 33


class KeyFlag(enum.IntFlag):
    """Key flags (RFC 4880 section 5.2.3.21)."""

    CERTIFY = 0x01
    SIGN = 0x02
    ENCRYPT_COMMS = 0x04
    ENCRYPT_STORAGE = 0x08


ENCRYPT_FLAGS = KeyFlag.ENCRYPT_COMMS | KeyFlag.ENCRYPT_STORAGE


@dataclass(frozen=True)
class Packet:
    """One packet: its tag and body (RFC 4880 section 4.1)."""

    tag: int
    body: bytes | memoryview


def encode_length(length: int) -> bytes:
    """New-format body length, 1, 2 or 5 octets (RFC 4880 section 4.2.2)."""
    if length < 192:
        return bytes([length])
    if length < 8384:
        length -= 192
        return bytes([(length >> 8) + 192, length & 0xFF])
    return b"\xff" + length.to_bytes(4, "big")


def header(tag: int, length: int) -> bytes:
    """New-format packet header (RFC 4880 section 4.2)."""
    return bytes([0xC0 | tag]) + encode_length(length)


def packet(tag: int, body: bytes) -> bytes:
    """A complete new-format packet with a definite length (RFC 4880 section 4.2.2)."""
    return header(tag, len(body)) + body


def packet_partial(tag: int, body: bytes, chunk_power: int = 13) -> bytes:
    """A new-format packet in partial body lengths of 2**chunk_power octets (RFC 4880 section 4.2.2.4)."""
    if not 9 <= chunk_power <= 30:
        raise ValueError("the first partial length must be at least 512 octets")
    chunk = 1 << chunk_power
    parts = [bytes([0xC0 | tag])]
    pos = 0
    while len(body) - pos >= chunk:
        parts += [bytes([224 + chunk_power]), body[pos:pos + chunk]]
        pos += chunk
    parts += [encode_length(len(body) - pos), body[pos:]]
    return b"".join(parts)


def _need(data: memoryview, pos: int, count: int) -> None:
    if pos + count > len(data):
        raise MalformedPacket("truncated OpenPGP packet")


def _read_new_length(data: memoryview, pos: int) -> tuple[int, int, bool]:
    """(length, new pos, partial?) of a new-format length (RFC 4880 section 4.2.2)."""
    _need(data, pos, 1)
    first = data[pos]
    if first < 192:
        return first, pos + 1, False
    if first < 224:
        _need(data, pos, 2)
        return ((first - 192) << 8) + data[pos + 1] + 192, pos + 2, False
    if first == 255:
        _need(data, pos, 5)
        return int.from_bytes(data[pos + 1:pos + 5], "big"), pos + 5, False
    return 1 << (first & 0x1F), pos + 1, True


def read_packets(data: bytes | memoryview) -> Iterator[Packet]:
    """Split a packet sequence, old and new headers, partial and indeterminate lengths (RFC 4880 section 4.2)."""
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        ctb = view[pos]
        pos += 1
        if not ctb & 0x80:
            raise MalformedPacket("not an OpenPGP packet header")
        if ctb & 0x40:
            tag = ctb & 0x3F
            length, pos, partial = _read_new_length(view, pos)
            if partial:
                chunks = []
                while partial:
                    _need(view, pos, length)
                    chunks.append(view[pos:pos + length])
                    pos += length
                    length, pos, partial = _read_new_length(view, pos)
                _need(view, pos, length)
                chunks.append(view[pos:pos + length])
                pos += length
                yield Packet(tag, b"".join(chunks))
                continue
        else:
            tag = (ctb >> 2) & 0x0F
            length_type = ctb & 0x03
            if length_type == 3:
                length = len(view) - pos
            else:
                size = 1 << length_type
                _need(view, pos, size)
                length = int.from_bytes(view[pos:pos + size], "big")
                pos += size
        _need(view, pos, length)
        yield Packet(tag, view[pos:pos + length])
        pos += length


def mpi(value: int) -> bytes:
    """Multiprecision integer: bit count and big-endian octets (RFC 4880 section 3.2)."""
    bits = value.bit_length()
    return bits.to_bytes(2, "big") + value.to_bytes((bits + 7) // 8, "big")


def mpi_bytes(octets: bytes) -> bytes:
    """An MPI from an octet string such as an EC point (RFC 6637 section 6)."""
    return mpi(int.from_bytes(octets, "big"))


def read_mpi(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """(value, new pos) of the MPI at ``pos`` (RFC 4880 section 3.2)."""
    view = memoryview(data)
    _need(view, pos, 2)
    size = (int.from_bytes(view[pos:pos + 2], "big") + 7) // 8
    _need(view, pos + 2, size)
    return int.from_bytes(view[pos + 2:pos + 2 + size], "big"), pos + 2 + size


def subpacket(kind: int, data: bytes, *, critical: bool = False) -> bytes:
    """One signature subpacket (RFC 4880 section 5.2.3.1)."""
    return encode_length(len(data) + 1) + bytes([kind | (0x80 if critical else 0)]) + data


def read_subpackets(data: bytes | memoryview) -> list[tuple[int, bool, bytes]]:
    """(type, critical, data) of each subpacket in an area (RFC 4880 section 5.2.3.1)."""
    view = memoryview(data)
    pos = 0
    out = []
    while pos < len(view):
        length, pos, partial = _read_new_length(view, pos)
        if partial or length == 0:
            raise MalformedPacket("bad signature subpacket length")
        _need(view, pos, length)
        kind = view[pos]
        out.append((kind & 0x7F, bool(kind & 0x80), bytes(view[pos + 1:pos + length])))
        pos += length
    return out
