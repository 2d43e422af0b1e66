"""Transfer statistics of the DICOM e-mail gateway (pure): period buckets, percentiles, failure reasons, the rows
per period, partner site and direction, and their JSON and CSV (RFC 4180) renderings. No I/O, no SQL.

Decisions:

- Periods are calendar days and months in **Europe/Berlin** (the network's and its operator's calendar; DST
  handled by ``zoneinfo``); ``from``/``to`` are inclusive Berlin calendar days. ``total`` is one bucket.
- A transfer counts in the period in which it began: a sent job at its creation (the order), a received set
  at its first part, a quarantined mail when it was quarantined.
- ``transfers`` are jobs (sent) or DRG sets (received); ``studies`` the distinct Study Instance UIDs among them;
  ``instances`` the mails sent at least once (sent) or the parts received; ``bytes`` the DICOM bytes of those
  (mails sent before migration 0007 have no size and add nothing).
- Durations: sent, from the job's creation to its last receipt (MDN), for finished jobs; received, from the first
  to the last part of a complete set. Median and 95th percentile use the **nearest-rank** method (the value at
  rank ceil(p/100 * n) of the sorted values, so always an observed value; the median of an even count is the
  lower middle value).
- Failures: a sent job in state ``failed`` with a reason code from ``FAILURE_REASONS`` (``aborted`` jobs are
  counted apart); a received set that ended incomplete (``INCOMPLETE_REASONS``). Quarantined mails by their
  quarantine reason (received side).
- Rows with partner ``*`` are the totals of a period and direction over all partners.
"""

from __future__ import annotations

import csv
import enum
import io
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from types import MappingProxyType
from zoneinfo import ZoneInfo

from server.errors import invalid

TIMEZONE = ZoneInfo("Europe/Berlin")
ALL_PARTNERS = "*"
UNKNOWN_PARTNER = ""  # a quarantined mail without a usable sender address


class Period(str, enum.Enum):
    """The bucket size of the statistics."""

    DAY = "day"
    MONTH = "month"
    TOTAL = "total"


class Direction(str, enum.Enum):
    """Which side of the transfers to count."""

    SENT = "sent"
    RECEIVED = "received"
    BOTH = "both"


#: Failure reason codes of a failed sent job, by the first pattern found in the error of its first failed mail
#: (texts of server.store.gateway, server.gateway.sender, server.mail.relay, server.gateway.directory).
FAILURE_REASONS: tuple[tuple[str, re.Pattern[str]], ...] = tuple((code, re.compile(pattern)) for code, pattern in (
    ("refused-by-receiver", r"^receiver refused"),  # a failed MDN (RFC 3798 disposition)
    ("no-receipt", r"^no receipt within"),
    ("instance-missing", r"no longer in the archive|missing from the blob store|cannot read the DICOM file"),
    ("relay-auth", r"\bAUTH\b"),
    ("relay-tls", r"STARTTLS|TLS failed"),
    ("recipient-refused", r"recipients refused|no route for domain|has no domain|^no recipients"),
    ("smtp-refused", r"refused: \d{3}\b"),
    ("timeout", r"timed out"),
    ("directory", r"directory|OpenPGP|fingerprint|DRG profile version|mailto: address|is not active|"
                  r"DICOM e-mail endpoint"),
    ("internal-error", r"^internal error"),
))
OTHER = "other"
_PART_ERROR = re.compile(r"; part \d+: (.*)$", re.S)

#: Failure reason of a received set that did not end complete, by its state (server.store.gateway set states).
INCOMPLETE_REASONS: Mapping[str, str] = MappingProxyType({
    "reported-incomplete": "incomplete",
    "discarded": "discarded",
    "imported": "imported-incomplete",  # an operator imported it without all parts
})
SENT_FAILED, SENT_ABORTED, SENT_FINISHED = "failed", "aborted", "finished"


# ---- parameters ------------------------------------------------------------------------------------------------
def parse_period(value: str | None) -> Period:
    """``day``, ``month`` or ``total`` (absent = month); INVALID otherwise."""
    try:
        return Period((value or Period.MONTH.value).strip().lower())
    except ValueError:
        raise invalid(f"unknown period {value!r} (day, month or total)", parameter="period") from None


def parse_direction(value: str | None) -> Direction:
    """``sent``, ``received`` or ``both`` (absent = both); INVALID otherwise."""
    try:
        return Direction((value or Direction.BOTH.value).strip().lower())
    except ValueError:
        raise invalid(f"unknown direction {value!r} (sent, received or both)", parameter="direction") from None


def parse_day(value: str | None, parameter: str) -> date | None:
    """A calendar day ``YYYY-MM-DD`` (ISO 8601 calendar date), or None when absent."""
    if value is None or value == "":
        return None
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise invalid(f"{parameter} {value!r} is not a date YYYY-MM-DD", parameter=parameter)
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise invalid(f"{parameter} {value!r} is not a date YYYY-MM-DD", parameter=parameter) from None


