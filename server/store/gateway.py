"""All SQL of the DICOM e-mail gateway: transfer jobs and their mail queue, receipts, inbound sets, quarantine.

Outbound: a job and all of its ``outbound_mail`` rows are written in one transaction; sender workers lease
due mails across tenants (``claim_mails``: PostgreSQL ``FOR UPDATE SKIP LOCKED``, SQLite under the writer
lock), emergency jobs first, never mails of paused, aborted, failed or finished jobs. Every change of a mail
recomputes its job's counters and state (``server.gateway.jobs.job_state``) in the same transaction, and the
optional ``also`` hook (e.g. the FHIR Task mirror) runs there too. An MDN is correlated by
Original-Message-ID and recorded once. Inbound: raw mails dedup by Message-ID, fragments by id, set parts by
(set, part). Every statement filters on the tenant, except the workers' leases and sweeps, which hand back
each row's tenant. Bytes live in the blob store (``store_blob``), never in SQL.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from server.errors import ErrorKind, ServerError, invalid, not_found
from server.gateway.jobs import (DUE, SENDING, Action, Backoff, JobState, MailCounts, MailState,
                                 after_send_failure, job_state, mail_state_for, state_after_action)
from server.mail.mdn import Outcome
from server.store.blobs import BlobStore
from server.store.db import writer
from server.store.gateway_models import (InboundFragment, InboundMail, InboundPart, InboundSet, OutboundMail,
                                         OutboundMdn, Quarantine, TransferJob)

J = TransferJob.__table__
M = OutboundMail.__table__
N = OutboundMdn.__table__
IM = InboundMail.__table__
FR = InboundFragment.__table__
ST = InboundSet.__table__
PT = InboundPart.__table__
Q = Quarantine.__table__

# inbound set states
COLLECTING, COMPLETE, IMPORTED, REPORTED, DISCARDED = (
    "collecting", "complete", "imported", "reported-incomplete", "discarded")
# outbound MDN states
MDN_PENDING, MDN_SENT, MDN_DEAD = "pending", "sent", "dead"
# results
NEW, DUPLICATE, UNKNOWN, RECORDED = "new", "duplicate", "unknown", "recorded"
# inbound_mail states of received receipts
INBOUND_MDN, INBOUND_MDN_UNKNOWN = "mdn", "mdn-unknown"
JOB_TRANSFER, JOB_MESSAGE = "transfer", "message"  # transfer_job.kind


# ---- values --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NewJob:
    """What the caller knows of a transfer before it is queued."""

    study_uid: str
    instances: Sequence[str]  # SOP Instance UIDs in send order: set parts 1..N
    recipient_address: str
    sender_address: str
    set_id: str
    priority: int = 0
    selection: str | None = None  # JSON of the series/instance selection, None = whole study
    recipient_endpoint: str | None = None
    recipient_fingerprint: str | None = None
    max_mail_size: int | None = None
    patient_name: str | None = None
    study_description: str | None = None
    study_date: str | None = None
    task_id: str | None = None
    job_id: str | None = None  # public id; generated when absent
    order_ref: str | None = None  # an order's job (server.gateway.orders): "ServiceRequest/<id>"
    order_task: str | None = None  # the order's Task id
    send_options: str | None = None  # send-option codes, comma-separated
    note: str | None = None  # short-note text sent in every mail
    order_json: str | None = None  # the order.json part sent in every mail
    deid_secret: str | None = None  # anonymised: the per-job secret (hex), never sent
    deid_options: str | None = None  # anonymised: the Annex E options (JSON)
    report_blob: str | None = None  # with-report: blob of the Encapsulated PDF made from a DiagnosticReport
    kind: str = "transfer"  # JOB_TRANSFER, or JOB_MESSAGE: one mail with ``order_json`` and no DICOM


@dataclass(frozen=True)
class Job:
    """A transfer job row (the job list's columns included)."""

    pk: int
    tenant: str
    job_id: str
    state: str
    priority: int
    study_uid: str
    selection: str | None
    recipient_endpoint: str | None
    recipient_address: str
    recipient_fingerprint: str | None
    max_mail_size: int | None
    sender_address: str
    set_id: str
    total: int
    sent: int
    acknowledged: int
    failed: int
    patient_name: str | None
    study_description: str | None
    study_date: str | None
    error: str | None
    task_id: str | None
    created: float
    updated: float
    order_ref: str | None = None
    order_task: str | None = None
    send_options: str | None = None
    note: str | None = None
    order_json: str | None = None
    deid_secret: str | None = None
    deid_options: str | None = None
    report_blob: str | None = None
    kind: str = "transfer"

    @property
    def is_message(self) -> bool:
        """A workflow message (one mail carrying ``order_json``), not a transfer of DICOM instances."""
        return self.kind == JOB_MESSAGE

    @property
    def options(self) -> frozenset[str]:
        """The send-option codes of an order's job (empty for a plain transfer)."""
        return frozenset(o for o in (self.send_options or "").split(",") if o)


@dataclass(frozen=True)
class Mail:
    """An outbound instance mail row."""

    pk: int
    tenant: str
    job_pk: int
    set_part: int
    sop_instance_uid: str
    message_id: str | None
    state: str
    attempts: int
    run_after: float
    lease_until: float | None
    sent_at: float | None
    acknowledged_at: float | None
    disposition: str | None
    last_error: str | None
    size: int | None = None  # bytes of the DICOM instance, once sent


@dataclass(frozen=True)
class ClaimedMail:
    """A leased mail with its job (recipient, key, set headers): all a sender needs."""

    mail: Mail
    job: Job


@dataclass(frozen=True)
class QueuedMdn:
    """A receipt we owe."""

    pk: int
    tenant: str
    to_address: str
    original_message_id: str
    params: str
    state: str
    attempts: int
    run_after: float
    last_error: str | None


@dataclass(frozen=True)
class NewMdn:
    """A receipt to queue (in the transaction that stored the instance)."""

    to_address: str
    original_message_id: str
    params: str  # JSON for the MDN builder


@dataclass(frozen=True)
class NewPart:
    """A verified, decrypted instance of a DRG set (its bytes already in the blob store)."""

    set_id: str
    sender: str
    total: int
    set_part: int
    blob_sha256: str
    sop_instance_uid: str | None = None
    study_uid: str | None = None
    message_id: str | None = None
    size: int | None = None  # bytes of the DICOM instance
    order_json: str | None = None  # the order.json part (a FHIR ServiceRequest) that travelled with it
    note: str | None = None  # its text/plain note part
    emergency: bool = False  # flagged as emergency (DRG priority header)


@dataclass(frozen=True)
class SetRow:
    """An inbound set row."""

    pk: int
    tenant: str
    set_id: str
    sender: str
    study_uid: str | None
    total: int
    parts_seen: int
    state: str
    first_seen: float
    last_seen: float
    order_json: str | None = None
    note: str | None = None
    emergency: bool | None = None
    consult_task: str | None = None  # the consult Task created for the set at this (the receiving) site


@dataclass(frozen=True)
class PartResult:
    """The set after a part arrived, and whether the part was a duplicate."""

    set: SetRow
    duplicate: bool


@dataclass(frozen=True)
class Part:
    """An inbound part row."""

    set_part: int
    sop_instance_uid: str | None
    blob_sha256: str
    message_id: str | None


@dataclass(frozen=True)
class Quarantined:
    """A quarantine row."""

    pk: int
    tenant: str
    raw_sha256: str
    reason: str
    message: str | None
    sender: str | None
    message_id: str | None
    created: float


#: Runs in the transaction that changed a job's state (e.g. to mirror it on the FHIR Task).
JobHook = Callable[[Connection, Job], None]


def _make(cls, row):
    m = row._mapping
    return cls(**{f.name: m[f.name] for f in dataclasses.fields(cls)})


def _job(row) -> Job:
    return _make(Job, row)


def _mail(row) -> Mail:
    return _make(Mail, row)


# ---- blobs ---------------------------------------------------------------------------------------------------
def store_blob(blobs: BlobStore, data: bytes) -> str:
    """Write ``data`` durably to the blob store; returns its sha256 (content address)."""
    return blobs.put(data)


# ---- jobs ----------------------------------------------------------------------------------------------------
def create_job(engine: Engine, tenant: str, new: NewJob, now: float, also: JobHook | None = None) -> Job:
    """Queue a job with one mail per instance (parts 1..N) in one transaction; ``also`` runs in it too."""
    with writer(engine).begin() as conn:
        return create_job_in(conn, tenant, new, now, also)


def create_job_in(conn: Connection, tenant: str, new: NewJob, now: float, also: JobHook | None = None) -> Job:
    """``create_job`` inside the caller's transaction (e.g. the FHIR write of the order that causes it). A message
    job (``kind`` JOB_MESSAGE) has no instances and one mail (part 1 of 1, no SOP Instance UID) for ``order_json``."""
    if new.kind == JOB_MESSAGE:
        if new.instances or not new.order_json:
            raise invalid("a message job carries its order_json and no instances")
        new = dataclasses.replace(new, instances=("",))
    elif not new.instances:
        raise invalid("a transfer job needs at least one instance")
    job_id = new.job_id or uuid.uuid4().hex
    values = {f.name: getattr(new, f.name) for f in dataclasses.fields(NewJob)
              if f.name not in ("instances", "job_id")}
    try:
        with conn.begin_nested():
            pk = conn.execute(insert(J).values(
                tenant=tenant, job_id=job_id, state=JobState.WAITING.value, total=len(new.instances), sent=0,
                acknowledged=0, failed=0, error=None, created=now, updated=now, **values)).inserted_primary_key[0]
    except IntegrityError as exc:
        raise ServerError(ErrorKind.CONFLICT, f"transfer job {job_id} exists") from exc
    conn.execute(insert(M), [
        {"tenant": tenant, "job_pk": pk, "set_part": i, "sop_instance_uid": uid, "message_id": None,
         "state": MailState.QUEUED.value, "attempts": 0, "run_after": now}
        for i, uid in enumerate(new.instances, start=1)])
    job = _job(conn.execute(select(J).where(J.c.pk == pk)).one())
    if also is not None:
        also(conn, job)
    return job


def _job_row(conn: Connection, tenant: str, job_id: str, *, lock: bool = False) -> Job:
    stmt = select(J).where(J.c.tenant == tenant, J.c.job_id == job_id)
    if lock and conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    row = conn.execute(stmt).first()
    if row is None:
        raise not_found(f"no transfer job {job_id}")
    return _job(row)


def get_job(engine: Engine, tenant: str, job_id: str) -> Job:
    """One job of the tenant (NOT_FOUND otherwise)."""
    with engine.connect() as conn:
        return _job_row(conn, tenant, job_id)


def job_mails(engine: Engine, tenant: str, job_id: str) -> list[Mail]:
    """The mails of a job in set-part order."""
    with engine.connect() as conn:
        job = _job_row(conn, tenant, job_id)
        rows = conn.execute(select(M).where(M.c.tenant == tenant, M.c.job_pk == job.pk)
                            .order_by(M.c.set_part)).all()
    return [_mail(r) for r in rows]


def order_jobs(conn: Connection | Engine, tenant: str, order_ref: str, recipient_address: str | None = None) -> list[Job]:
    """The jobs (transfers and messages) an order (``ServiceRequest/<id>``) caused, to ``recipient_address`` when
    given (any case), oldest first."""
    cond = [J.c.tenant == tenant, J.c.order_ref == order_ref]
    if recipient_address is not None:
        cond.append(func.lower(J.c.recipient_address) == recipient_address.lower())
    stmt = select(J).where(*cond).order_by(J.c.created, J.c.pk)
    if isinstance(conn, Engine):
        with conn.connect() as c:
            return [_job(r) for r in c.execute(stmt).all()]
    return [_job(r) for r in conn.execute(stmt).all()]


def consult_set_instances(conn: Connection, tenant: str, task_id: str) -> set[str] | None:
    """The SOP Instance UIDs of the inbound set whose consult Task is ``task_id`` (None: no such set)."""
    found = conn.execute(select(ST.c.pk).where(ST.c.tenant == tenant, ST.c.consult_task == task_id)).first()
    if found is None:
        return None
    rows = conn.execute(select(PT.c.sop_instance_uid).where(PT.c.tenant == tenant, PT.c.set_pk == found.pk)).all()
    return {r.sop_instance_uid for r in rows if r.sop_instance_uid}


def list_jobs(engine: Engine, tenant: str, states: Collection[str] | None = None, *, offset: int = 0,
              limit: int = 50) -> tuple[int, list[Job]]:
    """The tenant's jobs in ``states`` (None = all), newest first: (total count, one page)."""
    cond = [J.c.tenant == tenant]
    if states is not None:
        cond.append(J.c.state.in_([JobState(s).value for s in states]))
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(J).where(*cond)).scalar_one()
        rows = conn.execute(select(J).where(*cond).order_by(J.c.created.desc(), J.c.pk.desc())
                            .offset(offset).limit(limit)).all()
    return total, [_job(r) for r in rows]


