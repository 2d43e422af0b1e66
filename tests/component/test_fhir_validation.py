"""Content rules on create/update (profiles, R4 required bindings, Task state machine, references), $validate,
XML, and read-only types: each refusal is an OperationOutcome naming the element, and nothing is stored."""

from __future__ import annotations

import pytest

from tests.conftest import auth, make_token
from tests.fhir_examples import B, FHIR, order, seed_client, task

XML = "application/fhir+xml"


@pytest.fixture
def h(settings, client):
    headers = {**auth(make_token(settings)), "Content-Type": FHIR}
    seed_client(client, headers)
    return headers


def _count(client, h, rtype):
    return client.get(f"/fhir/{rtype}?_summary=count", headers=h).json()["total"]


def _created(client, h, resource):
    r = client.post(f"/fhir/{resource['resourceType']}", json=resource, headers=h)
    assert r.status_code == 201, r.text
    return r.json()


@pytest.mark.parametrize("change, status, code, expression", [
    ({"priority": None}, 422, "required", "ServiceRequest.priority"),
    ({"code": None}, 422, "required", "ServiceRequest.code"),
    ({"priority": "sofort"}, 422, "code-invalid", "ServiceRequest.priority"),
    ({"status": "offen"}, 422, "code-invalid", "ServiceRequest.status"),
    ({"code": {"coding": [{"system": f"{B}/CodeSystem/consult-kind", "code": "massage"}]}}, 422, "code-invalid",
     "ServiceRequest.code"),
    ({"orderDetail": [{"coding": [{"system": f"{B}/CodeSystem/send-option", "code": "fax"}]}]}, 422,
     "code-invalid", "ServiceRequest.orderDetail[0]"),
    ({"subject": {"reference": "Patient/nobody"}}, 422, "not-found", "ServiceRequest.subject"),
    ({"performer": [{"reference": "HealthcareService/none"}]}, 422, "not-found", "ServiceRequest.performer[0]"),
    ({"supportingInfo": [{"reference": "urn:uuid:0e4f0000-0000-4000-8000-000000000000"}]}, 422, "not-found",
     "ServiceRequest.supportingInfo[0]"),
    ({"subject": {"reference": 42}}, 400, "invalid", None),
    ({"unknownElement": 1}, 400, "invalid", "ServiceRequest.unknownElement"),
])
def test_invalid_orders_are_refused(client, h, change, status, code, expression):
    sr = order()
    for key, value in change.items():
        if value is None:
            sr.pop(key)
        else:
            sr[key] = value
    r = client.post("/fhir/ServiceRequest", json=sr, headers=h)
    assert r.status_code == status, r.text
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    issue = next(i for i in outcome["issue"] if expression is None or i.get("expression") == [expression])
    assert issue["code"] == code and issue["severity"] == "error"
    assert _count(client, h, "ServiceRequest") == 0


def test_emergency_invariant_and_all_issues_reported(client, h):
    sr = order(code={"coding": [{"system": f"{B}/CodeSystem/consult-kind", "code": "emergency"}]})
    r = client.post("/fhir/ServiceRequest", json=sr, headers=h)
    assert r.status_code == 422 and r.json()["issue"][0]["code"] == "invariant"  # tb-sr-1: emergency is stat
    sr.pop("requester")
    sr["subject"] = {"reference": "Patient/none"}
    issues = client.post("/fhir/ServiceRequest", json=sr, headers=h).json()["issue"]
    assert {"ServiceRequest.requester"} <= {e for i in issues for e in i["expression"]}
    assert client.post("/fhir/ServiceRequest", json={**sr, "priority": "stat", "requester": {
        "reference": "Organization/o2"}, "subject": {"reference": "Patient/p1"}}, headers=h).status_code == 201


