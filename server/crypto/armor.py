"""ASCII armor with its CRC-24 checksum (RFC 4880 section 6)."""

from __future__ import annotations

import binascii
import struct

from server.crypto.errors import MalformedPacket

CRC24_INIT = 0xB704CE
CRC24_POLY = 0x1864CFB
# x^(2^23-1) = 1 modulo the CRC-24 polynomial (x+1 times a primitive degree-23 factor): exponents count modulo
# _CYCLE, and folding a polynomial into _CYCLE-bit chunks with XOR keeps its remainder.
_CYCLE = 2**23 - 1
_TABLE_LIMIT = 4096
LINE = 64                                   # gpg's line length; RFC 4880 allows up to 76
_LINES = struct.Struct(f"{LINE}s" * 1024)   # cuts 1024 lines per C call

MESSAGE = "MESSAGE"
PUBLIC_KEY = "PUBLIC KEY BLOCK"
PRIVATE_KEY = "PRIVATE KEY BLOCK"
SIGNATURE = "SIGNATURE"


def _make_table() -> tuple[int, ...]:
    """Byte-wise CRC-24 table (RFC 4880 section 6.1)."""
    table = []
    for byte in range(256):
        crc = byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= CRC24_POLY
        table.append(crc & 0xFFFFFF)
    return tuple(table)


_TABLE = _make_table()


def crc24_reference(data: bytes) -> int:
    """CRC-24 byte by byte, as the sample code of RFC 4880 section 6.1."""
    crc = CRC24_INIT
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFF) ^ _TABLE[((crc >> 16) ^ byte) & 0xFF]
    return crc


def _clmul(a: int, b: int) -> int:
    """Carry-less product of two GF(2) polynomials held in ints (b small)."""
    result = 0
    shift = 0
    while b:
        if b & 1:
            result ^= a << shift
        b >>= 1
        shift += 1
    return result


def _mulmod(a: int, b: int) -> int:
    """a * b modulo the CRC-24 polynomial, both of degree < 24."""
    result = 0
    while b:
        if b & 1:
            result ^= a
        b >>= 1
        a <<= 1
        if a & 0x1000000:
            a ^= CRC24_POLY
    return result


def _xpow(exponent: int) -> int:
    """x^exponent modulo the CRC-24 polynomial."""
    result, base = 1, 2
    exponent %= _CYCLE
    while exponent:
        if exponent & 1:
            result = _mulmod(result, base)
        base = _mulmod(base, base)
        exponent >>= 1
    return result


def _polymod(value: int) -> int:
    """A GF(2) polynomial of any degree modulo the CRC-24 polynomial, by folding the upper half."""
    bits = value.bit_length()
    while bits > 64:
        half = bits // 2
        high, low = value >> half, value & ((1 << half) - 1)
        value = _clmul(high, _xpow(half)) ^ low
        bits = value.bit_length()
    while bits > 24:
        value ^= CRC24_POLY << (bits - 25)
        bits = value.bit_length()
    return value


# Exponents k with x^k = x^a + x^b + 1 modulo the CRC-24 polynomial (k, a, b), about 10 % apart: folding the bits
# above k back onto the low k bits costs three shifted XORs of the upper part (instead of one per set bit of an
# arbitrary x^k mod P, as _polymod does). Found by stepping x^k for k < 2^23 - 1; the tests check them.
_SPARSE = ((52043, 3, 11), (71376, 15, 22), (95693, 10, 22), (112367, 5, 8), (124182, 1, 19),
           (219617, 4, 18), (255458, 4, 16), (322442, 7, 14), (398907, 21, 23), (457376, 10, 19),
           (518926, 5, 9), (583639, 14, 15), (748975, 14, 23), (877537, 17, 21), (966101, 4, 15),
           (1099931, 7, 8), (1237661, 3, 23), (1362743, 5, 13), (1526319, 1, 21), (1711956, 9, 11),
           (1888469, 4, 11), (2090875, 16, 22), (2366132, 1, 6), (2638440, 13, 14), (2915860, 5, 18),
           (3262180, 9, 14), (3606092, 4, 17), (3995484, 4, 9), (4461362, 3, 8), (4935527, 7, 17),
           (5463428, 14, 21), (6034760, 11, 23), (6664387, 5, 22), (7354036, 6, 9), (8154629, 4, 10))


