"""A large STOW-RS request is streamed to disk: memory stays flat while 256 MB pass (the benchmark does 2 GB)."""

from __future__ import annotations

import io
import threading
import time
import uuid

import httpx
import numpy as np
import psutil
from pydicom import dcmread

from tests.conftest import LiveServer, make_token
from tests.dicomdata import make_instance

INSTANCES = 64
SIDE = 1024  # two frames of 1024 x 1024 x 16 bit: 4 MiB per instance, 256 MiB in all
STUDY = "1.2.826.0.1.3680043.77.1"
SOP = "1.2.826.0.1.3680043.77.2.{:04d}"  # fixed length, so a UID can be swapped in place
CHUNK = 1 << 20


def _template() -> bytes:
    ds = dcmread(io.BytesIO(make_instance(study=STUDY, series=STUDY + ".1", sop=SOP.format(0))))
    ds.Rows = ds.Columns = SIDE
    ds.NumberOfFrames = 2
    ds.PixelData = np.full(SIDE * SIDE * 2, 7, dtype=np.int16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _body(boundary: str, template: bytes, counter: list[int]):
    """The request body, generated part by part (the client never holds it whole)."""
    for i in range(INSTANCES):
        part = template.replace(SOP.format(0).encode(), SOP.format(i).encode())
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        for k in range(0, len(part), CHUNK):
            yield part[k:k + CHUNK]
        yield b"\r\n"
        counter[0] += len(part)
    yield f"--{boundary}--\r\n".encode()


def test_large_stow_keeps_memory_flat(sqlite_settings):
    from server.app import create_app

    app = create_app(sqlite_settings)
    boundary = uuid.uuid4().hex
    template = _template()
    sent = [0]
    proc = psutil.Process()
    baseline = proc.memory_info().rss
    peak = baseline
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    with LiveServer(app) as server:
        sampler.start()
        try:
            r = httpx.post(f"{server.url}/dicomweb/studies", content=_body(boundary, template, sent), timeout=300,
                           headers={"Authorization": f"Bearer {make_token(sqlite_settings)}",
                                    "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
        finally:
            stop.set()
            sampler.join()
    app.state.engine.dispose()
    assert r.status_code == 200, r.text[:500]
    assert len(r.json()["00081199"]["Value"]) == INSTANCES
    assert sent[0] > 250 * 2**20
    growth_mb = (peak - baseline) / 2**20
    assert growth_mb < 120, f"RSS grew by {growth_mb:.0f} MB while streaming {sent[0] / 2**20:.0f} MB"
