"""FHIR R4 ImagingStudy served from the DICOM archive (imagingstudy.html), SQLite and PostgreSQL."""

from __future__ import annotations

import time

import pytest
from fhir.resources.R4B import get_fhir_model_class
from pydicom.uid import generate_uid

from tests.conftest import auth, make_token
from tests.dicomdata import make_instance, multipart

FHIR = "application/fhir+json"
ISSUER = "1.2.276.0.76.4.8"  # the Patient p1 of tests/fhir_examples.py: urn:oid:1.2.276.0.76.4.8|PID-1
CT_SERIES = "1.2.826.0.1.3680043.8.498.1"


@pytest.fixture
def h(settings):
    return {**auth(make_token(settings)), "Accept": FHIR}


def stow(client, settings, parts, tenant="site-a"):
    body, ctype = multipart(parts)
    r = client.post("/dicomweb/studies", content=body,
                    headers={"Content-Type": ctype, **auth(make_token(settings, tenant))})
    assert r.status_code == 200, r.text


@pytest.fixture
def archive(client, settings, h):
    """Tenant A: study 1 (CT, PID-1 with issuer, 2 instances), study 2 (MR, PID-2, 1 instance); Patient p1."""
    s1, s2 = generate_uid(), generate_uid()
    stow(client, settings, [
        make_instance(study=s1, series=CT_SERIES, instance_number=n, IssuerOfPatientID=ISSUER, BodyPartExamined="CHEST")
        for n in (1, 2)
    ] + [
        make_instance(study=s2, modality="MR", patient_name="Weber^Eva", patient_id="PID-2", accession="ACC-2",
                      study_date="20240320", study_time="143000"),
    ])
    r = client.put("/fhir/Patient/p1", json={
        "resourceType": "Patient", "id": "p1", "name": [{"family": "Müller", "given": ["Jürgen"]}],
        "identifier": [{"system": f"urn:oid:{ISSUER}", "value": "PID-1"}]}, headers={**h, "Content-Type": FHIR})
    assert r.status_code in (200, 201), r.text
    return s1, s2


def ids(bundle: dict) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]


def search(client, h, query: str) -> dict:
    r = client.get(f"/fhir/ImagingStudy?{query}", headers=h)
    assert r.status_code == 200, r.text
    return r.json()


def test_read_maps_the_study(client, h, archive):
    s1, _ = archive
    r = client.get(f"/fhir/ImagingStudy/{s1}", headers=h)
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == 'W/"2"' and r.headers["last-modified"].endswith("GMT")
    study = r.json()
    get_fhir_model_class("ImagingStudy").model_validate(study)
    assert study["id"] == s1 and study["status"] == "available"
    assert study["meta"]["versionId"] == "2" and study["meta"]["lastUpdated"].endswith("Z")
    assert study["identifier"][0] == {"use": "official", "system": "urn:dicom:uid", "value": f"urn:oid:{s1}"}
    assert study["identifier"][1]["value"] == "ACC-1"
    assert study["identifier"][1]["type"]["coding"][0]["code"] == "ACSN"
    assert study["subject"] == {"type": "Patient", "identifier": {"system": f"urn:oid:{ISSUER}", "value": "PID-1"},
                                "display": "Jürgen Müller"}
    assert study["started"] == "2024-01-15T10:15:00+01:00"  # the site's zone (Europe/Berlin, winter)
    assert study["numberOfSeries"] == 1 and study["numberOfInstances"] == 2
    assert study["modality"] == [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}]
    assert study["description"] == "CT Thorax" and study["referrer"] == {"display": "Anna Schmidt"}
    endpoint = study["contained"][0]
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs" and endpoint["address"] == "/dicomweb"
    assert study["endpoint"] == [{"reference": "#wado"}]
    (series,) = study["series"]
    assert series["uid"] == CT_SERIES and series["number"] == 1 and series["numberOfInstances"] == 2
    assert series["modality"]["code"] == "CT" and series["description"] == "Axial"
    assert series["bodySite"]["code"] == "51185008"
    assert [i["number"] for i in series["instance"]] == [1, 2]
    assert series["instance"][0]["sopClass"] == {"system": "urn:ietf:rfc:3986",
                                                 "code": "urn:oid:1.2.840.10008.5.1.4.1.1.2"}
    assert client.get(f"/fhir/ImagingStudy/{s1}/_history/2", headers=h).status_code == 200
    assert client.get(f"/fhir/ImagingStudy/{s1}/_history/1", headers=h).status_code == 404


