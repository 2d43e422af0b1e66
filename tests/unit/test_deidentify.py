"""server.dicom.deidentify: PS3.15 Annex E de-identification, checked attribute by attribute against Table E.1-1."""

from __future__ import annotations

import datetime as dt
import io
import json
from importlib import resources

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from server.dicom.deidentify import (
    METHOD_CODES,
    Options,
    PseudonymMap,
    Pseudonymizer,
    load_profile,
    relink,
)
from server.errors import ErrorKind, ServerError

TABLE = json.loads(resources.files("server.dicom").joinpath("data/confidentiality_profile.json").read_text())
SECRET = b"test-secret-of-site-A"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
BASIC_SR = "1.2.840.10008.5.1.4.1.1.88.11"
NESTED_SECRET = "NESTED^SECRETPERSON"

# Attributes a data set cannot carry (command group 0000; file meta 0002 is checked on its own).
IN_DATASET = [a for a in TABLE["attributes"] if a["tag"][:4] not in ("0000", "0002")]


def _value(vr: str, n: int):
    """A distinctive value per VR; every string one contains SECRET so leaks are easy to find."""
    text = {
        "AE": f"SECRETAE{n}", "CS": f"SECRET{n}", "SH": f"SECRET{n}", "LO": f"SECRET LO {n}",
        "LT": f"SECRET LT {n}", "ST": f"SECRET ST {n}", "UT": f"SECRET UT {n}", "UC": f"SECRET UC {n}",
        "PN": f"SECRET^PN{n}", "UR": f"http://example.org/SECRET{n}",
        "AS": "042Y", "DA": "20010203", "DT": "20010203040506", "TM": "040506", "DS": "42.5", "IS": "42",
        "UI": f"1.2.826.0.1.3680043.10.999.{n}",
    }
    if vr in text:
        return text[vr]
    if vr in ("FL", "FD"):
        return 4.5
    if vr in ("SL", "SS", "UL", "US", "SV", "UV"):
        return 7
    if vr == "AT":
        return 0x00100010
    if vr == "SQ":
        item = Dataset()
        item.PatientName = NESTED_SECRET
        item.CodeValue = "12345"
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = "Harmless"
        return Sequence([item])
    return b"SECRETBYTES%05d" % n  # OB, OW, UN, OD, OF, OL, OV (16 bytes)