def bounds(start: date | None, end: date | None, tz: ZoneInfo = TIMEZONE) -> tuple[float | None, float | None]:
    """Epoch seconds [start of ``start``, start of the day after ``end``) in ``tz``: inclusive calendar days."""
    if start is not None and end is not None and end < start:
        raise invalid(f"to {end.isoformat()} is before from {start.isoformat()}", parameter="to")
    lo = datetime(start.year, start.month, start.day, tzinfo=tz).timestamp() if start else None
    after = end + timedelta(days=1) if end else None
    hi = datetime(after.year, after.month, after.day, tzinfo=tz).timestamp() if after else None
    return lo, hi


# ---- pure pieces -----------------------------------------------------------------------------------------------
def bucket(seconds: float, period: Period, tz: ZoneInfo = TIMEZONE) -> str:
    """The period label of an instant: ``YYYY-MM-DD`` (day), ``YYYY-MM`` (month) or ``total``, in ``tz``."""
    if period is Period.TOTAL:
        return Period.TOTAL.value
    local = datetime.fromtimestamp(seconds, tz)
    return local.strftime("%Y-%m-%d" if period is Period.DAY else "%Y-%m")


def percentile(values: Iterable[float], p: float) -> float | None:
    """The ``p``-th percentile (0 < p <= 100) by the nearest-rank method: the value at rank ceil(p/100·n) of the
    sorted values (1-based); None for no values. p=50 is the median (the lower middle value for even n)."""
    if not 0 < p <= 100:
        raise ValueError(f"percentile {p} is not in (0, 100]")
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def failure_reason(error: str | None) -> str:
    """The reason code of a failed job's error text (``N of M mails failed finally; part K: <mail error>``):
    the first matching entry of ``FAILURE_REASONS`` for the mail error, else ``other``."""
    if not error:
        return OTHER
    found = _PART_ERROR.search(error)
    text = found.group(1) if found else error
    return next((code for code, pattern in FAILURE_REASONS if pattern.search(text)), OTHER)


# ---- inputs (read by server.store.gateway_stats) ---------------------------------------------------------------
@dataclass(frozen=True)
class Transfer:
    """A sent job or a received set, as the statistics see it."""

    direction: Direction  # SENT or RECEIVED
    partner: str  # the other site's address (normalized)
    began: float  # job created / first part received
    study: str | None
    state: str  # job state or set state
    instances: int  # mails sent / parts received
    bytes: int
    ended: float | None = None  # last receipt of a finished job / last part of a complete set, else None
    error: str | None = None  # the job's error text
    complete: bool = False  # sent: finished; received: every part in

    @property
    def seconds(self) -> float | None:
        """Order to last receipt (sent) or first to last part (received), for completed transfers."""
        return self.ended - self.began if self.complete and self.ended is not None else None

    @property
    def failure(self) -> str | None:
        """The failure reason code, or None when the transfer did not fail."""
        if self.direction is Direction.SENT:
            return failure_reason(self.error) if self.state == SENT_FAILED else None
        return None if self.complete else INCOMPLETE_REASONS.get(self.state)


@dataclass(frozen=True)
class QuarantinedMail:
    """A mail refused for import."""

    partner: str  # sender address (normalized), UNKNOWN_PARTNER when none
    at: float
    reason: str


