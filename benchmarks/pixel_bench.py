#!/usr/bin/env python3
"""Pixel benchmark: frames, rendered, thumbnail and whole-slide tiles of telerad-bridge beside Orthanc.

One command (from the repository root):

    python benchmarks/pixel_bench.py                 # Orthanc (+ DICOMweb, + orthanc-wsi) when installed
    python benchmarks/pixel_bench.py --no-orthanc --reps 50 --tile-seconds 5

Each target is a fresh server in a temporary folder (ours: ``python -m server serve`` + a token, like
dicomweb_bench.py; Orthanc: ``orthanc-peer.sh start --wsi``). The same data is stored with STOW-RS: a 512x512
16-bit CT slice (explicit VR little endian), a 32-frame 512x512 16-bit multi-frame image, and a whole-slide
pyramid (4096x4096 px at level 0, 256 px JPEG baseline tiles, 5 levels; no label or overview, which the
orthanc-wsi plugin 1.1 refuses in the pyramid's series). Then, sequentially
on one keep-alive connection (5 warm-up requests not counted): frame retrieval in the stored transfer syntax,
rendered JPEG, thumbnail, WSI tiles (ours: the tile endpoint; Orthanc: the orthanc-wsi plugin's
/wsi/tiles/...) and WSI frames through WADO-RS; then tiles/s with N concurrent clients (threads, one
keep-alive connection each) for a fixed time. Prints a Markdown table, writes JSON into benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import httpx
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dicomweb_bench import (  # noqa: E402  (the house benchmark's servers and helpers)
    DEFAULT_PEER_SCRIPT,
    RESULTS,
    STOW_CONTENT_TYPE,
    Orthanc,
    Problems,
    Target,
    Telerad,
    cpu_seconds,
    fmt,
    machine_info,
    multipart_length,
    multipart_stream,
    phantom_slice,
    summarize_latency,
)

from tests.wsidata import make_slide  # noqa: E402

WSI_PLUGIN = Path(os.environ.get("WSI_PLUGIN", "/usr/share/orthanc/plugins/libOrthancWSI.so"))
MULTI_FRAME_SC = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word Secondary Capture
FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
JPEG_FRAME_ACCEPT = 'multipart/related; type="image/jpeg"'
SOI = b"\xff\xd8"


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def _image(study: str, series: str, sop_class: str, pixels: np.ndarray, **extra) -> bytes:
    """A Part 10 MONOCHROME2 16-bit image (frames x 512 x 512) in explicit VR little endian."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientName, ds.PatientID, ds.StudyDate, ds.StudyTime = "Pixel^Bench", "PIXBENCH", "20261123", "100000"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.StudyID, ds.AccessionNumber = "CT", 1, 1, "1", "PB1"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def make_data(wsi_size: int, wsi_levels: int) -> dict:
    """The CT slice, the multi-frame image and the slide, with their UIDs."""
    study, ct_series, mf_series = generate_uid(), generate_uid(), generate_uid()
    ct = _image(study, ct_series, CTImageStorage, phantom_slice(512, "CT", 0.1), WindowCenter=40, WindowWidth=400,
                RescaleIntercept=0, RescaleSlope=1, ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])
    frames = np.stack([phantom_slice(512, "MR", z) for z in np.linspace(-0.9, 0.9, 32)])
    multi = _image(study, mf_series, MULTI_FRAME_SC, frames, NumberOfFrames=32, Modality="OT",
                   WindowCenter=700, WindowWidth=1400)
    slide = make_slide(width=wsi_size, height=wsi_size, levels=wsi_levels)
    return {"study": study, "ct": (ct_series, _sop(ct), ct), "multi": (mf_series, _sop(multi), multi),
            "slide": slide}


