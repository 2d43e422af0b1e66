"""All FHIR SQL: current resources, history, search index, and search translated to bound SQL.

Every statement filters on the tenant. Transactions are owned here: ``FhirStore.transaction`` commits on
success (writers take the write lock first: ``writer(engine)``); services call the ``FhirTx`` methods only.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import orjson
from sqlalchemy import and_, false, func, not_, or_, select, text, true
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from server.errors import ErrorKind, ServerError
from server.fhir import params as P
from server.store.db import writer
from server.store.fhir_models import FhirHistory, FhirIndex, FhirResource

R = FhirResource.__table__
H = FhirHistory.__table__
IX = FhirIndex.__table__

# Hot statements as driver SQL with positional parameters (``?``; ``%s`` on PostgreSQL): the per-request cost of
# building, cache-keying and compiling SQLAlchemy expressions was larger than the statements themselves.
_RESOURCE_COLS = "pk, resource_type, resource_id, version_id, last_updated, deleted, content"
_CURRENT = (f"SELECT {_RESOURCE_COLS} FROM fhir_resource "
            "WHERE tenant = ? AND resource_type = ? AND resource_id = ?")
_INSERT_RESOURCE = ("INSERT INTO fhir_resource (tenant, resource_type, resource_id, version_id, last_updated, "
                    "deleted, content) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING pk")
_UPDATE_RESOURCE = ("UPDATE fhir_resource SET version_id = ?, last_updated = ?, deleted = ?, content = ? "
                    "WHERE tenant = ? AND resource_type = ? AND resource_id = ? AND version_id = ? RETURNING pk")
_INSERT_HISTORY = ("INSERT INTO fhir_history (tenant, resource_type, resource_id, version_id, last_updated, "
                   "deleted, method, content) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_DELETE_INDEX = "DELETE FROM fhir_index WHERE resource_pk = ?"
_INDEX_COLS = "(tenant, resource_type, resource_pk, param, system, value, exact, low, high)"
_INDEX_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?)"
_INDEX_ROWS_PER_INSERT = 200  # 1,800 parameters per statement: below SQLite's and PostgreSQL's limits


@functools.lru_cache(maxsize=512)
def _driver_sql(sql: str, dialect: str) -> str:
    """``sql`` (``?`` placeholders, no literal ``?`` or ``%``) in the parameter style of the driver."""
    return sql.replace("?", "%s") if dialect == "postgresql" else sql


@functools.lru_cache(maxsize=512)
def _in_list(n: int) -> str:
    return ", ".join("?" * n)


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
        if not self.content:
            return {}
        try:
            return orjson.loads(self.content)
        except orjson.JSONDecodeError:  # e.g. an integer beyond 64 bits, which json reads
            return json.loads(self.content)


def _stored(row, method: str = "PUT") -> Stored:
    return Stored(row.resource_type, row.resource_id, row.version_id, row.last_updated, bool(row.deleted),
                  row.content, getattr(row, "method", method))


class FhirStore:
    """The FHIR tables of one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._writer = writer(engine)
        self._group = _GroupCommit(self._writer) if engine.dialect.name == "sqlite" else None

    @contextmanager
    def transaction(self, tenant: str, *, write: bool) -> Iterator["FhirTx"]:
        """A transaction for ``tenant``; commits when the block succeeds, rolls back otherwise.

        SQLite writers of this process go through group commit (``_GroupCommit``): the block still returns only
        after its changes are committed.
        """
        if write and self._group is not None and not self._group.inside():
            with _mapped():
                with self._group.transaction() as conn:
                    yield FhirTx(conn, tenant)
            return
        with _mapped():
            with (self._writer if write else self.engine).begin() as conn:
                yield FhirTx(conn, tenant)


@contextmanager
def _mapped() -> Iterator[None]:
    try:
        yield
    except IntegrityError as exc:
        raise ServerError(ErrorKind.CONFLICT, "concurrent change of the same resource; retry") from exc
    except OperationalError as exc:
        raise ServerError(ErrorKind.TIMEOUT, "the store is busy; retry") from exc


