"""SQL tables of the OAuth client registry (SMART Backend Services clients of ``/auth/token``).

``oauth_client`` holds each registered client: tenant, registered scopes and one credential (the scrypt hash
of a client secret, or a JWK Set of public keys). ``oauth_jti`` holds the ``jti`` of every accepted client
assertion until its ``exp`` (RFC 7523 3 item 7: replay protection).
"""

from __future__ import annotations

from sqlalchemy import Column, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


class OAuthClient(SQLModel, table=True):
    """One registered client."""

    __tablename__ = "oauth_client"
    __table_args__ = (UniqueConstraint("client_id", name="uq_oauth_client"),)

    pk: int | None = Field(default=None, primary_key=True)
    client_id: str = Field(max_length=64)
    tenant: str = Field(max_length=64)
    scope: str = Field(sa_column=Column(Text, nullable=False))
    secret_hash: str | None = Field(default=None, max_length=255)
    jwks: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created: str = Field(max_length=32)


class OAuthJti(SQLModel, table=True):
    """A used client assertion id, kept until the assertion expires."""

    __tablename__ = "oauth_jti"
    __table_args__ = (
        UniqueConstraint("client_id", "jti", name="uq_oauth_jti"),
        Index("ix_oauth_jti_exp", "exp"),
    )

    pk: int | None = Field(default=None, primary_key=True)
    client_id: str = Field(max_length=64)
    jti: str = Field(max_length=255)
    exp: int
