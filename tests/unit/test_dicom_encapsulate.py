"""server.dicom.encapsulate: Encapsulated PDF instances (PS3.3 A.45.1, C.24.2) and FHIR Attachments as PDFs."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from server.dicom.encapsulate import (
    ENCAPSULATED_PDF_STORAGE,
    RADIOLOGY_REPORT,
    StudyContext,
    encapsulated_pdf,
    extract_pdf,
    pdf_from_fhir_attachment,
    study_context_from,
)
from server.dicom.attributes import Level
from server.dicom.parse import parse_part10
from server.errors import ErrorKind, ServerError
from tests.dicomdata import make_instance

ODD_PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
assert len(ODD_PDF) % 2 == 1
BIG_PDF = b"%PDF-1.7\n" + b"% Befund: Rundherd im rechten Oberlappen\n" * 100 + b"%%EOF\r\n"  # even, > 1024: bulk
WHEN = dt.datetime(2024, 3, 5, 14, 30, 15)

# Type 1 and Type 2 attributes of the modules encapsulated_pdf fills (PS3.3 A.45.1)
TYPE_1 = ["SOPClassUID", "SOPInstanceUID", "SpecificCharacterSet",  # C.12.1 (0008,0005) is 1C: non-ASCII
          "StudyInstanceUID",  # C.7.2.1
          "Modality", "SeriesInstanceUID", "SeriesNumber",  # C.24.1
          "ConversionType",  # C.8.6.1
          "InstanceNumber", "BurnedInAnnotation", "MIMETypeOfEncapsulatedDocument", "EncapsulatedDocument"]  # C.24.2
TYPE_2 = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex",  # C.7.1.1
          "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",  # C.7.2.1
          "Manufacturer",  # C.7.5.1
          "ContentDate", "ContentTime", "AcquisitionDateTime", "DocumentTitle", "ConceptNameCodeSequence"]  # C.24.2


@pytest.fixture
def study_bytes() -> bytes:
    return make_instance(patient_name="Müller-Lüdenscheidt^Jürgen", patient_id="PID-ÄÖ-1", accession="ACC-9",
                         StudyDescription="CT Thorax nativ", ReferringPhysicianName="Größe^Anna")


def test_study_context_from_an_instance(study_bytes):
    ds = dcmread(io.BytesIO(study_bytes))
    ctx = study_context_from(study_bytes)
    assert ctx == StudyContext(
        study_uid=ds.StudyInstanceUID, patient_name="Müller-Lüdenscheidt^Jürgen", patient_id="PID-ÄÖ-1",
        patient_birth_date="19600101", patient_sex="M", study_date="20240115", study_time="101500",
        accession_number="ACC-9", referring_physician_name="Größe^Anna", study_id="1",
        study_description="CT Thorax nativ")


def test_study_context_decodes_other_character_sets():
    data = make_instance(SpecificCharacterSet="ISO_IR 100", patient_name="Weiß^Jörg")
    assert b"Wei\xdf^J\xf6rg" in data  # Latin-1 on the wire
    ctx = study_context_from(data)
    assert ctx.patient_name == "Weiß^Jörg"
    out = encapsulated_pdf(ODD_PDF, study=ctx, title="Befund")
    assert "Weiß^Jörg".encode() in out  # re-encoded as UTF-8 (ISO_IR 192)


def test_round_trip_with_umlauts_and_odd_length(study_bytes):
    ctx = study_context_from(study_bytes)
    out = encapsulated_pdf(ODD_PDF, study=ctx, title="Befund: Röntgen Thorax – Größenprogredienz",
                           content_datetime=WHEN)
    assert extract_pdf(out) == ODD_PDF
    ds = dcmread(io.BytesIO(out))
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert ds.file_meta.MediaStorageSOPClassUID == ENCAPSULATED_PDF_STORAGE
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "Müller-Lüdenscheidt^Jürgen" and ds.PatientID == "PID-ÄÖ-1"
    assert str(ds.ReferringPhysicianName) == "Größe^Anna"
    assert ds.DocumentTitle == "Befund: Röntgen Thorax – Größenprogredienz"
    assert "Müller-Lüdenscheidt^Jürgen".encode() in out
    assert len(ds.EncapsulatedDocument) == len(ODD_PDF) + 1 and ds.EncapsulatedDocument.endswith(b"\x00")
    assert ds.EncapsulatedDocumentLength == len(ODD_PDF)
    assert study_context_from(out) == ctx  # the report belongs to the same patient and study


def test_the_iod_attributes_are_present(study_bytes):
    ctx = study_context_from(study_bytes)
    ds = dcmread(io.BytesIO(encapsulated_pdf(BIG_PDF, study=ctx, title="Befund", content_datetime=WHEN)))
    for keyword in TYPE_1:
        assert keyword in ds and ds[keyword].value not in (None, "", b""), keyword
    for keyword in TYPE_2:
        assert keyword in ds, keyword
    assert ds.SOPClassUID == ENCAPSULATED_PDF_STORAGE and ds.Modality == "DOC"
    assert ds.SeriesNumber == 9001 and ds.SeriesDescription == "Befund / Report" and ds.InstanceNumber == 1
    assert ds.StudyInstanceUID == ctx.study_uid
    assert ds.SeriesInstanceUID != dcmread(io.BytesIO(study_bytes)).SeriesInstanceUID
    assert ds.AccessionNumber == "ACC-9" and ds.StudyID == "1" and ds.StudyDescription == "CT Thorax nativ"
    assert ds.BurnedInAnnotation == "YES" and ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert (ds.ContentDate, ds.ContentTime) == ("20240305", "143015")
    code = ds.ConceptNameCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("18748-4", "LN",
                                                                              "Diagnostic Imaging Report")
    assert ds["EncapsulatedDocument"].VR == "OB" and ds["EncapsulatedDocumentLength"].VR == "UL"
    assert len(BIG_PDF) % 2 == 0  # no padding
    assert ds.EncapsulatedDocument == BIG_PDF and ds.EncapsulatedDocumentLength == len(BIG_PDF)


def test_our_parser_accepts_it(study_bytes, tmp_path):
    ctx = study_context_from(study_bytes)
    sop, series = generate_uid(), generate_uid()
    path = tmp_path / "report.dcm"
    path.write_bytes(encapsulated_pdf(BIG_PDF, study=ctx, title="Befund", sop_uid=sop, series_uid=series,
                                      instance_number=3, concept=RADIOLOGY_REPORT))
    parsed = parse_part10(path)
    assert (parsed.sop_class_uid, parsed.sop_instance_uid, parsed.study_uid, parsed.series_uid) == (
        ENCAPSULATED_PDF_STORAGE, sop, ctx.study_uid, series)
    assert parsed.warnings == ()
    assert parsed.columns[Level.STUDY]["patient_name"] == "Müller-Lüdenscheidt^Jürgen"
    assert parsed.columns[Level.SERIES]["modality"] == "DOC"
    assert "00420011" in parsed.bulk  # the PDF is bulk data, served by WADO-RS
    offset, length = parsed.bulk["00420011"]
    assert path.read_bytes()[offset:offset + length] == BIG_PDF
    assert '"11528-7"' in parsed.meta


def test_optional_study_values_and_empty_type_2():
    ctx = StudyContext(study_uid=generate_uid())
    ds = dcmread(io.BytesIO(encapsulated_pdf(ODD_PDF, study=ctx, title="Befund")))
    assert ds.PatientName == "" and ds.PatientID == "" and ds.AccessionNumber == ""
    assert "StudyDescription" not in ds and "IssuerOfPatientID" not in ds
    assert ds.ContentDate  # now, when not given


@pytest.mark.filterwarnings("ignore:The value length")  # pydicom, reading it back
def test_copied_values_stay_verbatim():
    """A PACS's non-conforming Patient ID (LO > 64) must still match at the receiver."""
    ctx = StudyContext(study_uid=generate_uid(), patient_id="X" * 80, issuer_of_patient_id="KIS Klinikum")
    ds = dcmread(io.BytesIO(encapsulated_pdf(ODD_PDF, study=ctx, title="Befund")))
    assert ds.PatientID == "X" * 80 and ds.IssuerOfPatientID == "KIS Klinikum"


