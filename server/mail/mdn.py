"""Message Disposition Notifications: the DRG receipts for every DICOM e-mail. RFC 3798 (obsoletes RFC 2298), RFC 8098.

An MDN is ``multipart/report; report-type=disposition-notification`` (RFC 6522) with
  1. a human-readable text/plain part (German and English),
  2. ``message/disposition-notification``: Reporting-UA, [Original-Recipient], Final-Recipient,
     Original-Message-ID, Disposition, [Warning | Error] (RFC 3798 3.1, 3.2),
  3. ``text/rfc822-headers``: the original mail's header (RFC 3798 3: MAY).
The DRG profile uses four dispositions (DESIGN.md 4). ``displayed/warning`` carries the RFC 2298 modifier
"warning" that RFC 3798 3.2.6.3 deprecates; the network's gateways expect it, so we send it and parse it.
The Disposition field is written as DESIGN.md lists it (no space after ";"), which RFC 3798's grammar allows.
"""

from __future__ import annotations

import binascii
import enum
import quopri
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import format_datetime

from server.dicomweb.multipart import new_boundary
from server.errors import ErrorKind
from server.mail.drg import Outer, SetInfo, read_outer, set_info
from server.mail.mime import (
    CRLF,
    Defect,
    Entity,
    MailError,
    address,
    canonical,
    check_address,
    content_type,
    decode_base64,
    header,
    msg_id,
    multipart_parts,
    new_msg_id,
    params_header,
    parse_fields,
    split_entity,
    text_header,
)

MODE = "automatic-action/MDN-sent-automatically"  # RFC 3798 3.2.6.1: a gateway answers without a user
_POSITIVE = frozenset({"displayed", "processed", "dispatched"})  # RFC 3798 3.2.6.2 (+ RFC 8098)
_REFUSED = frozenset({"deleted", "denied", "failed"})  # "denied", "failed": RFC 2298 3.2.6.2, still seen
_COMMENT = re.compile(r"\([^()]*\)")
_MAX_FIELD_TEXT = 500  # keeps every folded line of the field far below 998 (RFC 5322 2.1.1)
_GERMAN = str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue", "Ä": "Ae", "Ö": "Oe", "Ü": "Ue", "ß": "ss"})


class Outcome(enum.Enum):
    """What a receipt means for our outbound mail (DESIGN.md 4)."""

    OK = "ok"
    WARNING = "warning"
    FAILED_RETRY = "failed-retry"
    FAILED_FINAL = "failed-final"


class Disposition(enum.Enum):
    """The four DRG dispositions; the value is disposition-type[/modifier] (RFC 3798 3.2.6, DESIGN.md 4)."""

    DISPLAYED = "displayed"
    WARNING = "displayed/warning"
    ERROR = "deleted/error"
    DELETED = "deleted"

    @property
    def field(self) -> str:
        """The Disposition field value we send: mode;type[/modifier] (RFC 3798 3.2.6)."""
        return f"{MODE};{self.value}"

    @property
    def outcome(self) -> Outcome:
        """The outcome this disposition means for the sender."""
        return OUTCOME[self]


OUTCOME = {
    Disposition.DISPLAYED: Outcome.OK,
    Disposition.WARNING: Outcome.WARNING,
    Disposition.ERROR: Outcome.FAILED_RETRY,
    Disposition.DELETED: Outcome.FAILED_FINAL,
}

# The MDN edge's error table (DESIGN.md 5): why a received mail failed -> the receipt the sender gets.
# ERROR ("deleted/error") where a later resend can succeed, DELETED ("deleted") where it cannot.
DISPOSITION_BY_KIND: dict[ErrorKind, Disposition] = {
    ErrorKind.INVALID: Disposition.DELETED,
    ErrorKind.UNSUPPORTED: Disposition.DELETED,
    ErrorKind.NOT_ACCEPTABLE: Disposition.DELETED,
    ErrorKind.NOT_FOUND: Disposition.DELETED,  # no such recipient/tenant here
    ErrorKind.CONFLICT: Disposition.DELETED,  # e.g. same SOP Instance UID with other bytes
    ErrorKind.UNAUTHENTICATED: Disposition.ERROR,  # sender key not (yet) in the directory: resend after provisioning
    ErrorKind.FORBIDDEN: Disposition.DELETED,
    ErrorKind.TOO_LARGE: Disposition.DELETED,
    ErrorKind.SECURITY: Disposition.DELETED,  # bad signature, tampering: never imported (DESIGN.md 4)
    ErrorKind.UPSTREAM: Disposition.ERROR,
    ErrorKind.TIMEOUT: Disposition.ERROR,
    ErrorKind.INTERNAL: Disposition.ERROR,
    ErrorKind.RESOURCES: Disposition.ERROR,  # disk full: resend later
}


