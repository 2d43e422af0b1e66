"""FHIR R4 Subscription rest-hook end to end: the real ``fhirpy`` client creates Subscriptions on the server under
uvicorn (lifespan on: the delivery worker runs), a small ``http.server`` on loopback receives the notifications.
Both databases. No timed sleeps: every wait polls with a deadline.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from fhirpy import SyncFHIRClient

from server.app import create_app
from server.config import Settings
from server.store import subscriptions as store
from tests import fhir_examples as ex
from tests.conftest import LiveServer, _free_port, make_token

ORDER = "ServiceRequest/sr1"
DEADLINE = 20.0


def wait_for(what: str, check: Callable[[], object], deadline: float = DEADLINE) -> object:
    """Poll ``check`` until it returns something truthy."""
    end = time.monotonic() + deadline
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Hook:
    """A rest-hook endpoint on 127.0.0.1: records every request, answers ``status``."""

    def __init__(self, port: int = 0, status: int = 200) -> None:
        self.status = status
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with hook.lock:
                    hook.requests.append({"method": self.command, "path": self.path,
                                          "headers": dict(self.headers), "body": body})
                self.send_response(hook.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_PUT = _any

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def seen(self) -> list[dict]:
        with self.lock:
            return list(self.requests)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def max_attempts() -> int:
    """Tries per delivery (a test parametrizes it to override)."""
    return 3


@pytest.fixture
def settings(tmp_path, database_url, max_attempts) -> Settings:
    """Fast polls and retries: ``max_attempts`` tries, 50 ms apart (doubling, capped at 200 ms)."""
    return Settings(data_dir=tmp_path / "data", database_url=database_url, subscription_poll_seconds=0.05,
                    subscription_retry_base_seconds=0.05, subscription_retry_max_seconds=0.2,
                    subscription_max_attempts=max_attempts, subscription_timeout_seconds=5)


@pytest.fixture
def server(settings) -> Iterator[LiveServer]:
    """The app under uvicorn with its lifespan (so the delivery worker runs)."""
    port = _free_port()
    app = create_app(settings.model_copy(update={"public_base_url": f"http://127.0.0.1:{port}"}))
    live = LiveServer(app, port)
    live.server.config.lifespan = "on"
    live.app = app
    try:
        with live:
            yield live
    finally:
        app.state.engine.dispose()


@pytest.fixture
def hooks() -> Iterator[list[Hook]]:
    made: list[Hook] = []
    yield made
    for hook in made:
        hook.close()


def make_hook(hooks: list[Hook], **kw) -> Hook:
    hook = Hook(**kw)
    hooks.append(hook)
    return hook


def fhir_client(server, settings, tenant: str = "site-a") -> SyncFHIRClient:
    token = make_token(settings, tenant=tenant)
    client = SyncFHIRClient(f"{server.url}/fhir", authorization=f"Bearer {token}")
    headers = {"Authorization": f"Bearer {token}"}
    ex.seed_client(httpx, headers, prefix=f"{server.url}/fhir/")
    r = httpx.put(f"{server.url}/fhir/{ORDER}", json={**ex.order(), "id": "sr1"},
                  headers={**headers, "Content-Type": ex.FHIR})
    assert r.status_code in (200, 201), r.text
    return client


@pytest.fixture
def fhir(server, settings) -> SyncFHIRClient:
    return fhir_client(server, settings)


def subscribe(fhir: SyncFHIRClient, criteria: str, endpoint: str, **channel):
    s = fhir.resource("Subscription", status="requested", reason="notify the EHR", criteria=criteria,
                      channel={"type": "rest-hook", "endpoint": endpoint, **channel})
    s.save()
    assert s["status"] == "active"
    return s


def new_task(fhir: SyncFHIRClient, owner: str = "o1"):
    t = fhir.resource("Task", **{k: v for k, v in ex.task(ORDER, owner={"reference": f"Organization/{owner}"}).items()
                                 if k != "resourceType"})
    t.save()
    return t


def queued(server, tenant: str = "site-a") -> list[store.Delivery]:
    with server.app.state.fhir.store.transaction(tenant, write=False) as tx:
        return store.deliveries(tx)


def test_matching_task_is_notified_and_other_is_not(fhir, server, hooks):
    full = make_hook(hooks)
    bare = make_hook(hooks)
    subscribe(fhir, "Task?owner=Organization/o1", full.url.replace("/hook", "/fhir"), payload=ex.FHIR,
              header=["Authorization: Bearer hook-secret"])
    subscribe(fhir, "Task?owner=Organization/o1", bare.url)

    other = new_task(fhir, owner="o2")
    mine = new_task(fhir, owner="o1")
    [req] = wait_for("the payload notification", full.seen)
    assert req["method"] == "PUT" and req["path"] == f"/fhir/Task/{mine.id}"
    assert req["headers"]["Authorization"] == "Bearer hook-secret"
    assert req["headers"]["Content-Type"] == ex.FHIR
    body = json.loads(req["body"])
    assert body["id"] == mine.id and body["meta"]["versionId"] == "1"
    [empty] = wait_for("the empty notification", bare.seen)
    assert (empty["method"], empty["path"], empty["body"]) == ("POST", "/hook", b"")

    rows = wait_for("both deliveries recorded",
                    lambda: [d for d in queued(server) if d.state == "delivered"][1:] and queued(server))
    assert [(d.resource_id, d.state) for d in rows] == [(mine.id, "delivered")] * 2
    assert other.id not in {json.loads(r["body"])["id"] for r in full.seen()}


def test_failing_endpoint_is_retried_then_subscription_shows_error(fhir, server, settings, hooks):
    hook = make_hook(hooks, status=500)
    s = subscribe(fhir, "Task", hook.url)
    new_task(fhir)

    def errored():
        s.refresh()
        return s["status"] == "error"

    wait_for("status error", errored)
    assert "HTTP 500" in s["error"] and f"after {settings.subscription_max_attempts} tries" in s["error"]
    assert len(hook.seen()) == settings.subscription_max_attempts
    assert [d.state for d in queued(server)] == ["dead"]

    # the endpoint is fixed: the next notification gets through and the Subscription is active again
    hook.status = 200
    new_task(fhir)

    def active():
        s.refresh()
        return s["status"] == "active"

    wait_for("status active again", active)
    assert "error" not in s


@pytest.mark.parametrize("max_attempts", [1000])  # keeps trying while the endpoint is down
def test_endpoint_down_then_up_loses_nothing(fhir, server, hooks):
    port = _free_port()
    subscribe(fhir, "Task", f"http://127.0.0.1:{port}/hook")
    t = new_task(fhir)
    wait_for("a failed try", lambda: any(d.attempts >= 1 and d.last_error for d in queued(server)))
    hook = make_hook(hooks, port=port)
    [req] = wait_for("the late notification", hook.seen)
    assert req["method"] == "POST"
    assert wait_for("delivered", lambda: [d.state for d in queued(server)] == ["delivered"])
    assert queued(server)[0].resource_id == t.id


def test_other_tenant_never_hears(fhir, server, settings, hooks):
    hook_a, hook_b = make_hook(hooks), make_hook(hooks)
    fhir_b = fhir_client(server, settings, tenant="site-b")
    subscribe(fhir_b, "Task", hook_b.url)
    subscribe(fhir, "Task", hook_a.url)
    t = new_task(fhir)
    wait_for("site-a's notification", hook_a.seen)
    assert hook_b.seen() == [] and queued(server, "site-b") == []
    assert [d.resource_id for d in queued(server, "site-a")] == [t.id]
