"""The whole gateway over real mail servers: outbound through a smarthost that requires STARTTLS and AUTH (aiosmtpd),
inbound by POP3 and IMAP polling of a real Debian Dovecot on loopback.

One hosted gateway, two tenants in one data folder: site-a (``dicom@a.example``) polls its mailbox over POP3
(STLS), site-b (``dicom@b.example``) over IMAP (implicit TLS). The test stands in for the internet's MTAs: every
mail the relay accepted is appended to the Dovecot mailbox of its envelope recipient. A study STOWed at site-a
and sent to site-b's Endpoint arrives byte-exact in site-b's archive, the receipts travel back the same way,
and site-a's job and its FHIR Task end delivered. Skipped when Dovecot is not installed (the ``dovecot`` fixture).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from server.config import Settings
from server.crypto import export_public_key, generate_key
from server.gateway.directory import SiteRow, import_bundle, site_ids, site_resources
from server.gateway.keys import save_key
from tests.component.test_wado import split_multipart
from tests.conftest import auth, make_token
from tests.dicomdata import make_instance, multipart
from tests.mail_servers import Dovecot, RelayServer, dovecot, make_cert  # noqa: F401

A, B = "site-a", "site-b"
ADDRESS = {A: "dicom@a.example", B: "dicom@b.example"}
SITE_ID = {A: "SITE-A", B: "SITE-B"}
N = 3  # instances of the study


@pytest.fixture(scope="module")
def keys():
    return {t: generate_key(f"Klinik {t[-1].upper()} <{ADDRESS[t]}>", bits=2048) for t in (A, B)}


@dataclass
class Network:
    """The relay (what the network carries), the mailboxes and the glue between them."""

    relay: RelayServer
    dovecot: Dovecot
    user_of: dict[str, str]  # mail address -> Dovecot user
    auths: list[tuple[str, bool, bool]] = field(default_factory=list)  # (mechanism, over TLS, success)
    carried: int = 0

    def carry(self) -> None:
        """The internet's MTAs: each mail the relay accepted goes to the mailbox of its envelope recipients."""
        while self.carried < len(self.relay.received):
            _, rcpts, raw = self.relay.received[self.carried]
            for rcpt in rcpts:
                self.dovecot.deliver(self.user_of[rcpt.lower()], raw)
            self.carried += 1

    def mdns(self) -> list[tuple[str, list[str], bytes]]:
        """The receipts the relay carried (null envelope sender, RFC 3798 3)."""
        return [r for r in self.relay.received if r[0] in ("", "<>")]


@pytest.fixture
def network(dovecot, tmp_path):
    relay = RelayServer(*make_cert(tmp_path / "relay-tls")).start()
    net = Network(relay, dovecot, {ADDRESS[t]: dovecot.add_user() for t in (A, B)})
    authenticate = relay._controller.SMTP_kwargs["authenticator"]  # type: ignore[attr-defined]

    def spy(server, session, envelope, mechanism, auth_data):
        result = authenticate(server, session, envelope, mechanism, auth_data)
        net.auths.append((mechanism, session.ssl is not None, result.success))
        return result

    relay._controller.SMTP_kwargs["authenticator"] = spy  # type: ignore[attr-defined]
    try:
        yield net
    finally:
        relay.stop()


def _settings(tmp_path: Path, net: Network, *, relay_password: str | None = None) -> Settings:
    """A hosted gateway: sender through the smarthost, a POP3 mailbox for site-a, an IMAP mailbox for site-b."""
    dc = net.dovecot
    user_a, user_b = net.user_of[ADDRESS[A]], net.user_of[ADDRESS[B]]
    secret = tmp_path / "site-b.password"
    secret.write_text(dc.users[user_b] + "\n")
    common = {"host": "localhost", "ca_file": str(dc.cert), "interval_seconds": 0.1, "timeout_seconds": 10}
    boxes = [{"tenant": A, "name": "a-pop3", "protocol": "pop3", "port": dc.ports["pop3"], "tls": "starttls",
              "username": user_a, "password": dc.users[user_a], **common},
             {"tenant": B, "name": "b-imap", "protocol": "imap", "port": dc.ports["imaps"], "tls": "implicit",
              "username": user_b, "password_file": str(secret), **common}]
    mailboxes = tmp_path / "mailboxes.json"
    mailboxes.write_text(json.dumps(boxes))
    relay = net.relay
    return Settings(data_dir=tmp_path / "data", gateway_worker=True, smtp_port=None, subscription_worker=False,
                    mailboxes_file=mailboxes, relay_host="127.0.0.1", relay_port=relay.port, relay_tls="starttls",
                    relay_username=relay.username, relay_password=relay_password or relay.password,
                    relay_ca_file=relay.cert, relay_timeout_seconds=10, gateway_poll_seconds=0.1,
                    send_retry_base_seconds=0.3, send_retry_max_seconds=1, send_max_attempts=50,
                    receipt_timeout_seconds=120, fsync=False)


