"""Locating frames in Pixel Data without decoding (server.dicom.pixels; PS3.5 8.1.1, A.4)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from pydicom.encaps import encapsulate, encapsulate_extended

from server.dicom.pixels import (Fragment, FrameSpan, PixelDescription, cut_bits, describe, encapsulated_frames,
                                 extended_offsets, native_frames, parse_frame_list, scan_items)
from server.errors import ErrorKind, ServerError

BASE = 1000  # where the encapsulated value starts in an imaginary file


def desc(**kw) -> PixelDescription:
    values = dict(rows=4, columns=5, samples_per_pixel=1, bits_allocated=16, bits_stored=12, pixel_representation=0,
                  photometric_interpretation="MONOCHROME2", number_of_frames=3)
    values.update(kw)
    return PixelDescription(**values)


def frames_from(value: bytes, n: int, eot: bytes | None = None) -> list[bytes]:
    """Frames found by the module in an encapsulated value placed at BASE in a file."""
    file = b"\0" * BASE + value

    def read_at(offset: int, length: int) -> bytes:
        return file[offset:offset + length]

    bot, fragments = scan_items(read_at, BASE, BASE + len(value))
    spans = encapsulated_frames(read_at(bot.offset, bot.length), fragments, n,
                                extended_offsets(eot) if eot else None)
    return [b"".join(read_at(o, length) for o, length in span.pieces) for span in spans]


def jpeg_like(i: int, size: int) -> bytes:
    """A fake codestream with a start-of-image marker, of even length."""
    return b"\xff\xd8" + bytes([i]) * (size - 2)


FRAMES = [jpeg_like(i, 10 + 2 * i) for i in range(5)]


def test_native_frames_are_contiguous_slices():
    spans = native_frames(200, 3 * 40, desc())
    assert [s.pieces for s in spans] == [((200, 40),), ((240, 40),), ((280, 40),)]


def test_native_ybr_full_422_has_two_samples_per_pixel():
    d = desc(samples_per_pixel=3, bits_allocated=8, bits_stored=8, photometric_interpretation="YBR_FULL_422",
             number_of_frames=1, columns=4)
    assert native_frames(0, 32, d)[0].pieces == ((0, 32),)


def test_native_frames_shorter_than_declared_fail():
    with pytest.raises(ServerError) as err:
        native_frames(0, 100, desc())
    assert err.value.kind is ErrorKind.INTERNAL


def test_one_bit_frames_that_start_inside_a_byte():
    d = desc(rows=3, columns=3, bits_allocated=1, bits_stored=1, number_of_frames=3)  # 9 bits per frame
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2, 27).astype(np.uint8)
    packed = np.packbits(bits, bitorder="little").tobytes()
    spans = native_frames(0, len(packed), d)
    for k, span in enumerate(spans):
        (offset, length), = span.pieces
        frame = cut_bits(packed[offset:offset + length], span.bit_shift, span.bits)
        got = np.unpackbits(np.frombuffer(frame, np.uint8), bitorder="little")[:9]
        assert np.array_equal(got, bits[9 * k:9 * k + 9])
    assert spans[1].bit_shift == 1 and spans[1].bits == 9


@pytest.mark.parametrize("per_frame", [1, 2, 3])
def test_basic_offset_table(per_frame):
    value = encapsulate(FRAMES, fragments_per_frame=per_frame, has_bot=True)
    assert frames_from(value, len(FRAMES)) == FRAMES


def test_no_offset_table_one_fragment_per_frame():
    assert frames_from(encapsulate(FRAMES, has_bot=False), len(FRAMES)) == FRAMES


def test_no_offset_table_several_fragments_found_by_start_markers():
    assert frames_from(encapsulate(FRAMES, fragments_per_frame=2, has_bot=False), len(FRAMES)) == FRAMES


def test_extended_offset_table():
    value, eot, _ = encapsulate_extended(FRAMES)
    assert frames_from(value, len(FRAMES), eot) == FRAMES


def test_a_wrong_basic_offset_table_falls_back():
    value = bytearray(encapsulate(FRAMES, has_bot=True))
    struct.pack_into("<L", value, 8 + 4, 3)  # second offset points into the middle of a fragment
    assert frames_from(bytes(value), len(FRAMES)) == FRAMES


def test_single_frame_is_all_fragments():
    value = encapsulate([FRAMES[0] + FRAMES[1]], fragments_per_frame=3, has_bot=False)
    assert frames_from(value, 1) == [FRAMES[0] + FRAMES[1]]


def test_boundaries_not_found_fail():
    fragments = [Fragment(8 + 20 * i, 12, b"\x01\x02\x03\x04") for i in range(5)]
    with pytest.raises(ServerError) as err:
        encapsulated_frames(b"", fragments, 2)
    assert err.value.kind is ErrorKind.INTERNAL


def test_malformed_items_fail():
    value = encapsulate(FRAMES, has_bot=True)
    first = 8 + 4 * len(FRAMES)  # the first fragment's item tag
    broken = value[:first] + b"\x00\x00\x00\x00" + value[first + 4:]
    with pytest.raises(ServerError):
        frames_from(broken, len(FRAMES))


def test_frame_span_length():
    assert FrameSpan(((0, 3), (10, 5))).length == 8


@pytest.mark.parametrize("text,expected", [("1", [1]), ("3,1,2", [3, 1, 2]), ("2, 2", [2, 2])])
def test_frame_list(text, expected):
    assert parse_frame_list(text, 3) == expected


@pytest.mark.parametrize("text,kind", [("0", ErrorKind.INVALID), ("a", ErrorKind.INVALID), ("1,", ErrorKind.INVALID),
                                       ("-1", ErrorKind.INVALID), ("4", ErrorKind.NOT_FOUND)])
def test_frame_list_errors(text, kind):
    with pytest.raises(ServerError) as err:
        parse_frame_list(text, 3)
    assert err.value.kind is kind


def test_describe_from_dicom_json():
    meta = {"00280010": {"vr": "US", "Value": [4]}, "00280011": {"vr": "US", "Value": [5]},
            "00280100": {"vr": "US", "Value": [16]}, "00280101": {"vr": "US", "Value": [12]},
            "00280002": {"vr": "US", "Value": [1]}, "00280004": {"vr": "CS", "Value": ["MONOCHROME1"]},
            "00280008": {"vr": "IS", "Value": ["3"]}}
    d = describe(meta)
    assert d == desc(photometric_interpretation="MONOCHROME1")
    assert describe({"00080016": {"vr": "UI", "Value": ["1.2"]}}) is None
