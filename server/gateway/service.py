"""The gateway's transfer jobs as a service: queue a study for a recipient, list, inspect and steer jobs, inbound
sets and quarantine (DESIGN.md sections 3 and 4). No HTTP; SQL through ``server.store.gateway`` (which owns the
transactions); the FHIR Task mirror runs in the job's transaction (``server.gateway.tasks``).

Scopes (SMART v2, ``Principal.allows``): a transfer job is shown as its Task, so reading jobs, sets and the
quarantine needs read on Task, queueing a job create on Task (and read on ImagingStudy: it sends the study),
pause/resume/abort/retry and discarding a set update on Task, deleting a job delete on Task, importing a set
create on ImagingStudy; the transfer statistics need read on Task like the lists.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from server.config import Settings
from server.errors import ErrorKind, ServerError, invalid, not_found
from server.fhir.service import FhirService
from server.gateway import stats
from server.gateway.directory import Recipient, recipient_of, system_principal
from server.gateway.jobs import STATES_BY_FILTER, Action, parse_filter, priority_of
from server.gateway.sites import Sites, normalize_address
from server.gateway.tasks import current_task, generation_id, task_hook
from server.security.tokens import Access, Principal
from server.store import gateway as gw
from server.store import gateway_stats as gs
from server.store.archive import Archive
from server.store.imaging import ImagingIndex

TASK, STUDY = "Task", "ImagingStudy"
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # PS3.5 9.1
MAX_UID = 64
MAX_LIMIT = 500
SET_STATES = (gw.COLLECTING, gw.COMPLETE, gw.IMPORTED, gw.REPORTED, gw.DISCARDED)
NAME_LOOKUP_BATCH = 50  # partner addresses per directory search (comma-separated alternatives)
log = logging.getLogger(__name__)


class Inbound(Protocol):
    """What the gateway needs of inbound processing (written elsewhere)."""

    def import_set(self, tenant: str, set_pk: int, *, operator: bool = False) -> object:
        """Import the instances of a set into the archive."""

    def discard_set(self, tenant: str, set_pk: int) -> object:
        """Discard a set that was not imported."""


@dataclass(frozen=True)
class JobView:
    """A job with the reference of its current FHIR Task and (for one job) its mails."""

    job: gw.Job
    task: str | None  # "Task/<id>"
    mails: tuple[gw.Mail, ...] = ()


@dataclass(frozen=True)
class Page:
    """One page of a list and the total count."""

    total: int
    items: tuple


def _uid(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_UID or not UID.match(value):
        raise invalid(f"{what} {value!r} is not a DICOM UID", parameter=what)
    return value


def _cut(value: str | None, size: int = 256) -> str | None:
    """A job list column: empty is absent, longer values are cut to the column's size."""
    return value[:size] if value else None


def _page(offset: int, limit: int) -> None:
    if offset < 0:
        raise invalid("offset must not be negative", parameter="offset")
    if not 1 <= limit <= MAX_LIMIT:
        raise invalid(f"limit must be 1 to {MAX_LIMIT}", parameter="limit")


def _allow(principal: Principal, resource: str, access: Access) -> None:
    if not principal.allows(resource, access):
        raise ServerError(ErrorKind.FORBIDDEN, f"scope does not allow {access.name.lower()} on {resource}")


def select_instances(index: ImagingIndex, tenant: str, study_uid: str, series_uids: Sequence[str] | None = None,
                     sop_uids: Sequence[str] | None = None):
    """The study row and the SOP Instance UIDs to send in stable order (series, then instance number);
    NOT_FOUND when the study is not in the tenant's archive, INVALID for a series/instance not in it."""
    study = index.study(tenant, study_uid)
    if study is None or not study.number_of_instances:
        raise not_found(f"study {study_uid} is not in the archive")
    pairs = [(s.uid, i.sop_uid) for s in study.series for i in s.instances]
    if series_uids:
        known = {s.uid for s in study.series}
        for uid in series_uids:
            if uid not in known:
                raise invalid(f"series {uid} is not in study {study_uid}", parameter="series")
        wanted = set(series_uids)
        pairs = [p for p in pairs if p[0] in wanted]
    if sop_uids:
        known = {p[1] for p in pairs}
        for uid in sop_uids:
            if uid not in known:
                where = "the selected series" if series_uids else f"study {study_uid}"
                raise invalid(f"instance {uid} is not in {where}", parameter="instances")
        wanted = set(sop_uids)
        pairs = [p for p in pairs if p[1] in wanted]
    if not pairs:
        raise not_found(f"study {study_uid} has no instances to send")
    return study, [sop for _, sop in pairs]


