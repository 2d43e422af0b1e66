"""The SQL of the gateway's transfer statistics: one row per sent job, received set and quarantined mail of a
tenant in a time range, with the per-instance figures summed in SQL (``server.gateway.stats`` buckets them).

Sent: ``transfer_job`` joined with its ``outbound_mail`` rows, grouped by job: mails sent (``sent_at`` set), their
DICOM bytes (``size``) and the last receipt (``max(acknowledged_at)``: every mail of a finished job carries the
time of its receipt, so no extra column is needed). Received: ``inbound_set`` with its ``inbound_part`` rows
(count, bytes, last part). Plain aggregates only: the same statements on SQLite and PostgreSQL. The
time range is [lo, hi) on the job's ``created``, the set's ``first_seen``, the quarantine row's ``created``.
"""

from __future__ import annotations

from sqlalchemy import func, or_, select
from sqlalchemy.engine import Engine

from server.gateway.sites import normalize_address
from server.gateway.stats import SENT_FINISHED, UNKNOWN_PARTNER, Direction, QuarantinedMail, Transfer
from server.store.gateway import J, M, PT, Q, ST


def _range(column, lo: float | None, hi: float | None) -> list:
    cond = []
    if lo is not None:
        cond.append(column >= lo)
    if hi is not None:
        cond.append(column < hi)
    return cond


def sent_transfers(engine: Engine, tenant: str, lo: float | None = None, hi: float | None = None, *,
                   address: str | None = None, endpoint: str | None = None) -> list[Transfer]:
    """The tenant's jobs created in [lo, hi) (to ``address`` or ``Endpoint/x`` when given), one row each."""
    cond = [J.c.tenant == tenant, J.c.kind == "transfer", *_range(J.c.created, lo, hi)]  # not messages
    partner = []
    if address is not None:
        partner.append(func.lower(J.c.recipient_address) == address.lower())
    if endpoint is not None:
        partner.append(J.c.recipient_endpoint == endpoint)
    if partner:
        cond.append(or_(*partner))
    cols = (J.c.pk, J.c.recipient_address, J.c.created, J.c.study_uid, J.c.state, J.c.error)
    stmt = (select(*cols, func.count(M.c.sent_at).label("sent"), func.sum(M.c.size).label("bytes"),
                   func.max(M.c.acknowledged_at).label("last"))
            .select_from(J.outerjoin(M, M.c.job_pk == J.c.pk)).where(*cond).group_by(*cols))
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return [Transfer(direction=Direction.SENT, partner=normalize_address(r.recipient_address), began=r.created,
                     study=r.study_uid, state=r.state, instances=r.sent, bytes=int(r.bytes or 0), ended=r.last,
                     error=r.error, complete=r.state == SENT_FINISHED) for r in rows]


def received_transfers(engine: Engine, tenant: str, lo: float | None = None, hi: float | None = None, *,
                       address: str | None = None) -> list[Transfer]:
    """The tenant's inbound sets first seen in [lo, hi) (from ``address`` when given), one row each."""
    cond = [ST.c.tenant == tenant, *_range(ST.c.first_seen, lo, hi)]
    if address is not None:
        cond.append(ST.c.sender == normalize_address(address))
    cols = (ST.c.pk, ST.c.sender, ST.c.study_uid, ST.c.total, ST.c.state, ST.c.first_seen)
    stmt = (select(*cols, func.count(PT.c.pk).label("parts"), func.sum(PT.c.size).label("bytes"),
                   func.max(PT.c.received_at).label("last"))
            .select_from(ST.outerjoin(PT, PT.c.set_pk == ST.c.pk)).where(*cond).group_by(*cols))
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return [Transfer(direction=Direction.RECEIVED, partner=r.sender, began=r.first_seen, study=r.study_uid,
                     state=r.state, instances=r.parts, bytes=int(r.bytes or 0), ended=r.last,
                     complete=r.parts >= r.total) for r in rows]


def quarantined_mails(engine: Engine, tenant: str, lo: float | None = None, hi: float | None = None, *,
                      address: str | None = None) -> list[QuarantinedMail]:
    """The tenant's mails quarantined in [lo, hi) (from ``address`` when given: compared normalized)."""
    stmt = (select(Q.c.sender, Q.c.created, Q.c.reason)
            .where(Q.c.tenant == tenant, *_range(Q.c.created, lo, hi)))
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    out = [QuarantinedMail(normalize_address(r.sender) if r.sender else UNKNOWN_PARTNER, r.created, r.reason)
           for r in rows]
    if address is not None:
        want = normalize_address(address)
        out = [q for q in out if q.partner == want]
    return out
