"""All SQL of the OAuth client registry: clients and used assertion ids (``jti``)."""

from __future__ import annotations

import datetime

from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from server.errors import ErrorKind, ServerError
from server.security.oauth import RegisteredClient
from server.store.client_models import OAuthClient, OAuthJti
from server.store.db import writer

C = OAuthClient.__table__
J = OAuthJti.__table__


def _client(row) -> RegisteredClient:
    return RegisteredClient(client_id=row.client_id, tenant=row.tenant, scope=row.scope,
                            secret_hash=row.secret_hash, jwks=row.jwks, created=row.created)


class ClientStore:
    """The client registry of one engine (``server.security.oauth.ClientRegistry``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def add(self, client: RegisteredClient) -> RegisteredClient:
        """Register ``client``; CONFLICT when its id is taken."""
        created = client.created or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        try:
            with writer(self.engine).begin() as conn:
                conn.execute(insert(C).values(client_id=client.client_id, tenant=client.tenant, scope=client.scope,
                                              secret_hash=client.secret_hash, jwks=client.jwks, created=created))
        except IntegrityError as exc:
            raise ServerError(ErrorKind.CONFLICT, f"client {client.client_id!r} exists") from exc
        return self.get(client.client_id)  # type: ignore[return-value]

    def get(self, client_id: str) -> RegisteredClient | None:
        """The client with this id, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(C).where(C.c.client_id == client_id)).first()
        return _client(row) if row else None

    def list(self, tenant: str | None = None) -> list[RegisteredClient]:
        """All clients (of ``tenant``), ordered by tenant and registration."""
        stmt = select(C).order_by(C.c.tenant, C.c.pk)
        if tenant is not None:
            stmt = stmt.where(C.c.tenant == tenant)
        with self.engine.connect() as conn:
            return [_client(r) for r in conn.execute(stmt)]

    def remove(self, client_id: str) -> bool:
        """Remove a client and its used ``jti``s; False when there was none."""
        with writer(self.engine).begin() as conn:
            conn.execute(delete(J).where(J.c.client_id == client_id))
            return conn.execute(delete(C).where(C.c.client_id == client_id)).rowcount > 0

    def use_jti(self, client_id: str, jti: str, exp: int, now: int) -> bool:
        """Record ``jti`` until ``exp`` (expired ones are purged); False when it is already recorded (replay)."""
        try:
            with writer(self.engine).begin() as conn:
                conn.execute(delete(J).where(J.c.exp < now))
                conn.execute(insert(J).values(client_id=client_id, jti=jti, exp=exp))
        except IntegrityError:
            return False
        except OperationalError as exc:
            raise ServerError(ErrorKind.TIMEOUT, "the store is busy; retry") from exc
        return True
