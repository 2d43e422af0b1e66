"""Workflow messages at the requesting site A (issue 5): real signed+encrypted Task reports from B
(server.mail.drg.build_message_mail + server.crypto) sent with smtplib to A's SMTP ingress; the Inbound applies them
to the order Task of an order A placed (through its OrderListener / PriorsListener) and acknowledges them, or
quarantines them as bad-message, unknown-sender or tampered. The core flow on SQLite and PostgreSQL, the rest on
SQLite."""

from __future__ import annotations

import json
import logging
import smtplib
import uuid
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from server.config import Settings
from server.crypto import encrypt_and_sign, export_public_key, generate_key
from server.dicom.parse import parse_part10
from server.fhir.task import BUSINESS_STATUS_SYSTEM, TaskState
from server.gateway.directory import SiteRow, import_bundle, site_ids, site_resources, system_principal
from server.gateway.inbound import QUARANTINED, STORED, Inbound
from server.gateway.sites import Site, Sites
from server.gateway.workflow import CONSULT_KIND_SYSTEM, move_task, status_report
from server.mail.drg import build_message_mail, read_outer
from server.mail.smtp_in import SmtpIngress
from server.store import gateway as gw
from server.store.archive import Archive, NewInstance
from server.store.blobs import BlobStore
from server.store.db import make_engine
from server.store.migrate import upgrade
from tests.dicomdata import make_instance
from tests.integration.test_gateway_inbound import _flip_armor_char, _flip_ciphertext

T = "site-a"
OURS = "dicom@site-a.example"  # A: the requesting site, our tenant
B = "dicom@site-b.example"  # the consultant the order goes to
C = "dicom@site-c.example"  # another site of the directory, no order went there
STRANGER = "dicom@site-x.example"  # not in the directory
TASK_PROFILE = "https://telerad-bridge.de/fhir/StructureDefinition/teleconsult-task"


@pytest.fixture(scope="module")
def keys():
    return {
        "a": generate_key(f"Site A <{OURS}>", bits=2048),
        "b": generate_key(f"Site B <{B}>", bits=2048),
        "c": generate_key(f"Site C <{C}>", bits=2048),
        "x": generate_key(f"Impostor <{B}>", bits=2048),  # claims B's address, not in the directory
        "s": generate_key(f"Stranger <{STRANGER}>", bits=2048),
    }


@dataclass
class Env:
    settings: Settings
    engine: object
    blobs: BlobStore
    archive: Archive
    fhir: object
    inbound: Inbound
    ingress: SmtpIngress
    woken: list

    def send(self, raw: bytes, *, sender: str = B) -> None:
        """Deliver with smtplib; the ingress answers 250 only after the sink returned (processing is done)."""
        with smtplib.SMTP("127.0.0.1", self.ingress.port, timeout=30) as smtp:
            smtp.sendmail(sender, [OURS], raw)

    def mdns(self) -> list[dict]:
        return [{"to": m.to_address, "original": m.original_message_id, **json.loads(m.params)}
                for m in gw.mdns(self.engine, T)]

    def quarantined(self):
        return gw.quarantined(self.engine, T)[1]

    def task(self, task_id: str) -> dict:
        return self.fhir.read(system_principal(T), "Task", task_id).resource

    def versions(self, task_id: str) -> int:
        bundle = self.fhir.history(system_principal(T), "Task", task_id, [("_count", "100")], base="/fhir")
        return bundle["total"]


def add_site(fhir, site_id: str, name: str, address: str, key) -> None:
    armored = export_public_key(key.public()).decode("ascii")
    row = SiteRow(line=1, site_id=site_id, organization=name, city="Oldenburg", telematik_id=None, address=address,
                  max_mail_size=None, drg_profile_version="1.7", public_key=armored, network=None)
    import_bundle(fhir, T, {"resourceType": "Bundle", "type": "transaction",
                            "entry": [{"resource": r} for r in site_resources(row, armored)]})


