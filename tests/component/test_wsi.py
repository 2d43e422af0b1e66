"""The tile endpoint and pyramid description on the app in-process (SQLite and PostgreSQL)."""

from __future__ import annotations

import io

import pytest
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless

from tests.conftest import auth, make_token
from tests.dicomdata import make_instance
from tests.wsidata import make_slide, stow


@pytest.fixture
def headers(settings):
    return auth(make_token(settings))


def _tiles(slide) -> str:
    return f"/dicomweb/studies/{slide.study_uid}/series/{slide.series_uid}/tiles"


@pytest.mark.parametrize("variant", [{}, {"sparse": True}, {"transfer_syntax": JPEG2000Lossless}],
                         ids=["tiled-full-jpeg", "tiled-sparse-jpeg", "tiled-full-j2k"])
def test_every_tile_is_served_byte_exact_with_its_media_type(client, headers, variant):
    slide = make_slide(**variant)
    stow(client, headers, list(slide.files.values()))
    media = "image/jp2" if variant.get("transfer_syntax") else "image/jpeg"
    for level, tiles in enumerate(slide.tiles):
        for (col, row), data in tiles.items():
            r = client.get(f"{_tiles(slide)}/{level}/{col}/{row}", headers=headers)
            assert r.status_code == 200, (level, col, row, r.text)
            assert r.content == data, (level, col, row)
            assert r.headers["content-type"] == media
            assert "immutable" in r.headers["cache-control"]


def test_outside_the_grid_missing_sparse_tiles_and_unknown_series_are_404(client, headers):
    slide = make_slide(sparse=True)
    stow(client, headers, list(slide.files.values()))
    for level, col, row in [(0, 4, 0), (0, 0, 3), (0, -1, 0), (1, 2, 2), (3, 0, 0), (-1, 0, 0),
                            (0, 3, 2)]:  # (0, 3, 2): inside the grid, left out of the sparse level
        r = client.get(f"{_tiles(slide)}/{level}/{col}/{row}", headers=headers)
        assert r.status_code == 404, (level, col, row)
        assert r.json()["00000902"]["Value"][0]
    r = client.get(f"/dicomweb/studies/{slide.study_uid}/series/1.2.3/tiles/0/0/0", headers=headers)
    assert r.status_code == 404


def test_a_series_without_slides_is_404_and_tenants_do_not_see_each_other(client, headers, settings):
    ct = make_instance(study="1.2.826.0.9.70", series="1.2.826.0.9.71")
    stow(client, headers, [ct])
    r = client.get("/dicomweb/studies/1.2.826.0.9.70/series/1.2.826.0.9.71/tiles/0/0/0", headers=headers)
    assert r.status_code == 404
    slide = make_slide(levels=1, width=256, height=256)
    stow(client, headers, list(slide.files.values()))
    other = auth(make_token(settings, tenant="site-b"))
    assert client.get(f"{_tiles(slide)}/0/0/0", headers=other).status_code == 404
    assert client.get(f"{_tiles(slide)}/0/0/0").status_code == 401


def test_etag_and_if_none_match(client, headers):
    slide = make_slide(levels=1, width=512, height=256)
    stow(client, headers, list(slide.files.values()))
    first = client.get(f"{_tiles(slide)}/0/1/0", headers=headers)
    etag = first.headers["etag"]
    assert etag != client.get(f"{_tiles(slide)}/0/0/0", headers=headers).headers["etag"]
    again = client.get(f"{_tiles(slide)}/0/1/0", headers={**headers, "If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    assert client.get(f"{_tiles(slide)}/0/1/0", headers={**headers, "If-None-Match": '"other"'}).status_code == 200


def test_pyramid_description_and_associated_images(client, headers):
    slide = make_slide()
    stow(client, headers, list(slide.files.values()))
    r = client.get(_tiles(slide), headers=headers)
    assert r.status_code == 200
    body = r.json()
    assert [(lv["width"], lv["height"]) for lv in body["levels"]] == slide.sizes
    assert [(lv["columns"], lv["rows"]) for lv in body["levels"]] == [(4, 3), (2, 2), (1, 1)]
    assert body["levels"][0]["mediaType"] == "image/jpeg" and body["levels"][0]["sparse"] is False
    assert [i["sopInstanceUID"] for i in body["labels"]] == [slide.sops["label.dcm"]]
    label = client.get(f"{_tiles(slide)}/label", headers=headers)
    assert label.status_code == 200 and label.content[:2] == b"\xff\xd8"
    assert label.headers["content-type"] == "image/jpeg"
    assert client.get(f"{_tiles(slide)}/overview", headers=headers).status_code == 200
    assert client.get(f"{_tiles(slide)}/thumbnail", headers=headers).status_code == 404  # none stored


def test_a_new_level_stored_later_is_seen(client, headers):
    slide = make_slide()
    files = dict(slide.files)
    level2 = files.pop("level2.dcm")
    stow(client, headers, list(files.values()))
    assert client.get(f"{_tiles(slide)}/2/0/0", headers=headers).status_code == 404
    stow(client, headers, [level2])
    r = client.get(f"{_tiles(slide)}/2/0/0", headers=headers)
    assert r.status_code == 200 and r.content == slide.tiles[2][0, 0]


def test_a_replaced_level_is_served_once_the_series_is_checked_again(settings):
    """The pyramid cache follows the series' revision (duplicate policy ``replace``), checked at most once per
    ``recheck_seconds``; the ETag follows the blob."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.config import DuplicatePolicy

    app = create_app(settings.model_copy(update={"duplicate_policy": DuplicatePolicy.REPLACE}))
    headers = auth(make_token(settings))
    first, second = make_slide(levels=2, seed=1), make_slide(levels=2, seed=2)
    ds = dcmread(io.BytesIO(second.files["level0.dcm"]))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = first.study_uid, first.series_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = first.sops["level0.dcm"]
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    replacement = out.getvalue()
    try:
        with TestClient(app) as client:
            stow(client, headers, [first.files["level0.dcm"], first.files["level1.dcm"]])
            url = f"{_tiles(first)}/0/1/1"
            old = client.get(url, headers=headers)
            assert old.content == first.tiles[0][1, 1]
            r = client.post("/dicomweb/studies", content=replacement,
                            headers={"Content-Type": "application/dicom", **headers})
            assert r.status_code in (200, 202), r.text
            assert client.get(url, headers=headers).content == old.content  # within the second: cached
            app.state.wsi.recheck_seconds = 0
            new = client.get(url, headers=headers)
            assert new.content == second.tiles[0][1, 1] != old.content
            assert new.headers["etag"] != old.headers["etag"]
    finally:
        app.state.engine.dispose()
