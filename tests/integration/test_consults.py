"""The consulting site (B) of a teleconsult (issue 5): a complete inbound set with its order.json and note becomes
one ServiceRequest + Task that B's EHR finds over FHIR. Real DRG mails (signed, encrypted) through our SMTP
ingress, as in test_gateway_inbound.py; the core flow on SQLite and PostgreSQL, the variants on SQLite."""

from __future__ import annotations

import json
import logging

import pytest
from sqlalchemy import update

from server.crypto import export_public_key
from server.errors import ErrorKind, ServerError
from server.gateway import consults
from server.gateway.directory import SiteRow, import_bundle, site_resources
from server.mail.drg import Part, note
from server.store import gateway as gw
from server.store.gateway_models import InboundSet
from tests.integration.test_gateway_inbound import OURS, SENDER, T, env, keys, lite, mails  # noqa: F401

ORDER_ID = f"sr-4711@{SENDER}"
STRANGER = "dicom@site-c.example"


def order_part(**changes) -> Part:
    order = {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
             "identifier": [{"system": consults.ORDER_SYSTEM, "value": ORDER_ID}],
             "code": {"coding": [{"system": consults.CONSULT_KIND, "code": "second-reading"}]},
             "priority": "urgent",
             "orderDetail": [{"coding": [{"system": consults.SEND_OPTION, "code": "anonymised"}]},
                             {"coding": [{"system": consults.SEND_OPTION, "code": "short-note"}]}],
             "note": [{"text": "Bitte Zweitbefundung, V.a. Lungenembolie"}],
             "reasonCode": [{"text": "Dyspnoe"}],
             "authoredOn": "2026-11-23T10:15:00+01:00",
             "requester": {"display": "Dr. A. Schmidt"}}
    order.update(changes)
    return Part("application/fhir+json", json.dumps(order).encode(), filename="order.json")


def add_site(fhir, site_id: str, name: str, address: str, key, *, organization: bool = True) -> None:
    armored = export_public_key(key.public()).decode("ascii")
    row = SiteRow(line=1, site_id=site_id, organization=name, city="Oldenburg", telematik_id=None, address=address,
                  max_mail_size=None, drg_profile_version="1.7", public_key=armored, network=None)
    resources = site_resources(row, armored)
    if not organization:  # only the Endpoint: its site is not in the directory as an Organization
        resources = [{k: v for k, v in r.items() if k != "managingOrganization"}
                     for r in resources if r["resourceType"] == "Endpoint"]
    import_bundle(fhir, T, {"resourceType": "Bundle", "type": "transaction",
                            "entry": [{"resource": r} for r in resources]})


class Ehr:
    """B's EHR: the app in-process with a token of tenant B."""

    def __init__(self, settings) -> None:
        from fastapi.testclient import TestClient

        from server.app import create_app
        from tests.conftest import auth, make_token

        self.app = create_app(settings)
        self.client = TestClient(self.app)
        self.headers = auth(make_token(settings, T))

    def search(self, query: str) -> list[dict]:
        r = self.client.get(f"/fhir/{query}", headers=self.headers)
        assert r.status_code == 200, r.text
        return [e["resource"] for e in r.json().get("entry", []) if e["search"]["mode"] == "match"]

    def read(self, reference: str) -> dict:
        r = self.client.get(f"/fhir/{reference}", headers=self.headers)
        assert r.status_code == 200, r.text
        return r.json()

    def close(self) -> None:
        self.app.state.engine.dispose()


@pytest.fixture
def ehr(request):
    made: list[Ehr] = []

    def make(settings) -> Ehr:
        made.append(Ehr(settings))
        return made[-1]

    yield make
    for e in made:
        e.close()


def the_set(e, uid: str):
    return next(s for s in gw.list_sets(e.engine, T)[1] if s.study_uid == uid)


