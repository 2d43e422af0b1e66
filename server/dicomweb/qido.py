"""QIDO-RS: parse the query parameters into matches and render result rows as DICOM JSON (PS3.18 10.6).

Pure code: no SQL here. ``server/store/index.py`` turns a :class:`QidoQuery` into SQL and returns a
:class:`QidoPage` of :class:`QidoRow`; :func:`render` turns those rows into the response objects.

The route calls, in this order::

    query, warnings = parse_query(level, params, study_uid=..., series_uid=...,
                                  default_limit=settings.qido_default_limit, max_limit=settings.qido_max_limit)
    page = index.search(session, tenant, query)
    body = render(page.rows, query, base_url)
    # warnings (+ MORE_RESULTS_WARNING when page.more) -> 'Warning: 299 <host>: "<text>"' headers

Matching (PS3.4 C.2.2.2, PS3.18 8.3.4):

* keys are keywords or 8 hex digit tags of :data:`server.dicom.attributes.INDEXED` of the route's level or a
  higher one; anything else is refused with INVALID naming the parameter (a key given twice too);
* an empty value (or ``*``) is universal matching: the key only adds the attribute to the results;
* UID: single value or a list separated by ``,`` or ``\\``;
* TEXT: single value, case-sensitive, wildcards ``*`` and ``?``; leading/trailing spaces are not significant;
* PN: like TEXT but on the folded (``names.normalize_pn``) form, so case- and accent-insensitive;
  ``fuzzymatching=true`` ORs a Koelner Phonetik match: each query word without wildcards has its code
  among the stored name's codes;
* MULTI (ModalitiesInStudy): any of the listed values (``,`` or ``\\`` separated) among the stored values;
* DATE: single value or range ``A-B``, ``-B``, ``A-``;
* TIME, DATETIME: single value or range; a value of reduced precision stands for the whole interval it
  names (``0800`` = 08:00:00.000000 .. 08:00:59.999999); a TIME range whose lower bound is after its
  upper bound spans midnight; a DATETIME timezone offset is ignored (warning);
* INT: single integer value.

Results (PS3.18 10.6.3.3): the level's precomputed ``attrs`` plus the computed attributes (counts,
ModalitiesInStudy, RetrieveURL, AvailableTransferSyntaxUID, InstanceAvailability); the parent levels'
attributes when the route is not scoped to that parent (``/series``: study attributes; ``/studies/{s}/
instances``: series attributes; ``/instances``: both); StudyInstanceUID (and SeriesInstanceUID for
instances) always. Matching keys and ``includefield`` attributes are added, from the parents' rows or else
from the DICOM JSON of a representative instance (the first stored of the study/series, the instance itself
at instance level). ``includefield=all`` adds every parent attribute and, for instances, the whole metadata.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any, Literal

from pydicom import datadict

from server.dicom import json as dicom_json
from server.dicom.attributes import (
    AVAILABLE_TRANSFER_SYNTAX_UID,
    BY_KEYWORD,
    BY_TAG,
    INDEXED,
    INSTANCE_AVAILABILITY,
    RETRIEVE_URL,
    IndexedAttribute,
    Kind,
    Level,
)
from server.dicom.names import normalize_pn, phonetic_words
from server.errors import invalid

MORE_RESULTS_WARNING = "There are additional results that can be requested"

_DEPTH = {Level.STUDY: 0, Level.SERIES: 1, Level.INSTANCE: 2}
_LEVELS = (Level.STUDY, Level.SERIES, Level.INSTANCE)

STUDY_UID_TAG = 0x0020000D
SERIES_UID_TAG = 0x0020000E
SOP_UID_TAG = 0x00080018
MODALITIES_TAG = 0x00080061
STUDY_SERIES_TAG = 0x00201206
STUDY_INSTANCES_TAG = 0x00201208
SERIES_INSTANCES_TAG = 0x00201209

# Attributes computed from the rows, per level; RetrieveURL, AvailableTransferSyntaxUID and
# InstanceAvailability only for the result's own level.
_COMPUTED_BY_LEVEL = {
    Level.STUDY: frozenset({MODALITIES_TAG, STUDY_SERIES_TAG, STUDY_INSTANCES_TAG}),
    Level.SERIES: frozenset({SERIES_INSTANCES_TAG}),
    Level.INSTANCE: frozenset(),
}
_OWN_COMPUTED = frozenset({RETRIEVE_URL, AVAILABLE_TRANSFER_SYNTAX_UID, INSTANCE_AVAILABILITY})

_HEX_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_KEYWORD = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_INT = re.compile(r"^[+-]?[0-9]+$")
_DA = re.compile(r"^([0-9]{4})([0-9]{2})([0-9]{2})$")
_TM = re.compile(r"^([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:\.([0-9]{1,6}))?)?)?$")
_DT = re.compile(
    r"^([0-9]{4})(?:([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:\.([0-9]{1,6}))?)?)?)?)?)?"
    r"([+-][0-9]{4})?$"
)
_PN_WORDS = re.compile(r"[\^\s=,.\-]+")

_SPECIAL = ("includefield", "limit", "offset", "fuzzymatching")
# Content negotiation parameters of PS3.18 8.3.3.1 / 8.3.3.2: the route handles them, matching ignores them.
_PASSED_THROUGH = ("accept", "charset")


class Op(str, enum.Enum):
    """How one matching key compares."""

    UNIVERSAL = "universal"  # no condition: the attribute is only returned
    EQUAL = "equal"  # values[0]
    ANY_OF = "any-of"  # UID list: column IN values; MULTI: any value (a pattern) among the stored values
    WILDCARD = "wildcard"  # values[0] is a DICOM pattern with * and ?
    RANGE = "range"  # low <= column <= high, either bound may be None


@dataclass(frozen=True)
class Match:
    """One matching key of the query, normalised for the SQL builder."""

    key: str  # the query parameter as given, for messages
    attribute: IndexedAttribute
    op: Op
    values: tuple[Any, ...] = ()
    low: str | None = None
    high: str | None = None
    wraps_midnight: bool = False  # TIME range with low > high: column >= low OR column <= high
    phonetic: tuple[str, ...] = ()  # PN + fuzzymatching: codes that must all be in the *_phonetic column

    @property
    def column(self) -> str:
        """The SQL column compared (PN: its folded ``*_norm`` companion)."""
        if self.attribute.kind is Kind.PN:
            return self.attribute.column + "_norm"
        return self.attribute.column

    @property
    def phonetic_column(self) -> str:
        """The ``*_phonetic`` companion column of a PN attribute."""
        return self.attribute.column + "_phonetic"


@dataclass(frozen=True)
class QidoQuery:
    """A parsed QIDO-RS request."""

    level: Level
    matches: tuple[Match, ...]
    includefields: frozenset[int] | Literal["all"]
    fuzzy: bool
    limit: int
    offset: int
    study_uid: str | None
    series_uid: str | None


@dataclass(frozen=True)
class QidoRow:
    """What :func:`render` needs of one result (filled by ``server.store.index.search``).

    ``*_attrs`` are DICOM JSON texts; a parent's attrs are None when the query does not need them.
    ``transfer_syntaxes``: the series' backslash-joined set at series level, the instance's own at
    instance level. ``meta``: DICOM JSON of the representative instance, None unless :func:`needs_meta`.
    """

    study_uid: str
    series_uid: str | None = None
    sop_uid: str | None = None
    study_attrs: str | None = None
    series_attrs: str | None = None
    instance_attrs: str | None = None
    modalities_in_study: str | None = None
    study_series: int | None = None
    study_instances: int | None = None
    series_instances: int | None = None
    transfer_syntaxes: str | None = None
    meta: str | None = None


@dataclass(frozen=True)
class QidoPage:
    """One page of results; ``more`` is True when results beyond ``limit`` exist."""

    rows: list[QidoRow]
    more: bool


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


def parse_query(
    level: Level,
    params: Sequence[tuple[str, str]],
    *,
    study_uid: str | None,
    series_uid: str | None,
    default_limit: int,
    max_limit: int,
) -> tuple[QidoQuery, list[str]]:
    """Parse the query parameters of a QIDO-RS request; return the query and warning texts.

    Raises ``ServerError`` INVALID whose ``parameter`` names the offending query parameter.
    """
    warnings: list[str] = []
    seen_specials: set[str] = set()
    seen_tags: dict[int, str] = {}
    includes: set[int] = set()
    include_all = False
    fuzzy = False
    limit: int | None = None
    offset = 0
    raw: list[tuple[str, IndexedAttribute, str]] = []

    for key, value in params:
        special = key.lower()
        if special in _PASSED_THROUGH:
            continue
        if special in _SPECIAL:
            if special != "includefield":
                if special in seen_specials:
                    raise invalid(f"Query parameter {key} is given more than once", parameter=key)
                seen_specials.add(special)
            if special == "includefield":
                for item in value.split(","):
                    item = item.strip()
                    if not item:
                        continue
                    if item == "all":
                        include_all = True
                    else:
                        includes.add(_include_tag(item, key))
            elif special == "limit":
                limit = _non_negative(key, value)
            elif special == "offset":
                offset = _non_negative(key, value)
            else:
                v = value.strip().lower()
                if v not in ("true", "false"):
                    raise invalid(f"{key} must be true or false, not {value!r}", parameter=key)
                fuzzy = v == "true"
            continue
        attribute = _match_attribute(key, level)
        if attribute.tag in seen_tags:
            raw = _repeat_uid_key(raw, key, attribute, value, seen_tags[attribute.tag])
            continue
        seen_tags[attribute.tag] = key
        raw.append((key, attribute, value))

    matches = tuple(_match(key, attribute, value, fuzzy, warnings) for key, attribute, value in raw)

    if limit is None:
        limit = default_limit
        if limit > max_limit:
            limit = max_limit
    elif limit > max_limit:
        warnings.append(
            f"The limit {limit} is above the maximum of {max_limit}; at most {max_limit} results are returned"
        )
        limit = max_limit

    return (
        QidoQuery(
            level=level,
            matches=matches,
            includefields="all" if include_all else frozenset(includes),
            fuzzy=fuzzy,
            limit=limit,
            offset=offset,
            study_uid=study_uid,
            series_uid=series_uid,
        ),
        warnings,
    )


def _repeat_uid_key(raw: list[tuple[str, IndexedAttribute, str]], key: str, attribute: IndexedAttribute,
                    value: str, first: str) -> list[tuple[str, IndexedAttribute, str]]:
    """A UID key given again adds its values to the UID list (``k=a&k=b`` as ``k=a,b``, PS3.18 8.3.4.1).

    dicomweb-client (and so wsidicom) sends a list of UIDs that way; any other key given twice is INVALID.
    """
    if attribute.kind is not Kind.UID or not value.strip() or any(
            a.tag == attribute.tag and not v.strip() for _, a, v in raw):
        raise invalid(f"Matching key {key} is given more than once (also as {first})", parameter=key)
    return [(k, a, f"{v},{value}" if a.tag == attribute.tag else v) for k, a, v in raw]


def _non_negative(key: str, value: str) -> int:
    v = value.strip()
    if not v.isascii() or not v.isdigit():
        raise invalid(f"{key} must be a non-negative integer, not {value!r}", parameter=key)
    return int(v)


def _dicom_tag(item: str) -> int | None:
    """The tag of a keyword or 8-hex-digit tag known to DICOM (or well formed), None if unknown."""
    if _HEX_TAG.match(item):
        return int(item, 16)
    if _KEYWORD.match(item):
        return datadict.tag_for_keyword(item)
    return None


def _include_tag(item: str, key: str) -> int:
    if "." in item:
        raise invalid(f"{key}: attribute paths ({item}) are not supported", parameter=key)
    tag = _dicom_tag(item)
    if tag is None:
        raise invalid(f"{key}: {item!r} is neither a DICOM keyword nor a tag", parameter=key)
    return tag


def _match_attribute(key: str, level: Level) -> IndexedAttribute:
    """The indexed attribute a matching key names, refused unless matchable at ``level``."""
    if "." in key:
        raise invalid(f"{key}: matching on sequence attributes is not supported", parameter=key)
    attribute = BY_TAG.get(int(key, 16)) if _HEX_TAG.match(key) else BY_KEYWORD.get(key)
    if attribute is None:
        if _dicom_tag(key) is not None:
            raise invalid(f"{key} is not supported for matching", parameter=key)
        raise invalid(f"Unknown query parameter {key}: neither a DICOM keyword nor a tag", parameter=key)
    if _DEPTH[attribute.level] > _DEPTH[level]:
        raise invalid(
            f"{key} is a {attribute.level.value}-level attribute and cannot be matched in a "
            f"{level.value}-level query",
            parameter=key,
        )
    return attribute


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _match(key: str, attribute: IndexedAttribute, value: str, fuzzy: bool, warnings: list[str]) -> Match:
    kind = attribute.kind
    v = value.strip(" \x00")
    if v == "" or set(v) == {"*"}:
        return Match(key, attribute, Op.UNIVERSAL)
    if kind is Kind.UID:
        uids = tuple(u.strip() for u in re.split(r"[,\\]", v))
        for u in uids:
            if len(u) > 64 or not _UID.match(u):
                raise invalid(f"{key}: {u!r} is not a valid UID", parameter=key)
        if len(uids) == 1:
            return Match(key, attribute, Op.EQUAL, uids)
        return Match(key, attribute, Op.ANY_OF, tuple(dict.fromkeys(uids)))
    if kind is Kind.TEXT:
        return Match(key, attribute, Op.WILDCARD if _has_wildcard(v) else Op.EQUAL, (v,))
    if kind is Kind.PN:
        norm = normalize_pn(v)
        if norm == "" or set(norm) == {"*"}:
            return Match(key, attribute, Op.UNIVERSAL)
        phonetic: tuple[str, ...] = ()
        if fuzzy:
            words = [w for w in _PN_WORDS.split(norm) if w and not _has_wildcard(w)]
            phonetic = tuple(dict.fromkeys(phonetic_words("^".join(words)))) if words else ()
        op = Op.WILDCARD if _has_wildcard(norm) else Op.EQUAL
        return Match(key, attribute, op, (norm,), phonetic=phonetic)
    if kind is Kind.MULTI:
        values = tuple(dict.fromkeys(x.strip() for x in re.split(r"[,\\]", v) if x.strip()))
        if not values:
            return Match(key, attribute, Op.UNIVERSAL)
        if any(set(x) == {"*"} for x in values):
            return Match(key, attribute, Op.UNIVERSAL)
        return Match(key, attribute, Op.ANY_OF, values)
    if kind is Kind.INT:
        if not _INT.match(v):
            raise invalid(f"{key}: {value!r} is not an integer", parameter=key)
        return Match(key, attribute, Op.EQUAL, (int(v),))
    if kind is Kind.DATE:
        return _date_match(key, attribute, v)
    if kind is Kind.TIME:
        return _time_match(key, attribute, v)
    if kind is Kind.DATETIME:
        return _datetime_match(key, attribute, v, warnings)
    raise AssertionError(f"unhandled kind {kind}")  # pragma: no cover


def _split_range(key: str, v: str) -> tuple[str, str] | None:
    """``(low, high)`` of a range with exactly one '-', None for a single value."""
    if "-" not in v:
        return None
    parts = v.split("-")
    if len(parts) != 2 or parts == ["", ""]:
        raise invalid(f"{key}: {v!r} is not a valid range", parameter=key)
    return parts[0].strip(), parts[1].strip()


def _check_date(key: str, v: str) -> str:
    m = _DA.match(v)
    if not m:
        raise invalid(f"{key}: {v!r} is not a date (YYYYMMDD)", parameter=key)
    try:
        date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError as exc:
        raise invalid(f"{key}: {v!r} is not a valid date", parameter=key) from exc
    return v


def _date_match(key: str, attribute: IndexedAttribute, v: str) -> Match:
    rng = _split_range(key, v)
    if rng is None:
        return Match(key, attribute, Op.EQUAL, (_check_date(key, v),))
    low = _check_date(key, rng[0]) if rng[0] else None
    high = _check_date(key, rng[1]) if rng[1] else None
    if low and high and low > high:
        raise invalid(f"{key}: the range {v!r} ends before it starts", parameter=key)
    return Match(key, attribute, Op.RANGE, low=low, high=high)


def _time_bounds(key: str, v: str) -> tuple[str, str]:
    """Lowest and highest normalised ``HHMMSS.ffffff`` times a (reduced precision) TM value stands for.

    The lower bound leaves out an all-zero fraction so that it also compares right against stored
    values without a fraction ("080000" <= "080000" and <= "080000.000000").
    """
    m = _TM.match(v.replace(":", ""))
    if not m:
        raise invalid(f"{key}: {v!r} is not a time (HHMMSS.FFFFFF)", parameter=key)
    hh, mm, ss, ff = m.groups()
    if int(hh) > 23 or (mm and int(mm) > 59) or (ss and int(ss) > 60):
        raise invalid(f"{key}: {v!r} is not a valid time", parameter=key)
    low = hh + (mm or "00") + (ss or "00") + (("." + ff.ljust(6, "0")) if ff else "")
    high = hh + (mm or "59") + (ss or "59") + "." + (ff or "").ljust(6, "9")
    return low, high


def _time_match(key: str, attribute: IndexedAttribute, v: str) -> Match:
    rng = _split_range(key, v)
    if rng is None:
        low, high = _time_bounds(key, v)
        return Match(key, attribute, Op.RANGE, low=low, high=high)
    low = _time_bounds(key, rng[0])[0] if rng[0] else None
    high = _time_bounds(key, rng[1])[1] if rng[1] else None
    wraps = bool(low and high and low > high)
    return Match(key, attribute, Op.RANGE, low=low, high=high, wraps_midnight=wraps)


def _datetime_bounds(key: str, v: str, warnings: list[str] | None) -> tuple[str, str]:
    m = _DT.match(v)
    if not m:
        raise invalid(f"{key}: {v!r} is not a date-time (YYYYMMDDHHMMSS.FFFFFF)", parameter=key)
    yyyy, mo, dd, hh, mi, ss, ff, tz = m.groups()
    try:
        if mo and not 1 <= int(mo) <= 12:
            raise ValueError(mo)
        if dd:
            date(int(yyyy), int(mo), int(dd))
        if (hh and int(hh) > 23) or (mi and int(mi) > 59) or (ss and int(ss) > 60):
            raise ValueError(v)
        if tz and (int(tz[1:3]) > 14 or int(tz[3:]) > 59):
            raise ValueError(tz)
    except ValueError as exc:
        raise invalid(f"{key}: {v!r} is not a valid date-time", parameter=key) from exc
    if tz and warnings is not None:
        text = f"The timezone offset of {key} is ignored: date-times are matched as stored"
        if text not in warnings:
            warnings.append(text)
    low = yyyy + (mo or "01") + (dd or "01") + (hh or "00") + (mi or "00") + (ss or "00")
    low += ("." + ff.ljust(6, "0")) if ff else ""
    high = yyyy + (mo or "12") + (dd or "31") + (hh or "23") + (mi or "59") + (ss or "59")
    high += "." + (ff or "").ljust(6, "9")
    return low, high


def _is_datetime(v: str) -> bool:
    try:
        _datetime_bounds("", v, None)
    except Exception:
        return False
    return True


def _datetime_match(key: str, attribute: IndexedAttribute, v: str, warnings: list[str]) -> Match:
    if _is_datetime(v):  # a single value, possibly with a timezone offset ("...-0500")
        low, high = _datetime_bounds(key, v, warnings)
        return Match(key, attribute, Op.RANGE, low=low, high=high)
    for i, c in enumerate(v):
        if c != "-":
            continue
        left, right = v[:i].strip(), v[i + 1 :].strip()
        if (left or right) and (not left or _is_datetime(left)) and (not right or _is_datetime(right)):
            low = _datetime_bounds(key, left, warnings)[0] if left else None
            high = _datetime_bounds(key, right, warnings)[1] if right else None
            if low and high and low > high:
                raise invalid(f"{key}: the range {v!r} ends before it starts", parameter=key)
            return Match(key, attribute, Op.RANGE, low=low, high=high)
    raise invalid(f"{key}: {v!r} is not a date-time or date-time range", parameter=key)


# ---------------------------------------------------------------------------------------------
# What the SQL side must fetch
# ---------------------------------------------------------------------------------------------


def default_parents(query: QidoQuery) -> frozenset[Level]:
    """Parent levels whose attributes are returned by default (PS3.18 10.6.3.3): the unscoped ones."""
    if query.level is Level.SERIES:
        return frozenset() if query.study_uid is not None else frozenset({Level.STUDY})
    if query.level is Level.INSTANCE:
        out = set()
        if query.series_uid is None:
            out.add(Level.SERIES)
        if query.study_uid is None:
            out.add(Level.STUDY)
        return frozenset(out)
    return frozenset()


def _requested(query: QidoQuery) -> frozenset[int]:
    """Tags asked for beyond the defaults: includefield tags and matching keys."""
    tags = {m.attribute.tag for m in query.matches}
    if query.includefields != "all":
        tags |= query.includefields
    return frozenset(tags)


def parents_needed(query: QidoQuery) -> frozenset[Level]:
    """Parent levels whose ``attrs`` the SQL side must fetch."""
    parents = {lv for lv in _LEVELS if _DEPTH[lv] < _DEPTH[query.level]}
    if query.includefields == "all":
        return frozenset(parents)
    needed = set(default_parents(query))
    for tag in _requested(query):
        attribute = BY_TAG.get(tag)
        if attribute is not None and attribute.level in parents:
            needed.add(attribute.level)
    return frozenset(needed)


def needs_meta(query: QidoQuery) -> bool:
    """Whether the rows must carry the DICOM JSON of a representative instance."""
    if query.includefields == "all":
        return query.level is Level.INSTANCE
    known = {a.tag for a in INDEXED if _DEPTH[a.level] <= _DEPTH[query.level]} | _OWN_COMPUTED
    return any(tag not in known for tag in _requested(query))


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _element(vr: str, values: Iterable[Any]) -> dict[str, Any]:
    values = list(values)
    return {"vr": vr, "Value": values} if values else {"vr": vr}


def _split(joined: str | None) -> list[str]:
    return [v for v in joined.split("\\") if v] if joined else []


def _computed(row: QidoRow, level: Level) -> dict[str, dict[str, Any]]:
    """The attributes of ``level`` computed from the row's columns (without the own-level ones)."""
    out: dict[str, dict[str, Any]] = {}
    if level is Level.STUDY:
        out[f"{MODALITIES_TAG:08X}"] = _element("CS", _split(row.modalities_in_study))
        if row.study_series is not None:
            out[f"{STUDY_SERIES_TAG:08X}"] = _element("IS", [row.study_series])
        if row.study_instances is not None:
            out[f"{STUDY_INSTANCES_TAG:08X}"] = _element("IS", [row.study_instances])
    elif level is Level.SERIES and row.series_instances is not None:
        out[f"{SERIES_INSTANCES_TAG:08X}"] = _element("IS", [row.series_instances])
    return out


