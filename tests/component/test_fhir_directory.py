"""The network directory in the gematik FHIR-VZD shape (Organization <- HealthcareService -> Endpoint): how users
look for a recipient (name, city, network, organization, connection type), DICOM e-mail and KIM Endpoints, and
the result parameters _summary and _elements (FHIR R4 3.1.1.5.8/9)."""

from __future__ import annotations

import pytest

from tests.conftest import auth, make_token
from tests.fhir_examples import B, FHIR

SD = f"{B}/StructureDefinition"
VZD = "https://gematik.de/fhir/directory"
TELEMATIK = "https://gematik.de/fhir/sid/telematik-id"
KEY = "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmQENBF...\n-----END PGP PUBLIC KEY BLOCK-----\n"


def dicom_email_endpoint(eid, org, address, fingerprint="0123456789ABCDEF0123456789ABCDEF01234567"):
    return {"resourceType": "Endpoint", "id": eid,
            "meta": {"profile": [f"{SD}/dicom-email-endpoint"]},
            "extension": [{"url": f"{SD}/openpgp-public-key", "valueString": KEY},
                          {"url": f"{SD}/openpgp-fingerprint", "valueString": fingerprint},
                          {"url": f"{SD}/max-mail-size", "valueInteger": 20_000_000},
                          {"url": f"{SD}/drg-profile-version", "valueCode": "1.7"}],
            "status": "active", "name": f"DICOM E-Mail {org}",
            "connectionType": {"system": f"{B}/CodeSystem/endpoint-connection-type", "code": "dicom-email"},
            "payloadType": [{"text": "DICOM"}], "payloadMimeType": ["application/dicom"],
            "managingOrganization": {"reference": f"Organization/{org}"}, "address": f"mailto:{address}"}


def kim_endpoint(eid, org, address, version="1.5"):
    """A KIM Endpoint as gematik's VZD example (Endpoint-KIMEndpointExample) has it."""
    return {"resourceType": "Endpoint", "id": eid, "status": "active", "name": "KIM-Mailadresse",
            "connectionType": {
                "extension": [{"url": f"{VZD}/StructureDefinition/ConnectionTypeKimVersionEx", "extension": [
                    {"url": "version", "valueCoding": {"system": f"{VZD}/CodeSystem/KimVersionCS", "code": version}},
                    {"url": "xxlMailSupported", "valueBoolean": True}]}],
                "system": f"{VZD}/CodeSystem/EndpointDirectoryConnectionType", "code": "kim"},
            "payloadType": [{"coding": [{"system": f"{VZD}/CodeSystem/EndpointDirectoryKIMappTags",
                                         "code": "eArztbrief"}]}],
            "managingOrganization": {"reference": f"Organization/{org}"}, "address": address}


SITES = [
    ("bremen", "Klinikum Bremen-Mitte", "Bremen", "5-2.58.1", "Westdeutscher Teleradiologieverbund"),
    ("oldenburg", "Klinikum Oldenburg AöR", "Oldenburg", "5-2.58.2", "Westdeutscher Teleradiologieverbund"),
    ("muenchen", "Radiologie München-Süd", "München", "5-2.58.3", "TKmed"),
]


@pytest.fixture
def h(settings, client):
    headers = {**auth(make_token(settings)), "Content-Type": FHIR}
    for sid, name, city, telematik, network in SITES:
        entries = [
            {"resourceType": "Organization", "id": sid, "name": name, "active": True,
             "identifier": [{"system": TELEMATIK, "value": telematik}], "address": [{"city": city}]},
            dicom_email_endpoint(f"{sid}-dicom", sid, f"dicom@{sid}.example.de"),
            kim_endpoint(f"{sid}-kim", sid, f"radiologie@{sid}.kim.telematik"),
            {"resourceType": "HealthcareService", "id": f"{sid}-tele", "name": f"Teleradiologie {city}",
             "providedBy": {"reference": f"Organization/{sid}"},
             "program": [{"coding": [{"system": f"{B}/CodeSystem/network", "code": network[:4].lower(),
                                      "display": network}]}],
             "endpoint": [{"reference": f"Endpoint/{sid}-dicom"}, {"reference": f"Endpoint/{sid}-kim"}]},
        ]
        for resource in entries:
            r = client.put(f"/fhir/{resource['resourceType']}/{resource['id']}", json=resource, headers=headers)
            assert r.status_code == 201, r.text
    return headers


