"""Transfer jobs as an API (/gateway) and their FHIR Task mirror, in-process on SQLite and PostgreSQL: create for a
study, a series, a list of instances; every error; filters; pause/resume, abort/retry, delete, 409; the Task
follows the job through simulated sending (claim, sent, MDN) and validates against transfer-task; tenants apart."""

from __future__ import annotations

import itertools
import time

import pytest

from server.crypto import export_public_key, generate_key
from server.gateway.directory import import_bundle
from server.gateway.jobs import Backoff
from server.gateway.keys import save_key
from server.store import gateway as gw
from tests.conftest import auth, make_token
from tests.dicomdata import make_instance, multipart

A, B = "site-a", "site-b"
BASE = "https://telerad-bridge.de/fhir"
SD = f"{BASE}/StructureDefinition"
POLICY = Backoff(base=10, factor=2, cap=100, jitter=0.0, max_attempts=3)
_ids = itertools.count(1)


@pytest.fixture(scope="module")
def keys():
    expired = generate_key("Expired <dicom@expired.example.de>", bits=2048, created=int(time.time()) - 7200,
                           expires_in=3600)
    return {"site": generate_key("Site A <dicom@site-a.example.de>", bits=2048),
            "bremen": generate_key("Bremen <dicom@bremen.example.de>", bits=2048).public(),
            "expired": expired.public()}


@pytest.fixture
def app(settings, keys):
    """The app with a DICOM e-mail key for site-a (none for site-b) saved before it starts."""
    from server.app import create_app

    save_key(settings.data_dir, A, keys["site"])
    app = create_app(settings)
    yield app
    app.state.engine.dispose()


def _endpoint(eid, org, address, key):
    ext = [{"url": f"{SD}/openpgp-public-key", "valueString": export_public_key(key).decode("ascii")},
           {"url": f"{SD}/openpgp-fingerprint", "valueString": key.fingerprint},
           {"url": f"{SD}/max-mail-size", "valueInteger": 10_000_000},
           {"url": f"{SD}/drg-profile-version", "valueCode": "1.7"}]
    return {"resourceType": "Endpoint", "id": eid, "meta": {"profile": [f"{SD}/dicom-email-endpoint"]},
            "extension": ext, "status": "active", "name": f"DICOM E-Mail {org}",
            "connectionType": {"system": f"{BASE}/CodeSystem/endpoint-connection-type", "code": "dicom-email"},
            "payloadType": [{"text": "DICOM"}], "managingOrganization": {"reference": f"Organization/{org}"},
            "address": f"mailto:{address}"}


@pytest.fixture
def world(app, client, keys):
    """site-a: directory (bremen with a key, nokey with an expired one), two studies (2 series, 1 series);
    site-b: one study."""
    bremen = keys["bremen"]
    resources = [
        {"resourceType": "Organization", "id": "bremen", "name": "Klinikum Bremen", "active": True},
        _endpoint("bremen-dicom", "bremen", "dicom@bremen.example.de", bremen),
        {"resourceType": "HealthcareService", "id": "bremen-tele", "name": "Teleradiologie Bremen",
         "providedBy": {"reference": "Organization/bremen"}, "endpoint": [{"reference": "Endpoint/bremen-dicom"}]},
        {"resourceType": "Organization", "id": "nokey", "name": "Abgelaufener Schlüssel", "active": True},
        _endpoint("nokey-dicom", "nokey", "dicom@nokey.example.de", keys["expired"]),
    ]
    import_bundle(app.state.fhir, A, {"resourceType": "Bundle", "type": "collection",
                                      "entry": [{"resource": r} for r in resources]})
    ha, hb = auth(make_token(app.state.settings, A)), auth(make_token(app.state.settings, B))
    study, s1, s2, other, s3 = "1.2.826.0.1.5", "1.2.826.0.1.5.1", "1.2.826.0.1.5.2", "1.2.826.0.1.6", "1.2.826.0.1.6.1"
    parts = [make_instance(study=study, series=s1, sop=f"{s1}.{i}", instance_number=i, series_number=1)
             for i in (2, 1)]
    parts += [make_instance(study=study, series=s2, sop=f"{s2}.1", instance_number=1, series_number=2)]
    parts += [make_instance(study=other, series=s3, sop=f"{s3}.1", patient_name="Other^Pat")]
    body, ctype = multipart(parts)
    assert client.post("/dicomweb/studies", content=body, headers={**ha, "Content-Type": ctype}).status_code == 200
    theirs = make_instance(study="1.2.826.0.1.7", series="1.2.826.0.1.7.1", sop="1.2.826.0.1.7.1.1")
    body, ctype = multipart([theirs])
    assert client.post("/dicomweb/studies", content=body, headers={**hb, "Content-Type": ctype}).status_code == 200
    return {"a": ha, "b": hb, "study": study, "s1": s1, "s2": s2, "other": other, "s3": s3,
            "theirs": "1.2.826.0.1.7"}


