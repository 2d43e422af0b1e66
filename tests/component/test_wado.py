"""WADO-RS on the app in-process, SQLite and PostgreSQL (PS3.18 10.4)."""

from __future__ import annotations

import json

import pytest
from pydicom import dcmread

from tests.conftest import auth, make_token
from tests.dicomdata import make_instance, multipart, sample_bytes, sample_path, sample_uids

SAMPLES = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm", "emri_small.dcm", "test-SR.dcm"]
ANY_TS = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def split_multipart(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """An independent, simple multipart splitter for assertions (not the server's parser)."""
    boundary = content_type.split("boundary=")[1].split(";")[0].strip().strip('"').encode()
    parts = []
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, payload = chunk[2:].partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n") if line)
        parts.append(({k.lower(): v for k, v in headers.items()}, payload[:-2]))
    return parts


@pytest.fixture
def stored(client, settings):
    body, ctype = multipart([sample_bytes(n) for n in SAMPLES])
    r = client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype, **auth(make_token(settings))})
    assert r.status_code == 200, r.text
    return auth(make_token(settings))


@pytest.mark.parametrize("name", SAMPLES)
def test_retrieve_instance_byte_exact(client, stored, name):
    study, series, sop = sample_uids(name)
    r = client.get(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}", headers={**stored, "Accept": ANY_TS})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("multipart/related")
    [(headers, payload)] = split_multipart(r.content, r.headers["content-type"])
    assert payload == sample_bytes(name)
    ts = str(dcmread(sample_path(name), stop_before_pixels=True).file_meta.TransferSyntaxUID)
    assert headers["content-type"] == f"application/dicom; transfer-syntax={ts}"


def test_retrieve_study_and_series(client, stored):
    study, series, _ = sample_uids("CT_small.dcm")
    r = client.get(f"/dicomweb/studies/{study}", headers={**stored, "Accept": ANY_TS})
    parts = split_multipart(r.content, r.headers["content-type"])
    same_study = [n for n in SAMPLES if sample_uids(n)[0] == study]
    assert sorted(p for _, p in parts) == sorted(sample_bytes(n) for n in same_study)
    r = client.get(f"/dicomweb/studies/{study}/series/{series}", headers={**stored, "Accept": ANY_TS})
    assert len(split_multipart(r.content, r.headers["content-type"])) >= 1


@pytest.mark.parametrize("accept", [None, "*/*", 'multipart/related; type="application/dicom"',
                                    'multipart/related; type="*/*"',
                                    'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'])
def test_retrieve_accept_variants_for_stored_explicit_le(client, stored, accept):
    study, series, sop = sample_uids("CT_small.dcm")
    headers = dict(stored)
    if accept:
        headers["Accept"] = accept
    r = client.get(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}", headers=headers)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("accept", ["application/json", "image/jpeg",
                                    'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'])
def test_retrieve_not_acceptable_406(client, stored, accept):
    study, series, sop = sample_uids("CT_small.dcm")
    r = client.get(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}", headers={**stored, "Accept": accept})
    assert r.status_code == 406
    assert r.json()["00000902"]["Value"][0]


def test_retrieve_unknown_404(client, stored):
    r = client.get("/dicomweb/studies/1.2.3.999", headers={**stored, "Accept": ANY_TS})
    assert r.status_code == 404


@pytest.mark.parametrize("name", SAMPLES)
def test_instance_metadata_matches_dataset(client, stored, name):
    study, series, sop = sample_uids(name)
    r = client.get(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/metadata", headers=stored)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/dicom+json")
    [meta] = r.json()
    ds = dcmread(sample_path(name), stop_before_pixels=True)
    assert meta["00080018"]["Value"] == [sop]
    assert meta["0020000D"]["Value"] == [study]
    assert not any(k.startswith("0002") for k in meta)
    if "PatientName" in ds and ds.PatientName:
        assert meta["00100010"]["Value"][0]["Alphabetic"] == str(ds.PatientName)


def test_bulk_data_uri_resolves_to_pixel_data(client, stored):
    study, series, sop = sample_uids("CT_small.dcm")
    [meta] = client.get(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/metadata", headers=stored).json()
    uri = meta["7FE00010"]["BulkDataURI"]
    assert uri.startswith("http://testserver/dicomweb/studies/")
    r = client.get(uri, headers={**stored, "Accept": 'multipart/related; type="application/octet-stream"'})
    assert r.status_code == 200
    [(_, payload)] = split_multipart(r.content, r.headers["content-type"])
    assert payload == dcmread(sample_path("CT_small.dcm")).PixelData


def test_bulk_data_unknown_path_404(client, stored):
    study, series, sop = sample_uids("CT_small.dcm")
    r = client.get(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/bulk/00000000",
                   headers={**stored, "Accept": 'multipart/related; type="application/octet-stream"'})
    assert r.status_code == 404


def test_series_and_study_metadata(client, settings):
    token = auth(make_token(settings))
    parts = [make_instance(study="1.2.9.1", series="1.2.9.2", instance_number=i) for i in range(5)]
    parts += [make_instance(study="1.2.9.1", series="1.2.9.3", series_number=2)]
    body, ctype = multipart(parts)
    assert client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype, **token}).status_code == 200
    series = client.get("/dicomweb/studies/1.2.9.1/series/1.2.9.2/metadata", headers=token).json()
    assert [m["00200013"]["Value"][0] for m in series] == [0, 1, 2, 3, 4]
    study = client.get("/dicomweb/studies/1.2.9.1/metadata", headers=token).json()
    assert len(study) == 6


def test_metadata_gzip_etag_304_and_change(client, settings):
    token = auth(make_token(settings))
    body, ctype = multipart([make_instance(study="1.2.9.1", series="1.2.9.2")])
    client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype, **token})
    url = "/dicomweb/studies/1.2.9.1/series/1.2.9.2/metadata"
    raw = client.get(url, headers={**token, "Accept-Encoding": "gzip"})
    assert raw.headers.get("content-encoding") == "gzip"
    assert json.loads(raw.content)  # the client decoded it transparently
    etag = raw.headers["etag"]
    again = client.get(url, headers={**token, "If-None-Match": etag, "Accept-Encoding": "gzip"})
    assert again.status_code == 304 and again.content == b""
    body, ctype = multipart([make_instance(study="1.2.9.1", series="1.2.9.2")])
    client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype, **token})
    changed = client.get(url, headers={**token, "If-None-Match": etag, "Accept-Encoding": "gzip"})
    assert changed.status_code == 200 and len(changed.json()) == 2


def test_metadata_not_acceptable(client, stored):
    study, _, _ = sample_uids("CT_small.dcm")
    r = client.get(f"/dicomweb/studies/{study}/metadata", headers={**stored, "Accept": "application/dicom+xml"})
    assert r.status_code == 406


@pytest.mark.parametrize("suffix", ["/rendered", "/thumbnail"])
def test_pixel_services_answer(client, stored, suffix):
    """Rendered and thumbnail resources (tests/component/test_rendered.py has the details)."""
    study, series, sop = sample_uids("CT_small.dcm")
    r = client.get(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}{suffix}", headers=stored)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    r = client.get(f"/dicomweb/studies/1.2.3/series/4.5/instances/6.7{suffix}", headers=stored)
    assert r.status_code == 404
