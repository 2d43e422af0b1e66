"""Byte-exact MIME helpers shared by the DRG mail codecs: entities, header fields, parameters, identifiers.

RFC 5322 (message format), RFC 2045/2046 (MIME), RFC 3156 section 5 (canonical CRLF form). Mails are handled
as bytes in canonical form (every line ends in CRLF) so that what is signed, split and joined stays exact;
Python's ``email`` package is used only to read header parameters and RFC 2047 words, never to re-serialise.
"""

from __future__ import annotations

import binascii
import email.policy
import enum
import re
import uuid
from dataclasses import dataclass
from email.header import decode_header, make_header
from email.message import Message
from email.utils import collapse_rfc2231_value, getaddresses, parseaddr

from server.dicomweb.multipart import MultipartParser, PartData, PartStart
from server.errors import ErrorKind, ServerError

CRLF = b"\r\n"
MAX_LINE = 998  # RFC 5322 2.1.1: at most 998 characters per line, excluding the CRLF
_FOLD_AT = 78  # RFC 5322 2.1.1: SHOULD be no more than 78 characters
_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 3.6.8 field-name: printable US-ASCII except colon
_TOKEN = re.compile(r'^[^\x00-\x20()<>@,;:\\"/\[\]?=\x7f-\uffff]+$')  # RFC 2045 5.1 token
_QUOTED = frozenset({"name", "filename", "boundary", "id"})  # quoted by convention even when a token


class Defect(enum.Enum):
    """Every way an incoming DRG mail can be malformed; the value is the message shown to the peer."""

    HEADER_SYNTAX = "malformed header field"
    LINE_TOO_LONG = "line longer than 998 characters (RFC 5322 2.1.1)"
    NOT_ENCRYPTED = "mail is not PGP/MIME encrypted (multipart/encrypted required, RFC 3156 4)"
    WRONG_PROTOCOL = 'multipart/encrypted needs protocol="application/pgp-encrypted" (RFC 3156 4)'
    ENCRYPTED_PARTS = "multipart/encrypted must have exactly two parts (RFC 3156 4)"
    NO_VERSION_PART = 'first part must be application/pgp-encrypted with "Version: 1" (RFC 3156 4)'
    NO_ENCRYPTED_DATA = "second part must be application/octet-stream holding the OpenPGP message (RFC 3156 4)"
    MULTIPART_SYNTAX = "malformed multipart body (RFC 2046 5.1.1)"
    INNER_NOT_MULTIPART = "decrypted entity must be multipart/mixed (DRG profile)"
    NO_DICOM_PART = "no application/dicom part (DRG profile: one DICOM file per mail)"
    TWO_DICOM_PARTS = "more than one application/dicom part (DRG profile: one DICOM file per mail)"
    DICOM_ENCODING = "application/dicom part must be base64 encoded (RFC 2045 6.8)"
    DICOM_NOT_BASE64 = "application/dicom part is not valid base64 (RFC 2045 6.8)"
    NOT_DICOM = "application/dicom part is not a DICOM file (PS3.10 7.1: 128-byte preamble and DICM)"
    WORKFLOW_PART = "a workflow message must carry exactly one application/fhir+json part of at most 256 KiB"
    PART_ENCODING = "part has an unknown or undecodable Content-Transfer-Encoding (RFC 2045 6)"
    SET_HEADER_MISSING = "X-TELEMEDICINE set header missing (DRG profile)"
    SET_HEADER_DUPLICATE = "X-TELEMEDICINE set header given twice (DRG profile)"
    SET_HEADER_NOT_NUMERIC = "X-TELEMEDICINE-SETPART/SETTOTAL must be positive integers (DRG profile)"
    SET_PART_OUT_OF_RANGE = "X-TELEMEDICINE-SETPART must lie in 1..SETTOTAL (DRG profile)"
    SET_HEADER_SYNTAX = "X-TELEMEDICINE-SETID/STUDYID value is empty or not printable US-ASCII (DRG profile)"
    SET_MISMATCH = "set headers outside the encryption differ from the signed ones inside (DRG profile)"
    NOT_A_FRAGMENT = "mail is not a message/partial fragment (RFC 2046 5.2.2)"
    FRAGMENT_PARAMETERS = "message/partial needs id, number (1..total) and a numeric total (RFC 2046 5.2.2)"
    FRAGMENT_ID_MISMATCH = "fragments belong to different messages (message/partial id differs, RFC 2046 5.2.2)"
    FRAGMENT_TOTAL_MISMATCH = "fragments disagree on the total (RFC 2046 5.2.2)"
    FRAGMENT_MISSING = "fragments missing, the message cannot be reassembled (RFC 2046 5.2.2)"
    FRAGMENT_CONFLICT = "two different fragments with the same number (RFC 2046 5.2.2)"
    NOT_AN_MDN = "mail is not a disposition notification (RFC 3798 3)"
    MDN_DISPOSITION = "MDN Disposition field missing or malformed (RFC 3798 3.2.6)"
    MDN_NO_ORIGINAL = "MDN names no original message (Original-Message-ID or In-Reply-To, RFC 3798 3.2.5)"
    NO_MDN_REQUESTED = "the original mail has no Disposition-Notification-To (RFC 3798 2.1)"


