#!/usr/bin/env python3
"""DICOM e-mail gateway benchmark: one CT study from node A to node B end to end, on one machine.

One command (from the repository root):

    python benchmarks/gateway_bench.py                  # 500 x 512x512 CT (~262 MB), defaults + a small sweep
    python benchmarks/gateway_bench.py --quick          # 50 instances: smoke run (~1-2 min)

Two gateways run as real processes (``tests/gateway_nodes.py``: ``telerad serve`` with its own data folder,
HTTP and SMTP port, RSA-3072 site key from ``telerad keys init``, the other site imported from the operator
CSV, its mail domain routed straight to the other SMTP port). A synthetic CT series (same geometry, header
and HU phantom as ``/work/shared/tools/make_series.py``) is STOWed at A (timed separately); then a transfer
job ``POST /gateway/jobs {"study", "recipient": B}`` sends one signed+encrypted instance mail per instance
to B, which decrypts, verifies, stores, imports and acknowledges each with an MDN. Measured per sender
setting (``send_concurrency`` x ``send_batch``; a fresh B each time, A restarted with the setting):

* wall time from job creation to the last receipt (the largest ``acknowledged_at`` of the job's mails; the
  client's poll of ``GET /gateway/jobs/{id}`` when the server gives no timestamps), instance-mails/s and
  MB/s of DICOM payload over it;
* CPU seconds of each node's process tree (psutil, before/after, after the nodes went idle) per mail:
  A = build, sign, encrypt, send, take the receipt; B = receive, decrypt, verify, store, import, MDN;
* peak RSS of each node's process tree (sampled every 0.1 s);
* B's copy checked byte for byte (sha256 of the WADO-RS bytes against the originals): a mismatch fails the
  run (exit code 1, FAIL in the table).

Plus the OpenPGP part alone, in this process with the nodes' own site keys: ``encrypt_and_sign(...,
compress=False)`` and ``decrypt_and_verify`` of one instance and of its DRG inner entity (base64, what the
gateway really encrypts), to split crypto from the rest. ``--profile`` adds one more transfer with py-spy
attached to both nodes and lists where their CPU goes. Prints Markdown tables (progress on stderr) and writes
``benchmarks/results/gateway-YYYYmmdd-HHMMSS.json``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import hashlib
import io
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.gateway_nodes import Node  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MB = 1_000_000  # payload sizes and throughput in MB = 10^6 bytes; RSS in MiB
MIB = 2 ** 20
RETRIEVE_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
TARGET_MAILS_PER_S = 30.0
TARGET_RSS_MIB = 300 * MB / MIB  # "RSS under 300 MB"
NETWORK_MAILS_PER_S = 16.0  # DRG network average over all ~700 sites


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# the study
# ------------------------------------------------------------------------------------------------
@dataclass
class Study:
    uid: str
    instances: list[bytes]
    sha256: dict[str, str]  # SOP Instance UID -> sha256 of the Part 10 bytes

    @property
    def nbytes(self) -> int:
        return sum(len(d) for d in self.instances)


def ct_series(n: int, size: int, seed: int) -> Study:
    """``n`` axial CT slices of ``size`` x ``size`` int16 HU, built slice by slice like make_series.py does for
    its CT series (ellipsoid body, organ, bone, Gaussian noise sd 8 HU; consistent geometry; ISO_IR 192)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j].astype(np.float32)
    study = {"uid": generate_uid(), "acc": "ACC-0001", "desc": "CT Thorax/Abdomen"}
    series_uid, for_uid = generate_uid(), generate_uid()
    spacing, thickness = 0.7, 2.5
    now = dt.datetime.now()
    out: list[bytes] = []
    sha: dict[str, str] = {}
    for i in range(n):
        z = -1.0 + 2.0 * i / max(1, n - 1)
        body = (x / .85) ** 2 + (y / .7) ** 2 + (z / 1.2) ** 2 < 1
        organ = ((x - .3) / .25) ** 2 + (y / .3) ** 2 + (z / .6) ** 2 < 1
        bone = ((x + .35) ** 2 + (y + .1) ** 2 < .012) & body
        v = np.full(x.shape, -1000, np.int16)
        v[body], v[organ], v[bone] = 40, 80, 900
        v += rng.normal(0, 8, v.shape).astype(np.int16)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Müller^Jürgen", "PAT-0001", "19600101", "M"
        ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = study["uid"], "1", study["acc"]
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.StudyDescription, ds.ReferringPhysicianName = study["desc"], "Doc^Referring"
        ds.Modality = "CT"
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, 1, "CT axial"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = for_uid, ""
        ds.Manufacturer, ds.InstanceNumber, ds.AcquisitionNumber, ds.Laterality = "stackcheck", i + 1, 1, ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientPosition = "HFS"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        zpos = -i * thickness
        ds.ImagePositionPatient = [-spacing * size / 2, -spacing * size / 2, zpos]
        ds.SliceLocation, ds.SliceThickness, ds.PixelSpacing = zpos, thickness, [spacing, spacing]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.KVP, ds.ConvolutionKernel = 120, "B30f"
        ds.PixelData = v.tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
        out.append(data)
        sha[str(ds.SOPInstanceUID)] = hashlib.sha256(data).hexdigest()
    return Study(study["uid"], out, sha)


