"""The R4 Task state machine (task.html#statemachine) and the job -> Task mapping (DESIGN.md section 3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.errors import ErrorKind, ServerError
from server.fhir.task import (
    INITIAL_STATUSES,
    STATUSES_BY_BUSINESS_STATUS,
    TASK_STATE_BY_JOB,
    TERMINAL_STATUSES,
    TRANSITIONS,
    JobState,
    TaskStatus,
    check_business_status,
    check_transition,
    task_state_for_job,
)

ALL = [s.value for s in TaskStatus]
ALLOWED = sorted((old, new) for old, nxt in TRANSITIONS.items() for new in nxt)
FORBIDDEN = [
    ("draft", "in-progress"), ("draft", "completed"), ("requested", "in-progress"), ("requested", "completed"),
    ("received", "in-progress"), ("accepted", "completed"), ("ready", "completed"), ("ready", "on-hold"),
    ("in-progress", "ready"), ("in-progress", "requested"), ("on-hold", "completed"), ("completed", "in-progress"),
    ("failed", "in-progress"), ("failed", "ready"), ("cancelled", "requested"), ("rejected", "accepted"),
    ("entered-in-error", "draft"), ("entered-in-error", "completed"),
]
ROOT = Path(__file__).resolve().parents[2]


def test_every_status_has_a_row():
    assert set(TRANSITIONS) == set(ALL)
    assert all(nxt <= set(ALL) for nxt in TRANSITIONS.values())


@pytest.mark.parametrize(("old", "new"), ALLOWED)
def test_allowed_transition(old, new):
    check_transition(old, new)


@pytest.mark.parametrize(("old", "new"), FORBIDDEN)
def test_forbidden_transition_is_a_conflict(old, new):
    assert new not in TRANSITIONS[old]
    with pytest.raises(ServerError) as err:
        check_transition(old, new)
    assert err.value.kind is ErrorKind.CONFLICT
    assert err.value.parameter == "Task.status"
    assert err.value.message.startswith(f"Task.status: {old} -> {new} is not allowed")


@pytest.mark.parametrize("status", ALL)
def test_same_status_is_a_no_op(status):
    check_transition(status, status)


@pytest.mark.parametrize("status", ALL)
def test_entered_in_error_reachable_from_everywhere(status):
    check_transition(status, "entered-in-error")


def test_terminal_states():
    assert TERMINAL_STATUSES == {"completed", "failed", "cancelled", "rejected", "entered-in-error"}


@pytest.mark.parametrize("status", ALL)
def test_creation(status):
    if status in INITIAL_STATUSES:
        check_transition(None, status)
    else:
        with pytest.raises(ServerError) as err:
            check_transition(None, status)
        assert err.value.kind is ErrorKind.CONFLICT


def test_initial_statuses():
    assert INITIAL_STATUSES == {"draft", "requested", "ready"}


def test_unknown_status_is_invalid():
    with pytest.raises(ServerError) as err:
        check_transition("ready", "started")
    assert err.value.kind is ErrorKind.INVALID


# job manager moves (DESIGN.md section 3): start, pause, resume, abort, finish, fail
JOB_MOVES = [("waiting", "active"), ("active", "finished"), ("active", "paused"), ("paused", "active"),
             ("waiting", "aborted"), ("active", "aborted"), ("paused", "aborted"), ("active", "failed")]


@pytest.mark.parametrize(("old", "new"), JOB_MOVES)
def test_job_moves_are_task_transitions(old, new):
    check_transition(task_state_for_job(old).status, task_state_for_job(new).status)


def test_job_creation_state_is_initial():
    check_transition(None, task_state_for_job(JobState.WAITING).status)


@pytest.mark.parametrize("job", list(JobState))
def test_job_mapping_is_consistent(job):
    state = TASK_STATE_BY_JOB[job]
    check_business_status(state.status, state.business_status)


def test_business_status_table_matches_codesystem():
    cs = json.loads((ROOT / "profiles" / "CodeSystem-task-business-status.json").read_text())
    assert {c["code"] for c in cs["concept"]} == set(STATUSES_BY_BUSINESS_STATUS)
    assert all(s <= set(ALL) for s in STATUSES_BY_BUSINESS_STATUS.values())


@pytest.mark.parametrize(("status", "code"), [("ready", "delivered"), ("completed", "transfer-running"),
                                              ("in-progress", "no-such-code")])
def test_business_status_mismatch_is_invalid(status, code):
    with pytest.raises(ServerError) as err:
        check_business_status(status, code)
    assert err.value.kind is ErrorKind.INVALID
    assert err.value.parameter == "Task.businessStatus"
