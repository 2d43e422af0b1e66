"""The inbound gateway end to end: real DRG mails (server.mail.drg + server.crypto) sent with smtplib to our SMTP
ingress on loopback, verified against the FHIR directory, collected into sets, imported, MDNs queued, refusals
quarantined. The core flow runs on SQLite and PostgreSQL, the rest on SQLite."""

from __future__ import annotations

import base64
import json
import logging
import re
import smtplib
import uuid
from dataclasses import dataclass
from email.utils import format_datetime
from datetime import datetime, timezone

import pytest

from server.config import Settings
from server.crypto import encrypt_and_sign, export_public_key, generate_key
from server.crypto.armor import armor, dearmor
from server.errors import ErrorKind, ServerError
from server.gateway.directory import SiteRow, import_bundle, site_resources
from server.gateway.inbound import QUARANTINED, STORED, Inbound
from server.gateway.sites import Site, Sites
from server.mail import partial
from server.mail.drg import build_instance_mail, read_outer
from server.mail.mdn import Disposition, build_mdn
from server.mail.smtp_in import SmtpIngress
from server.mail.transport import Received, Source, utcnow
from server.store import gateway as gw
from server.store.archive import Archive
from server.store.blobs import BlobStore
from server.store.db import make_engine
from server.store.migrate import upgrade
from tests.dicomdata import make_instance

T = "site-b"
OURS = "dicom@site-b.example"
SENDER = "dicom@site-a.example"
STRANGER = "dicom@site-x.example"


@pytest.fixture(scope="module")
def keys():
    return {
        "a": generate_key(f"Site A <{SENDER}>", bits=2048),
        "b": generate_key(f"Site B <{OURS}>", bits=2048),
        "c": generate_key("Site C <dicom@site-c.example>", bits=2048),
        "x": generate_key(f"Impostor <{SENDER}>", bits=2048),  # claims site A's address, not in the directory
    }


@dataclass
class Env:
    settings: Settings
    engine: object
    blobs: BlobStore
    archive: Archive
    inbound: Inbound
    ingress: SmtpIngress
    woken: list

    def send(self, raw: bytes, *, sender: str = SENDER, to: str = OURS) -> None:
        """Deliver with smtplib; the ingress answers 250 only after the sink returned (processing is done)."""
        with smtplib.SMTP("127.0.0.1", self.ingress.port, timeout=30) as smtp:
            smtp.sendmail(sender, [to], raw)

    def mdns(self) -> list[dict]:
        return [{"to": m.to_address, "original": m.original_message_id, **json.loads(m.params)}
                for m in gw.mdns(self.engine, T)]

    def quarantined(self):
        return gw.quarantined(self.engine, T)[1]

    def sets(self):
        return gw.list_sets(self.engine, T)[1]


def seed_directory(fhir, key) -> None:
    armored = export_public_key(key.public()).decode("ascii")
    row = SiteRow(line=1, site_id="site-a", organization="Klinikum A", city="Bremen", telematik_id=None,
                  address=SENDER, max_mail_size=None, drg_profile_version="1.7", public_key=armored, network=None)
    import_bundle(fhir, T, {"resourceType": "Bundle", "type": "transaction",
                            "entry": [{"resource": r} for r in site_resources(row, armored)]})


def make_env(settings: Settings, keys) -> Env:
    from server.fhir.setup import build_service

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url)
    upgrade(engine)
    blobs = BlobStore(settings.data_dir, fsync=settings.fsync)
    archive = Archive(engine)
    fhir = build_service(settings, engine)
    seed_directory(fhir, keys["a"])
    sites = Sites([Site(T, OURS, keys["b"])])
    woken: list = []
    inbound = Inbound(settings, engine, blobs, archive, fhir, sites, on_mdn=lambda: woken.append(1))
    ingress = SmtpIngress("127.0.0.1", 0, inbound, hostname="mx.site-b.example", local_addresses=sites.addresses,
                          max_bytes=10 * 1024**2)
    ingress.start_in_thread()
    return Env(settings, engine, blobs, archive, inbound, ingress, woken)


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


