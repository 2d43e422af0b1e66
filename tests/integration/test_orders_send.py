"""An order's transfer through the real sender (issue 5): an anonymised + short-note + emergency teleconsult order
at site A is sent to a capture SMTP server; the mails decrypt with B's key, the DICOM is de-identified with one
consistent pseudonymised Study UID (the set's STUDYID), and every mail carries the note, order.json and the
emergency flag. SQLite only (the SQL is covered by the component tests on both backends)."""

from __future__ import annotations

import base64
import io
import json

import pytest
from pydicom import dcmread

from server.dicom.encapsulate import ENCAPSULATED_PDF_STORAGE, extract_pdf
from server.gateway.directory import system_principal
from server.gateway.orders import ORDER_SYSTEM, OrderListener
from server.mail import drg
from server.store import gateway as gw
from tests.integration.test_gateway_sender import (A, A_ADDR, B_ADDR, _decrypt, keys, make_world,  # noqa: F401
                                                   sqlite_world)

BASE = "https://telerad-bridge.de/fhir"
STUDY = "1.2.826.0.1.3680043.10.77"
NOTE = "Bitte um Zweitmeinung: Rundherd rechts apikal?"


@pytest.fixture
def world(sqlite_world):
    w = sqlite_world
    [listener] = [x for x in w.fhir.listeners if isinstance(x, OrderListener)]
    listener._sites, listener.clock = w.sender.sites, w.clock
    principal = system_principal(A)
    w.fhir.update(principal, "Patient", "p1", {"resourceType": "Patient", "id": "p1",
                                               "name": [{"family": "Müller", "given": ["Jürgen"]}]}, base="")
    w.fhir.update(principal, "Organization", "klinik-a", {"resourceType": "Organization", "id": "klinik-a",
                                                          "name": "Klinikum A"}, base="")
    return w


def test_an_anonymised_emergency_order_with_a_note(world, keys):
    w = world
    sops = w.store(3, STUDY)
    sr = {"resourceType": "ServiceRequest", "status": "active", "intent": "order", "priority": "stat",
          "code": {"coding": [{"system": f"{BASE}/CodeSystem/consult-kind", "code": "emergency"}]},
          "orderDetail": [{"coding": [{"system": f"{BASE}/CodeSystem/send-option", "code": c}]}
                          for c in ("anonymised", "short-note")],
          "subject": {"reference": "Patient/p1"},
          "requester": {"reference": "Organization/klinik-a", "display": "Klinikum A, Notaufnahme"},
          "performer": [{"reference": "HealthcareService/siteb-teleradiology"}],
          "supportingInfo": [{"reference": f"ImagingStudy/{STUDY}"}], "note": [{"text": NOTE}]}
    created = w.fhir.create(system_principal(A), "ServiceRequest", sr, base="")
    assert created.status == 201
    sr_id = created.resource["id"]
    [job] = gw.list_jobs(w.engine, A)[1]
    assert job.priority == 3 and job.deid_secret
    assert w.sender.send_due() == 3
    mails = w.capture.mails
    assert len(mails) == 3
    study_uids, sop_uids, sent = set(), set(), []
    for raw in mails:
        outer = drg.parse_outer(raw)
        assert outer.emergency and b"\r\nX-TELEMEDICINE-PRIORITY: emergency\r\n" in raw
        assert outer.recipients == (B_ADDR,) and outer.sender == A_ADDR
        assert job.deid_secret.encode() not in raw
        inner = _decrypt(outer, keys)
        assert inner.emergency and inner.set == outer.set
        ds = dcmread(io.BytesIO(inner.dicom))
        assert ds.PatientIdentityRemoved == "YES"
        assert str(ds.PatientName) != "Müller^Jürgen" and ds.PatientID != "PID-1"
        assert "Müller".encode() not in inner.dicom and b"PID-1" not in inner.dicom
        assert ds.StudyInstanceUID == outer.set.study_uid != STUDY and ds.StudyInstanceUID.startswith("2.25.")
        assert ds.SOPInstanceUID not in sops and not ds.SOPInstanceUID.startswith(STUDY)
        assert ds.SeriesInstanceUID != f"{STUDY}.1"
        assert STUDY.encode() not in inner.dicom and inner.filename == f"{ds.SOPInstanceUID}.dcm"
        study_uids.add(ds.StudyInstanceUID)
        sent.append(inner.dicom)
        sop_uids.add(ds.SOPInstanceUID)
        notes = [p for p in inner.parts if p.content_type == "text/plain"]
        orders = [p for p in inner.parts if p.content_type == "application/fhir+json"]
        assert [n.data.decode("utf-8") for n in notes] == [NOTE]
        [order] = orders
        assert order.filename == "order.json"
        body = json.loads(order.data)
        assert body["identifier"] == [{"system": ORDER_SYSTEM, "value": f"{sr_id}@{A_ADDR}"}]
        assert body["priority"] == "stat" and body["note"] == [{"text": NOTE}]
        assert body["requester"] == {"display": "Klinikum A, Notaufnahme"}
        assert "subject" not in body and "Müller" not in order.data.decode("utf-8")
    assert len(study_uids) == 1 and len(sop_uids) == 3
    # a resend of the same job produces the same de-identified bytes (the secret is the job's)
    again = w.sender._deidentified(job, w.stored[sops[0]])
    assert again[0] in sent and again[2] == study_uids.pop()


