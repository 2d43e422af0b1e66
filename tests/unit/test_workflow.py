"""The teleconsult reply channel's pure helpers (issue 5): order identifiers, Task status reports and their checks,
the priors request and its answers, the re-link of a reply to the real patient and study, and the code tables
(server/gateway/workflow.py, server/gateway/priors.py, server/dicom/deidentify.py)."""

from __future__ import annotations

import ast
import base64
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage

from server.dicom.deidentify import Options, Pseudonymizer, relink
from server.dicom.encapsulate import ENCAPSULATED_PDF_STORAGE, encapsulated_pdf, extract_pdf, study_context_from
from server.errors import ErrorKind, ServerError
from server.fhir.model import parse_resource
from server.fhir.task import STATUSES_BY_BUSINESS_STATUS, TRANSITIONS, TaskState
from server.gateway import priors, workflow
from server.gateway.priors import (DCM, FOUND, MODALITY_EXTENSION, _da, for_a, found_output, found_uids,
                                   is_prior_request, modalities_of, parse_request, request_resource)
from server.gateway.tasks import ORDER_INTERMEDIATE, steps
from server.gateway.workflow import (CONSULT_KIND_SYSTEM, CONSULT_TASK_SYSTEM, ORDER_BY_CONSULT, ORDER_SYSTEM,
                                     REPORT_RECEIVED, SET_SYSTEM, diagnostic_report, is_legacy, is_priors,
                                     order_identifier_of, parse_report, pseudonym_map, reported_order,
                                     split_order_identifier, status_report)
from tests.dicomdata import make_instance
from tests.unit.test_dicom_kos import build_kos

A, B = "dicom@site-a.example", "dicom@site-b.example"
ROOT = Path(__file__).resolve().parents[2]
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n% Befund\n%%EOF\n"


def invalid(fn, *args, **kw) -> ServerError:
    with pytest.raises(ServerError) as info:
        fn(*args, **kw)
    assert info.value.kind is ErrorKind.INVALID
    return info.value


# ---- order identifiers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [
    (f"sr-1@{A}", ("sr-1", A)),
    ("SR-1@DICOM@Site-A.Example", ("SR-1", A)),  # the id keeps its case, the address is compared case-blind
    (f"sr-1@<{A}>", ("sr-1", A)),
    (f"sr-1@mailto:{A}", ("sr-1", A)),
    (f"sr-1@ {A} ", ("sr-1", A)),
    (f"a-b.c_d@{B}", ("a-b.c_d", B)),
    ("sr-1", None),  # no @ at all
    ("", None),
    (f"@{A}", None),  # empty id
    ("sr-1@", None),  # empty address
    ("sr-1@site-a.example", None),  # the rest is no mail address
    (None, None),
    (17, None),
    (["sr-1@" + A], None),
    ("x" * 500 + "@" + A, None),  # longer than 512 characters
])
def test_split_order_identifier(value, expected):
    assert split_order_identifier(value) == expected


def test_split_order_identifier_length_limit_is_inclusive():
    rid = "x" * (512 - len(A) - 1)
    assert split_order_identifier(f"{rid}@{A}") == (rid, A)
    assert split_order_identifier(f"{rid}x@{A}") is None


@pytest.mark.parametrize("resource, system, expected", [
    ({"identifier": [{"system": ORDER_SYSTEM, "value": "o1"}]}, ORDER_SYSTEM, "o1"),
    ({"identifier": [{"system": "urn:x", "value": "no"}, {"system": ORDER_SYSTEM, "value": "o2"},
                     {"system": ORDER_SYSTEM, "value": "o3"}]}, ORDER_SYSTEM, "o2"),  # the first in the system
    ({"identifier": [{"system": ORDER_SYSTEM, "value": 5}, {"system": ORDER_SYSTEM, "value": "o4"}]},
     ORDER_SYSTEM, "o4"),  # a non-string value is skipped
    ({"identifier": ["junk", None, {"system": ORDER_SYSTEM}]}, ORDER_SYSTEM, None),
    ({"identifier": [{"system": SET_SYSTEM, "value": "s1@x"}]}, ORDER_SYSTEM, None),
    ({"identifier": [{"system": SET_SYSTEM, "value": "s1@x"}]}, SET_SYSTEM, "s1@x"),
    ({"identifier": None}, ORDER_SYSTEM, None),
    ({}, ORDER_SYSTEM, None),
])
def test_order_identifier_of(resource, system, expected):
    assert order_identifier_of(resource, system) == expected


