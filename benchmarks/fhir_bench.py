#!/usr/bin/env python3
"""FHIR benchmark: create, read, search and update throughput and latency of our FHIR R4 store, loopback only.

One command (from the repository root):

    python benchmarks/fhir_bench.py                       # 100,000 resources, SQLite and PostgreSQL
    python benchmarks/fhir_bench.py --n 5000 --backends sqlite

For every backend a fresh server (``telerad serve``) is started on a temporary data folder; PostgreSQL is a
throwaway cluster (``initdb`` + ``pg_ctl`` on 127.0.0.1, as the ``postgres`` user when run as root, defaults:
fsync and synchronous_commit on). The data set: 200 Organizations, 50 HealthcareServices and N/10 Patients
(the referenced directory, not timed), N/2 teleconsult ServiceRequests and N/2
transfer Tasks whose ``basedOn``/``focus`` reference them, all claiming our profiles (``meta.profile``) and
valid against them. Creates are single POSTs from ``--concurrency`` asyncio clients (httpx, keep-alive);
latencies are sequential requests from one client. The script prints one Markdown table per backend and writes
all numbers as JSON into benchmarks/results/. Peak RSS sums the server process and its worker processes.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import glob
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
FHIR_JSON = "application/fhir+json"
B = "https://telerad-bridge.de/fhir"
SR_PROFILE = f"{B}/StructureDefinition/teleconsult-servicerequest"
TASK_PROFILE = f"{B}/StructureDefinition/teleconsult-task"

# ------------------------------------------------------------------------------------------------
# synthetic data (the shapes of tests/unit/test_fhir_profiles.py)
# ------------------------------------------------------------------------------------------------
CITIES = ["Bremen", "München", "Köln", "Nürnberg", "Düsseldorf", "Lübeck", "Würzburg", "Göttingen", "Kiel",
          "Freiburg", "Münster", "Bad Tölz", "Osnabrück", "Saarbrücken", "Regensburg", "Jena", "Tübingen"]
KINDS = ["Klinikum", "Radiologie", "MVZ", "Universitätsklinikum", "Praxis für Radiologie", "Kreiskrankenhaus"]
REASONS = ["Verdacht auf Lungenembolie", "Polytrauma, Zweitbefundung", "Schlaganfall, Lyse-Entscheidung",
           "Unklare Raumforderung Leber", "Kniegelenk nach Sturz", "Verlaufskontrolle Rundherd",
           "Subarachnoidalblutung?", "Pneumonie, Verlauf"]
CONSULT = ["teleconsult", "reporting", "second-reading", "transfer", "prior-request", "ai-service"]
SEND = ["key-images-only", "anonymised", "with-report", "short-note"]
# selective distributions: ServiceRequest.priority stat 1 %, Task.status requested 2 %
PRIORITY = [("routine", 80), ("urgent", 15), ("asap", 4), ("stat", 1)]
# a Task is created as draft, requested or ready (server/fhir/task.py)
TASK_STATUS = [("ready", 70), ("draft", 28), ("requested", 2)]
BUSINESS = {"ready": "transfer-queued", "draft": "transfer-queued", "requested": "transfer-queued"}
FAMILY = ["Müller", "Schmidt", "Schneider", "Fischer", "Weber", "Meyer", "Wagner", "Becker", "Schäfer", "Köhler",
          "Krüger", "Groß", "Jäger", "Öztürk", "Yılmaz", "Kowalski", "Nowak", "Ziegler", "Hoffmann", "Braun"]
GIVEN = ["Jürgen", "Björn", "Anna", "Maria", "Käthe", "Sören", "Lena", "Ömer", "Zoë", "Hans-Jürgen"]


def weighted(rng: random.Random, table: list[tuple[str, int]]) -> str:
    return rng.choices([v for v, _ in table], [w for _, w in table])[0]


def organization(i: int, rng: random.Random) -> dict:
    city = CITIES[i % len(CITIES)]
    return {"resourceType": "Organization", "active": True,
            "identifier": [{"system": "http://fhir.de/sid/arge-ik/iknr", "value": f"26{i:07d}"}],
            "name": f"{KINDS[rng.randrange(len(KINDS))]} {city}-{['Nord', 'Süd', 'Mitte', 'Ost', 'West'][i % 5]} {i}",
            "address": [{"line": [f"Hauptstraße {i % 90 + 1}"], "city": city, "postalCode": f"{10000 + i * 7}",
                         "country": "DE"}]}


def patient(i: int, rng: random.Random) -> dict:
    return {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.276.0.76.4.8", "value": f"PID-{i}"}],
            "name": [{"family": rng.choice(FAMILY), "given": [rng.choice(GIVEN)]}],
            "gender": rng.choice(["male", "female"]),
            "birthDate": f"{rng.randrange(1930, 2020)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"}


def healthcare_service(i: int, org: str) -> dict:
    return {"resourceType": "HealthcareService", "active": True, "name": f"Teleradiologie {i}",
            "providedBy": {"reference": f"Organization/{org}"}}


def service_request(i: int, rng: random.Random, orgs: list[str], patients: list[str], services: list[str]) -> dict:
    when = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(minutes=7 * i)
    return {
        "resourceType": "ServiceRequest",
        "meta": {"profile": [SR_PROFILE]},
        "identifier": [{"system": f"{B}/sid/order", "value": f"ORD-{i:08d}"}],
        "status": "active", "intent": "order", "priority": weighted(rng, PRIORITY),
        "code": {"coding": [{"system": f"{B}/CodeSystem/consult-kind", "code": rng.choice(CONSULT)}]},
        "orderDetail": [{"coding": [{"system": f"{B}/CodeSystem/send-option", "code": rng.choice(SEND)}]}],
        "subject": {"reference": f"Patient/{rng.choice(patients)}"},
        "authoredOn": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "requester": {"reference": f"PractitionerRole/r{rng.randrange(500)}"},
        "performer": [{"reference": f"Organization/{rng.choice(orgs)}"},
                      {"reference": f"HealthcareService/{rng.choice(services)}"}],
        "reasonCode": [{"text": rng.choice(REASONS)}],
    }


def task(i: int, rng: random.Random, sr_id: str, sr: dict, orgs: list[str]) -> dict:
    status = weighted(rng, TASK_STATUS)
    out = {
        "resourceType": "Task",
        "meta": {"profile": [TASK_PROFILE]},
        "identifier": [{"system": f"{B}/sid/transfer", "value": f"TRF-{i:08d}"}],
        "status": status,
        "intent": "order",
        "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]},
        "basedOn": [{"reference": f"ServiceRequest/{sr_id}"}],
        "focus": {"reference": f"ServiceRequest/{sr_id}"},
        "for": sr["subject"],
        "authoredOn": sr["authoredOn"],
        "requester": {"reference": f"Organization/{rng.choice(orgs)}"},
        "owner": {"reference": f"Organization/{rng.choice(orgs)}"},
    }
    if status != "draft":
        out["businessStatus"] = {"coding": [{"system": f"{B}/CodeSystem/task-business-status",
                                             "code": BUSINESS[status]}]}
    return out


def check_profiles(samples: list[dict]) -> None:
    """Fail early when the synthetic resources do not validate against our profiles (server/fhir/profiles)."""
    sys.path.insert(0, str(REPO))
    try:
        from server.fhir.profiles import validate_resource
    except ImportError:  # pragma: no cover - running outside the repository
        return
    for r in samples:
        issues = validate_resource(json.loads(json.dumps(r)))
        if issues:
            raise SystemExit(f"synthetic {r['resourceType']} is not profile-valid: {issues}")


# ------------------------------------------------------------------------------------------------
# servers
# ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    """A throwaway PostgreSQL cluster on loopback (tests/conftest.py ``_Cluster``, but durable: fsync on)."""

    def __init__(self, workdir: Path) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            raise RuntimeError("PostgreSQL binaries not found (/usr/lib/postgresql/*/bin)")
        self.bindir = Path(found[-1]).parent
        self.dir = workdir / "pg"
        self.dir.mkdir()
        self.port = free_port()
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
        self._run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8")
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=200"
        self._run("pg_ctl", "-D", str(data), "-o", opts, "-l", str(self.dir / "log"), "-w", "start")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def pids(self) -> list[int]:
        try:
            pid = int((self.dir / "data" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        return [pid]

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "stop")
        except subprocess.CalledProcessError:
            pass


class Server:
    """``telerad serve`` on a fresh data folder."""

    def __init__(self, workdir: Path, python: str, workers: int, database_url: str | None) -> None:
        self.dir = workdir / "data"
        self.python, self.workers, self.database_url = python, workers, database_url
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/fhir"
        self.log = workdir / "server.log"
        self.proc: subprocess.Popen | None = None
        self.headers: dict[str, str] = {}

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TELERAD_LOG_LEVEL="warning")
        env.pop("TELERAD_DATABASE_URL", None)
        if self.database_url:
            env["TELERAD_DATABASE_URL"] = self.database_url
        cmd = [self.python, "-m", "server", "serve", "--data-dir", str(self.dir), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", str(self.workers)]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited during start-up:\n" + self.log.read_text()[-3000:])
            try:
                if httpx.get(f"{self.base}/metadata", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start:\n" + self.log.read_text()[-3000:])
            time.sleep(0.2)
        token = subprocess.run([self.python, "-m", "server", "token", "--data-dir", str(self.dir), "--tenant",
                                "bench", "--scope", "system/*.cruds"], cwd=REPO, capture_output=True, text=True,
                               check=True)
        self.headers = {"Authorization": f"Bearer {token.stdout.strip().splitlines()[-1]}",
                        "Accept": FHIR_JSON}

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


class RssSampler:
    """Peak of the summed RSS of a process and its children, sampled in a thread."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.rss())
            except psutil.Error:
                pass
            self._stop.wait(0.1)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds(pid: int) -> float:
    p = psutil.Process(pid)
    total = 0.0
    for q in [p, *p.children(recursive=True)]:
        try:
            t = q.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