# Defects that mean tampering rather than bad syntax (DESIGN.md 5: kind SECURITY).
_SECURITY_DEFECTS = frozenset({Defect.SET_MISMATCH})


class MailError(ServerError):
    """A malformed mail: a ServerError (INVALID, or SECURITY for tampering) that names its Defect."""

    def __init__(self, defect: Defect, *, parameter: str | None = None, detail: str | None = None) -> None:
        kind = ErrorKind.SECURITY if defect in _SECURITY_DEFECTS else ErrorKind.INVALID
        message = f"{defect.value}: {detail}" if detail else defect.value
        super().__init__(kind, message, parameter=parameter)
        self.defect = defect


@dataclass(frozen=True)
class Field:
    """One header field: lower-cased name, unfolded value (latin-1 decoded) and its exact raw bytes. RFC 5322 2.2."""

    name: str
    value: str
    raw: bytes


@dataclass(frozen=True)
class Entity:
    """A MIME entity split into its header fields and its body bytes. RFC 2045 3, RFC 5322 2.1."""

    fields: tuple[Field, ...]
    body: bytes

    def get(self, name: str) -> str | None:
        """The value of the first field with this name (case-insensitive), or None."""
        name = name.lower()
        return next((f.value for f in self.fields if f.name == name), None)

    def all(self, name: str) -> list[str]:
        """The values of every field with this name, in order."""
        name = name.lower()
        return [f.value for f in self.fields if f.name == name]

    @property
    def header_block(self) -> bytes:
        """The exact header bytes (without the empty separator line)."""
        return b"".join(f.raw for f in self.fields)


def canonical(raw: bytes) -> bytes:
    """Line ends as CRLF; bare LF (mailbox files, some POP3 servers) become CRLF. RFC 3156 5, RFC 5322 2.3."""
    if raw.count(b"\n") == raw.count(CRLF):
        return raw
    return raw.replace(CRLF, b"\n").replace(b"\n", CRLF)


def split_entity(raw: bytes) -> Entity:
    """Split canonical bytes at the first empty line into header fields and body. RFC 5322 2.1, RFC 2045 3."""
    if raw.startswith(CRLF):
        head, body = b"", raw[2:]
    else:
        end = raw.find(b"\r\n\r\n")
        head, body = (raw, b"") if end < 0 else (raw[: end + 2], raw[end + 4 :])
    return Entity(parse_fields(head), body)


def parse_fields(head: bytes) -> tuple[Field, ...]:
    """Header lines into Fields, folded continuation lines joined; raises HEADER_SYNTAX. RFC 5322 2.2, 2.2.3."""
    fields: list[tuple[str, list[bytes]]] = []
    for line in head.split(CRLF)[:-1] if head.endswith(CRLF) else head.split(CRLF):
        if len(line) > MAX_LINE:
            raise MailError(Defect.LINE_TOO_LONG)
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1].append(line)
            continue
        name, colon, _ = line.partition(b":")
        name = name.rstrip(b" \t")  # RFC 5322 4.5.3 obsolete syntax: white space before the colon
        if not colon or not _NAME.match(name.decode("latin-1")):
            raise MailError(Defect.HEADER_SYNTAX, detail=line[:40].decode("latin-1", "replace"))
        fields.append((name.decode("ascii").lower(), [line]))
    return tuple(_field(name, lines) for name, lines in fields)


