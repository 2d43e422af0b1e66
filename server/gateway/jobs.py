"""Pure state logic of transfer jobs and their instance mails (DESIGN.md sections 3 and 4).

A transfer job sends one DRG mail per DICOM instance (one set, parts 1..N). Each mail moves
``queued`` → ``sent`` → ``acknowledged-ok``/``acknowledged-warning`` (RFC 3798 MDN), or to
``failed-retryable`` (resent after a backoff) and finally ``failed-final``. The job's state follows from its
mails (``job_state``) unless the user holds it (``paused``, ``aborted``). No I/O, no SQL.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from server.errors import ErrorKind, ServerError, invalid
from server.fhir.task import TASK_STATE_BY_JOB, JobState, TaskState
from server.mail.mdn import Outcome

__all__ = ["JobState", "TASK_STATE_BY_JOB", "TaskState", "MailState", "Action", "JobFilter", "Priority",
           "MailCounts", "Backoff", "ACKNOWLEDGED", "DUE", "MAIL_STATE_BY_OUTCOME", "ACTIONS_BY_STATE",
           "STATES_BY_FILTER", "USER_HELD", "SENDING", "check_action", "state_after_action", "job_state",
           "parse_filter", "priority_of", "mail_state_for", "after_send_failure"]


class MailState(str, enum.Enum):
    """The state of one outbound instance mail."""

    QUEUED = "queued"
    SENT = "sent"
    ACK_OK = "acknowledged-ok"
    ACK_WARNING = "acknowledged-warning"
    FAILED_RETRYABLE = "failed-retryable"
    FAILED_FINAL = "failed-final"


#: Mails the receiver has stored (MDN displayed or displayed/warning).
ACKNOWLEDGED = frozenset({MailState.ACK_OK, MailState.ACK_WARNING})
#: Mails a sender worker may lease when their ``run_after`` has come.
DUE = frozenset({MailState.QUEUED, MailState.FAILED_RETRYABLE})

#: What an MDN's outcome (RFC 3798 3.2.6 disposition, DRG meaning in DESIGN.md 4) does to the mail.
MAIL_STATE_BY_OUTCOME: Mapping[Outcome, MailState] = MappingProxyType({
    Outcome.OK: MailState.ACK_OK,
    Outcome.WARNING: MailState.ACK_WARNING,
    Outcome.FAILED_RETRY: MailState.FAILED_RETRYABLE,
    Outcome.FAILED_FINAL: MailState.FAILED_FINAL,
})


def mail_state_for(outcome: Outcome | str) -> MailState:
    """The mail state an MDN outcome leads to."""
    return MAIL_STATE_BY_OUTCOME[Outcome(outcome)]


class Priority(enum.IntEnum):
    """Send order of jobs: higher first (ServiceRequest.priority; ``stat`` = emergency, "Notfall")."""

    ROUTINE = 0
    URGENT = 1
    ASAP = 2
    STAT = 3


_PRIORITY_BY_CODE: Mapping[str, Priority] = MappingProxyType({p.name.lower(): p for p in Priority})


def priority_of(code: str | None) -> Priority:
    """The job priority of a FHIR request priority code (absent = routine); INVALID for unknown codes."""
    if code is None:
        return Priority.ROUTINE
    try:
        return _PRIORITY_BY_CODE[code]
    except KeyError:
        raise invalid(f"unknown priority {code!r} (one of {', '.join(_PRIORITY_BY_CODE)})",
                      parameter="priority") from None


class Action(str, enum.Enum):
    """What a user may do with a transfer job (the seed's job manager)."""

    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    RETRY = "retry"
    DELETE = "delete"


W, A, F, P, X, AB = (JobState.WAITING, JobState.ACTIVE, JobState.FINISHED, JobState.PAUSED, JobState.FAILED,
                     JobState.ABORTED)

#: The actions each job state allows; anything else is a CONFLICT.
ACTIONS_BY_STATE: Mapping[JobState, frozenset[Action]] = MappingProxyType({
    W: frozenset({Action.PAUSE, Action.ABORT}),
    A: frozenset({Action.PAUSE, Action.ABORT}),
    P: frozenset({Action.RESUME, Action.ABORT, Action.DELETE}),
    X: frozenset({Action.RETRY, Action.ABORT, Action.DELETE}),
    AB: frozenset({Action.RETRY, Action.DELETE}),
    F: frozenset({Action.DELETE}),
})

#: States the user holds: mail outcomes do not move a job out of them (except to finished from paused).
USER_HELD = frozenset({P, AB})
#: Job states whose mails are leased for sending.
SENDING = frozenset({W, A})


def check_action(state: JobState | str, action: Action | str) -> None:
    """Refuse an action the job's state does not allow with CONFLICT."""
    state, action = JobState(state), Action(action)
    if action not in ACTIONS_BY_STATE[state]:
        allowed = ", ".join(sorted(a.value for a in ACTIONS_BY_STATE[state])) or "none"
        raise ServerError(ErrorKind.CONFLICT,
                          f"cannot {action.value} a {state.value} transfer job (allowed: {allowed})")


def state_after_action(state: JobState | str, action: Action | str, counts: MailCounts) -> JobState | None:
    """The job state after an allowed action (None: deleted); ``counts`` as they are after the action."""
    check_action(state, action)
    action = Action(action)
    if action is Action.DELETE:
        return None
    if action is Action.PAUSE:
        return P
    if action is Action.ABORT:
        return AB
    return job_state(W, counts)[0]  # resume, retry: back to what the mails say


@dataclass(frozen=True)
class MailCounts:
    """How many mails of a job are in each state."""

    total: int = 0
    queued: int = 0
    sent: int = 0
    acknowledged: int = 0
    failed_retryable: int = 0
    failed_final: int = 0

    @classmethod
    def of(cls, by_state: Mapping[str, int]) -> MailCounts:
        """Counts from a ``{mail state: count}`` mapping."""
        get = lambda *states: sum(by_state.get(MailState(s).value, 0) for s in states)  # noqa: E731
        return cls(total=sum(by_state.values()), queued=get(MailState.QUEUED), sent=get(MailState.SENT),
                   acknowledged=get(*ACKNOWLEDGED), failed_retryable=get(MailState.FAILED_RETRYABLE),
                   failed_final=get(MailState.FAILED_FINAL))


def job_state(current: JobState | str, counts: MailCounts, *,
              untouched: bool | None = None) -> tuple[JobState, str | None]:
    """The job state (and error) its mails imply.

    ``finished`` when every mail is acknowledged; ``failed`` as soon as one mail failed finally (its retries or
    the receipt timeout exhausted, or refused); ``paused``/``aborted`` stay as the user set them; otherwise
    ``waiting`` while no mail has been tried (``untouched``, default: every mail queued) and ``active`` after.
    """
    current = JobState(current)
    if current is AB:
        return AB, None
    if counts.total and counts.acknowledged == counts.total:
        return F, None
    if counts.failed_final:
        n = counts.failed_final
        return X, f"{n} of {counts.total} mail{'s' if counts.total != 1 else ''} failed finally"
    if current is P:
        return P, None
    if untouched is None:
        untouched = counts.queued == counts.total
    return (W if untouched else A), None


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: try n waits ``base·factor^(n-1)`` (≤ ``cap``) ± ``jitter``·delay.

    ``max_attempts`` tries in all (send failures, retryable MDNs and receipt timeouts count alike).
    """

    base: float = 60.0
    factor: float = 2.0
    cap: float = 6 * 3600.0
    jitter: float = 0.2
    max_attempts: int = 8

    def __post_init__(self) -> None:
        if self.base <= 0 or self.factor < 1 or self.cap < self.base or not 0 <= self.jitter < 1 \
                or self.max_attempts < 1:
            raise invalid("bad backoff settings")

    def nominal(self, attempt: int) -> float:
        """The delay after failed try ``attempt`` (1-based) before jitter."""
        return min(self.cap, self.base * self.factor ** max(0, attempt - 1))

    def bounds(self, attempt: int) -> tuple[float, float]:
        """The smallest and largest delay after failed try ``attempt``."""
        d = self.nominal(attempt)
        return d * (1 - self.jitter), d * (1 + self.jitter)

    def delay(self, attempt: int, rand: float) -> float:
        """The delay after failed try ``attempt`` for a uniform ``rand`` in [0, 1) (the caller's randomness)."""
        lo, hi = self.bounds(attempt)
        return lo + (hi - lo) * min(max(rand, 0.0), 1.0)

    def exhausted(self, attempts: int) -> bool:
        """True when ``attempts`` tries used up the budget."""
        return attempts >= self.max_attempts


def after_send_failure(attempts: int, retryable: bool, policy: Backoff, now: float,
                       rand: float) -> tuple[MailState, float | None]:
    """The mail's state and next ``run_after`` after its try number ``attempts`` failed."""
    if not retryable or policy.exhausted(attempts):
        return MailState.FAILED_FINAL, None
    return MailState.FAILED_RETRYABLE, now + policy.delay(attempts, rand)


class JobFilter(str, enum.Enum):
    """The job list filters the network's users know from the seed's job manager."""

    ALL = "all"
    ACTIVE = "active"
    WAITING = "waiting"
    FINISHED = "finished"
    PAUSED = "paused"
    FAILED = "failed"


#: The job states each filter shows (``failed`` includes aborted jobs: both need the user's attention).
STATES_BY_FILTER: Mapping[JobFilter, frozenset[JobState]] = MappingProxyType({
    JobFilter.ALL: frozenset(JobState),
    JobFilter.ACTIVE: frozenset({A}),
    JobFilter.WAITING: frozenset({W}),
    JobFilter.FINISHED: frozenset({F}),
    JobFilter.PAUSED: frozenset({P}),
    JobFilter.FAILED: frozenset({X, AB}),
})


def parse_filter(value: str | None) -> JobFilter:
    """The filter named ``value`` (absent = all); INVALID for unknown names."""
    if value is None or value == "":
        return JobFilter.ALL
    try:
        return JobFilter(value.strip().lower())
    except ValueError:
        raise invalid(f"unknown job filter {value!r} (one of {', '.join(f.value for f in JobFilter)})",
                      parameter="filter") from None