def study(n: int) -> tuple[str, list[tuple[str, bytes]]]:
    """A study UID and n small instances of it."""
    uid = f"2.25.{uuid.uuid4().int}"
    series = f"2.25.{uuid.uuid4().int}"
    out = []
    for i in range(1, n + 1):
        sop = f"2.25.{uuid.uuid4().int}"
        out.append((sop, make_instance(study=uid, series=series, sop=sop, instance_number=i, size=8)))
    return uid, out


def mails(keys, n: int = 3, *, set_id: str | None = None, signer: str = "a", to_key: str = "b",
          sender: str = SENDER, study_uid: str | None = None, mutate=None, **kw) -> tuple[str, list[bytes]]:
    """A study of n instances as n DRG mails (set parts 1..n)."""
    uid, instances = study(n)
    set_id = set_id or uuid.uuid4().hex

    def encrypt(inner: bytes) -> bytes:
        return encrypt_and_sign(mutate(inner) if mutate else inner, [keys[to_key].public()], keys[signer])

    return uid, [build_instance_mail(dicom, sop_instance_uid=sop, study_uid=study_uid or uid, set_id=set_id,
                                     set_part=i, set_total=n, sender=sender, recipient=OURS, mdn_to=sender,
                                     encrypt=encrypt, **kw)
                 for i, (sop, dicom) in enumerate(instances, start=1)]


def message_id(raw: bytes) -> str:
    return read_outer(raw).message_id


# ---- the core flow (both backends) ---------------------------------------------------------------------------
def test_complete_set_out_of_order_is_imported_with_a_receipt_per_part(env, keys):
    uid, raws = mails(keys, 3)
    env.send(raws[2])
    env.send(raws[0])
    [s] = env.sets()
    assert (s.state, s.parts_seen, s.total, s.study_uid, s.sender) == ("collecting", 2, 3, uid, SENDER)
    assert env.archive.instances(T, uid) == []
    env.send(raws[1])
    [s] = env.sets()
    assert (s.state, s.parts_seen) == ("imported", 3)
    assert len(env.archive.instances(T, uid)) == 3
    mdns = env.mdns()
    assert sorted(m["original"] for m in mdns) == sorted(message_id(r) for r in raws)
    for m in mdns:
        assert m["to"] == SENDER
        assert set(m) == {"to", "original", "disposition", "final_recipient", "text", "original_header",
                          "message_id"}
        assert (m["disposition"], m["final_recipient"], m["text"]) == ("displayed", OURS, None)
        assert re.fullmatch(r"<mdn\.[0-9a-f]{32}@site-b\.example>", m["message_id"])
        assert base64.b64decode(m["original_header"]).startswith(b"From: ")
    assert all(gw.inbound_state(env.engine, T, message_id(r)) == STORED for r in raws)
    assert len(env.woken) == 3
    assert env.quarantined() == []

    from fastapi.testclient import TestClient

    from server.app import create_app
    from tests.conftest import auth, make_token

    app = create_app(env.settings)
    try:
        with TestClient(app) as client:
            r = client.get(f"/dicomweb/studies/{uid}/instances", headers=auth(make_token(env.settings, T)))
            assert r.status_code == 200 and len(r.json()) == 3
            r = client.get(f"/fhir/ImagingStudy/{uid}", headers=auth(make_token(env.settings, T)))
            assert r.status_code == 200 and r.json()["numberOfInstances"] == 3
    finally:
        app.state.engine.dispose()


# ---- duplicates, incomplete sets, fragments (SQLite) ---------------------------------------------------------
def test_the_same_mail_twice_is_acknowledged_twice_and_imported_once(lite, keys, caplog):
    caplog.set_level(logging.WARNING, logger="server.gateway.inbound")
    uid, [raw] = mails(keys, 1, emergency=True)
    lite.send(raw)
    lite.send(raw)
    [s] = lite.sets()
    assert (s.state, s.parts_seen) == ("imported", 1)
    assert len(lite.archive.instances(T, uid)) == 1
    assert [m["disposition"] for m in lite.mdns()] == ["displayed", "displayed"]
    assert {m["original"] for m in lite.mdns()} == {message_id(raw)}
    assert "NOTFALL" in caplog.text