class _GroupCommit:
    """Group commit of the SQLite write transactions of one process.

    SQLite has one writer at a time and every commit waits for an fsync of the WAL (synchronous=FULL). Writers
    of this process take turns on one connection: each runs in a SAVEPOINT of a shared transaction (a failing
    block rolls back to it, the others are kept); the writer that finds nobody waiting commits the group. Every
    block returns only after the COMMIT that contains it succeeded, and raises if that COMMIT failed, so a
    client is answered after its change is durable, as with one transaction per request. Waiting threads queue
    on a lock rather than in SQLite's busy handler, which polls with sleeps of up to 100 ms.
    """

    MAX_GROUP = 64

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        database = engine.url.database
        # Worker processes on the same file take turns per group through an advisory lock next to it (the
        # kernel wakes the next process at once; SQLite's busy handler would poll).
        self.lock_path = f"{database}-fhir-writer.lock" if database and database != ":memory:" else None
        self.lock_fd: int | None = None
        self.turn = threading.Lock()  # one writer at a time on the shared connection
        self.done = threading.Condition(threading.Lock())
        self.local = threading.local()
        self.waiting = 0  # threads waiting for their turn
        self.conn: Connection | None = None
        self.trans = None
        self.group = 0  # number of the open (or last) group
        self.members = 0
        self.committed = 0  # last group whose COMMIT finished
        self.failed: dict[int, BaseException] = {}

    def inside(self) -> bool:
        """True in a thread already inside a write block (a nested write takes its own transaction)."""
        return getattr(self.local, "inside", False)

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self.done:
            self.waiting += 1
        self.turn.acquire()
        with self.done:
            self.waiting -= 1
        self.local.inside = True
        try:
            if self.conn is None:
                self._begin()
            group = self.group
            self.members += 1
            savepoint = self.conn.begin_nested()
            try:
                yield self.conn
            except BaseException:
                savepoint.rollback()
                raise
            else:
                savepoint.commit()
            finally:
                self._maybe_commit()
        finally:
            self.local.inside = False
            self.turn.release()
        with self.done:  # outside our turn: the next writers join the group while we wait for its COMMIT
            while self.committed < group:
                self.done.wait()
            error = self.failed.get(group)
        if error is not None:
            raise ServerError(ErrorKind.TIMEOUT, "the store could not commit; retry") from error

    def _begin(self) -> None:
        self._lock_file()
        try:
            conn = self.engine.connect()
            try:
                self.trans = conn.begin()
            except BaseException:
                conn.close()
                raise
        except BaseException:
            self._unlock_file()
            raise
        self.conn = conn
        self.group += 1
        self.members = 0

    def _lock_file(self) -> None:
        if self.lock_path is None:
            return
        if self.lock_fd is None:
            self.lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)

    def _unlock_file(self) -> None:
        if self.lock_fd is not None:
            fcntl.flock(self.lock_fd, fcntl.LOCK_UN)

    def _maybe_commit(self) -> None:
        """Commit the group unless more writers are waiting to join it (called holding the turn)."""
        with self.done:
            if self.waiting and self.members < self.MAX_GROUP:
                return
        conn, trans, group = self.conn, self.trans, self.group
        self.conn = self.trans = None
        error = None
        try:
            trans.commit()
        except BaseException as exc:  # noqa: BLE001 - handed to every member of the group
            error = exc
            try:
                trans.rollback()
            except Exception:  # noqa: BLE001
                pass
        finally:
            conn.close()
            self._unlock_file()
        with self.done:
            if error is not None:
                self.failed[group] = error
            self.failed.pop(group - 1000, None)
            self.committed = group
            self.done.notify_all()


