"""The SQL of the ImagingStudy projection (FHIR R4 imagingstudy.html over the DICOM index of ``models.py``).

A page costs at most four statements, all in one read snapshot: the page of study rows (ordered through
``ix_study_tenant_date_time`` or found through the unique (tenant, study_uid), PatientID or AccessionNumber
indexes), the count when the page does not tell the total, the series of all studies of the page (with their instances (through ``ix_instance_study``).
Series criteria (modality, series UID) are ``IN`` subqueries on the series indexes. Every statement filters on the
tenant and binds its values. A patient/subject criterion first resolves the FHIR Patients through
``FhirTx.search`` (one more statement on the FHIR index).

Measured (benchmark of 2,500 studies x 3 series x 20 instances per tenant, a loaded machine): a page of 20 studies
(1,200 instances) takes 10-20 ms on SQLite and about 20 ms on PostgreSQL, mostly building the rows; a search by
Study Instance UID, Accession Number or PatientID a few ms. ``_lastUpdated`` compares ``study.updated_at``.

The study's ``started`` range (FHIR R4 3.1.1.4.2) is the stored StudyDate + StudyTime padded to the precision of
the time: ``YYYYMMDD`` + ``HHMMSS.000000`` (low) / ``HHMMSS.999999`` (high), the whole day without a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

from sqlalchemy import ColumnElement, and_, false, func, literal, literal_column, not_, or_, select, true
from sqlalchemy.engine import Connection, Engine

from server.fhir import params as P
from server.fhir.imaging import MAX_PATIENTS, Criteria, InstanceRow, SeriesRow, StudyRow, Term
from server.store.fhir import FhirTx
from server.store.models import Instance, Series, Study

ST = Study.__table__
SE = Series.__table__
INS = Instance.__table__

_STUDY_COLUMNS = [ST.c.id, ST.c.study_uid, ST.c.revision, ST.c.updated_at, ST.c.patient_name, ST.c.patient_id,
                  ST.c.issuer_of_patient_id, ST.c.study_date, ST.c.study_time, ST.c.timezone_offset_from_utc,
                  ST.c.accession_number, ST.c.study_id, ST.c.study_description, ST.c.referring_physician_name,
                  ST.c.modalities_in_study, ST.c.number_of_series, ST.c.number_of_instances]
# terms that select few studies through an index (tenant, column): SQLite should start from it
_SELECTIVE = frozenset({"uid", "accession", "patient"})
_LAST = 2**31 - 1  # series and instances without a number sort last on both backends


class ImagingIndex:
    """Reads of the DICOM index (and the FHIR Patients) for ``server.fhir.imaging.ImagingStudyProjection``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sqlite = engine.dialect.name == "sqlite"

    def _connect(self) -> Connection:
        """A connection whose statements share one snapshot: SQLite's deferred BEGIN gives one (WAL); PostgreSQL
        needs REPEATABLE READ (else a STOW committing between the statements could show more instances than the
        study's counters)."""
        conn = self.engine.connect()
        return conn if self._sqlite else conn.execution_options(isolation_level="REPEATABLE READ")

    def study(self, tenant: str, uid: str) -> StudyRow | None:
        """The study ``uid`` of ``tenant`` with its series and instances (unique index (tenant, study_uid))."""
        with self._connect() as conn:
            row = conn.execute(select(*_STUDY_COLUMNS).where(ST.c.tenant == tenant, ST.c.study_uid == uid)).first()
            if row is None:
                return None
            return _rows(conn, tenant, [row])[0]

    def search(self, tenant: str, criteria: Criteria) -> tuple[int, list[StudyRow]]:
        """(total, page) of the studies of ``tenant`` matching ``criteria``."""
        cond = and_(ST.c.tenant == tenant, *(self._clause(tenant, terms) for terms in criteria.where))
        with self._connect() as conn:
            if criteria.summary_count or criteria.count == 0:
                return _count(conn, cond), []
            stmt = (select(*_STUDY_COLUMNS).where(cond).order_by(*self._order(criteria))
                    .limit(criteria.count).offset(criteria.offset))
            page = conn.execute(stmt).all()
            if criteria.offset == 0 and len(page) < criteria.count:
                total = len(page)
            else:
                total = _count(conn, cond)
            return total, _rows(conn, tenant, page)

    def patients(self, tenant: str, clause: P.Clause) -> list[tuple[str | None, str]]:
        """The identifiers (system, value) of the live FHIR Patients of ``tenant`` matching ``clause``."""
        with self.engine.connect() as conn:
            query = P.Query("Patient", clauses=[clause], count=MAX_PATIENTS)
            _total, found = FhirTx(conn, tenant).search(query)
        out: list[tuple[str | None, str]] = []
        for stored in found:
            for ident in stored.resource().get("identifier") or []:
                if isinstance(ident, dict) and ident.get("value"):
                    out.append((ident.get("system"), ident["value"]))
        return list(dict.fromkeys(out))

    # ---- SQL of criteria ------------------------------------------------------------------------------
    def _clause(self, tenant: str, terms: Sequence[Term]) -> ColumnElement[bool]:
        return or_(*(self._term(tenant, t) for t in terms)) if terms else false()

    def _term(self, tenant: str, t: Term) -> ColumnElement[bool]:
        if t.kind == "all":
            return true()
        if t.kind == "uid":
            return ST.c.study_uid == t.value
        if t.kind == "accession":
            return ST.c.accession_number == t.value
        if t.kind == "patient":
            return _patient(t)
        if t.kind in ("modality", "series"):
            column = SE.c.modality if t.kind == "modality" else SE.c.series_uid
            return ST.c.id.in_(select(SE.c.study_pk).where(SE.c.tenant == tenant, column == t.value))
        if t.kind == "started":
            return _started(t)
        if t.kind == "updated":
            return _updated(t)
        return false()

    def _order(self, criteria: Criteria) -> list:
        date = ST.c.study_date
        if self._sqlite and any(all(t.kind in _SELECTIVE for t in terms) for terms in criteria.where):
            # as in index.py: without ANALYZE statistics SQLite would walk the date index and test every study
            date = date.concat(literal_column("''"))
        out = []
        for key, desc in criteria.sort or (("started", True),):
            if key == "started":
                cols = [date, ST.c.study_time]
            elif key == "updated":
                cols = [_changed()]
            else:
                cols = [ST.c.study_uid]
            out += [self._direction(c, desc) for c in cols]
        return out + [ST.c.id.desc()]

    def _direction(self, column, desc: bool):
        """Studies without a value last, on both backends (SQLite sorts NULL lowest, PostgreSQL highest)."""
        if desc:
            return column.desc() if self._sqlite else column.desc().nulls_last()
        return column.asc().nulls_last() if self._sqlite else column.asc()


