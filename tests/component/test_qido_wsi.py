"""QIDO-RS as wsidicom's web client uses it, on the app in-process (SQLite and PostgreSQL).

wsidicom searches a study's instances with hex-tag filters (SOPClassUID, SeriesInstanceUID given once per
series, Modality) and ``includefield=AvailableTransferSyntaxUID``, and picks the transfer syntax to ask frames
in from AvailableTransferSyntaxUID (0008,3002) (PS3.18 10.6.3.3, Table 10.6.3-5).
"""

from __future__ import annotations

import pytest
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, VLWholeSlideMicroscopyImageStorage

from tests.conftest import auth, make_token
from tests.dicomdata import make_instance
from tests.wsidata import make_slide, stow

JSON = {"Accept": "application/dicom+json"}


@pytest.fixture
def headers(settings):
    return {**auth(make_token(settings)), **JSON}


@pytest.fixture
def slide(client, headers):
    slide = make_slide(label_series=True)
    stow(client, headers, list(slide.files.values()))
    # a CT instance in the same study: the filters must leave it out
    stow(client, headers, [make_instance(study=slide.study_uid, modality="CT")])
    return slide


def _values(item: dict, tag: str) -> list:
    return item.get(tag, {}).get("Value", [])


def test_instances_as_wsidicom_searches_them(client, headers, slide):
    query = [("00080016", VLWholeSlideMicroscopyImageStorage), ("00080060", "SM"),
             ("0020000E", slide.series_uid), ("0020000E", slide.label_series_uid),
             ("includefield", "AvailableTransferSyntaxUID")]
    r = client.get(f"/dicomweb/studies/{slide.study_uid}/instances", params=query, headers=headers)
    assert r.status_code == 200, r.text
    items = r.json()
    assert {_values(i, "00080018")[0] for i in items} == set(slide.sops.values())
    for item in items:
        assert _values(item, "00083002") == [JPEGBaseline8Bit]
        assert _values(item, "0020000E")[0] in slide.series_uids


def test_one_series_filter_leaves_the_label_series_out(client, headers, slide):
    query = {"00080016": VLWholeSlideMicroscopyImageStorage, "0020000E": slide.series_uid, "00080060": "SM"}
    r = client.get(f"/dicomweb/studies/{slide.study_uid}/instances", params=query, headers=headers)
    found = {_values(i, "00080018")[0] for i in r.json()}
    assert found == {sop for name, sop in slide.sops.items() if name != "label.dcm"}


def test_repeated_uid_key_is_a_list_but_other_keys_are_refused(client, headers, slide):
    r = client.get(f"/dicomweb/studies/{slide.study_uid}/instances",
                   params=[("00080060", "SM"), ("00080060", "CT")], headers=headers)
    assert r.status_code == 400
    r = client.get(f"/dicomweb/studies/{slide.study_uid}/instances",
                   params=[("0020000E", slide.series_uid), ("SeriesInstanceUID", "1.2.3")], headers=headers)
    assert r.status_code == 200
    assert len(r.json()) == 4  # three levels and the overview; "1.2.3" matches nothing


def test_series_level_available_transfer_syntaxes_and_hex_filters(client, headers, slide):
    j2k = make_slide(transfer_syntax=JPEG2000Lossless, levels=1, width=256, height=256)
    stow(client, headers, list(j2k.files.values()))
    r = client.get("/dicomweb/series", params={"00080060": "SM", "includefield": "00083002"}, headers=headers)
    by_series = {_values(i, "0020000E")[0]: i for i in r.json()}
    assert set(by_series) == {slide.series_uid, slide.label_series_uid, j2k.series_uid}
    assert _values(by_series[j2k.series_uid], "00083002") == [JPEG2000Lossless]
    assert _values(by_series[slide.series_uid], "00083002") == [JPEGBaseline8Bit]
    r = client.get("/dicomweb/studies", params={"00080061": "SM", "0020000D": slide.study_uid}, headers=headers)
    assert [_values(i, "0020000D")[0] for i in r.json()] == [slide.study_uid]
    assert set(_values(r.json()[0], "00080061")) == {"CT", "SM"}


def test_includefield_hex_tags_of_wsi_attributes(client, headers, slide):
    query = {"00080060": "SM", "includefield": "00480006,00480007,00209311,00080008"}
    r = client.get(f"/dicomweb/studies/{slide.study_uid}/series/{slide.series_uid}/instances", params=query,
                   headers=headers)
    level0 = next(i for i in r.json() if _values(i, "00080018")[0] == slide.sops["level0.dcm"])
    assert _values(level0, "00480006") == [1000] and _values(level0, "00480007") == [768]
    assert _values(level0, "00209311") == ["TILED_FULL"]
    assert _values(level0, "00080008")[2] == "VOLUME"