def series_from_dir(folder: Path) -> Study:
    """All ``*.dcm`` below ``folder`` (e.g. made by make_series.py); they must belong to one study."""
    instances, sha, studies = [], {}, set()
    for path in sorted(folder.rglob("*.dcm")):
        data = path.read_bytes()
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
        studies.add(str(ds.StudyInstanceUID))
        instances.append(data)
        sha[str(ds.SOPInstanceUID)] = hashlib.sha256(data).hexdigest()
    if len(studies) != 1:
        raise SystemExit(f"{folder}: expected the files of exactly one study, found {len(studies)}")
    return Study(studies.pop(), instances, sha)


def multipart(parts: list[bytes]) -> tuple[bytes, str]:
    boundary = os.urandom(12).hex()
    b = boundary.encode()
    body = b"".join(b"--" + b + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts)
    return body + b"--" + b + b"--\r\n", f'multipart/related; type="application/dicom"; boundary="{boundary}"'


def split_multipart(body: bytes, content_type: str) -> list[bytes]:
    """Independent simple splitter (not the server's parser): the payloads of a multipart body."""
    boundary = content_type.split("boundary=")[1].split(";")[0].strip().strip('"').encode()
    out = []
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        out.append(chunk[2:].partition(b"\r\n\r\n")[2][:-2])
    return out


# ------------------------------------------------------------------------------------------------
# process tree: CPU and RSS
# ------------------------------------------------------------------------------------------------
def _tree(pid: int) -> list[psutil.Process]:
    try:
        p = psutil.Process(pid)
        return [p] + p.children(recursive=True)
    except psutil.Error:
        return []


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of the process, its live children and its reaped children."""
    total = 0.0
    for i, p in enumerate(_tree(pid)):
        try:
            t = p.cpu_times()
            total += t.user + t.system + ((t.children_user + t.children_system) if i == 0 else 0.0)
        except psutil.Error:
            pass
    return total


def tree_rss(pid: int) -> int:
    total = 0
    for p in _tree(pid):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class RssSampler:
    """Peak RSS of several process trees, sampled every ``interval`` seconds in a thread."""

    def __init__(self, pids: dict[str, int], interval: float = 0.1) -> None:
        self.pids = pids
        self.interval = interval
        self.peak = {k: 0 for k in pids}
        self.first: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for k, pid in self.pids.items():
            r = tree_rss(pid)
            self.first.setdefault(k, r)
            self.peak[k] = max(self.peak[k], r)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def result(self) -> dict:
        return {k: {"peak_rss_mib": round(self.peak[k] / MIB, 1), "start_rss_mib": round(self.first.get(k, 0) / MIB, 1)}
                for k in self.pids} | {"samples": self.samples, "interval_s": self.interval}


def settle(pids: list[int], *, quiet_cpu: float = 0.03, window: float = 0.5, limit: float = 20.0) -> float:
    """Wait until the trees used less than ``quiet_cpu`` CPU seconds in ``window`` (at most ``limit`` s)."""
    start = time.monotonic()
    before = sum(tree_cpu(p) for p in pids)
    while time.monotonic() - start < limit:
        time.sleep(window)
        now = sum(tree_cpu(p) for p in pids)
        if now - before < quiet_cpu:
            break
        before = now
    return time.monotonic() - start


# ------------------------------------------------------------------------------------------------
# py-spy
# ------------------------------------------------------------------------------------------------
CATEGORIES = [  # first match walking from the innermost frame outwards
    ("OpenPGP (server/crypto, cryptography)", ("server/crypto/", "cryptography/")),
    ("SMTP (client + ingress)", ("smtplib", "aiosmtpd", "smtp_in.py", "server/mail/relay.py")),
    ("database (SQLAlchemy, sqlite3/psycopg)", ("sqlalchemy/", "sqlite3/", "psycopg")),
    ("blob store (write, hash, fsync)", ("server/store/blobs.py",)),
    ("MIME / DRG mail build+parse (server/mail, email)", ("server/mail/", "email/", "base64.py", "quopri.py")),
    ("DICOM parse / index (pydicom, server/dicom)", ("pydicom/", "server/dicom/", "server/store/index.py",
                                                     "server/store/imaging.py", "server/store/archive.py")),
    ("FHIR (server/fhir)", ("server/fhir/", "server/store/fhir.py")),
    ("HTTP (uvicorn, starlette, h11)", ("uvicorn/", "starlette/", "fastapi/", "h11/", "httpx/", "anyio/")),
    ("gateway logic (server/gateway, store/gateway)", ("server/gateway/", "server/store/gateway.py")),
    ("asyncio / threads", ("asyncio/", "threading.py", "concurrent/", "selectors.py")),
]


#: functions whose inclusive share the summary always lists (matched by the name before " (file:line)")
SELECTED = ("Sender._send_mail", "Sender._build", "build_instance_mail", "build_inner", "base64_lines",
            "encrypt_and_sign", "armor", "crc24", "Relay.send", "_crlf", "SMTP.data", "Inbound._receive",
            "Inbound._receipt", "SMTP.smtp_DATA", "StreamReader.readuntil", "parse_outer", "decrypt_and_verify",
            "dearmor", "parse_inner", "decode_base64", "canonical", "check_lines", "store_blob", "_syncfs",
            "Sender._send_mdn", "Engine.begin", "DefaultDialect.do_commit", "DefaultDialect.do_execute")


def pyspy_available() -> str | None:
    return shutil.which("py-spy")


def start_pyspy(pid: int, out: Path, rate: int) -> subprocess.Popen:
    return subprocess.Popen([pyspy_available() or "py-spy", "record", "-p", str(pid), "--subprocesses", "--nonblocking",
                             "-r", str(rate), "-f", "raw", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_pyspy(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return (proc.stderr.read().decode(errors="replace") if proc.stderr else "")[-2000:]


def _frame_key(frame: str) -> tuple[str, str]:
    """('func', 'file') of a py-spy raw frame 'func (path/file.py:123)'."""
    name, _, where = frame.rpartition(" (")
    if not name:
        return frame, ""
    return name, where.rstrip(")").rsplit(":", 1)[0]


def _short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    if str(REPO) + "/" in path:
        path = path.split(str(REPO) + "/", 1)[1]
    return path


def summarize_pyspy(path: Path, top: int = 15) -> dict:
    """Self and inclusive sample shares per function and per category from py-spy's raw (collapsed) output."""
    if not path.exists():
        return {"error": f"{path} missing"}
    sel_c: collections.Counter = collections.Counter()
    self_c: collections.Counter = collections.Counter()
    incl_c: collections.Counter = collections.Counter()
    cat_c: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if " (" in f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        keys = [_frame_key(f) for f in frames]
        leaf = keys[-1]
        self_c[f"{leaf[0]} ({_short(leaf[1])})"] += n
        for k in {f"{name} ({_short(file)})" for name, file in keys}:
            incl_c[k] += n
        for name in {name for name, _ in keys} & set(SELECTED):
            sel_c[name] += n
        cat = "other"
        for _name, file in reversed(keys):
            hit = next((c for c, pats in CATEGORIES if any(p in file for p in pats)), None)
            if hit:
                cat = hit
                break
        cat_c[cat] += n
    pct = lambda c: round(100.0 * c / total, 1) if total else 0.0  # noqa: E731
    return {"samples": total,
            "categories": [(k, pct(v)) for k, v in cat_c.most_common()],
            "self": [(k, pct(v)) for k, v in self_c.most_common(top)],
            "selected_inclusive": [(k, pct(sel_c[k])) for k in SELECTED if sel_c[k]],
            "inclusive": [(k, pct(v)) for k, v in incl_c.most_common(top * 5)], "raw": str(path)}


