#!/usr/bin/env python3
"""DICOMweb benchmark: telerad-bridge against a local Orthanc (+ DICOMweb plugin), loopback only.

One command (from the repository root):

    python benchmarks/dicomweb_bench.py                      # 500 studies x 20 instances, 2 GB big STOW
    python benchmarks/dicomweb_bench.py --studies 20 --instances-per-study 10 --big-stow-gb 0 --orthanc

For every target a fresh server is started in a temporary data folder, the synthetic data set is stored with
STOW-RS, then QIDO-RS / WADO-RS latencies and retrieve throughput are measured, and (ours only by default) the
peak RSS of the server process is sampled during one ~2 GB STOW-RS request. The script prints a Markdown table
and writes all numbers as JSON into benchmarks/results/. It stops the servers it started and removes the
temporary folders (unless --keep). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import httpx
import numpy as np
import psutil
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_PEER_SCRIPT = Path("/work/shared/tools/orthanc-peer.sh")
ORTHANC_BIN = Path(os.environ.get("ORTHANC_BIN", "/usr/sbin/Orthanc"))
DICOMWEB_PLUGIN = Path(os.environ.get("DICOMWEB_PLUGIN", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"))
DICOM_JSON = "application/dicom+json"
RETRIEVE_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
MB = 1_000_000  # throughput and sizes in MB = 10^6 bytes; RSS in MiB

# ------------------------------------------------------------------------------------------------
# synthetic data
# ------------------------------------------------------------------------------------------------
FAMILY = ["Müller", "Schmidt", "Schneider", "Fischer", "Weber", "Meyer", "Wagner", "Becker", "Schulz", "Hoffmann",
          "Schäfer", "Koch", "Bauer", "Richter", "Klein", "Wolf", "Schröder", "Neumann", "Schwarz", "Zimmermann",
          "Braun", "Krüger", "Hofmann", "Hartmann", "Lange", "Schmitt", "Werner", "Schmitz", "Krause", "Meier",
          "Lehmann", "Köhler", "Herrmann", "König", "Walter", "Mayer", "Huber", "Kaiser", "Fuchs", "Peters",
          "Möller", "Weiß", "Jung", "Hahn", "Schubert", "Vogel", "Friedrich", "Keller", "Günther", "Frank",
          "Berger", "Winkler", "Roth", "Beck", "Lorenz", "Baumann", "Böhm", "Krämer", "Jäger", "Groß", "Kühn",
          "Süß", "Dürr", "Ölschläger", "Yılmaz", "Öztürk", "Kowalski", "Nowak", "Ahrens", "Ziegler"]
GIVEN_M = ["Jürgen", "Björn", "Sören", "Günter", "Jörg", "Hans", "Peter", "Klaus", "Wolfgang", "Michael", "Thomas",
           "Andreas", "Stefan", "Uwe", "Jonas", "Lukas", "Ömer", "François", "Karl-Heinz", "Hans-Jürgen"]
GIVEN_F = ["Anna", "Maria", "Ursula", "Monika", "Petra", "Sabine", "Susanne", "Gisela", "Helga", "Käthe", "Lena",
           "Leonie", "Mia", "Zoë", "Ayşe", "Renée", "Jördis", "Anne-Kathrin", "Bärbel", "Hannelore"]
TRANSLIT = str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue", "Ä": "AE", "Ö": "OE", "Ü": "UE", "ß": "ss", "ı": "i",
                          "ş": "s", "ç": "c", "ë": "e", "é": "e"})
STUDY_DESC = {"CT": ["CT Thorax nativ", "CT Abdomen mit KM", "CT Schädel nativ", "CT Wirbelsäule", "CT Becken"],
              "MR": ["MRT Knie links", "MRT Schädel mit KM", "MRT LWS", "MRT Schulter rechts", "MRT Hüfte"]}
SERIES_DESC = {"CT": ["Weichteil 5.0 B30f", "Knochen 2.0 B70f"], "MR": ["t1_tse_tra", "t2_tse_sag"]}
INSTITUTIONS = ["Klinikum Nürnberg Süd", "Universitätsklinikum Köln", "Radiologie am Gänsemarkt", "MVZ Bad Tölz"]


def det_uid(seed: int, *key: object) -> str:
    """A deterministic UID under 2.25 (UUID-derived form, PS3.5 B.2) from the seed and a key."""
    h = hashlib.sha256(("|".join(map(str, (seed,) + key))).encode()).digest()[:16]
    return "2.25." + str(int.from_bytes(h, "big") >> 1)


@dataclass
class SeriesInfo:
    uid: str
    number: int
    modality: str
    description: str
    sop_uids: list[str] = field(default_factory=list)


@dataclass
class StudyInfo:
    uid: str
    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    date: str
    time: str
    accession: str
    modality: str
    description: str
    institution: str
    series: list[SeriesInfo] = field(default_factory=list)
    parts: list[bytes] = field(default_factory=list)  # Part 10 bytes of every instance, in order

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.parts)


def phantom_slice(size: int, modality: str, z: float) -> np.ndarray:
    """One CT-like (HU, int16) or MR-like (uint16) slice: body ellipse, an organ, a bone."""
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j].astype(np.float32)
    body = (x / .85) ** 2 + (y / .7) ** 2 < 1 - (z / 1.2) ** 2
    organ = ((x - .3) / .25) ** 2 + (y / .3) ** 2 < 1 - (z / .6) ** 2
    bone = ((x + .35) ** 2 + (y + .1) ** 2 < .012) & body
    if modality == "CT":
        v = np.full(x.shape, -1000, np.int16)
        v[body], v[organ], v[bone] = 40, 80, 900
    else:
        v = np.zeros(x.shape, np.uint16)
        v[body], v[organ], v[bone] = 600, 1400, 100
    return v


def pixel_element(length: int) -> bytes:
    """(7FE0,0010) OW element header, explicit VR little endian; ``length`` pixel bytes follow it."""
    return struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length)


def series_template(study: StudyInfo, series: SeriesInfo, size: int, thickness: float) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_class = CTImageStorage if series.modality == "CT" else MRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if series.modality == "CT" else "OTHER"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = "1.2"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study.date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = study.time
    ds.AccessionNumber = study.accession
    ds.Modality = series.modality
    ds.Manufacturer = "telerad-bench"
    ds.InstitutionName = study.institution
    ds.ReferringPhysicianName = "Schäfer^Ute^^Dr. med."
    ds.StudyDescription = study.description
    ds.SeriesDescription = series.description
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.IssuerOfPatientID = "DRG-BENCH"
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    ds.SliceThickness = thickness
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study.uid
    ds.SeriesInstanceUID = series.uid
    ds.StudyID = study.accession[-6:]
    ds.SeriesNumber = series.number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = det_uid(0, "for", series.uid)
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.PixelSpacing = [round(350 / size, 4)] * 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    if series.modality == "CT":
        ds.PixelRepresentation = 1
        ds.KVP, ds.ConvolutionKernel = 120, series.description.split()[-1]
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
    else:
        ds.PixelRepresentation = 0
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength, ds.MagneticFieldStrength = 3000, 90, 1, 1.5
        ds.WindowCenter, ds.WindowWidth = 700, 1400
    return ds


def instance_header(ds: Dataset, sop_uid: str, index: int, thickness: float, pixel_len: int) -> bytes:
    """Part 10 bytes of ``ds`` (mutated for instance ``index``) up to and including the pixel element header."""
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = index + 1
    z = round(-index * thickness, 2)
    ds.ImagePositionPatient = [-175, -175, z]
    ds.SliceLocation = z
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue() + pixel_element(pixel_len)


def generate_studies(n_studies: int, per_study: int, size: int, seed: int, log: Callable[[str], None]) -> list[StudyInfo]:
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    n_patients = max(1, round(n_studies * 0.6))
    patients = []
    used_ids: set[str] = set()
    for p in range(n_patients):
        sex = rng.choice("MF")
        family, given = rng.choice(FAMILY), rng.choice(GIVEN_M if sex == "M" else GIVEN_F)
        name = f"{family}^{given}"
        if rng.random() < 0.12:  # some senders transliterate and upper-case (ASCII only)
            name = name.translate(TRANSLIT).upper()
        elif rng.random() < 0.05:
            name += "^^Prof. Dr."
        pid = f"PID{rng.randrange(10 ** 7):07d}"
        while pid in used_ids:
            pid = f"PID{rng.randrange(10 ** 7):07d}"
        used_ids.add(pid)
        birth = dt.date(1930, 1, 1) + dt.timedelta(days=rng.randrange(80 * 365))
        patients.append((pid, name, birth.strftime("%Y%m%d"), sex))
    start, span = dt.date(2015, 1, 1), (dt.date(2024, 12, 31) - dt.date(2015, 1, 1)).days
    bases: dict[tuple[str, float], np.ndarray] = {}
    studies: list[StudyInfo] = []
    t0 = time.perf_counter()
    for s in range(n_studies):
        pid, name, birth, sex = patients[s] if s < n_patients else rng.choice(patients)
        modality = "CT" if rng.random() < 0.6 else "MR"
        st = StudyInfo(uid=det_uid(seed, "study", s), patient_id=pid, patient_name=name, birth_date=birth, sex=sex,
                       date=(start + dt.timedelta(days=rng.randrange(span + 1))).strftime("%Y%m%d"),
                       time=f"{rng.randrange(7, 20):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}",
                       accession=f"ACC{rng.randrange(10 ** 9):09d}", modality=modality,
                       description=rng.choice(STUDY_DESC[modality]), institution=rng.choice(INSTITUTIONS))
        counts = [per_study] if per_study < 2 else [math.ceil(per_study / 2), per_study // 2]
        for k, count in enumerate(counts):
            se = SeriesInfo(uid=det_uid(seed, "series", s, k), number=k + 1, modality=modality,
                            description=SERIES_DESC[modality][k])
            thickness = 5.0 if k == 0 else 2.0
            ds = series_template(st, se, size, thickness)
            for i in range(count):
                z = -0.9 + 1.8 * i / max(1, count - 1)
                key = (modality, round(z, 1))
                if key not in bases:
                    bases[key] = phantom_slice(size, modality, key[1])
                base = bases[key]
                noise = nprng.integers(-8, 9, base.shape, dtype=np.int16)
                pixels = (base + noise.astype(base.dtype)).tobytes() if modality == "CT" else \
                    (base + np.abs(noise).astype(np.uint16)).tobytes()
                sop = det_uid(seed, "sop", s, k, i)
                se.sop_uids.append(sop)
                st.parts.append(instance_header(ds, sop, i, thickness, len(pixels)) + pixels)
            st.series.append(se)
        studies.append(st)
        if (s + 1) % 100 == 0:
            log(f"  generated {s + 1}/{n_studies} studies ({time.perf_counter() - t0:.1f} s)")
    return studies


# ------------------------------------------------------------------------------------------------
# multipart bodies
# ------------------------------------------------------------------------------------------------
BOUNDARY = "telerad-bench-" + hashlib.sha1(b"boundary").hexdigest()[:24]
PART_HEAD = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
CLOSING = f"--{BOUNDARY}--\r\n".encode()
STOW_CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def multipart_length(sizes: list[int]) -> int:
    return sum(len(PART_HEAD) + n + 2 for n in sizes) + len(CLOSING)


def multipart_stream(parts: list[bytes]) -> Iterator[bytes]:
    for p in parts:
        yield PART_HEAD
        yield p
        yield b"\r\n"
    yield CLOSING


# ------------------------------------------------------------------------------------------------
# process memory sampling
# ------------------------------------------------------------------------------------------------
class RssSampler:
    """Samples RSS of a process plus all its children every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self.first = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        total = 0
        try:
            procs = [self.proc] + self.proc.children(recursive=True)
        except psutil.Error:
            return 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            r = self.rss()
            if self.first is None:
                self.first = r
            self.peak = max(self.peak, r)
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    def result(self) -> dict:
        return {"peak_rss_mib": round(self.peak / 2 ** 20, 1), "start_rss_mib": round((self.first or 0) / 2 ** 20, 1),
                "samples": self.samples, "interval_s": self.interval}


