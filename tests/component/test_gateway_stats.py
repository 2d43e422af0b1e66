"""Transfer statistics (GET /gateway/statistics) on SQLite and PostgreSQL: jobs to two partners over two months
with known sizes and receipt times, sets from two senders, quarantine reasons -> exact rows (median/p95
nearest-rank, Berlin months); filters (partner by address and Endpoint, from/to, direction, period); CSV equals
JSON; tenants apart; scope and parameter errors."""

from __future__ import annotations

import csv
import io
import itertools
from datetime import datetime, timezone

import pytest

from server.crypto import export_public_key, generate_key
from server.gateway.directory import import_bundle
from server.gateway.jobs import Backoff
from server.store import gateway as gw
from tests.conftest import auth, make_token

A, B = "site-a", "site-b"
BASE = "https://telerad-bridge.de/fhir"
SD = f"{BASE}/StructureDefinition"
BREMEN, OLDENBURG, HAMBURG = "dicom@bremen.example.de", "dicom@oldenburg.example.de", "dicom@hamburg.example.de"
POLICY = Backoff(base=10, factor=2, cap=100, jitter=0.0, max_attempts=3)
OK, REFUSED = ("ok", "automatic-action/MDN-sent-automatically; displayed"), (
    "failed-final", "automatic-action/MDN-sent-automatically; deleted")
_ids = itertools.count(1)


def utc(*args) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()


def mid(mail, job) -> str:
    return f"<{job.set_id}.{mail.set_part}.{next(_ids)}@a.example>"


@pytest.fixture(scope="module")
def bremen_key():
    return generate_key("Bremen <dicom@bremen.example.de>", bits=2048).public()


def _directory(app, key) -> None:
    ext = [{"url": f"{SD}/openpgp-public-key", "valueString": export_public_key(key).decode("ascii")},
           {"url": f"{SD}/openpgp-fingerprint", "valueString": key.fingerprint},
           {"url": f"{SD}/max-mail-size", "valueInteger": 10_000_000},
           {"url": f"{SD}/drg-profile-version", "valueCode": "1.7"}]
    endpoint = {"resourceType": "Endpoint", "id": "bremen-dicom", "meta": {"profile": [f"{SD}/dicom-email-endpoint"]},
                "extension": ext, "status": "active", "name": "DICOM E-Mail Bremen",
                "connectionType": {"system": f"{BASE}/CodeSystem/endpoint-connection-type", "code": "dicom-email"},
                "payloadType": [{"text": "DICOM"}], "managingOrganization": {"reference": "Organization/bremen"},
                "address": f"mailto:{BREMEN}"}
    org = {"resourceType": "Organization", "id": "bremen", "name": "Klinikum Bremen", "active": True}
    import_bundle(app.state.fhir, A, {"resourceType": "Bundle", "type": "collection",
                                      "entry": [{"resource": org}, {"resource": endpoint}]})


def send_job(engine, tenant, to, created, study, sizes, receipts, *, endpoint=None):
    """A job created at ``created``, its mails sent a second later with ``sizes``, then receipts
    (seconds after creation, (outcome, disposition)) per part."""
    gw.create_job(engine, tenant, gw.NewJob(
        study_uid=study, instances=[f"{study}.{i}" for i in range(1, len(sizes) + 1)], recipient_address=to,
        sender_address=f"dicom@{tenant}.example.de", set_id=f"set-{next(_ids)}", recipient_endpoint=endpoint),
        created)
    claimed = sorted(gw.claim_mails(engine, created, limit=100, lease=60, message_id=mid),
                     key=lambda c: c.mail.set_part)
    assert len(claimed) == len(sizes)
    for c, size in zip(claimed, sizes):
        gw.mark_sent(engine, tenant, c.mail.pk, created + 1, size=size)
    for c, (after, (outcome, disposition)) in zip(claimed, receipts):
        assert gw.record_mdn(engine, tenant, c.mail.message_id, outcome, disposition, created + after,
                             policy=POLICY, rand=0.5) == gw.RECORDED


def receive(engine, tenant, sender, set_id, total, study, parts):
    """Parts (seconds, size) of a set from ``sender``."""
    for i, (at, size) in enumerate(parts, start=1):
        gw.add_set_part(engine, tenant, gw.NewPart(set_id=set_id, sender=sender, total=total, set_part=i,
                                                   blob_sha256="0" * 64, study_uid=study, size=size), at)


