"""Teleconsult orders at the requesting site (issue 5, server/gateway/orders.py), in-process on SQLite and
PostgreSQL: a ServiceRequest makes its order Task and (study present) its transfer job in the same transaction,
with the send options on the job; an order for a study not yet there waits and starts after the sweep; bad orders
get an OperationOutcome and leave nothing behind; the order Task follows its transfer."""

from __future__ import annotations

import base64
import io
import json
import uuid

import pytest

from pydicom import dcmread

from server.crypto import generate_key
from server.dicom.encapsulate import ENCAPSULATED_PDF_STORAGE, extract_pdf
from server.gateway.directory import import_bundle
from server.gateway.orders import ORDER_SYSTEM, OrderListener, order_part, sweep_waiting
from server.store import gateway as gw
from tests.component.test_gateway_api import POLICY, _endpoint, app, keys  # noqa: F401 - fixtures
from tests.conftest import auth, make_token
from tests.dicomdata import make_instance, multipart
from tests.unit.test_dicom_kos import build_kos

A, B = "site-a", "site-b"
BASE = "https://telerad-bridge.de/fhir"
SD = f"{BASE}/StructureDefinition"
CK, SO, BS = f"{BASE}/CodeSystem/consult-kind", f"{BASE}/CodeSystem/send-option", \
    f"{BASE}/CodeSystem/task-business-status"
CT = "1.2.840.10008.5.1.4.1.1.2"
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
STUDY, KOS_STUDY, LATER, THEIRS = "1.2.826.0.1.8", "1.2.826.0.1.9", "1.2.826.0.1.10", "1.2.826.0.1.11"


@pytest.fixture(scope="module")
def old_key():
    return generate_key("Alt <dicom@alt.example.de>", bits=2048).public()


def _stow(client, headers, parts):
    body, ctype = multipart(parts)
    r = client.post("/dicomweb/studies", content=body, headers={**headers, "Content-Type": ctype})
    assert r.status_code == 200, r.text


@pytest.fixture
def world(app, client, keys, old_key):  # noqa: F811
    """site-a: directory (bremen 1.7, alt 1.5, nokey expired), Patient p1, its Organization; a study of 3
    instances, a study with a KOS selecting one of 2 images; site-b: one study."""
    old = _endpoint("alt-dicom", "alt", "dicom@alt.example.de", old_key)
    old["extension"][-1]["valueCode"] = "1.5"
    resources = [
        {"resourceType": "Organization", "id": "bremen", "name": "Klinikum Bremen", "active": True},
        _endpoint("bremen-dicom", "bremen", "dicom@bremen.example.de", keys["bremen"]),
        {"resourceType": "HealthcareService", "id": "bremen-tele", "name": "Teleradiologie Bremen",
         "providedBy": {"reference": "Organization/bremen"}, "endpoint": [{"reference": "Endpoint/bremen-dicom"}]},
        {"resourceType": "Organization", "id": "alt", "name": "Altes Profil", "active": True}, old,
        {"resourceType": "Organization", "id": "nokey", "name": "Abgelaufener Schlüssel", "active": True},
        _endpoint("nokey-dicom", "nokey", "dicom@nokey.example.de", keys["expired"]),
        {"resourceType": "Organization", "id": "nomail", "name": "Ohne DICOM E-Mail", "active": True},
        {"resourceType": "Organization", "id": "klinik-a", "name": "Klinik A", "active": True},
    ]
    import_bundle(app.state.fhir, A, {"resourceType": "Bundle", "type": "collection",
                                      "entry": [{"resource": r} for r in resources]})
    ha, hb = auth(make_token(app.state.settings, A)), auth(make_token(app.state.settings, B))
    patient = {"resourceType": "Patient", "id": "p1", "name": [{"family": "Müller", "given": ["Jürgen"]}]}
    assert client.put("/fhir/Patient/p1", json=patient, headers=ha).status_code == 201
    for rid, form in (("r1", {"contentType": "application/pdf", "title": "Vorbefund",
                              "data": base64.b64encode(PDF).decode("ascii")}),
                      ("r2", {"contentType": "text/plain", "data": base64.b64encode(b"kein PDF").decode("ascii")})):
        report = {"resourceType": "DiagnosticReport", "id": rid, "status": "final",
                  "code": {"text": "CT Thorax Vorbefund"}, "subject": {"reference": "Patient/p1"},
                  "presentedForm": [form]}
        assert client.put(f"/fhir/DiagnosticReport/{rid}", json=report, headers=ha).status_code == 201
    _stow(client, ha, [make_instance(study=STUDY, series=f"{STUDY}.1", sop=f"{STUDY}.1.{i}", instance_number=i)
                       for i in (1, 2, 3)])
    images = [make_instance(study=KOS_STUDY, series=f"{KOS_STUDY}.1", sop=f"{KOS_STUDY}.1.{i}", instance_number=i)
              for i in (1, 2)]
    kos = build_kos(study=KOS_STUDY, series=f"{KOS_STUDY}.2", sop=f"{KOS_STUDY}.2.1",
                    evidence={KOS_STUDY: {f"{KOS_STUDY}.1": [(CT, f"{KOS_STUDY}.1.2")]}})
    _stow(client, ha, [*images, kos])
    _stow(client, hb, [make_instance(study=THEIRS, series=f"{THEIRS}.1", sop=f"{THEIRS}.1.1")])
    return {"a": ha, "b": hb}