def _field(name: str, lines: list[bytes]) -> Field:
    """Build a Field from its raw lines (first line holds "name:")."""
    text = b"".join(lines).decode("latin-1")
    value = text.partition(":")[2].strip()
    return Field(name, value, b"".join(line + CRLF for line in lines))


def content_type(value: str | None) -> tuple[str, dict[str, str]]:
    """Parse a Content-Type value into (type/subtype lower-cased, parameters); default text/plain. RFC 2045 5.1."""
    msg = Message()
    msg["content-type"] = value or "text/plain"
    return msg.get_content_type(), _params(msg, "content-type")


def disposition(value: str | None) -> tuple[str, dict[str, str]]:
    """Parse a Content-Disposition value into (type lower-cased, parameters). RFC 2183 2."""
    msg = Message()
    msg["content-disposition"] = value or ""
    kind = (value or "").split(";", 1)[0].strip().lower()
    return kind, _params(msg, "content-disposition")


def _params(msg: Message, header: str) -> dict[str, str]:
    """Parameters of one header (names lower-cased, RFC 2231 values collapsed). RFC 2045 5.1, RFC 2231."""
    params = msg.get_params(header=header) or []
    return {k.lower(): collapse_rfc2231_value(v) for k, v in params[1:] if k}


def decode_words(value: str | None) -> str:
    """Decode RFC 2047 encoded-words of an unstructured header (Subject); tolerant of broken words."""
    if not value:
        return ""
    try:
        return str(make_header(decode_header(value)))
    except (ValueError, LookupError, UnicodeDecodeError):
        return value


def address(value: str | None) -> str | None:
    """The addr-spec of a mailbox header value ("Name <a@b>" -> "a@b"), or None. RFC 5322 3.4."""
    if not value:
        return None
    addr = parseaddr(value)[1]
    return addr if "@" in addr else None


def addresses(values: list[str]) -> tuple[str, ...]:
    """The addr-specs of address-list header values (To, Cc). RFC 5322 3.4."""
    return tuple(addr for _, addr in getaddresses(values) if "@" in addr)


def msg_id(value: str | None) -> str | None:
    """A msg-id normalised to "<left@right>" (first one of the value), or None. RFC 5322 3.6.4."""
    if not value:
        return None
    found = re.search(r"<([^<>\s]+)>", value)
    inner = found.group(1) if found else value.strip().split()[0] if value.strip() else ""
    return f"<{inner}>" if inner else None


def new_msg_id(sender: str) -> str:
    """A globally unique Message-ID on the sender's domain: "<uuid4-hex@domain>". RFC 5322 3.6.4."""
    return f"<{uuid.uuid4().hex}@{domain_of(sender)}>"


def domain_of(addr: str) -> str:
    """The domain of an addr-spec, IDNA-encoded when needed. RFC 5322 3.4.1, RFC 5890."""
    domain = addr.rpartition("@")[2].strip().rstrip(">") or "localhost"
    return domain if domain.isascii() else domain.encode("idna").decode("ascii")


def check_address(value: str, parameter: str) -> str:
    """Validate a mailbox given by our own caller (no header injection, one addr-spec). RFC 5322 3.4."""
    if any(c in value for c in "\r\n") or address(value) is None:
        raise ServerError(ErrorKind.INVALID, f"not a mail address: {value!r}", parameter=parameter)
    return value


def header(name: str, value: str) -> bytes:
    """One header field of ASCII value, folded at spaces to lines of at most 78 characters. RFC 5322 2.2.3."""
    if not _NAME.match(name) or any(c in value for c in "\r\n") or not value.isascii():
        raise ServerError(ErrorKind.INVALID, f"invalid header {name!r}", parameter=name)
    line, lines = f"{name}: ", []
    for word in value.split(" "):
        if len(line) + len(word) > _FOLD_AT and line.strip() and not line.endswith(": "):
            lines.append(line.rstrip(" "))
            line = " "
        line += word + " "
    lines.append(line.rstrip(" "))
    if any(len(x) > MAX_LINE for x in lines):
        raise ServerError(ErrorKind.INVALID, f"header {name} longer than 998 characters", parameter=name)
    return "\r\n".join(lines).encode("ascii") + CRLF