def cpu_seconds(pid: int) -> float:
    try:
        p = psutil.Process(pid)
        total = sum(p.cpu_times()[:2])
        for c in p.children(recursive=True):
            try:
                total += sum(c.cpu_times()[:2])
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return float("nan")


# ------------------------------------------------------------------------------------------------
# targets
# ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc_alive: Callable[[], bool], timeout: float, log_file: Path | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if not proc_alive():
            tail = log_file.read_text(errors="replace")[-3000:] if log_file and log_file.exists() else ""
            raise RuntimeError(f"server exited during start-up; log tail:\n{tail}")
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f} s")


class Target:
    name = "?"
    key = "?"
    base = ""  # DICOMweb root without trailing slash
    headers: dict[str, str] = {}
    pid = 0
    notes: dict = {}
    log_path: Path | None = None

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Telerad(Target):
    name, key = "telerad-bridge", "telerad"

    def __init__(self, workdir: Path, python: str, log: Callable[[str], None], workers: int = 1):
        self.workers = workers
        self.dir = workdir / "telerad-data"
        self.log_file = self.log_path = workdir / "telerad.log"
        self.python = python
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = log

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [self.python, "-m", "server", "serve", "--data-dir", str(self.dir), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", str(self.workers)]
        self.log(f"  starting: {' '.join(cmd)}")
        with open(self.log_file, "ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.proc.pid
        wait_http(f"http://127.0.0.1:{self.port}/healthz", lambda: self.proc.poll() is None, 90, self.log_file)
        token = subprocess.run([self.python, "-m", "server", "token", "--data-dir", str(self.dir), "--tenant", "bench",
                                "--scope", "system/*.cruds"], cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=60)
        if token.returncode != 0 or not token.stdout.strip():
            raise RuntimeError(f"token command failed ({token.returncode}): {token.stderr.strip()}")
        self.headers = {"Authorization": f"Bearer {token.stdout.strip().splitlines()[-1]}"}
        self.base = f"http://127.0.0.1:{self.port}/dicomweb"
        health = httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=5).json()
        self.notes = {"version": health.get("version"), "fsync": os.environ.get("TELERAD_FSYNC", "default (true)"),
                      "storage": "SQLite index + blob files (defaults)", "command": " ".join(cmd)}

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Orthanc(Target):
    name, key = "Orthanc", "orthanc"

    def __init__(self, workdir: Path, peer_script: Path | None, log: Callable[[str], None]):
        self.dir = workdir / "data"
        self.log_path = self.dir / "orthanc.log"
        self.port = free_port()
        self.peer_script = peer_script if peer_script and peer_script.exists() else None
        self.proc: subprocess.Popen | None = None
        self.log = log

    @staticmethod
    def installed() -> bool:
        return ORTHANC_BIN.exists() and DICOMWEB_PLUGIN.exists()

    def _write_config(self) -> None:  # same configuration as orthanc-peer.sh (used when the script is absent)
        (self.dir / "config").mkdir(parents=True, exist_ok=True)
        (self.dir / "storage").mkdir(parents=True, exist_ok=True)
        cfg = {"Name": f"orthanc-bench-{self.port}", "StorageDirectory": str(self.dir / "storage"),
               "IndexDirectory": str(self.dir / "storage"), "Plugins": [str(DICOMWEB_PLUGIN)], "HttpPort": self.port,
               "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomServerEnabled": False,
               "WebDavEnabled": False, "SaveJobs": False, "StorageCompression": False,
               "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                            "Host": f"127.0.0.1:{self.port}", "Ssl": False, "StudiesMetadata": "Full",
                            "SeriesMetadata": "Full"}}
        (self.dir / "config" / "orthanc.json").write_text(json.dumps(cfg, indent=2))

    def start(self) -> None:
        if self.peer_script:
            cmd = ["bash", str(self.peer_script), "start", "--port", str(self.port), "--dir", str(self.dir)]
            self.log(f"  starting: {' '.join(cmd)}")
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                raise RuntimeError(f"orthanc-peer.sh start failed: {r.stdout}{r.stderr}")
            self.pid = int((self.dir / "orthanc.pid").read_text().strip())
        else:
            self._write_config()
            cmd = [str(ORTHANC_BIN), "--no-jobs", str(self.dir / "config")]
            self.log(f"  starting: {' '.join(cmd)}")
            with open(self.dir / "orthanc.log", "ab") as out:
                self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True)
            self.pid = self.proc.pid
            wait_http(f"http://127.0.0.1:{self.port}/system", lambda: self.proc.poll() is None, 30,
                      self.dir / "orthanc.log")
        self.base = f"http://127.0.0.1:{self.port}/dicom-web"
        self.headers = {}
        system = httpx.get(f"http://127.0.0.1:{self.port}/system", timeout=5).json()
        try:
            plugin = httpx.get(f"http://127.0.0.1:{self.port}/plugins/dicom-web", timeout=5).json().get("Version")
        except Exception:  # noqa: BLE001 - informational only
            plugin = None
        cfg = json.loads((self.dir / "config" / "orthanc.json").read_text())
        self.notes = {"version": system.get("Version"), "dicomweb_plugin": plugin,
                      "launched_by": str(self.peer_script) if self.peer_script else "direct (peer script missing)",
                      "config": cfg,
                      "defaults_in_effect": {"SyncStorageArea": True, "StorageAccessOnFind": "Always",
                                             "HttpThreadsCount": 50, "MallocArenaMax": 5, "KeepAlive": True,
                                             "HttpCompressionEnabled": True, "HttpRequestTimeout": 30,
                                             "Index": "SQLite (built-in)"}}

    def stop(self) -> None:
        if self.peer_script:
            subprocess.run(["bash", str(self.peer_script), "stop", "--port", str(self.port), "--dir", str(self.dir)],
                           capture_output=True, text=True, timeout=60)
        elif self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# ------------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------------
