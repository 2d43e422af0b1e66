"""The transfer Task profile (profiles/StructureDefinition-transfer-task.json): one study to one recipient,
counters as outputs."""

from __future__ import annotations

import copy

import pytest

from server.fhir.profiles import validate_resource

B = "https://telerad-bridge.de/fhir"
PARAM = f"{B}/CodeSystem/transfer-parameter"
TRANSFER = {
    "resourceType": "Task", "meta": {"profile": [f"{B}/StructureDefinition/transfer-task"]},
    "status": "in-progress", "intent": "order",
    "businessStatus": {"coding": [{"system": f"{B}/CodeSystem/task-business-status", "code": "awaiting-receipts"}]},
    "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]},
    "focus": {"reference": "ImagingStudy/1.2.276.0.7230010.3.1.2.1"},
    "partOf": [{"reference": "Task/order-task"}],
    "input": [{"type": {"coding": [{"system": PARAM, "code": "recipient"}]}, "valueReference": {"reference": "Endpoint/e"}},
              {"type": {"coding": [{"system": PARAM, "code": "series"}]}, "valueOid": "urn:oid:1.2.3.4"}],
    "output": [{"type": {"coding": [{"system": PARAM, "code": c}]}, "valueUnsignedInt": n}
               for c, n in (("instances-total", 20), ("instances-sent", 20), ("instances-acknowledged", 12))],
}


def _issues(mutate):
    resource = copy.deepcopy(TRANSFER)
    mutate(resource)
    return [(i.code, i.expression) for i in validate_resource(resource)]


def test_valid_transfer():
    assert validate_resource(TRANSFER) == []


@pytest.mark.parametrize("mutate, expected", [
    (lambda r: r.pop("businessStatus"), ("required", "Task.businessStatus")),
    (lambda r: r.update(focus={"reference": "ServiceRequest/x"}), ("value", "Task.focus")),
    (lambda r: r.update(input=r["input"][1:]), ("invariant", "Task")),
    (lambda r: r.update(input=r["input"] * 2), ("invariant", "Task")),
    (lambda r: r["output"][0].update(type={"coding": [{"system": PARAM, "code": "recipient"}]}),
     ("code-invalid", "Task.output[0].type")),
    (lambda r: r["output"][1].update(valueString="20") or r["output"][1].pop("valueUnsignedInt"),
     ("structure", "Task.output[1].valueString")),
    (lambda r: r.update(partOf=[{"reference": "Task/a"}, {"reference": "Task/b"}]), ("structure", "Task.partOf")),
    (lambda r: r.update(status="failed"), ("invariant", "Task")),
])
def test_transfer_violations(mutate, expected):
    assert expected in _issues(mutate)