def _sr(*, options=(), priority="routine", performer="HealthcareService/bremen-tele", study=STUDY, literal=True,
        note=None, code="teleconsult", **extra):
    ref = {"reference": f"ImagingStudy/{study}"} if literal else \
        {"type": "ImagingStudy", "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{study}"}}
    sr = {"resourceType": "ServiceRequest", "status": "active", "intent": "order", "priority": priority,
          "code": {"coding": [{"system": CK, "code": code}]},
          "orderDetail": [{"coding": [{"system": SO, "code": o}]} for o in options],
          "subject": {"reference": "Patient/p1"},
          "requester": {"reference": "Organization/klinik-a", "display": "Klinik A, Radiologie"},
          "performer": [{"reference": performer}], "supportingInfo": [ref],
          "reasonCode": [{"text": "Verdacht auf Lungenembolie"}], "authoredOn": "2026-11-23T10:00:00Z", **extra}
    if note is not None:
        sr["note"] = [{"text": note}]
    return sr


def _post(client, w, sr):
    return client.post("/fhir/ServiceRequest", json=sr, headers=w["a"])


def _jobs(app, tenant=A):
    return gw.list_jobs(app.state.engine, tenant)[1]


def _tasks(client, w, sr_id):
    r = client.get(f"/fhir/Task?based-on=ServiceRequest/{sr_id}", headers=w["a"])
    assert r.status_code == 200, r.text
    tasks = [e["resource"] for e in r.json().get("entry", [])]
    order = [t for t in tasks if t["meta"]["profile"] == [f"{SD}/teleconsult-task"]]
    transfer = [t for t in tasks if t["meta"]["profile"] == [f"{SD}/transfer-task"]]
    return order, transfer


def _code(task):
    return task["status"], task["businessStatus"]["coding"][0]["code"]


def _valid(client, w, task):
    issues = client.post("/fhir/Task/$validate", json=task, headers=w["a"]).json()["issue"]
    assert [i["severity"] for i in issues] == ["information"], issues


def test_an_order_makes_its_task_and_its_transfer(client, world, app):
    w = world
    r = _post(client, w, _sr())
    assert r.status_code == 201, r.text
    sr = r.json()
    [order], [transfer] = _tasks(client, w, sr["id"])
    assert _code(order) == ("requested", "transfer-queued")
    assert order["focus"] == order["basedOn"][0] == {"reference": f"ServiceRequest/{sr['id']}"}
    assert order["for"] == {"reference": "Patient/p1"} and order["owner"] == {"reference": "HealthcareService/bremen-tele"}
    assert order["intent"] == "order" and order["code"]["coding"][0]["code"] == "fulfill"
    assert order["requester"]["reference"] == "Organization/klinik-a"
    assert transfer["partOf"] == [{"reference": f"Task/{order['id']}"}]
    assert _code(transfer) == ("ready", "transfer-queued")
    _valid(client, w, order)
    _valid(client, w, transfer)
    [job] = _jobs(app)
    mails = gw.job_mails(app.state.engine, A, job.job_id)
    assert [m.sop_instance_uid for m in mails] == [f"{STUDY}.1.{i}" for i in (1, 2, 3)]
    assert (job.priority, job.order_ref, job.order_task, job.task_id) == (
        0, f"ServiceRequest/{sr['id']}", order["id"], transfer["id"])
    assert (job.recipient_endpoint, job.send_options, job.note, job.deid_secret) == (
        "Endpoint/bremen-dicom", None, None, None)
    part = json.loads(job.order_json)
    assert part == json.loads(order_part(sr, site_address="dicom@site-a.example.de").data)
    assert part["identifier"] == [{"system": ORDER_SYSTEM, "value": f"{sr['id']}@dicom@site-a.example.de"}]
    assert part["requester"] == {"display": "Klinik A, Radiologie"} and "subject" not in part
    assert (part["resourceType"], part["status"], part["intent"], part["priority"]) == (
        "ServiceRequest", "active", "order", "routine")
    assert part["reasonCode"] == sr["reasonCode"] and part["authoredOn"] == sr["authoredOn"]