def make_env(settings: Settings, keys) -> Env:
    from server.fhir.setup import build_service

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url)
    upgrade(engine)
    blobs = BlobStore(settings.data_dir, fsync=settings.fsync)
    archive = Archive(engine)
    sites = Sites([Site(T, OURS, keys["a"])])
    fhir = build_service(settings, engine, sites=sites)
    add_site(fhir, "site-b", "Klinikum B", B, keys["b"])
    add_site(fhir, "site-c", "Klinikum C", C, keys["c"])
    woken: list = []
    inbound = Inbound(settings, engine, blobs, archive, fhir, sites, on_mdn=lambda: woken.append(1))
    ingress = SmtpIngress("127.0.0.1", 0, inbound, hostname="mx.site-a.example", local_addresses=sites.addresses,
                          max_bytes=10 * 1024**2)
    ingress.start_in_thread()
    return Env(settings, engine, blobs, archive, fhir, inbound, ingress, woken)


def running(settings: Settings, keys):
    e = make_env(settings, keys)
    yield e
    e.ingress.stop_thread()
    e.engine.dispose()


@pytest.fixture
def env(settings, keys):
    """Both backends."""
    yield from running(settings, keys)


@pytest.fixture
def lite(sqlite_settings, keys):
    """SQLite only."""
    yield from running(sqlite_settings, keys)


# ---- A's order ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Order:
    sr_id: str
    task_id: str
    job: gw.Job

    @property
    def identifier(self) -> str:
        return f"{self.sr_id}@{OURS}"


def _patient(e: Env) -> None:
    e.fhir.update(system_principal(T), "Patient", "p1", {
        "resourceType": "Patient", "id": "p1", "identifier": [{"system": "urn:oid:1.2.3", "value": "PID-4711"}],
        "name": [{"family": "Müller", "given": ["Jürgen"]}]}, base="/fhir")
    e.fhir.update(system_principal(T), "Organization", "klinik-a", {
        "resourceType": "Organization", "id": "klinik-a", "name": "Klinik A", "active": True}, base="/fhir")


def _order_of(e: Env, sr_id: str) -> Order:
    jobs = gw.order_jobs(e.engine, T, f"ServiceRequest/{sr_id}")
    assert jobs and all(j.order_task == jobs[0].order_task for j in jobs)
    return Order(sr_id, jobs[0].order_task, jobs[0])


def place_order(e: Env, performer: str = "site-b") -> Order:
    """A teleconsult order of a study in A's archive, placed as A's EHR does (the OrderListener makes the order Task
    and the transfer job to the performer's site)."""
    study, series = f"2.25.{uuid.uuid4().int}", f"2.25.{uuid.uuid4().int}"
    items = []
    for i in (1, 2):
        sha = e.blobs.put(make_instance(study=study, series=series, instance_number=i, patient_id="PID-4711"))
        path = e.blobs.path_of(sha)
        items.append(NewInstance(parse_part10(path), sha, path.stat().st_size))
    e.archive.index_batch(T, items, replace=False)
    _patient(e)
    sr = {"resourceType": "ServiceRequest", "status": "active", "intent": "order", "priority": "urgent",
          "code": {"coding": [{"system": CONSULT_KIND_SYSTEM, "code": "teleconsult"}]},
          "subject": {"reference": "Patient/p1"}, "requester": {"reference": "Organization/klinik-a"},
          "performer": [{"reference": f"HealthcareService/{site_ids(performer)[1]}"}],
          "supportingInfo": [{"reference": f"ImagingStudy/{study}"}]}
    created = e.fhir.create(system_principal(T), "ServiceRequest", sr, base="/fhir")
    order = _order_of(e, created.resource["id"])
    assert order.job.recipient_address == (B if performer == "site-b" else C)
    assert _state(e.task(order.task_id)) == ("requested", "transfer-queued")
    return order