def disposition_for(kind: ErrorKind | None, *, warning: bool = False) -> Disposition:
    """The receipt for one received mail: stored (with or without warnings) or the failure's table entry."""
    if kind is None:
        return Disposition.WARNING if warning else Disposition.DISPLAYED
    return DISPOSITION_BY_KIND[kind]


# (German, English) sentence for the human-readable part, RFC 3798 3: "explain the MDN to a human"
_TEXT = {
    Disposition.DISPLAYED: ("wurde empfangen und gespeichert.", "was received and stored."),
    Disposition.WARNING: ("wurde mit Warnungen empfangen und gespeichert.", "was received and stored with warnings."),
    Disposition.ERROR: ("konnte nicht verarbeitet werden; bitte erneut senden.",
                        "could not be processed; please send it again."),
    Disposition.DELETED: ("wurde abgewiesen; erneutes Senden hilft nicht.",
                          "was refused; sending it again will not help."),
}


@dataclass(frozen=True)
class Mdn:
    """A parsed receipt: which mail it answers, the disposition (mapped to the DRG four) and any text."""

    original_message_id: str
    disposition: Disposition
    disposition_type: str
    modifiers: tuple[str, ...]
    mode: str | None
    text: str
    error: str | None
    reporting_ua: str | None
    final_recipient: str | None
    message_id: str | None
    set: SetInfo | None

    @property
    def modifier(self) -> str | None:
        """The first disposition modifier ("warning", "error"), if any."""
        return self.modifiers[0] if self.modifiers else None

    @property
    def outcome(self) -> Outcome:
        """What the receipt means for the sender."""
        return self.disposition.outcome


# ------------------------------------------------------------------------------------------------------ build


def build_mdn(
    original: Outer,
    *,
    disposition: Disposition,
    reporting_ua: str,
    final_recipient: str,
    warning_or_error_text: str | None = None,
    message_id: str | None = None,
    now: datetime | None = None,
) -> bytes:
    """The MDN answering ``original``, sent to its Disposition-Notification-To. RFC 3798 2.1, 3; RFC 6522."""
    if original.mdn_to is None:
        raise MailError(Defect.NO_MDN_REQUESTED, parameter="Disposition-Notification-To")
    check_address(final_recipient, "final_recipient")
    if original.message_id is None:
        raise MailError(Defect.MDN_NO_ORIGINAL, parameter="Message-ID")
    boundary = new_boundary()
    parts = [_human_part(original, disposition, final_recipient, warning_or_error_text),
             _report_part(original, disposition, reporting_ua, final_recipient, warning_or_error_text)]
    if original.header_block.isascii():
        parts.append((params_header("Content-Type", "text/rfc822-headers", {}), original.header_block))
    body = b"".join(b"--" + boundary.encode() + CRLF + head + CRLF + _crlf(content) for head, content in parts)
    body += b"--" + boundary.encode() + b"--" + CRLF
    return _mdn_header(original, disposition, final_recipient, message_id, now, boundary) + CRLF + body


def original_from_header(header_block: bytes) -> Outer:
    """The original mail as ``build_mdn`` needs it, from its exact outer header block alone (what a queued receipt
    keeps: ``Outer.header_block``), as leniently as ``drg.read_outer`` reads a whole mail. RFC 3798 2.1, 3."""
    return read_outer(canonical(header_block).rstrip(CRLF) + CRLF + CRLF)


