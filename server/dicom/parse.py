"""Single-pass ingest of one DICOM PS3.10 file: index columns, DICOM JSON, bulk data and pixel data map.

``parse_part10(path)`` reads the file once, front to back, through a 64 KiB window (``os.pread``) and
returns a :class:`ParsedInstance`. It walks the data elements itself (PS3.5 7.1 data elements, 7.5
sequences and items, A.4 encapsulation) with ``struct``; pydicom is used only for its data dictionary
(implicit VR) and for ISO 2022 character set decoding. A first version built on ``pydicom.dcmread``
(``stop_before_pixels``/``defer_size``) spent 1.3 ms in ``dcmread`` alone for CT_small.dcm (770/s)
and silently accepted short reads of truncated values; walking the bytes directly gives the value
offsets needed for bulk data, exact truncation checks and the speed below.

Measured on the development VM (AMD EPYC, 2 vCPUs shared with other jobs, Python 3.11 without PGO,
warm page cache, CPU time per parse, best of 12 x 100):

* CT_small.dcm (39 KB, 257 elements incl. GE private ones) and the same header with 512x512 pixel data
  (531 KB; the pixel data is skipped, not read): about 3,150 parses/s (317 us) when the values repeat
  from earlier parses (``_VALUE_CACHE``: a series repeats most of its header values), about
  2,430 parses/s (411 us) with that cache emptied before every parse. These figures use orjson for the
  JSON text (``server.dicom.json.dumps``); with only the standard library ``json`` they drop to about
  1,900/s and 1,600/s. Of the cold 411 us, ~300 us are the element walk and value decoding.
* Peak Python memory (tracemalloc) while parsing a 200 MB encapsulated file of 2,000 fragments of
  100 KiB: 0.34 MB (window, fragment table and JSON), independent of the pixel data size; 84 ms.

Rules:

* Bulk data: elements with VR OB, OD, OF, OL, OV, OW or UN whose value is longer than 1024 bytes,
  undefined-length (encapsulated) binary elements, and pixel data elements (7FE0,0008/0009/0010) of any
  size, at any depth. They are skipped, never read, and appear in ``meta`` as a BulkDataURI.
* Truncation: every element, item and fragment must end inside the file (and inside its enclosing
  defined-length item or sequence, else "malformed"). The file may end only between two top-level
  elements of the data set; a file cut exactly there is a valid, shorter data set and is accepted when
  it still holds the four required UIDs (it then lacks the elements after the cut, e.g. its pixel data).
  A cut anywhere else (inside a header, a value, an undefined-length sequence or item, or encapsulated
  pixel data before its sequence delimiter) raises INVALID "truncated: ...".
* Deflated transfer syntaxes are refused as UNSUPPORTED: bulk data offsets must address the stored file.
* Implicit VR: VRs come from the public dictionary; private elements are UN (private creators LO);
  ambiguous VRs resolve as PS3.5 A.1 says (OB/OW -> OW, US/SS by Pixel Representation).
* UN elements of known public tags are decoded with their dictionary VR (PS3.5 6.2.2); UN of undefined
  length is a sequence in Implicit VR Little Endian; other UN elements (private ones) stay UN, where
  pydicom would guess a VR from its private dictionary.
* The JSON attribute objects of short values are shared between parses (``_VALUE_CACHE``); the
  ``meta``/``attrs`` texts are what leaves this module, so nothing mutates them.
* DICOM JSON encoding rules: see ``server.dicom.json``. The BulkDataURI base is :data:`BASE`; since JSON
  escapes it, use :func:`resolve_bulk_uris` to put the real base into stored ``meta``/``attrs`` text.
"""

from __future__ import annotations

import enum
import functools
import math
import os
import re
import struct
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import datadict
from pydicom.charset import convert_encodings, decode_bytes

from server.dicom.attributes import COMPUTED, INDEXED, Kind, Level
from server.dicom.json import (
    AMBIGUOUS_VRS,
    BINARY_VRS,
    PIXEL_TAGS,
    dumps,
    ds_to_json,
    float_to_json,
    inline_binary,
    is_to_json,
    pn_from_json,
    pn_to_json,
)
from server.dicom.names import normalize_pn, phonetic_key
from server.errors import ErrorKind, ServerError

BASE = "\x01"  # placeholder the server replaces with its DICOMweb base URL when serving
BULK_THRESHOLD = 1024
WINDOW = 64 * 1024
MAX_DEPTH = 32
_MAX_META_VALUE = 1 << 16  # file meta information values are short UIDs and names (PS3.10 7.1)

UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
SPECIFIC_CHARACTER_SET = 0x00080005
PIXEL_REPRESENTATION = 0x00280103
EXTENDED_OFFSET_TABLE = 0x7FE00001
EXTENDED_OFFSET_TABLE_LENGTHS = 0x7FE00002
TRAILING_PADDING = 0xFFFCFFFC

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED_TRANSFER_SYNTAXES = frozenset(
    {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.205"}
)

_VALID_VRS = (
    "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV"
)
_VR_BYTES = {vr.encode(): vr for vr in _VALID_VRS.split()}
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


class IngestWarning(enum.Enum):
    """Problems that do not stop the ingest; the STOW-RS caller maps them to WarningReason codes."""

    SOP_CLASS_MISMATCH = "sop-class-mismatch"  # file meta (0002,0002) absent or != SOPClassUID
    SOP_INSTANCE_MISMATCH = "sop-instance-mismatch"  # file meta (0002,0003) absent or != SOPInstanceUID
    VALUE_NOT_CONFORMING = "value-not-conforming"  # a value does not fit its VR; kept as text or cut
    INDEX_VALUE_SKIPPED = "index-value-skipped"  # an indexed attribute's value was unusable: column None
    CHARACTER_SET = "character-set"  # unknown Specific Character Set term or undecodable text; replaced


@dataclass(frozen=True)
class PixelInfo:
    """Where the top-level pixel data value lies in the file (PS3.5 A.4 for encapsulated data).

    ``offset``/``length``: the value; for encapsulated data from the first item tag (Basic Offset Table
    item) up to, not including, the sequence delimiter. ``offset_table``: the Basic Offset Table item
    value; ``fragments``: every further item value; ``extended_offset_table(_lengths)``: the values of
    (7FE0,0001) and (7FE0,0002) when present. All as (file offset, length).
    """

    tag: int
    vr: str
    offset: int
    length: int
    encapsulated: bool
    number_of_frames: int
    fragments: tuple[tuple[int, int], ...] = ()
    offset_table: tuple[int, int] | None = None
    extended_offset_table: tuple[int, int] | None = None
    extended_offset_table_lengths: tuple[int, int] | None = None


@dataclass(frozen=True)
class ParsedInstance:
    """Everything the archive needs from one stored instance, computed in one pass."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    columns: Mapping[Level, Mapping[str, object]]
    attrs: Mapping[Level, str]
    meta: str
    bulk: Mapping[str, tuple[int, int]]
    pixel: PixelInfo | None
    warnings: tuple[IngestWarning, ...]


# Return attributes stored in each level's ``attrs`` (PS3.18 10.6.3.3, PS3.3 C.7.1.1, C.7.2.1, C.7.2.2,
# C.7.3.1, C.7.5.1, C.12.1); the indexed (non-computed) attributes of the level are always included.
STUDY_ATTRIBUTES: tuple[int, ...] = (
    0x00080005,  # SpecificCharacterSet
    0x00080020,  # StudyDate
    0x00080030,  # StudyTime
    0x00080050,  # AccessionNumber
    0x00080051,  # IssuerOfAccessionNumberSequence
    0x00080090,  # ReferringPhysicianName
    0x00080096,  # ReferringPhysicianIdentificationSequence
    0x0008009C,  # ConsultingPhysicianName
    0x0008009D,  # ConsultingPhysicianIdentificationSequence
    0x00080201,  # TimezoneOffsetFromUTC
    0x00081030,  # StudyDescription
    0x00081032,  # ProcedureCodeSequence
    0x00081048,  # PhysiciansOfRecord
    0x00081049,  # PhysiciansOfRecordIdentificationSequence
    0x00081060,  # NameOfPhysiciansReadingStudy
    0x00081062,  # PhysiciansReadingStudyIdentificationSequence
    0x00081080,  # AdmittingDiagnosesDescription
    0x00081084,  # AdmittingDiagnosesCodeSequence
    0x00081110,  # ReferencedStudySequence
    0x00081120,  # ReferencedPatientSequence
    0x00100010,  # PatientName
    0x00100020,  # PatientID
    0x00100021,  # IssuerOfPatientID
    0x00100022,  # TypeOfPatientID
    0x00100024,  # IssuerOfPatientIDQualifiersSequence
    0x00100030,  # PatientBirthDate
    0x00100032,  # PatientBirthTime
    0x00100040,  # PatientSex
    0x00100200,  # QualityControlSubject
    0x00101001,  # OtherPatientNames
    0x00101002,  # OtherPatientIDsSequence
    0x00101010,  # PatientAge
    0x00101020,  # PatientSize
    0x00101021,  # PatientSizeCodeSequence
    0x00101022,  # PatientBodyMassIndex
    0x00101030,  # PatientWeight
    0x00102000,  # MedicalAlerts
    0x00102110,  # Allergies
    0x00102160,  # EthnicGroup
    0x00102180,  # Occupation
    0x001021A0,  # SmokingStatus
    0x001021B0,  # AdditionalPatientHistory
    0x001021C0,  # PregnancyStatus
    0x00102201,  # PatientSpeciesDescription
    0x00102202,  # PatientSpeciesCodeSequence
    0x00102203,  # PatientSexNeutered
    0x00102292,  # PatientBreedDescription
    0x00102293,  # PatientBreedCodeSequence
    0x00102297,  # ResponsiblePerson
    0x00102298,  # ResponsiblePersonRole
    0x00102299,  # ResponsibleOrganization
    0x00104000,  # PatientComments
    0x00120062,  # PatientIdentityRemoved
    0x00120063,  # DeidentificationMethod
    0x00120064,  # DeidentificationMethodCodeSequence
    0x0020000D,  # StudyInstanceUID
    0x00200010,  # StudyID
    0x00321034,  # RequestingServiceCodeSequence
    0x00380010,  # AdmissionID
    0x00380014,  # IssuerOfAdmissionIDSequence
    0x00380060,  # ServiceEpisodeID
    0x00380062,  # ServiceEpisodeDescription
    0x00380064,  # IssuerOfServiceEpisodeIDSequence
    0x00380500,  # PatientState
    0x00401012,  # ReasonForPerformedProcedureCodeSequence
)

SERIES_ATTRIBUTES: tuple[int, ...] = (
    0x00080005,  # SpecificCharacterSet
    0x00080021,  # SeriesDate
    0x00080031,  # SeriesTime
    0x00080060,  # Modality
    0x00080070,  # Manufacturer
    0x00080080,  # InstitutionName
    0x00080081,  # InstitutionAddress
    0x00081010,  # StationName
    0x0008103E,  # SeriesDescription
    0x0008103F,  # SeriesDescriptionCodeSequence
    0x00081040,  # InstitutionalDepartmentName
    0x00081041,  # InstitutionalDepartmentTypeCodeSequence
    0x00081050,  # PerformingPhysicianName
    0x00081052,  # PerformingPhysicianIdentificationSequence
    0x00081070,  # OperatorsName
    0x00081072,  # OperatorIdentificationSequence
    0x00081090,  # ManufacturerModelName
    0x00081111,  # ReferencedPerformedProcedureStepSequence
    0x00081250,  # RelatedSeriesSequence
    0x00102210,  # AnatomicalOrientationType
    0x00180015,  # BodyPartExamined
    0x00181000,  # DeviceSerialNumber
    0x00181002,  # DeviceUID
    0x00181008,  # GantryID
    0x00181020,  # SoftwareVersions
    0x00181030,  # ProtocolName
    0x00181050,  # SpatialResolution
    0x00181200,  # DateOfLastCalibration
    0x00181201,  # TimeOfLastCalibration
    0x00185100,  # PatientPosition
    0x0020000E,  # SeriesInstanceUID
    0x00200011,  # SeriesNumber
    0x00200052,  # FrameOfReferenceUID
    0x00200060,  # Laterality
    0x00201040,  # PositionReferenceIndicator
    0x00400244,  # PerformedProcedureStepStartDate
    0x00400245,  # PerformedProcedureStepStartTime
    0x00400250,  # PerformedProcedureStepEndDate
    0x00400251,  # PerformedProcedureStepEndTime
    0x00400253,  # PerformedProcedureStepID
    0x00400254,  # PerformedProcedureStepDescription
    0x00400260,  # PerformedProtocolCodeSequence
    0x00400275,  # RequestAttributesSequence
    0x00400280,  # CommentsOnThePerformedProcedureStep
)

INSTANCE_ATTRIBUTES: tuple[int, ...] = (
    0x00080005,  # SpecificCharacterSet
    0x00080008,  # ImageType
    0x00080012,  # InstanceCreationDate
    0x00080013,  # InstanceCreationTime
    0x00080016,  # SOPClassUID
    0x00080018,  # SOPInstanceUID
    0x00080022,  # AcquisitionDate
    0x00080023,  # ContentDate
    0x0008002A,  # AcquisitionDateTime
    0x00080032,  # AcquisitionTime
    0x00080033,  # ContentTime
    0x00200012,  # AcquisitionNumber
    0x00200013,  # InstanceNumber
    0x00200062,  # ImageLaterality
    0x00204000,  # ImageComments
    0x00280002,  # SamplesPerPixel
    0x00280004,  # PhotometricInterpretation
    0x00280008,  # NumberOfFrames
    0x00280010,  # Rows
    0x00280011,  # Columns
    0x00280100,  # BitsAllocated
    0x00280101,  # BitsStored
    0x00280103,  # PixelRepresentation
    0x00280301,  # BurnedInAnnotation
    0x00280302,  # RecognizableVisualFeatures
    0x00282110,  # LossyImageCompression
    0x00282112,  # LossyImageCompressionRatio
    0x00282114,  # LossyImageCompressionMethod
    0x00420010,  # DocumentTitle
    0x00420012,  # MIMETypeOfEncapsulatedDocument
    0x0040A043,  # ConceptNameCodeSequence
    0x0040A491,  # CompletionFlag
    0x0040A493,  # VerificationFlag
    0x00700080,  # ContentLabel
    0x00700081,  # ContentDescription
    0x00700082,  # PresentationCreationDate
    0x00700083,  # PresentationCreationTime
    0x00700084,  # ContentCreatorName
)

LEVEL_ATTRIBUTES: dict[Level, frozenset[int]] = {
    Level.STUDY: frozenset(STUDY_ATTRIBUTES),
    Level.SERIES: frozenset(SERIES_ATTRIBUTES),
    Level.INSTANCE: frozenset(INSTANCE_ATTRIBUTES),
}
_LEVEL_KEYS: dict[Level, tuple[str, ...]] = {
    level: tuple(f"{tag:08X}" for tag in sorted(tags)) for level, tags in LEVEL_ATTRIBUTES.items()
}
_REQUIRED = (
    ("StudyInstanceUID", "0020000D"),
    ("SeriesInstanceUID", "0020000E"),
    ("SOPInstanceUID", "00080018"),
    ("SOPClassUID", "00080016"),
)


def parse_part10(path: Path) -> ParsedInstance:
    """Parse one DICOM PS3.10 file (PS3.10 7.1) into index columns, DICOM JSON and bulk data offsets."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ServerError(ErrorKind.INTERNAL, "the uploaded part could not be opened for parsing") from exc
    try:
        parser = _Parser(fd, os.fstat(fd).st_size)
        return parser.run()
    except OSError as exc:
        raise ServerError(ErrorKind.INTERNAL, "the uploaded part could not be read for parsing") from exc
    finally:
        os.close(fd)


def is_bulk(tag: int, vr: str, length: int) -> bool:
    """Whether an element is bulk data: pixel data, or binary VR longer than 1024 bytes or undefined."""
    return tag in PIXEL_TAGS or (vr in BINARY_VRS and (length > BULK_THRESHOLD or length == UNDEFINED))


def bulk_uri_prefix(study: str, series: str, sop: str) -> str:
    """The BulkDataURI of an instance without its tag path (PS3.18 F.2.6), based on :data:`BASE`."""
    return f"{BASE}/studies/{study}/series/{series}/instances/{sop}/bulk/"


def resolve_bulk_uris(text: str, base_url: str) -> str:
    """Replace the :data:`BASE` placeholder of stored ``meta``/``attrs`` JSON text by ``base_url``.

    JSON escapes the placeholder as ``\\u0001``; only occurrences that start a BulkDataURI value are
    replaced, so text values can never be altered.
    """
    escaped_base = dumps(base_url)[1:-1]
    return text.replace('"BulkDataURI":"\\u0001', '"BulkDataURI":"' + escaped_base)


def is_valid_uid(value: str) -> bool:
    """A UID of digits and dots, at most 64 characters (PS3.5 9.1; leading zeros tolerated)."""
    return len(value) <= 64 and _UID.fullmatch(value) is not None


# --------------------------------------------------------------------------------------------------
# Date and time normalisation for the index (PS3.5 6.2 DA, TM, DT; PS3.4 C.2.2.2.5 range matching)

_DA = re.compile(r"(\d{4})(\.?)(\d{2})\2(\d{2})")
_TM = re.compile(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{1,6}))?)?)?")
_DT = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?(?:[+-]\d{4})?")


