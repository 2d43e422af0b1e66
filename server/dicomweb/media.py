"""Media types, Accept parsing and DICOMweb media type negotiation.

RFC 9110 8.3.1 (media type), 5.6.4 (quoted-string), 5.6.6 (parameters), 12.4.2 (qvalues), 12.5.1 (Accept);
RFC 2046 5.1.1 (boundary); DICOM PS3.18 8.7 (acceptable media types), 10.4 (WADO-RS), 10.5 (STOW-RS).

Parsing is lenient where real DICOMweb clients deviate from the grammar: unquoted parameter values may hold
characters outside ``token`` (``type=application/dicom``) and OWS is allowed around "=".
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from server.errors import ErrorKind, ServerError, invalid

_TCHAR = frozenset("!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits)
_OWS = " \t"
_QVALUE = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")
_MAX_BOUNDARY = 200


def _is_token(value: str) -> bool:
    """True if value is a non-empty RFC 9110 5.6.2 token."""
    return bool(value) and all(c in _TCHAR for c in value)


def _is_text(c: str) -> bool:
    """True for characters allowed in a quoted-string or field value: HTAB, SP, VCHAR, obs-text (RFC 9110 5.5)."""
    return c == "\t" or " " <= c <= "~" or "\x80" <= c <= "\xff"


def _quote(value: str) -> str:
    """Serialise a parameter value as token or quoted-string with backslash escapes. RFC 9110 5.6.4, 5.6.6."""
    if _is_token(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


@dataclass(frozen=True)
class MediaType:
    """A media type or range with its parameters (names lower-cased, values unquoted). RFC 9110 8.3.1."""

    type: str
    subtype: str
    params: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", self.type.lower())
        object.__setattr__(self, "subtype", self.subtype.lower())
        object.__setattr__(self, "params", tuple((n.lower(), v) for n, v in self.params))

    def param(self, name: str) -> str | None:
        """The value of parameter name (case-insensitive), or None."""
        name = name.lower()
        return next((v for n, v in self.params if n == name), None)

    def with_param(self, name: str, value: str) -> MediaType:
        """A copy with parameter name set to value (replacing an existing one in place, else appended)."""
        name = name.lower()
        if self.param(name) is None:
            return MediaType(self.type, self.subtype, (*self.params, (name, value)))
        return MediaType(self.type, self.subtype, tuple((n, value if n == name else v) for n, v in self.params))

    @property
    def essence(self) -> str:
        """"type/subtype" in lower case, without parameters."""
        return f"{self.type}/{self.subtype}".lower()

    def __str__(self) -> str:
        return self.essence + "".join(f"; {n}={_quote(v)}" for n, v in self.params)


@dataclass(frozen=True)
class AcceptItem:
    """One media range of an Accept header with its weight (q removed from the params). RFC 9110 12.5.1."""

    media: MediaType
    q: float


class _Scanner:
    """A cursor over a header value, raising INVALID on syntax errors."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> ServerError:
        shown = self.text if len(self.text) <= 120 else self.text[:117] + "..."
        return invalid(f"malformed media type ({what}): {shown!r}")

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_ows(self) -> None:
        while self.peek() and self.peek() in _OWS:
            self.pos += 1

    def token(self, what: str) -> str:
        start = self.pos
        while self.peek() and self.peek() in _TCHAR:
            self.pos += 1
        if self.pos == start:
            raise self.fail(f"expected {what}")
        return self.text[start : self.pos]

    def quoted(self) -> str:
        """Read a quoted-string at the cursor and return its unescaped content. RFC 9110 5.6.4."""
        out: list[str] = []
        self.pos += 1
        while True:
            c = self.peek()
            if not c:
                raise self.fail("unterminated quoted string")
            self.pos += 1
            if c == '"':
                return "".join(out)
            if c == "\\":
                c = self.peek()
                if not c:
                    raise self.fail("unterminated quoted string")
                self.pos += 1
            if not _is_text(c):
                raise self.fail("control character")
            out.append(c)

    def bare(self, stops: str) -> str:
        """Read an unquoted parameter value up to a stop character (lenient token). RFC 9110 5.6.6."""
        start = self.pos
        while self.peek() and self.peek() not in stops:
            self.pos += 1
        value = self.text[start : self.pos].strip(_OWS)
        if not value or '"' in value or not all(_is_text(c) for c in value):
            raise self.fail("bad parameter value")
        return value


def _param(sc: _Scanner, stops: str) -> tuple[str, str]:
    """Read one "name=value" parameter at the cursor. RFC 9110 5.6.6."""
    name = sc.token("parameter name").lower()
    sc.skip_ows()
    if sc.peek() != "=":
        raise sc.fail(f"parameter {name!r} without value")
    sc.pos += 1
    sc.skip_ows()
    if sc.peek() == '"':
        value = sc.quoted()
        sc.skip_ows()
        if not sc.at_end() and sc.peek() not in stops:
            raise sc.fail("text after quoted string")
        return name, value
    return name, sc.bare(stops)


