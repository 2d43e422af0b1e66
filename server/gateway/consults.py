"""The consulting site's side of a teleconsult (issue 5, DESIGN.md 1 flow 3): a complete inbound set becomes a
``ServiceRequest`` + ``Task`` the site's EHR finds by search or subscription.

The order travels with every instance mail of a set (contract with the requesting side, server/gateway/orders.py):
an ``application/fhir+json`` part ``order.json`` holding A's teleconsult ServiceRequest without patient data
(identifier ``https://telerad-bridge.de/fhir/sid/order`` | ``<A's ServiceRequest id>@<A's site address>``, code,
priority, orderDetail, note, reasonCode, authoredOn, requester display) and optionally a ``text/plain`` note.
Mails of legacy DRG gateways carry neither: the consult is then a ``teleconsult`` of priority ``routine``, or
``stat`` when the mails carried the DRG emergency flag.

    parse_order(data)                   order.json bytes -> the structure-checked ServiceRequest dict (lenient)
    order_of(set_row)                   what the set says about the order (pure, every value checked)
    patient_resource / service_request / consult_task    the resources (pure; profiles teleconsult-*)
    organization_of(fhir, tenant, address)   the directory's Organization of a DICOM e-mail address (or display)
    consult_for_set(fhir, tenant, set_row, ...)  Patient (found or created) + ServiceRequest + Task, one transaction

Idempotent: the ServiceRequest carries A's order identifier (for legacy mails ``<SETID>@<sender>`` in the same
system, so that every consult received from another site carries one: ``server.gateway.orders.is_order`` never
takes it for an order of ours to send) and the set's ``https://telerad-bridge.de/fhir/sid/drg-set`` |
``<SETID>@<sender>``; a repeat finds it and its Task instead of making a second consult. A's order identifier
is honoured only when it names the (signed) sender's address, so one site cannot attach its set to another
site's order.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone

from server.errors import ServerError
from server.fhir.imaging import patient_identifier, person_name
from server.fhir.model import parse_resource
from server.fhir.service import FhirService
from server.gateway.directory import CONNECTION_TYPES, DICOM_EMAIL, system_principal
from server.gateway.sites import normalize_address

log = logging.getLogger(__name__)

BASE = "https://telerad-bridge.de/fhir"
ORDER_SYSTEM = f"{BASE}/sid/order"  # A's order: "<ServiceRequest id>@<A's site address>"
SET_SYSTEM = f"{BASE}/sid/drg-set"  # the DRG set a consult came with: "<X-TELEMEDICINE-SETID>@<sender>"
CONSULT_KIND = f"{BASE}/CodeSystem/consult-kind"
SEND_OPTION = f"{BASE}/CodeSystem/send-option"
SR_PROFILE = f"{BASE}/StructureDefinition/teleconsult-servicerequest"
TASK_PROFILE = f"{BASE}/StructureDefinition/teleconsult-task"
TASK_CODE = "http://hl7.org/fhir/CodeSystem/task-code"
RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"

#: profiles/CodeSystem-consult-kind.json and CodeSystem-send-option.json (codes we copy from a peer's order)
CONSULT_KINDS = frozenset({"teleconsult", "reporting", "second-reading", "emergency", "transfer", "prior-request",
                           "ai-service", "patient-upload"})
SEND_OPTIONS = frozenset({"key-images-only", "anonymised", "with-report", "short-note"})
CONSULT_KIND_DISPLAY = {"teleconsult": "Telekonsil", "emergency": "Notfallkonsil"}
#: R4 request-priority, in rising urgency; ``stat`` = emergency (Notfall)
PRIORITIES = ("routine", "urgent", "asap", "stat")
DEFAULT_KIND, DEFAULT_PRIORITY, EMERGENCY_PRIORITY = "teleconsult", "routine", "stat"
EMERGENCY_NOTE = "NOTFALL"  # Task.note of an emergency consult (the Task's priority is stat)
#: DICOM PatientSex (PS3.3 C.7.1.1) -> R4 administrative-gender
GENDER = {"M": "male", "F": "female", "O": "other"}

ORDER_CONTENT_TYPE, ORDER_FILENAME = "application/fhir+json", "order.json"
MAX_ORDER_BYTES = 64 * 1024
MAX_NOTE_CHARS = 1000  # the short-note option (issue 5)
_DATETIME = re.compile(r"^\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$")
_DA = re.compile(r"^(\d{4})(\d{2})(\d{2})$")


class BadOrder(ValueError):
    """An order.json part we cannot use (the mail is still imported, without it)."""


# ---- the order part (pure) ---------------------------------------------------------------------------------
def is_order_part(content_type: str, filename: str | None) -> bool:
    """The order.json part of an instance mail (by media type or by name)."""
    return content_type.lower() == ORDER_CONTENT_TYPE or (filename or "").lower() == ORDER_FILENAME


def parse_order(data: bytes) -> str:
    """The order.json part as compact JSON text of a structurally valid R4 ServiceRequest; BadOrder otherwise."""
    if len(data) > MAX_ORDER_BYTES:
        raise BadOrder(f"order.json is larger than {MAX_ORDER_BYTES} bytes")
    try:
        resource = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadOrder(f"order.json is no JSON: {exc}") from exc
    rtype = resource.get("resourceType") if isinstance(resource, dict) else None
    if rtype not in ("ServiceRequest", "Task"):  # a Task: the consultant's report on our order (a reply set)
        raise BadOrder("order.json is neither a ServiceRequest nor a Task")
    stand_in = {"subject": resource.get("subject") or {"display": "patient of the DICOM set"}} \
        if rtype == "ServiceRequest" else {}
    try:  # the order travels without patient data: subject (1..1 in R4) is checked with a stand-in
        parse_resource({**resource, **stand_in})
    except ServerError as exc:
        raise BadOrder(f"order.json is no valid R4 {rtype}: {exc.message}") from exc
    return json.dumps(resource, ensure_ascii=False, separators=(",", ":"))


def note_text(data: bytes, charset: str | None) -> str | None:
    """A text/plain note part as text (unknown charsets as UTF-8, undecodable bytes replaced), or None if empty."""
    try:
        text = data.decode(charset or "utf-8", errors="replace")
    except LookupError:
        text = data.decode("utf-8", errors="replace")
    text = text.strip()
    return text or None


@dataclass(frozen=True)
class Order:
    """What a set says about its order, every value checked against our profile's bindings."""

    identifier: dict  # the consult's key: A's order identifier, or "<SETID>@<sender>" (same system)
    set_identifier: dict
    kind: str
    priority: str
    emergency: bool
    options: tuple[str, ...]
    notes: tuple[str, ...]
    reason_code: tuple[dict, ...]
    authored_on: str | None
    requester_display: str | None
    legacy: bool  # no usable order.json: the defaults of a legacy DRG gateway


