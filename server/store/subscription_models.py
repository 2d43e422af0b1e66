"""SQL tables of FHIR R4 Subscriptions (subscription.html): the registry of live channels and the delivery queue.

``fhir_subscription`` mirrors the current version of each Subscription resource that the write listener
needs on every change (criteria type indexed, so matching costs one indexed query per write);
``fhir_subscription_delivery`` is the durable outbox: one row per (subscription, changed version), written in
the transaction of the change, leased by the delivery worker, retried with backoff, ``dead`` after the limit.
Every row belongs to a tenant. Times are seconds since the epoch (UTC).
"""

from __future__ import annotations

from sqlalchemy import Column, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


class FhirSubscription(SQLModel, table=True):
    """The channel of one Subscription of a tenant (absent when the Subscription is deleted)."""

    __tablename__ = "fhir_subscription"
    __table_args__ = (
        UniqueConstraint("tenant", "subscription_id", name="uq_fhir_subscription"),
        Index("ix_fhir_subscription_type", "tenant", "criteria_type", "status"),
    )

    pk: int | None = Field(default=None, primary_key=True)
    tenant: str = Field(max_length=64)
    subscription_id: str = Field(max_length=64)
    criteria_type: str = Field(max_length=64)
    criteria: str = Field(sa_column=Column(Text, nullable=False))
    endpoint: str = Field(sa_column=Column(Text, nullable=False))
    payload: str | None = Field(default=None, max_length=128)
    headers: str = Field(default="[]", sa_column=Column(Text, nullable=False))
    status: str = Field(max_length=16)


class FhirSubscriptionDelivery(SQLModel, table=True):
    """One notification to send: a version of a resource that matched a Subscription's criteria."""

    __tablename__ = "fhir_subscription_delivery"
    __table_args__ = (
        Index("ix_fhir_subscription_delivery_due", "state", "run_after"),
        Index("ix_fhir_subscription_delivery_subscription", "tenant", "subscription_id", "state"),
    )

    pk: int | None = Field(default=None, primary_key=True)
    tenant: str = Field(max_length=64)
    subscription_id: str = Field(max_length=64)
    resource_type: str = Field(max_length=64)
    resource_id: str = Field(max_length=64)
    version_id: int
    state: str = Field(max_length=16)  # pending | delivered | dead | cancelled
    attempts: int = 0
    run_after: float
    created: float
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
