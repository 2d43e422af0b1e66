"""The inbound pipeline of the DICOM e-mail gateway: receive, verify, collect sets, import, queue MDNs, quarantine.

``Inbound`` is the ``Sink`` of the SMTP ingress and the mailbox poller (server/mail/transport.py), called in a
worker thread for every raw mail. DESIGN.md 4 (DRG @GIT DICOM e-mail):

    raw mail -> blob (durable) -> inbound_mail row (dedup by Message-ID)
      MDN                    -> the receipt of one of our outbound mails (record_mdn)
      message/partial        -> buffered; once all fragments are in: joined and processed as one mail
      multipart/encrypted    -> decrypt + verify against the directory key of the From address -> inner entity
                                -> set headers checked -> DICOM parsed -> decrypted instance blob
                                -> set part + its MDN in one transaction (RFC 3798: receipt after storage)
                                -> set complete: imported into the archive at once
      anything refused       -> quarantine row + MDN with the refusal's disposition (DISPOSITION_BY_KIND)

Only storage failures (disk, database) raise, so that the peer keeps the mail and retries; a refused mail is
stored and acknowledged (SMTP 250). A redelivered mail (same Message-ID) is processed again without new
effects: the part, fragment and receipt stores dedup, so its MDN is queued again and nothing is imported
twice; a mail quarantined before keeps its one quarantine row.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from server.config import Settings
from server.crypto import (BadSignature, KeyUnusable, NotEncrypted, OpenPGPError, TamperedMessage, UnknownSender,
                           WrongRecipientKey, decrypt_and_verify)
from server.dicom.parse import parse_part10
from server.errors import ErrorKind, ServerError
from server.dicom.attributes import Level
from server.gateway.consults import BadOrder, consult_for_set, is_order_part, note_text, organization_of, parse_order
from server.gateway.directory import sender_keys
from server.gateway.policy import send_policy
from server.gateway.sites import Site, Sites, normalize_address
from server.gateway.workflow import Reply, Workflow
from server.mail.drg import MailKind, Message, Outer, check_set, parse_decrypted, parse_outer, read_outer
from server.mail.mdn import Disposition, disposition_for, parse_mdn
from server.mail.mime import Defect, MailError, domain_of
from server.mail.partial import join
from server.mail.transport import Received, Sink
from server.store import gateway as gw
from server.store.archive import Archive, NewInstance, Verdict
from server.store.blobs import BlobStore

log = logging.getLogger(__name__)


class Reason(str, enum.Enum):
    """Why a mail was quarantined (the ``quarantine.reason`` column)."""

    NOT_ENCRYPTED = "not-encrypted"  # plain mail: DRG mail is always PGP/MIME (DESIGN.md 4)
    UNKNOWN_SENDER = "unknown-sender"  # no directory key for the From address, or signed by another key
    BAD_SIGNATURE = "bad-signature"
    KEY_UNUSABLE = "key-unusable"  # the sender's key is expired or revoked
    TAMPERED = "tampered"  # MDC mismatch, no integrity protection, outer set headers differ from the signed ones
    WRONG_RECIPIENT_KEY = "wrong-recipient-key"  # encrypted for a key that is not ours
    MALFORMED = "malformed"  # broken MIME, armor, packets or fragments
    NOT_DICOM = "not-dicom"  # no (single) DICOM part, or the part is no parsable DICOM file
    BAD_SET = "bad-set"  # X-TELEMEDICINE set headers missing, inconsistent or contradicting the set
    BAD_MESSAGE = "bad-message"  # a workflow message that is malformed or names no order of ours sent to its sender


# OpenPGP failures -> reason; first match wins (subclasses before their bases).
REASON_BY_OPENPGP: tuple[tuple[type[OpenPGPError], Reason], ...] = (
    (WrongRecipientKey, Reason.WRONG_RECIPIENT_KEY),
    (TamperedMessage, Reason.TAMPERED),
    (UnknownSender, Reason.UNKNOWN_SENDER),  # NotSigned included
    (BadSignature, Reason.BAD_SIGNATURE),
    (KeyUnusable, Reason.KEY_UNUSABLE),
    (NotEncrypted, Reason.NOT_ENCRYPTED),
    (OpenPGPError, Reason.MALFORMED),
)

# Mail defects -> reason (the rest: MALFORMED).
REASON_BY_DEFECT: dict[Defect, Reason] = {
    Defect.NOT_ENCRYPTED: Reason.NOT_ENCRYPTED,
    Defect.WRONG_PROTOCOL: Reason.NOT_ENCRYPTED,
    Defect.INNER_NOT_MULTIPART: Reason.NOT_DICOM,
    Defect.NO_DICOM_PART: Reason.NOT_DICOM,
    Defect.TWO_DICOM_PARTS: Reason.NOT_DICOM,
    Defect.DICOM_ENCODING: Reason.NOT_DICOM,
    Defect.DICOM_NOT_BASE64: Reason.NOT_DICOM,
    Defect.NOT_DICOM: Reason.NOT_DICOM,
    Defect.SET_HEADER_MISSING: Reason.BAD_SET,
    Defect.SET_HEADER_DUPLICATE: Reason.BAD_SET,
    Defect.SET_HEADER_NOT_NUMERIC: Reason.BAD_SET,
    Defect.SET_PART_OUT_OF_RANGE: Reason.BAD_SET,
    Defect.SET_HEADER_SYNTAX: Reason.BAD_SET,
    Defect.SET_MISMATCH: Reason.TAMPERED,
    Defect.WORKFLOW_PART: Reason.BAD_MESSAGE,
}

# Column sizes of the gateway tables (server/store/gateway_models.py): longer peer values are never stored.
MAX_MESSAGE_ID, MAX_ADDRESS, MAX_SET_ID = 255, 320, 128

# Sender keys read from the directory are kept this long per (tenant, address): a directory change (new, replaced
# or withdrawn key) applies to received mails within a minute. An address without keys is never kept, so a
# sender imported just now is accepted with its first mail.
SENDER_KEYS_TTL = 60.0
SENDER_KEYS_MAX = 4096  # cached (tenant, address) pairs; the cache is emptied when it grows past this

# inbound_mail.state values (at most 16 characters)
RECEIVED, STORED, FRAGMENT, QUARANTINED = "received", "stored", "fragment", "quarantined"
MDN, MDN_UNKNOWN = gw.INBOUND_MDN, gw.INBOUND_MDN_UNKNOWN


class Refused(ServerError):
    """A mail we do not import, with its quarantine reason; ``kind`` picks the MDN disposition."""

    def __init__(self, reason: Reason, kind: ErrorKind, message: str) -> None:
        super().__init__(kind, message)
        self.reason = reason


def refusal(exc: ServerError) -> Refused | None:
    """The refusal a verification failure means, or None for a failure of our own (storage: the peer retries)."""
    if isinstance(exc, Refused):
        return exc
    if isinstance(exc, OpenPGPError):
        reason = next(r for cls, r in REASON_BY_OPENPGP if isinstance(exc, cls))
        return Refused(reason, exc.kind, exc.message)
    if isinstance(exc, MailError):
        return Refused(REASON_BY_DEFECT.get(exc.defect, Reason.MALFORMED), exc.kind, exc.message)
    return None


def mdn_params(disposition: Disposition, *, final_recipient: str, text: str | None, outer: Outer) -> str:
    """The queued receipt's JSON, as the MDN sender builds the RFC 3798 MDN from it."""
    return json.dumps({
        "disposition": disposition.value,
        "final_recipient": final_recipient,
        "text": text,
        "original_header": base64.b64encode(outer.header_block).decode("ascii"),
        "message_id": f"<mdn.{uuid.uuid4().hex}@{domain_of(final_recipient)}>",
    })