def test_a_set_part_again_under_another_message_id_is_acknowledged_not_stored(lite, keys):
    set_id = uuid.uuid4().hex
    uid, [p1, p2] = mails(keys, 2, set_id=set_id)
    lite.send(p1)
    resent = p1.replace(message_id(p1).encode(), f"<{uuid.uuid4().hex}@site-a.example>".encode())
    lite.send(resent)
    [s] = lite.sets()
    assert (s.state, s.parts_seen) == ("collecting", 1)
    assert len(gw.set_parts(lite.engine, T, s.pk)) == 1
    assert [m["disposition"] for m in lite.mdns()] == ["displayed", "displayed"]
    lite.send(p2)
    assert len(lite.archive.instances(T, uid)) == 2


def test_incomplete_set_waits_then_operator_imports_or_discards(lite, keys):
    uid, raws = mails(keys, 3)
    lite.send(raws[0])
    lite.send(raws[2])
    [s] = lite.sets()
    assert s.state == "collecting"
    with pytest.raises(ServerError) as err:
        lite.inbound.import_set(T, s.pk)
    assert err.value.kind is ErrorKind.CONFLICT
    assert lite.archive.instances(T, uid) == []
    done = lite.inbound.import_set(T, s.pk, operator=True)
    assert done.state == "imported"
    assert len(lite.archive.instances(T, uid)) == 2
    lite.send(raws[1])  # the late part of the imported set: acknowledged and imported too
    assert gw.get_set(lite.engine, T, s.pk).state == "imported"
    assert len(lite.mdns()) == 3
    assert len(lite.archive.instances(T, uid)) == 3

    uid2, others = mails(keys, 2)
    lite.send(others[0])
    s2 = next(x for x in lite.sets() if x.study_uid == uid2)
    assert lite.inbound.discard_set(T, s2.pk).state == "discarded"
    with pytest.raises(ServerError) as err:
        lite.inbound.import_set(T, s2.pk, operator=True)
    assert err.value.kind is ErrorKind.CONFLICT
    assert lite.archive.instances(T, uid2) == []


def test_fragments_out_of_order_are_joined_and_imported(lite, keys):
    uid, [raw] = mails(keys, 1)
    fragments = partial.split(raw, 2000)
    assert len(fragments) >= 3
    for fragment in reversed(fragments):
        lite.send(fragment)
    assert len(lite.archive.instances(T, uid)) == 1
    [m] = lite.mdns()
    assert (m["original"], m["disposition"]) == (message_id(raw), "displayed")
    assert gw.stale_fragments(lite.engine, before=1e12) == []
    lite.send(fragments[0])  # a fragment again: nothing new
    assert len(lite.mdns()) == 1 and len(lite.archive.instances(T, uid)) == 1


# ---- refusals ------------------------------------------------------------------------------------------------
def _flip_ciphertext(raw: bytes) -> bytes:
    """Change one byte near the end of the encrypted data and armor it again (valid CRC): MDC mismatch."""
    start = raw.index(b"-----BEGIN PGP MESSAGE-----")
    end = raw.index(b"-----END PGP MESSAGE-----") + len(b"-----END PGP MESSAGE-----")
    kind, data = dearmor(raw[start:end])
    data = bytearray(data)
    data[-30] ^= 0x01
    again = armor(kind, bytes(data)).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n").rstrip(b"\r\n")
    return raw[:start] + again + raw[end:]


def _flip_armor_char(raw: bytes) -> bytes:
    """Change one base64 character inside the armored payload (the armor checksum no longer matches)."""
    start = raw.index(b"-----BEGIN PGP MESSAGE-----")
    pos = raw.index(b"\r\n\r\n", start) + 100
    return raw[:pos] + (b"A" if raw[pos:pos + 1] != b"A" else b"B") + raw[pos + 1:]