def _fold(value: int) -> int:
    """``value`` as a GF(2) polynomial, reduced to fewer than 2 * _SPARSE[0][0] bits keeping its remainder."""
    bits = value.bit_length()
    while bits > _CYCLE:  # x^(m * _CYCLE) = 1: add the upper part onto the lower one, halving
        k = max(1, bits // (2 * _CYCLE)) * _CYCLE
        high = value >> k
        value ^= (high << k) ^ high
        bits = value.bit_length()
    i = len(_SPARSE) - 1
    while bits > 2 * _SPARSE[0][0]:
        while _SPARSE[i][0] > (bits + 24) // 2:  # the largest k that still halves the value
            i -= 1
        k, a, b = _SPARSE[i]
        high = value >> k
        value = (value & ((1 << k) - 1)) ^ high ^ (high << a) ^ (high << b)
        bits = value.bit_length()
    return value


def crc24(data: bytes) -> int:
    """OpenPGP CRC-24 (RFC 4880 section 6.1) in time linear in C: crc = (init*x^8n + M*x^24) mod P."""
    if len(data) <= _TABLE_LIMIT:
        return crc24_reference(data)
    remainder = _polymod(_fold(int.from_bytes(data, "big")))
    return _mulmod(CRC24_INIT, _xpow(8 * len(data))) ^ _polymod(remainder << 24)


def armor(kind: str, data: bytes, *, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """Armor ``data`` as ``-----BEGIN PGP <kind>-----`` with 64-column base64 and checksum (RFC 4880 section 6.2)."""
    head = [f"-----BEGIN PGP {kind}-----".encode()] + [f"{name}: {value}".encode() for name, value in headers]
    tail = [b"=" + binascii.b2a_base64(crc24(data).to_bytes(3, "big"), newline=False),
            f"-----END PGP {kind}-----\n".encode()]
    return _wrap(binascii.b2a_base64(data, newline=False), head + [b""], tail)


def _wrap(text: bytes, head: list[bytes], tail: list[bytes]) -> bytes:
    """head lines, ``text`` cut into LINE-column lines (1024 lines per C call), tail lines: one join."""
    full = len(text) // _LINES.size * _LINES.size
    blocks = [b"\n".join(group) for group in _LINES.iter_unpack(memoryview(text)[:full])]
    blocks += [text[i:i + LINE] for i in range(full, len(text), LINE)]
    return b"\n".join(head + blocks + tail)


def is_armored(data: bytes) -> bool:
    """True when ``data`` starts (after white space) with an armor header line."""
    return data[:64].lstrip().startswith(b"-----BEGIN PGP ")


def armor_kind(data: bytes) -> str | None:
    """The kind named by the first armor header line ("MESSAGE", "SIGNED MESSAGE", ...), None if there is none."""
    begin = data.find(b"-----BEGIN PGP ")
    line_end = data.find(b"-----", begin + 15) if begin >= 0 else -1
    return data[begin + 15:line_end].decode("ascii", "replace") if line_end >= 0 else None


def dearmor(data: bytes) -> tuple[str, bytes]:
    """Return (kind, binary) of the first armored block; checks the CRC-24 when present (RFC 4880 section 6.2)."""
    begin = data.find(b"-----BEGIN PGP ")
    if begin < 0:
        raise MalformedPacket("no OpenPGP armor header line")
    line_end = data.find(b"\n", begin)
    header = data[begin:line_end if line_end >= 0 else len(data)].strip()
    if not header.endswith(b"-----") or line_end < 0:
        raise MalformedPacket("bad OpenPGP armor header line")
    kind = header[len(b"-----BEGIN PGP "):-5].decode("ascii", "replace")
    end = data.find(f"-----END PGP {kind}-----".encode(), line_end)
    if end < 0:
        raise MalformedPacket("OpenPGP armor tail line missing (truncated?)")
    start = _body_start(data, line_end + 1, end)
    checksum_at = data.rfind(b"\n=", start - 1, end)
    checksum = None
    if checksum_at >= 0 and data[checksum_at + 2:end].strip() and b"\n" not in data[checksum_at + 2:end].strip():
        checksum, end = data[checksum_at + 2:end].strip(), checksum_at
    try:
        binary = binascii.a2b_base64(memoryview(data)[start:end])  # skips line breaks in C
        expected = binascii.a2b_base64(checksum) if checksum is not None else None
    except binascii.Error as exc:
        raise MalformedPacket("bad base64 in OpenPGP armor") from exc
    if expected is not None and (len(expected) != 3 or int.from_bytes(expected, "big") != crc24(binary)):
        raise MalformedPacket("OpenPGP armor checksum mismatch")
    return kind, binary


def _body_start(data: bytes, pos: int, end: int) -> int:
    """Skip the armor headers ("Key: Value" lines) up to the blank line (RFC 4880 section 6.2)."""
    while pos < end:
        line_end = data.find(b"\n", pos, end)
        line = data[pos:line_end if line_end >= 0 else end].strip()
        if not line:
            return line_end + 1 if line_end >= 0 else end
        if b": " not in line and not line.endswith(b":"):
            return pos  # no header block (tolerated)
        pos = line_end + 1 if line_end >= 0 else end
    return pos
