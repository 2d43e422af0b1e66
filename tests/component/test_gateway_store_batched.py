"""Batched bookkeeping of the gateway store: ``mark_sent_many`` (one transaction per sender round) and
``record_receipt`` (a received MDN's inbound row and its effect in one transaction), SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from server.gateway.jobs import Backoff
from server.store import gateway as gw
from server.store.db import make_engine
from server.store.gateway_models import InboundMail
from server.store.migrate import upgrade
from tests.component.test_gateway_store import T, T2, mid, new_job

POLICY = Backoff(base=10, factor=2, cap=100, jitter=0.0, max_attempts=3)


@pytest.fixture
def engine(database_url):
    e = make_engine(database_url)
    upgrade(e)
    yield e
    e.dispose()


def _view(engine, tenant, job_id):
    job = gw.get_job(engine, tenant, job_id)
    mails = [(m.state, m.sent_at, m.size, m.lease_until) for m in gw.job_mails(engine, tenant, job_id)]
    return (job.state, job.sent, job.acknowledged, job.failed), mails


def test_mark_sent_many_equals_mark_sent_one_by_one(engine):
    one = [gw.create_job(engine, T, new_job(3, study=f"1.{i}", job_id=f"one{i}"), 1.0) for i in range(2)]
    many = [gw.create_job(engine, T, new_job(3, study=f"2.{i}", job_id=f"many{i}"), 1.0) for i in range(2)]
    claimed = gw.claim_mails(engine, 100.0, limit=100, lease=60.0, message_id=mid)
    by_job = {c.job.job_id: c for c in claimed if c.mail.set_part != 3}  # part 3 stays leased
    singles = [c for c in claimed if c.job.job_id.startswith("one") and c.mail.set_part != 3]
    batch = [c for c in claimed if c.job.job_id.startswith("many") and c.mail.set_part != 3]
    assert by_job and len(singles) == len(batch) == 4
    for c in singles:
        gw.mark_sent(engine, T, c.mail.pk, 101.0, size=c.mail.set_part * 10)
    seen = []
    gone = gw.mark_sent_many(engine, [(T, c.mail.pk, c.mail.set_part * 10) for c in reversed(batch)], 101.0,
                             also=lambda conn, j: seen.append(j.job_id))
    assert gone == []
    for a, b in zip(one, many):
        assert _view(engine, T, a.job_id) == _view(engine, T, b.job_id)
    assert seen == []  # active before and after, still sending: nothing to mirror
    rest = [c for c in claimed if c.job.job_id.startswith("many") and c.mail.set_part == 3]
    gone = gw.mark_sent_many(engine, [(T, c.mail.pk, None) for c in rest] + [(T2, rest[0].mail.pk, 1), (T, 10**9, 1)],
                             102.0, also=lambda conn, j: seen.append((j.job_id, j.sent)))
    assert gone == [rest[0].mail.pk, 10**9]  # another tenant's pk and a deleted mail are skipped
    assert sorted(seen) == [("many0", 3), ("many1", 3)]  # all sent: one mirror step per job


def test_mark_sent_many_after_the_receipt_overtook_it(engine):
    job = gw.create_job(engine, T, new_job(1, job_id="o"), 1.0)
    [c] = gw.claim_mails(engine, 100.0, limit=10, lease=60.0, message_id=mid)
    assert gw.record_mdn(engine, T, c.mail.message_id, "ok", "displayed", 100.5, policy=POLICY, rand=0) == "recorded"
    assert gw.mark_sent_many(engine, [(T, c.mail.pk, 77)], 101.0) == []
    [mail] = gw.job_mails(engine, T, job.job_id)
    assert (mail.state, mail.sent_at, mail.size) == ("acknowledged-ok", 100.5, 77)
    assert gw.get_job(engine, T, job.job_id).state == "finished"


def test_record_receipt_records_row_and_receipt_once(engine):
    job = gw.create_job(engine, T, new_job(2, job_id="r"), 1.0)
    c1, c2 = gw.claim_mails(engine, 100.0, limit=10, lease=60.0, message_id=mid)
    gw.mark_sent_many(engine, [(T, c1.mail.pk, 1), (T, c2.mail.pk, 1)], 101.0)
    args = dict(policy=POLICY, rand=0)
    assert gw.record_receipt(engine, T, "<m1@b>", "dicom@b.example", "ab" * 32, 10, c1.mail.message_id, "ok",
                             "displayed", 200.0, **args) == gw.RECORDED
    # the same receipt again: nothing changes, the caller takes the redelivery path
    assert gw.record_receipt(engine, T, "<m1@b>", "dicom@b.example", "ab" * 32, 10, c2.mail.message_id, "ok",
                             "displayed", 201.0, **args) is None
    assert gw.record_receipt(engine, T, "<m2@b>", None, "cd" * 32, 10, "<nope@x>", "ok", "displayed", 202.0,
                             **args) == gw.UNKNOWN
    assert gw.record_receipt(engine, T, "<m3@b>", None, "cd" * 32, 10, c1.mail.message_id, "ok", "displayed",
                             203.0, **args) == gw.DUPLICATE
    assert gw.inbound_state(engine, T, "<m1@b>") == gw.INBOUND_MDN
    assert gw.inbound_state(engine, T, "<m2@b>") == gw.INBOUND_MDN_UNKNOWN
    assert gw.inbound_state(engine, T, "<m3@b>") == gw.INBOUND_MDN
    assert [m.state for m in gw.job_mails(engine, T, job.job_id)] == ["acknowledged-ok", "sent"]
    assert gw.get_job(engine, T, job.job_id).acknowledged == 1
    with engine.connect() as conn:
        row = conn.execute(select(InboundMail.__table__).where(InboundMail.__table__.c.message_id == "<m1@b>")).one()
    assert (row.tenant, row.sender, row.raw_sha256, row.size, row.received_at) == (
        T, "dicom@b.example", "ab" * 32, 10, 200.0)