def place_priors_request(e: Env) -> Order:
    """A request for prior images to B (the PriorsListener makes the order Task and the message job)."""
    _patient(e)
    sr = {"resourceType": "ServiceRequest", "status": "active", "intent": "order", "priority": "routine",
          "code": {"coding": [{"system": CONSULT_KIND_SYSTEM, "code": "prior-request"}]},
          "subject": {"reference": "Patient/p1"}, "requester": {"reference": "Organization/klinik-a"},
          "performer": [{"reference": f"HealthcareService/{site_ids('site-b')[1]}"}]}
    created = e.fhir.create(system_principal(T), "ServiceRequest", sr, base="/fhir")
    order = _order_of(e, created.resource["id"])
    assert order.job.is_message and order.job.recipient_address == B
    assert _state(e.task(order.task_id)) == ("requested", "priors-requested")
    return order


def _state(task: dict) -> tuple[str, str]:
    return task["status"], task["businessStatus"]["coding"][0]["code"]


# ---- B's messages ------------------------------------------------------------------------------------------------
def report(order: str, status: str = "accepted", **task) -> dict:
    """B's consult Task as status_report sends it."""
    return status_report({"id": "t-b-1", "status": status, "intent": "order", **task}, order=order, site_address=B)


def message(keys, resource: dict | bytes, *, signer: str = "b", sender: str = B, to_key: str = "a", mutate=None,
            **kw) -> bytes:
    """One workflow message mail from ``sender``, signed with ``signer``'s key, encrypted for ``to_key``."""
    body = resource if isinstance(resource, bytes) else json.dumps(resource, ensure_ascii=False).encode("utf-8")

    def encrypt(inner: bytes) -> bytes:
        return encrypt_and_sign(mutate(inner) if mutate else inner, [keys[to_key].public()], keys[signer])

    return build_message_mail(body, sender=sender, recipient=OURS, mdn_to=sender, encrypt=encrypt, **kw)


def message_id(raw: bytes) -> str:
    return read_outer(raw).message_id


# ---- the core flow (both backends) ---------------------------------------------------------------------------
def test_status_reports_move_the_order_task_and_are_acknowledged(env, keys, caplog):
    caplog.set_level(logging.INFO, logger="server.gateway")
    order = place_order(env)
    accepted = message(keys, report(order.identifier, "accepted", owner={"display": "Dr. B. Berger"}))
    env.send(accepted)
    task = env.task(order.task_id)
    assert _state(task) == ("in-progress", "consultant-accepted")
    assert task["meta"]["profile"] == [TASK_PROFILE]
    assert task["owner"] == {"reference": f"HealthcareService/{site_ids('site-b')[1]}"}  # A's own, unchanged
    assert gw.inbound_state(env.engine, T, message_id(accepted)) == STORED
    [m] = env.mdns()
    assert (m["original"], m["to"], m["disposition"], m["final_recipient"], m["text"]) == (
        message_id(accepted), B, "displayed", OURS, None)
    assert len(env.woken) == 1 and env.quarantined() == []
    assert "workflow message" in caplog.text

    working = message(keys, report(order.identifier, "in-progress", note=[{"text": "Befundung läuft"}]))
    env.send(working)
    task = env.task(order.task_id)
    assert _state(task) == ("in-progress", "consultant-working")
    assert task["note"][-1]["text"] == f"{B}: Befundung läuft"

    rejected = message(keys, report(order.identifier, "rejected", owner={"display": "Dr. B. Berger"},
                                    statusReason={"text": "Bildqualität unzureichend"}))
    env.send(rejected)
    task = env.task(order.task_id)
    assert _state(task) == ("failed", "rejected-by-consultant")
    assert task["statusReason"] == {"text": "Dr. B. Berger: Bildqualität unzureichend"}
    assert [m["disposition"] for m in env.mdns()] == ["displayed"] * 3
    assert env.quarantined() == []


