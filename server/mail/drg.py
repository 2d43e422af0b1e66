"""Build and parse DRG @GIT DICOM e-mails: one DICOM file per PGP/MIME encrypted mail (pure, no I/O, no crypto).

Outer mail (RFC 3156 4, RFC 5322 3.6):
    From, To, Date, Disposition-Notification-To (RFC 3798 2.1), X-TELEMEDICINE-SETID/SETPART/SETTOTAL/STUDYID
    (DRG profile; repeated outside the encryption so that gateways can route and collect sets),
    [X-TELEMEDICINE-PRIORITY, Importance, X-Priority, Priority], extra headers, Message-ID, Subject,
    MIME-Version, Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"
      part 1  application/pgp-encrypted   "Version: 1"
      part 2  application/octet-stream    the caller's signed and encrypted, armored OpenPGP message
Inner entity (what the caller signs and encrypts, canonical CRLF form, 7bit: RFC 3156 5 and 6.2):
    Content-Type: multipart/mixed + the same X-TELEMEDICINE-* headers (signed: authoritative)
      application/dicom; name="<SOPInstanceUID>.dcm", base64, Content-Disposition attachment (PS3.12 Annex K)
      optional further parts (text note, PDF report), base64

Header order is deliberate: the fields RFC 2046 5.2.2 treats specially when joining message/partial
fragments (Message-ID, Subject, MIME-Version, Content-*) come last, so that split -> join restores the
mail byte for byte.
"""

from __future__ import annotations

import binascii
import enum
import quopri
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import format_datetime

from server.dicomweb.multipart import new_boundary
from server.errors import ErrorKind, ServerError
from server.mail.mime import (
    CRLF,
    Defect,
    Entity,
    Field,
    MailError,
    address,
    addresses,
    base64_lines,
    canonical,
    check_address,
    check_lines,
    content_type,
    decode_base64,
    decode_words,
    disposition,
    header,
    msg_id,
    multipart_parts,
    new_msg_id,
    params_header,
    split_entity,
    text_header,
)
from server.mail.partial import Fragment, fragment_of

SETID = "X-TELEMEDICINE-SETID"
SETPART = "X-TELEMEDICINE-SETPART"
SETTOTAL = "X-TELEMEDICINE-SETTOTAL"
STUDYID = "X-TELEMEDICINE-STUDYID"
PRIORITY = "X-TELEMEDICINE-PRIORITY"
DNT = "Disposition-Notification-To"
DNT_ALIAS = "X-TELEMEDICINE-DISPOSITION-NOTIFICATION-TO"  # seen from older gateways (DESIGN.md 4)
DEFAULT_SUBJECT = "DICOM-eMail"
WORKFLOW = "X-TELERAD-WORKFLOW"  # "1": a workflow message between telerad-bridge sites (build_message_mail)
WORKFLOW_TYPE, WORKFLOW_FILENAME = "application/fhir+json", "workflow.json"
MAX_MESSAGE_BYTES = 256 * 1024
PGP_PROTOCOL = "application/pgp-encrypted"
DICOM_TYPE = "application/dicom"
# Emergency ("Notfall") flag: our own header plus the common MUA priority headers (RFC 2156 5.3, de facto X-Priority)
EMERGENCY_HEADERS = ((PRIORITY, "emergency"), ("Importance", "high"), ("X-Priority", "1 (Highest)"),
                     ("Priority", "urgent"))
# Headers the builder writes itself; extra_headers may not replace them.
_RESERVED = frozenset(n.lower() for n in (
    "From", "To", "Date", "Message-ID", "Subject", "MIME-Version", DNT, SETID, SETPART, SETTOTAL, STUDYID,
    PRIORITY, "Importance", "X-Priority", "Priority"))
