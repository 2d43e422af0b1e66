"""Teleconsult orders at the requesting site (A): a ``ServiceRequest`` makes its order Task and its transfers
(issue 5; DESIGN.md section 1 flow 2, FHIR R4 workflow: ServiceRequest = authorisation, Task = execution).

``OrderListener`` is a FHIR write listener (``server.fhir.service.Listener``): when a teleconsult ServiceRequest
(profile teleconsult-servicerequest, status ``active``, a ``consult-kind`` code, ``performer`` the recipient
sites) is created, it writes, IN THE SAME TRANSACTION, one order Task (profile teleconsult-task, ``requested``,
``basedOn``/``focus`` the ServiceRequest, ``owner`` the performer) per performer and, when the study named in
``supportingInfo`` is in the tenant's archive, one transfer job per performer (``server.gateway.service.new_job``
+ ``server.store.gateway.create_job_in``) whose transfer Task is ``partOf`` the order Task. A study that has not
arrived yet (an ImagingStudy reference by identifier ``urn:dicom:uid`` | ``urn:oid:<uid>``) leaves the order
Task ``requested`` with businessStatus ``awaiting-study``; ``sweep_waiting`` (called by the sender's sweep)
starts the transfers once it is there. A bad order raises ``Unprocessable`` (422): nothing is stored or sent.

Send options (CodeSystem send-option, ``orderDetail``), applied to the job:

* ``key-images-only``: the study's Key Object Selection documents and the instances they select
  (``server.dicom.kos.select_key_images``; 422 when the study has none);
* ``anonymised``: a random secret per job (kept in the job row, never sent) with which the sender de-identifies
  every instance at send time (``server.dicom.deidentify.Pseudonymizer``, Basic Profile; deterministic, so a
  resend is byte-identical and the map can be recomputed for ``relink``);
* ``short-note``: the order's note (at most 1,000 characters) as a ``text/plain`` part of every mail;
* ``with-report``: the study's own SR and Encapsulated PDF instances travel (with ``key-images-only`` they are
  added to the key images); a ``DiagnosticReport`` in ``supportingInfo`` with a PDF ``presentedForm`` becomes an
  Encapsulated PDF instance of the study (``server.dicom.encapsulate``), durable in the blob store when the order
  commits, sent last in the set and indexed into the tenant's archive by the sender before its first mail
  (the archive's writer cannot join the FHIR write transaction). Not with ``anonymised`` (422: the PDF's
  content cannot be de-identified);
* emergency = ``priority`` ``stat``: job priority 3 (sent first, flagged in the mails);
* with ``anonymised`` only, the PS3.15 E.3 options (``server.dicom.deidentify.OPTION_CODES``: clean-descriptors,
  retain-longitudinal-full-dates or -modified-dates, retain-patient-characteristics, retain-device-identity,
  retain-institution-identity), added to the site's defaults (``Settings.deid_defaults``), go into the job's
  ``deid_options``; instances whose pixel data may carry burned-in identity (Burned In Annotation YES, or none on
  a Secondary Capture) are named in a German note on the order Task, or with ``exclude-burned-in`` not sent.

Every mail of an order's job also carries ``order_part`` (``order.json``, a FHIR ServiceRequest without patient
data) for recipients of DRG profile 1.6 or later; a 1.5 recipient gets the DICOM part only and cannot take a
``short-note`` (422).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from server.config import Settings
from server.dicom.deidentify import (DEID_CODES, EXCLUDE_BURNED_IN, OPTION_CODES, has_burned_in_annotation,
                                     identity_strings, options_from_codes, scrub_text)
from server.dicom.deidentify import Options as DeidOptions
from server.dicom.encapsulate import MAX_TITLE, encapsulated_pdf, pdf_from_fhir_attachment, study_context_from
from server.dicom.kos import InstanceRef, is_key_object, key_object_references, select_key_images
from server.errors import ErrorKind, ServerError
from server.fhir.outcome import Unprocessable
from server.fhir.service import FhirService
from server.fhir.task import BUSINESS_STATUS_SYSTEM, TaskState
from server.gateway.directory import Recipient, recipient_of, system_principal
from server.gateway.jobs import priority_of
from server.gateway.service import new_job
from server.gateway.sites import Sites
from server.gateway.tasks import ORDER_INTERMEDIATE, TASK_CODE_SYSTEM, instant, steps, task_hook
from server.mail.drg import Part, note as note_part
from server.security.tokens import Principal
from server.store import gateway as gw
from server.store.archive import Archive
from server.store.blobs import BlobStore
from server.store.fhir import FhirTx, Stored
from server.store.imaging import ImagingIndex

log = logging.getLogger(__name__)

BASE = "https://telerad-bridge.de/fhir"
ORDER_SYSTEM = f"{BASE}/sid/order"  # identifier of A's order as it travels: "<ServiceRequest id>@<A's address>"
SET_SYSTEM = f"{BASE}/sid/drg-set"  # a consult received with a DRG set: "<SETID>@<sender>" (server.gateway.consults)
#: Identifier systems of ServiceRequests received from other sites (the consults at B): never sent on.
RECEIVED_SYSTEMS = frozenset({ORDER_SYSTEM, SET_SYSTEM})
CONSULT_KIND_SYSTEM = f"{BASE}/CodeSystem/consult-kind"
SEND_OPTION_SYSTEM = f"{BASE}/CodeSystem/send-option"
ORDER_TASK_PROFILE = f"{BASE}/StructureDefinition/teleconsult-task"
DICOM_UID_SYSTEM = "urn:dicom:uid"
OID_PREFIX = "urn:oid:"
ORDER_MEDIA_TYPE = "application/fhir+json"
ORDER_FILENAME = "order.json"
MAX_NOTE = 1000  # characters of the order's note (issue 5: short note)
ORDER_INTENTS = frozenset({"order", "original-order"})
#: consult kinds that are no transfer of a study of ours (a priors request asks the other site to send).
NOT_TRANSFERS = frozenset({"prior-request"})
KEY_IMAGES, ANONYMISED, WITH_REPORT, SHORT_NOTE = "key-images-only", "anonymised", "with-report", "short-note"
SEND_OPTIONS = frozenset({KEY_IMAGES, ANONYMISED, WITH_REPORT, SHORT_NOTE, *DEID_CODES})
#: the two E.3.6 codes (Retain Longitudinal Temporal Information: Full Dates, Modified Dates): one or the other.
LONGITUDINAL = frozenset(c for c, (field, _) in OPTION_CODES.items() if field == "retain_longitudinal")
BURNED_IN_TAG = "00280301"  # Burned In Annotation (PS3.3 C.7.6.1), as a DICOM JSON key (PS3.18 F.2)
#: DRG profile versions whose receivers take non-DICOM parts beside the DICOM one (note, order.json).
EXTRA_PARTS_VERSIONS = frozenset({"1.6", "1.7"})
#: SOP Classes of reports sent with ``with-report`` (PS3.4 B.5: SR documents 1.2.840.10008.5.1.4.1.1.88.x,
#: Encapsulated PDF 1.2.840.10008.5.1.4.1.1.104.1).
REPORT_SOP_PREFIXES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.104.1")
AWAITING_STUDY, QUEUED = "awaiting-study", "transfer-queued"
REPORT_TITLE = "Befund"  # Document Title of a report PDF whose DiagnosticReport names none
TASK_NAMESPACE = uuid.UUID("6f1c3f0e-5b1e-4c47-9a8e-0d7f2c1b9a51")  # order Task ids: uuid5(tenant/sr/index)
SWEEP_BATCH = 100


# ---- the order as a value -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Order:
    """What a teleconsult ServiceRequest asks for."""

    id: str
    performers: tuple[str, ...]  # "HealthcareService/x", "Organization/y", ...
    study_uid: str
    options: frozenset[str]
    priority: str
    note: str | None
    report: str | None = None  # id of a DiagnosticReport to send as an Encapsulated PDF (with-report)
    deid: DeidOptions | None = None  # anonymised: the PS3.15 Annex E options (order's codes + site defaults)


@dataclass(frozen=True)
class Selection:
    """What an order sends of its present study: the SOP Instance UIDs, and for an anonymised order how many of
    ``total`` carry burned-in annotation (left out when ``excluded``, i.e. with exclude-burned-in)."""

    instances: frozenset[str]
    total: int
    burned_in: int = 0
    excluded: bool = False

    @property
    def note(self) -> str | None:
        """The German note for the clinician on the order Task (PS3.15 E.1: pixel data is not de-identified)."""
        if not self.burned_in:
            return None
        verb = "hat" if self.burned_in == 1 else "haben"
        head = f"{self.burned_in} von {self.total} Bildern {verb} eingebrannte Beschriftung (Burned In Annotation)"
        if self.excluded:
            return f"Hinweis: {head} und {'wird' if self.burned_in == 1 else 'werden'} nicht gesendet."
        return f"Achtung: {head}; die Pixeldaten werden nicht anonymisiert."


def _issue(code: str, message: str, expression: str) -> dict:
    return {"severity": "error", "code": code, "diagnostics": message, "expression": [expression]}


def _refuse(code: str, message: str, expression: str) -> Unprocessable:
    return Unprocessable([_issue(code, message, expression)])


def is_order(sr: dict) -> bool:
    """Whether a new ServiceRequest is a teleconsult order of this site that sends a study: active, intent
    order, a consult-kind code that is a transfer, a performer and an ImagingStudy in ``supportingInfo`` (a
    request without a study is only recorded); not an order received from another site (it carries the
    sender's order identifier or the DRG set's, ``RECEIVED_SYSTEMS``)."""
    if sr.get("resourceType") != "ServiceRequest" or sr.get("status") != "active":
        return False
    if sr.get("intent") not in ORDER_INTENTS or not sr.get("performer"):
        return False
    if any(isinstance(i, dict) and i.get("system") in RECEIVED_SYSTEMS for i in sr.get("identifier") or ()):
        return False
    kinds = [c.get("code") for c in (sr.get("code") or {}).get("coding") or ()
             if isinstance(c, dict) and c.get("system") == CONSULT_KIND_SYSTEM]
    if not kinds or any(k in NOT_TRANSFERS for k in kinds):
        return False
    return any(isinstance(ref, dict) and _study_of(ref)[0] is not None for ref in sr.get("supportingInfo") or ())


def _study_of(ref: dict) -> tuple[str | None, bool]:
    """(Study Instance UID, literal?) of a supportingInfo reference to an ImagingStudy, (None, _) otherwise."""
    literal = ref.get("reference")
    if isinstance(literal, str) and literal.startswith("ImagingStudy/"):
        return literal[len("ImagingStudy/"):], True
    ident = ref.get("identifier") or {}
    value = ident.get("value")
    if ref.get("type") in (None, "ImagingStudy") and ident.get("system") == DICOM_UID_SYSTEM \
            and isinstance(value, str) and value.startswith(OID_PREFIX):
        return value[len(OID_PREFIX):], False
    return None, False


def parse_order(sr: dict, defaults: frozenset[str] = frozenset()) -> Order:
    """The order of a teleconsult ServiceRequest; ``Unprocessable`` naming the element at fault. ``defaults``:
    the site's de-identification codes (``Settings.deid_default_codes``), added to every anonymised order's."""
    issues = []
    performers = []
    for i, p in enumerate(sr.get("performer") or ()):
        ref = p.get("reference") if isinstance(p, dict) else None
        if not isinstance(ref, str) or "/" not in ref:
            issues.append(_issue("required", "a performer must reference the recipient site of the directory",
                                 f"ServiceRequest.performer[{i}]"))
        else:
            performers.append(ref)
    studies, reports = [], []
    for i, ref in enumerate(sr.get("supportingInfo") or ()):
        if not isinstance(ref, dict):
            continue
        uid, _ = _study_of(ref)
        literal = ref.get("reference")
        if uid is not None:
            studies.append(uid)
        elif isinstance(literal, str) and literal.startswith("DiagnosticReport/"):
            reports.append((i, literal[len("DiagnosticReport/"):]))
    if len(set(studies)) != 1:
        issues.append(_issue("required", "supportingInfo must name exactly one ImagingStudy (a reference, or an "
                             "identifier urn:dicom:uid | urn:oid:<Study Instance UID>)",
                             "ServiceRequest.supportingInfo"))
    codes: dict[str, int] = {}  # send-option code -> index of its first orderDetail
    for i, detail in enumerate(sr.get("orderDetail") or ()):
        for coding in (detail or {}).get("coding") or ():
            if coding.get("system") == SEND_OPTION_SYSTEM and coding.get("code") in SEND_OPTIONS:
                codes.setdefault(coding["code"], i)
    deid_codes, deid, deid_issues = _deidentification(codes, defaults)
    issues += deid_issues
    options = set(codes) | deid_codes
    texts = [n.get("text") for n in sr.get("note") or () if isinstance(n, dict) and n.get("text")]
    note = "\n\n".join(texts) if texts else None
    if note is not None and len(note) > MAX_NOTE:
        issues.append(_issue("value", f"the note has {len(note)} characters; at most {MAX_NOTE} travel with an "
                             "order", "ServiceRequest.note"))
    if SHORT_NOTE in options and not note:
        issues.append(_issue("required", "the send option short-note needs a note", "ServiceRequest.note"))
    report = None
    if reports and WITH_REPORT in options:  # without with-report a DiagnosticReport is context, not sent
        if len(reports) > 1:
            issues.append(_issue("value", "one DiagnosticReport per order travels as a PDF",
                                 f"ServiceRequest.supportingInfo[{reports[1][0]}]"))
        if ANONYMISED in options:
            issues.append(_issue("not-supported", "a PDF report cannot be de-identified: anonymised orders send "
                                 "no DiagnosticReport", f"ServiceRequest.supportingInfo[{reports[0][0]}]"))
        report = reports[0][1]
    if issues:
        raise Unprocessable(issues)
    return Order(sr["id"], tuple(performers), studies[0], frozenset(options), sr.get("priority") or "routine",
                 note, report, deid)


def _deidentification(codes: dict[str, int], defaults: frozenset[str]) \
        -> tuple[frozenset[str], DeidOptions | None, list[dict]]:
    """(de-identification codes in effect, their PS3.15 Annex E options or None when not anonymised, issues) of an
    order's send-option ``codes`` (code -> orderDetail index). The E.3 codes and exclude-burned-in refine
    ``anonymised`` and need it; Full and Modified Dates exclude each other (E.3.6). The site's ``defaults`` apply
    to every anonymised order; an order's own E.3.6 choice replaces the default's."""
    own = {c: i for c, i in codes.items() if c in DEID_CODES}
    if ANONYMISED not in codes:
        return frozenset(), None, [
            _issue("business-rule", f"the send option {c} refines anonymised and is valid only with it",
                   f"ServiceRequest.orderDetail[{i}]") for c, i in sorted(own.items(), key=lambda x: x[1])]
    dates = sorted(own[c] for c in own.keys() & LONGITUDINAL)
    if len(dates) > 1:
        return frozenset(), None, [_issue(
            "business-rule", "retain-longitudinal-full-dates and retain-longitudinal-modified-dates exclude each "
            "other (DICOM PS3.15 E.3.6)", f"ServiceRequest.orderDetail[{dates[-1]}]")]
    effective = frozenset(own) | (defaults - LONGITUDINAL if dates else defaults)
    return effective, options_from_codes(effective), []


def _burned_in_annotation(meta: str | None) -> str | None:
    """Burned In Annotation (0028,0301) of an instance from its stored metadata (the whole top-level data set as
    DICOM JSON, PS3.18 F.2; ``server.dicom.parse``), None when absent."""
    if not meta or f'"{BURNED_IN_TAG}"' not in meta:
        return None
    try:
        values = (json.loads(meta).get(BURNED_IN_TAG) or {}).get("Value") or [None]
    except (ValueError, AttributeError):
        return None
    return values[0] if isinstance(values[0], str) else None


def order_part(service_request: dict, *, site_address: str) -> Part:
    """The ``order.json`` part every instance mail of an order's job carries: a FHIR R4 ServiceRequest with the
    order's identifier (``<id>@<A's site address>``), code, priority, send options, note, reason, authoredOn and
    the requester's display. No patient data (the patient travels in the DICOM, pseudonymised when anonymised)."""
    sr = service_request
    order: dict = {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
                   "identifier": [{"system": ORDER_SYSTEM, "value": f"{sr.get('id')}@{site_address}"}]}
    if sr.get("code"):
        order["code"] = sr["code"]
    order["priority"] = sr.get("priority") or "routine"
    details = [{"coding": [c for c in (d or {}).get("coding") or () if c.get("system") == SEND_OPTION_SYSTEM]}
               for d in sr.get("orderDetail") or ()]
    details = [d for d in details if d["coding"]]
    if details:
        order["orderDetail"] = details
    notes = [{"text": n["text"]} for n in sr.get("note") or () if isinstance(n, dict) and n.get("text")]
    if notes:
        order["note"] = notes
    if sr.get("reasonCode"):
        order["reasonCode"] = sr["reasonCode"]
    if sr.get("authoredOn"):
        order["authoredOn"] = sr["authoredOn"]
    display = (sr.get("requester") or {}).get("display")
    if display:
        order["requester"] = {"display": display}
    data = json.dumps(order, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return Part(content_type=ORDER_MEDIA_TYPE, data=data, filename=ORDER_FILENAME)


def report_pdf(report: dict) -> tuple[bytes, str] | None:
    """(PDF, title) of a DiagnosticReport: its first PDF ``presentedForm`` and a title for the Encapsulated PDF's
    Document Title (code text or display, else the attachment's title, else "Befund"); None without a PDF form.
    INVALID when the attachment's data cannot be used (``pdf_from_fhir_attachment``)."""
    forms = [f for f in report.get("presentedForm") or () if isinstance(f, dict)]
    pdfs = [f for f in forms if str(f.get("contentType", "")).split(";")[0].strip().lower()
            in ("application/pdf", "application/x-pdf")]
    if not pdfs:
        return None
    pdf = pdf_from_fhir_attachment(pdfs[0])
    code = report.get("code") or {}
    title = code.get("text") or next((c.get("display") for c in code.get("coding") or () if c.get("display")),
                                     None) or pdfs[0].get("title") or REPORT_TITLE
    return pdf, str(title)[:MAX_TITLE].replace("\\", "/")


def mail_parts(job: gw.Job) -> list[Part]:
    """The non-DICOM parts of every instance mail of ``job``: the short note, then order.json."""
    parts = []
    if SHORT_NOTE in job.options and job.note:
        parts.append(note_part(job.note))
    if job.order_json:
        parts.append(Part(content_type=ORDER_MEDIA_TYPE, data=job.order_json.encode("utf-8"),
                          filename=ORDER_FILENAME))
    return parts


def order_task_id(tenant: str, sr_id: str, index: int) -> str:
    """The id of the order Task for the ``index``-th performer of a ServiceRequest (stable, so a sweep finds it)."""
    return str(uuid.uuid5(TASK_NAMESPACE, f"{tenant}/{sr_id}/{index}"))


def order_task(sr: dict, performer: str, business_status: str, now: float, note: str | None = None) -> dict:
    """The order's Task for one performer (teleconsult-task), created ``requested``; ``note``: a note for the
    clinician (burned-in annotation of an anonymised order, ``Selection.note``)."""
    task: dict = {
        "resourceType": "Task",
        "meta": {"profile": [ORDER_TASK_PROFILE]},
        "status": "requested",
        "businessStatus": {"coding": [{"system": BUSINESS_STATUS_SYSTEM, "code": business_status}]},
        "intent": "order",
        "priority": sr.get("priority") or "routine",
        "code": {"coding": [{"system": TASK_CODE_SYSTEM, "code": "fulfill"}]},
        "description": "Teleconsult order: transfer of the study and the consultant's reply",
        "basedOn": [{"reference": f"ServiceRequest/{sr['id']}"}],
        "focus": {"reference": f"ServiceRequest/{sr['id']}"},
        "authoredOn": instant(now),
        "lastModified": instant(now),
        "owner": {"reference": performer},
    }
    subject = sr.get("subject")
    if isinstance(subject, dict) and str(subject.get("reference", "")).startswith("Patient/"):
        task["for"] = subject
    if isinstance(sr.get("requester"), dict):
        task["requester"] = sr["requester"]
    if note:
        task["note"] = [{"time": instant(now), "text": note}]
    return task


def _with_requester_name(tx: FhirTx, sr: dict) -> dict:
    """``sr`` with ``requester.display`` from the requesting Organization's name when it has no display."""
    requester = sr.get("requester")
    if not isinstance(requester, dict) or requester.get("display"):
        return sr
    ref = requester.get("reference")
    if not isinstance(ref, str) or not ref.startswith("Organization/"):
        return sr
    stored = tx.current("Organization", ref[len("Organization/"):])
    name = stored.resource().get("name") if stored is not None and not stored.deleted else None
    return {**sr, "requester": {**requester, "display": name}} if isinstance(name, str) and name else sr


# ---- the listener -------------------------------------------------------------------------------------------
class GatewayListener:
    """What the gateway's FHIR write listeners share (orders here, replies in ``server.gateway.workflow``): the
    archive, blob store and our sites, and the FhirService they write through (``bind``)."""

    def __init__(self, settings: Settings, engine, *, sites: Sites | Callable[[], Sites] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.engine = engine
        self.index = ImagingIndex(engine)
        self.archive = Archive(engine)
        self.blobs = BlobStore(settings.data_dir, fsync=settings.fsync)
        self._sites = sites
        self.clock = clock
        self.fhir: FhirService | None = None
        self.hook = None

    def bind(self, fhir: FhirService) -> None:
        """The FhirService this listener is registered with (Tasks are written through it)."""
        self.fhir = fhir
        self.hook = task_hook(fhir, "/fhir", strict=True)

    @property
    def sites(self) -> Sites:
        sites = self._sites
        if sites is None:
            sites = self._sites = Sites.load(self.settings.data_dir)
        elif callable(sites) and not isinstance(sites, Sites):
            sites = sites()
        return sites


class OrderListener(GatewayListener):
    """FHIR write listener: a new teleconsult ServiceRequest makes its order Tasks and transfer jobs in the write
    transaction (see the module docstring). ``bind`` gives it the FhirService it writes through."""

    def __call__(self, tx: FhirTx, principal: Principal, interaction: str, new: Stored, old: Stored | None) -> None:
        if interaction != "create" or new.resource_type != "ServiceRequest" or new.deleted or self.fhir is None:
            return
        sr = new.resource()
        if is_order(sr):
            self.order(tx, sr)

    # -- placing an order ----------------------------------------------------------------------------------
    def order(self, tx: FhirTx, sr: dict) -> list[str]:
        """Check the order, write its Tasks and (study present) its jobs; returns the order Task ids."""
        tenant = tx.tenant
        order = parse_order(sr, self.settings.deid_default_codes)
        try:
            site = self.sites.of_tenant(tenant)
        except ServerError as exc:
            raise _refuse("not-supported", f"this site cannot send DICOM e-mail: {exc.message}",
                          "ServiceRequest.performer") from exc
        targets = [self._recipient(tenant, ref, order, f"ServiceRequest.performer[{i}]")
                   for i, ref in enumerate(order.performers)]
        present = self._present(tenant, order.study_uid)
        report = selection = None
        if present:
            selection = self._check_study(tenant, order)
            report = self._report(tx, tenant, order)
        elif order.report is not None:
            self._report_pdf(tx, order)  # a bad report is refused now, not when the study arrives
        now = self.clock()
        ids = []
        for i, (ref, target) in enumerate(zip(order.performers, targets)):
            task_id = order_task_id(tenant, order.id, i)
            task = order_task(sr, ref, QUEUED if present else AWAITING_STUDY, now,
                              selection.note if selection is not None else None)
            self.fhir.create_in(tx, system_principal(tenant), task, base="/fhir", new_id=task_id)
            if present:
                self._start(tx, sr, order, target, task_id, site.address, report, selection)
            ids.append(task_id)
        return ids

    def _report_pdf(self, tx: FhirTx, order: Order) -> tuple[bytes, str]:
        """(PDF, title) of the order's DiagnosticReport (its first PDF ``presentedForm``); 422 otherwise."""
        where = "ServiceRequest.supportingInfo"
        stored = tx.current("DiagnosticReport", order.report)
        if stored is None or stored.deleted:
            raise _refuse("not-found", f"DiagnosticReport/{order.report} does not exist", where)
        try:
            found = report_pdf(stored.resource())
        except ServerError as exc:
            raise _refuse("value", f"DiagnosticReport/{order.report}: {exc.message}", where) from exc
        if found is None:
            raise _refuse("value", f"DiagnosticReport/{order.report} has no PDF presentedForm to send", where)
        return found

    def _report(self, tx: FhirTx, tenant: str, order: Order) -> tuple[str, str] | None:
        """(SOP Instance UID, blob) of the Encapsulated PDF made from the order's DiagnosticReport in the study
        (durable in the blob store; the sender indexes it into the archive before the first mail), or None."""
        if order.report is None:
            return None
        pdf, title = self._report_pdf(tx, order)
        rows = self.archive.instances(tenant, order.study_uid)
        context = study_context_from(self._blob(rows[0].blob))
        sop_uid = f"2.25.{uuid.uuid4().int}"  # PS3.5 B.2: a UUID-derived UID
        try:
            data = encapsulated_pdf(pdf, study=context, title=title, sop_uid=sop_uid)
        except ServerError as exc:
            raise _refuse("value", f"DiagnosticReport/{order.report}: {exc.message}",
                          "ServiceRequest.supportingInfo") from exc
        return sop_uid, gw.store_blob(self.blobs, data)

    def _recipient(self, tenant: str, ref: str, order: Order, where: str) -> Recipient:
        try:
            target = recipient_of(self.fhir, tenant, ref, default_max_mail_size=self.settings.default_max_mail_size)
        except ServerError as exc:
            code = "not-found" if exc.kind is ErrorKind.NOT_FOUND else "value"
            raise _refuse(code, f"no usable DICOM e-mail recipient: {exc.message}", where) from exc
        if SHORT_NOTE in order.options and target.drg_profile_version not in EXTRA_PARTS_VERSIONS:
            raise _refuse("not-supported", f"{ref} speaks DRG profile {target.drg_profile_version}, which carries "
                          "no note beside the DICOM part: short-note cannot be sent there", where)
        return target

    def _present(self, tenant: str, study_uid: str) -> bool:
        study = self.index.study(tenant, study_uid)
        return study is not None and bool(study.number_of_instances)

    def _check_study(self, tenant: str, order: Order) -> Selection:
        """What the present study sends with the order's options; refuses what it cannot satisfy (key images only
        without a KOS, exclude-burned-in with every instance flagged). An anonymised order counts the instances
        with burned-in annotation, whose pixel data PS3.15 E.1 leaves as it is (Clean Pixel Data is not done)."""
        rows = self.archive.instances(tenant, order.study_uid, with_meta=order.deid is not None)
        chosen = frozenset(self._pick(rows, order.options))
        if order.deid is None:
            return Selection(chosen, len(chosen))
        flagged = {r.sop_uid for r in rows if r.sop_uid in chosen
                   and has_burned_in_annotation(_burned_in_annotation(r.meta), r.sop_class_uid)}
        if EXCLUDE_BURNED_IN not in order.options:
            return Selection(chosen, len(chosen), len(flagged))
        rest = chosen - flagged
        if not rest:
            raise _refuse("value", f"all {len(chosen)} instances to send of study {order.study_uid} may carry "
                          "burned-in annotation: with exclude-burned-in nothing is left to send",
                          "ServiceRequest.orderDetail")
        return Selection(rest, len(chosen), len(flagged), excluded=True)

    def _pick(self, rows: list, options: frozenset[str]) -> list[str]:
        """The SOP Instance UIDs of the study's ``rows`` the options send: all, or with key-images-only the Key
        Object Selection documents and the instances they select (+ the reports with with-report)."""
        if KEY_IMAGES not in options:
            return [r.sop_uid for r in rows]
        refs = [InstanceRef.from_row(r) for r in rows]
        kos = [key_object_references(self._blob(r.blob)) for r in rows if is_key_object(r.sop_class_uid)]
        try:
            chosen = {i.sop_uid for i in select_key_images(refs, kos).instances}
        except ServerError as exc:
            raise _refuse("value", exc.message, "ServiceRequest.orderDetail") from exc
        if WITH_REPORT in options:
            chosen |= {r.sop_uid for r in rows if r.sop_class_uid.startswith(REPORT_SOP_PREFIXES)}
        return [r.sop_uid for r in rows if r.sop_uid in chosen]

    def _scrubbed(self, tx: FhirTx, sr: dict, order: Order, note: str | None) -> tuple[dict, str | None]:
        """``sr`` (its notes and reason texts) and ``note`` without the patient's names, IDs, accession number and
        birth date, as the study's DICOM and the EHR's Patient have them (``deidentify.scrub_text``)."""
        extra: list[str] = []
        ref = (sr.get("subject") or {}).get("reference")
        stored = tx.current("Patient", ref.split("/", 1)[1]) if isinstance(ref, str) and ref.startswith(
            "Patient/") else None
        if stored is not None and not stored.deleted:
            patient = stored.resource()
            for name in patient.get("name") or ():
                extra += [name.get("family") or "", *(name.get("given") or ()), name.get("text") or ""]
            extra += [i.get("value") or "" for i in patient.get("identifier") or () if isinstance(i, dict)]
        rows = self.archive.instances(tx.tenant, order.study_uid)
        needles = identity_strings(self._blob(rows[0].blob), tuple(e for e in extra if isinstance(e, str)))

        def clean(text: object) -> object:
            return scrub_text(text, needles) if isinstance(text, str) else text
        out = {**sr}
        if sr.get("note"):
            out["note"] = [{**n, "text": clean(n.get("text"))} if isinstance(n, dict) else n for n in sr["note"]]
        if sr.get("reasonCode"):
            out["reasonCode"] = [{**r, "text": clean(r.get("text"))} if isinstance(r, dict) and r.get("text")
                                 else r for r in sr["reasonCode"]]
        return out, clean(note) if note else note

    def _blob(self, digest: str) -> bytes:
        try:
            return self.blobs.path_of(digest).read_bytes()
        except OSError as exc:
            raise ServerError(ErrorKind.RESOURCES, "cannot read a Key Object Selection document of the study") \
                from exc

    def _start(self, tx: FhirTx, sr: dict, order: Order, target: Recipient, task_id: str, address: str,
               report: tuple[str, str] | None = None, selection: Selection | None = None) -> gw.Job:
        """The transfer job of one performer, in ``tx``; its Task mirror moves the order Task. ``report``: the
        (SOP Instance UID, blob) of the Encapsulated PDF to send last; ``selection``: what ``_check_study`` chose
        (None: chosen now). An anonymised job keeps a random secret and the Annex E options (never sent)."""
        tenant = tx.tenant
        extra_parts = target.drg_profile_version in EXTRA_PARTS_VERSIONS
        anonymised = order.deid is not None
        chosen = (selection or self._check_study(tenant, order)).instances

        def pick(instances: list[str]) -> list[str]:
            kept = [uid for uid in instances if uid in chosen]
            return [*kept, report[0]] if report is not None else kept
        note = order.note
        if anonymised:  # the texts that travel beside an anonymised study lose the patient's identity too
            sr, note = self._scrubbed(tx, sr, order, note)
        new = new_job(
            self.index, self.fhir, self.sites, tenant, study_uid=order.study_uid, recipient=target,
            priority=int(priority_of(order.priority)), pick=pick, report_blob=report[1] if report else None,
            order_ref=f"ServiceRequest/{order.id}", order_task=task_id,
            send_options=",".join(sorted(order.options)) or None,
            note=note if SHORT_NOTE in order.options and extra_parts else None,
            order_json=order_part(_with_requester_name(tx, sr), site_address=address).data.decode("utf-8")
            if extra_parts else None,
            deid_secret=secrets.token_hex(32) if anonymised else None,
            deid_options=json.dumps(order.deid.to_json()) if anonymised else None)
        if not new.instances:
            raise _refuse("value", f"study {order.study_uid} has nothing to send with these options",
                          "ServiceRequest.orderDetail")
        return gw.create_job_in(tx.conn, tenant, new, self.clock(), also=self.hook)

    # -- orders waiting for their study --------------------------------------------------------------------
    def sweep(self) -> int:
        """Start the transfers of order Tasks ``awaiting-study`` whose study has arrived; returns how many.
        An order that cannot start now (recipient gone, no key images) fails its order Task with the reason."""
        started = 0
        for site in self.sites:
            tenant = site.tenant
            principal = system_principal(tenant)
            with self.fhir.store.transaction(tenant, write=False) as tx:
                bundle = self.fhir.search_in(tx, principal, "Task", [
                    ("business-status", f"{BUSINESS_STATUS_SYSTEM}|{AWAITING_STUDY}"), ("status", "requested"),
                    ("_count", str(SWEEP_BATCH))], base="")
                waiting = []
                for entry in bundle.get("entry", []):
                    task = entry.get("resource", {})
                    ref = ((task.get("basedOn") or [{}])[0]).get("reference", "")
                    sr = tx.current("ServiceRequest", ref.partition("/")[2]) if ref.startswith("ServiceRequest/") \
                        else None
                    if sr is not None and not sr.deleted:
                        waiting.append((task, sr.resource()))
            for task, sr in waiting:
                try:
                    order = parse_order(sr)
                except ServerError:
                    continue
                if not self._present(tenant, order.study_uid):
                    continue
                started += self._start_waiting(tenant, task, sr, order, site.address)
        return started

    def _noted(self, tx: FhirTx, task: dict, text: str) -> None:
        """The order Task ``task`` with ``text`` added to its notes, in ``tx``."""
        new = {k: v for k, v in task.items() if k != "meta"}
        new["meta"] = {"profile": (task.get("meta") or {}).get("profile", [ORDER_TASK_PROFILE])}
        now = instant(self.clock())
        new.update(note=[*(task.get("note") or []), {"time": now, "text": text}], lastModified=now)
        self.fhir.update_in(tx, system_principal(tx.tenant), new, None, "/fhir")

    def _start_waiting(self, tenant: str, task: dict, sr: dict, order: Order, address: str) -> int:
        principal = system_principal(tenant)
        owner = (task.get("owner") or {}).get("reference", "")
        try:
            with self.fhir.store.transaction(tenant, write=True) as tx:
                stored = tx.current("Task", task["id"], lock=True)
                now = stored.resource() if stored is not None and not stored.deleted else None
                codes = [c.get("code") for c in ((now or {}).get("businessStatus") or {}).get("coding", [])]
                if now is None or now.get("status") != "requested" or AWAITING_STUDY not in codes:
                    return 0  # another worker started it, or the EHR changed it
                order = parse_order(sr, self.settings.deid_default_codes)  # the site's defaults of today
                target = self._recipient(tenant, owner, order, "Task.owner")
                selection = self._check_study(tenant, order)
                if selection.note:
                    self._noted(tx, now, selection.note)
                self._start(tx, sr, order, target, task["id"], address, self._report(tx, tenant, order), selection)
            log.info("tenant %s: order ServiceRequest/%s: study %s arrived, transfer to %s queued", tenant,
                     order.id, order.study_uid, owner)
            return 1
        except ServerError as exc:
            reason = "; ".join(i.get("diagnostics", "") for i in getattr(exc, "issues", ())) or exc.message
            log.warning("tenant %s: order ServiceRequest/%s cannot start: %s", tenant, order.id, reason)
            with self.fhir.store.transaction(tenant, write=True) as tx:
                stored = tx.current("Task", task["id"], lock=True)
                if stored is None or stored.deleted:
                    return 0
                old = stored.resource()
                for state in steps(old.get("status"), TaskState("failed", "failed"), ORDER_INTERMEDIATE) or ():
                    new = {k: v for k, v in old.items() if k != "meta"}
                    new["meta"] = {"profile": (old.get("meta") or {}).get("profile", [ORDER_TASK_PROFILE])}
                    new.update(status=state.status, lastModified=instant(self.clock()), businessStatus={
                        "coding": [{"system": BUSINESS_STATUS_SYSTEM, "code": state.business_status}]})
                    if state.status == "failed":
                        new["statusReason"] = {"text": reason[:1000]}
                    self.fhir.update_in(tx, principal, new, None, "/fhir")
                    old = new
            return 0


def sweep_waiting(fhir: FhirService) -> int:
    """The sweep of the OrderListener registered with ``fhir`` (none: 0)."""
    return sum(listener.sweep() for listener in getattr(fhir, "listeners", ()) if isinstance(listener, OrderListener))