def _lock_job(conn: Connection, job_pk: int) -> Job:
    """Read a job row, locked on PostgreSQL (job row before mail rows: one lock order against deadlocks)."""
    stmt = select(J).where(J.c.pk == job_pk)
    return _job(conn.execute(stmt.with_for_update() if conn.dialect.name == "postgresql" else stmt).one())


def _mail_for_update(conn: Connection, tenant: str, cond) -> Mail | None:
    """Find a mail, lock its job, then read the mail again (locked) under that lock."""
    row = conn.execute(select(M.c.pk, M.c.job_pk).where(M.c.tenant == tenant, cond)).first()
    if row is None:
        return None
    _lock_job(conn, row.job_pk)
    stmt = select(M).where(M.c.pk == row.pk)
    return _mail(conn.execute(stmt.with_for_update() if conn.dialect.name == "postgresql" else stmt).one())


#: Where the mails of a sending job stand (``progress``): the fine steps a mirror shows beside the job state.
SENDING_MAILS, RETRYING, ALL_SENT = "sending", "retrying", "all-sent"


def progress(counts: MailCounts) -> str:
    """``retrying`` while a failed try waits for its resend, ``all-sent`` when nothing is due and receipts are
    awaited, else ``sending``."""
    if counts.failed_retryable:
        return RETRYING
    if counts.sent and not counts.queued:
        return ALL_SENT
    return SENDING_MAILS


