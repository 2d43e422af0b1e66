"""WADO-RS frames on the app in-process (PS3.18 10.4.1.1.6, 8.7.3): stored syntax, transcoding, Range, 406."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from functools import lru_cache
from io import BytesIO

from pydicom import dcmread
from pydicom.encaps import generate_frames
from pydicom.uid import generate_uid

from tests.component.test_wado import split_multipart
from tests.conftest import auth, make_token
from tests.dicomdata import multipart, sample_path

FILES = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm",
         "SC_rgb_rle_2frame.dcm", "SC_rgb_jpeg_gdcm.dcm", "SC_rgb_jpeg_dcmtk.dcm", "emri_small.dcm",
         "emri_small_jpeg_ls_lossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEGLSNearLossless_08.dcm",
         "SC_rgb_dcmtk_+eb+cy+s2.dcm", "liver.dcm", "US1_J2KR.dcm", "JPEG-LL.dcm", "color3d_jpeg_baseline.dcm",
         "SC_rgb_2frame.dcm", "test-SR.dcm"]
OCTET_ANY = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


@lru_cache(maxsize=None)
def prepared(name: str) -> bytes:
    """A bundled file with UIDs of its own (several bundled files share UIDs); stored bytes as they were."""
    ds = dcmread(sample_path(name))
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[name, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[name, "series"])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[name, "sop"])
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def dataset(name: str):
    return dcmread(BytesIO(prepared(name)))


def sample_uids(name: str) -> tuple[str, str, str]:
    ds = dataset(name)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


@pytest.fixture
def client(sqlite_settings):
    from server.app import create_app

    app = create_app(sqlite_settings)
    with TestClient(app, base_url="http://testserver") as c:
        token = auth(make_token(sqlite_settings))
        body, ctype = multipart([prepared(n) for n in FILES])
        r = c.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype, **token})
        assert r.status_code == 200, r.text
        c.headers.update(token)
        yield c
    app.state.engine.dispose()


def url(name: str, frames: str) -> str:
    study, series, sop = sample_uids(name)
    return f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/{frames}"


def stored_frames(name: str) -> list[bytes]:
    """The stored bytes of each frame, cut by pydicom (independent of the server)."""
    ds = dataset(name)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return list(generate_frames(ds.PixelData, number_of_frames=n))
    size = len(ds.PixelData) // n if ds.BitsAllocated != 1 else None
    return [ds.PixelData[i * size:(i + 1) * size] for i in range(n)] if size else []


def frames_of(r) -> list[tuple[dict[str, str], bytes]]:
    assert r.status_code in (200, 206), r.text
    return split_multipart(r.content, r.headers["content-type"])


@pytest.mark.parametrize("name", [n for n in FILES if n not in ("test-SR.dcm", "liver.dcm", "MR_small.dcm")])
@pytest.mark.parametrize("accept", [OCTET_ANY, 'multipart/related; type="*/*"', "*/*", None])
def test_stored_syntax_frames_byte_exact(client, name, accept):
    expected = stored_frames(name)
    numbers = list(range(1, len(expected) + 1))[::-1]
    headers = {"Accept": accept} if accept else {}
    parts = frames_of(client.get(url(name, ",".join(map(str, numbers))), headers=headers))
    assert [p for _, p in parts] == [expected[n - 1] for n in numbers]
    ts = str(dataset(name).file_meta.TransferSyntaxUID)
    for headers_, _ in parts:
        assert headers_["content-type"].endswith(f"transfer-syntax={ts}")
