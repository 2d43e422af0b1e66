"""A teleconsult between two sites, end to end (issue 5): real ``telerad serve`` processes A and B on loopback,
driven by a real FHIR client (fhirpy) as the EHRs of both sites.

A's EHR orders an anonymised teleconsult; B's EHR finds the consult, accepts it, writes its report and completes
it; A's order Task follows every step (consultant-accepted, ..., report-received) and A finds the report as a
DiagnosticReport of the REAL patient and study, its PDF also stored into the real study. A rejected order fails
A's Task with B's reason.
"""

from __future__ import annotations

import base64
import io

import pytest
from fhirpy import SyncFHIRClient
from pydicom import dcmread
from pydicom.uid import generate_uid

from server.dicom.encapsulate import ENCAPSULATED_PDF_STORAGE, extract_pdf
from server.gateway.directory import site_ids
from tests.dicomdata import make_instance
from tests.gateway_nodes import Node, nodes, wait_for  # noqa: F401 (fixture)
from tests.integration.test_gateway_two_nodes import _instances_at, _stow

BASE = "https://telerad-bridge.de/fhir"
BUSINESS = f"{BASE}/CodeSystem/task-business-status"
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n% Befund: kein Anhalt fuer Lungenembolie\n%%EOF\n"


def service_of(node: Node) -> str:
    """The node's HealthcareService in the other sites' directories (the order's performer)."""
    return f"HealthcareService/{site_ids(node.site_id)[1]}"


def ehr(node: Node) -> SyncFHIRClient:
    return SyncFHIRClient(f"{node.url}/fhir", authorization=f"Bearer {node.token}")


def business(task) -> str:
    return task["businessStatus"]["coding"][0]["code"]


def study_at_a(a: Node, n: int = 2) -> tuple[str, list[bytes]]:
    study, series = generate_uid(), generate_uid()
    instances = [make_instance(study=study, series=series, instance_number=i, patient_name="Müller^Jürgen",
                               patient_id="PID-4711") for i in range(1, n + 1)]
    _stow(a, instances)
    return study, instances


def order(client: SyncFHIRClient, b: Node, study: str, *options: str, note: str | None = None):
    patient = client.resource("Patient", id="p1", identifier=[{"system": "urn:oid:1.2.3", "value": "PID-4711"}],
                              name=[{"family": "Müller", "given": ["Jürgen"]}])
    patient.save()
    org = client.resource("Organization", id="klinik-a", name="Klinik A")
    org.save()
    sr = client.resource(
        "ServiceRequest", status="active", intent="order", priority="urgent",
        meta={"profile": [f"{BASE}/StructureDefinition/teleconsult-servicerequest"]},
        code={"coding": [{"system": f"{BASE}/CodeSystem/consult-kind", "code": "teleconsult"}]},
        orderDetail=[{"coding": [{"system": f"{BASE}/CodeSystem/send-option", "code": o}]} for o in options],
        subject={"reference": "Patient/p1"}, requester={"reference": "Organization/klinik-a"},
        performer=[{"reference": service_of(b)}], supportingInfo=[{"reference": f"ImagingStudy/{study}"}],
        **({"note": [{"text": note}]} if note else {}))
    sr.save()
    [task] = [t for t in client.resources("Task").search(based_on=f"ServiceRequest/{sr.id}").fetch_all()
              if f"{BASE}/StructureDefinition/teleconsult-task" in t["meta"]["profile"]]
    return sr, task


def consult_at_b(client: SyncFHIRClient):
    return wait_for(lambda: (client.resources("Task").search(status="requested").fetch_all() or [None])[0],
                    120, what="the consult Task at B")


def order_task(client: SyncFHIRClient, task_id: str, code: str, status: str | None = None):
    def reached():
        task = client.reference("Task", task_id).to_resource()
        if business(task) == code and (status is None or task["status"] == status):
            return task.serialize()
        return None
    return wait_for(reached, 120, interval=0.3, what=f"A's order Task at {code}")


def move(client: SyncFHIRClient, task, status: str, **changes):
    task = client.reference("Task", task["id"]).to_resource()
    task["status"] = status
    for key, value in changes.items():
        task[key] = value
    task.save()
    return task


@pytest.fixture
def logs(nodes):
    """The nodes' server logs in the report of a failing test."""
    yield
    for node in nodes:
        lines = [x for x in node.tail(4000).splitlines() if '"GET /fhir/' not in x and "mail.log" not in x]
        print(f"---- node {node.name} ----\n" + "\n".join(lines[-60:]))


