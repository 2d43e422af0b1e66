"""Transfer statistics end to end: a study sent from node A to node B over real DRG mail shows the same instances
and DICOM bytes on both sides (sizes recorded by the sender and by the inbound pipeline), with the partner's
organization name from each node's directory."""

from __future__ import annotations

import csv
import io

import pytest
from pydicom.uid import generate_uid

from tests.dicomdata import make_instance, multipart
from tests.gateway_nodes import Node, nodes, wait_for  # noqa: F401 (fixture)


def _stats(node: Node, **params) -> dict:
    with node.http() as h:
        r = h.get("/gateway/statistics", params={"period": "total", **params})
    assert r.status_code == 200, r.text
    return r.json()


def test_sent_and_received_figures_agree(nodes):
    a, b = nodes
    a.start(), b.start()
    study, series = generate_uid(), generate_uid()
    instances = [make_instance(study=study, series=series, instance_number=i, size=64 * i) for i in (1, 2, 3)]
    body, ctype = multipart(instances)
    with a.http() as h:
        assert h.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype}).status_code == 200
        r = h.post("/gateway/jobs", json={"study": study, "recipient": b.endpoint})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        wait_for(lambda: h.get(f"/gateway/jobs/{job_id}").json()["state"] == "finished", 120, what="job finished")
    size = sum(len(i) for i in instances)

    (sent,) = _stats(a, direction="sent")["rows"]
    assert (sent["partner"], sent["organization"], sent["transfers"], sent["studies"], sent["instances"],
            sent["bytes"], sent["completed"], sent["failed"]) == (b.address, "Klinik B", 1, 1, 3, size, 1, 0)
    assert 0 <= sent["medianSeconds"] == sent["p95Seconds"] < 120

    (received,) = wait_for(lambda: _stats(b, direction="received")["rows"], 30, what="the set at B")
    assert (received["partner"], received["organization"], received["transfers"], received["instances"],
            received["bytes"], received["completed"], received["quarantined"]) == (
        a.address, "Klinik A", 1, 3, size, 1, 0)

    with a.http() as h:
        r = h.get("/gateway/statistics", params={"period": "total"}, headers={"Accept": "text/csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    lines = list(csv.DictReader(io.StringIO(r.text)))
    assert [(x["partner"], x["direction"], x["bytes"]) for x in lines] == [
        (b.address, "sent", str(size)), ("*", "sent", str(size))]
