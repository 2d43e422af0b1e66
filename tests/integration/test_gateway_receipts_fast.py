"""Received receipts (MDNs) take the fast path: raw blob placed without a sync, inbound row and receipt in one
transaction; a broken receipt still gets a durable blob before its quarantine row; a redelivery changes nothing."""

from __future__ import annotations

import uuid

from server.crypto import encrypt_and_sign
from server.mail.drg import build_instance_mail, read_outer
from server.mail.mdn import Disposition, build_mdn
from server.store import gateway as gw
from tests.dicomdata import make_instance
from tests.integration.test_gateway_inbound import OURS, SENDER, T, keys, lite, message_id  # noqa: F401


def _syncs(lite, monkeypatch) -> list:
    calls: list = []
    real = lite.blobs.sync
    monkeypatch.setattr(lite.blobs, "sync", lambda digests: (calls.append(list(digests)), real(digests))[1])
    return calls


def test_a_receipt_is_recorded_without_a_blob_sync_and_once(lite, keys, monkeypatch):
    job = gw.create_job(lite.engine, T, gw.NewJob(study_uid="1.2.3", instances=["1.2.3.1"],
                                                  recipient_address=SENDER, sender_address=OURS, set_id="s-f"), 10.0)
    ours = f"<{uuid.uuid4().hex}@site-b.example>"
    [claimed] = gw.claim_mails(lite.engine, 10.0, limit=5, lease=60.0, message_id=lambda m, j: ours)
    gw.mark_sent(lite.engine, T, claimed.mail.pk, 11.0)
    original = build_instance_mail(make_instance(), sop_instance_uid="1.2.3.1", study_uid="1.2.3", set_id="s-f",
                                   set_part=1, set_total=1, sender=OURS, recipient=SENDER, mdn_to=OURS,
                                   encrypt=lambda d: encrypt_and_sign(d, [keys["a"].public()], keys["b"]),
                                   message_id=ours)
    receipt = build_mdn(read_outer(original), disposition=Disposition.DISPLAYED, reporting_ua="site-a gateway",
                        final_recipient=SENDER)
    syncs = _syncs(lite, monkeypatch)
    lite.send(receipt)
    assert syncs == []
    [mail] = gw.job_mails(lite.engine, T, job.job_id)
    assert (mail.state, mail.disposition) == ("acknowledged-ok", "displayed")
    assert gw.inbound_state(lite.engine, T, message_id(receipt)) == "mdn"
    lite.send(receipt)  # redelivered: the durable path, processed before, nothing changes
    assert gw.get_job(lite.engine, T, job.job_id).acknowledged == 1
    assert lite.mdns() == [] and lite.quarantined() == []


def test_a_broken_receipt_gets_a_durable_blob_before_its_quarantine(lite, monkeypatch):
    raw = (f"From: {SENDER}\r\nTo: {OURS}\r\nDisposition-Notification-To: {SENDER}\r\n"
           f"Message-ID: <{uuid.uuid4().hex}@site-a.example>\r\nSubject: MDN\r\nMIME-Version: 1.0\r\n"
           "Content-Type: multipart/report; report-type=disposition-notification; boundary=\"r\"\r\n\r\n"
           "--r\r\nContent-Type: message/disposition-notification\r\n\r\nReporting-UA: x\r\n--r--\r\n").encode()
    syncs = _syncs(lite, monkeypatch)
    lite.send(raw)
    [q] = lite.quarantined()
    assert q.reason == "malformed" and syncs == [[q.raw_sha256]]
    assert lite.blobs.path_of(q.raw_sha256).read_bytes().replace(b"\r\n", b"\n") == raw.replace(b"\r\n", b"\n")
