"""De-identification of DICOM instances for "anonymised" teleconsult sends, and re-linking of replies.

PS3.15 Annex E: the Basic Application Level Confidentiality Profile (E.1) with the Retain Longitudinal
Temporal Information (E.3.6), Retain Patient Characteristics (E.3.7), Retain Device Identity (E.3.8),
Retain UIDs (E.3.9), Retain Institution Identity (E.3.12) and Clean Descriptors (E.3.5) options. The
actions per attribute come from Table E.1-1 as data (``data/confidentiality_profile.json``, edition and
provenance in its ``source``); this module only interprets them. Pure: bytes in, bytes out, no I/O
besides reading that packaged table once.

A :class:`Pseudonymizer` serves one transfer (one study or several of one patient): it replaces every
UID consistently (the same original gives the same new UID, in the data set, inside sequences, in
references and in the file meta information), derives the UIDs under ``2.25.`` from a keyed hash of
the original (so a retry gives the same UIDs) and gives the patient a pseudonym. What the sender keeps
to re-link replies is :attr:`Pseudonymizer.mapping` (a :class:`PseudonymMap`, JSON-serialisable; it is
never sent). :func:`relink` applies it in reverse to an instance that comes back.

Choices where Table E.1-1 leaves them to the implementation (E.1.1, Table E.1-1a):

* Compound codes keep the attribute rather than remove it, so that the result conforms to the IOD
  whether the attribute is Type 1, 2 or 3 there (this module carries no IOD tables): ``X/Z`` -> Z,
  ``X/D``, ``Z/D``, ``X/Z/D`` -> D, ``X/Z/U*`` -> U (the sequence is kept, the UIDs in it replaced).
  None of them leaves an original value behind.
* D on a sequence (e.g. Content Sequence) keeps the sequence and de-identifies its items recursively;
  D on a UI attribute is U. Patient's Name and Patient ID (Z, Z/D) get the pseudonym.
* C (Clean Descriptors, Retain Patient Characteristics / Device Identity) keeps a text value after
  removing the identifying strings this instance carried (patient name components, patient IDs,
  accession number, birth date); a sequence is cleaned recursively; other VRs are kept. This catches
  what a sender can know to look for, not free text that names a person some other way.
* C under Retain Longitudinal Modified Dates shifts DA and the date part of DT by ``date_shift_days``
  (derived from the secret when 0), keeping times (a whole-day shift leaves them unchanged).
* Private attributes are removed (Basic Profile; Retain Safe Private is not offered), as are the whole
  overlay groups 60xx when Overlay Data goes (the Overlay Plane module is invalid without it), curve
  groups 50xx, group length elements and the AE titles of the file meta information (0002,0016-0018).
* Pixel data is untouched: a ``BurnedInAnnotation`` of YES, or none on a Secondary Capture instance,
  sets :attr:`Deidentified.burned_in_annotation` so the caller can warn (Clean Pixel Data is not done).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import io
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType
from typing import Any, Literal

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from server.errors import ErrorKind, ServerError

__all__ = [
    "DEID_CODES",
    "EXCLUDE_BURNED_IN",
    "METHOD_CODES",
    "OPTION_CODES",
    "Deidentified",
    "Options",
    "PatientLink",
    "Profile",
    "PseudonymMap",
    "Pseudonymizer",
    "Rule",
    "effective_action",
    "has_burned_in_annotation",
    "load_profile",
    "options_from_codes",
    "parse_profile",
    "relink",
    "rule_for",
    "send_option_codes",
]

PROFILE_RESOURCE = "data/confidentiality_profile.json"

# PS3.15 Table E.1-1a: how this module resolves the compound codes (see the module docstring).
COMPOUND_ACTIONS: Mapping[str, str] = MappingProxyType(
    {"X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "D", "X/Z/U*": "U"}
)

# PS3.16 CID 7050 De-identification Method (scheme DCM): option name -> (code value, code meaning).
METHOD_CODES: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "basic": ("113100", "Basic Application Confidentiality Profile"),
        "clean_pixel_data": ("113101", "Clean Pixel Data Option"),
        "clean_graphics": ("113103", "Clean Graphics Option"),
        "clean_structured_content": ("113104", "Clean Structured Content Option"),
        "clean_descriptors": ("113105", "Clean Descriptors Option"),
        "retain_longitudinal_full_dates": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
        "retain_longitudinal_modified_dates": (
            "113107",
            "Retain Longitudinal Temporal Information Modified Dates Option",
        ),
        "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
        "retain_device_identity": ("113109", "Retain Device Identity Option"),
        "retain_uids": ("113110", "Retain UIDs Option"),
        "retain_safe_private": ("113111", "Retain Safe Private Option"),
        "retain_institution_identity": ("113112", "Retain Institution Identity Option"),
    }
)
CODING_SCHEME = "DCM"

# PS3.3 C.12.1 SOP Common Module, Longitudinal Temporal Information Modified (0028,0303); PS3.15 E.3.6.
LONGITUDINAL_FLAG: Mapping[str, str] = MappingProxyType(
    {"off": "REMOVED", "full": "UNMODIFIED", "modified": "MODIFIED"}
)

# Dummy values per VR for action D (PS3.15 E.1.1: "consistent with the VR"); UI and SQ are handled apart.
#: Free content of SR content items (PS3.3 C.17.3 / Table C.17-5 value types) that Table E.1-1 has no row for:
#: Text Value, Person Name, DateTime, Date, Time. Inside a sequence the table says D for, they are D as well.
STRUCTURED_CONTENT = frozenset({0x0040A160, 0x0040A123, 0x0040A120, 0x0040A121, 0x0040A122})

DUMMY_BY_VR: Mapping[str, Any] = MappingProxyType(
    {
        "AE": "ANONYMOUS", "AS": "000D", "CS": "ANONYMIZED", "DA": "19000101", "DT": "19000101000000",
        "TM": "000000", "DS": "0", "IS": "0", "LO": "ANONYMIZED", "LT": "ANONYMIZED", "PN": "ANONYMIZED",
        "SH": "ANONYMIZED", "ST": "ANONYMIZED", "UC": "ANONYMIZED", "UT": "ANONYMIZED", "UR": "urn:anonymized",
        "FL": 0.0, "FD": 0.0, "SL": 0, "SS": 0, "SV": 0, "UL": 0, "US": 0, "UV": 0, "AT": 0,
        "OB": b"\x00\x00", "OD": b"\x00" * 8, "OF": b"\x00" * 4, "OL": b"\x00" * 4, "OV": b"\x00" * 8,
        "OW": b"\x00\x00", "UN": b"\x00\x00",
    }
)
TEXT_VRS = frozenset({"LO", "LT", "SH", "ST", "UC", "UT", "PN"})

SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # PS3.4 B.5: SC Image and the multi-frame SC classes
FILE_META_DROPPED = (0x00020016, 0x00020017, 0x00020018)  # Source / Sending / Receiving AE Title (PS3.10 7.1)

PATIENT_NAME = 0x00100010
PATIENT_ID = 0x00100020
OTHER_PATIENT_IDS = 0x00101000
ACCESSION_NUMBER = 0x00080050
PATIENT_BIRTH_DATE = 0x00100030
MEDIA_STORAGE_SOP_INSTANCE_UID = 0x00020003
PIXEL_DATA_GROUP = 0x7FE0
OVERLAY_DATA_ELEMENT = 0x3000


# ---------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Rule:
    """One row of PS3.15 Table E.1-1: the Basic Profile action and the option columns that differ."""

    tag: int
    keyword: str
    name: str
    vr: str
    basic: str
    options: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Profile:
    """PS3.15 Table E.1-1 as loaded: rules by tag, repeating-group rules (50xx, 60xx) and the edition."""

    edition: str
    rules: Mapping[int, Rule]
    repeating: tuple[tuple[int, int, int, Rule], ...]  # (group mask, group value, element or -1, rule)
    private: Rule


def _rule(entry: Mapping[str, Any], tag: int) -> Rule:
    return Rule(
        tag=tag,
        keyword=entry.get("keyword", ""),
        name=entry["name"],
        vr=entry.get("vr", ""),
        basic=entry["basic"],
        options=MappingProxyType(dict(entry.get("options", {}))),
    )


def parse_profile(document: Mapping[str, Any]) -> Profile:
    """Build a :class:`Profile` from the JSON form of PS3.15 Table E.1-1 (``confidentiality_profile.json``)."""
    rules = {int(e["tag"], 16): _rule(e, int(e["tag"], 16)) for e in document["attributes"]}
    repeating = []
    for entry in document["repeating_groups"]:
        text = entry["tag"].lower()  # "50xxxxxx" or "60xx3000": the xx are the free group bits
        group, element = text[:4], text[4:]
        mask = int("".join("0" if c == "x" else "f" for c in group), 16)
        value = int(group.replace("x", "0"), 16)
        elem = -1 if "x" in element else int(element, 16)
        repeating.append((mask, value, elem, _rule(entry, (value << 16) | max(elem, 0))))
    private = _rule(document["private_attributes"], 0)
    return Profile(document["source"]["edition"], MappingProxyType(rules), tuple(repeating), private)


@functools.cache
def load_profile() -> Profile:
    """The packaged PS3.15 Table E.1-1 (read once; immutable)."""
    text = resources.files("server.dicom").joinpath(PROFILE_RESOURCE).read_text(encoding="utf-8")
    return parse_profile(json.loads(text))


def rule_for(profile: Profile, tag: int) -> Rule | None:
    """The Table E.1-1 row that governs ``tag``, if any (PS3.15 E.1.1; private: E.3.10)."""
    rule = profile.rules.get(tag)
    if rule is not None:
        return rule
    group, element = tag >> 16, tag & 0xFFFF
    if group & 1:
        return profile.private
    for mask, value, elem, rep in profile.repeating:
        if group & mask == value and elem in (-1, element):
            return rep
    return None


# -------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    """The Annex E options a transfer uses (PS3.15 E.3); the Basic Profile always applies (E.1).

    ``retain_longitudinal``: "off" (dates removed), "full" (E.3.6 Full Dates: kept) or "modified"
    (E.3.6 Modified Dates: shifted by ``date_shift_days``; 0 derives the shift from the secret).
    """

    clean_descriptors: bool = False
    retain_longitudinal: Literal["off", "full", "modified"] = "off"
    date_shift_days: int = 0
    retain_patient_characteristics: bool = False
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    retain_uids: bool = False

    def __post_init__(self) -> None:
        if self.retain_longitudinal not in LONGITUDINAL_FLAG:
            raise ServerError(ErrorKind.INVALID, f"retain_longitudinal must be one of {sorted(LONGITUDINAL_FLAG)}")

    def columns(self) -> tuple[str, ...]:
        """The Table E.1-1 option columns these options switch on, in the table's order."""
        names = []
        if self.retain_uids:
            names.append("retain_uids")
        if self.retain_device_identity:
            names.append("retain_device_identity")
        if self.retain_institution_identity:
            names.append("retain_institution_identity")
        if self.retain_patient_characteristics:
            names.append("retain_patient_characteristics")
        if self.retain_longitudinal == "full":
            names.append("retain_longitudinal_full_dates")
        elif self.retain_longitudinal == "modified":
            names.append("retain_longitudinal_modified_dates")
        if self.clean_descriptors:
            names.append("clean_descriptors")
        return tuple(names)

    def to_json(self) -> dict[str, Any]:
        """The options as a JSON object (kept in :class:`PseudonymMap`)."""
        return {
            "clean_descriptors": self.clean_descriptors,
            "retain_longitudinal": self.retain_longitudinal,
            "date_shift_days": self.date_shift_days,
            "retain_patient_characteristics": self.retain_patient_characteristics,
            "retain_device_identity": self.retain_device_identity,
            "retain_institution_identity": self.retain_institution_identity,
            "retain_uids": self.retain_uids,
        }