def _kind(code, system=CONSULT_KIND_SYSTEM):
    return {"code": {"coding": [{"system": system, "code": code}]}}


@pytest.mark.parametrize("sr, expected", [
    (_kind("prior-request"), True),
    ({"code": {"coding": [{"system": CONSULT_KIND_SYSTEM, "code": "teleconsult"}, "junk",
                          {"system": CONSULT_KIND_SYSTEM, "code": "prior-request"}]}}, True),
    (_kind("teleconsult"), False),
    (_kind("prior-request", "urn:other"), False),
    ({"code": None}, False),
    ({}, False),
])
def test_is_priors(sr, expected):
    assert is_priors(sr) is expected


@pytest.mark.parametrize("identifiers, expected", [
    ([{"system": ORDER_SYSTEM, "value": f"s1@{A}"}, {"system": SET_SYSTEM, "value": f"s1@{A}"}], True),
    ([{"system": ORDER_SYSTEM, "value": f"sr-1@{A}"}, {"system": SET_SYSTEM, "value": f"s1@{A}"}], False),
    ([{"system": ORDER_SYSTEM, "value": f"sr-1@{A}"}], False),  # an order.json came: no set identifier
    ([{"system": SET_SYSTEM, "value": f"s1@{A}"}], False),
    ([], False),
])
def test_is_legacy(identifiers, expected):
    assert is_legacy({"identifier": identifiers}) is expected


# ---- status reports ------------------------------------------------------------------------------------------
CONSULT_TASK = {
    "resourceType": "Task", "id": "t-b-1", "meta": {"profile": [workflow.TASK_PROFILE], "versionId": "3"},
    "status": "rejected", "intent": "order", "priority": "urgent",
    "statusReason": {"text": "Bildqualität unzureichend"},
    "businessStatus": {"coding": [{"system": "urn:b", "code": "b-step"}]},
    "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]},
    "description": "Telekonsil für Müller, Jürgen *01.01.1960",
    "for": {"reference": "Patient/p-b", "display": "Müller, Jürgen"},
    "subject": {"reference": "Patient/p-b"},
    "focus": {"reference": "ServiceRequest/sr-b"},
    "basedOn": [{"reference": "ServiceRequest/sr-b"}],
    "input": [{"type": {"text": "study"}, "valueReference": {"reference": "ImagingStudy/1.2.3",
                                                              "display": "PID-4711"}}],
    "requester": {"reference": "Organization/site-a", "display": "Klinikum A"},
    "owner": {"reference": "Practitioner/dr-b", "display": "  Dr. B. Berger  "},
    "authoredOn": "2026-11-23T10:00:00Z", "lastModified": "2026-11-23T11:00:00+01:00",
    "note": [{"text": "  Bitte neu schicken  ", "authorString": "Müller"}, {"text": "   "}, "junk",
             {"text": "x" * 1500}, {"time": "2026-11-23T10:00:00Z"}],
}


def test_status_report_carries_the_state_and_never_patient_data():
    report = status_report(CONSULT_TASK, order=f"sr-a@{A}", site_address=B)
    assert set(report) == {"resourceType", "identifier", "basedOn", "status", "intent", "priority", "lastModified",
                           "statusReason", "businessStatus", "code", "note", "owner"}
    assert report["identifier"] == [{"system": CONSULT_TASK_SYSTEM, "value": f"t-b-1@{B}"}]
    assert report["basedOn"] == [{"type": "ServiceRequest", "identifier": {"system": ORDER_SYSTEM,
                                                                           "value": f"sr-a@{A}"}}]
    assert (report["status"], report["intent"], report["priority"]) == ("rejected", "order", "urgent")
    assert report["statusReason"] == {"text": "Bildqualität unzureichend"}
    assert report["businessStatus"] == CONSULT_TASK["businessStatus"]
    assert report["lastModified"] == "2026-11-23T11:00:00+01:00"
    assert report["note"] == [{"text": "Bitte neu schicken"}, {"text": "x" * workflow.MAX_TEXT}]
    assert report["owner"] == {"display": "Dr. B. Berger"}  # no reference into B's server
    text = json.dumps(report, ensure_ascii=False)
    for secret in ("Patient/", "Müller", "PID-4711", "1960", "ImagingStudy", "sr-b", "Organization/"):
        assert secret not in text, secret
    parse_resource(report)  # a structurally valid R4 Task


