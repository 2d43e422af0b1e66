"""The pyramid core (server/dicom/wsi.py): levels, tile grids and frame numbers from DICOM JSON."""

from __future__ import annotations

import io
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.encaps import generate_frames
from pydicom.uid import JPEG2000Lossless

from server.dicom.wsi import Flavor, TiledImage, describe, tiled_image
from server.errors import ErrorKind, ServerError
from tests.dicomdata import sample_bytes
from tests.wsidata import make_slide


def _instances(files: dict[str, bytes]) -> list[tuple[str, str, dict]]:
    out = []
    for data in files.values():
        ds = dcmread(io.BytesIO(data))
        out.append((str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID),
                    ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda _: "bulk")))
    return out


def _frames(data: bytes) -> list[bytes]:
    ds = dcmread(io.BytesIO(data))
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))


@pytest.fixture(scope="module")
def full():
    return make_slide()


@pytest.fixture(scope="module")
def sparse():
    return make_slide(sparse=True)


def test_levels_sorted_highest_resolution_first(full):
    instances = _instances(full.files)
    random.Random(7).shuffle(instances)
    pyramid = describe(instances)
    assert [(lv.total_columns, lv.total_rows) for lv in pyramid.levels] == full.sizes
    assert [(lv.tiles_across, lv.tiles_down) for lv in pyramid.levels] == [(4, 3), (2, 2), (1, 1)]
    assert [lv.sop_uid for lv in pyramid.levels] == [full.sops[f"level{i}.dcm"] for i in range(3)]
    assert [i.sop_uid for i in pyramid.labels] == [full.sops["label.dcm"]]
    assert [i.sop_uid for i in pyramid.overviews] == [full.sops["overview.dcm"]]
    assert pyramid.levels[0].full and pyramid.levels[1].pixel_spacing == (0.0005, 0.0005)


@pytest.mark.parametrize("variant", ["full", "sparse"])
def test_every_tile_maps_to_the_frame_that_holds_its_bytes(variant, request):
    slide = request.getfixturevalue(variant)
    pyramid = describe(_instances(slide.files))
    for level, tiles in enumerate(slide.tiles):
        frames = _frames(slide.files[f"level{level}.dcm"])
        for (col, row), data in tiles.items():
            image, number = pyramid.tile(level, col, row)
            assert frames[number - 1] == data, (level, col, row)


def test_sparse_tile_not_stored_is_not_found(sparse):
    pyramid = describe(_instances(sparse.files))
    level0 = pyramid.levels[0]
    assert not level0.full and len(level0.positions) == 11
    with pytest.raises(ServerError) as err:
        pyramid.tile(0, 3, 2)  # left out by the test data
    assert err.value.kind is ErrorKind.NOT_FOUND and "no tile is stored" in err.value.message


@pytest.mark.parametrize("level,col,row", [(0, 4, 0), (0, 0, 3), (0, -1, 0), (1, 2, 0), (2, 0, 1), (3, 0, 0),
                                           (-1, 0, 0)])
def test_outside_the_grid_or_pyramid_is_not_found(full, level, col, row):
    pyramid = describe(_instances(full.files))
    with pytest.raises(ServerError) as err:
        pyramid.tile(level, col, row)
    assert err.value.kind is ErrorKind.NOT_FOUND


def test_jpeg2000_variant_keeps_its_transfer_syntax():
    slide = make_slide(transfer_syntax=JPEG2000Lossless, levels=2, width=300, height=200)
    pyramid = describe(_instances(slide.files))
    assert [lv.transfer_syntax_uid for lv in pyramid.levels] == [JPEG2000Lossless] * 2
    assert [(lv.tiles_across, lv.tiles_down) for lv in pyramid.levels] == [(2, 1), (1, 1)]


def test_a_series_without_whole_slide_images_is_not_found():
    with pytest.raises(ServerError) as err:
        describe(_instances({"ct": sample_bytes("CT_small.dcm")}))
    assert err.value.kind is ErrorKind.NOT_FOUND
    assert tiled_image("1.2", "1.2.840.10008.1.2.1", {"00080008": {"vr": "CS", "Value": ["ORIGINAL", "PRIMARY"]}}) \
        is None


@given(across=st.integers(1, 40), down=st.integers(1, 40), tile=st.sampled_from([1, 7, 256]),
       edge=st.integers(0, 6), data=st.data())
def test_tiled_full_frame_numbers_are_row_major(across, down, tile, edge, data):
    """PS3.3 C.7.6.17.3: TILED_FULL frames run along a row of tiles, then down the rows."""
    columns = across * tile - min(edge, tile - 1)
    image = TiledImage("1.2", "1.2", Flavor.VOLUME, 1, columns, down * tile, tile, tile, across * down, True)
    col, row = data.draw(st.integers(0, across - 1)), data.draw(st.integers(0, down - 1))
    assert image.tiles_across == across and image.tiles_down == down
    assert image.frame_number(col, row) == 1 + col + row * across
    assert image.frame_number(across, row) is None and image.frame_number(col, down) is None
