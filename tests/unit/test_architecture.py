"""The import direction of DESIGN.md section 2 and the completeness of the error tables (section 5)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from server.dicomweb.status import FAILURE_BY_KIND, HTTP_STATUS_BY_KIND
from server.errors import ErrorKind
from server.fhir.outcome import FHIR_BY_KIND
from server.mail.mdn import DISPOSITION_BY_KIND

ROOT = Path(__file__).resolve().parents[2] / "server"
CORES = ["dicom", "dicomweb/multipart.py", "dicomweb/media.py", "dicomweb/status.py", "dicomweb/qido.py",
         "errors.py", "config.py", "security/tokens.py", "security/oauth.py",
         "fhir/profiles.py", "fhir/task.py",
         "fhir/subscription.py", "fhir/validation.py", "fhir/params.py", "fhir/imaging.py", "fhir/audit.py", "crypto",
         "mail/mime.py", "mail/drg.py", "mail/partial.py", "mail/mdn.py",
         "gateway/jobs.py", "gateway/stats.py", "gateway/policy.py", "gateway/sites.py"]
EDGE_ONLY = {"fastapi", "starlette", "uvicorn", "aiosmtpd", "httpx"}
STORE_ONLY = {"sqlmodel", "sqlalchemy", "alembic", "psycopg"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _files(spec: str) -> list[Path]:
    p = ROOT / spec
    return sorted(p.rglob("*.py")) if p.is_dir() else [p]


@pytest.mark.parametrize("spec", CORES)
def test_cores_import_no_edges_and_no_sql(spec):
    for path in _files(spec):
        bad = _imports(path) & (EDGE_ONLY | STORE_ONLY)
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_sql_lives_in_store_only():
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("store/") or rel in ("dicomweb/search.py", "app.py", "fhir/setup.py"):
            continue
        bad = _imports(path) & STORE_ONLY
        assert not bad, f"{rel} imports {bad}"


def test_search_service_uses_sessions_only():
    text = (ROOT / "dicomweb/search.py").read_text()
    assert "select(" not in text and "text(" not in text


@pytest.mark.parametrize("table", [HTTP_STATUS_BY_KIND, FAILURE_BY_KIND, FHIR_BY_KIND, DISPOSITION_BY_KIND],
                         ids=["http", "stow-failure", "fhir", "mdn-disposition"])
def test_every_error_kind_is_mapped(table):
    assert set(table) == set(ErrorKind)