def job_counts(conn: Connection, job_pk: int) -> MailCounts:
    """The job's mails by state, in the caller's transaction (e.g. a JobHook's)."""
    rows = conn.execute(select(M.c.state, func.count()).where(M.c.job_pk == job_pk).group_by(M.c.state)).all()
    return MailCounts.of({r[0]: r[1] for r in rows})


def _recompute(conn: Connection, job_pk: int, now: float, also: JobHook | None,
               forced: JobState | None = None, moved: Sequence[tuple[str, str]] = ()) -> Job:
    """Recount a job's mails, store counters and the state they imply (or ``forced``); run ``also`` when the state
    changes, or when an active job's ``progress`` changes through the mail moves (old state, new state) of this
    transaction (all sent, a retry pending, ...): at those steps only, never for every mail."""
    before = _lock_job(conn, job_pk)
    rows = conn.execute(select(M.c.state, func.count(), func.count(M.c.sent_at), func.sum(M.c.attempts))
                        .where(M.c.job_pk == job_pk).group_by(M.c.state)).all()
    by_state = {r[0]: r[1] for r in rows}
    sent = sum(r[2] for r in rows)
    tried = sum((r[3] or 0) for r in rows)
    counts = MailCounts.of(by_state)
    if forced is not None:
        state, error = forced, None
    else:
        state, error = job_state(before.state, counts, untouched=tried == 0)
    if state is JobState.FAILED and error is not None:
        first = conn.execute(select(M.c.set_part, M.c.last_error).where(
            M.c.job_pk == job_pk, M.c.state == MailState.FAILED_FINAL.value).order_by(M.c.set_part).limit(1)).first()
        if first is not None and first.last_error:
            error = f"{error}; part {first.set_part}: {first.last_error}"
    values = {"state": state.value, "error": error, "sent": sent, "acknowledged": counts.acknowledged,
              "failed": counts.failed_final, "updated": now}
    conn.execute(update(J).where(J.c.pk == job_pk).values(**values))
    after = dataclasses.replace(before, **values)
    if also is not None and (after.state != before.state or (
            state is JobState.ACTIVE and moved and progress(counts) != progress(_undo(by_state, moved)))):
        also(conn, after)
    return after


def _undo(by_state: dict[str, int], moved: Sequence[tuple[str, str]]) -> MailCounts:
    """The mail counts before the moves (old state, new state) of a transaction."""
    counts = dict(by_state)
    for old, new in moved:
        counts[new] = counts.get(new, 0) - 1
        counts[old] = counts.get(old, 0) + 1
    return MailCounts.of(counts)