@pytest.fixture
def world(app, client, bremen_key):
    """site-a: jobs to Bremen (3 in January, 2 of one study) and Oldenburg (1 failed in January, 1 finished on
    1 February Berlin time = 31 January UTC, 1 waiting); sets from Bremen (complete) and Hamburg (one
    incomplete, one complete) in February; quarantined mails; site-b: one job to Bremen."""
    e = app.state.engine
    _directory(app, bremen_key)
    ep = "Endpoint/bremen-dicom"
    send_job(e, A, BREMEN, utc(2026, 1, 10, 10), "1.1", [1000, 2000], [(60, OK), (100, OK)], endpoint=ep)
    send_job(e, A, BREMEN, utc(2026, 1, 11, 10), "1.2", [500], [(300, OK)], endpoint=ep)
    send_job(e, A, BREMEN, utc(2026, 1, 12, 10), "1.1", [700], [(200, OK)], endpoint=ep)
    send_job(e, A, OLDENBURG, utc(2026, 1, 20, 10), "1.4", [800, 900], [(50, OK), (70, REFUSED)])
    send_job(e, A, OLDENBURG, utc(2026, 1, 31, 23, 30), "1.5", [50], [(40, OK)])
    send_job(e, B, BREMEN, utc(2026, 1, 15, 10), "7.1", [123], [(10, OK)])
    gw.create_job(e, A, gw.NewJob(study_uid="1.6", instances=["1.6.1"], recipient_address=OLDENBURG,
                                  sender_address="dicom@site-a.example.de", set_id="waiting"), utc(2026, 2, 3, 10))
    feb10, feb11 = utc(2026, 2, 10, 8), utc(2026, 2, 11, 8)
    receive(e, A, BREMEN, "s1", 3, "2.1", [(feb10, 10), (feb10 + 5, 20), (feb10 + 50, 30)])
    receive(e, A, HAMBURG, "s2", 3, "2.2", [(feb11, 100), (feb11 + 10, 200)])
    assert [s.set_id for s in gw.report_incomplete(e, utc(2026, 2, 12), utc(2026, 2, 12))] == ["s2"]
    receive(e, A, HAMBURG, "s3", 1, "2.3", [(utc(2026, 2, 12, 8), 5)])
    for sender, reason, at in ((HAMBURG, "bad-signature", feb11), (HAMBURG, "bad-signature", feb11 + 1),
                               ("Dicom@Bremen.example.de", "unknown-sender", feb10), (None, "not-encrypted", feb10),
                               (HAMBURG, "tampered", utc(2026, 3, 2, 8))):
        gw.quarantine(e, A, "0" * 64, reason, at, sender=sender)
    return {"a": auth(make_token(app.state.settings, A)), "b": auth(make_token(app.state.settings, B))}


def _row(period, partner, direction, *, organization=None, partners=1, transfers=0, studies=0, instances=0,
         bytes=0, completed=0, median=None, p95=None, failed=0, failures=None, aborted=0, quarantined=0,
         quarantine=None):
    return {"period": period, "partner": partner, "organization": organization, "direction": direction,
            "partners": partners, "transfers": transfers, "studies": studies, "instances": instances,
            "bytes": bytes, "completed": completed, "medianSeconds": median, "p95Seconds": p95, "failed": failed,
            "failures": failures or {}, "aborted": aborted, "quarantined": quarantined,
            "quarantine": quarantine or {}}


BREMEN_JAN = _row("2026-01", BREMEN, "sent", organization="Klinikum Bremen", transfers=3, studies=2, instances=4,
                  bytes=4200, completed=3, median=200, p95=300)
OLDENBURG_JAN = _row("2026-01", OLDENBURG, "sent", transfers=1, studies=1, instances=2, bytes=1700, failed=1,
                     failures={"refused-by-receiver": 1})
UNKNOWN_FEB = _row("2026-02", "", "received", partners=0, quarantined=1, quarantine={"not-encrypted": 1})
BREMEN_FEB = _row("2026-02", BREMEN, "received", organization="Klinikum Bremen", transfers=1, studies=1,
                  instances=3, bytes=60, completed=1, median=50, p95=50, quarantined=1,
                  quarantine={"unknown-sender": 1})
HAMBURG_FEB = _row("2026-02", HAMBURG, "received", transfers=2, studies=2, instances=3, bytes=305, completed=1,
                   median=0, p95=0, failed=1, failures={"incomplete": 1}, quarantined=2,
                   quarantine={"bad-signature": 2})
OLDENBURG_FEB = _row("2026-02", OLDENBURG, "sent", transfers=2, studies=2, instances=1, bytes=50, completed=1,
                     median=40, p95=40)
HAMBURG_MAR = _row("2026-03", HAMBURG, "received", quarantined=1, quarantine={"tampered": 1})


