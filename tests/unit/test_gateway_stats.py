"""The pure core of the transfer statistics (server/gateway/stats.py): percentiles, Berlin buckets, date bounds,
failure reasons, aggregation and the CSV rendering."""

from __future__ import annotations

import csv
import io
from datetime import date, datetime, timezone

import pytest

from server.errors import ServerError
from server.gateway.stats import (ALL_PARTNERS, Direction, Period, QuarantinedMail, Transfer, bounds, bucket,
                                  failure_reason, parse_day, parse_direction, parse_period, percentile, report)


def utc(*args) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize("values, p, expected", [
    ([], 50, None),
    ([7], 50, 7), ([7], 95, 7),
    ([1, 2, 3, 4], 50, 2),  # nearest rank: ceil(0.5*4) = 2 -> the lower middle value
    ([4, 3, 2, 1, 5], 50, 3),
    (list(range(1, 21)), 95, 19),  # ceil(0.95*20) = 19
    (list(range(1, 22)), 95, 20),  # ceil(0.95*21) = 20
    (list(range(1, 101)), 95, 95),
    ([10, 20], 100, 20),
])
def test_percentile_nearest_rank(values, p, expected):
    assert percentile(values, p) == expected


def test_percentile_range():
    with pytest.raises(ValueError):
        percentile([1], 0)


@pytest.mark.parametrize("instant, period, label", [
    (utc(2026, 1, 31, 22, 59, 59), Period.MONTH, "2026-01"),  # 23:59:59 CET
    (utc(2026, 1, 31, 23, 0, 0), Period.MONTH, "2026-02"),  # midnight CET
    (utc(2026, 6, 30, 22, 0, 0), Period.MONTH, "2026-07"),  # midnight CEST
    (utc(2026, 6, 30, 21, 59, 59), Period.DAY, "2026-06-30"),
    (utc(2026, 3, 29, 0, 30), Period.DAY, "2026-03-29"),  # DST starts that night
    (utc(2026, 1, 1), Period.TOTAL, "total"),
])
def test_buckets_are_berlin_calendar(instant, period, label):
    assert bucket(instant, period) == label


def test_bounds_are_inclusive_berlin_days():
    assert bounds(date(2026, 1, 1), date(2026, 1, 31)) == (utc(2025, 12, 31, 23), utc(2026, 1, 31, 23))
    assert bounds(date(2026, 7, 1), None) == (utc(2026, 6, 30, 22), None)
    assert bounds(None, None) == (None, None)
    with pytest.raises(ServerError):
        bounds(date(2026, 2, 1), date(2026, 1, 1))


@pytest.mark.parametrize("value", ["2026-1-01", "01.02.2026", "2026-02-30", "x"])
def test_bad_days(value):
    with pytest.raises(ServerError) as e:
        parse_day(value, "from")
    assert e.value.parameter == "from"


def test_parameters():
    assert parse_day("2026-02-28", "to") == date(2026, 2, 28) and parse_day(None, "to") is None
    assert parse_period(None) is Period.MONTH and parse_period("DAY") is Period.DAY
    assert parse_direction(None) is Direction.BOTH and parse_direction("sent") is Direction.SENT
    for fn, bad in ((parse_period, "week"), (parse_direction, "up")):
        with pytest.raises(ServerError):
            fn(bad)


@pytest.mark.parametrize("error, reason", [
    ("1 of 3 mails failed finally; part 2: receiver refused (automatic-action/MDN-sent-automatically; failed)",
     "refused-by-receiver"),
    ("2 of 2 mails failed finally; part 1: no receipt within 86400 s after 8 tries", "no-receipt"),
    ("1 of 1 mail failed finally; part 1: instance 1.2.3 is no longer in the archive (study 1.2)", "instance-missing"),
    ("1 of 1 mail failed finally; part 1: smtp.example: AUTH refused: 535 bad credentials", "relay-auth"),
    ("1 of 1 mail failed finally; part 1: mx.example: recipients refused", "recipient-refused"),
    ("1 of 1 mail failed finally; part 1: mx.example: DATA refused: 552 too big", "smtp-refused"),
    ("1 of 1 mail failed finally; part 1: Endpoint/x: the OpenPGP key cannot be used: expired", "directory"),
    ("1 of 1 mail failed finally; part 1: internal error (incident abc, see the server log)", "internal-error"),
    ("1 of 1 mail failed finally; part 1: something new", "other"),
    ("1 of 1 mail failed finally", "other"),
    (None, "other"),
])
def test_failure_reasons(error, reason):
    assert failure_reason(error) == reason


