"""FHIR R4 Subscription with a rest-hook channel: validation, activation, criteria, notifications, backoff.

Pure core (no SQL, no HTTP). FHIR R4 (4.0.1) subscription.html and valueset-subscription-channel-type.html:

- the client creates a Subscription with ``status`` ``requested``; the server activates it (``active``) in the
  same write, or sets ``error`` (with ``error`` text) when it cannot deliver; ``off`` stops notifications;
- ``criteria`` is a search string ``Type?params`` with the meaning it has appended to the base URL; it is
  applied to the *new* version of a resource, so a delete never notifies (subscription.html: "there is no
  notification when a resource is deleted");
- channel ``rest-hook`` (the only type we serve): without ``payload`` an empty POST is made to the endpoint;
  with a payload "the URL is interpreted as the service base, and an update (PUT) is made", i.e. a PUT of the
  resource to ``[endpoint]/[type]/[id]``; every ``channel.header`` ("Name: value") is sent with it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from server.errors import ServerError
from server.fhir import params as P
from server.fhir.model import READ_ONLY_TYPES, SUPPORTED_TYPES
from server.fhir.outcome import Unprocessable

FHIR_JSON = "application/fhir+json"
#: channel.payload values we accept (the resource is always sent as FHIR JSON).
JSON_PAYLOADS = ("application/fhir+json", "application/json", "application/json+fhir")
CHANNEL_TYPES = ("rest-hook", "websocket", "email", "sms", "message")  # R4 subscription-channel-type
SERVED_CHANNEL = "rest-hook"


class Status:
    """R4 Subscription.status (valueset-subscription-status.html, required binding)."""

    REQUESTED = "requested"
    ACTIVE = "active"
    ERROR = "error"
    OFF = "off"


#: Statuses whose subscriptions hear of changes (``error`` keeps trying: one success sets it back to active).
LISTENING = (Status.ACTIVE, Status.ERROR)
#: Criteria parameters that shape a result page and make no sense as a notification rule.
_RESULT_ONLY = P.RESULT_PARAMS - {"_format", "_pretty"}
_HEADER = re.compile(r"^([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\r\n]*)$")  # RFC 9110 5.1 field-name ":" value


@dataclass(frozen=True)
class Criteria:
    """A parsed ``Subscription.criteria``: the resource type and the search parameters (no result params)."""

    resource_type: str
    items: tuple[tuple[str, str], ...]

    @property
    def ids(self) -> frozenset[str] | None:
        """The ids an ``_id`` parameter restricts the criteria to (None: any id)."""
        values = [v for k, v in self.items if k == "_id"]
        if not values:
            return None
        out = set(P._split(values[0]))
        for v in values[1:]:
            out &= set(P._split(v))
        return frozenset(out)

    def query_for(self, resource_id: str) -> P.Query:
        """The search that finds the resource ``resource_id`` iff it matches (criteria AND ``_id``)."""
        query = P.parse_query(self.resource_type, [*self.items, ("_id", resource_id)], lenient=False)
        query.summary_count = True
        return query


@dataclass(frozen=True)
class Channel:
    """What the delivery needs of a Subscription: criteria, endpoint, payload type and extra headers."""

    subscription_id: str
    criteria: Criteria
    endpoint: str
    payload: str | None
    headers: tuple[tuple[str, str], ...]
    status: str


@dataclass(frozen=True)
class Notification:
    """One HTTP request of a rest-hook notification."""

    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


def _bad(message: str, expression: str, code: str = "invalid") -> Unprocessable:
    return Unprocessable([{"severity": "error", "code": code, "diagnostics": message, "expression": [expression]}])


def parse_criteria(text: str) -> Criteria:
    """``Type?name=value&...`` as Criteria; 422 at ``Subscription.criteria`` when it is not a search we serve.

    FHIR R4 subscription.html (criteria: "the same interpretation as if they were appended to the base URL");
    parameters are checked with the search parser (FHIR R4 3.1.1).
    """
    rtype, _, query = text.strip().partition("?")
    if rtype.startswith("/"):
        rtype = rtype[1:]
    if rtype not in SUPPORTED_TYPES:
        raise _bad(f"criteria type {rtype!r} is not a resource type served here", "Subscription.criteria")
    if rtype in READ_ONLY_TYPES:
        raise _bad(f"{rtype} is written by the server only; it cannot be subscribed to", "Subscription.criteria",
                   "not-supported")
    items = tuple(parse_qsl(query, keep_blank_values=True)) if query else ()
    for name, _ in items:
        if name in _RESULT_ONLY:
            raise _bad(f"criteria parameter {name!r} shapes a result page; not allowed in criteria",
                       "Subscription.criteria")
    try:
        P.parse_query(rtype, list(items), lenient=False)
    except ServerError as exc:
        raise _bad(f"criteria: {exc.message}", "Subscription.criteria") from exc
    return Criteria(rtype, tuple((k, v) for k, v in items if k not in ("_format", "_pretty")))


def parse_header(text: str, index: int) -> tuple[str, str]:
    """One ``channel.header`` entry ("Name: value") as a (name, value) pair (R4 Subscription.channel.header)."""
    m = _HEADER.match(text)
    if not m:
        raise _bad("channel.header must be 'Name: value' without line breaks", f"Subscription.channel.header[{index}]")
    return m.group(1), m.group(2).strip()


def channel_of(resource: dict) -> Channel:
    """The Channel of a Subscription resource, 422 (with the element's expression) when we cannot serve it.

    FHIR R4 subscription.html: channel.type ``rest-hook`` only; endpoint an absolute http(s) URL;
    payload absent or a JSON mime type; headers "Name: value".
    """
    channel = resource.get("channel") or {}
    kind = channel.get("type")
    if kind != SERVED_CHANNEL:
        raise _bad(f"channel type {kind!r} is not supported; use rest-hook", "Subscription.channel.type",
                   "not-supported")
    endpoint = channel.get("endpoint") or ""
    url = urlsplit(endpoint)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise _bad("channel.endpoint must be an absolute http(s) URL", "Subscription.channel.endpoint")
    payload = channel.get("payload") or None
    if payload is not None and payload.split(";")[0].strip() not in JSON_PAYLOADS:
        raise _bad(f"payload {payload!r} is not supported; use {FHIR_JSON} or no payload",
                   "Subscription.channel.payload", "not-supported")
    headers = tuple(parse_header(h, i) for i, h in enumerate(channel.get("header") or []))
    criteria = parse_criteria(resource.get("criteria") or "")
    return Channel(resource.get("id", ""), criteria, endpoint, payload, headers,
                   resource.get("status", Status.REQUESTED))


def activate(new: dict, old: dict | None) -> dict:
    """Validate a Subscription written by a client and activate it (the R4 server's part of the life cycle).

    ``requested`` becomes ``active`` (and a stale ``error`` text is dropped); ``off``, ``active`` and
    ``error`` stay as given, so the server's own ``error`` version and a client switching it off are kept.
    A client asks for a restart after an error by writing ``requested`` again (R4 subscription.html).
    """
    channel_of(new)
    if new.get("status") == Status.REQUESTED:
        new = {k: v for k, v in new.items() if k != "error"}
        new["status"] = Status.ACTIVE
    return new


def matches_without_search(criteria: Criteria, resource_id: str) -> bool | None:
    """True/False when the criteria decide alone (no parameters, or an ``_id`` that excludes); None: search."""
    ids = criteria.ids
    if ids is not None and resource_id not in ids:
        return False
    if not criteria.items:
        return True
    return None


def notification(channel: Channel, resource_type: str, resource_id: str, content: str | None) -> Notification:
    """The rest-hook request for a changed resource (R4 valueset-subscription-channel-type.html, rest-hook).

    No payload: an empty POST to the endpoint. Payload: a PUT of the resource (FHIR JSON) to
    ``[endpoint]/[type]/[id]`` ("the URL is interpreted as the service base, and an update (PUT) is made").
    """
    extra = tuple(channel.headers)
    if channel.payload is None or content is None:
        return Notification("POST", channel.endpoint, extra, b"")
    url = f"{channel.endpoint.rstrip('/')}/{resource_type}/{resource_id}"
    return Notification("PUT", url, (("Content-Type", FHIR_JSON), *extra), content.encode("utf-8"))


def backoff(attempts: int, *, base: float, cap: float) -> float:
    """Seconds to wait before the next try after ``attempts`` failed ones: base * 2^(attempts-1), capped."""
    return min(cap, base * (2 ** max(0, attempts - 1)))


def schedule(max_attempts: int, *, base: float, cap: float) -> Sequence[float]:
    """The whole retry schedule (delays between tries) for ``max_attempts`` tries."""
    return [backoff(n, base=base, cap=cap) for n in range(1, max_attempts)]


def with_status(resource: dict, status: str, error: str | None) -> dict:
    """The Subscription with a server-set status and ``error`` text (None removes it)."""
    out = {k: v for k, v in resource.items() if k != "error"}
    out["status"] = status
    if error:
        out["error"] = error
    return out
