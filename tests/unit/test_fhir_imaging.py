"""The ImagingStudy mapping and search criteria (server/fhir/imaging.py): FHIR R4 imagingstudy.html, PS3.17."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from fhir.resources.R4B import get_fhir_model_class

from server.errors import ErrorKind, ServerError
from server.fhir import imaging as I
from server.fhir import params as P

CT = "1.2.840.10008.5.1.4.1.1.2"
UPDATED = datetime(2024, 5, 1, 8, 30, 0, 123456, tzinfo=timezone.utc)


def study(**over) -> I.StudyRow:
    values = dict(
        uid="1.2.3", revision=3, updated=UPDATED, patient_name="Müller^Jürgen^^Dr.", patient_id="PID-1",
        issuer="1.2.276.0.76.4.8", date="20240115", time="101500", accession="ACC-1", study_id="7",
        description="CT Thorax", referring="Schmidt^Anna", modalities="CT\\SR", number_of_series=2,
        number_of_instances=3,
        series=(
            I.SeriesRow("1.2.3.1", 1, "CT", "Axial", "CHEST", "20240715", "101500.500000", 2,
                        (I.InstanceRow("1.2.3.1.1", CT, 1), I.InstanceRow("1.2.3.1.2", CT, None))),
            I.SeriesRow("1.2.3.2", -1, "SR", None, "LEFT FOOT", None, None, 1,
                        (I.InstanceRow("1.2.3.2.1", "1.2.840.10008.5.1.4.1.1.88.11", 1),)),
        ),
    )
    values.update(over)
    return I.StudyRow(**values)


def validate(resource: dict) -> None:
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)


# ---- rendering ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pn, display", [
    ("Müller^Jürgen", "Jürgen Müller"), ("Müller^Jürgen^Karl^Dr.^MD", "Dr. Jürgen Karl Müller MD"),
    ("Yamada^Tarou=山田^太郎=やまだ^たろう", "Tarou Yamada"), ("Weber", "Weber"),
    ("", None), (None, None), ("^^^", None),
])
def test_person_name(pn, display):
    assert I.person_name(pn) == display


@pytest.mark.parametrize("issuer, default, expected", [
    ("1.2.276.0.76.4.8", None, {"system": "urn:oid:1.2.276.0.76.4.8", "value": "P"}),
    ("https://hospital.example/pid", None, {"system": "https://hospital.example/pid", "value": "P"}),
    ("urn:oid:1.2.3", None, {"system": "urn:oid:1.2.3", "value": "P"}),
    ("KLINIKUM_A", "urn:default", {"value": "P", "assigner": {"display": "KLINIKUM_A"}}),
    (None, "urn:default", {"system": "urn:default", "value": "P"}),
    ("", None, {"value": "P"}),
])
def test_patient_identifier(issuer, default, expected):
    assert I.patient_identifier("P", issuer, default) == expected


@pytest.mark.parametrize("da, tm, offset, expected", [
    ("20240115", "101500", None, "2024-01-15T10:15:00+01:00"),  # CET
    ("20240715", "101500", None, "2024-07-15T10:15:00+02:00"),  # CEST
    ("20240715", "101500.250000", None, "2024-07-15T10:15:00.250000+02:00"),
    ("20240715", "101500", "-0500", "2024-07-15T10:15:00-05:00"),  # TimezoneOffsetFromUTC wins
    ("20240715", "101500", "bogus", "2024-07-15T10:15:00+02:00"),
    ("20241231", "235960", None, "2024-12-31T23:59:59+01:00"),  # leap second: no FHIR time
    ("20240715", None, None, "2024-07-15"),
    (None, "101500", None, None),
    ("2024", "101500", None, None),
])
def test_date_time(da, tm, offset, expected):
    assert I.date_time(da, tm, offset, "Europe/Berlin") == expected


def test_date_time_in_another_zone():
    assert I.date_time("20240115", "101500", None, "UTC") == "2024-01-15T10:15:00+00:00"


def test_resource_mapping():
    r = I.to_resource(study(), I.Options(wado_base="https://pacs.example/dicomweb", patient_system="urn:x"))
    validate(r)
    assert r["id"] == "1.2.3" and r["status"] == "available"
    assert r["meta"] == {"versionId": "3", "lastUpdated": "2024-05-01T08:30:00.123456Z"}
    assert r["identifier"] == [
        {"use": "official", "system": "urn:dicom:uid", "value": "urn:oid:1.2.3"},
        {"use": "usual", "type": {"coding": [{"system": I.V2_0203, "code": "ACSN"}]}, "value": "ACC-1"},
        {"use": "secondary", "type": {"text": "DICOM Study ID"}, "value": "7"},
    ]
    assert r["subject"] == {"type": "Patient", "identifier": {"system": "urn:oid:1.2.276.0.76.4.8", "value": "PID-1"},
                            "display": "Dr. Jürgen Müller"}
    assert r["started"] == "2024-01-15T10:15:00+01:00"
    assert [m["code"] for m in r["modality"]] == ["CT", "SR"]
    assert r["numberOfSeries"] == 2 and r["numberOfInstances"] == 3
    assert r["contained"][0]["address"] == "https://pacs.example/dicomweb"
    assert r["contained"][0]["connectionType"] == {"system": I.CONNECTION_TYPE_SYSTEM, "code": "dicom-wado-rs"}
    assert r["endpoint"] == [{"reference": "#wado"}]
    ct, sr = r["series"]
    assert ct["started"] == "2024-07-15T10:15:00.500000+02:00"
    assert ct["bodySite"] == {"system": I.SNOMED, "code": "51185008", "display": "Thorax"}
    assert ct["instance"][0] == {"uid": "1.2.3.1.1", "sopClass": {"system": I.URI_SYSTEM, "code": f"urn:oid:{CT}"},
                                 "number": 1}
    assert "number" not in ct["instance"][1]
    assert "number" not in sr and sr["bodySite"] == {"display": "LEFT FOOT"} and "description" not in sr


def test_minimal_study_is_valid():
    bare = I.StudyRow(uid="1.2.3", revision=1, updated=UPDATED.replace(tzinfo=None))
    r = I.to_resource(bare, I.Options())
    validate(r)
    assert r["subject"] == {"type": "Patient", "display": "unknown patient"}
    assert "started" not in r and "series" not in r and "modality" not in r
    assert r["meta"]["lastUpdated"] == "2024-05-01T08:30:00.123456Z"


def test_content_is_compact_json():
    text = I.content(study(), I.Options())
    assert json.loads(text)["id"] == "1.2.3" and ", " not in text and "Müller" in text


# ---- search criteria ----------------------------------------------------------------------------------------
def q(*items: tuple[str, str]) -> P.Query:
    return P.parse_query("ImagingStudy", list(items), lenient=False)


def no_patients(clause):
    raise AssertionError("no Patient lookup expected")


def terms(*items, patients=no_patients, options=I.Options()) -> tuple[tuple[I.Term, ...], ...]:
    return I.criteria(q(*items), options, patients).where


@pytest.mark.parametrize("value, expected", [
    ("urn:oid:1.2.3", [I.Term("uid", "1.2.3")]),
    ("urn:dicom:uid|urn:oid:1.2.3", [I.Term("uid", "1.2.3")]),
    ("urn:ietf:rfc:3986|urn:oid:1.2.3", [I.Term("uid", "1.2.3")]),
    ("urn:dicom:uid|1.2.3", [I.Term("uid", "1.2.3")]),
    ("ACC-1", [I.Term("accession", "ACC-1")]),
    ("|ACC-1", [I.Term("accession", "ACC-1")]),
    ("http://other|ACC-1", [I.NOTHING]),
    ("urn:dicom:uid|", [I.Term("all")]),
])
def test_identifier(value, expected):
    assert terms(("identifier", value)) == (tuple(expected),)


def test_token_parameters():
    assert terms(("_id", "1.2,1.3")) == ((I.Term("uid", "1.2"), I.Term("uid", "1.3")),)
    assert terms(("status", "available")) == ((I.Term("all"),),)
    assert terms(("status", f"{I.STATUS_SYSTEM}|available,cancelled")) == ((I.Term("all"), I.NOTHING),)
    assert terms(("modality", f"{I.DCM_SYSTEM}|CT,http://loinc.org|MR,US")) == (
        (I.Term("modality", "CT"), I.NOTHING, I.Term("modality", "US")),)
    assert terms(("series", "1.2.3.4")) == ((I.Term("series", "1.2.3.4"),),)
    assert terms(("modality", "CT"), ("modality", "MR")) == ((I.Term("modality", "CT"),), (I.Term("modality", "MR"),))


def test_started_is_compared_in_the_sites_local_time():
    (term,), = terms(("started", "ge2024-07-15T08:00:00Z"))
    assert term == I.Term("started", prefix="ge", low="20240715100000.000000", high="20240715100000.999999")
    (term,), = terms(("started", "2024-01-15"))
    assert (term.prefix, term.low, term.high) == ("eq", "20240115010000.000000", "20240116005959.999999")
    (term,), = terms(("started", "le2024-01-15T10:15:00+01:00"))
    assert term.high == "20240115101500.999999"


def test_open_ended_bounds_stay_valid():
    assert I.local_key(P.MIN_DATE, "Europe/Berlin")[:4] in ("0001", "0000")
    assert I.local_key(P.MAX_DATE, "Europe/Berlin").startswith("9999")


def test_last_updated_stays_utc():
    (term,), = terms(("_lastUpdated", "gt2024-05-01T08:30:00Z"))
    assert term == I.Term("updated", prefix="gt", low="2024-05-01T08:30:00.000000", high="2024-05-01T08:30:00.999999")


def test_patient_identifier_chain_matches_patient_id_and_issuer():
    opts = I.Options(patient_system="urn:local")
    assert terms(("patient.identifier", "urn:oid:1.2.276|PID-1"), options=opts) == (
        (I.Term("patient", "PID-1", issuers=("1.2.276", "urn:oid:1.2.276")),),)
    assert terms(("patient.identifier", "urn:local|PID-1"), options=opts) == (
        (I.Term("patient", "PID-1", issuers=("urn:local",), no_issuer=True),),)
    assert terms(("patient.identifier", "PID-1")) == ((I.Term("patient", "PID-1"),),)
    assert terms(("subject:Patient.identifier", "PID-1")) == ((I.Term("patient", "PID-1"),),)


def test_patient_reference_resolves_the_fhir_patient():
    seen = []

    def patients(clause):
        seen.append(clause)
        return [("urn:oid:1.2.276", "PID-1"), (None, "LOCAL-9")]

    got = terms(("patient", "Patient/p1,Patient/p2"), patients=patients)
    assert got == ((I.Term("patient", "PID-1", issuers=("1.2.276", "urn:oid:1.2.276")), I.Term("patient", "LOCAL-9")),)
    assert seen[0].param == "_id" and [a.code for a in seen[0].alts] == ["p1", "p2"]
    assert terms(("subject", "p1"), patients=patients)[0][0].value == "PID-1"
    assert terms(("patient.name", "Müller"), patients=patients)[0][1].value == "LOCAL-9"
    assert seen[-1].param == "name"


def test_reference_to_no_patient_matches_nothing():
    assert terms(("subject", "Group/g1")) == ((I.NOTHING,),)
    assert terms(("patient", "Patient/p1"), patients=lambda c: []) == ((I.NOTHING,),)


@pytest.mark.parametrize("items, parameter", [
    ([("referrer", "Practitioner/1")], "referrer"),
    ([("endpoint", "Endpoint/1")], "endpoint"),
    ([("basedon", "ServiceRequest/1")], "basedon"),
    ([("modality:not", "CT")], "modality:not"),
    ([("series:missing", "true")], "series:missing"),
    ([("_sort", "status")], "_sort"),
])
def test_unsupported_is_invalid(items, parameter):
    with pytest.raises(ServerError) as err:
        I.criteria(q(*items), I.Options(), no_patients)
    assert err.value.kind is ErrorKind.INVALID and err.value.parameter == parameter


def test_sort_and_paging():
    c = I.criteria(q(("_sort", "-started,_lastUpdated,_id"), ("_count", "5"), ("_offset", "10")), I.Options(),
                   no_patients)
    assert c.sort == (("started", True), ("updated", False), ("uid", False))
    assert (c.count, c.offset, c.summary_count) == (5, 10, False)
    assert I.criteria(q(("_summary", "count")), I.Options(), no_patients).summary_count


# ---- the projection -----------------------------------------------------------------------------------------
class FakeIndex:
    def __init__(self, rows):
        self.rows = rows
        self.calls = []

    def study(self, tenant, uid):
        self.calls.append(("study", tenant, uid))
        return next((r for r in self.rows if r.uid == uid), None)

    def search(self, tenant, criteria):
        self.calls.append(("search", tenant, criteria))
        return len(self.rows), list(self.rows)

    def patients(self, tenant, clause):
        self.calls.append(("patients", tenant, clause.param))
        return [(None, "PID-1")]


def test_projection_read_and_search():
    index = FakeIndex([study()])
    projection = I.ImagingStudyProjection(index)
    stored = projection.read("site-a", "1.2.3")
    assert (stored.resource_type, stored.resource_id, stored.version_id, stored.deleted) == ("ImagingStudy", "1.2.3",
                                                                                            3, False)
    assert stored.last_updated == "2024-05-01T08:30:00.123456"
    assert stored.resource()["meta"]["versionId"] == "3"
    assert projection.read("site-a", "9.9") is None
    assert projection.read("site-a", "not_an_id!") is None
    assert [c[0] for c in index.calls] == ["study", "study"]
    total, page = projection.search("site-a", q(("patient", "Patient/p1")))
    assert total == 1 and page[0].resource_id == "1.2.3"
    assert index.calls[-2] == ("patients", "site-a", "_id")
    assert index.calls[-1][2].where == ((I.Term("patient", "PID-1"),),)