def test_with_report_the_diagnostic_report_travels_as_an_encapsulated_pdf(world, keys):
    w = world
    study = "1.2.826.0.1.3680043.10.78"
    sops = w.store(2, study)
    pdf = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
    principal = system_principal(A)
    w.fhir.update(principal, "DiagnosticReport", "r1", {
        "resourceType": "DiagnosticReport", "id": "r1", "status": "final", "code": {"text": "Vorbefund"},
        "subject": {"reference": "Patient/p1"},
        "presentedForm": [{"contentType": "application/pdf", "data": base64.b64encode(pdf).decode("ascii")}]},
        base="")
    sr = {"resourceType": "ServiceRequest", "status": "active", "intent": "order", "priority": "routine",
          "code": {"coding": [{"system": f"{BASE}/CodeSystem/consult-kind", "code": "teleconsult"}]},
          "orderDetail": [{"coding": [{"system": f"{BASE}/CodeSystem/send-option", "code": "with-report"}]}],
          "subject": {"reference": "Patient/p1"}, "requester": {"reference": "Organization/klinik-a"},
          "performer": [{"reference": "Organization/siteb"}],
          "supportingInfo": [{"reference": f"ImagingStudy/{study}"}, {"reference": "DiagnosticReport/r1"}]}
    assert w.fhir.create(principal, "ServiceRequest", sr, base="").status == 201
    assert w.sender.send_due() == 3
    inners = sorted((_decrypt(drg.parse_outer(raw), keys) for raw in w.capture.mails), key=lambda i: i.set.part)
    assert sorted(i.set.part for i in inners) == [1, 2, 3]
    [report] = [i for i in inners if i.set.part == 3]
    assert extract_pdf(report.dicom) == pdf and [i.dicom for i in inners if i.set.part < 3] == \
        [w.stored[s] for s in sops]
    rows = w.archive.instances(A, study)
    assert len(rows) == 3 and rows[-1].sop_class_uid == ENCAPSULATED_PDF_STORAGE  # stored into A's study
    assert not any(p.content_type == "text/plain" for i in inners for p in i.parts)  # no short-note asked
    [order] = [p for p in report.parts if p.filename == "order.json"]
    assert json.loads(order.data)["requester"] == {"display": "Klinikum A"}  # the requesting Organization's name


def test_an_anonymised_order_s_note_and_reason_lose_the_patient_s_identity(world, keys):
    w = world
    study = "1.2.826.0.1.3680043.10.79"
    w.store(1, study)
    sr = {"resourceType": "ServiceRequest", "status": "active", "intent": "order", "priority": "routine",
          "code": {"coding": [{"system": f"{BASE}/CodeSystem/consult-kind", "code": "teleconsult"}]},
          "orderDetail": [{"coding": [{"system": f"{BASE}/CodeSystem/send-option", "code": c}]}
                          for c in ("anonymised", "short-note")],
          "subject": {"reference": "Patient/p1"}, "requester": {"reference": "Organization/klinik-a"},
          "performer": [{"reference": "HealthcareService/siteb-teleradiology"}],
          "supportingInfo": [{"reference": f"ImagingStudy/{study}"}],
          "reasonCode": [{"text": "Verlauf bei Jürgen Müller"}],
          "note": [{"text": "Pat. Müller (PID-1), geb. 01.01.1960: Rundherd?"}]}
    assert w.fhir.create(system_principal(A), "ServiceRequest", sr, base="").status == 201
    assert w.sender.send_due() == 1
    inner = _decrypt(drg.parse_outer(w.capture.mails[0]), keys)
    [note] = [p.data.decode("utf-8") for p in inner.parts if p.content_type == "text/plain"]
    [order] = [json.loads(p.data) for p in inner.parts if p.content_type == "application/fhir+json"]
    assert note == "Pat. *** (***), geb. ***: Rundherd?" == order["note"][0]["text"]
    assert order["reasonCode"] == [{"text": "Verlauf bei *** ***"}]
    assert "Müller" not in json.dumps(order, ensure_ascii=False) and b"PID-1" not in inner.parts[0].data
