"""All FHIR SQL: current resources, history, search index, and search translated to bound SQL.

Every statement filters on the tenant. Transactions are owned here: ``FhirStore.transaction`` commits on
success (writers take the write lock first: ``writer(engine)``); services call the ``FhirTx`` methods only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import and_, delete, false, func, insert, not_, or_, select, text, true, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from server.errors import ErrorKind, ServerError
from server.fhir import params as P
from server.store.db import writer
from server.store.fhir_models import FhirHistory, FhirIndex, FhirResource

R = FhirResource.__table__
H = FhirHistory.__table__
IX = FhirIndex.__table__


@dataclass(frozen=True)
class Stored:
    """One stored version of a resource."""

    resource_type: str
    resource_id: str
    version_id: int
    last_updated: str
    deleted: bool
    content: str | None
    method: str = "PUT"

    def resource(self) -> dict:
        """The resource JSON (with meta as stored)."""
        return json.loads(self.content) if self.content else {}


def _stored(row, method: str = "PUT") -> Stored:
    return Stored(row.resource_type, row.resource_id, row.version_id, row.last_updated, bool(row.deleted),
                  row.content, getattr(row, "method", method))


class FhirStore:
    """The FHIR tables of one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextmanager
    def transaction(self, tenant: str, *, write: bool) -> Iterator["FhirTx"]:
        """A transaction for ``tenant``; commits when the block succeeds, rolls back otherwise."""
        engine = writer(self.engine) if write else self.engine
        try:
            with engine.begin() as conn:
                yield FhirTx(conn, tenant)
        except IntegrityError as exc:
            raise ServerError(ErrorKind.CONFLICT, "concurrent change of the same resource; retry") from exc
        except OperationalError as exc:
            raise ServerError(ErrorKind.TIMEOUT, "the store is busy; retry") from exc


