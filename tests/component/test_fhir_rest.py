"""FHIR R4 REST interactions (3.1.0): create, read, vread, update, delete, history, conditional, errors, scopes."""

from __future__ import annotations

import pytest

from tests.conftest import auth, make_token
from tests.fhir_examples import order, seed_client, task

FHIR = "application/fhir+json"


@pytest.fixture
def h(settings):
    return {**auth(make_token(settings)), "Content-Type": FHIR}


@pytest.fixture
def seeded(client, h):
    seed_client(client, h)


def org(name="Klinikum Bremen-Mitte", **extra):
    return {"resourceType": "Organization", "name": name, **extra}


def create(client, h, resource, **headers):
    r = client.post(f"/fhir/{resource['resourceType']}", json=resource, headers={**h, **headers})
    assert r.status_code in (200, 201), r.text
    return r


def test_crud_cycle(client, h):
    r = create(client, h, org())
    assert r.status_code == 201 and r.headers["etag"] == 'W/"1"'
    body = r.json()
    rid = body["id"]
    assert body["meta"]["versionId"] == "1" and body["meta"]["lastUpdated"].endswith("Z")
    assert r.headers["location"].endswith(f"/fhir/Organization/{rid}/_history/1")
    assert r.headers["content-type"].startswith(FHIR)

    r = client.get(f"/fhir/Organization/{rid}", headers=h)
    assert r.status_code == 200 and r.json()["name"] == "Klinikum Bremen-Mitte"

    r = client.put(f"/fhir/Organization/{rid}", json={**org("Neu"), "id": rid}, headers=h)
    assert r.status_code == 200 and r.headers["etag"] == 'W/"2"' and r.json()["meta"]["versionId"] == "2"

    assert client.get(f"/fhir/Organization/{rid}/_history/1", headers=h).json()["name"] == "Klinikum Bremen-Mitte"
    assert client.get(f"/fhir/Organization/{rid}/_history/2", headers=h).json()["name"] == "Neu"
    assert client.get(f"/fhir/Organization/{rid}/_history/9", headers=h).status_code == 404

    assert client.delete(f"/fhir/Organization/{rid}", headers=h).status_code == 204
    r = client.get(f"/fhir/Organization/{rid}", headers=h)
    assert r.status_code == 410 and r.json()["resourceType"] == "OperationOutcome"
    assert client.delete(f"/fhir/Organization/{rid}", headers=h).status_code == 204

    hist = client.get(f"/fhir/Organization/{rid}/_history", headers=h).json()
    assert hist["type"] == "history" and hist["total"] == 3
    assert [e["request"]["method"] for e in hist["entry"]] == ["DELETE", "PUT", "POST"]
    assert "resource" not in hist["entry"][0]
    typ = client.get("/fhir/Organization/_history", headers=h).json()
    assert typ["total"] == 3


def test_update_creates_with_client_id_and_if_match(client, h):
    r = client.put("/fhir/Patient/p-1", json={"resourceType": "Patient", "id": "p-1"}, headers=h)
    assert r.status_code == 201 and r.headers["location"].endswith("/fhir/Patient/p-1/_history/1")
    r = client.put("/fhir/Patient/p-1", json={"resourceType": "Patient", "id": "p-1", "gender": "male"},
                   headers={**h, "If-Match": 'W/"1"'})
    assert r.status_code == 200
    r = client.put("/fhir/Patient/p-1", json={"resourceType": "Patient", "id": "p-1"},
                   headers={**h, "If-Match": 'W/"1"'})
    assert r.status_code == 412 and r.json()["issue"][0]["code"] == "conflict"
    assert client.get("/fhir/Patient/p-1", headers=h).json()["gender"] == "male"


def test_prefer_return(client, h):
    r = create(client, h, org(), Prefer="return=minimal")
    assert r.status_code == 201 and r.content == b"" and r.headers["location"]
    r = create(client, h, org(), Prefer="return=OperationOutcome")
    assert r.json()["resourceType"] == "OperationOutcome"


