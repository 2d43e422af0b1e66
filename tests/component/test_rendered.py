"""Rendered and thumbnail resources on the app in-process (PS3.18 10.4.1.1.3, 10.4.1.1.4, 8.3.5.1).

Every image is decoded with Pillow and compared with a numpy reference built here from pydicom's pixel
data and the PS3.3 C.11.2.1.2 formulas, never with the server's own rendering code.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.pixels import apply_color_lut

from server.dicom.encapsulate import encapsulated_pdf, study_context_from
from tests.component.test_wado import split_multipart
from tests.conftest import auth, make_token
from tests.dicomdata import make_instance, multipart, sample_bytes, sample_path, sample_uids

FILES = ["CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "SC_rgb_rle.dcm", "SC_rgb_jpeg_dcmtk.dcm",
         "OBXXXX1A.dcm", "JPEG2000.dcm", "test-SR.dcm"]
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
STUDY, SERIES = "1.2.826.0.1.3680043.10.99.1", "1.2.826.0.1.3680043.10.99.2"
MONO1 = "1.2.826.0.1.3680043.10.99.3.9"


def ref_linear(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 to 0..255, rounded."""
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
    y = np.where(x <= c - 0.5 - (w - 1) / 2, 0, np.where(x > c - 0.5 + (w - 1) / 2, 255, y))
    return np.rint(y).astype(np.uint8)


def ref_linear_exact(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.3.2 to 0..255, rounded."""
    y = ((x - c) / w + 0.5) * 255
    return np.rint(np.where(x <= c - w / 2, 0, np.where(x > c + w / 2, 255, y))).astype(np.uint8)


def with_pixels(data: bytes, pixels: np.ndarray, **attrs) -> bytes:
    """A copy of a generated instance with other pixel values and attributes."""
    ds = dcmread(DicomBytesIO(data))
    ds.PixelData = pixels.astype(np.int16).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def series_instances() -> list[bytes]:
    """Three 16x16 CT instances of one series whose pixels are all 100 * instance number."""
    return [with_pixels(make_instance(study=STUDY, series=SERIES, sop=f"{SERIES}.{i}", instance_number=i),
                        np.full((16, 16), 100 * i), WindowCenter=200, WindowWidth=400) for i in (1, 2, 3)]


def mono1_instance() -> bytes:
    ramp = np.tile(np.arange(0, 1600, 100), (16, 1))
    return with_pixels(make_instance(study=STUDY, series=SERIES + ".2", sop=MONO1, series_number=2), ramp,
                       PhotometricInterpretation="MONOCHROME1", WindowCenter=800, WindowWidth=1600)


@pytest.fixture
def settings(sqlite_settings):
    """SQLite only: these tests are about rendering, not the store (conftest's app and client use this)."""
    return sqlite_settings


@pytest.fixture
def token(client, sqlite_settings):
    headers = auth(make_token(sqlite_settings))
    pdf = encapsulated_pdf(PDF, study=study_context_from(sample_bytes("CT_small.dcm")), title="Befund")
    parts = [sample_bytes(n) for n in FILES] + series_instances() + [mono1_instance(), pdf]
    body, ctype = multipart(parts)
    r = client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype, **headers})
    assert r.status_code == 200, r.text
    return headers


def url(name: str, suffix: str = "rendered") -> str:
    study, series, sop = sample_uids(name)
    return f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/{suffix}"


def image(r) -> Image.Image:
    assert r.status_code == 200, r.text
    return Image.open(io.BytesIO(r.content))


def png(client, token, path: str, **params) -> np.ndarray:
    r = client.get(path, params=params, headers={**token, "Accept": "image/png"})
    assert r.headers["content-type"] == "image/png"
    return np.asarray(image(r))


# ---- instance: the pipeline ---------------------------------------------------------------------------------
def test_default_is_jpeg_of_the_stored_size(client, token):
    for accept in (None, "*/*", "image/*", "image/jpeg"):
        r = client.get(url("CT_small.dcm"), headers={**token, **({"Accept": accept} if accept else {})})
        im = image(r)
        assert r.headers["content-type"] == "image/jpeg" and im.format == "JPEG"
        assert im.size == (128, 128) and im.mode == "L"


def test_stored_window_applied(client, token):
    ds = dcmread(sample_path("MR_small.dcm"))
    expected = ref_linear(ds.pixel_array.astype(float), 600, 1600)
    assert np.array_equal(png(client, token, url("MR_small.dcm")), expected)