def test_send_options_go_onto_the_job(client, world, app):
    w = world
    r = _post(client, w, _sr(study=KOS_STUDY, options=("key-images-only", "anonymised", "short-note"),
                             priority="stat", code="emergency", note="Bitte dringend befunden."))
    assert r.status_code == 201, r.text
    [job] = _jobs(app)
    mails = gw.job_mails(app.state.engine, A, job.job_id)
    assert [m.sop_instance_uid for m in mails] == [f"{KOS_STUDY}.1.2", f"{KOS_STUDY}.2.1"]  # key image + KOS
    assert job.priority == 3 and job.options == {"key-images-only", "anonymised", "short-note"}
    assert job.note == "Bitte dringend befunden."
    assert len(bytes.fromhex(job.deid_secret)) == 32 and json.loads(job.deid_options)["retain_uids"] is False
    part = json.loads(job.order_json)
    assert part["priority"] == "stat" and part["note"] == [{"text": "Bitte dringend befunden."}]
    assert sorted(c["coding"][0]["code"] for c in part["orderDetail"]) == ["anonymised", "key-images-only",
                                                                          "short-note"]
    [order], [transfer] = _tasks(client, w, r.json()["id"])
    assert order["priority"] == transfer["priority"] == "stat"
    # the secret stays at A: not in any Task
    assert job.deid_secret not in json.dumps([order, transfer])


def test_with_report_a_diagnostic_report_becomes_an_encapsulated_pdf(client, world, app):
    sr = _sr(options=("with-report",), supportingInfo=[{"reference": f"ImagingStudy/{STUDY}"},
                                                       {"reference": "DiagnosticReport/r1"}])
    r = _post(client, world, sr)
    assert r.status_code == 201, r.text
    [job] = _jobs(app)
    mails = gw.job_mails(app.state.engine, A, job.job_id)
    assert [m.sop_instance_uid for m in mails[:3]] == [f"{STUDY}.1.{i}" for i in (1, 2, 3)] and len(mails) == 4
    data = app.state.blobs.path_of(job.report_blob).read_bytes()
    ds = dcmread(io.BytesIO(data))
    assert ds.SOPClassUID == ENCAPSULATED_PDF_STORAGE and ds.SOPInstanceUID == mails[3].sop_instance_uid
    assert ds.StudyInstanceUID == STUDY and str(ds.PatientName) == "Müller^Jürgen"
    assert extract_pdf(data) == PDF and ds.DocumentTitle == "CT Thorax Vorbefund"


def test_a_1_5_recipient_gets_no_extra_parts(client, world, app):
    r = _post(client, world, _sr(performer="Organization/alt", options=("anonymised",)))
    assert r.status_code == 201, r.text
    [job] = _jobs(app)
    assert job.order_json is None and job.recipient_endpoint == "Endpoint/alt-dicom"


def test_an_order_in_a_transaction_bundle(client, world, app):
    w = world
    patient = f"urn:uuid:{uuid.uuid4()}"
    sr = _sr()
    sr["subject"] = {"reference": patient}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": patient, "resource": {"resourceType": "Patient", "name": [{"family": "Neu"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": sr, "request": {"method": "POST", "url": "ServiceRequest"}}]}
    r = client.post("/fhir", json=bundle, headers=w["a"])
    assert r.status_code == 200, r.text
    location = r.json()["entry"][1]["response"]["location"]
    sr_id = location.split("ServiceRequest/")[1].split("/")[0]
    [order], [transfer] = _tasks(client, w, sr_id)
    assert order["for"]["reference"].startswith("Patient/") and transfer["partOf"][0]["reference"].endswith(order["id"])
    assert len(_jobs(app)) == 1


