"""Frames, transcoded instances and bulk data Range with the real dicomweb-client against uvicorn (PS3.18 10.4)."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.encaps import generate_frames
from pydicom.uid import generate_uid
from requests.exceptions import HTTPError

from server.config import Settings
from tests.conftest import LiveServer, _free_port, make_token
from tests.dicomdata import sample_path

FILES = ["CT_small.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm",
         "SC_rgb_rle_2frame.dcm", "SC_rgb_jpeg_gdcm.dcm", "SC_rgb_jpeg_dcmtk.dcm", "emri_small_jpeg_ls_lossless.dcm",
         "emri_small.dcm", "US1_J2KR.dcm"]
HTJ2K = "1.2.840.10008.1.2.4.201"


def _own_uids(ds, name: str):
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[name, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[name, "series"])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[name, "sop"])
    return ds


def dataset(name: str):
    """A bundled file with UIDs of its own; "HTJ2K" is the JPEG 2000 multi-frame file labelled as HTJ2K."""
    if name == "HTJ2K":
        ds = dcmread(sample_path("emri_small_jpeg_2k_lossless.dcm"))
        ds.file_meta.TransferSyntaxUID = HTJ2K  # a Part 1 codestream: served as stored, decodable by OpenJPEG
    else:
        ds = dcmread(sample_path(name))
    return _own_uids(ds, name)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from server.app import create_app

    port = _free_port()
    settings = Settings(data_dir=tmp_path_factory.mktemp("frames-client") / "data", gateway_worker=False,
                        public_base_url=f"http://127.0.0.1:{port}")
    app = create_app(settings)
    with LiveServer(app, port) as live:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {make_token(settings)}"
        client = DICOMwebClient(url=f"{live.url}/dicomweb", session=session)
        stored = client.store_instances([dataset(n) for n in [*FILES, "HTJ2K"]])
        assert len(stored.ReferencedSOPSequence) == len(FILES) + 1
        yield client, session, live.url
    app.state.engine.dispose()


def uids(name: str) -> tuple[str, str, str]:
    ds = dataset(name)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def frame_count(name: str) -> int:
    return int(dataset(name).get("NumberOfFrames", 1) or 1)


def stored_frames(name: str) -> list[bytes]:
    ds = dataset(name)
    n = frame_count(name)
    if ds.file_meta.TransferSyntaxUID.is_compressed or name == "HTJ2K":
        return list(generate_frames(ds.PixelData, number_of_frames=n))
    size = len(ds.PixelData) // n
    return [ds.PixelData[i * size:(i + 1) * size] for i in range(n)]


def original(name: str, k: int = 1) -> np.ndarray:
    arr = dcmread(sample_path("emri_small_jpeg_2k_lossless.dcm" if name == "HTJ2K" else name)).pixel_array
    return arr if frame_count(name) == 1 else arr[k - 1]


@pytest.mark.parametrize("name", FILES)
def test_default_accept_is_any_type_stored_syntax(server, name):
    client, _, _ = server
    numbers = list(range(1, frame_count(name) + 1))
    frames = client.retrieve_instance_frames(*uids(name), frame_numbers=numbers)  # type="*/*"
    assert frames == stored_frames(name)


@pytest.mark.parametrize("name", FILES)
def test_octet_stream_any_transfer_syntax_is_stored(server, name):
    client, _, _ = server
    frames = client.retrieve_instance_frames(*uids(name), frame_numbers=[1],
                                             media_types=(("application/octet-stream", "*"),))
    assert frames == stored_frames(name)[:1]


@pytest.mark.parametrize("name", FILES)
def test_octet_stream_default_is_native_explicit_le(server, name):
    client, _, _ = server
    k = frame_count(name)
    [frame] = client.retrieve_instance_frames(*uids(name), frame_numbers=[k],
                                              media_types=("application/octet-stream",))
    ref = original(name, k)
    assert np.array_equal(np.frombuffer(frame, ref.dtype.newbyteorder("<")).reshape(ref.shape), ref)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_RLE.dcm", "SC_rgb_rle_2frame.dcm"])
@pytest.mark.parametrize("media", [("image/jp2", "1.2.840.10008.1.2.4.90"), ("image/jls", "1.2.840.10008.1.2.4.80")])
def test_transcoded_lossless_frames(server, name, media):
    import jpeg_ls
    import openjpeg

    client, _, _ = server
    [frame] = client.retrieve_instance_frames(*uids(name), frame_numbers=[1], media_types=(media,))
    decoded = openjpeg.decode(frame) if media[0] == "image/jp2" else jpeg_ls.decode(np.frombuffer(frame, np.uint8))
    ref = original(name)
    assert np.array_equal(decoded.reshape(ref.shape).astype(ref.dtype), ref)


def test_jpeg_baseline_from_lossless_jpeg(server):
    from PIL import Image

    client, _, _ = server
    [frame] = client.retrieve_instance_frames(*uids("SC_rgb_jpeg_gdcm.dcm"), frame_numbers=[1],
                                              media_types=(("image/jpeg", "*"),))
    assert b"\xff\xc0" in frame and b"\xff\xc3" not in frame  # baseline, never the stored lossless JPEG
    decoded = np.asarray(Image.open(BytesIO(frame)).convert("RGB")).astype(float)
    mse = np.mean((decoded - original("SC_rgb_jpeg_gdcm.dcm").astype(float)) ** 2)
    assert 10 * np.log10(255 ** 2 / mse) > 30


def test_image_jpeg_of_16_bit_is_406(server):
    client, _, _ = server
    with pytest.raises(HTTPError) as err:
        client.retrieve_instance_frames(*uids("CT_small.dcm"), frame_numbers=[1], media_types=("image/jpeg",))
    assert err.value.response.status_code == 406


def test_htj2k_stored_and_406(server):
    """image/jphc (dicomweb-client has no HTJ2K media type yet: plain requests)."""
    _, session, base = server
    study, series, sop = uids("HTJ2K")
    url = f"{base}/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/2"
    r = session.get(url, headers={"Accept": 'multipart/related; type="image/jphc"'})
    assert r.status_code == 200 and f"transfer-syntax={HTJ2K}" in r.text[:400]
    assert stored_frames("HTJ2K")[1] in r.content
    study, series, sop = uids("CT_small.dcm")
    r = session.get(f"{base}/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/1",
                    headers={"Accept": 'multipart/related; type="image/jphc"'})
    assert r.status_code == 406


def test_retrieve_instance_in_another_transfer_syntax(server):
    client, _, _ = server
    ds = client.retrieve_instance(*uids("JPEG2000.dcm"), media_types=(("application/dicom", "1.2.840.10008.1.2.1"),))
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert np.array_equal(ds.pixel_array, original("JPEG2000.dcm"))
    series = client.retrieve_series(*uids("SC_rgb_rle_2frame.dcm")[:2],
                                    media_types=(("application/dicom", "1.2.840.10008.1.2.4.80"),))
    assert [s.file_meta.TransferSyntaxUID for s in series] == ["1.2.840.10008.1.2.4.80"]
    assert np.array_equal(series[0].pixel_array, dcmread(sample_path("SC_rgb_rle_2frame.dcm")).pixel_array)


def test_bulkdata_with_byte_range(server):
    client, _, base = server
    study, series, sop = uids("CT_small.dcm")
    url = f"{base}/dicomweb/studies/{study}/series/{series}/instances/{sop}/bulk/7FE00010"
    value = dataset("CT_small.dcm").PixelData
    assert client.retrieve_bulkdata(url) == [value]
    assert client.retrieve_bulkdata(url, media_types=("application/octet-stream",), byte_range=(16, 47)) == \
        [value[16:48]]