def test_task_state_machine(client, h):
    sr = _created(client, h, order())
    t = _created(client, h, task(f"ServiceRequest/{sr['id']}"))
    url = f"/fhir/Task/{t['id']}"
    r = client.put(url, json={**t, "status": "in-progress"}, headers=h)
    assert r.status_code == 409  # requested -> in-progress skips acceptance (task.html#statemachine)
    for status in ("accepted", "in-progress"):
        assert client.put(url, json={**t, "status": status}, headers=h).status_code == 200
        t = client.get(url, headers=h).json()
    assert client.put(url, json={**t, "status": "completed"}, headers=h).status_code == 200
    t = client.get(url, headers=h).json()
    r = client.put(url, json={**t, "status": "in-progress"}, headers=h)
    assert r.status_code == 409 and r.json()["issue"][0]["code"] == "conflict"
    assert r.json()["issue"][0]["expression"] == ["Task.status"]
    assert client.get(url, headers=h).json()["status"] == "completed"
    r = client.post("/fhir/Task", json=task(f"ServiceRequest/{sr['id']}", "completed"), headers=h)
    assert r.status_code == 409  # a Task is not born completed
    failed = task(f"ServiceRequest/{sr['id']}", "failed")
    r = client.put(url, json={**t, **{k: failed[k] for k in ("status",)}}, headers=h)
    assert r.status_code == 409  # completed -> failed is not a transition either
    bs = {"coding": [{"system": f"{B}/CodeSystem/task-business-status", "code": "report-received"}]}
    r = client.post("/fhir/Task", json=task(f"ServiceRequest/{sr['id']}", businessStatus=bs), headers=h)
    assert r.status_code == 400 and r.json()["issue"][0]["expression"] == ["Task.businessStatus"]


def test_base_bindings_without_profile(client, h):
    r = client.post("/fhir/Patient", json={"resourceType": "Patient", "gender": "mann"}, headers=h)
    assert r.status_code == 422 and r.json()["issue"][0]["expression"] == ["Patient.gender"]
    r = client.post("/fhir/DiagnosticReport", json={"resourceType": "DiagnosticReport", "status": "fertig",
                                                    "code": {"text": "CT Thorax"}}, headers=h)
    assert r.status_code == 422


def test_validate_operation(client, h):
    good = order()
    r = client.post("/fhir/ServiceRequest/$validate", json=good, headers=h)
    assert r.status_code == 200 and r.json()["issue"][0]["severity"] == "information"
    bad = {**order(), "priority": "sofort", "subject": {"reference": "Patient/none"}}
    params = {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": bad},
                                                           {"name": "mode", "valueCode": "create"}]}
    issues = client.post("/fhir/ServiceRequest/$validate", json=params, headers=h).json()["issue"]
    assert {i["code"] for i in issues} == {"code-invalid", "not-found"}
    assert _count(client, h, "ServiceRequest") == 0
    sr = _created(client, h, order())
    t = _created(client, h, task(f"ServiceRequest/{sr['id']}", "completed" if False else "requested"))
    r = client.post(f"/fhir/Task/{t['id']}/$validate", json={**t, "status": "completed"}, headers=h)
    assert [i["code"] for i in r.json()["issue"]] == ["conflict"]  # requested -> completed is illegal
    assert client.get(f"/fhir/Task/{t['id']}/$validate", headers=h).json()["issue"][0]["code"] == "informational"
    assert client.get(f"/fhir/Task/{t['id']}/$validate?mode=delete", headers=h).status_code == 200
    assert client.get("/fhir/Task/none/$validate", headers=h).status_code == 404
    r = client.post("/fhir/Patient/$validate", json={"resourceType": "Patient", "gender": 3}, headers=h)
    assert r.status_code == 200 and r.json()["issue"][0]["code"] == "structure"
    assert client.post("/fhir/Patient/$validate?mode=bogus", json={"resourceType": "Patient"},
                       headers=h).status_code == 400


def test_xml_in_and_out(client, h):
    body = b'<Patient xmlns="http://hl7.org/fhir"><name><family value="M\xc3\xbcller"/></name>' \
           b'<gender value="female"/></Patient>'
    r = client.post("/fhir/Patient", content=body, headers={**h, "Content-Type": XML, "Accept": XML})
    assert r.status_code == 201 and r.headers["content-type"].startswith(XML)
    assert b"<Patient" in r.content and "Müller".encode() in r.content
    rid = r.headers["location"].split("/")[-3]
    assert client.get(f"/fhir/Patient/{rid}", headers=h).json()["gender"] == "female"
    r = client.get(f"/fhir/Patient?_id={rid}&_format=xml", headers=h)
    assert r.status_code == 200 and r.content.count(b"<Bundle") == 1
    assert client.get("/fhir/metadata?_format=application%2Ffhir%2Bxml").content.find(b"<CapabilityStatement") >= 0
    assert b"<CapabilityStatement" in client.get("/fhir/metadata?_format=application/fhir+xml").content  # '+' as ' '
    r = client.post("/fhir/Patient", content=b"<Patient", headers={**h, "Content-Type": XML})
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    r = client.post("/fhir/Patient", content=b'<Foo xmlns="http://hl7.org/fhir"/>', headers={**h, "Content-Type": XML})
    assert r.status_code == 400
    assert client.get("/fhir/Patient", headers={**h, "Accept": "text/html"}).status_code == 406


