"""The outbound worker of the DICOM e-mail gateway: instance mails of transfer jobs, the receipts we owe, sweeps.

An edge (database, blob reads, SMTP; all tenants of the data folder). Each round leases due work in the store
(``server.store.gateway``), builds, signs and encrypts in worker threads, hands the mails to the relay and
records each outcome in its own transaction:

    send_due()   up to ``send_batch`` mails (emergency jobs first), ``send_concurrency`` at once. Per mail: the
                 tenant's key (signer), the recipient's key (directory Endpoint), the DICOM file (archive) ->
                 DRG mail (``drg.build_instance_mail``, PGP/MIME RFC 3156) -> message/partial fragments when
                 it exceeds the recipient's size limit (RFC 2046 5.2.2) -> SMTP (every fragment accepted)
    send_mdns()  receipts we owe, rebuilt from the original's header block (RFC 3798 3), sent unencrypted
    sweep()      receipt timeouts (resend), incomplete inbound sets (reported), stale fragments (dropped)
    run()        the loop: each round in a worker thread, then wait for ``wake()``, the next due mail or
                 ``gateway_poll_seconds``

One failing mail never stops the others: a failure is recorded on its mail (retryable after the backoff, or
final with a text the job list shows) and an unexpected one is logged once with a correlation id.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import random
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import TypeVar

import anyio.to_thread

from server import __version__
from server.config import Settings
from server.crypto import encrypt_and_sign
from server.errors import ErrorKind, ServerError
from server.dicom.deidentify import Options as DeidOptions
from server.dicom.deidentify import Pseudonymizer, load_profile
from server.dicom.parse import parse_part10
from server.gateway.directory import Recipient, recipient_of
from server.gateway.jobs import Priority
from server.gateway.orders import mail_parts, sweep_waiting
from server.gateway.policy import send_policy
from server.gateway.sites import Sites
from server.mail.drg import build_message_mail, build_instance_mail
from server.mail.mdn import Disposition, build_mdn, original_from_header
from server.mail.mime import domain_of
from server.mail.partial import split
from server.mail.relay import Relay, SendError
from server.store.archive import Archive, NewInstance, Verdict
from server.store.blobs import BlobStore
from server.store.gateway import (MDN_DEAD, MDN_PENDING, MDN_SENT, ClaimedMail, Job, JobHook, Mail, QueuedMdn,
                                  claim_mails, claim_mdns, drop_fragments, finish_mdn, mark_failed, mark_sent,
                                  mark_sent_many, next_due, report_incomplete, stale_fragments, sweep_receipts)

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Whether a failed send of this kind may succeed later (SendErrors carry the relay's verdict: SMTP 4yz/5yz,
#: RFC 5321 4.2.1). Final: the job, the directory or the archive must change first (the user retries then).
RETRYABLE_BY_KIND: Mapping[ErrorKind, bool] = MappingProxyType({
    ErrorKind.INVALID: False,  # bad DICOM, bad key, bad address
    ErrorKind.UNSUPPORTED: False,
    ErrorKind.NOT_ACCEPTABLE: False,
    ErrorKind.NOT_FOUND: False,  # unknown endpoint, instance no longer in the archive
    ErrorKind.CONFLICT: False,
    ErrorKind.UNAUTHENTICATED: False,
    ErrorKind.FORBIDDEN: False,
    ErrorKind.TOO_LARGE: False,
    ErrorKind.SECURITY: False,  # recipient key expired or revoked
    ErrorKind.UPSTREAM: True,
    ErrorKind.TIMEOUT: True,
    ErrorKind.INTERNAL: True,
    ErrorKind.RESOURCES: True,
})
#: RFC 3798 3: "The envelope sender address (i.e., SMTP MAIL FROM) of the MDN SHOULD be null (<>)" (no loops).
MDN_ENVELOPE_SENDER = ""
REPORTING_UA = f"telerad-bridge/{__version__}"
SWEEP_SECONDS = 30.0  # sweeps at most this often in ``run`` (or every round with a longer poll interval)
_MSGID_UNSAFE = re.compile(r"[^A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]")  # RFC 5322 3.2.3 dot-atom-text


def message_id_for(mail: Mail, job: Job) -> str:
    """A new Message-ID for a mail: ``<set.part.random@sender-domain>`` (RFC 5322 3.6.4; kept for resends)."""
    set_id = _MSGID_UNSAFE.sub("-", job.set_id).strip(".") or "set"
    return f"<{set_id}.{mail.set_part}.{uuid.uuid4().hex[:12]}@{domain_of(job.sender_address)}>"


@dataclass(frozen=True)
class _Lookups:
    """What the mails of one round share, looked up once: recipients by (tenant, endpoint), instance blobs by job.
    A failed lookup is kept as its error and fails every mail that needs it."""

    recipients: Mapping[tuple[str, str | None], Recipient | ServerError]
    blobs: Mapping[int, Mapping[str, str] | ServerError]


class Sender:
    """Sends the queued mails and receipts of all tenants; blocking rounds for a worker thread, ``run`` loops."""

    def __init__(self, settings: Settings, engine, blobs: BlobStore, archive: Archive, fhir, sites: Sites,
                 relay: Relay, *, also: JobHook | None = None, clock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self.engine = engine
        self.blobs = blobs
        self.archive = archive
        self.fhir = fhir
        self.sites = sites
        self.relay = relay
        self.policy = send_policy(settings)
        self._also = also
        self._clock = clock
        self._rand = rand
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._deid_profile = None  # PS3.15 Table E.1-1, loaded at the first anonymised send

    # ---- instance mails ------------------------------------------------------------------------------------
    def send_due(self) -> int:
        """One round: lease due mails, send them in parallel, record each outcome; returns how many were handled."""
        claimed = claim_mails(self.engine, self._clock(), limit=self.settings.send_batch,
                              lease=self.settings.send_lease_seconds, message_id=message_id_for, also=self._also)
        if claimed:
            lookups = self._lookups(claimed)
            accepted: list[tuple[ClaimedMail, int]] = []  # list.append is atomic: filled by the send threads
            self._each(claimed, lambda c: self._send_mail(c, lookups, accepted))
            self._book_sent(accepted)
        return len(claimed)

    def _book_sent(self, accepted: Sequence[tuple[ClaimedMail, int]]) -> None:
        """Record the round's accepted mails as sent in one transaction (``mark_sent_many``: one commit and one
        job recount per round instead of per mail); when that fails, each mail on its own (``mark_sent``).

        A mail is booked when the round ends, not when its send ends: a receipt arriving meanwhile is recorded
        as it always was (the receipt overtook our bookkeeping), and a crash before the booking means a resend
        with the same Message-ID when the lease ends (re-acknowledged by the receiver, not imported twice)."""
        if not accepted:
            return
        try:
            gone = mark_sent_many(self.engine, [(c.mail.tenant, c.mail.pk, size) for c, size in accepted],
                                  self._clock(), also=self._also)
        except Exception:  # noqa: BLE001 - one at a time, so that one bad row does not lose the others
            log.warning("gateway sender: booking %d sent mails at once failed, one at a time now", len(accepted),
                        exc_info=True)
            for claimed, size in accepted:
                mail, job = claimed.mail, claimed.job
                self._book(f"mail {mail.set_part}/{job.total} of job {job.job_id}",
                           lambda: mark_sent(self.engine, mail.tenant, mail.pk, self._clock(), also=self._also,
                                             size=size))
            return
        for claimed, _ in accepted:
            if claimed.mail.pk in gone:
                log.info("mail %s/%s of job %s is gone, its outcome is not recorded", claimed.mail.set_part,
                         claimed.job.total, claimed.job.job_id)

    def _lookups(self, claimed: Sequence[ClaimedMail]) -> _Lookups:
        jobs = {c.job.pk: c.job for c in claimed}
        recipients: dict[tuple[str, str | None], Recipient | ServerError] = {}
        for job in jobs.values():
            key = (job.tenant, job.recipient_endpoint)
            if key not in recipients:
                recipients[key] = _guarded(self._recipient, job, f"directory lookup of job {job.job_id}")
        blobs = {pk: _guarded(self._blobs_of, job, f"archive lookup of job {job.job_id}") if not job.is_message
                 else {} for pk, job in jobs.items()}
        return _Lookups(recipients, blobs)

    def _recipient(self, job: Job) -> Recipient:
        """The recipient's Endpoint as the directory has it now (keys rotate: a new fingerprint is fine)."""
        if not job.recipient_endpoint:
            raise ServerError(ErrorKind.INVALID, f"job {job.job_id} names no recipient Endpoint, so no key to "
                                                 "encrypt for")
        recipient = recipient_of(self.fhir, job.tenant, job.recipient_endpoint,
                                 default_max_mail_size=self.settings.default_max_mail_size)
        if job.recipient_fingerprint and recipient.fingerprint != job.recipient_fingerprint.replace(" ", "").upper():
            log.info("job %s: %s has a new key %s (the job was made for %s)", job.job_id, job.recipient_endpoint,
                     recipient.fingerprint, job.recipient_fingerprint)
        return recipient

    def _blobs_of(self, job: Job) -> dict[str, str]:
        """SOP Instance UID -> blob digest of the job's study (one archive read per job and round); an order's
        report PDF (``job.report_blob``) is indexed into the study first, once."""
        blobs = {row.sop_uid: row.blob for row in self.archive.instances(job.tenant, job.study_uid)}
        if job.report_blob and job.report_blob not in blobs.values():
            path = self.blobs.path_of(job.report_blob)
            item = NewInstance(parse_part10(path), job.report_blob, path.stat().st_size)
            [result] = self.archive.index_batch(job.tenant, [item], replace=False)
            if result.verdict not in (Verdict.STORED, Verdict.IDENTICAL):
                raise ServerError(ErrorKind.CONFLICT, f"the report PDF of job {job.job_id} was not stored into "
                                                      f"study {job.study_uid}: {result.message}")
            blobs[item.parsed.sop_instance_uid] = job.report_blob
        return blobs

    def _send_mail(self, claimed: ClaimedMail, lookups: _Lookups,
                   accepted: list[tuple[ClaimedMail, int]] | None = None) -> None:
        """Build and send one leased mail and record a failure; never raises. An accepted mail is recorded at
        once, or appended to ``accepted`` (with its size) for the round's ``_book_sent``."""
        mail, job = claimed.mail, claimed.job
        where = f"mail {mail.set_part}/{job.total} of job {job.job_id}"
        try:
            fragments, size = self._build(claimed, lookups)
            for fragment in fragments:
                self.relay.send(fragment, job.sender_address, [job.recipient_address])
        except Exception as exc:  # noqa: BLE001 - every failure is recorded on the mail
            retryable, text = _verdict(exc, where)
            self._book(where, lambda: mark_failed(self.engine, mail.tenant, mail.pk, self._clock(), text,
                                                  retryable=retryable, policy=self.policy, rand=self._rand(),
                                                  also=self._also))
            return
        if accepted is not None:
            accepted.append((claimed, size))
            return
        self._book(where, lambda: mark_sent(self.engine, mail.tenant, mail.pk, self._clock(), also=self._also,
                                            size=size))

    def _build(self, claimed: ClaimedMail, lookups: _Lookups) -> tuple[list[bytes], int]:
        """The DRG mail of one instance, split into message/partial fragments over the size limit, and the
        instance's size in bytes."""
        mail, job = claimed.mail, claimed.job
        site = self.sites.of_tenant(job.tenant)
        recipient = _value(lookups.recipients[(job.tenant, job.recipient_endpoint)])

        def encrypt(inner: bytes) -> bytes:
            return encrypt_and_sign(inner, [recipient.public_key], site.key, compress=False)
        if job.is_message:  # a workflow message (Task state, priors request): its FHIR JSON, no DICOM
            raw = build_message_mail(
                (job.order_json or "").encode("utf-8"), sender=job.sender_address, recipient=job.recipient_address,
                mdn_to=job.sender_address, subject=self.settings.mail_subject, message_id=mail.message_id,
                emergency=job.priority >= Priority.STAT, encrypt=encrypt)
            return split(raw, job.max_mail_size or recipient.max_mail_size), 0
        blob = _value(lookups.blobs[job.pk]).get(mail.sop_instance_uid)
        if blob is None:
            raise ServerError(ErrorKind.NOT_FOUND, f"instance {mail.sop_instance_uid} is no longer in the archive "
                                                   f"(study {job.study_uid})")
        dicom = self._read(blob, mail.sop_instance_uid)
        sop_uid, study_uid = mail.sop_instance_uid, job.study_uid
        if job.deid_secret:  # anonymised order: de-identified now, the same bytes on every resend
            dicom, sop_uid, study_uid = self._deidentified(job, dicom)
        raw = build_instance_mail(
            dicom, sop_instance_uid=sop_uid, study_uid=study_uid, set_id=job.set_id,
            set_part=mail.set_part, set_total=job.total, sender=job.sender_address, recipient=job.recipient_address,
            mdn_to=job.sender_address, subject=self.settings.mail_subject, message_id=mail.message_id,
            emergency=job.priority >= Priority.STAT, parts=mail_parts(job), encrypt=encrypt)
        return split(raw, job.max_mail_size or recipient.max_mail_size), len(dicom)

    def _deidentified(self, job: Job, dicom: bytes) -> tuple[bytes, str, str]:
        """(bytes, SOP Instance UID, Study Instance UID) of an instance de-identified with the job's secret and
        options (PS3.15 Annex E; the secret stays at this site, the Study UID is the set's STUDYID)."""
        if self._deid_profile is None:
            self._deid_profile = load_profile()
        try:
            options = DeidOptions(**json.loads(job.deid_options or "{}"))
        except (TypeError, ValueError) as exc:
            raise ServerError(ErrorKind.INVALID, f"job {job.job_id} has unusable de-identification options") from exc
        pseudonymizer = Pseudonymizer(bytes.fromhex(job.deid_secret), options=options, profile=self._deid_profile)
        done = pseudonymizer.deidentify(dicom)
        return done.data, done.sop_instance_uid, pseudonymizer.new_uid(job.study_uid)

    def _read(self, digest: str, sop_uid: str) -> bytes:
        try:
            return self.blobs.path_of(digest).read_bytes()
        except FileNotFoundError as exc:
            raise ServerError(ErrorKind.NOT_FOUND, f"the DICOM file of instance {sop_uid} is missing from the "
                                                   "blob store") from exc
        except OSError as exc:
            raise ServerError(ErrorKind.RESOURCES, f"cannot read the DICOM file of instance {sop_uid}: "
                                                   f"{exc.strerror or exc.__class__.__name__}") from exc

    # ---- receipts we owe -----------------------------------------------------------------------------------
    def send_mdns(self) -> int:
        """One round of queued receipts (MDNs); returns how many were handled."""
        queued = claim_mdns(self.engine, self._clock(), limit=self.settings.send_batch,
                            lease=self.settings.send_lease_seconds)
        self._each(queued, self._send_mdn)
        return len(queued)

    def _send_mdn(self, queued: QueuedMdn) -> None:
        """Build and send one receipt and record the try; never raises."""
        where = f"receipt {queued.pk} for {queued.original_message_id}"
        try:
            self.relay.send(self._mdn(queued), MDN_ENVELOPE_SENDER, [queued.to_address])
        except Exception as exc:  # noqa: BLE001 - every failure is recorded on the receipt
            retryable, text = _verdict(exc, where)
            if retryable and not self.policy.exhausted(queued.attempts):
                run_after = self._clock() + self.policy.delay(queued.attempts, self._rand())
                self._book(where, lambda: finish_mdn(self.engine, queued.tenant, queued.pk, state=MDN_PENDING,
                                                     error=text, run_after=run_after))
            else:
                log.warning("tenant %s: %s to %s given up after %d tries: %s", queued.tenant, where,
                            queued.to_address, queued.attempts, text)
                self._book(where, lambda: finish_mdn(self.engine, queued.tenant, queued.pk, state=MDN_DEAD,
                                                     error=text))
            return
        self._book(where, lambda: finish_mdn(self.engine, queued.tenant, queued.pk, state=MDN_SENT))

    def _mdn(self, queued: QueuedMdn) -> bytes:
        """The MDN of a queued receipt from its params (disposition, final_recipient, text, original_header,
        message_id: fixed when queued, so a resend is the same MDN). RFC 3798 3."""
        try:
            params = json.loads(queued.params)
            disposition = Disposition(params["disposition"])
            original = original_from_header(base64.b64decode(params["original_header"], validate=True))
            final_recipient, text, message_id = params["final_recipient"], params.get("text"), params.get("message_id")
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise ServerError(ErrorKind.INVALID, f"queued receipt {queued.pk} has unusable params "
                                                 f"({exc.__class__.__name__}: {exc})") from exc
        if original.mdn_to is None:
            original = replace(original, mdn_to=queued.to_address)
        return build_mdn(original, disposition=disposition, reporting_ua=REPORTING_UA,
                         final_recipient=final_recipient, warning_or_error_text=text, message_id=message_id)

    # ---- sweeps --------------------------------------------------------------------------------------------
    def sweep(self) -> None:
        """Receipt timeouts (resend or fail), incomplete inbound sets (reported once at WARNING), fragments of
        never completed message/partial mails (dropped). DESIGN.md 4."""
        self._sweep()

    def _sweep(self) -> int:
        now = self._clock()
        timeout = self.settings.receipt_timeout_seconds
        moved = sweep_receipts(self.engine, now, timeout, self.policy, also=self._also)
        moved += sweep_waiting(self.fhir) if self.fhir is not None else 0  # orders whose study has arrived
        if moved:
            log.info("%d sent mail(s) had no receipt within %.0f s: queued again or failed", moved, timeout)
        before = now - self.settings.incomplete_set_seconds
        for s in report_incomplete(self.engine, before, now):
            log.warning("tenant %s: inbound set %s from %s (study %s) is incomplete, %d of %d parts, none for "
                        "%.0f s: not imported", s.tenant, s.set_id, s.sender, s.study_uid or "?", s.parts_seen,
                        s.total, now - s.last_seen)
        for tenant, partial_id in stale_fragments(self.engine, before):
            dropped = drop_fragments(self.engine, tenant, partial_id)
            log.warning("tenant %s: dropped %d fragment(s) of message/partial %s, incomplete for %.0f s",
                        tenant, dropped, partial_id, self.settings.incomplete_set_seconds)
        return moved

    # ---- the loop ------------------------------------------------------------------------------------------
    def wake(self) -> None:
        """Work was queued (a job, a receipt): stop waiting. Safe from any thread; a no-op while not running."""
        loop, event = self._loop, self._event
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(event.set)

    async def run(self) -> None:
        """Send until cancelled: a round in a worker thread (a running round finishes first), then wait."""
        self._loop, self._event = asyncio.get_running_loop(), asyncio.Event()
        next_sweep = float("-inf")
        try:
            while True:
                self._event.clear()  # a wake() during the round makes the wait below return at once
                sweep = time.monotonic() >= next_sweep
                if sweep:
                    next_sweep = time.monotonic() + max(SWEEP_SECONDS, self.settings.gateway_poll_seconds)
                delay = await anyio.to_thread.run_sync(self._round, sweep)
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._event.wait(), delay)
        finally:
            self._loop = self._event = None

    def _round(self, sweep: bool) -> float:
        """Mails, receipts and (when due) the sweep; returns how long to wait before the next round."""
        poll = self.settings.gateway_poll_seconds
        handled, receipts, moved = _logged(self.send_due, 0), _logged(self.send_mdns, 0), 0
        if sweep:
            moved = _logged(self._sweep, 0)
        if moved or handled >= self.settings.send_batch or receipts >= self.settings.send_batch:
            return 0.0
        due = _logged(lambda: next_due(self.engine), None)
        if due is None:
            return poll
        wait = due - self._clock()
        if wait <= 0:  # due now: look again, unless we just found nothing (another worker holds it)
            return 0.0 if handled else poll
        return min(wait, poll)

    # ---- helpers -------------------------------------------------------------------------------------------
    def _each(self, items: Sequence[T], fn: Callable[[T], None]) -> None:
        """``fn`` over the items, ``send_concurrency`` at once (in order when 1); ``fn`` never raises."""
        workers = min(self.settings.send_concurrency, len(items))
        if workers <= 1:
            for item in items:
                fn(item)
            return
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="telerad-send") as pool:
            for _ in pool.map(fn, items):
                pass

    @staticmethod
    def _book(where: str, record: Callable[[], object]) -> None:
        """Record an outcome; a mail or receipt deleted meanwhile (job deleted) is only noted."""
        try:
            record()
        except Exception as exc:  # noqa: BLE001 - the lease runs out and the work is taken again
            if isinstance(exc, ServerError) and exc.kind is ErrorKind.NOT_FOUND:
                log.info("%s is gone, its outcome is not recorded: %s", where, exc.message)
            else:
                log.exception("%s: cannot record the outcome (retried when its lease ends)", where)


