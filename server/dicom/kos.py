"""Key Object Selection documents: what a KOS references, and which instances of a study "key images" sends.

PS3.3 A.35.4 Key Object Selection Document IOD; C.17.6 Key Object Document module (Current Requested
Procedure Evidence Sequence, C.17.6.2.1); C.17.2/C.17.3 SR Document General and Content modules (the
content tree: IMAGE, WAVEFORM and COMPOSITE content items carry a Referenced SOP Sequence, C.18.3/C.18.4);
PS3.16 TID 2010 and CID 7010 Key Object Selection Document Title.

Decisions (the teleconsult "key images only" send option):

* A KOS *selects* the instances it references, whatever its title (113000 "Of Interest", 113004 "For
  Teaching", manifests, ...), except the rejection titles of IHE RAD IOCM (113001 "Rejected for Quality
  Reasons", 113037 "Rejected for Patient Safety Reasons", 113038 "Incorrect Modality Worklist Entry",
  113039 "Data Retention Policy Expired"; all four are members of CID 7010, the reasons of a quality
  rejection are CID 7011 title modifiers). A rejection note marks the instances it references as *not to
  send*: they are withheld even when a selecting KOS references them, and reported as ``rejected``.
  Rejection notes themselves are not sent; a KOS that a rejection note references is ignored.
* The references of a KOS are the union of its evidence (study -> series -> SOP, which also gives the
  study and series of each instance) and its content tree (which also gives frame numbers). A reference
  into another study is listed as ``foreign`` and not sent; a reference to an instance of this study that
  the study does not hold is listed as ``missing`` (never silently dropped).
* Instances are matched by SOP Instance UID (globally unique, PS3.5 9); the selection keeps the caller's
  order (the archive lists a study in series/instance order).
* A study without any selecting KOS is ``ServerError(INVALID, "study ... has no Key Object Selection
  document (key images)")``.

Pure: bytes in, frozen values out; pydicom parses the KOS (a small document without bulk data).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from server.errors import ErrorKind, ServerError

KEY_OBJECT_SELECTION_DOCUMENT = "1.2.840.10008.5.1.4.1.1.88.59"  # PS3.4 B.5 Standard SOP Classes

# Content item value types whose Referenced SOP Sequence names a composite instance (PS3.3 C.18.3, C.18.4)
_REFERENCE_VALUE_TYPES = frozenset({"IMAGE", "WAVEFORM", "COMPOSITE"})
_MAX_DEPTH = 64  # content tree nesting we follow (TID 2010 is flat; guards against hostile recursion)


@dataclass(frozen=True)
class Code:
    """A coded concept: Code Value, Coding Scheme Designator, Code Meaning (PS3.3 8.8, Table 8.8-1)."""

    value: str
    scheme: str
    meaning: str

    def same_concept(self, other: Code) -> bool:
        """Equal code value and scheme; the meaning is display text only (PS3.3 8.8)."""
        return self.value == other.value and self.scheme == other.scheme


# PS3.16 CID 7010 Key Object Selection Document Title (the codes we name)
OF_INTEREST = Code("113000", "DCM", "Of Interest")
REJECTED_FOR_QUALITY_REASONS = Code("113001", "DCM", "Rejected for Quality Reasons")
REJECTED_FOR_PATIENT_SAFETY_REASONS = Code("113037", "DCM", "Rejected for Patient Safety Reasons")
INCORRECT_MODALITY_WORKLIST_ENTRY = Code("113038", "DCM", "Incorrect Modality Worklist Entry")
DATA_RETENTION_POLICY_EXPIRED = Code("113039", "DCM", "Data Retention Policy Expired")

# CID 7010 titles of IHE RAD IOCM rejection notes: their references are NOT to be sent
REJECTION_TITLES: tuple[Code, ...] = (
    REJECTED_FOR_QUALITY_REASONS,
    REJECTED_FOR_PATIENT_SAFETY_REASONS,
    INCORRECT_MODALITY_WORKLIST_ENTRY,
    DATA_RETENTION_POLICY_EXPIRED,
)
# Coding scheme designators that name the same DICOM scheme (PS3.16 8: "DCM"; old documents: "99DCM")
_DCM_SCHEMES = frozenset({"DCM", "99DCM"})


def is_rejection_title(code: Code) -> bool:
    """Whether a KOS title is an IOCM rejection (CID 7010 113001, 113037, 113038, 113039)."""
    return code.scheme in _DCM_SCHEMES and any(code.value == t.value for t in REJECTION_TITLES)


@dataclass(frozen=True)
class Reference:
    """One instance a KOS references (PS3.3 C.17.6.2.1 evidence; C.18.3 Referenced SOP Sequence).

    ``study_uid``/``series_uid`` are None when only the content tree names the instance (the evidence
    should list it, C.17.6.2.1); ``frames`` from Referenced Frame Number (0008,1160), empty = whole instance.
    """

    sop_uid: str
    sop_class_uid: str
    study_uid: str | None = None
    series_uid: str | None = None
    frames: tuple[int, ...] = ()


@dataclass(frozen=True)
class KeyObject:
    """One parsed Key Object Selection document: its own identity, its title and its references."""

    sop_uid: str
    series_uid: str
    study_uid: str
    title: Code
    references: tuple[Reference, ...]
    description: str | None = None  # TEXT item (113012, DCM, "Key Object Description"), TID 2010

    @property
    def is_rejection(self) -> bool:
        """A rejection note (IOCM): its references are withheld, it is not sent itself."""
        return is_rejection_title(self.title)


@dataclass(frozen=True)
class InstanceRef:
    """An instance of the study as the archive lists it (``Archive.instances`` rows)."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str

    @classmethod
    def from_row(cls, row: Any) -> InstanceRef:
        """From any object with ``study_uid``, ``series_uid``, ``sop_uid``, ``sop_class_uid`` attributes."""
        return cls(row.study_uid, row.series_uid, row.sop_uid, row.sop_class_uid)