def test_monthly_rows_and_totals(client, world):
    r = client.get("/gateway/statistics", params={"period": "month"}, headers=world["a"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["period"], body["direction"], body["from"], body["to"], body["timezone"]) == (
        "month", "both", None, None, "Europe/Berlin")
    assert body["rows"] == [BREMEN_JAN, OLDENBURG_JAN, UNKNOWN_FEB, BREMEN_FEB, HAMBURG_FEB, OLDENBURG_FEB,
                            HAMBURG_MAR]
    assert body["totals"] == [
        _row("2026-01", "*", "sent", partners=2, transfers=4, studies=3, instances=6, bytes=5900, completed=3,
             median=200, p95=300, failed=1, failures={"refused-by-receiver": 1}),
        _row("2026-02", "*", "received", partners=2, transfers=3, studies=3, instances=6, bytes=365, completed=2,
             median=0, p95=50, failed=1, failures={"incomplete": 1}, quarantined=4,
             quarantine={"bad-signature": 2, "not-encrypted": 1, "unknown-sender": 1}),
        _row("2026-02", "*", "sent", transfers=2, studies=2, instances=1, bytes=50, completed=1, median=40, p95=40),
        _row("2026-03", "*", "received", quarantined=1, quarantine={"tampered": 1}),
    ]


def test_filters(client, world):
    def rows(**params):
        r = client.get("/gateway/statistics", params=params, headers=world["a"])
        assert r.status_code == 200, r.text
        return r.json()["rows"]

    # January in Berlin: the job of 31 January 23:30 UTC is February's
    jan = rows(period="total", **{"from": "2026-01-01", "to": "2026-01-31"}, direction="sent")
    assert jan == [{**BREMEN_JAN, "period": "total"}, {**OLDENBURG_JAN, "period": "total"}]
    assert rows(direction="received") == [UNKNOWN_FEB, BREMEN_FEB, HAMBURG_FEB, HAMBURG_MAR]
    assert rows(partner="Endpoint/bremen-dicom") == [BREMEN_JAN, BREMEN_FEB]
    assert rows(partner="mailto:DICOM@Bremen.example.de", direction="sent") == [BREMEN_JAN]
    assert rows(partner=HAMBURG, **{"to": "2026-02-28"}) == [HAMBURG_FEB]
    assert rows(**{"from": "2026-03-01"}) == [HAMBURG_MAR]
    days = rows(period="day", partner=OLDENBURG)
    assert [(d["period"], d["transfers"], d["completed"]) for d in days] == [
        ("2026-01-20", 1, 0), ("2026-02-01", 1, 1), ("2026-02-03", 1, 0)]


def test_csv_matches_json(client, world):
    h = world["a"]
    body = client.get("/gateway/statistics", headers=h).json()
    for r in (client.get("/gateway/statistics", params={"format": "csv"}, headers=h),
              client.get("/gateway/statistics", headers={**h, "Accept": "text/csv"})):
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        lines = list(csv.DictReader(io.StringIO(r.text)))
        expected = body["rows"] + body["totals"]
        assert len(lines) == len(expected)
        for line, row in zip(lines, expected):
            for key, value in row.items():
                if isinstance(value, dict):
                    continue
                assert line[key] == ("" if value is None else str(value)), key
            for key in ("failures", "quarantine"):
                reasons = {k.split(".", 1)[1] for k in line if k.startswith(f"{key}.")}
                assert {k: int(line[f"{key}.{k}"]) for k in reasons if int(line[f"{key}.{k}"])} == row[key]
    assert client.get("/gateway/statistics", params={"format": "json"},
                      headers={**h, "Accept": "text/csv"}).json() == body


def test_tenants_scope_and_errors(client, world, app):
    b = client.get("/gateway/statistics", headers=world["b"]).json()
    assert [(r["partner"], r["transfers"], r["bytes"], r["medianSeconds"]) for r in b["rows"]] == [
        (BREMEN, 1, 123, 10)]
    assert b["rows"][0]["organization"] is None  # site-b's directory is empty
    no_task = auth(make_token(app.state.settings, A, scope="system/Patient.rs"))
    assert client.get("/gateway/statistics", headers=no_task).status_code == 403
    for params in ({"period": "week"}, {"direction": "up"}, {"from": "2026-13-01"}, {"to": "1.2.2026"},
                   {"from": "2026-02-01", "to": "2026-01-01"}, {"format": "xml"}, {"partner": "bremen"}):
        assert client.get("/gateway/statistics", params=params, headers=world["a"]).status_code == 400, params
    assert client.get("/gateway/statistics", params={"partner": "Endpoint/gone"},
                      headers=world["a"]).json()["rows"] == []
