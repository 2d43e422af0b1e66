"""FHIR R4 ImagingStudy as a read-only projection of the DICOM archive (FHIR R4 imagingstudy.html, PS3.17 annex).

The resource is computed from the study, series and instance rows of the index at request time, so it is always
current: ``meta.versionId`` is the study row's revision (it grows with every instance stored or replaced) and
``meta.lastUpdated`` the time the study row last changed. Pure: no SQL, no HTTP. The rows come from
``server.store.imaging`` through the ``StudyIndex`` protocol; the search parameters of ``server.fhir.params`` are
translated here into ``Criteria`` the store turns into SQL.

Mapping (FHIR R4 ImagingStudy "Mappings" to DICOM, DICOM PS3.17 "DICOM ImagingStudy" / R4 implementation notes):

* ``id`` = Study Instance UID (digits and dots, at most 64 characters: a valid FHIR id, R4 2.24.0.2);
  ``identifier`` = ``urn:dicom:uid`` | ``urn:oid:<StudyInstanceUID>`` (R4 imagingstudy.html 13.1.2.1.1),
  Accession Number with type ACSN (v2-0203), Study ID as a secondary identifier;
* ``subject`` = the Patient by logical reference (Identifier: PatientID with IssuerOfPatientID as system when it is
  an OID or a URI, else the configured default system; the issuer name otherwise as ``assigner.display``),
  ``display`` = Patient's Name;
* ``started`` = StudyDate + StudyTime, in TimezoneOffsetFromUTC (0008,0201) when present, else the site's zone;
* ``endpoint`` = a contained Endpoint ``#wado`` of connection type ``dicom-wado-rs`` whose address is the
  DICOMweb base URL (R4 imagingstudy.html 13.1.2.1.2: the study is ``<address>/studies/<uid>``);
* ``series[]``: uid, number, modality (DCM), description, numberOfInstances, bodySite (BodyPartExamined,
  PS3.16 Annex L), started; ``instance[]``: uid, sopClass (``urn:ietf:rfc:3986`` | ``urn:oid:``), number.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Protocol
from zoneinfo import ZoneInfo

from server.errors import ErrorKind, ServerError
from server.fhir import params as P
from server.store.fhir import Stored

# ---- code systems and fixed values (named tables, DESIGN.md 7.4) ------------------------------------------
DICOM_UID_SYSTEM = "urn:dicom:uid"  # R4 imagingstudy.html 13.1.2.1.1
URI_SYSTEM = "urn:ietf:rfc:3986"
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED = "http://snomed.info/sct"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
STATUS_SYSTEM = "http://hl7.org/fhir/imagingstudy-status"
CONNECTION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
WADO_RS = "dicom-wado-rs"
ENDPOINT_ID = "wado"
STATUS = "available"  # every study in the archive is stored and retrievable
DEFAULT_ZONE = "Europe/Berlin"  # the network's sites: DICOM times without an offset are local times there
OID_PREFIX = "urn:oid:"
MAX_PATIENTS = 1000  # Patients a patient/subject criterion may resolve to

#: BodyPartExamined (0018,0015) defined terms -> SNOMED CT (PS3.16 Annex L), the common ones; others as text.
BODY_PART: dict[str, tuple[str, str]] = {
    "ABDOMEN": ("818983003", "Abdomen"),
    "BRAIN": ("12738006", "Brain"),
    "BREAST": ("76752008", "Breast"),
    "CHEST": ("51185008", "Thorax"),
    "HAND": ("85562004", "Hand"),
    "HEAD": ("69536005", "Head"),
    "HEART": ("80891009", "Heart"),
    "HIP": ("24136001", "Hip joint"),
    "KNEE": ("72696002", "Knee"),
    "NECK": ("45048000", "Neck"),
    "PELVIS": ("12921003", "Pelvis"),
    "SHOULDER": ("16982005", "Shoulder"),
}

#: Search parameters this projection answers; the others of PARAMS["ImagingStudy"] are INVALID here.
SUPPORTED = ("_id", "_lastUpdated", "identifier", "status", "subject", "patient", "modality", "started", "series")
#: ``_sort`` keys -> the criteria's sort keys.
SORTS = {"started": "started", "_lastUpdated": "updated", "_id": "uid"}

_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:\S+$")
_OFFSET = re.compile(r"^([+-])(\d{2})(\d{2})$")
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


# ---- rows of the index ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InstanceRow:
    """One SOP Instance of a series."""

    sop_uid: str
    sop_class_uid: str
    number: int | None = None


@dataclass(frozen=True)
class SeriesRow:
    """One series with its instances in order."""

    uid: str
    number: int | None = None
    modality: str | None = None
    description: str | None = None
    body_part: str | None = None
    date: str | None = None
    time: str | None = None
    number_of_instances: int = 0
    instances: tuple[InstanceRow, ...] = ()


@dataclass(frozen=True)
class StudyRow:
    """The index values of one study (Study Root: patient attributes included) with its series."""

    uid: str
    revision: int
    updated: datetime
    patient_name: str | None = None
    patient_id: str | None = None
    issuer: str | None = None
    date: str | None = None
    time: str | None = None
    tz_offset: str | None = None
    accession: str | None = None
    study_id: str | None = None
    description: str | None = None
    referring: str | None = None
    modalities: str | None = None
    number_of_series: int = 0
    number_of_instances: int = 0
    series: tuple[SeriesRow, ...] = ()


@dataclass(frozen=True)
class Options:
    """How studies are rendered: the WADO-RS base, the default PatientID system and the site's time zone."""

    wado_base: str = "/dicomweb"
    patient_system: str | None = None
    zone: str = DEFAULT_ZONE