def _post(client, w, **body):
    body.setdefault("study", w["study"])
    body.setdefault("recipient", "Endpoint/bremen-dicom")
    return client.post("/gateway/jobs", json=body, headers=w["a"])


def _task(client, w, job):
    r = client.get(f"/fhir/{job['task']}", headers=w["a"])
    assert r.status_code == 200, r.text
    return r.json()


def _code(task):
    return task["status"], task["businessStatus"]["coding"][0]["code"]


def _outputs(task):
    return {o["type"]["coding"][0]["code"]: o["valueUnsignedInt"] for o in task["output"]}


def _valid(client, w, task):
    issues = client.post("/fhir/Task/$validate", json=task, headers=w["a"]).json()["issue"]
    assert [i["severity"] for i in issues] == ["information"], issues


def test_create_for_a_study_a_series_and_instances(client, world, keys):
    w = world
    r = _post(client, w, priority="stat")
    assert r.status_code == 201, r.text
    job = r.json()
    assert r.headers["location"] == f"/gateway/jobs/{job['id']}"
    assert (job["state"], job["images"], job["sent"], job["acknowledged"], job["failed"]) == ("waiting", 3, 0, 0, 0)
    assert job["recipient"] == {"address": "dicom@bremen.example.de", "endpoint": "Endpoint/bremen-dicom",
                                "fingerprint": keys["bremen"].fingerprint}
    assert (job["sender"], job["patientName"], job["studyDescription"], job["studyDate"]) == (
        "dicom@site-a.example.de", "Müller^Jürgen", "CT Thorax", "20240115")
    assert (job["priority"], job["emergency"], job["error"]) == ("stat", True, None)
    assert job["created"].endswith("Z") and job["task"].startswith("Task/")
    detail = client.get(f"/gateway/jobs/{job['id']}", headers=w["a"]).json()
    assert [(m["part"], m["sopInstanceUid"], m["state"]) for m in detail["mails"]] == [
        (1, f"{w['s1']}.1", "queued"), (2, f"{w['s1']}.2", "queued"), (3, f"{w['s2']}.1", "queued")]
    task = _task(client, w, job)
    assert _code(task) == ("ready", "transfer-queued") and task["priority"] == "stat"
    assert task["meta"]["profile"] == [f"{SD}/transfer-task"]
    assert task["focus"] == {"reference": f"ImagingStudy/{w['study']}"}
    assert task["identifier"][0]["value"] == job["id"]
    assert _outputs(task) == {"instances-total": 3, "instances-sent": 0, "instances-acknowledged": 0,
                              "instances-failed": 0}
    _valid(client, w, task)

    by_series = _post(client, w, series=[w["s2"]], recipient="HealthcareService/bremen-tele").json()
    assert by_series["images"] == 1 and by_series["priority"] == "routine" and not by_series["emergency"]
    task = _task(client, w, by_series)
    assert [i["valueOid"] for i in task["input"] if "valueOid" in i] == [f"urn:oid:{w['s2']}"]
    _valid(client, w, task)
    by_sop = _post(client, w, instances=[f"{w['s1']}.2", f"{w['s2']}.1"], recipient="Organization/bremen",
                   task="my-task-1")
    assert by_sop.status_code == 201 and by_sop.json()["task"] == "Task/my-task-1"
    mails = client.get(f"/gateway/jobs/{by_sop.json()['id']}", headers=w["a"]).json()["mails"]
    assert [m["sopInstanceUid"] for m in mails] == [f"{w['s1']}.2", f"{w['s2']}.1"]