# ------------------------------------------------------------------------------------------------
# nodes and one transfer
# ------------------------------------------------------------------------------------------------
def parse_sets(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set wants KEY=VALUE, got {item!r}")
        out[key.strip().lower()] = value.strip()
    return out


def _epoch(v) -> float | None:
    """A server timestamp (epoch seconds or ISO 8601) as epoch seconds."""
    if v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return dt.datetime.fromisoformat(str(v).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _mail_time(mail: dict, *names: str) -> float | None:
    for n in names:
        if n in mail:
            t = _epoch(mail[n])
            if t is not None:
                return t
    return None


def stow(node: Node, study: Study, batch: int) -> dict:
    """STOW the study at ``node`` in requests of ``batch`` instances; wall, CPU and peak RSS of the node."""
    pid = node.proc.pid
    cpu0 = tree_cpu(pid)
    with RssSampler({"a": pid}) as rss, node.http(timeout=600) as h:
        t0 = time.perf_counter()
        for i in range(0, len(study.instances), batch):
            body, ctype = multipart(study.instances[i:i + batch])
            r = h.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype})
            if r.status_code != 200:
                raise RuntimeError(f"STOW at A failed: {r.status_code} {r.text[:500]}")
        wall = time.perf_counter() - t0
    cpu = tree_cpu(pid) - cpu0
    n = len(study.instances)
    return {"instances": n, "bytes": study.nbytes, "batch": batch, "wall_s": round(wall, 3),
            "instances_per_s": round(n / wall, 1), "mb_per_s": round(study.nbytes / MB / wall, 1),
            "cpu_s": round(cpu, 2), "cpu_ms_per_instance": round(1000 * cpu / n, 2),
            "peak_rss_mib": rss.result()["a"]["peak_rss_mib"]}


def verify_at(node: Node, study: Study) -> dict:
    """B's copy against the originals: sha256 of the WADO-RS bytes of every instance."""
    got: dict[str, str] = {}
    series_of: dict[str, str] = {}
    with node.http(timeout=120) as h:
        offset = 0
        while True:
            r = h.get(f"/dicomweb/studies/{study.uid}/instances", params={"limit": 1000, "offset": offset})
            if r.status_code in (204, 404):
                break
            if r.status_code != 200:
                raise RuntimeError(f"QIDO at B failed: {r.status_code} {r.text[:300]}")
            items = r.json()
            for item in items:
                series_of[item["00080018"]["Value"][0]] = item["0020000E"]["Value"][0]
            if len(items) < 1000:
                break
            offset += len(items)
        for sop, series in series_of.items():
            w = h.get(f"/dicomweb/studies/{study.uid}/series/{series}/instances/{sop}",
                      headers={"Accept": RETRIEVE_ACCEPT})
            if w.status_code != 200:
                got[sop] = f"HTTP {w.status_code}"
                continue
            parts = split_multipart(w.content, w.headers["content-type"])
            got[sop] = hashlib.sha256(parts[0]).hexdigest() if len(parts) == 1 else f"{len(parts)} parts"
    missing = sorted(set(study.sha256) - set(got))
    extra = sorted(set(got) - set(study.sha256))
    wrong = sorted(s for s in set(got) & set(study.sha256) if got[s] != study.sha256[s])
    return {"byte_exact": not missing and not extra and not wrong, "expected": len(study.sha256), "found": len(got),
            "missing": len(missing), "extra": len(extra), "mismatched": len(wrong),
            "examples": {"missing": missing[:3], "extra": extra[:3], "mismatched": wrong[:3]}}


