"""Split a large mail into RFC 2046 message/partial fragments and join them again, byte-exact.

RFC 2046 5.2.2: the encapsulated message (here: the whole original mail, header and body) is cut at line
boundaries; fragment i carries ``Content-Type: message/partial; id="…"; number=i; total=n``. Each fragment's
own header copies every field of the original except the ones RFC 2046 5.2.2 treats specially
(Content-*, Message-ID, Subject, Encrypted, MIME-Version) - so From, To, Date, Disposition-Notification-To and
the X-TELEMEDICINE-* set headers travel on every fragment for routing, receipts and set collection - and adds
its own Message-ID, the Subject suffixed " (i/n)" (DRG profile), MIME-Version and the message/partial type.

Joining follows RFC 2046 5.2.2 rules (1)-(3): the first fragment's non-special fields, then the encapsulated
message's special fields, then its body. Because drg.build_instance_mail writes the special fields last and
split copies the others verbatim (Date included: the fragments originate when the mail does), join(split(m))
is m byte for byte; for any other mail the body, which carries the signed OpenPGP message, is exact.
"""

from __future__ import annotations

import re
from email.utils import formatdate
from typing import NamedTuple

from server.errors import ErrorKind, ServerError
from server.mail.mime import (
    CRLF,
    Defect,
    Entity,
    MailError,
    address,
    canonical,
    content_type,
    decode_words,
    header,
    new_msg_id,
    params_header,
    split_entity,
    text_header,
)

PARTIAL_TYPE = "message/partial"
# RFC 2046 5.2.2 (2): fields taken from the encapsulated message, not from the enclosing fragment
SPECIAL = frozenset({"subject", "message-id", "encrypted", "mime-version"})
_DIGITS = re.compile(r"^[0-9]{1,9}$")
_MAX_ROUNDS = 16


class Fragment(NamedTuple):
    """The message/partial parameters of one fragment; total is optional except on the last (RFC 2046 5.2.2)."""

    id: str
    number: int
    total: int | None


def is_special(name: str) -> bool:
    """True for the fields RFC 2046 5.2.2 (2) takes from the encapsulated message."""
    name = name.lower()
    return name.startswith("content-") or name in SPECIAL


def fragment_info(raw: bytes) -> Fragment | None:
    """(id, number, total) of a message/partial fragment, None for any other mail. RFC 2046 5.2.2."""
    return fragment_of(split_entity(canonical(raw)))


def fragment_of(entity: Entity) -> Fragment | None:
    """The Fragment of a parsed entity; raises FRAGMENT_PARAMETERS when its parameters are unusable."""
    ctype, params = content_type(entity.get("content-type"))
    if ctype != PARTIAL_TYPE:
        return None
    frag_id, number, total = params.get("id", "").strip(), params.get("number", ""), params.get("total")
    if not frag_id or not _DIGITS.match(number) or (total is not None and not _DIGITS.match(total)):
        raise MailError(Defect.FRAGMENT_PARAMETERS, parameter="Content-Type")
    count = int(total) if total is not None else None
    if int(number) < 1 or (count is not None and not 1 <= int(number) <= count):
        raise MailError(Defect.FRAGMENT_PARAMETERS, parameter="Content-Type", detail=f"{number} of {total}")
    return Fragment(frag_id, int(number), count)


# ------------------------------------------------------------------------------------------------------ split


def split(raw_mail: bytes, max_bytes: int) -> list[bytes]:
    """Fragments of at most max_bytes each (headers included), cut at line ends; [mail] if it fits. RFC 2046 5.2.2."""
    raw = canonical(raw_mail)
    if len(raw) <= max_bytes:
        return [raw]
    entity = split_entity(raw)
    sender = address(entity.get("from")) or "localhost"
    template = _Template(entity, new_msg_id(sender)[1:-1], sender)
    total, margin = 1, 0
    for _ in range(_MAX_ROUNDS):
        chunks = _cut(raw, max_bytes - len(template.header(total, total)) - len(CRLF) - margin)
        if len(chunks) != total:  # the count changes the header's digits: size again
            total = len(chunks)
            continue
        fragments = [template.header(i, total) + CRLF + chunk for i, chunk in enumerate(chunks, 1)]
        excess = max(len(f) for f in fragments) - max_bytes
        if excess <= 0:
            return fragments
        margin += excess  # a header that folds differently: leave that much more room
    raise ServerError(ErrorKind.INTERNAL, "message/partial fragment sizes did not converge")


