"""Rendering of decoded DICOM frames into consumer images (PS3.18 8.3.5.1; PS3.3 C.11, C.7.6.3; PS3.4 N.2).

Pure: values in, values out, no I/O. The grayscale pipeline of PS3.4 N.2.1 is Modality LUT (rescale slope
and intercept, or the Modality LUT Sequence, PS3.3 C.11.1) -> VOI (the ``window`` query parameter, else the
stored Window Center/Width with its VOI LUT Function, else the VOI LUT Sequence, else the frame's own
minimum..maximum; PS3.3 C.11.2) -> Presentation LUT (MONOCHROME1 and Presentation LUT Shape INVERSE invert;
PS3.3 C.11.6). Color data: RGB as is, YBR_FULL converted to RGB (PS3.3 C.7.6.3.1.2), PALETTE COLOR through
its Red/Green/Blue Palette Color LUTs (PS3.3 C.7.6.3.1.5, C.7.9). Then the viewport (crop, flip, scale
keeping the aspect ratio; PS3.18 8.3.5.1.3) and the encoder (JPEG quality, PNG, GIF; PS3.18 8.3.5.1.2).

For integer input every step is one lookup table over the frame's value range, so a 512x512 CT slice
costs one ``np.take`` after the table (a few thousand entries) is computed.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from server.errors import ErrorKind, ServerError

JPEG = "image/jpeg"
PNG = "image/png"
GIF = "image/gif"
IMAGE_TYPES = (JPEG, PNG, GIF)
DEFAULT_QUALITY = 90
LINEAR, LINEAR_EXACT, SIGMOID = "LINEAR", "LINEAR_EXACT", "SIGMOID"
VOI_FUNCTIONS = {"linear": LINEAR, "linear-exact": LINEAR_EXACT, "linear_exact": LINEAR_EXACT, "sigmoid": SIGMOID}
MAX_VIEWPORT = 8192
TABLE_LIMIT = 1 << 20  # integer frames with a wider value range are mapped element-wise
GRAY = ("MONOCHROME1", "MONOCHROME2")


@dataclass(frozen=True)
class Window:
    """A VOI window (PS3.3 C.11.2.1.2): center, width and VOI LUT Function."""

    center: float
    width: float
    function: str = LINEAR


@dataclass(frozen=True, eq=False)
class Lut:
    """A lookup table by its LUT Descriptor (first mapped value, bits per entry) and data (PS3.3 C.11.1.1)."""

    first: int
    bits: int
    data: np.ndarray

    def lookup(self, values: np.ndarray) -> np.ndarray:
        """Entries for ``values``; values outside the table take its first or last entry (PS3.3 C.11.1.1.1)."""
        index = np.clip(np.rint(values).astype(np.int64) - self.first, 0, len(self.data) - 1)
        return self.data[index]


@dataclass(frozen=True, eq=False)
class Presentation:
    """What turns stored values into displayed values: the attributes of PS3.3 C.7.6.3, C.11.1, C.11.2, C.11.6."""

    photometric: str = "MONOCHROME2"
    bits_stored: int = 8
    slope: float = 1.0
    intercept: float = 0.0
    modality_lut: Lut | None = None
    windows: tuple[Window, ...] = ()
    voi_lut: Lut | None = None
    inverse: bool = False
    palette: tuple[Lut, Lut, Lut] | None = None

    @property
    def grayscale(self) -> bool:
        return self.photometric in GRAY


@dataclass(frozen=True)
class Viewport:
    """Output size and source region (PS3.18 8.3.5.1.3 ``viewport=vw,vh[,sx,sy,sw,sh]``; PS3.18 9.1.2.4).

    ``width``/``height`` bound the output (None: unbounded in that direction); ``region`` is sx, sy, sw, sh in
    source pixels, or in fractions of the image when ``fractional`` (WADO-URI ``region``). A negative sw or sh
    flips the region horizontally or vertically.
    """

    width: int | None = None
    height: int | None = None
    region: tuple[float | None, float | None, float | None, float | None] | None = None
    fractional: bool = False


@dataclass(frozen=True)
class RenderParams:
    """The rendering parameters of one request (PS3.18 Table 8.3.5-1, 9.1.2)."""

    window: Window | None = None
    viewport: Viewport | None = None
    quality: int | None = None


# ---- query parameters (PS3.18 8.3.5.1) -----------------------------------------------------------
def parse_number(text: str, parameter: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ServerError(ErrorKind.INVALID, f"{parameter}: {text[:40]!r} is not a number", parameter=parameter)
    return value


def parse_integer(text: str, parameter: str, low: int, high: int) -> int:
    t = text.strip()
    if not (t.lstrip("-").isdigit() and low <= int(t) <= high):
        raise ServerError(ErrorKind.INVALID, f"{parameter}: {text[:40]!r} must be an integer {low}..{high}",
                          parameter=parameter)
    return int(t)


def window_of(center: float, width: float, function: str = LINEAR, parameter: str = "window") -> Window:
    """A checked Window: width >= 1 for LINEAR, > 0 otherwise (PS3.3 C.11.2.1.2)."""
    if width < 1 if function == LINEAR else width <= 0:
        raise ServerError(ErrorKind.INVALID, f"{parameter}: window width {width:g} is out of range for {function}",
                          parameter=parameter)
    return Window(center, width, function)


def parse_window(text: str) -> Window:
    """``window=center,width,function`` with function linear, linear-exact or sigmoid (PS3.18 8.3.5.1.4)."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 3):
        raise ServerError(ErrorKind.INVALID, "window must be center,width,function", parameter="window")
    function = VOI_FUNCTIONS.get(parts[2].lower()) if len(parts) == 3 else LINEAR
    if function is None:
        raise ServerError(ErrorKind.INVALID, f"window function {parts[2][:20]!r} is not linear, linear-exact or "
                          "sigmoid", parameter="window")
    return window_of(parse_number(parts[0], "window"), parse_number(parts[1], "window"), function)


