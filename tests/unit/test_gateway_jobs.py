"""Pure state logic of transfer jobs and instance mails (server/gateway/jobs.py)."""

from __future__ import annotations

import pytest

from server.errors import ErrorKind, ServerError
from server.fhir.task import TASK_STATE_BY_JOB
from server.gateway import jobs as g
from server.gateway.jobs import Action, JobFilter, JobState, MailCounts, MailState
from server.mail.mdn import Disposition, Outcome

W, A, F, P, X, AB = (JobState.WAITING, JobState.ACTIVE, JobState.FINISHED, JobState.PAUSED, JobState.FAILED,
                     JobState.ABORTED)


def test_every_job_state_has_actions_and_a_task_state():
    assert set(g.ACTIONS_BY_STATE) == set(JobState) == set(TASK_STATE_BY_JOB)


@pytest.mark.parametrize("state,allowed", [
    (W, {"pause", "abort"}), (A, {"pause", "abort"}), (P, {"resume", "abort", "delete"}),
    (X, {"retry", "abort", "delete"}), (AB, {"retry", "delete"}), (F, {"delete"}),
])
def test_actions_by_state(state, allowed):
    for action in Action:
        if action.value in allowed:
            g.check_action(state, action)
        else:
            with pytest.raises(ServerError) as e:
                g.check_action(state, action)
            assert e.value.kind is ErrorKind.CONFLICT and action.value in e.value.message


def test_state_after_action():
    c = MailCounts(total=3, queued=1, sent=1, acknowledged=1)
    assert g.state_after_action(A, "pause", c) is P
    assert g.state_after_action(P, "resume", c) is A
    assert g.state_after_action(P, "resume", MailCounts(total=2, queued=2)) is W
    assert g.state_after_action(W, "abort", c) is AB
    assert g.state_after_action(X, "retry", c) is A
    assert g.state_after_action(F, "delete", c) is None
    with pytest.raises(ServerError):
        g.state_after_action(F, "retry", c)


def test_counts_of_states():
    c = MailCounts.of({"queued": 1, "sent": 2, "acknowledged-ok": 3, "acknowledged-warning": 1,
                       "failed-retryable": 4, "failed-final": 5})
    assert c == MailCounts(total=16, queued=1, sent=2, acknowledged=4, failed_retryable=4, failed_final=5)


@pytest.mark.parametrize("current,c,untouched,expected", [
    (W, MailCounts(total=2, queued=2), None, W),
    (W, MailCounts(total=2, queued=1, sent=1), None, A),
    (A, MailCounts(total=2, queued=2), False, A),  # leased mails are still queued but tried
    (A, MailCounts(total=2, acknowledged=2), None, F),
    (A, MailCounts(total=2, acknowledged=1, failed_retryable=1), None, A),
    (A, MailCounts(total=2, acknowledged=1, failed_final=1), None, X),
    (P, MailCounts(total=2, queued=1, acknowledged=1), None, P),
    (P, MailCounts(total=2, acknowledged=2), None, F),  # the last receipt arrived while paused
    (P, MailCounts(total=2, acknowledged=1, failed_final=1), None, X),
    (AB, MailCounts(total=2, acknowledged=2), None, AB),
    (X, MailCounts(total=2, acknowledged=1, failed_final=1), None, X),
])
def test_job_state_from_mails(current, c, untouched, expected):
    state, error = g.job_state(current, c, untouched=untouched)
    assert state is expected
    assert (error is not None) == (expected is X)


def test_failed_reason_counts_mails():
    assert g.job_state(A, MailCounts(total=3, acknowledged=1, failed_final=2))[1] == "2 of 3 mails failed finally"


def test_mdn_outcome_to_mail_state():
    assert {o: g.mail_state_for(o) for o in Outcome} == {
        Outcome.OK: MailState.ACK_OK, Outcome.WARNING: MailState.ACK_WARNING,
        Outcome.FAILED_RETRY: MailState.FAILED_RETRYABLE, Outcome.FAILED_FINAL: MailState.FAILED_FINAL}
    assert g.mail_state_for(Disposition.WARNING.outcome) is MailState.ACK_WARNING
    assert g.mail_state_for("failed-final") is MailState.FAILED_FINAL
    assert g.ACKNOWLEDGED == {MailState.ACK_OK, MailState.ACK_WARNING}


def test_backoff_grows_caps_and_stays_in_jitter_bounds():
    b = g.Backoff(base=10, factor=2, cap=100, jitter=0.25, max_attempts=5)
    assert [b.nominal(n) for n in range(1, 7)] == [10, 20, 40, 80, 100, 100]
    for n in range(1, 7):
        lo, hi = b.bounds(n)
        assert lo == b.nominal(n) * 0.75 and hi == b.nominal(n) * 1.25
        for r in (0.0, 0.3, 0.999999, 1.0, -1, 2):
            assert lo <= b.delay(n, r) <= hi
    assert b.delay(1, 0.0) == 7.5 and b.delay(1, 0.5) == 10
    assert not b.exhausted(4) and b.exhausted(5)


@pytest.mark.parametrize("kw", [{"base": 0}, {"factor": 0.5}, {"cap": 1, "base": 2}, {"jitter": 1},
                                {"max_attempts": 0}])
def test_backoff_refuses_bad_settings(kw):
    with pytest.raises(ServerError):
        g.Backoff(**kw)


def test_after_send_failure_retries_then_dead_letter():
    b = g.Backoff(base=10, factor=2, cap=100, jitter=0.0, max_attempts=3)
    assert g.after_send_failure(1, True, b, 1000.0, 0.5) == (MailState.FAILED_RETRYABLE, 1010.0)
    assert g.after_send_failure(2, True, b, 1000.0, 0.5) == (MailState.FAILED_RETRYABLE, 1020.0)
    assert g.after_send_failure(3, True, b, 1000.0, 0.5) == (MailState.FAILED_FINAL, None)
    assert g.after_send_failure(1, False, b, 1000.0, 0.5) == (MailState.FAILED_FINAL, None)


def test_filters():
    assert g.parse_filter(None) is JobFilter.ALL and g.parse_filter("") is JobFilter.ALL
    assert g.parse_filter(" Failed ") is JobFilter.FAILED
    assert g.STATES_BY_FILTER[JobFilter.ALL] == set(JobState)
    assert g.STATES_BY_FILTER[JobFilter.FAILED] == {X, AB}
    assert set(g.STATES_BY_FILTER) == set(JobFilter)
    assert [f.value for f in JobFilter] == ["all", "active", "waiting", "finished", "paused", "failed"]
    with pytest.raises(ServerError) as e:
        g.parse_filter("done")
    assert e.value.kind is ErrorKind.INVALID and e.value.parameter == "filter"


def test_priority():
    assert g.priority_of(None) is g.Priority.ROUTINE
    assert g.priority_of("stat") > g.priority_of("asap") > g.priority_of("urgent") > g.priority_of("routine")
    with pytest.raises(ServerError):
        g.priority_of("emergency")