@pytest.mark.parametrize("kwargs, message", [
    ({"pdf": b"<html>no pdf</html>"}, "not a PDF"),
    ({"title": "  "}, "needs a document title"),
    ({"title": "x" * 1025}, "at most 1024"),
    ({"sop_uid": "1.2.abc"}, "not a valid UID"),
    ({"study": StudyContext(study_uid="")}, "no valid Study Instance UID"),
    ({"instance_number": 0}, "IS value"),
], ids=["not-pdf", "empty-title", "long-title", "bad-uid", "no-study", "instance-number"])
def test_encapsulation_refuses_bad_input(kwargs, message):
    args = {"pdf": ODD_PDF, "study": StudyContext(study_uid=generate_uid()), "title": "Befund", **kwargs}
    pdf = args.pop("pdf")
    with pytest.raises(ServerError) as err:
        encapsulated_pdf(pdf, **args)
    assert err.value.kind is ErrorKind.INVALID and message in err.value.message


def test_extract_without_length_strips_the_padding():
    ds = dcmread(io.BytesIO(encapsulated_pdf(ODD_PDF, study=StudyContext(generate_uid()), title="Befund")))
    del ds.EncapsulatedDocumentLength
    buf = io.BytesIO()
    ds.save_as(buf)
    assert extract_pdf(buf.getvalue()) == ODD_PDF


