"""The FHIR R4 Task state machine and its mapping to our transfer jobs (pure core).

FHIR R4 (4.0.1) task.html#statemachine, valueset-task-status.html; DESIGN.md section 3 (transfer job states).

Reading of the R4 diagram encoded in ``TRANSITIONS`` (one edge per arrow; where the diagram is silent, the
narrower choice):

- a Task is created as ``draft``, ``requested`` or ``ready`` (``ready`` "is used in place of
  requested/received/accepted/rejected when request assignment and acceptance is a given", which is the case
  for the transfer sub-Tasks our gateway creates for itself);
- draft -> requested | ready | cancelled; requested -> received | accepted | rejected | cancelled;
  received -> accepted | rejected | cancelled; accepted -> in-progress | cancelled; ready -> in-progress | cancelled;
  in-progress -> on-hold | completed | failed | cancelled; on-hold -> in-progress | failed | cancelled;
- completed, failed, cancelled and rejected are terminal: the only way out is ``entered-in-error``, which is
  reachable from every state and itself final;
- setting the same status again is a no-op and allowed.

A retried transfer therefore gets a new sub-Task (``partOf`` the order's Task): ``failed`` stays final.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from server.errors import ErrorKind, ServerError

BUSINESS_STATUS_SYSTEM = "https://telerad-bridge.de/fhir/CodeSystem/task-business-status"


class TaskStatus(str, enum.Enum):
    """R4 Task.status (valueset-task-status.html, required binding)."""

    DRAFT = "draft"
    REQUESTED = "requested"
    RECEIVED = "received"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    READY = "ready"
    CANCELLED = "cancelled"
    IN_PROGRESS = "in-progress"
    ON_HOLD = "on-hold"
    FAILED = "failed"
    COMPLETED = "completed"
    ENTERED_IN_ERROR = "entered-in-error"


S = TaskStatus
_EIE = S.ENTERED_IN_ERROR.value


def _to(*states: TaskStatus) -> frozenset[str]:
    return frozenset(s.value for s in states) | {_EIE}


#: Allowed next statuses for each Task.status (task.html#statemachine); same-status updates are handled apart.
TRANSITIONS: Mapping[str, frozenset[str]] = MappingProxyType({
    S.DRAFT.value: _to(S.REQUESTED, S.READY, S.CANCELLED),
    S.REQUESTED.value: _to(S.RECEIVED, S.ACCEPTED, S.REJECTED, S.CANCELLED),
    S.RECEIVED.value: _to(S.ACCEPTED, S.REJECTED, S.CANCELLED),
    S.ACCEPTED.value: _to(S.IN_PROGRESS, S.CANCELLED),
    S.READY.value: _to(S.IN_PROGRESS, S.CANCELLED),
    S.IN_PROGRESS.value: _to(S.ON_HOLD, S.COMPLETED, S.FAILED, S.CANCELLED),
    S.ON_HOLD.value: _to(S.IN_PROGRESS, S.FAILED, S.CANCELLED),
    S.COMPLETED.value: _to(),
    S.FAILED.value: _to(),
    S.CANCELLED.value: _to(),
    S.REJECTED.value: _to(),
    S.ENTERED_IN_ERROR.value: frozenset(),
})

#: Statuses a Task may be created with (the diagram's entry points).
INITIAL_STATUSES: frozenset[str] = frozenset({S.DRAFT.value, S.REQUESTED.value, S.READY.value})

#: Statuses with no way out except entered-in-error.
TERMINAL_STATUSES: frozenset[str] = frozenset(s for s, nxt in TRANSITIONS.items() if nxt <= {_EIE})


def check_transition(old: str | None, new: str) -> None:
    """Refuse a Task.status change outside the R4 state machine with CONFLICT (task.html#statemachine)."""
    if new not in TRANSITIONS:
        raise ServerError(ErrorKind.INVALID, f"Task.status: unknown status {new!r}", parameter="Task.status")
    if old is None:
        if new not in INITIAL_STATUSES:
            allowed = ", ".join(sorted(INITIAL_STATUSES))
            raise ServerError(ErrorKind.CONFLICT, f"Task.status: a Task cannot be created as {new} (allowed: {allowed})",
                              parameter="Task.status")
        return
    if old == new:
        return
    if new not in TRANSITIONS.get(old, frozenset()):
        allowed = ", ".join(sorted(TRANSITIONS.get(old, frozenset()))) or "none"
        raise ServerError(ErrorKind.CONFLICT, f"Task.status: {old} -> {new} is not allowed (from {old}: {allowed})",
                          parameter="Task.status")


class JobState(str, enum.Enum):
    """Transfer job states of the gateway's job manager (DESIGN.md section 3)."""

    WAITING = "waiting"
    ACTIVE = "active"
    FINISHED = "finished"
    PAUSED = "paused"
    FAILED = "failed"
    ABORTED = "aborted"


@dataclass(frozen=True)
class TaskState:
    """A transfer sub-Task's Task.status and businessStatus code (our task-business-status CodeSystem)."""

    status: str
    business_status: str


#: How a transfer job's state is shown on its sub-Task (DESIGN.md section 3; task.html#statemachine).
TASK_STATE_BY_JOB: Mapping[JobState, TaskState] = MappingProxyType({
    JobState.WAITING: TaskState(S.READY.value, "transfer-queued"),
    JobState.ACTIVE: TaskState(S.IN_PROGRESS.value, "transfer-running"),
    JobState.PAUSED: TaskState(S.ON_HOLD.value, "transfer-paused"),
    JobState.FINISHED: TaskState(S.COMPLETED.value, "delivered"),
    JobState.FAILED: TaskState(S.FAILED.value, "failed"),
    JobState.ABORTED: TaskState(S.CANCELLED.value, "aborted"),
})

#: The Task.status values each businessStatus code may accompany (finer steps than the job states).
STATUSES_BY_BUSINESS_STATUS: Mapping[str, frozenset[str]] = MappingProxyType({
    "awaiting-study": frozenset({S.REQUESTED.value}),  # an order whose study has not arrived yet
    "transfer-queued": frozenset({S.READY.value, S.REQUESTED.value, S.ACCEPTED.value}),
    "transfer-running": frozenset({S.IN_PROGRESS.value}),
    "transfer-paused": frozenset({S.ON_HOLD.value}),
    "awaiting-receipts": frozenset({S.IN_PROGRESS.value}),
    "failed-retrying": frozenset({S.IN_PROGRESS.value}),
    "delivered": frozenset({S.IN_PROGRESS.value, S.COMPLETED.value}),
    "report-received": frozenset({S.COMPLETED.value}),
    "failed": frozenset({S.FAILED.value}),
    "aborted": frozenset({S.CANCELLED.value}),
    # the consultant's answer on the requesting site's order Task (server.gateway.workflow)
    "consultant-received": frozenset({S.IN_PROGRESS.value}),
    "consultant-accepted": frozenset({S.IN_PROGRESS.value}),
    "consultant-working": frozenset({S.IN_PROGRESS.value}),
    "consultant-on-hold": frozenset({S.IN_PROGRESS.value}),
    "rejected-by-consultant": frozenset({S.FAILED.value}),
    "cancelled-by-consultant": frozenset({S.FAILED.value}),
    "consultant-failed": frozenset({S.FAILED.value}),
    "completed-by-consultant": frozenset({S.COMPLETED.value}),
    # a request for prior images (server.gateway.priors), on both sites' Tasks
    "priors-requested": frozenset({S.REQUESTED.value, S.ACCEPTED.value, S.IN_PROGRESS.value}),
    "awaiting-approval": frozenset({S.REQUESTED.value, S.ACCEPTED.value}),  # accepted: the approval being stored
    "priors-none": frozenset({S.READY.value, S.COMPLETED.value}),
    "priors-sending": frozenset({S.READY.value, S.ACCEPTED.value, S.IN_PROGRESS.value}),
    "priors-received": frozenset({S.IN_PROGRESS.value, S.COMPLETED.value}),
})


def task_state_for_job(job_state: JobState | str) -> TaskState:
    """The sub-Task status/businessStatus that mirrors a transfer job state (DESIGN.md section 3)."""
    return TASK_STATE_BY_JOB[JobState(job_state)]


def check_business_status(status: str, business_status: str) -> None:
    """Refuse a businessStatus code that contradicts Task.status with INVALID (task.html, Task.businessStatus)."""
    allowed = STATUSES_BY_BUSINESS_STATUS.get(business_status)
    if allowed is None:
        raise ServerError(ErrorKind.INVALID, f"Task.businessStatus: unknown code {business_status!r}",
                          parameter="Task.businessStatus")
    if status not in allowed:
        raise ServerError(ErrorKind.INVALID,
                          f"Task.businessStatus: {business_status} does not fit status {status}",
                          parameter="Task.businessStatus")
