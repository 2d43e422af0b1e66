"""The gateway's sender worker (server/gateway/sender.py) against a real SMTP server on loopback.

Real parts throughout: the store (SQLite, and PostgreSQL where the SQL matters), the blob store and archive, the
FHIR directory, our OpenPGP, the relay, an aiosmtpd server as the receiving site, and the gpg command line.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from server.config import Settings
from server.crypto import decrypt_and_verify, export_public_key, export_secret_key, generate_key
from server.dicom.parse import parse_part10
from server.errors import ErrorKind
from server.gateway.directory import SiteRow, import_bundle, site_resources
from server.gateway.policy import parse_routes
from server.gateway.sender import MDN_ENVELOPE_SENDER, REPORTING_UA, RETRYABLE_BY_KIND, Sender, message_id_for
from server.gateway.sites import Site, Sites
from server.mail import drg, mdn, partial
from server.mail.mime import msg_id
from server.mail.relay import Relay, RelayConfig
from server.store import gateway as gw
from server.store.archive import Archive, NewInstance
from server.store.blobs import BlobStore
from server.store.db import make_engine
from server.store.migrate import upgrade
from tests.dicomdata import make_instance
from tests.mail_servers import free_port, wait_until

A = "site-a"
A_ADDR, B_ADDR, C_ADDR = "dicom@site-a.example", "dicom@site-b.example", "dicom@site-c.example"
B_ENDPOINT, C_ENDPOINT = "Endpoint/siteb-dicom-email", "Endpoint/sitec-dicom-email"
C_MAX_SIZE = 3000  # site C takes small mails only: message/partial
GPG = "/usr/bin/gpg"


@pytest.fixture(scope="module")
def keys():
    return {"a": generate_key(f"Klinikum A <{A_ADDR}>", bits=2048),
            "b": generate_key(f"Klinikum B <{B_ADDR}>", bits=2048)}


class Capture:
    """The receiving site's SMTP server: records every mail, answers 550 for the ``refuse`` recipients."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.refuse: set[str] = set()
        self.received: list[tuple[str, list[str], bytes]] = []
        self._controller = None

    def start(self) -> Capture:
        from aiosmtpd.controller import Controller

        capture = self

        class Handler:
            async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
                if address in capture.refuse:
                    return "550 5.1.1 User unknown"
                envelope.rcpt_tos.append(address)
                return "250 2.1.5 OK"

            async def handle_DATA(self, server, session, envelope):
                capture.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
                return "250 2.0.0 Ok"

        self._controller = Controller(Handler(), hostname="127.0.0.1", port=self.port, data_size_limit=64 << 20)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def mails(self) -> list[bytes]:
        return [raw for _, _, raw in self.received]


@dataclass
class Clock:
    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    settings: Settings
    engine: object
    blobs: BlobStore
    archive: Archive
    fhir: object
    capture: Capture
    clock: Clock
    sender: Sender
    stored: dict[str, bytes] = field(default_factory=dict)  # SOP Instance UID -> the archived bytes

    def store(self, n: int, study: str) -> list[str]:
        """Archive ``n`` small instances of ``study`` (blob + index, as STOW-RS leaves them); their SOP UIDs."""
        sops = []
        for i in range(1, n + 1):
            data = make_instance(study=study, series=f"{study}.1", sop=f"{study}.1.{i}", instance_number=i)
            digest = gw.store_blob(self.blobs, data)
            parsed = parse_part10(self.blobs.path_of(digest))
            self.archive.index_batch(A, [NewInstance(parsed, digest, len(data))], replace=False)
            self.stored[f"{study}.1.{i}"] = data
            sops.append(f"{study}.1.{i}")
        return sops

    def job(self, sops: list[str], study: str, *, endpoint: str | None = B_ENDPOINT, address: str = B_ADDR,
            priority: int = 0, **kw) -> gw.Job:
        new = gw.NewJob(study_uid=study, instances=sops, recipient_address=address, sender_address=A_ADDR,
                        set_id=f"SET-{study}", priority=priority, recipient_endpoint=endpoint, **kw)
        return gw.create_job(self.engine, A, new, self.clock())

    def mails(self, job: gw.Job) -> list[gw.Mail]:
        return gw.job_mails(self.engine, A, job.job_id)