def parse_viewport(text: str) -> Viewport:
    """``viewport=vw,vh[,sx,sy,sw,sh]``; empty sx..sh take their defaults (PS3.18 8.3.5.1.3)."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 6):
        raise ServerError(ErrorKind.INVALID, "viewport must be vw,vh or vw,vh,sx,sy,sw,sh", parameter="viewport")
    vw, vh = (parse_integer(p, "viewport", 1, MAX_VIEWPORT) for p in parts[:2])
    if len(parts) == 2:
        return Viewport(vw, vh)
    region = tuple(parse_number(p, "viewport") if p else None for p in parts[2:])
    if (region[0] or 0) < 0 or (region[1] or 0) < 0 or region[2] == 0 or region[3] == 0:
        raise ServerError(ErrorKind.INVALID, "viewport: sx, sy must be >= 0 and sw, sh non-zero", parameter="viewport")
    return Viewport(vw, vh, region)  # type: ignore[arg-type]


def parse_quality(text: str, parameter: str = "quality") -> int:
    """``quality`` 1..100 for lossy media types (PS3.18 8.3.5.1.2)."""
    return parse_integer(text, parameter, 1, 100)


# ---- the presentation attributes from DICOM JSON (PS3.18 F.2) --------------------------------------
BulkReader = Callable[[str], bytes]


def _first(meta: Mapping[str, Any], key: str, default: Any = None) -> Any:
    values = (meta.get(key) or {}).get("Value")
    return values[0] if values else default


def _float(value: Any, default: float) -> float:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return default
    return result if math.isfinite(result) else default


def _words(element: Mapping[str, Any], path: str, read_bulk: BulkReader, signed: bool) -> np.ndarray:
    """LUT Data as an integer array from Value (US/SS), InlineBinary or BulkDataURI (OW, little endian)."""
    if "Value" in element:
        return np.asarray(element["Value"], dtype=np.int64)
    if "InlineBinary" in element:
        raw = base64.b64decode(element["InlineBinary"])
    elif "BulkDataURI" in element:
        raw = read_bulk(path)
    else:
        raise ServerError(ErrorKind.INVALID, f"LUT Data {path} has no value")
    return np.frombuffer(raw[: len(raw) // 2 * 2], dtype="<i2" if signed else "<u2").astype(np.int64)


def _lut(item: Mapping[str, Any], descriptor_key: str, data_key: str, path: str, read_bulk: BulkReader,
         signed: bool = False) -> Lut | None:
    """A LUT from its Descriptor (entries, first mapped value, bits) and Data (PS3.3 C.11.1.1)."""
    descriptor = (item.get(descriptor_key) or {}).get("Value") or []
    data_element = item.get(data_key)
    if len(descriptor) != 3 or data_element is None:
        return None
    entries, first, bits = (int(v) for v in descriptor)
    entries = entries or 65536
    data = _words(data_element, path, read_bulk, signed=False)
    if bits == 8 and len(data) * 2 >= entries and len(data) < entries:  # 8-bit entries packed two per word
        data = np.frombuffer(data.astype("<u2").tobytes(), dtype=np.uint8).astype(np.int64)
    if len(data) < entries:
        raise ServerError(ErrorKind.INVALID, f"LUT {path} holds fewer entries than its descriptor")
    if signed and first >= 32768:  # first mapped value as SS when pixels are signed (C.11.1.1)
        first -= 65536
    return Lut(first, bits, data[:entries])


def presentation_of(meta: Mapping[str, Any], read_bulk: BulkReader) -> Presentation:
    """The Presentation of an instance from its DICOM JSON; ``read_bulk(path)`` yields BulkDataURI values."""
    photometric = str(_first(meta, "00280004", "MONOCHROME2")).strip().upper()
    signed = _first(meta, "00280103", 0) == 1
    modality = _sequence_lut(meta, "00283000", read_bulk, signed)
    centers = (meta.get("00281050") or {}).get("Value") or []
    widths = (meta.get("00281051") or {}).get("Value") or []
    function = VOI_FUNCTIONS.get(str(_first(meta, "00281056", "LINEAR")).strip().lower().replace("_", "-"), LINEAR)
    windows = []
    for c, w in zip(centers, widths):
        c, w = _float(c, math.nan), _float(w, math.nan)
        if math.isfinite(c) and math.isfinite(w) and (w >= 1 if function == LINEAR else w > 0):
            windows.append(Window(c, w, function))
    palette = None
    if photometric == "PALETTE COLOR":
        luts = [_lut(meta, f"002811{c}", f"002812{c}", f"002812{c}", read_bulk, signed) for c in ("01", "02", "03")]
        if any(lut is None for lut in luts):
            raise ServerError(ErrorKind.INVALID, "PALETTE COLOR image without its Palette Color LUTs")
        palette = tuple(luts)  # type: ignore[assignment]
    return Presentation(
        photometric=photometric,
        bits_stored=int(_first(meta, "00280101", _first(meta, "00280100", 8)) or 8),
        slope=_float(_first(meta, "00281053"), 1.0) or 1.0,
        intercept=_float(_first(meta, "00281052"), 0.0),
        modality_lut=modality,
        windows=tuple(windows),
        voi_lut=_sequence_lut(meta, "00283010", read_bulk, signed and modality is None),
        inverse=str(_first(meta, "20500020", "")).strip().upper() == "INVERSE",
        palette=palette,
    )


def _sequence_lut(meta: Mapping[str, Any], key: str, read_bulk: BulkReader, signed: bool) -> Lut | None:
    """The first item's LUT of a Modality (0028,3000) or VOI (0028,3010) LUT Sequence (PS3.3 C.11.1, C.11.2)."""
    items = (meta.get(key) or {}).get("Value") or []
    if not items:
        return None
    return _lut(items[0], "00283002", "00283006", f"{key}/0/00283006", read_bulk, signed)