def test_conditional_create(client, h, seeded):
    sr = order("A-1")
    first = create(client, h, sr, **{"If-None-Exist": "identifier=urn:ehr|A-1"})
    again = create(client, h, sr, **{"If-None-Exist": "identifier=urn:ehr|A-1"})
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    create(client, h, {**sr, "identifier": [{"system": "urn:ehr", "value": "A-2"}]})
    r = client.post("/fhir/ServiceRequest", json=sr, headers={**h, "If-None-Exist": "identifier=urn:ehr|"})
    assert r.status_code == 412
    assert client.get("/fhir/ServiceRequest", headers=h).json()["total"] == 2


def test_conditional_update(client, h):
    body = {"resourceType": "Endpoint", "status": "active", "address": "mailto:a@example.org",
            "identifier": [{"system": "urn:ep", "value": "1"}],
            "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                               "code": "secure-email"},
            "payloadType": [{"text": "DICOM"}]}
    r = client.put("/fhir/Endpoint?identifier=urn:ep|1", json=body, headers=h)
    assert r.status_code == 201
    rid = r.json()["id"]
    r = client.put("/fhir/Endpoint?identifier=urn:ep|1", json={**body, "status": "off"}, headers=h)
    assert r.status_code == 200 and r.json()["id"] == rid and r.json()["meta"]["versionId"] == "2"


@pytest.mark.parametrize("content, ctype, status", [
    (b"{bad json", FHIR, 400),
    (b"<Patient xmlns='http://hl7.org/fhir'><gender value='x'", "application/fhir+xml", 400),
    (b"PatientID,Name", "text/csv", 415),
    (b'{"resourceType":"Patient"}', "text/plain", 415),
    (b'{"resourceType":"Organization"}', FHIR, 400),
    (b'{"resourceType":"Patient","gender":3}', FHIR, 400),
    (b'[1]', FHIR, 400),
])
def test_bad_bodies(client, h, content, ctype, status):
    r = client.post("/fhir/Patient", content=content, headers={**h, "Content-Type": ctype})
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(FHIR) and r.json()["resourceType"] == "OperationOutcome"
    assert client.get("/fhir/Patient", headers=h).json()["total"] == 0


def test_structure_error_names_element(client, h):
    r = client.post("/fhir/Endpoint", json={"resourceType": "Endpoint", "status": "active"}, headers=h)
    assert r.status_code == 400
    assert r.json()["issue"][0]["expression"][0].startswith("Endpoint.")


def test_update_id_mismatch_and_unknown_type(client, h):
    r = client.put("/fhir/Patient/a", json={"resourceType": "Patient", "id": "b"}, headers=h)
    assert r.status_code == 400
    assert client.get("/fhir/Nope", headers=h).status_code == 404
    assert client.get("/fhir/Patient/missing", headers=h).status_code == 404


def test_formats(client, h):
    assert client.get("/fhir/Patient?_format=ttl", headers=h).status_code == 406
    assert client.get("/fhir/Patient", headers={**h, "Accept": "text/turtle"}).status_code == 406
    assert client.get("/fhir/Patient?_format=xml", headers=h).headers["content-type"].startswith("application/fhir+xml")
    assert client.get("/fhir/Patient?_format=json", headers=h).status_code == 200


def test_auth_scopes_and_tenants(client, settings, h):
    rid = create(client, h, org()).json()["id"]
    r = client.get(f"/fhir/Organization/{rid}")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["issue"][0]["code"] == "login"
    ro = {**auth(make_token(settings, scope="system/Organization.rs")), "Content-Type": FHIR}
    assert client.get(f"/fhir/Organization/{rid}", headers=ro).status_code == 200
    r = client.post("/fhir/Organization", json=org(), headers=ro)
    assert r.status_code == 403 and r.json()["issue"][0]["code"] == "forbidden"
    assert client.get("/fhir/Patient", headers=ro).status_code == 403
    assert client.delete(f"/fhir/Organization/{rid}", headers=ro).status_code == 403

    b = {**auth(make_token(settings, tenant="site-b")), "Content-Type": FHIR}
    assert client.get(f"/fhir/Organization/{rid}", headers=b).status_code == 404
    assert client.get(f"/fhir/Organization/{rid}/_history", headers=b).status_code == 404
    assert client.get(f"/fhir/Organization/{rid}/_history/1", headers=b).status_code == 404
    assert client.get("/fhir/Organization/_history", headers=b).json()["total"] == 0
    assert client.get("/fhir/Organization", headers=b).json()["total"] == 0
    assert client.delete(f"/fhir/Organization/{rid}", headers=b).status_code == 404
    r = client.put(f"/fhir/Organization/{rid}", json={**org("B"), "id": rid}, headers=b)
    assert r.status_code == 201  # tenant B gets its own resource with that id
    assert client.get(f"/fhir/Organization/{rid}", headers=h).json()["name"] == "Klinikum Bremen-Mitte"