#: The send-option codes (CodeSystem send-option) of the PS3.15 E.3 options and the :class:`Options` field and
#: value each sets: E.3.5 Clean Descriptors, E.3.6 Retain Longitudinal Temporal Information (Full Dates,
#: Modified Dates: the shift derived from the secret), E.3.7 Patient Characteristics, E.3.8 Device Identity,
#: E.3.12 Institution Identity.
OPTION_CODES: Mapping[str, tuple[str, Any]] = MappingProxyType(
    {
        "clean-descriptors": ("clean_descriptors", True),
        "retain-longitudinal-full-dates": ("retain_longitudinal", "full"),
        "retain-longitudinal-modified-dates": ("retain_longitudinal", "modified"),
        "retain-patient-characteristics": ("retain_patient_characteristics", True),
        "retain-device-identity": ("retain_device_identity", True),
        "retain-institution-identity": ("retain_institution_identity", True),
    }
)
#: Send-option code: instances whose pixel data may carry burned-in identity are not sent (PS3.15 E.3.1 Clean
#: Pixel Data is not done; :func:`has_burned_in_annotation`).
EXCLUDE_BURNED_IN = "exclude-burned-in"
#: Every send-option code that refines an anonymised send.
DEID_CODES = frozenset({*OPTION_CODES, EXCLUDE_BURNED_IN})


