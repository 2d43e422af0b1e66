"""Search parameters per resource type, value extraction for the index and query parsing (FHIR R4 3.1.1 Search).

Pure: no SQL, no HTTP. The store turns ``Clause`` objects into SQL; the CapabilityStatement lists ``PARAMS``.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

from server.dicom.names import fold
from server.errors import ErrorKind, ServerError

STRING, TOKEN, REFERENCE, DATE = "string", "token", "reference", "date"
INSTANT_FORMAT = "%Y-%m-%dT%H:%M:%S.%f"  # stored instants and date bounds: fixed-width UTC text
MIN_DATE, MAX_DATE = "0001-01-01T00:00:00.000000", "9999-12-31T23:59:59.999999"
DATE_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb")
MODIFIERS = {STRING: ("exact", "contains", "missing"), TOKEN: ("missing", "not"), REFERENCE: ("missing",),
             DATE: ("missing",)}
RESULT_PARAMS = {"_count", "_offset", "_sort", "_include", "_revinclude", "_summary", "_total", "_format",
                 "_pretty", "_elements", "_totalMethod"}
COMMON = {"_id": TOKEN, "_lastUpdated": DATE}


@dataclass(frozen=True)
class Param:
    """One search parameter: its type, the element paths it indexes and, for references, the target types."""

    type: str
    paths: tuple[str, ...]
    targets: tuple[str, ...] = ()


def _p(kind: str, *paths: str, targets: tuple[str, ...] = ()) -> Param:
    return Param(kind, paths, targets)


_ID = _p(TOKEN, "identifier")
_STATUS = _p(TOKEN, "status")
_SUBJ = _p(REFERENCE, "subject")
_PAT = _p(REFERENCE, "subject", targets=("Patient",))
_BASED = _p(REFERENCE, "basedOn")

#: The search parameters we index, per resource type (FHIR R4 search parameter names).
PARAMS: dict[str, dict[str, Param]] = {
    "Organization": {
        "name": _p(STRING, "name", "alias"), "identifier": _ID, "address-city": _p(STRING, "address.city"),
        "address": _p(STRING, "address"), "type": _p(TOKEN, "type"), "active": _p(TOKEN, "active"),
        "partof": _p(REFERENCE, "partOf", targets=("Organization",)),
    },
    "HealthcareService": {
        "name": _p(STRING, "name"), "identifier": _ID, "active": _p(TOKEN, "active"),
        "organization": _p(REFERENCE, "providedBy", targets=("Organization",)),
        "location": _p(REFERENCE, "location", targets=("Location",)),
        "service-type": _p(TOKEN, "type"), "specialty": _p(TOKEN, "specialty"),
        "service-category": _p(TOKEN, "category"),
        "endpoint": _p(REFERENCE, "endpoint", targets=("Endpoint",)),
        "program": _p(TOKEN, "program"),
        "network": _p(STRING, "program"),  # ours: the teleradiology network(s) a service takes part in, by name
    },
    "Endpoint": {
        "name": _p(STRING, "name"), "identifier": _ID, "connection-type": _p(TOKEN, "connectionType"),
        "status": _STATUS, "organization": _p(REFERENCE, "managingOrganization", targets=("Organization",)),
        "payload-type": _p(TOKEN, "payloadType"), "address": _p(STRING, "address"),
    },
    "Patient": {
        "identifier": _ID, "name": _p(STRING, "name"), "family": _p(STRING, "name.family"),
        "given": _p(STRING, "name.given"), "birthdate": _p(DATE, "birthDate"), "gender": _p(TOKEN, "gender"),
        "active": _p(TOKEN, "active"),
    },
    "ServiceRequest": {
        "identifier": _ID, "status": _STATUS, "intent": _p(TOKEN, "intent"), "priority": _p(TOKEN, "priority"),
        "subject": _SUBJ, "patient": _PAT, "requester": _p(REFERENCE, "requester"),
        "performer": _p(REFERENCE, "performer"), "authored": _p(DATE, "authoredOn"), "code": _p(TOKEN, "code"),
        "category": _p(TOKEN, "category"), "based-on": _BASED,
        "occurrence": _p(DATE, "occurrenceDateTime", "occurrencePeriod"),
    },
    "Task": {
        "identifier": _ID, "status": _STATUS, "business-status": _p(TOKEN, "businessStatus"),
        "based-on": _BASED, "focus": _p(REFERENCE, "focus"), "part-of": _p(REFERENCE, "partOf", targets=("Task",)),
        "owner": _p(REFERENCE, "owner"), "requester": _p(REFERENCE, "requester"),
        "authored-on": _p(DATE, "authoredOn"), "modified": _p(DATE, "lastModified"), "code": _p(TOKEN, "code"),
        "intent": _p(TOKEN, "intent"), "priority": _p(TOKEN, "priority"), "subject": _p(REFERENCE, "for"),
        "patient": _p(REFERENCE, "for", targets=("Patient",)), "period": _p(DATE, "executionPeriod"),
    },
    "DiagnosticReport": {
        "identifier": _ID, "status": _STATUS, "subject": _SUBJ, "patient": _PAT, "based-on": _BASED,
        "code": _p(TOKEN, "code"), "category": _p(TOKEN, "category"),
        "date": _p(DATE, "effectiveDateTime", "effectivePeriod"), "issued": _p(DATE, "issued"),
    },
    "DocumentReference": {
        "identifier": _ID, "status": _STATUS, "subject": _SUBJ, "patient": _PAT, "type": _p(TOKEN, "type"),
        "category": _p(TOKEN, "category"), "date": _p(DATE, "date"),
    },
    "QuestionnaireResponse": {
        "identifier": _ID, "status": _STATUS, "subject": _SUBJ, "patient": _PAT, "based-on": _BASED,
        "authored": _p(DATE, "authored"), "author": _p(REFERENCE, "author"),
    },
    "Subscription": {
        "status": _STATUS, "type": _p(TOKEN, "channel.type"), "url": _p(TOKEN, "channel.endpoint"),
        "criteria": _p(STRING, "criteria"), "payload": _p(TOKEN, "channel.payload"),
    },
    "AuditEvent": {
        "date": _p(DATE, "recorded"), "type": _p(TOKEN, "type"), "subtype": _p(TOKEN, "subtype"),
        "action": _p(TOKEN, "action"), "outcome": _p(TOKEN, "outcome"), "agent": _p(REFERENCE, "agent.who"),
        "agent-name": _p(STRING, "agent.name"), "entity": _p(REFERENCE, "entity.what"),
        "entity-type": _p(TOKEN, "entity.type"), "site": _p(TOKEN, "source.site"),
    },
    "ImagingStudy": {
        "identifier": _ID, "status": _STATUS, "subject": _SUBJ, "patient": _PAT,
        "modality": _p(TOKEN, "series.modality"), "started": _p(DATE, "started"),
        "series": _p(TOKEN, "series.uid"),
    },
}

#: ``_sort`` keys accepted besides the string, token and date parameters of the type.
SORT_SPECIAL = ("_id", "_lastUpdated")


# ---- values of a resource ------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexValue:
    """One index row: a token/reference (system, value), a string (value folded, exact) or a date range."""

    param: str
    system: str | None = None
    value: str | None = None
    exact: str | None = None
    low: str | None = None
    high: str | None = None


def _walk(node: Any, path: list[str]) -> Iterator[Any]:
    if isinstance(node, list):
        for item in node:
            yield from _walk(item, path)
        return
    if not path:
        yield node
        return
    if isinstance(node, dict) and path[0] in node:
        yield from _walk(node[path[0]], path[1:])


_STRING_PARTS = ("text", "family", "given", "prefix", "suffix", "line", "city", "district", "state",
                 "postalCode", "country")


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key in _STRING_PARTS:
            value = node.get(key)
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str):
                    yield item
        codings = node.get("coding")
        for coding in codings if isinstance(codings, list) else []:  # a CodeableConcept's displays
            if isinstance(coding, dict) and isinstance(coding.get("display"), str):
                yield coding["display"]


def _tokens(node: Any) -> Iterator[tuple[str | None, str]]:
    if isinstance(node, bool):
        yield None, "true" if node else "false"
    elif isinstance(node, str):
        yield None, node
    elif isinstance(node, dict):
        if "coding" in node:
            for coding in node["coding"]:
                if coding.get("code"):
                    yield coding.get("system"), coding["code"]
        elif "code" in node:
            yield node.get("system"), node["code"]
        elif "value" in node:
            yield node.get("system"), str(node["value"])


_REF = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")


def parse_reference(text: str) -> tuple[str, str] | None:
    """(type, id) of a literal reference, relative or absolute (FHIR R4 2.3.0.1); None for others."""
    m = _REF.search(text)
    return (m.group(1), m.group(2)) if m else None


def index_values(resource: dict) -> list[IndexValue]:
    """The index rows of a resource for the parameters of its type."""
    out: list[IndexValue] = []
    for name, param in PARAMS.get(resource["resourceType"], {}).items():
        for path in param.paths:
            for node in _walk(resource, path.split(".")):
                out.extend(_values(name, param, node))
    return out


_WORD_START = re.compile(r"(?<=[^0-9A-Z])(?=[0-9A-Z])")


def _plain(text: str) -> str:
    """Upper case without any accent: 'Mü' -> 'MU' (the other spelling of what ``fold`` makes 'MUE')."""
    decomposed = unicodedata.normalize("NFKD", text.upper().replace("ß", "SS").replace("ẞ", "SS"))
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def string_forms(text: str) -> list[str]:
    """The folded forms a string search matches as prefixes (FHIR R4 3.1.1.4.6 string, accent-insensitive).

    The whole value and the rest from every word start ("bremen" finds "Klinikum Bremen-Mitte"), each in both
    German spellings of an umlaut ("Muenchen" and "Munchen" find "München"). The first form is the whole value.
    """
    out: list[str] = []
    for whole in dict.fromkeys((fold(text), _plain(text))):
        starts = [0] + [m.start() for m in _WORD_START.finditer(whole)]
        out.extend(whole[i:] for i in starts)
    return list(dict.fromkeys(out))


def _values(name: str, param: Param, node: Any) -> Iterator[IndexValue]:
    if param.type == STRING:
        for s in _strings(node):
            forms = string_forms(s)
            yield IndexValue(name, value=forms[0], exact=s)
            for form in forms[1:]:
                yield IndexValue(name, value=form)
    elif param.type == TOKEN:
        for system, code in _tokens(node):
            yield IndexValue(name, system=system, value=code)
    elif param.type == REFERENCE:
        ref = parse_reference(node.get("reference", "")) if isinstance(node, dict) else None
        if ref and (not param.targets or ref[0] in param.targets):
            yield IndexValue(name, system=ref[0], value=ref[1])
    elif param.type == DATE:
        if isinstance(node, str):
            low, high = date_range(node)
            yield IndexValue(name, low=low, high=high)
        elif isinstance(node, dict):
            low = date_range(node["start"])[0] if node.get("start") else MIN_DATE
            high = date_range(node["end"])[1] if node.get("end") else MAX_DATE
            yield IndexValue(name, low=low, high=high)


# ---- dates ---------------------------------------------------------------------------------------------

_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?"
                   r"(Z|[+-]\d{2}:\d{2})?)?)?)?$")


def date_range(text: str, *, parameter: str = "date") -> tuple[str, str]:
    """The UTC [low, high] of a FHIR date, dateTime or instant by its precision (FHIR R4 3.1.1.4.2)."""
    m = _DATE.match(text.strip())
    if not m:
        raise ServerError(ErrorKind.INVALID, f"invalid date {text!r}", parameter=parameter)
    year, month, day, hour, minute, second, frac, tz = m.groups()
    try:
        start = datetime(int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0),
                         int(second or 0), int(float(frac) * 1_000_000) if frac else 0)
    except ValueError as exc:
        raise ServerError(ErrorKind.INVALID, f"invalid date {text!r}", parameter=parameter) from exc
    try:
        end = _end(start, frac, second, minute, day, month)
        if tz and tz != "Z":
            sign = 1 if tz[0] == "+" else -1
            offset = timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6])) * sign
            start, end = start - offset, end - offset
        end -= timedelta(microseconds=1)
    except (ValueError, OverflowError) as exc:
        raise ServerError(ErrorKind.INVALID, f"date out of range {text!r}", parameter=parameter) from exc
        if tz and tz != "Z":
            sign = 1 if tz[0] == "+" else -1
            offset = timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6])) * sign
            start, end = start - offset, end - offset
        end -= timedelta(microseconds=1)
    return start.strftime(INSTANT_FORMAT).rjust(26, "0"), end.strftime(INSTANT_FORMAT).rjust(26, "0")


def _end(start: datetime, frac, second, minute, day, month) -> datetime:
    if frac or second:
        end = start + (timedelta(microseconds=1) if frac else timedelta(seconds=1))
    elif minute:
        end = start + timedelta(minutes=1)
    elif day:
        end = start + timedelta(days=1)
    elif month:
        end = start.replace(year=start.year + (start.month == 12), month=start.month % 12 + 1)
    else:
        end = start.replace(year=start.year + 1)
    return end


def now_instant() -> str:
    """The current UTC time as stored (fixed-width text)."""
    return datetime.now(timezone.utc).strftime(INSTANT_FORMAT)


def render_instant(stored: str) -> str:
    """A stored instant as a FHIR instant."""
    return stored + "Z"


# ---- queries -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alt:
    """One alternative of a parameter value (values separated by ',' are ORed)."""

    prefix: str = "eq"
    system: str | None = None
    code: str | None = None
    any_system: bool = True
    low: str | None = None
    high: str | None = None


@dataclass(frozen=True)
class Clause:
    """One search criterion: parameter, kind, modifier and its alternatives; chains nest a clause."""

    param: str
    kind: str
    modifier: str | None
    alts: tuple[Alt, ...]
    target: str | None = None  # reference type (modifier :Type or chain)
    chain: "Clause | None" = None


@dataclass(frozen=True)
class Include:
    """An _include (source:param[:target]) or _revinclude."""

    source: str
    param: str
    target: str | None


@dataclass
class Query:
    """A parsed search: criteria, sort, paging, includes."""

    resource_type: str
    clauses: list[Clause] = field(default_factory=list)
    sort: list[tuple[str, str | None, bool]] = field(default_factory=list)  # (param, kind, descending)
    count: int = 20
    offset: int = 0
    includes: list[Include] = field(default_factory=list)
    revincludes: list[Include] = field(default_factory=list)
    summary_count: bool = False
    summary: str | None = None  # true, text or data (FHIR R4 3.1.1.5.8 _summary)
    elements: tuple[str, ...] = ()  # _elements (3.1.1.5.9)
    ignored: list[str] = field(default_factory=list)


MAX_COUNT = 1000


def _split(value: str) -> list[str]:
    return [v.replace("\\,", ",") for v in re.split(r"(?<!\\),", value)]


def _param(rtype: str, name: str) -> Param | None:
    if name in COMMON:
        return Param(COMMON[name], ())
    return PARAMS.get(rtype, {}).get(name)


def parse_query(rtype: str, items: list[tuple[str, str]], *, lenient: bool) -> Query:
    """A Query from the (name, value) pairs of a search; unknown parameters INVALID unless lenient."""
    query = Query(rtype)
    for name, value in items:
        if name in RESULT_PARAMS:
            _result_param(query, name, value)
            continue
        try:
            query.clauses.append(_clause(rtype, name, value))
        except ServerError:
            if not lenient:
                raise
            query.ignored.append(name)
    return query


def _int(name: str, value: str, low: int, high: int) -> int:
    if not value.isdigit():
        raise ServerError(ErrorKind.INVALID, f"{name} must be a non-negative integer", parameter=name)
    return max(low, min(high, int(value)))


def _result_param(query: Query, name: str, value: str) -> None:
    if name == "_count":
        query.count = _int(name, value, 0, MAX_COUNT)
    elif name == "_offset":
        query.offset = _int(name, value, 0, 10**9)
    elif name == "_summary":
        if value == "count":
            query.summary_count = True
        elif value in ("true", "text", "data"):
            query.summary = value
        elif value != "false":
            raise ServerError(ErrorKind.INVALID, f"_summary={value} is not supported", parameter=name)
    elif name == "_elements":
        query.elements = tuple(e.strip() for e in value.split(",") if e.strip())
    elif name == "_sort":
        for key in value.split(","):
            desc = key.startswith("-")
            key = key.lstrip("-")
            p = _param(query.resource_type, key)
            if p is None or p.type == REFERENCE:
                raise ServerError(ErrorKind.INVALID, f"cannot sort by {key!r}", parameter="_sort")
            query.sort.append((key, p.type, desc))
    elif name in ("_include", "_revinclude"):
        parts = value.split(":")
        if len(parts) not in (2, 3):
            raise ServerError(ErrorKind.INVALID, f"invalid {name} {value!r}", parameter=name)
        source, pname = parts[0], parts[1]
        p = PARAMS.get(source, {}).get(pname)
        if p is None or p.type != REFERENCE:
            raise ServerError(ErrorKind.INVALID, f"unknown reference parameter {value!r}", parameter=name)
        inc = Include(source, pname, parts[2] if len(parts) == 3 else None)
        if name == "_include":
            if source != query.resource_type:
                raise ServerError(ErrorKind.INVALID, f"_include source must be {query.resource_type}",
                                  parameter=name)
            query.includes.append(inc)
        else:
            query.revincludes.append(inc)


def _clause(rtype: str, name: str, value: str) -> Clause:
    base, _, modifier = name.partition(":")
    p = _param(rtype, base.split(".")[0])
    if p is None:
        raise ServerError(ErrorKind.INVALID, f"unknown search parameter {name!r} for {rtype}", parameter=name)
    if "." in base or (p.type == REFERENCE and "." in modifier):  # chained (FHIR R4 3.1.1.4.12)
        return _chain(name, p, value)
    target = None
    if modifier and p.type == REFERENCE and modifier[:1].isupper():
        target, modifier = modifier, ""
    if modifier and modifier not in MODIFIERS[p.type]:
        raise ServerError(ErrorKind.INVALID, f"modifier :{modifier} not supported on {base}", parameter=name)
    if modifier == "missing":
        if value not in ("true", "false"):
            raise ServerError(ErrorKind.INVALID, ":missing takes true or false", parameter=name)
        return Clause(base, p.type, "missing", (Alt(code=value),))
    kind = "id" if base == "_id" else "lastUpdated" if base == "_lastUpdated" else p.type
    alts = tuple(_alt(kind, name, v, target) for v in _split(value))
    return Clause(base, kind, modifier or None, alts, target=target)


def _chain(name: str, p: Param, value: str) -> Clause:
    head, _, rest = name.partition(".")
    base, _, target = head.partition(":")
    if p.type != REFERENCE:
        raise ServerError(ErrorKind.INVALID, f"{base} is not a reference parameter", parameter=name)
    target = target or (p.targets[0] if len(p.targets) == 1 else None)
    if target is None:
        raise ServerError(ErrorKind.INVALID, f"chain on {base} needs a type modifier", parameter=name)
    inner = _clause(target, rest, value)
    return Clause(base, "chain", None, (), target=target, chain=inner)


def _alt(kind: str, name: str, value: str, target: str | None) -> Alt:
    if kind in (TOKEN, "id"):
        if "|" in value and kind == TOKEN:
            system, code = value.split("|", 1)
            return Alt(system=system or None, code=code or None, any_system=False)
        return Alt(code=value)
    if kind == STRING:
        return Alt(code=value)
    if kind == REFERENCE:
        ref = parse_reference(value)
        if ref:
            return Alt(system=ref[0], code=ref[1], any_system=False)
        return Alt(system=target, code=value, any_system=target is None)
    prefix = value[:2] if value[:2] in DATE_PREFIXES else "eq"
    low, high = date_range(value[2:] if value[:2] in DATE_PREFIXES else value, parameter=name)
    return Alt(prefix=prefix, low=low, high=high)
