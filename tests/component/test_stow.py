"""STOW-RS on the app in-process, SQLite and PostgreSQL (PS3.18 10.5)."""

from __future__ import annotations

import pytest

from server.config import DuplicatePolicy, Settings
from tests.conftest import auth, make_token
from tests.dicomdata import make_instance, multipart, sample_bytes, sample_path, sample_uids

REFERENCED = "00081199"
FAILED = "00081198"


def _seq(body: dict, tag: str) -> list[dict]:
    return body.get(tag, {}).get("Value", [])


def _reasons(body: dict) -> list[int]:
    return [item["00081197"]["Value"][0] for item in _seq(body, FAILED)]


def _post(client, settings, parts, url="/dicomweb/studies", **kw):
    body, ctype = multipart(parts, **kw)
    return client.post(url, content=body, headers={"Content-Type": ctype, **auth(make_token(settings))})


def test_store_samples_multipart_200(client, settings):
    names = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm", "emri_small.dcm", "test-SR.dcm"]
    r = _post(client, settings, [sample_bytes(n) for n in names])
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/dicom+json")
    refs = _seq(r.json(), REFERENCED)
    assert [i["00081155"]["Value"][0] for i in refs] == [sample_uids(n)[2] for n in names]
    for item, name in zip(refs, names):
        study, series, sop = sample_uids(name)
        assert item["00081190"]["Value"][0] == f"http://testserver/dicomweb/studies/{study}/series/{series}/instances/{sop}"
    assert FAILED not in r.json()


@pytest.mark.parametrize("quoted", [True, False])
def test_boundary_quoted_and_unquoted(client, settings, quoted):
    r = _post(client, settings, [make_instance()], quoted=quoted, boundary="a-b_c.d=e" if quoted else "abc123")
    assert r.status_code == 200, r.text


def test_part_with_transfer_syntax_parameter(client, settings):
    r = _post(client, settings, [make_instance()], part_type="application/dicom; transfer-syntax=1.2.840.10008.1.2.1")
    assert r.status_code == 200, r.text


def test_single_part_application_dicom(client, settings):
    r = client.post("/dicomweb/studies", content=sample_bytes("CT_small.dcm"),
                    headers={"Content-Type": "application/dicom", **auth(make_token(settings))})
    assert r.status_code == 200, r.text
    assert len(_seq(r.json(), REFERENCED)) == 1


def test_bad_parts_fail_alone_202(client, settings):
    good = make_instance()
    parts = [good, sample_bytes("no_meta.dcm"), sample_bytes("MR_truncated.dcm"), b"not dicom at all"]
    r = _post(client, settings, parts)
    assert r.status_code == 202, r.text
    assert len(_seq(r.json(), REFERENCED)) == 1
    assert _reasons(r.json()) == [0xC000, 0xC000, 0xC000]
    for item in _seq(r.json(), FAILED):
        assert item["0040A160"]["Value"][0]  # a clear message per failed part
    q = client.get("/dicomweb/instances", headers=auth(make_token(settings)))
    assert q.status_code == 200 and len(q.json()) == 1


def test_missing_uids_fail(client, settings):
    from pydicom import dcmread
    import io

    ds = dcmread(io.BytesIO(make_instance()))
    del ds.SeriesInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf)
    r = _post(client, settings, [buf.getvalue()])
    assert r.status_code in (400, 409)
    assert "SeriesInstanceUID" in _seq(r.json(), FAILED)[0]["0040A160"]["Value"][0]


def test_all_bad_400(client, settings):
    r = _post(client, settings, [b"garbage", sample_bytes("no_meta.dcm")])
    assert r.status_code == 400
    assert _reasons(r.json()) == [0xC000, 0xC000]


def test_study_uid_mismatch_409(client, settings):
    r = _post(client, settings, [make_instance(study="1.2.3.4")], url="/dicomweb/studies/1.2.3.5")
    assert r.status_code == 409
    assert _reasons(r.json()) == [0xA900]