def new_job(index: ImagingIndex, fhir: FhirService, sites: Sites, tenant: str, *, study_uid: str,
            recipient: str | Recipient, series_uids: Sequence[str] = (), sop_uids: Sequence[str] = (),
            priority: int = 0, task_id: str | None = None,
            pick: Callable[[list[str]], list[str]] | None = None, **order: str | None) -> gw.NewJob:
    """The transfer job of a study (or some series/instances of it; ``pick`` narrows the instances further,
    e.g. key images only) to ``recipient`` (a directory reference, or a resolved Recipient) from the tenant's
    site: what both the job API and a teleconsult order (``server.gateway.orders``) queue. ``order``: the
    order columns of ``gw.NewJob`` (order_ref, send_options, note, ...)."""
    site = sites.of_tenant(tenant)
    study, instances = select_instances(index, tenant, study_uid, series_uids, sop_uids)
    if pick is not None:
        instances = pick(instances)
    target = recipient if isinstance(recipient, Recipient) else recipient_of(fhir, tenant, recipient)
    selection = {k: list(v) for k, v in (("series", series_uids), ("instances", sop_uids)) if v}
    return gw.NewJob(
        study_uid=study_uid, instances=instances, recipient_address=target.address,
        sender_address=site.address, set_id=uuid.uuid4().hex, priority=int(priority),
        selection=json.dumps(selection) if selection else None,
        recipient_endpoint=f"Endpoint/{target.endpoint_id}", recipient_fingerprint=target.fingerprint,
        max_mail_size=target.max_mail_size, patient_name=_cut(study.patient_name),
        study_description=_cut(study.description),
        study_date=study.date if study.date and len(study.date) == 8 else None,
        task_id=task_id or str(uuid.uuid4()), **order)