def _sop(data: bytes) -> str:
    from pydicom import dcmread
    return str(dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


# ------------------------------------------------------------------------------------------------
# targets
# ------------------------------------------------------------------------------------------------
class OrthancWsi(Orthanc):
    """Orthanc started by orthanc-peer.sh with ``--wsi`` (the orthanc-wsi plugin) when the plugin exists."""

    def __init__(self, workdir: Path, peer_script: Path | None, log: Callable[[str], None]):
        super().__init__(workdir, peer_script, log)
        self.wsi = bool(self.peer_script) and WSI_PLUGIN.exists()
        if self.wsi:
            wrapper = workdir / "orthanc-peer-wsi.sh"
            workdir.mkdir(parents=True, exist_ok=True)
            wrapper.write_text(f'#!/bin/bash\nexec bash "{self.peer_script}" "$@" --wsi\n')
            self.peer_script = wrapper

    @property
    def root(self) -> str:
        return self.base.rsplit("/dicom-web", 1)[0]


def stow(t: Target, parts: list[bytes]) -> None:
    """Store the parts in one STOW-RS request; raise unless all were stored."""
    with httpx.Client(headers=t.headers, timeout=300) as client:
        r = client.post(f"{t.base}/studies", content=multipart_stream(parts),
                        headers={"Content-Type": STOW_CONTENT_TYPE, "Accept": "application/dicom+json",
                                 "Content-Length": str(multipart_length([len(p) for p in parts]))})
    if r.status_code != 200:
        raise RuntimeError(f"STOW to {t.name} answered {r.status_code}: {r.text[:500]}")


# ------------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------------
Check = Callable[[httpx.Response], bool]


def sequential(t: Target, name: str, urls: list[str], accept: str | None, check: Check, problems: Problems,
               phase_s: float, warmup: int = 5) -> dict:
    """p50/p95 of GETs of ``urls`` one after the other on one keep-alive connection."""
    lat: list[float] = []
    failures = 0
    stop_at = time.monotonic() + phase_s
    headers = {"Accept": accept} if accept else {}
    with httpx.Client(headers=t.headers, timeout=60) as client:
        for i, url in enumerate(urls[:warmup] + urls):
            if time.monotonic() > stop_at:
                break
            t0 = time.perf_counter()
            resp = client.get(url, headers=headers)
            _ = resp.content
            elapsed = time.perf_counter() - t0
            if resp.status_code != 200 or not check(resp):
                failures += 1
                problems.add(t.key, name, f"GET {url} Accept: {accept}", resp.status_code, resp.text[:800])
                if failures >= 5 and not lat:
                    break
                continue
            if i >= warmup:
                lat.append(elapsed)
    return {**summarize_latency(lat), "failures": failures,
            "media_type": resp.headers.get("content-type") if urls else None}


def concurrent(t: Target, urls: list[str], clients: int, seconds: float, check: Check) -> dict:
    """Tiles/s with ``clients`` threads, each on its own keep-alive connection, for ``seconds``."""
    counts = [0] * clients
    failures = [0] * clients
    start = threading.Barrier(clients + 1)
    stop_at: list[float] = []

    def worker(k: int) -> None:
        rng = random.Random(k)
        with httpx.Client(headers=t.headers, timeout=60) as client:
            start.wait()
            while time.monotonic() < stop_at[0]:
                resp = client.get(rng.choice(urls))
                if resp.status_code == 200 and check(resp):
                    counts[k] += 1
                else:
                    failures[k] += 1

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(clients)]
    for th in threads:
        th.start()
    cpu0 = cpu_seconds(t.pid)
    stop_at.append(time.monotonic() + seconds)
    t0 = time.monotonic()
    start.wait()
    for th in threads:
        th.join()
    wall = time.monotonic() - t0
    return {"tiles_per_s": round(sum(counts) / wall, 1), "tiles": sum(counts), "failures": sum(failures),
            "clients": clients, "seconds": round(wall, 2),
            "server_cpu_s_per_1000": round((cpu_seconds(t.pid) - cpu0) / max(1, sum(counts)) * 1000, 3)}