def options_from_codes(codes: Iterable[str]) -> Options:
    """The :class:`Options` of send-option codes (:data:`OPTION_CODES`; other codes are ignored). Both
    variants of E.3.6 Retain Longitudinal Temporal Information are INVALID (PS3.15 E.3.6: one or the other)."""
    values: dict[str, Any] = {}
    for code in sorted(set(codes) & OPTION_CODES.keys()):
        name, value = OPTION_CODES[code]
        if values.get(name, value) != value:
            raise ServerError(ErrorKind.INVALID, "retain-longitudinal-full-dates and "
                              "retain-longitudinal-modified-dates exclude each other (PS3.15 E.3.6)")
        values[name] = value
    return Options(**values)


def send_option_codes(spec: str | None) -> frozenset[str]:
    """The de-identification codes of a comma-separated list (e.g. a site's defaults); INVALID for a code that
    is not one of :data:`DEID_CODES` or for both E.3.6 variants."""
    codes = frozenset(c for c in (s.strip() for s in (spec or "").split(",")) if c)
    unknown = sorted(codes - DEID_CODES)
    if unknown:
        raise ServerError(ErrorKind.INVALID, f"unknown de-identification option {', '.join(unknown)} (one of "
                          f"{', '.join(sorted(DEID_CODES))})")
    options_from_codes(codes)
    return codes


