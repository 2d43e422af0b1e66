"""The gateway's durable store (server/store/gateway.py) on SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
import threading

import pytest
from sqlalchemy import func, select

from server.errors import ErrorKind, ServerError
from server.gateway.jobs import STATES_BY_FILTER, Backoff, JobFilter, JobState, Priority
from server.store import gateway as gw
from server.store.blobs import BlobStore
from server.store.db import make_engine
from server.store.gateway_models import OutboundMail, TransferJob
from server.store.migrate import upgrade

T, T2 = "site-a", "site-b"
POLICY = Backoff(base=10, factor=2, cap=100, jitter=0.0, max_attempts=3)
_ids = itertools.count(1)


def mid(mail, job) -> str:
    return f"<{job.set_id}.{mail.set_part}.{next(_ids)}@a.example>"


@pytest.fixture
def engine(database_url):
    e = make_engine(database_url)
    upgrade(e)
    yield e
    e.dispose()


def new_job(n=3, *, priority=0, study="1.2.3", job_id=None, **kw) -> gw.NewJob:
    return gw.NewJob(study_uid=study, instances=[f"{study}.{i}" for i in range(1, n + 1)],
                     recipient_address="dicom@b.example", sender_address="dicom@a.example",
                     set_id=f"set-{study}-{next(_ids)}", priority=priority, patient_name="Doe^Jane",
                     study_description="CT Kopf", study_date="20261123", job_id=job_id, **kw)


def claim(engine, now=100.0, limit=10, lease=60.0):
    return gw.claim_mails(engine, now, limit=limit, lease=lease, message_id=mid)


def send_all(engine, now=100.0):
    claimed = claim(engine, now, limit=1000)
    for c in claimed:
        gw.mark_sent(engine, c.mail.tenant, c.mail.pk, now)
    return claimed


# ---- jobs ----------------------------------------------------------------------------------------------------
def test_create_job_writes_job_and_mails_in_one_transaction(engine):
    hooked = []
    job = gw.create_job(engine, T, new_job(3, job_id="j1"), 10.0, also=lambda conn, j: hooked.append(j.job_id))
    assert hooked == ["j1"]
    assert (job.state, job.total, job.sent, job.acknowledged, job.failed) == ("waiting", 3, 0, 0, 0)
    mails = gw.job_mails(engine, T, "j1")
    assert [(m.set_part, m.sop_instance_uid, m.state) for m in mails] == [
        (1, "1.2.3.1", "queued"), (2, "1.2.3.2", "queued"), (3, "1.2.3.3", "queued")]

    def boom(conn, j):
        raise RuntimeError("task write failed")

    with pytest.raises(RuntimeError):
        gw.create_job(engine, T, new_job(2, job_id="j2"), 10.0, also=boom)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(TransferJob.__table__)).scalar_one() == 1
        assert conn.execute(select(func.count()).select_from(OutboundMail.__table__)).scalar_one() == 3
    with pytest.raises(ServerError) as e:
        gw.create_job(engine, T, new_job(1, job_id="j1"), 10.0)
    assert e.value.kind is ErrorKind.CONFLICT
    with pytest.raises(ServerError):
        gw.create_job(engine, T, new_job(0), 10.0)


def test_leasing_hands_each_mail_to_one_worker(database_url, engine):
    for k in range(4):
        gw.create_job(engine, T if k % 2 else T2, new_job(15, study=f"1.2.{k}"), 1.0 + k)
    engines = [make_engine(database_url) for _ in range(4)]
    got: list[list[int]] = [[] for _ in engines]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            while True:
                batch = gw.claim_mails(engines[k], 100.0, limit=3, lease=60.0, message_id=mid)
                if not batch:
                    return
                got[k].extend(c.mail.pk for c in batch)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(engines))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e in engines:
        e.dispose()
    assert not errors, errors
    everything = [pk for g in got for pk in g]
    assert len(everything) == len(set(everything)) == 60
    assert claim(engine, 150.0) == []  # leased until 160
    assert len(claim(engine, 161.0, limit=100)) == 60  # expired leases are taken again
    assert {gw.get_job(engine, T, j.job_id).state for j in gw.list_jobs(engine, T)[1]} == {"active"}


def test_emergency_jobs_overtake_and_waiting_becomes_active(engine):
    old = gw.create_job(engine, T, new_job(2, study="1.1"), 1.0)
    stat = gw.create_job(engine, T2, new_job(2, study="9.9", priority=Priority.STAT), 5.0)
    first = claim(engine, limit=3)
    assert [(c.job.job_id, c.mail.set_part) for c in first] == [
        (stat.job_id, 1), (stat.job_id, 2), (old.job_id, 1)]
    assert all(c.job.state == "active" and c.mail.attempts == 1 and c.mail.message_id for c in first)
    assert first[0].job.recipient_address == "dicom@b.example" and first[0].job.tenant == T2
    assert gw.get_job(engine, T2, stat.job_id).state == "active"
    assert gw.next_due(engine) == 1.0  # old job's part 2


def test_send_failure_backoff_and_dead_letter(engine):
    job = gw.create_job(engine, T, new_job(1), 1.0)
    [c] = claim(engine, 100.0)
    m = gw.mark_failed(engine, T, c.mail.pk, 100.0, "421 try later", retryable=True, policy=POLICY, rand=0.5)
    assert (m.state, m.run_after) == ("failed-retryable", 110.0)
    assert claim(engine, 109.0) == []
    [c2] = claim(engine, 110.0)
    assert c2.mail.attempts == 2 and c2.mail.message_id == c.mail.message_id  # a resend keeps its Message-ID
    m = gw.mark_failed(engine, T, c2.mail.pk, 110.0, "421", retryable=True, policy=POLICY, rand=0.5)
    assert (m.state, m.run_after) == ("failed-retryable", 130.0)
    [c3] = claim(engine, 130.0)
    m = gw.mark_failed(engine, T, c3.mail.pk, 130.0, "421 again", retryable=True, policy=POLICY, rand=0.5)
    assert m.state == "failed-final"
    j = gw.get_job(engine, T, job.job_id)
    assert j.state == "failed" and j.failed == 1 and "421 again" in j.error
    assert claim(engine, 10_000.0) == []  # failed jobs send nothing
    gw.create_job(engine, T, new_job(1, job_id="final"), 1.0)
    [c] = claim(engine, 100.0)
    m = gw.mark_failed(engine, T, c.mail.pk, 100.0, "550 no such user", retryable=False, policy=POLICY, rand=0.5)
    assert m.state == "failed-final" and gw.get_job(engine, T, "final").state == "failed"


def test_mdn_is_idempotent_and_counters_follow(engine):
    hooked: list[str] = []
    job = gw.create_job(engine, T, new_job(3), 1.0)
    claimed = send_all(engine)
    j = gw.get_job(engine, T, job.job_id)
    assert (j.state, j.sent, j.acknowledged) == ("active", 3, 0)
    ids = [c.mail.message_id for c in claimed]
    hook = lambda conn, j: hooked.append(j.state)  # noqa: E731
    assert gw.record_mdn(engine, T, ids[0], "ok", "displayed", 200.0, policy=POLICY, rand=0.5,
                         also=hook) == "recorded"
    assert gw.record_mdn(engine, T, ids[0], "ok", "displayed", 201.0, policy=POLICY, rand=0.5) == "duplicate"
    assert gw.record_mdn(engine, T, ids[0], "failed-final", "deleted", 202.0, policy=POLICY,
                         rand=0.5) == "duplicate"
    assert gw.record_mdn(engine, T2, ids[1], "ok", "displayed", 200.0, policy=POLICY, rand=0.5) == "unknown"
    assert gw.record_mdn(engine, T, "<nope@x>", "ok", "displayed", 200.0, policy=POLICY, rand=0.5) == "unknown"
    assert gw.record_mdn(engine, T, ids[1], "warning", "displayed/warning", 200.0, policy=POLICY,
                         rand=0.5) == "recorded"
    j = gw.get_job(engine, T, job.job_id)
    assert (j.state, j.sent, j.acknowledged, j.failed) == ("active", 3, 2, 0)
    # a refusal that allows a resend: backoff, then a new Message-ID
    assert gw.record_mdn(engine, T, ids[2], "failed-retry", "deleted/error", 300.0, policy=POLICY,
                         rand=0.5) == "recorded"
    m3 = gw.job_mails(engine, T, job.job_id)[2]
    assert (m3.state, m3.run_after) == ("failed-retryable", 310.0)
    assert gw.record_mdn(engine, T, ids[2], "failed-retry", "deleted/error", 301.0, policy=POLICY,
                         rand=0.5) == "duplicate"
    [c] = claim(engine, 310.0)
    assert c.mail.message_id != ids[2] and c.mail.disposition is None
    gw.mark_sent(engine, T, c.mail.pk, 311.0)
    assert gw.record_mdn(engine, T, c.mail.message_id, "ok", "displayed", 320.0, policy=POLICY,
                         rand=0.5, also=hook) == "recorded"
    j = gw.get_job(engine, T, job.job_id)
    assert (j.state, j.sent, j.acknowledged, j.failed, j.error) == ("finished", 3, 3, 0, None)
    assert hooked == ["finished"]
    states = [m.state for m in gw.job_mails(engine, T, job.job_id)]
    assert states == ["acknowledged-ok", "acknowledged-warning", "acknowledged-ok"]


def test_final_refusal_fails_the_job(engine):
    job = gw.create_job(engine, T, new_job(2), 1.0)
    claimed = send_all(engine)
    gw.record_mdn(engine, T, claimed[0].mail.message_id, "failed-final", "deleted", 200.0, policy=POLICY, rand=0)
    j = gw.get_job(engine, T, job.job_id)
    assert j.state == "failed" and j.failed == 1 and "receiver refused" in j.error


def test_receipt_timeout_resends_then_fails(engine):
    job = gw.create_job(engine, T, new_job(1), 1.0)
    [c] = send_all(engine, 100.0)
    assert gw.sweep_receipts(engine, 150.0, 100.0, POLICY) == 0
    assert gw.sweep_receipts(engine, 200.0, 100.0, POLICY) == 1
    m = gw.job_mails(engine, T, job.job_id)[0]
    assert m.state == "queued" and "no receipt" in m.last_error
    for now in (300.0, 500.0):
        [c2] = claim(engine, now)
        assert c2.mail.message_id == c.mail.message_id
        gw.mark_sent(engine, T, c2.mail.pk, now)
        assert gw.sweep_receipts(engine, now + 100.0, 100.0, POLICY) == 1
    m = gw.job_mails(engine, T, job.job_id)[0]
    assert (m.state, m.attempts) == ("failed-final", 3)
    assert gw.get_job(engine, T, job.job_id).state == "failed"
    # a late receipt for the resent Message-ID is still taken: every mail acknowledged, the job is finished
    assert gw.record_mdn(engine, T, c.mail.message_id, "ok", "displayed", 700.0, policy=POLICY,
                         rand=0) == "recorded"
    assert gw.get_job(engine, T, job.job_id).state == "finished"


def test_job_actions(engine):
    job = gw.create_job(engine, T, new_job(2, job_id="a"), 1.0)
    with pytest.raises(ServerError) as e:
        gw.job_action(engine, T, "a", "resume", 2.0)
    assert e.value.kind is ErrorKind.CONFLICT
    with pytest.raises(ServerError) as e:
        gw.job_action(engine, T, "a", "delete", 2.0)
    assert e.value.kind is ErrorKind.CONFLICT
    with pytest.raises(ServerError) as e:
        gw.job_action(engine, T2, "a", "pause", 2.0)
    assert e.value.kind is ErrorKind.NOT_FOUND
    seen = []
    assert gw.job_action(engine, T, "a", "pause", 2.0, also=lambda c, j: seen.append(j.state)).state == "paused"
    assert seen == ["paused"]
    assert claim(engine) == []  # paused jobs are not sent
    assert gw.job_action(engine, T, "a", "resume", 3.0).state == "waiting"
    [c1, c2] = claim(engine)
    gw.mark_sent(engine, T, c1.mail.pk, 100.0)
    assert gw.job_action(engine, T, "a", "abort", 4.0).state == "aborted"
    assert claim(engine, 1000.0) == []
    gw.mark_failed(engine, T, c2.mail.pk, 100.0, "boom", retryable=False, policy=POLICY, rand=0)
    assert gw.get_job(engine, T, "a").state == "aborted"  # the user's state holds
    retried = gw.job_action(engine, T, "a", "retry", 200.0)
    assert retried.state == "active" and retried.failed == 0
    [c] = claim(engine, 200.0)
    assert c.mail.set_part == 2 and c.mail.attempts == 1
    gw.mark_sent(engine, T, c.mail.pk, 201.0)
    for m in gw.job_mails(engine, T, "a"):
        gw.record_mdn(engine, T, m.message_id, "ok", "displayed", 300.0, policy=POLICY, rand=0)
    assert gw.get_job(engine, T, job.job_id).state == "finished"
    with pytest.raises(ServerError):
        gw.job_action(engine, T, "a", "pause", 301.0)
    assert gw.job_action(engine, T, "a", "delete", 302.0) is None
    with pytest.raises(ServerError) as e:
        gw.get_job(engine, T, "a")
    assert e.value.kind is ErrorKind.NOT_FOUND
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(OutboundMail.__table__)).scalar_one() == 0


def test_hook_runs_on_state_and_progress_steps_not_per_mail(engine):
    seen: list[tuple[str, str]] = []
    LONG = Backoff(base=10, factor=2, cap=100, jitter=0.0, max_attempts=8)  # noqa: N806

    def hook(conn, j):
        seen.append((j.state, gw.progress(gw.job_counts(conn, j.pk))))

    job = gw.create_job(engine, T, new_job(3), 1.0)
    c1, c2, c3 = gw.claim_mails(engine, 100.0, limit=10, lease=60.0, message_id=mid, also=hook)
    assert seen == [("active", gw.SENDING_MAILS)]
    gw.mark_sent(engine, T, c1.mail.pk, 101.0, also=hook)
    gw.mark_sent(engine, T, c2.mail.pk, 101.0, also=hook)
    assert len(seen) == 1  # one mail after the other: nothing to mirror
    gw.mark_failed(engine, T, c3.mail.pk, 102.0, "421", retryable=True, policy=LONG, rand=0.5, also=hook)
    assert seen[-1] == ("active", gw.RETRYING)
    [again] = gw.claim_mails(engine, 200.0, limit=10, lease=60.0, message_id=mid, also=hook)
    assert len(seen) == 2  # the job was active already
    gw.mark_sent(engine, T, again.mail.pk, 201.0, also=hook)
    assert seen[-1] == ("active", gw.ALL_SENT)
    for c in (c1, c2):
        gw.record_mdn(engine, T, c.mail.message_id, "ok", "displayed", 300.0, policy=LONG, rand=0, also=hook)
    assert len(seen) == 3  # receipts one by one while awaiting the rest: nothing
    gw.record_mdn(engine, T, again.mail.message_id, "failed-retry", "deleted/error", 301.0, policy=LONG,
                  rand=0.5, also=hook)
    assert seen[-1] == ("active", gw.RETRYING)
    [last] = gw.claim_mails(engine, 400.0, limit=10, lease=60.0, message_id=mid, also=hook)
    gw.mark_sent(engine, T, last.mail.pk, 401.0, also=hook)
    assert seen[-1] == ("active", gw.ALL_SENT)
    assert gw.sweep_receipts(engine, 1000.0, 100.0, LONG, also=hook) == 1  # no receipt: queued again
    assert seen[-1] == ("active", gw.SENDING_MAILS)
    [resent] = gw.claim_mails(engine, 1000.0, limit=10, lease=60.0, message_id=mid, also=hook)
    gw.mark_sent(engine, T, resent.mail.pk, 1001.0, also=hook)
    gw.record_mdn(engine, T, resent.mail.message_id, "ok", "displayed", 1002.0, policy=LONG, rand=0, also=hook)
    assert seen[-2:] == [("active", gw.ALL_SENT), ("finished", gw.SENDING_MAILS)]
    assert len(seen) == 8 and gw.get_job(engine, T, job.job_id).state == "finished"


def test_progress_of_mail_counts():
    from server.gateway.jobs import MailCounts

    assert gw.progress(MailCounts(total=3, queued=3)) == gw.SENDING_MAILS
    assert gw.progress(MailCounts(total=3, queued=1, sent=2)) == gw.SENDING_MAILS
    assert gw.progress(MailCounts(total=3, sent=1, acknowledged=2)) == gw.ALL_SENT
    assert gw.progress(MailCounts(total=3, sent=2, failed_retryable=1)) == gw.RETRYING
    assert gw.progress(MailCounts(total=3, acknowledged=3)) == gw.SENDING_MAILS  # done: the state says it


def test_job_list_filters_columns_and_paging(engine):
    for k in range(5):
        gw.create_job(engine, T, new_job(k + 1, job_id=f"j{k}"), float(k))
    gw.create_job(engine, T2, new_job(1, job_id="other"), 9.0)
    gw.job_action(engine, T, "j1", "pause", 10.0)
    gw.job_action(engine, T, "j2", "abort", 10.0)
    total, page = gw.list_jobs(engine, T, STATES_BY_FILTER[JobFilter.ALL], offset=0, limit=2)
    assert total == 5 and [j.job_id for j in page] == ["j4", "j3"]
    total, page = gw.list_jobs(engine, T, offset=4, limit=2)
    assert total == 5 and [j.job_id for j in page] == ["j0"]
    assert [j.job_id for j in gw.list_jobs(engine, T, STATES_BY_FILTER[JobFilter.PAUSED])[1]] == ["j1"]
    assert [j.job_id for j in gw.list_jobs(engine, T, STATES_BY_FILTER[JobFilter.FAILED])[1]] == ["j2"]
    assert gw.list_jobs(engine, T, STATES_BY_FILTER[JobFilter.WAITING])[0] == 3
    assert gw.list_jobs(engine, T, STATES_BY_FILTER[JobFilter.FINISHED])[0] == 0
    j = gw.list_jobs(engine, T, [JobState.WAITING])[1][0]
    assert (j.recipient_address, j.sender_address, j.total, j.patient_name, j.study_description,
            j.study_date, j.error) == ("dicom@b.example", "dicom@a.example", 5, "Doe^Jane", "CT Kopf",
                                       "20261123", None)


def test_tenant_isolation(engine):
    gw.create_job(engine, T, new_job(1, job_id="x"), 1.0)
    gw.create_job(engine, T2, new_job(1, job_id="x"), 1.0)  # same public id, other tenant
    with pytest.raises(ServerError):
        gw.job_action(engine, T2, "nope", "abort", 2.0)
    gw.job_action(engine, T2, "x", "abort", 2.0)
    assert gw.get_job(engine, T, "x").state == "waiting"
    [c] = claim(engine)
    assert c.job.tenant == T
    with pytest.raises(ServerError):
        gw.mark_sent(engine, T2, c.mail.pk, 3.0)
    assert gw.record_inbound(engine, T, "<m1@x>", "a@x", "ab" * 32, 10, 1.0) == "new"
    assert gw.record_inbound(engine, T2, "<m1@x>", "a@x", "ab" * 32, 10, 1.0) == "new"
    gw.quarantine(engine, T, "cd" * 32, "unsigned", 1.0)
    assert gw.quarantined(engine, T2) == (0, [])
    r = gw.add_set_part(engine, T, gw.NewPart("s", "a@x", 2, 1, "ef" * 32), 1.0)
    with pytest.raises(ServerError):
        gw.get_set(engine, T2, r.set.pk)
    assert gw.set_parts(engine, T2, r.set.pk) == []


# ---- receipts we owe -----------------------------------------------------------------------------------------
def test_mdn_queue(engine):
    gw.enqueue_mdn(engine, T, gw.NewMdn("a@x", "<m@x>", "{}"), 1.0)
    [q] = gw.claim_mdns(engine, 2.0, limit=5, lease=30.0)
    assert (q.tenant, q.attempts, q.run_after) == (T, 1, 32.0)
    assert gw.claim_mdns(engine, 3.0, limit=5, lease=30.0) == []
    gw.finish_mdn(engine, T, q.pk, state=gw.MDN_SENT)
    assert [m.state for m in gw.mdns(engine, T)] == ["sent"] and gw.mdns(engine, T2) == []


# ---- inbound -------------------------------------------------------------------------------------------------
def test_inbound_dedup_by_message_id(engine, tmp_path):
    blobs = BlobStore(tmp_path / "data", fsync=False)
    digest = gw.store_blob(blobs, b"raw mail")
    assert blobs.path_of(digest).read_bytes() == b"raw mail"
    mdn = gw.NewMdn("a@x", "<m1@x>", "{}")
    assert gw.record_inbound(engine, T, "<m1@x>", "a@x", digest, 8, 1.0) == "new"
    assert gw.inbound_state(engine, T, "<m1@x>") == "received"
    gw.set_inbound_state(engine, T, "<m1@x>", "imported")
    assert gw.record_inbound(engine, T, "<m1@x>", "a@x", digest, 8, 2.0, mdn=mdn) == "duplicate"
    assert gw.inbound_state(engine, T, "<m1@x>") == "imported"
    assert [m.original_message_id for m in gw.mdns(engine, T)] == ["<m1@x>"]  # re-acknowledged
    assert gw.inbound_state(engine, T, "<m2@x>") is None
    with pytest.raises(ServerError):
        gw.set_inbound_state(engine, T2, "<m1@x>", "imported")


def test_fragments_out_of_order(engine):
    assert gw.add_fragment(engine, T, "p1", 3, 3, "03" * 32, 1.0) is None
    assert gw.add_fragment(engine, T, "p1", 1, None, "01" * 32, 2.0) is None
    assert gw.add_fragment(engine, T, "p1", 1, None, "01" * 32, 2.5) is None  # repeated
    assert gw.add_fragment(engine, T2, "p1", 2, None, "99" * 32, 2.5) is None  # other tenant
    assert gw.add_fragment(engine, T, "p1", 2, None, "02" * 32, 3.0) == ["01" * 32, "02" * 32, "03" * 32]
    assert gw.stale_fragments(engine, 10.0) == [(T, "p1"), (T2, "p1")]
    assert gw.drop_fragments(engine, T, "p1") == 3
    assert gw.stale_fragments(engine, 10.0) == [(T2, "p1")]
    with pytest.raises(ServerError):
        gw.add_fragment(engine, T, "p2", 4, 3, "04" * 32, 1.0)
    gw.add_fragment(engine, T, "p3", 2, 2, "02" * 32, 1.0)
    with pytest.raises(ServerError):
        gw.add_fragment(engine, T, "p3", 1, 3, "01" * 32, 1.0)


def test_set_parts_duplicated_and_out_of_order(engine):
    part = lambda n, **kw: gw.NewPart(set_id="S1", sender="a@x", total=3, set_part=n,  # noqa: E731
                                      blob_sha256=f"{n:02d}" * 32, sop_instance_uid=f"1.2.{n}", study_uid="1.2",
                                      message_id=f"<{n}@x>", **kw)
    mdn = lambda n: gw.NewMdn("a@x", f"<{n}@x>", "{}")  # noqa: E731
    r = gw.add_set_part(engine, T, part(3), 1.0, mdn=mdn(3))
    assert (r.set.state, r.set.parts_seen, r.duplicate) == ("collecting", 1, False)
    r = gw.add_set_part(engine, T, part(1), 2.0, mdn=mdn(1))
    r = gw.add_set_part(engine, T, part(3), 3.0, mdn=mdn(3))
    assert (r.set.state, r.set.parts_seen, r.duplicate) == ("collecting", 2, True)
    with pytest.raises(ServerError) as e:
        gw.add_set_part(engine, T, gw.NewPart("S1", "a@x", 4, 2, "00" * 32), 3.0)
    assert e.value.kind is ErrorKind.INVALID
    with pytest.raises(ServerError):
        gw.add_set_part(engine, T, gw.NewPart("S1", "a@x", 3, 4, "00" * 32), 3.0)
    other = gw.add_set_part(engine, T, gw.NewPart("S1", "b@x", 3, 1, "00" * 32), 3.0)  # other sender
    assert other.set.pk != r.set.pk
    with pytest.raises(ServerError) as e:
        gw.mark_set_imported(engine, T, r.set.pk, 4.0)
    assert e.value.kind is ErrorKind.CONFLICT
    r = gw.add_set_part(engine, T, part(2), 4.0, mdn=mdn(2))
    assert (r.set.state, r.set.parts_seen, r.set.study_uid) == ("complete", 3, "1.2")
    assert [p.set_part for p in gw.set_parts(engine, T, r.set.pk)] == [1, 2, 3]
    assert [m.original_message_id for m in gw.mdns(engine, T)] == ["<3@x>", "<1@x>", "<3@x>", "<2@x>"]
    assert gw.mark_set_imported(engine, T, r.set.pk, 5.0).state == "imported"
    assert gw.add_set_part(engine, T, part(2), 6.0).duplicate
    assert gw.get_set(engine, T, r.set.pk).state == "imported"
    with pytest.raises(ServerError):
        gw.discard_set(engine, T, r.set.pk, 7.0)


def test_incomplete_sets_reported_once_then_operator_decides(engine):
    a = gw.add_set_part(engine, T, gw.NewPart("A", "a@x", 2, 1, "01" * 32), 10.0).set
    b = gw.add_set_part(engine, T2, gw.NewPart("B", "a@x", 2, 2, "02" * 32), 20.0).set
    gw.add_set_part(engine, T, gw.NewPart("C", "a@x", 1, 1, "03" * 32), 5.0)  # complete, never reported
    assert [s.set_id for s in gw.incomplete_sets(engine, T, 15.0)] == ["A"]
    reported = gw.report_incomplete(engine, 15.0, 100.0)
    assert [(s.tenant, s.set_id, s.state) for s in reported] == [(T, "A", "reported-incomplete")]
    assert gw.report_incomplete(engine, 15.0, 101.0) == []  # once
    assert [s.set_id for s in gw.report_incomplete(engine, 30.0, 102.0)] == ["B"]
    assert [s.set_id for s in gw.incomplete_sets(engine, T, 15.0)] == ["A"]
    assert gw.list_sets(engine, T, ["reported-incomplete"])[0] == 1
    with pytest.raises(ServerError):
        gw.mark_set_imported(engine, T, a.pk, 103.0)
    assert gw.mark_set_imported(engine, T, a.pk, 103.0, operator=True).state == "imported"
    assert gw.discard_set(engine, T2, b.pk, 104.0).state == "discarded"
    # the missing part arriving after all changes nothing
    r = gw.add_set_part(engine, T2, gw.NewPart("B", "a@x", 2, 1, "01" * 32), 105.0)
    assert r.set.state == "discarded"


def test_quarantine(engine):
    for k in range(3):
        gw.quarantine(engine, T, f"{k:02d}" * 32, "unsigned", float(k), message="no signature", sender="a@x",
                      message_id=f"<{k}@x>")
    total, page = gw.quarantined(engine, T, limit=2)
    assert total == 3 and [q.message_id for q in page] == ["<2@x>", "<1@x>"]
    assert page[0].reason == "unsigned" and page[0].raw_sha256 == "02" * 32


def test_migration_down_and_up(engine):
    from alembic import command

    from server.store.migrate import alembic_config
    command.downgrade(alembic_config(engine), "0005")
    with engine.connect() as conn:
        names = set(conn.dialect.get_table_names(conn))
    assert not names & {"transfer_job", "outbound_mail", "inbound_set", "quarantine", "outbound_mdn"}
    upgrade(engine)
    assert gw.create_job(engine, T, new_job(1), 1.0).state == "waiting"


def test_release_leases_after_a_crash_makes_leased_mails_and_receipts_due_at_once(engine):
    job = gw.create_job(engine, T, new_job(2), 1.0)
    [c1, c2] = claim(engine, 100.0, lease=600.0)  # the process dies while sending
    gw.mark_sent(engine, T, c2.mail.pk, 101.0)
    gw.enqueue_mdn(engine, T, gw.NewMdn("x@b.example", "<m@b>", "{}"), 100.0)
    gw.claim_mdns(engine, 100.0, limit=5, lease=600.0)
    assert claim(engine, 200.0) == [] and gw.claim_mdns(engine, 200.0, limit=5, lease=60.0) == []
    assert gw.release_leases(engine, 200.0) == (1, 1)
    [again] = claim(engine, 200.0)
    assert again.mail.pk == c1.mail.pk and again.mail.message_id == c1.mail.message_id  # same Message-ID
    assert [m.original_message_id for m in gw.claim_mdns(engine, 200.0, limit=5, lease=60.0)] == ["<m@b>"]
    assert gw.job_mails(engine, T, job.job_id)[1].state == "sent"  # sent mails keep waiting for their receipt
