"""The README's server command and `telerad token`, as real processes on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from tests.conftest import _free_port
from tests.dicomdata import make_instance, multipart


def _telerad(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, check=True, **kw)


def _start(data, *extra: str) -> tuple[subprocess.Popen, str, dict]:
    """`telerad serve` as a process; returns it with its base URL once /healthz answers."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELERAD_")}
    proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--data-dir", str(data), "--port", str(port),
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{base}/healthz").status_code == 200:
                return proc, base, env
        except httpx.TransportError:
            pass
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.1)


def test_serve_and_token_round_trip(tmp_path):
    data = tmp_path / "data"
    proc, base, env = _start(data)
    try:
        assert (data / "index.sqlite3").exists()
        token = _telerad("token", "--data-dir", str(data), "--tenant", "site-a", env=env).stdout.strip()
        headers = {"Authorization": f"Bearer {token}"}
        body, ctype = multipart([make_instance(study="1.2.3.77")])
        r = httpx.post(f"{base}/dicomweb/studies", content=body, headers={**headers, "Content-Type": ctype})
        assert r.status_code == 200, r.text
        r = httpx.get(f"{base}/dicomweb/studies", params={"StudyInstanceUID": "1.2.3.77"}, headers=headers)
        assert r.status_code == 200 and len(r.json()) == 1
        ro = _telerad("token", "--data-dir", str(data), "--scope", "system/*.rs", env=env).stdout.strip()
        r = httpx.post(f"{base}/dicomweb/studies", content=body,
                       headers={"Authorization": f"Bearer {ro}", "Content-Type": ctype})
        assert r.status_code == 403
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_token_rejects_bad_tenant(tmp_path):
    r = subprocess.run([sys.executable, "-m", "server", "token", "--data-dir", str(tmp_path), "--tenant", "../x"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "invalid tenant" in r.stderr


def test_serve_with_workers_stores_concurrently(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    data = tmp_path / "data"
    proc, base, env = _start(data, "--workers", "2")
    try:
        token = _telerad("token", "--data-dir", str(data), env=env).stdout.strip()
        headers = {"Authorization": f"Bearer {token}"}

        def store(k: int) -> int:
            study = f"1.2.826.0.7.{k % 3}"  # workers race to create the same studies
            body, ctype = multipart([make_instance(study=study, series=study + ".1", instance_number=i)
                                     for i in range(5)])
            return httpx.post(f"{base}/dicomweb/studies", content=body, timeout=60,
                              headers={**headers, "Content-Type": ctype}).status_code

        with ThreadPoolExecutor(6) as pool:
            assert set(pool.map(store, range(24))) == {200}
        r = httpx.get(f"{base}/dicomweb/studies", headers=headers)
        assert sorted(s["00201208"]["Value"][0] for s in r.json()) == [40, 40, 40]
    finally:
        proc.terminate()
        proc.wait(timeout=15)
