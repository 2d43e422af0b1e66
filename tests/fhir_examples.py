"""Profile-valid FHIR resources for tests, and the directory they reference (Patient p1, Organizations o1/o2,
HealthcareService hs1), created with client ids so the examples can reference them by fixed ids."""

from __future__ import annotations

import copy

B = "https://telerad-bridge.de/fhir"
FHIR = "application/fhir+json"
SR_PROFILE = f"{B}/StructureDefinition/teleconsult-servicerequest"
TASK_PROFILE = f"{B}/StructureDefinition/teleconsult-task"

SEED = [
    {"resourceType": "Patient", "id": "p1", "name": [{"family": "Müller", "given": ["Jürgen"]}],
     "identifier": [{"system": "urn:oid:1.2.276.0.76.4.8", "value": "PID-1"}], "gender": "male"},
    {"resourceType": "Organization", "id": "o1", "name": "Klinikum Bremen-Mitte", "address": [{"city": "Bremen"}]},
    {"resourceType": "Organization", "id": "o2", "name": "Praxis Dr. Weber Oldenburg",
     "address": [{"city": "Oldenburg"}]},
    {"resourceType": "HealthcareService", "id": "hs1", "name": "Teleradiologie Bremen",
     "providedBy": {"reference": "Organization/o1"}},
]


def seed(put) -> None:
    """Create the directory with ``put(path, resource)`` (a PUT that must answer 200 or 201)."""
    for resource in SEED:
        put(f"{resource['resourceType']}/{resource['id']}", resource)


def seed_client(client, headers, prefix: str = "/fhir/") -> None:
    """Seed through a TestClient, or ``httpx`` with ``prefix`` = the live server's FHIR base + "/"."""
    def put(path, resource):
        r = client.put(f"{prefix}{path}", json=resource, headers={**headers, "Content-Type": FHIR})
        assert r.status_code in (200, 201), r.text
    seed(put)


def order(identifier: str | None = None, **over) -> dict:
    """A teleconsult ServiceRequest (our profile) from Organization/o2 to HealthcareService/hs1 for Patient/p1."""
    sr = {
        "resourceType": "ServiceRequest",
        "meta": {"profile": [SR_PROFILE]},
        "status": "active", "intent": "order", "priority": "routine",
        "code": {"coding": [{"system": f"{B}/CodeSystem/consult-kind", "code": "second-reading"}]},
        "subject": {"reference": "Patient/p1"},
        "requester": {"reference": "Organization/o2"},
        "performer": [{"reference": "HealthcareService/hs1"}],
    }
    if identifier:
        sr["identifier"] = [{"system": "urn:ehr", "value": identifier}]
    sr.update(copy.deepcopy(over))
    return sr


def task(order_ref: str, status: str = "requested", identifier: str | None = None, **over) -> dict:
    """A teleconsult Task (our profile) for the order ``order_ref`` (``ServiceRequest/<id>`` or a urn:uuid)."""
    t = {
        "resourceType": "Task",
        "meta": {"profile": [TASK_PROFILE]},
        "status": status, "intent": "order",
        "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]},
        "basedOn": [{"reference": order_ref}], "focus": {"reference": order_ref},
        "for": {"reference": "Patient/p1"},
        "requester": {"reference": "Organization/o2"}, "owner": {"reference": "HealthcareService/hs1"},
    }
    if identifier:
        t["identifier"] = [{"system": "urn:t", "value": identifier}]
    t.update(copy.deepcopy(over))
    return t