# ---- the grayscale pipeline (PS3.4 N.2.1) -----------------------------------------------------------
def apply_window(x: np.ndarray, window: Window, y_min: float = 0.0, y_max: float = 255.0) -> np.ndarray:
    """The VOI LUT Functions LINEAR, LINEAR_EXACT and SIGMOID (PS3.3 C.11.2.1.2.1, C.11.2.1.3.1, C.11.2.1.3.2)."""
    c, w = window.center, window.width
    span = y_max - y_min
    if window.function == SIGMOID:
        return span / (1.0 + np.exp(-4.0 * (x - c) / w)) + y_min
    if window.function == LINEAR_EXACT:
        y = ((x - c) / w + 0.5) * span + y_min
    else:
        y = ((x - (c - 0.5)) / (w - 1) + 0.5) * span + y_min if w > 1 else np.where(x > c - 0.5, y_max, y_min)
    return np.clip(y, y_min, y_max)


def modality(values: np.ndarray, p: Presentation) -> np.ndarray:
    """Stored values -> modality values: the Modality LUT, else Rescale Slope/Intercept (PS3.3 C.11.1)."""
    if p.modality_lut is not None:
        return p.modality_lut.lookup(values).astype(np.float64)
    return values.astype(np.float64) * p.slope + p.intercept