def _mdn_header(original: Outer, disposition: Disposition, sender: str, message_id: str | None,
                now: datetime | None, boundary: str) -> bytes:
    """The MDN's header: addressed to the requester, threaded to the original (RFC 3798 2.1, RFC 5322 3.6.4)."""
    assert original.mdn_to is not None and original.message_id is not None
    refs = " ".join((*original.references, original.message_id))
    subject = f"Empfangsbestätigung / Disposition notification ({disposition.value}): {original.subject}"
    return b"".join([
        text_header("From", sender),
        text_header("To", original.mdn_to),
        header("Date", format_datetime(now or datetime.now(timezone.utc))),
        header("Auto-Submitted", "auto-replied"),  # RFC 3834 5: no auto-answers to this one
        header("In-Reply-To", original.message_id),
        header("References", refs),
        original.set.render() if original.set else b"",
        header("Message-ID", msg_id(message_id) or new_msg_id(sender)),
        text_header("Subject", subject.strip()),
        header("MIME-Version", "1.0"),
        params_header("Content-Type", "multipart/report",
                      {"report-type": "disposition-notification", "boundary": boundary}),
    ])


def _human_part(original: Outer, disposition: Disposition, final_recipient: str,
                text: str | None) -> tuple[bytes, bytes]:
    """The text/plain explanation in German and English, quoted-printable UTF-8. RFC 3798 3, RFC 2045 6.7."""
    de, en = _TEXT[disposition]
    lines = [f"Die Nachricht {original.message_id} an {final_recipient} {de}",
             f"The message {original.message_id} to {final_recipient} {en}"]
    if text:
        lines += ["", text]
    encoded = quopri.encodestring("\n".join(lines).encode("utf-8") + b"\n").replace(b"\n", CRLF)
    head = params_header("Content-Type", "text/plain", {"charset": "utf-8"})
    return head + header("Content-Transfer-Encoding", "quoted-printable"), encoded


def _report_part(original: Outer, disposition: Disposition, reporting_ua: str, final_recipient: str,
                 text: str | None) -> tuple[bytes, bytes]:
    """The message/disposition-notification fields. RFC 3798 3.1, 3.2.1-3.2.7."""
    fields = [header("Reporting-UA", _ascii(reporting_ua))]
    orig_rcpt = next((f.value for f in original.fields if f.name == "original-recipient"), None)
    if orig_rcpt:
        fields.append(header("Original-Recipient", _ascii(orig_rcpt)))  # RFC 3798 3.2.3: only if given
    fields += [header("Final-Recipient", f"rfc822;{final_recipient}"),
               header("Original-Message-ID", original.message_id or ""),
               header("Disposition", disposition.field)]
    if text:
        name = "Warning" if disposition is Disposition.WARNING else "Error"  # RFC 2298 3.2.7 / RFC 3798 3.2.7
        fields.append(header(name, _ascii(text)))
    return params_header("Content-Type", "message/disposition-notification", {}), b"".join(fields)


def _ascii(text: str) -> str:
    """Text for a 7bit report field: one printable line, umlauts transliterated, other non-ASCII dropped, cut to
    500 characters (RFC 3798 3.1.1; the full text is in the human-readable part)."""
    ascii_text = unicodedata.normalize("NFKD", text.translate(_GERMAN)).encode("ascii", "ignore").decode("ascii")
    printable = "".join(c if c.isprintable() else " " for c in ascii_text)
    return " ".join(printable.split())[:_MAX_FIELD_TEXT] or "-"


def _crlf(data: bytes) -> bytes:
    """Part content ending in CRLF so the following delimiter starts a line (RFC 2046 5.1.1)."""
    return data if data.endswith(CRLF) else data + CRLF


# ------------------------------------------------------------------------------------------------------ parse


def parse_mdn(raw: bytes) -> Mdn:
    """Read an MDN from any network gateway (RFC 3798, RFC 8098 and RFC 2298 variants). RFC 3798 3."""
    entity = split_entity(canonical(raw))
    ctype, params = content_type(entity.get("content-type"))
    text = ""
    if ctype == "message/disposition-notification":
        report = entity.body
    elif ctype == "multipart/report":
        parts = multipart_parts(entity.body, params.get("boundary"))
        report_part = next((p for p in parts if _ctype(p) == "message/disposition-notification"), None)
        if report_part is None:
            raise MailError(Defect.NOT_AN_MDN, parameter="Content-Type", detail="no disposition-notification part")
        report = report_part.body
        text = next((_text(p) for p in parts if _ctype(p) == "text/plain"), "")
    else:
        raise MailError(Defect.NOT_AN_MDN, parameter="Content-Type", detail=ctype)
    return _mdn(entity, report, text)


