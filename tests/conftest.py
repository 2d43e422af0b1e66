"""Shared fixtures: isolated data folders, SQLite and a throwaway PostgreSQL, the app in-process and on loopback.

PostgreSQL: ``TELERAD_TEST_POSTGRES_URL`` (a server URL whose user may CREATE DATABASE) or, when the Debian
``postgresql`` binaries are installed, a private cluster started once per session on 127.0.0.1 (``initdb``
+ ``pg_ctl``, as the ``postgres`` user when running as root). Each test gets its own database.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.config import Settings
from server.security.tokens import issue, load_or_create_key

BACKENDS = ["sqlite", "postgres"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


class _Cluster:
    """A private PostgreSQL cluster on loopback for the test session."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="telerad-pg-"))
        self.port = _free_port()
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")

    def _run(self, *args: str) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> str:
        data = self.dir / "data"
        self._run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run("pg_ctl", "-D", str(data), "-o", opts, "-l", str(self.dir / "log"), "-w", "start")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str | None]:
    """The URL of a PostgreSQL server for the session, or None when none is available."""
    url = os.environ.get("TELERAD_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    bindir = _pg_bin()
    if bindir is None:
        yield None
        return
    cluster = _Cluster(bindir)
    try:
        url = cluster.start()
    except (subprocess.CalledProcessError, OSError) as exc:  # pragma: no cover - environment problem
        if os.environ.get("CI"):
            raise
        pytest.skip(f"could not start PostgreSQL: {exc}")
    try:
        yield url
    finally:
        cluster.stop()


def _fresh_pg_database(server_url: str) -> tuple[str, object]:
    import psycopg

    name = f"t_{uuid.uuid4().hex[:16]}"
    plain = server_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return server_url.rsplit("/", 1)[0] + f"/{name}", drop


@pytest.fixture(params=BACKENDS)
def database_url(request, tmp_path: Path, postgres_server) -> Iterator[str]:
    """A fresh, empty database on each backend: SQLite file or PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'index.sqlite3'}"
        return
    if postgres_server is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is required in CI (install the postgresql package)")
        pytest.skip("no PostgreSQL available")
    url, drop = _fresh_pg_database(postgres_server)
    try:
        yield url
    finally:
        drop()


@pytest.fixture(autouse=True)
def _no_gateway_by_default(monkeypatch) -> None:
    """Apps built in tests run no DICOM e-mail gateway unless the test asks (``gateway_worker=True``)."""
    monkeypatch.setenv("TELERAD_GATEWAY_WORKER", "false")


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """Settings of a fresh server: own data folder and database; the DICOM e-mail gateway's background work is
    off (tests of the gateway turn it on with ``gateway_worker=True``)."""
    return Settings(data_dir=tmp_path / "data", database_url=database_url, gateway_worker=False)


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    """Settings on SQLite only (tests that are about the HTTP edge, not the store); no gateway work."""
    return Settings(data_dir=tmp_path / "data", gateway_worker=False)


def make_token(settings: Settings, tenant: str = "site-a", scope: str = "system/*.cruds") -> str:
    """A bearer token the server of ``settings`` accepts."""
    return issue(load_or_create_key(settings.data_dir), tenant=tenant, scope=scope, ttl_seconds=3600)


def auth(token: str) -> dict[str, str]:
    """The Authorization header for a token."""
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def app(settings: Settings):
    """The app on both backends."""
    from server.app import create_app

    app = create_app(settings)
    yield app
    app.state.engine.dispose()


@pytest.fixture
def client(app):
    """An in-process HTTP client of the app."""
    from fastapi.testclient import TestClient

    with TestClient(app, base_url="http://testserver") as c:
        yield c


class LiveServer:
    """uvicorn serving an app in a thread on a loopback port."""

    def __init__(self, app, port: int | None = None) -> None:
        import uvicorn

        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def live_server(settings: Settings) -> Iterator[LiveServer]:
    """The app under uvicorn on loopback (both backends).

    ``public_base_url`` is set because dicomweb-client sends a ``Host`` header without the port.
    """
    from server.app import create_app

    port = _free_port()
    app = create_app(settings.model_copy(update={"public_base_url": f"http://127.0.0.1:{port}"}))
    try:
        with LiveServer(app, port) as server:
            yield server
    finally:
        app.state.engine.dispose()