def voi(x: np.ndarray, p: Presentation, window: Window | None, value_range: tuple[float, float]) -> np.ndarray:
    """Modality values -> 0..255 (PS3.3 C.11.2): requested window, stored window, VOI LUT, else min..max."""
    if window is None and p.windows:
        window = p.windows[0]
    if window is None and p.voi_lut is not None:
        top = float(2 ** p.voi_lut.bits - 1) if p.voi_lut.bits > 0 else float(p.voi_lut.data.max() or 1)
        return np.clip(p.voi_lut.lookup(x) * (255.0 / top), 0, 255)
    if window is None:
        low, high = value_range
        window = Window((low + high) / 2.0, max(high - low, 1e-6), LINEAR_EXACT)
    return apply_window(x, window)


def grayscale(values: np.ndarray, p: Presentation, window: Window | None = None) -> np.ndarray:
    """Stored grayscale values -> 8-bit presentation values (PS3.4 N.2.1), one table lookup for integers."""
    invert = (p.photometric == "MONOCHROME1") != p.inverse
    if values.dtype.kind in "iu" and values.size:
        low, high = int(values.min()), int(values.max())
        if high - low < TABLE_LIMIT:
            domain = np.arange(low, high + 1, dtype=np.int64)
            table = _to_u8(voi(m := modality(domain, p), p, window, (float(m.min()), float(m.max()))), invert)
            index = values.astype(np.int64 if values.dtype.itemsize > 2 else np.int32, copy=False)
            return np.take(table, index - low if low else index)
    x = modality(values, p)
    finite = x[np.isfinite(x)]
    value_range = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    return _to_u8(voi(np.nan_to_num(x), p, window, value_range), invert)


def _to_u8(y: np.ndarray, invert: bool) -> np.ndarray:
    out = np.rint(y).astype(np.uint8)
    return 255 - out if invert else out


