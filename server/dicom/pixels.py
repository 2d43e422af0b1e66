"""Locate the frames of a stored instance's Pixel Data without decoding it (PS3.5 8.2, A.4; PS3.3 C.7.6.3).

Pure: byte strings, offsets and a caller-supplied ``read_at(offset, length) -> bytes`` in, frame locations
out. Native (uncompressed) frames are contiguous slices of the Pixel Data value (PS3.5 8.1.1, 8.2); 1-bit
frames that do not start on a byte boundary carry a bit shift. Encapsulated frames (PS3.5 A.4) are one or
more fragments; which fragments form which frame comes from, in this order, a single frame, the Extended
Offset Table (7FE0,0001), the Basic Offset Table, one fragment per frame, or the codec's start-of-image
marker at the start of a fragment (PS3.5 A.4, Note on frame boundaries).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from server.errors import ErrorKind, ServerError

ITEM = 0xFFFEE000
SEQUENCE_DELIMITER = 0xFFFEE0DD
ITEM_HEADER = 8
HEAD_BYTES = 4  # the first value bytes of every fragment: enough to see a start-of-image marker
# Start of a codestream: JPEG/JPEG-LS SOI (ITU T.81 B.2.1), JPEG 2000 SOC+SIZ (ISO 15444-1 A.4.1), JP2 box
START_MARKERS = (b"\xff\xd8", b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0c")

ReadAt = Callable[[int, int], bytes]


@dataclass(frozen=True)
class PixelDescription:
    """The Image Pixel module attributes needed to cut and convert frames (PS3.3 C.7.6.3)."""

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric_interpretation: str
    planar_configuration: int = 0
    number_of_frames: int = 1

    @property
    def native_frame_bits(self) -> int:
        """Bits of one native frame; YBR_FULL_422 holds two samples per pixel (PS3.3 C.7.6.3.1.2)."""
        samples = 2 if self.photometric_interpretation == "YBR_FULL_422" and self.samples_per_pixel == 3 \
            else self.samples_per_pixel
        return self.rows * self.columns * samples * self.bits_allocated


@dataclass(frozen=True)
class Fragment:
    """One item of encapsulated Pixel Data: value offset and length in the file, its first bytes."""

    offset: int
    length: int
    head: bytes = b""


@dataclass(frozen=True)
class FrameSpan:
    """Where one frame's bytes lie: (offset, length) pieces in the file, joined in order.

    For 1-bit native data (PS3.5 8.1.1) a frame may start inside a byte: ``bit_shift`` bits of the first
    byte belong to the previous frame and ``bits`` is the frame's length in bits (0 = whole bytes).
    """

    pieces: tuple[tuple[int, int], ...]
    bit_shift: int = 0
    bits: int = 0

    @property
    def length(self) -> int:
        """Stored bytes of the frame (the sum of its pieces)."""
        return sum(n for _, n in self.pieces)


def _uint(value: Any) -> int | None:
    """The first value of a DICOM JSON element as a non-negative int, or None."""
    values = (value or {}).get("Value") or [None]
    v = values[0]
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v)
    return v if isinstance(v, int) and v >= 0 else None


def describe(meta: Mapping[str, Any]) -> PixelDescription | None:
    """The PixelDescription of an instance's DICOM JSON (PS3.18 F.2), None without an image (PS3.3 C.7.6.3)."""
    rows, columns, bits = _uint(meta.get("00280010")), _uint(meta.get("00280011")), _uint(meta.get("00280100"))
    if not rows or not columns or not bits:
        return None
    pi = ((meta.get("00280004") or {}).get("Value") or ["MONOCHROME2"])[0]
    return PixelDescription(
        rows=rows, columns=columns, samples_per_pixel=_uint(meta.get("00280002")) or 1, bits_allocated=bits,
        bits_stored=_uint(meta.get("00280101")) or bits, pixel_representation=_uint(meta.get("00280103")) or 0,
        photometric_interpretation=str(pi).strip(), planar_configuration=_uint(meta.get("00280006")) or 0,
        number_of_frames=_uint(meta.get("00280008")) or 1,
    )