def normalize_da(value: str) -> str | None:
    """DA "YYYYMMDD" (or legacy "YYYY.MM.DD") -> "YYYYMMDD"; None when not a date."""
    if len(value) == 8 and value.isdigit() and "01" <= value[4:6] <= "12" and "01" <= value[6:] <= "31":
        return value
    match = _DA.fullmatch(value.strip())
    if not match:
        return None
    year, _, month, day = match.groups()
    if not (1 <= int(month) <= 12 and 1 <= int(day) <= 31):
        return None
    return year + month + day


def normalize_tm(value: str) -> str | None:
    """TM "HH[MM[SS[.F{1,6}]]]" (or legacy "HH:MM:SS") -> "HHMMSS[.FFFFFF]", string order = time order."""
    if len(value) == 6 and value.isdigit() and value[:2] <= "23" and value[2:4] <= "59" and value[4:] <= "60":
        return value
    match = _TM.fullmatch(value.strip())
    if not match:
        return None
    hh, mm, ss, frac = match.groups()
    return _time(hh, mm, ss, frac)


def normalize_dt(value: str) -> str | None:
    """DT "YYYY[MM[DD[HH[MM[SS[.F{1,6}]]]]]][&ZZXX]" -> "YYYYMMDDHHMMSS[.FFFFFF]", offset dropped."""
    match = _DT.fullmatch(value.strip())
    if not match:
        return None
    year, month, day, hh, mm, ss, frac = match.groups()
    if frac is not None and ss is None:
        return None
    month, day = month or "01", day or "01"
    if not (1 <= int(month) <= 12 and 1 <= int(day) <= 31):
        return None
    time = _time(hh or "00", mm, ss, frac)
    return None if time is None else year + month + day + time


def _time(hh: str, mm: str | None, ss: str | None, frac: str | None) -> str | None:
    """Padded "HHMMSS[.FFFFFF]" from time components; None when out of range."""
    mm, ss = mm or "00", ss or "00"
    if int(hh) > 23 or int(mm) > 59 or int(ss) > 60:
        return None
    return hh + mm + ss + ("." + frac.ljust(6, "0") if frac else "")


# --------------------------------------------------------------------------------------------------
# Transfer syntax and character set contexts


@dataclass(frozen=True)
class _Syntax:
    """How a data set is encoded (PS3.5 7.1, 10): VR explicit or implicit, byte order."""

    explicit: bool
    little: bool

    @property
    def order(self) -> str:
        return "<" if self.little else ">"


_EXPLICIT_LE = _Syntax(True, True)
_IMPLICIT_LE = _Syntax(False, True)
_EXPLICIT_BE = _Syntax(True, False)
_U32 = {True: struct.Struct("<L"), False: struct.Struct(">L")}
_ITEM_HEADER = {True: struct.Struct("<HHL"), False: struct.Struct(">HHL")}


@dataclass(frozen=True, eq=False)
class _Charset:
    """Python codecs of a Specific Character Set (PS3.5 6.1); ``extended`` when ISO 2022 escapes apply."""

    codecs: tuple[str, ...]
    extended: bool
    known: bool = True


_DEFAULT_CHARSET = _Charset(("latin_1",), False)
_CHARSETS: dict[tuple[str, ...], _Charset] = {}
_TEXT_DELIMITERS = {0x0D, 0x0A, 0x09, 0x0C, 0x5C}
_PN_DELIMITERS = _TEXT_DELIMITERS | {0x5E, 0x3D}


def _charset(terms: tuple[str, ...]) -> _Charset:
    """The character set for the values of (0008,0005), cached; unknown terms fall back to default."""
    cached = _CHARSETS.get(terms)
    if cached is not None:
        return cached
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            codecs = convert_encodings(list(terms))
            known = not caught
        except (LookupError, ValueError):  # unknown term, or one Python's codec registry cannot even look up
            codecs, known = ["latin_1"], False
    codecs = ["latin_1" if c == "iso8859" else c for c in codecs]
    extended = len(codecs) > 1 or any(term.startswith("ISO 2022") for term in terms)
    result = _Charset(tuple(codecs), extended, known)
    if len(_CHARSETS) < 256:
        _CHARSETS[terms] = result
    return result


# --------------------------------------------------------------------------------------------------
# Data dictionary (implicit VR and UN)

_DICT_VR: dict[int, str | None] = {}


def _dictionary_vr(tag: int) -> str | None:
    """The dictionary VR of a tag (repeating groups, private creators LO), None when unknown or private."""
    try:
        return _DICT_VR[tag]
    except KeyError:
        pass
    vr: str | None
    if tag >> 16 & 1:
        vr = "LO" if 0x0010 <= tag & 0xFFFF <= 0x00FF else None  # private creator (PS3.5 7.8.1)
    elif tag & 0xFFFF == 0:
        vr = "UL"
    else:
        entry = datadict.DicomDictionary.get(tag)
        if entry is not None:
            vr = entry[0]
        else:
            try:
                vr = datadict.dictionary_VR(tag)
            except KeyError:
                vr = None
    if vr is not None and vr not in _VR_BYTES.values() and vr not in AMBIGUOUS_VRS:
        vr = None
    if len(_DICT_VR) < 65536:
        _DICT_VR[tag] = vr
    return vr