def _mdn(entity: Entity, report: bytes, text: str) -> Mdn:
    """Assemble the Mdn from the top-level header and the report fields."""
    lines = [line for line in report.split(CRLF) if line.strip()]  # RFC 3464-style blank lines tolerated
    fields = Entity(parse_fields(CRLF.join(lines) + CRLF if lines else b""), b"")
    value = fields.get("disposition")
    if not value:
        raise MailError(Defect.MDN_DISPOSITION, parameter="Disposition", detail="missing")
    mode, dtype, modifiers = parse_disposition(value)
    original = (msg_id(fields.get("original-message-id")) or msg_id(entity.get("in-reply-to"))
                or _last_reference(entity.get("references")))
    if original is None:
        raise MailError(Defect.MDN_NO_ORIGINAL, parameter="Original-Message-ID")
    notes = [fields.get(n) for n in ("error", "warning", "failure")]
    try:
        info = set_info(entity, required=False)
    except MailError:
        info = None
    return Mdn(
        original_message_id=original,
        disposition=classify(dtype, modifiers),
        disposition_type=dtype,
        modifiers=modifiers,
        mode=mode,
        text=text,
        error="; ".join(n for n in notes if n) or None,
        reporting_ua=fields.get("reporting-ua"),
        final_recipient=address((fields.get("final-recipient") or "").partition(";")[2]),
        message_id=msg_id(entity.get("message-id")),
        set=info,
    )


def parse_disposition(value: str) -> tuple[str | None, str, tuple[str, ...]]:
    """(mode, type, modifiers) of a Disposition field, tolerant of spacing, case, comments, missing mode.

    disposition-field = "Disposition" ":" disposition-mode ";" disposition-type
                        [ "/" disposition-modifier *( "," disposition-modifier ) ]   (RFC 3798 3.2.6)
    """
    flat = _COMMENT.sub("", value).strip().lower()
    mode, _, rest = flat.rpartition(";")
    dtype, _, mods = rest.partition("/")
    dtype = dtype.strip()
    modifiers = tuple(m.strip() for m in mods.split(",") if m.strip())
    if dtype not in _POSITIVE | _REFUSED:
        raise MailError(Defect.MDN_DISPOSITION, parameter="Disposition", detail=value[:60])
    return ("".join(mode.split()) or None), dtype, modifiers


def classify(dtype: str, modifiers: tuple[str, ...]) -> Disposition:
    """Map any disposition type and modifiers onto the four DRG dispositions (DESIGN.md 4, RFC 3798 3.2.6).

    displayed/processed/dispatched: OK, or WARNING with any modifier; deleted or failed with "error": ERROR
    (resend may help); deleted, denied or any other refusal: DELETED (resend pointless).
    """
    if dtype in _POSITIVE:
        return Disposition.WARNING if modifiers else Disposition.DISPLAYED
    if "error" in modifiers or dtype == "failed":
        return Disposition.ERROR
    return Disposition.DELETED


def _ctype(part: Entity) -> str:
    """The part's media type."""
    return content_type(part.get("content-type"))[0]


def _text(part: Entity) -> str:
    """Decode a text/plain part (base64, quoted-printable or identity); undecodable bytes replaced."""
    cte = (part.get("content-transfer-encoding") or "").strip().lower()
    charset = content_type(part.get("content-type"))[1].get("charset", "utf-8")
    try:
        data = (decode_base64(part.body) if cte == "base64"
                else quopri.decodestring(part.body) if cte == "quoted-printable" else part.body)
    except (binascii.Error, ValueError):
        data = part.body
    try:
        return data.decode(charset, "replace").replace("\r\n", "\n").strip()
    except LookupError:
        return data.decode("utf-8", "replace").replace("\r\n", "\n").strip()


def _last_reference(value: str | None) -> str | None:
    """The last msg-id of a References field (the mail being answered). RFC 5322 3.6.4."""
    ids = re.findall(r"<[^<>\s]+>", value or "")
    return ids[-1] if ids else None
