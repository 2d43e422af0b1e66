"""All SQL of FHIR R4 Subscriptions: the channel registry and the durable delivery queue (subscription.html).

Registry and queue writes that follow a resource change run on the change's ``FhirTx`` (same transaction:
a committed change always has its deliveries, a rolled-back one never). Every statement filters on the
tenant, except the worker's lease (``DeliveryQueue.next_due``/``claim``), which serves all tenants by nature
and hands each row back with its tenant. Leases: PostgreSQL ``FOR UPDATE SKIP LOCKED``; SQLite under the
writer lock (``BEGIN IMMEDIATE``), so two workers never hold the same delivery.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import and_, bindparam, delete, func, insert, select, update
from sqlalchemy.engine import Engine

from server.store.db import writer
from server.store.fhir import FhirTx
from server.store.subscription_models import FhirSubscription, FhirSubscriptionDelivery

S = FhirSubscription.__table__
D = FhirSubscriptionDelivery.__table__

PENDING, DELIVERED, DEAD, CANCELLED = "pending", "delivered", "dead", "cancelled"


@dataclass(frozen=True)
class Registered:
    """The registry row of one Subscription."""

    subscription_id: str
    criteria_type: str
    criteria: str
    endpoint: str
    payload: str | None
    headers: str  # JSON list of [name, value]
    status: str


@dataclass(frozen=True)
class Delivery:
    """One queued notification (with its subscription's channel when claimed)."""

    pk: int
    tenant: str
    subscription_id: str
    resource_type: str
    resource_id: str
    version_id: int
    state: str
    attempts: int
    run_after: float
    last_error: str | None
    channel: Registered | None = None


def _registered(row) -> Registered:
    return Registered(row.subscription_id, row.criteria_type, row.criteria, row.endpoint, row.payload,
                      row.headers, row.status)


def _delivery(row, channel: Registered | None = None) -> Delivery:
    return Delivery(row.pk, row.tenant, row.subscription_id, row.resource_type, row.resource_id, row.version_id,
                    row.state, row.attempts, row.run_after, row.last_error, channel)


# ---- in the transaction of a change --------------------------------------------------------------------------
def register(tx: FhirTx, reg: Registered) -> None:
    """Insert or replace the registry row of a Subscription (after its create or update)."""
    values = {"criteria_type": reg.criteria_type, "criteria": reg.criteria, "endpoint": reg.endpoint,
              "payload": reg.payload, "headers": reg.headers, "status": reg.status}
    key = and_(S.c.tenant == tx.tenant, S.c.subscription_id == reg.subscription_id)
    if tx.conn.execute(update(S).where(key).values(**values)).rowcount == 0:
        tx.conn.execute(insert(S).values(tenant=tx.tenant, subscription_id=reg.subscription_id, **values))


def unregister(tx: FhirTx, subscription_id: str) -> None:
    """Drop the registry row of a deleted Subscription and cancel its pending deliveries."""
    tx.conn.execute(delete(S).where(S.c.tenant == tx.tenant, S.c.subscription_id == subscription_id))
    tx.conn.execute(update(D).where(D.c.tenant == tx.tenant, D.c.subscription_id == subscription_id,
                                    D.c.state == PENDING).values(state=CANCELLED))


#: Built once: this runs on every write, so not even the statement is rebuilt (ix_fhir_subscription_type).
_LISTENING = select(S).where(S.c.tenant == bindparam("tenant"), S.c.criteria_type == bindparam("rtype"),
                             S.c.status.in_(bindparam("statuses", expanding=True)))


def listening(tx: FhirTx, resource_type: str, statuses: Sequence[str]) -> list[Registered]:
    """The Subscriptions of the tenant on ``resource_type`` in one of ``statuses`` (one indexed query)."""
    rows = tx.conn.execute(_LISTENING, {"tenant": tx.tenant, "rtype": resource_type,
                                        "statuses": list(statuses)}).all()
    return [_registered(r) for r in rows]


def enqueue(tx: FhirTx, subscription_ids: Sequence[str], resource_type: str, resource_id: str, version_id: int,
            now: float) -> None:
    """One pending delivery per subscription for this version of a resource."""
    if subscription_ids:
        tx.conn.execute(insert(D), [
            {"tenant": tx.tenant, "subscription_id": sid, "resource_type": resource_type,
             "resource_id": resource_id, "version_id": version_id, "state": PENDING, "attempts": 0,
             "run_after": now, "created": now, "last_error": None} for sid in subscription_ids])


def finish(tx: FhirTx, pk: int, *, state: str, error: str | None = None, run_after: float | None = None) -> None:
    """Record the outcome of a try: delivered, dead, or pending again at ``run_after``."""
    values: dict = {"state": state, "last_error": error}
    if run_after is not None:
        values["run_after"] = run_after
    tx.conn.execute(update(D).where(D.c.tenant == tx.tenant, D.c.pk == pk).values(**values))


def deliveries(tx: FhirTx, subscription_id: str | None = None) -> list[Delivery]:
    """The deliveries of the tenant (of one subscription), oldest first."""
    cond = [D.c.tenant == tx.tenant]
    if subscription_id is not None:
        cond.append(D.c.subscription_id == subscription_id)
    return [_delivery(r) for r in tx.conn.execute(select(D).where(*cond).order_by(D.c.pk)).all()]


# ---- the worker's lease (all tenants) ------------------------------------------------------------------------
class DeliveryQueue:
    """Leasing of due deliveries for the delivery worker."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def next_due(self) -> float | None:
        """The earliest ``run_after`` of a pending delivery (a read without the write lock), or None."""
        with self.engine.connect() as conn:
            return conn.execute(select(func.min(D.c.run_after)).where(D.c.state == PENDING)).scalar()

    def claim(self, now: float, *, limit: int, lease: float, statuses: Sequence[str]) -> list[Delivery]:
        """Lease up to ``limit`` due deliveries: their ``run_after`` moves to ``now + lease`` and the try counts.

        Deliveries whose subscription is gone or not in ``statuses`` are cancelled instead.
        """
        stmt = (select(D, S.c.subscription_id.label("s_id"), S.c.criteria_type, S.c.criteria, S.c.endpoint,
                       S.c.payload, S.c.headers, S.c.status)
                .outerjoin(S, and_(S.c.tenant == D.c.tenant, S.c.subscription_id == D.c.subscription_id))
                .where(D.c.state == PENDING, D.c.run_after <= now)
                .order_by(D.c.run_after, D.c.pk).limit(limit))
        out: list[Delivery] = []
        with writer(self.engine).begin() as conn:
            if conn.dialect.name == "postgresql":
                stmt = stmt.with_for_update(of=D, skip_locked=True)
            rows = conn.execute(stmt).all()
            for row in rows:
                key = and_(D.c.tenant == row.tenant, D.c.pk == row.pk)
                if row.s_id is None or row.status not in statuses:
                    conn.execute(update(D).where(key).values(state=CANCELLED,
                                                             last_error="subscription deleted or off"))
                    continue
                conn.execute(update(D).where(key).values(run_after=now + lease, attempts=row.attempts + 1))
                channel = Registered(row.s_id, row.criteria_type, row.criteria, row.endpoint, row.payload,
                                     row.headers, row.status)
                claimed = _delivery(row, channel)
                out.append(Delivery(**{**claimed.__dict__, "attempts": row.attempts + 1,
                                       "run_after": now + lease}))
        return out

    def purge(self, before: float) -> int:
        """Delete delivered and cancelled deliveries created before ``before`` (dead ones stay visible)."""
        with writer(self.engine).begin() as conn:
            done = conn.execute(delete(D).where(D.c.state.in_([DELIVERED, CANCELLED]), D.c.created < before))
        return done.rowcount