def _world(settings: Settings, keys, **overrides) -> World:
    from server.fhir.setup import build_service

    settings = settings.model_copy(update={"fsync": False, "send_retry_base_seconds": 10.0,
                                           "send_retry_max_seconds": 100.0, "send_max_attempts": 3,
                                           "receipt_timeout_seconds": 100.0, "incomplete_set_seconds": 500.0,
                                           **overrides})
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url)
    upgrade(engine)
    fhir = build_service(settings, engine)
    armored = export_public_key(keys["b"]).decode("ascii")
    rows = [SiteRow(1, "siteb", "Klinikum B", "Bremen", None, B_ADDR, None, "1.7", armored, None),
            SiteRow(2, "sitec", "Klinikum C", "Celle", None, C_ADDR, C_MAX_SIZE, "1.7", armored, None)]
    import_bundle(fhir, A, {"resourceType": "Bundle", "type": "collection",
                            "entry": [{"resource": r} for row in rows for r in site_resources(row, armored)]})
    port = free_port()
    routes = parse_routes(f"site-b.example=127.0.0.1:{port}/none,site-c.example=127.0.0.1:{port}/none,"
                          f"site-d.example=127.0.0.1:{free_port()}/none")
    relay = Relay(RelayConfig(routes=routes, helo_name="mx.site-a.example", timeout_seconds=10))
    blobs = BlobStore(settings.data_dir, fsync=False)
    archive = Archive(engine)
    clock = Clock()
    sites = Sites([Site(A, A_ADDR, keys["a"])])
    sender = Sender(settings, engine, blobs, archive, fhir, sites, relay, clock=clock, rand=lambda: 0.5)
    return World(settings, engine, blobs, archive, fhir, Capture(port), clock, sender)


@pytest.fixture
def world(settings, keys):
    """On SQLite and PostgreSQL, the receiver up."""
    w = _world(settings, keys)
    w.capture.start()
    yield w
    w.capture.stop()
    w.engine.dispose()


@pytest.fixture
def make_world(sqlite_settings, keys):
    """SQLite only: a factory taking settings overrides; the receiver is not started."""
    made: list[World] = []

    def make(**overrides) -> World:
        made.append(_world(sqlite_settings, keys, **overrides))
        return made[-1]

    yield make
    for w in made:
        w.capture.stop()
        w.engine.dispose()


@pytest.fixture
def sqlite_world(make_world):
    w = make_world()
    w.capture.start()
    return w


def _decrypt(outer: drg.Outer, keys) -> drg.Inner:
    assert outer.encrypted is not None
    plain = decrypt_and_verify(outer.encrypted, [keys["b"]], [keys["a"].public()])
    assert plain.signer_fingerprint == keys["a"].fingerprint
    return drg.parse_inner(plain.data)