def job_action(engine: Engine, tenant: str, job_id: str, action: Action | str, now: float,
               also: JobHook | None = None) -> Job | None:
    """Pause, resume, abort, retry (failed mails queued again, tries reset) or delete a job; CONFLICT if the
    job's state does not allow it. Returns the job after the action (None when deleted); ``also`` runs in
    the transaction when the state changes (and on delete, with the job as it was)."""
    action = Action(action)
    with writer(engine).begin() as conn:
        job = _job_row(conn, tenant, job_id, lock=True)
        if action is Action.DELETE:
            state_after_action(job.state, action, MailCounts())
            conn.execute(delete(M).where(M.c.tenant == tenant, M.c.job_pk == job.pk))
            conn.execute(delete(J).where(J.c.tenant == tenant, J.c.pk == job.pk))
            if also is not None:
                also(conn, job)
            return None
        if action is Action.RETRY:
            state_after_action(job.state, action, MailCounts())  # check first
            conn.execute(update(M).where(
                M.c.tenant == tenant, M.c.job_pk == job.pk,
                M.c.state.in_([MailState.FAILED_FINAL.value, MailState.FAILED_RETRYABLE.value])).values(
                state=MailState.QUEUED.value, attempts=0, run_after=now, lease_until=None, last_error=None))
            conn.execute(update(J).where(J.c.pk == job.pk).values(state=JobState.ACTIVE.value))
            return _recompute(conn, job.pk, now, also)
        if action is Action.RESUME:
            state_after_action(job.state, action, MailCounts())
            conn.execute(update(J).where(J.c.pk == job.pk).values(state=JobState.ACTIVE.value))
            return _recompute(conn, job.pk, now, also)
        target = state_after_action(job.state, action, MailCounts())
        return _recompute(conn, job.pk, now, also, forced=target)


# ---- the sender worker (all tenants) -------------------------------------------------------------------------
def release_leases(engine: Engine, now: float) -> tuple[int, int]:
    """At the start of the data folder's one gateway: leases left by a process that died (SIGKILL, power loss)
    are released, so its mails are sent again at once instead of after the lease; pending receipts become due.
    A mail that did reach the receiver comes again with the same Message-ID: acknowledged, not imported twice.
    Returns (mails, receipts) released."""
    with writer(engine).begin() as conn:
        mails = conn.execute(update(M).where(M.c.state.in_([s.value for s in DUE]), M.c.lease_until.is_not(None))
                             .values(lease_until=None, run_after=func.min(M.c.run_after, now)
                                     if conn.dialect.name == "sqlite" else func.least(M.c.run_after, now))).rowcount
        mdns = conn.execute(update(N).where(N.c.state == MDN_PENDING, N.c.run_after > now)
                            .values(run_after=now)).rowcount
    return mails, mdns


def next_due(engine: Engine) -> float | None:
    """The earliest ``run_after`` of a due mail of a sending job (a read without the write lock), or None."""
    with engine.connect() as conn:
        return conn.execute(select(func.min(M.c.run_after)).select_from(M.join(J, J.c.pk == M.c.job_pk)).where(
            M.c.state.in_([s.value for s in DUE]), J.c.state.in_([s.value for s in SENDING]))).scalar()


def claim_mails(engine: Engine, now: float, *, limit: int, lease: float,
                message_id: Callable[[Mail, Job], str], also: JobHook | None = None) -> list[ClaimedMail]:
    """Lease up to ``limit`` due mails of waiting/active jobs, emergency jobs first, then oldest job, then part.

    A lease counts a try, holds the mail until ``now + lease`` and gives it a Message-ID (kept for a resend
    after a send failure or a receipt timeout, so the receiver can re-acknowledge a duplicate; new after a
    refusing MDN). Waiting jobs become active. Expired leases are taken again.
    """
    stmt = (select(M, *[c.label(f"j_{c.name}") for c in J.c])
            .join(J, J.c.pk == M.c.job_pk)
            .where(M.c.state.in_([s.value for s in DUE]), M.c.run_after <= now,
                   or_(M.c.lease_until.is_(None), M.c.lease_until <= now),
                   J.c.state.in_([s.value for s in SENDING]))
            .order_by(J.c.priority.desc(), J.c.created, J.c.pk, M.c.set_part).limit(limit))
    out: list[ClaimedMail] = []
    with writer(engine).begin() as conn:
        if conn.dialect.name == "postgresql":
            stmt = stmt.with_for_update(of=M, skip_locked=True)
        rows = conn.execute(stmt).all()
        jobs: dict[int, Job] = {}
        mails: list[Mail] = []
        for row in rows:
            m = row._mapping
            if row.job_pk not in jobs:
                jobs[row.job_pk] = Job(**{f.name: m[f"j_{f.name}"] for f in dataclasses.fields(Job)})
            mail = _mail(row)
            mid = mail.message_id
            if mid is None or mail.disposition is not None:
                mid = message_id(mail, jobs[row.job_pk])
            values = {"attempts": mail.attempts + 1, "lease_until": now + lease, "message_id": mid,
                      "disposition": None, "acknowledged_at": None}
            conn.execute(update(M).where(M.c.pk == mail.pk).values(**values))
            mails.append(dataclasses.replace(mail, **values))
        for pk in sorted(jobs):
            if jobs[pk].state == JobState.WAITING.value:
                jobs[pk] = dataclasses.replace(jobs[pk], state=JobState.ACTIVE.value, updated=now)
                conn.execute(update(J).where(J.c.pk == pk, J.c.state == JobState.WAITING.value)
                             .values(state=JobState.ACTIVE.value, updated=now))
                if also is not None:
                    also(conn, jobs[pk])
    return [ClaimedMail(mail, jobs[mail.job_pk]) for mail in mails]


def _sent_values(mail: Mail, now: float, size: int | None) -> dict:
    """The column changes of a mail the SMTP server accepted: sent (if it was due), its size."""
    values: dict = {"sent_at": mail.sent_at or now}
    if size is not None:
        values["size"] = size
    if MailState(mail.state) in DUE:
        values.update(state=MailState.SENT.value, sent_at=now, lease_until=None, last_error=None)
    return values


def mark_sent(engine: Engine, tenant: str, mail_pk: int, now: float, also: JobHook | None = None, *,
              size: int | None = None) -> Mail:
    """Record that the SMTP server accepted the mail (``size``: bytes of its DICOM instance); it now awaits its
    receipt."""
    with writer(engine).begin() as conn:
        mail = _mail_for_update(conn, tenant, M.c.pk == mail_pk)
        if mail is None:
            raise not_found(f"no outbound mail {mail_pk}")
        values = _sent_values(mail, now, size)
        conn.execute(update(M).where(M.c.pk == mail_pk).values(**values))
        _recompute(conn, mail.job_pk, now, also, moved=[(mail.state, values.get("state", mail.state))])
    return dataclasses.replace(mail, **values)


