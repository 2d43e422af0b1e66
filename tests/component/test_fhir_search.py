"""FHIR R4 search (3.1.1): parameter types, modifiers, prefixes, paging, sorting, includes, chains, tenancy."""

from __future__ import annotations

import pytest

from tests.conftest import auth, make_token
from tests.fhir_examples import order, seed_client, task as task_of

FHIR = "application/fhir+json"
ECT = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
BS = "https://telerad-bridge.de/fhir/CodeSystem/task-business-status"


@pytest.fixture
def h(settings):
    return {**auth(make_token(settings)), "Content-Type": FHIR}


def post(client, h, resource):
    r = client.post(f"/fhir/{resource['resourceType']}", json=resource, headers=h)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def ids(bundle, mode="match"):
    return sorted(e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode)


def search(client, h, query, status=200, **headers):
    r = client.get(f"/fhir/{query}", headers={**h, **headers})
    assert r.status_code == status, r.text
    return r.json()


@pytest.fixture
def directory(client, h):
    """Two organisations, their services and endpoints (Organization <- HealthcareService -> Endpoint)."""
    bremen = post(client, h, {"resourceType": "Organization", "name": "Klinikum Bremen-Mitte", "active": True,
                              "identifier": [{"system": "https://gematik.de/fhir/sid/telematik-id", "value": "5-1"}],
                              "address": [{"city": "Bremen"}]})
    koeln = post(client, h, {"resourceType": "Organization", "name": "Universitätsklinik Köln", "active": False,
                             "address": [{"city": "Köln"}]})
    ep = post(client, h, {"resourceType": "Endpoint", "status": "active", "name": "DICOM E-Mail",
                          "connectionType": {"system": ECT, "code": "secure-email"},
                          "payloadType": [{"text": "DICOM"}], "address": "mailto:tele@klinikum-bremen.de",
                          "managingOrganization": {"reference": f"Organization/{bremen}"}})
    hs = post(client, h, {"resourceType": "HealthcareService", "name": "Teleradiologie Bremen",
                          "providedBy": {"reference": f"Organization/{bremen}"},
                          "endpoint": [{"reference": f"Endpoint/{ep}"}]})
    hs2 = post(client, h, {"resourceType": "HealthcareService", "name": "Radiologie Köln",
                           "providedBy": {"reference": f"Organization/{koeln}"}})
    return {"bremen": bremen, "koeln": koeln, "ep": ep, "hs": hs, "hs2": hs2}


def test_string_search(client, h, directory):
    d = directory
    assert ids(search(client, h, "Organization?name=klinikum")) == [d["bremen"]]
    assert ids(search(client, h, "Organization?name=bremen")) == [d["bremen"]]  # any word start
    assert ids(search(client, h, "Organization?name=mitte")) == [d["bremen"]]
    assert ids(search(client, h, "Organization?name=remen")) == []  # not inside a word
    assert ids(search(client, h, "Organization?name=koln")) == [d["koeln"]]  # ö as o
    assert ids(search(client, h, "Organization?name=Köln")) == [d["koeln"]]
    assert ids(search(client, h, "Organization?name=KOELN")) == [d["koeln"]]  # ö as oe
    assert ids(search(client, h, "Organization?address-city=bre")) == [d["bremen"]]
    assert ids(search(client, h, "HealthcareService?organization.name=bremen")) == [d["hs"]]
    assert ids(search(client, h, "Organization?name:contains=bremen")) == [d["bremen"]]
    assert ids(search(client, h, "Organization?name=UNIVERSITAETS")) == [d["koeln"]]  # accent folded
    assert ids(search(client, h, "Organization?name:exact=Klinikum Bremen-Mitte")) == [d["bremen"]]
    assert ids(search(client, h, "Organization?name:exact=klinikum bremen-mitte")) == []
    assert ids(search(client, h, "Organization?address-city=köln")) == [d["koeln"]]
    assert ids(search(client, h, "Organization?name=nope,klin")) == [d["bremen"]]


def test_token_search(client, h, directory):
    d = directory
    tid = "https://gematik.de/fhir/sid/telematik-id"
    assert ids(search(client, h, f"Organization?identifier={tid}|5-1")) == [d["bremen"]]
    assert ids(search(client, h, "Organization?identifier=5-1")) == [d["bremen"]]
    assert ids(search(client, h, f"Organization?identifier={tid}|")) == [d["bremen"]]
    assert ids(search(client, h, "Organization?identifier=|5-1")) == []
    assert ids(search(client, h, "Organization?active=true")) == [d["bremen"]]
    assert ids(search(client, h, f"Endpoint?connection-type={ECT}|secure-email")) == [d["ep"]]
    assert ids(search(client, h, "Organization?identifier:missing=true")) == [d["koeln"]]
    assert ids(search(client, h, f"Organization?_id={d['koeln']}")) == [d["koeln"]]


def test_reference_chain_and_includes(client, h, directory):
    d = directory
    assert ids(search(client, h, f"HealthcareService?organization=Organization/{d['bremen']}")) == [d["hs"]]
    assert ids(search(client, h, f"HealthcareService?organization={d['koeln']}")) == [d["hs2"]]
    assert ids(search(client, h, "HealthcareService?organization.name=universit")) == [d["hs2"]]
    assert ids(search(client, h, "HealthcareService?organization.address-city=bremen")) == [d["hs"]]
    assert ids(search(client, h, "HealthcareService?endpoint:missing=true")) == [d["hs2"]]
    b = search(client, h, "HealthcareService?name=tele&_include=HealthcareService:endpoint"
                          "&_include=HealthcareService:organization")
    assert ids(b) == [d["hs"]] and ids(b, "include") == sorted([d["ep"], d["bremen"]])
    b = search(client, h, f"Organization?_id={d['bremen']}&_revinclude=HealthcareService:organization")
    assert ids(b, "include") == [d["hs"]]