@dataclass(frozen=True)
class Selection:
    """What "key images only" sends, and what it could not or must not send.

    ``instances``: the selecting KOS documents and the referenced instances present in the study, in the
    study's order. ``missing``: references into this study that the study does not hold. ``foreign``:
    references into other studies (not sent). ``rejected``: instances (or KOS) a selecting KOS names but a
    rejection note withholds. ``key_objects``: the selecting documents used. ``references``: the merged
    references of the sent instances, in ``instances`` order (study/series from the evidence, frames).
    """

    study_uid: str
    instances: tuple[InstanceRef, ...]
    key_objects: tuple[KeyObject, ...]
    missing: tuple[Reference, ...] = ()
    foreign: tuple[Reference, ...] = ()
    rejected: tuple[Reference, ...] = ()
    references: tuple[Reference, ...] = ()


def is_key_object(sop_class_uid: str) -> bool:
    """Whether a SOP Class is the Key Object Selection Document Storage SOP Class (PS3.4 B.5)."""
    return sop_class_uid == KEY_OBJECT_SELECTION_DOCUMENT


def key_object_references(data: bytes) -> KeyObject:
    """Parse one Part 10 KOS: title, evidence and content tree references (PS3.3 A.35.4, C.17.6, C.17.3)."""
    ds = _read(data)
    sop_class = _text(ds, "SOPClassUID")
    if not is_key_object(sop_class):
        raise _invalid(f"not a Key Object Selection document (SOP Class UID {sop_class[:64] or 'absent'})")
    sop_uid = _required(ds, "SOPInstanceUID", "(0008,0018)")
    study_uid = _required(ds, "StudyInstanceUID", "(0020,000D)")
    series_uid = _required(ds, "SeriesInstanceUID", "(0020,000E)")
    title = _title(ds)
    merged: dict[str, Reference] = {}
    for ref in _evidence(ds):
        merged[ref.sop_uid] = _merge(merged.get(ref.sop_uid), ref)
    description: str | None = None
    for item in _content_items(ds):
        value_type = _text(item, "ValueType")
        if value_type in _REFERENCE_VALUE_TYPES:
            for ref_item in item.get("ReferencedSOPSequence") or ():
                ref = _sop_reference(ref_item, "content item Referenced SOP Sequence (0008,1199)")
                merged[ref.sop_uid] = _merge(merged.get(ref.sop_uid), ref)
        elif value_type == "TEXT" and description is None and _concept_value(item) == "113012":
            description = _text(item, "TextValue") or None
    return KeyObject(sop_uid, series_uid, study_uid, title, tuple(merged.values()), description)