def _implicit_vr(tag: int, pixel_representation: int) -> str:
    """VR of an implicit VR element (PS3.5 A.1): dictionary, private creator LO, else UN."""
    vr = _dictionary_vr(tag)
    return "UN" if vr is None else _resolve_vr(vr, pixel_representation)


def _resolve_vr(vr: str, pixel_representation: int) -> str:
    """A dictionary VR with ambiguity resolved: US/SS by Pixel Representation, else OW (PS3.5 A.1)."""
    if vr in AMBIGUOUS_VRS:
        return "SS" if vr == "US or SS" and pixel_representation == 1 else AMBIGUOUS_VRS[vr]
    return vr


# --------------------------------------------------------------------------------------------------
# The walker


def _invalid(message: str) -> ServerError:
    return ServerError(ErrorKind.INVALID, message)


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _Parser:
    """Walks one file's elements once through a read window, building DICOM JSON and offsets."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.buf = b""
        self.base = 0
        self.bulk: dict[str, tuple[int, int]] = {}
        self.uri_entries: list[dict[str, Any]] = []
        self.warnings: dict[IngestWarning, None] = {}
        self.pixel_rep = 0
        self.pixel: PixelInfo | None = None
        self.extended: dict[int, tuple[int, int]] = {}

    # -- reading ------------------------------------------------------------------------------------

    def fill(self, pos: int, n: int) -> bytes:
        """Move the window to start at ``pos`` holding at least ``n`` bytes when the file has them."""
        self.buf = os.pread(self.fd, max(n, WINDOW), pos)
        self.base = pos
        return self.buf

    def read(self, pos: int, n: int, what: str) -> bytes:
        """Exactly ``n`` bytes at ``pos`` (window when it holds them); INVALID "truncated" otherwise."""
        rel = pos - self.base
        if 0 <= rel and rel + n <= len(self.buf):
            return self.buf[rel : rel + n]
        if pos + n > self.size:
            raise _invalid(f"truncated: {what} at byte {pos} runs past the end of the file")
        data = os.pread(self.fd, n, pos) if n <= 16 else self.fill(pos, n)[:n]
        if len(data) < n:
            raise _invalid(f"truncated: {what} at byte {pos} runs past the end of the file")
        return data

    def warn(self, warning: IngestWarning) -> None:
        self.warnings[warning] = None

    # -- file meta (PS3.10 7.1) ----------------------------------------------------------------------

    def file_meta(self) -> tuple[dict[int, bytes], int]:
        """The group 0002 elements as raw values, and the offset of the data set after them."""
        head = self.fill(0, WINDOW)
        if len(head) < 132 or head[128:132] != b"DICM":
            raise _invalid("not a DICOM PS3.10 file: no 'DICM' prefix after the 128-byte preamble")
        pos, elements = 132, {}
        while pos + 8 <= self.size:
            header = self.read(pos, 8, "file meta information element")
            group, element, vrb = struct.unpack_from("<HH2s", header)
            if group != 0x0002:
                break
            vr = _VR_BYTES.get(vrb)  # the file meta information is always Explicit VR Little Endian
            if vr is None:
                raise _invalid("not a DICOM PS3.10 file: malformed file meta information")
            if vr in _LONG_VRS:
                (length,), start = struct.unpack("<L", self.read(pos + 8, 4, "file meta element")), pos + 12
            else:
                (length,), start = struct.unpack_from("<H", header, 6), pos + 8
            if length > _MAX_META_VALUE:
                raise _invalid("not a DICOM PS3.10 file: malformed file meta information")
            elements[group << 16 | element] = self.read(start, length, "file meta information element")
            pos = start + length
        if not elements:
            raise _invalid("not a DICOM PS3.10 file: no file meta information (group 0002) after 'DICM'")
        return elements, pos

    # -- data sets (PS3.5 7.1, 7.5) -----------------------------------------------------------------

    def dataset(
        self, pos: int, end: int | None, syn: _Syntax, cs: _Charset, prefix: str, depth: int, top: bool = False
    ) -> tuple[dict[str, Any], int]:
        """Elements from ``pos`` to ``end`` (None: to the item delimiter) as a DICOM JSON object (PS3.5 7.1).

        This is the hot loop of the ingest: common elements are decoded inline; undefined lengths, group
        lengths, pixel data and the elements that change the decoding context go through ``special``.
        """
        out: dict[str, Any] = {}
        limit = self.size if end is None else end
        explicit = syn.explicit
        header = _HEADER[syn]
        u32 = _U32[syn.little]
        single = _SINGLE[syn.little]
        vr_bytes, long_vrs, categories, keys, special = _VR_BYTES, _LONG_VRS, _CATEGORY, _KEYS, _SPECIAL
        cache = _VALUE_CACHE
        buf, base = self.buf, self.base  # the window; reloaded after every call that may move it
        buflen = len(buf)
        while True:
            if pos >= limit:
                if end is None:
                    raise _invalid(f"truncated: item without item delimiter, the file ends at byte {pos}")
                return out, pos
            rel = pos - base
            if rel < 0 or rel + 12 > buflen:
                if pos + 8 > self.size:
                    raise _invalid(f"truncated: element header at byte {pos} runs past the end of the file")
                buf, base = self.fill(pos, 12), pos
                buflen = len(buf)
                rel = 0
            if explicit:
                group, element, vrb, length = header.unpack_from(buf, rel)
                tag = group << 16 | element
                vr = vr_bytes.get(vrb)
                if vr is None:
                    if group == 0xFFFE and tag == ITEM_DELIMITER and end is None:
                        return out, pos + 8
                    raise self.bad_header(tag, pos)
                if vr in long_vrs:
                    if rel + 12 > buflen:
                        raise _invalid(f"truncated: element header at byte {pos} runs past the end of the file")
                    length = u32.unpack_from(buf, rel + 8)[0]
                    vpos = pos + 12
                else:
                    vpos = pos + 8
            else:
                group, element, length = header.unpack_from(buf, rel)
                tag = group << 16 | element
                if group == 0xFFFE:
                    if tag == ITEM_DELIMITER and end is None:
                        return out, pos + 8
                    raise self.bad_header(tag, pos)
                vpos = pos + 8
                vr = _implicit_vr(tag, self.pixel_rep)
            if length == UNDEFINED or element == 0 or tag in special or group == 0x0002:
                entry, pos, cs = self.special(tag, vr, vpos, length, limit, syn, cs, prefix, depth, top)
                if entry is not None:
                    out[keys.get(tag) or _key(tag)] = entry
                buf, base = self.buf, self.base
                buflen = len(buf)
                continue
            vend = vpos + length
            if vend > limit:
                raise self.overrun(tag, vpos, length, limit)
            pos = vend
            category = categories[vr]
            if category >= _C_BINARY:  # SQ, UN, OB/OD/OF/OL/OV/OW
                if category == _C_SQ:
                    entry = self.sequence(tag, vpos, vend, syn, cs, prefix, depth)
                elif category == _C_UN:
                    entry = self.unknown(tag, vpos, length, cs, prefix, depth)
                elif length > BULK_THRESHOLD:
                    entry = self.bulk_entry(tag, vr, vpos, length, prefix, top)
                else:
                    entry = _d_binary(self, vr, self.read(vpos, length, f"value of {_tag_text(tag)}"), syn, cs)
                out[keys.get(tag) or _key(tag)] = entry
                buf, base = self.buf, self.base
                buflen = len(buf)
                continue
            if length == 0:
                out[keys.get(tag) or _key(tag)] = {"vr": vr}
                continue
            vrel = vpos - base
            entry = None
            if vrel + length > buflen:
                raw = self.read(vpos, length, f"value of {_tag_text(tag)}")
                buf, base = self.buf, self.base
                buflen = len(buf)
            elif category == _C_NUMBER:
                width, unpack_from = single[vr]
                if length == width:
                    number = unpack_from(buf, vrel)[0]
                    if number - number == 0:  # finite (always true for integers)
                        out[keys.get(tag) or _key(tag)] = {"vr": vr, "Value": [number]}
                        continue
                raw = buf[vrel : vrel + length]
            else:
                raw = buf[vrel : vrel + length]
                key = (raw, vr, cs)
                entry = cache.get(key)
                if entry is not None:
                    out[keys.get(tag) or _key(tag)] = entry
                    continue
                if category == _C_DS:
                    text = raw.decode("latin_1")
                    if "_" not in text:
                        try:
                            numbers = [float(v) for v in text.split("\\")] if "\\" in text else [float(text)]
                        except ValueError:
                            pass
                        else:
                            if all(map(_isfinite, numbers)):
                                entry = {"vr": vr, "Value": numbers}
                elif category == _C_TEXT:
                    if not cs.extended:
                        try:
                            text = raw.decode(cs.codecs[0])
                        except UnicodeDecodeError:
                            pass  # the generic decoder below replaces and warns; such values are not cached
                        else:
                            if "\\" in text:
                                entry = {"vr": vr, "Value": [v.strip(" \x00") or None for v in text.split("\\")]}
                            else:
                                text = text.strip(" \x00")
                                entry = {"vr": vr, "Value": [text]} if text else {"vr": vr}
                elif category == _C_STRING:
                    text = raw.decode("latin_1")
                    if "\\" in text:
                        entry = {"vr": vr, "Value": [v.strip(" \x00") or None for v in text.split("\\")]}
                    else:
                        text = text.strip(" \x00")
                        entry = {"vr": vr, "Value": [text]} if text else {"vr": vr}
                elif category == _C_IS:
                    text = raw.decode("latin_1")
                    if "_" not in text:
                        try:
                            integers = [int(v) for v in text.split("\\")] if "\\" in text else [int(text)]
                            entry = {"vr": vr, "Value": integers}
                        except ValueError:
                            pass
                if entry is not None and length <= 64:
                    if len(cache) >= _CACHE_SIZE:
                        cache.clear()
                    cache[key] = entry
            if entry is None:
                entry = _DECODERS[vr](self, vr, raw, syn, cs)
            out[keys.get(tag) or _key(tag)] = entry

    def bad_header(self, tag: int, pos: int) -> ServerError:
        """The error for an element header that cannot start an element here."""
        if tag >> 16 == 0xFFFE:
            return _invalid(f"malformed data set: unexpected item tag {_tag_text(tag)} at byte {pos}")
        return _invalid(
            f"malformed data set: element {_tag_text(tag)} at byte {pos} has no valid VR"
            " (is the data set encoded in the transfer syntax of its file meta information?)"
        )

    def overrun(self, tag: int, vpos: int, length: int, limit: int) -> ServerError:
        """The error for a value that runs past the end of the file or of its enclosing item."""
        if vpos + length > self.size:
            return _invalid(
                f"truncated: value of {_tag_text(tag)} at byte {vpos} ({length} bytes) runs past the end of the file"
            )
        return _invalid(f"malformed data set: element {_tag_text(tag)} runs past the end of its item")

    def special(
        self, tag: int, vr: str, vpos: int, length: int, limit: int, syn: _Syntax, cs: _Charset, prefix: str,
        depth: int, top: bool,
    ) -> tuple[dict[str, Any] | None, int, _Charset]:
        """Undefined lengths, skipped elements, pixel data and context elements: (entry or None, next, charset)."""
        if vr == "UN":
            dictionary_vr = _dictionary_vr(tag)
            if dictionary_vr is not None:
                vr = _resolve_vr(dictionary_vr, self.pixel_rep)
                syn = _IMPLICIT_LE if dictionary_vr == "SQ" else syn
        if length == UNDEFINED:
            entry, pos = self.undefined(tag, vr, vpos, syn, cs, prefix, depth, top)
            skipped = tag & 0xFFFF == 0 or tag >> 16 == 0x0002 or tag == TRAILING_PADDING
            return (None if skipped else entry), pos, cs
        vend = vpos + length
        if vend > limit:
            raise self.overrun(tag, vpos, length, limit)
        if tag & 0xFFFF == 0 or tag >> 16 == 0x0002 or tag == TRAILING_PADDING:
            return None, vend, cs  # group length, misplaced file meta, padding: not in the JSON data set
        if tag in PIXEL_TAGS:
            return self.bulk_entry(tag, vr, vpos, length, prefix, top), vend, cs
        if vr == "UN":
            return self.unknown(tag, vpos, length, cs, prefix, depth), vend, cs
        if vr == "SQ":
            return self.sequence(tag, vpos, vend, syn, cs, prefix, depth), vend, cs
        if vr in BINARY_VRS and length > BULK_THRESHOLD:
            return self.bulk_entry(tag, vr, vpos, length, prefix, top), vend, cs
        raw = self.read(vpos, length, f"value of {_tag_text(tag)}")
        entry = _DECODERS[vr](self, vr, raw, syn, cs) if raw else {"vr": vr}
        if tag == SPECIFIC_CHARACTER_SET:
            cs = self.charset(entry)
        elif tag == PIXEL_REPRESENTATION:
            value = (entry.get("Value") or [0])[0]
            self.pixel_rep = value if isinstance(value, int) else 0
        elif top and tag in (EXTENDED_OFFSET_TABLE, EXTENDED_OFFSET_TABLE_LENGTHS):
            self.extended[tag] = (vpos, length)
        return entry, vend, cs

    def unknown(self, tag: int, vpos: int, length: int, cs: _Charset, prefix: str, depth: int) -> dict[str, Any]:
        """A defined-length UN value: with its dictionary VR in Implicit VR Little Endian (PS3.5 6.2.2)."""
        dictionary_vr = _dictionary_vr(tag)
        if dictionary_vr is None:
            vr = "UN"
        elif dictionary_vr == "SQ":
            return self.sequence(tag, vpos, vpos + length, _IMPLICIT_LE, cs, prefix, depth)
        else:
            vr = _resolve_vr(dictionary_vr, self.pixel_rep)
        if length == 0:
            return {"vr": vr}
        if vr in BINARY_VRS and length > BULK_THRESHOLD:
            return self.bulk_entry(tag, vr, vpos, length, prefix, False)
        raw = self.read(vpos, length, f"value of {_tag_text(tag)}")
        return _DECODERS[vr](self, vr, raw, _IMPLICIT_LE, cs)

    def charset(self, entry: dict[str, Any]) -> _Charset:
        """The character set named by a (0008,0005) JSON entry (PS3.5 6.1.2.3)."""
        terms = tuple(v or "" for v in entry.get("Value", ()))
        if not terms:
            return _DEFAULT_CHARSET
        cs = _charset(terms)
        if not cs.known:
            self.warn(IngestWarning.CHARACTER_SET)
        return cs

    def undefined(
        self, tag: int, vr: str, vpos: int, syn: _Syntax, cs: _Charset, prefix: str, depth: int, top: bool
    ) -> tuple[dict[str, Any], int]:
        """An undefined-length element: a sequence (SQ, or UN per PS3.5 6.2.2) or encapsulated data (A.4)."""
        if tag not in PIXEL_TAGS:
            if vr == "SQ":
                return self.sequence_undefined(tag, vpos, syn, cs, prefix, depth)
            if vr == "UN":  # PS3.5 6.2.2: a sequence encoded in Implicit VR Little Endian
                first = _ITEM_HEADER[True].unpack(self.read(vpos, 8, f"first item of {_tag_text(tag)}"))
                if first[0] << 16 | first[1] in (ITEM, SEQUENCE_DELIMITER):
                    return self.sequence_undefined(tag, vpos, _IMPLICIT_LE, cs, prefix, depth)
            if vr not in BINARY_VRS:
                raise _invalid(f"malformed data set: element {_tag_text(tag)} with VR {vr} has undefined length")
        fragments, delimiter = self.items(tag, vpos, syn)
        path = prefix + _key(tag)
        self.bulk[path] = (vpos, delimiter - vpos)
        entry = {"vr": "OB" if vr in ("OW", "UN") else vr, "BulkDataURI": path}
        self.uri_entries.append(entry)
        if top and tag in PIXEL_TAGS and self.pixel is None:
            offset_table = fragments[0] if fragments else None
            self.pixel = PixelInfo(tag, entry["vr"], vpos, delimiter - vpos, True, 1, tuple(fragments[1:]), offset_table)
        return entry, delimiter + 8

    def items(self, tag: int, pos: int, syn: _Syntax) -> tuple[list[tuple[int, int]], int]:
        """Item values of encapsulated data up to its sequence delimiter (PS3.5 A.4), never read."""
        header = _ITEM_HEADER[syn.little]
        size = self.size
        found: list[tuple[int, int]] = []
        while True:
            group, element, length = header.unpack(self.read(pos, 8, f"item of {_tag_text(tag)}"))
            item_tag = group << 16 | element
            if item_tag == SEQUENCE_DELIMITER:
                return found, pos
            if item_tag != ITEM or length == UNDEFINED:
                raise _invalid(f"malformed encapsulated data in {_tag_text(tag)}: no item at byte {pos}")
            if pos + 8 + length > size:
                raise _invalid(
                    f"truncated: fragment of {_tag_text(tag)} at byte {pos + 8} ({length} bytes) runs past the end"
                    " of the file"
                )
            found.append((pos + 8, length))
            pos += 8 + length

    def bulk_entry(self, tag: int, vr: str, vpos: int, length: int, prefix: str, top: bool) -> dict[str, Any]:
        """A skipped bulk value: recorded by tag path, JSON BulkDataURI fixed up later (PS3.18 F.2.6)."""
        if vr not in BINARY_VRS:
            vr = "OW"
        path = prefix + _key(tag)
        self.bulk[path] = (vpos, length)
        entry = {"vr": vr, "BulkDataURI": path}
        self.uri_entries.append(entry)
        if top and tag in PIXEL_TAGS and self.pixel is None:
            self.pixel = PixelInfo(tag, vr, vpos, length, False, 1)
        return entry

    def sequence(
        self, tag: int, pos: int, end: int, syn: _Syntax, cs: _Charset, prefix: str, depth: int
    ) -> dict[str, Any]:
        """A defined-length sequence: items up to ``end`` (PS3.5 7.5.1)."""
        items, i = [], 0
        path = f"{prefix}{_key(tag)}/"
        header = _ITEM_HEADER[syn.little]
        self.check_depth(depth, tag)
        while pos < end:
            group, element, length = header.unpack(self.read(pos, 8, f"item of {_tag_text(tag)}"))
            item_tag = group << 16 | element
            if item_tag == SEQUENCE_DELIMITER:
                pos += 8
                continue
            if item_tag != ITEM:
                raise _invalid(f"malformed sequence {_tag_text(tag)}: no item at byte {pos}")
            item, pos = self.item(tag, pos + 8, length, end, syn, cs, f"{path}{i}/", depth)
            items.append(item)
            i += 1
        if pos != end:
            raise _invalid(f"malformed sequence {_tag_text(tag)}: its items run past its length")
        return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}

    def sequence_undefined(
        self, tag: int, pos: int, syn: _Syntax, cs: _Charset, prefix: str, depth: int
    ) -> tuple[dict[str, Any], int]:
        """An undefined-length sequence: items up to the sequence delimiter (PS3.5 7.5.2)."""
        items, i = [], 0
        path = f"{prefix}{_key(tag)}/"
        header = _ITEM_HEADER[syn.little]
        self.check_depth(depth, tag)
        while True:
            what = f"sequence {_tag_text(tag)} without sequence delimiter"
            group, element, length = header.unpack(self.read(pos, 8, what))
            item_tag = group << 16 | element
            if item_tag == SEQUENCE_DELIMITER:
                entry = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
                return entry, pos + 8
            if item_tag != ITEM:
                raise _invalid(f"malformed sequence {_tag_text(tag)}: no item at byte {pos}")
            item, pos = self.item(tag, pos + 8, length, None, syn, cs, f"{path}{i}/", depth)
            items.append(item)
            i += 1

    def item(
        self, tag: int, pos: int, length: int, end: int | None, syn: _Syntax, cs: _Charset, prefix: str, depth: int
    ) -> tuple[dict[str, Any], int]:
        """One sequence item: a nested data set of defined or undefined length (PS3.5 7.5)."""
        if length == UNDEFINED:
            return self.dataset(pos, None, syn, cs, prefix, depth + 1)
        item_end = pos + length
        if item_end > self.size:
            raise _invalid(
                f"truncated: item of {_tag_text(tag)} at byte {pos} ({length} bytes) runs past the end of the file"
            )
        if end is not None and item_end > end:
            raise _invalid(f"malformed sequence {_tag_text(tag)}: an item runs past the sequence length")
        return self.dataset(pos, item_end, syn, cs, prefix, depth + 1)

    def check_depth(self, depth: int, tag: int) -> None:
        if depth >= MAX_DEPTH:
            raise _invalid(f"malformed data set: sequence {_tag_text(tag)} nested deeper than {MAX_DEPTH} levels")

    # -- text ---------------------------------------------------------------------------------------

    def text(self, raw: bytes, cs: _Charset, delimiters: set[int]) -> str:
        """Bytes of a text VR decoded with the Specific Character Set (PS3.5 6.1.2)."""
        codec = cs.codecs[0]
        if not cs.extended or b"\x1b" not in raw:
            try:
                return raw.decode(codec)
            except UnicodeDecodeError:
                self.warn(IngestWarning.CHARACTER_SET)
                return raw.decode(codec, "replace")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                text = decode_bytes(raw, list(cs.codecs), delimiters)
            except (UnicodeError, LookupError, ValueError):
                caught.append(None)  # type: ignore[arg-type]
                text = raw.decode(codec, "replace")
        if caught:
            self.warn(IngestWarning.CHARACTER_SET)
        return text

    # -- the whole file -----------------------------------------------------------------------------

    def run(self) -> ParsedInstance:
        """Parse the file meta and the data set and derive everything of :class:`ParsedInstance`."""
        meta, pos = self.file_meta()
        ts = _uid_text(meta.get(0x00020010, b""))
        if not ts:
            raise _invalid("not a DICOM PS3.10 file: no Transfer Syntax UID (0002,0010) in the file meta information")
        if not is_valid_uid(ts):
            raise _invalid("not a DICOM PS3.10 file: the Transfer Syntax UID (0002,0010) is not a valid UID")
        if ts in DEFLATED_TRANSFER_SYNTAXES:
            raise ServerError(
                ErrorKind.UNSUPPORTED, f"deflated transfer syntax {ts} is not supported for storage; send it inflated"
            )
        syn = {IMPLICIT_VR_LITTLE_ENDIAN: _IMPLICIT_LE, EXPLICIT_VR_BIG_ENDIAN: _EXPLICIT_BE}.get(ts, _EXPLICIT_LE)
        self.check_implicit(pos, syn)
        top, _ = self.dataset(pos, self.size, syn, _DEFAULT_CHARSET, "", 0, top=True)
        uids = {name: self.required_uid(top, name, key) for name, key in _REQUIRED}
        study, series, sop, sop_class = (uids[name] for name, _ in _REQUIRED)
        if _uid_text(meta.get(0x00020002, b"")) != sop_class:
            self.warn(IngestWarning.SOP_CLASS_MISMATCH)
        if _uid_text(meta.get(0x00020003, b"")) != sop:
            self.warn(IngestWarning.SOP_INSTANCE_MISMATCH)
        base = bulk_uri_prefix(study, series, sop)
        for entry in self.uri_entries:
            entry["BulkDataURI"] = base + entry["BulkDataURI"]
        columns = _columns(top, self.warn)
        attrs = {level: dumps({k: top[k] for k in keys if k in top}) for level, keys in _LEVEL_KEYS.items()}
        return ParsedInstance(
            sop_class_uid=sop_class,
            sop_instance_uid=sop,
            study_uid=study,
            series_uid=series,
            transfer_syntax_uid=ts,
            columns=columns,
            attrs=attrs,
            meta=dumps(top),
            bulk=self.bulk,
            pixel=self.pixel_info(top),
            warnings=tuple(self.warnings),
        )

    def check_implicit(self, pos: int, syn: _Syntax) -> None:
        """Refuse an implicit VR file whose data set is visibly explicit VR (PS3.5 A.1 vs A.2)."""
        if syn.explicit or pos + 8 > self.size:
            return
        header = self.read(pos, 8, "element header")
        if header[4:6] in _VR_BYTES and pos + 8 + struct.unpack_from("<L", header, 4)[0] > self.size:
            raise _invalid(
                "malformed data set: the file meta information says Implicit VR Little Endian but the data set"
                " is encoded with explicit VR"
            )

    def required_uid(self, top: dict[str, Any], name: str, key: str) -> str:
        """A required top-level UID, present, non-empty and valid (PS3.5 9.1), else INVALID naming it."""
        values = top.get(key, {}).get("Value") or [None]
        value = values[0]
        if not isinstance(value, str) or not value:
            raise _invalid(f"missing required attribute {name} ({key[:4]},{key[4:]})")
        if not is_valid_uid(value):
            raise _invalid(f"{name} ({key[:4]},{key[4:]}) is not a valid UID: {value[:80]!r}")
        return value

    def pixel_info(self, top: dict[str, Any]) -> PixelInfo | None:
        """The pixel data map with the number of frames (0028,0008) and extended offset table (A.4)."""
        if self.pixel is None:
            return None
        frames = (top.get("00280008", {}).get("Value") or [1])[0]
        if not isinstance(frames, int) or frames < 1:
            self.warn(IngestWarning.VALUE_NOT_CONFORMING)
            frames = 1
        p = self.pixel
        return PixelInfo(
            p.tag, p.vr, p.offset, p.length, p.encapsulated, frames, p.fragments, p.offset_table,
            self.extended.get(EXTENDED_OFFSET_TABLE), self.extended.get(EXTENDED_OFFSET_TABLE_LENGTHS),
        )


_KEYS: dict[int, str] = {}


def _key(tag: int) -> str:
    """Cached DICOM JSON key of a tag (PS3.18 F.2.1.1)."""
    key = _KEYS.get(tag)
    if key is None:
        key = f"{tag:08X}"
        if len(_KEYS) < 65536:
            _KEYS[tag] = key
    return key


def _uid_text(raw: bytes) -> str:
    return raw.decode("latin_1").strip(" \x00")


# --------------------------------------------------------------------------------------------------
# Value decoders: raw bytes of one element -> DICOM JSON attribute object (PS3.18 F.2.2, F.2.3)


def _split(vr: str, text: str) -> dict[str, Any]:
    """Backslash-separated short strings, stripped; empty values null (F.2.5)."""
    if "\\" in text:
        return {"vr": vr, "Value": [v.strip(" \x00") or None for v in text.split("\\")]}
    text = text.strip(" \x00")
    return {"vr": vr, "Value": [text]} if text else {"vr": vr}


def _d_string(p: _Parser, vr: str, raw: bytes, syn: _Syntax, cs: _Charset) -> dict[str, Any]:
    """AE, AS, CS, DA, DT, TM, UI: default repertoire, multi-valued."""
    return _split(vr, raw.decode("latin_1"))


def _d_text_multi(p: _Parser, vr: str, raw: bytes, syn: _Syntax, cs: _Charset) -> dict[str, Any]:
    """SH, LO: Specific Character Set, multi-valued."""
    return _split(vr, p.text(raw, cs, _TEXT_DELIMITERS))


def _d_uc(p: _Parser, vr: str, raw: bytes, syn: _Syntax, cs: _Charset) -> dict[str, Any]:
    """UC: Specific Character Set, multi-valued, trailing spaces insignificant."""
    text = p.text(raw, cs, _TEXT_DELIMITERS)
    values = [v.rstrip(" \x00") or None for v in text.split("\\")]
    if len(values) == 1 and values[0] is None:
        return {"vr": vr}
    return {"vr": vr, "Value": values}


def _d_text_single(p: _Parser, vr: str, raw: bytes, syn: _Syntax, cs: _Charset) -> dict[str, Any]:
    """ST, LT, UT (Specific Character Set) and UR: one value, trailing spaces insignificant."""
    text = raw.decode("latin_1") if vr == "UR" else p.text(raw, cs, _TEXT_DELIMITERS)
    text = text.rstrip(" \x00")
    return {"vr": vr, "Value": [text]} if text else {"vr": vr}


def _d_pn(p: _Parser, vr: str, raw: bytes, syn: _Syntax, cs: _Charset) -> dict[str, Any]:
    """PN: Specific Character Set, name groups as JSON objects (F.2.2)."""
    text = p.text(raw, cs, _PN_DELIMITERS)
    values = [pn_to_json(v.rstrip(" \x00")) for v in text.split("\\")]
    if len(values) == 1 and values[0] is None:
        return {"vr": vr}
    return {"vr": vr, "Value": values}


def _d_numeric_string(p: _Parser, vr: str, raw: bytes, syn: _Syntax, cs: _Charset) -> dict[str, Any]:
    """IS, DS: JSON Numbers; non-conforming values kept as JSON Strings (F.2.3, CP-1861)."""
    convert = is_to_json if vr == "IS" else ds_to_json
    values = [convert(v) for v in raw.decode("latin_1").split("\\")]
    if len(values) == 1 and values[0] is None:
        return {"vr": vr}
    for v in values:
        if type(v) is str:
            p.warn(IngestWarning.VALUE_NOT_CONFORMING)
    return {"vr": vr, "Value": values}


_NUMBER_CODES = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "UV": "Q", "SV": "q", "FL": "f", "FD": "d"}


def _d_number(p: _Parser, vr: str, raw: bytes, syn: _Syntax, cs: _Charset) -> dict[str, Any]:
    """US, SS, UL, SL, UV, SV, FL, FD: binary numbers (PS3.5 6.2) as JSON Numbers."""
    code = _NUMBER_CODES[vr]
    size = struct.calcsize("<" + code)
    count, rest = divmod(len(raw), size)
    if rest:
        p.warn(IngestWarning.VALUE_NOT_CONFORMING)
    if not count:
        return {"vr": vr}
    values: list[Any] = list(struct.unpack_from(f"{syn.order}{count}{code}", raw))
    if vr in ("FL", "FD"):
        values = [v if math.isfinite(v) else float_to_json(v) for v in values]
    return {"vr": vr, "Value": values}


def _d_at(p: _Parser, vr: str, raw: bytes, syn: _Syntax, cs: _Charset) -> dict[str, Any]:
    """AT: pairs of group/element numbers as hex strings (F.2.3)."""
    count, rest = divmod(len(raw), 4)
    if rest:
        p.warn(IngestWarning.VALUE_NOT_CONFORMING)
    if not count:
        return {"vr": vr}
    words = struct.unpack_from(f"{syn.order}{2 * count}H", raw)
    return {"vr": vr, "Value": [f"{words[i]:04X}{words[i + 1]:04X}" for i in range(0, 2 * count, 2)]}


def _d_binary(p: _Parser, vr: str, raw: bytes, syn: _Syntax, cs: _Charset) -> dict[str, Any]:
    """OB, OD, OF, OL, OV, OW, UN up to the bulk threshold: InlineBinary, little endian (F.2.7)."""
    return {"vr": vr, "InlineBinary": inline_binary(raw, vr, syn.little)} if raw else {"vr": vr}


_DECODERS: dict[str, Callable[[_Parser, str, bytes, _Syntax, _Charset], dict[str, Any]]] = {
    **dict.fromkeys(("AE", "AS", "CS", "DA", "DT", "TM", "UI"), _d_string),
    **dict.fromkeys(("SH", "LO"), _d_text_multi),
    **dict.fromkeys(("ST", "LT", "UT", "UR"), _d_text_single),
    **dict.fromkeys(("IS", "DS"), _d_numeric_string),
    **dict.fromkeys(_NUMBER_CODES, _d_number),
    **dict.fromkeys(BINARY_VRS, _d_binary),
    "UC": _d_uc,
    "PN": _d_pn,
    "AT": _d_at,
}


# Value categories of the hot loop, most frequent first; those from _C_BINARY on are not decoded inline.
_C_NUMBER, _C_DS, _C_TEXT, _C_STRING, _C_IS, _C_OTHER, _C_BINARY, _C_SQ, _C_UN = range(9)
_CATEGORY: dict[str, int] = {
    **dict.fromkeys(_VR_BYTES.values(), _C_OTHER),
    **dict.fromkeys(BINARY_VRS, _C_BINARY),
    "SQ": _C_SQ,
    "UN": _C_UN,
    **dict.fromkeys(("AE", "AS", "CS", "DA", "DT", "TM", "UI"), _C_STRING),
    **dict.fromkeys(_NUMBER_CODES, _C_NUMBER),
    "SH": _C_TEXT,
    "LO": _C_TEXT,
    "DS": _C_DS,
    "IS": _C_IS,
}
_SINGLE = {
    little: {
        vr: (struct.calcsize("<" + code), struct.Struct(("<" if little else ">") + code).unpack_from)
        for vr, code in _NUMBER_CODES.items()
    }
    for little in (True, False)
}
_HEADER = {
    _EXPLICIT_LE: struct.Struct("<HH2sH"),
    _EXPLICIT_BE: struct.Struct(">HH2sH"),
    _IMPLICIT_LE: struct.Struct("<HHL"),
}
# Elements the hot loop hands to ``_Parser.special``.
_SPECIAL = frozenset(
    {SPECIFIC_CHARACTER_SET, PIXEL_REPRESENTATION, EXTENDED_OFFSET_TABLE, EXTENDED_OFFSET_TABLE_LENGTHS}
    | {TRAILING_PADDING}
    | PIXEL_TAGS
)
_isfinite = math.isfinite
# Decoded short values shared between parses (a series repeats most of its values); entries are never
# mutated once stored. Keyed by (raw bytes, VR, character set).
_VALUE_CACHE: dict[tuple[bytes, str, _Charset], dict[str, Any]] = {}
_CACHE_SIZE = 20000


# --------------------------------------------------------------------------------------------------
# Index columns (server.dicom.attributes.INDEXED)


def _columns(top: Mapping[str, Any], warn: Callable[[IngestWarning], None]) -> dict[Level, dict[str, object]]:
    """SQL column values per level for every non-computed indexed attribute (None when absent)."""
    columns: dict[Level, dict[str, object]] = {level: {} for level in Level}
    for level, key, column, kind, vr in _COLUMN_PLAN:
        entry = top.get(key)
        values = entry.get("Value") if entry is not None else None
        row = columns[level]
        if kind is Kind.PN:
            name = _pn_column(values)
            norm, phonetic = (None, None) if name is None else _pn_forms(name)
            row[column] = name
            row[column + "_norm"] = norm
            row[column + "_phonetic"] = phonetic
            continue
        value = _column_value(kind, vr, values) if values else None
        if value is _SKIPPED:
            warn(IngestWarning.INDEX_VALUE_SKIPPED)
            value = None
        row[column] = value
    return columns


@functools.lru_cache(maxsize=4096)
def _pn_forms(name: str) -> tuple[str, str]:
    """normalize_pn and phonetic_key of a name, cached: the instances of a study repeat their names."""
    return normalize_pn(name), phonetic_key(name)


_COLUMN_PLAN = tuple((a.level, a.hex, a.column, a.kind, a.vr) for a in INDEXED if a.tag not in COMPUTED)
# Index values must fit their VR (PS3.5 Table 6.2-1): the SQL columns are sized by it.
_MAX_CHARS = {"CS": 16, "SH": 16, "AE": 16}
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1  # IS range; US always fits
_SKIPPED = object()
_NORMALIZERS = {Kind.DATE: normalize_da, Kind.TIME: normalize_tm, Kind.DATETIME: normalize_dt}


def _column_value(kind: Kind, vr: str, values: list[Any]) -> object:
    """One column value from an attribute's JSON values; ``_SKIPPED`` when present but unusable."""
    first = values[0]
    if kind is Kind.TEXT:
        if len(values) == 1 and type(first) is str:
            text = first
        else:
            text = "\\".join("" if v is None else str(v) for v in values)
        if len(text) > _MAX_CHARS.get(vr, len(text)):
            return _SKIPPED
        return text or None
    if first is None:
        return None
    if kind is Kind.UID:
        return first if type(first) is str and len(first) <= 64 else _SKIPPED
    if kind is Kind.INT:
        return first if type(first) is int and _INT_MIN <= first <= _INT_MAX else _SKIPPED
    if type(first) is not str:
        return _SKIPPED
    normalized = _NORMALIZERS[kind](first)
    return _SKIPPED if normalized is None else normalized


def _pn_column(values: list[Any] | None) -> str | None:
    """The stored PN column: the first name as "Alphabetic=Ideographic=Phonetic"."""
    if not values or values[0] is None:
        return None
    first = values[0]
    return first if isinstance(first, str) else pn_from_json(first)