def test_anonymised_teleconsult_accepted_reported_and_relinked_to_the_real_patient(nodes, logs):
    a, b = nodes
    a.start(), b.start()
    ehr_a, ehr_b = ehr(a), ehr(b)
    study, _ = study_at_a(a)
    sr, task_a = order(ehr_a, b, study, "anonymised", "short-note", note="Bitte um Zweitmeinung")
    assert task_a["status"] == "requested"

    consult = consult_at_b(ehr_b)  # B's EHR finds the consult
    sr_b = ehr_b.reference(reference=consult["basedOn"][0]["reference"]).to_resource()
    pseudo_study = sr_b["supportingInfo"][0]["reference"].split("/", 1)[1]
    assert pseudo_study != study and pseudo_study.startswith("2.25.")
    patient_b = ehr_b.reference(reference=sr_b["subject"]["reference"]).to_resource()
    assert "Müller" not in str(patient_b) and "PID-4711" not in str(patient_b)
    assert [n["text"] for n in sr_b["note"]] == ["Bitte um Zweitmeinung"]

    move(ehr_b, consult, "accepted")
    accepted = order_task(ehr_a, task_a["id"], "consultant-accepted", "in-progress")
    assert accepted["owner"] == {"reference": service_of(b)}

    report = ehr_b.resource("DiagnosticReport", status="final", code={"text": "Telekonsil-Befund"},
                            basedOn=[{"reference": f"ServiceRequest/{sr_b['id']}"}],
                            subject=sr_b["subject"],
                            presentedForm=[{"contentType": "application/pdf",
                                            "data": base64.b64encode(PDF).decode("ascii")}])
    report.save()
    move(ehr_b, consult, "in-progress")
    order_task(ehr_a, task_a["id"], "consultant-working", "in-progress")
    move(ehr_b, consult, "completed", output=[{"type": {"text": "report"},
                                               "valueReference": {"reference": f"DiagnosticReport/{report.id}"}}])

    done = order_task(ehr_a, task_a["id"], "report-received", "completed")
    [out] = done["output"]
    dr = ehr_a.reference(reference=out["valueReference"]["reference"]).to_resource().serialize()
    assert dr["basedOn"] == [{"reference": f"ServiceRequest/{sr.id}"}]
    assert dr["subject"] == {"reference": "Patient/p1"}  # the real patient, not the pseudonym
    assert dr["imagingStudy"] == [{"reference": f"ImagingStudy/{study}"}]  # the real study
    assert base64.b64decode(dr["presentedForm"][0]["data"]) == PDF
    assert dr["code"]["text"] == "Telekonsil-Befund" and dr["status"] == "final"
    assert ehr_a.resources("DiagnosticReport").search(based_on=f"ServiceRequest/{sr.id}").count() == 1

    at_a = _instances_at(a, study)  # the report PDF is an instance of the real study, of the real patient
    [pdf_instance] = [d for d in at_a.values() if dcmread(io.BytesIO(d)).SOPClassUID == ENCAPSULATED_PDF_STORAGE]
    ds = dcmread(io.BytesIO(pdf_instance))
    assert (ds.StudyInstanceUID, ds.PatientID, str(ds.PatientName)) == (study, "PID-4711", "Müller^Jürgen")
    assert ds.get("PatientIdentityRemoved", "NO") == "NO" and extract_pdf(pdf_instance) == PDF
    assert len(at_a) == 3
    with a.http() as h:  # nothing pseudonymised lands in A's archive
        assert h.get("/dicomweb/studies", params={"StudyInstanceUID": pseudo_study}).status_code == 204

    consult = ehr_b.reference("Task", consult["id"]).to_resource()
    assert consult["status"] == "completed"  # B's Task tells the truth too


def test_rejected_consult_fails_the_order_with_the_reason(nodes):
    a, b = nodes
    a.start(), b.start()
    ehr_a, ehr_b = ehr(a), ehr(b)
    study, _ = study_at_a(a, 1)
    _, task_a = order(ehr_a, b, study)
    consult = consult_at_b(ehr_b)
    move(ehr_b, consult, "rejected", statusReason={"text": "Keine Kapazität, bitte Klinikum C anfragen"})
    failed = order_task(ehr_a, task_a["id"], "rejected-by-consultant", "failed")
    assert "Keine Kapazität" in failed["statusReason"]["text"]
    with b.http() as h:  # the rejection travelled as one workflow message, acknowledged
        jobs = h.get("/gateway/jobs").json()["jobs"]
    assert [j["state"] for j in jobs if j.get("kind") == "message"] in (["finished"], ["active"])