def select_key_images(instances: Sequence[InstanceRef], kos_documents: Sequence[KeyObject]) -> Selection:
    """The KOS documents of a study and the instances they select (PS3.3 C.17.6; IHE RAD IOCM rejections).

    ``instances``: every instance of one study, in the order to send; ``kos_documents``: its parsed KOS.
    """
    study_uid = _study_of(instances, kos_documents)
    rejected_uids = {r.sop_uid for k in kos_documents if k.is_rejection for r in k.references}
    notes = {k.sop_uid for k in kos_documents if k.is_rejection}
    selecting = [k for k in kos_documents if not k.is_rejection]
    withheld_kos = [k for k in selecting if k.sop_uid in rejected_uids]
    selecting = [k for k in selecting if k.sop_uid not in rejected_uids]
    if not selecting:
        if any(k.is_rejection for k in kos_documents) or withheld_kos:
            raise _invalid(f"study {study_uid} has no Key Object Selection document (key images); "
                           "it holds only rejection notes or rejected KOS")
        raise _invalid(f"study {study_uid} has no Key Object Selection document (key images)")
    present = {i.sop_uid for i in instances}
    wanted: dict[str, Reference] = {}
    foreign: dict[str, Reference] = {}
    rejected: dict[str, Reference] = {
        k.sop_uid: Reference(k.sop_uid, KEY_OBJECT_SELECTION_DOCUMENT, k.study_uid, k.series_uid)
        for k in withheld_kos
    }
    for kos in selecting:
        wanted[kos.sop_uid] = Reference(kos.sop_uid, KEY_OBJECT_SELECTION_DOCUMENT, kos.study_uid, kos.series_uid)
        for ref in kos.references:
            if ref.study_uid is not None and ref.study_uid != study_uid:
                foreign[ref.sop_uid] = _merge(foreign.get(ref.sop_uid), ref)
            elif ref.sop_uid in rejected_uids:
                rejected[ref.sop_uid] = _merge(rejected.get(ref.sop_uid), ref)
            elif ref.sop_uid in notes:
                continue  # a rejection note is never sent, even when a KOS names it
            else:
                wanted[ref.sop_uid] = _merge(wanted.get(ref.sop_uid), ref)
    chosen = tuple(i for i in instances if i.sop_uid in wanted)
    missing = tuple(r for uid, r in wanted.items() if uid not in present)
    return Selection(study_uid, chosen, tuple(selecting), missing, tuple(foreign.values()),
                     tuple(rejected.values()), tuple(wanted[i.sop_uid] for i in chosen))


# --------------------------------------------------------------------------------------------------


def _invalid(message: str) -> ServerError:
    return ServerError(ErrorKind.INVALID, message)


def _read(data: bytes) -> Dataset:
    """A Part 10 data set (PS3.10 7.1); anything pydicom cannot read is INVALID."""
    try:
        return dcmread(io.BytesIO(data), force=False)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, AttributeError) as exc:
        raise _invalid("not a readable DICOM Part 10 Key Object Selection document") from exc


def _text(ds: Dataset, keyword: str) -> str:
    """A single-valued string attribute, stripped; '' when absent or empty."""
    value = ds.get(keyword)
    if value is None:
        return ""
    return str(value).strip(" \x00")


def _required(ds: Dataset, keyword: str, tag: str) -> str:
    value = _text(ds, keyword)
    if not value:
        raise _invalid(f"Key Object Selection document lacks {keyword} {tag}")
    return value


def _code(item: Dataset) -> Code | None:
    """A Code Sequence item (PS3.3 8.8: Code Value, or Long/URN Code Value)."""
    value = _text(item, "CodeValue") or _text(item, "LongCodeValue") or _text(item, "URNCodeValue")
    if not value:
        return None
    return Code(value, _text(item, "CodingSchemeDesignator"), _text(item, "CodeMeaning"))