def _is_jpeg(resp: httpx.Response) -> bool:
    return resp.content[:2] == SOI


def _multipart_ok(resp: httpx.Response) -> bool:
    return resp.headers.get("content-type", "").startswith("multipart/related") and len(resp.content) > 100


def orthanc_series_id(t: OrthancWsi, series_uid: str) -> str | None:
    r = httpx.post(f"{t.root}/tools/lookup", content=series_uid, timeout=30)
    found = [x["ID"] for x in r.json() if x.get("Type") == "Series"] if r.status_code == 200 else []
    return found[0] if found else None


def orthanc_instance_id(t: OrthancWsi, sop_uid: str) -> str | None:
    r = httpx.post(f"{t.root}/tools/lookup", content=sop_uid, timeout=30)
    found = [x["ID"] for x in r.json() if x.get("Type") == "Instance"] if r.status_code == 200 else []
    return found[0] if found else None


def tile_urls(t: Target, data: dict, reps: int, seed: int) -> tuple[list[str], Check] | None:
    """URLs of random level-0 tiles on the target (ours: the tile endpoint; Orthanc: orthanc-wsi) and a check
    that the answer is the stored tile, byte for byte."""
    slide = data["slide"]
    rng = random.Random(seed)
    keys = [rng.choice(sorted(slide.tiles[0])) for _ in range(reps)]
    if isinstance(t, OrthancWsi):
        series = orthanc_series_id(t, slide.series_uid) if t.wsi else None
        if series is None or httpx.get(f"{t.root}/wsi/pyramids/{series}", timeout=60).status_code != 200:
            return None
        base = f"{t.root}/wsi/tiles/{series}/0"
    else:
        base = f"{t.base}/studies/{slide.study_uid}/series/{slide.series_uid}/tiles/0"
    expected = {f"{base}/{c}/{r}": slide.tiles[0][c, r] for c, r in keys}
    return [f"{base}/{c}/{r}" for c, r in keys], lambda resp: resp.content == expected.get(str(resp.request.url))