def native_frames(offset: int, length: int, desc: PixelDescription) -> tuple[FrameSpan, ...]:
    """Frame spans of native Pixel Data stored at ``offset`` (PS3.5 8.1.1, 8.2; frames are contiguous)."""
    frame_bits = desc.native_frame_bits
    if desc.number_of_frames * frame_bits > length * 8:
        raise ServerError(ErrorKind.INTERNAL, "stored Pixel Data is shorter than its frames")
    spans = []
    for k in range(desc.number_of_frames):
        start_bit = k * frame_bits
        if frame_bits % 8 == 0:
            spans.append(FrameSpan(((offset + start_bit // 8, frame_bits // 8),)))
            continue
        first, end = start_bit // 8, (start_bit + frame_bits + 7) // 8
        spans.append(FrameSpan(((offset + first, end - first),), start_bit % 8, frame_bits))
    return tuple(spans)


def cut_bits(data: bytes, bit_shift: int, bits: int) -> bytes:
    """A 1-bit frame that starts ``bit_shift`` bits into ``data``, repacked from bit 0 (PS3.5 8.1.1, LSB first)."""
    value = int.from_bytes(data, "little") >> bit_shift
    value &= (1 << bits) - 1
    return value.to_bytes((bits + 7) // 8, "little")


def item_header(raw: bytes) -> tuple[int, int]:
    """(tag, length) of an item header in encapsulated Pixel Data, always little endian (PS3.5 A.4)."""
    group, element, length = struct.unpack("<HHL", raw)
    return group << 16 | element, length


def scan_items(read_at: ReadAt, start: int, end: int) -> tuple[Fragment, list[Fragment]]:
    """The Basic Offset Table item and the fragments of encapsulated Pixel Data in ``[start, end)`` (PS3.5 A.4).

    ``start`` is the first item tag (the value of the Pixel Data element); ``end`` where the sequence
    delimiter item is (or the end of the value). Reads each item header and the first bytes of each value.
    """
    items: list[Fragment] = []
    pos = start
    while pos + ITEM_HEADER <= end:
        raw = read_at(pos, ITEM_HEADER + HEAD_BYTES)
        if len(raw) < ITEM_HEADER:
            break
        tag, length = item_header(raw[:ITEM_HEADER])
        if tag == SEQUENCE_DELIMITER:
            break
        if tag != ITEM or pos + ITEM_HEADER + length > end:
            raise ServerError(ErrorKind.INTERNAL, f"malformed encapsulated Pixel Data at byte {pos}")
        items.append(Fragment(pos + ITEM_HEADER, length, raw[ITEM_HEADER:ITEM_HEADER + min(length, HEAD_BYTES)]))
        pos += ITEM_HEADER + length
    if not items:
        raise ServerError(ErrorKind.INTERNAL, "encapsulated Pixel Data without a Basic Offset Table item")
    return items[0], items[1:]


def _by_offsets(fragments: Sequence[Fragment], offsets: Sequence[int]) -> tuple[FrameSpan, ...] | None:
    """Group fragments by frame start offsets relative to the first fragment's item tag (PS3.5 A.4)."""
    if not fragments or list(offsets) != sorted(set(offsets)) or offsets[0] != 0:
        return None
    base = fragments[0].offset - ITEM_HEADER
    groups: list[list[Fragment]] = [[] for _ in offsets]
    k = 0
    for frag in fragments:
        rel = frag.offset - ITEM_HEADER - base
        while k + 1 < len(offsets) and rel >= offsets[k + 1]:
            k += 1
        if k + 1 < len(offsets) and rel < offsets[k]:
            return None
        groups[k].append(frag)
    if any(not g for g in groups) or _starts(groups) != [o + base for o in offsets]:
        return None
    return tuple(FrameSpan(tuple((f.offset, f.length) for f in g)) for g in groups)


def _starts(groups: list[list[Fragment]]) -> list[int]:
    return [g[0].offset - ITEM_HEADER for g in groups]


def _by_markers(fragments: Sequence[Fragment], frames: int) -> tuple[FrameSpan, ...] | None:
    """Group fragments where a fragment starts with a codestream start marker (PS3.5 A.4 Note)."""
    groups: list[list[Fragment]] = []
    for frag in fragments:
        if not groups or frag.head.startswith(START_MARKERS):
            groups.append([])
        groups[-1].append(frag)
    if len(groups) != frames:
        return None
    return tuple(FrameSpan(tuple((f.offset, f.length) for f in g)) for g in groups)


def encapsulated_frames(bot: bytes, fragments: Sequence[Fragment], frames: int,
                        extended_offsets: Sequence[int] | None = None) -> tuple[FrameSpan, ...]:
    """Which fragments form which frame of encapsulated Pixel Data (PS3.5 A.4, Tables A.4-1/A.4-2).

    ``bot`` is the Basic Offset Table item value; ``extended_offsets`` the decoded Extended Offset Table.
    """
    if not fragments:
        raise ServerError(ErrorKind.INTERNAL, "encapsulated Pixel Data without fragments")
    if frames == 1:
        return (FrameSpan(tuple((f.offset, f.length) for f in fragments)),)
    candidates = []
    if extended_offsets and len(extended_offsets) == frames:
        candidates.append(lambda: _by_offsets(fragments, extended_offsets))
    if len(bot) == 4 * frames:
        candidates.append(lambda: _by_offsets(fragments, struct.unpack(f"<{frames}L", bot)))
    if len(fragments) == frames:
        candidates.append(lambda: tuple(FrameSpan(((f.offset, f.length),)) for f in fragments))
    candidates.append(lambda: _by_markers(fragments, frames))
    for candidate in candidates:
        spans = candidate()
        if spans is not None:
            return spans
    raise ServerError(ErrorKind.INTERNAL,
                      f"cannot find the boundaries of {frames} frames in {len(fragments)} fragments")


def extended_offsets(raw: bytes) -> tuple[int, ...]:
    """The Extended Offset Table (7FE0,0001) value: 64-bit little endian offsets (PS3.3 C.7.6.3.1.8)."""
    return struct.unpack(f"<{len(raw) // 8}Q", raw[: len(raw) // 8 * 8])


def parse_frame_list(text: str, number_of_frames: int) -> list[int]:
    """The 1-based frame numbers of a ``{framelist}`` path segment, in request order (PS3.18 10.4.1.1.6).

    INVALID for a malformed list; NOT_FOUND for a frame the instance does not have.
    """
    numbers = []
    for token in text.split(","):
        token = token.strip()
        if not token.isdigit() or int(token) < 1:
            raise ServerError(ErrorKind.INVALID, f"malformed frame list {text[:80]!r}: frame numbers start at 1",
                              parameter="frames")
        numbers.append(int(token))
    missing = [n for n in numbers if n > number_of_frames]
    if missing:
        raise ServerError(ErrorKind.NOT_FOUND,
                          f"frame {missing[0]} does not exist; the instance has {number_of_frames} frame(s)")
    return numbers


__all__ = ["Fragment", "FrameSpan", "PixelDescription", "cut_bits", "describe", "encapsulated_frames",
           "extended_offsets", "item_header", "native_frames", "parse_frame_list", "scan_items"]