def mark_sent_many(engine: Engine, sent: Sequence[tuple[str, int, int | None]], now: float,
                   also: JobHook | None = None) -> list[int]:
    """``mark_sent`` for several accepted mails, (tenant, mail pk, size) each, in ONE transaction with one
    recount per job (instead of a commit and a recount per mail); returns the pks of mails no longer there
    (job deleted meanwhile), which are skipped. Job rows are locked in pk order (one lock order).

    Trade-off: a crash after the SMTP server accepted some mails but before this commit leaves them leased;
    they are sent again with the same Message-ID when the lease ends, and the receiver re-acknowledges the
    duplicate without a second import. The ``also`` hook sees the job once per call (the progress steps of
    the whole batch, e.g. sending -> all-sent)."""
    gone: list[int] = []
    with writer(engine).begin() as conn:
        found = conn.execute(select(M.c.pk, M.c.job_pk, M.c.tenant).where(
            M.c.pk.in_([pk for _, pk, _ in sent]))).all()
        where = {r.pk: r for r in found}
        todo = sorted(((where[pk].job_pk, pk, size) for tenant, pk, size in sent
                       if pk in where and where[pk].tenant == tenant), key=lambda t: (t[0], t[1]))
        gone = [pk for tenant, pk, _ in sent if pk not in where or where[pk].tenant != tenant]
        moved: dict[int, list[tuple[str, str]]] = {}
        for job_pk, pk, size in todo:
            if job_pk not in moved:
                _lock_job(conn, job_pk)
                moved[job_pk] = []
            stmt = select(M).where(M.c.pk == pk)
            mail = _mail(conn.execute(stmt.with_for_update() if conn.dialect.name == "postgresql" else stmt).one())
            values = _sent_values(mail, now, size)
            conn.execute(update(M).where(M.c.pk == pk).values(**values))
            moved[job_pk].append((mail.state, values.get("state", mail.state)))
        for job_pk, moves in moved.items():
            _recompute(conn, job_pk, now, also, moved=moves)
    return gone


def mark_failed(engine: Engine, tenant: str, mail_pk: int, now: float, error: str, *, retryable: bool,
                policy: Backoff, rand: float, also: JobHook | None = None) -> Mail:
    """Record a failed send: retried after the backoff, or failed finally (dead letter) when the tries are
    used up or the failure is final. A mail no longer leased (e.g. acknowledged meanwhile) is left alone."""
    with writer(engine).begin() as conn:
        mail = _mail_for_update(conn, tenant, M.c.pk == mail_pk)
        if mail is None:
            raise not_found(f"no outbound mail {mail_pk}")
        if MailState(mail.state) not in DUE:
            return mail
        state, run_after = after_send_failure(mail.attempts, retryable, policy, now, rand)
        values = {"state": state.value, "lease_until": None, "last_error": error,
                  "run_after": run_after if run_after is not None else mail.run_after}
        conn.execute(update(M).where(M.c.pk == mail_pk).values(**values))
        _recompute(conn, mail.job_pk, now, also, moved=[(mail.state, state.value)])
    return dataclasses.replace(mail, **values)


def record_mdn(engine: Engine, tenant: str, original_message_id: str, outcome: Outcome | str, disposition: str,
               now: float, *, policy: Backoff, rand: float, also: JobHook | None = None,
               receipt_message_id: str | None = None) -> str:
    """Apply a receipt to the mail it answers (by Original-Message-ID) and recompute the job, in one transaction.

    Returns ``recorded``, ``duplicate`` (this mail has its receipt already: nothing changes) or ``unknown``.
    A failed-retry receipt queues a resend after the backoff (with a new Message-ID) until the tries run out.
    With ``receipt_message_id`` the received receipt's ``inbound_mail`` row is marked done in the same
    transaction (``mdn``, or ``mdn-unknown`` when it answers no mail of ours).
    """
    with writer(engine).begin() as conn:
        result = _record_mdn(conn, tenant, original_message_id, outcome, disposition, now, policy, rand, also)
        if receipt_message_id is not None:
            _mark_inbound(conn, tenant, receipt_message_id, INBOUND_MDN_UNKNOWN if result == UNKNOWN else INBOUND_MDN)
    return result


def record_receipt(engine: Engine, tenant: str, message_id: str, sender: str | None, raw_sha256: str, size: int,
                   original_message_id: str, outcome: Outcome | str, disposition: str, now: float, *,
                   policy: Backoff, rand: float, also: JobHook | None = None) -> str | None:
    """A received receipt (MDN) recorded in ONE transaction: its ``inbound_mail`` row (state ``mdn``, or
    ``mdn-unknown`` when it answers no mail of ours) and ``record_mdn`` on the mail it answers; instead of
    ``record_inbound`` + ``record_mdn`` (two commits). Returns ``record_mdn``'s result, or None when the
    Message-ID was received before: nothing changed then (the caller handles the redelivery as before)."""
    try:
        with writer(engine).begin() as conn:
            if conn.execute(select(IM.c.pk).where(IM.c.tenant == tenant, IM.c.message_id == message_id)
                            ).first() is not None:
                return None
            result = _record_mdn(conn, tenant, original_message_id, outcome, disposition, now, policy, rand, also)
            conn.execute(insert(IM).values(
                tenant=tenant, message_id=message_id, sender=sender, received_at=now, raw_sha256=raw_sha256,
                size=size, state=INBOUND_MDN_UNKNOWN if result == UNKNOWN else INBOUND_MDN, error=None))
        return result
    except IntegrityError:  # the same Message-ID recorded concurrently (PostgreSQL): all of it rolled back
        return None