# ---- color (PS3.3 C.7.6.3.1.2, C.7.6.3.1.5) -----------------------------------------------------------
def ybr_full_to_rgb(ybr: np.ndarray) -> np.ndarray:
    """YBR_FULL (8-bit) to RGB, the inverse of PS3.3 C.7.6.3.1.2's equations."""
    y, cb, cr = (ybr[..., i].astype(np.float32) for i in range(3))
    cb -= 128.0
    cr -= 128.0
    rgb = np.stack((y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb), axis=-1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def palette_to_rgb(values: np.ndarray, palette: Sequence[Lut]) -> np.ndarray:
    """PALETTE COLOR stored values through the Red, Green and Blue Palette Color LUTs (PS3.3 C.7.9).

    One (values, 3) table over the frame's value range, then one lookup per pixel.
    """
    low = int(values.min())
    domain = np.arange(low, int(values.max()) + 1, dtype=np.int64)
    table = np.stack([(lut.lookup(domain) >> 8 if lut.bits > 8 else lut.lookup(domain)).astype(np.uint8)
                      for lut in palette], axis=-1)
    index = values.astype(np.int32, copy=False)
    return np.take(table, index - low if low else index, axis=0)


def color(values: np.ndarray, p: Presentation) -> np.ndarray:
    """Decoded color samples (RGB, or YBR_FULL when not converted by the decoder) to 8-bit RGB."""
    if p.photometric == "PALETTE COLOR" and p.palette is not None:
        return palette_to_rgb(values, p.palette)
    if values.dtype != np.uint8:
        shift = max(p.bits_stored - 8, 0)
        values = np.clip(values.astype(np.int64) >> shift, 0, 255).astype(np.uint8)
    if p.photometric == "YBR_FULL":
        return ybr_full_to_rgb(values)
    return values


def to_display(values: np.ndarray, p: Presentation, window: Window | None = None) -> np.ndarray:
    """A decoded frame (rows x columns [x 3]) -> 8-bit grayscale or RGB ready for encoding."""
    if values.ndim == 3 and values.shape[-1] == 3:
        return color(values, p)
    if p.photometric == "PALETTE COLOR":
        return color(values, p)
    return grayscale(values, p, window)


# ---- viewport (PS3.18 8.3.5.1.3, 9.1.2.4.x) ---------------------------------------------------------------
def _region(v: Viewport, columns: int, rows: int) -> tuple[int, int, int, int, bool, bool]:
    """The source region as (left, top, right, bottom, flip_x, flip_y) in pixels, clipped to the image."""
    sx, sy, sw, sh = v.region or (None, None, None, None)
    if v.fractional:
        sx, sy = (sx or 0.0) * columns, (sy or 0.0) * rows
        sw, sh = None if sw is None else sw * columns, None if sh is None else sh * rows
    sx, sy = sx or 0.0, sy or 0.0
    sw = columns - sx if sw is None else sw
    sh = rows - sy if sh is None else sh
    x0, x1 = sorted((sx, sx + sw))
    y0, y1 = sorted((sy, sy + sh))
    left, top = max(int(round(x0)), 0), max(int(round(y0)), 0)
    right, bottom = min(int(round(x1)), columns), min(int(round(y1)), rows)
    if right <= left or bottom <= top:
        raise ServerError(ErrorKind.INVALID, "the requested region lies outside the image", parameter="viewport")
    return left, top, right, bottom, sw < 0, sh < 0


def fit(width: int, height: int, max_width: int | None, max_height: int | None) -> tuple[int, int]:
    """The largest size within the bounds that keeps the aspect ratio of width x height (PS3.18 8.3.5.1.3)."""
    scale = min(max_width / width if max_width else math.inf, max_height / height if max_height else math.inf)
    if not math.isfinite(scale):
        return width, height
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


def apply_viewport(image: Image.Image, viewport: Viewport | None) -> Image.Image:
    """Crop to the region, flip where sw/sh are negative, scale into the viewport keeping the aspect ratio."""
    if viewport is None:
        return image
    left, top, right, bottom, flip_x, flip_y = _region(viewport, image.width, image.height)
    if (left, top, right, bottom) != (0, 0, image.width, image.height):
        image = image.crop((left, top, right, bottom))
    if flip_x:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if flip_y:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    size = fit(image.width, image.height, viewport.width, viewport.height)
    if size != image.size:
        shrink = size[0] < image.width
        image = image.resize(size, Image.Resampling.BILINEAR if shrink else Image.Resampling.BICUBIC,
                             reducing_gap=3.0 if shrink else None)
    return image


# ---- encoders (PS3.18 8.7.4 rendered media types) --------------------------------------------------------------
def image_of(pixels: np.ndarray, viewport: Viewport | None = None) -> Image.Image:
    """A Pillow image of 8-bit display values with the viewport applied."""
    mode = "RGB" if pixels.ndim == 3 else "L"
    return apply_viewport(Image.fromarray(np.ascontiguousarray(pixels), mode), viewport)


def encode(images: Sequence[Image.Image], media_type: str, quality: int | None = None,
           frame_ms: float | None = None) -> bytes:
    """JPEG (quality 1..100), PNG, or GIF (animated when several frames) bytes of display images."""
    out = io.BytesIO()
    first = images[0]
    if media_type == JPEG:
        first.save(out, "JPEG", quality=quality or DEFAULT_QUALITY)
    elif media_type == PNG:
        first.save(out, "PNG", compress_level=3)
    elif media_type == GIF:
        frames = [im.convert("P", palette=Image.Palette.ADAPTIVE) if im.mode == "RGB" else im for im in images]
        extra = {"save_all": True, "append_images": frames[1:], "loop": 0,
                 "duration": int(frame_ms or 100)} if len(frames) > 1 else {}
        frames[0].save(out, "GIF", **extra)
    else:
        raise ServerError(ErrorKind.NOT_ACCEPTABLE, f"cannot render {media_type}")
    return out.getvalue()


def render(frames: Sequence[np.ndarray], p: Presentation, media_type: str, params: RenderParams = RenderParams(),
           frame_ms: float | None = None) -> bytes:
    """Decoded frames -> one encoded image (several frames only for an animated GIF)."""
    images = [image_of(to_display(f, p, params.window), params.viewport) for f in frames]
    return encode(images, media_type, params.quality, frame_ms)


def frame_time_ms(meta: Mapping[str, Any]) -> float | None:
    """Frame Time (0018,1063) in ms, for animated GIFs (PS3.3 C.7.6.5)."""
    value = _float(_first(meta, "00181063"), 0.0)
    return value if value > 0 else None


__all__ = ["GIF", "IMAGE_TYPES", "JPEG", "PNG", "Lut", "Presentation", "RenderParams", "Viewport", "Window",
           "apply_viewport", "apply_window", "encode", "fit", "frame_time_ms", "grayscale", "parse_quality",
           "parse_viewport", "parse_window", "presentation_of", "render", "to_display", "window_of"]