def _codes(concept: object, system: str, allowed: frozenset[str]) -> list[str]:
    codings = concept.get("coding") if isinstance(concept, dict) else None
    return [c["code"] for c in codings or [] if isinstance(c, dict) and c.get("system") == system
            and c.get("code") in allowed]


def _reason(concept: object) -> dict | None:
    if not isinstance(concept, dict):
        return None
    out: dict = {}
    codings = [{k: c[k] for k in ("system", "code", "display") if isinstance(c.get(k), str)}
               for c in concept.get("coding") or [] if isinstance(c, dict)]
    codings = [c for c in codings if c.get("code") or c.get("display")]
    if codings:
        out["coding"] = codings
    if isinstance(concept.get("text"), str) and concept["text"].strip():
        out["text"] = concept["text"].strip()
    return out or None


def order_of(set_id: str, sender: str, order_json: str | None, note: str | None, emergency: bool) -> Order:
    """The order of a set: from its order.json (lenient: what does not fit our bindings is left out), else the
    defaults of a legacy DRG gateway. An order identifier not naming the sender's address is ignored (logged)."""
    sender = normalize_address(sender)
    set_identifier = {"system": SET_SYSTEM, "value": f"{set_id}@{sender}"}
    # a legacy set's consult is identified as the order "<SETID>@<sender>": every consult received from another
    # site carries an ORDER_SYSTEM identifier, which is how server.gateway.orders tells it from an order to send
    legacy_identifier = {"system": ORDER_SYSTEM, "value": f"{set_id}@{sender}"}
    resource: dict = {}
    if order_json:
        try:
            loaded = json.loads(order_json)
            resource = loaded if isinstance(loaded, dict) and loaded.get("resourceType", "ServiceRequest") \
                == "ServiceRequest" else {}  # a Task is a reply, no order
        except ValueError:
            log.warning("set %s from %s: stored order.json is no JSON: ignored", set_id, sender)
    identifier = legacy_identifier
    for ident in resource.get("identifier") or []:
        if isinstance(ident, dict) and ident.get("system") == ORDER_SYSTEM and isinstance(ident.get("value"), str):
            value = ident["value"].strip()
            if value.lower().endswith("@" + sender) and len(value) <= 512:
                identifier = {"system": ORDER_SYSTEM, "value": value}
            else:
                log.warning("set %s from %s: order identifier %r names another site: ignored", set_id, sender,
                            value[:120])
            break
    kinds = _codes(resource.get("code"), CONSULT_KIND, CONSULT_KINDS)
    kind = kinds[0] if kinds else DEFAULT_KIND
    priority = resource.get("priority") if resource.get("priority") in PRIORITIES else DEFAULT_PRIORITY
    emergency = bool(emergency) or priority == EMERGENCY_PRIORITY or kind == "emergency"
    if emergency:
        priority = EMERGENCY_PRIORITY  # tb-sr-1: an emergency consult is stat; the DRG flag makes it one too
    options: list[str] = []
    for detail in resource.get("orderDetail") or []:
        options += [c for c in _codes(detail, SEND_OPTION, SEND_OPTIONS) if c not in options]
    notes = [n["text"].strip() for n in resource.get("note") or []
             if isinstance(n, dict) and isinstance(n.get("text"), str) and n["text"].strip()]
    if note and note.strip() and note.strip() not in notes:
        notes.append(note.strip())
    notes = [n[:MAX_NOTE_CHARS] for n in notes]
    reasons = tuple(r for r in (_reason(c) for c in resource.get("reasonCode") or []) if r)
    authored = resource.get("authoredOn")
    authored = authored if isinstance(authored, str) and _DATETIME.match(authored) else None
    requester = resource.get("requester")
    display = requester.get("display") if isinstance(requester, dict) else None
    display = display.strip()[:200] if isinstance(display, str) and display.strip() else None
    return Order(identifier=identifier, set_identifier=set_identifier, kind=kind, priority=priority,
                 emergency=emergency, options=tuple(options), notes=tuple(notes), reason_code=reasons,
                 authored_on=authored, requester_display=display, legacy=not resource)