def test_public_base_url_in_endpoint(tmp_path, sqlite_settings):
    from fastapi.testclient import TestClient

    from server.app import create_app

    settings = sqlite_settings.model_copy(update={"public_base_url": "https://pacs.example.org/"})
    app = create_app(settings)
    try:
        with TestClient(app) as client:
            study = generate_uid()
            stow(client, settings, [make_instance(study=study)])
            r = client.get(f"/fhir/ImagingStudy/{study}", headers=auth(make_token(settings)))
            assert r.json()["contained"][0]["address"] == "https://pacs.example.org/dicomweb"
    finally:
        app.state.engine.dispose()


def test_grows_as_instances_arrive(client, settings, h, archive):
    s1, s2 = archive
    before = client.get(f"/fhir/ImagingStudy/{s1}", headers=h).json()
    other = client.get(f"/fhir/ImagingStudy/{s2}", headers=h).json()
    latest = max(before["meta"]["lastUpdated"], other["meta"]["lastUpdated"])
    time.sleep(0.002)  # lastUpdated has microseconds; make the change time observably later
    stow(client, settings, [make_instance(study=s1, modality="SR", series_number=2, IssuerOfPatientID=ISSUER)])
    after = client.get(f"/fhir/ImagingStudy/{s1}", headers=h).json()
    assert int(after["meta"]["versionId"]) > int(before["meta"]["versionId"])
    assert after["meta"]["lastUpdated"] > before["meta"]["lastUpdated"]
    assert after["numberOfInstances"] == 3 and after["numberOfSeries"] == 2
    assert [s["number"] for s in after["series"]] == [1, 2]
    assert {m["code"] for m in after["modality"]} == {"CT", "SR"}
    old = before["meta"]["versionId"]
    assert client.get(f"/fhir/ImagingStudy/{s1}/_history/{old}", headers=h).status_code == 404
    assert ids(search(client, h, f"_lastUpdated=gt{latest}")) == [s1]
    assert ids(search(client, h, f"_lastUpdated=le{latest}")) == [s2]
    assert ids(search(client, h, "_sort=-_lastUpdated")) == [s1, s2]
    assert ids(search(client, h, f"_lastUpdated=ge{latest[:10]}&_sort=_lastUpdated")) == [s2, s1]


def test_search_parameters(client, h, archive):
    s1, s2 = archive
    cases = {
        f"_id={s1}": [s1],
        f"_id={s1},{s2}": [s2, s1],
        f"identifier=urn:oid:{s1}": [s1],
        f"identifier=urn:dicom:uid|urn:oid:{s2}": [s2],
        "identifier=ACC-2": [s2],
        "identifier=|ACC-1": [s1],
        "identifier=http://other|ACC-1": [],
        "status=available": [s2, s1],
        "status=cancelled": [],
        "modality=MR": [s2],
        "modality=http://dicom.nema.org/resources/ontology/DCM|CT": [s1],
        "modality=http://loinc.org|CT": [],
        "modality=CT,MR": [s2, s1],
        f"series={CT_SERIES}": [s1],
        "patient=Patient/p1": [s1],
        "subject=Patient/p1": [s1],
        "patient=p1": [s1],
        "subject=Group/g1": [],
        "patient=Patient/nobody": [],
        f"patient.identifier=urn:oid:{ISSUER}|PID-1": [s1],
        "patient.identifier=PID-2": [s2],
        "patient.identifier=urn:oid:9.9|PID-1": [],
        "patient.name=Müller": [s1],
        "started=2024-01-15": [s1],
        "started=ge2024-02-01": [s2],
        "started=le2024-02-01": [s1],
        "started=gt2024-01-15T09:15:00Z": [s2],
        "started=lt2024-01-15T09:15:01Z": [s1],
        "started=2024-03-20T13:30:00Z": [s2],
        "started=ge2024-01-01&started=lt2024-12-31&modality=CT": [s1],
        "_sort=started": [s1, s2],
        "_sort=-started": [s2, s1],
        "_sort=_id": sorted([s1, s2]),
    }
    for query, expected in cases.items():
        bundle = search(client, h, query)
        assert ids(bundle) == expected, query
        assert bundle["total"] == len(expected), query
    model = get_fhir_model_class("Bundle")
    model.model_validate(search(client, h, "status=available"))