def _clip(value: str | None, limit: int) -> str | None:
    return value[:limit] if value else value


@dataclass(frozen=True)
class _Mail:
    """One raw mail being processed for one of our sites."""

    site: Site
    raw: bytes
    sha256: str
    message_id: str
    outer: Outer | None
    quarantined_before: bool  # seen before and quarantined then: no second quarantine row
    strict: Outer | None = None  # parse_outer's reading when the mail passed it (None: refused or not tried)


def _outers(raw: bytes) -> tuple[Outer | None, Outer | None]:
    """(read_outer, parse_outer) of a raw mail with one parse for a good mail: parse_outer's answer serves as
    both (same fields; it only refuses more), read_outer runs only when parse_outer refuses (None: both refuse)."""
    try:
        strict = parse_outer(raw)
    except Exception:  # noqa: BLE001 - refused or not: _instance parses again and fails as it always did
        try:
            return read_outer(raw), None
        except MailError:
            return None, None
    return strict, strict


def _raw_deferred(strict: Outer | None) -> bool:
    """Whether the raw blob of a mail is placed without a sync (``Inbound._store_raw``): a mail that passed
    ``parse_outer`` as an instance mail, whose every way on syncs it (``_instance`` or ``_quarantine``)."""
    return strict is not None and strict.kind is MailKind.ENCRYPTED


