"""The FHIR Task mirror of a transfer job (profile ``transfer-task``, DESIGN.md section 3).

``task_hook`` returns the ``JobHook`` the gateway store runs inside the transaction that changed a job, so the
Task version and the job change commit together. The Task's ``status``/``businessStatus`` follow the job state
(``server.fhir.task.TASK_STATE_BY_JOB``), refined for an active job by where its mails stand (all sent:
``awaiting-receipts``; a resend pending: ``failed-retrying``); its outputs carry the instance counters as they
were at that step (the job's JSON view has them live). The store calls the hook on those steps only.

Every status change moves along the R4 state machine (task.html#statemachine, ``check_transition``): where the
job jumps (a paused waiting job: ready -> on-hold; a resumed job back to waiting) the mirror writes the legal
intermediate versions, or stays in-progress (a Task never returns to ready). A terminal Task (failed,
cancelled, completed) is never reopened: a retried job gets a new Task, ``<task id>-2``, ``-3``, ... (the R4
reading of ``server.fhir.task``); every generation carries the job id as identifier. Deleting a job cancels a
Task that is still open (on-hold: businessStatus ``aborted``); a terminal Task stays as it is, the record of
what happened (not entered-in-error: nothing was recorded in error).
"""

from __future__ import annotations

import json
import logging
from collections import deque
from datetime import datetime, timezone

from server.errors import ServerError
from server.fhir.service import FhirService
from server.fhir.task import (BUSINESS_STATUS_SYSTEM, INITIAL_STATUSES, TRANSITIONS, JobState, TaskState,
                              task_state_for_job)
from server.gateway.directory import system_principal
from server.gateway.jobs import MailCounts, Priority
from server.store import gateway as gw
from server.store.fhir import FhirTx, Stored

log = logging.getLogger(__name__)

BASE = "https://telerad-bridge.de/fhir"
PROFILE = f"{BASE}/StructureDefinition/transfer-task"
PARAMETER_SYSTEM = f"{BASE}/CodeSystem/transfer-parameter"
JOB_ID_SYSTEM = f"{BASE}/sid/transfer-job"
TASK_CODE_SYSTEM = "http://hl7.org/fhir/CodeSystem/task-code"
URI_SYSTEM = "urn:ietf:rfc:3986"
OID_PREFIX = "urn:oid:"
MAX_GENERATIONS = 100

#: businessStatus of a Task.status passed on the way to the wanted one.
INTERMEDIATE: dict[str, str] = {"ready": "transfer-queued", "in-progress": "transfer-running",
                                "on-hold": "transfer-paused"}
#: businessStatus of an active job by the progress of its mails (``server.store.gateway.progress``).
ACTIVE_BY_PROGRESS: dict[str, str] = {gw.RETRYING: "failed-retrying", gw.ALL_SENT: "awaiting-receipts"}
#: Output counters (CodeSystem transfer-parameter) and the Job field each shows.
OUTPUTS: tuple[tuple[str, str], ...] = (("instances-total", "total"), ("instances-sent", "sent"),
                                        ("instances-acknowledged", "acknowledged"), ("instances-failed", "failed"))
CANCELLED = TaskState("cancelled", "aborted")


def task_state(job_state: JobState | str, counts: MailCounts) -> TaskState:
    """The Task status and businessStatus of a job in ``job_state`` whose mails stand at ``counts``."""
    base = task_state_for_job(job_state)
    if JobState(job_state) is JobState.ACTIVE:
        code = ACTIVE_BY_PROGRESS.get(gw.progress(counts))
        if code is not None:
            return TaskState(base.status, code)
    return base


def steps(current: str | None, wanted: TaskState,
          intermediate: dict[str, str] = INTERMEDIATE) -> list[TaskState] | None:
    """The Task versions that lead from ``current`` (None: no Task yet) to ``wanted`` along legal transitions,
    shortest first; None when ``wanted`` cannot be reached (``current`` is terminal). Intermediate versions
    carry the businessStatus of ``intermediate``; a wanted ``ready`` past ready is shown as in-progress."""
    if current == wanted.status:
        return [wanted]
    if wanted.status == "ready" and current is not None:
        if current == "in-progress":
            return [TaskState("in-progress", intermediate["in-progress"])]
        wanted = TaskState("in-progress", intermediate["in-progress"])
    allowed = set(intermediate) | {wanted.status}
    starts = [s for s in sorted(INITIAL_STATUSES) if s in allowed] if current is None else [current]
    queue = deque((s, [s]) for s in starts)
    seen = set(starts)
    while queue:
        status, path = queue.popleft()
        if status == wanted.status:
            first = 0 if current is None else 1
            return [TaskState(s, intermediate[s]) for s in path[first:-1]] + [wanted]
        for nxt in sorted(TRANSITIONS.get(status, ())):
            if nxt in allowed and nxt not in seen:
                seen.add(nxt)
                queue.append((nxt, [*path, nxt]))
    return None