# ---- rendering --------------------------------------------------------------------------------------------
def person_name(pn: str | None) -> str | None:
    """A PN value (first name's alphabetic group, PS3.5 6.2.1) as display text: prefix given middle family suffix."""
    if not pn:
        return None
    family, given, middle, prefix, suffix = (pn.split("=")[0].split("^") + [""] * 5)[:5]
    text = " ".join(p.strip() for p in (prefix, given, middle, family, suffix) if p.strip())
    return text or None


def patient_identifier(patient_id: str, issuer: str | None, default_system: str | None) -> dict:
    """The Identifier of a PatientID and its IssuerOfPatientID (PS3.3 C.7.1.1, FHIR R4 2.24.0.11 Identifier)."""
    ident: dict = {"value": patient_id}
    issuer = (issuer or "").strip()
    if not issuer:
        if default_system:
            ident = {"system": default_system, **ident}
    elif _OID.match(issuer):
        ident = {"system": OID_PREFIX + issuer, **ident}
    elif _URI.match(issuer):
        ident = {"system": issuer, **ident}
    else:
        ident["assigner"] = {"display": issuer}
    return ident


def _parse_offset(text: str | None):
    m = _OFFSET.match((text or "").strip())
    if not m:
        return None
    sign = 1 if m.group(1) == "+" else -1
    hours, minutes = int(m.group(2)), int(m.group(3))
    if hours > 14 or minutes > 59:
        return None
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def date_time(da: str | None, tm: str | None, tz_offset: str | None, zone: str) -> str | None:
    """A FHIR dateTime from DICOM DA + TM (PS3.5 6.2; TM normalised "HHMMSS[.FFFFFF]" by the index).

    With a time, FHIR R4 2.24.0.4 requires a zone: TimezoneOffsetFromUTC (PS3.3 C.12.1.1.8) when present, else
    the site's zone (DST from the tz database). Without a time, the date alone.
    """
    if not da or len(da) != 8 or not da.isdigit():
        return None
    date = f"{da[:4]}-{da[4:6]}-{da[6:]}"
    if not tm or len(tm) < 6 or not tm[:6].isdigit():
        return date
    frac = tm[7:] if len(tm) > 7 and tm[6] == "." else ""
    second = min(int(tm[4:6]), 59)  # leap second 60 is not a FHIR time
    try:
        local = datetime(int(da[:4]), int(da[4:6]), int(da[6:]), int(tm[:2]), int(tm[2:4]), second)
    except ValueError:
        return date
    tz = _parse_offset(tz_offset) or ZoneInfo(zone)
    offset = local.replace(tzinfo=tz).utcoffset()
    minutes = int(offset.total_seconds() // 60) if offset is not None else 0
    sign = "+" if minutes >= 0 else "-"
    zone_text = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    return f"{date}T{tm[:2]}:{tm[2:4]}:{second:02d}" + (f".{frac}" if frac else "") + zone_text


def instant(moment: datetime) -> str:
    """A UTC datetime as the store's fixed-width instant text (``server.fhir.params.INSTANT_FORMAT``)."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment.strftime(P.INSTANT_FORMAT).rjust(26, "0")


def endpoint(options: Options) -> dict:
    """The contained WADO-RS Endpoint (FHIR R4 endpoint.html; ImagingStudy 13.1.2.1.2)."""
    return {
        "resourceType": "Endpoint",
        "id": ENDPOINT_ID,
        "status": "active",
        "connectionType": {"system": CONNECTION_TYPE_SYSTEM, "code": WADO_RS},
        "payloadType": [{"text": "DICOM"}],
        "payloadMimeType": ["application/dicom"],
        "address": options.wado_base,
    }


def _unsigned(value: int | None) -> int | None:
    return value if isinstance(value, int) and value >= 0 else None


def _modality(code: str) -> dict:
    return {"system": DCM_SYSTEM, "code": code}


def _body_site(value: str) -> dict:
    known = BODY_PART.get(value.upper())
    if known:
        return {"system": SNOMED, "code": known[0], "display": known[1]}
    return {"display": value}


def _series(row: SeriesRow, options: Options, tz_offset: str | None) -> dict:
    out: dict = {"uid": row.uid}
    if _unsigned(row.number) is not None:
        out["number"] = row.number
    if row.modality:
        out["modality"] = _modality(row.modality)
    if row.description:
        out["description"] = row.description
    out["numberOfInstances"] = row.number_of_instances
    if row.body_part:
        out["bodySite"] = _body_site(row.body_part)
    started = date_time(row.date, row.time, tz_offset, options.zone)
    if started:
        out["started"] = started
    instances = []
    for inst in row.instances:
        item: dict = {"uid": inst.sop_uid, "sopClass": {"system": URI_SYSTEM, "code": OID_PREFIX + inst.sop_class_uid}}
        if _unsigned(inst.number) is not None:
            item["number"] = inst.number
        instances.append(item)
    if instances:
        out["instance"] = instances
    return out


def to_resource(study: StudyRow, options: Options) -> dict:
    """The ImagingStudy of a study row (FHIR R4 imagingstudy.html; mapping in this module's docstring)."""
    identifiers: list[dict] = [{"use": "official", "system": DICOM_UID_SYSTEM, "value": OID_PREFIX + study.uid}]
    if study.accession:
        identifiers.append({"use": "usual", "type": {"coding": [{"system": V2_0203, "code": "ACSN"}]},
                            "value": study.accession})
    if study.study_id:
        identifiers.append({"use": "secondary", "type": {"text": "DICOM Study ID"}, "value": study.study_id})
    subject: dict = {"type": "Patient"}
    if study.patient_id:
        subject["identifier"] = patient_identifier(study.patient_id, study.issuer, options.patient_system)
    name = person_name(study.patient_name)
    if name:
        subject["display"] = name
    if len(subject) == 1:
        subject["display"] = "unknown patient"
    resource: dict = {
        "resourceType": "ImagingStudy",
        "id": study.uid,
        "meta": {"versionId": str(study.revision), "lastUpdated": P.render_instant(instant(study.updated))},
        "contained": [endpoint(options)],
        "identifier": identifiers,
        "status": STATUS,
    }
    modalities = [m for m in (study.modalities or "").split("\\") if m]
    if modalities:
        resource["modality"] = [_modality(m) for m in modalities]
    resource["subject"] = subject
    started = date_time(study.date, study.time, study.tz_offset, options.zone)
    if started:
        resource["started"] = started
    referrer = person_name(study.referring)
    if referrer:
        resource["referrer"] = {"display": referrer}
    resource["endpoint"] = [{"reference": f"#{ENDPOINT_ID}"}]
    resource["numberOfSeries"] = study.number_of_series
    resource["numberOfInstances"] = study.number_of_instances
    if study.description:
        resource["description"] = study.description
    series = [_series(s, options, study.tz_offset) for s in study.series]
    if series:
        resource["series"] = series
    return resource


def content(study: StudyRow, options: Options) -> str:
    """The resource JSON text as the store keeps resources (compact, UTF-8)."""
    return json.dumps(to_resource(study, options), ensure_ascii=False, separators=(",", ":"))


# ---- search criteria --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Term:
    """One alternative of a criterion, in index terms.

    ``kind``: ``uid``, ``accession`` (equality on the study row), ``patient`` (PatientID ``value``
    or any when None; IssuerOfPatientID among ``issuers`` unless None, or absent when ``no_issuer``), ``modality``
    and ``series`` (a series of the study has it), ``started`` (FHIR prefix on the study's local date/time keys
    ``YYYYMMDDHHMMSS.FFFFFF``), ``updated`` (prefix on the study row's change time, UTC instants), ``all``,
    ``none``.
    """

    kind: str
    value: str | None = None
    issuers: tuple[str, ...] | None = None
    no_issuer: bool = False
    prefix: str = "eq"
    low: str | None = None
    high: str | None = None


@dataclass(frozen=True)
class Criteria:
    """A search in index terms: AND of clauses, each an OR of terms; sort keys; paging."""

    where: tuple[tuple[Term, ...], ...] = ()
    sort: tuple[tuple[str, bool], ...] = ()  # (started | updated | uid, descending)
    count: int = 20
    offset: int = 0
    summary_count: bool = False


#: Resolves a criterion on Patient (a search clause of the FHIR store) to the identifiers of the matching Patients.
PatientLookup = Callable[[P.Clause], "list[tuple[str | None, str]]"]

NOTHING = Term("none")


def _invalid(message: str, parameter: str) -> ServerError:
    return ServerError(ErrorKind.INVALID, message, parameter=parameter)


def local_key(stored_instant: str, zone: str) -> str:
    """A UTC instant (fixed-width store text) as the site's local DICOM key ``YYYYMMDDHHMMSS.FFFFFF``."""
    moment = datetime.strptime(stored_instant, P.INSTANT_FORMAT).replace(tzinfo=timezone.utc)
    try:
        local = moment.astimezone(ZoneInfo(zone))
    except (OverflowError, ValueError):
        local = moment  # the open ends (year 1 or 9999) stay as they are
    return (f"{local.year:04d}{local.month:02d}{local.day:02d}{local.hour:02d}{local.minute:02d}"
            f"{local.second:02d}.{local.microsecond:06d}")


def identifier_terms(alt: P.Alt) -> list[Term]:
    """An ``identifier`` token: the Study Instance UID (``urn:oid:``), else the Accession Number.

    The Study ID is rendered but not searched: it is not unique (often "1") and has no index.
    """
    code = alt.code
    if code is None:
        return [Term("all")] if alt.system in (DICOM_UID_SYSTEM, URI_SYSTEM) else [NOTHING]
    if alt.any_system or alt.system in (DICOM_UID_SYSTEM, URI_SYSTEM):
        if code.startswith(OID_PREFIX):
            return [Term("uid", code[len(OID_PREFIX):])]
        if not alt.any_system:
            return [Term("uid", code)]
    if alt.any_system or alt.system is None:
        return [Term("accession", code)]
    return [NOTHING]


def patient_terms(system: str | None, value: str | None, *, any_system: bool, default_system: str | None) -> Term:
    """A Patient identifier (system|value) as a match on PatientID and IssuerOfPatientID (inverse of
    ``patient_identifier``)."""
    if any_system or not system:
        return Term("patient", value)
    if system.startswith(OID_PREFIX):
        return Term("patient", value, issuers=(system[len(OID_PREFIX):], system))
    return Term("patient", value, issuers=(system,), no_issuer=system == default_system)


def _reference_terms(clause: P.Clause, options: Options, patients: PatientLookup) -> list[Term]:
    if clause.kind == "chain":
        inner = clause.chain
        if clause.target != "Patient" or inner is None:
            return [NOTHING]
        if inner.param == "identifier" and inner.modifier is None:
            return [patient_terms(a.system, a.code, any_system=a.any_system, default_system=options.patient_system)
                    for a in inner.alts]
        found = patients(inner)
    else:
        ids = []
        for alt in clause.alts:
            rtype = alt.system if not alt.any_system else (clause.target or "Patient")
            if rtype == "Patient" and alt.code:
                ids.append(alt.code)
        if not ids:
            return [NOTHING]
        found = patients(P.Clause("_id", "id", None, tuple(P.Alt(code=i) for i in ids)))
    terms = [patient_terms(s, v, any_system=not s, default_system=options.patient_system) for s, v in found]
    return terms or [NOTHING]


def _date_terms(clause: P.Clause, kind: str, zone: str | None) -> list[Term]:
    out = []
    for alt in clause.alts:
        low, high = alt.low, alt.high
        if zone is not None:
            low, high = local_key(low, zone), local_key(high, zone)
        out.append(Term(kind, prefix=alt.prefix, low=low, high=high))
    return out


def _clause_terms(clause: P.Clause, options: Options, patients: PatientLookup) -> list[Term]:
    name = clause.param
    if name not in SUPPORTED:
        raise _invalid(f"search parameter {name!r} is not supported for ImagingStudy (a projection of the "
                       f"DICOM archive; supported: {', '.join(SUPPORTED)})", name)
    if clause.modifier is not None:
        raise _invalid(f"modifier :{clause.modifier} is not supported on ImagingStudy.{name}",
                       f"{name}:{clause.modifier}")
    if name == "_id":
        return [Term("uid", a.code) for a in clause.alts if a.code]
    if name == "_lastUpdated":
        return _date_terms(clause, "updated", None)
    if name == "started":
        return _date_terms(clause, "started", options.zone)
    if name == "identifier":
        return [t for a in clause.alts for t in identifier_terms(a)]
    if name == "status":
        return [Term("all") if a.code == STATUS and (a.any_system or a.system in (None, STATUS_SYSTEM)) else NOTHING
                for a in clause.alts]
    if name == "modality":
        return [Term("modality", a.code) if a.code and (a.any_system or a.system == DCM_SYSTEM) else NOTHING
                for a in clause.alts]
    if name == "series":
        return [Term("series", a.code) if a.code and (a.any_system or a.system is None) else NOTHING
                for a in clause.alts]
    return _reference_terms(clause, options, patients)  # subject, patient


def criteria(query: P.Query, options: Options, patients: PatientLookup) -> Criteria:
    """The index criteria of a parsed ImagingStudy search (FHIR R4 3.1.1; parameters of imagingstudy.html 13.1.5).

    Unsupported parameters, modifiers and sort keys are INVALID, naming the parameter.
    """
    where = tuple(tuple(_clause_terms(c, options, patients)) or (NOTHING,) for c in query.clauses)
    sort = []
    for key, _kind, desc in query.sort:
        if key not in SORTS:
            raise _invalid(f"cannot sort ImagingStudy by {key!r} (supported: {', '.join(SORTS)})", "_sort")
        sort.append((SORTS[key], desc))
    return Criteria(where, tuple(sort), query.count, query.offset, query.summary_count)


# ---- the projection ---------------------------------------------------------------------------------------
class StudyIndex(Protocol):
    """The reads of the DICOM index the projection needs (``server.store.imaging.ImagingIndex``)."""

    def study(self, tenant: str, uid: str) -> StudyRow | None:
        """The study with this Study Instance UID, with its series and instances."""

    def search(self, tenant: str, criteria: Criteria) -> tuple[int, list[StudyRow]]:
        """(total, page) of the studies matching ``criteria``, with their series and instances."""

    def patients(self, tenant: str, clause: P.Clause) -> list[tuple[str | None, str]]:
        """The (system, value) identifiers of the FHIR Patients matching ``clause``."""


@dataclass
class ImagingStudyProjection:
    """ImagingStudy read and search-type over the DICOM index (``server.fhir.service.Projection``)."""

    index: StudyIndex
    options: Options = field(default_factory=Options)

    def _stored(self, row: StudyRow) -> Stored:
        return Stored("ImagingStudy", row.uid, row.revision, instant(row.updated), False, content(row, self.options))

    def read(self, tenant: str, rid: str) -> Stored | None:
        """The current ImagingStudy ``rid`` (a Study Instance UID) of ``tenant``, or None (FHIR R4 3.1.0.2)."""
        if not _ID.match(rid):
            return None
        row = self.index.study(tenant, rid)
        return self._stored(row) if row is not None else None

    def search(self, tenant: str, query: P.Query) -> tuple[int, list[Stored]]:
        """(total, page) of the ImagingStudy resources of ``tenant`` matching ``query`` (FHIR R4 3.1.1)."""
        found = criteria(query, self.options, lambda clause: self.index.patients(tenant, clause))
        total, rows = self.index.search(tenant, found)
        return total, [self._stored(r) for r in rows]

