"""Decode and encode frames and whole data sets between transfer syntaxes (PS3.5 8, 10, A.4; PS3.18 8.7.3).

Pure: bytes in, bytes out. Decoding uses pydicom's decoders (pylibjpeg-libjpeg, -openjpeg, -rle, pyjpegls);
encoding pydicom's encoders (RLE, JPEG-LS, JPEG 2000) and Pillow for JPEG baseline (8-bit only). Nothing is
ever substituted: a syntax we cannot produce for an image raises NOT_ACCEPTABLE naming the reason.

Decoded colour (PS3.5 8.2.1-8.2.4): a decoder returns RGB for YBR_FULL, YBR_FULL_422, YBR_ICT and YBR_RCT,
interleaved (Planar Configuration 0); monochrome and palette images keep their Photometric Interpretation.
So native frames of a compressed colour image are RGB, and an instance transcoded to a native syntax says
``RGB``. JPEG baseline output is YCbCr without subsampling (``YBR_FULL``, PS3.5 8.2.1); RLE, JPEG-LS and
JPEG 2000 output keep the decoded interpretation (JPEG 2000 without a colour transform, PS3.5 8.2.4).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace

import numpy as np
from pydicom import dcmread
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.encoders.base import get_encoder
from pydicom.uid import UID

from server.dicom.pixels import PixelDescription, cut_bits, native_frames
from server.errors import ErrorKind, ServerError

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.57"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_LS_NEAR = "1.2.840.10008.1.2.4.81"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
J2K = "1.2.840.10008.1.2.4.91"
HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
HTJ2K_RPCL = "1.2.840.10008.1.2.4.202"
HTJ2K = "1.2.840.10008.1.2.4.203"
RLE = "1.2.840.10008.1.2.5"

NATIVE = frozenset({IMPLICIT_LE, EXPLICIT_LE, DEFLATED_LE, EXPLICIT_BE})
# Frame bytes identical to Explicit VR Little Endian's (PS3.5 A.1, A.2; deflate applies to the whole data set)
LITTLE_ENDIAN_NATIVE = frozenset({IMPLICIT_LE, EXPLICIT_LE, DEFLATED_LE})
# Syntaxes we write (PS3.5 Annex A): native little endian and the encoders below; never big endian (retired)
WRITABLE_NATIVE = frozenset({IMPLICIT_LE, EXPLICIT_LE, DEFLATED_LE})
ENCODABLE = frozenset({RLE, JPEG_LS_LOSSLESS, JPEG_LS_NEAR, J2K_LOSSLESS, J2K, JPEG_BASELINE})
LOSSY = frozenset({JPEG_BASELINE, JPEG_LS_NEAR})
JPEG_LS_NEAR_ERROR = 2  # NEAR parameter: every sample within +/-2 of the original (ISO 14495-1)
JPEG_QUALITY = 90
JPEG_BASELINE_PHOTOMETRIC = frozenset({"MONOCHROME1", "MONOCHROME2", "RGB"})  # as decoded
YBR = frozenset({"YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"})


@dataclass(frozen=True)
class Frame:
    """One decoded frame: pixels as (rows, columns[, samples]) and the interpretation they are in."""

    pixels: np.ndarray
    desc: PixelDescription


def decodable(ts: str) -> bool:
    """Whether pydicom has an available decoder for frames of ``ts`` (PS3.5 Annex A, 8.2)."""
    try:
        return get_decoder(UID(ts)).is_available
    except (NotImplementedError, ValueError):
        return False


def cannot_encode(ts: str, desc: PixelDescription) -> str | None:
    """Why frames of ``desc`` cannot be written in ``ts``, or None when they can (PS3.5 8.2, 10)."""
    if ts in WRITABLE_NATIVE:
        return None
    if ts not in ENCODABLE:
        return f"encoding to {_name(ts)} is not supported"
    if ts == JPEG_BASELINE:
        if desc.bits_allocated != 8 or desc.bits_stored > 8 or desc.pixel_representation != 0:
            return "JPEG baseline holds 8-bit unsigned samples only (ITU T.81 process 1)"
        if decoded_photometric(desc) not in JPEG_BASELINE_PHOTOMETRIC:
            return f"JPEG baseline is not produced for {desc.photometric_interpretation}"
    if desc.bits_allocated == 1:
        return f"{_name(ts)} is not produced for 1-bit data"
    if ts in (JPEG_LS_LOSSLESS, JPEG_LS_NEAR) and desc.bits_stored < 2:
        return "JPEG-LS needs at least 2 bits per sample"
    encoder = get_encoder(UID(ts)) if ts != JPEG_BASELINE else None
    if encoder is not None and not encoder.is_available:
        return f"no encoder for {_name(ts)} is installed"
    return None


def decoded_photometric(desc: PixelDescription) -> str:
    """The Photometric Interpretation of decoded pixels: RGB for any YBR colour (PS3.5 8.2; module docstring)."""
    pi = desc.photometric_interpretation
    return "RGB" if pi in YBR and desc.samples_per_pixel == 3 else pi


def cannot_produce(stored_ts: str, target_ts: str, desc: PixelDescription | None) -> str | None:
    """Why frames stored in ``stored_ts`` cannot be delivered in ``target_ts``, or None (PS3.18 8.7.3.5)."""
    if same_frame_bytes(stored_ts, target_ts):
        return None
    if desc is None:
        return "the instance has no pixel data"
    if not decodable(stored_ts):
        return f"frames stored as {_name(stored_ts)} cannot be decoded here"
    return cannot_encode(target_ts, desc)


def same_frame_bytes(stored_ts: str, target_ts: str) -> bool:
    """Whether frames stored in ``stored_ts`` are already valid ``target_ts`` frames (no re-encoding)."""
    return stored_ts == target_ts or (stored_ts in LITTLE_ENDIAN_NATIVE and target_ts in LITTLE_ENDIAN_NATIVE)


def decode_frame(data: bytes, ts: str, desc: PixelDescription) -> Frame:
    """Decode one frame's stored bytes (native or one frame's codestream) into pixels (PS3.5 8.2).

    Stable API for the rendering service: ``data`` is what :mod:`server.dicom.pixels` locates for one
    frame (native bytes, 1-bit frames repacked from bit 0, or the joined fragments of an encapsulated
    frame); ``desc`` the instance's Image Pixel attributes. Returns (rows, columns) or (rows, columns,
    samples) pixels; colour is RGB for any YBR input, interleaved. Raises NOT_ACCEPTABLE when no decoder is
    available and INTERNAL when the codestream is broken.
    """
    if not decodable(ts):
        raise ServerError(ErrorKind.NOT_ACCEPTABLE, f"frames stored as {_name(ts)} cannot be decoded here")
    if ts == EXPLICIT_BE:  # the decoders read buffers as little endian: swap words first (PS3.5 A.3)
        data, ts = _swap_words(data, desc.bits_allocated), EXPLICIT_LE
    src = data if ts in NATIVE else encapsulate([data])
    try:
        arr, meta = get_decoder(UID(ts)).as_array(
            src, rows=desc.rows, columns=desc.columns, samples_per_pixel=desc.samples_per_pixel,
            bits_allocated=desc.bits_allocated, bits_stored=desc.bits_stored,
            pixel_representation=desc.pixel_representation, number_of_frames=1,
            photometric_interpretation=desc.photometric_interpretation,
            planar_configuration=desc.planar_configuration, pixel_keyword="PixelData")
    except Exception as exc:  # pydicom and its plugins raise many types for corrupt codestreams
        raise ServerError(ErrorKind.INTERNAL, f"frame of {_name(ts)} could not be decoded") from exc
    pi = str(meta.get("photometric_interpretation", desc.photometric_interpretation))
    out = replace(desc, photometric_interpretation=pi, planar_configuration=0, number_of_frames=1,
                  bits_allocated=int(meta.get("bits_allocated", desc.bits_allocated)))
    return Frame(arr, out)


def _swap_words(data: bytes, bits_allocated: int) -> bytes:
    """Big endian native samples as little endian (PS3.5 7.3, A.3); bytes of 8-bit data stay as they are."""
    if bits_allocated not in (16, 32, 64):
        return data
    return np.frombuffer(data, dtype=f">u{bits_allocated // 8}").astype(f"<u{bits_allocated // 8}").tobytes()


def encode_frame(frame: Frame, ts: str) -> tuple[bytes, PixelDescription]:
    """Encode decoded pixels in ``ts``; returns the bytes and the description they are in (PS3.5 8.2, 10)."""
    reason = cannot_encode(ts, frame.desc)
    if reason:
        raise ServerError(ErrorKind.NOT_ACCEPTABLE, reason)
    if ts in WRITABLE_NATIVE:
        return _native_bytes(frame), frame.desc
    if ts == JPEG_BASELINE:
        return _jpeg_baseline(frame)
    d = frame.desc
    options = dict(rows=d.rows, columns=d.columns, samples_per_pixel=d.samples_per_pixel,
                   bits_allocated=d.bits_allocated, bits_stored=d.bits_stored,
                   pixel_representation=d.pixel_representation, photometric_interpretation=d.photometric_interpretation,
                   number_of_frames=1, planar_configuration=0)
    uid = J2K_LOSSLESS if ts == J2K else ts  # 4.91 may hold a reversible codestream: we never lose data there
    if uid == JPEG_LS_NEAR:
        options["jls_error"] = JPEG_LS_NEAR_ERROR
    if uid == J2K_LOSSLESS:
        options["use_mct"] = False
    try:
        data = bytes(get_encoder(UID(uid)).encode(np.ascontiguousarray(frame.pixels), **options))
    except Exception as exc:  # encoders raise RuntimeError/ValueError for inputs they refuse
        raise ServerError(ErrorKind.NOT_ACCEPTABLE, f"the frame cannot be encoded as {_name(ts)}") from exc
    return data, d


def _native_bytes(frame: Frame) -> bytes:
    """Little endian native bytes of decoded pixels; 1-bit data packed LSB first (PS3.5 8.1.1, 8.2)."""
    arr = frame.pixels
    if frame.desc.bits_allocated == 1:
        return np.packbits(arr.astype(np.uint8).ravel(), bitorder="little").tobytes()
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def _jpeg_baseline(frame: Frame) -> tuple[bytes, PixelDescription]:
    """JPEG baseline (ITU T.81 process 1) with Pillow: grey, or RGB as YCbCr 4:4:4 = YBR_FULL (PS3.5 8.2.1)."""
    from PIL import Image  # imported here: only this path needs Pillow

    d = frame.desc
    arr = np.ascontiguousarray(frame.pixels.astype(np.uint8, copy=False))
    if d.samples_per_pixel == 1:
        image, pi = Image.fromarray(arr, mode="L"), d.photometric_interpretation
    else:
        image, pi = Image.fromarray(arr, mode="RGB"), "YBR_FULL"
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=JPEG_QUALITY, subsampling=0)  # 4:4:4: no chroma loss
    return out.getvalue(), replace(d, photometric_interpretation=pi)


def convert_frame(data: bytes, stored_ts: str, target_ts: str, desc: PixelDescription) -> bytes:
    """One frame's stored bytes delivered in ``target_ts`` (PS3.18 8.7.3.5): as stored when they already are."""
    if same_frame_bytes(stored_ts, target_ts):
        return data
    return encode_frame(decode_frame(data, stored_ts, desc), target_ts)[0]