def _app(settings: Settings, keys):
    """The app of the hosted gateway: both keys saved before it is built, each tenant's directory knows the other."""
    from server.app import create_app

    for tenant, key in keys.items():
        save_key(settings.data_dir, tenant, key)
    app = create_app(settings)
    for tenant, other in ((A, B), (B, A)):
        armored = export_public_key(keys[other].public()).decode("ascii")
        row = SiteRow(line=1, site_id=SITE_ID[other], organization=f"Klinik {other[-1].upper()}", city="Bremen",
                      telematik_id=None, address=ADDRESS[other], max_mail_size=None, drg_profile_version="1.7",
                      public_key=armored, network=None)
        import_bundle(app.state.fhir, tenant, {"resourceType": "Bundle", "type": "transaction",
                                               "entry": [{"resource": r} for r in site_resources(row, armored)]})
    return app


def _endpoint(tenant: str) -> str:
    return f"Endpoint/{site_ids(SITE_ID[tenant])[2]}"


def _study() -> tuple[str, str, dict[str, bytes]]:
    study, series = generate_uid(), generate_uid()
    sops = [generate_uid() for _ in range(N)]
    return study, series, {sop: make_instance(study=study, series=series, sop=sop, instance_number=i, size=64)
                           for i, sop in enumerate(sops, start=1)}


