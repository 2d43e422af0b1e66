"""Durability of a received instance mail with one sync: the raw mail blob is placed without a sync and made
durable together with the decrypted DICOM blob before the ``add_set_part`` commit (or before the quarantine
commit of a refused mail); a crash before that loses nothing the peer does not send again."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest

from server.errors import ErrorKind, ServerError
from server.mail.transport import Received, Source
from server.store import gateway as gw
from server.store.blobs import BlobStore
from tests.integration.test_gateway_inbound import OURS, SENDER, T, keys, lite, mails, message_id  # noqa: F401

pytestmark = pytest.mark.usefixtures("lite")


def deliver(env, raw: bytes) -> None:
    """The sink called as the SMTP ingress calls it (returning means: answer 250)."""
    env.inbound(raw, Received(source=list(Source)[0], id="test", size=len(raw),
                              received_at=dt.datetime.now(dt.timezone.utc), mail_from=SENDER, rcpt_tos=(OURS,)))


@pytest.fixture
def events(lite, monkeypatch):
    """The order of blob syncs and of the commits that depend on them."""
    log: list = []
    real_sync = BlobStore.sync

    def sync(self, digests):
        log.append(("sync", sorted(digests)))
        return real_sync(self, digests)

    monkeypatch.setattr(BlobStore, "sync", sync)
    for name in ("add_set_part", "quarantine"):
        real = getattr(gw, name)

        def wrapped(*args, _real=real, _name=name, **kw):
            log.append((_name,))
            return _real(*args, **kw)

        monkeypatch.setattr(f"server.gateway.inbound.gw.{name}", wrapped)
    return log


def test_an_instance_mail_takes_one_sync_of_both_blobs_before_its_part_is_recorded(lite, keys, events):
    uid, [raw] = mails(keys, 1)
    deliver(lite, raw)
    [part] = gw.set_parts(lite.engine, T, lite.sets()[0].pk)
    raw_sha = hashlib.sha256(raw).hexdigest()
    assert events[:2] == [("sync", sorted([raw_sha, part.blob_sha256])), ("add_set_part",)]
    assert [e for e in events if e[0] == "sync"] == [events[0]]  # nothing else synced (the set import neither)
    assert len(lite.archive.instances(T, uid)) == 1


def test_a_refused_instance_mail_has_its_raw_blob_synced_before_the_quarantine_row(lite, keys, events):
    raw = mails(keys, 1, signer="x")[1][0]  # signed by an impostor: quarantined
    deliver(lite, raw)
    raw_sha = hashlib.sha256(raw).hexdigest()
    assert events == [("sync", [raw_sha]), ("quarantine",)]
    [q] = lite.quarantined()
    assert lite.blobs.path_of(q.raw_sha256).read_bytes() == raw


def test_a_crash_before_the_sync_loses_unsynced_blobs_and_the_redelivery_is_processed(lite, keys, monkeypatch):
    uid, [raw] = mails(keys, 1)
    raw_sha = hashlib.sha256(raw).hexdigest()
    real_sync = BlobStore.sync
    lost: list = []

    def crash(self, digests):  # power failure just before the sync: the placed blobs are lost or truncated
        lost.extend(digests)
        self.path_of(raw_sha).write_bytes(b"")
        for d in digests:
            if d != raw_sha:
                self.path_of(d).unlink()
        raise ServerError(ErrorKind.INTERNAL, "crash")

    monkeypatch.setattr(BlobStore, "sync", crash)
    with pytest.raises(ServerError):
        deliver(lite, raw)  # never acknowledged: the peer sends again
    assert raw_sha in lost and len(lost) == 2
    assert gw.inbound_state(lite.engine, T, message_id(raw)) is not None  # record_inbound committed before
    assert lite.sets() == []
    monkeypatch.setattr(BlobStore, "sync", real_sync)
    deliver(lite, raw)  # the redelivery: same Message-ID, same content addresses, written again
    assert lite.blobs.path_of(raw_sha).read_bytes() == raw
    [s] = lite.sets()
    assert s.state == "imported"
    [part] = gw.set_parts(lite.engine, T, s.pk)
    assert hashlib.sha256(lite.blobs.path_of(part.blob_sha256).read_bytes()).hexdigest() == part.blob_sha256
    assert len(lite.archive.instances(T, uid)) == 1
    assert [m["disposition"] for m in lite.mdns()] == ["displayed"]


def test_place_replaces_a_truncated_blob_and_keeps_a_whole_one(tmp_path):
    blobs = BlobStore(tmp_path)
    digest = blobs.put(b"x" * 100, durable=False)
    blobs.path_of(digest).write_bytes(b"x" * 10)  # what a crash can leave of an unsynced blob
    assert blobs.put(b"x" * 100) == digest
    assert blobs.path_of(digest).read_bytes() == b"x" * 100
    inode = blobs.path_of(digest).stat().st_ino
    assert blobs.put(b"x" * 100) == digest and blobs.path_of(digest).stat().st_ino == inode