def _plain_dicom_mail(keys) -> bytes:
    """A DICOM file as a plain multipart/mixed attachment: no PGP/MIME."""
    uid, [(sop, dicom)] = study(1)
    body = base64.encodebytes(dicom).replace(b"\n", b"\r\n")
    return (f"From: {SENDER}\r\nTo: {OURS}\r\nDate: {format_datetime(datetime.now(timezone.utc))}\r\n"
            f"Disposition-Notification-To: {SENDER}\r\nX-TELEMEDICINE-SETID: s1\r\nX-TELEMEDICINE-SETPART: 1\r\n"
            f"X-TELEMEDICINE-SETTOTAL: 1\r\nMessage-ID: <{uuid.uuid4().hex}@site-a.example>\r\n"
            f"Subject: DICOM-eMail\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
            f"--b1\r\nContent-Type: application/dicom; name=\"{sop}.dcm\"\r\n"
            f"Content-Transfer-Encoding: base64\r\n\r\n").encode() + body + b"--b1--\r\n"


def _no_dicom(inner: bytes) -> bytes:
    return inner.replace(b"application/dicom", b"application/pdf").replace(b".dcm", b".pdf")


def _other_setpart(inner: bytes) -> bytes:
    return inner.replace(b"X-TELEMEDICINE-SETPART: 1\r\n", b"X-TELEMEDICINE-SETPART: 2\r\n")


