"""Two gateway nodes on loopback exchange a study over DRG DICOM e-mail (real processes, real SMTP, receipts).

Node A (site-a, a.example) and node B (site-b, b.example) each run ``telerad serve`` with their own data
folder, HTTP port and SMTP port; each knows the other from the operator's CSV and routes its domain straight
to the other's SMTP ingress. The faults of issue 4 that need whole processes live here: the receiver down
then up, the sender killed with SIGKILL mid-job, the receiver killed between storing and acknowledging.
"""

from __future__ import annotations

import pytest
from pydicom.uid import generate_uid

from tests.component.test_wado import split_multipart
from tests.dicomdata import make_instance, multipart
from tests.gateway_nodes import Node, free_port, nodes, wait_for  # noqa: F401 (fixture)



def _study(n: int, *, size: int = 64) -> tuple[str, list[bytes]]:
    study, series = generate_uid(), generate_uid()
    return study, [make_instance(study=study, series=series, instance_number=i, size=size) for i in range(1, n + 1)]


def _stow(node: Node, instances: list[bytes]) -> None:
    body, ctype = multipart(instances)
    with node.http() as h:
        r = h.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 200, r.text


def _send(node: Node, study: str, to: Node, **extra) -> str:
    with node.http() as h:
        r = h.post("/gateway/jobs", json={"study": study, "recipient": to.endpoint, **extra})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _job(node: Node, job_id: str) -> dict:
    with node.http() as h:
        r = h.get(f"/gateway/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def _finished(node: Node, job_id: str, timeout: float = 120.0) -> dict:
    def done():
        job = _job(node, job_id)
        assert job["state"] not in ("failed", "aborted"), job
        return job if job["state"] == "finished" else None
    return wait_for(done, timeout, what=f"job {job_id} at {node.name} finished")


def _instances_at(node: Node, study: str) -> dict[str, bytes]:
    """SOP Instance UID → the bytes WADO-RS returns for it."""
    with node.http() as h:
        r = h.get(f"/dicomweb/studies/{study}/instances")
        if r.status_code == 404:
            return {}
        assert r.status_code == 200, r.text
        out = {}
        for item in r.json():
            sop, series = item["00080018"]["Value"][0], item["0020000E"]["Value"][0]
            w = h.get(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}",
                      headers={"Accept": 'multipart/related; type="application/dicom"'})
            assert w.status_code == 200, w.text
            (_, data), = split_multipart(w.content, w.headers["content-type"])
            out[sop] = data
    return out


def _sops(instances: list[bytes]) -> dict[str, bytes]:
    from io import BytesIO

    from pydicom import dcmread
    return {dcmread(BytesIO(d), stop_before_pixels=True).SOPInstanceUID: d for d in instances}


def _sets(node: Node) -> list[dict]:
    with node.http() as h:
        r = h.get("/gateway/sets")
    assert r.status_code == 200, r.text
    return r.json()["sets"]


def test_study_stowed_at_a_arrives_at_b_byte_exact_with_all_receipts(nodes):
    a, b = nodes
    a.start(), b.start()
    study, instances = _study(5)
    _stow(a, instances)
    job_id = _send(a, study, b)
    job = _finished(a, job_id)
    assert (job["images"], job["sent"], job["acknowledged"], job["failed"]) == (5, 5, 5, 0)
    assert {m["state"] for m in job["mails"]} == {"acknowledged-ok"}
    assert wait_for(lambda: _instances_at(b, study) == _sops(instances), 30, what="byte-exact study at B")
    with b.http() as h:
        q = h.get("/dicomweb/studies", params={"StudyInstanceUID": study})
        assert q.status_code == 200 and q.json()[0]["00201208"]["Value"] == [5]
    with a.http() as h:  # the job's FHIR Task tells the same
        task = h.get(f"/fhir/{job['task']}")
        assert task.status_code == 200, task.text
        assert task.json()["status"] == "completed"


def test_receiver_down_then_up_loses_nothing(nodes):
    a, b = nodes
    a.start()
    study, instances = _study(4)
    _stow(a, instances)
    job_id = _send(a, study, b)
    wait_for(lambda: all(m["attempts"] >= 2 and m["state"] == "failed-retryable"
                         for m in _job(a, job_id)["mails"]), 60, what="retries while B is down")
    assert _job(a, job_id)["state"] == "active"
    b.start()
    job = _finished(a, job_id)
    assert job["acknowledged"] == 4
    assert wait_for(lambda: _instances_at(b, study) == _sops(instances), 30, what="study at B")


def test_sender_killed_mid_job_every_instance_arrives_exactly_once(nodes):
    a, b = nodes
    a.settings.update(send_batch="1", send_concurrency="1")
    a.start(), b.start()
    study, instances = _study(40, size=16)
    _stow(a, instances)
    job_id = _send(a, study, b)
    wait_for(lambda: 3 <= _job(a, job_id)["sent"] < 30, 60, interval=0.02, what="the job half sent")
    a.kill()  # SIGKILL: no cleanup; the restarted gateway releases the dead process's leases (600 s)
    a.start()
    job = _finished(a, job_id)
    assert (job["acknowledged"], job["failed"]) == (40, 0)
    assert wait_for(lambda: _instances_at(b, study) == _sops(instances), 30, what="study at B")
    (the_set,) = [s for s in _sets(b) if s["study"] == study]
    assert (the_set["state"], the_set["total"], the_set["received"]) == ("imported", 40, 40)


def test_receiver_killed_between_storing_and_acknowledging_imports_once(nodes):
    a, b = nodes
    a.settings["receipt_timeout_seconds"] = "3"
    b.routes[a.domain] = free_port()  # B's receipts cannot leave: nothing listens there
    a.start(), b.start()
    study, instances = _study(3)
    _stow(a, instances)
    job_id = _send(a, study, b)
    wait_for(lambda: any(s["study"] == study and s["state"] == "imported" for s in _sets(b)), 60,
             what="the set stored and imported at B")
    assert _job(a, job_id)["acknowledged"] == 0
    b.kill()  # stored, receipts still queued
    b.routes[a.domain] = a.smtp_port
    b.start()
    job = _finished(a, job_id)
    assert (job["acknowledged"], job["failed"]) == (3, 0)
    assert _instances_at(b, study) == _sops(instances)
    (the_set,) = [s for s in _sets(b) if s["study"] == study]
    assert (the_set["state"], the_set["received"]) == ("imported", 3)
