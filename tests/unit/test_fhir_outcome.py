"""The FHIR error table is complete; OperationOutcome rendering; structure validation; date ranges."""

from __future__ import annotations

import pytest

from server.errors import ErrorKind, ServerError
from server.fhir import params as P
from server.fhir.model import parse_resource
from server.fhir.outcome import FHIR_BY_KIND, Gone, PreconditionFailed, error_outcome, status_and_code

ISSUE_TYPES = {"invalid", "structure", "required", "value", "invariant", "security", "login", "unknown",
               "expired", "forbidden", "suppressed", "processing", "not-supported", "duplicate", "multiple-matches",
               "not-found", "deleted", "too-long", "code-invalid", "extension", "too-costly", "business-rule",
               "conflict", "transient", "lock-error", "no-store", "exception", "timeout", "incomplete",
               "throttled", "informational"}


def test_every_error_kind_is_mapped():
    assert set(FHIR_BY_KIND) == set(ErrorKind)
    for status, code in FHIR_BY_KIND.values():
        assert 400 <= status < 600 and code in ISSUE_TYPES


def test_outcome_carries_code_and_expression():
    status, body = error_outcome(ServerError(ErrorKind.INVALID, "bad", parameter="Patient.name[0]"))
    assert status == 400
    assert body == {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "invalid", "diagnostics": "bad", "expression": ["Patient.name[0]"]}]}


def test_special_statuses():
    assert status_and_code(Gone()) == (410, "deleted")
    assert status_and_code(PreconditionFailed("stale"))[0] == 412


def test_structure_errors_name_the_element():
    with pytest.raises(ServerError) as info:
        parse_resource({"resourceType": "Patient", "name": [{"family": 3}]})
    assert info.value.parameter == "Patient.name[0].family"
    with pytest.raises(ServerError) as info:
        parse_resource({"resourceType": "Endpoint", "status": "active"})
    assert info.value.parameter.startswith("Endpoint.")
    with pytest.raises(ServerError):
        parse_resource({"resourceType": "Nope"})


def test_date_ranges_follow_precision():
    assert P.date_range("2020") == ("2020-01-01T00:00:00.000000", "2020-12-31T23:59:59.999999")
    assert P.date_range("2020-02")[1] == "2020-02-29T23:59:59.999999"
    assert P.date_range("2020-12-31T10:00:00+02:00")[0] == "2020-12-31T08:00:00.000000"
    with pytest.raises(ServerError):
        P.date_range("31.12.2020")


def test_index_values_and_query_parsing():
    values = P.index_values({"resourceType": "Organization", "name": "Klinikum Bremen-Mitte",
                             "identifier": [{"system": "s", "value": "1"}], "active": True})
    assert P.IndexValue("name", value="KLINIKUM BREMEN-MITTE", exact="Klinikum Bremen-Mitte") in values
    assert P.IndexValue("identifier", system="s", value="1") in values
    query = P.parse_query("HealthcareService", [("organization.name", "x"), ("_count", "5")], lenient=False)
    assert query.count == 5 and query.clauses[0].kind == "chain" and query.clauses[0].target == "Organization"
    with pytest.raises(ServerError):
        P.parse_query("Patient", [("nope", "1")], lenient=False)
    assert P.parse_query("Patient", [("nope", "1")], lenient=True).ignored == ["nope"]


def test_capability_statement_lists_the_tables():
    from server.fhir.capability import capability_statement
    from server.fhir.model import SUPPORTED_TYPES

    rest = capability_statement("http://x/fhir")["rest"][0]
    assert [r["type"] for r in rest["resource"]] == list(SUPPORTED_TYPES)
    for res in rest["resource"]:
        listed = {p["name"]: p["type"] for p in res["searchParam"]}
        expected = {name: p.type for name, p in P.PARAMS.get(res["type"], {}).items()}
        assert listed == {**expected, **P.COMMON}
    assert {i["code"] for i in rest["interaction"]} == {"batch", "transaction"}