class _Template:
    """The header of fragment i of n: copied routing fields plus its own id, subject and type. RFC 2046 5.2.2."""

    def __init__(self, entity: Entity, frag_id: str, sender: str) -> None:
        self._copied = b"".join(f.raw for f in entity.fields if not is_special(f.name))
        if entity.get("date") is None:
            self._copied += header("Date", formatdate(usegmt=True))
        self._subject = decode_words(entity.get("subject"))
        self._id = frag_id
        self._sender = sender

    def header(self, number: int, total: int) -> bytes:
        """The header block (without the empty line) of fragment number of total."""
        subject = f"{self._subject} ({number}/{total})".lstrip()
        return b"".join([
            self._copied,
            header("Message-ID", new_msg_id(self._sender)),
            text_header("Subject", subject),
            header("MIME-Version", "1.0"),
            params_header("Content-Type", PARTIAL_TYPE, {"id": self._id, "number": str(number), "total": str(total)}),
        ])


def _cut(raw: bytes, capacity: int) -> list[bytes]:
    """Cut raw into pieces of at most capacity bytes, each ending at a line end (CRLF). RFC 2046 5.2.2."""
    if capacity <= 0:
        raise ServerError(ErrorKind.INVALID, "size limit too small for the fragment headers", parameter="max_bytes")
    chunks, start, n = [], 0, len(raw)
    while start < n:
        if n - start <= capacity:
            chunks.append(raw[start:])
            break
        cut = raw.rfind(CRLF, start, start + capacity)
        if cut < 0:
            raise ServerError(ErrorKind.INVALID, "a line is longer than the fragment size limit", parameter="max_bytes")
        chunks.append(raw[start : cut + 2])
        start = cut + 2
    return chunks


# ------------------------------------------------------------------------------------------------------- join


def join(fragments: list[bytes]) -> bytes:
    """Reassemble fragments (any order, identical duplicates tolerated) into the original mail. RFC 2046 5.2.2."""
    if not fragments:
        raise MailError(Defect.FRAGMENT_MISSING, detail="no fragments")
    parsed = [_parse(raw) for raw in fragments]
    ids = {info.id for info, _ in parsed}
    if len(ids) > 1:
        raise MailError(Defect.FRAGMENT_ID_MISMATCH, parameter="id", detail=f"{len(ids)} ids")
    total = _total(parsed)
    by_number: dict[int, Entity] = {}
    for info, entity in parsed:
        if info.number > total:
            raise MailError(Defect.FRAGMENT_PARAMETERS, parameter="number", detail=f"{info.number} of {total}")
        seen = by_number.setdefault(info.number, entity)
        if seen.body != entity.body:
            raise MailError(Defect.FRAGMENT_CONFLICT, parameter="number", detail=str(info.number))
    if len(by_number) != total:
        missing = [k for k in range(1, min(total, len(by_number) + 5) + 1) if k not in by_number][:5]
        raise MailError(Defect.FRAGMENT_MISSING, parameter="number",
                        detail=f"{total - len(by_number)} of {total}, first {missing}")
    return _merge(by_number[1], b"".join(by_number[k].body for k in range(1, total + 1)))


def _parse(raw: bytes) -> tuple[Fragment, Entity]:
    """One fragment's parameters and entity; raises NOT_A_FRAGMENT for any other mail."""
    entity = split_entity(canonical(raw))
    info = fragment_of(entity)
    if info is None:
        raise MailError(Defect.NOT_A_FRAGMENT, parameter="Content-Type")
    return info, entity


def _total(parsed: list[tuple[Fragment, Entity]]) -> int:
    """The one total the fragments agree on (only the last one must carry it). RFC 2046 5.2.2."""
    totals = {info.total for info, _ in parsed if info.total is not None}
    if len(totals) > 1:
        raise MailError(Defect.FRAGMENT_TOTAL_MISMATCH, parameter="total", detail=str(sorted(totals)))
    if not totals:
        raise MailError(Defect.FRAGMENT_MISSING, parameter="total", detail="the last fragment (with total) is missing")
    return totals.pop()


def _merge(first: Entity, encapsulated: bytes) -> bytes:
    """RFC 2046 5.2.2 rules (1)-(3): first fragment's non-special fields + encapsulated special fields + body."""
    inner = split_entity(encapsulated)
    head = [f.raw for f in first.fields if not is_special(f.name)]
    head += [f.raw for f in inner.fields if is_special(f.name)]
    return b"".join(head) + CRLF + inner.body