# ---- the resources (pure) ----------------------------------------------------------------------------------
def patient_resource(patient: Mapping[str, object]) -> dict:
    """A Patient from the DICOM Patient module (PS3.3 C.7.1.1): identifier, name, birthDate, gender."""
    resource: dict = {"resourceType": "Patient"}
    pid = patient.get("patient_id")
    if isinstance(pid, str) and pid.strip():
        issuer = patient.get("issuer_of_patient_id")
        resource["identifier"] = [patient_identifier(pid.strip(), issuer if isinstance(issuer, str) else None,
                                                     None)]
    pn = patient.get("patient_name")
    if isinstance(pn, str) and pn.strip("^= "):
        family, given, middle, prefix, suffix = (pn.split("=")[0].split("^") + [""] * 5)[:5]
        name: dict = {"text": person_name(pn)}
        if family.strip():
            name["family"] = family.strip()
        if [g for g in (given.strip(), middle.strip()) if g]:
            name["given"] = [g for g in (given.strip(), middle.strip()) if g]
        if prefix.strip():
            name["prefix"] = [prefix.strip()]
        if suffix.strip():
            name["suffix"] = [suffix.strip()]
        resource["name"] = [name]
    sex = patient.get("patient_sex")
    if isinstance(sex, str) and sex.strip():
        resource["gender"] = GENDER.get(sex.strip().upper(), "unknown")
    birth = patient.get("patient_birth_date")
    m = _DA.match(birth.strip()) if isinstance(birth, str) else None
    if m:
        resource["birthDate"] = f"{m.group(1)}-{m.group(2)}-{m.group(3)}"
    return resource