class Problems:
    """Non-2xx answers and content mismatches, a few examples per kind, with request and response."""

    def __init__(self) -> None:
        self.items: list[dict] = []
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()

    def add(self, target: str, kind: str, request: str, status: int | None, body: str) -> None:
        with self.lock:
            k = f"{target}:{kind}"
            self.counts[k] = self.counts.get(k, 0) + 1
            if self.counts[k] <= 3:
                self.items.append({"target": target, "kind": kind, "request": request, "status": status,
                                   "response": body[:1500]})


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize_latency(lat: list[float]) -> dict:
    return {"n": len(lat), "p50_ms": r3(pct(lat, 50), 1000), "p95_ms": r3(pct(lat, 95), 1000),
            "mean_ms": r3(float(np.mean(lat)) if lat else None, 1000), "max_ms": r3(max(lat) if lat else None, 1000)}


def r3(v: float | None, scale: float = 1.0) -> float | None:
    return None if v is None else round(v * scale, 3)


def client_for(t: Target, read_timeout: float) -> httpx.Client:
    return httpx.Client(headers=t.headers, timeout=httpx.Timeout(30.0, read=read_timeout, write=read_timeout))


def stow_response_counts(resp: httpx.Response) -> tuple[int, int]:
    """(referenced, failed) counts of a Store Instances Response."""
    try:
        body = resp.json()
    except ValueError:
        return 0, 0
    if isinstance(body, list):
        body = body[0] if body else {}
    ref = len(body.get("00081199", {}).get("Value", []) or [])
    failed = len(body.get("00081198", {}).get("Value", []) or [])
    return ref, failed