@pytest.mark.parametrize("body, status, words", [
    ({"study": "1.2.3.999"}, 404, "not in the archive"),
    ({"study": "1.2.826.0.1.7"}, 404, "not in the archive"),  # site-b's study is invisible
    ({"series": ["1.2.826.0.1.6.1"]}, 400, "not in study"),  # a series of another study
    ({"instances": ["1.2.826.0.1.6.1.1"]}, 400, "not in study"),
    ({"series": ["1.2.826.0.1.5.1"], "instances": ["1.2.826.0.1.5.2.1"]}, 400, "selected series"),
    ({"recipient": "Endpoint/nowhere"}, 404, "not found"),
    ({"recipient": "Organization/nokey"}, 400, "key cannot be used"),  # expired: no usable key
    ({"recipient": "Patient/x"}, 400, "Endpoint, HealthcareService or Organization"),
    ({"priority": "soon"}, 400, "unknown priority"),
    ({"study": "not-a-uid"}, 400, "not a DICOM UID"),
    ({"unknown": 1}, 400, "invalid request"),
])
def test_create_errors(client, world, body, status, words):
    r = _post(client, world, **body)
    assert r.status_code == status, r.text
    assert words in r.json()["00000902"]["Value"][0]
    assert client.get("/gateway/jobs", headers=world["a"]).json()["total"] == 0


def test_tenant_without_key_and_scopes(client, world, app):
    r = client.post("/gateway/jobs", json={"study": world["theirs"], "recipient": "Endpoint/bremen-dicom"},
                    headers=world["b"])
    assert r.status_code == 400 and "no DICOM e-mail key" in r.json()["00000902"]["Value"][0]
    assert client.get("/gateway/jobs").status_code == 401
    read_only = auth(make_token(app.state.settings, A, scope="system/Task.rs system/ImagingStudy.rs"))
    assert client.get("/gateway/jobs", headers=read_only).status_code == 200
    assert client.post("/gateway/jobs", json={"study": world["study"], "recipient": "Endpoint/bremen-dicom"},
                       headers=read_only).status_code == 403


def test_list_filters_and_actions(client, world):
    w, h = world, world["a"]
    ids = [_post(client, w).json()["id"] for _ in range(3)]
    assert client.get("/gateway/jobs?state=waiting", headers=h).json()["total"] == 3
    page = client.get("/gateway/jobs?limit=2&offset=0", headers=h).json()
    assert page["total"] == 3 and [j["id"] for j in page["jobs"]] == ids[::-1][:2]
    assert client.get("/gateway/jobs?state=bogus", headers=h).status_code == 400
    # pause -> resume
    paused = client.post(f"/gateway/jobs/{ids[0]}/pause", headers=h).json()
    assert paused["state"] == "paused"
    assert _code(_task(client, w, paused)) == ("on-hold", "transfer-paused")  # through in-progress
    assert [j["id"] for j in client.get("/gateway/jobs?state=paused", headers=h).json()["jobs"]] == [ids[0]]
    resumed = client.post(f"/gateway/jobs/{ids[0]}/resume", headers=h).json()
    assert resumed["state"] == "waiting"
    assert _code(_task(client, w, resumed)) == ("in-progress", "transfer-running")  # a Task never returns to ready
    # abort -> retry: the cancelled Task stays, a new one follows the retried job
    aborted = client.post(f"/gateway/jobs/{ids[1]}/abort", headers=h).json()
    assert aborted["state"] == "aborted" and _code(_task(client, w, aborted)) == ("cancelled", "aborted")
    assert [j["id"] for j in client.get("/gateway/jobs?state=failed", headers=h).json()["jobs"]] == [ids[1]]
    r = client.post(f"/gateway/jobs/{ids[1]}/pause", headers=h)
    assert r.status_code == 409 and "cannot pause" in r.json()["00000902"]["Value"][0]
    retried = client.post(f"/gateway/jobs/{ids[1]}/retry", headers=h).json()
    assert retried["state"] == "waiting" and retried["task"] == f"{aborted['task']}-2"
    new_task = _task(client, w, retried)
    assert _code(new_task) == ("ready", "transfer-queued") and "retry of" in new_task["note"][0]["text"]
    assert _code(_task(client, w, aborted)) == ("cancelled", "aborted")
    _valid(client, w, new_task)
    # delete: only when held or done; the paused job's Task is cancelled, the job is gone
    assert client.delete(f"/gateway/jobs/{ids[2]}", headers=h).status_code == 409
    client.post(f"/gateway/jobs/{ids[2]}/pause", headers=h)
    task_ref = client.get(f"/gateway/jobs/{ids[2]}", headers=h).json()["task"]
    assert client.delete(f"/gateway/jobs/{ids[2]}", headers=h).status_code == 204
    assert client.get(f"/gateway/jobs/{ids[2]}", headers=h).status_code == 404
    assert _code(_task(client, w, {"task": task_ref})) == ("cancelled", "aborted")
    assert client.post(f"/gateway/jobs/{ids[0]}/delete", headers=h).status_code == 400
    assert client.post(f"/gateway/jobs/{ids[0]}/explode", headers=h).status_code == 400
    assert client.post("/gateway/jobs/nope/pause", headers=h).status_code == 404


