"""SQL tables of the FHIR store. Every row belongs to a tenant; every query filters on it.

``fhir_resource`` holds the current version of each resource (``deleted`` after a delete, FHIR R4 3.1.0.7),
``fhir_history`` every version (3.1.0.11), ``fhir_index`` the search values of the current version, one row
per value: tokens (``system``, ``value`` = code), strings (``value`` folded, ``exact`` as written),
references (``system`` = target type, ``value`` = target id) and dates (``low``/``high``, UTC, fixed width).
Instants are stored as fixed-width UTC text (``YYYY-MM-DDTHH:MM:SS.ffffff``) so they compare as strings.
"""

from __future__ import annotations

from sqlalchemy import Column, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


class FhirResource(SQLModel, table=True):
    """The current version of one resource of a tenant."""

    __tablename__ = "fhir_resource"
    __table_args__ = (
        UniqueConstraint("tenant", "resource_type", "resource_id", name="uq_fhir_resource"),
        Index("ix_fhir_resource_updated", "tenant", "resource_type", "last_updated"),
    )

    pk: int | None = Field(default=None, primary_key=True)
    tenant: str = Field(max_length=64)
    resource_type: str = Field(max_length=64)
    resource_id: str = Field(max_length=64)
    version_id: int
    last_updated: str = Field(max_length=32)
    deleted: bool = False
    content: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class FhirHistory(SQLModel, table=True):
    """One version of a resource (a delete is a version without content)."""

    __tablename__ = "fhir_history"
    __table_args__ = (
        UniqueConstraint("tenant", "resource_type", "resource_id", "version_id", name="uq_fhir_history"),
        Index("ix_fhir_history_updated", "tenant", "resource_type", "last_updated"),
    )

    pk: int | None = Field(default=None, primary_key=True)
    tenant: str = Field(max_length=64)
    resource_type: str = Field(max_length=64)
    resource_id: str = Field(max_length=64)
    version_id: int
    last_updated: str = Field(max_length=32)
    deleted: bool = False
    method: str = Field(max_length=8)
    content: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class FhirIndex(SQLModel, table=True):
    """One search value of the current version of a resource."""

    __tablename__ = "fhir_index"
    __table_args__ = (
        # covering: a token, reference or string prefix search reads the matching resource_pk from the index alone
        Index("ix_fhir_index_lookup", "tenant", "resource_type", "param", "value", "system", "resource_pk"),
        Index("ix_fhir_index_resource", "resource_pk", "param"),
    )

    pk: int | None = Field(default=None, primary_key=True)
    tenant: str = Field(max_length=64)
    resource_type: str = Field(max_length=64)
    resource_pk: int = Field(foreign_key="fhir_resource.pk")
    param: str = Field(max_length=64)
    system: str | None = None
    value: str | None = None
    exact: str | None = None
    low: str | None = Field(default=None, max_length=32)
    high: str | None = Field(default=None, max_length=32)