# ---- idempotence and the state machine (SQLite) --------------------------------------------------------------
@pytest.mark.parametrize("status, expected", [
    ("accepted", ("in-progress", "consultant-accepted")),
    ("received", ("in-progress", "consultant-received")),
    ("on-hold", ("in-progress", "consultant-on-hold")),
    ("cancelled", ("failed", "cancelled-by-consultant")),
    ("failed", ("failed", "consultant-failed")),
    ("completed", ("completed", "completed-by-consultant")),
])
def test_the_same_message_twice_changes_nothing_the_second_time_and_is_acknowledged_twice(lite, keys, status,
                                                                                          expected):
    order = place_order(lite)
    raw = message(keys, report(order.identifier, status, note=[{"text": "Hinweis"}]))
    lite.send(raw)
    first = lite.task(order.task_id)
    versions = lite.versions(order.task_id)
    assert _state(first) == expected
    if expected[0] == "failed":  # a failed Task says why (tb-task-1): B's reason, or ours for B's status
        assert first["statusReason"]["text"].startswith(f"{B}: ")
    lite.send(raw)
    assert lite.versions(order.task_id) == versions
    assert lite.task(order.task_id) == first
    assert [(m["original"], m["disposition"]) for m in lite.mdns()] == [(message_id(raw), "displayed")] * 2
    assert gw.inbound_state(lite.engine, T, message_id(raw)) == STORED
    assert lite.quarantined() == []


def test_the_same_report_under_a_new_message_id_changes_nothing(lite, keys):
    order = place_order(lite)
    lite.send(message(keys, report(order.identifier, "accepted")))
    versions = lite.versions(order.task_id)
    lite.send(message(keys, report(order.identifier, "accepted")))
    assert lite.versions(order.task_id) == versions
    assert [m["disposition"] for m in lite.mdns()] == ["displayed", "displayed"]


def test_a_closed_order_task_stays_closed_and_the_message_is_still_acknowledged(lite, keys):
    order = place_order(lite)
    lite.send(message(keys, report(order.identifier, "rejected", statusReason={"text": "nicht zuständig"})))
    closed = lite.task(order.task_id)
    assert _state(closed) == ("failed", "rejected-by-consultant")
    versions = lite.versions(order.task_id)
    late = message(keys, report(order.identifier, "accepted"))
    lite.send(late)
    assert lite.task(order.task_id) == closed and lite.versions(order.task_id) == versions
    assert [m["disposition"] for m in lite.mdns()] == ["displayed", "displayed"]
    assert gw.inbound_state(lite.engine, T, message_id(late)) == STORED


def test_intermediate_versions_follow_legal_transitions(lite, keys):
    """requested -> accepted -> in-progress: every version the FHIR server stored is a legal R4 step."""
    order = place_order(lite)
    lite.send(message(keys, report(order.identifier, "in-progress")))
    bundle = lite.fhir.history(system_principal(T), "Task", order.task_id, [("_count", "100")], base="/fhir")
    statuses = [e["resource"]["status"] for e in reversed(bundle["entry"])]
    assert statuses == ["requested", "accepted", "in-progress"]


def test_a_report_without_a_status_of_interest_is_acknowledged_without_change(lite, keys):
    order = place_order(lite)
    versions = lite.versions(order.task_id)
    raw = message(keys, report(order.identifier, "requested"))
    lite.send(raw)
    assert lite.versions(order.task_id) == versions
    assert [m["disposition"] for m in lite.mdns()] == ["displayed"]
    assert lite.quarantined() == []


def test_address_case_does_not_matter(lite, keys):
    order = place_order(lite)
    ident = f"{order.sr_id}@{OURS.upper()}"
    raw = message(keys, report(ident, "accepted"), sender="Klinikum B <DICOM@Site-B.Example>")
    lite.send(raw, sender=B.upper())
    assert _state(lite.task(order.task_id)) == ("in-progress", "consultant-accepted")
    assert [m["disposition"] for m in lite.mdns()] == ["displayed"]


