"""Our FHIR profiles in profiles/ and their enforcement (server/fhir/profiles.py; R4 validation.html)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from server.errors import ServerError
from server.fhir.profiles import (
    DICOM_EMAIL_ENDPOINT_PROFILE,
    SERVICE_REQUEST_PROFILE,
    TASK_PROFILE,
    Issue,
    known_profiles,
    load_registry,
    validate_resource,
)

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ROOT / "profiles"
VZD = ROOT.parent / "shared" / "standards" / "vzd"
B = "https://telerad-bridge.de/fhir"
SD = f"{B}/StructureDefinition"
FINGERPRINT = "0123456789ABCDEF0123456789ABCDEF01234567"
KEY = "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmQENBF...\n-----END PGP PUBLIC KEY BLOCK-----\n"

SERVICE_REQUEST = {
    "resourceType": "ServiceRequest",
    "meta": {"profile": [SERVICE_REQUEST_PROFILE]},
    "status": "active",
    "intent": "order",
    "priority": "routine",
    "code": {"coding": [{"system": f"{B}/CodeSystem/consult-kind", "code": "second-reading",
                         "display": "Zweitmeinung"}]},
    "orderDetail": [{"coding": [{"system": f"{B}/CodeSystem/send-option", "code": "with-report"}]}],
    "subject": {"reference": "Patient/p1"},
    "requester": {"reference": "PractitionerRole/r1"},
    "performer": [{"reference": "Organization/o1"}, {"reference": "HealthcareService/hs1"}],
    "reasonCode": [{"text": "Verdacht auf Lungenembolie"}],
    "supportingInfo": [{"reference": "ImagingStudy/s1"}],
}
TASK = {
    "resourceType": "Task",
    "status": "in-progress",
    "businessStatus": {"coding": [{"system": f"{B}/CodeSystem/task-business-status", "code": "transfer-running"}]},
    "intent": "order",
    "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]},
    "basedOn": [{"reference": "ServiceRequest/sr1"}],
    "partOf": [{"reference": "Task/t0"}],
    "focus": {"reference": "ServiceRequest/sr1"},
    "for": {"reference": "Patient/p1"},
    "requester": {"reference": "Organization/o1"},
    "owner": {"reference": "HealthcareService/hs1"},
}
ENDPOINT = {
    "resourceType": "Endpoint",
    "extension": [
        {"url": f"{SD}/openpgp-public-key", "valueString": KEY},
        {"url": f"{SD}/openpgp-fingerprint", "valueString": FINGERPRINT},
        {"url": f"{SD}/max-mail-size", "valueInteger": 20_000_000},
        {"url": f"{SD}/drg-profile-version", "valueCode": "1.7"},
    ],
    "status": "active",
    "connectionType": {"system": f"{B}/CodeSystem/endpoint-connection-type", "code": "dicom-email"},
    "name": "Klinikum Bremen-Mitte Radiologie",
    "managingOrganization": {"reference": "Organization/o1"},
    "payloadType": [{"text": "DICOM"}],
    "payloadMimeType": ["application/dicom"],
    "address": "mailto:teleradiologie@klinikum-bremen-mitte.de",
}
VALID = {"servicerequest": SERVICE_REQUEST, "task": TASK, "endpoint": ENDPOINT}


def _set(path: str, value):
    """A mutation setting (or, with value None, removing) a dotted path; digits index lists."""
    def mutate(resource: dict) -> None:
        *head, last = path.split(".")
        node = resource
        for part in head:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is None:
            del node[int(last) if last.isdigit() else last]
        else:
            node[int(last) if last.isdigit() else last] = value
    return mutate


# (example, mutation, expected issue code, expected expression)
VIOLATIONS = [
    ("servicerequest", _set("priority", None), "required", "ServiceRequest.priority"),
    ("servicerequest", _set("code", None), "required", "ServiceRequest.code"),
    ("servicerequest", _set("requester", None), "required", "ServiceRequest.requester"),
    ("servicerequest", _set("performer", None), "required", "ServiceRequest.performer"),
    ("servicerequest", _set("subject", None), "required", "ServiceRequest.subject"),
    ("servicerequest", _set("performer", []), "required", "ServiceRequest.performer"),
    ("servicerequest", _set("code.coding.0.system", "http://snomed.info/sct"), "code-invalid", "ServiceRequest.code"),
    ("servicerequest", _set("code", {"text": "Konsil"}), "code-invalid", "ServiceRequest.code"),
    ("servicerequest", _set("status", "started"), "code-invalid", "ServiceRequest.status"),
    ("servicerequest", _set("intent", "plan"), "code-invalid", "ServiceRequest.intent"),
    ("servicerequest", _set("priority", "emergency"), "code-invalid", "ServiceRequest.priority"),
    ("servicerequest", _set("code.coding.0.code", "mrt"), "code-invalid", "ServiceRequest.code"),
    ("servicerequest", _set("orderDetail.0.coding.0.code", "zip"), "code-invalid", "ServiceRequest.orderDetail[0]"),
    ("servicerequest", _set("subject", {"reference": "Group/g1"}), "value", "ServiceRequest.subject"),
    ("servicerequest", _set("performer.1", {"reference": "Patient/p1"}), "value", "ServiceRequest.performer[1]"),
    ("servicerequest", _set("code.coding.0.code", "emergency"), "invariant", "ServiceRequest"),
    ("task", _set("basedOn", None), "required", "Task.basedOn"),
    ("task", _set("focus", None), "required", "Task.focus"),
    ("task", _set("code", None), "required", "Task.code"),
    ("task", _set("basedOn.0", {"reference": "Task/t9"}), "value", "Task.basedOn[0]"),
    ("task", _set("partOf.0", {"reference": "ServiceRequest/sr1"}), "value", "Task.partOf[0]"),
    ("task", _set("status", "running"), "code-invalid", "Task.status"),
    ("task", _set("intent", "plan"), "value", "Task.intent"),
    ("task", _set("code.coding.0.code", "approve"), "value", "Task.code"),
    ("task", _set("businessStatus.coding.0.code", "lost"), "code-invalid", "Task.businessStatus"),
    ("task", _set("status", "failed"), "invariant", "Task"),
    ("endpoint", _set("name", None), "required", "Endpoint.name"),
    ("endpoint", _set("address", "smtp://mail.example.de"), "invariant", "Endpoint"),
    ("endpoint", _set("status", "on"), "code-invalid", "Endpoint.status"),
    ("endpoint", _set("managingOrganization", {"reference": "Patient/p1"}), "value", "Endpoint.managingOrganization"),
    ("endpoint", _set("extension.1", {"url": f"{SD}/max-mail-size", "valueInteger": 1}), "required",
     f"Endpoint.extension('{SD}/openpgp-fingerprint')"),
    ("endpoint", _set("extension.0", {"url": f"{SD}/openpgp-fingerprint", "valueString": FINGERPRINT}), "structure",
     f"Endpoint.extension('{SD}/openpgp-fingerprint')"),
    ("endpoint", _set("extension.1.valueString", "0123 4567"), "invariant", "Endpoint.extension[1]"),
    ("endpoint", _set("extension.0.valueString", "ssh-rsa AAAA"), "invariant", "Endpoint.extension[0]"),
    ("endpoint", _set("extension.2.valueInteger", 0), "invariant", "Endpoint.extension[2]"),
    ("endpoint", _set("extension.3.valueCode", "2.0"), "code-invalid", "Endpoint.extension[3].valueCode"),
    ("endpoint", _set("extension.2", {"url": f"{SD}/max-mail-size", "valueString": "20 MB"}), "structure",
     "Endpoint.extension[2].valueString"),
]


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_examples_pass(name):
    assert validate_resource(copy.deepcopy(VALID[name])) == []


@pytest.mark.parametrize(("name", "mutate", "code", "expression"), VIOLATIONS,
                         ids=[f"{v[0]}-{v[2]}-{v[3]}" for v in VIOLATIONS])
def test_each_violation_gives_its_issue(name, mutate, code, expression):
    resource = copy.deepcopy(VALID[name])
    mutate(resource)
    issues = validate_resource(resource)
    assert any(i.code == code and i.expression == expression for i in issues), issues
    assert all(isinstance(i, Issue) and i.severity in ("error", "warning") and i.message for i in issues)


def test_defaults_apply_without_meta_profile():
    sr = copy.deepcopy(SERVICE_REQUEST)
    del sr["meta"]
    del sr["priority"]
    assert [i.expression for i in validate_resource(sr)] == ["ServiceRequest.priority"]


def test_endpoint_claiming_profile_needs_dicom_email_connection_type():
    ep = copy.deepcopy(ENDPOINT)
    ep["meta"] = {"profile": [DICOM_EMAIL_ENDPOINT_PROFILE]}
    ep["connectionType"] = {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                            "code": "secure-email"}
    codes = {(i.code, i.expression) for i in validate_resource(ep)}
    assert ("value", "Endpoint.connectionType") in codes


def test_other_endpoints_get_base_checks_only():
    ep = {"resourceType": "Endpoint", "status": "active", "address": "https://pacs.example.de/dicomweb",
          "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                             "code": "dicom-wado-rs"}, "payloadType": [{"text": "DICOM"}]}
    assert validate_resource(ep) == []
    assert [i.code for i in validate_resource(dict(ep, status="up"))] == ["code-invalid"]


def test_profile_of_another_type_is_refused():
    task = dict(copy.deepcopy(TASK), meta={"profile": [SERVICE_REQUEST_PROFILE]})
    assert [(i.code, i.expression) for i in validate_resource(task)] == [("structure", "Task.meta.profile")]


def test_unknown_claimed_profile_falls_back_to_default():
    task = dict(copy.deepcopy(TASK), meta={"profile": ["http://example.org/StructureDefinition/other"]})
    del task["basedOn"]
    assert [i.expression for i in validate_resource(task)] == ["Task.basedOn"]


def test_reference_forms():
    sr = copy.deepcopy(SERVICE_REQUEST)
    sr["contained"] = [{"resourceType": "Patient", "id": "pat"}]
    sr["subject"] = {"reference": "#pat"}
    sr["performer"] = [{"reference": "https://fhir.example.de/fhir/Organization/o7/_history/2"},
                       {"reference": "urn:uuid:9d1ab1f6-2ad3-4f5b-9e0b-0d4c6c0e6a11"},
                       {"type": "HealthcareService", "identifier": {"value": "x"}}]
    assert validate_resource(sr) == []


VZD_EXAMPLES = sorted(p.name for p in VZD.glob("*.json")  # empty (no cases) where ../shared is not checked out
                      if p.name.split("-")[0] in ("Endpoint", "HealthcareService", "Organization"))


@pytest.mark.parametrize("name", VZD_EXAMPLES)
def test_gematik_examples_pass(name):
    assert validate_resource(json.loads((VZD / name).read_text())) == []


#: The shape of gematik's Endpoint-KIMEndpointExample (FHIR-VZD 1.2.0), kept here so the test needs no outside file.
KIM_ENDPOINT = {
    "resourceType": "Endpoint", "status": "active", "name": "KIM-Mailadresse",
    "connectionType": {
        "extension": [{"url": "https://gematik.de/fhir/directory/StructureDefinition/ConnectionTypeKimVersionEx",
                       "extension": [
                           {"url": "version", "valueCoding": {
                               "code": "2.0", "system": "https://gematik.de/fhir/directory/CodeSystem/KimVersionCS",
                               "display": "KIM 2.0 Endpoint"}},
                           {"url": "xxlMailSupported", "valueBoolean": True}]}],
        "code": "kim", "system": "https://gematik.de/fhir/directory/CodeSystem/EndpointDirectoryConnectionType"},
    "payloadType": [{"coding": [{"code": "eArztbrief",
                                 "system": "https://gematik.de/fhir/directory/CodeSystem/EndpointDirectoryKIMappTags"}]}],
    "address": "praxis.mustermann@kim.telematik",
}


def test_gematik_kim_version_extension_is_checked():
    assert validate_resource(KIM_ENDPOINT) == []
    kim = copy.deepcopy(KIM_ENDPOINT)
    kim["connectionType"]["extension"][0]["extension"][0]["valueCoding"]["code"] = "3.0"
    assert [(i.code, i.expression) for i in validate_resource(kim)] == [
        ("code-invalid", "Endpoint.connectionType.extension[0].extension[0].valueCoding")]
    del kim["connectionType"]["extension"][0]["extension"][1]
    assert ("required", "Endpoint.connectionType.extension[0].extension('xxlMailSupported')") in {
        (i.code, i.expression) for i in validate_resource(kim)}


@pytest.mark.parametrize("path", sorted(PROFILES.glob("*.json")), ids=lambda p: p.name)
def test_profile_files_are_conformance_resources(path):
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["resourceType"] in ("StructureDefinition", "CodeSystem", "ValueSet")
    assert data["url"].startswith(("https://telerad-bridge.de/fhir/", "https://gematik.de/fhir/directory/"))
    assert data.get("version")
    assert path.name in (PROFILES / "README.md").read_text(), "README lists every file"


@pytest.mark.parametrize("url", [SERVICE_REQUEST_PROFILE, TASK_PROFILE, DICOM_EMAIL_ENDPOINT_PROFILE])
def test_profile_elements_belong_to_their_type(url):
    sd = known_profiles()[url]
    assert sd["baseDefinition"] == f"http://hl7.org/fhir/StructureDefinition/{sd['type']}"
    assert sd["fhirVersion"] == "4.0.1"
    assert all(e["path"].split(".")[0] == sd["type"] for e in sd["differential"]["element"])


def test_known_profiles():
    urls = set(known_profiles())
    assert {SERVICE_REQUEST_PROFILE, TASK_PROFILE, DICOM_EMAIL_ENDPOINT_PROFILE} <= urls
    assert all(sd["resourceType"] == "StructureDefinition" for sd in known_profiles().values())


def test_unevaluable_invariant_is_an_issue(tmp_path):
    for path in PROFILES.glob("*.json"):
        (tmp_path / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    sd_path = tmp_path / "StructureDefinition-teleconsult-task.json"
    sd = json.loads(sd_path.read_text())
    sd["differential"]["element"][0]["constraint"][0]["expression"] = "status.nosuchfn()"
    sd_path.write_text(json.dumps(sd))
    issues = validate_resource(copy.deepcopy(TASK), load_registry(tmp_path))
    assert [(i.code, i.expression) for i in issues] == [("invariant", "Task")]
    assert "could not be evaluated" in issues[0].message


def test_missing_folder_fails_clearly(tmp_path):
    with pytest.raises(ServerError, match="profiles folder missing"):
        load_registry(tmp_path / "nope")


def test_unresolvable_binding_fails_clearly(tmp_path):
    sd = json.loads((PROFILES / "StructureDefinition-teleconsult-task.json").read_text())
    (tmp_path / "sd.json").write_text(json.dumps(sd))
    with pytest.raises(ServerError, match="unknown value sets"):
        load_registry(tmp_path)