def service_request(order: Order, *, patient: str, requester: dict, performer: dict, study_uid: str) -> dict:
    """The consult's ServiceRequest (profile teleconsult-servicerequest) at the consulting site."""
    identifiers = [order.identifier, order.set_identifier]
    coding = {"system": CONSULT_KIND, "code": order.kind}
    if order.kind in CONSULT_KIND_DISPLAY:
        coding["display"] = CONSULT_KIND_DISPLAY[order.kind]
    resource: dict = {
        "resourceType": "ServiceRequest",
        "meta": {"profile": [SR_PROFILE]},
        "identifier": identifiers,
        "status": "active",
        "intent": "order",
        "priority": order.priority,
        "code": {"coding": [coding]},
    }
    if order.options:
        resource["orderDetail"] = [{"coding": [{"system": SEND_OPTION, "code": c}]} for c in order.options]
    resource["subject"] = {"reference": patient}
    resource["authoredOn"] = order.authored_on or _now()
    resource["requester"] = requester
    resource["performer"] = [performer]
    if order.reason_code:
        resource["reasonCode"] = list(order.reason_code)
    resource["supportingInfo"] = [{"reference": f"ImagingStudy/{study_uid}"}]
    if order.notes:
        resource["note"] = [{"text": n} for n in order.notes]
    return resource


def consult_task(order: Order, *, request: str, patient: str, requester: dict, owner: dict, study_uid: str) -> dict:
    """The consult's Task (profile teleconsult-task): requested, owned by this site, the study as input."""
    resource: dict = {
        "resourceType": "Task",
        "meta": {"profile": [TASK_PROFILE]},
        "identifier": [order.set_identifier],
        "basedOn": [{"reference": request}],
        "status": "requested",
        "intent": "order",
        "priority": order.priority,
        "code": {"coding": [{"system": TASK_CODE, "code": "fulfill"}]},
        "description": ("NOTFALL: " if order.emergency else "") + "Telekonsil ("
                       + order.kind + ") von " + (requester.get("display") or "?"),
        "focus": {"reference": request},
        "for": {"reference": patient},
        "authoredOn": _now(),
        "requester": requester,
        "owner": owner,
        "input": [{"type": {"coding": [{"system": RESOURCE_TYPES, "code": "ImagingStudy"}]},
                   "valueReference": {"reference": f"ImagingStudy/{study_uid}"}}],
    }
    if order.emergency:
        resource["note"] = [{"text": EMERGENCY_NOTE}]
    return resource


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _token(identifier: Mapping[str, str]) -> str:
    return f"{identifier.get('system', '')}|{identifier['value']}".replace(",", "\\,")


# ---- the directory and the store ---------------------------------------------------------------------------
def _matches(fhir: FhirService, tx, principal, rtype: str, items: list[tuple[str, str]]) -> list[dict]:
    bundle = fhir.search_in(tx, principal, rtype, [*items, ("_count", "100")], base="")
    return [e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == "match"]


def _organization_in(fhir: FhirService, tx, principal, address: str) -> dict | None:
    want = normalize_address(address)
    if not want or "@" not in want:
        return None
    query = [("address", f"mailto:{want}".replace(",", "\\,")),
             ("connection-type", f"{CONNECTION_TYPES}|{DICOM_EMAIL}")]
    endpoints = [e for e in _matches(fhir, tx, principal, "Endpoint", query)
                 if isinstance(e.get("address"), str) and normalize_address(e["address"]) == want]
    endpoints.sort(key=lambda e: (e.get("status") != "active", str(e.get("id"))))
    for endpoint in endpoints:
        refs = [endpoint.get("managingOrganization")]
        refs += [s.get("providedBy") for s in _matches(fhir, tx, principal, "HealthcareService",
                                                       [("endpoint", f"Endpoint/{endpoint['id']}")])]
        for ref in refs:
            target = ref.get("reference") if isinstance(ref, dict) else None
            if isinstance(target, str) and target.startswith("Organization/"):
                try:
                    org = fhir.read_in(tx, principal, "Organization", target.split("/", 1)[1]).resource
                except ServerError:
                    continue
                return {"reference": target, "display": org.get("name") or want}
    return None