def bench_stow(t: Target, studies: list[StudyInfo], workers: int, problems: Problems, deadline: float,
               log: Callable[[str], None]) -> dict:
    lock = threading.Lock()
    queue = list(reversed(studies))
    stats = {"requests": 0, "ok_instances": 0, "failed_instances": 0, "bytes": 0, "errors": 0}
    latencies: list[float] = []

    def worker() -> None:
        with client_for(t, 600) as client:
            while time.monotonic() < deadline:
                with lock:
                    if not queue:
                        return
                    st = queue.pop()
                length = multipart_length([len(p) for p in st.parts])
                headers = {"Content-Type": STOW_CONTENT_TYPE, "Accept": DICOM_JSON, "Content-Length": str(length)}
                t0 = time.perf_counter()
                try:
                    resp = client.post(f"{t.base}/studies", content=multipart_stream(st.parts), headers=headers)
                except httpx.HTTPError as exc:
                    problems.add(t.key, "stow-exception", f"POST {t.base}/studies ({len(st.parts)} instances, "
                                 f"{length} bytes)", None, repr(exc))
                    with lock:
                        stats["errors"] += 1
                    continue
                el = time.perf_counter() - t0
                ref, failed = stow_response_counts(resp)
                with lock:
                    stats["requests"] += 1
                    latencies.append(el)
                    stats["bytes"] += length
                    if resp.status_code == 200 and ref == len(st.parts):
                        stats["ok_instances"] += ref
                    else:
                        stats["ok_instances"] += ref
                        stats["failed_instances"] += len(st.parts) - ref
                        stats["errors"] += 1
                        problems.add(t.key, "stow", f"POST {t.base}/studies Content-Type: {STOW_CONTENT_TYPE} "
                                     f"({len(st.parts)} instances of study {st.uid}, {length} bytes)",
                                     resp.status_code, resp.text)
                    done = stats["requests"]
                if done % 100 == 0:
                    log(f"  STOW {done}/{len(studies)} requests")

    cpu0, client0 = cpu_seconds(t.pid), sum(psutil.Process().cpu_times()[:2])
    with RssSampler(t.pid) as rss:
        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(workers)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
    cpu = cpu_seconds(t.pid) - cpu0
    client_cpu = sum(psutil.Process().cpu_times()[:2]) - client0
    total_instances = sum(len(s.parts) for s in studies)
    return {**stats, "wall_s": round(wall, 3), "instances_total": total_instances,
            "instances_per_s": round(stats["ok_instances"] / wall, 2) if wall else None,
            "mb_per_s": round(stats["bytes"] / wall / MB, 2) if wall else None,
            "request": summarize_latency(latencies), "server_cpu_s": round(cpu, 2), "client_cpu_s": round(client_cpu, 2),
            "server_cpu_per_1000": round(cpu / stats["ok_instances"] * 1000, 2) if stats["ok_instances"] else None,
            "rss": rss.result(),
            "complete": stats["requests"] == len(studies) and stats["failed_instances"] == 0}


@dataclass
class Query:
    kind: str
    path: str
    params: dict[str, str]
    expect: int | None = None  # expected number of results when known exactly
    expect_only: str | None = None  # target key the expectation applies to (None: every target)

    def url(self, base: str) -> str:
        """``*`` and ``^`` stay literal (Orthanc does not treat ``%2A`` as a wildcard); other bytes are %-encoded."""
        query = "&".join(f"{k}={urllib.parse.quote(v, safe='*^-,')}" for k, v in self.params.items())
        return f"{base}{self.path}" + (f"?{query}" if query else "")


def fold_pn(value: str) -> str:
    """Matching form of a person name as telerad-bridge specifies it (PS3.4 C.2.2.2.1 case/accent-insensitive):
    upper case, German umlauts to two letters (Ä->AE, Ö->OE, Ü->UE, ß->SS), other accents dropped."""
    v = value.upper()
    for a, b in (("Ä", "AE"), ("Ö", "OE"), ("Ü", "UE"), ("ß", "SS"), ("ẞ", "SS")):
        v = v.replace(a, b)
    return "".join(c for c in unicodedata.normalize("NFKD", v) if not unicodedata.combining(c))