REFUSALS = {
    "tampered": (lambda keys: _flip_ciphertext(mails(keys, 1)[1][0]), "tampered", "deleted"),
    "armor-checksum": (lambda keys: _flip_armor_char(mails(keys, 1)[1][0]), "malformed", "deleted"),
    "unknown-signer": (lambda keys: mails(keys, 1, signer="x")[1][0], "unknown-sender", "deleted"),
    "sender-not-in-directory": (lambda keys: mails(keys, 1, sender=STRANGER)[1][0], "unknown-sender",
                                "deleted/error"),
    "wrong-recipient-key": (lambda keys: mails(keys, 1, to_key="c")[1][0], "wrong-recipient-key", "deleted"),
    "not-encrypted": (_plain_dicom_mail, "not-encrypted", "deleted"),
    "not-dicom": (lambda keys: mails(keys, 1, mutate=_no_dicom)[1][0], "not-dicom", "deleted"),
    "set-headers-differ": (lambda keys: mails(keys, 2, mutate=_other_setpart)[1][0], "tampered", "deleted"),
    "study-uid-differs": (lambda keys: mails(keys, 1, study_uid="1.2.3.4")[1][0], "bad-set", "deleted"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_mails_are_quarantined_with_a_receipt(lite, keys, case):
    build, reason, disposition = REFUSALS[case]
    raw = build(keys)
    sender = read_outer(raw).sender
    lite.send(raw, sender=sender)
    [q] = lite.quarantined()
    assert (q.reason, q.sender, q.message_id) == (reason, sender, message_id(raw))
    assert q.message
    assert lite.blobs.path_of(q.raw_sha256).read_bytes().replace(b"\r\n", b"\n") == raw.replace(b"\r\n", b"\n")
    assert gw.inbound_state(lite.engine, T, message_id(raw)) == QUARANTINED
    assert lite.sets() == []
    [m] = lite.mdns()
    assert (m["original"], m["to"], m["disposition"], m["text"]) == (message_id(raw), sender, disposition, q.message)
    lite.send(raw, sender=sender)  # again: the same receipt, still one quarantine row
    assert [x["disposition"] for x in lite.mdns()] == [disposition, disposition]
    assert len(lite.quarantined()) == 1


def test_a_mail_for_none_of_our_sites_is_not_found(lite, keys):
    _, [raw] = mails(keys, 1)
    meta = Received(source=Source.POP3, id="box:1", size=len(raw), received_at=utcnow(), rcpt_tos=("x@y.example",))
    with pytest.raises(ServerError) as err:
        lite.inbound(raw, meta)
    assert err.value.kind is ErrorKind.NOT_FOUND
    lite.inbound.for_tenant(T)(raw, meta)  # a polled mailbox of the tenant
    assert len(lite.sets()) == 1


# ---- receipts for our outbound mails -------------------------------------------------------------------------
def test_an_mdn_acknowledges_our_outbound_mail(lite, keys):
    job = gw.create_job(lite.engine, T, gw.NewJob(study_uid="1.2.3", instances=["1.2.3.1"],
                                                  recipient_address=SENDER, sender_address=OURS, set_id="s-out"),
                        10.0)
    ours = f"<{uuid.uuid4().hex}@site-b.example>"
    [claimed] = gw.claim_mails(lite.engine, 10.0, limit=5, lease=60.0, message_id=lambda m, j: ours)
    gw.mark_sent(lite.engine, T, claimed.mail.pk, 11.0)
    original = build_instance_mail(make_instance(), sop_instance_uid="1.2.3.1", study_uid="1.2.3", set_id="s-out",
                                   set_part=1, set_total=1, sender=OURS, recipient=SENDER, mdn_to=OURS,
                                   encrypt=lambda d: encrypt_and_sign(d, [keys["a"].public()], keys["b"]),
                                   message_id=ours)
    receipt = build_mdn(read_outer(original), disposition=Disposition.DISPLAYED, reporting_ua="site-a gateway",
                        final_recipient=SENDER)
    lite.send(receipt)
    [mail] = gw.job_mails(lite.engine, T, job.job_id)
    assert (mail.state, mail.disposition) == ("acknowledged-ok", "displayed")
    assert gw.get_job(lite.engine, T, job.job_id).acknowledged == 1
    assert gw.inbound_state(lite.engine, T, message_id(receipt)) == "mdn"

    stray = build_mdn(read_outer(build_instance_mail(
        make_instance(), sop_instance_uid="1.2.3.9", study_uid="1.2.3", set_id="s-x", set_part=1, set_total=1,
        sender=OURS, recipient=SENDER, mdn_to=OURS,
        encrypt=lambda d: encrypt_and_sign(d, [keys["a"].public()], keys["b"]))),
        disposition=Disposition.ERROR, reporting_ua="site-a gateway", final_recipient=SENDER)
    lite.send(stray)
    assert gw.inbound_state(lite.engine, T, message_id(stray)) == "mdn-unknown"
    assert lite.mdns() == [] and lite.quarantined() == []  # receipts are never answered


# ---- warnings and storage failures ---------------------------------------------------------------------------
def test_an_instance_with_warnings_is_imported_with_a_warning_receipt(lite, keys):
    uid, [(sop, dicom)] = study(1)
    other = sop[:-1] + ("1" if sop[-1] != "1" else "2")
    dicom = dicom.replace(sop.encode(), other.encode(), 1)  # file meta (0002,0003) no longer matches
    raw = build_instance_mail(dicom, sop_instance_uid=sop, study_uid=uid, set_id="w", set_part=1, set_total=1,
                              sender=SENDER, recipient=OURS, mdn_to=SENDER,
                              encrypt=lambda d: encrypt_and_sign(d, [keys["b"].public()], keys["a"]))
    lite.send(raw)
    assert len(lite.archive.instances(T, uid)) == 1
    [m] = lite.mdns()
    assert m["disposition"] == "displayed/warning" and "sop-instance-mismatch" in m["text"]


def test_a_storage_failure_makes_the_peer_retry_and_the_retry_is_processed_once(lite, keys, monkeypatch):
    uid, [raw] = mails(keys, 1)
    real = gw.add_set_part
    calls = []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise ServerError(ErrorKind.INTERNAL, "database down")
        return real(*args, **kw)

    monkeypatch.setattr("server.gateway.inbound.gw.add_set_part", failing)
    with pytest.raises(smtplib.SMTPDataError) as err:
        lite.send(raw)
    assert err.value.smtp_code == 451
    assert lite.sets() == [] and lite.mdns() == []
    lite.send(raw)  # the peer's retry: same Message-ID, processed now
    assert len(lite.archive.instances(T, uid)) == 1
    assert [m["disposition"] for m in lite.mdns()] == ["displayed"]
    assert lite.quarantined() == []


def test_overlong_peer_values_never_reach_the_database(env, keys):
    long_id = f"<{'a' * 300}@site-a.example>"
    uid, [raw] = mails(keys, 1, message_id=long_id)
    env.send(raw)
    env.send(raw)  # deduplicated by content
    assert len(env.archive.instances(T, uid)) == 1
    assert env.mdns() == []  # a receipt the sender could not correlate is not kept
    _, [raw] = mails(keys, 1, set_id="s" * 150)
    env.send(raw)
    [q] = env.quarantined()
    assert q.reason == "bad-set"
    assert [m["disposition"] for m in env.mdns()] == ["deleted"]


def test_a_broken_receipt_is_quarantined_and_never_answered(lite):
    raw = (f"From: {SENDER}\r\nTo: {OURS}\r\nDisposition-Notification-To: {SENDER}\r\n"
           f"Message-ID: <{uuid.uuid4().hex}@site-a.example>\r\nSubject: MDN\r\nMIME-Version: 1.0\r\n"
           "Content-Type: multipart/report; report-type=disposition-notification; boundary=\"r\"\r\n\r\n"
           "--r\r\nContent-Type: message/disposition-notification\r\n\r\nReporting-UA: x\r\n--r--\r\n").encode()
    lite.send(raw)
    [q] = lite.quarantined()
    assert q.reason == "malformed" and "Disposition" in q.message
    assert lite.mdns() == []


# ---- directory keys kept per tenant and address (SQLite) -----------------------------------------------------
def test_sender_keys_are_kept_for_a_minute_per_tenant_but_an_unknown_sender_is_asked_again(lite, keys, monkeypatch):
    import server.gateway.inbound as inbound_module

    calls: list[tuple[str, str]] = []
    real = inbound_module.sender_keys

    def counting(fhir, tenant, address):
        calls.append((tenant, address))
        return real(fhir, tenant, address)

    monkeypatch.setattr(inbound_module, "sender_keys", counting)
    _, raws = mails(keys, 3)
    for raw in raws:
        lite.send(raw)
    assert [s.state for s in lite.sets()] == ["imported"] and len(calls) == 1  # one directory read for 3 mails

    # a sender without a directory key is refused, imported into the directory, and accepted with its next mail
    _, [first] = mails(keys, 1, sender=STRANGER, signer="c")
    lite.send(first, sender=STRANGER)
    assert [q.reason for q in lite.quarantined()] == ["unknown-sender"]
    armored = export_public_key(keys["c"].public()).decode("ascii")
    row = SiteRow(line=1, site_id="site-x", organization="Klinikum X", city="Kiel", telematik_id=None,
                  address=STRANGER, max_mail_size=None, drg_profile_version="1.7", public_key=armored, network=None)
    import_bundle(lite.inbound.fhir, T, {"resourceType": "Bundle", "type": "transaction",
                                         "entry": [{"resource": r} for r in site_resources(row, armored)]})
    _, [second] = mails(keys, 1, sender=STRANGER, signer="c")
    lite.send(second, sender=STRANGER)
    assert len(lite.quarantined()) == 1
    assert gw.inbound_state(lite.engine, T, message_id(second)) == STORED

    # never shared across tenants: another tenant's directory is asked (and has no key for the sender)
    assert lite.inbound.sender_keys("site-other", SENDER) == []
    assert calls[-1] == ("site-other", SENDER)

    # once the entry has expired the directory is read again
    n = len(calls)
    assert [k.fingerprint for k in lite.inbound.sender_keys(T, SENDER)] == [keys["a"].fingerprint]
    assert len(calls) == n
    monkeypatch.setattr(inbound_module, "SENDER_KEYS_TTL", 0.0)
    lite.inbound._keys.clear()
    for _ in range(2):
        assert [k.fingerprint for k in lite.inbound.sender_keys(T, SENDER)] == [keys["a"].fingerprint]
    assert calls[n:] == [(T, SENDER), (T, SENDER)]