def test_metadata_and_smart(client):
    r = client.get("/fhir/metadata")
    assert r.status_code == 200
    cs = r.json()
    assert cs["resourceType"] == "CapabilityStatement" and cs["fhirVersion"] == "4.0.1"
    rest = cs["rest"][0]
    assert rest["mode"] == "server"
    types = {res["type"]: res for res in rest["resource"]}
    assert {"Patient", "Organization", "HealthcareService", "Endpoint", "ServiceRequest", "Task"} <= set(types)
    hs = types["HealthcareService"]
    assert {"name", "organization", "endpoint", "_id"} <= {p["name"] for p in hs["searchParam"]}
    assert "HealthcareService:endpoint" in hs["searchInclude"]
    assert {i["code"] for i in hs["interaction"]} >= {"read", "vread", "create", "update", "delete", "search-type"}
    for url in ("/.well-known/smart-configuration", "/fhir/.well-known/smart-configuration"):
        smart = client.get(url).json()
        assert "permission-v2" in smart["capabilities"] and "system/*.cruds" in smart["scopes_supported"]


def test_dicomweb_errors_unchanged(client):
    r = client.get("/dicomweb/studies")
    assert r.status_code == 401 and r.headers["content-type"].startswith("application/dicom+json")


def _order_bundle(kind="transaction", bad_task=False):
    sr_url, task_url = "urn:uuid:6f3a0c1e-0000-4000-8000-000000000001", "urn:uuid:6f3a0c1e-0000-4000-8000-000000000002"
    t = task(sr_url)
    if bad_task:
        t["status"] = 7
    return {"resourceType": "Bundle", "type": kind, "entry": [
        {"fullUrl": task_url, "resource": t, "request": {"method": "POST", "url": "Task"}},
        {"fullUrl": sr_url, "resource": order("T-1"),
         "request": {"method": "POST", "url": "ServiceRequest", "ifNoneExist": "identifier=urn:ehr|T-1"}},
        {"request": {"method": "GET", "url": "ServiceRequest?identifier=urn:ehr|T-1"}},
    ]}


def test_transaction_resolves_urn_uuid(client, h, seeded):
    r = client.post("/fhir", json=_order_bundle(), headers=h)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["type"] == "transaction-response"
    task, sr, found = (e for e in out["entry"])
    assert task["response"]["status"] == "201 Created" and sr["response"]["status"] == "201 Created"
    sr_id = sr["resource"]["id"]
    assert task["resource"]["basedOn"][0]["reference"] == f"ServiceRequest/{sr_id}"
    assert found["resource"]["total"] == 1
    stored = client.get(f"/fhir/Task/{task['resource']['id']}", headers=h).json()
    assert stored["focus"]["reference"] == f"ServiceRequest/{sr_id}"
    # again: ifNoneExist finds the order, the new Task points at it
    again = client.post("/fhir", json=_order_bundle(), headers=h).json()
    assert again["entry"][1]["resource"]["id"] == sr_id and again["entry"][1]["response"]["status"] == "200 OK"
    assert again["entry"][0]["resource"]["basedOn"][0]["reference"] == f"ServiceRequest/{sr_id}"


def test_transaction_is_all_or_nothing(client, h, seeded):
    r = client.post("/fhir", json=_order_bundle(bad_task=True), headers=h)
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    bundle = _order_bundle()
    bundle["entry"].append({"request": {"method": "DELETE", "url": "Patient/none"}})
    r = client.post("/fhir", json=bundle, headers=h)
    assert r.status_code == 404
    assert client.get("/fhir/ServiceRequest", headers=h).json()["total"] == 0
    assert client.get("/fhir/Task", headers=h).json()["total"] == 0


