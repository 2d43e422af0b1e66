"""Index writes of STOW-RS and the lookups of WADO-RS: all their SQL lives here.

Instances are indexed in batches: one transaction per batch of durable blobs, so a crash leaves either
the whole batch or none of it indexed (the blobs are already durable). Study and series rows carry the
aggregates QIDO returns (counts, ModalitiesInStudy, transfer syntaxes) and a revision for ETags.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import func, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Session

from server.dicom.attributes import Level
from server.errors import ErrorKind, ServerError
from server.store.db import writer
from server.store.models import Instance, Series, Study


@dataclass(frozen=True)
class NewInstance:
    """What the archive needs to index one instance whose blob is durable."""

    parsed: object  # server.dicom.parse.ParsedInstance (duck-typed to keep store free of cores' imports)
    blob: str
    size: int


class Verdict:
    """Per-instance result of ``index_batch``."""

    STORED = "stored"
    IDENTICAL = "identical"  # same SOP Instance UID, same bytes: idempotent success
    DUPLICATE = "duplicate"  # same SOP Instance UID, different bytes, policy reject
    REPLACED = "replaced"
    SERIES_CONFLICT = "series-conflict"  # the series belongs to another study


@dataclass(frozen=True)
class IndexResult:
    """Verdict of one instance of a batch, with a message for conflicts."""

    verdict: str
    message: str = ""


class Archive:
    """The DICOM index of one database (all tenants)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._writer = writer(engine)
        self._sqlite = engine.dialect.name == "sqlite"
        self._write_lock = threading.Lock()  # SQLite has one writer: serialise in-process writers

    # ---- writes -------------------------------------------------------------------------------
    def index_batch(self, tenant: str, items: Sequence[NewInstance], *, replace: bool) -> list[IndexResult]:
        """Index durable instances in one transaction; retries once per conflicting concurrent writer."""
        for attempt in range(5):
            try:
                if self._sqlite:
                    with self._write_lock:
                        return self._index_batch_once(tenant, items, replace=replace)
                return self._index_batch_once(tenant, items, replace=replace)
            except (IntegrityError, OperationalError) as exc:
                if attempt == 4:
                    raise ServerError(ErrorKind.INTERNAL, "index write failed after retries") from exc
        raise AssertionError("unreachable")

    def _index_batch_once(self, tenant: str, items: Sequence[NewInstance], *, replace: bool) -> list[IndexResult]:
        """Decide each instance's verdict with set-based lookups, then insert the new rows in one statement."""
        results: list[IndexResult] = []
        touched: set[str] = set()  # studies that gain an instance: their updated_at moves
        with Session(self._writer, expire_on_commit=False) as session:
            existing = self._existing(session, tenant, [i.parsed.sop_instance_uid for i in items])
            studies = self._load(session, Study, Study.study_uid, tenant, {i.parsed.study_uid for i in items})
            series_rows = self._load(session, Series, Series.series_uid, tenant, {i.parsed.series_uid for i in items})
            rows: list[dict] = []
            for item in items:
                p = item.parsed
                old = existing.get(p.sop_instance_uid)
                if old is not None:
                    if old[1] == item.blob:
                        results.append(IndexResult(Verdict.IDENTICAL))
                        continue
                    if not replace:
                        results.append(IndexResult(Verdict.DUPLICATE, (
                            f"SOP Instance {p.sop_instance_uid} is already stored with different content; "
                            "the archive keeps the first version (duplicate policy 'reject')")))
                        continue
                series = series_rows.get(p.series_uid)
                if series is not None and series.study_uid != p.study_uid:
                    results.append(IndexResult(Verdict.SERIES_CONFLICT, (
                        f"Series {p.series_uid} belongs to study {series.study_uid}, not {p.study_uid}")))
                    continue
                if old is not None:
                    self._flush_rows(session, rows)
                    stale = session.execute(select(Instance).where(
                        Instance.tenant == tenant, Instance.sop_uid == p.sop_instance_uid)).scalar_one()
                    self._remove(session, stale, studies, series_rows)
                    series = series_rows.get(p.series_uid)
                study = self._study(session, tenant, p, studies)
                if series is None:
                    series = Series(tenant=tenant, study_pk=study.id, study_uid=p.study_uid,
                                    attrs=p.attrs[Level.SERIES], **_columns(p, Level.SERIES))
                    session.add(series)
                    session.flush()
                    series_rows[p.series_uid] = series
                    study.number_of_series += 1
                rows.append(dict(_columns(p, Level.INSTANCE), tenant=tenant, study_pk=study.id, series_pk=series.id,
                                 study_uid=p.study_uid, series_uid=p.series_uid,
                                 transfer_syntax_uid=p.transfer_syntax_uid, blob=item.blob, size=item.size,
                                 attrs=p.attrs[Level.INSTANCE], meta=p.meta, bulk=json.dumps(dict(p.bulk)),
                                 created_at=datetime.now(timezone.utc)))
                existing[p.sop_instance_uid] = (None, item.blob)
                study.number_of_instances += 1
                study.revision += 1
                series.number_of_instances += 1
                series.revision += 1
                study.modalities_in_study = _add_value(study.modalities_in_study, series.modality)
                series.transfer_syntaxes = _add_value(series.transfer_syntaxes, p.transfer_syntax_uid)
                results.append(IndexResult(Verdict.REPLACED if old is not None else Verdict.STORED))
                touched.add(p.study_uid)
            self._flush_rows(session, rows)
            now = datetime.now(timezone.utc)
            for uid in touched:
                studies[uid].updated_at = now
            session.commit()
        return results

    @staticmethod
    def _flush_rows(session: Session, rows: list[dict]) -> None:
        """Insert gathered instance rows with one executemany and empty the list."""
        if rows:
            session.execute(insert(Instance), rows)
            rows.clear()

    @staticmethod
    def _existing(session: Session, tenant: str, sops: list[str]) -> dict[str, tuple[int | None, str]]:
        """SOP Instance UID -> (row id, blob digest) of the instances already stored among ``sops``."""
        found: dict[str, tuple[int | None, str]] = {}
        for chunk in _chunks(sorted(set(sops))):
            stmt = select(Instance.sop_uid, Instance.id, Instance.blob).where(
                Instance.tenant == tenant, Instance.sop_uid.in_(chunk))
            found.update({sop: (pk, blob) for sop, pk, blob in session.execute(stmt)})
        return found

    @staticmethod
    def _load(session: Session, model, uid_column, tenant: str, uids: set[str]) -> dict:
        """Rows of ``model`` of the tenant whose UID is among ``uids``, by UID."""
        out = {}
        for chunk in _chunks(sorted(uids)):
            stmt = select(model).where(model.tenant == tenant, uid_column.in_(chunk))
            for row in session.execute(stmt).scalars():
                out[getattr(row, uid_column.key)] = row
        return out

    def _study(self, session: Session, tenant: str, p, cache: dict[str, Study]) -> Study:
        study = cache.get(p.study_uid)
        if study is None:
            study = Study(tenant=tenant, attrs=p.attrs[Level.STUDY], **_columns(p, Level.STUDY))
            session.add(study)
            session.flush()
            cache[p.study_uid] = study
        return study

    def _remove(self, session: Session, inst: Instance, studies: dict[str, Study], series_rows: dict[str, Series]) -> None:
        """Drop an instance row (replace policy) and fix the aggregates of its series and study."""
        session.delete(inst)
        session.flush()
        series = session.get(Series, inst.series_pk)
        study = session.get(Study, inst.study_pk)
        series.number_of_instances -= 1
        series.revision += 1
        study.number_of_instances -= 1
        study.revision += 1
        series.transfer_syntaxes = _values_of(session, Instance.transfer_syntax_uid, Instance.series_pk == series.id)
        if series.number_of_instances == 0:
            session.delete(series)
            series_rows.pop(series.series_uid, None)
            study.number_of_series -= 1
            session.flush()
            study.modalities_in_study = _values_of(session, Series.modality, Series.study_pk == study.id)
        if study.number_of_instances == 0:
            session.delete(study)
            studies.pop(study.study_uid, None)
            session.flush()
        else:
            studies[study.study_uid] = study

    # ---- reads for WADO-RS --------------------------------------------------------------------
    def patient_studies(self, tenant: str, patient_ids: Sequence[str], *, date_from: str | None = None,
                        date_to: str | None = None, modalities: Sequence[str] = (), limit: int = 200) -> list:
        """The tenant's studies of a patient (any of ``patient_ids``; StudyDate within [date_from, date_to] as DA
        YYYYMMDD when given; any of ``modalities`` in ModalitiesInStudy when given), newest first. The priors
        search of a request for prior images (issue 5)."""
        ids = [p for p in patient_ids if p]
        if not ids:
            return []
        cond = [Study.tenant == tenant, Study.patient_id.in_(ids), Study.number_of_instances > 0]
        if date_from:
            cond.append(Study.study_date >= date_from)
        if date_to:
            cond.append(Study.study_date <= date_to)
        cols = [Study.study_uid, Study.patient_id, Study.issuer_of_patient_id, Study.study_date,
                Study.modalities_in_study, Study.study_description, Study.number_of_instances]
        with Session(self.engine) as session:
            rows = session.exec(select(*cols).where(*cond)
                                .order_by(Study.study_date.desc(), Study.study_uid).limit(limit)).all()
        wanted = {m.upper() for m in modalities if m}
        if wanted:
            rows = [r for r in rows if wanted & set((r.modalities_in_study or "").upper().split("\\"))]
        return rows

    def instances(self, tenant: str, study_uid: str, series_uid: str | None = None,
                  sop_uid: str | None = None, *, with_meta: bool = False) -> list:
        """Instances of a study/series/instance in stable order (series number, instance number).

        The study, series or instance row is found through its unique (tenant, UID) index first; the
        instances are then read through the indexed foreign key.
        """
        cols = [Instance.id, Instance.sop_uid, Instance.series_uid, Instance.study_uid, Instance.sop_class_uid,
                Instance.transfer_syntax_uid, Instance.blob, Instance.size, Instance.bulk, Instance.number_of_frames]
        if with_meta:
            cols.append(Instance.meta)
        with Session(self.engine) as session:
            if sop_uid is not None:
                stmt = select(*cols).where(Instance.tenant == tenant, Instance.sop_uid == sop_uid,
                                           Instance.series_uid == series_uid, Instance.study_uid == study_uid)
            elif series_uid is not None:
                pk = session.execute(select(Series.id).where(
                    Series.tenant == tenant, Series.series_uid == series_uid, Series.study_uid == study_uid)).scalar()
                if pk is None:
                    return []
                stmt = (select(*cols).where(Instance.series_pk == pk)
                        .order_by(Instance.instance_number, Instance.id))
            else:
                pk = session.execute(select(Study.id).where(
                    Study.tenant == tenant, Study.study_uid == study_uid)).scalar()
                if pk is None:
                    return []
                stmt = (select(*cols).join(Series, Series.id == Instance.series_pk).where(Instance.study_pk == pk)
                        .order_by(Series.series_number, Series.id, Instance.instance_number, Instance.id))
            return list(session.execute(stmt).all())

    def revision(self, tenant: str, level: Level, study_uid: str, series_uid: str | None = None,
                 sop_uid: str | None = None) -> str | None:
        """A token that changes whenever the resource's content changes (for ETags); None if absent."""
        with Session(self.engine) as session:
            if level is Level.STUDY:
                row = session.execute(select(Study.id, Study.revision).where(
                    Study.tenant == tenant, Study.study_uid == study_uid)).first()
            elif level is Level.SERIES:
                row = session.execute(select(Series.id, Series.revision).where(
                    Series.tenant == tenant, Series.series_uid == series_uid, Series.study_uid == study_uid)).first()
            else:
                row = session.execute(select(Instance.id, Instance.blob).where(
                    Instance.tenant == tenant, Instance.sop_uid == sop_uid, Instance.series_uid == series_uid,
                    Instance.study_uid == study_uid)).first()
        return None if row is None else f"{level.value}-{row[0]}-{row[1]}"

    def counts(self, tenant: str) -> dict[str, int]:
        """Numbers of studies, series and instances of a tenant (for health and tests)."""
        with Session(self.engine) as session:
            return {
                "studies": session.execute(select(func.count()).select_from(Study).where(Study.tenant == tenant)).one()[0],
                "series": session.execute(select(func.count()).select_from(Series).where(Series.tenant == tenant)).one()[0],
                "instances": session.execute(select(func.count()).select_from(Instance).where(Instance.tenant == tenant)).one()[0],
            }

    def ping(self) -> None:
        """Fail unless the database answers."""
        with Session(self.engine) as session:
            session.execute(select(1)).one()


def _chunks(values: list[str], size: int = 500) -> list[list[str]]:
    """Slices of at most ``size`` values for IN lists (SQLite's bound parameter limit)."""
    return [values[i:i + size] for i in range(0, len(values), size)]


def _columns(p, level: Level) -> dict[str, object]:
    return dict(p.columns[level])


def _add_value(joined: str | None, value: str | None) -> str | None:
    """Add a value to a sorted, backslash-joined set."""
    if not value:
        return joined
    values = set(joined.split("\\")) if joined else set()
    values.add(value)
    return "\\".join(sorted(values))


def _values_of(session: Session, column, where) -> str | None:
    values = sorted({v for (v,) in session.execute(select(column).where(where).distinct()).all() if v})
    return "\\".join(values) or None


__all__ = ["Archive", "IndexResult", "NewInstance", "Verdict"]