# ------------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def lat(values: list[float]) -> dict:
    return {"n": len(values), "p50_ms": pct(values, 50), "p95_ms": pct(values, 95)}


class Failures:
    def __init__(self) -> None:
        self.count = 0
        self.first: list[str] = []

    def add(self, what: str, resp: httpx.Response | None, exc: Exception | None = None) -> None:
        self.count += 1
        if len(self.first) < 5:
            detail = f"{resp.status_code} {resp.text[:300]}" if resp is not None else repr(exc)
            self.first.append(f"{what}: {detail}")


async def post_all(client: httpx.AsyncClient, rtype: str, bodies: list[bytes], concurrency: int,
                   failures: Failures) -> tuple[list[str | None], float, list[float]]:
    """POST every body (``concurrency`` in flight); the new ids in order, elapsed seconds, latencies."""
    ids: list[str | None] = [None] * len(bodies)
    latencies: list[float] = []
    next_i = 0

    async def worker() -> None:
        nonlocal next_i
        while next_i < len(bodies):
            i = next_i
            next_i += 1
            t0 = time.perf_counter()
            try:
                resp = await client.post(f"/{rtype}", content=bodies[i],
                                         headers={"Content-Type": FHIR_JSON, "Prefer": "return=minimal"})
            except httpx.HTTPError as exc:
                failures.add(f"POST {rtype}", None, exc)
                continue
            latencies.append((time.perf_counter() - t0) * 1000)
            if resp.status_code != 201:
                failures.add(f"POST {rtype}", resp)
                continue
            ids[i] = resp.headers["location"].split(f"/{rtype}/", 1)[1].split("/", 1)[0]

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ids, time.perf_counter() - t0, latencies