def _tenant_check(conn: Connection, table, tenant: str) -> ColumnElement[bool]:
    """The tenant filter of a table reached through a foreign key (defence in depth, not a way in).

    On SQLite it is written ``tenant || '' = ?`` so that the planner does not walk an index (tenant, ...) of all
    the tenant's rows instead of the foreign key's index (as in ``index.py``).
    """
    if conn.dialect.name == "sqlite":
        return table.c.tenant.concat(literal_column("''")) == tenant
    return table.c.tenant == tenant


def _count(conn: Connection, cond) -> int:
    return conn.execute(select(func.count()).select_from(ST).where(cond)).scalar_one()


def _patient(t: Term) -> ColumnElement[bool]:
    cond = [] if t.value is None else [ST.c.patient_id == t.value]
    if t.issuers is not None:
        issuer = [ST.c.issuer_of_patient_id.in_(list(t.issuers))] if t.issuers else []
        if t.no_issuer:
            issuer += [ST.c.issuer_of_patient_id.is_(None), ST.c.issuer_of_patient_id == ""]
        cond.append(or_(*issuer) if issuer else false())
    return and_(true(), *cond)


def _started_keys():
    """The low and high ends of the study's started range as ``YYYYMMDDHHMMSS.FFFFFF`` text (module docstring)."""
    time = ST.c.study_time
    low = func.coalesce(time.concat(func.substr(literal(".000000"), func.length(time) - 5)), literal("000000.000000"))
    high = func.coalesce(time.concat(func.substr(literal(".999999"), func.length(time) - 5)), literal("235959.999999"))
    return ST.c.study_date.concat(low), ST.c.study_date.concat(high)


