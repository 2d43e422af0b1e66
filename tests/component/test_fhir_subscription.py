"""FHIR R4 Subscription (subscription.html) with rest-hook: activation, validation, matching into the durable
queue in the write transaction, and the delivery worker (retries, dead letter, status error), on both backends.

The worker is driven by hand here (fake clock, ``httpx.MockTransport``); the loopback test with a real
listener is tests/integration/test_fhir_subscription_client.py.
"""

from __future__ import annotations

import json

import anyio
import httpx
import pytest

from server.config import Settings
from server.fhir import subscription as sub
from server.fhir.delivery import DeliveryWorker
from server.fhir.outcome import Unprocessable
from server.store import subscriptions as store
from tests import fhir_examples as ex
from tests.conftest import auth, make_token

FHIR = "application/fhir+json"


@pytest.fixture
def settings(tmp_path, database_url) -> Settings:
    """No background worker: these tests run the worker's rounds themselves."""
    return Settings(data_dir=tmp_path / "data", database_url=database_url, subscription_worker=False,
                    subscription_max_attempts=3, subscription_retry_base_seconds=10,
                    subscription_retry_max_seconds=100)


@pytest.fixture
def h(settings):
    return {**auth(make_token(settings)), "Content-Type": FHIR}


def subscription(criteria="Task?owner=Organization/o1", endpoint="https://ehr.example.org/hook", **channel):
    return {"resourceType": "Subscription", "status": "requested", "reason": "watch transfer tasks",
            "criteria": criteria, "channel": {"type": "rest-hook", "endpoint": endpoint, **channel}}


ORDER = "ServiceRequest/sr1"


def task(owner="o1", status="requested", **extra):
    """A profile-valid Task of the order ServiceRequest/sr1, owned by Organization/``owner``."""
    return ex.task(ORDER, status, owner={"reference": f"Organization/{owner}"}, **extra)


def post(client, h, resource):
    r = client.post(f"/fhir/{resource['resourceType']}", json=resource, headers=h)
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture
def orgs(client, h):
    """The examples' directory (Organizations o1, o2, ...) and the order ServiceRequest/sr1."""
    ex.seed_client(client, h)
    r = client.put(f"/fhir/{ORDER}", json={**ex.order(), "id": "sr1"}, headers=h)
    assert r.status_code == 201, r.text


def queued(app, tenant="site-a", sid=None):
    with app.state.fhir.store.transaction(tenant, write=False) as tx:
        return store.deliveries(tx, sid)


# ---- pure core ----------------------------------------------------------------------------------------------
def test_backoff_doubles_and_is_capped():
    assert sub.schedule(6, base=2, cap=10) == [2, 4, 8, 10, 10]
    assert sub.backoff(1, base=0.5, cap=60) == 0.5


def test_notification_without_and_with_payload():
    criteria = sub.parse_criteria("Task?status=completed")
    plain = sub.Channel("s1", criteria, "https://h.example/hook/", None, (("Authorization", "Bearer x"),), "active")
    n = sub.notification(plain, "Task", "t1", '{"resourceType":"Task"}')
    assert (n.method, n.url, n.body, n.headers) == ("POST", "https://h.example/hook/", b"",
                                                   (("Authorization", "Bearer x"),))
    full = sub.Channel("s1", criteria, "https://h.example/fhir/", FHIR, (), "active")
    n = sub.notification(full, "Task", "t1", '{"resourceType":"Task"}')
    assert (n.method, n.url) == ("PUT", "https://h.example/fhir/Task/t1")
    assert ("Content-Type", FHIR) in n.headers and json.loads(n.body) == {"resourceType": "Task"}


@pytest.mark.parametrize("criteria", ["Task?nonsense=1", "Nothing?x=1", "ImagingStudy?modality=CT",
                                      "Task?_count=5", "Task?authored-on=notadate"])
def test_bad_criteria(criteria):
    with pytest.raises(Unprocessable) as info:
        sub.parse_criteria(criteria)
    assert info.value.issues[0]["expression"] == ["Subscription.criteria"]


def test_criteria_ids():
    assert sub.parse_criteria("Task?_id=a,b").ids == {"a", "b"}
    assert sub.matches_without_search(sub.parse_criteria("Task?_id=a"), "b") is False
    assert sub.matches_without_search(sub.parse_criteria("Task"), "b") is True
    assert sub.matches_without_search(sub.parse_criteria("Task?status=ready"), "b") is None


# ---- create / update ----------------------------------------------------------------------------------------
def test_create_activates(client, h):
    body = post(client, h, subscription(header=["Authorization: Bearer abc"]))
    assert body["status"] == "active"
    again = client.get(f"/fhir/Subscription/{body['id']}", headers=h).json()
    assert again["status"] == "active" and again["channel"]["header"] == ["Authorization: Bearer abc"]
    found = client.get("/fhir/Subscription?status=active", headers=h).json()
    assert found["total"] == 1