def build_queries(studies: list[StudyInfo], reps: int, seed: int) -> dict[str, list[Query]]:
    rng = random.Random(seed + 1)
    months = sorted({s.date[:6] for s in studies})
    q: dict[str, list[Query]] = {k: [] for k in ("qido_study_list", "qido_patient_id", "qido_patient_name_wildcard",
                                                  "qido_study_date_month", "qido_series_of_study",
                                                  "qido_instances_of_series")}
    by_pid: dict[str, int] = {}
    for s in studies:
        by_pid[s.patient_id] = by_pid.get(s.patient_id, 0) + 1
    for _ in range(reps):
        q["qido_study_list"].append(Query("study list", "/studies", {"limit": "100"}, min(100, len(studies))))
        s = rng.choice(studies)
        q["qido_patient_id"].append(Query("PatientID", "/studies", {"PatientID": s.patient_id}, by_pid[s.patient_id]))
        s = rng.choice(studies)
        # what a user types: the first three letters, folded ("Müller" -> "MUE*"); telerad-bridge matches on the
        # folded form, Orthanc on an ASCII-folded form (ä -> A), so the expected count is checked for ours only
        prefix = fold_pn(s.patient_name.split("^")[0])[:3]
        n = sum(1 for x in studies if fold_pn(x.patient_name).startswith(prefix))
        q["qido_patient_name_wildcard"].append(Query("PatientName", "/studies", {"PatientName": prefix + "*"}, n,
                                                     expect_only="telerad"))
        m = rng.choice(months)
        y, mo = int(m[:4]), int(m[4:])
        last = (dt.date(y + (mo == 12), mo % 12 + 1, 1) - dt.timedelta(days=1)).day
        rng_s = f"{m}01-{m}{last:02d}"
        n = sum(1 for x in studies if x.date[:6] == m)
        q["qido_study_date_month"].append(Query("StudyDate", "/studies", {"StudyDate": rng_s}, n))
        s = rng.choice(studies)
        q["qido_series_of_study"].append(Query("series", f"/studies/{s.uid}/series", {}, len(s.series)))
        s = rng.choice(studies)
        se = rng.choice(s.series)
        q["qido_instances_of_series"].append(Query("instances", f"/studies/{s.uid}/series/{se.uid}/instances", {},
                                                   len(se.sop_uids)))
    return q


def run_queries(t: Target, name: str, queries: list[Query], accept: str, problems: Problems, phase_s: float,
                deadline: float, warmup: int = 5, json_count: bool = True) -> dict:
    lat: list[float] = []
    nbytes = 0
    mismatches = 0
    statuses: dict[str, int] = {}
    counts: list[int | None] = []
    encodings: set[str] = set()
    stop_at = min(deadline, time.monotonic() + phase_s)
    with client_for(t, 120) as client:
        for i, q in enumerate(queries[:warmup] + queries):
            if time.monotonic() > stop_at:
                break
            url = q.url(t.base)
            t0 = time.perf_counter()
            try:
                resp = client.get(url, headers={"Accept": accept})
                body = resp.content  # whole body read
            except httpx.HTTPError as exc:
                problems.add(t.key, name + "-exception", f"GET {url}", None, repr(exc))
                continue
            el = time.perf_counter() - t0
            if i < warmup:
                continue
            statuses[str(resp.status_code)] = statuses.get(str(resp.status_code), 0) + 1
            lat.append(el)
            nbytes += resp.num_bytes_downloaded
            encodings.add(resp.headers.get("content-encoding", "identity"))
            req = f"GET {resp.request.url} Accept: {accept}"
            if resp.status_code == 204:
                count = 0
            elif resp.status_code == 200:
                if not json_count:
                    count = None
                else:
                    try:
                        count = len(json.loads(body))
                    except ValueError:
                        problems.add(t.key, name + "-badjson", req, resp.status_code, resp.text)
                        continue
            else:
                problems.add(t.key, name, req, resp.status_code, resp.text)
                continue
            counts.append(count)
            if q.expect is not None and count is not None and count != q.expect and q.expect_only in (None, t.key):
                mismatches += 1
                problems.add(t.key, name + "-count", f"{req} (expected {q.expect} results)", resp.status_code,
                             f"{count} results: {resp.text[:600]}")
    valid = [c for c in counts if c is not None]
    return {**summarize_latency(lat), "statuses": statuses, "count_mismatches": mismatches,
            "results_mean": round(sum(valid) / len(valid), 2) if valid else None,
            "wire_bytes_per_response": round(nbytes / len(lat)) if lat else None,
            "content_encodings": sorted(encodings)}


def build_wado(studies: list[StudyInfo], reps: int, seed: int) -> tuple[list[Query], list[Query], list[Query]]:
    rng = random.Random(seed + 2)
    series_md, study_md, retrieve = [], [], []
    for _ in range(reps):
        s = rng.choice(studies)
        se = rng.choice(s.series)
        series_md.append(Query("series metadata", f"/studies/{s.uid}/series/{se.uid}/metadata", {}, len(se.sop_uids)))
        s = rng.choice(studies)
        study_md.append(Query("study metadata", f"/studies/{s.uid}/metadata", {}, len(s.parts)))
        s = rng.choice(studies)
        se = rng.choice(s.series)
        retrieve.append(Query("retrieve", f"/studies/{s.uid}/series/{se.uid}", {}, len(se.sop_uids)))
    return series_md, study_md, retrieve


def run_retrieve(t: Target, queries: list[Query], problems: Problems, phase_s: float, deadline: float) -> dict:
    lat: list[float] = []
    total = wire = 0
    mismatches = 0
    encodings: set[str] = set()
    stop_at = min(deadline, time.monotonic() + phase_s)
    with client_for(t, 300) as client:
        for i, q in enumerate(queries[:2] + queries):
            if time.monotonic() > stop_at:
                break
            url = f"{t.base}{q.path}"
            t0 = time.perf_counter()
            n = 0
            try:
                with client.stream("GET", url, headers={"Accept": RETRIEVE_ACCEPT}) as resp:
                    chunks = []
                    for chunk in resp.iter_bytes():  # decoded, should a server compress
                        n += len(chunk)
                        chunks.append(chunk)
                    wire += resp.num_bytes_downloaded
                    encodings.add(resp.headers.get("content-encoding", "identity"))
            except httpx.HTTPError as exc:
                problems.add(t.key, "retrieve-exception", f"GET {url}", None, repr(exc))
                continue
            el = time.perf_counter() - t0
            if i < 2:
                continue
            body = b"".join(chunks)
            if resp.status_code != 200:
                problems.add(t.key, "retrieve", f"GET {url} Accept: {RETRIEVE_ACCEPT}", resp.status_code,
                             body[:1500].decode(errors="replace"))
                continue
            lat.append(el)
            total += n
            ctype = resp.headers.get("content-type", "")
            boundary = next((p.split("=", 1)[1].strip().strip('"') for p in ctype.split(";")
                             if p.strip().lower().startswith("boundary=")), None)
            parts = body.count(b"--" + boundary.encode() + b"\r\n") if boundary else -1
            if parts != q.expect:
                mismatches += 1
                problems.add(t.key, "retrieve-count", f"GET {url} Accept: {RETRIEVE_ACCEPT} (expected {q.expect} "
                             f"parts)", resp.status_code, f"content-type {ctype!r}, {parts} parts, {n} bytes")
    wall = sum(lat)
    return {**summarize_latency(lat), "bytes": total, "wire_bytes": wire, "content_encodings": sorted(encodings),
            "mb_per_s": round(total / wall / MB, 2) if wall else None, "count_mismatches": mismatches}