def _own_computed(row: QidoRow, level: Level, base_url: str) -> dict[str, dict[str, Any]]:
    url = f"{base_url}/studies/{row.study_uid}"
    if level is not Level.STUDY:
        url += f"/series/{row.series_uid}"
    if level is Level.INSTANCE:
        url += f"/instances/{row.sop_uid}"
    out = {
        f"{RETRIEVE_URL:08X}": _element("UR", [url]),
        f"{INSTANCE_AVAILABILITY:08X}": _element("CS", ["ONLINE"]),
    }
    if level is not Level.STUDY:
        out[f"{AVAILABLE_TRANSFER_SYNTAX_UID:08X}"] = _element("UI", _split(row.transfer_syntaxes))
    return out


def _attrs(text: str | None) -> dict[str, dict[str, Any]]:
    return dicom_json.loads(text) if text else {}


def _fill_bulk(element: Any, base_url: str) -> Any:
    """A copy of a DICOM JSON element with the BulkDataURI base placeholder replaced by ``base_url``."""
    if not isinstance(element, dict):
        return element
    out = dict(element)
    uri = out.get("BulkDataURI")
    if isinstance(uri, str):
        out["BulkDataURI"] = uri.replace("\x01", base_url)
    if out.get("vr") == "SQ" and isinstance(out.get("Value"), list):
        out["Value"] = [
            {k: _fill_bulk(v, base_url) for k, v in item.items()} if isinstance(item, dict) else item
            for item in out["Value"]
        ]
    return out