@dataclass
class Config:
    label: str
    settings: dict[str, str] = field(default_factory=dict)  # sender settings of A (on top of the common ones)


def transfer(a: Node, b: Node, study: Study, cfg: Config, args, *, profile_dir: Path | None = None) -> dict:
    """Create the job at A, follow it until the last receipt, measure both nodes, check B's copy."""
    pids = {"a": a.proc.pid, "b": b.proc.pid}
    n = len(study.instances)
    res: dict = {"label": cfg.label, "settings_a": dict(a.settings), "settings_b": dict(b.settings)}
    settle(list(pids.values()), limit=10)
    spies = {}
    if profile_dir is not None:
        for k, pid in pids.items():
            spies[k] = (start_pyspy(pid, profile_dir / f"pyspy-{k}.txt", args.profile_rate), profile_dir / f"pyspy-{k}.txt")
        time.sleep(1.0)  # py-spy attaches
    cpu0 = {k: tree_cpu(p) for k, p in pids.items()}
    sys0, me0 = psutil.cpu_times(), sum(psutil.Process().cpu_times()[:2])
    timeline: list[tuple[float, int, int, int]] = []
    poll_wall = 0.0
    polls = 0
    job: dict = {}
    state = None
    with RssSampler(pids, args.rss_interval) as rss, a.http(timeout=120) as h:
        t0_wall, t0 = time.time(), time.perf_counter()
        r = h.post("/gateway/jobs", json={"study": study.uid, "recipient": b.endpoint})
        if r.status_code != 201:
            raise RuntimeError(f"job creation at A failed: {r.status_code} {r.text[:500]}")
        job_id = r.json()["id"]
        created_s = time.perf_counter() - t0
        deadline = t0 + args.timeout
        while True:
            time.sleep(args.poll)
            p0 = time.perf_counter()
            # the job list (newest first) renders jobs without their mails: a light poll
            r = h.get("/gateway/jobs", params={"limit": 1})
            poll_wall += time.perf_counter() - p0
            polls += 1
            if r.status_code != 200:
                raise RuntimeError(f"GET /gateway/jobs at A failed: {r.status_code} {r.text[:500]}")
            listed = r.json().get("jobs") or [{}]
            if listed[0].get("id") == job_id:
                job = listed[0]
            else:  # not the newest (should not happen): the job itself
                job = h.get(f"/gateway/jobs/{job_id}").json()
            state = job.get("state")
            timeline.append((round(time.perf_counter() - t0, 2), job.get("sent", 0), job.get("acknowledged", 0),
                             job.get("failed", 0)))
            if state in ("finished", "failed", "aborted") or time.perf_counter() > deadline:
                break
        observed = time.perf_counter() - t0
        finished_wall = time.time()
        r = h.get(f"/gateway/jobs/{job_id}")  # with its mails
        if r.status_code == 200:
            job = r.json()
    sys1, me1 = psutil.cpu_times(), sum(psutil.Process().cpu_times()[:2])
    settle_s = settle(list(pids.values()))
    cpu = {k: tree_cpu(p) - cpu0[k] for k, p in pids.items()}
    # the machine is shared: CPU used during the job by anything but the two nodes and this client
    busy = sum(getattr(sys1, f) - getattr(sys0, f) for f in sys1._fields if f not in ("idle", "iowait", "guest",
                                                                                       "guest_nice"))
    res["machine_during_job"] = {
        "busy_cores": round(busy / observed, 2),
        "iowait_cores": round((sys1.iowait - sys0.iowait) / observed, 2) if hasattr(sys1, "iowait") else None,
        "client_cores": round((me1 - me0) / observed, 2),
        "other_processes_cores": round(max(0.0, busy - (me1 - me0) - sum(cpu.values())) / observed, 2),
        "loadavg_after": os.getloadavg()}
    for k, (proc, _) in spies.items():
        res.setdefault("pyspy_stderr", {})[k] = stop_pyspy(proc)
    if profile_dir is not None:
        res["profile"] = {k: summarize_pyspy(path) for k, (_, path) in spies.items()}

    mails = job.get("mails") or []
    acks = [t for t in (_mail_time(m, "acknowledged_at", "acknowledged") for m in mails) if t]
    sents = [t for t in (_mail_time(m, "sent_at", "sent") for m in mails) if t]
    # The job's state is polled every --poll s (the API's timestamps have whole seconds): the e2e time is when
    # the poll first saw "finished", at most one poll interval (+ one request) after the last receipt.
    e2e = observed

    def first_at(i: int, at_least: int) -> float | None:
        return next((t for t, *counts in timeline if counts[i] >= at_least), None)

    res.update({
        "job_id": job_id, "state": state,
        "job_counts": {k: job.get(k) for k in ("images", "total", "sent", "acknowledged", "failed")},
        "mail_states": dict(collections.Counter(m.get("state") for m in mails)),
        "attempts_total": sum(int(m.get("attempts") or 0) for m in mails) if mails else None,
        "e2e_s": round(e2e, 3), "e2e_source": f"client poll every {args.poll} s",
        "job_create_s": round(created_s, 3),
        "first_sent_s": first_at(0, 1), "last_sent_s": first_at(0, n),
        "first_ack_s": first_at(1, 1), "half_acked_s": first_at(1, (n + 1) // 2),
        "server_clock": {"job_created": job.get("created"), "job_updated": job.get("updated"),
                         "first_sent_s": round(min(sents) - t0_wall, 1) if sents else None,
                         "last_sent_s": round(max(sents) - t0_wall, 1) if sents else None,
                         "last_ack_s": round(max(acks) - t0_wall, 1) if acks else None,
                         "resolution": "1 s (the API renders whole seconds)",
                         "finished_observed_s": round(finished_wall - t0_wall, 3)},
        "mails_per_s": round(n / e2e, 2), "dicom_mb_per_s": round(study.nbytes / MB / e2e, 2),
        "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "cpu_ms_per_mail": {k: round(1000 * v / n, 2) for k, v in cpu.items()},
        "cpu_cores_busy": {k: round(v / e2e, 2) for k, v in cpu.items()},
        "settle_s": round(settle_s, 1), "polls": polls, "poll_client_wall_s": round(poll_wall, 2),
        "rss": rss.result(), "timeline": timeline,
    })
    if res["last_sent_s"]:
        res["send_rate_mails_per_s"] = round(n / res["last_sent_s"], 2)
    if state != "finished":
        bad = [m for m in mails if m.get("state") not in ("acknowledged-ok", "sent")][:5]
        res["error"] = f"job ended {state!r} after {observed:.0f} s: {json.dumps(job.get('error'))}; " \
                       f"examples: {json.dumps(bad)[:1500]}"
        res["log_a"], res["log_b"] = a.tail(40), b.tail(40)
    res["verify"] = verify_at(b, study)
    return res


# ------------------------------------------------------------------------------------------------
# crypto micro-measure
# ------------------------------------------------------------------------------------------------
def crypto_micro(a: Node, b: Node, study: Study, repeat: int) -> dict:
    """encrypt_and_sign(compress=False) / decrypt_and_verify with the nodes' RSA-3072 site keys, in process."""
    from server.crypto import decrypt_and_verify, encrypt_and_sign
    from server.crypto.armor import MESSAGE, armor, crc24, dearmor
    from server.gateway.keys import load_key
    try:
        from server.mail.relay import _crlf
    except ImportError:  # renamed or gone: the row shows 0
        def _crlf(raw: bytes) -> bytes:
            return raw
    from server.mail.drg import SetInfo, build_inner, build_instance_mail, parse_inner, parse_outer

    key_a, key_b = load_key(a.data, a.tenant), load_key(b.data, b.tenant)
    pub_a, pub_b = key_a.public(), key_b.public()
    dicom = study.instances[0]
    ds = dcmread(io.BytesIO(dicom), stop_before_pixels=True)
    sop = str(ds.SOPInstanceUID)
    inner = build_inner(dicom, f"{sop}.dcm", SetInfo("bench-set", 1, len(study.instances), study.uid))

    def measure(fn) -> dict:
        fn()  # warm-up
        walls, cpus = [], []
        for _ in range(repeat):
            w, c = time.perf_counter(), time.process_time()
            fn()
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
        return {"best_ms": round(1000 * min(walls), 2), "median_ms": round(1000 * statistics.median(walls), 2),
                "cpu_median_ms": round(1000 * statistics.median(cpus), 2)}

    def build() -> bytes:
        return build_instance_mail(dicom, sop_instance_uid=sop, study_uid=study.uid, set_id="bench-set", set_part=1,
                                   set_total=len(study.instances), sender=a.address, recipient=b.address,
                                   mdn_to=a.address,
                                   encrypt=lambda data: encrypt_and_sign(data, [pub_b], key_a, compress=False))

    msg_raw = encrypt_and_sign(dicom, [pub_b], key_a, compress=False)
    msg_inner = encrypt_and_sign(inner, [pub_b], key_a, compress=False)
    msg_binary = dearmor(msg_inner)[1]
    raw_mail = build()
    outer = parse_outer(raw_mail)
    assert parse_inner(decrypt_and_verify(outer.encrypted, [key_b], [pub_a]).data).dicom == dicom
    rows = {
        "encrypt_and_sign(instance)": measure(lambda: encrypt_and_sign(dicom, [pub_b], key_a, compress=False)),
        "decrypt_and_verify(instance)": measure(lambda: decrypt_and_verify(msg_raw, [key_b], [pub_a])),
        "encrypt_and_sign(inner entity)": measure(lambda: encrypt_and_sign(inner, [pub_b], key_a, compress=False)),
        "decrypt_and_verify(inner entity)": measure(lambda: decrypt_and_verify(msg_inner, [key_b], [pub_a])),
        "  of which ASCII armor (base64 + CRC-24) of the message": measure(lambda: armor(MESSAGE, msg_binary)),
        "  of which CRC-24 alone": measure(lambda: crc24(msg_binary)),
        "  of which dearmor (CRC-24 check + base64 decode)": measure(lambda: dearmor(msg_inner)),
        "build_instance_mail (incl. encrypt+sign)": measure(build),
        "relay's CRLF normalisation of the mail (`_crlf`)": measure(lambda: _crlf(raw_mail)),
        "parse_outer + decrypt_and_verify + parse_inner": measure(
            lambda: parse_inner(decrypt_and_verify(parse_outer(raw_mail).encrypted, [key_b], [pub_a]).data)),
    }
    bits = getattr(pub_a.primary.part.public, "key_size", None)
    return {"key_bits": bits, "repeat": repeat,
            "instance_bytes": len(dicom), "inner_bytes": len(inner), "message_bytes": len(msg_inner),
            "mail_bytes": len(raw_mail), "rows": rows}


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def fmt(v, digits: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def run_rows(runs: list[dict]) -> list[str]:
    head = ["sender setting (A)", "e2e s (job → last receipt)", "instance-mails/s", "DICOM MB/s", "last mail sent s",
            "CPU ms/mail A", "CPU ms/mail B", "peak RSS A MiB", "peak RSS B MiB", "B byte-exact",
            "other processes (cores)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in runs:
        if "e2e_s" not in r:
            lines.append(f"| {r['label']} | error: {r.get('error', '?')[:120]} |" + " |" * (len(head) - 2))
            continue
        v = r.get("verify", {})
        ok = "yes" if v.get("byte_exact") else f"**NO** ({v.get('found')}/{v.get('expected')}, " \
                                                f"{v.get('mismatched')} differ)"
        lines.append("| " + " | ".join([
            r["label"] + ("" if r.get("state") == "finished" else f" (**{r.get('state')}**)"),
            fmt(r["e2e_s"], 1), fmt(r["mails_per_s"], 1), fmt(r["dicom_mb_per_s"], 1), fmt(r.get("last_sent_s"), 1),
            fmt(r["cpu_ms_per_mail"]["a"], 1), fmt(r["cpu_ms_per_mail"]["b"], 1),
            fmt(r["rss"]["a"]["peak_rss_mib"], 0), fmt(r["rss"]["b"]["peak_rss_mib"], 0), ok,
            fmt((r.get("machine_during_job") or {}).get("other_processes_cores"), 2)]) + " |")
    return lines


def summary_rows(default: dict | None, best: dict | None, stow_res: dict | None) -> list[str]:
    lines = ["| metric | default setting | best setting | target |", "|---|---|---|---|"]

    def cell(r, fn, digits=1):
        try:
            return fmt(fn(r), digits) if r and "e2e_s" in r else "—"
        except (KeyError, TypeError):
            return "—"

    def verdict(r, ok):
        return "" if not r or "e2e_s" not in r else (" ✔" if ok(r) else " ✘")

    rows = [
        ("setting", lambda r: r["label"], None, None),
        ("instance-mails/s end to end", lambda r: r["mails_per_s"], f"≥ {TARGET_MAILS_PER_S:.0f}",
         lambda r: r["mails_per_s"] >= TARGET_MAILS_PER_S),
        (f"× the network average ({NETWORK_MAILS_PER_S:.0f} mails/s, 700 sites)",
         lambda r: r["mails_per_s"] / NETWORK_MAILS_PER_S, None, None),
        ("DICOM payload MB/s", lambda r: r["dicom_mb_per_s"], None, None),
        ("time to the last receipt (s)", lambda r: r["e2e_s"], None, None),
        ("CPU per mail at A: build, sign, encrypt, send (ms)", lambda r: r["cpu_ms_per_mail"]["a"], None, None),
        ("CPU per mail at B: receive, decrypt, verify, store, import, MDN (ms)",
         lambda r: r["cpu_ms_per_mail"]["b"], None, None),
        ("peak RSS A (MiB)", lambda r: r["rss"]["a"]["peak_rss_mib"], "< 300 MB (286 MiB)",
         lambda r: r["rss"]["a"]["peak_rss_mib"] < TARGET_RSS_MIB),
        ("peak RSS B (MiB)", lambda r: r["rss"]["b"]["peak_rss_mib"], "< 300 MB (286 MiB)",
         lambda r: r["rss"]["b"]["peak_rss_mib"] < TARGET_RSS_MIB),
        ("B's copy byte-exact", lambda r: "yes" if r["verify"]["byte_exact"] else "NO", "all", 
         lambda r: r["verify"]["byte_exact"]),
    ]
    for name, fn, target, ok in rows:
        cells = []
        for r in (default, best):
            c = cell(r, fn)
            if ok is not None:
                try:
                    c += verdict(r, ok)
                except (KeyError, TypeError):
                    pass
            cells.append(c)
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {target or '—'} |")
    if stow_res:
        lines.append(f"| STOW at A beforehand (not in e2e) | {stow_res['wall_s']:.1f} s, {stow_res['instances_per_s']:.0f} "
                     f"instances/s, {stow_res['mb_per_s']:.0f} MB/s | | — |")
    return lines


def crypto_rows(c: dict) -> list[str]:
    lines = [f"| in process, RSA-3072 site keys, compress=False | best ms | median ms | CPU ms (median) |",
             "|---|---|---|---|"]
    for name, v in c["rows"].items():
        lines.append(f"| {name} | {v['best_ms']:.1f} | {v['median_ms']:.1f} | {v['cpu_median_ms']:.1f} |")
    return lines


def machine_info() -> dict:
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        pass
    git = {}
    try:
        git["commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                       timeout=10).stdout.strip()
        git["dirty"] = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                           capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    if not git.get("commit") and (REPO / ".bench-commit").exists():  # a `git archive` snapshot of a commit
        git = {"commit": (REPO / ".bench-commit").read_text().strip(), "dirty": False, "snapshot": str(REPO)}
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count()
    return {"cpu": cpu, "nproc": nproc, "logical_cpus": os.cpu_count(),
            "ram_gib": round(psutil.virtual_memory().total / 2 ** 30, 1), "kernel": platform.release(),
            "python": platform.python_version(), "git": git}


# ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--instances", type=int, default=None, help="CT slices, one instance mail each (default 500; "
                                                                   "50 with --quick)")
    ap.add_argument("--size", type=int, default=512, help="rows = columns (512: ~525 KB per instance)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 50 instances, fewer crypto repetitions")
    ap.add_argument("--series-dir", type=Path, default=None,
                    help="send these *.dcm (one study, e.g. from make_series.py) instead of generating a CT")
    ap.add_argument("--seed", type=int, default=20261123)
    ap.add_argument("--send-concurrency", type=int, default=None,
                    help="send_concurrency of the first ('default') run; unset = the server's default")
    ap.add_argument("--send-batch", type=int, default=None,
                    help="send_batch of the first ('default') run; unset = the server's default")
    ap.add_argument("--sweep", default="2x8,8x32",
                    help="further sender settings CONCURRENCYxBATCH, comma-separated ('' = none)")
    ap.add_argument("--set", dest="set_both", action="append", metavar="KEY=VALUE",
                    help="a Settings field for both nodes (TELERAD_KEY), repeatable")
    ap.add_argument("--set-a", action="append", metavar="KEY=VALUE", help="a Settings field for A only")
    ap.add_argument("--set-b", action="append", metavar="KEY=VALUE", help="a Settings field for B only")
    ap.add_argument("--database-url-a", default=None, help="A's database (default SQLite in its data folder)")
    ap.add_argument("--database-url-b", default=None,
                    help="B's database; every run needs a fresh B, so use '{n}' (run number) in the URL when "
                         "more than one setting runs")
    ap.add_argument("--stow-batch", type=int, default=50, help="instances per STOW-RS request at A")
    ap.add_argument("--poll", type=float, default=0.2, help="seconds between polls of the job at A")
    ap.add_argument("--rss-interval", type=float, default=0.1, help="RSS sampling interval")
    ap.add_argument("--timeout", type=float, default=1800, help="longest wait for one job (s)")
    ap.add_argument("--crypto-repeat", type=int, default=None, help="repetitions of the micro-measure (default 10)")
    ap.add_argument("--profile", action="store_true",
                    help="one more transfer (default setting) with py-spy on both nodes: where the CPU goes")
    ap.add_argument("--profile-rate", type=int, default=67, help="py-spy samples per second")
    ap.add_argument("--tmp-dir", type=Path, default=None, help="parent of the temporary data folders")
    ap.add_argument("--keep", action="store_true", help="keep the data folders (and logs)")
    ap.add_argument("--out", type=Path, default=None, help="JSON result (default benchmarks/results/gateway-*.json)")
    args = ap.parse_args(argv)
    if args.instances is None:
        args.instances = 50 if args.quick else 500
    if args.crypto_repeat is None:
        args.crypto_repeat = 5 if args.quick else 10
    return args


def configs(args) -> list[Config]:
    first: dict[str, str] = {}
    if args.send_concurrency is not None:
        first["send_concurrency"] = str(args.send_concurrency)
    if args.send_batch is not None:
        first["send_batch"] = str(args.send_batch)
    from server.config import Settings
    defaults = {k: str(Settings.model_fields[k].default) for k in ("send_concurrency", "send_batch")}
    label = "default" if not first else "given"
    out = [Config(f"{label} ({first.get('send_concurrency', defaults['send_concurrency'])} x "
                  f"{first.get('send_batch', defaults['send_batch'])})", first)]
    for item in filter(None, (s.strip() for s in args.sweep.split(","))):
        c, _, b = item.lower().partition("x")
        if not c.isdigit() or not b.isdigit():
            raise SystemExit(f"--sweep wants CONCURRENCYxBATCH, got {item!r}")
        out.append(Config(f"{c} x {b}", {"send_concurrency": c, "send_batch": b}))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    load_start = os.getloadavg()
    both, only_a, only_b = parse_sets(args.set_both), parse_sets(args.set_a), parse_sets(args.set_b)
    cfgs = configs(args)
    if args.database_url_b and "{n}" not in args.database_url_b and (len(cfgs) > 1 or args.profile):
        raise SystemExit("--database-url-b without '{n}' allows one run only: pass --sweep '' (and no --profile)")
    machine = machine_info()
    log(f"machine: {machine['nproc']} CPUs ({machine['cpu']}), load {load_start}")

    if args.series_dir:
        log(f"reading {args.series_dir}")
        study = series_from_dir(args.series_dir)
    else:
        log(f"generating {args.instances} CT slices {args.size}x{args.size}")
        study = ct_series(args.instances, args.size, args.seed)
    n = len(study.instances)
    log(f"{n} instances, {study.nbytes / MB:.1f} MB ({study.nbytes / n / 1024:.0f} KiB each)")

    out_path = args.out or RESULTS / f"gateway-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-", dir=args.tmp_dir))
    results: dict = {"runs": []}
    failures: list[str] = []
    a: Node | None = None
    b: Node | None = None
    interrupted = None
    try:
        log("node A: keys init")
        a = Node(tmp, "a", database_url=args.database_url_a)
        plan = [(c, False) for c in cfgs] + ([(cfgs[0], True)] if args.profile else [])
        if args.profile and not pyspy_available():
            log("py-spy not installed: no profile run")
            plan = plan[:-1]
        for i, (cfg, profiled) in enumerate(plan):
            name = "b" if i == 0 else f"b{i}"
            db_b = args.database_url_b.replace("{n}", str(i)) if args.database_url_b else None
            log(f"== run {i + 1}/{len(plan)}: {cfg.label}{' + py-spy' if profiled else ''}; node {name}: keys init")
            b = Node(tmp, name, database_url=db_b)
            a.stop()
            a.learn(b)
            b.learn(a)
            a.settings = {**both, **only_a, **cfg.settings}
            b.settings = {**both, **only_b}
            a.start(timeout=60)
            b.start(timeout=60)
            if i == 0:
                log(f"STOW {n} instances at A")
                results["stow_a"] = stow(a, study, args.stow_batch)
                log(f"  STOW: {results['stow_a']['wall_s']} s, {results['stow_a']['mb_per_s']} MB/s")
            profile_dir = (out_path.parent / f"{out_path.stem}-pyspy") if profiled else None
            if profile_dir:
                profile_dir.mkdir(parents=True, exist_ok=True)
            log(f"job A -> {name} ({cfg.settings or 'server defaults'})")
            try:
                r = transfer(a, b, study, cfg, args, profile_dir=profile_dir)
            except Exception as exc:  # noqa: BLE001 - recorded, the run fails
                r = {"label": cfg.label, "error": repr(exc), "log_a": a.tail(40), "log_b": b.tail(40)}
            r["profiled"] = profiled
            results["runs"].append(r)
            if "e2e_s" in r:
                log(f"  {r['state']}: {r['e2e_s']} s, {r['mails_per_s']} mails/s, {r['dicom_mb_per_s']} MB/s, "
                    f"CPU/mail A {r['cpu_ms_per_mail']['a']} ms, B {r['cpu_ms_per_mail']['b']} ms, "
                    f"RSS A {r['rss']['a']['peak_rss_mib']} MiB, B {r['rss']['b']['peak_rss_mib']} MiB, "
                    f"byte-exact {r['verify']['byte_exact']}")
            if r.get("error") or not r.get("verify", {}).get("byte_exact"):
                msg = f"run {cfg.label}: " + (r.get("error") or f"B's copy is NOT byte-exact: {r.get('verify')}")
                failures.append(msg)
                log("!!! " + msg)
            b.stop()
            if i == len(plan) - 1:
                a.stop()
                log("OpenPGP micro-measure (nodes stopped)")
                results["crypto"] = crypto_micro(a, b, study, args.crypto_repeat)
            if not args.keep:
                shutil.rmtree(b.data, ignore_errors=True)
    except KeyboardInterrupt:
        interrupted = "KeyboardInterrupt"
    finally:
        for node in (b, a):
            if node is not None:
                node.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    measured = [r for r in results["runs"] if "e2e_s" in r and not r.get("profiled")
                and r.get("state") == "finished" and r["verify"]["byte_exact"]]
    default = next((r for r in results["runs"] if not r.get("profiled")), None)
    best = max(measured, key=lambda r: r["mails_per_s"]) if measured else None
    md = ["### Gateway end to end: A → B, " + f"{n} instances, {study.nbytes / MB:.0f} MB "
          f"({study.nbytes / n / 1024:.0f} KiB each), one instance mail each", "",
          f"Machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['ram_gib']} GiB RAM, Python "
          f"{machine['python']}, both nodes and the client on it; commit {machine['git'].get('commit', '?')[:10]}"
          f"{' (dirty)' if machine['git'].get('dirty') else ''}; load at start {load_start[0]:.2f}.", ""]
    md += summary_rows(default, best, results.get("stow_a")) + [""]
    md += ["All runs (send_concurrency x send_batch at A; a fresh B each run):", ""] + run_rows(
        [r for r in results["runs"] if not r.get("profiled")]) + [""]
    if results.get("crypto"):
        c = results["crypto"]
        md += [f"OpenPGP alone (instance {c['instance_bytes'] / 1024:.0f} KiB, DRG inner entity "
               f"{c['inner_bytes'] / 1024:.0f} KiB, mail {c['mail_bytes'] / 1024:.0f} KiB):", ""] + crypto_rows(c) + [""]
    for r in results["runs"]:
        if r.get("profile"):
            for k, prof in r["profile"].items():
                if "categories" not in prof:
                    continue
                md += [f"py-spy, node {k.upper()} ({prof['samples']} samples, {args.profile_rate}/s, non-idle threads):",
                       "", "| where (innermost matching frame) | % |", "|---|---|"]
                md += [f"| {name} | {p} |" for name, p in prof["categories"]] + [""]
                md += ["| top self | % |", "|---|---|"] + [f"| `{name}` | {p} |" for name, p in prof["self"][:10]] + [""]
                md += ["Inclusive: " + ", ".join(f"`{name}` {p} %" for name, p in prof["selected_inclusive"]), ""]
    if failures:
        md += ["**FAILED:**", ""] + [f"- {f}" for f in failures] + [""]

    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out = {"created": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "command": sys.argv,
           "config": config, "settings": {"both": both, "a": only_a, "b": only_b},
           "data": {"instances": n, "bytes": study.nbytes, "instance_bytes_mean": round(study.nbytes / n),
                    "study_uid": study.uid},
           "machine": {**machine, "loadavg_at_start": load_start, "loadavg_at_end": os.getloadavg()},
           "targets": {"mails_per_s": TARGET_MAILS_PER_S, "rss_mib": round(TARGET_RSS_MIB, 1),
                       "network_average_mails_per_s": NETWORK_MAILS_PER_S},
           **results, "default": default and default["label"], "best": best and best["label"],
           "failures": failures, "interrupted": interrupted, "elapsed_s": round(time.monotonic() - started, 1),
           "table_markdown": "\n".join(md)}
    path = out_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, ensure_ascii=False))
    print("\n".join(md))
    print(f"JSON: {path}")
    if failures:
        print("\n*** GATEWAY BENCHMARK FAILED: " + "; ".join(f[:300] for f in failures), file=sys.stderr)
        return 1
    return 1 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