def _stow_and_send(client, headers: dict, study: str, instances: dict[str, bytes]) -> dict:
    body, ctype = multipart(list(instances.values()))
    r = client.post("/dicomweb/studies", content=body, headers={**headers, "Content-Type": ctype})
    assert r.status_code == 200, r.text
    r = client.post("/gateway/jobs", json={"study": study, "recipient": _endpoint(B)}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


def _wait(predicate, *, timeout: float, what: str, pump=None):
    """Poll ``predicate`` (after ``pump``) until it returns a true value; fails with the last value at the deadline."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if pump is not None:
            pump()
        last = predicate()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def test_study_travels_through_relay_and_polled_mailboxes_and_receipts_come_back(network, keys, tmp_path):
    from fastapi.testclient import TestClient

    settings = _settings(tmp_path, network)
    app = _app(settings, keys)
    ha, hb = auth(make_token(settings, A)), auth(make_token(settings, B))
    study, series, instances = _study()
    try:
        with TestClient(app, base_url="http://testserver") as client:
            assert {b.tenant for b in app.state.gateway_runtime.mailboxes} == {A, B}
            job = _stow_and_send(client, ha, study, instances)
            assert job["recipient"]["address"] == ADDRESS[B] and job["sender"] == ADDRESS[A]

            def delivered():
                detail = client.get(f"/gateway/jobs/{job['id']}", headers=ha).json()
                assert detail["state"] not in ("failed", "aborted"), detail
                return detail if detail["state"] == "finished" else None

            detail = _wait(delivered, timeout=30, what="site-a's job finished", pump=network.carry)

            # the job: every mail sent once and acknowledged by site-b's receipt
            assert (detail["images"], detail["sent"], detail["acknowledged"], detail["failed"]) == (N, N, N, 0)
            assert [m["state"] for m in detail["mails"]] == ["acknowledged-ok"] * N, detail["mails"]
            assert all(m["disposition"] == "displayed" and m["error"] is None for m in detail["mails"])
            task = client.get(f"/fhir/{job['task']}", headers=ha).json()
            assert (task["status"], task["businessStatus"]["coding"][0]["code"]) == ("completed", "delivered")

            # site-b: the study with all instances, byte-exact; the set imported; nothing quarantined
            found = client.get("/dicomweb/studies", params={"StudyInstanceUID": study}, headers=hb).json()
            assert [s["00201208"]["Value"] for s in found] == [[N]]
            for sop, data in instances.items():
                r = client.get(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}",
                               headers={**hb, "Accept": 'multipart/related; type="application/dicom"'})
                assert r.status_code == 200, r.text
                [(_, got)] = split_multipart(r.content, r.headers["content-type"])
                assert got == data
            sets = client.get("/gateway/sets", headers=hb).json()
            assert [(s["sender"], s["study"], s["total"], s["received"], s["state"]) for s in sets["sets"]] == [
                (ADDRESS[A], study, N, N, "imported")]
            for h in (ha, hb):
                assert client.get("/gateway/quarantine", headers=h).json()["total"] == 0
    finally:
        app.state.engine.dispose()

    # the network: N instance mails to site-b and N receipts to site-a, all through STARTTLS + AUTH
    relay = network.relay
    instance_mails = [r for r in relay.received if r not in network.mdns()]
    assert [(r[0], r[1]) for r in instance_mails] == [(ADDRESS[A], [ADDRESS[B]])] * N
    assert all(b"multipart/encrypted" in r[2] for r in instance_mails)
    assert [r[1] for r in network.mdns()] == [[ADDRESS[A]]] * N
    assert all(b"multipart/report" in r[2] and b"disposition-notification" in r[2] for r in network.mdns())
    assert network.auths and all(over_tls and ok for _, over_tls, ok in network.auths), network.auths
    # the mailboxes are empty: each mail was deleted after it was stored
    for address in (ADDRESS[A], ADDRESS[B]):
        _wait(lambda: network.dovecot.message_ids(network.user_of[address]) == [], timeout=10,
              what=f"the mailbox of {address} empty")


def test_wrong_relay_password_is_a_clear_error_and_loses_nothing(network, keys, tmp_path):
    """The smarthost refuses AUTH (535): nothing leaves, the job says why; with the password fixed (a restart:
    settings are read at start) a retry of the job delivers everything."""
    from fastapi.testclient import TestClient

    from server.app import create_app

    settings = _settings(tmp_path, network, relay_password="not-the-password")
    app = _app(settings, keys)
    ha = auth(make_token(settings, A))
    study, _, instances = _study()
    try:
        with TestClient(app, base_url="http://testserver") as client:
            job = _stow_and_send(client, ha, study, instances)

            def refused():
                detail = client.get(f"/gateway/jobs/{job['id']}", headers=ha).json()
                return detail if all(m["error"] for m in detail["mails"]) else None

            detail = _wait(refused, timeout=20, what="the relay's refusal on every mail")
    finally:
        app.state.engine.dispose()
    # 535 from our own smarthost is a setting to fix, not the recipient's refusal: the mails wait and retry.
    assert [m["state"] for m in detail["mails"]] == ["failed-retryable"] * N, detail["mails"]
    assert detail["state"] == "active"
    for m in detail["mails"]:
        assert "AUTH refused: 535" in m["error"] and "127.0.0.1" in m["error"], m["error"]
        assert "not-the-password" not in m["error"]
    assert "not-the-password" not in json.dumps(detail)
    assert detail["sent"] == 0 and detail["acknowledged"] == 0
    assert network.relay.received == [] and network.auths and not any(ok for *_, ok in network.auths)

    # nothing lost: the same data folder (keys, directory, job) with the right password; the waiting mails go
    fixed = create_app(settings.model_copy(update={"relay_password": network.relay.password}))
    hb = auth(make_token(settings, B))
    try:
        with TestClient(fixed, base_url="http://testserver") as client:
            def delivered():
                again = client.get(f"/gateway/jobs/{job['id']}", headers=ha).json()
                return again if again["state"] == "finished" else None

            again = _wait(delivered, timeout=30, what="the retried job finished", pump=network.carry)
            assert [m["state"] for m in again["mails"]] == ["acknowledged-ok"] * N
            found = client.get("/dicomweb/studies", params={"StudyInstanceUID": study}, headers=hb).json()
            assert [s["00201208"]["Value"] for s in found] == [[N]]
    finally:
        fixed.state.engine.dispose()

