"""Gateway nodes as real processes on loopback: ``telerad serve`` with its own data folder, HTTP and SMTP port.

Each node gets its site key (``telerad keys init``), learns the other sites from the operator's CSV
(``telerad directory import``) and routes their mail domains straight to their SMTP ports (``mail_routes``),
like an MTA transport map. Used by the two-node tests and the end-to-end benchmark.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Fast timing for tests: retries after ~0.3 s, doubling up to 2 s; workers look every 0.1 s.
FAST = {
    "gateway_poll_seconds": "0.1",
    "send_retry_base_seconds": "0.3",
    "send_retry_max_seconds": "2",
    "send_max_attempts": "50",
    "receipt_timeout_seconds": "60",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def telerad(*args: str, env: dict | None = None) -> str:
    """Run the CLI; its stdout (raises with the output on failure)."""
    proc = subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env or _base_env())
    if proc.returncode != 0:
        raise RuntimeError(f"telerad {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def _base_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("TELERAD_")}


class Node:
    """One site's gateway as a ``telerad serve`` process."""

    def __init__(self, root: Path, name: str, *, tenant: str | None = None, domain: str | None = None,
                 database_url: str | None = None) -> None:
        self.name = name
        self.tenant = tenant or f"site-{name}"
        self.domain = domain or f"{name}.example"
        self.address = f"dicom@{self.domain}"
        self.site_id = f"SITE-{name.upper()}"
        self.data = root / name
        self.data.mkdir(parents=True, exist_ok=True)
        self.database_url = database_url
        self.http_port = free_port()
        self.smtp_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.proc: subprocess.Popen | None = None
        self.log = self.data / "server.log"
        self.settings: dict[str, str] = dict(FAST)
        self.routes: dict[str, int] = {}
        self._token: str | None = None
        telerad("keys", "init", "--data-dir", str(self.data), "--tenant", self.tenant, "--address", self.address,
                "--name", f"Klinik {name.upper()}")

    # ---- directory ---------------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """The FHIR reference of this node's DICOM e-mail Endpoint in the other nodes' directories."""
        return f"Endpoint/{self.site_id}-dicom-email"

    def public_key(self) -> str:
        return telerad("keys", "export", "--data-dir", str(self.data), "--tenant", self.tenant)

    def learn(self, *others: Node, max_mail_size: int | None = None) -> None:
        """Import the other sites into this node's directory (operator CSV + key files) and route to them."""
        folder = self.data / "directory"
        folder.mkdir(exist_ok=True)
        lines = ["site_id;organization;city;telematik_id;address;max_mail_size;drg_profile_version;public_key;"
                 "network"]
        for other in others:
            (folder / f"{other.name}.asc").write_text(other.public_key())
            lines.append(f"{other.site_id};Klinik {other.name.upper()};Bremen;;{other.address};"
                         f"{max_mail_size or ''};1.7;{other.name}.asc;Testnetz")
            self.routes[other.domain] = other.smtp_port
        (folder / "sites.csv").write_text("\n".join(lines) + "\n")
        telerad("directory", "import", str(folder / "sites.csv"), "--data-dir", str(self.data),
                "--tenant", self.tenant, env=self._env())

    # ---- process -----------------------------------------------------------------------------------------
    def _env(self) -> dict:
        env = _base_env()
        if self.database_url:
            env["TELERAD_DATABASE_URL"] = self.database_url
        env["TELERAD_MAIL_ROUTES"] = ",".join(f"{d}=127.0.0.1:{p}/none" for d, p in self.routes.items())
        env.update({f"TELERAD_{k.upper()}": v for k, v in self.settings.items()})
        return env

    def start(self, timeout: float = 30.0) -> Node:
        """Start ``telerad serve`` and wait until /healthz answers."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--data-dir", str(self.data), "--port", str(self.http_port),
             "--smtp-port", str(self.smtp_port)], cwd=ROOT, env=self._env(), stdout=out, stderr=subprocess.STDOUT)
        out.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200 and self._smtp_up():
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"node {self.name} exited {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {self.name} did not start:\n{self.tail()}")
            time.sleep(0.05)

    def _smtp_up(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=1):
                return True
        except OSError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the process (SIGKILL: no cleanup at all) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """Stop gracefully (SIGTERM), SIGKILL after 20 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # ---- HTTP --------------------------------------------------------------------------------------------
    @property
    def token(self) -> str:
        if self._token is None:
            self._token = telerad("token", "--data-dir", str(self.data), "--tenant", self.tenant,
                                  env=self._env()).strip()
        return self._token

    def http(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=timeout)


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value (returned) or the deadline passes."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@pytest.fixture
def nodes(tmp_path):
    """Nodes A (site-a, a.example) and B (site-b, b.example) that know and route to each other (not started)."""
    a, b = Node(tmp_path, "a"), Node(tmp_path, "b")
    a.learn(b)
    b.learn(a)
    yield a, b
    for node in (a, b):
        node.stop()
