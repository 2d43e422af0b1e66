"""QIDO-RS service: parse the query, run it on the index, render DICOM JSON (PS3.18 10.6)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.engine import Engine
from sqlmodel import Session

from server.config import Settings
from server.dicom.attributes import Level
from server.dicomweb.qido import parse_query, render
from server.store import index

MORE_RESULTS = "There are additional results that can be requested"


@dataclass(frozen=True)
class SearchResult:
    """The matches of a query and the texts of its Warning headers (PS3.18 8.3.4.4)."""

    items: list[dict]
    warnings: list[str]


class QidoService:
    """Runs QIDO-RS searches for one tenant at a time."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine

    def search(self, tenant: str, level: Level, params: Sequence[tuple[str, str]], *, study_uid: str | None,
               series_uid: str | None, base_url: str) -> SearchResult:
        """Search one level (blocking: run in a worker thread)."""
        query, warnings = parse_query(level, params, study_uid=study_uid, series_uid=series_uid,
                                      default_limit=self.settings.qido_default_limit,
                                      max_limit=self.settings.qido_max_limit)
        with Session(self.engine) as session:
            page = index.search(session, tenant, query)
        items = render(page.rows, query, base_url)
        if page.more:
            warnings = [*warnings, MORE_RESULTS]
        return SearchResult(items, warnings)