def test_study_url_keeps_matching_parts(client, settings):
    parts = [make_instance(study="1.2.3.4"), make_instance(study="1.2.3.9")]
    r = _post(client, settings, parts, url="/dicomweb/studies/1.2.3.4")
    assert r.status_code == 202
    assert len(_seq(r.json(), REFERENCED)) == 1 and _reasons(r.json()) == [0xA900]


def test_duplicate_identical_is_idempotent(client, settings):
    data = make_instance()
    assert _post(client, settings, [data]).status_code == 200
    r = _post(client, settings, [data, data])
    assert r.status_code == 200, r.text
    q = client.get("/dicomweb/instances", headers=auth(make_token(settings)))
    assert len(q.json()) == 1


def test_duplicate_with_other_bytes_is_refused(client, settings):
    first = make_instance(sop="1.2.826.0.1.1", study="1.2.826.0.1.2", series="1.2.826.0.1.3", patient_id="A")
    second = make_instance(sop="1.2.826.0.1.1", study="1.2.826.0.1.2", series="1.2.826.0.1.3", patient_id="B")
    assert _post(client, settings, [first]).status_code == 200
    r = _post(client, settings, [second])
    assert r.status_code == 409
    assert _reasons(r.json()) == [0x0111]
    assert "already stored" in _seq(r.json(), FAILED)[0]["0040A160"]["Value"][0]
    meta = client.get("/dicomweb/studies/1.2.826.0.1.2/metadata", headers=auth(make_token(settings))).json()
    assert meta[0]["00100020"]["Value"] == ["A"]


def test_duplicate_replace_policy(tmp_path, database_url):
    from fastapi.testclient import TestClient

    from server.app import create_app

    settings = Settings(data_dir=tmp_path / "d", database_url=database_url, duplicate_policy=DuplicatePolicy.REPLACE)
    app = create_app(settings)
    with TestClient(app) as client:
        uids = dict(sop="1.2.826.0.1.1", study="1.2.826.0.1.2", series="1.2.826.0.1.3")
        assert _post(client, settings, [make_instance(patient_id="A", **uids)]).status_code == 200
        r = _post(client, settings, [make_instance(patient_id="B", **uids)])
        assert r.status_code == 202
        assert _seq(r.json(), REFERENCED)[0]["00081196"]["Value"] == [0xB000]
        meta = client.get("/dicomweb/studies/1.2.826.0.1.2/metadata", headers=auth(make_token(settings))).json()
        assert len(meta) == 1 and meta[0]["00100020"]["Value"] == ["B"]
    app.state.engine.dispose()


def test_series_in_other_study_is_refused(client, settings):
    assert _post(client, settings, [make_instance(study="1.2.3.1", series="1.2.3.100")]).status_code == 200
    r = _post(client, settings, [make_instance(study="1.2.3.2", series="1.2.3.100")])
    assert r.status_code == 409
    assert _reasons(r.json()) == [0xA900]


@pytest.mark.parametrize("ctype", ["application/json", "multipart/related; type=\"application/dicom+json\"; boundary=x",
                                   "text/plain", None])
def test_unsupported_media_type_415(client, settings, ctype):
    headers = auth(make_token(settings))
    if ctype:
        headers["Content-Type"] = ctype
    r = client.post("/dicomweb/studies", content=b"{}", headers=headers)
    assert r.status_code == 415


def test_part_of_other_media_type_fails_alone(client, settings):
    body, ctype = multipart([make_instance()])
    boundary = ctype.split("boundary=")[1].strip('"')
    extra = f"--{boundary}\r\nContent-Type: text/plain\r\n\r\nhello\r\n".encode()
    r = client.post("/dicomweb/studies", content=extra + body,
                    headers={"Content-Type": ctype, **auth(make_token(settings))})
    assert r.status_code == 202
    assert _reasons(r.json()) == [0xC000]