def ids(client, h, query, mode="match"):
    r = client.get(f"/fhir/{query}", headers=h)
    assert r.status_code == 200, r.text
    return sorted(e["resource"]["id"] for e in r.json().get("entry", []) if e["search"]["mode"] == mode)


@pytest.mark.parametrize("query, expected", [
    ("Organization?name=bremen", ["bremen"]),
    ("Organization?name=klinikum", ["bremen", "oldenburg"]),
    ("Organization?name=aor", ["oldenburg"]),
    ("Organization?name=muenchen", ["muenchen"]),
    ("Organization?name=munchen-sud", ["muenchen"]),
    ("Organization?address-city=München", ["muenchen"]),
    (f"Organization?identifier={TELEMATIK}|5-2.58.2", ["oldenburg"]),
    ("HealthcareService?organization.name=bremen", ["bremen-tele"]),
    ("HealthcareService?organization.address-city=oldenburg", ["oldenburg-tele"]),
    ("HealthcareService?network=westdeutscher", ["bremen-tele", "oldenburg-tele"]),
    ("HealthcareService?network=tkmed", ["muenchen-tele"]),
    (f"HealthcareService?program={B}/CodeSystem/network|tkme", ["muenchen-tele"]),
    ("HealthcareService?name=teleradiologie&organization=Organization/bremen", ["bremen-tele"]),
    (f"Endpoint?connection-type={B}/CodeSystem/endpoint-connection-type|dicom-email&organization.name=oldenburg",
     ["oldenburg-dicom"]),
    (f"Endpoint?connection-type={VZD}/CodeSystem/EndpointDirectoryConnectionType|kim", ["bremen-kim", "muenchen-kim",
                                                                                      "oldenburg-kim"]),
    ("HealthcareService?endpoint.connection-type=dicom-email&network=tkmed", ["muenchen-tele"]),
    ("Endpoint?address:contains=oldenburg.kim", ["oldenburg-kim"]),
])
def test_find_a_recipient(client, h, query, expected):
    assert ids(client, h, query) == expected


def test_service_with_endpoints_and_organization(client, h):
    query = "HealthcareService?organization.name=bremen&_include=HealthcareService:endpoint" \
            "&_include=HealthcareService:organization"
    assert ids(client, h, query, "include") == ["bremen", "bremen-dicom", "bremen-kim"]
    assert ids(client, h, "Organization?_id=oldenburg&_revinclude=HealthcareService:organization",
               "include") == ["oldenburg-tele"]


def test_endpoints_are_validated(client, h):
    bad = dicom_email_endpoint("x", "bremen", "x@example.de", fingerprint="not-hex")
    r = client.put("/fhir/Endpoint/x", json=bad, headers=h)
    assert r.status_code == 422 and r.json()["issue"][0]["code"] == "invariant"
    bad = dicom_email_endpoint("x", "bremen", "x@example.de")
    bad["extension"] = bad["extension"][1:]  # no public key
    assert client.put("/fhir/Endpoint/x", json=bad, headers=h).status_code == 422
    bad = kim_endpoint("y", "bremen", "a@b.kim.telematik", version="9.9")
    r = client.put("/fhir/Endpoint/y", json=bad, headers=h)
    assert r.status_code == 422 and r.json()["issue"][0]["code"] == "code-invalid"
    assert client.get("/fhir/Endpoint?_summary=count", headers=h).json()["total"] == 6


def test_summary_and_elements(client, h):
    r = client.get("/fhir/Endpoint/bremen-dicom?_elements=address", headers=h).json()
    assert set(r) == {"resourceType", "id", "meta", "address", "status", "connectionType", "payloadType"}
    assert {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"} \
        in r["meta"]["tag"]
    bundle = client.get("/fhir/Organization?name=bremen&_summary=true", headers=h).json()
    org = bundle["entry"][0]["resource"]
    assert "name" in org and "identifier" in org and "contact" not in org
    bundle = client.get("/fhir/Endpoint?_summary=text&name=dicom", headers=h).json()
    assert all("extension" not in e["resource"] for e in bundle["entry"])
    assert client.get("/fhir/Endpoint?_summary=bogus", headers=h).status_code == 400