def _mid(mail, job):
    return f"<{job.set_id}.{mail.set_part}.{next(_ids)}@site-a.example.de>"


def _history(client, w, ref):
    return client.get(f"/fhir/{ref}/_history", headers=w["a"]).json()["total"]


def test_task_follows_the_job_through_sending(client, world, app):
    w, h = world, world["a"]
    engine, hook = app.state.engine, app.state.gateway.hook
    app.state.gateway.clock = lambda: 50.0
    job = _post(client, w).json()
    ref = job["task"]
    claimed = gw.claim_mails(engine, 100.0, limit=2, lease=60.0, message_id=_mid, also=hook)
    assert _code(_task(client, w, job)) == ("in-progress", "transfer-running")
    for c in claimed:
        gw.mark_sent(engine, A, c.mail.pk, 101.0, also=hook)
    assert _code(_task(client, w, job)) == ("in-progress", "transfer-running")  # part 3 still queued
    versions = _history(client, w, ref)
    [last] = gw.claim_mails(engine, 102.0, limit=5, lease=60.0, message_id=_mid, also=hook)
    # a retryable send failure, then the resend
    gw.mark_failed(engine, A, last.mail.pk, 102.0, "421 busy", retryable=True, policy=POLICY, rand=0.5, also=hook)
    assert _code(_task(client, w, job)) == ("in-progress", "failed-retrying")
    [again] = gw.claim_mails(engine, 200.0, limit=5, lease=60.0, message_id=_mid, also=hook)
    gw.mark_sent(engine, A, again.mail.pk, 201.0, also=hook)
    task = _task(client, w, job)
    assert _code(task) == ("in-progress", "awaiting-receipts")
    assert _outputs(task)["instances-sent"] == 3
    _valid(client, w, task)
    assert _history(client, w, ref) == versions + 2
    mails = client.get(f"/gateway/jobs/{job['id']}", headers=h).json()["mails"]
    for m in mails[:2]:
        gw.record_mdn(engine, A, m["messageId"], "ok", "displayed", 300.0, policy=POLICY, rand=0, also=hook)
    assert _history(client, w, ref) == versions + 2  # receipts one by one: no new Task version
    detail = client.get(f"/gateway/jobs/{job['id']}", headers=h).json()
    assert (detail["state"], detail["acknowledged"]) == ("active", 2)
    assert detail["mails"][0]["disposition"] == "displayed" and detail["mails"][0]["acknowledged"]
    gw.record_mdn(engine, A, mails[2]["messageId"], "ok", "displayed", 301.0, policy=POLICY, rand=0, also=hook)
    task = _task(client, w, job)
    assert _code(task) == ("completed", "delivered")
    assert _outputs(task) == {"instances-total": 3, "instances-sent": 3, "instances-acknowledged": 3,
                              "instances-failed": 0}
    _valid(client, w, task)
    assert client.get("/gateway/jobs?state=finished", headers=h).json()["total"] == 1
    # finished: deleting leaves the completed Task as the record
    assert client.delete(f"/gateway/jobs/{job['id']}", headers=h).status_code == 204
    assert _code(_task(client, w, job)) == ("completed", "delivered")