def _started(t: Term) -> ColumnElement[bool]:
    """A FHIR date prefix on the study's started range (FHIR R4 3.1.1.4.2), with an index-usable date filter."""
    low, high = _started_keys()
    lo, hi = t.low, t.high
    day_lo, day_hi = lo[:8], hi[:8]
    date = ST.c.study_date
    exact = {
        "eq": and_(low >= lo, high <= hi), "ne": or_(low < lo, high > hi),
        "gt": high > hi, "lt": low < lo, "ge": high >= lo, "le": low <= hi, "sa": low > hi, "eb": high < lo,
    }[t.prefix]
    coarse = {
        "eq": and_(date >= day_lo, date <= day_hi), "ne": true(), "gt": date >= day_hi, "lt": date <= day_lo,
        "ge": date >= day_lo, "le": date <= day_hi, "sa": date >= day_hi, "eb": date <= day_lo,
    }[t.prefix]
    return and_(date.isnot(None), coarse, exact)


def _utc(text: str) -> datetime:
    return datetime.strptime(text, P.INSTANT_FORMAT).replace(tzinfo=timezone.utc)


def _changed():
    """When the study last changed: ``study.updated_at``, moved by the archive whenever an instance is indexed."""
    return ST.c.updated_at


def _updated(t: Term) -> ColumnElement[bool]:
    """A FHIR date prefix on the time the study last changed (a point in time; FHIR R4 3.1.1.4.2)."""
    at = _changed()
    lo, hi = _utc(t.low), _utc(t.high)
    return {
        "eq": and_(at >= lo, at <= hi), "ne": not_(and_(at >= lo, at <= hi)), "gt": at > hi, "lt": at < lo,
        "ge": at >= lo, "le": at <= hi, "sa": at > hi, "eb": at < lo,
    }[t.prefix]


def _rows(conn: Connection, tenant: str, studies: Sequence) -> list[StudyRow]:
    """Study rows with their series and instances: one statement for the series (with the time of their newest
    instance, through ix_instance_series) and one for the instances (through ix_instance_study)."""
    if not studies:
        return []
    pks = [s.id for s in studies]
    series_stmt = (
        select(SE.c.id, SE.c.study_pk, SE.c.series_uid, SE.c.series_number, SE.c.modality, SE.c.series_description,
               SE.c.body_part_examined, SE.c.series_date, SE.c.series_time, SE.c.number_of_instances)
        .where(_tenant_check(conn, SE, tenant), SE.c.study_pk.in_(pks))
        .order_by(SE.c.study_pk, func.coalesce(SE.c.series_number, _LAST), SE.c.id)
    )
    instance_stmt = (
        select(INS.c.series_pk, INS.c.sop_uid, INS.c.sop_class_uid, INS.c.instance_number)
        .where(_tenant_check(conn, INS, tenant), INS.c.study_pk.in_(pks))
        .order_by(INS.c.series_pk, func.coalesce(INS.c.instance_number, _LAST), INS.c.id)
    )
    instances: dict[int, list[InstanceRow]] = {}
    for series_pk, sop_uid, sop_class_uid, number in conn.execute(instance_stmt).all():
        instances.setdefault(series_pk, []).append(InstanceRow(sop_uid, sop_class_uid, number))
    series: dict[int, list[SeriesRow]] = {}
    for r in conn.execute(series_stmt).all():
        series.setdefault(r.study_pk, []).append(SeriesRow(
            uid=r.series_uid, number=r.series_number, modality=r.modality, description=r.series_description,
            body_part=r.body_part_examined, date=r.series_date, time=r.series_time,
            number_of_instances=r.number_of_instances, instances=tuple(instances.get(r.id, ()))))
    return [StudyRow(
        uid=s.study_uid, revision=s.revision, updated=s.updated_at, patient_name=s.patient_name,
        patient_id=s.patient_id, issuer=s.issuer_of_patient_id, date=s.study_date, time=s.study_time,
        tz_offset=s.timezone_offset_from_utc, accession=s.accession_number, study_id=s.study_id,
        description=s.study_description, referring=s.referring_physician_name, modalities=s.modalities_in_study,
        number_of_series=s.number_of_series, number_of_instances=s.number_of_instances,
        series=tuple(series.get(s.id, ()))) for s in studies]


__all__ = ["ImagingIndex"]