def _record_mdn(conn: Connection, tenant: str, original_message_id: str, outcome: Outcome | str, disposition: str,
                now: float, policy: Backoff, rand: float, also: JobHook | None) -> str:
    mail = _mail_for_update(conn, tenant, M.c.message_id == original_message_id)
    if mail is None:
        return UNKNOWN
    if mail.disposition is not None:
        return DUPLICATE
    state = mail_state_for(outcome)
    values: dict = {"disposition": disposition[:128], "acknowledged_at": now, "lease_until": None,
                    "state": state.value}
    if mail.sent_at is None:
        values["sent_at"] = now  # the receipt overtook our own bookkeeping
    if state is MailState.FAILED_RETRYABLE:
        state, run_after = after_send_failure(mail.attempts, True, policy, now, rand)
        values.update(state=state.value, run_after=run_after or mail.run_after,
                      last_error=f"receiver refused ({disposition[:100]}), resend possible")
    elif state is MailState.FAILED_FINAL:
        values["last_error"] = f"receiver refused ({disposition[:100]})"
    conn.execute(update(M).where(M.c.pk == mail.pk).values(**values))
    _recompute(conn, mail.job_pk, now, also, moved=[(mail.state, values["state"])])
    return RECORDED


def sweep_receipts(engine: Engine, now: float, timeout: float, policy: Backoff,
                   also: JobHook | None = None) -> int:
    """Sent mails without a receipt for ``timeout`` seconds: resent (same Message-ID) while tries remain, else
    failed finally. All tenants; returns how many mails moved."""
    with writer(engine).begin() as conn:
        late = and_(M.c.state == MailState.SENT.value, M.c.sent_at <= now - timeout)
        job_pks = conn.execute(select(M.c.job_pk).where(late).distinct()).scalars().all()
        rows: list[Mail] = []
        for job_pk in sorted(job_pks):
            _lock_job(conn, job_pk)
            moved: list[tuple[str, str]] = []
            for mail in [_mail(r) for r in conn.execute(select(M).where(late, M.c.job_pk == job_pk))]:
                if policy.exhausted(mail.attempts):
                    values = {"state": MailState.FAILED_FINAL.value,
                              "last_error": f"no receipt within {timeout:.0f} s after {mail.attempts} tries"}
                else:
                    values = {"state": MailState.QUEUED.value, "run_after": now, "lease_until": None,
                              "last_error": f"no receipt within {timeout:.0f} s"}
                conn.execute(update(M).where(M.c.pk == mail.pk).values(**values))
                rows.append(mail)
                moved.append((mail.state, values["state"]))
            _recompute(conn, job_pk, now, also, moved=moved)
    return len(rows)


# ---- receipts we owe (all tenants for the worker) ------------------------------------------------------------
def _enqueue_mdn(conn: Connection, tenant: str, mdn: NewMdn, now: float) -> None:
    conn.execute(insert(N).values(tenant=tenant, to_address=mdn.to_address,
                                  original_message_id=mdn.original_message_id, params=mdn.params,
                                  state=MDN_PENDING, attempts=0, run_after=now, created=now, last_error=None))


def enqueue_mdn(engine: Engine, tenant: str, mdn: NewMdn, now: float) -> None:
    """Queue a receipt (e.g. the re-acknowledgement of a duplicate, or a refusal)."""
    with writer(engine).begin() as conn:
        _enqueue_mdn(conn, tenant, mdn, now)


def claim_mdns(engine: Engine, now: float, *, limit: int, lease: float) -> list[QueuedMdn]:
    """Lease up to ``limit`` due receipts (all tenants): ``run_after`` moves to ``now + lease``, the try counts."""
    stmt = (select(N).where(N.c.state == MDN_PENDING, N.c.run_after <= now)
            .order_by(N.c.run_after, N.c.pk).limit(limit))
    out = []
    with writer(engine).begin() as conn:
        if conn.dialect.name == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True)
        for row in conn.execute(stmt).all():
            q = _make(QueuedMdn, row)
            conn.execute(update(N).where(N.c.pk == q.pk).values(run_after=now + lease, attempts=q.attempts + 1))
            out.append(dataclasses.replace(q, run_after=now + lease, attempts=q.attempts + 1))
    return out


def finish_mdn(engine: Engine, tenant: str, pk: int, *, state: str, error: str | None = None,
               run_after: float | None = None) -> None:
    """Record a receipt's try: sent, dead, or pending again at ``run_after``."""
    values: dict = {"state": state, "last_error": error}
    if run_after is not None:
        values["run_after"] = run_after
    with writer(engine).begin() as conn:
        conn.execute(update(N).where(N.c.tenant == tenant, N.c.pk == pk).values(**values))


def mdns(engine: Engine, tenant: str) -> list[QueuedMdn]:
    """The tenant's queued receipts, oldest first."""
    with engine.connect() as conn:
        return [_make(QueuedMdn, r) for r in conn.execute(select(N).where(N.c.tenant == tenant).order_by(N.c.pk))]


# ---- inbound -------------------------------------------------------------------------------------------------
def record_inbound(engine: Engine, tenant: str, message_id: str, sender: str | None, raw_sha256: str, size: int,
                   now: float, mdn: NewMdn | None = None) -> str:
    """Record a received raw mail: ``new``, or ``duplicate`` when its Message-ID was seen (nothing changes then,
    except that ``mdn`` is queued again, so the sender gets its receipt without a second import)."""
    try:
        with writer(engine).begin() as conn:
            conn.execute(insert(IM).values(tenant=tenant, message_id=message_id, sender=sender, received_at=now,
                                           raw_sha256=raw_sha256, size=size, state="received", error=None))
        return NEW
    except IntegrityError:
        if mdn is not None:
            enqueue_mdn(engine, tenant, mdn, now)
        return DUPLICATE


def set_inbound_state(engine: Engine, tenant: str, message_id: str, state: str, error: str | None = None) -> None:
    """Set the processing state of a received mail (received, fragment, imported, quarantined, mdn, ...)."""
    with writer(engine).begin() as conn:
        _mark_inbound(conn, tenant, message_id, state, error)