_PREAMBLE = b"This is an OpenPGP/MIME encrypted message (RFC 3156).\r\n"
_VERSION_LINE = re.compile(rb"^\s*Version\s*:\s*1\s*$", re.IGNORECASE | re.MULTILINE)
_DIGITS = re.compile(r"^[0-9]{1,9}$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_PRINTABLE = re.compile(r"^[!-~]([ -~]*[!-~])?$")
_DICM_OFFSET = 128  # PS3.10 7.1: 128-byte preamble, then "DICM"


class MailKind(enum.Enum):
    """What an incoming mail is, judged from its outer header (RFC 3156 4, RFC 2046 5.2.2, RFC 3798 3)."""

    ENCRYPTED = "encrypted"  # PGP/MIME multipart/encrypted: a DICOM mail (or an encrypted reply)
    PARTIAL = "partial"  # one message/partial fragment; join the set first
    MDN = "mdn"  # multipart/report; report-type=disposition-notification
    OTHER = "other"  # anything else; only read_outer returns it (parse_outer refuses it)


@dataclass(frozen=True)
class SetInfo:
    """The transfer-set position of one mail: X-TELEMEDICINE-SETID/SETPART/SETTOTAL/STUDYID (DRG profile)."""

    set_id: str
    part: int
    total: int
    study_uid: str | None = None

    def __post_init__(self) -> None:
        for name, value in ((SETID, self.set_id), (STUDYID, self.study_uid)):
            if value is not None and (len(value) > 200 or not _PRINTABLE.match(value)):
                raise MailError(Defect.SET_HEADER_SYNTAX, parameter=name)
        if not (1 <= self.part <= self.total):
            raise MailError(Defect.SET_PART_OUT_OF_RANGE, parameter=SETPART,
                            detail=f"{self.part} of {self.total}")

    def render(self) -> bytes:
        """The X-TELEMEDICINE set header fields, CRLF-terminated (DRG profile)."""
        out = header(SETID, self.set_id) + header(SETPART, str(self.part)) + header(SETTOTAL, str(self.total))
        return out + (header(STUDYID, self.study_uid) if self.study_uid else b"")


@dataclass(frozen=True)
class Part:
    """A non-DICOM body part (text note, PDF report); data is decoded. RFC 2045, RFC 2183."""

    content_type: str
    data: bytes
    filename: str | None = None
    charset: str | None = None


def note(text: str) -> Part:
    """A UTF-8 text/plain note to travel beside the DICOM part (DRG profile: non-DICOM data as extra parts)."""
    return Part("text/plain", text.encode("utf-8"), charset="utf-8")


def pdf(data: bytes, filename: str = "report.pdf") -> Part:
    """An application/pdf report part (RFC 8118)."""
    return Part("application/pdf", data, filename=filename)


@dataclass(frozen=True)
class Outer:
    """The unencrypted view of an incoming mail: routing headers and the encrypted payload. RFC 3156 4."""

    kind: MailKind
    fields: tuple[Field, ...]
    message_id: str | None
    sender: str | None
    recipients: tuple[str, ...]
    subject: str
    date: str | None
    mdn_to: str | None
    set: SetInfo | None
    emergency: bool
    encrypted: bytes | None = None  # the armored OpenPGP message, CRLF lines (kind ENCRYPTED)
    fragment: Fragment | None = None  # kind PARTIAL
    references: tuple[str, ...] = field(default=())

    @property
    def header_block(self) -> bytes:
        """The exact outer header bytes (for text/rfc822-headers in an MDN, RFC 3798 3)."""
        return b"".join(f.raw for f in self.fields)


@dataclass(frozen=True)
class Inner:
    """The decrypted entity: the DICOM file exactly as sent, its name, other parts and the signed set headers."""

    dicom: bytes
    filename: str | None
    set: SetInfo
    parts: tuple[Part, ...]
    fields: tuple[Field, ...]
    emergency: bool


# ---------------------------------------------------------------------------------------------------- building


def build_instance_mail(
    dicom: bytes,
    *,
    sop_instance_uid: str,
    study_uid: str,
    set_id: str,
    set_part: int,
    set_total: int,
    sender: str,
    recipient: str,
    mdn_to: str,
    encrypt: Callable[[bytes], bytes],
    subject: str = DEFAULT_SUBJECT,
    message_id: str | None = None,
    extra_headers: Mapping[str, str] | None = None,
    parts: Sequence[Part] = (),
    emergency: bool = False,
    now: datetime | None = None,
) -> bytes:
    """One DRG DICOM e-mail: inner multipart/mixed signed+encrypted by ``encrypt``, outer PGP/MIME. RFC 3156 4."""
    check_dicom(dicom)
    if not _UID.match(sop_instance_uid) or len(sop_instance_uid) > 64:
        raise ServerError(ErrorKind.INVALID, "not a DICOM UID", parameter="sop_instance_uid")
    info = SetInfo(set_id, set_part, set_total, study_uid)
    flags = _emergency_headers(emergency)
    inner = build_inner(dicom, f"{sop_instance_uid}.dcm", info, parts, flags)
    head = _outer_header(sender=sender, recipient=recipient, mdn_to=mdn_to, info=info, flags=flags,
                         extra=extra_headers or {}, message_id=message_id, subject=subject, now=now)
    return _pgp_mime(head, _armored(encrypt(inner)))


def build_message_mail(
    resource: bytes,
    *,
    sender: str,
    recipient: str,
    mdn_to: str,
    encrypt: Callable[[bytes], bytes],
    subject: str = DEFAULT_SUBJECT,
    message_id: str | None = None,
    emergency: bool = False,
    now: datetime | None = None,
) -> bytes:
    """A workflow message between telerad-bridge sites: one FHIR JSON resource (a Task state report, a priors
    request), signed and encrypted like a DICOM e-mail (RFC 3156 4) and acknowledged by MDN, but with no DICOM
    part and no set headers. The inner entity carries ``X-TELERAD-WORKFLOW: 1`` (signed, authoritative); the
    outer copy lets a gateway see what it is before decrypting. Only sent to sites that sent us an order.json
    (they speak it); a legacy DRG gateway would refuse it as not-DICOM."""
    if not resource or len(resource) > MAX_MESSAGE_BYTES:
        raise ServerError(ErrorKind.INVALID, f"a workflow message carries 1 to {MAX_MESSAGE_BYTES} bytes of FHIR JSON",
                          parameter="resource")
    flags = _emergency_headers(emergency)
    boundary = new_boundary()
    part = _render_part(Part(WORKFLOW_TYPE, resource, filename=WORKFLOW_FILENAME))
    inner = (params_header("Content-Type", "multipart/mixed", {"boundary": boundary}) + header(WORKFLOW, "1")
             + flags + CRLF + _multipart(boundary, [part]))
    head = _outer_header(sender=sender, recipient=recipient, mdn_to=mdn_to, info=None, flags=flags,
                         extra={WORKFLOW: "1"}, message_id=message_id, subject=subject, now=now)
    return _pgp_mime(head, _armored(encrypt(inner)))


def _pgp_mime(head: bytes, payload: bytes) -> bytes:
    """The outer multipart/encrypted entity around an armored payload (RFC 3156 4)."""
    boundary = new_boundary()
    body = _multipart(boundary, [
        (params_header("Content-Type", PGP_PROTOCOL, {}) +
         header("Content-Description", "PGP/MIME version identification"), b"Version: 1\r\n"),
        (params_header("Content-Type", "application/octet-stream", {"name": "encrypted.asc"}) +
         header("Content-Description", "OpenPGP encrypted message") +
         params_header("Content-Disposition", "inline", {"filename": "encrypted.asc"}), payload),
    ], preamble=_PREAMBLE)
    ctype = params_header("Content-Type", "multipart/encrypted",
                          {"protocol": PGP_PROTOCOL, "boundary": boundary})
    return head + ctype + CRLF + body


def build_inner(dicom: bytes, filename: str, info: SetInfo, parts: Sequence[Part] = (),
                flags: bytes = b"") -> bytes:
    """The inner multipart/mixed entity in canonical form, ready to be signed and encrypted. RFC 3156 5, 6.2."""
    boundary = new_boundary()
    dicom_head = (params_header("Content-Type", DICOM_TYPE, {"name": filename}) +
                  header("Content-Transfer-Encoding", "base64") +
                  params_header("Content-Disposition", "attachment", {"filename": filename}))
    body = _multipart(boundary, [(dicom_head, base64_lines(dicom))] + [_render_part(p) for p in parts])
    head = params_header("Content-Type", "multipart/mixed", {"boundary": boundary}) + info.render() + flags
    return head + CRLF + body


def _render_part(part: Part) -> tuple[bytes, bytes]:
    """Header and base64 body of one extra part (base64 keeps the signed entity 7bit, RFC 3156 3)."""
    if _dicom_like(content_type(part.content_type)[0], part.filename):
        raise ServerError(ErrorKind.INVALID, "one DICOM file per mail: extra parts must not be DICOM",
                          parameter="parts")
    params = {"charset": part.charset} if part.charset else {}
    if part.filename:
        params["name"] = part.filename
    head = params_header("Content-Type", part.content_type, params) + header("Content-Transfer-Encoding", "base64")
    if part.filename:
        head += params_header("Content-Disposition", "attachment", {"filename": part.filename})
    return head, base64_lines(part.data)


def _multipart(boundary: str, parts: list[tuple[bytes, bytes]], preamble: bytes = b"") -> bytes:
    """Join (header, CRLF-terminated body) pairs into a multipart body. RFC 2046 5.1.1."""
    delim = b"--" + boundary.encode("ascii")
    out = [preamble]
    for head, body in parts:
        out += [delim, CRLF, head, CRLF, body if body.endswith(CRLF) else body + CRLF]
    out += [delim, b"--", CRLF]
    return b"".join(out)


def _emergency_headers(emergency: bool) -> bytes:
    """The emergency ("Notfall") flag header fields, or nothing."""
    return b"".join(header(n, v) for n, v in EMERGENCY_HEADERS) if emergency else b""


def _outer_header(*, sender: str, recipient: str, mdn_to: str, info: SetInfo | None, flags: bytes,
                  extra: Mapping[str, str], message_id: str | None, subject: str, now: datetime | None) -> bytes:
    """The outer header fields, routing fields first and RFC 2046 5.2.2 special fields last. RFC 5322 3.6."""
    for name, param in ((sender, "sender"), (recipient, "recipient"), (mdn_to, "mdn_to")):
        check_address(name, param)
    bad = [n for n in extra if n.lower() in _RESERVED or n.lower().startswith("content-")]
    if bad:
        raise ServerError(ErrorKind.INVALID, f"extra header {bad[0]} is set by the builder", parameter=bad[0])
    mid = msg_id(message_id) if message_id is not None else new_msg_id(address(sender) or sender)
    if mid is None:
        raise ServerError(ErrorKind.INVALID, "not a Message-ID", parameter="message_id")
    date = format_datetime(now or datetime.now(timezone.utc))
    return b"".join([
        text_header("From", sender), text_header("To", recipient), header("Date", date), header(DNT, mdn_to),
        info.render() if info is not None else b"", flags, *(header(n, v) for n, v in extra.items()),
        header("Message-ID", mid), text_header("Subject", subject), header("MIME-Version", "1.0"),
    ])


def _armored(payload: bytes) -> bytes:
    """The caller's armored OpenPGP message as canonical 7bit text (RFC 4880 6, RFC 3156 4)."""
    if not isinstance(payload, (bytes, bytearray)) or not payload:
        raise ServerError(ErrorKind.INTERNAL, "encrypt() returned no bytes")
    text = canonical(bytes(payload))
    if not text.isascii():
        raise ServerError(ErrorKind.INTERNAL, "encrypt() must return an ASCII-armored message")
    check_lines(text)
    return text if text.endswith(CRLF) else text + CRLF


# ----------------------------------------------------------------------------------------------------- parsing


def parse_outer(raw: bytes) -> Outer:
    """Classify an incoming mail and read its unencrypted routing headers and payload. RFC 3156 4, RFC 5322 3.6."""
    raw = canonical(raw)
    check_lines(raw)
    entity = split_entity(raw)
    ctype, params = content_type(entity.get("content-type"))
    fragment = fragment_of(entity)
    if fragment is not None:
        return _outer(entity, MailKind.PARTIAL, fragment=fragment)
    if _is_mdn(ctype, params):
        return _outer(entity, MailKind.MDN)
    if ctype != "multipart/encrypted":
        raise MailError(Defect.NOT_ENCRYPTED, parameter="Content-Type", detail=ctype)
    if params.get("protocol", "").lower() != PGP_PROTOCOL:
        raise MailError(Defect.WRONG_PROTOCOL, parameter="Content-Type")
    return _outer(entity, MailKind.ENCRYPTED, encrypted=_encrypted_payload(entity, params.get("boundary")))


def read_outer(raw: bytes) -> Outer:
    """The routing headers of any mail, never refusing it (to answer a malformed mail with an MDN, RFC 3798 3)."""
    entity = split_entity(canonical(raw))
    ctype, params = content_type(entity.get("content-type"))
    try:
        fragment = fragment_of(entity)
    except MailError:
        fragment = None
    kind = (MailKind.PARTIAL if fragment else MailKind.MDN if _is_mdn(ctype, params)
            else MailKind.ENCRYPTED if ctype == "multipart/encrypted" else MailKind.OTHER)
    return _outer(entity, kind, fragment=fragment, lenient=True)


def _is_mdn(ctype: str, params: dict[str, str]) -> bool:
    """multipart/report; report-type=disposition-notification (RFC 3798 3, RFC 6522)."""
    return ctype == "multipart/report" and params.get("report-type", "").lower() == "disposition-notification"


def _encrypted_payload(entity: Entity, boundary: str | None) -> bytes:
    """Check the two RFC 3156 4 parts and return the armored message (CRLF-terminated lines)."""
    parts = multipart_parts(entity.body, boundary)
    if len(parts) != 2:
        raise MailError(Defect.ENCRYPTED_PARTS, detail=f"{len(parts)} parts")
    control, data = parts
    if content_type(control.get("content-type"))[0] != PGP_PROTOCOL or not _VERSION_LINE.search(control.body):
        raise MailError(Defect.NO_VERSION_PART, parameter=PGP_PROTOCOL)
    if content_type(data.get("content-type"))[0] != "application/octet-stream" or not data.body.strip():
        raise MailError(Defect.NO_ENCRYPTED_DATA, parameter="application/octet-stream")
    return data.body + CRLF


def _outer(entity: Entity, kind: MailKind, *, encrypted: bytes | None = None,
           fragment: Fragment | None = None, lenient: bool = False) -> Outer:
    """Assemble an Outer from the parsed header fields (lenient: malformed set headers read as absent)."""
    refs = " ".join(entity.all("references"))
    try:
        info = set_info(entity, required=False)
    except MailError:
        if not lenient:
            raise
        info = None
    return Outer(
        kind=kind,
        fields=entity.fields,
        message_id=msg_id(entity.get("message-id")),
        sender=address(entity.get("from")),
        recipients=addresses(entity.all("to")),
        subject=decode_words(entity.get("subject")),
        date=entity.get("date"),
        mdn_to=address(entity.get(DNT) or entity.get(DNT_ALIAS)),
        set=info,
        emergency=is_emergency(entity),
        encrypted=encrypted,
        fragment=fragment,
        references=tuple(f"<{r}>" for r in re.findall(r"<([^<>\s]+)>", refs)),
    )


@dataclass(frozen=True)
class Message:
    """A decrypted workflow message (``build_message_mail``): its FHIR JSON resource, undecoded."""

    resource: bytes
    fields: tuple[Field, ...]
    emergency: bool


def parse_decrypted(plaintext: bytes) -> Inner | Message:
    """The decrypted entity of an encrypted mail: a workflow message when its signed header says so (exactly one
    ``application/fhir+json`` part), else a DICOM instance mail (``parse_inner``)."""
    raw = canonical(plaintext)
    check_lines(raw)
    entity = split_entity(raw)
    if (entity.get(WORKFLOW) or "").strip() != "1":
        return parse_inner(raw)
    ctype, params = content_type(entity.get("content-type"))
    if ctype != "multipart/mixed":
        raise MailError(Defect.INNER_NOT_MULTIPART, parameter="Content-Type", detail=ctype)
    parts = [_part(p) for p in multipart_parts(entity.body, params.get("boundary"))]
    found = [p for p in parts if p.content_type == WORKFLOW_TYPE]
    if len(found) != 1 or len(found[0].data) > MAX_MESSAGE_BYTES:
        raise MailError(Defect.WORKFLOW_PART, parameter=WORKFLOW_TYPE, detail=f"{len(found)} parts")
    return Message(resource=found[0].data, fields=entity.fields, emergency=is_emergency(entity))


def parse_inner(plaintext: bytes) -> Inner:
    """Read the decrypted entity: exactly one DICOM part, the other parts and the set headers. DRG profile."""
    raw = canonical(plaintext)
    check_lines(raw)
    entity = split_entity(raw)
    ctype, params = content_type(entity.get("content-type"))
    if ctype == "multipart/mixed":
        parts = multipart_parts(entity.body, params.get("boundary"))
    elif _is_dicom(entity):
        parts = [entity]  # tolerated: a bare application/dicom entity instead of a one-part multipart/mixed
    else:
        raise MailError(Defect.INNER_NOT_MULTIPART, parameter="Content-Type", detail=ctype)
    info = set_info(entity, required=True)
    assert info is not None
    dicoms = [p for p in parts if _is_dicom(p)]
    if not dicoms:
        raise MailError(Defect.NO_DICOM_PART, parameter=DICOM_TYPE)
    if len(dicoms) > 1:
        raise MailError(Defect.TWO_DICOM_PARTS, parameter=DICOM_TYPE, detail=f"{len(dicoms)} parts")
    data = _dicom_bytes(dicoms[0])
    others = tuple(_part(p) for p in parts if p is not dicoms[0])
    return Inner(dicom=data, filename=_filename(dicoms[0]), set=info, parts=others, fields=entity.fields,
                 emergency=is_emergency(entity))


def _is_dicom(part: Entity) -> bool:
    """Whether a received part carries the DICOM file."""
    return _dicom_like(content_type(part.get("content-type"))[0], _filename(part))


def _dicom_like(ctype: str, filename: str | None) -> bool:
    """application/dicom, or application/octet-stream named *.dcm (tolerated from older gateways)."""
    if ctype == DICOM_TYPE:
        return True
    return ctype == "application/octet-stream" and (filename or "").lower().endswith(".dcm")


def _dicom_bytes(part: Entity) -> bytes:
    """Decode the base64 DICOM part and check it is a PS3.10 file. RFC 2045 6.8, RFC 3156 3 (7bit only)."""
    cte = (part.get("content-transfer-encoding") or "").strip().lower()
    if cte != "base64":
        raise MailError(Defect.DICOM_ENCODING, parameter="Content-Transfer-Encoding", detail=cte or "none")
    try:
        data = decode_base64(part.body)
    except (binascii.Error, ValueError) as exc:
        raise MailError(Defect.DICOM_NOT_BASE64, parameter=DICOM_TYPE) from exc
    check_dicom(data)
    return data


def check_dicom(data: bytes) -> None:
    """Require a PS3.10 file: 128-byte preamble followed by "DICM" (PS3.10 7.1)."""
    if data[_DICM_OFFSET : _DICM_OFFSET + 4] != b"DICM":
        raise MailError(Defect.NOT_DICOM, parameter=DICOM_TYPE)


def _part(part: Entity) -> Part:
    """Decode one non-DICOM part (base64, quoted-printable or identity). RFC 2045 6."""
    ctype, params = content_type(part.get("content-type"))
    cte = (part.get("content-transfer-encoding") or "7bit").strip().lower()
    try:
        if cte == "base64":
            data = decode_base64(part.body)
        elif cte == "quoted-printable":
            data = quopri.decodestring(part.body)
        elif cte in ("7bit", "8bit", "binary"):
            data = part.body
        else:
            raise MailError(Defect.PART_ENCODING, parameter="Content-Transfer-Encoding", detail=cte)
    except (binascii.Error, ValueError) as exc:
        raise MailError(Defect.PART_ENCODING, parameter="Content-Transfer-Encoding", detail=cte) from exc
    return Part(ctype, data, filename=_filename(part), charset=params.get("charset"))


def _filename(part: Entity) -> str | None:
    """The part's file name (Content-Disposition filename, else Content-Type name), reduced to a bare name.

    Untrusted: never use it to build a path (DESIGN.md 7). RFC 2183 2.3, RFC 2045 5.1.
    """
    name = disposition(part.get("content-disposition"))[1].get("filename")
    name = name or content_type(part.get("content-type"))[1].get("name")
    if not name:
        return None
    name = re.split(r"[/\\]", name)[-1]
    name = "".join(c for c in name if c.isprintable())
    return name or None


def set_info(entity: Entity, *, required: bool) -> SetInfo | None:
    """Read the X-TELEMEDICINE set headers; None when all are absent and not required. DRG profile."""
    values = {name: entity.all(name) for name in (SETID, SETPART, SETTOTAL, STUDYID)}
    if not required and not any(values[n] for n in (SETID, SETPART, SETTOTAL)):
        return None
    for name, vals in values.items():
        if not vals and name != STUDYID:
            raise MailError(Defect.SET_HEADER_MISSING, parameter=name)
        if len(vals) > 1:
            raise MailError(Defect.SET_HEADER_DUPLICATE, parameter=name)
    part, total = values[SETPART][0], values[SETTOTAL][0]
    for name, value in ((SETPART, part), (SETTOTAL, total)):
        if not _DIGITS.match(value):
            raise MailError(Defect.SET_HEADER_NOT_NUMERIC, parameter=name, detail=repr(value[:20]))
    study = values[STUDYID][0] if values[STUDYID] else None
    return SetInfo(values[SETID][0], int(part), int(total), study)


def is_emergency(entity: Entity) -> bool:
    """True when any emergency/priority header says so (DRG priority, RFC 2156 5.3 Importance/Priority, X-Priority)."""
    return ((entity.get(PRIORITY) or "").strip().lower() == "emergency"
            or (entity.get("importance") or "").strip().lower() == "high"
            or (entity.get("priority") or "").strip().lower() == "urgent"
            or (entity.get("x-priority") or "").strip().startswith("1"))


def check_set(outer: Outer, inner: Inner) -> SetInfo:
    """The signed set headers; outer copies, when present, must equal them (else tampering). DRG profile."""
    if outer.set is not None and outer.set != inner.set:
        raise MailError(Defect.SET_MISMATCH, parameter=SETID)
    return inner.set
