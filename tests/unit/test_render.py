"""The rendering core (server.dicom.render) against independent references: the PS3.3 C.11.2.1.2 formulas
written out per pixel, and pydicom's own LUT and colour functions on pydicom's bundled files."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, convert_color_space

from server.dicom import render
from server.dicom.parse import parse_part10
from server.dicom.render import (GIF, JPEG, LINEAR, LINEAR_EXACT, PNG, SIGMOID, Presentation, RenderParams, Viewport,
                                 Window)
from server.errors import ErrorKind, ServerError
from tests.dicomdata import sample_path


def reference_window(x: float, c: float, w: float, function: str) -> float:
    """PS3.3 C.11.2.1.2.1 (LINEAR), C.11.2.1.3.2 (LINEAR_EXACT), C.11.2.1.3.1 (SIGMOID), output 0..255."""
    if function == SIGMOID:
        return 255 / (1 + math.exp(-4 * (x - c) / w))
    if function == LINEAR_EXACT:
        if x <= c - w / 2:
            return 0.0
        if x > c + w / 2:
            return 255.0
        return ((x - c) / w + 0.5) * 255
    if x <= c - 0.5 - (w - 1) / 2:
        return 0.0
    if x > c - 0.5 + (w - 1) / 2:
        return 255.0
    return ((x - (c - 0.5)) / (w - 1) + 0.5) * 255


def meta_and_bulk(name: str):
    parsed = parse_part10(sample_path(name))
    data = sample_path(name).read_bytes()
    return json.loads(parsed.meta), lambda path: data[parsed.bulk[path][0]:sum(parsed.bulk[path])]


# ---- parameters -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("40,400,linear", Window(40, 400, LINEAR)),
    ("-600,1500,LINEAR-EXACT", Window(-600, 1500, LINEAR_EXACT)),
    ("0.5,2.5,sigmoid", Window(0.5, 2.5, SIGMOID)),
    ("40,400", Window(40, 400, LINEAR)),
])
def test_parse_window(text, expected):
    assert render.parse_window(text) == expected


@pytest.mark.parametrize("text", ["", "40", "a,400,linear", "40,400,cubic", "40,0,linear", "40,0.5,linear",
                                  "40,0,sigmoid", "40,nan,linear", "1,2,3,4"])
def test_parse_window_invalid(text):
    with pytest.raises(ServerError) as err:
        render.parse_window(text)
    assert err.value.kind is ErrorKind.INVALID and err.value.parameter == "window"


@pytest.mark.parametrize("text,expected", [
    ("128,128", Viewport(128, 128)),
    ("100,50,10,20,30,40", Viewport(100, 50, (10.0, 20.0, 30.0, 40.0))),
    ("100,50,,,,", Viewport(100, 50, (None, None, None, None))),
    ("64,64,32,0,-32,", Viewport(64, 64, (32.0, 0.0, -32.0, None))),
])
def test_parse_viewport(text, expected):
    assert render.parse_viewport(text) == expected


@pytest.mark.parametrize("text", ["", "128", "0,128", "128,-1", "a,b", "10,10,1,2,3", "10,10,-1,0,5,5",
                                  "10,10,0,0,0,5", "99999,10"])
def test_parse_viewport_invalid(text):
    with pytest.raises(ServerError) as err:
        render.parse_viewport(text)
    assert err.value.kind is ErrorKind.INVALID and err.value.parameter == "viewport"


@pytest.mark.parametrize("text,ok", [("1", True), ("100", True), ("0", False), ("101", False), ("x", False),
                                     ("50.5", False)])
def test_parse_quality(text, ok):
    if ok:
        assert render.parse_quality(text) == int(text)
    else:
        with pytest.raises(ServerError):
            render.parse_quality(text)


# ---- the grayscale pipeline ---------------------------------------------------------------------------------
@pytest.mark.parametrize("function", [LINEAR, LINEAR_EXACT, SIGMOID])
@pytest.mark.parametrize("c,w", [(40.0, 400.0), (0.0, 1.0), (100.5, 2.0), (-1000.0, 3000.0)])
def test_apply_window_matches_the_formulas(function, c, w):
    if function != LINEAR and w == 1.0:
        w = 0.5
    x = np.linspace(c - w, c + w, 997)
    got = render.apply_window(x, Window(c, w, function))
    expected = np.array([reference_window(v, c, w, function) for v in x])
    assert np.allclose(got, expected, atol=1e-9)


def test_grayscale_table_path_equals_float_path():
    rng = np.random.default_rng(7)
    values = rng.integers(-2000, 3000, size=(64, 48)).astype(np.int16)
    p = Presentation(slope=0.5, intercept=-100.0, windows=(Window(200, 900, LINEAR),))
    fast = render.grayscale(values, p)
    slow = np.rint(render.apply_window(values.astype(np.float64) * 0.5 - 100.0, Window(200, 900))).astype(np.uint8)
    assert np.array_equal(fast, slow)


def test_requested_window_overrides_the_stored_one():
    values = np.arange(0, 1000, dtype=np.uint16).reshape(20, 50)
    p = Presentation(windows=(Window(500, 1000),))
    assert not np.array_equal(render.grayscale(values, p), render.grayscale(values, p, Window(100, 50)))
    expected = np.rint([[reference_window(v, 100, 50, LINEAR) for v in row] for row in values]).astype(np.uint8)
    assert np.array_equal(render.grayscale(values, p, Window(100, 50)), expected)


def test_without_any_window_the_frame_range_is_used():
    values = np.array([[100, 200], [300, 400]], dtype=np.int16)
    out = render.grayscale(values, Presentation())
    assert out.min() == 0 and out.max() == 255 and out[0, 1] < out[1, 0]


@pytest.mark.parametrize("photometric,inverse,inverted", [("MONOCHROME2", False, False), ("MONOCHROME1", False, True),
                                                          ("MONOCHROME2", True, True)])
def test_monochrome1_and_inverse_presentation_shape(photometric, inverse, inverted):
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    straight = render.grayscale(values, Presentation(windows=(Window(128, 256),)))
    out = render.grayscale(values, Presentation(photometric=photometric, inverse=inverse, windows=(Window(128, 256),)))
    assert np.array_equal(out, 255 - straight if inverted else straight)


def test_modality_lut_sequence_matches_pydicom():
    ds = dcmread(sample_path("mlut_18.dcm"))
    meta, read = meta_and_bulk("mlut_18.dcm")
    p = render.presentation_of(meta, read)
    assert p.modality_lut is not None
    assert np.array_equal(render.modality(ds.pixel_array, p), apply_modality_lut(ds.pixel_array, ds).astype(float))


def test_voi_lut_sequence_matches_pydicom():
    ds = dcmread(sample_path("vlut_04.dcm"))
    meta, read = meta_and_bulk("vlut_04.dcm")
    p = render.presentation_of(meta, read)
    assert p.voi_lut is not None and not p.windows
    expected = np.rint(apply_voi_lut(ds.pixel_array, ds).astype(float) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(render.to_display(ds.pixel_array, p), expected)


def test_presentation_of_stored_window_and_rescale():
    meta = {"00280004": {"vr": "CS", "Value": ["MONOCHROME1"]}, "00281050": {"vr": "DS", "Value": [40.0, 80.0]},
            "00281051": {"vr": "DS", "Value": [400.0, 800.0]}, "00281052": {"vr": "DS", "Value": [-1024.0]},
            "00281053": {"vr": "DS", "Value": [2.0]}, "00281056": {"vr": "CS", "Value": ["SIGMOID"]},
            "20500020": {"vr": "CS", "Value": ["IDENTITY"]}}
    p = render.presentation_of(meta, lambda path: b"")
    assert p.photometric == "MONOCHROME1" and p.slope == 2.0 and p.intercept == -1024.0 and not p.inverse
    assert p.windows == (Window(40.0, 400.0, SIGMOID), Window(80.0, 800.0, SIGMOID))


# ---- colour ---------------------------------------------------------------------------------------------------
def test_palette_color_matches_pydicom():
    ds = dcmread(sample_path("OBXXXX1A.dcm"))
    meta, read = meta_and_bulk("OBXXXX1A.dcm")
    p = render.presentation_of(meta, read)
    assert p.palette is not None
    expected = (apply_color_lut(ds.pixel_array, ds) >> 8).astype(np.uint8)
    assert np.array_equal(render.to_display(ds.pixel_array, p), expected)


def test_ybr_full_to_rgb_matches_pydicom():
    rng = np.random.default_rng(3)
    ybr = rng.integers(0, 256, size=(20, 30, 3)).astype(np.uint8)
    ours = render.to_display(ybr, Presentation(photometric="YBR_FULL"))
    theirs = convert_color_space(ybr, "YBR_FULL", "RGB")
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_rgb_16_bit_is_scaled_to_8_bit():
    rgb = np.full((2, 2, 3), 0xFFF, dtype=np.uint16)
    assert render.to_display(rgb, Presentation(photometric="RGB", bits_stored=12)).max() == 255


# ---- viewport and encoding -------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,bounds,expected", [((512, 512), (128, 128), (128, 128)),
                                                  ((256, 1024), (128, 128), (32, 128)),
                                                  ((640, 480), (128, None), (128, 96)),
                                                  ((64, 64), (128, 128), (128, 128))])
def test_fit_keeps_aspect_ratio(size, bounds, expected):
    assert render.fit(*size, *bounds) == expected


def _gradient() -> Image.Image:
    return Image.fromarray(np.tile(np.arange(200, dtype=np.uint8), (100, 1)), "L")  # 200 wide, 100 high


def test_viewport_region_and_flip():
    cropped = render.apply_viewport(_gradient(), Viewport(50, 50, (100.0, 0.0, 50.0, 50.0)))
    assert cropped.size == (50, 50) and np.asarray(cropped)[0, 0] == 100
    flipped = render.apply_viewport(_gradient(), Viewport(50, 50, (150.0, 0.0, -50.0, 50.0)))
    assert np.asarray(flipped)[0, 0] == 149 and np.asarray(flipped)[0, -1] == 100


def test_viewport_fractional_region():
    out = render.apply_viewport(_gradient(), Viewport(None, None, (0.5, 0.0, 0.5, 1.0), fractional=True))
    assert out.size == (100, 100) and np.asarray(out)[0, 0] == 100


def test_region_outside_the_image_is_invalid():
    with pytest.raises(ServerError) as err:
        render.apply_viewport(_gradient(), Viewport(10, 10, (500.0, 0.0, 10.0, 10.0)))
    assert err.value.kind is ErrorKind.INVALID


def test_encoders():
    frame = np.tile(np.arange(256, dtype=np.uint8), (64, 1))
    png = render.render([frame], Presentation(windows=(Window(128, 256),)), PNG)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), render.grayscale(frame, Presentation(
        windows=(Window(128, 256),))))
    small = render.render([frame], Presentation(), JPEG, RenderParams(quality=5))
    large = render.render([frame], Presentation(), JPEG, RenderParams(quality=100))
    assert len(small) < len(large) and Image.open(io.BytesIO(small)).format == "JPEG"
    gif = Image.open(io.BytesIO(render.render([frame, 255 - frame, frame], Presentation(), GIF)))
    assert gif.format == "GIF" and gif.n_frames == 3