async def sequential(client: httpx.AsyncClient, urls: list[str], failures: Failures,
                     expect_total: bool = False) -> tuple[list[float], list[int]]:
    """GET each URL in turn; latencies (ms) and the number of entries returned."""
    out, sizes = [], []
    for url in urls:
        t0 = time.perf_counter()
        resp = await client.get(url)
        out.append((time.perf_counter() - t0) * 1000)
        if resp.status_code != 200:
            failures.add(f"GET {url}", resp)
            continue
        if expect_total:
            sizes.append(sum(1 for e in resp.json().get("entry", []) if e["search"]["mode"] == "match"))
    return out, sizes


async def concurrent_reads(client: httpx.AsyncClient, urls: list[str], concurrency: int,
                           failures: Failures) -> float:
    next_i = 0

    async def worker() -> None:
        nonlocal next_i
        while next_i < len(urls):
            url = urls[next_i]
            next_i += 1
            resp = await client.get(url)
            if resp.status_code != 200:
                failures.add(f"GET {url}", resp)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(urls) / (time.perf_counter() - t0)


async def run_backend(server: Server, args: argparse.Namespace, log) -> dict:
    rng = random.Random(args.seed)
    failures = Failures()
    n_sr = args.n // 2
    n_task = args.n - n_sr
    res: dict = {"n": args.n, "service_requests": n_sr, "tasks": n_task, "workers": args.workers,
                 "concurrency": args.concurrency}
    limits = httpx.Limits(max_connections=args.concurrency + 2, max_keepalive_connections=args.concurrency + 2)
    async with httpx.AsyncClient(base_url=server.base, headers=server.headers, limits=limits,
                                 timeout=httpx.Timeout(120.0)) as client:
        # organisations (directory entries), not timed
        org_bodies = [organization(i, rng) for i in range(args.organizations)]
        org_ids, _, _ = await post_all(client, "Organization",
                                       [json.dumps(o).encode() for o in org_bodies], args.concurrency, failures)
        orgs = [i for i in org_ids if i]
        org_names = [o["name"] for o, i in zip(org_bodies, org_ids) if i]

        services = [i for i in (await post_all(client, "HealthcareService", [
            json.dumps(healthcare_service(i, rng.choice(orgs))).encode() for i in range(args.services)],
            args.concurrency, failures))[0] if i]
        log(f"creating {max(1, n_sr // 5)} Patients (referenced by the orders; not timed) ...")
        patients = [i for i in (await post_all(client, "Patient", [
            json.dumps(patient(i, rng)).encode() for i in range(max(1, n_sr // 5))],
            args.concurrency, failures))[0] if i]
        if not (orgs and services and patients):
            raise RuntimeError("directory set-up failed: " + "; ".join(failures.first))
        srs = [service_request(i, rng, orgs, patients, services) for i in range(n_sr)]
        check_profiles(srs[:50])
        cpu0 = cpu_seconds(server.proc.pid)
        log(f"creating {n_sr} ServiceRequests ...")
        sr_ids, t_sr, lat_sr = await post_all(client, "ServiceRequest", [json.dumps(s).encode() for s in srs],
                                              args.concurrency, failures)
        log(f"  {n_sr / t_sr:.0f}/s")
        live = [(i, s) for i, s in zip(sr_ids, srs) if i]
        if not live:
            raise RuntimeError("no ServiceRequest was created: " + "; ".join(failures.first))
        tasks = [task(k, rng, *live[k % len(live)], orgs) for k in range(n_task)]
        check_profiles(tasks[:50])
        log(f"creating {n_task} Tasks ...")
        task_ids, t_task, lat_task = await post_all(client, "Task", [json.dumps(t).encode() for t in tasks],
                                                    args.concurrency, failures)
        log(f"  {n_task / t_task:.0f}/s")
        cpu1 = cpu_seconds(server.proc.pid)
        log(f"  client CPU so far {sum(os.times()[:2]):.1f}s, server CPU during creates {cpu1 - cpu0:.1f}s, "
            f"wall {t_sr + t_task:.1f}s")
        res["create"] = {"per_s": args.n / (t_sr + t_task), "sr_per_s": n_sr / t_sr, "task_per_s": n_task / t_task,
                         "seconds": t_sr + t_task, "latency": lat(lat_sr + lat_task),
                         "server_cpu_ms_per_create": (cpu1 - cpu0) / args.n * 1000}

        if args.bundles:
            bodies = []
            for b in range(args.bundles):
                entries = [{"fullUrl": f"urn:uuid:{b:08x}-0000-4000-8000-{k:012x}", "resource":
                            service_request(n_sr + b * 100 + k, rng, orgs, patients, services),
                            "request": {"method": "POST", "url": "ServiceRequest"}} for k in range(100)]
                for e in entries:
                    e["resource"]["priority"] = "routine"  # keep the stat share of the searches
                bodies.append(json.dumps({"resourceType": "Bundle", "type": "transaction",
                                          "entry": entries}).encode())
            log(f"{args.bundles} transaction Bundles of 100 ...")
            t0 = time.perf_counter()
            bl, ok = [], 0
            for body in bodies:  # one at a time: a transaction is one commit
                t1 = time.perf_counter()
                resp = await client.post(server.base, content=body, headers={"Content-Type": FHIR_JSON})
                bl.append((time.perf_counter() - t1) * 1000)
                if resp.status_code != 200:
                    failures.add("POST Bundle", resp)
                else:
                    ok += 1
            res["bundle"] = {"per_s": ok * 100 / (time.perf_counter() - t0), "latency": lat(bl), "ok": ok}

        reps = args.reps
        live_sr = [i for i in sr_ids if i]
        live_task = [i for i in task_ids if i]
        read_urls = [f"/ServiceRequest/{rng.choice(live_sr)}" if k % 2 else f"/Task/{rng.choice(live_task)}"
                     for k in range(reps)]
        log("reads ...")
        await sequential(client, read_urls[:20], failures)  # warm up
        res["read"] = lat((await sequential(client, read_urls, failures))[0])
        res["read_concurrent_per_s"] = await concurrent_reads(
            client, [f"/ServiceRequest/{rng.choice(live_sr)}" for _ in range(reps * 5)], args.concurrency, failures)

        subjects = sorted({s["subject"]["reference"] for s in srs})
        searches = {
            "Task?status=requested&_count=20": ["/Task?status=requested&_count=20"] * reps,
            "ServiceRequest?priority=stat&_count=20": ["/ServiceRequest?priority=stat&_count=20"] * reps,
            "Task?owner=Organization/x&_count=20": [f"/Task?owner=Organization/{rng.choice(orgs)}&_count=20"
                                                    for _ in range(reps)],
            "ServiceRequest?subject=Patient/y": [f"/ServiceRequest?subject={rng.choice(subjects)}"
                                                 for _ in range(reps)],
            "Task?status=requested&_include=Task:based-on&_count=20":
                ["/Task?status=requested&_include=Task:based-on&_count=20"] * reps,
            "Organization?name=<city prefix>": [f"/Organization?name={rng.choice(org_names).split()[-2][:5]}"
                                                for _ in range(reps)],
        }
        res["search"] = {}
        for name, urls in searches.items():
            log(f"search {name} ...")
            await sequential(client, urls[:10], failures)
            latencies, sizes = await sequential(client, urls, failures, expect_total=True)
            res["search"][name] = {**lat(latencies), "mean_results": sum(sizes) / len(sizes) if sizes else None}

        log("updates ...")
        update_lat = []
        targets = rng.sample(range(len(live)), min(reps, len(live)))
        for k in targets:
            rid, body = live[k]
            new = dict(body, id=rid, reasonCode=[{"text": body["reasonCode"][0]["text"] + " (ergänzt)"}])
            t0 = time.perf_counter()
            resp = await client.put(f"/ServiceRequest/{rid}", content=json.dumps(new).encode(),
                                    headers={"Content-Type": FHIR_JSON, "Prefer": "return=minimal"})
            update_lat.append((time.perf_counter() - t0) * 1000)
            if resp.status_code != 200:
                failures.add("PUT ServiceRequest", resp)
        res["update"] = lat(update_lat)
    res["failures"] = {"count": failures.count, "first": failures.first}
    return res


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def f1(v) -> str:
    return "—" if v is None else f"{v:,.1f}" if isinstance(v, float) else f"{v:,}"


def pp(d: dict) -> str:
    return f"{d['p50_ms']:.2f} / {d['p95_ms']:.2f}" if d.get("p50_ms") is not None else "—"


def table(backend: str, r: dict) -> str:
    c = r["create"]
    rows = [("| metric | result | target |", None), ("|---|---|---|", None)]
    ok = "PASS" if c["per_s"] >= 500 else "FAIL"
    rows.append((f"| creates/s (single POST, {r['concurrency']} clients) | {f1(c['per_s'])} "
                 f"(SR {f1(c['sr_per_s'])}, Task {f1(c['task_per_s'])}) | ≥ 500: {ok} |", None))
    rows.append((f"| create request p50 / p95 ms (under load) | {pp(c['latency'])} | — |", None))
    rows.append((f"| server CPU ms per create | {c['server_cpu_ms_per_create']:.2f} | — |", None))
    if "bundle" in r:
        rows.append((f"| creates/s in transaction Bundles of 100 | {f1(r['bundle']['per_s'])} "
                     f"(p50 {r['bundle']['latency']['p50_ms']:.0f} ms per Bundle) | — |", None))
    rows.append((f"| read p50 / p95 ms | {pp(r['read'])} | — |", None))
    rows.append((f"| reads/s ({r['concurrency']} clients) | {f1(r['read_concurrent_per_s'])} | — |", None))
    for name, s in r["search"].items():
        target = "—"
        if name.startswith(("Task?status=requested&_count", "ServiceRequest?priority")):
            target = f"p50 ≤ 10 ms: {'PASS' if s['p50_ms'] <= 10 else 'FAIL'}"
        mean = f" ({s['mean_results']:.0f} results)" if s.get("mean_results") is not None else ""
        rows.append((f"| search `{name}` p50 / p95 ms{mean} | {pp(s)} | {target} |", None))
    rows.append((f"| update p50 / p95 ms | {pp(r['update'])} | — |", None))
    rows.append((f"| peak RSS of the server (MiB) | {r['peak_rss_mib']:.1f} | — |", None))
    head = (f"{backend}: N = {r['n']:,} ({r['service_requests']:,} ServiceRequests + {r['tasks']:,} Tasks), "
            f"`telerad serve --workers {r['workers']}`, load average at the end "
            f"{', '.join(f'{x:.1f}' for x in r.get('load_average_after', ()))}")
    out = head + "\n\n" + "\n".join(x for x, _ in rows)
    if r["failures"]["count"]:
        out += f"\n\n{r['failures']['count']} failed requests, first: " + "; ".join(r["failures"]["first"])
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="ServiceRequests + Tasks (half each)")
    ap.add_argument("--backends", default="sqlite,postgres", help="comma separated: sqlite, postgres")
    ap.add_argument("--workers", type=int, default=2, help="`telerad serve --workers`")
    ap.add_argument("--concurrency", type=int, default=16, help="concurrent HTTP clients for creates")
    ap.add_argument("--organizations", type=int, default=200)
    ap.add_argument("--services", type=int, default=50, help="HealthcareServices (performers of the orders)")
    ap.add_argument("--bundles", type=int, default=20, help="transaction Bundles of 100 ServiceRequests (0: none)")
    ap.add_argument("--reps", type=int, default=300, help="sequential requests per latency")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs `-m server`")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folders")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] {msg}", file=sys.stderr, flush=True)

    results: dict = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                     "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)},
                     "args": {k: v for k, v in vars(args).items() if k != "python"}, "backends": {}}
    tables = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        work = Path(tempfile.mkdtemp(prefix=f"fhir-bench-{backend}-"))
        if os.geteuid() == 0:
            os.chmod(work, 0o755)
        cluster = PgCluster(work) if backend == "postgres" else None
        server = None
        try:
            url = cluster.start() if cluster else None
            server = Server(work, args.python, args.workers, url)
            server.start()
            log(f"{backend}: server on {server.base}")
            with RssSampler(server.proc.pid) as rss:
                r = asyncio.run(run_backend(server, args, log))
            r["peak_rss_mib"] = rss.peak / 2**20
            r["load_average_after"] = os.getloadavg()
            if cluster:
                r["database"] = "PostgreSQL " + subprocess.run(
                    [str(cluster.bindir / "postgres"), "--version"], capture_output=True, text=True).stdout.split()[-1]
            results["backends"][backend] = r
            tables.append(table(backend, r))
            print(tables[-1] + "\n", flush=True)
        finally:
            if server:
                server.stop()
            if cluster:
                cluster.stop()
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"fhir-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(results, indent=2))
    log(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