@pytest.mark.parametrize("rtype", ["AuditEvent", "ImagingStudy"])
def test_read_only_types(client, h, rtype):
    r = client.post(f"/fhir/{rtype}", json={"resourceType": rtype}, headers=h)
    assert r.status_code == 405 and r.json()["issue"][0]["code"] == "not-supported"
    assert client.put(f"/fhir/{rtype}/x", json={"resourceType": rtype, "id": "x"}, headers=h).status_code == 405
    assert client.delete(f"/fhir/{rtype}/x", headers=h).status_code == 405
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "POST", "url": rtype}, "resource": {"resourceType": rtype}}]}
    assert client.post("/fhir", json=bundle, headers=h).status_code in (400, 405)
    assert client.get(f"/fhir/{rtype}", headers=h).status_code == 200


def test_every_change_is_audited(client, settings, h):
    before = _count(client, h, "AuditEvent")
    sr = _created(client, h, order())
    assert client.put(f"/fhir/ServiceRequest/{sr['id']}", json={**sr, "priority": "urgent"}, headers=h).status_code == 200
    assert client.delete(f"/fhir/ServiceRequest/{sr['id']}", headers=h).status_code == 204
    assert client.post("/fhir/ServiceRequest", json={**order(), "priority": "x"}, headers=h).status_code == 422
    events = client.get(f"/fhir/AuditEvent?entity=ServiceRequest/{sr['id']}&_sort=date", headers=h).json()
    assert [e["resource"]["action"] for e in events["entry"]] == ["C", "U", "D"]
    assert _count(client, h, "AuditEvent") == before + 3  # the refused create left no trace but its 422
    first = events["entry"][0]["resource"]
    assert first["subtype"][0]["code"] == "create" and first["agent"][0]["requestor"] is True
    assert first["entity"][0]["what"]["reference"] == f"ServiceRequest/{sr['id']}/_history/1"
    assert client.get("/fhir/AuditEvent?action=D", headers=h).json()["total"] == 1
    other = auth(make_token(settings, tenant="site-b"))
    assert client.get("/fhir/AuditEvent", headers=other).json()["total"] == 0
    ro = auth(make_token(settings, scope="system/ServiceRequest.rs"))
    assert client.get("/fhir/AuditEvent", headers=ro).status_code == 403


def test_errors_in_xml_when_xml_is_asked(client, h):
    r = client.get("/fhir/Patient/none?_format=xml", headers=h)
    assert r.status_code == 404 and r.headers["content-type"].startswith(XML)
    assert b"<OperationOutcome" in r.content and b'<code value="not-found"/>' in r.content
    r = client.get("/fhir/Patient?bogus=1", headers={**h, "Accept": XML})
    assert r.status_code == 400 and b"<OperationOutcome" in r.content


def test_oversized_and_hostile_bodies(client, settings, h):
    limit = settings.max_fhir_bytes
    big = b'{"resourceType":"Patient","name":[{"text":"' + b"x" * limit + b'"}]}'
    r = client.post("/fhir/Patient", content=big, headers=h)
    assert r.status_code == 413 and r.json()["issue"][0]["code"] == "too-costly"
    r = client.post("/fhir/Patient/_search", content=b"name=" + b"x" * limit,
                    headers={**h, "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413
    secret = settings.data_dir / "secret.txt"
    secret.write_text("top secret")
    xxe = (f'<?xml version="1.0"?><!DOCTYPE p [<!ENTITY x SYSTEM "file://{secret}">]>'
           '<Patient xmlns="http://hl7.org/fhir"><name><family value="&x;"/></name></Patient>').encode()
    r = client.post("/fhir/Patient", content=xxe, headers={**h, "Content-Type": XML})
    assert b"top secret" not in r.content
    if r.status_code == 201:
        assert "top secret" not in client.get(r.headers["location"].rsplit("/_history", 1)[0], headers=h).text
    else:
        assert r.status_code == 400
    deep = b"[" * 100_000 + b"]" * 100_000
    assert client.post("/fhir/Patient", content=deep, headers=h).status_code == 400
    assert _count(client, h, "Patient") == 1  # only the seeded directory's Patient
