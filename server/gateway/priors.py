"""Requests for prior images ("Voraufnahmen anfordern", issue 5): site A asks site B for the prior studies of a
patient; B finds them in its archive and, automatically for configured partners or after a person approves,
sends them to A over DICOM e-mail. Both Tasks say what was found, sent and received.

    A's EHR: ServiceRequest (consult-kind prior-request; subject a Patient with identifiers; performer B;
             occurrencePeriod = the study dates wanted; extension prior-modality = modalities (DCM codes); note)
      -> PriorsListener, in the write transaction: per performer an order Task (requested, priors-requested) and a
         workflow message job carrying ``request_resource`` (the request with the patient's identifiers, name and
         birth date as a contained Patient: B needs them to search; the mail is signed and encrypted)
    B: receive_request (Workflow.receive of a ServiceRequest message)
      -> the matching studies (Archive.patient_studies: Patient ID, StudyDate range, ModalitiesInStudy)
      -> one FHIR transaction: Patient (found by identifier or made), ServiceRequest (identifier = A's order), Task
         owned by B listing the studies found as outputs:
           none found        -> ready, priors-none
           auto partner      -> ready, priors-sending, and one transfer job per study to A
           otherwise         -> requested, awaiting-approval (B's person accepts or rejects the Task)
      -> a status message to A (server.gateway.workflow.status_report) in the same transaction
    B's person accepts the Task -> ReplyListener -> approve(): the transfer jobs + a status message (priors-sending)
    A: status messages move A's Task (``order_state``); each study's set is imported as it is (no consult) and
       recorded on A's Task as received; when every study found has arrived A's Task is completed (priors-received).

Every transfer of priors carries the status report as its order.json part, so A matches the sets to its order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from dataclasses import dataclass

from server.errors import ErrorKind, ServerError
from server.fhir.outcome import Unprocessable
from server.fhir.service import FhirService
from server.fhir.task import BUSINESS_STATUS_SYSTEM, TaskState
from server.gateway.consults import organization_of
from server.gateway.directory import Recipient, recipient_by_address, recipient_of, system_principal
from server.gateway.jobs import priority_of
from server.gateway.messages import move_task, queue_message, split_order_identifier, status_report
from server.gateway.orders import (CONSULT_KIND_SYSTEM, MAX_NOTE, ORDER_INTENTS, ORDER_TASK_PROFILE,
                                   RECEIVED_SYSTEMS, order_task, order_task_id)
from server.gateway.service import new_job
from server.gateway.sites import normalize_address
from server.gateway.tasks import instant
from server.security.tokens import Principal
from server.store import gateway as gw
from server.store.fhir import FhirTx, Stored

log = logging.getLogger(__name__)

BASE = "https://telerad-bridge.de/fhir"
ORDER_SYSTEM = f"{BASE}/sid/order"
PRIOR_REQUEST = "prior-request"
DCM = "http://dicom.nema.org/resources/ontology/DCM"  # modality codes (PS3.16 CID 29)
MODALITY_EXTENSION = f"{BASE}/StructureDefinition/prior-modality"  # ServiceRequest: a modality wanted (0..*)
DICOM_UID_SYSTEM, OID_PREFIX = "urn:dicom:uid", "urn:oid:"
SR_PROFILE = f"{BASE}/StructureDefinition/teleconsult-servicerequest"
REQUESTED, AWAITING_APPROVAL, SENDING, NONE, RECEIVED = (
    "priors-requested", "awaiting-approval", "priors-sending", "priors-none", "priors-received")
FOUND, ARRIVED = "found", "received"  # Task.output types: a study found at B, a study received at A
MAX_STUDIES = 50  # studies one request may send (the newest first)

#: A's order Task by the businessStatus of B's report (besides ``workflow.ORDER_BY_CONSULT`` for rejections)
ORDER_BY_PRIORS: dict[str, TaskState] = {
    AWAITING_APPROVAL: TaskState("requested", AWAITING_APPROVAL),
    SENDING: TaskState("in-progress", SENDING),
    NONE: TaskState("completed", NONE),
}


# ---- pure ---------------------------------------------------------------------------------------------------
def _kinds(sr: dict) -> list[str]:
    return [c.get("code") for c in (sr.get("code") or {}).get("coding") or ()
            if isinstance(c, dict) and c.get("system") == CONSULT_KIND_SYSTEM]


def is_prior_request(sr: dict) -> bool:
    """A request for prior images placed at this site: active, intent order, consult-kind prior-request, a
    performer, not one received from another site."""
    if sr.get("resourceType") != "ServiceRequest" or sr.get("status") != "active":
        return False
    if sr.get("intent") not in ORDER_INTENTS or not sr.get("performer"):
        return False
    if any(isinstance(i, dict) and i.get("system") in RECEIVED_SYSTEMS for i in sr.get("identifier") or ()):
        return False
    return PRIOR_REQUEST in _kinds(sr)


def _issue(code: str, message: str, expression: str) -> dict:
    return {"severity": "error", "code": code, "diagnostics": message, "expression": [expression]}


def _da(value: object, end: bool = False) -> str | None:
    """A FHIR date/dateTime as DICOM DA (YYYYMMDD); a year or month covers its whole span."""
    if not isinstance(value, str) or len(value) < 4 or not value[:4].isdigit():
        return None
    parts = value[:10].split("-")
    year = parts[0]
    month = parts[1] if len(parts) > 1 else ("12" if end else "01")
    day = parts[2] if len(parts) > 2 else ("31" if end else "01")
    return f"{year}{month}{day}"


def modalities_of(sr: dict) -> list[str]:
    """The modality codes (DCM, PS3.16 CID 29) a request asks for: its ``prior-modality`` extensions."""
    codings = [e.get("valueCoding") for e in sr.get("extension") or ()
               if isinstance(e, dict) and e.get("url") == MODALITY_EXTENSION]
    return [c["code"].upper() for c in codings if isinstance(c, dict) and c.get("system") == DCM
            and isinstance(c.get("code"), str) and c["code"].isalnum() and len(c["code"]) <= 16]


def request_resource(sr: dict, patient: dict, *, site_address: str) -> dict:
    """The request as it travels to B: our order identifier, the search criteria and the patient to search for
    (contained: identifiers, name, birth date, gender)."""
    contained = {k: patient[k] for k in ("identifier", "name", "birthDate", "gender") if patient.get(k)}
    request: dict = {
        "resourceType": "ServiceRequest", "status": "active", "intent": "order",
        "identifier": [{"system": ORDER_SYSTEM, "value": f"{sr['id']}@{site_address}"}],
        "contained": [{"resourceType": "Patient", "id": "patient", **contained}],
        "code": {"coding": [{"system": CONSULT_KIND_SYSTEM, "code": PRIOR_REQUEST}]},
        "priority": sr.get("priority") or "routine",
        "subject": {"reference": "#patient"},
    }
    for key in ("occurrencePeriod", "note", "reasonCode", "authoredOn"):
        if sr.get(key):
            request[key] = sr[key]
    modalities = [e for e in sr.get("extension") or () if isinstance(e, dict) and e.get("url") == MODALITY_EXTENSION]
    if modalities:
        request["extension"] = modalities
    display = (sr.get("requester") or {}).get("display")
    if display:
        request["requester"] = {"display": display}
    return request


@dataclass(frozen=True)
class Query:
    """What B searches for (from A's request)."""

    order: str  # A's order identifier value
    patient: dict  # the contained Patient
    patient_ids: tuple[str, ...]
    date_from: str | None
    date_to: str | None
    modalities: tuple[str, ...]
    notes: tuple[str, ...]
    priority: str


def parse_request(resource: dict, sender: str) -> Query:
    """A's request as B reads it; INVALID when it is not a request of ``sender`` we can search for."""
    if PRIOR_REQUEST not in _kinds(resource):
        raise ServerError(ErrorKind.INVALID, "the ServiceRequest is no request for prior images")
    order = next((i.get("value") for i in resource.get("identifier") or ()
                  if isinstance(i, dict) and i.get("system") == ORDER_SYSTEM), None)
    split = split_order_identifier(order)
    if split is None or split[1] != normalize_address(sender):
        raise ServerError(ErrorKind.INVALID, f"the request names no order of {sender}")
    patients = [c for c in resource.get("contained") or () if isinstance(c, dict) and c.get("resourceType")
                == "Patient"]
    patient = patients[0] if patients else {}
    ids = tuple(i["value"] for i in patient.get("identifier") or () if isinstance(i, dict)
                and isinstance(i.get("value"), str) and i["value"].strip())
    if not ids:
        raise ServerError(ErrorKind.INVALID, "the request names no patient identifier to search for")
    period = resource.get("occurrencePeriod") or {}
    notes = tuple(n["text"][:MAX_NOTE] for n in resource.get("note") or ()
                  if isinstance(n, dict) and isinstance(n.get("text"), str))
    priority = resource.get("priority") if resource.get("priority") in ("routine", "urgent", "asap", "stat") \
        else "routine"
    return Query(order, {k: v for k, v in patient.items() if k != "id"}, ids, _da(period.get("start")),
                 _da(period.get("end"), end=True), tuple(modalities_of(resource)), notes, priority)


def found_output(row, *, local: bool) -> dict:
    """A Task.output for a study found at B: a literal reference at B, by identifier at A."""
    display = " ".join(x for x in (row.modalities_in_study or "", _date(row.study_date),
                                   row.study_description or "") if x).strip() or row.study_uid
    ref = {"reference": f"ImagingStudy/{row.study_uid}"} if local else \
        {"type": "ImagingStudy", "identifier": {"system": DICOM_UID_SYSTEM, "value": f"{OID_PREFIX}{row.study_uid}"}}
    return {"type": {"text": FOUND}, "valueReference": {**ref, "display": display[:200]}}


def _date(da: str | None) -> str:
    return f"{da[:4]}-{da[4:6]}-{da[6:8]}" if da and len(da) == 8 and da.isdigit() else ""


def found_uids(task: dict) -> list[str]:
    """The Study Instance UIDs a Task lists as found (B's literal references or A's identifiers)."""
    out = []
    for o in task.get("output") or ():
        if not isinstance(o, dict) or (o.get("type") or {}).get("text") != FOUND:
            continue
        ref = o.get("valueReference") or {}
        literal, ident = ref.get("reference"), (ref.get("identifier") or {}).get("value")
        if isinstance(literal, str) and literal.startswith("ImagingStudy/"):
            out.append(literal.split("/", 1)[1])
        elif isinstance(ident, str) and ident.startswith(OID_PREFIX):
            out.append(ident[len(OID_PREFIX):])
    return out


def for_a(outputs: list[dict]) -> list[dict]:
    """B's found outputs as A gets them (by identifier: B's ids mean nothing at A)."""
    out = []
    for o in outputs:
        ref = (o.get("valueReference") or {}) if isinstance(o, dict) else {}
        literal = ref.get("reference")
        if (o.get("type") or {}).get("text") == FOUND and isinstance(literal, str) and literal.startswith(
                "ImagingStudy/"):
            out.append({"type": {"text": FOUND}, "valueReference": {
                "type": "ImagingStudy", "identifier": {"system": DICOM_UID_SYSTEM,
                                                       "value": f"{OID_PREFIX}{literal.split('/', 1)[1]}"},
                "display": ref.get("display") or literal}})
    return out


# ---- at the requesting site (A) ------------------------------------------------------------------------------
class PriorsListener:
    """FHIR write listener at A: a new request for prior images makes, per performer, its order Task and the
    workflow message that carries it (same transaction); a bad request is 422 and nothing is stored or sent."""

    def __init__(self, orders) -> None:
        self.orders = orders  # the OrderListener: settings, sites, clock, fhir

    def __call__(self, tx: FhirTx, principal: Principal, interaction: str, new: Stored, old: Stored | None) -> None:
        if interaction != "create" or new.resource_type != "ServiceRequest" or new.deleted or \
                self.orders.fhir is None:
            return
        sr = new.resource()
        if is_prior_request(sr):
            self.request(tx, sr)

    def request(self, tx: FhirTx, sr: dict) -> list[str]:
        orders = self.orders
        tenant = tx.tenant
        issues = []
        patient = self._patient(tx, sr, issues)
        texts = [n.get("text") for n in sr.get("note") or () if isinstance(n, dict) and n.get("text")]
        if sum(len(t) for t in texts) > MAX_NOTE:
            issues.append(_issue("value", f"at most {MAX_NOTE} characters of notes travel with a request",
                                 "ServiceRequest.note"))
        try:
            site = orders.sites.of_tenant(tenant)
        except ServerError as exc:
            raise Unprocessable([_issue("not-supported", f"this site cannot send DICOM e-mail: {exc.message}",
                                        "ServiceRequest.performer")]) from exc
        targets: list[tuple[str, Recipient]] = []
        for i, p in enumerate(sr.get("performer") or ()):
            ref = p.get("reference") if isinstance(p, dict) else None
            try:
                targets.append((ref, recipient_of(orders.fhir, tenant, str(ref),
                                                  default_max_mail_size=orders.settings.default_max_mail_size)))
            except ServerError as exc:
                issues.append(_issue("not-found" if exc.kind is ErrorKind.NOT_FOUND else "value",
                                     f"no usable DICOM e-mail recipient: {exc.message}",
                                     f"ServiceRequest.performer[{i}]"))
        if issues:
            raise Unprocessable(issues)
        assert patient is not None
        body = json.dumps(request_resource(sr, patient, site_address=site.address), ensure_ascii=False,
                          separators=(",", ":"))
        now = orders.clock()
        ids = []
        for i, (ref, target) in enumerate(targets):
            task_id = order_task_id(tenant, sr["id"], i)
            task = order_task(sr, ref, REQUESTED, now)
            task["description"] = "Anforderung von Voraufnahmen"
            orders.fhir.create_in(tx, system_principal(tenant), task, base="/fhir", new_id=task_id)
            gw.create_job_in(tx.conn, tenant, gw.NewJob(
                kind=gw.JOB_MESSAGE, study_uid="", instances=(), recipient_address=target.address,
                sender_address=site.address, set_id=uuid.uuid4().hex, priority=int(priority_of(sr.get("priority"))),
                recipient_endpoint=f"Endpoint/{target.endpoint_id}", recipient_fingerprint=target.fingerprint,
                max_mail_size=target.max_mail_size, order_ref=f"ServiceRequest/{sr['id']}", order_task=task_id,
                order_json=body), now)
            ids.append(task_id)
        log.info("tenant %s: request for prior images ServiceRequest/%s sent to %d site(s)", tenant, sr["id"],
                 len(ids))
        return ids

    @staticmethod
    def _patient(tx: FhirTx, sr: dict, issues: list[dict]) -> dict | None:
        ref = (sr.get("subject") or {}).get("reference")
        stored = tx.current("Patient", ref.split("/", 1)[1]) if isinstance(ref, str) and ref.startswith(
            "Patient/") else None
        if stored is None or stored.deleted:
            issues.append(_issue("required", "a request for prior images names a Patient as subject",
                                 "ServiceRequest.subject"))
            return None
        patient = stored.resource()
        if not any(isinstance(i, dict) and i.get("value") for i in patient.get("identifier") or ()):
            issues.append(_issue("required", "the patient needs an identifier (the Patient ID the other site's "
                                 "archive knows)", "ServiceRequest.subject"))
        return patient


def received(workflow, tenant: str, s: gw.SetRow, reply) -> gw.SetRow:
    """A set of priors arrived at A (already imported as it is): recorded on A's order Task, which is completed
    when every study B found has arrived."""
    study = s.study_uid
    with workflow.fhir.store.transaction(tenant, write=True) as tx:
        stored = tx.current("Task", reply.order_task)
        task = stored.resource() if stored is not None and not stored.deleted else {}
        outputs = [{"type": {"text": ARRIVED}, "valueReference": {"reference": f"ImagingStudy/{study}"}}]
        found = set(found_uids(task)) | set(found_uids(reply.report)) | {study}
        have = {(o.get("valueReference") or {}).get("reference", "").split("/", 1)[-1]
                for o in task.get("output") or () if (o.get("type") or {}).get("text") == ARRIVED} | {study}
        wanted = TaskState("completed", RECEIVED) if found <= have else TaskState("in-progress", SENDING)
        move_task(workflow.fhir, tx, reply.order_task, wanted, workflow.clock(),
                  output=for_a(reply.report.get("output") or []) + outputs)
    gw.set_consult(workflow.engine, tenant, s.pk, reply.order_task)
    log.info("tenant %s: prior study %s from %s arrived for ServiceRequest/%s (%d of %d)", tenant, study, s.sender,
             reply.request_id, len(have & found), len(found))
    return dataclasses.replace(s, consult_task=reply.order_task)


# ---- at the consulting site (B) ------------------------------------------------------------------------------
def receive_request(workflow, tenant: str, sender: str, resource: dict) -> None:
    """A's request for prior images at B (module docstring); idempotent by A's order identifier."""
    query = parse_request(resource, sender)
    fhir: FhirService = workflow.fhir
    principal = system_principal(tenant)
    rows = workflow.archive.patient_studies(tenant, query.patient_ids, date_from=query.date_from,
                                            date_to=query.date_to, modalities=query.modalities,
                                            limit=MAX_STUDIES)
    auto = workflow.settings.prior_auto(sender)
    requester = organization_of(fhir, tenant, sender)
    site = workflow.sites.of_tenant(tenant)
    performer = organization_of(fhir, tenant, site.address)
    with fhir.store.transaction(tenant, write=True) as tx:
        tx.serialize("conditional/ServiceRequest")
        token = f"{ORDER_SYSTEM}|{query.order}".replace(",", "\\,")
        if fhir.search_in(tx, principal, "ServiceRequest", [("identifier", token), ("_count", "1")],
                          base="").get("entry"):
            log.info("tenant %s: request for prior images %s from %s again: answered before", tenant, query.order,
                     sender)
            return
        subject = _patient(fhir, tx, principal, query.patient)
        sr = {"resourceType": "ServiceRequest", "meta": {"profile": [SR_PROFILE]},
              "identifier": [{"system": ORDER_SYSTEM, "value": query.order}],
              "status": "active", "intent": "order", "priority": query.priority,
              "code": {"coding": [{"system": CONSULT_KIND_SYSTEM, "code": PRIOR_REQUEST,
                                   "display": "Voraufnahmen-Anforderung"}]},
              "subject": {"reference": subject}, "requester": requester, "performer": [performer],
              "authoredOn": instant(workflow.clock(), "seconds")}
        for key in ("occurrencePeriod", "reasonCode"):
            if resource.get(key):
                sr[key] = resource[key]
        if query.modalities:
            sr["extension"] = [{"url": MODALITY_EXTENSION, "valueCoding": {"system": DCM, "code": m}}
                               for m in query.modalities]
        if query.notes:
            sr["note"] = [{"text": n} for n in query.notes]
        sr_id = fhir.create_in(tx, principal, sr, base="").resource["id"]
        status, code = ("ready", NONE) if not rows else ("ready", SENDING) if auto else ("requested",
                                                                                        AWAITING_APPROVAL)
        task = {"resourceType": "Task", "meta": {"profile": [ORDER_TASK_PROFILE]},
                "status": status, "intent": "order", "priority": query.priority,
                "businessStatus": {"coding": [{"system": BUSINESS_STATUS_SYSTEM, "code": code}]},
                "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]},
                "description": f"Voraufnahmen für {requester.get('display') or sender}: {len(rows)} Studie(n) gefunden",
                "basedOn": [{"reference": f"ServiceRequest/{sr_id}"}],
                "focus": {"reference": f"ServiceRequest/{sr_id}"},
                "for": {"reference": subject}, "requester": requester, "owner": performer,
                "authoredOn": instant(workflow.clock(), "seconds"),
                "lastModified": instant(workflow.clock(), "seconds")}
        outputs = [found_output(r, local=True) for r in rows]
        if outputs:
            task["output"] = outputs
        task = fhir.create_in(tx, principal, task, base="").resource
        if rows and auto:
            send(workflow, tx, task, {**sr, "id": sr_id}, sender)
        else:
            queue_message(workflow, tx, sender, {**sr, "id": sr_id}, status_report(
                task, order=query.order, site_address=site.address, outputs=for_a(outputs)), task.get("priority"))
    log.info("tenant %s: request for prior images %s from %s: %d studies found, %s", tenant, query.order, sender,
             len(rows), "none to send" if not rows else "sending" if auto else "waiting for approval")


def _patient(fhir: FhirService, tx, principal, patient: dict) -> str:
    """Our Patient with one of the request's identifiers, else a new one made from it."""
    for ident in patient.get("identifier") or ():
        if not isinstance(ident, dict) or not ident.get("value"):
            continue
        token = f"{ident.get('system', '')}|{ident['value']}" if ident.get("system") else ident["value"]
        bundle = fhir.search_in(tx, principal, "Patient", [("identifier", token.replace(",", "\\,")),
                                                           ("_count", "1")], base="")
        for entry in bundle.get("entry", []):
            return f"Patient/{entry['resource']['id']}"
    created = fhir.create_in(tx, principal, {"resourceType": "Patient", **patient}, base="")
    return f"Patient/{created.resource['id']}"


def send(workflow, tx: FhirTx, task: dict, sr: dict, address: str) -> int:
    """The transfer jobs of the studies a priors Task lists (to ``address``, A) and the status report: in ``tx``."""
    site = workflow.sites.of_tenant(tx.tenant)
    order = next(i["value"] for i in sr.get("identifier") or () if i.get("system") == ORDER_SYSTEM)
    outputs = for_a([o for o in task.get("output") or () if isinstance(o, dict)])
    sending = {**task, "businessStatus": {"coding": [{"system": BUSINESS_STATUS_SYSTEM, "code": SENDING}]}}
    report = status_report(sending, order=order, site_address=site.address, outputs=outputs)
    body = json.dumps(report, ensure_ascii=False, separators=(",", ":"))
    target = recipient_by_address(workflow.fhir, tx.tenant, address,
                                  default_max_mail_size=workflow.settings.default_max_mail_size)
    count = 0
    for uid in found_uids(task):
        if workflow.index.study(tx.tenant, uid) is None:
            continue
        new = new_job(workflow.index, workflow.fhir, workflow.sites, tx.tenant, study_uid=uid, recipient=target,
                      priority=int(priority_of(task.get("priority"))), order_ref=f"ServiceRequest/{sr['id']}",
                      order_json=body)
        gw.create_job_in(tx.conn, tx.tenant, new, workflow.clock())
        count += 1
    queue_message(workflow, tx, address, sr, report, task.get("priority"))
    log.info("tenant %s: %d prior studies go to %s for %s", tx.tenant, count, address, order)
    return count
