"""Tenant isolation on every FHIR interaction: site-b never sees, matches, changes or references site-a's data."""

from __future__ import annotations

import pytest

from tests.conftest import auth, make_token
from tests.fhir_examples import FHIR, order, seed_client, task


@pytest.fixture
def sites(settings, client):
    a = {**auth(make_token(settings, tenant="site-a")), "Content-Type": FHIR}
    b = {**auth(make_token(settings, tenant="site-b")), "Content-Type": FHIR}
    seed_client(client, a)
    sr = client.post("/fhir/ServiceRequest", json=order("X-1"), headers=a).json()
    t = client.post("/fhir/Task", json=task(f"ServiceRequest/{sr['id']}"), headers=a).json()
    return a, b, sr, t


def test_reads_and_history(client, sites):
    a, b, sr, t = sites
    for url in (f"/fhir/ServiceRequest/{sr['id']}", f"/fhir/ServiceRequest/{sr['id']}/_history/1",
                f"/fhir/ServiceRequest/{sr['id']}/_history", "/fhir/Patient/p1",
                f"/fhir/Task/{t['id']}/$validate"):
        assert client.get(url, headers=a).status_code == 200, url
        r = client.get(url, headers=b)
        assert r.status_code == 404 and r.json()["resourceType"] == "OperationOutcome", url
    for rtype in ("ServiceRequest", "Task", "Patient", "AuditEvent"):
        assert client.get(f"/fhir/{rtype}/_history", headers=b).json()["total"] == 0
        assert client.get(f"/fhir/{rtype}", headers=b).json()["total"] == 0


def test_search_includes_and_chains(client, sites):
    a, b, sr, t = sites
    for query in ("Task?_include=Task:based-on", f"ServiceRequest?_id={sr['id']}&_revinclude=Task:based-on",
                  "ServiceRequest?identifier=urn:ehr|X-1", "Task?patient.identifier=PID-1",
                  "ServiceRequest?subject=Patient/p1", "HealthcareService?organization.name=bremen"):
        assert client.get(f"/fhir/{query}", headers=a).json()["total"] >= 1, query
        assert client.get(f"/fhir/{query}", headers=b).json()["total"] == 0, query
    r = client.post("/fhir/Task/_search", content="status=requested",
                    headers={**b, "Content-Type": "application/x-www-form-urlencoded"})
    assert r.json()["total"] == 0


def test_writes(client, sites):
    a, b, sr, t = sites
    # conditional create: site-a's order does not match for site-b, which gets its own (after its own directory)
    seed_client(client, b)
    r = client.post("/fhir/ServiceRequest", json=order("X-1"), headers={**b, "If-None-Exist": "identifier=urn:ehr|X-1"})
    assert r.status_code == 201 and r.json()["id"] != sr["id"]
    # conditional update matches only the own tenant's
    r = client.put("/fhir/ServiceRequest?identifier=urn:ehr|X-1", json=order("X-1", priority="urgent"), headers=b)
    assert r.status_code == 200 and r.json()["id"] != sr["id"]
    assert client.get(f"/fhir/ServiceRequest/{sr['id']}", headers=a).json()["priority"] == "routine"
    # update, delete, If-Match on another tenant's id never touch it
    assert client.delete(f"/fhir/Task/{t['id']}", headers=b).status_code == 404
    r = client.put(f"/fhir/Task/{t['id']}", json={**t, "status": "accepted"}, headers={**b, "If-Match": 'W/"1"'})
    assert r.status_code == 412
    assert client.get(f"/fhir/Task/{t['id']}", headers=a).json()["status"] == "requested"
    # references into another tenant do not resolve
    r = client.post("/fhir/Task", json=task(f"ServiceRequest/{sr['id']}"), headers=b)
    assert r.status_code == 422 and r.json()["issue"][0]["code"] == "not-found"


def test_transactions(client, sites):
    a, b, sr, t = sites
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "GET", "url": f"ServiceRequest/{sr['id']}"}}]}
    assert client.post("/fhir", json=bundle, headers=a).status_code == 200
    assert client.post("/fhir", json=bundle, headers=b).status_code == 404
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "ServiceRequest?identifier=urn:ehr|X-1"}},
        {"request": {"method": "DELETE", "url": f"ServiceRequest/{sr['id']}"}}]}
    out = client.post("/fhir", json=bundle, headers=b).json()
    assert out["entry"][0]["resource"]["total"] == 0 and out["entry"][1]["response"]["status"] == "404"
    assert client.get(f"/fhir/ServiceRequest/{sr['id']}", headers=a).status_code == 200
