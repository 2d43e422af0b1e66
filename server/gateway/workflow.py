"""The consultant's answer travels back (issue 5; DESIGN.md 1 flow 4): Task states and reports from B to A.

At the consulting site B, ``ReplyListener`` (a FHIR write listener) watches the consult Tasks made for received
orders (``server.gateway.consults``). When B's EHR moves one, in the same transaction:

* accepted, in-progress, on-hold, rejected, cancelled, failed, or completed without a report: a **workflow
  message** job (``transfer_job.kind`` = message) to A: one signed+encrypted mail
  (``server.mail.drg.build_message_mail``) whose ``workflow.json`` is the consult Task as A needs it
  (``status_report``: status, statusReason, businessStatus, note, output; ``basedOn`` A's order identifier
  ``<A's ServiceRequest id>@<A's address>``; no patient data);
* completed with a report: a **reply set**, a transfer job of the report instances into B's copy of the study
  (pseudonymised when A anonymised it): the PDF of a ``DiagnosticReport`` (``Task.output`` or ``basedOn`` the
  consult's ServiceRequest) as an Encapsulated PDF instance, and the SR / Encapsulated PDF instances stored to the
  study at B after the order arrived; every mail carries the Task report as its ``order.json`` part.

Consults of legacy DRG gateways (no order of theirs) get no messages (they would refuse them), only the reply set
as plain DICOM.

At the requesting site A, ``Workflow`` receives both (``Inbound`` calls it):

* ``receive``: a workflow message; a Task report on one of our orders moves the order Task (``order_state``,
  along legal transitions; ``steps``). The order must name our address and have been sent to the (signed)
  sender: otherwise INVALID / NOT_FOUND, the mail is quarantined as ``bad-message``.
* ``reply_for`` / ``relinked`` / ``complete_reply``: a complete reply set is re-linked to the real patient and
  study (``server.dicom.deidentify.relink`` with the map rebuilt from the order job's secret: the same keyed
  derivation the sender used), imported, and becomes a ``DiagnosticReport`` (``basedOn`` A's ServiceRequest,
  subject A's patient, ``imagingStudy`` the real study, ``presentedForm`` the PDF); the order Task is completed
  with businessStatus ``report-received`` and the reports as output. Idempotent (identifier = the report's SOP
  Instance UID; the set remembers it was handled).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pydicom

from server.config import Settings
from server.dicom.deidentify import Options as DeidOptions, Pseudonymizer, PseudonymMap, relink
from server.dicom.encapsulate import (MAX_TITLE, encapsulated_pdf, extract_pdf,
                                      study_context_from)
from server.dicom.parse import parse_part10
from server.errors import ErrorKind, ServerError
from server.fhir.service import FhirService
from server.fhir.task import TaskState
from server.gateway.directory import Recipient, recipient_by_address, system_principal
from server.gateway.jobs import priority_of
from server.gateway import priors
from server.gateway.messages import (  # noqa: F401 (the report vocabulary is re-exported for callers)
                                     CONSULT_KIND_SYSTEM, CONSULT_TASK_SYSTEM, MAX_TEXT, ORDER_SYSTEM, SET_SYSTEM,
                                     TASK_PROFILE, _priority, _study_of, _text, is_legacy, is_priors, move_task,
                                     order_identifier_of, parse_report, queue_message, reported_order,
                                     split_order_identifier, status_report)
from server.gateway.orders import EXTRA_PARTS_VERSIONS, REPORT_SOP_PREFIXES, REPORT_TITLE, GatewayListener, report_pdf
from server.gateway.service import new_job
from server.gateway.sites import Sites, normalize_address
from server.gateway.tasks import CONSULTANT_CODES, instant  # noqa: F401 (CONSULTANT_CODES re-exported)
from server.security.tokens import Principal
from server.store import gateway as gw
from server.store.archive import Archive
from server.store.blobs import BlobStore
from server.store.fhir import FhirTx, Stored
from server.store.imaging import ImagingIndex

log = logging.getLogger(__name__)

BASE = "https://telerad-bridge.de/fhir"
DICOM_UID_SYSTEM, OID_PREFIX = "urn:dicom:uid", "urn:oid:"
LOINC = "http://loinc.org"
REPORT_CODE = {"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}
REPORT_CATEGORY = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
                               "display": "Radiology"}]}
PDF = "application/pdf"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"

#: B's consult Task status -> A's order Task (status, businessStatus). ``completed`` with a report arrives as the
#: reply set instead (``REPORT_RECEIVED``).
ORDER_BY_CONSULT: dict[str, TaskState] = {
    "received": TaskState("in-progress", "consultant-received"),
    "accepted": TaskState("in-progress", "consultant-accepted"),
    "in-progress": TaskState("in-progress", "consultant-working"),
    "on-hold": TaskState("in-progress", "consultant-on-hold"),
    "rejected": TaskState("failed", "rejected-by-consultant"),
    "cancelled": TaskState("failed", "cancelled-by-consultant"),
    "failed": TaskState("failed", "consultant-failed"),
    "completed": TaskState("completed", "completed-by-consultant"),
}
REPORT_RECEIVED = TaskState("completed", "report-received")
#: statusReason of A's failed order Task when B gave none (tb-task-1: a failed Task says why)
REASON_TEXT = {"rejected": "vom Konsiliarius abgelehnt", "cancelled": "vom Konsiliarius abgebrochen",
               "failed": "beim Konsiliarius gescheitert"}
#: B's statuses reported to A (a new consult is ``requested``; ``draft``/``ready`` never happen to it)
REPORTED = frozenset(ORDER_BY_CONSULT) - {"completed"}


# ---- pure ---------------------------------------------------------------------------------------------------
def pseudonym_map(secret_hex: str, options_json: str | None, uids: list[str],
                  patients: list[tuple[str, str]]) -> PseudonymMap:
    """The map an anonymised transfer used, rebuilt from the job's secret: the keyed derivation gives every
    original UID and patient the same pseudonym again (PS3.15 E.1: re-identification by the de-identifier)."""
    try:
        options = DeidOptions(**json.loads(options_json or "{}"))
    except (TypeError, ValueError) as exc:
        raise ServerError(ErrorKind.INVALID, "the order's de-identification options are unusable") from exc
    ps = Pseudonymizer(bytes.fromhex(secret_hex), options=options)
    for uid in uids:
        ps.new_uid(uid)
    for name, pid in patients:
        ps.patient_link(name, pid)
    return ps.mapping


def diagnostic_report(*, sop_uid: str, title: str, pdf: bytes | None, request: str, subject: dict | None,
                      study_uid: str, performer: dict | None, issued: str, conclusion: str | None = None) -> dict:
    """The DiagnosticReport of one report instance that came back (FHIR R4 diagnosticreport.html): identifier =
    its SOP Instance UID, ``basedOn`` our order, the real study, the PDF as ``presentedForm``."""
    report: dict = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": DICOM_UID_SYSTEM, "value": f"{OID_PREFIX}{sop_uid}"}],
        "basedOn": [{"reference": request}],
        "status": "final",
        "category": [REPORT_CATEGORY],
        "code": {"coding": [REPORT_CODE], "text": title},
        "issued": issued,
        "imagingStudy": [{"reference": f"ImagingStudy/{study_uid}"}],
    }
    if subject:
        report["subject"] = subject
    if performer:
        report["performer"] = [performer]
    if conclusion:
        report["conclusion"] = conclusion
    if pdf is not None:
        report["presentedForm"] = [{"contentType": PDF, "data": base64.b64encode(pdf).decode("ascii"),
                                    "title": title, "size": len(pdf)}]
    return report


class ReplyListener(GatewayListener):
    """FHIR write listener at B: a received consult's Task, moved by B's EHR, is reported to A (module docstring)."""

    def __call__(self, tx: FhirTx, principal: Principal, interaction: str, new: Stored, old: Stored | None) -> None:
        if (self.fhir is None or new.resource_type != "Task" or new.deleted or old is None or old.deleted
                or interaction != "update"):
            return
        task, before = new.resource(), old.resource()
        if task.get("status") == before.get("status") or \
                TASK_PROFILE not in (task.get("meta") or {}).get("profile", []):
            return
        consult = self._consult(tx, task)
        if consult is None:
            return
        sr, order, address = consult
        status = task.get("status")
        if is_priors(sr):
            if status == "accepted":  # a person approved: the studies found go to A, the Task shows it
                priors.send(self, tx, task, sr, address)
                move_task(self.fhir, tx, task["id"], TaskState("in-progress", priors.SENDING), self.clock())
            elif status in REPORTED and not (status == "in-progress" and before.get("status") == "accepted"):
                self._message(tx, task, sr, order, address, status_report(task, order=order,
                                                                           site_address=self._site(tx).address))
            return
        if status == "completed":
            self.reply(tx, task, sr, order, address)
        elif status in REPORTED and not is_legacy(sr):
            self._message(tx, task, sr, order, address, status_report(task, order=order,
                                                                       site_address=self._site(tx).address))

    def _site(self, tx: FhirTx):
        return self.sites.of_tenant(tx.tenant)

    def _consult(self, tx: FhirTx, task: dict) -> tuple[dict, str, str] | None:
        """(ServiceRequest, A's order identifier, A's address) of a consult we received; None otherwise."""
        ref = ((task.get("basedOn") or [{}])[0] or {}).get("reference", "")
        if not isinstance(ref, str) or not ref.startswith("ServiceRequest/"):
            return None
        stored = tx.current("ServiceRequest", ref.split("/", 1)[1])
        if stored is None or stored.deleted:
            return None
        sr = stored.resource()
        order = order_identifier_of(sr)
        split = split_order_identifier(order)
        if order is None or split is None:
            return None
        try:
            ours = normalize_address(self._site(tx).address)
        except ServerError:
            return None
        if split[1] == ours:
            return None  # an order of our own (its identifier is only set on orders received)
        return sr, order, split[1]

    def _recipient(self, tx: FhirTx, address: str) -> Recipient:
        assert self.fhir is not None
        return recipient_by_address(self.fhir, tx.tenant, address,
                                    default_max_mail_size=self.settings.default_max_mail_size)

    def _message(self, tx: FhirTx, task: dict, sr: dict, order: str, address: str, report: dict) -> gw.Job:
        """Queue the workflow message carrying ``report`` to A in ``tx``."""
        return queue_message(self, tx, address, sr, report, task.get("priority"))

    def reply(self, tx: FhirTx, task: dict, sr: dict, order: str, address: str) -> gw.Job | None:
        """The completed consult's answer to A: the reply set with its reports, or (no report) a message."""
        tenant = tx.tenant
        study_uid = _study_of(sr)
        site = self._site(tx)
        legacy = is_legacy(sr)
        chosen: list[str] = []  # the study's own new reports, then the PDF made from a DiagnosticReport
        report_blob = None
        outputs: list[dict] = []
        if study_uid and self.index.study(tenant, study_uid) is not None:
            received = gw.consult_set_instances(tx.conn, tenant, task["id"]) or set()
            for row in self.archive.instances(tenant, study_uid):
                if row.sop_class_uid.startswith(REPORT_SOP_PREFIXES) and row.sop_uid not in received:
                    chosen.append(row.sop_uid)
                    outputs.append(_output(row.sop_uid, "DICOM report"))
            pdf = self._report_pdf(tx, task, sr)
            if pdf is not None:
                sop_uid, report_blob, title = self._encapsulate(tenant, study_uid, *pdf)
                chosen.append(sop_uid)
                outputs.append(_output(sop_uid, title))
        report = status_report(task, order=order, site_address=site.address, outputs=outputs)
        if not chosen:
            if legacy:
                log.info("tenant %s: consult Task/%s completed without a report: nothing goes back to the legacy "
                         "gateway %s", tenant, task.get("id"), address)
                return None
            return self._message(tx, task, sr, order, address, report)
        target = self._recipient(tx, address)
        extra_parts = target.drg_profile_version in EXTRA_PARTS_VERSIONS
        wanted = set(chosen)

        def pick(instances: list[str]) -> list[str]:
            present = [uid for uid in instances if uid in wanted]
            return present + [uid for uid in chosen if uid not in present]
        assert self.fhir is not None
        new = new_job(self.index, self.fhir, self.sites, tenant, study_uid=study_uid, recipient=target,
                      priority=int(priority_of(_priority(task))), pick=pick, report_blob=report_blob,
                      order_ref=f"ServiceRequest/{sr['id']}",
                      order_json=json.dumps(report, ensure_ascii=False, separators=(",", ":"))
                      if extra_parts and not legacy else None)
        job = gw.create_job_in(tx.conn, tenant, new, self.clock(), also=self.hook)
        log.info("tenant %s: consult Task/%s completed: %d report instance(s) go back to %s (job %s)", tenant,
                 task.get("id"), len(chosen), target.address, job.job_id)
        return job

    def _report_pdf(self, tx: FhirTx, task: dict, sr: dict) -> tuple[bytes, str] | None:
        """(PDF, title) of the consult's DiagnosticReport: a Task.output reference, else the newest one
        ``basedOn`` the ServiceRequest, with a PDF presentedForm; None when there is none."""
        ids = [ref["reference"].split("/", 1)[1] for o in task.get("output") or () if isinstance(o, dict)
               for ref in [o.get("valueReference") or {}]
               if isinstance(ref.get("reference"), str) and ref["reference"].startswith("DiagnosticReport/")]
        if not ids:
            assert self.fhir is not None
            bundle = self.fhir.search_in(tx, system_principal(tx.tenant), "DiagnosticReport",
                                         [("based-on", f"ServiceRequest/{sr['id']}"), ("_count", "20")], base="")
            found = [e["resource"] for e in bundle.get("entry", [])]
            found.sort(key=lambda r: str((r.get("meta") or {}).get("lastUpdated", "")), reverse=True)
            ids = [r["id"] for r in found]
        for rid in ids:
            stored = tx.current("DiagnosticReport", rid)
            found = report_pdf(stored.resource()) if stored is not None and not stored.deleted else None
            if found is not None:
                return found
        return None

    def _encapsulate(self, tenant: str, study_uid: str, pdf: bytes, title: str) -> tuple[str, str, str]:
        """(SOP Instance UID, blob, title) of the report PDF as an Encapsulated PDF instance of B's copy of the
        study (its patient and study attributes: the pseudonyms when the study came anonymised)."""
        rows = self.archive.instances(tenant, study_uid)
        context = study_context_from(self.blobs.path_of(rows[0].blob).read_bytes())
        sop_uid = f"2.25.{uuid.uuid4().int}"
        data = encapsulated_pdf(pdf, study=context, title=title, sop_uid=sop_uid)
        return sop_uid, gw.store_blob(self.blobs, data), title


