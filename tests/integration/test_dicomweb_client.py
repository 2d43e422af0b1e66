"""The real `dicomweb-client` against our server under uvicorn on loopback, SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO

from tests.conftest import make_token
from tests.dicomdata import make_instance, sample_bytes, sample_path, sample_uids

SAMPLES = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm", "emri_small.dcm",
           "SC_rgb_jpeg_dcmtk.dcm", "test-SR.dcm", "rtplan.dcm"]


def _client(live_server, settings, tenant="site-a", scope="system/*.cruds") -> DICOMwebClient:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {make_token(settings, tenant, scope)}"
    return DICOMwebClient(url=f"{live_server.url}/dicomweb", session=session)


def _datasets(names):
    return [dcmread(sample_path(n)) for n in names]


@pytest.fixture
def dw(live_server, settings):
    client = _client(live_server, settings)
    result = client.store_instances(_datasets(SAMPLES))
    assert len(result.ReferencedSOPSequence) == len(SAMPLES)
    extra = [make_instance(study="1.2.826.0.9.1", series="1.2.826.0.9.2", patient_name="Meyer^Hans",
                           patient_id="P-MEYER", study_date="20230301", study_time="083000", modality="MR",
                           accession="A-77", instance_number=i) for i in range(3)]
    extra.append(make_instance(study="1.2.826.0.9.5", patient_name="Müller^Jürgen", patient_id="P-MUELLER",
                               study_date="20240610", study_time="141500"))
    client.store_instances([dcmread(DicomBytesIO(b)) for b in extra])
    return client


def _study_uids(results) -> set[str]:
    return {r["0020000D"]["Value"][0] for r in results}


@pytest.mark.parametrize("name", SAMPLES)
def test_retrieve_byte_exact(dw, name):
    study, series, sop = sample_uids(name)
    ds = dw.retrieve_instance(study, series, sop, media_types=(("application/dicom", "*"),))
    original = dcmread(sample_path(name))
    assert ds.SOPInstanceUID == sop
    assert ds.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    if "PixelData" in original:
        assert ds.PixelData == original.PixelData


def test_retrieve_raw_bytes_equal(live_server, settings, dw):
    study, series, sop = sample_uids("JPEG2000.dcm")
    r = requests.get(f"{live_server.url}/dicomweb/studies/{study}/series/{series}/instances/{sop}",
                     headers={"Authorization": f"Bearer {make_token(settings)}",
                              "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert sample_bytes("JPEG2000.dcm") in r.content


def test_search_all_studies(dw):
    studies = dw.search_for_studies()
    assert _study_uids(studies) >= {sample_uids(n)[0] for n in SAMPLES} | {"1.2.826.0.9.1", "1.2.826.0.9.5"}
    for s in studies:
        assert "00081190" in s and "00201208" in s and "00201206" in s


@pytest.mark.parametrize("filters,expected", [
    ({"PatientID": "P-MEYER"}, {"1.2.826.0.9.1"}),
    ({"00100020": "P-MEYER"}, {"1.2.826.0.9.1"}),  # hex tag, as wsidicom sends
    ({"PatientName": "meyer*"}, {"1.2.826.0.9.1"}),  # case-insensitive wildcard
    ({"PatientName": "M?yer^Hans"}, {"1.2.826.0.9.1"}),
    ({"PatientName": "müller*"}, {"1.2.826.0.9.5"}),
    ({"PatientName": "mueller^juergen"}, {"1.2.826.0.9.5"}),  # umlaut folding
    ({"StudyDate": "20230101-20231231"}, {"1.2.826.0.9.1"}),
    ({"StudyDate": "20240610", "StudyTime": "140000-150000"}, {"1.2.826.0.9.5"}),
    ({"AccessionNumber": "A-77"}, {"1.2.826.0.9.1"}),
    ({"StudyInstanceUID": "1.2.826.0.9.1,1.2.826.0.9.5"}, {"1.2.826.0.9.1", "1.2.826.0.9.5"}),
    ({"StudyInstanceUID": "1.2.826.0.9.1\\1.2.826.0.9.5"}, {"1.2.826.0.9.1", "1.2.826.0.9.5"}),
    ({"ModalitiesInStudy": "MR", "PatientID": "P-MEYER"}, {"1.2.826.0.9.1"}),
])
def test_search_matching(dw, filters, expected):
    assert _study_uids(dw.search_for_studies(search_filters=filters)) == expected


def test_fuzzy_matching(dw):
    found = dw.search_for_studies(search_filters={"PatientName": "Maier"}, fuzzymatching=True)
    assert "1.2.826.0.9.1" in _study_uids(found)
    assert "1.2.826.0.9.1" not in _study_uids(dw.search_for_studies(search_filters={"PatientName": "Maier"}))


def test_includefield_and_paging(dw):
    page1 = dw.search_for_studies(limit=2, offset=0)
    page2 = dw.search_for_studies(limit=2, offset=2)
    assert len(page1) == 2 and len(page2) == 2
    assert _study_uids(page1).isdisjoint(_study_uids(page2))
    with_desc = dw.search_for_studies(search_filters={"PatientID": "P-MEYER"}, fields=["StudyDescription"])
    assert with_desc[0]["00081030"]["Value"] == ["CT Thorax"]


def test_series_and_instances_levels(dw):
    series = dw.search_for_series("1.2.826.0.9.1")
    assert [s["0020000E"]["Value"][0] for s in series] == ["1.2.826.0.9.2"]
    assert series[0]["00201209"]["Value"] == [3]
    assert series[0]["00083002"]["Value"] == ["1.2.840.10008.1.2.1"]
    instances = dw.search_for_instances("1.2.826.0.9.1", "1.2.826.0.9.2")
    assert [i["00200013"]["Value"][0] for i in instances] == [0, 1, 2]
    assert all(i["00083002"]["Value"] == ["1.2.840.10008.1.2.1"] for i in instances)
    mr = dw.search_for_series(search_filters={"Modality": "MR", "PatientID": "P-MEYER"})
    assert len(mr) == 1


def test_metadata_and_bulkdata(dw):
    study, series, sop = sample_uids("CT_small.dcm")
    meta = dw.retrieve_instance_metadata(study, series, sop)
    uri = meta["7FE00010"]["BulkDataURI"]
    data = dw.retrieve_bulkdata(uri)
    assert data[0] == dcmread(sample_path("CT_small.dcm")).PixelData
    series_meta = dw.retrieve_series_metadata("1.2.826.0.9.1", "1.2.826.0.9.2")
    assert len(series_meta) == 3
    study_meta = dw.retrieve_study_metadata(study)
    assert any(m["00080018"]["Value"] == [sop] for m in study_meta)


def test_bad_query_is_400_with_message(live_server, settings, dw):
    r = requests.get(f"{live_server.url}/dicomweb/studies", params={"NoSuchKeyword": "x"},
                     headers={"Authorization": f"Bearer {make_token(settings)}"})
    assert r.status_code == 400
    assert "NoSuchKeyword" in r.text


def test_other_tenant_finds_nothing(live_server, settings, dw):
    other = _client(live_server, settings, tenant="site-b")
    assert other.search_for_studies() == []
    study, series, sop = sample_uids("CT_small.dcm")
    with pytest.raises(requests.HTTPError) as err:
        other.retrieve_instance(study, series, sop)
    assert err.value.response.status_code == 404
