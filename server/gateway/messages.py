"""Task reports between the sites of a teleconsult (issue 5): what travels in a workflow message or a reply set's
order.json, and how a received report moves a local Task. Shared by ``server.gateway.workflow`` (consult answers)
and ``server.gateway.priors`` (requests for prior images).

A report is a FHIR R4 Task without patient data whose ``basedOn`` names the requesting site's order by identifier
(``https://telerad-bridge.de/fhir/sid/order`` | ``<ServiceRequest id>@<site address>``); a workflow message is a
``transfer_job`` of kind message (``queue_message``), sent by the gateway's sender like any DICOM e-mail.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

from server.errors import ErrorKind, ServerError
from server.fhir.model import parse_resource
from server.fhir.service import FhirService
from server.fhir.task import BUSINESS_STATUS_SYSTEM, TaskState
from server.gateway.directory import recipient_by_address, system_principal
from server.gateway.jobs import priority_of
from server.gateway.sites import normalize_address
from server.gateway.tasks import ORDER_INTERMEDIATE, instant, steps
from server.store import gateway as gw
from server.store.fhir import FhirTx

log = logging.getLogger(__name__)

BASE = "https://telerad-bridge.de/fhir"
ORDER_SYSTEM = f"{BASE}/sid/order"  # "<A's ServiceRequest id>@<A's address>" (server.gateway.orders)
SET_SYSTEM = f"{BASE}/sid/drg-set"
CONSULT_TASK_SYSTEM = f"{BASE}/sid/consult-task"  # B's consult Task as it travels: "<Task id>@<B's address>"
TASK_PROFILE = f"{BASE}/StructureDefinition/teleconsult-task"
CONSULT_KIND_SYSTEM = f"{BASE}/CodeSystem/consult-kind"
MAX_TEXT = 1000


def split_order_identifier(value: object) -> tuple[str, str] | None:
    """``<ServiceRequest id>@<site address>`` -> (id, normalized address); None when it is not one."""
    if not isinstance(value, str) or "@" not in value or len(value) > 512:
        return None
    rid, _, address = value.partition("@")
    address = normalize_address(address)
    if not rid or "@" not in address:
        return None
    return rid, address


def order_identifier_of(resource: dict, system: str = ORDER_SYSTEM) -> str | None:
    """The value of a resource's identifier in ``system`` (the first)."""
    for ident in resource.get("identifier") or ():
        if isinstance(ident, dict) and ident.get("system") == system and isinstance(ident.get("value"), str):
            return ident["value"]
    return None


def is_priors(sr: dict) -> bool:
    """A request for prior images (consult-kind prior-request), sent or received."""
    return any(isinstance(c, dict) and c.get("system") == CONSULT_KIND_SYSTEM and c.get("code") == "prior-request"
               for c in (sr.get("code") or {}).get("coding") or ())


def is_legacy(sr: dict) -> bool:
    """A consult received from a legacy DRG gateway: its order identifier is the set's (no order.json came)."""
    order, drg_set = order_identifier_of(sr), order_identifier_of(sr, SET_SYSTEM)
    return order is not None and order == drg_set


def _text(value: object) -> str | None:
    return value.strip()[:MAX_TEXT] if isinstance(value, str) and value.strip() else None


def status_report(task: dict, *, order: str, site_address: str, outputs: list[dict] | None = None) -> dict:
    """The consult Task ``task`` as B reports it to A (a FHIR R4 Task, no patient data): status, statusReason,
    businessStatus, notes, lastModified; ``basedOn`` A's order identifier ``order``; ``outputs`` e.g. the reports
    that travel in the reply set."""
    report: dict = {
        "resourceType": "Task",
        "identifier": [{"system": CONSULT_TASK_SYSTEM, "value": f"{task.get('id')}@{site_address}"}],
        "basedOn": [{"type": "ServiceRequest", "identifier": {"system": ORDER_SYSTEM, "value": order}}],
        "status": task.get("status"),
        "intent": task.get("intent") or "order",
        "priority": task.get("priority") or "routine",
        "lastModified": task.get("lastModified") or instant(time.time()),
    }
    for key in ("statusReason", "businessStatus", "code"):
        if isinstance(task.get(key), dict):
            report[key] = task[key]
    notes = [{"text": t} for t in (_text(n.get("text")) for n in task.get("note") or () if isinstance(n, dict)) if t]
    if notes:
        report["note"] = notes
    owner = task.get("owner")
    if isinstance(owner, dict) and _text(owner.get("display")):
        report["owner"] = {"display": _text(owner["display"])}
    if outputs:
        report["output"] = outputs
    return report


def parse_report(data: bytes) -> dict:
    """A workflow message's resource as a structure-checked R4 resource dict; INVALID otherwise."""
    try:
        resource = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ServerError(ErrorKind.INVALID, f"workflow.json is no JSON: {exc}") from exc
    if not isinstance(resource, dict) or resource.get("resourceType") not in ("Task", "ServiceRequest"):
        raise ServerError(ErrorKind.INVALID, "workflow.json is neither a Task nor a ServiceRequest")
    stand_in = {"subject": resource.get("subject") or {"display": "patient"}} \
        if resource["resourceType"] == "ServiceRequest" else {}
    parse_resource({**resource, **stand_in})  # INVALID with the element at fault
    return resource