class FhirTx:
    """Reads and writes of one tenant inside one transaction."""

    def __init__(self, conn: Connection, tenant: str) -> None:
        self.conn = conn
        self.tenant = tenant
        self._dialect = conn.dialect.name

    def _alias(self, table, prefix: str):
        """The next alias of ``table`` for the statement being built (named: compiled once, cached)."""
        n = self._aliases = getattr(self, "_aliases", 0) + 1
        return _named_alias(table, f"{prefix}{n}")

    def _sql(self, sql: str, params: tuple | list[tuple]):
        """Run driver SQL written with ``?`` placeholders (bound parameters only)."""
        return self.conn.exec_driver_sql(_driver_sql(sql, self._dialect), params)

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
        sql = _CURRENT + (" FOR UPDATE" if lock and self._dialect == "postgresql" else "")
        row = self._sql(sql, (self.tenant, rtype, rid)).first()
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
        """(total, page) of current resources matching ``query``.

        The page is read first; when it is the first page and not full, its length is the total and the
        count query is skipped.
        """
        self._aliases = 0
        cond = self._matching(query.resource_type, query.clauses, R)
        if query.summary_count or query.count == 0:
            return self._count(query, cond), []
        stmt = select(R).where(cond).order_by(*self._order(query), R.c.pk).limit(query.count).offset(query.offset)
        page = [_stored(r) for r in self.conn.execute(stmt).all()]
        if query.offset == 0 and len(page) < query.count:
            return len(page), page
        return self._count(query, cond), page

    def _count(self, query: P.Query, cond) -> int:
        if len(query.clauses) == 1 and _narrows(query.clauses[0]):
            # one index clause: count its distinct resources in the index alone (a deleted resource has no
            # index rows), not by looking up every matching resource
            stmt = self._rows(query.resource_type, query.clauses[0], count=True)
        else:
            stmt = select(func.count()).select_from(R).where(cond)
        return self.conn.execute(stmt).scalar_one()

    def by_ids(self, rtype: str, ids: Sequence[str]) -> list[Stored]:
        """The live resources of ``rtype`` with these ids."""
        if not ids:
            return []
        ids = list(dict.fromkeys(ids))
        rows = []
        for at in range(0, len(ids), 500):
            chunk = ids[at:at + 500]
            rows += self._sql(f"SELECT {_RESOURCE_COLS} FROM fhir_resource WHERE tenant = ? AND resource_type = ? "
                              f"AND resource_id IN ({_in_list(len(chunk))}) AND deleted = ?",
                              (self.tenant, rtype, *chunk, False)).all()
        return [_stored(r) for r in rows]

    def references(self, rtype: str, ids: Sequence[str], param: str, target: str | None) -> list[tuple[str, str]]:
        """The (type, id) targets of reference parameter ``param`` of these resources (_include)."""
        if not ids:
            return []
        ids = list(dict.fromkeys(ids))
        out: dict[tuple[str, str], None] = {}
        for at in range(0, len(ids), 500):
            chunk = ids[at:at + 500]
            # the resources by id first, then their index rows by (resource_pk, param); CROSS JOIN keeps that
            # order in SQLite (PostgreSQL plans it freely)
            sql = ("SELECT DISTINCT ix.system, ix.value FROM fhir_resource r CROSS JOIN fhir_index ix "
                   f"WHERE r.tenant = ? AND r.resource_type = ? AND r.resource_id IN ({_in_list(len(chunk))}) "
                   "AND ix.resource_pk = r.pk AND ix.param = ?")
            params = (self.tenant, rtype, *chunk, param)
            if target:
                sql += " AND ix.system = ?"
                params += (target,)
            for row in self._sql(sql, params):
                out[(row.system, row.value)] = None
        return list(out)

    def referencing(self, source: str, param: str, target: str, ids: Sequence[str]) -> list[Stored]:
        """The live resources of ``source`` whose ``param`` points at these ids of ``target`` (_revinclude)."""
        if not ids:
            return []
        sub = select(IX.c.resource_pk).where(IX.c.tenant == self.tenant, IX.c.resource_type == source,
                                             IX.c.param == param, IX.c.system == target,
                                             IX.c.value.in_(list(ids)))
        # the index rows carry the tenant; the resource is found by primary key
        rows = self.conn.execute(select(R).where(R.c.pk.in_(sub), R.c.deleted == false())).all()
        return [_stored(r) for r in rows]

    # ---- writes ---------------------------------------------------------------------------------------
    def put(self, rtype: str, rid: str, version: int, last_updated: str, content: str,
            values: list[P.IndexValue], *, method: str) -> None:
        """Store a new version as current, append it to history and replace its index rows."""
        pk = self._upsert(rtype, rid, version, last_updated, False, content)
        self._history(rtype, rid, version, last_updated, False, method, content)
        if version > 1:  # a new resource has no index rows yet
            self._sql(_DELETE_INDEX, (pk,))
        tenant = self.tenant
        for at in range(0, len(values), _INDEX_ROWS_PER_INSERT):  # multi-row INSERTs: one round trip each
            chunk = values[at:at + _INDEX_ROWS_PER_INSERT]
            params: list = []
            for v in chunk:
                params += (tenant, rtype, pk, v.param, v.system, v.value, v.exact, v.low, v.high)
            self._sql(_insert_index(len(chunk)), tuple(params))

    def delete(self, rtype: str, rid: str, version: int, last_updated: str) -> None:
        """Mark a resource deleted: a content-less version, no index rows (FHIR R4 3.1.0.7)."""
        pk = self._upsert(rtype, rid, version, last_updated, True, None)
        self._history(rtype, rid, version, last_updated, True, "DELETE", None)
        self._sql(_DELETE_INDEX, (pk,))

    def _upsert(self, rtype, rid, version, last_updated, deleted, content) -> int:
        if version > 1:
            pk = self._sql(_UPDATE_RESOURCE, (version, last_updated, deleted, content, self.tenant, rtype, rid,
                                              version - 1)).scalar()
            if pk is not None:
                return pk
            raise ServerError(ErrorKind.CONFLICT, "concurrent change of the same resource; retry")
        return self._sql(_INSERT_RESOURCE, (self.tenant, rtype, rid, version, last_updated, deleted,
                                            content)).scalar_one()

    def _history(self, rtype, rid, version, last_updated, deleted, method, content) -> None:
        self._sql(_INSERT_HISTORY, (self.tenant, rtype, rid, version, last_updated, deleted, method, content))

    # ---- search SQL -----------------------------------------------------------------------------------
    def _matching(self, rtype: str, clauses: list[P.Clause], r):
        cond = [r.c.deleted == false()]
        if not any(_narrows(c) for c in clauses):
            cond += [r.c.tenant == self.tenant, r.c.resource_type == rtype]
        # else: a ``pk IN (index rows of this tenant and type)`` clause implies tenant and type; leaving them
        # out lets SQLite look the matches up by primary key instead of scanning all resources of the type
        cond.extend(self._clause(rtype, c, r) for c in clauses)
        return and_(*cond)

    def _clause(self, rtype: str, clause: P.Clause, r):
        if clause.kind == "id":
            return r.c.resource_id.in_([a.code for a in clause.alts])
        if clause.kind == "lastUpdated":
            return or_(*(_date_match(a, r.c.last_updated, r.c.last_updated) for a in clause.alts))
        # IN (rows of the value index) rather than a correlated EXISTS: uses ix_fhir_index_lookup (covering)
        having = r.c.pk.in_(self._rows(rtype, clause))
        if clause.modifier == "missing":
            return not_(having) if clause.alts[0].code == "true" else having
        return not_(having) if clause.modifier == "not" else having

    def _rows(self, rtype: str, clause: P.Clause, *, count: bool = False):
        """SELECT resource_pk (or the count of distinct ones) of the index rows a clause (not _id/_lastUpdated)
        looks for, before not/missing."""
        ix = self._alias(IX, "ix")
        what = func.count(ix.c.resource_pk.distinct()) if count else ix.c.resource_pk
        base = [ix.c.tenant == self.tenant, ix.c.resource_type == rtype, ix.c.param == clause.param]
        if clause.modifier == "missing":
            return select(what).where(*base)
        if clause.kind == "chain":
            r2 = self._alias(R, "r")
            inner = select(r2.c.resource_id).where(self._matching(clause.target, [clause.chain], r2))
            return select(what).where(*base, ix.c.system == clause.target, ix.c.value.in_(inner))
        alts = or_(*(self._alt(clause, a, ix) for a in clause.alts))
        return select(what).where(*base, alts)

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
                ix = self._alias(IX, "ix")
                column = ix.c.low if kind == P.DATE else ix.c.value
                whole = [ix.c.exact.isnot(None)] if kind == P.STRING else []  # not the word-start rows
                col = select(func.min(column)).where(ix.c.resource_pk == R.c.pk, ix.c.param == key, *whole)
                col = col.scalar_subquery()
            out.append(col.desc() if desc else col.asc())
        return out


@functools.lru_cache(maxsize=256)
def _named_alias(table, name: str):
    """One alias object per name: building it (column proxies, events) cost more than running a search."""
    return table.alias(name)


@functools.lru_cache(maxsize=_INDEX_ROWS_PER_INSERT)
def _insert_index(rows: int) -> str:
    return f"INSERT INTO fhir_index {_INDEX_COLS} VALUES " + ", ".join([_INDEX_ROW] * rows)


def _narrows(clause: P.Clause) -> bool:
    """True for a clause that becomes ``pk IN (index rows of the tenant and type)``."""
    if clause.kind in ("id", "lastUpdated") or clause.modifier == "not":
        return False
    if clause.modifier == "missing":
        return clause.alts[0].code != "true"
    return True


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