def test_update_back_to_requested_clears_error_and_off_stays_off(client, h):
    body = post(client, h, subscription())
    sid = body["id"]
    r = client.put(f"/fhir/Subscription/{sid}", json={**subscription(), "id": sid, "status": "requested",
                                                      "error": "old trouble"}, headers=h)
    assert r.status_code == 200 and r.json()["status"] == "active" and "error" not in r.json()
    r = client.put(f"/fhir/Subscription/{sid}", json={**subscription(), "id": sid, "status": "off"}, headers=h)
    assert r.json()["status"] == "off"


@pytest.mark.parametrize("change, expression", [
    ({"channel": {"type": "websocket", "endpoint": "wss://x.example"}}, "Subscription.channel.type"),
    ({"channel": {"type": "email", "endpoint": "mailto:a@b.example"}}, "Subscription.channel.type"),
    ({"channel": {"type": "rest-hook", "endpoint": "ftp://x.example/hook"}}, "Subscription.channel.endpoint"),
    ({"channel": {"type": "rest-hook"}}, "Subscription.channel.endpoint"),
    ({"channel": {"type": "rest-hook", "endpoint": "https://x.example", "payload": "application/fhir+xml"}},
     "Subscription.channel.payload"),
    ({"channel": {"type": "rest-hook", "endpoint": "https://x.example", "header": ["no colon"]}},
     "Subscription.channel.header[0]"),
    ({"criteria": "Task?unknown-param=1"}, "Subscription.criteria"),
])
def test_invalid_subscription_is_422(client, h, change, expression):
    r = client.post("/fhir/Subscription", json={**subscription(), **change}, headers=h)
    assert r.status_code == 422, r.text
    issues = r.json()["issue"]
    assert any(expression in (i.get("expression") or []) for i in issues), issues
    assert client.get("/fhir/Subscription", headers=h).json()["total"] == 0


# ---- matching into the queue ------------------------------------------------------------------------------
def test_matching_change_queues_a_delivery(app, client, h, orgs):
    sid = post(client, h, subscription())["id"]
    other = post(client, h, subscription("Task?status=completed"))["id"]
    t = post(client, h, task(status="ready"))
    post(client, h, task(owner="o2"))
    rows = queued(app)
    assert [(d.subscription_id, d.resource_id, d.version_id, d.state) for d in rows] == \
        [(sid, t["id"], 1, "pending")]

    # the criteria are applied to the new version: in-progress -> completed matches the second one
    for status in ("in-progress", "completed"):
        r = client.put(f"/fhir/Task/{t['id']}", json={**t, "status": status}, headers=h)
        assert r.status_code == 200, r.text
    rows = queued(app)
    assert [(d.subscription_id, d.version_id) for d in rows] == [(sid, 1), (sid, 2), (sid, 3), (other, 3)]

    # no notification for a delete (R4 subscription.html)
    assert client.delete(f"/fhir/Task/{t['id']}", headers=h).status_code == 204
    assert len(queued(app)) == 4


def test_id_criteria_and_type_only_criteria(app, client, h, orgs):
    client.put("/fhir/Task/t-123", json={**task(), "id": "t-123"}, headers=h)
    by_id = post(client, h, subscription("Task?_id=t-123"))["id"]
    every = post(client, h, subscription("Task"))["id"]
    client.put("/fhir/Task/t-123", json={**task(status="cancelled"), "id": "t-123"}, headers=h)
    post(client, h, task())
    got = sorted((d.subscription_id, d.resource_id) for d in queued(app))
    assert (by_id, "t-123") in got and len([g for g in got if g[0] == by_id]) == 1
    assert len([g for g in got if g[0] == every]) == 2


def test_off_and_deleted_subscriptions_hear_nothing(app, client, h, orgs):
    sid = post(client, h, subscription())["id"]
    post(client, h, task())
    assert client.delete(f"/fhir/Subscription/{sid}", headers=h).status_code == 204
    assert [d.state for d in queued(app)] == ["cancelled"]
    off = {**subscription(), "status": "off"}
    post(client, h, off)
    post(client, h, task())
    assert len(queued(app)) == 1


def test_tenant_isolation(app, client, h, settings, orgs):
    hb = {**auth(make_token(settings, tenant="site-b")), "Content-Type": FHIR}
    post(client, hb, subscription("Task"))
    post(client, h, task())
    assert queued(app, "site-b") == [] and queued(app, "site-a") == []


def test_failed_transaction_queues_nothing(app, client, h, orgs):
    post(client, h, subscription("Task"))
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": task(), "request": {"method": "POST", "url": "Task"}},
        {"resource": task(status="no-such-status"), "request": {"method": "POST", "url": "Task"}}]}
    r = client.post("/fhir", json=bundle, headers=h)
    assert r.status_code >= 400
    assert queued(app) == []