def _mark_inbound(conn: Connection, tenant: str, message_id: str, state: str, error: str | None = None) -> None:
    done = conn.execute(update(IM).where(IM.c.tenant == tenant, IM.c.message_id == message_id)
                        .values(state=state, error=error))
    if done.rowcount == 0:
        raise not_found(f"no inbound mail {message_id}")


def inbound_state(engine: Engine, tenant: str, message_id: str) -> str | None:
    """The processing state of a received mail, or None when unknown."""
    with engine.connect() as conn:
        return conn.execute(select(IM.c.state).where(IM.c.tenant == tenant, IM.c.message_id == message_id)
                            ).scalar()


def add_fragment(engine: Engine, tenant: str, partial_id: str, number: int, total: int | None, blob_sha256: str,
                 now: float) -> list[str] | None:
    """Buffer a message/partial fragment (RFC 2046 5.2.2; ``total`` is required on the last one only).

    Returns the blob digests of fragments 1..total in order once all arrived (the caller joins them, then
    calls ``drop_fragments``), else None. A repeated fragment is ignored.
    """
    if number < 1 or (total is not None and (total < 1 or number > total)):
        raise invalid(f"message/partial number {number} of {total} is out of range")
    key = and_(FR.c.tenant == tenant, FR.c.partial_id == partial_id)
    with writer(engine).begin() as conn:
        seen = conn.execute(select(FR.c.pk).where(key, FR.c.number == number)).first()
        if seen is None:
            conn.execute(insert(FR).values(tenant=tenant, partial_id=partial_id, number=number, total=total,
                                           blob_sha256=blob_sha256, received_at=now))
        rows = conn.execute(select(FR.c.number, FR.c.total, FR.c.blob_sha256).where(key)
                            .order_by(FR.c.number)).all()
    totals = {r.total for r in rows if r.total is not None}
    if len(totals) > 1:
        raise invalid(f"message/partial {partial_id} has differing totals {sorted(totals)}")
    if not totals:
        return None
    n = totals.pop()
    if [r.number for r in rows] != list(range(1, n + 1)):
        return None
    return [r.blob_sha256 for r in rows]


def drop_fragments(engine: Engine, tenant: str, partial_id: str) -> int:
    """Forget the fragments of a joined (or abandoned) message/partial id."""
    with writer(engine).begin() as conn:
        return conn.execute(delete(FR).where(FR.c.tenant == tenant, FR.c.partial_id == partial_id)).rowcount


def stale_fragments(engine: Engine, before: float) -> list[tuple[str, str]]:
    """(tenant, partial id) of fragment groups whose newest fragment is older than ``before`` (all tenants)."""
    with engine.connect() as conn:
        rows = conn.execute(select(FR.c.tenant, FR.c.partial_id).group_by(FR.c.tenant, FR.c.partial_id)
                            .having(func.max(FR.c.received_at) < before)
                            .order_by(FR.c.tenant, FR.c.partial_id)).all()
    return [(r[0], r[1]) for r in rows]


def _set(row) -> SetRow:
    return _make(SetRow, row)


def add_set_part(engine: Engine, tenant: str, part: NewPart, now: float, mdn: NewMdn | None = None, *,
                 mark: str | None = None) -> PartResult:
    """Record a verified instance of a DRG set; the set becomes ``complete`` when all of its parts are in.

    A repeated (set, part) changes nothing but queues ``mdn`` again (the sender resent: re-acknowledge).
    INVALID when the part contradicts the set (SETTOTAL, part out of range). With ``mark`` the carrying mail's
    ``inbound_mail`` row (``part.message_id``) gets that state in the same transaction.
    """
    if part.total < 1 or not 1 <= part.set_part <= part.total:
        raise invalid(f"X-TELEMEDICINE-SETPART {part.set_part} of {part.total} is out of range")
    key = and_(ST.c.tenant == tenant, ST.c.sender == part.sender, ST.c.set_id == part.set_id)
    with writer(engine).begin() as conn:
        lock = conn.dialect.name == "postgresql"
        stmt = select(ST).where(key)
        row = conn.execute(stmt.with_for_update() if lock else stmt).first()
        if row is None:
            try:
                with conn.begin_nested():
                    conn.execute(insert(ST).values(tenant=tenant, set_id=part.set_id, sender=part.sender,
                                                   study_uid=part.study_uid, total=part.total, parts_seen=0,
                                                   state=COLLECTING, first_seen=now, last_seen=now))
            except IntegrityError:
                pass  # a concurrent first part created it
            row = conn.execute(stmt.with_for_update() if lock else stmt).one()
        s = _set(row)
        if s.total != part.total:
            raise invalid(f"set {part.set_id}: X-TELEMEDICINE-SETTOTAL {part.total} differs from {s.total}")
        if s.study_uid and part.study_uid and s.study_uid != part.study_uid:
            raise invalid(f"set {part.set_id}: X-TELEMEDICINE-STUDYID differs between parts")
        seen = conn.execute(select(PT.c.pk).where(PT.c.set_pk == s.pk, PT.c.set_part == part.set_part)).first()
        if mark is not None and part.message_id is not None:
            _mark_inbound(conn, tenant, part.message_id, mark)
        if seen is not None:
            if mdn is not None:
                _enqueue_mdn(conn, tenant, mdn, now)
            return PartResult(s, True)
        conn.execute(insert(PT).values(tenant=tenant, set_pk=s.pk, set_part=part.set_part,
                                       sop_instance_uid=part.sop_instance_uid, blob_sha256=part.blob_sha256,
                                       message_id=part.message_id, received_at=now, size=part.size))
        parts_seen = s.parts_seen + 1
        state = COMPLETE if parts_seen == s.total and s.state in (COLLECTING, REPORTED) else s.state
        values = {"parts_seen": parts_seen, "state": state, "last_seen": now,
                  "study_uid": s.study_uid or part.study_uid,
                  # the order travels with every part: kept from the first part that has it
                  "order_json": s.order_json or part.order_json, "note": s.note or part.note,
                  "emergency": bool(s.emergency or part.emergency)}
        conn.execute(update(ST).where(ST.c.pk == s.pk).values(**values))
        if mdn is not None:
            _enqueue_mdn(conn, tenant, mdn, now)
    return PartResult(dataclasses.replace(s, **values), False)