def _verdict(exc: Exception, where: str) -> tuple[bool, str]:
    """(retryable, error text for the job list) of a failed send; an unexpected error is logged once."""
    if isinstance(exc, SendError):
        return exc.retryable, exc.message
    if isinstance(exc, ServerError):
        return RETRYABLE_BY_KIND[exc.kind], exc.message
    incident = uuid.uuid4().hex[:12]
    log.error("%s failed unexpectedly (incident %s)", where, incident, exc_info=exc)
    return True, f"internal error (incident {incident}, see the server log)"


def _guarded(fn: Callable[[Job], T], job: Job, where: str) -> T | ServerError:
    """``fn(job)``, or its failure as a ServerError (unexpected ones logged once and kept as INTERNAL)."""
    try:
        return fn(job)
    except ServerError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - kept for the mails that need it
        _, text = _verdict(exc, where)
        return ServerError(ErrorKind.INTERNAL, text)


def _value(found: T | ServerError) -> T:
    """A looked-up value, or its failure raised afresh (the mails of a round share it, in several threads)."""
    if isinstance(found, ServerError):
        raise ServerError(found.kind, found.message, parameter=found.parameter)
    return found


def _logged(fn: Callable[[], T], fallback: T) -> T:
    """A loop step that must not end the loop: its failure (e.g. the database is down) is logged."""
    try:
        return fn()
    except Exception:  # noqa: BLE001 - logged; the next round tries again
        log.exception("gateway sender: %s failed", getattr(fn, "__name__", "a step"))
        return fallback


__all__ = ["MDN_ENVELOPE_SENDER", "REPORTING_UA", "RETRYABLE_BY_KIND", "Sender", "message_id_for"]