# ---- the core flow (both backends) ---------------------------------------------------------------------------
def test_a_complete_set_with_its_order_becomes_one_consult_the_ehr_finds(env, keys, ehr, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="server.gateway.inbound")
    add_site(env.inbound.fhir, "site-b", "Klinikum Oldenburg", OURS, keys["b"])
    uid, raws = mails(keys, 2, parts=[note("Rückruf unter 0441-123"), order_part()], emergency=True)
    env.send(raws[1])
    assert the_set(env, uid).consult_task is None  # not complete: no consult yet
    env.send(raws[0])
    s = the_set(env, uid)
    assert s.state == "imported" and s.emergency and s.note == "Rückruf unter 0441-123" and s.consult_task
    assert json.loads(s.order_json)["identifier"][0]["value"] == ORDER_ID
    assert "NOTFALL" in caplog.text

    b = ehr(env.settings)
    [task] = b.search("Task?status=requested")
    [sr] = b.search("ServiceRequest?priority=stat")
    assert task["id"] == s.consult_task
    assert sr["identifier"][0] == {"system": consults.ORDER_SYSTEM, "value": ORDER_ID}
    assert sr["code"]["coding"][0]["code"] == "second-reading"
    assert sr["priority"] == "stat"  # the mails' emergency flag wins over the order's "urgent"
    assert sr["requester"] == {"reference": "Organization/site-a", "display": "Klinikum A"}
    assert sr["performer"] == [{"reference": "Organization/site-b", "display": "Klinikum Oldenburg"}]
    assert [n["text"] for n in sr["note"]] == ["Bitte Zweitbefundung, V.a. Lungenembolie", "Rückruf unter 0441-123"]
    assert [d["coding"][0]["code"] for d in sr["orderDetail"]] == ["anonymised", "short-note"]
    assert sr["reasonCode"] == [{"text": "Dyspnoe"}] and sr["authoredOn"] == "2026-11-23T10:15:00+01:00"
    assert sr["supportingInfo"] == [{"reference": f"ImagingStudy/{uid}"}]
    assert task["basedOn"] == [{"reference": f"ServiceRequest/{sr['id']}"}]
    assert task["focus"] == {"reference": f"ServiceRequest/{sr['id']}"}
    assert task["input"][0]["valueReference"] == {"reference": f"ImagingStudy/{uid}"}
    assert (task["intent"], task["priority"], task["owner"]["reference"], task["requester"]["reference"]) == (
        "order", "stat", "Organization/site-b", "Organization/site-a")
    assert task["note"] == [{"text": "NOTFALL"}]
    assert task["for"] == sr["subject"]
    patient = b.read(sr["subject"]["reference"])
    assert patient["identifier"] == [{"value": "PID-1"}]
    assert patient["name"][0]["family"] == "Müller" and patient["name"][0]["given"] == ["Jürgen"]
    assert (patient["birthDate"], patient["gender"]) == ("1960-01-01", "male")
    assert b.read(f"ImagingStudy/{uid}")["numberOfInstances"] == 2
    assert [t["id"] for t in b.search("Task?owner=Organization/site-b&priority=stat")] == [task["id"]]
    assert b.search(f"ServiceRequest?identifier={consults.ORDER_SYSTEM}|{ORDER_ID}")[0]["id"] == sr["id"]

    # the operator imports the set again: refused (it is imported and has its consult)
    with pytest.raises(ServerError) as err:
        env.inbound.import_set(T, s.pk, operator=True)
    assert err.value.kind is ErrorKind.CONFLICT
    # a crash after the consult, before it was recorded: the operator's import finds it, makes no second one
    with env.engine.begin() as conn:
        conn.execute(update(InboundSet.__table__).where(InboundSet.__table__.c.pk == s.pk)
                     .values(state="complete", consult_task=None))
    again = env.inbound.import_set(T, s.pk, operator=True)
    assert (again.state, again.consult_task) == ("imported", task["id"])
    assert len(b.search("Task")) == 1 and len(b.search("ServiceRequest")) == 1 and len(b.search("Patient")) == 1