def test_rescale_and_min_max_without_a_stored_window(client, token):
    ds = dcmread(sample_path("CT_small.dcm"))
    x = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = ref_linear_exact(x, (x.min() + x.max()) / 2, x.max() - x.min())
    assert np.array_equal(png(client, token, url("CT_small.dcm")), expected)


@pytest.mark.parametrize("function,ref", [("linear", ref_linear), ("linear-exact", ref_linear_exact)])
def test_window_parameter_overrides_the_stored_window(client, token, function, ref):
    ds = dcmread(sample_path("CT_small.dcm"))
    x = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    got = png(client, token, url("CT_small.dcm"), window=f"40,400,{function}")
    assert np.array_equal(got, ref(x, 40, 400))


def test_sigmoid_window(client, token):
    ds = dcmread(sample_path("MR_small.dcm"))
    expected = np.rint(255 / (1 + np.exp(-4 * (ds.pixel_array - 500.0) / 300.0))).astype(np.uint8)
    got = png(client, token, url("MR_small.dcm"), window="500,300,sigmoid")
    assert np.abs(got.astype(int) - expected).max() <= 1


def test_monochrome1_is_inverted(client, token):
    path = f"/dicomweb/studies/{STUDY}/series/{SERIES}.2/instances/{MONO1}/rendered"
    ramp = np.tile(np.arange(0, 1600, 100), (16, 1)).astype(float)
    got = png(client, token, path)
    assert np.array_equal(got, 255 - ref_linear(ramp, 800, 1600))
    assert got[0, 0] == 255 and got[0, -1] < 20  # low values white


def test_rgb_as_stored(client, token):
    got = png(client, token, url("SC_rgb_rle.dcm"))
    assert got.shape == (100, 100, 3)
    assert np.array_equal(got, dcmread(sample_path("SC_rgb_rle.dcm")).pixel_array)


def test_ybr_jpeg_converted_to_rgb(client, token):
    got = png(client, token, url("SC_rgb_jpeg_dcmtk.dcm"))
    expected = dcmread(sample_path("SC_rgb_jpeg_dcmtk.dcm")).pixel_array  # pydicom converts YBR_FULL to RGB
    assert got.shape == (100, 100, 3) and np.abs(got.astype(int) - expected).max() <= 1
    assert got[5, 5, 0] > 200 and got[5, 5, 1] < 60  # the top band of the test image is red


def test_palette_color_applied(client, token):
    ds = dcmread(sample_path("OBXXXX1A.dcm"))
    assert np.array_equal(png(client, token, url("OBXXXX1A.dcm")), (apply_color_lut(ds.pixel_array, ds) >> 8))


def test_jpeg2000_decoded(client, token):
    assert image(client.get(url("JPEG2000.dcm"), headers=token)).size == (256, 1024)


def test_encapsulated_pdf_rendered_as_pdf(client, token):
    study = sample_uids("CT_small.dcm")[0]
    r = client.get(f"/dicomweb/studies/{study}/rendered", headers={**token, "Accept": "application/pdf"})
    [(headers, payload)] = split_multipart(r.content, r.headers["content-type"])
    assert headers["content-type"] == "application/pdf" and payload.startswith(PDF)
    series = client.get(f"/dicomweb/studies/{study}/series", headers=token).json()
    doc = next(s for s in series if s["00080060"]["Value"] == ["DOC"])["0020000E"]["Value"][0]
    sop = client.get(f"/dicomweb/studies/{study}/series/{doc}/instances", headers=token).json()[0]["00080018"]["Value"][0]
    r = client.get(f"/dicomweb/studies/{study}/series/{doc}/instances/{sop}/rendered", headers=token)
    assert r.status_code == 200 and r.headers["content-type"] == "application/pdf" and r.content.startswith(PDF)


# ---- parameters ---------------------------------------------------------------------------------------------------
def test_viewport_scales_keeping_aspect_ratio(client, token):
    assert image(client.get(url("CT_small.dcm"), params={"viewport": "64,64"}, headers=token)).size == (64, 64)
    assert image(client.get(url("JPEG2000.dcm"), params={"viewport": "100,100"}, headers=token)).size == (25, 100)


def test_viewport_region_and_flip(client, token):
    full = png(client, token, url("MR_small.dcm"))
    region = png(client, token, url("MR_small.dcm"), viewport="32,32,0,0,32,32")
    assert np.array_equal(region, full[:32, :32])
    flipped = png(client, token, url("MR_small.dcm"), viewport="32,32,32,0,-32,32")
    assert np.array_equal(flipped, full[:32, :32][:, ::-1])