def get_set(engine: Engine, tenant: str, set_pk: int) -> SetRow:
    """One inbound set of the tenant (NOT_FOUND otherwise)."""
    with engine.connect() as conn:
        row = conn.execute(select(ST).where(ST.c.tenant == tenant, ST.c.pk == set_pk)).first()
    if row is None:
        raise not_found(f"no inbound set {set_pk}")
    return _set(row)


def set_parts(engine: Engine, tenant: str, set_pk: int) -> list[Part]:
    """The parts of a set in part order."""
    with engine.connect() as conn:
        rows = conn.execute(select(PT).where(PT.c.tenant == tenant, PT.c.set_pk == set_pk)
                            .order_by(PT.c.set_part)).all()
    return [_make(Part, r) for r in rows]


def list_sets(engine: Engine, tenant: str, states: Collection[str] | None = None, *, offset: int = 0,
              limit: int = 50) -> tuple[int, list[SetRow]]:
    """The tenant's inbound sets in ``states`` (None = all), newest first: (total count, one page)."""
    cond = [ST.c.tenant == tenant]
    if states is not None:
        cond.append(ST.c.state.in_(list(states)))
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(ST).where(*cond)).scalar_one()
        rows = conn.execute(select(ST).where(*cond).order_by(ST.c.last_seen.desc(), ST.c.pk.desc())
                            .offset(offset).limit(limit)).all()
    return total, [_set(r) for r in rows]


def _move_set(engine: Engine, tenant: str, set_pk: int, allowed: Collection[str], state: str, now: float) -> SetRow:
    with writer(engine).begin() as conn:
        row = conn.execute(select(ST).where(ST.c.tenant == tenant, ST.c.pk == set_pk)).first()
        if row is None:
            raise not_found(f"no inbound set {set_pk}")
        s = _set(row)
        if s.state not in allowed:
            raise ServerError(ErrorKind.CONFLICT, f"inbound set {s.set_id} is {s.state}, cannot become {state}")
        conn.execute(update(ST).where(ST.c.pk == set_pk).values(state=state, last_seen=now))
    return dataclasses.replace(s, state=state, last_seen=now)


def mark_set_imported(engine: Engine, tenant: str, set_pk: int, now: float, *, operator: bool = False) -> SetRow:
    """Record that a complete set was imported; an operator may also import an incomplete set on purpose."""
    allowed = (COMPLETE, COLLECTING, REPORTED) if operator else (COMPLETE,)
    return _move_set(engine, tenant, set_pk, allowed, IMPORTED, now)


def set_consult(engine: Engine, tenant: str, set_pk: int, task_id: str) -> None:
    """Record the consult Task created for an imported set (so a second import never makes another)."""
    with writer(engine).begin() as conn:
        conn.execute(update(ST).where(ST.c.tenant == tenant, ST.c.pk == set_pk).values(consult_task=task_id))


def discard_set(engine: Engine, tenant: str, set_pk: int, now: float) -> SetRow:
    """An operator discards a set that was not imported."""
    return _move_set(engine, tenant, set_pk, (COLLECTING, COMPLETE, REPORTED), DISCARDED, now)


def report_incomplete(engine: Engine, before: float, now: float) -> list[SetRow]:
    """Collecting sets with no part since ``before`` become ``reported-incomplete``; returned (all tenants) so
    the caller reports each once (DESIGN.md 4: never half-imported silently)."""
    with writer(engine).begin() as conn:
        stmt = select(ST).where(ST.c.state == COLLECTING, ST.c.last_seen < before).order_by(ST.c.pk)
        if conn.dialect.name == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True)
        rows = [_set(r) for r in conn.execute(stmt).all()]
        if rows:
            conn.execute(update(ST).where(ST.c.pk.in_([s.pk for s in rows])).values(state=REPORTED))
    return [dataclasses.replace(s, state=REPORTED) for s in rows]


def incomplete_sets(engine: Engine, tenant: str, before: float) -> list[SetRow]:
    """The tenant's sets still incomplete (collecting or reported) with no part since ``before``."""
    with engine.connect() as conn:
        rows = conn.execute(select(ST).where(ST.c.tenant == tenant, ST.c.state.in_([COLLECTING, REPORTED]),
                                             ST.c.last_seen < before).order_by(ST.c.last_seen, ST.c.pk)).all()
    return [_set(r) for r in rows]


# ---- quarantine ----------------------------------------------------------------------------------------------
def quarantine(engine: Engine, tenant: str, raw_sha256: str, reason: str, now: float, *, message: str | None = None,
               sender: str | None = None, message_id: str | None = None) -> int:
    """Keep a refused mail (its bytes already in the blob store) for the operator; returns its row id."""
    with writer(engine).begin() as conn:
        return conn.execute(insert(Q).values(tenant=tenant, raw_sha256=raw_sha256, reason=reason, message=message,
                                             sender=sender, message_id=message_id, created=now)
                            ).inserted_primary_key[0]


def quarantined(engine: Engine, tenant: str, *, offset: int = 0, limit: int = 50) -> tuple[int, list[Quarantined]]:
    """The tenant's quarantined mails, newest first: (total count, one page)."""
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(Q).where(Q.c.tenant == tenant)).scalar_one()
        rows = conn.execute(select(Q).where(Q.c.tenant == tenant).order_by(Q.c.created.desc(), Q.c.pk.desc())
                            .offset(offset).limit(limit)).all()
    return total, [_make(Quarantined, r) for r in rows]