# ---- instance mails ------------------------------------------------------------------------------------------
def test_one_drg_mail_per_instance_with_the_stored_message_ids(world, keys):
    study = "1.2.826.0.1.3680043.10.1"
    sops = world.store(3, study)
    job = world.job(sops, study)
    assert world.sender.send_due() == 3
    assert world.sender.send_due() == 0
    assert sorted(rcpts for _, rcpts, _ in world.capture.received) == [[B_ADDR]] * 3
    assert {mail_from for mail_from, _, _ in world.capture.received} == {A_ADDR}
    mails = world.mails(job)
    assert [m.state for m in mails] == ["sent"] * 3 and all(m.sent_at == world.clock.now for m in mails)
    by_id = {m.message_id: m for m in mails}
    for raw in world.capture.mails:
        outer = drg.parse_outer(raw)
        mail = by_id[outer.message_id]
        assert outer.message_id.startswith(f"<SET-{study}.{mail.set_part}.") and \
            outer.message_id.endswith("@site-a.example>")
        assert outer.set == drg.SetInfo(f"SET-{study}", mail.set_part, 3, study)
        assert outer.sender == A_ADDR and outer.recipients == (B_ADDR,) and outer.mdn_to == A_ADDR
        assert outer.subject == "DICOM-eMail" and not outer.emergency
        assert b"\r\nX-TELEMEDICINE-SETTOTAL: 3\r\n" in raw and b"\r\nDisposition-Notification-To: " in raw
        inner = _decrypt(outer, keys)
        assert inner.dicom == world.stored[mail.sop_instance_uid]
        assert inner.filename == f"{mail.sop_instance_uid}.dcm" and inner.set == outer.set
    done = gw.get_job(world.engine, A, job.job_id)
    assert (done.state, done.sent, done.failed, done.error) == ("active", 3, 0, None)


@pytest.mark.skipif(not Path(GPG).exists(), reason="GnuPG (/usr/bin/gpg) is not installed")
def test_gpg_decrypts_and_verifies_a_sent_mail(sqlite_world, keys):
    study = "1.2.826.0.1.3680043.10.2"
    world = sqlite_world
    job = world.job(world.store(1, study), study)
    assert world.sender.send_due() == 1
    outer = drg.parse_outer(world.capture.mails[0])
    home = Path(tempfile.mkdtemp(prefix="gpg-"))  # short path: the agent socket lives here
    home.chmod(0o700)
    try:
        def gpg(*args: str, data: bytes) -> subprocess.CompletedProcess:
            return subprocess.run([GPG, "--homedir", str(home), "--batch", "--yes", "--pinentry-mode", "loopback",
                                   "--passphrase", "", "--trust-model", "always", "--status-fd", "2", *args],
                                  input=data, capture_output=True, timeout=120, check=True)

        gpg("--import", data=export_secret_key(keys["b"]))
        gpg("--import", data=export_public_key(keys["a"]))
        result = gpg("--decrypt", data=outer.encrypted)
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)
    status = result.stderr.decode(errors="replace").splitlines()
    assert f"[GNUPG:] VALIDSIG {keys['a'].fingerprint}" in "\n".join(status)
    assert "[GNUPG:] GOODMDC" in status and "[GNUPG:] DECRYPTION_OKAY" in status
    inner = drg.parse_inner(result.stdout)
    (mail,) = world.mails(job)
    assert inner.dicom == world.stored[mail.sop_instance_uid] and inner.set == outer.set


def test_small_recipient_limit_sends_message_partial_fragments(sqlite_world, keys):
    world = sqlite_world
    study = "1.2.826.0.1.3680043.10.3"
    job = world.job(world.store(1, study), study, endpoint=C_ENDPOINT, address=C_ADDR)
    assert world.sender.send_due() == 1
    fragments = world.capture.mails
    assert len(fragments) > 1 and all(len(f) <= C_MAX_SIZE for f in fragments)
    infos = [partial.fragment_info(f) for f in fragments]
    assert [i.number for i in infos] == list(range(1, len(fragments) + 1)) and len({i.id for i in infos}) == 1
    for i, f in enumerate(fragments, 1):
        frag = drg.read_outer(f)
        assert frag.kind is drg.MailKind.PARTIAL and frag.subject == f"DICOM-eMail ({i}/{len(fragments)})"
        assert frag.set is not None and frag.mdn_to == A_ADDR
    joined = partial.join(fragments)
    outer = drg.parse_outer(joined)
    (mail,) = world.mails(job)
    assert outer.message_id == mail.message_id and mail.state == "sent"
    assert _decrypt(outer, keys).dicom == world.stored[mail.sop_instance_uid]
    # a job's own limit wins over the directory's
    world.capture.received.clear()
    study2 = "1.2.826.0.1.3680043.10.4"
    world.job(world.store(1, study2), study2, max_mail_size=100_000_000, endpoint=C_ENDPOINT, address=C_ADDR)
    assert world.sender.send_due() == 1
    assert len(world.capture.mails) == 1 and partial.fragment_info(world.capture.mails[0]) is None