def test_an_emergency_message_is_applied_and_logged(lite, keys, caplog):
    caplog.set_level(logging.WARNING, logger="server.gateway.inbound")
    order = place_order(lite)
    lite.send(message(keys, report(order.identifier, "accepted"), emergency=True))
    assert _state(lite.task(order.task_id)) == ("in-progress", "consultant-accepted")
    assert "NOTFALL" in caplog.text


# ---- requests for prior images: A's Task follows B's businessStatus ---------------------------------------------
def _priors_report(order: Order, status: str, code: str, outputs=None) -> dict:
    task = {"id": "t-b-2", "status": status, "intent": "order",
            "businessStatus": {"coding": [{"system": BUSINESS_STATUS_SYSTEM, "code": code}]}}
    return status_report(task, order=order.identifier, site_address=B, outputs=outputs)


def test_a_priors_request_follows_the_business_status_of_bs_reports(lite, keys):
    order = place_priors_request(lite)
    lite.send(message(keys, _priors_report(order, "requested", "awaiting-approval")))
    assert _state(lite.task(order.task_id)) == ("requested", "awaiting-approval")
    lite.send(message(keys, _priors_report(order, "ready", "priors-none")))
    assert _state(lite.task(order.task_id)) == ("completed", "priors-none")
    assert [m["disposition"] for m in lite.mdns()] == ["displayed", "displayed"]


def test_priors_being_sent_are_listed_on_as_task_by_identifier(lite, keys):
    from server.gateway.priors import found_output, found_uids, for_a

    order = place_priors_request(lite)
    rows = [SimpleNamespace(study_uid=u, modalities_in_study="CT", study_date="20200115", study_description="CT")
            for u in ("1.2.3", "1.2.4")]
    outputs = for_a([found_output(r, local=True) for r in rows])
    lite.send(message(keys, _priors_report(order, "ready", "priors-sending", outputs)))
    task = lite.task(order.task_id)
    assert _state(task) == ("in-progress", "priors-sending")
    assert found_uids(task) == ["1.2.3", "1.2.4"]
    assert all("reference" not in o["valueReference"] for o in task["output"])


def test_a_rejected_priors_request_fails_the_order_task(lite, keys):
    order = place_priors_request(lite)
    lite.send(message(keys, _priors_report(order, "rejected", "awaiting-approval")))
    assert _state(lite.task(order.task_id)) == ("failed", "rejected-by-consultant")


# ---- refusals ----------------------------------------------------------------------------------------------------
def _two_parts(inner: bytes) -> bytes:
    """A second application/fhir+json part inside the signed entity."""
    head, _, rest = inner.partition(b"\r\n--")
    boundary = rest.split(b"\r\n", 1)[0]
    closing = b"\r\n--" + boundary + b"--\r\n"
    extra = (b"\r\n--" + boundary + b"\r\nContent-Type: application/fhir+json\r\n\r\n{}")
    assert inner.endswith(closing)
    return inner[: -len(closing)] + extra + closing


BAD_MESSAGES = {
    "unknown-order": lambda keys, order: message(keys, report(f"no-such-order@{OURS}")),
    "another-sites-order": lambda keys, order: message(keys, report(f"{order.sr_id}@{C}")),
    "no-order-named": lambda keys, order: message(keys, {"resourceType": "Task", "status": "accepted",
                                                         "intent": "order"}),
    "sender-the-order-did-not-go-to": lambda keys, order: message(keys, report(order.identifier), signer="c",
                                                                  sender=C),
    "not-json": lambda keys, order: message(keys, b"this is no JSON"),
    "json-array": lambda keys, order: message(keys, b"[]"),
    "patient-resource": lambda keys, order: message(keys, {"resourceType": "Patient", "id": "p1"}),
    "invalid-task": lambda keys, order: message(keys, {"resourceType": "Task", "status": "accepted",
                                                       "basedOn": "not a list"}),
    "two-fhir-parts": lambda keys, order: message(keys, report(order.identifier), mutate=_two_parts),
}