def _dedup_id(outer: Outer | None, sha256: str, site: Site) -> str:
    """The Message-ID a received mail is deduplicated by: its own, or, when it has none or one too long to
    keep, one made from the raw mail's sha256 (the same mail again finds the same row)."""
    message_id = outer.message_id if outer else None
    if not message_id or len(message_id) > MAX_MESSAGE_ID:
        return f"<sha256.{sha256}@{domain_of(site.address)}>"
    return message_id


class Inbound:
    """The gateway's receiving side for all tenants (an edge: blob store + database; sync, worker threads)."""

    def __init__(self, settings: Settings, engine, blobs: BlobStore, archive: Archive, fhir, sites: Sites, *,
                 also: gw.JobHook | None = None, on_mdn: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.engine = engine
        self.blobs = blobs
        self.archive = archive
        self.fhir = fhir
        self.sites = sites
        self.also = also
        self.on_mdn = on_mdn
        self.clock = clock
        self.policy = send_policy(settings)
        self._keys: dict[tuple[str, str], tuple[float, list]] = {}  # (tenant, address) -> (expiry, keys)
        self._keys_lock = threading.Lock()
        self.workflow = Workflow(settings, engine, blobs, archive, fhir, sites, clock=clock)

    def sender_keys(self, tenant: str, address: str) -> list:
        """The directory keys of ``address`` in ``tenant`` (server.gateway.directory.sender_keys), kept for
        SENDER_KEYS_TTL seconds per tenant and address; an empty answer is not kept."""
        cache_key = (tenant, normalize_address(address))
        now = time.monotonic()
        with self._keys_lock:
            hit = self._keys.get(cache_key)
        if hit is not None and hit[0] > now:
            return list(hit[1])
        keys = sender_keys(self.fhir, tenant, address)
        with self._keys_lock:
            if keys:
                if len(self._keys) >= SENDER_KEYS_MAX:
                    self._keys.clear()
                self._keys[cache_key] = (now + SENDER_KEYS_TTL, list(keys))
            else:
                self._keys.pop(cache_key, None)
        return keys

    # ---- the sink ------------------------------------------------------------------------------------------
    def __call__(self, raw: bytes, meta: Received, *, tenant: str | None = None) -> None:
        """Store, verify and process one received mail for the first of our recipients (or ``tenant``)."""
        self._receive(self._site(meta, tenant), raw)

    def for_tenant(self, tenant: str) -> Sink:
        """The sink of a polled mailbox that belongs to ``tenant`` (no envelope recipients there)."""
        site = self.sites.of_tenant(tenant)

        def sink(raw: bytes, meta: Received) -> None:
            self._receive(site, raw)

        return sink

    def _site(self, meta: Received, tenant: str | None) -> Site:
        if tenant is not None:
            return self.sites.of_tenant(tenant)
        for rcpt in meta.rcpt_tos:
            site = self.sites.by_address(rcpt)
            if site is not None:
                return site
        raise ServerError(ErrorKind.NOT_FOUND, "no recipient of this mail is one of our sites")

    def _receive(self, site: Site, raw: bytes) -> None:
        outer, strict = _outers(raw)
        if outer is not None and outer.kind is MailKind.MDN and self._receipt_fast(site, raw, outer):
            return
        sha = self._store_raw(raw, strict)
        message_id = _dedup_id(outer, sha, site)
        sender = _clip(outer.sender if outer else None, MAX_ADDRESS)
        state = None
        now = self.clock()
        if gw.record_inbound(self.engine, site.tenant, message_id, sender, sha, len(raw), now) == gw.DUPLICATE:
            state = gw.inbound_state(self.engine, site.tenant, message_id)
            if state in (FRAGMENT, MDN, MDN_UNKNOWN):
                log.info("mail %s for %s received again, processed before (%s)", message_id, site.tenant, state)
                return
            log.info("mail %s for %s received again: acknowledged again, not imported twice", message_id,
                     site.tenant)
        self._process(_Mail(site, raw, sha, message_id, outer, quarantined_before=state == QUARANTINED,
                            strict=strict))

    def _process(self, mail: _Mail) -> None:
        """Process one recorded mail by kind; a verification failure quarantines it (never raises for those)."""
        try:
            if mail.outer is None:
                read_outer(mail.raw)  # raises the MailError again
            assert mail.outer is not None
            if mail.outer.kind is MailKind.MDN:
                self._receipt(mail)
            elif mail.outer.kind is MailKind.PARTIAL:
                self._fragment(mail)
            else:
                self._instance(mail)
        except ServerError as exc:
            refused = refusal(exc)
            if refused is None:
                raise
            self._quarantine(mail, refused)

    # ---- receipts for our outbound mails -------------------------------------------------------------------
    def _receipt(self, mail: _Mail) -> None:
        mdn = parse_mdn(mail.raw)
        result = gw.record_mdn(self.engine, mail.site.tenant, mdn.original_message_id, mdn.outcome,
                               mdn.disposition.value, self.clock(), policy=self.policy, rand=random.random(),
                               also=self.also, receipt_message_id=mail.message_id)
        if result == gw.UNKNOWN:
            log.warning("receipt %s for %s answers no mail of ours (%s): kept as unknown", mail.message_id,
                        mail.site.tenant, mdn.original_message_id)

    def _receipt_fast(self, site: Site, raw: bytes, outer: Outer) -> bool:
        """A first-time, well-formed receipt for one of our mails: raw blob written WITHOUT sync, then its
        ``inbound_mail`` row and the receipt recorded in one transaction (``gw.record_receipt``). Returns False
        (nothing recorded) for anything else, which then takes the durable path of ``_receive``: a redelivered
        Message-ID, or an MDN that does not parse (quarantined there, its blob made durable first).

        Trade-off: the raw bytes of a recorded receipt may be lost in a power failure (the row stays, pointing
        at a missing blob); nothing reads them again, the receipt's effect lives in the database. A crash
        before the commit means no SMTP 250: the peer sends the receipt again.
        """
        try:
            mdn = parse_mdn(raw)
        except ServerError:
            return False  # refused or not: the durable path parses again and quarantines or raises
        sha = self.blobs.put(raw, durable=False)  # no sync: see the trade-off above
        message_id = _dedup_id(outer, sha, site)
        result = gw.record_receipt(self.engine, site.tenant, message_id, _clip(outer.sender, MAX_ADDRESS), sha,
                                   len(raw), mdn.original_message_id, mdn.outcome, mdn.disposition.value,
                                   self.clock(), policy=self.policy, rand=random.random(), also=self.also)
        if result is None:
            return False
        if result == gw.UNKNOWN:
            log.warning("receipt %s for %s answers no mail of ours (%s): kept as unknown", message_id,
                        site.tenant, mdn.original_message_id)
        return True

    # ---- message/partial -----------------------------------------------------------------------------------
    def _fragment(self, mail: _Mail) -> None:
        frag = mail.outer.fragment
        assert frag is not None
        tenant = mail.site.tenant
        try:
            digests = gw.add_fragment(self.engine, tenant, frag.id, frag.number, frag.total, mail.sha256,
                                      self.clock())
        except ServerError as exc:
            if exc.kind is not ErrorKind.INVALID:
                raise
            raise Refused(Reason.MALFORMED, exc.kind, exc.message) from exc
        if digests is not None:
            try:
                joined = join([self.blobs.path_of(d).read_bytes() for d in digests])
            except MailError:
                gw.drop_fragments(self.engine, tenant, frag.id)
                raise
            log.info("message/partial %s for %s joined from %d fragments", frag.id, tenant, len(digests))
            self._receive(mail.site, joined)  # a storage failure here keeps the fragments for the redelivery
            gw.drop_fragments(self.engine, tenant, frag.id)
        gw.set_inbound_state(self.engine, tenant, mail.message_id, FRAGMENT)

    # ---- instance mails ------------------------------------------------------------------------------------
    def _store_raw(self, raw: bytes, strict: Outer | None) -> str:
        """The raw mail as a blob: durable at once, except for a well-formed instance mail (``_raw_deferred``).

        An instance mail's raw blob is placed without a sync: ``_instance`` makes it durable together with the
        decrypted DICOM blob (one ``blobs.sync``, one ``syncfs``) before the ``add_set_part`` commit, and
        ``_quarantine`` before the quarantine commit. The ``inbound_mail`` row committed in between
        (``record_inbound``) may then point at a blob a crash lost or truncated; but a crash before those commits
        means the mail was never acknowledged (no SMTP 250, not deleted from the polled mailbox): the peer
        delivers it again, ``record_inbound`` finds the Message-ID, the mail is processed again and ``put``
        writes the same content address again (``BlobStore.place`` replaces a truncated file).
        """
        return self.blobs.put(raw, durable=not _raw_deferred(strict))

    def _instance(self, mail: _Mail) -> None:
        site, outer = mail.site, mail.outer
        assert outer is not None
        # parse_outer refuses plain mail, wrong protocol, broken set headers (parsed once in _receive when it passed)
        strict = mail.strict if mail.strict is not None else parse_outer(mail.raw)
        if strict.emergency:
            log.warning("NOTFALL: emergency mail %s from %s for %s (set %s)", mail.message_id, strict.sender,
                        site.tenant, strict.set.set_id if strict.set else "-")
        if not strict.sender or len(strict.sender) > MAX_ADDRESS:
            raise Refused(Reason.UNKNOWN_SENDER, ErrorKind.UNAUTHENTICATED, "the mail has no usable From address")
        keys = self.sender_keys(site.tenant, strict.sender)
        if not keys:
            raise Refused(Reason.UNKNOWN_SENDER, ErrorKind.UNAUTHENTICATED,
                          f"no key for {strict.sender} in the directory")
        assert strict.encrypted is not None
        decrypted = decrypt_and_verify(strict.encrypted, [site.key], keys)
        inner = parse_decrypted(decrypted.data)
        if isinstance(inner, Message):
            self._message(mail, strict, inner)
            return
        order_json, note, others = self._order_parts(mail.message_id, inner.parts)
        if others:  # e.g. a PDF report beside the instance (DRG profile): not kept yet
            log.info("mail %s: %d non-DICOM part(s) (%s) not kept", mail.message_id, len(others),
                     ", ".join(sorted({p.content_type for p in others})))
        info = check_set(strict, inner)
        if len(info.set_id) > MAX_SET_ID:
            raise Refused(Reason.BAD_SET, ErrorKind.INVALID, f"X-TELEMEDICINE-SETID is longer than {MAX_SET_ID} "
                                                             "characters")
        sha = self.blobs.put(inner.dicom, durable=False)  # synced with the raw mail before add_set_part
        try:
            parsed = parse_part10(self.blobs.path_of(sha))
        except ServerError as exc:
            if exc.kind is ErrorKind.INTERNAL:
                raise
            raise Refused(Reason.NOT_DICOM, ErrorKind.INVALID, f"the DICOM part cannot be read: {exc.message}") from exc
        if info.study_uid and parsed.study_uid != info.study_uid:
            raise Refused(Reason.BAD_SET, ErrorKind.INVALID,
                          f"StudyInstanceUID {parsed.study_uid} differs from X-TELEMEDICINE-STUDYID {info.study_uid}")
        warnings = sorted({w.value for w in parsed.warnings})
        text = f"stored with warnings: {', '.join(warnings)}" if warnings else None
        part = gw.NewPart(set_id=info.set_id, sender=normalize_address(strict.sender), total=info.total,
                          set_part=info.part, blob_sha256=sha, sop_instance_uid=parsed.sop_instance_uid,
                          study_uid=info.study_uid or parsed.study_uid, message_id=mail.message_id,
                          size=len(inner.dicom), order_json=order_json, note=note,
                          emergency=bool(strict.emergency or inner.emergency))
        mdn = self._mdn(site, outer, disposition_for(None, warning=bool(warnings)), text)
        # both blobs durable in one sync before the commit that records the part (and leads to the 250)
        self.blobs.sync([mail.sha256, sha] if _raw_deferred(mail.strict) else [sha])
        try:
            result = gw.add_set_part(self.engine, site.tenant, part, self.clock(), mdn, mark=STORED)
        except ServerError as exc:
            if exc.kind is not ErrorKind.INVALID:
                raise
            raise Refused(Reason.BAD_SET, exc.kind, exc.message) from exc
        self._woken(mdn)
        s = result.set
        log.info("set %s part %d/%d from %s for %s %s (signed by %s)", s.set_id, info.part, s.total, s.sender,
                 site.tenant, "again" if result.duplicate else "stored", decrypted.signer_fingerprint)
        if s.state == gw.COMPLETE:
            try:
                self.import_set(site.tenant, s.pk)
            except ServerError as exc:
                if exc.kind is not ErrorKind.CONFLICT:
                    raise
                log.info("set %s of %s was imported concurrently", s.set_id, site.tenant)
        elif s.state == gw.IMPORTED and not result.duplicate:  # a late part of a set an operator imported
            self._index(site.tenant, s, [gw.Part(info.part, parsed.sop_instance_uid, sha, mail.message_id)])

    def _message(self, mail: _Mail, strict: Outer, message: Message) -> None:
        """A workflow message (server.gateway.workflow): applied (idempotent), then acknowledged. Its raw mail is
        durable before the FHIR write; a crash before the receipt is queued means no 250: the peer resends."""
        site = mail.site
        if _raw_deferred(mail.strict):
            self.blobs.sync([mail.sha256])
        try:
            self.workflow.receive(site.tenant, strict.sender or "", message.resource)
        except ServerError as exc:
            if exc.kind not in (ErrorKind.INVALID, ErrorKind.NOT_FOUND, ErrorKind.CONFLICT, ErrorKind.UNSUPPORTED):
                raise
            raise Refused(Reason.BAD_MESSAGE, exc.kind, exc.message) from exc
        mdn = self._mdn(site, mail.outer or strict, disposition_for(None), None)
        gw.set_inbound_state(self.engine, site.tenant, mail.message_id, STORED)
        if mdn is not None:
            gw.enqueue_mdn(self.engine, site.tenant, mdn, self.clock())
            self._woken(mdn)
        log.info("workflow message %s from %s for %s applied", mail.message_id, strict.sender, site.tenant)

    @staticmethod
    def _order_parts(message_id: str, parts) -> tuple[str | None, str | None, list]:
        """The order.json (checked, compact JSON) and text note of a mail's extra parts, and the parts left.

        Lenient: a bad order part is logged and ignored, never a reason to refuse a good DICOM mail.
        """
        order_json = note = None
        others = []
        for part in parts:
            if is_order_part(part.content_type, part.filename):
                try:
                    order_json = order_json or parse_order(part.data)
                except BadOrder as exc:
                    log.warning("mail %s: order part ignored: %s", message_id, exc)
            elif part.content_type.lower() == "text/plain" and note is None:
                note = note_text(part.data, part.charset)
            else:
                others.append(part)
        return order_json, note, others

    # ---- refusals ------------------------------------------------------------------------------------------
    def _quarantine(self, mail: _Mail, refused: Refused) -> None:
        tenant, outer = mail.site.tenant, mail.outer
        sender = _clip(outer.sender if outer else None, MAX_ADDRESS)
        log.warning("mail %s from %s for %s refused (%s): %s", mail.message_id, sender or "?", tenant,
                    refused.reason.value, refused.message)
        if _raw_deferred(mail.strict):  # the raw blob of an instance mail was placed without a sync
            self.blobs.sync([mail.sha256])
        if not mail.quarantined_before:
            gw.quarantine(self.engine, tenant, mail.sha256, refused.reason.value, self.clock(),
                          message=refused.message, sender=sender, message_id=mail.message_id)
        gw.set_inbound_state(self.engine, tenant, mail.message_id, QUARANTINED,
                             f"{refused.reason.value}: {refused.message}")
        if outer is not None and outer.kind is not MailKind.MDN:  # never answer a receipt (RFC 3798 2.1)
            mdn = self._mdn(mail.site, outer, disposition_for(refused.kind), refused.message)
            if mdn is not None:
                gw.enqueue_mdn(self.engine, tenant, mdn, self.clock())
                self._woken(mdn)

    # ---- receipts we owe -----------------------------------------------------------------------------------
    def _mdn(self, site: Site, outer: Outer, disposition: Disposition, text: str | None) -> gw.NewMdn | None:
        """The receipt for ``outer`` when it asked for one (Disposition-Notification-To and a Message-ID)."""
        if not outer.mdn_to or not outer.message_id:
            return None
        if len(outer.mdn_to) > MAX_ADDRESS or len(outer.message_id) > MAX_MESSAGE_ID:
            log.warning("no receipt for %s: its Message-ID or Disposition-Notification-To is too long to keep",
                        outer.message_id[:80])
            return None
        return gw.NewMdn(to_address=outer.mdn_to, original_message_id=outer.message_id,
                         params=mdn_params(disposition, final_recipient=site.address, text=text, outer=outer))

    def _woken(self, mdn: gw.NewMdn | None) -> None:
        if mdn is not None and self.on_mdn is not None:
            self.on_mdn()

    # ---- sets ----------------------------------------------------------------------------------------------
    def import_set(self, tenant: str, set_pk: int, *, operator: bool = False) -> gw.SetRow:
        """Import a complete set into the archive (an operator: also whatever parts an incomplete set has).

        CONFLICT when the set is not complete (and not ``operator``) or was imported or discarded already; an
        operator importing an imported set whose consult failed retries the consult instead.
        """
        s = gw.get_set(self.engine, tenant, set_pk)
        if operator and s.state == gw.IMPORTED and not s.consult_task:
            return self.retry_consult(tenant, set_pk)
        allowed = (gw.COMPLETE, gw.COLLECTING, gw.REPORTED) if operator else (gw.COMPLETE,)
        if s.state not in allowed:
            raise ServerError(ErrorKind.CONFLICT, f"inbound set {s.set_id} is {s.state}, it cannot be imported")
        parts = gw.set_parts(self.engine, tenant, set_pk)
        reply = self.workflow.reply_for(tenant, s)
        if reply is not None:  # the consultant's answer to one of our orders: back to the real patient first
            parts = self.workflow.relinked(tenant, reply, parts)
        self._index(tenant, s, parts)
        done = gw.mark_set_imported(self.engine, tenant, set_pk, self.clock(), operator=operator)
        log.info("set %s from %s imported for %s: %d of %d parts", s.set_id, s.sender, tenant, len(parts), s.total)
        return self.consult(tenant, done, parts, reply)

    def retry_consult(self, tenant: str, set_pk: int) -> gw.SetRow:
        """Create the consult of an imported set whose consult failed before (nothing happens when it exists)."""
        s = gw.get_set(self.engine, tenant, set_pk)
        if s.state != gw.IMPORTED:
            raise ServerError(ErrorKind.CONFLICT, f"inbound set {s.set_id} is {s.state}, not imported")
        parts = gw.set_parts(self.engine, tenant, set_pk)
        reply = self.workflow.reply_for(tenant, s)
        if reply is not None:
            parts = self.workflow.relinked(tenant, reply, parts)
        return self.consult(tenant, s, parts, reply)

    def consult(self, tenant: str, s: gw.SetRow, parts: list[gw.Part], reply: Reply | None = None) -> gw.SetRow:
        """The consult (ServiceRequest + Task, issue 5) of an imported set, created once and recorded on the set;
        for a ``reply`` to one of our orders, its DiagnosticReports and the completed order Task instead.

        A failure is logged with its reason and leaves the set imported without a consult (``consult_task``
        empty: the operator sees it and ``retry_consult`` tries again); it never undoes the import.
        """
        if s.consult_task or not parts:
            return s
        if reply is not None:
            try:
                return self.workflow.complete_reply(tenant, s, parts, reply)
            except Exception as exc:  # noqa: BLE001 - the import stands; the operator retries
                message = exc.message if isinstance(exc, ServerError) else repr(exc)
                log.error("set %s from %s for %s: the reply was imported, but not recorded on the order: %s",
                          s.set_id, s.sender, tenant, message, exc_info=not isinstance(exc, ServerError))
                return s
        try:
            path = self.blobs.path_of(parts[0].blob_sha256)
            parsed = parse_part10(path)
            site = self.sites.of_tenant(tenant)
            requester = organization_of(self.fhir, tenant, s.sender)
            performer = organization_of(self.fhir, tenant, site.address)
            request_id, task_id = consult_for_set(self.fhir, tenant, s, study_uid=s.study_uid or parsed.study_uid,
                                                  patient=parsed.columns[Level.STUDY], sender_org=requester,
                                                  performer=performer)
            gw.set_consult(self.engine, tenant, s.pk, task_id)
        except Exception as exc:  # noqa: BLE001 - the import stands; the operator retries the consult
            message = exc.message if isinstance(exc, ServerError) else repr(exc)
            log.error("set %s from %s for %s: imported, but no consult was created: %s", s.set_id, s.sender, tenant,
                      message, exc_info=not isinstance(exc, ServerError))
            return s
        log.log(logging.WARNING if s.emergency else logging.INFO,
                "%sset %s from %s for %s: consult ServiceRequest/%s, Task/%s", "NOTFALL: " if s.emergency else "",
                s.set_id, s.sender, tenant, request_id, task_id)
        return dataclasses.replace(s, consult_task=task_id)

    def _index(self, tenant: str, s: gw.SetRow, parts: list[gw.Part]) -> None:
        """Index the parts' instances in the archive (stored or identical: fine; anything else is logged)."""
        items = []
        for part in parts:
            path = self.blobs.path_of(part.blob_sha256)
            items.append(NewInstance(parse_part10(path), part.blob_sha256, path.stat().st_size))
        # the part blobs were made durable before add_set_part recorded them: no blobs.sync needed here
        results = self.archive.index_batch(tenant, items, replace=False) if items else []
        for item, result in zip(items, results):
            if result.verdict not in (Verdict.STORED, Verdict.IDENTICAL):
                log.error("set %s of %s: instance %s not imported (%s): %s", s.set_id, tenant,
                          item.parsed.sop_instance_uid, result.verdict, result.message)

    def discard_set(self, tenant: str, set_pk: int) -> gw.SetRow:
        """An operator drops a set that was not imported (its parts stay in the blob store until swept)."""
        return gw.discard_set(self.engine, tenant, set_pk, self.clock())