def _output(sop_uid: str, title: str) -> dict:
    return {"type": {"text": "report"},
            "valueReference": {"type": "DiagnosticReport",
                               "identifier": {"system": DICOM_UID_SYSTEM, "value": f"{OID_PREFIX}{sop_uid}"},
                               "display": title}}


# ---- at the requesting site (A) ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    """A reply set to one of our orders: the order and the job that sent it (its secret re-links the reply)."""

    request_id: str
    order_task: str
    job: gw.Job
    report: dict


class Workflow:
    """A's side of the answers (module docstring): status messages and reply sets."""

    def __init__(self, settings: Settings, engine, blobs: BlobStore, archive: Archive, fhir: FhirService,
                 sites: Sites, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.engine = engine
        self.blobs = blobs
        self.archive = archive
        self.fhir = fhir
        self.sites = sites
        self.clock = clock
        self.index = ImagingIndex(engine)

    # -- messages ----------------------------------------------------------------------------------------------
    def receive(self, tenant: str, sender: str, data: bytes) -> None:
        """Apply one workflow message from ``sender`` (its signature checked by the caller); idempotent.
        INVALID / NOT_FOUND when it is not for one of our orders sent to that sender."""
        resource = parse_report(data)
        if resource["resourceType"] == "Task":
            self._status(tenant, normalize_address(sender), resource)
            return
        priors.receive_request(self, tenant, normalize_address(sender), resource)

    def order_of(self, tenant: str, sender: str, report: dict) -> tuple[str, gw.Job]:
        """(our ServiceRequest id, the newest job of that order to ``sender``) a report names."""
        site = self.sites.of_tenant(tenant)
        request_id = reported_order(report, site.address)
        jobs = [j for j in gw.order_jobs(self.engine, tenant, f"ServiceRequest/{request_id}", sender)
                if j.order_task]
        if not jobs:
            raise ServerError(ErrorKind.NOT_FOUND, f"ServiceRequest/{request_id} was never sent to {sender}")
        return request_id, jobs[-1]

    def _status(self, tenant: str, sender: str, report: dict) -> None:
        request_id, job = self.order_of(tenant, sender, report)
        status = report.get("status")
        wanted = ORDER_BY_CONSULT.get(str(status))
        if self._is_priors(tenant, request_id):  # the answer to a request for prior images: by businessStatus
            codes = [c.get("code") for c in (report.get("businessStatus") or {}).get("coding") or ()]
            by_code = next((priors.ORDER_BY_PRIORS[c] for c in codes if c in priors.ORDER_BY_PRIORS), None)
            wanted = wanted if status in ("rejected", "cancelled", "failed") else by_code
        if wanted is None:
            log.info("tenant %s: %s reports ServiceRequest/%s as %s: nothing to follow", tenant, sender,
                     request_id, status)
            return
        reason = _text((report.get("statusReason") or {}).get("text")) if isinstance(report.get("statusReason"),
                                                                                     dict) else None
        notes = [_text(n.get("text")) for n in report.get("note") or () if isinstance(n, dict)]
        note = "; ".join(n for n in notes if n) or None
        who = _text((report.get("owner") or {}).get("display")) or sender
        with self.fhir.store.transaction(tenant, write=True) as tx:
            moved = move_task(self.fhir, tx, job.order_task, wanted, self.clock(),
                              reason=f"{who}: {reason or REASON_TEXT.get(str(status), status)}",
                              output=_outputs(report),
                              note=f"{who}: {note}" if note else None)
        log.log(logging.WARNING if wanted.status == "failed" else logging.INFO,
                "tenant %s: %s reports ServiceRequest/%s as %s%s", tenant, sender, request_id, status,
                "" if moved else " (the order Task is closed already: unchanged)")

    def _is_priors(self, tenant: str, request_id: str) -> bool:
        with self.fhir.store.transaction(tenant, write=False) as tx:
            stored = tx.current("ServiceRequest", request_id)
        return stored is not None and not stored.deleted and is_priors(stored.resource())

    # -- reply sets ------------------------------------------------------------------------------------------
    def reply_for(self, tenant: str, s: gw.SetRow) -> Reply | None:
        """The reply a complete set is (its order.json is a Task report on one of our orders to its sender)."""
        if not s.order_json:
            return None
        try:
            report = json.loads(s.order_json)
        except ValueError:
            return None
        if not isinstance(report, dict) or report.get("resourceType") != "Task":
            return None
        try:
            request_id, job = self.order_of(tenant, normalize_address(s.sender), report)
        except ServerError as exc:
            log.warning("set %s from %s for %s: a reply, but %s: imported as a study", s.set_id, s.sender, tenant,
                        exc.message)
            return None
        return Reply(request_id, job.order_task or "", job, report)

    def relinked(self, tenant: str, reply: Reply, parts: list[gw.Part]) -> list[gw.Part]:
        """The parts re-linked to the real patient and study (an anonymised order), their blobs durable."""
        job = reply.job
        if not job.deid_secret:
            return parts
        rows = self.archive.instances(tenant, job.study_uid)
        uids = [job.study_uid, *sorted({r.series_uid for r in rows}), *[r.sop_uid for r in rows]]
        study = self.index.study(tenant, job.study_uid)
        patients = [(study.patient_name or "", study.patient_id or "")] if study is not None else []
        mapping = pseudonym_map(job.deid_secret, job.deid_options, uids, patients)
        out = []
        for part in parts:
            data = relink(self.blobs.path_of(part.blob_sha256).read_bytes(), mapping)
            out.append(dataclasses.replace(part, blob_sha256=self.blobs.put(data)))
        return out

    def complete_reply(self, tenant: str, s: gw.SetRow, parts: list[gw.Part], reply: Reply) -> gw.SetRow:
        """DiagnosticReports for the imported reply and the order Task completed; recorded on the set. Prior
        studies sent for a request of ours are recorded on its Task instead (``priors.received``)."""
        if self._is_priors(tenant, reply.request_id):
            return priors.received(self, tenant, s, reply)
        principal = system_principal(tenant)
        issued = instant(self.clock(), "seconds")
        outputs = []
        with self.fhir.store.transaction(tenant, write=True) as tx:
            stored = tx.current("ServiceRequest", reply.request_id)
            sr = stored.resource() if stored is not None and not stored.deleted else {}
            subject = sr.get("subject") if isinstance(sr.get("subject"), dict) else None
            performer = {"display": _text((reply.report.get("owner") or {}).get("display")) or s.sender}
            for part in parts:
                parsed = parse_part10(self.blobs.path_of(part.blob_sha256))
                data = self.blobs.path_of(part.blob_sha256).read_bytes()
                pdf = extract_pdf(data) if parsed.sop_class_uid == ENCAPSULATED_PDF else None
                title = _title(data) or REPORT_TITLE
                resource = diagnostic_report(
                    sop_uid=parsed.sop_instance_uid, title=title, pdf=pdf,
                    request=f"ServiceRequest/{reply.request_id}", subject=subject, study_uid=parsed.study_uid,
                    performer=performer, issued=issued,
                    conclusion=None if pdf else "Strukturierter Befund (DICOM SR) in der Studie abgelegt")
                ident = f"{DICOM_UID_SYSTEM}|{OID_PREFIX}{parsed.sop_instance_uid}"
                result = self.fhir.create_in(tx, principal, resource, base="/fhir",
                                             if_none_exist=f"identifier={ident}")
                outputs.append({"type": {"text": "report"},
                                "valueReference": {"reference": f"DiagnosticReport/{result.resource['id']}"}})
            move_task(self.fhir, tx, reply.order_task, REPORT_RECEIVED, self.clock(), output=outputs)
        gw.set_consult(self.engine, tenant, s.pk, reply.order_task)
        log.info("set %s from %s for %s: the reply to ServiceRequest/%s: %d report(s), order Task/%s completed",
                 s.set_id, s.sender, tenant, reply.request_id, len(outputs), reply.order_task)
        return dataclasses.replace(s, consult_task=reply.order_task)


def _outputs(report: dict) -> list[dict] | None:
    """The outputs of a Task report worth keeping at A (study and report references by identifier)."""
    kept = [o for o in report.get("output") or () if isinstance(o, dict) and isinstance(o.get("valueReference"), dict)
            and isinstance(o.get("type"), dict)]
    return kept or None


def _title(data: bytes) -> str | None:
    """A report instance's title: Document Title (0042,0010), else the Concept Name's meaning (PS3.3 C.24.2,
    C.17.3); None when it has neither or they cannot be read."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                             specific_tags=["DocumentTitle", "ConceptNameCodeSequence"])
        title = str(ds.get("DocumentTitle") or "").strip()
        if not title and ds.get("ConceptNameCodeSequence"):
            title = str(ds.ConceptNameCodeSequence[0].get("CodeMeaning") or "").strip()
    except Exception:  # noqa: BLE001 - a title is a nicety; the report stands without it
        return None
    return title[:MAX_TITLE] or None