def test_receiver_down_retries_after_the_backoff_then_sends(settings, keys):
    world = _world(settings, keys)  # both backends; the receiver starts later
    try:
        study = "1.2.826.0.1.3680043.10.5"
        job = world.job(world.store(2, study), study)
        t0 = world.clock.now
        assert world.sender.send_due() == 2
        mails = world.mails(job)
        assert [m.state for m in mails] == ["failed-retryable"] * 2
        assert all(m.run_after == t0 + 10.0 and m.attempts == 1 for m in mails)  # base 10 s, jitter at the mean
        assert all("ConnectionRefusedError" in m.last_error for m in mails)
        assert gw.next_due(world.engine) == t0 + 10.0
        first_ids = [m.message_id for m in mails]
        world.capture.start()
        assert world.sender.send_due() == 0  # not due yet
        world.clock.now = t0 + 10.5
        assert world.sender.send_due() == 2
        mails = world.mails(job)
        assert [(m.state, m.attempts, m.last_error) for m in mails] == [("sent", 2, None)] * 2
        assert [m.message_id for m in mails] == first_ids  # a resend keeps its Message-ID
        assert sorted(drg.parse_outer(r).message_id for r in world.capture.mails) == sorted(first_ids)
    finally:
        world.capture.stop()
        world.engine.dispose()


def test_retries_run_out_and_fail_the_job(make_world):
    world = make_world(send_max_attempts=2)
    study = "1.2.826.0.1.3680043.10.6"
    job = world.job(world.store(1, study), study)
    world.sender.send_due()
    world.clock.now += 1000
    world.sender.send_due()
    (mail,) = world.mails(job)
    assert (mail.state, mail.attempts) == ("failed-final", 2)
    done = gw.get_job(world.engine, A, job.job_id)
    assert done.state == "failed" and "ConnectionRefusedError" in done.error


def test_550_fails_the_mail_finally_and_the_job_with_the_reason(sqlite_world):
    world = sqlite_world
    world.capture.refuse.add(B_ADDR)
    study = "1.2.826.0.1.3680043.10.7"
    job = world.job(world.store(2, study), study)
    assert world.sender.send_due() == 2
    assert [(m.state, m.attempts) for m in world.mails(job)] == [("failed-final", 1)] * 2
    assert all("550 5.1.1 User unknown" in m.last_error for m in world.mails(job))
    done = gw.get_job(world.engine, A, job.job_id)
    assert done.state == "failed" and done.failed == 2 and "550 5.1.1 User unknown" in done.error
    assert world.capture.received == [] and world.sender.send_due() == 0


def test_emergency_job_goes_before_an_older_routine_job(make_world):
    world = make_world(send_concurrency=1)
    world.capture.start()
    routine, emergency = "1.2.826.0.1.3680043.10.8", "1.2.826.0.1.3680043.10.9"
    world.job(world.store(2, routine), routine)
    world.clock.now += 60
    world.job(world.store(1, emergency), emergency, priority=3)
    assert world.sender.send_due() == 3
    outers = [drg.parse_outer(raw) for raw in world.capture.mails]
    assert [o.set.study_uid for o in outers] == [emergency, routine, routine]
    assert [o.emergency for o in outers] == [True, False, False]
    assert b"\r\nX-TELEMEDICINE-PRIORITY: emergency\r\n" in world.capture.mails[0]