def bench_big_stow(t: Target, gb: float, instance_mb: float, seed: int, problems: Problems,
                   log: Callable[[str], None]) -> dict:
    """One STOW request of ~gb GiB, instances of ~instance_mb MiB generated while the body streams."""
    side = int(math.sqrt(instance_mb * 2 ** 20 / 2))
    pixel_len = side * side * 2
    count = max(1, round(gb * 2 ** 30 / pixel_len))
    study = StudyInfo(uid=det_uid(seed, "big-study", gb), patient_id="PIDBIG0001", patient_name="Groß^Dörte",
                      birth_date="19500505", sex="F", date="20240115", time="101500", accession="ACCBIG000001",
                      modality="CT", description="CT Ganzkörper dünnschicht", institution=INSTITUTIONS[0])
    se = SeriesInfo(uid=det_uid(seed, "big-series", gb), number=1, modality="CT", description="Dünnschicht 0.6 B30f")
    ds = series_template(study, se, side, 0.6)
    headers = [instance_header(ds, det_uid(seed, "big-sop", gb, i), i, 0.6, pixel_len) for i in range(count)]
    length = multipart_length([len(h) + pixel_len for h in headers])
    base = phantom_slice(side, "CT", 0.0)
    nprng = np.random.default_rng(seed + 3)
    log(f"  big STOW: {count} instances of {side}x{side} ({pixel_len / MB:.2f} MB pixel data), "
        f"{length / 2 ** 30:.2f} GiB in one request")

    def body() -> Iterator[bytes]:
        for i, h in enumerate(headers):
            yield PART_HEAD
            yield h
            yield (base + nprng.integers(-8, 9, base.shape, dtype=np.int16)).tobytes()
            yield b"\r\n"
        yield CLOSING

    out: dict = {"instances": count, "bytes": length, "instance_bytes": len(headers[0]) + pixel_len}
    client_rss0 = psutil.Process().memory_info().rss
    with RssSampler(t.pid) as rss, client_for(t, 1800) as client:
        t0 = time.perf_counter()
        try:
            resp = client.post(f"{t.base}/studies", content=body(),
                               headers={"Content-Type": STOW_CONTENT_TYPE, "Accept": DICOM_JSON,
                                        "Content-Length": str(length)})
            out["status"] = resp.status_code
            ref, failed = stow_response_counts(resp)
            out["stored"], out["failed"] = ref, failed
            if resp.status_code != 200 or ref != count:
                problems.add(t.key, "big-stow", f"POST {t.base}/studies ({count} instances, {length} bytes)",
                             resp.status_code, resp.text)
        except httpx.HTTPError as exc:
            out["status"] = None
            out["error"] = repr(exc)
            problems.add(t.key, "big-stow-exception", f"POST {t.base}/studies ({count} instances, {length} bytes)",
                         None, repr(exc))
        wall = time.perf_counter() - t0
    out.update({"wall_s": round(wall, 2), "mb_per_s": round(length / wall / MB, 2), "rss": rss.result(),
                "client_rss_growth_mib": round((psutil.Process().memory_info().rss - client_rss0) / 2 ** 20, 1)})
    return out


def bench_target(t: Target, studies: list[StudyInfo], args: argparse.Namespace, problems: Problems,
                 deadline: float, log: Callable[[str], None], big: bool) -> dict:
    res: dict = {"name": t.name}
    t.start()
    try:
        res["notes"] = t.notes
        res["idle_rss_mib"] = round(RssSampler(t.pid).rss() / 2 ** 20, 1)
        log(f"  {t.name} up (pid {t.pid}, {t.base}); STOW {len(studies)} studies with {args.workers} workers")
        res["stow"] = bench_stow(t, studies, args.workers, problems, deadline, log)
        s = res["stow"]
        log(f"  STOW: {s['instances_per_s']} inst/s, {s['mb_per_s']} MB/s, {s['ok_instances']}/{s['instances_total']}"
            f" stored, peak RSS {s['rss']['peak_rss_mib']} MiB")
        queries = build_queries(studies, args.qido_reps, args.seed)
        for key, qs in queries.items():
            if time.monotonic() > deadline:
                res.setdefault("skipped", []).append(key)
                continue
            res[key] = run_queries(t, key, qs, DICOM_JSON, problems, args.phase_seconds, deadline)
            log(f"  {key}: p50 {res[key]['p50_ms']} ms, p95 {res[key]['p95_ms']} ms (n={res[key]['n']}, "
                f"{res[key]['results_mean']} results/query, count mismatches {res[key]['count_mismatches']})")
        series_md, study_md, retrieve = build_wado(studies, max(args.wado_reps, args.retrieve_reps), args.seed)
        for key, qs in (("wado_series_metadata", series_md[:args.wado_reps]),
                        ("wado_study_metadata", study_md[:args.wado_reps])):
            if time.monotonic() > deadline:
                res.setdefault("skipped", []).append(key)
                continue
            res[key] = run_queries(t, key, qs, DICOM_JSON, problems, args.phase_seconds, deadline)
            log(f"  {key}: p50 {res[key]['p50_ms']} ms, p95 {res[key]['p95_ms']} ms (n={res[key]['n']}, "
                f"{res[key]['wire_bytes_per_response']} wire B/response, {res[key]['content_encodings']})")
        if time.monotonic() <= deadline:
            res["wado_retrieve_series"] = run_retrieve(t, retrieve[:args.retrieve_reps], problems, args.phase_seconds,
                                                       deadline)
            r = res["wado_retrieve_series"]
            log(f"  retrieve series: {r['mb_per_s']} MB/s, p50 {r['p50_ms']} ms (n={r['n']})")
        else:
            res.setdefault("skipped", []).append("wado_retrieve_series")
        if big and args.big_stow_gb > 0:
            if time.monotonic() > deadline:
                res.setdefault("skipped", []).append("big_stow")
            else:
                res["big_stow"] = b = bench_big_stow(t, args.big_stow_gb, args.big_instance_mb, args.seed, problems,
                                                     log)
                log(f"  big STOW: status {b.get('status')}, {b.get('stored')}/{b['instances']} stored, "
                    f"{b['mb_per_s']} MB/s, peak RSS {b['rss']['peak_rss_mib']} MiB")
    finally:
        t.stop()
        if any(k.startswith(t.key + ":") for k in problems.counts) and t.log_path and t.log_path.exists():
            lines = t.log_path.read_text(errors="replace").splitlines()
            res["log_excerpt"] = first_error(lines)
    return res