def reported_order(report: dict, site_address: str) -> str:
    """Our ServiceRequest id a Task report is about; INVALID when it names no order of ``site_address``."""
    for ref in report.get("basedOn") or ():
        ident = (ref or {}).get("identifier") if isinstance(ref, dict) else None
        if isinstance(ident, dict) and ident.get("system") == ORDER_SYSTEM:
            split = split_order_identifier(ident.get("value"))
            if split is not None and split[1] == normalize_address(site_address):
                return split[0]
            raise ServerError(ErrorKind.INVALID, f"the report names the order {str(ident.get('value'))[:120]!r}, "
                                                 f"not one of {site_address}")
    raise ServerError(ErrorKind.INVALID, "the report names no order (Task.basedOn identifier "
                                         f"{ORDER_SYSTEM})")


def _state(task: dict, state: TaskState, when: float, reason: str | None = None,
           output: list[dict] | None = None) -> dict:
    """``task`` in ``state`` (meta reduced to the profile, a reason for failures, outputs added once)."""
    new = {k: v for k, v in task.items() if k not in ("meta", "statusReason")}
    new["meta"] = {"profile": (task.get("meta") or {}).get("profile", [TASK_PROFILE])}
    new["status"] = state.status
    new["businessStatus"] = {"coding": [{"system": BUSINESS_STATUS_SYSTEM, "code": state.business_status}]}
    new["lastModified"] = instant(when)
    if reason and state.status in ("failed", "rejected", "cancelled", "on-hold"):
        new["statusReason"] = {"text": reason[:MAX_TEXT]}
    if output:
        known = task.get("output") or []
        new["output"] = known + [o for o in output if o not in known]
    return new


def move_task(fhir: FhirService, tx: FhirTx, task_id: str, wanted: TaskState, when: float, *,
              reason: str | None = None, output: list[dict] | None = None, note: str | None = None) -> bool:
    """Move a Task to ``wanted`` along legal transitions (intermediate versions on the way); False when it is
    terminal already or gone. Writing the same state again changes nothing."""
    stored = tx.current("Task", task_id, lock=True)
    if stored is None or stored.deleted:
        return False
    old = stored.resource()
    path = steps(old.get("status"), wanted, ORDER_INTERMEDIATE)
    if path is None:
        return False
    principal = system_principal(tx.tenant)
    for i, state in enumerate(path):
        last = i == len(path) - 1
        new = _state(old, state, when, reason if last else None, output if last else None)
        if last and note and all(n.get("text") != note for n in old.get("note") or ()):
            new["note"] = [*(old.get("note") or []), {"text": note[:MAX_TEXT]}]
        if all(new.get(k) == old.get(k) for k in ("status", "businessStatus", "statusReason", "output", "note")):
            continue
        fhir.update_in(tx, principal, new, None, "/fhir")
        old = new
    return True


# ---- at the consulting site (B) ------------------------------------------------------------------------------
def queue_message(owner, tx: FhirTx, address: str, sr: dict, report: dict, priority: object = None) -> gw.Job:
    """Queue, in ``tx``, the workflow message carrying ``report`` to the site ``address`` about the received order
    ``sr`` (``owner``: a ReplyListener or Workflow: settings, sites, fhir, clock)."""
    target = recipient_by_address(owner.fhir, tx.tenant, address,
                                  default_max_mail_size=owner.settings.default_max_mail_size)
    site = owner.sites.of_tenant(tx.tenant)
    new = gw.NewJob(
        kind=gw.JOB_MESSAGE, study_uid=_study_of(sr) or "", instances=(), recipient_address=target.address,
        sender_address=site.address, set_id=uuid.uuid4().hex,
        priority=int(priority_of(_priority({"priority": priority}))),
        recipient_endpoint=f"Endpoint/{target.endpoint_id}", recipient_fingerprint=target.fingerprint,
        max_mail_size=target.max_mail_size, order_ref=f"ServiceRequest/{sr['id']}",
        order_json=json.dumps(report, ensure_ascii=False, separators=(",", ":")))
    job = gw.create_job_in(tx.conn, tx.tenant, new, owner.clock())
    log.info("tenant %s: %s is %s: reported to %s (message job %s)", tx.tenant, report["identifier"][0]["value"],
             report.get("status"), target.address, job.job_id)
    return job


def _priority(resource: dict) -> str:
    value = resource.get("priority")
    return value if value in ("routine", "urgent", "asap", "stat") else "routine"


def _study_of(sr: dict) -> str | None:
    for ref in sr.get("supportingInfo") or ():
        literal = ref.get("reference") if isinstance(ref, dict) else None
        if isinstance(literal, str) and literal.startswith("ImagingStudy/"):
            return literal.split("/", 1)[1]
    return None
