"""SQL tables of the DICOM e-mail gateway (DESIGN.md sections 3 and 4).

Outbound: ``transfer_job`` (one per study transfer to one recipient) with one ``outbound_mail`` per instance
(a durable queue: ``run_after``/``lease_until`` leases, attempts, the MDN's disposition), and
``outbound_mdn`` (receipts we owe, sent after the instance is durably stored). Inbound: ``inbound_mail``
(one per received raw mail, dedup by Message-ID), ``inbound_fragment`` (RFC 2046 message/partial),
``inbound_set``/``inbound_part`` (DRG sets collected until complete) and ``quarantine``. Raw mails and
decrypted instances live in the blob store (``*_sha256`` columns), never in SQL. Every row has a tenant.
Times are seconds since the epoch (UTC).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, ForeignKey, Index, Integer, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


class TransferJob(SQLModel, table=True):
    """One transfer of a study (or a selection of it) to one recipient endpoint."""

    __tablename__ = "transfer_job"
    __table_args__ = (
        UniqueConstraint("tenant", "job_id", name="uq_transfer_job"),
        Index("ix_transfer_job_list", "tenant", "state", "created"),
    )

    pk: int | None = Field(default=None, primary_key=True)
    tenant: str = Field(max_length=64)
    job_id: str = Field(max_length=64)
    state: str = Field(max_length=16)
    priority: int = 0
    study_uid: str = Field(max_length=64)
    selection: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # JSON
    recipient_endpoint: str | None = Field(default=None, max_length=128)  # e.g. "Endpoint/abc"
    recipient_address: str = Field(max_length=320)
    recipient_fingerprint: str | None = Field(default=None, max_length=64)
    max_mail_size: int | None = None
    sender_address: str = Field(max_length=320)
    set_id: str = Field(max_length=128)
    total: int = 0
    sent: int = 0
    acknowledged: int = 0
    failed: int = 0
    patient_name: str | None = Field(default=None, max_length=256)
    study_description: str | None = Field(default=None, max_length=256)
    study_date: str | None = Field(default=None, max_length=8)  # DICOM DA
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    task_id: str | None = Field(default=None, max_length=64)
    created: float
    updated: float
    # a job caused by a teleconsult order (server.gateway.orders): the order and its send options
    order_ref: str | None = Field(default=None, max_length=128)  # "ServiceRequest/<id>"
    order_task: str | None = Field(default=None, max_length=64)  # the order's Task id (the transfer Task's partOf)
    send_options: str | None = Field(default=None, max_length=256)  # send-option codes, comma-separated
    note: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # short-note text, every mail
    order_json: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # order.json, every mail
    deid_secret: str | None = Field(default=None, max_length=128)  # anonymised: per-job secret (hex), never sent
    deid_options: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # Annex E options JSON
    report_blob: str | None = Field(default=None, max_length=64)  # with-report: the Encapsulated PDF made for it
    # "transfer": DICOM instances, one mail each; "message": one mail carrying ``order_json`` (a FHIR resource) only
    kind: str = Field(default="transfer", max_length=16, sa_column_kwargs={"server_default": "transfer"})


class OutboundMail(SQLModel, table=True):
    """One instance mail of a transfer job (one DRG set part)."""

    __tablename__ = "outbound_mail"
    __table_args__ = (
        UniqueConstraint("job_pk", "set_part", name="uq_outbound_mail_part"),
        UniqueConstraint("message_id", name="uq_outbound_mail_message_id"),
        Index("ix_outbound_mail_due", "state", "run_after"),
        Index("ix_outbound_mail_job", "job_pk", "state"),
    )

    pk: int | None = Field(default=None, primary_key=True)
    tenant: str = Field(max_length=64)
    job_pk: int = Field(sa_column=Column(Integer, ForeignKey("transfer_job.pk", ondelete="CASCADE"),
                                         nullable=False))
    set_part: int
    sop_instance_uid: str = Field(max_length=64)
    message_id: str | None = Field(default=None, max_length=255)
    state: str = Field(max_length=24)
    attempts: int = 0
    run_after: float
    lease_until: float | None = None
    sent_at: float | None = None
    acknowledged_at: float | None = None
    disposition: str | None = Field(default=None, max_length=128)
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    size: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))  # DICOM bytes sent


class OutboundMdn(SQLModel, table=True):
    """A receipt (RFC 3798 MDN) we owe a sender: queued once the instance is durably stored."""

    __tablename__ = "outbound_mdn"
    __table_args__ = (Index("ix_outbound_mdn_due", "state", "run_after"),)

    pk: int | None = Field(default=None, primary_key=True)
    tenant: str = Field(max_length=64)
    to_address: str = Field(max_length=320)
    original_message_id: str = Field(max_length=255)
    params: str = Field(sa_column=Column(Text, nullable=False))  # JSON: disposition, sender account, ...
    state: str = Field(max_length=16)  # pending | sent | dead
    attempts: int = 0
    run_after: float
    created: float
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class InboundMail(SQLModel, table=True):
    """One received raw mail (its bytes in the blob store); Message-ID dedup per tenant."""

    __tablename__ = "inbound_mail"
    __table_args__ = (UniqueConstraint("tenant", "message_id", name="uq_inbound_mail"),)

    pk: int | None = Field(default=None, primary_key=True)
    tenant: str = Field(max_length=64)
    message_id: str = Field(max_length=255)
    sender: str | None = Field(default=None, max_length=320)
    received_at: float
    raw_sha256: str = Field(max_length=64)
    size: int
    state: str = Field(max_length=16)  # received | imported | fragment | quarantined | mdn
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class InboundFragment(SQLModel, table=True):
    """One RFC 2046 message/partial fragment, buffered until all of its id arrived."""

    __tablename__ = "inbound_fragment"
    __table_args__ = (UniqueConstraint("tenant", "partial_id", "number", name="uq_inbound_fragment"),)

    pk: int | None = Field(default=None, primary_key=True)
    tenant: str = Field(max_length=64)
    partial_id: str = Field(max_length=255)
    number: int
    total: int | None = None
    blob_sha256: str = Field(max_length=64)
    received_at: float


class InboundSet(SQLModel, table=True):
    """A DRG set (X-TELEMEDICINE-SETID) being collected from one sender."""

    __tablename__ = "inbound_set"
    __table_args__ = (
        UniqueConstraint("tenant", "sender", "set_id", name="uq_inbound_set"),
        Index("ix_inbound_set_state", "state", "last_seen"),
    )

    pk: int | None = Field(default=None, primary_key=True)
    tenant: str = Field(max_length=64)
    set_id: str = Field(max_length=128)
    sender: str = Field(max_length=320)
    study_uid: str | None = Field(default=None, max_length=64)
    total: int
    parts_seen: int = 0
    state: str = Field(max_length=24)  # collecting | complete | imported | reported-incomplete | discarded
    first_seen: float
    last_seen: float
    order_json: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # order.json of a part
    note: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # text/plain note of a part
    emergency: bool | None = None  # any part flagged as emergency (DRG priority)
    consult_task: str | None = Field(default=None, max_length=64)  # the consult Task created for the set


class InboundPart(SQLModel, table=True):
    """One decrypted, verified instance of an inbound set (its DICOM bytes in the blob store)."""

    __tablename__ = "inbound_part"
    __table_args__ = (UniqueConstraint("set_pk", "set_part", name="uq_inbound_part"),)

    pk: int | None = Field(default=None, primary_key=True)
    tenant: str = Field(max_length=64)
    set_pk: int = Field(sa_column=Column(Integer, ForeignKey("inbound_set.pk", ondelete="CASCADE"),
                                         nullable=False))
    set_part: int
    sop_instance_uid: str | None = Field(default=None, max_length=64)
    blob_sha256: str = Field(max_length=64)
    message_id: str | None = Field(default=None, max_length=255)
    received_at: float
    size: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))  # DICOM bytes received


class Quarantine(SQLModel, table=True):
    """A mail we refused to import (unsigned, unverifiable, malformed, ...), kept for the operator."""

    __tablename__ = "quarantine"
    __table_args__ = (Index("ix_quarantine_tenant", "tenant", "created"),)

    pk: int | None = Field(default=None, primary_key=True)
    tenant: str = Field(max_length=64)
    raw_sha256: str = Field(max_length=64)
    reason: str = Field(max_length=64)
    message: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    sender: str | None = Field(default=None, max_length=320)
    message_id: str | None = Field(default=None, max_length=255)
    created: float