@pytest.mark.parametrize("status", ["cancelled"])
def test_a_cancelled_consult_fails_the_order(nodes, logs, status):
    a, b = nodes
    a.start(), b.start()
    ehr_a, ehr_b = ehr(a), ehr(b)
    study, _ = study_at_a(a, 1)
    _, task_a = order(ehr_a, b, study)
    consult = consult_at_b(ehr_b)
    move(ehr_b, consult, status)
    order_task(ehr_a, task_a["id"], "cancelled-by-consultant", "failed")


# ---- requests for prior images -------------------------------------------------------------------------------
def priors_at_b(b: Node) -> dict[str, str]:
    """Two studies of patient PID-4711 at B (CT 2023, MR 2024) and one of another patient: uid -> modality."""
    out = {}
    for modality, date, pid in (("CT", "20230310", "PID-4711"), ("MR", "20240502", "PID-4711"),
                                ("CT", "20240101", "PID-9999")):
        study, series = generate_uid(), generate_uid()
        _stow(b, [make_instance(study=study, series=series, modality=modality, study_date=date, patient_id=pid,
                                patient_name="Müller^Jürgen" if pid == "PID-4711" else "Other^Otto")])
        if pid == "PID-4711":
            out[study] = modality
    return out


def request_priors(client: SyncFHIRClient, b: Node, **criteria):
    client.resource("Patient", id="p1", identifier=[{"system": "urn:oid:1.2.3", "value": "PID-4711"}],
                    name=[{"family": "Müller", "given": ["Jürgen"]}]).save()
    client.resource("Organization", id="klinik-a", name="Klinik A").save()
    sr = client.resource(
        "ServiceRequest", status="active", intent="order", priority="routine",
        code={"coding": [{"system": f"{BASE}/CodeSystem/consult-kind", "code": "prior-request"}]},
        subject={"reference": "Patient/p1"}, requester={"reference": "Organization/klinik-a"},
        performer=[{"reference": service_of(b)}], **criteria)
    sr.save()
    [task] = [t for t in client.resources("Task").search(based_on=f"ServiceRequest/{sr.id}").fetch_all()]
    assert business(task) == "priors-requested"
    return sr, task


def studies_at(node: Node) -> set[str]:
    with node.http() as h:
        r = h.get("/dicomweb/studies")
    return set() if r.status_code == 204 else {s["0020000D"]["Value"][0] for s in r.json()}


def test_priors_request_answered_automatically_for_a_partner(nodes, logs):
    a, b = nodes
    b.settings["prior_auto_partners"] = a.address
    a.start(), b.start()
    ehr_a, ehr_b = ehr(a), ehr(b)
    wanted = priors_at_b(b)
    sr, task = request_priors(ehr_a, b, occurrencePeriod={"start": "2020-01-01"})
    done = order_task(ehr_a, task["id"], "priors-received", "completed")
    found = [o for o in done["output"] if o["type"]["text"] == "found"]
    arrived = {o["valueReference"]["reference"].split("/", 1)[1] for o in done["output"]
               if o["type"]["text"] == "received"}
    assert {o["valueReference"]["identifier"]["value"][len("urn:oid:"):] for o in found} == set(wanted) == arrived
    assert set(wanted) <= studies_at(a) and len(studies_at(a)) == 2  # not the other patient's study
    [task_b] = ehr_b.resources("Task").search(status="ready").fetch_all()
    assert business(task_b) == "priors-sending" and len(task_b["output"]) == 2
    with a.http() as h:  # priors are no consult at A
        assert h.get("/fhir/Task", params={"status": "requested"}).json().get("total", 0) == 0


def test_priors_request_waits_for_approval_and_filters_by_modality(nodes, logs):
    a, b = nodes
    a.start(), b.start()
    ehr_a, ehr_b = ehr(a), ehr(b)
    wanted = {uid for uid, modality in priors_at_b(b).items() if modality == "CT"}
    sr, task = request_priors(ehr_a, b, extension=[{
        "url": f"{BASE}/StructureDefinition/prior-modality",
        "valueCoding": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}}])
    waiting = order_task(ehr_a, task["id"], "awaiting-approval", "requested")
    assert [o["valueReference"]["identifier"]["value"] for o in waiting["output"]] == \
        [f"urn:oid:{uid}" for uid in wanted]
    [task_b] = ehr_b.resources("Task").search(status="requested").fetch_all()
    assert business(task_b) == "awaiting-approval"
    assert studies_at(a) == set()  # nothing sent before a person approves
    move(ehr_b, task_b, "accepted")
    order_task(ehr_a, task["id"], "priors-received", "completed")
    assert studies_at(a) == wanted
    task_b = ehr_b.reference("Task", task_b["id"]).to_resource()
    assert (task_b["status"], business(task_b)) == ("in-progress", "priors-sending")