def generation_id(base_id: str, generation: int) -> str:
    """The id of a job's ``generation``-th Task (1: the base id)."""
    return base_id if generation == 1 else f"{base_id}-{generation}"


def current_task(tx: FhirTx, base_id: str) -> tuple[int, Stored | None]:
    """The newest Task generation of a job (number, stored version, maybe deleted by a client); (1, None)
    before the first."""
    found: tuple[int, Stored | None] = (1, None)
    for generation in range(1, MAX_GENERATIONS + 1):
        stored = tx.current("Task", generation_id(base_id, generation))
        if stored is None:
            return found
        found = (generation, stored)
    return found


def instant(seconds: float, timespec: str = "milliseconds") -> str:
    """Seconds since the epoch as an ISO 8601 UTC instant (``Z``), e.g. for FHIR instant/dateTime."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec=timespec).replace("+00:00", "Z")


def priority_code(value: int) -> str:
    """The FHIR request priority code of a job priority (``stat`` = emergency)."""
    try:
        return Priority(value).name.lower()
    except ValueError:
        return Priority.ROUTINE.name.lower()


def _param(code: str) -> dict:
    return {"coding": [{"system": PARAMETER_SYSTEM, "code": code}]}


def _party(address: str) -> dict:
    return {"type": "Organization", "identifier": {"system": URI_SYSTEM, "value": f"mailto:{address}"},
            "display": address}


def resource(job: gw.Job, state: TaskState) -> dict:
    """The transfer-task Task of ``job`` in ``state`` (no id, no meta.versionId: the FHIR service stamps them)."""
    selection = json.loads(job.selection) if job.selection else {}
    inputs: list[dict] = []
    if job.recipient_endpoint:
        inputs.append({"type": _param("recipient"), "valueReference": {"reference": job.recipient_endpoint,
                                                                       "display": job.recipient_address}})
    inputs += [{"type": _param("series"), "valueOid": OID_PREFIX + uid} for uid in selection.get("series", [])]
    inputs += [{"type": _param("instance"), "valueOid": OID_PREFIX + uid} for uid in selection.get("instances", [])]
    task: dict = {
        "resourceType": "Task",
        "meta": {"profile": [PROFILE]},
        "identifier": [{"system": JOB_ID_SYSTEM, "value": job.job_id}],
        "status": state.status,
        "businessStatus": {"coding": [{"system": BUSINESS_STATUS_SYSTEM, "code": state.business_status}]},
        "intent": "order",
        "priority": priority_code(job.priority),
        "code": {"coding": [{"system": TASK_CODE_SYSTEM, "code": "fulfill"}]},
        "description": f"DICOM e-mail transfer of study {job.study_uid} to {job.recipient_address}",
        "focus": {"reference": f"ImagingStudy/{job.study_uid}"},
        "authoredOn": instant(job.created),
        "lastModified": instant(job.updated),
        "requester": _party(job.sender_address),
        "owner": _party(job.recipient_address),
        "input": inputs,
        "output": [{"type": _param(code), "valueUnsignedInt": int(getattr(job, name))} for code, name in OUTPUTS],
    }
    if job.order_task:  # an order's transfer: a sub-Task of the order's Task (teleconsult-task)
        task["partOf"] = [{"reference": f"Task/{job.order_task}"}]
    if job.order_ref:
        task["basedOn"] = [{"reference": job.order_ref}]
    if state.status in ("failed", "rejected") or (job.error and state.status != "completed"):
        task["statusReason"] = {"text": job.error or state.business_status}
    return task


def _same(a: dict, b: dict) -> bool:
    keys = ("status", "businessStatus", "statusReason", "output", "input", "priority")
    return all(a.get(k) == b.get(k) for k in keys)


def mirror(fhir: FhirService, tx: FhirTx, job: gw.Job, wanted: TaskState, *, base: str = "") -> str | None:
    """Write the Task versions that bring the job's newest Task to ``wanted`` (a new generation when that Task is
    terminal); nothing when it shows ``wanted`` already. Returns the Task id (None for a job without one)."""
    if job.task_id is None:
        return None
    principal = system_principal(job.tenant)
    generation, stored = current_task(tx, job.task_id)
    old = stored.resource() if stored is not None and not stored.deleted else None
    note = old.get("note") if old else None
    path = steps(old["status"] if old else None, wanted)
    if path is None:  # terminal: the job was retried
        note = [{"text": f"retry of Task/{generation_id(job.task_id, generation)}"}]
        generation, old = generation + 1, None
        path = steps(None, wanted) or [wanted]
    rid = generation_id(job.task_id, generation)
    for state in path:
        new = resource(job, state)
        if note:
            new["note"] = note
        if old is not None and _same(new, old):
            continue
        fhir.update_in(tx, principal, {**new, "id": rid}, None, base)  # creates it (again, if a client deleted it)
        old = new
    return rid


def task_hook(fhir: FhirService, base: str = "", *, strict: bool = False) -> gw.JobHook:
    """The JobHook that mirrors a job on its FHIR Task in the job's transaction (see the module docstring).

    ``strict``: a failing Task write fails the job change (the API's create and actions: the caller hears of
    it). Otherwise (the sender's and the receipts' hook) it runs in a savepoint and is logged: a Task that
    cannot be written never holds up the transfer; the mirror catches up at the job's next step.
    """
    def hook(conn, job: gw.Job) -> None:
        if job.task_id is None:
            return
        if strict:
            _mirror_job(fhir, conn, job, base)
            return
        try:
            with conn.begin_nested():
                _mirror_job(fhir, conn, job, base)
        except ServerError as exc:
            log.error("transfer job %s: its Task %s was not updated: %s", job.job_id, job.task_id, exc.message)
    return hook


def _mirror_job(fhir: FhirService, conn, job: gw.Job, base: str) -> None:
    tx = FhirTx(conn, job.tenant)
    counts = gw.job_counts(conn, job.pk)
    if counts.total == 0:  # deleted (a job always has mails): close an open Task, keep a terminal one
        _, stored = current_task(tx, job.task_id)
        if stored is not None and not stored.deleted and \
                steps(stored.resource().get("status"), CANCELLED) is not None:
            mirror(fhir, tx, job, CANCELLED, base=base)
        return
    state = task_state(job.state, counts)
    mirror(fhir, tx, job, state, base=base)
    if job.order_task:
        follow_order(fhir, tx, job, state, base=base)


#: The order Task (teleconsult-task, status ``requested`` at creation) as its transfer moves: the transfer's
#: status and businessStatus, except that a queued transfer leaves the order ``requested`` and a delivered one
#: leaves it ``in-progress`` with ``delivered`` (waiting for the consultant's reply).
ORDER_BY_TRANSFER: dict[str, TaskState] = {"ready": TaskState("requested", "transfer-queued"),
                                           "completed": TaskState("in-progress", "delivered")}
#: businessStatus codes of an order Task that report the consultant's answer (server.gateway.workflow)
CONSULTANT_CODES = frozenset({"consultant-received", "consultant-accepted", "consultant-working",
                              "consultant-on-hold", "rejected-by-consultant", "cancelled-by-consultant",
                              "consultant-failed", "completed-by-consultant", "report-received"})
#: businessStatus of an order Task's status passed on the way (requested -> accepted -> in-progress ...).
ORDER_INTERMEDIATE: dict[str, str] = {"accepted": "transfer-queued", "in-progress": "transfer-running",
                                      "on-hold": "transfer-paused"}


def order_state(transfer: TaskState) -> TaskState:
    """The order Task's status and businessStatus for its transfer Task's ``transfer`` state."""
    return ORDER_BY_TRANSFER.get(transfer.status, transfer)


def follow_order(fhir: FhirService, tx: FhirTx, job: gw.Job, transfer: TaskState, *, base: str = "") -> None:
    """Move the order's Task (``job.order_task``) along legal transitions to follow its transfer; a terminal or
    deleted order Task (e.g. failed before a retry, cancelled by the EHR) stays as it is."""
    stored = tx.current("Task", job.order_task)
    if stored is None or stored.deleted:
        return
    old = stored.resource()
    wanted = order_state(transfer)
    codes = {c.get("code") for c in (old.get("businessStatus") or {}).get("coding") or ()}
    if wanted.status == "in-progress" and codes & CONSULTANT_CODES:
        return  # the consultant's answer (server.gateway.workflow) arrived before our last receipt: it stands
    path = steps(old.get("status"), wanted, ORDER_INTERMEDIATE)
    if path is None:
        return
    principal = system_principal(job.tenant)
    for state in path:
        new = {k: v for k, v in old.items() if k not in ("meta", "statusReason")}
        new["meta"] = {"profile": (old.get("meta") or {}).get("profile", [])}
        new["status"] = state.status
        new["businessStatus"] = {"coding": [{"system": BUSINESS_STATUS_SYSTEM, "code": state.business_status}]}
        new["lastModified"] = instant(job.updated)
        if state.status in ("failed", "rejected", "cancelled") or (job.error and state.status != "completed"):
            new["statusReason"] = {"text": job.error or state.business_status}
        if all(new.get(k) == old.get(k) for k in ("status", "businessStatus", "statusReason")):
            continue
        fhir.update_in(tx, principal, new, None, base)
        old = new