class FhirTx:
    """Reads and writes of one tenant inside one transaction."""

    def __init__(self, conn: Connection, tenant: str) -> None:
        self.conn = conn
        self.tenant = tenant

    def serialize(self, key: str) -> None:
        """Serialise check-then-write sequences on ``key`` (conditional create/update) until commit.

        PostgreSQL: a transaction-level advisory lock; SQLite: writers already hold the database lock.
        """
        if self.conn.dialect.name == "postgresql":
            self.conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                              {"key": f"{self.tenant}/{key}"})

    # ---- reads ----------------------------------------------------------------------------------------
    def current(self, rtype: str, rid: str, *, lock: bool = False) -> Stored | None:
        """The current version (maybe deleted) of a resource, or None."""
        stmt = select(R).where(R.c.tenant == self.tenant, R.c.resource_type == rtype, R.c.resource_id == rid)
        if lock:
            stmt = stmt.with_for_update()
        row = self.conn.execute(stmt).first()
        return _stored(row) if row else None

    def version(self, rtype: str, rid: str, vid: int) -> Stored | None:
        """One version of a resource, or None."""
        row = self.conn.execute(select(H).where(
            H.c.tenant == self.tenant, H.c.resource_type == rtype, H.c.resource_id == rid,
            H.c.version_id == vid)).first()
        return _stored(row) if row else None

    def history(self, rtype: str | None, rid: str | None, *, since: str | None, count: int,
                offset: int) -> tuple[int, list[Stored]]:
        """(total, page) of versions, newest first (FHIR R4 3.1.0.11)."""
        cond = [H.c.tenant == self.tenant]
        if rtype:
            cond.append(H.c.resource_type == rtype)
        if rid:
            cond.append(H.c.resource_id == rid)
        if since:
            cond.append(H.c.last_updated >= since)
        total = self.conn.execute(select(func.count()).select_from(H).where(*cond)).scalar_one()
        rows = self.conn.execute(select(H).where(*cond).order_by(H.c.last_updated.desc(), H.c.pk.desc())
                                 .limit(count).offset(offset)).all()
        return total, [_stored(r) for r in rows]

    def search(self, query: P.Query) -> tuple[int, list[Stored]]:
        """(total, page) of current resources matching ``query``."""
        cond = self._matching(query.resource_type, query.clauses, R)
        total = self.conn.execute(select(func.count()).select_from(R).where(cond)).scalar_one()
        if query.summary_count or query.count == 0:
            return total, []
        stmt = select(R).where(cond).order_by(*self._order(query), R.c.pk).limit(query.count).offset(query.offset)
        return total, [_stored(r) for r in self.conn.execute(stmt).all()]

    def by_ids(self, rtype: str, ids: Sequence[str]) -> list[Stored]:
        """The live resources of ``rtype`` with these ids."""
        if not ids:
            return []
        rows = self.conn.execute(select(R).where(R.c.tenant == self.tenant, R.c.resource_type == rtype,
                                                 R.c.resource_id.in_(list(ids)), R.c.deleted == false())).all()
        return [_stored(r) for r in rows]

    def references(self, rtype: str, ids: Sequence[str], param: str, target: str | None) -> list[tuple[str, str]]:
        """The (type, id) targets of reference parameter ``param`` of these resources (_include)."""
        if not ids:
            return []
        cond = [IX.c.tenant == self.tenant, IX.c.resource_type == rtype, IX.c.param == param,
                R.c.resource_id.in_(list(ids))]
        if target:
            cond.append(IX.c.system == target)
        rows = self.conn.execute(select(IX.c.system, IX.c.value).join(R, R.c.pk == IX.c.resource_pk)
                                 .where(*cond).distinct()).all()
        return [(r.system, r.value) for r in rows]

    def referencing(self, source: str, param: str, target: str, ids: Sequence[str]) -> list[Stored]:
        """The live resources of ``source`` whose ``param`` points at these ids of ``target`` (_revinclude)."""
        if not ids:
            return []
        sub = select(IX.c.resource_pk).where(IX.c.tenant == self.tenant, IX.c.resource_type == source,
                                             IX.c.param == param, IX.c.system == target,
                                             IX.c.value.in_(list(ids)))
        rows = self.conn.execute(select(R).where(R.c.tenant == self.tenant, R.c.pk.in_(sub),
                                                 R.c.deleted == false())).all()
        return [_stored(r) for r in rows]

    # ---- writes ---------------------------------------------------------------------------------------
    def put(self, rtype: str, rid: str, version: int, last_updated: str, content: str,
            values: list[P.IndexValue], *, method: str) -> None:
        """Store a new version as current, append it to history and replace its index rows."""
        pk = self._upsert(rtype, rid, version, last_updated, False, content)
        self._history(rtype, rid, version, last_updated, False, method, content)
        self.conn.execute(delete(IX).where(IX.c.resource_pk == pk))
        if values:
            self.conn.execute(insert(IX), [
                {"tenant": self.tenant, "resource_type": rtype, "resource_pk": pk, "param": v.param,
                 "system": v.system, "value": v.value, "exact": v.exact, "low": v.low, "high": v.high}
                for v in values])

    def delete(self, rtype: str, rid: str, version: int, last_updated: str) -> None:
        """Mark a resource deleted: a content-less version, no index rows (FHIR R4 3.1.0.7)."""
        pk = self._upsert(rtype, rid, version, last_updated, True, None)
        self._history(rtype, rid, version, last_updated, True, "DELETE", None)
        self.conn.execute(delete(IX).where(IX.c.resource_pk == pk))

    def _upsert(self, rtype, rid, version, last_updated, deleted, content) -> int:
        values = {"version_id": version, "last_updated": last_updated, "deleted": deleted, "content": content}
        key = and_(R.c.tenant == self.tenant, R.c.resource_type == rtype, R.c.resource_id == rid)
        if version > 1:
            done = self.conn.execute(update(R).where(key, R.c.version_id == version - 1).values(**values))
            if done.rowcount == 1:
                return self.conn.execute(select(R.c.pk).where(key)).scalar_one()
            raise ServerError(ErrorKind.CONFLICT, "concurrent change of the same resource; retry")
        result = self.conn.execute(insert(R).values(tenant=self.tenant, resource_type=rtype, resource_id=rid,
                                                    **values))
        return result.inserted_primary_key[0]

    def _history(self, rtype, rid, version, last_updated, deleted, method, content) -> None:
        self.conn.execute(insert(H).values(tenant=self.tenant, resource_type=rtype, resource_id=rid,
                                           version_id=version, last_updated=last_updated, deleted=deleted,
                                           method=method, content=content))

    # ---- search SQL -----------------------------------------------------------------------------------
    def _matching(self, rtype: str, clauses: list[P.Clause], r):
        cond = [r.c.tenant == self.tenant, r.c.resource_type == rtype, r.c.deleted == false()]
        cond.extend(self._clause(rtype, c, r) for c in clauses)
        return and_(*cond)

    def _clause(self, rtype: str, clause: P.Clause, r):
        if clause.kind == "id":
            return r.c.resource_id.in_([a.code for a in clause.alts])
        if clause.kind == "lastUpdated":
            return or_(*(_date_match(a, r.c.last_updated, r.c.last_updated) for a in clause.alts))
        ix = IX.alias()
        # IN (rows of the value index) rather than a correlated EXISTS: uses ix_fhir_index_value
        base = [ix.c.tenant == self.tenant, ix.c.resource_type == rtype, ix.c.param == clause.param]
        if clause.modifier == "missing":
            having = r.c.pk.in_(select(ix.c.resource_pk).where(*base))
            return not_(having) if clause.alts[0].code == "true" else having
        if clause.kind == "chain":
            r2 = R.alias()
            inner = select(r2.c.resource_id).where(self._matching(clause.target, [clause.chain], r2))
            return r.c.pk.in_(select(ix.c.resource_pk).where(*base, ix.c.system == clause.target,
                                                             ix.c.value.in_(inner)))
        alts = or_(*(self._alt(clause, a, ix) for a in clause.alts))
        having = r.c.pk.in_(select(ix.c.resource_pk).where(*base, alts))
        return not_(having) if clause.modifier == "not" else having

    @staticmethod
    def _alt(clause: P.Clause, alt: P.Alt, ix):
        if clause.kind == P.STRING:
            if clause.modifier == "exact":
                return ix.c.exact == alt.code
            folded = _escape(P.fold(alt.code))
            pattern = f"%{folded}%" if clause.modifier == "contains" else f"{folded}%"
            return ix.c.value.like(pattern, escape="\\")
        if clause.kind == P.DATE:
            return _date_match(alt, ix.c.low, ix.c.high)
        cond = []
        if clause.kind == P.REFERENCE:
            if alt.system:
                cond.append(ix.c.system == alt.system)
            return and_(ix.c.value == alt.code, *cond)
        if not alt.any_system:
            cond.append(ix.c.system == alt.system if alt.system else ix.c.system.is_(None))
        if alt.code is not None:
            cond.append(ix.c.value == alt.code)
        return and_(true(), *cond)

    def _order(self, query: P.Query) -> list:
        out = []
        for key, kind, desc in query.sort:
            if key == "_id":
                col = R.c.resource_id
            elif key == "_lastUpdated":
                col = R.c.last_updated
            else:
                ix = IX.alias()
                column = ix.c.low if kind == P.DATE else ix.c.value
                whole = [ix.c.exact.isnot(None)] if kind == P.STRING else []  # not the word-start rows
                col = select(func.min(column)).where(ix.c.resource_pk == R.c.pk, ix.c.param == key, *whole)
                col = col.scalar_subquery()
            out.append(col.desc() if desc else col.asc())
        return out


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _date_match(alt: P.Alt, low_col, high_col):
    """A date prefix on a stored range (FHIR R4 3.1.1.4.2: the parameter value as an implicit range)."""
    lo, hi = alt.low, alt.high
    return {
        "eq": and_(low_col >= lo, high_col <= hi),
        "ne": or_(low_col < lo, high_col > hi),
        "gt": high_col > hi,
        "lt": low_col < lo,
        "ge": high_col >= lo,
        "le": low_col <= hi,
        "sa": low_col > hi,
        "eb": high_col < lo,
    }[alt.prefix]