def test_what_cannot_be_sent_fails_finally_with_a_clear_reason(sqlite_world):
    world = sqlite_world
    study = "1.2.826.0.1.3680043.10.10"
    sops = world.store(4, study)
    blob_of = {r.sop_uid: r.blob for r in world.archive.instances(A, study)}
    world.blobs.path_of(blob_of[sops[2]]).write_bytes(b"not a DICOM file")  # damaged on disk
    world.blobs.path_of(blob_of[sops[3]]).unlink()
    partly = world.job([*sops, f"{study}.1.99"], study)
    unknown = world.job(sops[:1], study, endpoint="Endpoint/nowhere")
    nameless = world.job(sops[:1], study, endpoint=None)
    assert world.sender.send_due() == 7
    states = [(m.state, m.last_error) for m in world.mails(partly)]
    assert states[:2] == [("sent", None)] * 2
    assert states[2][0] == "failed-final" and "PS3.10" in states[2][1]
    assert states[3] == ("failed-final", f"the DICOM file of instance {sops[3]} is missing from the blob store")
    assert states[4] == ("failed-final", f"instance {study}.1.99 is no longer in the archive (study {study})")
    (m,) = world.mails(unknown)
    assert m.state == "failed-final" and "Endpoint/nowhere not found in the directory" in m.last_error
    (m,) = world.mails(nameless)
    assert m.state == "failed-final" and "names no recipient Endpoint" in m.last_error
    for job in (partly, unknown, nameless):
        assert gw.get_job(world.engine, A, job.job_id).state == "failed"
    assert len(world.capture.mails) == 2


def test_an_unexpected_error_is_logged_once_and_retried(sqlite_world, caplog, monkeypatch):
    world = sqlite_world
    study = "1.2.826.0.1.3680043.10.11"
    job = world.job(world.store(2, study), study)
    real = world.sender.relay.send
    calls = []

    def flaky(raw, mail_from, rcpts):
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("boom")
        return real(raw, mail_from, rcpts)

    monkeypatch.setattr(world.sender.relay, "send", flaky)
    with caplog.at_level(logging.ERROR, logger="server.gateway.sender"):
        assert world.sender.send_due() == 2
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    states = sorted((m.state, m.last_error or "") for m in world.mails(job))
    assert states[0][0] == "failed-retryable" and states[0][1].startswith("internal error (incident ")
    assert "boom" not in states[0][1] and states[1] == ("sent", "")


def test_message_ids_are_valid_and_unique():
    job = gw.Job(pk=1, tenant=A, job_id="j", state="waiting", priority=0, study_uid="1.2", selection=None,
                 recipient_endpoint=None, recipient_address=B_ADDR, recipient_fingerprint=None, max_mail_size=None,
                 sender_address="Dicom@Klinik-Ä.example", set_id="Set <1> mit Leerzeichen", total=2, sent=0,
                 acknowledged=0, failed=0, patient_name=None, study_description=None, study_date=None, error=None,
                 task_id=None, created=0.0, updated=0.0)
    mail = gw.Mail(pk=1, tenant=A, job_pk=1, set_part=2, sop_instance_uid="1.2.3", message_id=None, state="queued",
                   attempts=0, run_after=0.0, lease_until=None, sent_at=None, acknowledged_at=None,
                   disposition=None, last_error=None)
    ids = {message_id_for(mail, job) for _ in range(50)}
    assert len(ids) == 50
    for mid in ids:
        assert mid.startswith("<Set--1--mit-Leerzeichen.2.") and mid.endswith("@xn--klinik--cxa.example>")
        assert msg_id(mid) == mid


def test_every_error_kind_has_a_retry_verdict():
    assert set(RETRYABLE_BY_KIND) == set(ErrorKind)