def _meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.SourceApplicationEntityTitle = "SECRETSOURCE"
    return meta


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _read(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def _everything() -> tuple[Dataset, bytes]:
    """A data set with every attribute of Table E.1-1, plus private, curve and overlay elements."""
    ds = Dataset()
    for n, attr in enumerate(IN_DATASET):
        ds.add(DataElement(int(attr["tag"], 16), attr["vr"], _value(attr["vr"], n)))
    ds.SOPClassUID = CTImageStorage
    ds.PatientName = "Mustermann^Max"
    ds.PatientID = "PID-4711"
    ds.StudyDescription = "CT Kopf Mustermann PID-4711"  # (0008,1030) X, C under Clean Descriptors
    ds.private_block(0x0009, "ACME SECRET", create=True).add_new(0x01, "LO", "SECRETPRIVATE")
    ds.ReferencedImageSequence[0].private_block(0x0011, "ACME", create=True).add_new(0x02, "LO", "SECRETDEEP")
    ds.add_new(0x50000010, "US", 2)  # curve group (retired)
    ds.add_new(0x60000010, "US", 8)  # overlay rows ... and Overlay Data
    ds.add_new(0x60003000, "OW", b"SECRETOVERLAY!!!")
    ds.file_meta = _meta(CTImageStorage, ds.SOPInstanceUID)
    return ds, _encode(ds)


def _outcomes(orig, out, mapping: PseudonymMap) -> set[str]:
    """Which PS3.15 E.1.1 actions the pair (original element, output element or None) satisfies."""
    if out is None:
        return {"X"}
    value = out.value
    if value in (None, "", b"") or (out.VR == "SQ" and len(value) == 0):
        return {"Z"}
    if out.VR == "SQ":  # kept with cleaned items: a dummy sequence, or one whose UIDs were replaced
        cleaned = all(str(item.get("PatientName", "")) != NESTED_SECRET for item in value)
        return {"D", "U", "K"} if cleaned else {"K"}
    if out.VR == "UI":
        olds = list(orig.value) if isinstance(orig.value, MultiValue) else [orig.value]
        news = list(value) if isinstance(value, MultiValue) else [value]
        if news == [mapping.uids.get(o) for o in olds] and all(u.startswith("2.25.") for u in news):
            return {"U", "D"}
        return {"K"} if news == olds else set()
    return {"K"} if value == orig.value else {"D"}


@pytest.fixture(scope="module")
def everything():
    ds, data = _everything()
    p = Pseudonymizer(SECRET)
    result = p.deidentify(data)
    return ds, result, _read(result.data), p.mapping


@pytest.mark.parametrize("attr", IN_DATASET, ids=lambda a: f"{a['tag']}-{a['keyword']}")
def test_basic_profile_action_applied(attr, everything):
    """Each Table E.1-1 row: the output shows one of the alternatives of its Basic Profile code."""
    original, _, out, mapping = everything
    tag = int(attr["tag"], 16)
    allowed = set(attr["basic"].replace("U*", "U").split("/"))
    got = _outcomes(original[tag], out.get(tag), mapping)
    if tag in (0x00100010, 0x00100020):  # Patient's Name, Patient ID: the pseudonym (a D)
        pseudonym = mapping.patients[0]
        assert str(out[tag].value) == (pseudonym.pseudonym_name if tag == 0x00100010 else pseudonym.pseudonym_id)
        return
    assert got & allowed, f"{attr['name']}: {attr['basic']} expected, output shows {got or 'the value changed oddly'}"
    assert "K" not in got or got & {"D", "U"}, f"{attr['name']} kept unchanged"


def test_nothing_identifying_reaches_the_recipient(everything):
    """No original value (marker, date, UID, private or nested one) is left anywhere in the output bytes."""
    original, result, out, mapping = everything
    data = result.data
    assert b"SECRET" not in data
    assert b"20010203" not in data and b"Mustermann" not in data and b"PID-4711" not in data
    assert b"1.2.826.0.1.3680043.10.999." not in data
    assert not any(int(t) >> 16 & 1 for t in out.keys())  # private groups gone
    assert not [t for t in out.keys() if int(t) >> 16 in (0x5000, 0x6000)]  # curve; overlay group with its data
    assert "ACME" not in str(out.ReferencedImageSequence[0])


def test_media_storage_sop_instance_uid_follows_the_sop_instance_uid(everything):
    original, result, out, mapping = everything
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID == result.sop_instance_uid
    assert out.SOPInstanceUID == mapping.uids[original.SOPInstanceUID]
    assert "SourceApplicationEntityTitle" not in out.file_meta


def test_method_is_recorded(everything):
    """PS3.15 E.1.1: Patient Identity Removed YES, method text and CID 7050 codes."""
    _, _, out, _ = everything
    assert out.PatientIdentityRemoved == "YES"
    assert [i.CodeValue for i in out.DeidentificationMethodCodeSequence] == ["113100"]
    assert out.DeidentificationMethodCodeSequence[0].CodingSchemeDesignator == "DCM"
    assert out.LongitudinalTemporalInformationModified == "REMOVED"


def test_output_is_valid_part10(everything):
    _, result, _, _ = everything
    assert result.data[128:132] == b"DICM"
    assert pydicom.dcmread(io.BytesIO(result.data)).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_profile_table_is_complete():
    """The packaged table names its edition and every code it uses is a PS3.15 action code."""
    assert TABLE["source"]["edition"] and "Table E.1-1" in TABLE["source"]["standard"]
    codes = {"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}
    assert len(TABLE["attributes"]) > 600
    for attr in TABLE["attributes"]:
        assert attr["basic"] in codes and set(attr.get("options", {}).values()) <= {"K", "C"}
    profile = load_profile()
    assert profile.rules[0x00100010].basic == "Z" and profile.rules[0x00080018].basic == "U"


# ----------------------------------------------------------------------------------------------- options

OPTION_CASES = {
    "retain_longitudinal_full_dates": Options(retain_longitudinal="full"),
    "retain_longitudinal_modified_dates": Options(retain_longitudinal="modified", date_shift_days=-100),
    "clean_descriptors": Options(clean_descriptors=True),
    "retain_patient_characteristics": Options(retain_patient_characteristics=True),
    "retain_device_identity": Options(retain_device_identity=True),
    "retain_institution_identity": Options(retain_institution_identity=True),
    "retain_uids": Options(retain_uids=True),
}


@pytest.fixture(scope="module")
def option_results():
    ds, data = _everything()
    out = {}
    for column, options in OPTION_CASES.items():
        p = Pseudonymizer(SECRET, options=options)
        out[column] = _read(p.deidentify(data).data)
    return ds, out


OPTION_ROWS = [
    (column, attr) for column in OPTION_CASES for attr in IN_DATASET if column in attr.get("options", {})
]


@pytest.mark.parametrize(
    ("column", "attr"), OPTION_ROWS, ids=[f"{c}-{a['tag']}-{a['keyword']}" for c, a in OPTION_ROWS]
)
def test_option_column_applied(column, attr, option_results):
    """Each K or C of the implemented option columns: kept, shifted or cleaned as the option says (E.3)."""
    original, results = option_results
    tag = int(attr["tag"], 16)
    out = results[column]
    assert tag in out, f"{attr['name']} removed although {column} says {attr['options'][column]}"
    before, after = original[tag], out[tag]
    if before.VR == "SQ":
        assert len(after.value) == len(before.value)
        assert all(str(i.get("PatientName", "")) != NESTED_SECRET for i in after.value)  # still cleaned inside
    elif column == "retain_longitudinal_modified_dates" and before.VR in ("DA", "DT"):
        assert after.value == "20001026" + before.value[8:]  # 2001-02-03 minus 100 days
    elif tag == 0x00081030:  # the one kept text that names the patient: cleaned (see _everything)
        assert after.value == "CT Kopf *** ***"
    else:
        assert after.value == before.value


def test_modified_dates_flag_and_codes(option_results):
    _, results = option_results
    out = results["retain_longitudinal_modified_dates"]
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    assert [i.CodeValue for i in out.DeidentificationMethodCodeSequence] == ["113100", "113107"]
    assert results["retain_longitudinal_full_dates"].LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert [i.CodeValue for i in results["clean_descriptors"].DeidentificationMethodCodeSequence] == [
        "113100", METHOD_CODES["clean_descriptors"][0]]


def test_clean_descriptors_removes_the_identity_from_kept_text(option_results):
    _, results = option_results
    assert results["clean_descriptors"].StudyDescription == "CT Kopf *** ***"
    assert "StudyDescription" not in results["retain_uids"]  # X without the option


def test_derived_date_shift_is_fixed_by_the_secret_and_kept_in_the_map():
    ds, data = _everything()
    a = Pseudonymizer(SECRET, options=Options(retain_longitudinal="modified"))
    b = Pseudonymizer(SECRET, options=Options(retain_longitudinal="modified"))
    out = _read(a.deidentify(data).data)
    assert a.mapping.date_shift_days == b.mapping.date_shift_days < 0
    expected = dt.date(2001, 2, 3) + dt.timedelta(days=a.mapping.date_shift_days)
    assert out.StudyDate == expected.strftime("%Y%m%d")


# ------------------------------------------------------------------------------------- studies and replies


def _study() -> tuple[list[Dataset], list[bytes]]:
    """Two CT images in two series and a KOS referencing both (PS3.3 A.35.4, Evidence Sequence)."""
    study, frame = generate_uid(), generate_uid()
    series = [generate_uid(), generate_uid(), generate_uid()]
    datasets = []
    for i in range(2):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series[i], frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Mustermann^Erika", "4711", "19640812"
        ds.StudyDate, ds.AccessionNumber, ds.Modality = "20260101", "ACC1", "CT"
        datasets.append(ds)
    kos = Dataset()
    kos.SOPClassUID, kos.SOPInstanceUID = KOS, generate_uid()
    kos.StudyInstanceUID, kos.SeriesInstanceUID = study, series[2]
    kos.PatientName, kos.PatientID, kos.Modality = "Mustermann^Erika", "4711", "KO"
    kos.CurrentRequestedProcedureEvidenceSequence = Sequence([Dataset()])
    evidence = kos.CurrentRequestedProcedureEvidenceSequence[0]
    evidence.StudyInstanceUID = study
    evidence.ReferencedSeriesSequence = Sequence()
    for ds in datasets:
        ref_series = Dataset()
        ref_series.SeriesInstanceUID = ds.SeriesInstanceUID
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        ref_series.ReferencedSOPSequence = Sequence([ref])
        evidence.ReferencedSeriesSequence.append(ref_series)
    datasets.append(kos)
    for ds in datasets:
        ds.file_meta = _meta(ds.SOPClassUID, ds.SOPInstanceUID)
    return datasets, [_encode(ds) for ds in datasets]


def test_uids_are_consistent_across_a_study():
    originals, blobs = _study()
    p = Pseudonymizer(SECRET)
    results = [p.deidentify(b) for b in blobs]
    outs = [_read(r.data) for r in results]
    assert len({o.StudyInstanceUID for o in outs}) == 1 and outs[0].StudyInstanceUID != originals[0].StudyInstanceUID
    assert outs[0].FrameOfReferenceUID == outs[1].FrameOfReferenceUID
    assert len({o.PatientID for o in outs}) == 1 and outs[0].PatientID.startswith("PSN-")
    evidence = outs[2].CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == outs[0].StudyInstanceUID
    refs = [(s.SeriesInstanceUID, s.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            for s in evidence.ReferencedSeriesSequence]
    assert refs == [(o.SeriesInstanceUID, o.SOPInstanceUID) for o in outs[:2]]
    assert all(r.sop_instance_uid == o.file_meta.MediaStorageSOPInstanceUID for r, o in zip(results, outs))
    assert all(uid.startswith("2.25.") and len(uid) <= 64 for uid in p.mapping.uids.values())


def test_same_secret_gives_the_same_result_and_another_secret_does_not():
    _, blobs = _study()
    a, b, c = Pseudonymizer(SECRET), Pseudonymizer(SECRET), Pseudonymizer(b"another secret")
    assert [a.deidentify(x).data for x in blobs] == [b.deidentify(x).data for x in blobs]
    assert a.mapping == b.mapping
    assert c.deidentify(blobs[0]).sop_instance_uid not in a.mapping.uids.values()


def test_explicit_pseudonym_and_retain_uids():
    _, blobs = _study()
    p = Pseudonymizer(SECRET, patient_name="TELE^CONSULT", patient_id="TC-0001", options=Options(retain_uids=True))
    out = _read(p.deidentify(blobs[0]).data)
    original = _read(blobs[0])
    assert (str(out.PatientName), out.PatientID) == ("TELE^CONSULT", "TC-0001")
    assert out.SOPInstanceUID == original.SOPInstanceUID and p.mapping.uids == {}
    assert [i.CodeValue for i in out.DeidentificationMethodCodeSequence] == ["113100", "113110"]


def test_relink_round_trip():
    originals, blobs = _study()
    p = Pseudonymizer(SECRET)
    sent = [p.deidentify(b).data for b in blobs]
    mapping = PseudonymMap.from_json(json.loads(json.dumps(p.mapping.to_json())))
    assert mapping == p.mapping
    for original, data in zip(originals, sent):
        back = _read(relink(data, mapping))
        for kw in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientName", "PatientID"):
            assert str(back[kw].value) == str(original[kw].value), kw
        assert back.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
        assert back.PatientIdentityRemoved == "NO" and "DeidentificationMethodCodeSequence" not in back
    kos = _read(relink(sent[2], mapping))
    assert kos.CurrentRequestedProcedureEvidenceSequence == originals[2].CurrentRequestedProcedureEvidenceSequence


def test_relink_of_a_reply_keeps_its_own_uids():
    """A report made at B references the pseudonymised study; at A it points at the original one."""
    originals, blobs = _study()
    p = Pseudonymizer(SECRET)
    sent = _read(p.deidentify(blobs[0]).data)
    reply = Dataset()
    reply.SOPClassUID, reply.SOPInstanceUID, reply.SeriesInstanceUID = BASIC_SR, generate_uid(), generate_uid()
    reply.StudyInstanceUID, reply.PatientName, reply.PatientID = sent.StudyInstanceUID, sent.PatientName, sent.PatientID
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = CTImageStorage, sent.SOPInstanceUID
    reply.CurrentRequestedProcedureEvidenceSequence = Sequence([Dataset()])
    reply.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSOPSequence = Sequence([ref])
    reply.file_meta = _meta(BASIC_SR, reply.SOPInstanceUID)
    back = _read(relink(_encode(reply), p.mapping))
    assert back.SOPInstanceUID == reply.SOPInstanceUID and back.SeriesInstanceUID == reply.SeriesInstanceUID
    assert back.StudyInstanceUID == originals[0].StudyInstanceUID
    assert (str(back.PatientName), back.PatientID) == ("Mustermann^Erika", "4711")
    item = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSOPSequence[0]
    assert item.ReferencedSOPInstanceUID == originals[0].SOPInstanceUID


# ------------------------------------------------------------------------------------ pixels and errors


def test_real_ct_pixel_data_untouched():
    path = get_testdata_file("CT_small.dcm")
    with open(path, "rb") as fh:
        data = fh.read()
    result = Pseudonymizer(SECRET).deidentify(data)
    before, after = pydicom.dcmread(path), _read(result.data)
    assert after.PixelData == before.PixelData
    assert not any(int(t) >> 16 & 1 for t in after.keys())
    assert not result.burned_in_annotation


@pytest.mark.parametrize(
    ("sop_class", "burned_in", "flag"),
    [(SC_IMAGE, None, True), (SC_IMAGE, "NO", False), (CTImageStorage, "YES", True), (CTImageStorage, None, False)],
)
def test_burned_in_annotation_flag(sop_class, burned_in, flag):
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    if burned_in:
        ds.BurnedInAnnotation = burned_in
    ds.file_meta = _meta(sop_class, ds.SOPInstanceUID)
    result = Pseudonymizer(SECRET).deidentify(_encode(ds))
    assert result.burned_in_annotation is flag
    assert _read(result.data).get("BurnedInAnnotation") == burned_in


@pytest.mark.parametrize("data", [b"", b"not dicom at all", b"\x00" * 128 + b"DICM" + b"\x02\x00"])
def test_unreadable_input_is_invalid(data):
    with pytest.raises(ServerError) as info:
        Pseudonymizer(SECRET).deidentify(data)
    assert info.value.kind is ErrorKind.INVALID


def test_bad_options_and_secret_are_invalid():
    with pytest.raises(ServerError):
        Options(retain_longitudinal="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ServerError):
        Pseudonymizer(b"")