def test_truncated_multipart_keeps_complete_parts(client, settings):
    body, ctype = multipart([make_instance(), make_instance()])
    cut = body[: len(body) - 200]  # the second part is cut and the close delimiter missing
    r = client.post("/dicomweb/studies", content=cut, headers={"Content-Type": ctype, **auth(make_token(settings))})
    assert r.status_code == 202, r.text
    assert len(_seq(r.json(), REFERENCED)) == 1
    assert _reasons(r.json()) == [0xC000]


def test_empty_multipart_400(client, settings):
    r = client.post("/dicomweb/studies", content=b"--x--\r\n",
                    headers={"Content-Type": "multipart/related; type=\"application/dicom\"; boundary=x",
                             **auth(make_token(settings))})
    assert r.status_code == 400


def test_multipart_without_boundary_400(client, settings):
    r = client.post("/dicomweb/studies", content=b"",
                    headers={"Content-Type": "multipart/related; type=\"application/dicom\"", **auth(make_token(settings))})
    assert r.status_code == 400


def test_request_over_limit_413(tmp_path):
    from fastapi.testclient import TestClient

    from server.app import create_app

    settings = Settings(data_dir=tmp_path / "d", max_stow_bytes=1000)
    app = create_app(settings)
    with TestClient(app) as client:
        body, ctype = multipart([make_instance()])
        r = client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype, **auth(make_token(settings))})
        assert r.status_code == 413
    app.state.engine.dispose()


def test_part_over_limit_fails_alone(tmp_path):
    from fastapi.testclient import TestClient

    from server.app import create_app

    settings = Settings(data_dir=tmp_path / "d", max_part_bytes=4000)
    app = create_app(settings)
    with TestClient(app) as client:
        body, ctype = multipart([make_instance(size=8), make_instance(size=64)])
        r = client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype, **auth(make_token(settings))})
        assert r.status_code == 202, r.text
        assert _reasons(r.json()) == [0xA700]
    app.state.engine.dispose()


def test_blob_is_content_addressed_and_durable(client, settings):
    data = sample_bytes("CT_small.dcm")
    assert _post(client, settings, [data]).status_code == 200
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    path = settings.data_dir / "blobs" / digest[:2] / digest[2:4] / digest
    assert path.read_bytes() == data
    assert not list((settings.data_dir / "tmp").iterdir())


def test_index_failure_stores_nothing(client, settings, monkeypatch):
    from server.errors import ErrorKind, ServerError

    def boom(*a, **k):
        raise ServerError(ErrorKind.INTERNAL, "simulated crash before the index commit")

    monkeypatch.setattr(client.app.state.archive, "index_batch", boom)
    r = _post(client, settings, [make_instance()])
    assert r.status_code == 500
    assert "correlation id" in r.text and "simulated" not in r.text
    monkeypatch.undo()
    assert client.get("/dicomweb/instances", headers=auth(make_token(settings))).status_code == 204


def test_sample_path_available():
    assert sample_path("CT_small.dcm").exists()


def test_image_cut_before_pixel_data_fails(client, settings):
    data = make_instance()
    cut = data[: data.rindex(b"\xe0\x7f\x10\x00")]  # the file ends right before the Pixel Data element
    r = _post(client, settings, [cut])
    assert r.status_code == 400
    assert "Pixel Data" in _seq(r.json(), FAILED)[0]["0040A160"]["Value"][0]


def test_blobs_are_synced_before_the_index_commits(client, settings, monkeypatch):
    import hashlib

    calls = []
    blobs, archive = client.app.state.stow.blobs, client.app.state.archive
    real_sync, real_index = blobs.sync, archive.index_batch
    monkeypatch.setattr(blobs, "sync", lambda digests: (calls.append(("sync", sorted(digests))), real_sync(digests))[1])
    monkeypatch.setattr(archive, "index_batch", lambda *a, **k: (calls.append(("index", None)), real_index(*a, **k))[1])
    parts = [make_instance(), make_instance()]
    assert _post(client, settings, parts).status_code == 200
    assert calls == [("sync", sorted(hashlib.sha256(p).hexdigest() for p in parts)), ("index", None)]