@pytest.mark.parametrize("task, key, expected", [
    ({"id": "t"}, "intent", "order"),
    ({"id": "t"}, "priority", "routine"),
    ({"id": "t", "statusReason": "text, not a CodeableConcept"}, "statusReason", None),
    ({"id": "t", "owner": {"reference": "Practitioner/x"}}, "owner", None),
    ({"id": "t", "owner": {"display": "   "}}, "owner", None),
    ({"id": "t", "note": [{"text": ""}]}, "note", None),
    ({"id": "t", "note": None}, "note", None),
])
def test_status_report_defaults_and_drops(task, key, expected):
    report = status_report({"status": "accepted", **task}, order=f"o@{A}", site_address=B)
    assert report.get(key) == expected
    assert report["lastModified"]  # always set (now when the Task has none)


def test_status_report_outputs_and_round_trip_through_parse_report():
    outputs = [{"type": {"text": "report"}, "valueReference": {
        "type": "DiagnosticReport", "identifier": {"system": "urn:dicom:uid", "value": "urn:oid:2.25.1"},
        "display": "Befund"}}]
    report = status_report({"id": "t", "status": "completed", "intent": "order"}, order=f"o@{A}", site_address=B,
                           outputs=outputs)
    assert report["output"] == outputs
    assert "output" not in status_report({"id": "t", "status": "completed"}, order=f"o@{A}", site_address=B,
                                         outputs=[])
    data = json.dumps(report, ensure_ascii=False).encode("utf-8")
    assert parse_report(data) == report
    assert reported_order(parse_report(data), A) == "o"


# ---- parse_report --------------------------------------------------------------------------------------------
GOOD_TASK = {"resourceType": "Task", "status": "accepted", "intent": "order"}