def stored_frames(pixel_data: bytes, ts: str, desc: PixelDescription) -> list[bytes]:
    """The stored bytes of every frame of a Pixel Data value (PS3.5 8.1.1, A.4)."""
    if ts in NATIVE:
        out = []
        for span in native_frames(0, len(pixel_data), desc):
            (start, length), = span.pieces
            raw = pixel_data[start:start + length]
            out.append(cut_bits(raw, span.bit_shift, span.bits) if span.bits else raw)
        return out
    return list(generate_frames(pixel_data, number_of_frames=desc.number_of_frames))


def transcode_instance(part10: bytes, target_ts: str) -> bytes:
    """A PS3.10 file re-encoded in ``target_ts`` (PS3.18 10.4.1.2 "transfer-syntax"; PS3.5 Annex A).

    Non-pixel elements are re-encoded as the syntax demands; pixel data is decoded frame by frame and
    encoded anew. Lossy output sets Lossy Image Compression "01" with its method (PS3.3 C.7.6.1.1.5); the
    SOP Instance UID is kept (the same instance in another transfer syntax).
    """
    if target_ts not in WRITABLE_NATIVE | ENCODABLE:
        raise ServerError(ErrorKind.NOT_ACCEPTABLE, f"instances cannot be written as {_name(target_ts)}")
    try:
        ds = dcmread(io.BytesIO(part10), force=True)
    except Exception as exc:
        raise ServerError(ErrorKind.INTERNAL, "stored instance could not be read") from exc
    stored_ts = str(ds.file_meta.TransferSyntaxUID)
    if "PixelData" in ds and not same_frame_bytes(stored_ts, target_ts):
        _recode_pixels(ds, stored_ts, target_ts)
    ds.file_meta.TransferSyntaxUID = UID(target_ts)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True, implicit_vr=target_ts == IMPLICIT_LE, little_endian=True)
    return out.getvalue()


