"""The catalogue of DICOM attributes the archive indexes, per query/retrieve level.

PS3.18 Table 10.6.1-5 (required matching attributes) and PS3.18 10.6.3.3 (return attributes),
plus a few optional ones users search by. Each entry names the SQL column that holds its value;
``server/store/models.py`` declares exactly these columns and ``server/dicom/parse.py`` fills them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Level(str, enum.Enum):
    """QIDO-RS / WADO-RS resource levels (PS3.18 10.6.1.2)."""

    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"


class Kind(str, enum.Enum):
    """How an attribute is stored and matched (PS3.4 C.2.2.2)."""

    UID = "uid"  # single value or UID list matching
    TEXT = "text"  # single value and wildcard matching, case-sensitive
    PN = "pn"  # person name: case/accent-insensitive, wildcard, fuzzy
    DATE = "date"  # YYYYMMDD, range matching
    TIME = "time"  # HHMMSS.FFFFFF normalised, range matching
    DATETIME = "datetime"  # YYYYMMDDHHMMSS.FFFFFF normalised, range matching
    INT = "int"  # IS/US values, single value matching
    MULTI = "multi"  # multi-valued code string stored backslash-joined (ModalitiesInStudy)


@dataclass(frozen=True)
class IndexedAttribute:
    """One indexed attribute: its tag, keyword, VR, level, storage kind and SQL column."""

    tag: int
    keyword: str
    vr: str
    level: Level
    kind: Kind
    column: str

    @property
    def hex(self) -> str:
        """The tag as eight upper-case hex digits, as DICOM JSON keys it (PS3.18 F.2.1.1)."""
        return f"{self.tag:08X}"


def _a(tag: int, keyword: str, vr: str, level: Level, kind: Kind, column: str) -> IndexedAttribute:
    return IndexedAttribute(tag, keyword, vr, level, kind, column)


S, SE, I = Level.STUDY, Level.SERIES, Level.INSTANCE

INDEXED: tuple[IndexedAttribute, ...] = (
    # Study level (Patient attributes are folded into the study, as in the Study Root model)
    _a(0x00100010, "PatientName", "PN", S, Kind.PN, "patient_name"),
    _a(0x00100020, "PatientID", "LO", S, Kind.TEXT, "patient_id"),
    _a(0x00100021, "IssuerOfPatientID", "LO", S, Kind.TEXT, "issuer_of_patient_id"),
    _a(0x00100030, "PatientBirthDate", "DA", S, Kind.DATE, "patient_birth_date"),
    _a(0x00100040, "PatientSex", "CS", S, Kind.TEXT, "patient_sex"),
    _a(0x0020000D, "StudyInstanceUID", "UI", S, Kind.UID, "study_uid"),
    _a(0x00080020, "StudyDate", "DA", S, Kind.DATE, "study_date"),
    _a(0x00080030, "StudyTime", "TM", S, Kind.TIME, "study_time"),
    _a(0x00080050, "AccessionNumber", "SH", S, Kind.TEXT, "accession_number"),
    _a(0x00080061, "ModalitiesInStudy", "CS", S, Kind.MULTI, "modalities_in_study"),
    _a(0x00080090, "ReferringPhysicianName", "PN", S, Kind.PN, "referring_physician_name"),
    _a(0x00081030, "StudyDescription", "LO", S, Kind.TEXT, "study_description"),
    _a(0x00200010, "StudyID", "SH", S, Kind.TEXT, "study_id"),
    _a(0x00080201, "TimezoneOffsetFromUTC", "SH", S, Kind.TEXT, "timezone_offset_from_utc"),
    _a(0x00201206, "NumberOfStudyRelatedSeries", "IS", S, Kind.INT, "number_of_series"),
    _a(0x00201208, "NumberOfStudyRelatedInstances", "IS", S, Kind.INT, "number_of_instances"),
    # Series level
    _a(0x0020000E, "SeriesInstanceUID", "UI", SE, Kind.UID, "series_uid"),
    _a(0x00080060, "Modality", "CS", SE, Kind.TEXT, "modality"),
    _a(0x00200011, "SeriesNumber", "IS", SE, Kind.INT, "series_number"),
    _a(0x0008103E, "SeriesDescription", "LO", SE, Kind.TEXT, "series_description"),
    _a(0x00180015, "BodyPartExamined", "CS", SE, Kind.TEXT, "body_part_examined"),
    _a(0x00080021, "SeriesDate", "DA", SE, Kind.DATE, "series_date"),
    _a(0x00080031, "SeriesTime", "TM", SE, Kind.TIME, "series_time"),
    _a(0x00400244, "PerformedProcedureStepStartDate", "DA", SE, Kind.DATE, "pps_start_date"),
    _a(0x00400245, "PerformedProcedureStepStartTime", "TM", SE, Kind.TIME, "pps_start_time"),
    _a(0x00080070, "Manufacturer", "LO", SE, Kind.TEXT, "manufacturer"),
    _a(0x00080080, "InstitutionName", "LO", SE, Kind.TEXT, "institution_name"),
    _a(0x00201209, "NumberOfSeriesRelatedInstances", "IS", SE, Kind.INT, "number_of_instances"),
    # Instance level
    _a(0x00080018, "SOPInstanceUID", "UI", I, Kind.UID, "sop_uid"),
    _a(0x00080016, "SOPClassUID", "UI", I, Kind.UID, "sop_class_uid"),
    _a(0x00200013, "InstanceNumber", "IS", I, Kind.INT, "instance_number"),
    _a(0x00080023, "ContentDate", "DA", I, Kind.DATE, "content_date"),
    _a(0x00080033, "ContentTime", "TM", I, Kind.TIME, "content_time"),
    _a(0x0008002A, "AcquisitionDateTime", "DT", I, Kind.DATETIME, "acquisition_datetime"),
    _a(0x00280010, "Rows", "US", I, Kind.INT, "rows"),
    _a(0x00280011, "Columns", "US", I, Kind.INT, "columns"),
    _a(0x00280100, "BitsAllocated", "US", I, Kind.INT, "bits_allocated"),
    _a(0x00280008, "NumberOfFrames", "IS", I, Kind.INT, "number_of_frames"),
    _a(0x0040A491, "CompletionFlag", "CS", I, Kind.TEXT, "completion_flag"),
    _a(0x0040A493, "VerificationFlag", "CS", I, Kind.TEXT, "verification_flag"),
)

# Attributes that are computed by the archive, not taken from the stored data set.
COMPUTED = frozenset({0x00080061, 0x00201206, 0x00201208, 0x00201209})

BY_TAG: dict[int, IndexedAttribute] = {a.tag: a for a in INDEXED}
BY_KEYWORD: dict[str, IndexedAttribute] = {a.keyword: a for a in INDEXED}


def at_level(level: Level) -> tuple[IndexedAttribute, ...]:
    """The indexed attributes stored on the rows of one level."""
    return tuple(a for a in INDEXED if a.level is level)


# Tags other than the indexed ones that QIDO returns by default (PS3.18 10.6.3.3)
SPECIFIC_CHARACTER_SET = 0x00080005
RETRIEVE_URL = 0x00081190
INSTANCE_AVAILABILITY = 0x00080056
AVAILABLE_TRANSFER_SYNTAX_UID = 0x00083002