def _sent(partner, began, *, secs=None, state="finished", study="1.2", n=2, size=100, error=None):
    return Transfer(Direction.SENT, partner, began, study, state, n, size,
                    ended=None if secs is None else began + secs, error=error, complete=state == "finished")


def test_report_rows_totals_and_csv():
    jan, feb = utc(2026, 1, 10, 12), utc(2026, 2, 10, 12)
    transfers = [
        _sent("a@x", jan, secs=10), _sent("a@x", jan + 1, secs=30, study="1.3"), _sent("a@x", jan + 2, secs=20),
        _sent("b@x", jan, state="failed", error="1 of 2 mails failed finally; part 1: no receipt within 5 s"),
        _sent("b@x", feb, state="aborted"),
        Transfer(Direction.RECEIVED, "c@x", feb, "9.9", "imported", 3, 300, ended=feb + 4, complete=True),
        Transfer(Direction.RECEIVED, "c@x", feb, "9.8", "reported-incomplete", 1, 50, ended=feb),
    ]
    quarantined = [QuarantinedMail("c@x", feb, "bad-signature"), QuarantinedMail("", feb, "not-encrypted")]
    r = report(transfers, quarantined, period=Period.MONTH, direction=Direction.BOTH,
               organizations={"a@x": "Klinik A"})
    rows = {(x.period, x.direction.value, x.partner): x for x in r.rows}
    assert sorted(rows) == [("2026-01", "sent", "a@x"), ("2026-01", "sent", "b@x"), ("2026-02", "received", ""),
                            ("2026-02", "received", "c@x"), ("2026-02", "sent", "b@x")]
    a = rows[("2026-01", "sent", "a@x")]
    assert (a.organization, a.transfers, a.studies, a.instances, a.bytes, a.completed) == ("Klinik A", 3, 2, 6, 300, 3)
    assert (a.median_seconds, a.p95_seconds, a.failed) == (20, 30, 0)
    b = rows[("2026-01", "sent", "b@x")]
    assert (b.failed, dict(b.failures), b.completed, b.median_seconds) == (1, {"no-receipt": 1}, 0, None)
    assert rows[("2026-02", "sent", "b@x")].aborted == 1
    c = rows[("2026-02", "received", "c@x")]
    assert (c.transfers, c.studies, c.instances, c.bytes, c.median_seconds, c.failed, dict(c.failures)) == (
        2, 2, 4, 350, 4, 1, {"incomplete": 1})
    assert (c.quarantined, dict(c.quarantine)) == (1, {"bad-signature": 1})
    totals = {(x.period, x.direction.value): x for x in r.totals}
    jan_sent = totals[("2026-01", "sent")]
    assert (jan_sent.partner, jan_sent.partners, jan_sent.transfers, jan_sent.studies, jan_sent.failed) == (
        ALL_PARTNERS, 2, 4, 2, 1)
    assert totals[("2026-02", "received")].quarantined == 2

    parsed = list(csv.DictReader(io.StringIO(r.to_csv())))
    body = r.to_json()
    assert len(parsed) == len(body["rows"]) + len(body["totals"])
    for line, row in zip(parsed, body["rows"] + body["totals"]):
        assert (line["period"], line["partner"], line["direction"]) == (row["period"], row["partner"],
                                                                         row["direction"])
        assert int(line["bytes"]) == row["bytes"] and int(line["failures.no-receipt"]) == row["failures"].get(
            "no-receipt", 0)
        assert line["medianSeconds"] == ("" if row["medianSeconds"] is None else str(row["medianSeconds"]))
    assert list(csv.reader(io.StringIO(r.to_csv())))[0][-3:] == [
        "failures.no-receipt", "quarantine.bad-signature", "quarantine.not-encrypted"]