def test_quality_changes_the_jpeg(client, token):
    low = client.get(url("CT_small.dcm"), params={"quality": "5"}, headers=token)
    high = client.get(url("CT_small.dcm"), params={"quality": "100"}, headers=token)
    assert image(low).format == image(high).format == "JPEG" and len(low.content) < len(high.content)


def test_accept_query_parameter(client, token):
    r = client.get(url("CT_small.dcm"), params={"accept": "image/png"}, headers={**token, "Accept": "image/jpeg"})
    assert r.headers["content-type"] == "image/png" and image(r).format == "PNG"


@pytest.mark.parametrize("params", [{"window": "abc"}, {"window": "40,0,linear"}, {"window": "40,400,cubic"},
                                    {"viewport": "0,10"}, {"viewport": "10"}, {"viewport": "10,10,500,500,10,10"},
                                    {"quality": "0"}, {"quality": "x"}, [("quality", "50"), ("quality", "60")]])
def test_bad_parameters_400(client, token, params):
    r = client.get(url("CT_small.dcm"), params=params, headers=token)
    assert r.status_code == 400, r.text
    assert r.json()["00000902"]["Value"][0]


def test_unsupported_parameters_are_ignored(client, token):
    r = client.get(url("CT_small.dcm"), params={"annotation": "patient", "iccprofile": "no"}, headers=token)
    assert image(r).format == "JPEG"


@pytest.mark.parametrize("accept", ["application/dicom", "video/mp4", "text/html", "image/jp2"])
def test_not_acceptable_406(client, token, accept):
    assert client.get(url("CT_small.dcm"), headers={**token, "Accept": accept}).status_code == 406


def test_non_image_406(client, token):
    assert client.get(url("test-SR.dcm"), headers=token).status_code == 406
    assert client.get(url("test-SR.dcm", "thumbnail"), headers=token).status_code == 406


# ---- frames and multi-frame ---------------------------------------------------------------------------------------
def test_rendered_frame(client, token):
    ds = dcmread(sample_path("emri_small.dcm"))
    frame = ds.pixel_array[3].astype(float)
    got = png(client, token, url("emri_small.dcm", "frames/4/rendered"))
    assert np.array_equal(got, ref_linear_exact(frame, (frame.min() + frame.max()) / 2, frame.max() - frame.min()))


def test_several_frames_multipart(client, token):
    r = client.get(url("emri_small.dcm", "frames/1,3,5/rendered"), headers=token)
    assert r.headers["content-type"].startswith('multipart/related; type="image/jpeg"')
    parts = split_multipart(r.content, r.headers["content-type"])
    assert len(parts) == 3 and all(Image.open(io.BytesIO(p)).size == (64, 64) for _, p in parts)


def test_gif_of_a_multi_frame_instance_is_animated(client, token):
    r = client.get(url("emri_small.dcm"), headers={**token, "Accept": "image/gif"})
    assert image(r).format == "GIF" and image(r).n_frames == 10
    r = client.get(url("emri_small.dcm", "frames/2,4/rendered"), headers={**token, "Accept": "image/gif"})
    assert image(r).n_frames == 2


@pytest.mark.parametrize("frames,status", [("0", 400), ("a", 400), ("11", 404), ("1,99", 404)])
def test_bad_frames(client, token, frames, status):
    assert client.get(url("emri_small.dcm", f"frames/{frames}/rendered"), headers=token).status_code == status


