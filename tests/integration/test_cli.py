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
    if "--smtp-port" not in extra and "--no-smtp" not in extra:
        extra = (*extra, "--smtp-port", str(_free_port()))  # never the default 2525 of a parallel run
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


def test_client_add_list_remove(tmp_path):
    import json

    from cryptography.hazmat.primitives.asymmetric import ec

    from server.security.oauth import jwk_of

    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELERAD_")}
    out = _telerad("client", "add", "--data-dir", str(data), "--tenant", "site-a", "--scope",
                   "system/*.rs system/Task.cu", "--secret", env=env).stdout
    fields = dict(line.split(": ", 1) for line in out.splitlines())
    secret_id, secret = fields["client_id"], fields["client_secret"]
    assert len(secret) >= 43
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk_of(ec.generate_private_key(ec.SECP384R1()).public_key(), kid="k")]}))
    out = _telerad("client", "add", "--data-dir", str(data), "--tenant", "site-b", "--scope", "system/*.rs",
                   "--jwks-file", str(jwks), "--client-id", "pacs-b", env=env).stdout
    assert out.splitlines() == ["client_id: pacs-b"]
    listing = _telerad("client", "list", "--data-dir", str(data), env=env).stdout.splitlines()
    rows = {line.split("\t")[0]: line.split("\t") for line in listing}
    assert rows[secret_id][1:3] == ["site-a", "client_secret"] and rows[secret_id][4] == "system/*.rs system/Task.cu"
    assert rows["pacs-b"][1:3] == ["site-b", "private_key_jwt"]
    assert secret not in "\n".join(listing)
    only_b = _telerad("client", "list", "--data-dir", str(data), "--tenant", "site-b", env=env).stdout
    assert [line.split("\t")[0] for line in only_b.splitlines()] == ["pacs-b"]
    assert _telerad("client", "remove", secret_id, "--data-dir", str(data), env=env).stdout.strip() \
        == f"removed {secret_id}"
    listing = _telerad("client", "list", "--data-dir", str(data), env=env).stdout
    assert secret_id not in listing and "pacs-b" in listing


def test_client_add_refuses_bad_input(tmp_path):
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELERAD_")}

    def fail(*args: str) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "server", "client", *args], capture_output=True, text=True, env=env)
        assert r.returncode == 2, r
        return r

    base = ["add", "--data-dir", str(data), "--tenant", "site-a"]
    assert "invalid tenant" in fail("add", "--data-dir", str(data), "--tenant", "../x", "--scope", "system/*.rs",
                                    "--secret").stderr
    assert "system/ scopes only" in fail(*base, "--scope", "user/*.rs", "--secret").stderr
    fail(*base, "--scope", "system/*.rs")  # neither --secret nor --jwks-file (argparse)
    bad = tmp_path / "bad.json"
    bad.write_text('{"keys": [{"kty": "oct", "k": "AAAA"}]}')
    assert "kty" in fail(*base, "--scope", "system/*.rs", "--jwks-file", str(bad)).stderr
    assert "cannot read" in fail(*base, "--scope", "system/*.rs", "--jwks-file", str(tmp_path / "none")).stderr
    _telerad("client", *base, "--scope", "system/*.rs", "--secret", "--client-id", "dup", env=env)
    assert "exists" in fail(*base, "--scope", "system/*.rs", "--secret", "--client-id", "dup").stderr
    assert "no client" in fail("remove", "nobody", "--data-dir", str(data)).stderr


def test_client_secret_token_from_a_served_process(tmp_path):
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELERAD_")}
    out = _telerad("client", "add", "--data-dir", str(data), "--tenant", "site-a", "--scope", "system/*.rs",
                   "--secret", env=env).stdout
    fields = dict(line.split(": ", 1) for line in out.splitlines())
    proc, base, env = _start(data)
    try:
        smart = httpx.get(f"{base}/.well-known/smart-configuration").json()
        assert smart["token_endpoint"] == f"{base}/auth/token"
        r = httpx.post(smart["token_endpoint"], data={"grant_type": "client_credentials", "scope": "system/*.cruds"},
                       auth=(fields["client_id"], fields["client_secret"]))
        assert r.status_code == 200, r.text
        assert r.json()["scope"] == "system/*.rs"
        headers = {"Authorization": f"Bearer {r.json()['access_token']}"}
        assert httpx.get(f"{base}/dicomweb/studies", headers=headers).status_code == 204
        assert httpx.get(f"{base}/fhir/Task", headers=headers).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)
