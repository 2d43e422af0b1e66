"""server.dicom.kos: Key Object Selection documents (PS3.3 A.35.4, C.17.6) and the "key images only" selection."""

from __future__ import annotations

import io
from collections import namedtuple

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from server.dicom.kos import (
    DATA_RETENTION_POLICY_EXPIRED,
    INCORRECT_MODALITY_WORKLIST_ENTRY,
    KEY_OBJECT_SELECTION_DOCUMENT,
    OF_INTEREST,
    REJECTED_FOR_PATIENT_SAFETY_REASONS,
    REJECTED_FOR_QUALITY_REASONS,
    Code,
    InstanceRef,
    KeyObject,
    Reference,
    is_key_object,
    key_object_references,
    select_key_images,
)
from server.errors import ErrorKind, ServerError
from tests.dicomdata import make_instance, sample_bytes

FOR_TEACHING = Code("113004", "DCM", "For Teaching")


def _code(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme, code.meaning
    return item


def _sop_item(sop_class: str, sop: str, frames: tuple[int, ...] = ()) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop
    if frames:
        item.ReferencedFrameNumber = list(frames)
    return item


def build_kos(*, study: str, title: Code | None = OF_INTEREST,
              evidence: dict[str, dict[str, list[tuple[str, str]]]] | None = None,
              content: list[tuple[str, str, str, tuple[int, ...]]] = (), nested: bool = False,
              description: str | None = None, sop: str | None = None, series: str | None = None) -> bytes:
    """A Part 10 KOS (TID 2010): evidence {study: {series: [(class, sop)]}}, content [(type, class, sop, frames)]."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = KEY_OBJECT_SELECTION_DOCUMENT
    ds.SOPInstanceUID = sop or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = KEY_OBJECT_SELECTION_DOCUMENT
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series or generate_uid()
    ds.Modality = "KO"
    ds.PatientName = "Müller^Jürgen"
    ds.PatientID = "PID-1"
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = "20240115", "120000"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    if title is not None:
        ds.ConceptNameCodeSequence = Sequence([_code(title)])
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "2010"
    ds.ContentTemplateSequence = Sequence([template])
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence()
    for study_uid, series_map in (evidence or {}).items():
        study_item = Dataset()
        study_item.StudyInstanceUID = study_uid
        study_item.ReferencedSeriesSequence = Sequence()
        for series_uid, sops in series_map.items():
            series_item = Dataset()
            series_item.SeriesInstanceUID = series_uid
            series_item.ReferencedSOPSequence = Sequence([_sop_item(c, s) for c, s in sops])
            study_item.ReferencedSeriesSequence.append(series_item)
        ds.CurrentRequestedProcedureEvidenceSequence.append(study_item)
    items = []
    if description is not None:
        text = Dataset()
        text.RelationshipType, text.ValueType, text.TextValue = "CONTAINS", "TEXT", description
        text.ConceptNameCodeSequence = Sequence([_code(Code("113012", "DCM", "Key Object Description"))])
        items.append(text)
    for value_type, sop_class, sop_uid, frames in content:
        item = Dataset()
        item.RelationshipType, item.ValueType = "CONTAINS", value_type
        item.ReferencedSOPSequence = Sequence([_sop_item(sop_class, sop_uid, frames)])
        items.append(item)
    if nested:
        container = Dataset()
        container.RelationshipType, container.ValueType = "CONTAINS", "CONTAINER"
        container.ContinuityOfContent = "SEPARATE"
        container.ContentSequence = Sequence(items)
        items = [container]
    ds.ContentSequence = Sequence(items)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class Study:
    """A study of two series (3 CT + 2 MR instances) and helpers for its KOS."""

    def __init__(self) -> None:
        self.uid = generate_uid()
        self.ct, self.mr = generate_uid(), generate_uid()
        self.kos_series = generate_uid()
        self.images = [InstanceRef(self.uid, self.ct, generate_uid(), CTImageStorage) for _ in range(3)]
        self.images += [InstanceRef(self.uid, self.mr, generate_uid(), MRImageStorage) for _ in range(2)]

    def kos(self, refs: list[InstanceRef], *, title: Code = OF_INTEREST,
            extra_evidence=None) -> tuple[InstanceRef, KeyObject]:
        evidence: dict[str, dict[str, list[tuple[str, str]]]] = {self.uid: {}}
        for r in refs:
            evidence.setdefault(r.study_uid, {}).setdefault(r.series_uid, []).append((r.sop_class_uid, r.sop_uid))
        for study, series_map in (extra_evidence or {}).items():
            evidence.setdefault(study, {}).update(series_map)
        content = [("IMAGE", r.sop_class_uid, r.sop_uid, ()) for r in refs]
        sop = generate_uid()
        data = build_kos(study=self.uid, title=title, evidence=evidence, content=content, sop=sop,
                         series=self.kos_series)
        return InstanceRef(self.uid, self.kos_series, sop, KEY_OBJECT_SELECTION_DOCUMENT), key_object_references(data)


def test_is_key_object():
    assert is_key_object("1.2.840.10008.5.1.4.1.1.88.59")
    assert not is_key_object("1.2.840.10008.5.1.4.1.1.88.11")  # Basic Text SR
    assert not is_key_object(CTImageStorage)


def test_references_from_evidence_and_content_tree_are_merged():
    study, series, other_series = generate_uid(), generate_uid(), generate_uid()
    a, b, c = generate_uid(), generate_uid(), generate_uid()
    data = build_kos(
        study=study,
        evidence={study: {series: [(CTImageStorage, a), (CTImageStorage, b)], other_series: [(MRImageStorage, c)]}},
        content=[("IMAGE", CTImageStorage, a, (2, 5)), ("COMPOSITE", MRImageStorage, c, ())],
        description="Rundherd rechts, 8 mm",
    )
    kos = key_object_references(data)
    assert kos.title == OF_INTEREST and not kos.is_rejection
    assert kos.study_uid == study and kos.description == "Rundherd rechts, 8 mm"
    by_uid = {r.sop_uid: r for r in kos.references}
    assert set(by_uid) == {a, b, c}
    assert by_uid[a] == Reference(a, CTImageStorage, study, series, (2, 5))
    assert by_uid[b] == Reference(b, CTImageStorage, study, series, ())
    assert by_uid[c] == Reference(c, MRImageStorage, study, other_series, ())


def test_content_tree_only_references_nested_and_waveform():
    """A (non-conforming) KOS that names an instance only in its content tree: study and series unknown."""
    study, a, w = generate_uid(), generate_uid(), generate_uid()
    data = build_kos(study=study, content=[("IMAGE", CTImageStorage, a, (1,)),
                                           ("WAVEFORM", "1.2.840.10008.5.1.4.1.1.9.1.1", w, ())], nested=True)
    refs = {r.sop_uid: r for r in key_object_references(data).references}
    assert refs[a] == Reference(a, CTImageStorage, None, None, (1,))
    assert refs[w].sop_class_uid == "1.2.840.10008.5.1.4.1.1.9.1.1"


def test_title_is_read_with_its_scheme():
    data = build_kos(study=generate_uid(), title=Code("113001", "99DCM", "Rejected for Quality Reasons"))
    kos = key_object_references(data)
    assert kos.title.value == "113001" and kos.is_rejection  # the old "99DCM" designator counts as DCM


@pytest.mark.parametrize("data, message", [
    (b"not dicom at all", "not a readable DICOM"),
    (make_instance(), "not a Key Object Selection document"),
    (sample_bytes("test-SR.dcm"), "not a Key Object Selection document"),
    (build_kos(study=generate_uid(), title=None), "lacks its title"),
], ids=["garbage", "ct-image", "sr-document", "no-title"])
def test_unusable_documents_are_invalid(data, message):
    with pytest.raises(ServerError) as err:
        key_object_references(data)
    assert err.value.kind is ErrorKind.INVALID and message in err.value.message


def test_selection_is_the_kos_plus_its_present_references_in_study_order():
    s = Study()
    missing_uid = generate_uid()
    foreign_study, foreign_series, foreign_sop = generate_uid(), generate_uid(), generate_uid()
    kos_ref, kos = s.kos([s.images[3], s.images[1], InstanceRef(s.uid, s.ct, missing_uid, CTImageStorage)],
                         extra_evidence={foreign_study: {foreign_series: [(CTImageStorage, foreign_sop)]}})
    # the foreign evidence is listed but not in the content tree: still a reference of the KOS
    assert foreign_sop in {r.sop_uid for r in kos.references}
    instances = [*s.images, kos_ref]
    selection = select_key_images(instances, [kos])
    assert selection.study_uid == s.uid
    assert selection.instances == (s.images[1], s.images[3], kos_ref)  # the caller's (study) order
    assert [r.sop_uid for r in selection.missing] == [missing_uid]
    assert selection.foreign == (Reference(foreign_sop, CTImageStorage, foreign_study, foreign_series),)
    assert selection.rejected == ()
    assert selection.key_objects == (kos,)
    assert [r.sop_uid for r in selection.references] == [i.sop_uid for i in selection.instances]


def test_two_selecting_documents_are_united():
    s = Study()
    k1_ref, k1 = s.kos([s.images[0]])
    k2_ref, k2 = s.kos([s.images[0], s.images[4]], title=FOR_TEACHING)
    selection = select_key_images([k2_ref, *s.images, k1_ref], [k1, k2])
    assert selection.instances == (k2_ref, s.images[0], s.images[4], k1_ref)
    assert selection.missing == selection.foreign == ()


def test_frames_travel_in_the_selection():
    s = Study()
    target = s.images[2]
    data = build_kos(study=s.uid, evidence={s.uid: {s.ct: [(CTImageStorage, target.sop_uid)]}},
                     content=[("IMAGE", CTImageStorage, target.sop_uid, (3, 1))])
    kos = key_object_references(data)
    kos_ref = InstanceRef(s.uid, kos.series_uid, kos.sop_uid, KEY_OBJECT_SELECTION_DOCUMENT)
    selection = select_key_images([*s.images, kos_ref], [kos])
    ref = next(r for r in selection.references if r.sop_uid == target.sop_uid)
    assert ref.frames == (3, 1) and ref.series_uid == s.ct


def test_a_study_without_kos_is_a_clear_error():
    s = Study()
    with pytest.raises(ServerError) as err:
        select_key_images(s.images, [])
    assert err.value.kind is ErrorKind.INVALID
    assert err.value.message == f"study {s.uid} has no Key Object Selection document (key images)"


@pytest.mark.parametrize("title", [REJECTED_FOR_QUALITY_REASONS, REJECTED_FOR_PATIENT_SAFETY_REASONS,
                                   INCORRECT_MODALITY_WORKLIST_ENTRY, DATA_RETENTION_POLICY_EXPIRED],
                         ids=lambda c: c.value)
def test_rejection_notes_withhold_what_they_reference(title):
    s = Study()
    key_ref, key = s.kos([s.images[0], s.images[2], s.images[3]])
    note_ref, note = s.kos([s.images[2]], title=title)
    assert note.is_rejection and not key.is_rejection
    selection = select_key_images([*s.images, key_ref, note_ref], [key, note])
    assert selection.instances == (s.images[0], s.images[3], key_ref)  # neither the rejected nor the note
    assert [r.sop_uid for r in selection.rejected] == [s.images[2].sop_uid]
    assert selection.key_objects == (key,)


def test_only_rejection_notes_means_no_key_images():
    s = Study()
    note_ref, note = s.kos([s.images[0]], title=REJECTED_FOR_QUALITY_REASONS)
    with pytest.raises(ServerError) as err:
        select_key_images([*s.images, note_ref], [note])
    assert err.value.kind is ErrorKind.INVALID
    assert f"study {s.uid} has no Key Object Selection document (key images)" in err.value.message


def test_a_rejected_kos_selects_nothing():
    s = Study()
    bad_ref, bad = s.kos([s.images[0]])
    good_ref, good = s.kos([s.images[1]])
    note_ref, note = s.kos([bad_ref], title=REJECTED_FOR_QUALITY_REASONS)
    selection = select_key_images([*s.images, bad_ref, good_ref, note_ref], [bad, good, note])
    assert selection.instances == (s.images[1], good_ref)
    assert [r.sop_uid for r in selection.rejected] == [bad_ref.sop_uid]
    with pytest.raises(ServerError, match="has no Key Object Selection document"):
        select_key_images([*s.images, bad_ref, note_ref], [bad, note])


def test_instance_refs_from_archive_rows():
    Row = namedtuple("Row", "id sop_uid series_uid study_uid sop_class_uid transfer_syntax_uid blob")
    row = Row(1, "1.2.3", "1.2", "1", CTImageStorage, ExplicitVRLittleEndian, "ab/cd")
    assert InstanceRef.from_row(row) == InstanceRef("1", "1.2", "1.2.3", CTImageStorage)


def test_parsing_real_instances_end_to_end():
    """KOS bytes referencing make_instance() images; the KOS document itself is a readable Part 10 file."""
    study, series = generate_uid(), generate_uid()
    images = [make_instance(study=study, series=series, instance_number=n) for n in (1, 2)]
    refs = [InstanceRef(study, series, str(dcmread(io.BytesIO(b)).SOPInstanceUID), CTImageStorage) for b in images]
    data = build_kos(study=study, evidence={study: {series: [(CTImageStorage, refs[1].sop_uid)]}},
                     content=[("IMAGE", CTImageStorage, refs[1].sop_uid, ())])
    kos = key_object_references(data)
    kos_ref = InstanceRef(study, kos.series_uid, kos.sop_uid, KEY_OBJECT_SELECTION_DOCUMENT)
    assert select_key_images([*refs, kos_ref], [kos]).instances == (refs[1], kos_ref)


def test_a_rejection_note_is_not_sent_even_when_selected():
    s = Study()
    note_ref, note = s.kos([s.images[0]], title=REJECTED_FOR_QUALITY_REASONS)
    key_ref, key = s.kos([s.images[1], note_ref])
    selection = select_key_images([*s.images, key_ref, note_ref], [key, note])
    assert selection.instances == (s.images[1], key_ref) and selection.missing == ()