def organization_of(fhir: FhirService, tenant: str, address: str, *, fallback: str | None = None) -> dict:
    """A Reference to the Organization of the DICOM e-mail ``address`` in ``tenant``'s directory (the Endpoint's
    ``managingOrganization``, or the ``providedBy`` of a HealthcareService offering it); a display-only
    reference (``fallback`` or the address) when the directory has none."""
    principal = system_principal(tenant)
    with fhir.store.transaction(tenant, write=False) as tx:
        found = _organization_in(fhir, tx, principal, address)
    return found or {"display": fallback or normalize_address(address)}


def _find_patient(fhir: FhirService, tx, principal, resource: dict) -> str | None:
    idents = resource.get("identifier") or []
    if not idents:
        return None
    ident = idents[0]
    for found in _matches(fhir, tx, principal, "Patient", [("identifier", _token(ident))]):
        if any(i.get("system") == ident.get("system") and i.get("value") == ident["value"]
               and (i.get("assigner") or {}).get("display") == (ident.get("assigner") or {}).get("display")
               for i in found.get("identifier") or [] if isinstance(i, dict)):
            return f"Patient/{found['id']}"
    return None


def _existing(fhir: FhirService, tx, principal, order: Order) -> tuple[str, str | None] | None:
    for sr in _matches(fhir, tx, principal, "ServiceRequest", [("identifier", _token(order.identifier))]):
        tasks = _matches(fhir, tx, principal, "Task", [("based-on", f"ServiceRequest/{sr['id']}")])
        tasks.sort(key=lambda t: str(t.get("id")))
        return sr["id"], tasks[0]["id"] if tasks else None
    return None


def consult_for_set(fhir: FhirService, tenant: str, set_row, *, study_uid: str, patient: Mapping[str, object],
                    sender_org: dict, performer: dict) -> tuple[str, str]:
    """The (ServiceRequest id, Task id) of the consult for an imported set, created in one FHIR transaction as
    the tenant's gateway (validated against our profiles), or found when it exists (same order identifier).

    ``patient``: the DICOM Patient module of one instance (parse.py column names); ``sender_org`` the requester
    (``organization_of`` the sender); ``performer`` this site (its own Organization, or a display). The
    ImagingStudy of ``study_uid`` must be in the archive.
    """
    order = order_of(set_row.set_id, set_row.sender, set_row.order_json, set_row.note, bool(set_row.emergency))
    if order.requester_display and "reference" not in sender_org:
        sender_org = {"display": f"{order.requester_display} ({sender_org.get('display')})"}
    principal = system_principal(tenant)
    with fhir.store.transaction(tenant, write=True) as tx:
        tx.serialize("conditional/ServiceRequest")
        found = _existing(fhir, tx, principal, order)
        if found is not None and found[1] is not None:
            return found[0], found[1]
        if found is not None:
            request = f"ServiceRequest/{found[0]}"
            sr = fhir.read_in(tx, principal, "ServiceRequest", found[0]).resource
            subject = sr["subject"]["reference"]
        else:
            candidate = patient_resource(patient)
            subject = _find_patient(fhir, tx, principal, candidate)
            if subject is None:
                subject = "Patient/" + fhir.create_in(tx, principal, candidate, base="").resource["id"]
            sr = service_request(order, patient=subject, requester=sender_org, performer=performer,
                                 study_uid=study_uid)
            request = "ServiceRequest/" + fhir.create_in(tx, principal, sr, base="",
                                                         new_id=str(uuid.uuid4())).resource["id"]
        task = consult_task(order, request=request, patient=subject, requester=sender_org, owner=performer,
                            study_uid=study_uid)
        task_id = fhir.create_in(tx, principal, task, base="").resource["id"]
    return request.split("/", 1)[1], task_id