# ---- the worker ---------------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Hook:
    """A fake endpoint: records requests, answers with the next status of ``answers`` (last one repeats)."""

    def __init__(self, *answers: int | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return httpx.Response(answer)


def run_round(app, hook: Hook, clock: Clock) -> bool:
    worker = DeliveryWorker(app.state.settings, app.state.fhir, store.DeliveryQueue(app.state.engine), clock=clock)

    async def go() -> bool:
        async with httpx.AsyncClient(transport=httpx.MockTransport(hook)) as c:
            return await worker.round(c)

    return anyio.run(go)


def test_delivery_with_payload_and_headers(app, client, h, orgs):
    post(client, h, subscription(endpoint="https://ehr.example.org/fhir", payload=FHIR,
                                 header=["Authorization: Bearer s3cret", "X-Site: a"]))
    t = post(client, h, task())
    hook, clock = Hook(200), Clock()
    clock.now = 10**10
    assert run_round(app, hook, clock)
    [req] = hook.requests
    assert req.method == "PUT" and str(req.url) == f"https://ehr.example.org/fhir/Task/{t['id']}"
    assert req.headers["authorization"] == "Bearer s3cret" and req.headers["x-site"] == "a"
    assert req.headers["content-type"] == FHIR and json.loads(req.content)["id"] == t["id"]
    assert [d.state for d in queued(app)] == ["delivered"]
    assert not run_round(app, hook, clock)


def test_retries_then_dead_and_error_status_then_recovery(app, client, h, orgs):
    sid = post(client, h, subscription())["id"]
    post(client, h, task())
    clock, hook = Clock(), Hook(500)
    clock.now = 10**10
    assert run_round(app, hook, clock)
    [d] = queued(app)
    assert (d.state, d.attempts, d.last_error) == ("pending", 1, "the endpoint answered HTTP 500")
    assert d.run_after == clock.now + 10
    assert not run_round(app, hook, clock)  # not due yet: backoff
    clock.now += 10
    assert run_round(app, hook, clock)
    clock.now += 20
    assert run_round(app, Hook(httpx.ConnectError("refused")), clock)
    [d] = queued(app)
    assert (d.state, d.attempts) == ("dead", 3) and "cannot reach" in d.last_error
    s = client.get(f"/fhir/Subscription/{sid}", headers=h).json()
    assert s["status"] == "error" and "failed after 3 tries" in s["error"] and s["meta"]["versionId"] == "2"

    # an errored subscription still hears of changes; one success sets it active again
    post(client, h, task())
    ok = Hook(204)
    assert run_round(app, ok, clock) and len(ok.requests) == 1
    s = client.get(f"/fhir/Subscription/{sid}", headers=h).json()
    assert s["status"] == "active" and "error" not in s and s["meta"]["versionId"] == "3"


def test_lease_is_exclusive(app, client, h, orgs):
    post(client, h, subscription("Task"))
    for _ in range(3):
        post(client, h, task())
    queue = store.DeliveryQueue(app.state.engine)
    first = queue.claim(10**10, limit=2, lease=60, statuses=sub.LISTENING)
    second = queue.claim(10**10, limit=5, lease=60, statuses=sub.LISTENING)
    assert len(first) == 2 and len(second) == 1
    assert not {d.pk for d in first} & {d.pk for d in second}
    assert queue.claim(10**10, limit=5, lease=60, statuses=sub.LISTENING) == []
    assert len(queue.claim(10**10 + 61, limit=5, lease=60, statuses=sub.LISTENING)) == 3  # leases expired


def test_concurrent_leases_never_overlap(app, client, h, orgs):
    """Workers in several processes lease at once: every delivery goes to exactly one of them."""
    import threading

    post(client, h, subscription("Task"))
    for _ in range(12):
        post(client, h, task())
    queue = store.DeliveryQueue(app.state.engine)
    got: list[list[int]] = [[] for _ in range(4)]

    def work(mine: list[int]) -> None:
        while batch := queue.claim(10**10, limit=2, lease=600, statuses=sub.LISTENING):
            mine.extend(d.pk for d in batch)

    threads = [threading.Thread(target=work, args=(g,)) for g in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    every = [pk for g in got for pk in g]
    assert len(every) == len(set(every)) == 12


def test_purge_keeps_dead_and_recent(app, client, h, orgs):
    post(client, h, subscription("Task"))
    post(client, h, task())
    post(client, h, task())
    queue = store.DeliveryQueue(app.state.engine)
    first, second = queue.claim(10**10, limit=5, lease=60, statuses=sub.LISTENING)
    with app.state.fhir.store.transaction("site-a", write=True) as tx:
        store.finish(tx, first.pk, state=store.DELIVERED)
        store.finish(tx, second.pk, state=store.DEAD, error="gone")
    assert queue.purge(0) == 0
    assert queue.purge(10**10) == 1
    assert [d.state for d in queued(app)] == ["dead"]