def bench_target(t: Target, data: dict, args: argparse.Namespace, problems: Problems,
                 log: Callable[[str], None]) -> dict:
    t.start()
    out: dict = {"name": t.name, "notes": t.notes}
    try:
        slide = data["slide"]
        levels = [b for name, b in slide.files.items() if name.startswith("level")]
        log(f"  storing CT, multi-frame and slide ({len(levels)} pyramid levels)")
        stow(t, [data["ct"][2], data["multi"][2]])
        stow(t, levels)  # no label/overview: orthanc-wsi 1.1 refuses a series with other tile sizes
        study = data["study"]
        ct_series, ct_sop, _ = data["ct"]
        mf_series, mf_sop, _ = data["multi"]
        ct = f"{t.base}/studies/{study}/series/{ct_series}/instances/{ct_sop}"
        mf = f"{t.base}/studies/{study}/series/{mf_series}/instances/{mf_sop}"
        n = args.reps
        phase = args.phase_seconds
        health = f"{t.root}/system" if isinstance(t, OrthancWsi) else t.base.replace("/dicomweb", "/healthz")
        out["floor"] = sequential(t, "floor", [health] * n, None, lambda r: True, problems, phase)
        log("  frames (stored syntax)")
        out["frame_ct"] = sequential(t, "frame_ct", [f"{ct}/frames/1"] * n, FRAME_ACCEPT, _multipart_ok, problems,
                                     phase)
        out["frame_multi"] = sequential(t, "frame_multi", [f"{mf}/frames/{1 + i % 32}" for i in range(n)],
                                        FRAME_ACCEPT, _multipart_ok, problems, phase)
        log("  rendered and thumbnail")
        out["rendered_ct"] = sequential(t, "rendered_ct", [f"{ct}/rendered"] * n, "image/jpeg", _is_jpeg, problems,
                                        phase)
        out["thumbnail_ct"] = sequential(t, "thumbnail_ct", [f"{ct}/thumbnail"] * n, "image/jpeg", _is_jpeg,
                                         problems, phase)
        if isinstance(t, OrthancWsi) and out["thumbnail_ct"]["n"] == 0:
            iid = orthanc_instance_id(t, ct_sop)  # Orthanc's DICOMweb plugin 1.7 has no thumbnail: its /preview
            if iid:
                out["thumbnail_ct"] = {**sequential(t, "preview_ct", [f"{t.root}/instances/{iid}/preview"] * n,
                                                    "image/jpeg", lambda r: len(r.content) > 100, problems, phase),
                                       "via": "/instances/{id}/preview"}
        level0 = f"{t.base}/studies/{slide.study_uid}/series/{slide.series_uid}/instances/{slide.sops['level0.dcm']}"
        rng = random.Random(args.seed)
        frames = [f"{level0}/frames/{rng.randint(1, len(slide.tiles[0]))}" for _ in range(n)]
        log("  WSI frames and tiles")
        out["wsi_frame"] = sequential(t, "wsi_frame", frames, JPEG_FRAME_ACCEPT, _multipart_ok, problems, phase)
        tiles = tile_urls(t, data, n, args.seed)
        if tiles is not None:
            urls, check = tiles
            out["wsi_tile"] = sequential(t, "wsi_tile", urls, None, check, problems, phase)
            if out["wsi_tile"]["n"]:
                out["wsi_tiles_concurrent"] = concurrent(t, urls, args.clients, args.tile_seconds, check)
    finally:
        t.stop()
    return out


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
ROWS = [
    ("Health check p50 / p95 ms (ours /healthz: one index ping; Orthanc /system)", "floor", "p50_ms", None),
    ("Frame, CT 512x512 (stored syntax) p50 / p95 ms", "frame_ct", "p50_ms", "p50 ≤ 5 ms"),
    ("Frame, 32-frame 512x512 image p50 / p95 ms", "frame_multi", "p50_ms", "p50 ≤ 5 ms"),
    ("Rendered CT 512x512 (JPEG) p50 / p95 ms", "rendered_ct", "p50_ms", "p50 ≤ 30 ms"),
    ("Thumbnail CT p50 / p95 ms", "thumbnail_ct", "p50_ms", None),
    ("WSI frame via WADO-RS (image/jpeg) p50 / p95 ms", "wsi_frame", "p50_ms", None),
    ("WSI tile p50 / p95 ms", "wsi_tile", "p50_ms", "p50 ≤ 5 ms"),
    ("WSI tiles/s, {clients} concurrent clients", "wsi_tiles_concurrent", "tiles_per_s", None),
    ("Server CPU s per 1,000 tiles ({clients} clients)", "wsi_tiles_concurrent", "server_cpu_s_per_1000", None),
]
LIMITS = {"frame_ct": 5.0, "frame_multi": 5.0, "rendered_ct": 30.0, "wsi_tile": 5.0}


def _cell(result: dict | None, key: str, field: str) -> str:
    r = (result or {}).get(key)
    if not r or r.get(field) is None:
        return "—"
    if field == "p50_ms":
        return f"{fmt(r['p50_ms'], 2)} / {fmt(r['p95_ms'], 2)}" + (" (/preview)" if r.get("via") else "")
    return fmt(r[field], 2 if field.startswith("server_cpu") else 1)


