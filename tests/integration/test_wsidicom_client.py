"""The real `wsidicom` web client against our server under uvicorn on loopback (SQLite and PostgreSQL).

``WsiDicom.open_web`` finds the slide's instances with QIDO-RS (hex-tag filters, one SeriesInstanceUID key per
series, includefield=AvailableTransferSyntaxUID), reads each instance's metadata and then frames in the
transfer syntax AvailableTransferSyntaxUID offers (``multipart/related; type="image/jpeg"`` or
``type="image/jp2"`` with a transfer-syntax parameter), never transcoded.
"""

from __future__ import annotations

import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit
from wsidicom import WsiDicom, WsiDicomWebClient

from tests.conftest import make_token
from tests.wsidata import make_slide


def _session(live_server, settings) -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {make_token(settings)}"
    return session


def _store(live_server, settings, slide) -> None:
    client = DICOMwebClient(url=f"{live_server.url}/dicomweb", session=_session(live_server, settings))
    result = client.store_instances([dcmread(DicomBytesIO(b)) for b in slide.files.values()])
    assert len(result.ReferencedSOPSequence) == len(slide.files)


def _open(live_server, settings, slide) -> WsiDicom:
    client = WsiDicomWebClient.create_client(f"{live_server.url}/dicomweb", auth=_session(live_server, settings))
    return WsiDicom.open_web(client, slide.study_uid, slide.series_uids)


def _mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


VARIANTS = {
    "jpeg-label-series": dict(label_series=True),
    "sparse-jpeg": dict(sparse=True),
    "j2k-lossless": dict(transfer_syntax=JPEG2000Lossless),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_wsidicom_opens_and_reads_the_slide(live_server, settings, variant):
    slide = make_slide(**VARIANTS[variant])
    _store(live_server, settings, slide)
    lossless = slide.transfer_syntax == JPEG2000Lossless
    with _open(live_server, settings, slide) as wsi:
        assert [(lv.size.width, lv.size.height) for lv in wsi.levels] == slide.sizes
        for level, tiles in enumerate(slide.tiles):
            for (col, row), data in tiles.items():  # frames come back as stored, byte for byte
                encoded = wsi.read_encoded_tile(level, (col, row), crop_to_image_boundary=False)
                assert encoded.rstrip(b"\0") == data.rstrip(b"\0"), (level, col, row)
        for level, (x, y, w, h) in [(0, (100, 60, 300, 200)), (1, (10, 20, 240, 180)), (2, (0, 0, 250, 192))]:
            region = np.asarray(wsi.read_region((x, y), level, (w, h)).convert("RGB"))
            expected = slide.images[level][y:y + h, x:x + w]
            assert region.shape == expected.shape
            if lossless:
                assert np.array_equal(region, expected), level
            else:
                assert _mean_abs(region, expected) < 4, level
        label = np.asarray(wsi.read_label().convert("RGB"))
        assert label.shape == (128, 256, 3) and label[60, 100].max() < 80 and label[5, 5].min() > 200
        assert wsi.read_overview().size == (256, 256)
        thumbnail = wsi.read_thumbnail((128, 128))
        assert max(thumbnail.size) == 128


def test_wsidicom_is_offered_the_stored_transfer_syntax(live_server, settings):
    slide = make_slide(levels=1, width=256, height=256)
    _store(live_server, settings, slide)
    client = WsiDicomWebClient.create_client(f"{live_server.url}/dicomweb", auth=_session(live_server, settings))
    found = list(client.get_wsi_instances(slide.study_uid, slide.series_uids))
    assert {sop for _, sop, _ in found} == set(slide.sops.values())
    assert all(syntaxes == {JPEGBaseline8Bit} for _, _, syntaxes in found)
    assert client.is_transfer_syntax_supported(slide.study_uid, slide.series_uid, slide.sops["level0.dcm"],
                                               JPEGBaseline8Bit)
    frames = list(client.get_frames(slide.study_uid, slide.series_uid, slide.sops["level0.dcm"], [1],
                                    JPEGBaseline8Bit))
    assert frames == [slide.tiles[0][0, 0]]