# ---- rows ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """The figures of one period, partner (or ``*``: all partners) and direction."""

    period: str
    partner: str
    direction: Direction
    organization: str | None = None
    partners: int = 0
    transfers: int = 0
    studies: int = 0
    instances: int = 0
    bytes: int = 0
    completed: int = 0
    median_seconds: float | None = None
    p95_seconds: float | None = None
    failed: int = 0
    failures: Mapping[str, int] = field(default_factory=dict)
    aborted: int = 0
    quarantined: int = 0
    quarantine: Mapping[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        """The row as JSON (camelCase; seconds to the millisecond)."""
        return {"period": self.period, "partner": self.partner, "organization": self.organization,
                "direction": self.direction.value, "partners": self.partners, "transfers": self.transfers,
                "studies": self.studies, "instances": self.instances, "bytes": self.bytes,
                "completed": self.completed, "medianSeconds": _ms(self.median_seconds),
                "p95Seconds": _ms(self.p95_seconds), "failed": self.failed, "failures": dict(self.failures),
                "aborted": self.aborted, "quarantined": self.quarantined, "quarantine": dict(self.quarantine)}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


@dataclass(frozen=True)
class Report:
    """The statistics of one query: rows per partner and the totals over all partners."""

    period: Period
    direction: Direction
    start: date | None
    end: date | None
    rows: tuple[Row, ...]
    totals: tuple[Row, ...]

    def to_json(self) -> dict:
        """The report as JSON."""
        return {"period": self.period.value, "direction": self.direction.value,
                "from": self.start.isoformat() if self.start else None,
                "to": self.end.isoformat() if self.end else None, "timezone": TIMEZONE.key,
                "rows": [r.to_json() for r in self.rows], "totals": [r.to_json() for r in self.totals]}

    def to_csv(self) -> str:
        """The rows, then the totals, as CSV (RFC 4180, header row): the JSON keys as columns, the reason counts
        flattened to one column per reason present (``failures.<reason>``, ``quarantine.<reason>``)."""
        rows = [r.to_json() for r in (*self.rows, *self.totals)]
        failures = sorted({k for r in rows for k in r["failures"]})
        quarantine = sorted({k for r in rows for k in r["quarantine"]})
        plain = [k for k in ROW_COLUMNS if k not in ("failures", "quarantine")]
        header = plain + [f"failures.{k}" for k in failures] + [f"quarantine.{k}" for k in quarantine]
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(header)
        for r in rows:
            writer.writerow([_cell(r[k]) for k in plain] + [r["failures"].get(k, 0) for k in failures]
                            + [r["quarantine"].get(k, 0) for k in quarantine])
        return out.getvalue()


ROW_COLUMNS = tuple(Row("", "", Direction.SENT).to_json())


def _cell(value: object) -> object:
    return "" if value is None else value


class _Acc:
    """Running figures of one row."""

    def __init__(self) -> None:
        self.partners: set[str] = set()
        self.transfers = self.instances = self.bytes = self.failed = self.aborted = self.quarantined = 0
        self.studies: set[str] = set()
        self.seconds: list[float] = []
        self.failures: dict[str, int] = {}
        self.quarantine: dict[str, int] = {}

    def _partner(self, partner: str) -> None:
        if partner != UNKNOWN_PARTNER:  # a mail without a sender names no partner site
            self.partners.add(partner)

    def add(self, t: Transfer) -> None:
        self._partner(t.partner)
        self.transfers += 1
        if t.study:
            self.studies.add(t.study)
        self.instances += t.instances
        self.bytes += t.bytes
        if t.seconds is not None:
            self.seconds.append(t.seconds)
        reason = t.failure
        if reason is not None:
            self.failed += 1
            self.failures[reason] = self.failures.get(reason, 0) + 1
        if t.direction is Direction.SENT and t.state == SENT_ABORTED:
            self.aborted += 1

    def add_quarantined(self, q: QuarantinedMail) -> None:
        self._partner(q.partner)
        self.quarantined += 1
        self.quarantine[q.reason] = self.quarantine.get(q.reason, 0) + 1

    def row(self, period: str, partner: str, direction: Direction, organization: str | None) -> Row:
        return Row(period=period, partner=partner, direction=direction, organization=organization,
                   partners=len(self.partners), transfers=self.transfers, studies=len(self.studies),
                   instances=self.instances, bytes=self.bytes, completed=len(self.seconds),
                   median_seconds=percentile(self.seconds, 50), p95_seconds=percentile(self.seconds, 95),
                   failed=self.failed, failures=dict(sorted(self.failures.items())), aborted=self.aborted,
                   quarantined=self.quarantined, quarantine=dict(sorted(self.quarantine.items())))


def report(transfers: Iterable[Transfer], quarantined: Iterable[QuarantinedMail], *, period: Period,
           direction: Direction, start: date | None = None, end: date | None = None,
           organizations: Mapping[str, str] | None = None, tz: ZoneInfo = TIMEZONE) -> Report:
    """Aggregate transfers and quarantined mails into rows per (period, partner, direction), sorted by period,
    direction, partner, and totals per (period, direction) over all partners."""
    names = organizations or {}
    per: dict[tuple[str, str, str], _Acc] = {}
    total: dict[tuple[str, str], _Acc] = {}
    labels: dict[int, str] = {}  # by whole UTC hour: Berlin's offsets are whole hours, so are its day starts

    def label(seconds: float) -> str:
        hour = int(seconds // 3600)
        if hour not in labels:
            labels[hour] = bucket(hour * 3600, period, tz)
        return labels[hour]

    for t in transfers:
        key = label(t.began)
        per.setdefault((key, t.direction.value, t.partner), _Acc()).add(t)
        total.setdefault((key, t.direction.value), _Acc()).add(t)
    for q in quarantined:
        key = label(q.at)
        per.setdefault((key, Direction.RECEIVED.value, q.partner), _Acc()).add_quarantined(q)
        total.setdefault((key, Direction.RECEIVED.value), _Acc()).add_quarantined(q)
    rows = tuple(acc.row(p, partner, Direction(d), names.get(partner))
                 for (p, d, partner), acc in sorted(per.items(), key=lambda kv: kv[0]))
    totals = tuple(acc.row(p, ALL_PARTNERS, Direction(d), None) for (p, d), acc in sorted(total.items()))
    return Report(period, direction, start, end, rows, totals)
