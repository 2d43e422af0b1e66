"""SQL tables of the DICOM index. Every row belongs to a tenant; every query filters on it.

The matchable columns follow ``server.dicom.attributes.INDEXED``; person names have a normalised
(``*_norm``: upper case, accents folded) and a phonetic (``*_phonetic``: Koelner Phonetik codes, space
separated and padded) companion for case-insensitive and fuzzy matching. ``attrs`` holds the DICOM JSON
(PS3.18 F.2) of the level's return attributes, precomputed at ingest; ``Instance.meta`` holds the whole
instance's DICOM JSON with bulk data as BulkDataURI whose base is the placeholder ``\\x01``.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import Column, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _text() -> Column:
    return Column(Text, nullable=True)


class Study(SQLModel, table=True):
    """One study (with the patient attributes of the Study Root model)."""

    __tablename__ = "study"
    __table_args__ = (
        UniqueConstraint("tenant", "study_uid", name="uq_study_tenant_uid"),
        Index("ix_study_tenant_date_time", "tenant", "study_date", "study_time"),
        Index("ix_study_tenant_patient_id", "tenant", "patient_id"),
        Index("ix_study_tenant_pn", "tenant", "patient_name_norm"),
        Index("ix_study_tenant_accession", "tenant", "accession_number"),
    )

    id: int | None = Field(default=None, primary_key=True)
    tenant: str = Field(max_length=64)
    study_uid: str = Field(max_length=64)
    patient_name: str | None = None
    patient_name_norm: str | None = None
    patient_name_phonetic: str | None = None
    patient_id: str | None = None
    issuer_of_patient_id: str | None = None
    patient_birth_date: str | None = Field(default=None, max_length=8)
    patient_sex: str | None = Field(default=None, max_length=16)
    study_date: str | None = Field(default=None, max_length=8)
    study_time: str | None = Field(default=None, max_length=16)
    accession_number: str | None = None
    modalities_in_study: str | None = None
    referring_physician_name: str | None = None
    referring_physician_name_norm: str | None = None
    referring_physician_name_phonetic: str | None = None
    study_description: str | None = None
    study_id: str | None = None
    timezone_offset_from_utc: str | None = Field(default=None, max_length=16)
    number_of_series: int = 0
    number_of_instances: int = 0
    attrs: str = Field(sa_column=Column(Text, nullable=False))
    revision: int = 0
    created_at: datetime = Field(default_factory=_now)
    updated_at: datetime = Field(default_factory=_now)


class Series(SQLModel, table=True):
    """One series of a study."""

    __tablename__ = "series"
    __table_args__ = (
        UniqueConstraint("tenant", "series_uid", name="uq_series_tenant_uid"),
        Index("ix_series_study", "study_pk"),
        Index("ix_series_tenant_modality", "tenant", "modality"),
    )

    id: int | None = Field(default=None, primary_key=True)
    tenant: str = Field(max_length=64)
    study_pk: int = Field(foreign_key="study.id")
    study_uid: str = Field(max_length=64)
    series_uid: str = Field(max_length=64)
    modality: str | None = Field(default=None, max_length=16)
    series_number: int | None = None
    series_description: str | None = None
    body_part_examined: str | None = None
    series_date: str | None = Field(default=None, max_length=8)
    series_time: str | None = Field(default=None, max_length=16)
    pps_start_date: str | None = Field(default=None, max_length=8)
    pps_start_time: str | None = Field(default=None, max_length=16)
    manufacturer: str | None = None
    institution_name: str | None = None
    number_of_instances: int = 0
    transfer_syntaxes: str | None = Field(default=None, description="backslash-joined, sorted")
    attrs: str = Field(sa_column=Column(Text, nullable=False))
    revision: int = 0
    created_at: datetime = Field(default_factory=_now)


class Instance(SQLModel, table=True):
    """One stored SOP Instance: its blob, its index values and its precomputed metadata."""

    __tablename__ = "instance"
    __table_args__ = (
        UniqueConstraint("tenant", "sop_uid", name="uq_instance_tenant_uid"),
        Index("ix_instance_series", "series_pk"),
        Index("ix_instance_study", "study_pk"),
    )

    id: int | None = Field(default=None, primary_key=True)
    tenant: str = Field(max_length=64)
    study_pk: int = Field(foreign_key="study.id")
    series_pk: int = Field(foreign_key="series.id")
    study_uid: str = Field(max_length=64)
    series_uid: str = Field(max_length=64)
    sop_uid: str = Field(max_length=64)
    sop_class_uid: str = Field(max_length=64)
    instance_number: int | None = None
    content_date: str | None = Field(default=None, max_length=8)
    content_time: str | None = Field(default=None, max_length=16)
    acquisition_datetime: str | None = Field(default=None, max_length=32)
    rows: int | None = None
    columns: int | None = None
    bits_allocated: int | None = None
    number_of_frames: int | None = None
    completion_flag: str | None = Field(default=None, max_length=16)
    verification_flag: str | None = Field(default=None, max_length=16)
    transfer_syntax_uid: str = Field(max_length=64)
    blob: str = Field(max_length=64, description="sha256 hex of the stored Part 10 bytes")
    size: int
    attrs: str = Field(sa_column=Column(Text, nullable=False))
    meta: str = Field(sa_column=Column(Text, nullable=False))
    bulk: str = Field(sa_column=Column(Text, nullable=False), description="JSON: tag path -> [offset, length]")
    created_at: datetime = Field(default_factory=_now)