def first_error(lines: list[str]) -> list[str]:
    """The first logged error: its header line and the tail of its traceback (or the last log lines)."""
    starts = [i for i, line in enumerate(lines) if " ERROR " in line or line.startswith("E1")]
    if not starts:
        return lines[-30:]
    i = starts[0]
    j = i + 1
    while j < len(lines) and not lines[j].startswith(("INFO:", "WARNING:", "ERROR:", "20", "I1", "W1", "E1")):
        j += 1
    block = lines[i + 1:j]
    return [lines[i]] + (["    ..."] if len(block) > 14 else []) + block[-14:]


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def get(d: dict | None, *path: str):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def fmt(v, digits: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}"


def table(results: dict) -> tuple[str, list[dict]]:
    ours, orth = results.get("telerad"), results.get("orthanc")
    rows: list[dict] = []

    def add(metric, path_ours, path_orth=None, unit_digits=1, target=None, check=None, lat=False):
        a = get(ours, *path_ours)
        b = get(orth, *(path_orth or path_ours))
        if lat:
            a95 = get(ours, *path_ours[:-1], "p95_ms")
            b95 = get(orth, *(path_orth or path_ours)[:-1], "p95_ms")
            va = "—" if a is None else f"{fmt(a, 2)} / {fmt(a95, 2)}"
            vb = "—" if b is None else f"{fmt(b, 2)} / {fmt(b95, 2)}"
        else:
            va, vb = fmt(a, unit_digits), fmt(b, unit_digits)
        ratio = a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None
        verdict = None
        if check is not None:
            verdict = check(a, ratio)
        tgt = "—" if target is None else f"{target}: " + ("PASS" if verdict else "n/a" if verdict is None else "FAIL")
        rows.append({"metric": metric, "telerad": a, "orthanc": b, "ratio": None if ratio is None else round(ratio, 3),
                     "target": target, "pass": verdict, "cells": [metric, va, vb,
                                                                  "—" if ratio is None else f"{ratio:.2f}x", tgt]})

    ge3 = lambda a, r: None if r is None else r >= 3  # noqa: E731
    le = lambda lim: (lambda a, r: None if r is None else r <= lim)  # noqa: E731
    add("STOW instances/s", ["stow", "instances_per_s"], target="≥ 3x Orthanc", check=ge3)
    add("STOW MB/s", ["stow", "mb_per_s"])
    add("STOW request (1 study) p50 / p95 ms", ["stow", "request", "p50_ms"], lat=True)
    add("STOW server CPU s per 1,000 instances", ["stow", "server_cpu_per_1000"], unit_digits=2)
    add("Peak RSS during STOW phase (MiB)", ["stow", "rss", "peak_rss_mib"])
    add("QIDO study list limit=100 p50 / p95 ms", ["qido_study_list", "p50_ms"], lat=True,
        target="p50 ≤ 1/10 Orthanc", check=le(0.1))
    add("QIDO PatientID exact p50 / p95 ms", ["qido_patient_id", "p50_ms"], lat=True)
    add("QIDO PatientName wildcard p50 / p95 ms", ["qido_patient_name_wildcard", "p50_ms"], lat=True)
    add("QIDO StudyDate 1-month range p50 / p95 ms", ["qido_study_date_month", "p50_ms"], lat=True)
    add("QIDO series of study p50 / p95 ms", ["qido_series_of_study", "p50_ms"], lat=True)
    add("QIDO instances of series p50 / p95 ms", ["qido_instances_of_series", "p50_ms"], lat=True)
    add("WADO series metadata p50 / p95 ms", ["wado_series_metadata", "p50_ms"], lat=True,
        target="p50 ≤ 1/3 Orthanc", check=le(1 / 3))
    add("WADO study metadata p50 / p95 ms", ["wado_study_metadata", "p50_ms"], lat=True)
    add("WADO series retrieve MB/s", ["wado_retrieve_series", "mb_per_s"])
    add("Big STOW MB/s", ["big_stow", "mb_per_s"])
    add("Peak RSS during big STOW (MiB)", ["big_stow", "rss", "peak_rss_mib"], target="< 300 MB",
        check=lambda a, r: None if a is None else a * 2 ** 20 < 300 * MB)
    head = ["metric", "telerad-bridge", "Orthanc", "ratio", "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    lines += ["| " + " | ".join(r["cells"]) + " |" for r in rows]
    return "\n".join(lines), [{k: v for k, v in r.items() if k != "cells"} for r in rows]


def machine_info(tmp: Path) -> dict:
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        pass
    fs = None
    try:
        best = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, typ = line.split()[:3]
            if str(tmp).startswith(mnt) and len(mnt) > len(best):
                best, fs = mnt, f"{typ} on {mnt} ({dev})"
    except OSError:
        pass
    git = {}
    try:
        git["commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                       timeout=10).stdout.strip()
        git["dirty"] = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True,
                                           text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    vers = {}
    for mod in ("httpx", "pydicom", "numpy", "fastapi", "uvicorn", "starlette", "sqlalchemy", "psutil"):
        try:
            from importlib.metadata import version
            vers[mod] = version(mod)
        except Exception:  # noqa: BLE001
            pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg(), "ram_gib": round(psutil.virtual_memory().total / 2 ** 30, 1),
            "kernel": platform.release(), "python": platform.python_version(), "tmp_filesystem": fs, "git": git,
            "packages": vers}


# ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--studies", type=int, default=500, help="number of studies")
    ap.add_argument("--instances-per-study", type=int, default=20, help="instances per study (2 series)")
    ap.add_argument("--size", type=int, default=256, help="rows = columns of the 16-bit images")
    ap.add_argument("--seed", type=int, default=20240601, help="seed of the synthetic data and the query parameters")
    ap.add_argument("--workers", type=int, default=2, help="concurrent STOW client workers (one study per request)")
    ap.add_argument("--qido-reps", type=int, default=200, help="repetitions per QIDO query kind")
    ap.add_argument("--wado-reps", type=int, default=200, help="repetitions per WADO metadata kind")
    ap.add_argument("--retrieve-reps", type=int, default=50, help="series retrieves")
    ap.add_argument("--big-stow-gb", type=float, default=2.0, help="size in GiB of the single big STOW (0 disables)")
    ap.add_argument("--big-instance-mb", type=float, default=2.0, help="MiB of pixel data per big-STOW instance")
    ap.add_argument("--big-stow-orthanc", action="store_true", help="run the big STOW against Orthanc too")
    og = ap.add_mutually_exclusive_group()
    og.add_argument("--orthanc", dest="orthanc", action="store_true", default=None,
                    help="benchmark Orthanc too (default: when installed)")
    og.add_argument("--no-orthanc", dest="orthanc", action="store_false")
    ap.add_argument("--no-telerad", action="store_true", help="skip telerad-bridge (check the script on Orthanc)")
    ap.add_argument("--orthanc-peer-script", type=Path, default=DEFAULT_PEER_SCRIPT,
                    help="orthanc-peer.sh; when missing, Orthanc is launched directly with the same config")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs `-m server`")
    ap.add_argument("--telerad-workers", type=int, default=1,
                    help="worker processes of our server (`telerad serve --workers`); RSS counts all of them")
    ap.add_argument("--tmp-dir", type=Path, default=None, help="parent of the temporary data folders")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data folders")
    ap.add_argument("--phase-seconds", type=float, default=300, help="time cap of each latency phase")
    ap.add_argument("--max-minutes", type=float, default=90, help="overall time cap; later phases are skipped")
    ap.add_argument("--output", type=Path, default=None, help="JSON result file (default benchmarks/results/...)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + args.max_minutes * 60
    load_at_start = os.getloadavg()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] {msg}", file=sys.stderr, flush=True)

    use_orthanc = Orthanc.installed() if args.orthanc is None else args.orthanc
    if use_orthanc and not Orthanc.installed():
        print(f"Orthanc not installed ({ORTHANC_BIN}, {DICOMWEB_PLUGIN})", file=sys.stderr)
        return 2
    log(f"generating {args.studies} studies x {args.instances_per_study} instances, {args.size}x{args.size} 16-bit, "
        f"seed {args.seed}")
    studies = generate_studies(args.studies, args.instances_per_study, args.size, args.seed, log)
    total_bytes = sum(s.nbytes for s in studies)
    log(f"generated {sum(len(s.parts) for s in studies)} instances, {total_bytes / MB:.1f} MB")

    tmp = Path(tempfile.mkdtemp(prefix="dicomweb-bench-", dir=args.tmp_dir))
    problems = Problems()
    results: dict = {}
    interrupted = None
    try:
        targets: list[tuple[Target, bool]] = []
        if not args.no_telerad:
            targets.append((Telerad(tmp / "telerad", args.python, log, args.telerad_workers), True))
        if use_orthanc:
            targets.append((Orthanc(tmp / "orthanc", args.orthanc_peer_script, log), args.big_stow_orthanc))
        for t, big in targets:
            (tmp / t.key).mkdir(parents=True, exist_ok=True)
            log(f"== {t.name}")
            try:
                results[t.key] = bench_target(t, studies, args, problems, deadline, log, big)
            except Exception as exc:  # noqa: BLE001 - report and continue with the next target
                log(f"  {t.name} failed: {exc!r}")
                results[t.key] = {"name": t.name, "error": repr(exc)}
    except KeyboardInterrupt:
        interrupted = "KeyboardInterrupt"
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    md, rows = table(results)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out = {"created": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "command": sys.argv,
           "config": config, "data": {"instances": sum(len(s.parts) for s in studies), "bytes": total_bytes,
                                      "instance_bytes_mean": round(total_bytes / max(1, sum(len(s.parts)
                                                                                            for s in studies)))},
           "machine": {**machine_info(args.tmp_dir or Path(tempfile.gettempdir())), "loadavg_at_start": load_at_start},
           "results": results, "table": rows,
           "problems": problems.items, "problem_counts": problems.counts, "interrupted": interrupted,
           "elapsed_s": round(time.monotonic() - started, 1)}
    path = args.output or RESULTS / f"dicomweb-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, ensure_ascii=False))
    print(f"\n### DICOMweb benchmark ({out['data']['instances']} instances, {total_bytes / MB:.0f} MB, "
          f"{args.workers} STOW client workers, {args.size}x{args.size}, "
          f"telerad serve --workers {args.telerad_workers})\n")
    print(md)
    print("\nLatencies are p50 / p95 in ms (sequential requests on one keep-alive connection). "
          "Ratio = telerad-bridge / Orthanc.")
    if problems.items:
        print("\nProblems (first examples; counts: " + ", ".join(f"{k}={v}" for k, v in problems.counts.items()) + "):")
        for p in problems.items:
            print(f"- [{p['target']}] {p['kind']}: {p['request']}\n  -> {p['status']}: {p['response'][:400]}")
    for key, r in results.items():
        if r.get("log_excerpt"):
            print(f"\n{r['name']} log excerpt (first error):\n    " + "\n    ".join(r["log_excerpt"][:25]))
    print(f"\nJSON: {path}")
    return 1 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
