"""Test data for the teleconsult option tests (issue 5): instances that carry a value in (nearly) every attribute
of PS3.15 Table E.1-1, and the attribute-by-attribute check of what a de-identified copy may keep.

The table is read from the packaged ``server/dicom/data/confidentiality_profile.json`` (PS3.15 2026d); a few rows
are cross-checked against the standard's text in ``STANDARD_SPOT_CHECKS`` so a wrong table cannot pass unseen.
The check follows PS3.15 E.1.1 for each action code, independently of ``server.dicom.deidentify``:

* X: absent; Z: absent, empty, or a dummy (a non-empty value that is not the original); D: present, not the
  original (a sequence: its items cleaned, nothing identifying left); U: a different UID, the same replacement
  for the same original everywhere; compound codes (X/Z, X/D, Z/D, X/Z/D, X/Z/U*): any of their alternatives;
* with options (E.3): an option's K keeps the value, C keeps it cleaned (dates shifted by one consistent number of
  days with Modified Dates, descriptions without the patient's identity with Clean Descriptors).
"""

from __future__ import annotations

import datetime as dt
import io
import json
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
from pydicom import dcmread
from pydicom.datadict import dictionary_has_tag, dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

PROFILE = json.loads(resources.files("server.dicom").joinpath("data/confidentiality_profile.json")
                     .read_text(encoding="utf-8"))
#: Rows of Table E.1-1 as printed in PS3.15 (checked against the packaged table): tag -> Basic Profile action.
STANDARD_SPOT_CHECKS = {
    "00100010": "Z",      # Patient's Name
    "00100030": "Z",      # Patient's Birth Date
    "00080050": "Z",      # Accession Number
    "00080080": "X/Z/D",  # Institution Name
    "00080081": "X",      # Institution Address
    "00080090": "Z",      # Referring Physician's Name
    "00081030": "X",      # Study Description
    "0008103E": "X",      # Series Description
    "00181000": "X/Z/D",  # Device Serial Number
    "00081010": "X/Z/D",  # Station Name
    "0020000D": "U",      # Study Instance UID
    "0020000E": "U",      # Series Instance UID
    "00080018": "U",      # SOP Instance UID
    "00081155": "U",      # Referenced SOP Instance UID
    "00081140": "X/Z/U*",  # Referenced Image Sequence
    "00101000": "X",      # Other Patient IDs
    "00101002": "X",      # Other Patient IDs Sequence
    "00104000": "X",      # Patient Comments
    "00080020": "Z",      # Study Date
    "00080023": "Z/D",    # Content Date
    "0040A730": "D",      # Content Sequence
}

PATIENT_NAME, PATIENT_ID, ACCESSION = "Müller^Jürgen", "PID-4711", "ACC-4711"
BIRTH_DATE = "19600101"
INSTITUTION, DOCTOR = "Klinikum Musterstadt", "Schmidt^Anna"
DEVICE_SERIAL, STATION = "SN-998877", "CTSTATION7"
#: What must appear nowhere in a de-identified instance (the bytes of the whole file).
IDENTITY = ("Müller", "Jürgen", PATIENT_ID, ACCESSION, "Musterstadt", "Schmidt", DEVICE_SERIAL, STATION,
            "PID-OTHER-77")
#: The non-identifying head of every free text value (kept by Clean Descriptors) and the identity after it.
HEAD, SHORT_HEAD, TAIL = "Befund", "Kopf", " Müller Jürgen PID-4711"
DATE, TIME, DATETIME = "20240115", "101500", "20240115101500"
PRIVATE_CREATOR = "ACME KLINIK 1.0"
TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC"})
STRUCTURAL = frozenset({0x00080016, 0x00080018, 0x0020000D, 0x0020000E})  # set by the builder itself


@dataclass(frozen=True)
class Row:
    """One top-level row of Table E.1-1 this test data fills."""

    tag: int
    keyword: str
    vr: str
    basic: str
    options: dict = field(default_factory=dict)

    def action(self, columns: tuple[str, ...] = ()) -> str:
        """The action under the enabled option columns (PS3.15 E.3: an option's K or C replaces the basic one)."""
        chosen = [self.options[c] for c in columns if c in self.options]
        if "K" in chosen:
            return "K"
        if "C" in chosen:
            return "C"
        return self.basic