def test_an_order_waits_for_its_study(client, world, app):
    w = world
    r = _post(client, w, _sr(study=LATER, literal=False))
    assert r.status_code == 201, r.text
    sr_id = r.json()["id"]
    [order], transfers = _tasks(client, w, sr_id)
    assert _code(order) == ("requested", "awaiting-study") and transfers == [] and _jobs(app) == []
    _valid(client, w, order)
    assert sweep_waiting(app.state.fhir) == 0  # still not there
    _stow(client, w["a"], [make_instance(study=LATER, series=f"{LATER}.1", sop=f"{LATER}.1.{i}", instance_number=i)
                           for i in (1, 2)])
    assert sweep_waiting(app.state.fhir) == 1
    assert sweep_waiting(app.state.fhir) == 0  # started once
    [order], [transfer] = _tasks(client, w, sr_id)
    assert _code(order) == ("requested", "transfer-queued")
    assert transfer["partOf"] == [{"reference": f"Task/{order['id']}"}]
    [job] = _jobs(app)
    assert job.study_uid == LATER and job.total == 2 and job.order_task == order["id"]


def test_a_waiting_order_that_cannot_start_fails_its_task(client, world, app):
    w = world
    r = _post(client, w, _sr(study=LATER, literal=False, options=("key-images-only",)))
    assert r.status_code == 201, r.text
    _stow(client, w["a"], [make_instance(study=LATER, series=f"{LATER}.1", sop=f"{LATER}.1.1")])
    assert sweep_waiting(app.state.fhir) == 0
    [order], transfers = _tasks(client, w, r.json()["id"])
    assert _code(order) == ("failed", "failed") and "Key Object Selection" in order["statusReason"]["text"]
    assert transfers == [] and _jobs(app) == []


@pytest.mark.parametrize("case", [
    "unknown-performer", "no-dicom-email", "expired-key", "foreign-study", "missing-study", "long-note",
    "no-kos", "note-to-1.5", "anonymised-report", "report-without-pdf", "two-reports", "two-studies"])
def test_bad_orders_store_and_send_nothing(client, world, app, case):
    w = world
    sr = {
        "unknown-performer": lambda: _sr(performer="HealthcareService/nowhere"),
        "no-dicom-email": lambda: _sr(performer="Organization/nomail"),
        "expired-key": lambda: _sr(performer="Organization/nokey"),
        "foreign-study": lambda: _sr(study=THEIRS),
        "missing-study": lambda: _sr(study="1.2.3.4.5"),
        "long-note": lambda: _sr(note="x" * 1001),
        "no-kos": lambda: _sr(options=("key-images-only",)),
        "note-to-1.5": lambda: _sr(performer="Organization/alt", options=("short-note",), note="kurz"),
        "anonymised-report": lambda: _sr(options=("with-report", "anonymised"), supportingInfo=[
            {"reference": f"ImagingStudy/{STUDY}"}, {"reference": "DiagnosticReport/r1"}]),
        "report-without-pdf": lambda: _sr(options=("with-report",), supportingInfo=[
            {"reference": f"ImagingStudy/{STUDY}"}, {"reference": "DiagnosticReport/r2"}]),
        "two-reports": lambda: _sr(options=("with-report",), supportingInfo=[
            {"reference": f"ImagingStudy/{STUDY}"}, {"reference": "DiagnosticReport/r1"},
            {"reference": "DiagnosticReport/r1"}]),
        "two-studies": lambda: _sr(supportingInfo=[{"reference": f"ImagingStudy/{STUDY}"},
                                                    {"reference": f"ImagingStudy/{KOS_STUDY}"}]),
    }[case]()
    r = _post(client, w, sr)
    assert r.status_code in (400, 422), (case, r.status_code, r.text)
    body = r.json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["severity"] == "error"
    assert _jobs(app) == []
    assert client.get("/fhir/Task", headers=w["a"]).json()["total"] == 0
    assert client.get("/fhir/ServiceRequest", headers=w["a"]).json()["total"] == 0


def test_not_every_service_request_is_an_order(client, world, app):
    w = world
    no_study = _sr()
    del no_study["supportingInfo"]
    for sr in ({**_sr(), "status": "draft"}, no_study,  # (a prior-request is a priors request: test_teleconsult_nodes)
               {**_sr(), "identifier": [{"system": ORDER_SYSTEM, "value": "x@dicom@elsewhere.example"}]},
               {**_sr(), "identifier": [{"system": f"{BASE}/sid/drg-set", "value": "S1@dicom@elsewhere.example"}]}):
        assert _post(client, w, sr).status_code == 201
    assert _jobs(app) == [] and client.get("/fhir/Task", headers=w["a"]).json()["total"] == 0