def text_header(name: str, value: str) -> bytes:
    """An unstructured or address header that may hold non-ASCII text, RFC 2047-encoded and folded. RFC 2047 5."""
    if any(c in value for c in "\r\n"):
        raise ServerError(ErrorKind.INVALID, f"invalid header {name!r}", parameter=name)
    policy = email.policy.SMTP
    return policy.header_factory(name, value).fold(policy=policy).encode("ascii")


def params_header(name: str, value: str, params: dict[str, str]) -> bytes:
    """A header with parameters (tokens bare, others quoted), one per line when long. RFC 2045 5.1, RFC 5322 2.2.3."""
    for key, val in params.items():
        if '"' in val or "\\" in val or not val.isascii():
            raise ServerError(ErrorKind.INVALID, f"invalid {name} parameter {key}", parameter=name)
    parts = [value] + [f"{key}={val}" if _TOKEN.match(val) and key not in _QUOTED else f'{key}="{val}"'
                       for key, val in params.items()]
    single = f"{name}: " + "; ".join(parts)
    text = single if len(single) <= _FOLD_AT else f"{name}: " + ";\r\n ".join(parts)
    if any(len(x) > MAX_LINE for x in text.split("\r\n")):
        raise ServerError(ErrorKind.INVALID, f"header {name} longer than 998 characters", parameter=name)
    return text.encode("ascii") + CRLF


def base64_lines(data: bytes) -> bytes:
    """Base64 in lines of 76 characters, each ending in CRLF. RFC 2045 6.8."""
    encoded = binascii.b2a_base64(data, newline=False)
    return b"".join(encoded[i : i + 76] + CRLF for i in range(0, len(encoded), 76))


def decode_base64(body: bytes) -> bytes:
    """Strictly decode a base64 body (line breaks and spaces ignored); raises binascii.Error. RFC 2045 6.8."""
    return binascii.a2b_base64(body.translate(None, b" \t\r\n"), strict_mode=True)


def check_lines(raw: bytes) -> None:
    """Refuse any line longer than 998 characters (lines end in CRLF). RFC 5322 2.1.1.

    Without splitting the text into lines: from the end of one line, the last LF at most a line's length ahead
    (``rfind``, in C) ends a run of lines that are all short enough, so a 1 MB mail of 76-column lines takes
    about a thousand steps. A bare LF (not CRLF) or no line end in reach: the exact split decides.
    """
    n = len(raw)
    if n <= MAX_LINE:
        return
    rfind = raw.rfind
    cr = -2  # where the CRLF ending the lines checked so far starts
    while n - cr - 2 > MAX_LINE:  # the rest may hold a line too long: the next line must end in reach
        lf = rfind(b"\n", cr + 3, cr + 4 + MAX_LINE)  # its CRLF starts at most MAX_LINE after cr + 2
        if lf < 0 or raw[lf - 1] != 13:
            if max(map(len, raw.split(CRLF))) > MAX_LINE:
                raise MailError(Defect.LINE_TOO_LONG)
            return
        cr = lf - 1


def multipart_parts(body: bytes, boundary: str | None) -> list[Entity]:
    """The body parts of a multipart entity, bodies byte-exact; raises MULTIPART_SYNTAX. RFC 2046 5.1.1."""
    if not boundary:
        raise MailError(Defect.MULTIPART_SYNTAX, parameter="Content-Type", detail="no boundary parameter")
    parser = MultipartParser(boundary)
    try:
        events = parser.feed(body)
        parser.close()
    except ServerError as exc:
        raise MailError(Defect.MULTIPART_SYNTAX, parameter="Content-Type", detail=exc.message) from exc
    parts: list[Entity] = []
    chunks: list[bytes] = []
    fields: tuple[Field, ...] = ()
    for event in events:
        if isinstance(event, PartStart):
            fields = tuple(Field(k, v, f"{k}: {v}\r\n".encode("latin-1")) for k, v in event.headers.items())
            chunks = []
        elif isinstance(event, PartData):
            chunks.append(event.data)
        else:
            parts.append(Entity(fields, b"".join(chunks)))
    return parts
