"""An anonymised teleconsult order with de-identification options through the real sender (issue 5): with
clean-descriptors + retain-longitudinal-modified-dates the mails (decrypted with B's key) carry dates shifted by the
job secret's days and descriptors without the patient's identity (PS3.15 E.3.5, E.3.6); with exclude-burned-in a
Secondary Capture image stays at A. SQLite only (the SQL is covered by the component tests on both backends)."""

from __future__ import annotations

import datetime as dt
import io

from pydicom import dcmread

from server.dicom.deidentify import Options, Pseudonymizer
from server.dicom.parse import parse_part10
from server.gateway.directory import system_principal
from server.mail import drg
from server.store import gateway as gw
from server.store.archive import NewInstance
from tests.component.test_orders_deid import instance
from tests.integration.test_gateway_sender import A, _decrypt, keys, make_world, sqlite_world  # noqa: F401
from tests.integration.test_orders_send import world  # noqa: F401 - fixture: A with Patient p1, Organization klinik-a

BASE = "https://telerad-bridge.de/fhir"
STUDY = "1.2.826.0.1.3680043.10.79"
DESCRIPTORS = {"StudyDescription": "CT Thorax Müller", "SeriesDescription": "Axial PID-1 Jürgen"}
DATES = {"StudyDate": "20240115", "ContentDate": "20240116", "AcquisitionDateTime": "20240116101500"}


def _store(w, data: bytes) -> None:
    """Archive one instance as STOW-RS leaves it (blob + index)."""
    digest = gw.store_blob(w.blobs, data)
    w.archive.index_batch(A, [NewInstance(parse_part10(w.blobs.path_of(digest)), digest, len(data))], replace=False)


def _order(w, *codes: str) -> gw.Job:
    sr = {"resourceType": "ServiceRequest", "status": "active", "intent": "order", "priority": "routine",
          "code": {"coding": [{"system": f"{BASE}/CodeSystem/consult-kind", "code": "teleconsult"}]},
          "orderDetail": [{"coding": [{"system": f"{BASE}/CodeSystem/send-option", "code": c}]} for c in codes],
          "subject": {"reference": "Patient/p1"}, "requester": {"reference": "Organization/klinik-a"},
          "performer": [{"reference": "HealthcareService/siteb-teleradiology"}],
          "supportingInfo": [{"reference": f"ImagingStudy/{STUDY}"}]}
    assert w.fhir.create(system_principal(A), "ServiceRequest", sr, base="").status == 201
    [job] = gw.list_jobs(w.engine, A)[1]
    return job


def _received(w, keys) -> list:
    return [dcmread(io.BytesIO(_decrypt(drg.parse_outer(raw), keys).dicom)) for raw in w.capture.mails]


def _shifted(value: str, days: int) -> str:
    day = dt.datetime.strptime(value[:8], "%Y%m%d").date() + dt.timedelta(days=days)
    return day.strftime("%Y%m%d") + value[8:]


def test_clean_descriptors_and_modified_dates_reach_the_recipient(world, keys):
    w = world
    for n in (1, 2):
        _store(w, instance(STUDY, n, **DESCRIPTORS, **DATES))
    job = _order(w, "anonymised", "clean-descriptors", "retain-longitudinal-modified-dates")
    assert w.sender.send_due() == 2
    shift = Pseudonymizer(bytes.fromhex(job.deid_secret),
                          options=Options(retain_longitudinal="modified")).mapping.date_shift_days
    assert -395 <= shift <= -30
    received = _received(w, keys)
    assert len(received) == 2
    for ds in received:
        for keyword, value in DATES.items():
            assert ds[keyword].value == _shifted(value, shift), keyword
        assert ds.StudyDescription == "CT Thorax ***" and ds.SeriesDescription == "Axial *** ***"
        assert ds.PatientIdentityRemoved == "YES" and ds.LongitudinalTemporalInformationModified == "MODIFIED"
        assert [i.CodeValue for i in ds.DeidentificationMethodCodeSequence] == ["113100", "113107", "113105"]
        assert str(ds.PatientName).startswith("PSEUDONYM^") and not ds.get("PatientBirthDate")
    assert len({ds.StudyInstanceUID for ds in received}) == 1
    raw = b"".join(_decrypt(drg.parse_outer(m), keys).dicom for m in w.capture.mails)
    assert "Müller".encode() not in raw and b"PID-1" not in raw and b"20240115" not in raw


def test_the_basic_profile_alone_removes_dates_and_descriptors(world, keys):
    w = world
    _store(w, instance(STUDY, 1, **DESCRIPTORS, **DATES))
    _order(w, "anonymised")
    assert w.sender.send_due() == 1
    [ds] = _received(w, keys)
    assert "StudyDescription" not in ds and "SeriesDescription" not in ds
    assert not ds.StudyDate and ds.LongitudinalTemporalInformationModified == "REMOVED"


def test_exclude_burned_in_keeps_the_secondary_capture_at_home(world, keys):
    w = world
    _store(w, instance(STUDY, 1, sc=True))
    _store(w, instance(STUDY, 2, BurnedInAnnotation="NO"))
    job = _order(w, "anonymised", "exclude-burned-in")
    assert job.total == 1 and w.sender.send_due() == 1
    [ds] = _received(w, keys)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds.BurnedInAnnotation == "NO"