# ---- variants (SQLite) ---------------------------------------------------------------------------------------
def test_legacy_sets_without_order_get_default_consults_and_share_the_patient(lite, keys, ehr):  # noqa: F811
    from server.gateway.directory import system_principal
    from server.store import subscriptions

    fhir = lite.inbound.fhir
    add_site(fhir, "site-b", "Klinikum Oldenburg", OURS, keys["b"])
    watch = fhir.create(system_principal(T), "Subscription", {  # B's EHR subscribes to emergency consults
        "resourceType": "Subscription", "status": "requested", "reason": "Notfälle", "criteria": "Task?priority=stat",
        "channel": {"type": "rest-hook", "endpoint": "https://ehr.site-b.example/hook"}}, base="").resource
    uid1, raws1 = mails(keys, 1)
    uid2, raws2 = mails(keys, 2, emergency=True)
    for raw in raws1 + raws2:
        lite.send(raw)
    b = ehr(lite.settings)
    by_study = {sr["supportingInfo"][0]["reference"]: sr for sr in b.search("ServiceRequest")}
    sr1, sr2 = by_study[f"ImagingStudy/{uid1}"], by_study[f"ImagingStudy/{uid2}"]
    for sr, uid in ((sr1, uid1), (sr2, uid2)):
        s = the_set(lite, uid)
        assert sr["identifier"] == [{"system": consults.ORDER_SYSTEM, "value": f"{s.set_id}@{SENDER}"},
                                    {"system": consults.SET_SYSTEM, "value": f"{s.set_id}@{SENDER}"}]
        assert sr["code"]["coding"][0]["code"] == "teleconsult" and "note" not in sr and "orderDetail" not in sr
        assert sr["requester"]["reference"] == "Organization/site-a"
        assert sr["performer"] == [{"reference": "Organization/site-b", "display": "Klinikum Oldenburg"}]
    assert gw.list_jobs(lite.engine, T)[1] == []  # a received consult is no order of ours to send    assert (sr1["priority"], sr2["priority"]) == ("routine", "stat")
    assert sr1["subject"] == sr2["subject"] and len(b.search("Patient")) == 1
    tasks = {t["focus"]["reference"]: t for t in b.search("Task?status=requested")}
    assert tasks[f"ServiceRequest/{sr2['id']}"]["note"] == [{"text": "NOTFALL"}]
    assert "note" not in tasks[f"ServiceRequest/{sr1['id']}"]
    assert [t["id"] for t in b.search("Task?priority=stat")] == [tasks[f"ServiceRequest/{sr2['id']}"]["id"]]
    with fhir.store.transaction(T, write=False) as tx:
        queued = subscriptions.deliveries(tx, watch["id"])
    assert [(d.resource_type, d.resource_id) for d in queued] == [("Task", tasks[f"ServiceRequest/{sr2['id']}"]["id"])]


def test_a_sender_without_organization_in_the_directory_is_a_display_requester(lite, keys, ehr):  # noqa: F811
    add_site(lite.inbound.fhir, "site-c", "Praxis C", STRANGER, keys["c"], organization=False)
    uid, raws = mails(keys, 1, signer="c", sender=STRANGER, parts=[order_part(
        identifier=[{"system": consults.ORDER_SYSTEM, "value": f"sr-1@{STRANGER}"}])])
    lite.send(raws[0], sender=STRANGER)
    [sr] = ehr(lite.settings).search("ServiceRequest")
    assert sr["requester"] == {"display": f"Dr. A. Schmidt ({STRANGER})"}
    assert sr["performer"] == [{"display": OURS}]  # B's own Organization is not in its directory
    assert sr["identifier"][0]["value"] == f"sr-1@{STRANGER}"
    assert sr["priority"] == "urgent" and the_set(lite, uid).consult_task


def test_incomplete_set_gets_its_consult_when_the_operator_imports_it(lite, keys, ehr):  # noqa: F811
    uid, raws = mails(keys, 3, parts=[order_part()])
    lite.send(raws[0])
    lite.send(raws[2])
    b = ehr(lite.settings)
    assert b.search("ServiceRequest") == [] and b.search("Task") == []
    s = lite.inbound.import_set(T, the_set(lite, uid).pk, operator=True)
    [task] = b.search("Task?status=requested")
    assert s.consult_task == task["id"]
    lite.send(raws[1])  # the late part: imported, no second consult
    assert len(lite.archive.instances(T, uid)) == 3 and len(b.search("Task")) == 1


def test_a_bad_order_part_is_ignored_and_a_spoofed_order_identifier_not_honoured(lite, keys, ehr):  # noqa: F811
    uid1, raws1 = mails(keys, 1, parts=[Part("application/fhir+json", b"{not json", filename="order.json")])
    uid2, raws2 = mails(keys, 1, parts=[order_part(
        identifier=[{"system": consults.ORDER_SYSTEM, "value": "sr-1@dicom@site-c.example"}])])
    for raw in raws1 + raws2:
        lite.send(raw)
    assert lite.quarantined() == []
    s1, s2 = the_set(lite, uid1), the_set(lite, uid2)
    assert s1.state == s2.state == "imported" and s1.order_json is None
    by_study = {sr["supportingInfo"][0]["reference"]: sr for sr in ehr(lite.settings).search("ServiceRequest")}
    assert by_study[f"ImagingStudy/{uid1}"]["code"]["coding"][0]["code"] == "teleconsult"
    spoofed = by_study[f"ImagingStudy/{uid2}"]
    assert spoofed["identifier"][0] == {"system": consults.ORDER_SYSTEM, "value": f"{s2.set_id}@{SENDER}"}
    assert spoofed["code"]["coding"][0]["code"] == "second-reading"


