"""The SQL of QIDO-RS: one select per page (plus one for representative metadata when asked for).

Every statement filters on the tenant and uses bound parameters only. Matching behaves the same on SQLite
and PostgreSQL: equality is case-sensitive on both; wildcard matching uses GLOB on SQLite (case-sensitive,
and able to use an index for a literal prefix) and LIKE ... ESCAPE '!' on PostgreSQL. Person names are
compared in their folded ``*_norm`` form, so they are case- and accent-insensitive on both.

Order (stable, ties broken by the primary key):

* studies: newest first: StudyDate DESC, StudyTime DESC (no value last), id DESC; SQLite walks
  ``ix_study_tenant_date_time`` backwards and sorts only the rows of one date by time;
* series: grouped by study (study row id), then SeriesNumber (no value last), id;
* instances: grouped by study, then by series as above, then InstanceNumber (no value last), id.

SQLite has no statistics unless ANALYZE ran, so its planner is steered with expressions no index serves:
the join starts from the table with the narrowest index use (see ``_driver``; the other tables' tenant
filters are written ``tenant || '' = ?``), and an exact study match orders by ``study_date || ''`` so that
its own index, not the date index, is used. PostgreSQL gets the plain expressions.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import ColumnElement, Select, and_, func, literal, literal_column, or_, select
from sqlmodel import Session

from server.dicom.attributes import Kind, Level
from server.dicomweb.qido import Match, Op, QidoPage, QidoQuery, QidoRow, needs_meta, parents_needed
from server.store.models import Instance, Series, Study

_STUDY = Study.__table__
_SERIES = Series.__table__
_INSTANCE = Instance.__table__
_TABLES = {Level.STUDY: _STUDY, Level.SERIES: _SERIES, Level.INSTANCE: _INSTANCE}

_ESCAPE = "!"


def search(session: Session, tenant: str, query: QidoQuery) -> QidoPage:
    """One page of the studies, series or instances of ``tenant`` that match ``query``."""
    sqlite = session.get_bind().dialect.name == "sqlite"
    level = query.level
    meta = needs_meta(query)
    stmt = statement(tenant, query, sqlite=sqlite)
    result = session.connection().execute(stmt)
    found = result.all()
    more = len(found) > query.limit
    found = found[: query.limit]
    position = {name: i for i, name in enumerate(result.keys())}

    def getter(name: str):
        i = position.get(name)
        return (lambda r: None) if i is None else (lambda r: r[i])

    study_pk, series_pk = getter("study_pk"), getter("series_pk")
    metas: dict[int, str] = {}
    if meta and level is not Level.INSTANCE and found:
        pk = study_pk if level is Level.STUDY else series_pk
        metas = _representative_meta(session, tenant, level, [pk(r) for r in found])
    if level is Level.INSTANCE:
        row_meta = getter("meta")
    else:
        pk = study_pk if level is Level.STUDY else series_pk
        row_meta = lambda r: metas.get(pk(r))  # noqa: E731
    fields = {
        name: getter(name)
        for name in ("study_uid", "series_uid", "sop_uid", "study_attrs", "series_attrs", "instance_attrs",
                     "modalities_in_study", "study_series", "study_instances", "series_instances")
    }
    transfer_syntaxes = getter("transfer_syntaxes" if level is Level.SERIES else "transfer_syntax_uid")
    rows = [
        QidoRow(**{name: get(r) for name, get in fields.items()}, transfer_syntaxes=transfer_syntaxes(r),
                meta=row_meta(r))
        for r in found
    ]
    return QidoPage(rows=rows, more=more)


def statement(tenant: str, query: QidoQuery, *, sqlite: bool) -> Select:
    """The select of one page of ``query`` (``limit + 1`` rows, to tell whether there are more)."""
    level = query.level
    st, se, ins = _STUDY, _SERIES, _INSTANCE
    parents = parents_needed(query)

    cols: list = [
        st.c.id.label("study_pk"),
        st.c.study_uid,
        st.c.modalities_in_study,
        st.c.number_of_series.label("study_series"),
        st.c.number_of_instances.label("study_instances"),
    ]
    if level is Level.STUDY or Level.STUDY in parents:
        cols.append(st.c.attrs.label("study_attrs"))
    if level is not Level.STUDY:
        cols += [se.c.id.label("series_pk"), se.c.series_uid, se.c.number_of_instances.label("series_instances")]
        if level is Level.SERIES or Level.SERIES in parents:
            cols.append(se.c.attrs.label("series_attrs"))
    if level is Level.SERIES:
        cols.append(se.c.transfer_syntaxes)
    if level is Level.INSTANCE:
        cols += [ins.c.sop_uid, ins.c.attrs.label("instance_attrs"), ins.c.transfer_syntax_uid]
        if needs_meta(query):
            cols.append(ins.c.meta)

    if level is Level.STUDY:
        source = st
        tables = [st]
    elif level is Level.SERIES:
        source = se.join(st, st.c.id == se.c.study_pk)
        tables = [se, st]
    else:
        source = ins.join(se, se.c.id == ins.c.series_pk).join(st, st.c.id == ins.c.study_pk)
        tables = [ins, se, st]
    driver = _TABLES[_driver(query)]
    conditions: list[ColumnElement[bool]] = [
        _tenant(table, tenant, indexed=table is driver or not sqlite) for table in tables
    ]
    if query.study_uid is not None:
        conditions.append(st.c.study_uid == query.study_uid)
    if query.series_uid is not None and level is not Level.STUDY:
        conditions.append(se.c.series_uid == query.series_uid)
    for match in query.matches:
        condition = _condition(match, sqlite)
        if condition is not None:
            conditions.append(condition)

    stmt = select(*cols).select_from(source).where(*conditions)
    return stmt.order_by(*_order(query, sqlite)).offset(query.offset).limit(query.limit + 1)


def _tenant(table, tenant: str, *, indexed: bool) -> ColumnElement[bool]:
    """The tenant filter of one table; ``indexed=False`` checks it through an expression no index serves.

    SQLite has no statistics unless ANALYZE ran, and would otherwise start from an index (tenant, ...) of
    the wrong table, e.g. all series of the tenant instead of the few studies of a PatientID.
    """
    if indexed:
        return table.c.tenant == tenant
    return table.c.tenant.concat(literal_column("''")) == tenant


def _representative_meta(session: Session, tenant: str, level: Level, pks: Sequence[int]) -> dict[int, str]:
    """DICOM JSON of the first stored instance of each study (or series) of ``pks``, in one query."""
    ins = _INSTANCE
    parent = ins.c.study_pk if level is Level.STUDY else ins.c.series_pk
    sqlite = session.get_bind().dialect.name == "sqlite"
    first = (
        select(func.min(ins.c.id))
        .where(_tenant(ins, tenant, indexed=not sqlite), parent.in_(sorted(set(pks))))
        .group_by(parent)
    )
    stmt = select(parent.label("pk"), ins.c.meta).where(ins.c.id.in_(first.scalar_subquery()))
    return {pk: meta for pk, meta in session.connection().execute(stmt).all()}


# Columns with an index (tenant, column): an exact match on one of them selects few rows.
_SELECTIVE = frozenset({"patient_id", "accession_number", "study_uid", "patient_name_norm"})
_STUDY_INDEXED = _SELECTIVE | {"study_date"}
_SERIES_UID = frozenset({"series_uid"})
_MODALITY = frozenset({"modality"})
_SOP = frozenset({"sop_uid"})


def _narrows(match: Match, columns: frozenset[str]) -> bool:
    """Whether a match can use an index (tenant, column) of ``columns`` to find few rows."""
    if match.op is Op.UNIVERSAL or match.column not in columns:
        return False
    return not (match.op is Op.WILDCARD and match.values[0][:1] in ("*", "?"))


def _driver(query: QidoQuery) -> Level:
    """The level whose table the join should start from on SQLite: the one with the narrowest index use.

    Order of preference: SOP Instance UID, Series Instance UID (path or key), Study Instance UID (path or
    key), another indexed study attribute (PatientID, AccessionNumber, PatientName, StudyDate), Modality,
    else the queried level itself.
    """
    level = query.level
    if level is Level.STUDY:
        return level
    by_level = {lv: [m for m in query.matches if m.attribute.level is lv] for lv in Level}
    if level is Level.INSTANCE and any(_narrows(m, _SOP) for m in by_level[Level.INSTANCE]):
        return Level.INSTANCE
    if query.series_uid is not None or any(_narrows(m, _SERIES_UID) for m in by_level[Level.SERIES]):
        return Level.SERIES
    if query.study_uid is not None or any(_narrows(m, _STUDY_INDEXED) for m in by_level[Level.STUDY]):
        return Level.STUDY
    if any(_narrows(m, _MODALITY) for m in by_level[Level.SERIES]):
        return Level.SERIES
    return level


def _order(query: QidoQuery, sqlite: bool) -> list:
    st, se, ins = _STUDY, _SERIES, _INSTANCE
    level = query.level

    def desc_nulls_last(col):
        # SQLite sorts NULL lowest, so DESC already puts it last (and keeps the index usable)
        return col.desc() if sqlite else col.desc().nulls_last()

    def asc_nulls_last(col):
        # PostgreSQL sorts NULL highest, so ASC already puts it last
        return col.asc().nulls_last() if sqlite else col.asc()

    if level is Level.STUDY:
        date = st.c.study_date
        if sqlite and any(m.op in (Op.EQUAL, Op.ANY_OF) and m.attribute.level is Level.STUDY
                          and m.column in _SELECTIVE for m in query.matches):
            # Without ANALYZE statistics SQLite would walk ix_study_tenant_date_time to skip the sort and test
            # every study of the tenant; an expression that no index orders makes it use the exact match's.
            date = date.concat(literal_column("''"))
        return [desc_nulls_last(date), desc_nulls_last(st.c.study_time), st.c.id.desc()]
    if level is Level.SERIES:
        return [se.c.study_pk, asc_nulls_last(se.c.series_number), se.c.id]
    return [
        ins.c.study_pk,
        asc_nulls_last(se.c.series_number),
        ins.c.series_pk,
        asc_nulls_last(ins.c.instance_number),
        ins.c.id,
    ]


def _pattern(dicom: str, sqlite: bool) -> str:
    """A DICOM wildcard pattern (``*``, ``?``) as a GLOB (SQLite) or LIKE ... ESCAPE '!' pattern."""
    out: list[str] = []
    for c in dicom:
        if c == "*":
            out.append("*" if sqlite else "%")
        elif c == "?":
            out.append("?" if sqlite else "_")
        elif sqlite:
            out.append("[[]" if c == "[" else c)
        else:
            out.append(_ESCAPE + c if c in "%_" + _ESCAPE else c)
    return "".join(out)


def _wildcard(column, dicom: str, sqlite: bool) -> ColumnElement[bool]:
    if sqlite:
        return column.op("GLOB", is_comparison=True)(_pattern(dicom, True))
    return column.like(_pattern(dicom, False), escape=_ESCAPE)


def _condition(match: Match, sqlite: bool) -> ColumnElement[bool] | None:
    """The SQL condition of one match (None for universal matching)."""
    if match.op is Op.UNIVERSAL:
        return None
    table = _TABLES[match.attribute.level]
    column = table.c[match.column]
    kind = match.attribute.kind
    if kind is Kind.MULTI:
        padded = literal("\\") + column + literal("\\")
        return or_(*(_wildcard(padded, f"*\\{v}\\*", sqlite) for v in match.values))
    if match.op is Op.EQUAL:
        condition = column == match.values[0]
    elif match.op is Op.ANY_OF:
        condition = column.in_(list(match.values))
    elif match.op is Op.WILDCARD:
        condition = _wildcard(column, match.values[0], sqlite)
    else:  # RANGE
        low = column >= match.low if match.low is not None else None
        high = column <= match.high if match.high is not None else None
        if low is not None and high is not None:
            condition = or_(low, high) if match.wraps_midnight else and_(low, high)
        else:
            condition = low if low is not None else high
    if kind is Kind.PN and match.phonetic:
        phonetic = table.c[match.phonetic_column]
        fuzzy = and_(*(_wildcard(phonetic, f"* {code} *", sqlite) for code in match.phonetic))
        condition = or_(condition, fuzzy)
    return condition


__all__ = ["QidoPage", "QidoRow", "search", "statement"]