def render(rows: Sequence[QidoRow], query: QidoQuery, base_url: str) -> list[dict[str, Any]]:
    """The DICOM JSON objects of a page of results, keys in ascending tag order."""
    base_url = base_url.rstrip("/")
    level = query.level
    parents = [lv for lv in _LEVELS if _DEPTH[lv] < _DEPTH[level]]
    shown_parents = set(parents) if query.includefields == "all" else default_parents(query)
    extra = sorted(_requested(query))
    out: list[dict[str, Any]] = []
    for row in rows:
        texts = {Level.STUDY: row.study_attrs, Level.SERIES: row.series_attrs, Level.INSTANCE: row.instance_attrs}
        obj: dict[str, Any] = {}
        hidden: dict[str, Any] = {}  # parent attributes not shown by default, for includefield
        for lv in parents:
            source = obj if lv in shown_parents else hidden
            source.update(_attrs(texts[lv]))
            source.update(_computed(row, lv))
        obj.update(_attrs(texts[level]))
        obj.update(_computed(row, level))
        obj.update(_own_computed(row, level, base_url))
        obj[f"{STUDY_UID_TAG:08X}"] = _element("UI", [row.study_uid])
        if level is not Level.STUDY and row.series_uid:
            obj[f"{SERIES_UID_TAG:08X}"] = _element("UI", [row.series_uid])
        if level is Level.INSTANCE and row.sop_uid:
            obj[f"{SOP_UID_TAG:08X}"] = _element("UI", [row.sop_uid])
        meta = dicom_json.loads(row.meta) if row.meta else {}
        if query.includefields == "all" and level is Level.INSTANCE:
            for key, element in meta.items():
                if key not in obj:
                    obj[key] = _fill_bulk(element, base_url)
        for tag in extra:
            key = f"{tag:08X}"
            if key in obj:
                continue
            if key in hidden:
                obj[key] = hidden[key]
            elif key in meta:
                obj[key] = _fill_bulk(meta[key], base_url)
        out.append(dict(sorted(obj.items())))
    return out


__all__ = [
    "MORE_RESULTS_WARNING",
    "Match",
    "Op",
    "QidoPage",
    "QidoQuery",
    "QidoRow",
    "default_parents",
    "needs_meta",
    "parents_needed",
    "parse_query",
    "render",
]