def effective_action(rule: Rule, columns: Iterable[str]) -> str:
    """The action for ``rule`` under the enabled option columns (PS3.15 E.3: an option's K or C
    replaces the Basic Profile's action; K wins over C where two enabled options disagree)."""
    chosen = [rule.options[c] for c in columns if c in rule.options]
    if "K" in chosen:
        return "K"
    if "C" in chosen:
        return "C"
    return COMPOUND_ACTIONS.get(rule.basic, rule.basic)


# ---------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class PatientLink:
    """An original patient identity and the pseudonym it was sent under."""

    original_name: str
    original_id: str
    pseudonym_name: str
    pseudonym_id: str


@dataclass(frozen=True)
class PseudonymMap:
    """What the sending site keeps (never sends) to re-link replies: UIDs, patients, date shift."""

    uids: Mapping[str, str]  # original UID -> new UID
    patients: tuple[PatientLink, ...]
    date_shift_days: int
    options: Options
    edition: str

    def to_json(self) -> dict[str, Any]:
        """The map as a JSON object."""
        return {
            "uids": dict(self.uids),
            "patients": [
                {"original_name": p.original_name, "original_id": p.original_id,
                 "pseudonym_name": p.pseudonym_name, "pseudonym_id": p.pseudonym_id}
                for p in self.patients
            ],
            "date_shift_days": self.date_shift_days,
            "options": self.options.to_json(),
            "profile_edition": self.edition,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PseudonymMap:
        """Read the JSON object written by :meth:`to_json`."""
        try:
            return cls(
                uids=MappingProxyType({str(k): str(v) for k, v in data["uids"].items()}),
                patients=tuple(PatientLink(**p) for p in data["patients"]),
                date_shift_days=int(data["date_shift_days"]),
                options=Options(**data["options"]),
                edition=str(data.get("profile_edition", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ServerError(ErrorKind.INVALID, "malformed pseudonym map") from exc


@dataclass(frozen=True)
class Deidentified:
    """One de-identified instance (PS3.10 bytes) with its new UIDs and the burned-in annotation flag."""

    data: bytes
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    burned_in_annotation: bool


# --------------------------------------------------------------------------------------------- helpers


def _read(data: bytes) -> Dataset:
    """Parse PS3.10 bytes; anything unreadable is INVALID."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.file_meta.TransferSyntaxUID  # noqa: B018 - a Part 10 file has one
    except Exception as exc:  # pydicom raises many kinds on malformed input
        raise ServerError(ErrorKind.INVALID, "not a readable DICOM PS3.10 file") from exc
    return ds


def _write(ds: Dataset) -> bytes:
    """Encode as PS3.10 in the original transfer syntax."""
    buf = io.BytesIO()
    try:
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    except Exception as exc:
        raise ServerError(ErrorKind.INVALID, "the instance cannot be re-encoded after de-identification") from exc
    return buf.getvalue()


def _values(elem: DataElement) -> list[Any]:
    value = elem.value
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def _map_values(elem: DataElement, fn: Callable[[str], str]) -> None:
    """Replace each value of a string element by ``fn(value)`` (bytes of a UN element: as text)."""
    if isinstance(elem.value, bytes):
        text = elem.value.decode("ascii", "replace").rstrip("\x00 ")
        mapped = "\\".join(fn(v) for v in text.split("\\")) if text else ""
        elem.value = mapped.encode("ascii", "replace") + (b"\x00" if len(mapped) % 2 else b"")
        return
    values = [fn(str(v)) for v in _values(elem)]
    elem.value = values if len(values) > 1 else (values[0] if values else "")


def _is_sequence(elem: DataElement) -> bool:
    return elem.VR == "SQ"


def _shift_date(value: str, days: int) -> str:
    """Shift a DA value (or the date part of a DT) by ``days``; unparseable values become empty."""
    text = value.strip()
    if len(text) < 8:
        return text if re.fullmatch(r"\d{4}(\d{2})?", text) else ""
    try:
        day = dt.datetime.strptime(text[:8], "%Y%m%d").date()
    except ValueError:
        return ""
    return (day + dt.timedelta(days=days)).strftime("%Y%m%d") + text[8:]


# ------------------------------------------------------------------------------------------ pseudonymizer


class Pseudonymizer:
    """De-identifies the instances of one transfer consistently (PS3.15 E.1, E.3).

    ``secret`` keys the UID and pseudonym derivation (the same secret gives the same results, so a
    retry sends the same UIDs); ``patient_name``/``patient_id`` set the pseudonym explicitly,
    otherwise it is derived from the secret and the original patient ID. One instance serves one
    transfer from one task (it accumulates the map; not thread-safe); the work is CPU-bound, so an
    async caller runs :meth:`deidentify` in a worker thread (DESIGN.md 7.12).
    """

    def __init__(
        self,
        secret: bytes,
        *,
        patient_name: str | None = None,
        patient_id: str | None = None,
        options: Options = Options(),  # noqa: B008 - frozen, so a shared default is safe
        profile: Profile | None = None,
    ) -> None:
        if not secret:
            raise ServerError(ErrorKind.INVALID, "a de-identification secret is required")
        self._secret = bytes(secret)
        self._patient_name = patient_name
        self._patient_id = patient_id
        self._options = options
        self._profile = profile or load_profile()
        self._columns = options.columns()
        self._uids: dict[str, str] = {}
        self._patients: dict[tuple[str, str], PatientLink] = {}
        self._shift = options.date_shift_days or self._derived_shift()

    # -- derivations --------------------------------------------------------------------------

    def _digest(self, purpose: bytes, value: str) -> bytes:
        return hmac.new(self._secret, purpose + b"\x00" + value.encode("utf-8"), hashlib.sha256).digest()

    def _derived_shift(self) -> int:
        """A shift of 30 to 395 days into the past, fixed by the secret (E.3.6 Modified Dates)."""
        return -(30 + int.from_bytes(self._digest(b"date-shift", ""), "big") % 366)

    def new_uid(self, uid: str) -> str:
        """The replacement UID for ``uid``: ``2.25.`` + 128 bits of a keyed hash (PS3.5 B.2, E.1.1 U)."""
        uid = uid.strip().rstrip("\x00")
        if not uid:
            return uid
        if self._options.retain_uids:
            return uid
        new = self._uids.get(uid)
        if new is None:
            new = "2.25." + str(int.from_bytes(self._digest(b"uid", uid)[:16], "big"))
            self._uids[uid] = new
        return new

    def patient_link(self, name: str, pid: str) -> PatientLink:
        """The pseudonym this transfer gives the patient ``name``/``pid`` (remembered in :attr:`mapping`), e.g.
        to rebuild the map of an earlier transfer with the same secret for :func:`relink`."""
        return self._patient(name, pid)

    def _patient(self, name: str, pid: str) -> PatientLink:
        key = (name, pid)
        link = self._patients.get(key)
        if link is None:
            h = self._digest(b"patient", pid or name).hex().upper()
            link = PatientLink(
                original_name=name,
                original_id=pid,
                pseudonym_name=self._patient_name if self._patient_name is not None else f"PSEUDONYM^{h[:10]}",
                pseudonym_id=self._patient_id if self._patient_id is not None else f"PSN-{h[:16]}",
            )
            self._patients[key] = link
        return link

    @property
    def mapping(self) -> PseudonymMap:
        """A snapshot of what the sender keeps to re-link replies (never sent)."""
        return PseudonymMap(
            uids=MappingProxyType(dict(self._uids)),
            patients=tuple(self._patients.values()),
            date_shift_days=self._shift if self._options.retain_longitudinal == "modified" else 0,
            options=self._options,
            edition=self._profile.edition,
        )

    # -- the work -----------------------------------------------------------------------------

    def deidentify(self, data: bytes) -> Deidentified:
        """De-identify one PS3.10 instance per PS3.15 E.1 and the enabled E.3 options."""
        ds = _read(data)
        name = str(ds.get("PatientName", "") or "")
        pid = str(ds.get("PatientID", "") or "")
        link = self._patient(name, pid)
        needles = _needles(ds)
        burned_in = _burned_in(ds)

        self._clean(ds, needles)

        ds.PatientName = link.pseudonym_name
        ds.PatientID = link.pseudonym_id
        self._mark(ds)
        self._file_meta(ds)
        return Deidentified(
            data=_write(ds),
            study_instance_uid=str(ds.get("StudyInstanceUID", "")),
            series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
            sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
            burned_in_annotation=burned_in,
        )

    def _clean(self, ds: Dataset, needles: tuple[str, ...], structured: bool = False) -> None:
        """Apply the table to every element of ``ds``, recursing into sequences (PS3.15 E.1.1). ``structured``: an
        item of a sequence the table says D for (e.g. Content Sequence): its free content (``STRUCTURED_CONTENT``,
        rows the table does not list) is D too, dates are C under Modified Dates (E.3.3 Clean Structured Content is
        not offered, so no original text survives; codes and references stay, which KOS and SR need)."""
        overlay_groups = set()
        for tag in list(ds.keys()):
            tag = int(tag)
            group, element = tag >> 16, tag & 0xFFFF
            if group == PIXEL_DATA_GROUP:
                continue
            if element == 0x0000:  # group length: stale once elements go (retired, PS3.5 7.2)
                del ds[tag]
                continue
            rule = rule_for(self._profile, tag)
            elem = ds[tag]
            action = effective_action(rule, self._columns) if rule is not None else "K"
            if structured and rule is None and tag in STRUCTURED_CONTENT:
                action = "C" if self._options.retain_longitudinal == "modified" and elem.VR in ("DA", "DT") else "D"
            if action == "X" and group & 0xFF00 == 0x6000 and element == OVERLAY_DATA_ELEMENT:
                overlay_groups.add(group)
            self._apply(ds, tag, elem, action, needles)
        for tag in [int(t) for t in ds.keys() if (int(t) >> 16) in overlay_groups]:
            del ds[tag]

    def _apply(self, ds: Dataset, tag: int, elem: DataElement, action: str, needles: tuple[str, ...]) -> None:
        """One PS3.15 E.1.1 action on one element (compound codes already resolved)."""
        if action == "X":
            del ds[tag]
        elif action == "Z":
            elem.value = Sequence() if _is_sequence(elem) else (b"" if elem.VR in ("OB", "OW", "UN") else None)
        elif _is_sequence(elem):  # D, U, K, C on a sequence: keep it, clean its items
            for item in elem.value:
                self._clean(item, needles, structured=action == "D")
        elif action == "U" or elem.VR == "UI":
            if action in ("U", "D"):
                _map_values(elem, self.new_uid)
        elif action == "D":
            elem.value = DUMMY_BY_VR.get(elem.VR, b"\x00\x00" if isinstance(elem.value, bytes) else "ANONYMIZED")
        elif action == "C":
            self._cleaned(elem, needles)

    def _cleaned(self, elem: DataElement, needles: tuple[str, ...]) -> None:
        """Action C (PS3.15 E.3.5, E.3.6, E.3.7, E.3.8) on a non-sequence element."""
        if self._options.retain_longitudinal == "modified" and elem.VR in ("DA", "DT"):
            _map_values(elem, lambda v: _shift_date(v, self._shift))
        elif elem.VR in TEXT_VRS:
            _map_values(elem, lambda v: _scrub(v, needles))

    def _mark(self, ds: Dataset) -> None:
        """Record the de-identification (PS3.15 E.1.1; PS3.3 C.7.1.1 Patient Module; CID 7050 in PS3.16)."""
        methods = ("basic", *self._options.columns())
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = [METHOD_CODES[m][1] for m in methods]
        items = []
        for m in methods:
            item = Dataset()
            item.CodeValue, item.CodeMeaning = METHOD_CODES[m]
            item.CodingSchemeDesignator = CODING_SCHEME
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        ds.LongitudinalTemporalInformationModified = LONGITUDINAL_FLAG[self._options.retain_longitudinal]

    def _file_meta(self, ds: Dataset) -> None:
        """Make the file meta information agree with the de-identified data set (PS3.10 7.1)."""
        meta: FileMetaDataset = ds.file_meta
        for tag in FILE_META_DROPPED:
            if tag in meta:
                del meta[tag]
        if "SOPInstanceUID" in ds:  # already replaced; PS3.10 7.1 wants the two equal
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        elif MEDIA_STORAGE_SOP_INSTANCE_UID in meta:
            meta.MediaStorageSOPInstanceUID = self.new_uid(str(meta.MediaStorageSOPInstanceUID))
        if "SOPClassUID" in ds and not meta.get("MediaStorageSOPClassUID"):
            meta.MediaStorageSOPClassUID = ds.SOPClassUID


def _needles(ds: Dataset) -> tuple[str, ...]:
    """The identifying strings of this instance that C (clean) removes from kept text (PS3.15 E.3.5)."""
    found: set[str] = set()
    name = str(ds.get("PatientName", "") or "")
    found.update(p for p in re.split(r"[\^=\s,]+", name) if len(p) >= 2)
    for kw in ("PatientID", "OtherPatientIDs", "AccessionNumber", "IssuerOfPatientID"):
        elem = ds.get(kw)
        if elem is not None:
            found.update(str(v) for v in (elem if isinstance(elem, MultiValue) else [elem]) if len(str(v)) >= 2)
    birth = str(ds.get("PatientBirthDate", "") or "")
    if len(birth) == 8 and birth.isdigit():
        found.update({birth, f"{birth[6:8]}.{birth[4:6]}.{birth[:4]}", f"{birth[:4]}-{birth[4:6]}-{birth[6:8]}"})
    return tuple(sorted(found, key=len, reverse=True))


def identity_strings(data: bytes, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The identifying strings of an instance's patient (names, IDs, accession number, birth date in its written
    forms) and ``extra`` ones (e.g. from the EHR's Patient), longest first: what ``scrub_text`` removes."""
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    found = set(_needles(ds)) | {e.strip() for e in extra if len(e.strip()) >= 2}
    return tuple(sorted(found, key=len, reverse=True))


def scrub_text(text: str, needles: tuple[str, ...]) -> str:
    """Free text (an order's note or reason) without the identifying strings, each replaced by ``***``: the
    Clean Descriptors rule (PS3.15 E.3.5) applied to text that travels beside an anonymised study."""
    return _scrub(text, needles)


def _scrub(text: str, needles: tuple[str, ...]) -> str:
    """``text`` without the identifying strings (case-insensitive, whole words only)."""
    for needle in needles:
        text = re.sub(rf"(?<![0-9A-Za-z]){re.escape(needle)}(?![0-9A-Za-z])", "***", text, flags=re.IGNORECASE)
    return text


def _burned_in(ds: Dataset) -> bool:
    """Whether the pixel data may carry burned-in identity (PS3.3 C.7.6.1 General Image; SC: PS3.3 A.8)."""
    return has_burned_in_annotation(ds.get("BurnedInAnnotation"), str(ds.get("SOPClassUID", "")))


def has_burned_in_annotation(value: Any, sop_class_uid: str) -> bool:
    """Whether an instance's pixel data may carry burned-in identity: Burned In Annotation (0028,0301) YES, or
    none on a Secondary Capture instance (PS3.3 C.7.6.1 General Image Module; PS3.3 A.8 SC Image IODs)."""
    text = str(value or "").strip().upper()
    if text:
        return text == "YES"
    return str(sop_class_uid).startswith(SECONDARY_CAPTURE_PREFIX)


# ---------------------------------------------------------------------------------------------- relink


def relink(data: bytes, mapping: PseudonymMap) -> bytes:
    """Apply ``mapping`` in reverse to an instance that comes back (reply, report, KOS): pseudonymised
    UIDs anywhere (data set, sequences, file meta) become the originals again, the pseudonym the
    original patient. UIDs the map does not know (the reply's own) stay. PS3.15 E.1 ("re-identification
    by the de-identifier"), Patient Identity Removed (PS3.3 C.7.1.1) becomes NO."""
    ds = _read(data)
    inverse = {new: old for old, new in mapping.uids.items()}
    by_id = {p.pseudonym_id: p for p in mapping.patients}
    by_name = {p.pseudonym_name: p for p in mapping.patients}
    restored = _relink_dataset(ds, inverse, by_id, by_name)
    meta = ds.file_meta
    if MEDIA_STORAGE_SOP_INSTANCE_UID in meta:
        old = inverse.get(str(meta.MediaStorageSOPInstanceUID))
        if old:
            meta.MediaStorageSOPInstanceUID = old
    if mapping.date_shift_days and str(ds.get("StudyInstanceUID", "")) in inverse.values():
        _unshift_study_dates(ds, mapping.date_shift_days)
    if restored and "PatientIdentityRemoved" in ds:
        ds.PatientIdentityRemoved = "NO"
        for kw in ("DeidentificationMethod", "DeidentificationMethodCodeSequence"):
            if kw in ds:
                delattr(ds, kw)
    return _write(ds)


#: The study's own dates a reply repeats from the de-identified copy (PS3.3 C.7.2.1 General Study); a reply's
#: own dates (Content Date, Series Date of the report) are the consultant's real ones and stay as they are.
STUDY_DATES = ("StudyDate",)


def _unshift_study_dates(ds: Dataset, days: int) -> None:
    """Undo the Modified Dates shift (PS3.15 E.3.6) on the study dates of a re-linked reply."""
    for keyword in STUDY_DATES:
        value = str(ds.get(keyword, "") or "")
        if value:
            setattr(ds, keyword, _shift_date(value, -days))


def _relink_dataset(
    ds: Dataset, inverse: Mapping[str, str], by_id: Mapping[str, PatientLink], by_name: Mapping[str, PatientLink]
) -> bool:
    restored = False
    pid = str(ds.get("PatientID", "") or "")
    name = str(ds.get("PatientName", "") or "")
    link = by_id.get(pid) or (by_name.get(name) if name else None)
    if link is not None:
        ds.PatientID = link.original_id
        ds.PatientName = link.original_name
        restored = True
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                restored |= _relink_dataset(item, inverse, by_id, by_name)
        elif elem.VR == "UI" and elem.value:
            _map_values(elem, lambda v: inverse.get(v, v))
    return restored