def pixel_description(ds) -> PixelDescription:
    """The PixelDescription of a pydicom Dataset (PS3.3 C.7.6.3)."""
    return PixelDescription(
        rows=int(ds.Rows), columns=int(ds.Columns), samples_per_pixel=int(ds.get("SamplesPerPixel", 1)),
        bits_allocated=int(ds.BitsAllocated), bits_stored=int(ds.get("BitsStored", ds.BitsAllocated)),
        pixel_representation=int(ds.get("PixelRepresentation", 0)),
        photometric_interpretation=str(ds.get("PhotometricInterpretation", "MONOCHROME2")),
        planar_configuration=int(ds.get("PlanarConfiguration", 0) or 0),
        number_of_frames=int(ds.get("NumberOfFrames", 1) or 1))


def _recode_pixels(ds, stored_ts: str, target_ts: str) -> None:
    """Replace the data set's Pixel Data by its frames in ``target_ts`` and fix the pixel attributes."""
    desc = pixel_description(ds)
    reason = cannot_produce(stored_ts, target_ts, desc)
    if reason:
        raise ServerError(ErrorKind.NOT_ACCEPTABLE, reason)
    encoded, out = [], desc
    for raw in stored_frames(ds.PixelData, stored_ts, desc):
        data, out = encode_frame(decode_frame(raw, stored_ts, desc), target_ts)
        encoded.append(data)
    if target_ts in WRITABLE_NATIVE:
        value = b"".join(encoded)
        ds.PixelData = value + b"\0" * (len(value) % 2)
        ds["PixelData"].VR = "OB" if out.bits_allocated <= 8 else "OW"
    else:
        ds.PixelData = encapsulate(encoded, has_bot=True)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    ds.PhotometricInterpretation = out.photometric_interpretation
    if out.samples_per_pixel > 1:
        ds.PlanarConfiguration = 0
    if target_ts in LOSSY:
        _mark_lossy(ds, target_ts)


def _mark_lossy(ds, ts: str) -> None:
    """Lossy Image Compression (0028,2110) "01" and its method (PS3.3 C.7.6.1.1.5, Table C.7-16a)."""
    method = "ISO_10918_1" if ts == JPEG_BASELINE else "ISO_14495_1"
    ds.LossyImageCompression = "01"
    methods = list(ds.get("LossyImageCompressionMethod", []) or [])
    ds.LossyImageCompressionMethod = [*methods, method] if methods else method


def _name(ts: str) -> str:
    """A transfer syntax's name for messages (PS3.6 Table A-1), or the UID itself."""
    name = UID(ts).name
    return f"{name} ({ts})" if name and name != ts else ts


__all__ = ["ENCODABLE", "Frame", "NATIVE", "cannot_encode", "cannot_produce", "convert_frame", "decodable",
           "decode_frame", "encode_frame", "pixel_description", "same_frame_bytes", "stored_frames",
           "transcode_instance"]