def test_failed_job_task_has_a_reason(client, world, app):
    w = world
    engine, hook = app.state.engine, app.state.gateway.hook
    app.state.gateway.clock = lambda: 50.0
    job = _post(client, w, series=[w["s2"]]).json()
    [c] = gw.claim_mails(engine, 100.0, limit=5, lease=60.0, message_id=_mid, also=hook)
    gw.mark_sent(engine, A, c.mail.pk, 101.0, also=hook)
    gw.record_mdn(engine, A, c.mail.message_id, "failed-final", "deleted", 200.0, policy=POLICY, rand=0, also=hook)
    body = client.get(f"/gateway/jobs/{job['id']}", headers=w["a"]).json()
    assert body["state"] == "failed" and "receiver refused" in body["error"]
    task = _task(client, w, job)
    assert _code(task) == ("failed", "failed") and "receiver refused" in task["statusReason"]["text"]
    _valid(client, w, task)


def test_tenants_see_only_their_own(client, world):
    w = world
    job = _post(client, w).json()
    hb = w["b"]
    assert client.get("/gateway/jobs", headers=hb).json() == {"total": 0, "jobs": []}
    assert client.get(f"/gateway/jobs/{job['id']}", headers=hb).status_code == 404
    assert client.post(f"/gateway/jobs/{job['id']}/pause", headers=hb).status_code == 404
    assert client.delete(f"/gateway/jobs/{job['id']}", headers=hb).status_code == 404
    assert client.get(f"/fhir/{job['task']}", headers=hb).status_code == 404
    assert client.get(f"/gateway/jobs/{job['id']}", headers=w["a"]).json()["state"] == "waiting"


def test_sets_and_quarantine(client, world, app):
    w, engine = world, app.state.engine
    blob = gw.store_blob(app.state.blobs, make_instance(study="1.2.3"))
    s = gw.add_set_part(engine, A, gw.NewPart("set-1", "dicom@bremen.example.de", 2, 1, blob,
                                              study_uid="1.2.3"), 10.0).set
    gw.add_set_part(engine, B, gw.NewPart("set-2", "dicom@x.example.de", 1, 1, "cd" * 32), 10.0)
    gw.quarantine(engine, A, "ef" * 32, "unsigned", 11.0, sender="evil@x.example.de", message_id="<q@x>")
    sets = client.get("/gateway/sets", headers=w["a"]).json()
    assert sets["total"] == 1 and sets["sets"][0]["setId"] == "set-1" and sets["sets"][0]["received"] == 1
    assert client.get("/gateway/sets?state=complete", headers=w["a"]).json()["total"] == 0
    assert client.get("/gateway/sets?state=nonsense", headers=w["a"]).status_code == 400
    assert client.post(f"/gateway/sets/{s.pk}/discard", headers=w["b"]).status_code == 404
    assert client.post(f"/gateway/sets/{s.pk}/import", headers=w["b"]).status_code == 404
    r = client.post(f"/gateway/sets/{s.pk}/import", headers=w["a"])  # the operator imports what is there
    assert r.status_code == 200 and r.json()["state"] == "imported", r.text
    q = client.get("/dicomweb/studies", params={"StudyInstanceUID": "1.2.3"}, headers=w["a"])
    assert q.status_code == 200 and q.json()[0]["00201208"]["Value"] == [1]
    s3 = gw.add_set_part(engine, A, gw.NewPart("set-3", "dicom@bremen.example.de", 2, 1, "ab" * 32), 12.0).set
    r = client.post(f"/gateway/sets/{s3.pk}/discard", headers=w["a"])
    assert r.status_code == 200 and r.json()["state"] == "discarded"
    assert client.post(f"/gateway/sets/{s3.pk}/discard", headers=w["a"]).status_code == 409
    q = client.get("/gateway/quarantine", headers=w["a"]).json()
    assert q["total"] == 1 and q["mails"][0]["reason"] == "unsigned" and q["mails"][0]["sender"] == "evil@x.example.de"
    assert client.get("/gateway/quarantine", headers=w["b"]).json()["total"] == 0


