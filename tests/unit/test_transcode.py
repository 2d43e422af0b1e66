"""Frame and instance transcoding (server.dicom.transcode) and frame negotiation (PS3.18 8.7.3, RFC 9110 14)."""

from __future__ import annotations

from dataclasses import replace
from io import BytesIO

import numpy as np
import pytest
from pydicom import dcmread

from server.dicom import transcode as tc
from server.dicom.pixels import PixelDescription
from server.dicomweb.frames import RangeNotSatisfiable, negotiate_frames, parse_range
from server.errors import ErrorKind, ServerError
from tests.dicomdata import sample_bytes

RNG = np.random.default_rng(7)


def desc(**kw) -> PixelDescription:
    values = dict(rows=32, columns=48, samples_per_pixel=1, bits_allocated=16, bits_stored=12, pixel_representation=0,
                  photometric_interpretation="MONOCHROME2")
    values.update(kw)
    return PixelDescription(**values)


MONO16 = desc()
SIGNED16 = desc(bits_stored=16, pixel_representation=1)
MONO8 = desc(bits_allocated=8, bits_stored=8)
RGB8 = desc(samples_per_pixel=3, bits_allocated=8, bits_stored=8, photometric_interpretation="RGB")


def smooth(d: PixelDescription) -> np.ndarray:
    """A smooth test image with some noise (so lossy codecs have something to lose)."""
    y, x = np.mgrid[0:d.rows, 0:d.columns]
    top = (1 << (d.bits_stored - 1)) - 1 if d.pixel_representation else (1 << d.bits_stored) - 1
    base = (x * 3 + y * 2) % (top // 2) + RNG.integers(0, 4, x.shape)
    if d.pixel_representation:
        base = base - top // 4
    dtype = {8: np.uint8, 16: np.int16 if d.pixel_representation else np.uint16}[d.bits_allocated]
    arr = base.astype(dtype)
    return np.stack([arr, arr[::-1], arr[:, ::-1]], axis=-1) if d.samples_per_pixel == 3 else arr


def native(d: PixelDescription) -> tuple[bytes, np.ndarray]:
    arr = smooth(d)
    return arr.astype(arr.dtype.newbyteorder("<")).tobytes(), arr


@pytest.mark.parametrize("d", [MONO16, SIGNED16, MONO8, RGB8], ids=["mono16", "signed16", "mono8", "rgb8"])
@pytest.mark.parametrize("ts", [tc.RLE, tc.JPEG_LS_LOSSLESS, tc.J2K_LOSSLESS, tc.J2K, tc.EXPLICIT_LE])
def test_lossless_round_trip(d, ts):
    data, arr = native(d)
    encoded = tc.convert_frame(data, tc.EXPLICIT_LE, ts, d)
    back = tc.decode_frame(encoded, ts, d)
    assert np.array_equal(back.pixels, arr)
    assert tc.convert_frame(encoded, ts, tc.EXPLICIT_LE, d) == data


@pytest.mark.parametrize("d", [MONO16, MONO8, RGB8], ids=["mono16", "mono8", "rgb8"])
def test_jpeg_ls_near_lossless_bound(d):
    data, arr = native(d)
    back = tc.decode_frame(tc.convert_frame(data, tc.EXPLICIT_LE, tc.JPEG_LS_NEAR, d), tc.JPEG_LS_NEAR, d)
    assert np.abs(back.pixels.astype(int) - arr.astype(int)).max() <= tc.JPEG_LS_NEAR_ERROR


@pytest.mark.parametrize("d", [MONO8, RGB8], ids=["mono8", "rgb8"])
def test_jpeg_baseline_quality(d):
    data, arr = native(d)
    encoded, out = tc.encode_frame(tc.decode_frame(data, tc.EXPLICIT_LE, d), tc.JPEG_BASELINE)
    assert encoded.startswith(b"\xff\xd8") and b"\xff\xc0" in encoded
    assert out.photometric_interpretation == ("YBR_FULL" if d.samples_per_pixel == 3 else "MONOCHROME2")
    back = tc.decode_frame(encoded, tc.JPEG_BASELINE, out).pixels
    error = back.astype(float) - arr.astype(float)
    assert np.mean(np.abs(error)) < 6 and 10 * np.log10(255 ** 2 / np.mean(error ** 2)) > 30  # PSNR in dB


@pytest.mark.parametrize("ts,d,words", [
    (tc.JPEG_BASELINE, MONO16, "8-bit"),
    (tc.JPEG_BASELINE, replace(MONO8, pixel_representation=1), "8-bit"),
    (tc.JPEG_BASELINE, replace(MONO8, photometric_interpretation="PALETTE COLOR"), "PALETTE"),
    (tc.JPEG_LOSSLESS_SV1, MONO16, "not supported"),
    (tc.HTJ2K_LOSSLESS, MONO16, "not supported"),
    (tc.EXPLICIT_BE, MONO16, "not supported"),
    (tc.RLE, replace(MONO8, bits_allocated=1, bits_stored=1), "1-bit"),
])
def test_cannot_encode(ts, d, words):
    assert words in tc.cannot_encode(ts, d)
    with pytest.raises(ServerError) as err:
        tc.encode_frame(tc.Frame(smooth(MONO8), d), ts)
    assert err.value.kind is ErrorKind.NOT_ACCEPTABLE


def test_ybr_decodes_to_rgb_so_jpeg_baseline_is_possible():
    ybr = replace(RGB8, photometric_interpretation="YBR_RCT")
    assert tc.decoded_photometric(ybr) == "RGB" and tc.cannot_encode(tc.JPEG_BASELINE, ybr) is None


def test_same_frame_bytes():
    assert tc.same_frame_bytes(tc.IMPLICIT_LE, tc.EXPLICIT_LE)
    assert not tc.same_frame_bytes(tc.EXPLICIT_BE, tc.EXPLICIT_LE)
    assert tc.cannot_produce(tc.HTJ2K, tc.HTJ2K, None) is None
    assert "no pixel data" in tc.cannot_produce(tc.RLE, tc.EXPLICIT_LE, None)


def test_big_endian_frames_become_little_endian():
    ds = dcmread(BytesIO(sample_bytes("MR_small_bigendian.dcm")))
    assert ds.file_meta.TransferSyntaxUID == tc.EXPLICIT_BE
    d = tc.pixel_description(ds)
    [frame] = tc.stored_frames(ds.PixelData, tc.EXPLICIT_BE, d)
    out = tc.convert_frame(frame, tc.EXPLICIT_BE, tc.EXPLICIT_LE, d)
    assert np.array_equal(np.frombuffer(out, "<i2").reshape(ds.Rows, ds.Columns), ds.pixel_array)


@pytest.mark.parametrize("ts", [tc.EXPLICIT_LE, tc.IMPLICIT_LE, tc.DEFLATED_LE, tc.RLE, tc.J2K_LOSSLESS])
def test_transcode_instance(ts):
    original = dcmread(BytesIO(sample_bytes("SC_rgb_jpeg_dcmtk.dcm")))
    ds = dcmread(BytesIO(tc.transcode_instance(sample_bytes("SC_rgb_jpeg_dcmtk.dcm"), ts)))
    assert ds.file_meta.TransferSyntaxUID == ts and ds.PhotometricInterpretation == "RGB"
    assert np.array_equal(ds.pixel_array, original.pixel_array)
    assert ds.SOPInstanceUID == original.SOPInstanceUID


def test_transcode_instance_refuses_what_it_cannot_write():
    with pytest.raises(ServerError) as err:
        tc.transcode_instance(sample_bytes("CT_small.dcm"), tc.JPEG_BASELINE)
    assert err.value.kind is ErrorKind.NOT_ACCEPTABLE


# ---- negotiation (PS3.18 8.7.3.5, Table 8.7.3-5) -------------------------------------------------------
@pytest.mark.parametrize("accept,stored,d,expected", [
    (None, tc.J2K_LOSSLESS, MONO16, ("image/jp2", tc.J2K_LOSSLESS, True)),
    ("*/*", tc.EXPLICIT_LE, MONO16, ("application/octet-stream", tc.EXPLICIT_LE, True)),
    ('multipart/related; type="*/*"', tc.IMPLICIT_LE, MONO16, ("application/octet-stream", tc.EXPLICIT_LE, True)),
    ('multipart/related; type="application/octet-stream"', tc.RLE, MONO16,
     ("application/octet-stream", tc.EXPLICIT_LE, True)),
    ('multipart/related; type="application/octet-stream"; transfer-syntax=*', tc.RLE, MONO16,
     ("application/octet-stream", tc.RLE, True)),
    ('multipart/related; type="image/jpeg"', tc.JPEG_LOSSLESS_SV1, MONO8, ("image/jpeg", tc.JPEG_BASELINE, True)),
    ('multipart/related; type="image/jpeg"; transfer-syntax=*', tc.JPEG_LOSSLESS_SV1, MONO8,
     ("image/jpeg", tc.JPEG_BASELINE, True)),
    ('multipart/related; type="image/jpeg"; transfer-syntax=1.2.840.10008.1.2.4.70', tc.JPEG_LOSSLESS_SV1, MONO8,
     ("image/jpeg", tc.JPEG_LOSSLESS_SV1, True)),
    ('multipart/related; type="image/x-jls"', tc.EXPLICIT_LE, MONO16, ("image/jls", tc.JPEG_LS_LOSSLESS, True)),
    ('multipart/related; type="image/jphc"', tc.HTJ2K_LOSSLESS, MONO16, ("image/jphc", tc.HTJ2K_LOSSLESS, True)),
    ('multipart/related; type="image/jphc"; transfer-syntax=*', tc.HTJ2K, MONO16, ("image/jphc", tc.HTJ2K, True)),
    ('multipart/related; type="image/*"', tc.RLE, MONO16, ("image/dicom-rle", tc.RLE, True)),
    ("image/jp2", tc.J2K_LOSSLESS, MONO16, ("image/jp2", tc.J2K_LOSSLESS, False)),
    ('multipart/related; type="image/jpeg"; q=0.1, multipart/related; type="image/jp2"', tc.EXPLICIT_LE, MONO8,
     ("image/jp2", tc.J2K_LOSSLESS, True)),
])
def test_negotiate(accept, stored, d, expected):
    choice = negotiate_frames(accept, stored, d, True)
    assert (choice.media_type, choice.transfer_syntax, choice.multipart) == expected


@pytest.mark.parametrize("accept,stored,d", [
    ('multipart/related; type="image/jpeg"', tc.EXPLICIT_LE, MONO16),
    ('multipart/related; type="image/jphc"', tc.J2K_LOSSLESS, MONO16),
    ('multipart/related; type="image/jphc"', tc.HTJ2K, MONO16),  # the default is lossless HTJ2K: no encoder
    ('multipart/related; type="image/jpeg"; transfer-syntax=1.2.840.10008.1.2.4.90', tc.J2K_LOSSLESS, MONO8),
    ('multipart/related; type="image/png"', tc.EXPLICIT_LE, MONO8),
    ("application/dicom", tc.EXPLICIT_LE, MONO8),
    ('multipart/related; type="image/*"', tc.EXPLICIT_LE, MONO8),  # native frames are not an image/* type
])
def test_negotiate_406(accept, stored, d):
    with pytest.raises(ServerError) as err:
        negotiate_frames(accept, stored, d, True)
    assert err.value.kind is ErrorKind.NOT_ACCEPTABLE


def test_single_part_needs_one_frame():
    with pytest.raises(ServerError):
        negotiate_frames("image/jp2", tc.J2K_LOSSLESS, MONO16, False)


@pytest.mark.parametrize("header,expected", [
    (None, None), ("bytes=0-9", (0, 9)), ("bytes=5-", (5, 99)), ("bytes=-10", (90, 99)), ("bytes=90-500", (90, 99)),
    ("bytes=0-1,5-6", None), ("items=0-1", None), ("bytes=a-b", None), ("bytes=-", None),
])
def test_parse_range(header, expected):
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=9-5", "bytes=-0"])
def test_range_not_satisfiable(header):
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, 100)