@pytest.mark.parametrize("case", list(BAD_MESSAGES))
def test_bad_messages_are_quarantined_with_an_error_receipt_and_the_order_task_unchanged(lite, keys, case):
    order = place_order(lite)
    before, versions = lite.task(order.task_id), lite.versions(order.task_id)
    raw = BAD_MESSAGES[case](keys, order)
    sender = read_outer(raw).sender
    lite.send(raw, sender=sender)
    [q] = lite.quarantined()
    assert (q.reason, q.sender, q.message_id) == ("bad-message", sender, message_id(raw))
    assert q.message
    assert gw.inbound_state(lite.engine, T, message_id(raw)) == QUARANTINED
    [m] = lite.mdns()
    assert (m["original"], m["to"], m["disposition"], m["text"]) == (message_id(raw), sender, "deleted", q.message)
    assert lite.task(order.task_id) == before and lite.versions(order.task_id) == versions
    lite.send(raw, sender=sender)  # again: the same receipt, still one quarantine row
    assert [x["disposition"] for x in lite.mdns()] == ["deleted", "deleted"]
    assert len(lite.quarantined()) == 1
    assert lite.task(order.task_id) == before


def test_a_report_on_an_order_that_went_to_c_is_refused_from_b(lite, keys):
    order = place_order(lite, performer="site-c")
    raw = message(keys, report(order.identifier))
    lite.send(raw)
    [q] = lite.quarantined()
    assert q.reason == "bad-message" and B in q.message
    assert _state(lite.task(order.task_id)) == ("requested", "transfer-queued")
    lite.send(message(keys, report(order.identifier), signer="c", sender=C), sender=C)  # from C it is fine
    assert _state(lite.task(order.task_id)) == ("in-progress", "consultant-accepted")


SECURITY = {
    "signed-by-an-unknown-key": (lambda keys, o: message(keys, report(o.identifier), signer="x"), "unknown-sender",
                                 "deleted"),
    "sender-not-in-directory": (lambda keys, o: message(keys, report(o.identifier), signer="s", sender=STRANGER),
                                "unknown-sender", "deleted/error"),
    "signed-by-another-site": (lambda keys, o: message(keys, report(o.identifier), signer="c"), "unknown-sender",
                               "deleted"),
    "tampered": (lambda keys, o: _flip_ciphertext(message(keys, report(o.identifier))), "tampered", "deleted"),
    "armor-checksum": (lambda keys, o: _flip_armor_char(message(keys, report(o.identifier))), "malformed",
                       "deleted"),
    "wrong-recipient-key": (lambda keys, o: message(keys, report(o.identifier), to_key="c"), "wrong-recipient-key",
                            "deleted"),
}


@pytest.mark.parametrize("case", list(SECURITY))
def test_unverifiable_messages_are_quarantined_as_dicom_mails_are(lite, keys, case):
    build, reason, disposition = SECURITY[case]
    order = place_order(lite)
    before = lite.task(order.task_id)
    raw = build(keys, order)
    sender = read_outer(raw).sender
    lite.send(raw, sender=sender)
    [q] = lite.quarantined()
    assert (q.reason, q.sender, q.message_id) == (reason, sender, message_id(raw))
    [m] = lite.mdns()
    assert (m["original"], m["disposition"]) == (message_id(raw), disposition)
    assert lite.task(order.task_id) == before