def table(results: dict, clients: int) -> str:
    ours, orth = results.get("telerad"), results.get("orthanc")
    lines = ["| metric | telerad-bridge | Orthanc | target |", "|---|---|---|---|"]
    for label, key, field, target in ROWS:
        verdict = "—"
        if target:
            p50 = ((ours or {}).get(key) or {}).get("p50_ms")
            verdict = f"{target}: " + ("n/a" if p50 is None else "PASS" if p50 <= LIMITS[key] else "FAIL")
        lines.append(f"| {label.format(clients=clients)} | {_cell(ours, key, field)} | {_cell(orth, key, field)} "
                     f"| {verdict} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--reps", type=int, default=200, help="requests per latency")
    ap.add_argument("--clients", type=int, default=8, help="concurrent tile clients")
    ap.add_argument("--tile-seconds", type=float, default=15, help="duration of the concurrent tile phase")
    ap.add_argument("--wsi-size", type=int, default=4096, help="level-0 width = height of the slide in pixels")
    ap.add_argument("--wsi-levels", type=int, default=5, help="pyramid levels")
    ap.add_argument("--seed", type=int, default=20261123)
    og = ap.add_mutually_exclusive_group()
    og.add_argument("--orthanc", dest="orthanc", action="store_true", default=None,
                    help="benchmark Orthanc too (default: when installed)")
    og.add_argument("--no-orthanc", dest="orthanc", action="store_false")
    ap.add_argument("--orthanc-peer-script", type=Path, default=DEFAULT_PEER_SCRIPT)
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs `-m server`")
    ap.add_argument("--telerad-workers", type=int, default=1, help="worker processes of `telerad serve`")
    ap.add_argument("--tmp-dir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the temporary data folders")
    ap.add_argument("--phase-seconds", type=float, default=120, help="time cap of each latency phase")
    ap.add_argument("--output", type=Path, default=None, help="JSON result file (default benchmarks/results/...)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    load_at_start = os.getloadavg()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] {msg}", file=sys.stderr, flush=True)

    use_orthanc = Orthanc.installed() if args.orthanc is None else args.orthanc
    log(f"generating data (CT 512x512, 32-frame 512x512, slide {args.wsi_size} px / {args.wsi_levels} levels)")
    data = make_data(args.wsi_size, args.wsi_levels)
    tmp = Path(tempfile.mkdtemp(prefix="pixel-bench-", dir=args.tmp_dir))
    problems = Problems()
    results: dict = {}
    try:
        targets: list[Target] = [Telerad(tmp / "telerad", args.python, log, args.telerad_workers)]
        if use_orthanc:
            targets.append(OrthancWsi(tmp / "orthanc", args.orthanc_peer_script, log))
        for t in targets:
            (tmp / t.key).mkdir(parents=True, exist_ok=True)
            log(f"== {t.name}")
            try:
                results[t.key] = bench_target(t, data, args, problems, log)
            except Exception as exc:  # noqa: BLE001 - report and continue with the next target
                log(f"  {t.name} failed: {exc!r}")
                results[t.key] = {"name": t.name, "error": repr(exc)}
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    md = table(results, args.clients)
    machine = {**machine_info(args.tmp_dir or Path(tempfile.gettempdir())), "loadavg_at_start": load_at_start}
    out = {"created": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "command": sys.argv,
           "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "machine": machine, "results": results, "problems": problems.items, "problem_counts": problems.counts,
           "elapsed_s": round(time.monotonic() - started, 1)}
    path = args.output or RESULTS / f"pixel-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, ensure_ascii=False))
    print(f"\n### Pixel benchmark (CT 512x512, 32-frame 512x512, WSI {args.wsi_size}x{args.wsi_size} px, "
          f"256 px JPEG tiles, {args.wsi_levels} levels; telerad serve --workers {args.telerad_workers})\n")
    print(md)
    print(f"\nLatencies: p50 / p95 in ms, sequential on one keep-alive connection, {args.reps} requests after 5 "
          f"warm-up. Load average at start {', '.join(f'{x:.2f}' for x in load_at_start)}, at end "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; {machine['logical_cpus']} logical CPUs "
          f"({machine['cpu']}).")
    if problems.items:
        print("\nProblems (first examples; counts: " + ", ".join(f"{k}={v}" for k, v in problems.counts.items()) + "):")
        for p in problems.items:
            print(f"- [{p['target']}] {p['kind']}: {p['request']}\n  -> {p['status']}: {p['response'][:300]}")
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
