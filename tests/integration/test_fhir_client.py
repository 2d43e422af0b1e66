"""The real ``fhirpy`` client (SyncFHIRClient) against the server under uvicorn, on both databases."""

from __future__ import annotations

import httpx
import pytest
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import MultipleResourcesFound, OperationOutcome, ResourceNotFound

from tests.conftest import make_token
from tests.fhir_examples import order as make_order
from tests.fhir_examples import seed_client, task as make_task


@pytest.fixture
def fhir(live_server, settings):
    token = make_token(settings)
    client = SyncFHIRClient(f"{live_server.url}/fhir", authorization=f"Bearer {token}")
    client.token = token
    seed_client(httpx, {"Authorization": f"Bearer {token}"}, f"{live_server.url}/fhir/")
    return client


def test_order_directory_and_tasks(fhir, live_server):
    org = fhir.resource("Organization", name="Klinikum Bremen-Nord", address=[{"city": "Bremen"}])
    org.save()
    assert org.id and org["meta"]["versionId"] == "1"
    ep = fhir.resource("Endpoint", status="active", address="mailto:tele@example.org",
                       connectionType={"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                                       "code": "secure-email"},
                       payloadType=[{"text": "DICOM"}], managingOrganization=org.to_reference())
    ep.save()
    hs = fhir.resource("HealthcareService", name="Teleradiologie", providedBy=org.to_reference(),
                       endpoint=[ep.to_reference()])
    hs.save()

    # find a recipient by the organisation's name, with its endpoint
    found = fhir.resources("HealthcareService").search(**{"organization.name": "nord"}) \
        .include("HealthcareService", "endpoint").fetch_raw()
    types = sorted(e["resource"]["resourceType"] for e in found["entry"])
    assert types == ["Endpoint", "HealthcareService"]

    # order twice with the same business identifier: one resource (conditional create)
    order = make_order("O-1", priority="stat")
    first, created = fhir.resources("ServiceRequest").search(identifier="urn:ehr|O-1").get_or_create(
        fhir.resource("ServiceRequest", **order))
    again, created_again = fhir.resources("ServiceRequest").search(identifier="urn:ehr|O-1").get_or_create(
        fhir.resource("ServiceRequest", **order))
    assert created and not created_again and first.id == again.id
    headers = {"Authorization": f"Bearer {fhir.token}", "Content-Type": "application/fhir+json",
               "If-None-Exist": "identifier=urn:ehr|O-1"}
    r = httpx.post(f"{live_server.url}/fhir/ServiceRequest", json=order, headers=headers)
    assert r.status_code == 200 and r.json()["id"] == first.id
    assert fhir.resources("ServiceRequest").count() == 1

    # tasks: page through, include the order
    for i in range(5):
        fhir.resource("Task", **make_task(f"ServiceRequest/{first.id}", identifier=str(i))).save()
    tasks = fhir.resources("Task").search(status="requested").limit(2).fetch_all()
    assert len(tasks) == 5
    raw = fhir.resources("Task").search(identifier="urn:t|0").include("Task", "based-on").fetch_raw()
    assert {e["search"]["mode"] for e in raw["entry"]} == {"match", "include"}

    # conditional update, then a stale If-Match
    task, created = fhir.resources("Task").search(identifier="urn:t|0").update(
        fhir.resource("Task", **make_task(f"ServiceRequest/{first.id}", "accepted", identifier="0")))
    assert not created and task["meta"]["versionId"] == "2"
    stale = {**task.serialize(), "status": "in-progress"}
    r = httpx.put(f"{live_server.url}/fhir/Task/{task.id}", json=stale,
                  headers={**headers, "If-Match": 'W/"1"'})
    assert r.status_code == 412 and r.json()["resourceType"] == "OperationOutcome"
    assert fhir.reference("Task", task.id).to_resource()["status"] == "accepted"


def test_errors_reach_the_client(fhir):
    with pytest.raises(ResourceNotFound):
        fhir.reference("Patient", "nope").to_resource()
    with pytest.raises(OperationOutcome):
        fhir.resources("Patient").search(bogus="1").fetch()
    with pytest.raises(OperationOutcome):
        fhir.resource("Endpoint", status="active").save()  # connectionType, payloadType, address missing
    p = fhir.resource("Patient", name=[{"family": "Müller"}])
    p.save()
    p.delete()
    with pytest.raises(ResourceNotFound):
        fhir.reference("Patient", p.id).to_resource()
    fhir.resource("Patient", identifier=[{"value": "x"}]).save()
    fhir.resource("Patient", identifier=[{"value": "x"}]).save()
    with pytest.raises(MultipleResourcesFound):
        fhir.resources("Patient").search(identifier="x").get()


def test_transaction_with_urn_uuid(fhir):
    sr_url = "urn:uuid:0d4e7a52-1111-4c4c-9a9a-000000000001"
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": sr_url, "request": {"method": "POST", "url": "ServiceRequest"},
         "resource": make_order()},
        {"request": {"method": "POST", "url": "Task"}, "resource": make_task(sr_url)},
    ]}
    out = fhir.execute("", method="post", data=bundle)
    assert out["type"] == "transaction-response"
    sr_id = out["entry"][0]["resource"]["id"]
    task = fhir.resources("Task").search(**{"based-on": f"ServiceRequest/{sr_id}"}).get()
    assert task["basedOn"][0]["reference"] == f"ServiceRequest/{sr_id}"