class GatewayService:
    """Transfer jobs, inbound sets and quarantine of the tenants of one app."""

    def __init__(self, settings: Settings, engine, archive: Archive, fhir: FhirService, sites: Sites, *,
                 wake: Callable[[], None] | None = None,
                 inbound: Inbound | Callable[[], Inbound | None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.engine = engine
        self.archive = archive
        self.fhir = fhir
        self.sites = sites
        self.wake = wake
        self.inbound = inbound
        self.clock = clock
        self.index = ImagingIndex(engine)
        self.hook = task_hook(fhir, strict=True)

    def _woken(self) -> None:
        if self.wake is not None:
            self.wake()

    def _inbound(self) -> Inbound | None:
        """The inbound processing, also when given as a callable that finds it later (built by the lifespan)."""
        inbound = self.inbound
        if inbound is not None and not hasattr(inbound, "import_set") and callable(inbound):
            inbound = inbound()
        return inbound if hasattr(inbound, "import_set") and hasattr(inbound, "discard_set") else None

    # ---- jobs ------------------------------------------------------------------------------------------------
    def create_transfer(self, principal: Principal, *, study_uid: str, series_uids: Sequence[str] | None = None,
                        sop_instance_uids: Sequence[str] | None = None, recipient: str, priority: str | None = None,
                        task_id: str | None = None) -> gw.Job:
        """Queue the study (or the given series/instances) for ``recipient`` (``Endpoint/x``,
        ``HealthcareService/x`` or ``Organization/x``): one DRG set, one mail per instance; the Task mirror is
        created in the same transaction; the sender is woken after the commit."""
        _allow(principal, TASK, Access.CREATE)
        _allow(principal, STUDY, Access.READ)
        tenant = principal.tenant
        study_uid = _uid(study_uid, "study")
        series = list(dict.fromkeys(_uid(u, "series") for u in series_uids or ()))
        sops = list(dict.fromkeys(_uid(u, "instances") for u in sop_instance_uids or ()))
        if not isinstance(recipient, str) or not recipient.strip():
            raise invalid("a transfer needs a recipient", parameter="recipient")
        level = priority_of(priority)
        new = new_job(self.index, self.fhir, self.sites, tenant, study_uid=study_uid, recipient=recipient.strip(),
                      series_uids=series, sop_uids=sops, priority=int(level), task_id=task_id)
        job = gw.create_job(self.engine, tenant, new, self.clock(), also=self.hook)
        self._woken()
        return job

    def _task_refs(self, tenant: str, jobs: Sequence[gw.Job]) -> list[str | None]:
        with_task = [j for j in jobs if j.task_id]
        refs: dict[str, str] = {}
        if with_task:
            with self.fhir.store.transaction(tenant, write=False) as tx:
                for j in with_task:
                    generation, _ = current_task(tx, j.task_id)
                    refs[j.job_id] = f"Task/{generation_id(j.task_id, generation)}"
        return [refs.get(j.job_id) for j in jobs]

    def list_jobs(self, principal: Principal, filter: str | None = None, offset: int = 0,
                  limit: int = 50) -> Page:
        """A page of the tenant's jobs, newest first, filtered like the job manager (all, active, waiting,
        finished, paused, failed)."""
        _allow(principal, TASK, Access.READ)
        states = STATES_BY_FILTER[parse_filter(filter)]
        _page(offset, limit)
        total, jobs = gw.list_jobs(self.engine, principal.tenant, [s.value for s in states], offset=offset,
                                   limit=limit)
        refs = self._task_refs(principal.tenant, jobs)
        return Page(total, tuple(JobView(j, r) for j, r in zip(jobs, refs)))

    def get_job(self, principal: Principal, job_id: str) -> JobView:
        """One job with its mails (NOT_FOUND in other tenants)."""
        _allow(principal, TASK, Access.READ)
        job = gw.get_job(self.engine, principal.tenant, job_id)
        mails = gw.job_mails(self.engine, principal.tenant, job_id)
        return JobView(job, self._task_refs(principal.tenant, [job])[0], tuple(mails))

    def act(self, principal: Principal, job_id: str, action: Action | str) -> JobView | None:
        """Pause, resume, abort, retry or delete a job (CONFLICT when its state does not allow it); None when
        deleted. The Task follows in the same transaction; the sender is woken after resume and retry."""
        try:
            action = Action(action)
        except ValueError:
            raise invalid(f"unknown action {action!r}", parameter="action") from None
        _allow(principal, TASK, Access.DELETE if action is Action.DELETE else Access.UPDATE)
        job = gw.job_action(self.engine, principal.tenant, job_id, action, self.clock(), also=self.hook)
        if job is None:
            return None
        if action in (Action.RESUME, Action.RETRY):
            self._woken()
        return JobView(job, self._task_refs(principal.tenant, [job])[0])

    # ---- inbound sets and quarantine ---------------------------------------------------------------------------
    def list_sets(self, principal: Principal, state: str | None = None, offset: int = 0, limit: int = 50) -> Page:
        """A page of the tenant's inbound sets (optionally in one state), newest first."""
        _allow(principal, TASK, Access.READ)
        if state and state not in SET_STATES:
            raise invalid(f"unknown set state {state!r} (one of {', '.join(SET_STATES)})", parameter="state")
        _page(offset, limit)
        total, rows = gw.list_sets(self.engine, principal.tenant, [state] if state else None, offset=offset,
                                   limit=limit)
        return Page(total, tuple(rows))

    def import_set(self, principal: Principal, set_pk: int) -> gw.SetRow:
        """An operator imports a set (also an incomplete one); UNSUPPORTED when inbound processing is absent."""
        _allow(principal, STUDY, Access.CREATE)
        gw.get_set(self.engine, principal.tenant, set_pk)  # NOT_FOUND in other tenants
        inbound = self._inbound()
        if inbound is None:
            raise ServerError(ErrorKind.UNSUPPORTED, "this server does not process inbound DICOM e-mail")
        inbound.import_set(principal.tenant, set_pk, operator=True)
        return gw.get_set(self.engine, principal.tenant, set_pk)

    def discard_set(self, principal: Principal, set_pk: int) -> gw.SetRow:
        """An operator discards a set that was not imported (CONFLICT once imported or discarded)."""
        _allow(principal, TASK, Access.UPDATE)
        inbound = self._inbound()
        if inbound is None:
            return gw.discard_set(self.engine, principal.tenant, set_pk, self.clock())
        gw.get_set(self.engine, principal.tenant, set_pk)
        inbound.discard_set(principal.tenant, set_pk)
        return gw.get_set(self.engine, principal.tenant, set_pk)

    def quarantine(self, principal: Principal, offset: int = 0, limit: int = 50) -> Page:
        """A page of the tenant's quarantined mails, newest first."""
        _allow(principal, TASK, Access.READ)
        _page(offset, limit)
        total, rows = gw.quarantined(self.engine, principal.tenant, offset=offset, limit=limit)
        return Page(total, tuple(rows))

    # ---- transfer statistics ---------------------------------------------------------------------------------
    def statistics(self, principal: Principal, *, period: str | None = None, start: str | None = None,
                   end: str | None = None, partner: str | None = None,
                   direction: str | None = None) -> stats.Report:
        """The tenant's transfer statistics per period (day, month, total), partner site and direction
        (``server.gateway.stats``), in [``start``, ``end``] (Berlin calendar days, inclusive); ``partner`` is an
        address or ``Endpoint/<id>`` of the directory. Organization names come from the directory."""
        _allow(principal, TASK, Access.READ)
        tenant = principal.tenant
        bucket, side = stats.parse_period(period), stats.parse_direction(direction)
        first, last = stats.parse_day(start, "from"), stats.parse_day(end, "to")
        lo, hi = stats.bounds(first, last)
        address, endpoint = self._partner(tenant, partner)
        transfers: list[stats.Transfer] = []
        quarantined: list[stats.QuarantinedMail] = []
        if side in (stats.Direction.SENT, stats.Direction.BOTH):
            transfers += gs.sent_transfers(self.engine, tenant, lo, hi, address=address, endpoint=endpoint)
        if side in (stats.Direction.RECEIVED, stats.Direction.BOTH) and (address or endpoint is None):
            transfers += gs.received_transfers(self.engine, tenant, lo, hi, address=address)
            quarantined = gs.quarantined_mails(self.engine, tenant, lo, hi, address=address)
        names = self._organizations(tenant, {t.partner for t in transfers} | {q.partner for q in quarantined})
        return stats.report(transfers, quarantined, period=bucket, direction=side, start=first, end=last,
                            organizations=names)

    def _partner(self, tenant: str, partner: str | None) -> tuple[str | None, str | None]:
        """(address, Endpoint reference) of a partner filter: an address, or ``Endpoint/<id>`` with the address
        the directory gives it (None when the Endpoint is gone: only jobs sent to it match then)."""
        if partner is None or not partner.strip():
            return None, None
        partner = partner.strip()
        if partner.startswith("Endpoint/"):
            principal = system_principal(tenant)
            try:
                with self.fhir.store.transaction(tenant, write=False) as tx:
                    endpoint = self.fhir.read_in(tx, principal, "Endpoint", partner[len("Endpoint/"):]).resource
            except ServerError as exc:
                if exc.kind is not ErrorKind.NOT_FOUND and getattr(exc, "status", None) != 410:
                    raise
                return None, partner
            address = endpoint.get("address")
            return (normalize_address(address) if isinstance(address, str) and "@" in address else None), partner
        address = normalize_address(partner)
        if "@" not in address:
            raise invalid(f"partner {partner!r} is neither a mail address nor Endpoint/<id>", parameter="partner")
        return address, None

    def _organizations(self, tenant: str, addresses: set[str]) -> dict[str, str]:
        """The directory's Organization names of partner addresses (Endpoint ``address`` -> its
        ``managingOrganization``); a courtesy: a failed lookup is logged and the names stay absent."""
        wanted = sorted(a for a in addresses if a and "@" in a)
        if not wanted:
            return {}
        principal = system_principal(tenant)
        org_of: dict[str, str] = {}
        names: dict[str, str] = {}
        try:
            with self.fhir.store.transaction(tenant, write=False) as tx:
                for i in range(0, len(wanted), NAME_LOOKUP_BATCH):
                    chunk = set(wanted[i:i + NAME_LOOKUP_BATCH])
                    value = ",".join("mailto:" + a.replace(",", "\\,") for a in sorted(chunk))
                    bundle = self.fhir.search_in(tx, principal, "Endpoint", [("address", value), ("_count", "1000")],
                                                 base="")
                    for entry in bundle.get("entry", []):
                        endpoint = entry.get("resource", {})
                        address = endpoint.get("address")
                        ref = (endpoint.get("managingOrganization") or {}).get("reference")
                        if not isinstance(address, str) or not isinstance(ref, str):
                            continue
                        address = normalize_address(address)
                        if address in chunk and ref.startswith("Organization/") and address not in org_of:
                            org_of[address] = ref[len("Organization/"):]
                for org in sorted(set(org_of.values())):
                    try:
                        name = self.fhir.read_in(tx, principal, "Organization", org).resource.get("name")
                    except ServerError:
                        continue
                    if isinstance(name, str):
                        names[org] = name
        except ServerError as exc:
            log.warning("transfer statistics of %s: organization names not looked up: %s", tenant, exc.message)
            return {}
        return {address: names[org] for address, org in org_of.items() if org in names}