def test_inbound_is_called_for_set_operations(client, world, app):
    calls = []

    class FakeInbound:
        def import_set(self, tenant, set_pk, *, operator=False):
            calls.append(("import", tenant, set_pk, operator))
            gw.mark_set_imported(app.state.engine, tenant, set_pk, 20.0, operator=operator)

        def discard_set(self, tenant, set_pk):
            calls.append(("discard", tenant, set_pk))

    app.state.gateway.inbound = FakeInbound()
    s = gw.add_set_part(app.state.engine, A, gw.NewPart("set-9", "dicom@b.example.de", 2, 1, "ab" * 32), 10.0).set
    r = client.post(f"/gateway/sets/{s.pk}/import", headers=world["a"])
    assert r.status_code == 200 and r.json()["state"] == "imported"
    assert calls == [("import", A, s.pk, True)]


@pytest.mark.parametrize("current", [None, "ready", "in-progress", "on-hold", "completed", "failed", "cancelled"])
def test_mirror_steps_are_legal_transitions(current):
    from server.fhir.task import TASK_STATE_BY_JOB, check_business_status, check_transition
    from server.gateway.tasks import CANCELLED, steps

    for wanted in [*TASK_STATE_BY_JOB.values(), CANCELLED]:
        path = steps(current, wanted)
        if current in ("completed", "failed", "cancelled") and wanted.status != current:
            assert path is None  # terminal: a retried job gets a new Task
            continue
        assert path, (current, wanted)
        status = current
        for step in path:
            check_transition(status, step.status)
            check_business_status(step.status, step.business_status)
            status = step.status
        expected = "in-progress" if wanted.status == "ready" and current not in (None, "ready") else wanted.status
        assert status == expected


def test_sender_hook_recreates_a_deleted_task_and_never_blocks(client, world, app):
    from server.gateway.tasks import task_hook

    w, engine = world, app.state.engine
    hook = task_hook(app.state.fhir)  # the sender's: not strict
    app.state.gateway.clock = lambda: 50.0
    job = _post(client, w).json()
    assert client.delete(f"/fhir/{job['task']}", headers=w["a"]).status_code == 204
    gw.claim_mails(engine, 100.0, limit=5, lease=60.0, message_id=_mid, also=hook)
    assert _code(_task(client, w, job)) == ("in-progress", "transfer-running")

    def refuse(new, old):
        from server.errors import invalid
        if new.get("resourceType") == "Task":
            raise invalid("Task writes refused")

    app.state.fhir.validators["Task"] = refuse
    try:
        assert client.post(f"/gateway/jobs/{job['id']}/pause", headers=w["a"]).status_code == 400  # strict: API
        assert client.get(f"/gateway/jobs/{job['id']}", headers=w["a"]).json()["state"] == "active"
        [m] = gw.job_mails(engine, A, job["id"])[:1]
        gw.mark_failed(engine, A, m.pk, 101.0, "421", retryable=True, policy=POLICY, rand=0.5, also=hook)
        assert gw.job_mails(engine, A, job["id"])[0].state == "failed-retryable"  # the transfer went on
    finally:
        del app.state.fhir.validators["Task"]
    assert _code(_task(client, w, job)) == ("in-progress", "transfer-running")  # missed that step
    for m in gw.job_mails(engine, A, job["id"])[1:]:
        gw.mark_sent(engine, A, m.pk, 102.0, also=hook)
    [again] = gw.claim_mails(engine, 200.0, limit=5, lease=60.0, message_id=_mid, also=hook)
    gw.mark_sent(engine, A, again.mail.pk, 201.0, also=hook)
    assert _code(_task(client, w, job)) == ("in-progress", "awaiting-receipts")  # caught up at the next one


@pytest.mark.parametrize("body", [
    {"study": "1." * 40},  # longer than a UID may be
    {"instances": ["1.2.3"] * 100_001},  # more than one request may name
    {"series": ["1." * 40]},
    {"recipient": "Endpoint/" + "x" * 300},
    {"surprise": True},  # unknown member
    {"study": 123},
])
def test_malformed_transfer_requests_are_refused_and_queue_nothing(client, world, body):
    r = _post(client, world, **body)
    assert r.status_code in (400, 422), r.text
    assert client.get("/gateway/jobs", headers=world["a"]).json()["total"] == 0


def test_a_body_that_is_no_json_is_refused(client, world):
    r = client.post("/gateway/jobs", content=b"{not json", headers={**world["a"], "Content-Type": "application/json"})
    assert r.status_code in (400, 422)
    assert client.get("/gateway/jobs", headers=world["a"]).json()["total"] == 0