def test_extract_honours_the_length():
    ds = dcmread(io.BytesIO(encapsulated_pdf(ODD_PDF, study=StudyContext(generate_uid()), title="Befund")))
    ds.EncapsulatedDocument = ODD_PDF + b"trailing junk\x00"
    buf = io.BytesIO()
    ds.save_as(buf)
    assert extract_pdf(buf.getvalue()) == ODD_PDF
    ds.EncapsulatedDocumentLength = 10_000
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(ServerError, match="does not fit"):
        extract_pdf(buf.getvalue())


@pytest.mark.parametrize("data, kind", [
    (b"garbage", ErrorKind.INVALID),
    (make_instance(), ErrorKind.UNSUPPORTED),
], ids=["garbage", "ct-image"])
def test_extract_refuses_other_data(data, kind):
    with pytest.raises(ServerError) as err:
        extract_pdf(data)
    assert err.value.kind is kind


def test_study_context_refuses_garbage():
    with pytest.raises(ServerError) as err:
        study_context_from(b"\x00" * 200)
    assert err.value.kind is ErrorKind.INVALID


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("attachment", [
    {"contentType": "application/pdf", "data": _b64(ODD_PDF)},
    {"contentType": "application/pdf; charset=binary", "data": _b64(ODD_PDF), "title": "Befund"},
    {"contentType": "Application/PDF", "data": "\n".join(_b64(ODD_PDF)[i:i + 16] for i in range(0, 80, 16))
     + "\n" + _b64(ODD_PDF)[80:]},
    {"contentType": "application/pdf", "data": _b64(ODD_PDF), "size": len(ODD_PDF),
     "hash": _b64(hashlib.sha1(ODD_PDF).digest()), "url": "https://ehr.example/Binary/1"},
], ids=["plain", "parameter", "wrapped-base64", "size-and-hash"])
def test_pdf_from_fhir_attachment(attachment):
    assert pdf_from_fhir_attachment(attachment) == ODD_PDF


@pytest.mark.parametrize("attachment, message", [
    ({"contentType": "text/plain", "data": _b64(b"Befund")}, "contentType is 'text/plain'"),
    ({"data": _b64(ODD_PDF)}, "contentType is 'absent'"),
    ({"contentType": "application/pdf"}, "has no data"),
    ({"contentType": "application/pdf", "url": "https://ehr.example/Binary/1"}, "by url only"),
    ({"contentType": "application/pdf", "data": _b64(b"<html></html>")}, "not a PDF"),
    ({"contentType": "application/pdf", "data": "***"}, "not valid base64"),
    ({"contentType": "application/pdf", "data": _b64(ODD_PDF), "size": 3}, "size 3 does not match"),
    ({"contentType": "application/pdf", "data": _b64(ODD_PDF), "hash": _b64(b"x" * 20)}, "hash (SHA-1)"),
    ("not an object", "not a FHIR Attachment"),
], ids=["text", "no-type", "no-data", "url-only", "not-pdf", "bad-base64", "size", "hash", "not-dict"])
def test_pdf_from_fhir_attachment_refuses(attachment, message):
    with pytest.raises(ServerError) as err:
        pdf_from_fhir_attachment(attachment)
    assert err.value.kind is ErrorKind.INVALID and message in err.value.message


def test_fhir_pdf_into_dicom_and_back(study_bytes):
    pdf = pdf_from_fhir_attachment({"contentType": "application/pdf", "data": _b64(BIG_PDF)})
    out = encapsulated_pdf(pdf, study=study_context_from(study_bytes), title="Befund aus dem KIS")
    assert extract_pdf(out) == BIG_PDF