def _mid(mail, job):
    return f"<{job.set_id}.{mail.set_part}@site-a.example.de>"


def test_the_order_task_follows_its_transfer(client, world, app):
    w = world
    engine, hook = app.state.engine, app.state.gateway.hook
    [listener] = [x for x in app.state.fhir.listeners if isinstance(x, OrderListener)]
    listener.clock = lambda: 50.0
    sr_id = _post(client, w, _sr()).json()["id"]
    claimed = gw.claim_mails(engine, 100.0, limit=5, lease=60.0, message_id=_mid, also=hook)
    [order], [transfer] = _tasks(client, w, sr_id)
    assert _code(transfer) == ("in-progress", "transfer-running")
    assert _code(order) == ("in-progress", "transfer-running")
    history = client.get(f"/fhir/Task/{order['id']}/_history", headers=w["a"]).json()
    assert [e["resource"]["status"] for e in history["entry"]][::-1] == ["requested", "accepted", "in-progress"]
    for c in claimed:
        gw.mark_sent(engine, A, c.mail.pk, 101.0, also=hook)
    [order], _ = _tasks(client, w, sr_id)
    assert _code(order) == ("in-progress", "awaiting-receipts")
    for c in claimed:
        gw.record_mdn(engine, A, c.mail.message_id, "ok", "displayed", 300.0, policy=POLICY, rand=0, also=hook)
    [order], [transfer] = _tasks(client, w, sr_id)
    assert _code(transfer) == ("completed", "delivered")
    assert _code(order) == ("in-progress", "delivered")
    _valid(client, w, order)

    sr_id = _post(client, w, _sr(study=KOS_STUDY)).json()["id"]
    claimed = gw.claim_mails(engine, 400.0, limit=5, lease=60.0, message_id=_mid, also=hook)
    gw.mark_failed(engine, A, claimed[0].mail.pk, 401.0, "550 no such user", retryable=False, policy=POLICY,
                   rand=0.5, also=hook)
    [order], [transfer] = _tasks(client, w, sr_id)
    assert _code(transfer)[0] == "failed" and _code(order) == ("failed", "failed")
    assert "550 no such user" in order["statusReason"]["text"]
    _valid(client, w, order)


def test_bad_priors_requests_are_422_and_nothing_is_stored_or_sent(client, world, app):
    """A request for prior images (server.gateway.priors.PriorsListener) that B could not search for, or that
    cannot be sent, is refused with an OperationOutcome; no ServiceRequest, Task or message job is left."""
    w = world
    client.put("/fhir/Patient/anon", json={"resourceType": "Patient", "id": "anon"}, headers=w["a"])
    bad = {
        "no identifier": (_sr(code="prior-request", subject={"reference": "Patient/anon"}), "ServiceRequest.subject"),
        "unknown recipient": (_sr(code="prior-request", performer="HealthcareService/nowhere"),
                              "ServiceRequest.performer[0]"),
        "expired key": (_sr(code="prior-request", performer="Organization/nokey"), "ServiceRequest.performer[0]"),
        "note too long": (_sr(code="prior-request", note="x" * 1001), "ServiceRequest.note"),
    }
    for what, (sr, where) in bad.items():
        del sr["supportingInfo"]
        r = _post(client, w, sr)
        assert r.status_code == 422, (what, r.text)
        assert where in {e for i in r.json()["issue"] for e in i.get("expression", [])}, (what, r.text)
    assert _jobs(app) == []
    assert client.get("/fhir/ServiceRequest", headers=w["a"]).json()["total"] == 0
    assert client.get("/fhir/Task", headers=w["a"]).json()["total"] == 0
    client.put("/fhir/Patient/known", json={"resourceType": "Patient", "id": "known", "identifier": [
        {"system": "urn:oid:1.2.3", "value": "PID-1"}]}, headers=w["a"])
    good = _sr(code="prior-request", subject={"reference": "Patient/known"})
    del good["supportingInfo"]
    assert _post(client, w, good).status_code == 201
    [job] = _jobs(app)
    assert job.kind == gw.JOB_MESSAGE and json.loads(job.order_json)["contained"][0]["identifier"]