def test_batch_entries_fail_alone(client, settings, h, seeded):
    bundle = _order_bundle("batch")
    bundle["entry"].append({"request": {"method": "GET", "url": "Patient/none"}})
    out = client.post("/fhir", json=bundle, headers=h).json()
    assert out["type"] == "batch-response"
    # a batch resolves no urn:uuid between entries: the Task's reference stays unresolved (422)
    assert [e["response"]["status"][:3] for e in out["entry"]] == ["422", "201", "200", "404"]
    assert out["entry"][0]["response"]["outcome"]["issue"][0]["code"] == "not-found"
    assert out["entry"][3]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    # another tenant's transaction neither sees nor touches site-a's resources
    b = {**auth(make_token(settings, tenant="site-b")), "Content-Type": FHIR}
    sr_id = out["entry"][1]["resource"]["id"]
    r = client.post("/fhir", json={"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "GET", "url": f"ServiceRequest/{sr_id}"}}]}, headers=b)
    assert r.status_code == 404
    ro = {**auth(make_token(settings, scope="system/*.rs")), "Content-Type": FHIR}
    assert client.post("/fhir", json=_order_bundle(), headers=ro).status_code == 403


def test_validator_hook_runs_before_store(app, client, h):
    from server.errors import ErrorKind, ServerError
    from server.fhir.outcome import Unprocessable
    from server.fhir.service import FhirService

    seen = []

    def profile(new, old):
        if new["resourceType"] == "ServiceRequest" and new.get("priority") == "bogus":
            raise Unprocessable([{"severity": "error", "code": "code-invalid", "diagnostics": "bad priority",
                                  "expression": ["ServiceRequest.priority"]},
                                 {"severity": "error", "code": "required", "diagnostics": "x"}])

    def task(new, old):
        seen.append((old and old["status"], new["status"]))
        if old and old["status"] == "completed":
            raise ServerError(ErrorKind.CONFLICT, "illegal transition", parameter="Task.status")

    app.state.fhir = FhirService(app.state.fhir.store, validators={"*": profile, "Task": task})
    sr = {"resourceType": "ServiceRequest", "status": "active", "intent": "order", "priority": "bogus",
          "subject": {"reference": "Patient/p"}}
    r = client.post("/fhir/ServiceRequest", json=sr, headers=h)
    assert r.status_code == 422 and len(r.json()["issue"]) == 2
    assert r.json()["issue"][0]["expression"] == ["ServiceRequest.priority"]
    assert client.get("/fhir/ServiceRequest", headers=h).json()["total"] == 0
    t = {"resourceType": "Task", "id": "t1", "status": "completed", "intent": "order"}
    assert client.put("/fhir/Task/t1", json=t, headers=h).status_code == 201
    r = client.put("/fhir/Task/t1", json={**t, "status": "in-progress"}, headers=h)
    assert r.status_code == 409 and r.json()["issue"][0]["code"] == "conflict"
    assert seen == [(None, "completed"), ("completed", "in-progress")]
    assert client.get("/fhir/Task/t1", headers=h).json()["meta"]["versionId"] == "1"


def test_invalid_client_id(client, h):
    long_id = "x" * 65
    r = client.put(f"/fhir/Patient/{long_id}", json={"resourceType": "Patient", "id": long_id}, headers=h)
    assert r.status_code == 400


def test_concurrent_conditional_creates_make_one(live_server, settings):
    import concurrent.futures

    import httpx

    headers = {**auth(make_token(settings)), "Content-Type": FHIR, "If-None-Exist": "identifier=urn:ehr|C-1"}
    seed_client(httpx, auth(make_token(settings)), f"{live_server.url}/fhir/")
    sr = order("C-1")

    def post(_):
        return httpx.post(f"{live_server.url}/fhir/ServiceRequest", json=sr, headers=headers, timeout=30).status_code

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(post, range(6)))
    assert sorted(statuses) == [200] * 5 + [201]
    r = httpx.get(f"{live_server.url}/fhir/ServiceRequest", headers=headers)
    assert r.json()["total"] == 1