@pytest.mark.parametrize("data", [
    b"", b"not json", b"{", b"\xff\xfe\x00", "{\"a\": \"\udcff\"}".encode("utf-8", "surrogatepass"),
    b"[]", json.dumps([GOOD_TASK]).encode(), b"\"Task\"", b"42", b"null",
    json.dumps({"resourceType": "Patient", "name": [{"family": "Müller"}]}).encode(),
    json.dumps({"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "x"}}).encode(),
    json.dumps({"status": "accepted", "intent": "order"}).encode(),  # no resourceType
    json.dumps({"resourceType": "Task", "intent": "order"}).encode(),  # status missing (1..1)
    json.dumps({"resourceType": "Task", "status": "accepted"}).encode(),  # intent missing (1..1)
    json.dumps({**GOOD_TASK, "unknownElement": 1}).encode(),
    json.dumps({**GOOD_TASK, "note": "a string, not Annotations"}).encode(),
    json.dumps({**GOOD_TASK, "basedOn": {"reference": "x"}}).encode(),  # not a list
    json.dumps({"resourceType": "ServiceRequest", "status": "active"}).encode(),  # intent missing
], ids=lambda d: repr(d[:40]))
def test_parse_report_refuses(data):
    invalid(parse_report, data)


@pytest.mark.parametrize("resource", [
    GOOD_TASK,
    {**GOOD_TASK, "note": [{"text": "Übernommen"}], "statusReason": {"text": "x"}},
    {"resourceType": "ServiceRequest", "status": "active", "intent": "order"},  # subject stands in for the check
])
def test_parse_report_accepts_and_returns_the_resource_unchanged(resource):
    data = json.dumps(resource, ensure_ascii=False).encode("utf-8")
    assert parse_report(data) == resource
    assert parse_report(b"\xef\xbb\xbf" + data) == resource  # a UTF-8 BOM is tolerated


# ---- reported_order ------------------------------------------------------------------------------------------
def _report(*based_on):
    return {**GOOD_TASK, "basedOn": list(based_on)}


def _by_ident(value, system=ORDER_SYSTEM):
    return {"type": "ServiceRequest", "identifier": {"system": system, "value": value}}


@pytest.mark.parametrize("report, expected", [
    (_report(_by_ident(f"sr-1@{A}")), "sr-1"),
    (_report(_by_ident("sr-1@DICOM@SITE-A.example")), "sr-1"),
    (_report(_by_ident(f"sr-1@<{A}>")), "sr-1"),
    (_report({"reference": "ServiceRequest/x"}, _by_ident("x", "urn:other"), _by_ident(f"sr-2@{A}")), "sr-2"),
])
def test_reported_order_names_our_order(report, expected):
    assert reported_order(report, A) == expected
    assert reported_order(report, A.upper()) == expected  # our address in any case


@pytest.mark.parametrize("report", [
    _report(_by_ident(f"sr-1@{B}")),  # another site's order
    _report(_by_ident("sr-1@dicom@site-a.example.evil")),
    _report(_by_ident(f"@{A}")),  # empty id
    _report(_by_ident("sr-1@@")),  # no address after the id
    _report(_by_ident("sr-1")),
    _report(_by_ident(None)),
    _report(_by_ident(f"sr-1@{B}"), _by_ident(f"sr-1@{A}")),  # the first order identifier decides
    _report({"reference": "ServiceRequest/sr-1"}),  # a literal reference means nothing at A
    _report(_by_ident(f"sr-1@{A}", "urn:other")),
    _report(None, "junk"),
    _report(),
    GOOD_TASK,
])
def test_reported_order_refuses(report):
    invalid(reported_order, report, A)


# ---- ORDER_BY_CONSULT and the business status codes -----------------------------------------------------------
R4_STATUSES = set(TRANSITIONS)


def _codesystem() -> set[str]:
    data = json.loads((ROOT / "profiles" / "CodeSystem-task-business-status.json").read_text("utf-8"))

    def codes(concepts):
        for c in concepts:
            yield c["code"]
            yield from codes(c.get("concept", ()))
    return set(codes(data["concept"]))


def _states() -> list[TaskState]:
    return [*ORDER_BY_CONSULT.values(), REPORT_RECEIVED, *priors.ORDER_BY_PRIORS.values()]


@pytest.mark.parametrize("consult_status", sorted(ORDER_BY_CONSULT))
def test_order_by_consult_yields_legal_states(consult_status):
    assert consult_status in R4_STATUSES
    state = ORDER_BY_CONSULT[consult_status]
    assert state.status in R4_STATUSES
    assert state.status in STATUSES_BY_BUSINESS_STATUS[state.business_status]
    # A's order Task reaches it from where it stands while the consult runs
    for current in ("requested", "accepted", "in-progress", "on-hold"):
        assert steps(current, state, ORDER_INTERMEDIATE) is not None, (current, state)


def test_reported_statuses_and_reasons():
    assert workflow.REPORTED == set(ORDER_BY_CONSULT) - {"completed"}
    assert set(workflow.REASON_TEXT) == {s for s, t in ORDER_BY_CONSULT.items() if t.status == "failed"}
    assert REPORT_RECEIVED == TaskState("completed", "report-received")


def test_every_state_of_workflow_and_priors_is_allowed_by_the_task_table():
    for state in _states():
        assert state.status in STATUSES_BY_BUSINESS_STATUS[state.business_status], state
    for status, code in ORDER_INTERMEDIATE.items():
        assert status in STATUSES_BY_BUSINESS_STATUS[code]


def _business_codes_in_source() -> set[str]:
    """Every string literal that names a business status in workflow.py and priors.py (and messages.py, where
    the report helpers may live): TaskState(...) arguments and the priors constants."""
    found = set()
    for name in ("workflow.py", "priors.py", "messages.py"):
        path = ROOT / "server" / "gateway" / name
        if not path.exists():
            continue
        tree = ast.parse(path.read_text("utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "TaskState" and len(node.args) == 2:
                arg = node.args[1]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.add(arg.value)
    return found | {priors.REQUESTED, priors.AWAITING_APPROVAL, priors.SENDING, priors.NONE, priors.RECEIVED}


def test_every_business_status_used_is_in_the_codesystem_and_the_task_table():
    used = _business_codes_in_source() | {s.business_status for s in _states()} | set(ORDER_INTERMEDIATE.values())
    assert len(used) >= 15
    missing = used - _codesystem()
    assert not missing, missing
    assert used <= set(STATUSES_BY_BUSINESS_STATUS)


# ---- diagnostic_report ---------------------------------------------------------------------------------------
def test_diagnostic_report_with_pdf():
    dr = diagnostic_report(sop_uid="2.25.7", title="Telekonsil-Befund", pdf=PDF, request="ServiceRequest/sr-1",
                           subject={"reference": "Patient/p1"}, study_uid="1.2.3", performer={"display": "Dr. B"},
                           issued="2026-11-23T12:00:00Z")
    assert dr["identifier"] == [{"system": "urn:dicom:uid", "value": "urn:oid:2.25.7"}]
    assert dr["basedOn"] == [{"reference": "ServiceRequest/sr-1"}] and dr["subject"] == {"reference": "Patient/p1"}
    assert dr["imagingStudy"] == [{"reference": "ImagingStudy/1.2.3"}] and dr["performer"] == [{"display": "Dr. B"}]
    [form] = dr["presentedForm"]
    assert base64.b64decode(form["data"]) == PDF and form["size"] == len(PDF)
    assert form["contentType"] == "application/pdf" and form["title"] == "Telekonsil-Befund"
    assert "conclusion" not in dr and dr["status"] == "final"
    parse_resource(dr)


def test_diagnostic_report_of_an_sr_has_no_pdf_but_a_conclusion():
    dr = diagnostic_report(sop_uid="2.25.8", title="SR", pdf=None, request="ServiceRequest/sr-1", subject=None,
                           study_uid="1.2.3", performer=None, issued="2026-11-23T12:00:00Z", conclusion="im SR")
    assert "presentedForm" not in dr and "subject" not in dr and "performer" not in dr
    assert dr["conclusion"] == "im SR"
    parse_resource(dr)


# ---- priors: pure helpers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, end, expected", [
    ("2020", False, "20200101"),
    ("2020", True, "20201231"),
    ("2020-02", False, "20200201"),
    ("2020-02", True, "20200231"),  # an upper bound for string comparison of DA values, not a calendar date
    ("2020-02-14", False, "20200214"),
    ("2020-02-14", True, "20200214"),
    ("2020-02-14T23:59:59+01:00", False, "20200214"),
    ("2020-02-14T00:00:00Z", True, "20200214"),
    ("", False, None),
    ("20", False, None),
    ("abcd-01-01", False, None),
    (None, False, None),
    (2020, False, None),
])
def test_da(value, end, expected):
    assert _da(value, end) == expected


def test_da_month_end_bound_keeps_every_day_of_the_month():
    upper = _da("2020-02", end=True)
    assert all(f"202002{d:02d}" <= upper for d in range(1, 30))
    assert "20200301" > upper


def _mod(code, system=DCM):
    return {"url": MODALITY_EXTENSION, "valueCoding": {"system": system, "code": code}}


@pytest.mark.parametrize("extensions, expected", [
    ([_mod("CT"), _mod("mr")], ["CT", "MR"]),
    ([_mod("CT", "urn:other"), _mod("C T"), _mod("X" * 17), _mod(5), _mod("")], []),
    ([{"url": "urn:other", "valueCoding": {"system": DCM, "code": "CT"}}, "junk", {"url": MODALITY_EXTENSION}], []),
    ([], []),
])
def test_modalities_of(extensions, expected):
    assert modalities_of({"extension": extensions}) == expected


PRIOR_SR = {"resourceType": "ServiceRequest", "id": "sr-9", "status": "active", "intent": "order",
            "code": {"coding": [{"system": CONSULT_KIND_SYSTEM, "code": "prior-request"}]},
            "subject": {"reference": "Patient/p1"}, "performer": [{"reference": "HealthcareService/b"}],
            "priority": "stat", "occurrencePeriod": {"start": "2019", "end": "2020-06"},
            "extension": [_mod("CT"), {"url": "urn:other", "valueString": "x"}],
            "note": [{"text": "Voraufnahmen bitte"}], "requester": {"reference": "Practitioner/x", "display": "Dr. A"},
            "reasonCode": [{"text": "Verlauf"}], "authoredOn": "2026-11-23"}
PATIENT = {"resourceType": "Patient", "id": "p1", "identifier": [{"system": "urn:oid:1.2.3", "value": "PID-4711"}],
           "name": [{"family": "Müller", "given": ["Jürgen"]}], "birthDate": "1960-01-01", "gender": "male",
           "address": [{"city": "Bremen"}], "telecom": [{"system": "phone", "value": "0421"}]}


@pytest.mark.parametrize("change, expected", [
    ({}, True),
    ({"intent": "original-order"}, True),
    ({"resourceType": "Task"}, False),
    ({"status": "draft"}, False),
    ({"intent": "plan"}, False),
    ({"performer": []}, False),
    ({"code": {"coding": [{"system": CONSULT_KIND_SYSTEM, "code": "teleconsult"}]}}, False),
    ({"identifier": [{"system": ORDER_SYSTEM, "value": f"x@{B}"}]}, False),  # received from another site
    ({"identifier": [{"system": SET_SYSTEM, "value": f"x@{B}"}]}, False),
    ({"identifier": [{"system": "urn:ours", "value": "1"}]}, True),
])
def test_is_prior_request(change, expected):
    assert is_prior_request({**PRIOR_SR, **change}) is expected


def test_request_resource_carries_the_search_criteria_and_a_minimal_patient():
    request = request_resource(PRIOR_SR, PATIENT, site_address=A)
    assert request["identifier"] == [{"system": ORDER_SYSTEM, "value": f"sr-9@{A}"}]
    [patient] = request["contained"]
    assert patient == {"resourceType": "Patient", "id": "patient", "identifier": PATIENT["identifier"],
                       "name": PATIENT["name"], "birthDate": "1960-01-01", "gender": "male"}
    assert request["subject"] == {"reference": "#patient"}
    assert request["extension"] == [_mod("CT")]
    assert request["requester"] == {"display": "Dr. A"}  # no reference into A's server
    assert request["priority"] == "stat" and request["occurrencePeriod"] == PRIOR_SR["occurrencePeriod"]
    assert "performer" not in request and "id" not in request
    data = json.dumps(request, ensure_ascii=False).encode("utf-8")
    assert parse_report(data) == request  # a valid R4 ServiceRequest on the wire


def test_parse_request_round_trip():
    query = parse_request(request_resource(PRIOR_SR, PATIENT, site_address=A), A.upper())
    assert query.order == f"sr-9@{A}"
    assert query.patient_ids == ("PID-4711",)
    assert query.patient == {"resourceType": "Patient", "identifier": PATIENT["identifier"], "name": PATIENT["name"],
                             "birthDate": "1960-01-01", "gender": "male"}
    assert (query.date_from, query.date_to) == ("20190101", "20200631")
    assert query.modalities == ("CT",) and query.notes == ("Voraufnahmen bitte",) and query.priority == "stat"


def _request(**change):
    request = request_resource(PRIOR_SR, PATIENT, site_address=A)
    request.update(change)
    return request


@pytest.mark.parametrize("request_, sender", [
    (_request(), B),  # an order identifier of another sender
    (_request(identifier=[{"system": ORDER_SYSTEM, "value": f"sr-9@{B}"}]), A),
    (_request(identifier=[{"system": ORDER_SYSTEM, "value": f"sr-9@x{A}"}]), A),  # "…@xdicom@site-a.example"
    (_request(identifier=[{"system": "urn:other", "value": f"sr-9@{A}"}]), A),
    (_request(identifier=[{"system": ORDER_SYSTEM, "value": "y" * 600 + f"@{A}"}]), A),
    (_request(identifier=[]), A),
    (_request(contained=[]), A),  # no patient
    (_request(contained=[{"resourceType": "Patient", "id": "patient", "name": [{"family": "Müller"}]}]), A),
    (_request(contained=[{"resourceType": "Patient", "id": "patient", "identifier": [{"value": "  "}]}]), A),
    (_request(contained=[{"resourceType": "Organization", "id": "patient",
                          "identifier": [{"value": "PID-4711"}]}]), A),
    (_request(code={"coding": [{"system": CONSULT_KIND_SYSTEM, "code": "teleconsult"}]}), A),
])
def test_parse_request_refuses(request_, sender):
    invalid(parse_request, request_, sender)


def test_parse_request_refuses_an_order_identifier_without_id():
    invalid(parse_request, _request(identifier=[{"system": ORDER_SYSTEM, "value": f"@{A}"}]), A)


@pytest.mark.parametrize("period, expected", [
    ({}, (None, None)),
    ({"start": "2021-03-04T10:00:00Z"}, ("20210304", None)),
    ({"end": "2021"}, (None, "20211231")),
])
def test_parse_request_date_range(period, expected):
    query = parse_request(_request(occurrencePeriod=period), A)
    assert (query.date_from, query.date_to) == expected


@pytest.mark.parametrize("priority, expected", [("urgent", "urgent"), ("bogus", "routine"), (None, "routine")])
def test_parse_request_priority(priority, expected):
    assert parse_request(_request(priority=priority), A).priority == expected


def _row(uid, modalities="CT\\SR", date="20200115", description="CT Thorax"):
    return SimpleNamespace(study_uid=uid, modalities_in_study=modalities, study_date=date,
                           study_description=description)


def test_found_output_local_and_remote():
    local = found_output(_row("1.2.3"), local=True)
    assert local == {"type": {"text": FOUND}, "valueReference": {"reference": "ImagingStudy/1.2.3",
                                                                 "display": "CT\\SR 2020-01-15 CT Thorax"}}
    remote = found_output(_row("1.2.3"), local=False)
    assert remote["valueReference"]["identifier"] == {"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}
    assert "reference" not in remote["valueReference"]
    bare = found_output(_row("1.2.4", modalities=None, date="2020", description=None), local=True)
    assert bare["valueReference"]["display"] == "1.2.4"
    assert len(found_output(_row("1.2.5", description="d" * 500), local=True)["valueReference"]["display"]) == 200


def test_found_uids_and_for_a_round_trip():
    uids = ["1.2.3", "1.2.4", "2.25.99"]
    at_b = [found_output(_row(u), local=True) for u in uids]
    others = [{"type": {"text": "received"}, "valueReference": {"reference": "ImagingStudy/9.9"}},
              {"type": {"text": FOUND}, "valueReference": {"reference": "DiagnosticReport/1"}},
              {"type": {"text": FOUND}, "valueReference": {"identifier": {"value": "not-an-oid"}}}, "junk"]
    task_b = {"output": [*at_b, *others[:3]]}
    assert found_uids(task_b) == uids
    at_a = for_a([*at_b, *others[:3]])
    assert found_uids({"output": at_a}) == uids
    assert [o["valueReference"]["display"] for o in at_a] == [o["valueReference"]["display"] for o in at_b]
    assert all("reference" not in o["valueReference"] for o in at_a)
    assert at_a == [found_output(_row(u), local=False) for u in uids]
    assert for_a(at_a) == []  # already by identifier: nothing literal to convert
    assert found_uids({}) == [] and found_uids({"output": others}) == []
    report = status_report({"id": "t", "status": "ready"}, order=f"o@{A}", site_address=B, outputs=at_a)
    assert found_uids(parse_report(json.dumps(report).encode())) == uids


# ---- re-linking a reply to the real patient and study ------------------------------------------------------------
def _original_study(study="1.2.826.0.1.3680043.8.498.100"):
    s1, s2 = f"{study}.1", f"{study}.2"
    return study, [make_instance(study=study, series=s, sop=f"{s}.{i}", instance_number=i,
                                 patient_name="Müller^Jürgen", patient_id="PID-4711", study_date="20240115")
                   for s, i in ((s1, 1), (s1, 2), (s2, 1))]


def _uids_of(instances):
    """What Workflow.relinked gives pseudonym_map: the study, its series (sorted) and instances."""
    dss = [dcmread(io.BytesIO(d)) for d in instances]
    return [str(dss[0].StudyInstanceUID), *sorted({str(d.SeriesInstanceUID) for d in dss}),
            *[str(d.SOPInstanceUID) for d in dss]]


def _with_patient(data: bytes, name: str, pid: str) -> bytes:
    ds = dcmread(io.BytesIO(data))
    ds.PatientName, ds.PatientID = name, pid
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture(params=[Options(), Options(retain_longitudinal="modified")], ids=["basic", "modified-dates"])
def sent(request):
    """An anonymised transfer as the sender made it: originals, de-identified copies, secret and options."""
    options = request.param
    secret = bytes(range(32))
    study, originals = _original_study()
    ps = Pseudonymizer(secret, options=options)
    deid = [ps.deidentify(d) for d in originals]
    return SimpleNamespace(secret=secret, options=options, study=study, originals=originals, deid=deid,
                           sender_map=ps.mapping)


def test_pseudonym_map_rebuilt_from_the_originals_equals_the_senders(sent):
    mapping = pseudonym_map(sent.secret.hex(), json.dumps(sent.options.to_json()), _uids_of(sent.originals),
                            [("Müller^Jürgen", "PID-4711")])
    for original, new in sent.sender_map.uids.items():
        if original in _uids_of(sent.originals):
            assert mapping.uids[original] == new
    assert {(p.original_id, p.pseudonym_id, p.pseudonym_name) for p in mapping.patients} == \
        {(p.original_id, p.pseudonym_id, p.pseudonym_name) for p in sent.sender_map.patients}
    assert mapping.date_shift_days == sent.sender_map.date_shift_days
    assert (mapping.date_shift_days != 0) is (sent.options.retain_longitudinal == "modified")


def test_a_reply_pdf_made_at_b_is_relinked_to_the_real_study_and_patient(sent):
    pseudo = dcmread(io.BytesIO(sent.deid[0].data))
    assert str(pseudo.PatientID) != "PID-4711" and sent.deid[0].study_instance_uid != sent.study
    context = study_context_from(sent.deid[0].data)  # B's copy of the study: the pseudonyms
    reply = encapsulated_pdf(PDF, study=context, title="Telekonsil-Befund", sop_uid="2.25.4242")
    mapping = pseudonym_map(sent.secret.hex(), json.dumps(sent.options.to_json()), _uids_of(sent.originals),
                            [("Müller^Jürgen", "PID-4711")])
    back = dcmread(io.BytesIO(relink(reply, mapping)))
    assert str(back.StudyInstanceUID) == sent.study
    assert (str(back.PatientID), str(back.PatientName)) == ("PID-4711", "Müller^Jürgen")
    assert str(back.SOPInstanceUID) == "2.25.4242"  # the reply's own UIDs stay
    assert str(back.file_meta.MediaStorageSOPInstanceUID) == "2.25.4242"
    assert back.SOPClassUID == ENCAPSULATED_PDF_STORAGE
    assert back.get("PatientIdentityRemoved", "NO") == "NO"
    assert extract_pdf(relink(reply, mapping)) == PDF


def test_a_kos_referencing_the_pseudonymised_instances_is_relinked(sent):
    d = sent.deid
    kos = build_kos(study=d[0].study_instance_uid, sop="2.25.777", series="2.25.778", evidence={
        d[0].study_instance_uid: {d[0].series_instance_uid: [(CTImageStorage, d[0].sop_instance_uid),
                                                            (CTImageStorage, d[1].sop_instance_uid)],
                                  d[2].series_instance_uid: [(CTImageStorage, d[2].sop_instance_uid)]}},
        content=[("IMAGE", CTImageStorage, d[2].sop_instance_uid, ())])
    pseudo = dcmread(io.BytesIO(d[0].data))
    kos = _with_patient(kos, str(pseudo.PatientName), str(pseudo.PatientID))
    mapping = pseudonym_map(sent.secret.hex(), json.dumps(sent.options.to_json()), _uids_of(sent.originals),
                            [("Müller^Jürgen", "PID-4711")])
    back = relink(kos, mapping)
    ds = dcmread(io.BytesIO(back))
    assert str(ds.StudyInstanceUID) == sent.study
    assert (str(ds.PatientID), str(ds.PatientName)) == ("PID-4711", "Müller^Jürgen")
    assert (str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)) == ("2.25.777", "2.25.778")
    text = back.decode("latin-1")
    originals = _uids_of(sent.originals)
    for original in originals:
        assert original in text, original
    for pseudonym in (x.sop_instance_uid for x in d):
        assert pseudonym not in text
    [evidence] = ds.CurrentRequestedProcedureEvidenceSequence
    assert str(evidence.StudyInstanceUID) == sent.study
    refs = {str(s.SeriesInstanceUID): [str(i.ReferencedSOPInstanceUID) for i in s.ReferencedSOPSequence]
            for s in evidence.ReferencedSeriesSequence}
    assert refs == {originals[1]: originals[3:5], originals[2]: [originals[5]]}


def test_relink_with_a_map_of_another_secret_changes_nothing(sent):
    reply = encapsulated_pdf(PDF, study=study_context_from(sent.deid[0].data), title="Befund", sop_uid="2.25.1")
    other = pseudonym_map("ab" * 32, json.dumps(sent.options.to_json()), _uids_of(sent.originals),
                          [("Müller^Jürgen", "PID-4711")])
    back = dcmread(io.BytesIO(relink(reply, other)))
    assert str(back.StudyInstanceUID) == sent.deid[0].study_instance_uid
    assert str(back.PatientID) == str(dcmread(io.BytesIO(sent.deid[0].data)).PatientID)


def test_relink_restores_the_study_date_shifted_by_modified_dates():
    secret = bytes(range(32))
    options = Options(retain_longitudinal="modified")
    study, originals = _original_study()
    ps = Pseudonymizer(secret, options=options)
    deid = ps.deidentify(originals[0])
    assert str(dcmread(io.BytesIO(deid.data)).StudyDate) != "20240115"
    reply = encapsulated_pdf(PDF, study=study_context_from(deid.data), title="Befund", sop_uid="2.25.1")
    mapping = pseudonym_map(secret.hex(), json.dumps(options.to_json()), _uids_of(originals),
                            [("Müller^Jürgen", "PID-4711")])
    assert str(dcmread(io.BytesIO(relink(reply, mapping))).StudyDate) == "20240115"


@pytest.mark.parametrize("options_json", ["not json", json.dumps({"retain_longitudinal": "sometimes"}),
                                          json.dumps({"no_such_option": True}), "[]"])
def test_pseudonym_map_refuses_unusable_options(options_json):
    invalid(pseudonym_map, "00" * 32, options_json, ["1.2.3"], [])


def test_pseudonym_map_without_options_is_the_basic_profile():
    mapping = pseudonym_map("01" * 32, None, ["1.2.3", "1.2.3.1"], [("A^B", "P1")])
    assert set(mapping.uids) == {"1.2.3", "1.2.3.1"} and mapping.date_shift_days == 0
    [link] = mapping.patients
    assert (link.original_name, link.original_id) == ("A^B", "P1")
    assert link.pseudonym_id.startswith("PSN-") and link.pseudonym_name.startswith("PSEUDONYM^")
