"""AuditEvents the server writes for every change of a FHIR resource (FHIR R4 auditevent.html), read-only to clients.

One AuditEvent per create, update and delete, in the transaction of the change (nothing changes unrecorded):
type ``rest`` (audit-event-type), subtype the RESTful interaction, action C/U/D, the caller as requesting agent
(token subject and tenant), our server as observer, and the changed version as entity. Pure: builds JSON.
"""

from __future__ import annotations

import uuid

import json

from server.fhir import params as P
from server.security.tokens import Principal
from server.store.fhir import FhirTx, Stored

AUDIT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
INTERACTION = "http://hl7.org/fhir/restful-interaction"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
ACTION = {"create": "C", "update": "U", "delete": "D"}
SUBJECT_SYSTEM = "https://telerad-bridge.de/fhir/sid/token-subject"


def audit_event(principal: Principal, interaction: str, resource_type: str, resource_id: str, version: int,
                recorded: str) -> dict:
    """The AuditEvent of one change (``recorded`` is a stored instant, see ``params.now_instant``)."""
    return {
        "resourceType": "AuditEvent",
        "id": str(uuid.uuid4()),
        "type": {"system": AUDIT_TYPE, "code": "rest", "display": "RESTful Operation"},
        "subtype": [{"system": INTERACTION, "code": interaction}],
        "action": ACTION[interaction],
        "recorded": P.render_instant(recorded),
        "outcome": "0",
        "agent": [{"who": {"identifier": {"system": SUBJECT_SYSTEM, "value": principal.subject},
                           "display": f"{principal.subject} ({principal.tenant})"},
                   "requestor": True}],
        "source": {"site": principal.tenant, "observer": {"display": "telerad-bridge"}},
        "entity": [{"what": {"reference": f"{resource_type}/{resource_id}/_history/{version}"},
                    "role": {"system": OBJECT_ROLE, "code": "4", "display": "Domain Resource"}}],
    }


def record(tx: FhirTx, principal: Principal, interaction: str, new: Stored, old: Stored | None) -> None:
    """The write listener: store the AuditEvent of a change in its transaction (not for AuditEvents)."""
    if new.resource_type == "AuditEvent":
        return
    event = audit_event(principal, interaction, new.resource_type, new.resource_id, new.version_id,
                        new.last_updated)
    event["meta"] = {"versionId": "1", "lastUpdated": P.render_instant(new.last_updated)}
    content = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    tx.put("AuditEvent", event["id"], 1, new.last_updated, content, P.index_values(event), method="POST")
