"""Encapsulated PDF instances: a report PDF wrapped as DICOM to travel with a study, and unwrapped again.

PS3.3 A.45.1 Encapsulated PDF IOD: Patient (C.7.1.1), General Study (C.7.2.1), Encapsulated Document
Series (C.24.1), General Equipment (C.7.5.1), SC Equipment (C.8.6.1), Encapsulated Document (C.24.2) and
SOP Common (C.12.1) modules; PS3.10 7.1 file meta information; PS3.5 A.2 Explicit VR Little Endian.
FHIR R4 Attachment (datatypes.html#Attachment) for PDFs that come from the EHR's DiagnosticReport.

Decisions:

* The patient and study attributes are copied verbatim from an instance of the study (``StudyContext``):
  the receiving site files the report under the same patient and study only when they match exactly,
  so copied values are not re-validated against their VRs (a PACS's over-long Patient ID stays as is).
  Text is written in ISO_IR 192 (UTF-8), so any source character set and umlauts survive.
* The report is a new series (Series Number 9001, "Befund / Report", Modality DOC) with new UIDs unless
  the caller gives them (a resend keeps its UIDs). Conversion Type WSD (workstation), Burned In
  Annotation YES (a report names the patient), concept name CID 7000 LOINC 18748-4 "Diagnostic Imaging
  Report" (or e.g. :data:`RADIOLOGY_REPORT`).
* Encapsulated Document (0042,0011) is padded to even length with one NUL (PS3.5 7.1); Encapsulated
  Document Length (0042,0015) holds the unpadded length, and :func:`extract_pdf` honours it (without it,
  one trailing NUL is taken as padding: a PDF ends with "%%EOF" and an end-of-line marker).
* A PDF must start with ``%PDF-`` (ISO 32000-1 7.5.2 file header); anything else is INVALID.

Pure: bytes in, bytes out; the clock is read only when no content date/time is given.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import io
from dataclasses import dataclass

from pydicom import config, dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from server.dicom.kos import Code
from server.dicom.parse import is_valid_uid
from server.errors import ErrorKind, ServerError

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"  # PS3.4 B.5 Standard SOP Classes
PDF_MEDIA_TYPE = "application/pdf"
PDF_MAGIC = b"%PDF-"  # ISO 32000-1 7.5.2
CHARACTER_SET = "ISO_IR 192"  # PS3.3 C.12.1.1.2: Unicode in UTF-8
MODALITY = "DOC"  # PS3.3 C.24.1: Document
CONVERSION_TYPE = "WSD"  # PS3.3 C.8.6.1: Workstation
SERIES_NUMBER = 9001
SERIES_DESCRIPTION = "Befund / Report"
MANUFACTURER = "telerad-bridge"
MAX_TITLE = 1024  # Document Title (0042,0010) is ST: 1024 characters (PS3.5 6.2)

# PS3.16 CID 7000 Diagnostic Imaging Report Document Title (LOINC)
DIAGNOSTIC_IMAGING_REPORT = Code("18748-4", "LN", "Diagnostic Imaging Report")
RADIOLOGY_REPORT = Code("11528-7", "LN", "Radiology Report")

# A FHIR Attachment's contentType parameters (";charset=...") do not change the type (RFC 2045 5.1)
_FHIR_PDF_TYPES = frozenset({PDF_MEDIA_TYPE, "application/x-pdf"})


@dataclass(frozen=True)
class StudyContext:
    """Patient and study attributes a new instance of the study repeats (PS3.3 C.7.1.1, C.7.2.1).

    Text as decoded Unicode (PN in its DICOM string form "Family^Given=Ideographic=Phonetic"); dates and
    times in their DICOM forms (DA YYYYMMDD, TM HHMMSS.FFFFFF); '' for an empty Type 2 value.
    """

    study_uid: str
    patient_name: str = ""
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    referring_physician_name: str = ""
    study_id: str = ""
    study_description: str = ""


# (StudyContext field, keyword, VR, DICOM type: 1/2 written even when empty, 3 only when given)
_CONTEXT_ELEMENTS: tuple[tuple[str, str, str, str], ...] = (
    ("patient_name", "PatientName", "PN", "2"),
    ("patient_id", "PatientID", "LO", "2"),
    ("issuer_of_patient_id", "IssuerOfPatientID", "LO", "3"),
    ("patient_birth_date", "PatientBirthDate", "DA", "2"),
    ("patient_sex", "PatientSex", "CS", "2"),
    ("study_uid", "StudyInstanceUID", "UI", "1"),
    ("study_date", "StudyDate", "DA", "2"),
    ("study_time", "StudyTime", "TM", "2"),
    ("accession_number", "AccessionNumber", "SH", "2"),
    ("referring_physician_name", "ReferringPhysicianName", "PN", "2"),
    ("study_id", "StudyID", "SH", "2"),
    ("study_description", "StudyDescription", "LO", "3"),
)


def study_context_from(data: bytes) -> StudyContext:
    """The patient and study attributes of any Part 10 instance of the study (PS3.3 C.7.1.1, C.7.2.1)."""
    ds = _read(data, "instance", stop_before_pixels=True)
    values = {}
    for name, keyword, _vr, _type in _CONTEXT_ELEMENTS:
        try:
            value = ds.get(keyword)
        except (ValueError, TypeError, LookupError) as exc:
            raise _invalid(f"the instance's {keyword} cannot be decoded") from exc
        values[name] = "" if value is None else str(value).rstrip(" \x00")
    study_uid = values.pop("study_uid").strip()
    if not study_uid or not is_valid_uid(study_uid):
        raise _invalid("the instance lacks a valid Study Instance UID (0020,000D)")
    return StudyContext(study_uid=study_uid, **values)


def encapsulated_pdf(pdf: bytes, *, study: StudyContext, title: str, series_uid: str | None = None,
                     sop_uid: str | None = None, content_datetime: dt.datetime | None = None,
                     instance_number: int = 1, series_number: int = SERIES_NUMBER,
                     series_description: str = SERIES_DESCRIPTION,
                     concept: Code = DIAGNOSTIC_IMAGING_REPORT) -> bytes:
    """A Part 10 Encapsulated PDF instance in the given study (PS3.3 A.45.1, C.24.2; PS3.10 7.1)."""
    _check_pdf(pdf, "the report")
    if not title.strip():
        raise _invalid("an Encapsulated PDF needs a document title")
    if len(title) > MAX_TITLE or "\\" in title:
        raise _invalid(f"the document title must be at most {MAX_TITLE} characters without backslashes")
    if not is_valid_uid(study.study_uid):
        raise _invalid("the study context has no valid Study Instance UID")
    series_uid = series_uid or generate_uid()
    sop_uid = sop_uid or generate_uid()
    for name, uid in (("Series Instance UID", series_uid), ("SOP Instance UID", sop_uid)):
        if not is_valid_uid(uid):
            raise _invalid(f"{name} is not a valid UID: {uid[:80]!r}")
    if not 1 <= instance_number < 2**31 or not 0 <= series_number < 2**31:
        raise _invalid("instance and series numbers must fit an IS value")
    when = content_datetime or dt.datetime.now().astimezone()
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    # SOP Common (C.12.1)
    _put(ds, "SpecificCharacterSet", "CS", CHARACTER_SET)
    _put(ds, "InstanceCreationDate", "DA", date)
    _put(ds, "InstanceCreationTime", "TM", time)
    _put(ds, "SOPClassUID", "UI", ENCAPSULATED_PDF_STORAGE)
    _put(ds, "SOPInstanceUID", "UI", sop_uid)
    # Patient (C.7.1.1) and General Study (C.7.2.1), verbatim
    for name, keyword, vr, kind in _CONTEXT_ELEMENTS:
        value = getattr(study, name)
        if value or kind != "3":
            _put(ds, keyword, vr, value)
    # Encapsulated Document Series (C.24.1)
    _put(ds, "Modality", "CS", MODALITY)
    _put(ds, "SeriesInstanceUID", "UI", series_uid)
    _put(ds, "SeriesNumber", "IS", str(series_number))
    if series_description:
        _put(ds, "SeriesDescription", "LO", series_description)
    # General Equipment (C.7.5.1) and SC Equipment (C.8.6.1)
    _put(ds, "Manufacturer", "LO", MANUFACTURER)
    _put(ds, "ConversionType", "CS", CONVERSION_TYPE)
    # Encapsulated Document (C.24.2)
    _put(ds, "InstanceNumber", "IS", str(instance_number))
    _put(ds, "ContentDate", "DA", date)
    _put(ds, "ContentTime", "TM", time)
    _put(ds, "AcquisitionDateTime", "DT", "")
    _put(ds, "BurnedInAnnotation", "CS", "YES")
    _put(ds, "DocumentTitle", "ST", title)
    code = Dataset()
    _put(code, "CodeValue", "SH", concept.value)
    _put(code, "CodingSchemeDesignator", "SH", concept.scheme)
    _put(code, "CodeMeaning", "LO", concept.meaning)
    ds.ConceptNameCodeSequence = DicomSequence([code])
    _put(ds, "MIMETypeOfEncapsulatedDocument", "LO", PDF_MEDIA_TYPE)
    _put(ds, "EncapsulatedDocument", "OB", pdf + b"\x00" if len(pdf) % 2 else pdf)
    _put(ds, "EncapsulatedDocumentLength", "UL", len(pdf))

    buf = io.BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=True)
    except (ValueError, TypeError, UnicodeError, OverflowError) as exc:
        raise _invalid("the Encapsulated PDF could not be encoded from the study context") from exc
    return buf.getvalue()


def extract_pdf(data: bytes) -> bytes:
    """The PDF inside a Part 10 Encapsulated PDF instance (PS3.3 C.24.2; Encapsulated Document Length)."""
    ds = _read(data, "Encapsulated PDF instance")
    mime = str(ds.get("MIMETypeOfEncapsulatedDocument") or "").strip().lower()
    sop_class = str(ds.get("SOPClassUID") or "").strip()
    if mime != PDF_MEDIA_TYPE and sop_class != ENCAPSULATED_PDF_STORAGE:
        raise ServerError(ErrorKind.UNSUPPORTED,
                          f"the instance does not encapsulate a PDF (MIME type {mime[:64] or 'absent'!r})")
    element = ds.get("EncapsulatedDocument")
    if not element:
        raise _invalid("the instance lacks its Encapsulated Document (0042,0011)")
    document = bytes(element)
    length = ds.get("EncapsulatedDocumentLength")
    if length is not None:
        if not 0 < int(length) <= len(document):
            raise _invalid("Encapsulated Document Length (0042,0015) does not fit the Encapsulated Document")
        document = document[: int(length)]
    elif document.endswith(b"\x00"):
        document = document[:-1]
    _check_pdf(document, "the encapsulated document")
    return document


def pdf_from_fhir_attachment(attachment: dict) -> bytes:
    """The PDF of a FHIR R4 Attachment with inline base64 ``data`` (FHIR R4 datatypes Attachment).

    ``size`` and ``hash`` (base64 SHA-1), when present, must match the decoded bytes.
    """
    if not isinstance(attachment, dict):
        raise _invalid("the attachment is not a FHIR Attachment object")
    content_type = attachment.get("contentType")
    media_type = content_type.split(";", 1)[0].strip().lower() if isinstance(content_type, str) else ""
    if media_type not in _FHIR_PDF_TYPES:
        shown = media_type[:64] or "absent"
        raise _invalid(f"the attachment's contentType is {shown!r}; only application/pdf can be sent as a report")
    data = attachment.get("data")
    if data is None or data == "":
        if attachment.get("url"):
            raise _invalid("the attachment references its PDF by url only; inline base64 data is required")
        raise _invalid("the attachment has no data")
    if not isinstance(data, str):
        raise _invalid("the attachment's data is not a base64 string")
    try:
        pdf = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _invalid("the attachment's data is not valid base64") from exc
    size = attachment.get("size")
    if size is not None and size != len(pdf):
        raise _invalid(f"the attachment's size {size!r} does not match its data ({len(pdf)} bytes)")
    digest = attachment.get("hash")
    if digest is not None and digest != base64.b64encode(hashlib.sha1(pdf).digest()).decode():
        raise _invalid("the attachment's hash (SHA-1) does not match its data")
    _check_pdf(pdf, "the attachment's data")
    return pdf


# --------------------------------------------------------------------------------------------------


def _invalid(message: str) -> ServerError:
    return ServerError(ErrorKind.INVALID, message)


def _check_pdf(pdf: bytes, what: str) -> None:
    """A PDF starts with its file header "%PDF-" (ISO 32000-1 7.5.2)."""
    if not pdf.startswith(PDF_MAGIC):
        raise _invalid(f"{what} is not a PDF (it does not start with %PDF-)")


def _put(ds: Dataset, keyword: str, vr: str, value: object) -> None:
    """Add one element as given: no VR validation (copied study values stay verbatim, see module doc)."""
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    ds.add(DataElement(tag, vr, value, validation_mode=config.IGNORE))


def _read(data: bytes, what: str, *, stop_before_pixels: bool = False) -> Dataset:
    """A Part 10 data set (PS3.10 7.1); anything pydicom cannot read is INVALID."""
    try:
        return dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, AttributeError) as exc:
        raise _invalid(f"not a readable DICOM Part 10 {what}") from exc