def fillable_rows() -> list[Row]:
    """Every top-level attribute row of the table whose keyword pydicom knows, outside the command and file meta
    groups (0000, 0002), with the VR the dictionary gives."""
    rows = []
    for entry in PROFILE["attributes"]:
        tag = int(entry["tag"], 16)
        if tag >> 16 in (0x0000, 0x0002) or not dictionary_has_tag(tag) or keyword_for_tag(tag) != entry["keyword"]:
            continue
        vr = dictionary_VR(tag)
        if vr != entry.get("vr") or " or " in vr:
            continue
        rows.append(Row(tag, entry["keyword"], vr, entry["basic"], dict(entry.get("options") or {})))
    return rows


ROWS = fillable_rows()


def text_value(vr: str) -> str:
    return (SHORT_HEAD if vr == "SH" else HEAD) + (" Müller" if vr == "SH" else TAIL)


def plain_value(row: Row, shared: dict[str, str]):
    """A plausible original value of ``row`` (not a sequence)."""
    special = {"PatientName": PATIENT_NAME, "PatientID": PATIENT_ID, "AccessionNumber": ACCESSION,
               "PatientBirthDate": BIRTH_DATE, "InstitutionName": INSTITUTION, "DeviceSerialNumber": DEVICE_SERIAL,
               "StationName": STATION, "TimezoneOffsetFromUTC": "+0100", "OtherPatientIDs": "PID-OTHER-77",
               "PatientSex": "M", "ReasonForTheAttributeModification": "COERCE", "IssuerOfPatientID": "KIS-A"}
    if row.keyword in special:
        return special[row.keyword]
    vr = row.vr
    if vr == "UI":
        return shared.setdefault(row.keyword, generate_uid())
    return {
        "AE": "AEMUELLER", "AS": "064Y", "CS": "VALUE1", "DA": DATE, "DT": DATETIME, "TM": TIME, "DS": "12.5",
        "IS": "7", "PN": DOCTOR, "UR": "https://klinik.example/befund", "US": 1, "SS": 1, "UL": 1, "SL": 1,
        "FL": 1.5, "FD": 1.5, "OB": b"\x01\x02\x03\x04", "OW": b"\x01\x02\x03\x04", "UN": b"ABCD",
    }.get(vr, text_value(vr) if vr in TEXT_VRS else None)