def test_a_failed_consult_keeps_the_import_and_the_operator_retries(lite, keys, ehr, monkeypatch,
                                                                     caplog):  # noqa: F811
    import server.gateway.inbound as inbound_module

    real = inbound_module.consult_for_set

    def broken(*args, **kw):
        raise ServerError(ErrorKind.INTERNAL, "FHIR store unavailable")

    monkeypatch.setattr(inbound_module, "consult_for_set", broken)
    uid, raws = mails(keys, 1, parts=[order_part()])
    lite.send(raws[0])
    s = the_set(lite, uid)
    assert (s.state, s.consult_task) == ("imported", None)
    assert len(lite.archive.instances(T, uid)) == 1
    assert "no consult was created: FHIR store unavailable" in caplog.text
    monkeypatch.setattr(inbound_module, "consult_for_set", real)
    again = lite.inbound.import_set(T, s.pk, operator=True)
    [task] = ehr(lite.settings).search("Task")
    assert again.consult_task == task["id"] == the_set(lite, uid).consult_task


def test_the_requesting_sites_own_order_part_makes_the_consult(lite, keys, ehr):  # noqa: F811
    from server.gateway.orders import note_part, order_part as a_order_part

    sr_at_a = {"resourceType": "ServiceRequest", "id": "a-order-1", "status": "active", "intent": "order",
               "priority": "stat", "code": {"coding": [{"system": consults.CONSULT_KIND, "code": "emergency"}]},
               "orderDetail": [{"coding": [{"system": consults.SEND_OPTION, "code": "short-note"}]}],
               "subject": {"reference": "Patient/p1"}, "note": [{"text": "Blutung?"}],
               "requester": {"reference": "Organization/klinik-a", "display": "Klinikum A, Notaufnahme"},
               "performer": [{"reference": "HealthcareService/site-b-teleradiology"}]}
    uid, raws = mails(keys, 1, parts=[note_part("Blutung?"), a_order_part(sr_at_a, site_address=SENDER)],
                      emergency=True)
    lite.send(raws[0])
    [sr] = ehr(lite.settings).search("ServiceRequest?priority=stat&code=" + consults.CONSULT_KIND + "|emergency")
    assert sr["identifier"][0] == {"system": consults.ORDER_SYSTEM, "value": f"a-order-1@{SENDER}"}
    assert sr["note"] == [{"text": "Blutung?"}] and sr["requester"]["reference"] == "Organization/site-a"
    assert the_set(lite, uid).consult_task and gw.list_jobs(lite.engine, T)[1] == []


# ---- pure parts ---------------------------------------------------------------------------------------------
def test_order_values_outside_our_bindings_are_left_out():
    text = consults.parse_order(json.dumps({
        "resourceType": "ServiceRequest", "status": "active", "intent": "order", "priority": "now",
        "code": {"coding": [{"system": "http://other", "code": "x"}]},
        "orderDetail": [{"coding": [{"system": consults.SEND_OPTION, "code": "teleport"}]}],
        "subject": {"display": "x"}}).encode())
    order = consults.order_of("S1", "Dicom@Site-A.example", text, None, False)
    assert (order.kind, order.priority, order.options, order.legacy) == ("teleconsult", "routine", (), False)
    assert order.identifier == {"system": consults.ORDER_SYSTEM, "value": "S1@dicom@site-a.example"}
    emergency = consults.order_of("S1", SENDER, None, "  ", True)
    assert (emergency.priority, emergency.notes, emergency.legacy) == ("stat", (), True)
    kind = consults.order_of("S1", SENDER, json.dumps({"code": {"coding": [
        {"system": consults.CONSULT_KIND, "code": "emergency"}]}, "priority": "routine"}), None, False)
    assert (kind.kind, kind.priority, kind.emergency) == ("emergency", "stat", True)  # tb-sr-1
    for bad in (b"[]", b"{\"resourceType\": \"Task\"}", b"\xff", b"{\"resourceType\": \"ServiceRequest\", \"status\": 5}"):
        with pytest.raises(consults.BadOrder):
            consults.parse_order(bad)
    assert consults.patient_resource({"patient_id": "P1", "issuer_of_patient_id": "1.2.3", "patient_sex": "X",
                                      "patient_name": "Doe^John^^Dr", "patient_birth_date": "1970"}) == {
        "resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3", "value": "P1"}],
        "name": [{"text": "Dr John Doe", "family": "Doe", "given": ["John"], "prefix": ["Dr"]}],
        "gender": "unknown"}