# ---- move_task directly --------------------------------------------------------------------------------------------
def test_move_task_is_false_for_a_missing_or_closed_task_and_writes_nothing_twice(lite):
    fhir = lite.fhir
    with fhir.store.transaction(T, write=True) as tx:
        assert move_task(fhir, tx, "no-such-task", TaskState("in-progress", "consultant-accepted"), 1.0) is False
    order = place_order(lite)
    wanted = TaskState("in-progress", "consultant-working")
    with fhir.store.transaction(T, write=True) as tx:
        assert move_task(fhir, tx, order.task_id, wanted, 2.0, note="n1", output=[{"type": {"text": "x"},
                                                                                    "valueString": "y"}])
    versions = lite.versions(order.task_id)
    with fhir.store.transaction(T, write=True) as tx:
        assert move_task(fhir, tx, order.task_id, wanted, 3.0, note="n1", output=[{"type": {"text": "x"},
                                                                                    "valueString": "y"}])
    assert lite.versions(order.task_id) == versions
    task = lite.task(order.task_id)
    assert [n["text"] for n in task["note"]] == ["n1"] and len(task["output"]) == 1
    with fhir.store.transaction(T, write=True) as tx:
        assert move_task(fhir, tx, order.task_id, TaskState("failed", "consultant-failed"), 4.0, reason="weg")
    assert lite.task(order.task_id)["statusReason"] == {"text": "weg"}
    with fhir.store.transaction(T, write=True) as tx:
        assert move_task(fhir, tx, order.task_id, TaskState("in-progress", "consultant-working"), 5.0) is False
    assert _state(lite.task(order.task_id)) == ("failed", "consultant-failed")


# ---- reply sets: B's report instances come back and are re-linked to the real patient and study -----------------
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n% Befund: kein Anhalt fuer Lungenembolie\n%%EOF\n"


def place_anonymised_order(e: Env, *codes: str) -> tuple[Order, str, list[bytes]]:
    """An anonymised order of a study of 2 instances (the real patient PID-4711 "Müller^Jürgen", StudyDate
    20240115): (order, real study UID, the instances)."""
    study, series = f"2.25.{uuid.uuid4().int}", f"2.25.{uuid.uuid4().int}"
    instances = [make_instance(study=study, series=series, instance_number=i, patient_id="PID-4711",
                               patient_name="Müller^Jürgen", study_date="20240115") for i in (1, 2)]
    items = []
    for data in instances:
        sha = e.blobs.put(data)
        path = e.blobs.path_of(sha)
        items.append(NewInstance(parse_part10(path), sha, path.stat().st_size))
    e.archive.index_batch(T, items, replace=False)
    _patient(e)
    options = [{"coding": [{"system": "https://telerad-bridge.de/fhir/CodeSystem/send-option", "code": c}]}
               for c in ("anonymised", *codes)]
    sr = {"resourceType": "ServiceRequest", "status": "active", "intent": "order", "priority": "urgent",
          "code": {"coding": [{"system": CONSULT_KIND_SYSTEM, "code": "teleconsult"}]}, "orderDetail": options,
          "subject": {"reference": "Patient/p1"}, "requester": {"reference": "Organization/klinik-a"},
          "performer": [{"reference": f"HealthcareService/{site_ids('site-b')[1]}"}],
          "supportingInfo": [{"reference": f"ImagingStudy/{study}"}]}
    created = e.fhir.create(system_principal(T), "ServiceRequest", sr, base="/fhir")
    order = _order_of(e, created.resource["id"])
    assert order.job.deid_secret
    return order, study, instances


def b_copy(order: Order, instance: bytes) -> bytes:
    """The instance as B received it: de-identified with the order job's secret and options (as A's sender does)."""
    from server.dicom.deidentify import Options, Pseudonymizer

    options = Options(**json.loads(order.job.deid_options or "{}"))
    return Pseudonymizer(bytes.fromhex(order.job.deid_secret), options=options).deidentify(instance).data