# ---- study and series: multipart of the rendered instances -------------------------------------------------------
@pytest.mark.parametrize("accept", [None, "image/jpeg", 'multipart/related; type="image/jpeg"'])
def test_series_rendered_multipart(client, token, accept):
    headers = {**token, **({"Accept": accept} if accept else {})}
    r = client.get(f"/dicomweb/studies/{STUDY}/series/{SERIES}/rendered", headers=headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith('multipart/related; type="image/jpeg"')
    parts = split_multipart(r.content, r.headers["content-type"])
    assert [h["content-type"] for h, _ in parts] == ["image/jpeg"] * 3
    means = [np.asarray(Image.open(io.BytesIO(p))).mean() for _, p in parts]
    assert means == sorted(means) and means[0] < means[-1]  # instances 1, 2, 3 in order


def test_study_rendered_png_leaves_out_non_images(client, token):
    study = sample_uids("CT_small.dcm")[0]
    r = client.get(f"/dicomweb/studies/{study}/rendered", headers={**token, "Accept": "image/png"})
    parts = split_multipart(r.content, r.headers["content-type"])
    images = [n for n in FILES if sample_uids(n)[0] == study and n != "test-SR.dcm"]
    assert len(parts) == len(images) and all(Image.open(io.BytesIO(p)).format == "PNG" for _, p in parts)


# ---- thumbnails ----------------------------------------------------------------------------------------------------
def test_thumbnail_every_level(client, token):
    study, series, sop = sample_uids("CT_small.dcm")
    for path in (f"/dicomweb/studies/{study}/thumbnail", f"/dicomweb/studies/{study}/series/{series}/thumbnail",
                 url("CT_small.dcm", "thumbnail"), url("emri_small.dcm", "frames/2/thumbnail")):
        r = client.get(path, headers=token)
        im = image(r)
        assert r.headers["content-type"] == "image/jpeg" and max(im.size) == 128


def test_thumbnail_is_the_middle_instance_and_viewport(client, token):
    r = client.get(f"/dicomweb/studies/{STUDY}/series/{SERIES}/thumbnail", params={"viewport": "32,32"},
                   headers={**token, "Accept": "image/png"})
    got = np.asarray(image(r))
    assert got.shape == (32, 32) and np.all(got == ref_linear(np.array([200.0]), 200, 400)[0])
    study_thumb = np.asarray(image(client.get(f"/dicomweb/studies/{STUDY}/thumbnail", params={"viewport": "32,32"},
                                              headers={**token, "Accept": "image/png"})))
    assert np.array_equal(study_thumb, got)  # first series of the study


def test_thumbnail_middle_frame_and_cache(client, token, app):
    ds = dcmread(sample_path("emri_small.dcm"))
    frame = ds.pixel_array[5].astype(float)  # 10 frames: the middle one is frame 6
    path = url("emri_small.dcm", "thumbnail")
    first = png(client, token, path, viewport="64,64")
    assert np.array_equal(first, ref_linear_exact(frame, (frame.min() + frame.max()) / 2, frame.max() - frame.min()))
    hits = app.state.render.cache.hits
    assert np.array_equal(png(client, token, path, viewport="64,64"), first)
    assert app.state.render.cache.hits == hits + 1


# ---- not found, tenancy, auth ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["rendered", "thumbnail"])
def test_unknown_uids_404(client, token, suffix):
    study, series, sop = sample_uids("CT_small.dcm")
    for path in (f"/dicomweb/studies/1.2.3/{suffix}", f"/dicomweb/studies/{study}/series/1.2.3/{suffix}",
                 f"/dicomweb/studies/{study}/series/{series}/instances/1.2.3/{suffix}",
                 f"/dicomweb/studies/{study}/series/{series}/instances/1.2.3/frames/1/{suffix}"):
        assert client.get(path, headers=token).status_code == 404, path


def test_other_tenant_sees_nothing_even_when_cached(client, token, sqlite_settings):
    other = auth(make_token(sqlite_settings, tenant="site-b"))
    study, series, _ = sample_uids("CT_small.dcm")
    assert client.get(url("CT_small.dcm", "thumbnail"), headers=token).status_code == 200
    for suffix in ("thumbnail", "rendered"):
        assert client.get(url("CT_small.dcm", suffix), headers=other).status_code == 404
        assert client.get(f"/dicomweb/studies/{study}/{suffix}", headers=other).status_code == 404


def test_token_required(client, token):
    assert client.get(url("CT_small.dcm")).status_code == 401
    assert client.get(url("CT_small.dcm", "thumbnail")).status_code == 401


def test_thumbnail_cache_is_per_tenant(client, token, app, sqlite_settings):
    other = auth(make_token(sqlite_settings, tenant="site-b"))
    body, ctype = multipart([sample_bytes("CT_small.dcm")])
    assert client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype, **other}).status_code == 200
    assert client.get(url("CT_small.dcm", "thumbnail"), headers=token).status_code == 200
    hits = app.state.render.cache.hits
    r = client.get(url("CT_small.dcm", "thumbnail"), headers=other)  # the same blob, another tenant: rendered anew
    assert r.status_code == 200 and app.state.render.cache.hits == hits
    assert client.get(url("CT_small.dcm", "thumbnail"), headers=other).status_code == 200
    assert app.state.render.cache.hits == hits + 1


def test_too_many_frames_for_one_gif_406(client, token, monkeypatch):
    from server.dicomweb import rendered

    monkeypatch.setattr(rendered, "MAX_GIF_PIXELS", 64 * 64 * 5)
    assert client.get(url("emri_small.dcm"), headers={**token, "Accept": "image/gif"}).status_code == 406
    r = client.get(url("emri_small.dcm", "frames/1,2,3,4,5/rendered"), headers={**token, "Accept": "image/gif"})
    assert image(r).n_frames == 5