def test_include_respects_scope(client, settings, directory):
    narrow = auth(make_token(settings, scope="system/HealthcareService.rs"))
    b = search(client, narrow, "HealthcareService?_include=HealthcareService:endpoint")
    assert ids(b, "include") == []


def test_dates_and_last_updated(client, h):
    a = post(client, h, {"resourceType": "Patient", "birthDate": "1970-05-01", "gender": "female",
                         "name": [{"family": "Müller", "given": ["Anna"]}]})
    b = post(client, h, {"resourceType": "Patient", "birthDate": "1980", "name": [{"family": "Meyer"}]})
    assert ids(search(client, h, "Patient?birthdate=1970")) == [a]
    assert ids(search(client, h, "Patient?birthdate=ge1975")) == [b]
    assert ids(search(client, h, "Patient?birthdate=lt1975-01-01")) == [a]
    assert ids(search(client, h, "Patient?birthdate=1980-06-01")) == []
    assert ids(search(client, h, "Patient?family=muell")) == [a]
    assert ids(search(client, h, "Patient?given=anna&gender=female")) == [a]
    assert ids(search(client, h, "Patient?_lastUpdated=gt2000-01-01")) == sorted([a, b])
    assert ids(search(client, h, "Patient?_lastUpdated=lt2000-01-01")) == []
    search(client, h, "Patient?birthdate=yesterday", status=400)


def test_task_and_service_request_params(client, h):
    seed_client(client, h)
    sr = post(client, h, order(priority="stat", authoredOn="2026-11-01T10:00:00+01:00"))
    task = post(client, h, task_of(f"ServiceRequest/{sr}",
                                   businessStatus={"coding": [{"system": BS, "code": "transfer-queued"}]}))
    sub = post(client, h, task_of(f"ServiceRequest/{sr}", "ready", partOf=[{"reference": f"Task/{task}"}]))
    assert ids(search(client, h, "ServiceRequest?priority=stat&patient=Patient/p1")) == [sr]
    assert ids(search(client, h, "ServiceRequest?authored=2026-11-01")) == [sr]
    assert ids(search(client, h, f"Task?based-on=ServiceRequest/{sr}")) == sorted([task, sub])
    assert ids(search(client, h, "Task?part-of:missing=true")) == [task]
    assert ids(search(client, h, f"Task?business-status={BS}|transfer-queued")) == [task]
    assert ids(search(client, h, f"Task?part-of={task}")) == [sub]
    assert ids(search(client, h, "Task?status=requested,ready")) == sorted([task, sub])
    b = search(client, h, "Task?status=requested&_include=Task:based-on")
    assert ids(b, "include") == [sr]
    b = search(client, h, f"ServiceRequest?_id={sr}&_revinclude=Task:based-on")
    assert ids(b, "include") == sorted([task, sub])


def test_paging_sort_and_summary(client, h):
    for i in range(5):
        post(client, h, {"resourceType": "Organization", "name": f"Org {i}"})
    b = search(client, h, "Organization?_count=2&_sort=name")
    assert b["total"] == 5 and [e["resource"]["name"] for e in b["entry"]] == ["Org 0", "Org 1"]
    links = {l["relation"]: l["url"] for l in b["link"]}
    assert "next" in links and "previous" not in links
    names = []
    url = links["self"]
    while url:
        page = client.get(url.replace("http://testserver", ""), headers=h).json()
        names += [e["resource"]["name"] for e in page["entry"]]
        url = {l["relation"]: l["url"] for l in page["link"]}.get("next")
    assert names == [f"Org {i}" for i in range(5)]
    b = search(client, h, "Organization?_sort=-name&_count=1")
    assert b["entry"][0]["resource"]["name"] == "Org 4"
    b = search(client, h, "Organization?_summary=count")
    assert b["total"] == 5 and "entry" not in b


def test_post_search_and_unknown_params(client, h):
    post(client, h, {"resourceType": "Organization", "name": "A"})
    r = client.post("/fhir/Organization/_search", content="name=a",
                    headers={**h, "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["total"] == 1
    b = search(client, h, "Organization?bogus=1", status=400)
    assert b["issue"][0]["expression"] == ["bogus"]
    assert search(client, h, "Organization?bogus=1", Prefer="handling=lenient")["total"] == 1
    search(client, h, "Organization?name:below=x", status=400)
    search(client, h, "Organization?_sort=bogus", status=400)


def test_tenant_isolation_in_search(client, settings, h, directory):
    b = auth(make_token(settings, tenant="site-b"))
    assert search(client, b, "Organization")["total"] == 0
    assert search(client, b, "HealthcareService?organization.name=klinikum")["total"] == 0
    # site-a's Organization does not exist for site-b: the reference does not resolve, nothing is stored
    r = client.post("/fhir/HealthcareService", json={
        "resourceType": "HealthcareService", "name": "B",
        "providedBy": {"reference": f"Organization/{directory['bremen']}"}}, headers={**b, "Content-Type": FHIR})
    assert r.status_code == 422 and r.json()["issue"][0]["expression"] == ["HealthcareService.providedBy"]
    bundle = search(client, b, "HealthcareService?_include=HealthcareService:organization")
    assert bundle["total"] == 0
    assert ids(search(client, h, f"Organization?_id={directory['bremen']}&_revinclude=HealthcareService:organization"),
               "include") == [directory["hs"]]