# ---- receipts we owe -----------------------------------------------------------------------------------------
ORIGINAL_HEADER = (f"From: Klinikum B <{B_ADDR}>\r\nTo: {A_ADDR}\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
                   f"Disposition-Notification-To: {B_ADDR}\r\nX-TELEMEDICINE-SETID: SET-B-1\r\n"
                   "X-TELEMEDICINE-SETPART: 2\r\nX-TELEMEDICINE-SETTOTAL: 4\r\nX-TELEMEDICINE-STUDYID: 1.2.3\r\n"
                   "Message-ID: <orig-1@site-b.example>\r\nSubject: DICOM-eMail\r\nMIME-Version: 1.0\r\n"
                   "Content-Type: multipart/encrypted; protocol=\"application/pgp-encrypted\"; boundary=\"x\"\r\n"
                   ).encode()


def _queue_mdn(world: World, *, to: str = B_ADDR, disposition: str = "displayed", text: str | None = None,
               header: bytes = ORIGINAL_HEADER, message_id: str = "<mdn-1@site-a.example>", **extra) -> None:
    params = {"disposition": disposition, "final_recipient": A_ADDR, "text": text,
              "original_header": base64.b64encode(header).decode("ascii"), "message_id": message_id, **extra}
    gw.enqueue_mdn(world.engine, A, gw.NewMdn(to, "<orig-1@site-b.example>", json.dumps(params)), world.clock())


def test_a_queued_receipt_becomes_a_proper_mdn(world):
    _queue_mdn(world, disposition="displayed/warning", text="Patientenname ergänzt")
    assert world.sender.send_mdns() == 1
    assert world.sender.send_mdns() == 0
    ((mail_from, rcpts, raw),) = world.capture.received
    assert MDN_ENVELOPE_SENDER == "" and mail_from == "<>" and rcpts == [B_ADDR]  # null reverse-path
    parsed = mdn.parse_mdn(raw)
    assert parsed.original_message_id == "<orig-1@site-b.example>"
    assert parsed.disposition is mdn.Disposition.WARNING and parsed.error == "Patientenname ergaenzt"
    assert parsed.message_id == "<mdn-1@site-a.example>" and parsed.final_recipient == A_ADDR
    assert parsed.reporting_ua == REPORTING_UA and parsed.set == drg.SetInfo("SET-B-1", 2, 4, "1.2.3")
    assert ORIGINAL_HEADER in raw  # text/rfc822-headers: the original's header as it came
    head = drg.read_outer(raw)
    assert head.sender == A_ADDR and head.recipients == (B_ADDR,)
    assert [(q.state, q.attempts, q.last_error) for q in gw.mdns(world.engine, A)] == [("sent", 1, None)]


def test_receipt_retries_then_gives_up_and_bad_params_give_up_at_once(make_world):
    world = make_world(send_max_attempts=2)
    world.capture.start()
    _queue_mdn(world, to="dicom@site-d.example")  # nobody listens there
    _queue_mdn(world, header=f"From: {B_ADDR}\r\nSubject: x\r\n".encode())  # no Message-ID: cannot be answered
    _queue_mdn(world, disposition="exploded")
    t0 = world.clock.now
    assert world.sender.send_mdns() == 3
    rows = gw.mdns(world.engine, A)
    assert (rows[0].state, rows[0].attempts, rows[0].run_after) == ("pending", 1, t0 + 10.0)
    assert "ConnectionRefusedError" in rows[0].last_error
    assert [r.state for r in rows[1:]] == ["dead", "dead"]
    assert "Message-ID" in rows[1].last_error and "unusable params" in rows[2].last_error
    assert world.sender.send_mdns() == 0
    world.clock.now = t0 + 11
    assert world.sender.send_mdns() == 1
    row = gw.mdns(world.engine, A)[0]
    assert (row.state, row.attempts) == ("dead", 2) and "ConnectionRefusedError" in row.last_error
    assert world.capture.received == []