def reply_mail(keys, order: Order, b_instance: bytes, *, sop_uid: str) -> bytes:
    """B's reply set of one Encapsulated PDF made in B's copy of the study, with the Task report as order.json."""
    from server.dicom.encapsulate import encapsulated_pdf, study_context_from
    from server.mail.drg import Part, build_instance_mail

    context = study_context_from(b_instance)
    pdf = encapsulated_pdf(PDF, study=context, title="Telekonsil-Befund", sop_uid=sop_uid)
    outputs = [{"type": {"text": "report"}, "valueReference": {
        "type": "DiagnosticReport", "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{sop_uid}"},
        "display": "Telekonsil-Befund"}}]
    task = status_report({"id": "t-b-1", "status": "completed", "intent": "order",
                          "owner": {"display": "Dr. B. Berger"}}, order=order.identifier, site_address=B,
                         outputs=outputs)
    assert task["status"] == "completed"
    return build_instance_mail(pdf, sop_instance_uid=sop_uid, study_uid=context.study_uid,
                               set_id=uuid.uuid4().hex, set_part=1, set_total=1, sender=B, recipient=OURS, mdn_to=B,
                               encrypt=lambda d: encrypt_and_sign(d, [keys["a"].public()], keys["b"]),
                               parts=[Part("application/fhir+json", json.dumps(task).encode(),
                                           filename="order.json")])


def _instance_at_a(e: Env, study: str, sop_uid: str):
    import io

    from pydicom import dcmread

    [row] = [r for r in e.archive.instances(T, study) if r.sop_uid == sop_uid]
    return dcmread(io.BytesIO(e.blobs.path_of(row.blob).read_bytes()))


def test_a_reply_set_is_relinked_imported_and_completes_the_order(lite, keys):
    order, study, instances = place_anonymised_order(lite)
    pseudo = b_copy(order, instances[0])
    sop_uid = f"2.25.{uuid.uuid4().int}"
    lite.send(message(keys, report(order.identifier, "accepted")))
    raw = reply_mail(keys, order, pseudo, sop_uid=sop_uid)
    lite.send(raw)
    [s] = [x for x in gw.list_sets(lite.engine, T)[1]]
    assert s.state == "imported" and s.consult_task == order.task_id
    ds = _instance_at_a(lite, study, sop_uid)  # in the REAL study, of the real patient
    assert (ds.StudyInstanceUID, ds.PatientID, str(ds.PatientName)) == (study, "PID-4711", "Müller^Jürgen")
    task = lite.task(order.task_id)
    assert _state(task) == ("completed", "report-received")
    [out] = [o for o in task["output"] if "reference" in o["valueReference"]]
    dr = lite.fhir.read(system_principal(T), "DiagnosticReport",
                        out["valueReference"]["reference"].split("/", 1)[1]).resource
    assert dr["subject"] == {"reference": "Patient/p1"}
    assert dr["imagingStudy"] == [{"reference": f"ImagingStudy/{study}"}]
    assert dr["basedOn"] == [{"reference": f"ServiceRequest/{order.sr_id}"}]
    assert dr["performer"] == [{"display": "Dr. B. Berger"}]
    assert [m["disposition"] for m in lite.mdns()] == ["displayed", "displayed"]

    lite.send(raw)  # the reply again: acknowledged, nothing new
    assert lite.fhir.search(system_principal(T), "DiagnosticReport", [("based-on", f"ServiceRequest/{order.sr_id}")],
                            base="/fhir")["total"] == 1
    assert [m["disposition"] for m in lite.mdns()] == ["displayed"] * 3


def test_a_reply_to_an_order_with_modified_dates_gets_the_real_study_date(lite, keys):
    order, study, instances = place_anonymised_order(lite, "retain-longitudinal-modified-dates")
    pseudo = b_copy(order, instances[0])
    sop_uid = f"2.25.{uuid.uuid4().int}"
    lite.send(reply_mail(keys, order, pseudo, sop_uid=sop_uid))
    ds = _instance_at_a(lite, study, sop_uid)
    assert (ds.StudyInstanceUID, ds.PatientID) == (study, "PID-4711")  # re-linked
    assert ds.StudyDate == "20240115"