def _item(**values) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def profile_instance(*, study: str, series: str, sop: str, number: int, refers_to: str, shared: dict[str, str],
                     series_number: int = 1) -> bytes:
    """A CT image carrying a value in every fillable row (``ROWS``), a private block, an overlay group, an
    OtherPatientIDsSequence, and references (ReferencedImageSequence, SourceImageSequence, Referenced SOP
    Instance UID) to the instance ``refers_to`` of the same study; ``shared``: the UIDs of other U rows, the
    same in every instance of the study (filled on first use)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = "AEMUELLER"
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = sop, study, series
    ds.Modality = "CT"
    ds.SeriesNumber, ds.InstanceNumber = series_number, number
    for row in ROWS:
        if row.tag in STRUCTURAL:
            continue
        if row.vr == "SQ":
            value = Sequence([_item(PersonName=DOCTOR, UID=shared.setdefault("item-UID", generate_uid()))])
            if row.keyword in ("ReferencedImageSequence", "SourceImageSequence"):
                value = Sequence([_item(ReferencedSOPClassUID=CTImageStorage, ReferencedSOPInstanceUID=refers_to)])
            elif row.keyword == "OtherPatientIDsSequence":
                value = Sequence([_item(PatientID="PID-OTHER-77", IssuerOfPatientID="KIS", TypeOfPatientID="TEXT")])
            ds.add_new(row.tag, "SQ", value)
        elif row.keyword == "ReferencedSOPInstanceUID":
            ds.add_new(row.tag, "UI", refers_to)
        else:
            ds.add_new(row.tag, row.vr, plain_value(row, shared))
    block = ds.private_block(0x0009, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", "Privat Müller PID-4711")
    block.add_new(0x02, "SH", "ACC-4711")
    for element, vr, value in ((0x0010, "US", 16), (0x0011, "US", 16), (0x0040, "CS", "G"), (0x0050, "SS", [1, 1]),
                               (0x0100, "US", 1), (0x0102, "US", 0), (0x0022, "LO", "Overlay Müller"),
                               (0x3000, "OW", b"\x00" * 32)):
        ds.add_new(0x60000000 | element, vr, value)
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 15, 1, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = (np.arange(256, dtype=np.int16) % 1000).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# ---- the check ----------------------------------------------------------------------------------------------
def _empty(value) -> bool:
    return value is None or value == "" or value == b"" or (isinstance(value, list | MultiValue | Sequence)
                                                             and len(value) == 0)


def _values(value) -> list:
    if _empty(value):
        return []
    return list(value) if isinstance(value, list | MultiValue) else [value]


def _identifying(item: Dataset) -> list[str]:
    """Identifying strings left anywhere in a data set (recursively)."""
    text = repr(item)
    return [s for s in IDENTITY if s in text]


@dataclass
class Verdict:
    """What the check found: problems (empty = conforms) and the UID map it saw (original -> new)."""

    problems: list[str] = field(default_factory=list)
    uids: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def uid(self, where: str, old: str, new: str) -> None:
        if not new or new == old:
            self.problems.append(f"{where}: UID {old} not replaced ({new!r})")
        elif not new.startswith("2.25."):
            self.problems.append(f"{where}: {new} is no UUID-derived UID")
        elif self.uids.setdefault(old, new) != new:
            self.problems.append(f"{where}: {old} became {new}, elsewhere {self.uids[old]}")


def _shifted(original: str, days: int) -> str:
    day = dt.datetime.strptime(original[:8], "%Y%m%d").date() + dt.timedelta(days=days)
    return day.strftime("%Y%m%d") + original[8:]


def check_row(row: Row, before: Dataset, after: Dataset, columns: tuple[str, ...], verdict: Verdict,
              shift: int | None) -> None:
    """One row of the table on one instance (PS3.15 E.1.1 action codes; E.3 options in ``columns``)."""
    where = f"SOP {before.SOPInstanceUID} {row.keyword} ({row.tag:08X}, {row.basic})"
    action = row.action(columns)
    allowed = set(action.replace("*", "").split("/"))
    verdict.counts[action] = verdict.counts.get(action, 0) + 1
    original = before[row.tag].value
    elem = after.get(row.tag)
    new = None if elem is None else elem.value
    if action == "K":
        if new != original:
            verdict.problems.append(f"{where}: K but {original!r} became {new!r}")
        return
    if action == "C":
        _check_cleaned(row, original, new, where, verdict, shift)
        return
    if elem is None:
        if "X" not in allowed:
            verdict.problems.append(f"{where}: removed, but {action} keeps the attribute")
        return
    if _empty(new):
        if not allowed & {"Z", "U"} or (allowed == {"U"}):
            verdict.problems.append(f"{where}: empty, but {action} needs a replacement value")
        return
    if allowed == {"X"}:
        verdict.problems.append(f"{where}: X but present ({new!r})")
        return
    if row.vr == "SQ":
        if "D" not in allowed and "U" not in allowed:
            verdict.problems.append(f"{where}: {action} but the sequence keeps {len(new)} item(s)")
        for i, item in enumerate(new):
            left = _identifying(item)
            if left:
                verdict.problems.append(f"{where}[{i}]: identifying values left: {left}")
            for j, old_item in enumerate(original):
                if j == i:
                    _check_item_uids(old_item, item, f"{where}[{i}]", verdict)
        return
    if row.vr == "UI":
        if not allowed & {"U", "D"}:
            verdict.problems.append(f"{where}: {action} on a UID but present")
        olds, news = _values(original), _values(new)
        if len(olds) != len(news):
            verdict.problems.append(f"{where}: {olds} -> {news}")
        for old, n in zip(olds, news):
            verdict.uid(where, str(old), str(n))
        return
    if "D" not in allowed and "Z" not in allowed:
        verdict.problems.append(f"{where}: {action} but a value is present ({new!r})")
    elif new == original or (isinstance(original, str) and original and original in str(new)):
        verdict.problems.append(f"{where}: the original value {original!r} is still there ({new!r})")


def _check_item_uids(old: Dataset, new: Dataset, where: str, verdict: Verdict) -> None:
    """UIDs inside a kept sequence item: replaced consistently (U on Referenced SOP Instance UID, UID, ...)."""
    for elem in old:
        if elem.VR == "UI" and elem.keyword not in ("ReferencedSOPClassUID", "SOPClassUID") and elem.tag in new:
            verdict.uid(f"{where}.{elem.keyword}", str(elem.value), str(new[elem.tag].value))


def _check_cleaned(row: Row, original, new, where: str, verdict: Verdict, shift: int | None) -> None:
    """C (E.3.5 Clean Descriptors, E.3.6 Modified Dates, ...): kept, without identity, dates shifted."""
    if new is None:
        verdict.problems.append(f"{where}: C keeps the attribute, but it is gone")
        return
    if row.vr == "SQ":
        for i, item in enumerate(new):
            left = _identifying(item)
            if left:
                verdict.problems.append(f"{where}[{i}]: identifying values left after cleaning: {left}")
        return
    if row.vr in ("DA", "DT") and shift is not None:
        if shift == 0 or new != _shifted(str(original), shift):
            verdict.problems.append(f"{where}: {original!r} not shifted by {shift} days ({new!r})")
        return
    if row.vr in TEXT_VRS or row.vr == "PN":
        text = str(new)
        left = [s for s in IDENTITY if s in text]
        head = SHORT_HEAD if row.vr == "SH" else HEAD
        if left:
            verdict.problems.append(f"{where}: cleaned text still names {left}: {text!r}")
        if row.vr != "PN" and isinstance(original, str) and original.startswith(head) and not text.startswith(head):
            verdict.problems.append(f"{where}: the description was not kept: {text!r}")
        return
    if new != original:  # TM under Modified Dates (whole-day shift), CS, ...: kept
        verdict.problems.append(f"{where}: C on {row.vr} changed {original!r} to {new!r}")


def check_instances(originals: list[bytes], received: list[bytes], columns: tuple[str, ...] = (),
                    shift: int | None = None) -> Verdict:
    """Every fillable row on every pair of (original, received) instance, matched by Instance Number; plus the
    UIDs' consistency across instances, file meta, private and overlay groups, and the de-identification marks."""
    verdict = Verdict()
    before = {int(d.InstanceNumber): d for d in (dcmread(io.BytesIO(b)) for b in originals)}
    after = {int(d.InstanceNumber): d for d in (dcmread(io.BytesIO(b)) for b in received)}
    if sorted(before) != sorted(after):
        verdict.problems.append(f"instances {sorted(before)} sent, {sorted(after)} received")
    for number in sorted(before.keys() & after.keys()):
        old, new = before[number], after[number]
        for row in ROWS:
            if row.tag in old:
                check_row(row, old, new, columns, verdict, shift)
        verdict.uid(f"#{number} SOPInstanceUID", str(old.SOPInstanceUID), str(new.SOPInstanceUID))
        verdict.uid(f"#{number} StudyInstanceUID", str(old.StudyInstanceUID), str(new.StudyInstanceUID))
        verdict.uid(f"#{number} SeriesInstanceUID", str(old.SeriesInstanceUID), str(new.SeriesInstanceUID))
        if new.file_meta.MediaStorageSOPInstanceUID != new.SOPInstanceUID:
            verdict.problems.append(f"#{number}: file meta SOP Instance UID {new.file_meta.MediaStorageSOPInstanceUID}"
                                    f" != {new.SOPInstanceUID}")
        for tag in (0x00020016, 0x00020017, 0x00020018):
            if tag in new.file_meta and new.file_meta[tag].value == old.file_meta.get(tag, None):
                verdict.problems.append(f"#{number}: file meta AE title {tag:08X} kept")
        odd = [f"{int(e.tag):08X}" for e in new if e.tag.group & 1]
        if odd:
            verdict.problems.append(f"#{number}: private attributes left: {odd}")
        overlay = [f"{int(e.tag):08X}" for e in new if 0x6000 <= e.tag.group <= 0x601E]
        if overlay:
            verdict.problems.append(f"#{number}: overlay group left: {overlay}")
        if new.get("PatientIdentityRemoved") != "YES":
            verdict.problems.append(f"#{number}: PatientIdentityRemoved {new.get('PatientIdentityRemoved')!r}")
        codes = [i.CodeValue for i in new.get("DeidentificationMethodCodeSequence", [])]
        if "113100" not in codes:
            verdict.problems.append(f"#{number}: DeidentificationMethodCodeSequence {codes} lacks 113100")
    new_uids = list(verdict.uids.values())
    if len(set(new_uids)) != len(new_uids):
        verdict.problems.append("two different original UIDs got the same replacement")
    return verdict


def original_uids(originals: list[bytes]) -> set[str]:
    """Every UID of the instances that is no SOP Class or Transfer Syntax (recursively)."""
    found: set[str] = set()

    def walk(ds: Dataset) -> None:
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)
            elif elem.VR == "UI" and "ClassUID" not in elem.keyword and elem.keyword != "TransferSyntaxUID" \
                    and elem.keyword != "ImplementationClassUID":
                found.update(str(v) for v in _values(elem.value))
    for data in originals:
        ds = dcmread(io.BytesIO(data))
        walk(ds)
        walk(ds.file_meta)
    found.discard(ExplicitVRLittleEndian)
    return {u for u in found if u and not u.startswith("1.2.840.10008.")}