def test_a_header_without_disposition_notification_to_is_answered_to_the_queued_address(sqlite_world):
    world = sqlite_world
    header = ORIGINAL_HEADER.replace(f"Disposition-Notification-To: {B_ADDR}\r\n".encode(), b"")
    _queue_mdn(world, header=header, disposition="deleted", text="Signatur ungültig")
    assert world.sender.send_mdns() == 1
    ((_, rcpts, raw),) = world.capture.received
    assert rcpts == [B_ADDR] and drg.read_outer(raw).recipients == (B_ADDR,)
    assert mdn.parse_mdn(raw).disposition is mdn.Disposition.DELETED


# ---- sweeps --------------------------------------------------------------------------------------------------
def test_receipt_timeout_resends_with_the_same_message_id(world):
    study = "1.2.826.0.1.3680043.10.12"
    job = world.job(world.store(1, study), study)
    assert world.sender.send_due() == 1
    (sent,) = world.mails(job)
    world.clock.now += 50
    world.sender.sweep()
    assert world.mails(job)[0].state == "sent"  # not late yet
    world.clock.now += 51
    world.sender.sweep()
    (late,) = world.mails(job)
    assert (late.state, late.last_error) == ("queued", "no receipt within 100 s")
    assert world.sender.send_due() == 1
    (again,) = world.mails(job)
    assert (again.state, again.attempts, again.message_id) == ("sent", 2, sent.message_id)
    assert [drg.parse_outer(r).message_id for r in world.capture.mails] == [sent.message_id] * 2


def test_sweep_reports_incomplete_sets_and_drops_stale_fragments(sqlite_world, caplog):
    world = sqlite_world
    digest = gw.store_blob(world.blobs, b"part")
    t0 = world.clock.now
    gw.add_set_part(world.engine, A, gw.NewPart(set_id="SET-B-9", sender=B_ADDR, total=3, set_part=1,
                                                blob_sha256=digest, study_uid="1.2.3"), t0)
    gw.add_fragment(world.engine, A, "frag-1@site-b.example", 1, None, digest, t0)
    with caplog.at_level(logging.WARNING, logger="server.gateway.sender"):
        world.clock.now = t0 + 499
        world.sender.sweep()
        assert caplog.records == []
        world.clock.now = t0 + 501
        world.sender.sweep()
        world.sender.sweep()  # reported once
    texts = [r.getMessage() for r in caplog.records]
    assert len(texts) == 2
    assert "inbound set SET-B-9 from dicom@site-b.example (study 1.2.3) is incomplete, 1 of 3 parts" in texts[0]
    assert "dropped 1 fragment(s) of message/partial frag-1@site-b.example" in texts[1]
    _, sets = gw.list_sets(world.engine, A)
    assert [s.state for s in sets] == ["reported-incomplete"]
    assert gw.stale_fragments(world.engine, world.clock.now + 1) == []


# ---- the loop ------------------------------------------------------------------------------------------------
def test_run_sends_when_woken_and_stops_when_cancelled(make_world):
    world = make_world(gateway_poll_seconds=300.0)  # only wake() can start the second round in time
    world.capture.start()
    loop = asyncio.new_event_loop()
    task = loop.create_task(world.sender.run())
    thread = threading.Thread(target=lambda: loop.run_until_complete(asyncio.wait([task])), daemon=True)
    thread.start()
    try:
        wait_until(lambda: world.sender._loop is not None)
        study = "1.2.826.0.1.3680043.10.13"
        world.job(world.store(2, study), study)
        _queue_mdn(world)
        world.sender.wake()
        wait_until(lambda: len(world.capture.received) == 3, timeout=20)
        assert sorted(m for m, _, _ in world.capture.received) == ["<>", A_ADDR, A_ADDR]
    finally:
        loop.call_soon_threadsafe(task.cancel)
        thread.join(20)
        loop.close()
    assert not thread.is_alive() and task.cancelled()
    assert world.sender._loop is None
    world.sender.wake()  # not running: a no-op
