"""Two writers (separate engines, as two worker processes have) index into one database at once."""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import event

from server.dicom.parse import parse_part10
from server.store.archive import Archive, NewInstance
from server.store.db import make_engine
from server.store.migrate import upgrade
from tests.dicomdata import make_instance


def _parsed(tmp_path: Path, study: str, n: int) -> list:
    out = []
    for i in range(n):
        path = tmp_path / f"{study}-{i}.dcm"
        path.write_bytes(make_instance(study=study, series=study + ".1", instance_number=i))
        out.append(parse_part10(path))
    return out


def test_concurrent_writers_keep_counts_exact(tmp_path, database_url):
    setup = make_engine(database_url)
    upgrade(setup)
    setup.dispose()
    engines = [make_engine(database_url) for _ in range(2)]
    archives = [Archive(e) for e in engines]
    studies = [f"1.2.826.0.5.{k}" for k in range(6)]
    work = {s: _parsed(tmp_path, s, 10) for s in studies}
    errors: list[BaseException] = []

    def writer(archive: Archive, offset: int) -> None:
        try:
            for s in studies:  # both writers hit every study, each with its own half of the instances
                items = [NewInstance(p, f"{offset:02d}{i:062d}", 100) for i, p in enumerate(work[s]) if i % 2 == offset]
                archive.index_batch("t", items, replace=False)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(a, k)) for k, a in enumerate(archives)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert archives[0].counts("t") == {"studies": 6, "series": 6, "instances": 60}
    for s in studies:
        assert len(archives[1].instances("t", s)) == 10
    for e in engines:
        e.dispose()


def test_sqlite_writes_begin_immediate(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'x.sqlite3'}")
    upgrade(engine)
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda c, cur, stmt, *a: seen.append(stmt))
    [p] = _parsed(tmp_path, "1.2.826.0.6.1", 1)
    Archive(engine).index_batch("t", [NewInstance(p, "0" * 64, 1)], replace=False)
    assert seen[0] == "BEGIN IMMEDIATE"
    engine.dispose()