def test_paging_and_summary_count(client, settings, h):
    studies = [generate_uid() for _ in range(5)]
    stow(client, settings, [make_instance(study=s, study_date=f"2024010{i + 1}") for i, s in enumerate(studies)])
    first = search(client, h, "_count=2&_sort=started")
    assert first["total"] == 5 and ids(first) == studies[:2]
    links = {link["relation"]: link["url"] for link in first["link"]}
    assert "next" in links and "previous" not in links
    second = client.get(links["next"].replace("http://testserver", ""), headers=h).json()
    assert ids(second) == studies[2:4] and second["total"] == 5
    last = search(client, h, "_count=2&_offset=4&_sort=started")
    assert ids(last) == studies[4:] and last["total"] == 5
    assert "next" not in {link["relation"] for link in last["link"]}
    assert search(client, h, "_count=2&_offset=10")["total"] == 5
    count = search(client, h, "_summary=count")
    assert count["total"] == 5 and "entry" not in count


@pytest.mark.parametrize("query, parameter", [
    ("referrer=Practitioner/1", "referrer"), ("endpoint=Endpoint/1", "endpoint"),
    ("basedon=ServiceRequest/1", "basedon"), ("modality:not=CT", "modality"), ("_sort=status", "_sort"),
])
def test_unsupported_parameters_are_invalid(client, h, query, parameter):
    r = client.get(f"/fhir/ImagingStudy?{query}", headers=h)
    assert r.status_code == 400, r.text
    issue = r.json()["issue"][0]
    assert issue["code"] == "invalid"
    assert parameter in (issue.get("diagnostics", "") + " ".join(issue.get("expression", [])))


def test_read_only_and_not_found(client, h, archive):
    s1, _ = archive
    body = {"resourceType": "ImagingStudy", "id": s1, "status": "available",
            "subject": {"reference": "Patient/p1"}}
    w = {**h, "Content-Type": FHIR}
    assert client.post("/fhir/ImagingStudy", json=body, headers=w).status_code == 405
    assert client.put(f"/fhir/ImagingStudy/{s1}", json=body, headers=w).status_code == 405
    assert client.delete(f"/fhir/ImagingStudy/{s1}", headers=h).status_code == 405
    assert client.get(f"/fhir/ImagingStudy/{s1}", headers=h).json()["numberOfInstances"] == 2
    assert client.get("/fhir/ImagingStudy/1.2.3.4.5.6.7", headers=h).status_code == 404
    assert client.get("/fhir/ImagingStudy/not_an_id", headers=h).status_code == 404


def test_tenants_are_separate(client, settings, h, archive):
    s1, _ = archive
    other = auth(make_token(settings, "site-b"))
    assert client.get(f"/fhir/ImagingStudy/{s1}", headers=other).status_code == 404
    assert client.get(f"/fhir/ImagingStudy?_id={s1}", headers=other).json()["total"] == 0
    assert client.get("/fhir/ImagingStudy", headers=other).json()["total"] == 0
    mine = generate_uid()
    stow(client, settings, [make_instance(study=mine)], tenant="site-b")
    assert ids(client.get("/fhir/ImagingStudy", headers=other).json()) == [mine]
    assert client.get(f"/fhir/ImagingStudy/{mine}", headers=h).status_code == 404


@pytest.mark.parametrize("scope, status", [("dicomweb.read", 200), ("system/ImagingStudy.rs", 200),
                                           ("system/Patient.rs", 403)])
def test_scopes(client, settings, archive, scope, status):
    s1, _ = archive
    headers = auth(make_token(settings, scope=scope))
    assert client.get(f"/fhir/ImagingStudy/{s1}", headers=headers).status_code == status
    assert client.get("/fhir/ImagingStudy?modality=CT", headers=headers).status_code == status