def _media(sc: _Scanner, in_list: bool) -> MediaType:
    """Read type "/" subtype *( OWS ";" OWS [ parameter ] ) at the cursor. RFC 9110 8.3.1, 5.6.6."""
    stops = ";," if in_list else ";"
    sc.skip_ows()
    type_ = sc.token("type")
    if sc.peek() != "/":
        raise sc.fail("expected '/'")
    sc.pos += 1
    subtype = sc.token("subtype")
    params: list[tuple[str, str]] = []
    while True:
        sc.skip_ows()
        if sc.at_end() or (in_list and sc.peek() == ","):
            return MediaType(type_, subtype, tuple(params))
        if sc.peek() != ";":
            raise sc.fail("expected ';'")
        sc.pos += 1
        sc.skip_ows()
        if sc.at_end() or sc.peek() in stops:
            continue  # empty parameter, allowed by the grammar
        name, value = _param(sc, stops)
        if any(n == name for n, _ in params):
            raise sc.fail(f"duplicate parameter {name!r}")
        params.append((name, value))


def parse_media_type(value: str) -> MediaType:
    """Parse a Content-Type style media type; raise INVALID on malformed input. RFC 9110 8.3.1."""
    return _media(_Scanner(value), in_list=False)  # outside a list it stops only at the end or fails


def _weight(media: MediaType) -> AcceptItem:
    """Split the q parameter off a media range. RFC 9110 12.4.2."""
    q = media.param("q")
    if q is None:
        return AcceptItem(media, 1.0)
    if not _QVALUE.fullmatch(q):
        raise invalid(f"invalid q value {q[:20]!r} in Accept")
    rest = tuple((n, v) for n, v in media.params if n != "q")
    return AcceptItem(MediaType(media.type, media.subtype, rest), float(q))


def parse_accept(header: str | None) -> list[AcceptItem]:
    """Parse an Accept header into items sorted by q descending (stable); none or empty means */*. RFC 9110 12.5.1."""
    items: list[AcceptItem] = []
    sc = _Scanner(header or "")
    while True:
        sc.skip_ows()
        if sc.at_end():
            break
        if sc.peek() == ",":
            sc.pos += 1  # empty list element, RFC 9110 5.6.1
            continue
        items.append(_weight(_media(sc, in_list=True)))
    if not items:
        return [AcceptItem(MediaType("*", "*"), 1.0)]
    return sorted(items, key=lambda item: -item.q)


def _range_rank(media_range: str, essence: str) -> int | None:
    """How specifically a range matches an essence: 2 exact, 1 "type/*", 0 "*/*", None no match. RFC 9110 12.5.1."""
    if media_range == essence:
        return 2
    if media_range == "*/*":
        return 0
    if media_range.endswith("/*") and essence.split("/", 1)[0] == media_range[:-2]:
        return 1
    return None


def _type_rank(item: AcceptItem, type_param: str | None) -> int | None:
    """Rank an item's "type" parameter against the wanted one: absent 0, else 1 + range rank. PS3.18 8.7.3."""
    if type_param is None:
        return 0
    declared = item.media.param("type")
    if declared is None:
        return 0
    rank = _range_rank(declared.split(";", 1)[0].strip().lower(), type_param.strip().lower())
    return None if rank is None else rank + 1


def _ranked(items: list[AcceptItem], essence: str, type_param: str | None) -> list[tuple[tuple[int, int], AcceptItem]]:
    """The items matching essence and type_param, each with its specificity (range rank, type rank)."""
    want = essence.strip().lower()
    out = []
    for item in items:
        rank = _range_rank(item.media.essence, want)
        type_rank = _type_rank(item, type_param) if rank is not None else None
        if rank is not None and type_rank is not None:
            out.append(((rank, type_rank), item))
    return out


def accepts(items: list[AcceptItem], essence: str, *, type_param: str | None = None) -> AcceptItem | None:
    """The Accept item deciding whether essence (and "type" parameter) is acceptable. RFC 9110 12.5.1, PS3.18 8.7.

    Among matching items the most specific one wins (exact > "type/*" > "*/*", then exact > wildcard > absent
    "type" parameter), ties go to the higher q; the result is None when no item matches or the winner has q=0.
    """
    best: tuple[tuple[int, int], AcceptItem] | None = None
    for key, item in _ranked(items, essence, type_param):
        if best is None or key > best[0] or (key == best[0] and item.q > best[1].q):
            best = (key, item)
    return best[1] if best is not None and best[1].q > 0 else None


def acceptable(items: list[AcceptItem], essence: str, *, type_param: str | None = None) -> list[AcceptItem]:
    """All matching items with q > 0, by q descending then specificity (e.g. to pick a transfer-syntax). PS3.18 8.7.3.5.

    Empty when accepts() is None, so a more specific q=0 range also hides the wildcards it overrides.
    """
    if accepts(items, essence, type_param=type_param) is None:
        return []
    ranked = [pair for pair in _ranked(items, essence, type_param) if pair[1].q > 0]
    return [item for _, item in sorted(ranked, key=lambda pair: (-pair[1].q, (-pair[0][0], -pair[0][1])))]


def boundary_of(media: MediaType) -> str:
    """The boundary parameter of a multipart media type; INVALID if missing or unusable. RFC 2046 5.1.1, PS3.18 10.5."""
    if media.type != "multipart":
        raise ServerError(ErrorKind.UNSUPPORTED, f"{media.essence} is not a multipart media type")
    boundary = media.param("boundary")
    if not boundary:
        raise invalid(f"{media.essence} without boundary")
    if len(boundary) > _MAX_BOUNDARY or not all(" " <= c <= "~" for c in boundary):
        raise invalid(f"{media.essence} with a malformed boundary")
    return boundary
