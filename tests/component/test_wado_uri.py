"""WADO-URI (PS3.18 9) on the app in-process: each contentType and parameter, errors, tenancy."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO

from server.dicom.encapsulate import encapsulated_pdf, study_context_from
from tests.component.test_rendered import PDF, ref_linear, ref_linear_exact, settings  # noqa: F401 - fixture
from tests.conftest import auth, make_token
from tests.dicomdata import multipart, sample_bytes, sample_path, sample_uids

FILES = ["CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "JPEG2000.dcm", "test-SR.dcm"]
PDF_SERIES, PDF_SOP = "1.2.826.0.1.3680043.10.99.7", "1.2.826.0.1.3680043.10.99.7.1"


@pytest.fixture
def token(client, sqlite_settings):
    headers = auth(make_token(sqlite_settings))
    pdf = encapsulated_pdf(PDF, study=study_context_from(sample_bytes("CT_small.dcm")), title="Befund",
                           series_uid=PDF_SERIES, sop_uid=PDF_SOP)
    body, ctype = multipart([sample_bytes(n) for n in FILES] + [pdf])
    assert client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype, **headers}).status_code == 200
    return headers


def wado(client, token, name: str | None = None, *, uids=None, **params):
    study, series, sop = uids or sample_uids(name)
    query = {"requestType": "WADO", "studyUID": study, "seriesUID": series, "objectUID": sop, **params}
    return client.get("/wado", params=query, headers=token)


def pixels(r) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)))


# ---- content types ----------------------------------------------------------------------------------------------
def test_default_is_jpeg_for_images(client, token):
    r = wado(client, token, "CT_small.dcm")
    assert r.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(r.content)).size == (128, 128)


@pytest.mark.parametrize("content_type,fmt", [("image/jpeg", "JPEG"), ("image/png", "PNG"), ("image/gif", "GIF"),
                                              ("image/*", "JPEG"), ("image/png,image/jpeg", "PNG"),
                                              ("image/jp2,image/gif", "GIF")])
def test_image_content_types(client, token, content_type, fmt):
    r = wado(client, token, "CT_small.dcm", contentType=content_type)
    assert Image.open(io.BytesIO(r.content)).format == fmt and r.headers["content-type"] == f"image/{fmt.lower()}"


def test_png_has_the_stored_window(client, token):
    ds = dcmread(sample_path("MR_small.dcm"))
    assert np.array_equal(pixels(wado(client, token, "MR_small.dcm", contentType="image/png")),
                          ref_linear(ds.pixel_array.astype(float), 600, 1600))


def test_application_dicom_is_the_stored_file(client, token):
    r = wado(client, token, "JPEG2000.dcm", contentType="application/dicom")
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
    assert r.content == sample_bytes("JPEG2000.dcm")
    r = wado(client, token, "test-SR.dcm", contentType="application/dicom")
    assert r.content == sample_bytes("test-SR.dcm")


def test_encapsulated_pdf(client, token):
    uids = (sample_uids("CT_small.dcm")[0], PDF_SERIES, PDF_SOP)
    for params in ({}, {"contentType": "application/pdf"}):
        r = wado(client, token, uids=uids, **params)
        assert r.status_code == 200 and r.headers["content-type"] == "application/pdf" and r.content.startswith(PDF)


# ---- rendering parameters ---------------------------------------------------------------------------------------
def test_rows_and_columns_keep_the_aspect_ratio(client, token):
    assert Image.open(io.BytesIO(wado(client, token, "CT_small.dcm", rows="64").content)).size == (64, 64)
    assert Image.open(io.BytesIO(wado(client, token, "JPEG2000.dcm", columns="32").content)).size == (32, 128)
    r = wado(client, token, "JPEG2000.dcm", rows="512", columns="64")
    assert Image.open(io.BytesIO(r.content)).size == (64, 256)


def test_region(client, token):
    full = pixels(wado(client, token, "MR_small.dcm", contentType="image/png"))
    part = pixels(wado(client, token, "MR_small.dcm", contentType="image/png", region="0.5,0,1,0.25"))
    assert np.array_equal(part, full[:16, 32:])


def test_window_center_and_width(client, token):
    ds = dcmread(sample_path("CT_small.dcm"))
    x = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    got = pixels(wado(client, token, "CT_small.dcm", contentType="image/png", windowCenter="40", windowWidth="400"))
    assert np.array_equal(got, ref_linear(x, 40, 400))


def test_frame_number(client, token):
    frame = dcmread(sample_path("emri_small.dcm")).pixel_array[3].astype(float)
    got = pixels(wado(client, token, "emri_small.dcm", contentType="image/png", frameNumber="4"))
    assert np.array_equal(got, ref_linear_exact(frame, (frame.min() + frame.max()) / 2, frame.max() - frame.min()))


def test_image_quality(client, token):
    low = wado(client, token, "CT_small.dcm", imageQuality="5")
    high = wado(client, token, "CT_small.dcm", imageQuality="100")
    assert low.status_code == high.status_code == 200 and len(low.content) < len(high.content)


def test_annotation_and_charset_ignored(client, token):
    assert wado(client, token, "CT_small.dcm", annotation="patient", charset="utf-8").status_code == 200


# ---- application/dicom options -----------------------------------------------------------------------------------
def test_anonymize(client, token):
    original = dcmread(sample_path("CT_small.dcm"))
    r = wado(client, token, "CT_small.dcm", contentType="application/dicom", anonymize="yes")
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
    ds = dcmread(DicomBytesIO(r.content))
    assert str(ds.PatientName) != str(original.PatientName) and ds.PatientID != original.PatientID
    assert ds.StudyInstanceUID != original.StudyInstanceUID and ds.SOPInstanceUID != original.SOPInstanceUID
    assert str(original.PatientName).encode() not in r.content
    assert np.array_equal(ds.pixel_array, original.pixel_array)
    again = dcmread(DicomBytesIO(wado(client, token, "CT_small.dcm", contentType="application/dicom",
                                      anonymize="yes").content))
    assert again.StudyInstanceUID != ds.StudyInstanceUID  # a random secret per request


def test_transfer_syntax(client, token):
    stored = wado(client, token, "CT_small.dcm", contentType="application/dicom",
                  transferSyntax="1.2.840.10008.1.2.1")
    assert stored.content == sample_bytes("CT_small.dcm")
    r = wado(client, token, "CT_small.dcm", contentType="application/dicom", transferSyntax="1.2.840.10008.1.2")
    assert r.status_code == 200, r.text
    ds = dcmread(DicomBytesIO(r.content))
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    assert np.array_equal(ds.pixel_array, dcmread(sample_path("CT_small.dcm")).pixel_array)


def test_transfer_syntax_we_cannot_produce_406(client, token):
    r = wado(client, token, "CT_small.dcm", contentType="application/dicom", transferSyntax="1.2.840.10008.1.2.4.50")
    assert r.status_code == 406  # JPEG baseline holds 8-bit samples only


# ---- errors --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params,name", [
    ({"requestType": "WADOX"}, "requestType"), ({"objectUID": "abc"}, "objectUID"), ({"rows": "0"}, "rows"),
    ({"columns": "x"}, "columns"), ({"region": "0,0,2,1"}, "region"), ({"region": "0,0,1"}, "region"),
    ({"region": "0.5,0,0.2,1"}, "region"), ({"windowCenter": "40"}, "windowWidth"),
    ({"windowCenter": "40", "windowWidth": "0"}, "windowWidth"), ({"windowCenter": "a", "windowWidth": "9"},
                                                                  "windowCenter"),
    ({"imageQuality": "0"}, "imageQuality"), ({"frameNumber": "0"}, "frameNumber"), ({"anonymize": "no"}, "anonymize"),
    ({"anonymize": "yes"}, "anonymize"), ({"transferSyntax": "1.2.840.10008.1.2"}, "transferSyntax"),
    ({"contentType": "application/dicom", "rows": "10"}, "rows"),
    ({"contentType": "application/dicom", "frameNumber": "1"}, "frameNumber"),
    ({"contentType": "image/jpeg;;q=x"}, None),
])
def test_bad_parameters_400(client, token, params, name):
    r = wado(client, token, "CT_small.dcm", **params)
    assert r.status_code == 400, r.text
    if name:
        assert name in r.json()["00000902"]["Value"][0]


def test_missing_and_repeated_parameters_400(client, token):
    study, series, sop = sample_uids("CT_small.dcm")
    for query in ({"requestType": "WADO", "studyUID": study, "seriesUID": series},
                  {"studyUID": study, "seriesUID": series, "objectUID": sop}):
        assert client.get("/wado", params=query, headers=token).status_code == 400
    query = [("requestType", "WADO"), ("studyUID", study), ("seriesUID", series), ("objectUID", sop),
             ("rows", "10"), ("rows", "20")]
    assert client.get("/wado", params=query, headers=token).status_code == 400


def test_unknown_objects_404(client, token):
    study, series, _ = sample_uids("CT_small.dcm")
    assert wado(client, token, uids=(study, series, "1.2.3.4")).status_code == 404
    assert wado(client, token, uids=("1.2.3", series, sample_uids("CT_small.dcm")[2])).status_code == 404
    assert wado(client, token, "emri_small.dcm", frameNumber="11").status_code == 404


@pytest.mark.parametrize("params", [{"contentType": "text/html"}, {"contentType": "video/mp4"},
                                    {"presentationUID": "1.2.3"}])
def test_not_acceptable_406(client, token, params):
    assert wado(client, token, "CT_small.dcm", **params).status_code == 406


def test_non_image_without_content_type_406(client, token):
    assert wado(client, token, "test-SR.dcm").status_code == 406
    assert wado(client, token, "test-SR.dcm", contentType="image/jpeg").status_code == 406


def test_tenancy_and_token(client, token, sqlite_settings):
    other = auth(make_token(sqlite_settings, tenant="site-b"))
    assert wado(client, other, "CT_small.dcm").status_code == 404
    assert wado(client, other, "CT_small.dcm", contentType="application/dicom").status_code == 404
    assert wado(client, {}, "CT_small.dcm").status_code == 401
