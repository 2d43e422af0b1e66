"""dicomweb-client's rendered calls and plain HTTP thumbnails and WADO-URI against our server under uvicorn."""

from __future__ import annotations

import io

import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO

from server.dicom.encapsulate import encapsulated_pdf, study_context_from
from tests.component.test_rendered import PDF, ref_linear, ref_linear_exact, settings  # noqa: F401 - fixture
from tests.component.test_wado import split_multipart
from tests.conftest import make_token
from tests.dicomdata import sample_bytes, sample_path, sample_uids

FILES = ["CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "SC_rgb_rle.dcm"]
PDF_SERIES, PDF_SOP = "1.2.826.0.1.3680043.10.99.8", "1.2.826.0.1.3680043.10.99.8.1"


@pytest.fixture
def dw(live_server, sqlite_settings) -> DICOMwebClient:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {make_token(sqlite_settings)}"
    client = DICOMwebClient(url=f"{live_server.url}/dicomweb", session=session)
    pdf = encapsulated_pdf(PDF, study=study_context_from(sample_bytes("CT_small.dcm")), title="Befund",
                           series_uid=PDF_SERIES, sop_uid=PDF_SOP)
    datasets = [dcmread(sample_path(n)) for n in FILES] + [dcmread(DicomBytesIO(pdf))]
    assert len(client.store_instances(datasets).ReferencedSOPSequence) == len(datasets)
    return client


def decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_instance_rendered_jpeg_and_png(dw):
    jpeg = decoded(dw.retrieve_instance_rendered(*sample_uids("CT_small.dcm"), media_types=("image/jpeg",)))
    assert jpeg.format == "JPEG" and jpeg.size == (128, 128)
    ds = dcmread(sample_path("CT_small.dcm"))
    x = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    data = dw.retrieve_instance_rendered(*sample_uids("CT_small.dcm"), media_types=("image/png",),
                                         params={"window": "40,400,linear"})
    assert np.array_equal(np.asarray(decoded(data)), ref_linear(x, 40, 400))


def test_instance_rendered_viewport_and_quality(dw):
    data = dw.retrieve_instance_rendered(*sample_uids("SC_rgb_rle.dcm"), media_types=("image/jpeg",),
                                         params={"viewport": "50,50", "quality": "90"})
    im = decoded(data)
    assert im.size == (50, 50) and im.mode == "RGB"


def test_frames_rendered(dw):
    frame = dcmread(sample_path("emri_small.dcm")).pixel_array[1].astype(float)
    data = dw.retrieve_instance_frames_rendered(*sample_uids("emri_small.dcm"), frame_numbers=[2],
                                                media_types=("image/png",))
    expected = ref_linear_exact(frame, (frame.min() + frame.max()) / 2, frame.max() - frame.min())
    assert np.array_equal(np.asarray(decoded(data)), expected)
    gif = decoded(dw.retrieve_instance_frames_rendered(*sample_uids("emri_small.dcm"), frame_numbers=[1, 2, 3],
                                                       media_types=("image/gif",)))
    assert gif.format == "GIF" and gif.n_frames == 3


def test_series_rendered_is_multipart(dw, live_server, sqlite_settings):
    study, series, _ = sample_uids("emri_small.dcm")
    body = dw.retrieve_series_rendered(study, series, media_types=("image/jpeg",))
    r = requests.get(f"{live_server.url}/dicomweb/studies/{study}/series/{series}/rendered",
                     headers={"Authorization": f"Bearer {make_token(sqlite_settings)}", "Accept": "image/jpeg"})
    assert r.headers["content-type"].startswith('multipart/related; type="image/jpeg"')
    boundary = body[2:body.index(b"\r\n")].decode()  # the body dicomweb-client returned starts with --boundary
    parts = split_multipart(body, f"multipart/related; boundary={boundary}")
    assert len(parts) == 1 and decoded(parts[0][1]).format == "JPEG"


def test_pdf_rendered(dw):
    data = dw.retrieve_instance_rendered(sample_uids("CT_small.dcm")[0], PDF_SERIES, PDF_SOP,
                                         media_types=("application/pdf",))
    assert data.startswith(PDF)


def test_thumbnails_over_http(dw, live_server, sqlite_settings):
    headers = {"Authorization": f"Bearer {make_token(sqlite_settings)}"}
    study, series, sop = sample_uids("MR_small.dcm")
    base = f"{live_server.url}/dicomweb/studies/{study}"
    for path in (base, f"{base}/series/{series}", f"{base}/series/{series}/instances/{sop}",
                 f"{base}/series/{series}/instances/{sop}/frames/1"):
        r = requests.get(f"{path}/thumbnail", headers=headers, params={"viewport": "32,32"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert decoded(r.content).size == (32, 32)


def test_wado_uri_over_http(dw, live_server, sqlite_settings):
    headers = {"Authorization": f"Bearer {make_token(sqlite_settings)}"}
    study, series, sop = sample_uids("MR_small.dcm")
    query = {"requestType": "WADO", "studyUID": study, "seriesUID": series, "objectUID": sop}
    r = requests.get(f"{live_server.url}/wado", params={**query, "contentType": "image/png"}, headers=headers)
    ds = dcmread(sample_path("MR_small.dcm"))
    assert np.array_equal(np.asarray(decoded(r.content)), ref_linear(ds.pixel_array.astype(float), 600, 1600))
    r = requests.get(f"{live_server.url}/wado", params={**query, "contentType": "application/dicom"}, headers=headers)
    assert r.headers["content-type"] == "application/dicom" and r.content == sample_bytes("MR_small.dcm")
    assert requests.get(f"{live_server.url}/wado", params=query).status_code == 401