def _title(ds: Dataset) -> Code:
    """The document title: the root content item's Concept Name Code Sequence (C.17.3, CID 7010; Type 1)."""
    seq = ds.get("ConceptNameCodeSequence") or ()
    code = _code(seq[0]) if len(seq) else None
    if code is None:
        raise _invalid("Key Object Selection document lacks its title (Concept Name Code Sequence (0040,A043))")
    return code


def _concept_value(item: Dataset) -> str:
    seq = item.get("ConceptNameCodeSequence") or ()
    code = _code(seq[0]) if len(seq) else None
    return code.value if code is not None else ""


def _sop_reference(item: Dataset, where: str, study_uid: str | None = None,
                   series_uid: str | None = None) -> Reference:
    """One Referenced SOP Sequence item (PS3.3 10.8 SOP Instance Reference Macro, C.18.3 frames)."""
    sop_uid = _text(item, "ReferencedSOPInstanceUID")
    if not sop_uid:
        raise _invalid(f"a {where} item lacks Referenced SOP Instance UID (0008,1155)")
    return Reference(sop_uid, _text(item, "ReferencedSOPClassUID"), study_uid, series_uid, _frames(item))


def _frames(item: Dataset) -> tuple[int, ...]:
    """Referenced Frame Number (0008,1160), IS, 1-n (C.18.3)."""
    value = item.get("ReferencedFrameNumber")
    if value is None or value == "":
        return ()
    values = value if isinstance(value, Iterable) and not isinstance(value, str) else [value]
    try:
        return tuple(int(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise _invalid("Referenced Frame Number (0008,1160) is not a list of integers") from exc


def _evidence(ds: Dataset) -> list[Reference]:
    """Current Requested Procedure Evidence Sequence: study -> series -> SOP (C.17.6.2.1, Type 1)."""
    refs: list[Reference] = []
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence") or ():
        study_uid = _text(study, "StudyInstanceUID")
        if not study_uid:
            raise _invalid("a Current Requested Procedure Evidence Sequence (0040,A375) item lacks its "
                           "Study Instance UID")
        for series in study.get("ReferencedSeriesSequence") or ():
            series_uid = _text(series, "SeriesInstanceUID") or None
            for item in series.get("ReferencedSOPSequence") or ():
                refs.append(_sop_reference(item, "evidence Referenced SOP Sequence (0008,1199)",
                                           study_uid, series_uid))
    return refs


def _content_items(ds: Dataset) -> Iterable[Dataset]:
    """Every content item below the root, depth first (C.17.3 Content Sequence (0040,A730))."""
    stack: list[tuple[Dataset, int]] = [(ds, 0)]
    while stack:
        node, depth = stack.pop()
        children = list(node.get("ContentSequence") or ())
        if children and depth >= _MAX_DEPTH:
            raise _invalid(f"Key Object Selection content tree nested deeper than {_MAX_DEPTH} levels")
        for child in children:
            yield child
        stack.extend((child, depth + 1) for child in reversed(children))


def _merge(old: Reference | None, new: Reference) -> Reference:
    """One reference from two mentions of one instance: evidence gives study/series, content frames.

    Frames keep their order of appearance, without repeats.
    """
    if old is None:
        return new
    return Reference(
        old.sop_uid,
        old.sop_class_uid or new.sop_class_uid,
        old.study_uid or new.study_uid,
        old.series_uid or new.series_uid,
        old.frames + tuple(f for f in new.frames if f not in old.frames),
    )


def _study_of(instances: Sequence[InstanceRef], kos_documents: Sequence[KeyObject]) -> str:
    """The one study the instances belong to (the first KOS's when the list is empty)."""
    studies = {i.study_uid for i in instances}
    if len(studies) > 1:
        raise ServerError(ErrorKind.INTERNAL, "key image selection was given instances of several studies")
    if studies:
        return next(iter(studies))
    if kos_documents:
        return kos_documents[0].study_uid
    raise _invalid("the study has no instances and no Key Object Selection document (key images)")
