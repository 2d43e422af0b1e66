"""The FHIR REST service (FHIR R4 3.1.0 RESTful API): interactions on stored resources, no HTTP, no SQL.

Store transactions are opened through ``FhirStore.transaction`` (the store commits); scopes are checked here
with ``Principal.allows`` (SMART v2). Hook for content rules: ``validators`` maps a resource type (or ``"*"``
for every type) to a callable ``(new, old) -> None`` run on create and update before anything is stored;
``old`` is the current resource or None. It raises ServerError (e.g. INVALID with the element's expression for
a profile violation, CONFLICT for an illegal Task status transition). A validator may return a rewritten
resource instead of None: it is stored in place of the client's (the server activating a Subscription).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import format_datetime
from datetime import datetime, timezone
from typing import Protocol
from urllib.parse import parse_qsl, urlencode

from server.errors import ErrorKind, ServerError
from server.fhir import params as P
from server.fhir.model import (ALWAYS_KEPT, READ_ONLY_TYPES, SUPPORTED_TYPES, parse_resource, required_elements,
                               summary_elements)
from server.fhir.outcome import Gone, MethodNotAllowed, PreconditionFailed, Unprocessable, informational
from server.fhir.validation import check_mode, literal_references, outcome_of, unresolved
from server.security.tokens import Access, Principal
from server.store.fhir import FhirStore, FhirTx, Stored

Validator = Callable[[dict, "dict | None"], "dict | None"]
#: Called inside the write transaction after each stored change: (tx, principal, interaction, new, old);
#: ``interaction`` is "create", "update" or "delete"; ``new`` is the stored version (deleted for a delete).
#: Work that must follow the change (notifications, audit) is written through ``tx`` so it commits with it.
Listener = Callable[["FhirTx", Principal, str, "Stored", "Stored | None"], None]


class Projection(Protocol):
    """A read-only resource type computed from other data (ImagingStudy from the DICOM archive).

    Serves read, vread of the current version and search-type; writes answer 405.
    """

    def read(self, tenant: str, rid: str) -> Stored | None:
        """The current resource with this id, or None."""

    def search(self, tenant: str, query: P.Query) -> tuple[int, list[Stored]]:
        """(total, page) of the resources matching ``query`` (its clauses, sort, count and offset)."""
ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")  # FHIR R4 2.24.0.2 id
HISTORY_PARAMS = {"_count", "_offset", "_since", "_format", "_pretty"}


@dataclass(frozen=True)
class Result:
    """The outcome of one interaction: status, body resource and the headers FHIR asks for."""

    status: int
    resource: dict | None = None
    headers: dict[str, str] = field(default_factory=dict)


def etag(version: int) -> str:
    """The weak ETag of a version (FHIR R4 3.1.0.4.1)."""
    return f'W/"{version}"'


def parse_etag(value: str) -> int:
    """The version of an ``If-Match`` value (``W/"3"`` or ``"3"``)."""
    text = value.strip()
    text = text[2:] if text.startswith("W/") else text
    text = text.strip('"')
    if not text.isdigit():
        raise ServerError(ErrorKind.INVALID, f"invalid If-Match {value!r}", parameter="If-Match")
    return int(text)


def _http_date(stored: str) -> str:
    moment = datetime.strptime(stored, P.INSTANT_FORMAT).replace(tzinfo=timezone.utc)
    return format_datetime(moment, usegmt=True)


class FhirService:
    """Create, read, vread, update, delete, history and search (FHIR R4 3.1.0) for one store."""

    def __init__(self, store: FhirStore, *, validators: Mapping[str, Validator] | None = None,
                 listeners: Sequence[Listener] = (), projections: Mapping[str, Projection] | None = None) -> None:
        self.store = store
        self.validators = dict(validators or {})
        self.listeners = list(listeners)
        self.projections = dict(projections or {})

    def writable(self, rtype: str) -> None:
        """405 for the types clients cannot write (projections, AuditEvent)."""
        if rtype in READ_ONLY_TYPES or rtype in self.projections:
            raise MethodNotAllowed(f"{rtype} is read-only: written by the server, not by clients")

    def _notify(self, tx: FhirTx, principal: Principal, interaction: str, new: Stored, old: Stored | None) -> None:
        for listener in self.listeners:
            listener(tx, principal, interaction, new, old)

    # ---- helpers ------------------------------------------------------------------------------------
    @staticmethod
    def check_type(rtype: str) -> None:
        """NOT_FOUND for a type we do not serve."""
        if rtype not in SUPPORTED_TYPES:
            raise ServerError(ErrorKind.NOT_FOUND, f"resource type {rtype!r} is not supported",
                              parameter=rtype)

    @staticmethod
    def authorize(principal: Principal, rtype: str, access: Access) -> None:
        """FORBIDDEN unless a SMART v2 scope grants ``access`` on ``rtype``."""
        if not principal.allows(rtype, access):
            raise ServerError(ErrorKind.FORBIDDEN, f"scope does not allow {access.name.lower()} on {rtype}")

    def _validate(self, new: dict, old: dict | None) -> dict:
        """Run the validators; one may return a rewritten resource (the server's part, e.g. a status)."""
        for key in ("*", new["resourceType"]):
            hook = self.validators.get(key)
            if hook is not None:
                new = hook(new, old) or new
        return new

    @staticmethod
    def _result(status: int, stored: Stored, *, location: bool = False, base: str = "") -> Result:
        headers = {"ETag": etag(stored.version_id), "Last-Modified": _http_date(stored.last_updated)}
        if location:
            headers["Location"] = (f"{base}/{stored.resource_type}/{stored.resource_id}"
                                   f"/_history/{stored.version_id}")
        return Result(status, stored.resource(), headers)

    @staticmethod
    def _live(stored: Stored | None, rtype: str, rid: str) -> Stored:
        if stored is None:
            raise ServerError(ErrorKind.NOT_FOUND, f"{rtype}/{rid} not found")
        if stored.deleted:
            raise Gone(f"{rtype}/{rid} was deleted")
        return stored

    def _write(self, tx: FhirTx, principal: Principal, resource: dict, old: Stored | None, *,
               method: str) -> Stored:
        """Stamp meta.versionId/lastUpdated and store a new version (FHIR R4 3.1.0.4 / 3.1.0.5)."""
        version = old.version_id + 1 if old else 1
        now = P.now_instant()
        meta = dict(resource.get("meta") or {})
        meta.update(versionId=str(version), lastUpdated=P.render_instant(now))
        resource = {"resourceType": resource["resourceType"], "id": resource["id"], "meta": meta,
                    **{k: v for k, v in resource.items() if k not in ("resourceType", "id", "meta")}}
        resource = self._validate(resource, old.resource() if old and not old.deleted else None)
        self._check_references(tx, principal.tenant, resource)
        content = json.dumps(resource, ensure_ascii=False, separators=(",", ":"))
        tx.put(resource["resourceType"], resource["id"], version, now, content, P.index_values(resource),
               method=method)
        stored = Stored(resource["resourceType"], resource["id"], version, now, False, content, method)
        live_old = old if old is not None and not old.deleted else None
        self._notify(tx, principal, "update" if live_old else "create", stored, live_old)
        return stored

    def _check_references(self, tx: FhirTx, tenant: str, resource: dict) -> None:
        """Unprocessable (422) unless every relative reference to a type we serve resolves in this tenant.

        Targets created later in the same transaction (``tx.planned``, set by the Bundle processor) count as
        resolved; the transaction fails as a whole if they are not created (FHIR R4 3.1.0.11.2).
        """
        issues = self._reference_issues(tx, tenant, resource)
        if issues:
            raise Unprocessable(issues)

    def _reference_issues(self, tx: FhirTx, tenant: str, resource: dict) -> list[dict]:
        """The OperationOutcome issues of the references of ``resource`` that do not resolve."""
        planned = getattr(tx, "planned", frozenset())
        wanted: dict[str, dict[str, list[str]]] = {}
        issues = []
        for expression, rtype, rid in literal_references(resource):
            if rtype == "urn":
                issues.append(unresolved(expression, f"{rid} resolves only inside a transaction Bundle"))
            elif rtype in SUPPORTED_TYPES and f"{rtype}/{rid}" not in planned:
                wanted.setdefault(rtype, {}).setdefault(rid, []).append(expression)
        for rtype, by_id in wanted.items():
            projection = self.projections.get(rtype)
            if projection is not None:
                found = {rid for rid in by_id if projection.read(tenant, rid) is not None}
            else:
                found = {s.resource_id for s in tx.by_ids(rtype, list(by_id))}
            for rid, expressions in by_id.items():
                if rid not in found:
                    issues += [unresolved(e, f"{rtype}/{rid} does not exist") for e in expressions]
        return issues

    @staticmethod
    def parse_body(rtype: str, body: object) -> dict:
        """The structure-validated resource of a body; its resourceType must match the URL."""
        resource = parse_resource(body)
        if resource["resourceType"] != rtype:
            raise ServerError(ErrorKind.INVALID, f"resourceType {resource['resourceType']} does not match the URL "
                              f"({rtype})", parameter=f"{resource['resourceType']}.resourceType")
        return resource

    def _matches(self, tx: FhirTx, rtype: str, criteria: list[tuple[str, str]], limit: int = 2) -> list[Stored]:
        query = P.parse_query(rtype, criteria, lenient=False)
        query.count, query.offset = limit, 0
        return tx.search(query)[1]

    # ---- interactions -------------------------------------------------------------------------------
    def create(self, principal: Principal, rtype: str, body: object, *, base: str,
               if_none_exist: str | None = None) -> Result:
        """Create with a server-assigned id; conditional with If-None-Exist (FHIR R4 3.1.0.5, 3.1.0.5.3)."""
        self.check_type(rtype)
        self.writable(rtype)
        self.authorize(principal, rtype, Access.CREATE)
        resource = self.parse_body(rtype, body)
        with self.store.transaction(principal.tenant, write=True) as tx:
            return self.create_in(tx, principal, resource, base=base, if_none_exist=if_none_exist)

    def existing(self, tx: FhirTx, principal: Principal, rtype: str, if_none_exist: str) -> Stored | None:
        """The one resource matching If-None-Exist, None for none, 412 for several (FHIR R4 3.1.0.5.3)."""
        self.authorize(principal, rtype, Access.SEARCH)
        tx.serialize(f"conditional/{rtype}")
        found = self._matches(tx, rtype, parse_qsl(if_none_exist.lstrip("?"), keep_blank_values=True))
        if len(found) > 1:
            raise PreconditionFailed("If-None-Exist matches more than one resource", parameter="If-None-Exist")
        return found[0] if found else None

    def create_in(self, tx: FhirTx, principal: Principal, resource: dict, *, base: str,
                  if_none_exist: str | None = None, new_id: str | None = None) -> Result:
        """Create inside ``tx`` (the id is ``new_id`` or a fresh UUID)."""
        rtype = resource["resourceType"]
        self.writable(rtype)
        self.authorize(principal, rtype, Access.CREATE)
        if if_none_exist is not None:
            found = self.existing(tx, principal, rtype, if_none_exist)
            if found is not None:
                return self._result(200, found, location=True, base=base)
        resource = {**resource, "id": new_id or str(uuid.uuid4())}
        stored = self._write(tx, principal, resource, None, method="POST")
        return self._result(201, stored, location=True, base=base)

    def read(self, principal: Principal, rtype: str, rid: str) -> Result:
        """Read the current version (FHIR R4 3.1.0.2); 410 when deleted."""
        self.check_type(rtype)
        self.authorize(principal, rtype, Access.READ)
        with self.store.transaction(principal.tenant, write=False) as tx:
            return self.read_in(tx, principal, rtype, rid)

    def read_in(self, tx: FhirTx, principal: Principal, rtype: str, rid: str) -> Result:
        """Read inside ``tx``."""
        self.check_type(rtype)
        self.authorize(principal, rtype, Access.READ)
        projection = self.projections.get(rtype)
        stored = projection.read(principal.tenant, rid) if projection else tx.current(rtype, rid)
        return self._result(200, self._live(stored, rtype, rid))

    def vread(self, principal: Principal, rtype: str, rid: str, vid: str) -> Result:
        """Read one version (FHIR R4 3.1.0.3)."""
        self.check_type(rtype)
        self.authorize(principal, rtype, Access.READ)
        if not vid.isdigit():
            raise ServerError(ErrorKind.NOT_FOUND, f"{rtype}/{rid}/_history/{vid} not found")
        projection = self.projections.get(rtype)
        if projection is not None:
            stored = projection.read(principal.tenant, rid)
            if stored is None or stored.version_id != int(vid):
                raise ServerError(ErrorKind.NOT_FOUND, f"{rtype}/{rid}/_history/{vid} not found (only the "
                                  "current version of a projection is kept)")
            return self._result(200, stored)
        with self.store.transaction(principal.tenant, write=False) as tx:
            stored = self._live(tx.version(rtype, rid, int(vid)), rtype, rid)
        return self._result(200, stored)

    def update(self, principal: Principal, rtype: str, rid: str, body: object, *, base: str,
               if_match: str | None = None) -> Result:
        """Update, or create with the client's id (FHIR R4 3.1.0.4); If-Match versioned update (3.1.0.4.1)."""
        self.check_type(rtype)
        self.writable(rtype)
        self.authorize(principal, rtype, Access.UPDATE)
        resource = self.parse_body(rtype, body)
        if resource.get("id") != rid:
            raise ServerError(ErrorKind.INVALID, "the resource id must match the URL", parameter=f"{rtype}.id")
        with self.store.transaction(principal.tenant, write=True) as tx:
            return self.update_in(tx, principal, resource, if_match, base)

    def update_in(self, tx: FhirTx, principal: Principal, resource: dict, if_match: str | None, base: str) -> Result:
        """Update or create-on-update inside ``tx``."""
        rtype, rid = resource["resourceType"], resource["id"]
        self.writable(rtype)
        self.authorize(principal, rtype, Access.UPDATE)
        if not ID.match(rid):
            raise ServerError(ErrorKind.INVALID, "invalid resource id", parameter=f"{rtype}.id")
        old = tx.current(rtype, rid, lock=True)
        if if_match is not None:
            wanted = parse_etag(if_match)
            if old is None or old.deleted or old.version_id != wanted:
                raise PreconditionFailed(f"If-Match {if_match} is not the current version", parameter="If-Match")
        if old is None or old.deleted:
            self.authorize(principal, rtype, Access.CREATE)
        stored = self._write(tx, principal, resource, old, method="PUT")
        created = old is None or old.deleted
        return self._result(201 if created else 200, stored, location=created, base=base)

    def conditional_update(self, principal: Principal, rtype: str, criteria: list[tuple[str, str]], body: object,
                           *, base: str, if_match: str | None = None) -> Result:
        """Update the one resource matching the criteria, or create (FHIR R4 3.1.0.4.3 conditional update)."""
        self.check_type(rtype)
        self.writable(rtype)
        self.authorize(principal, rtype, Access.UPDATE)
        self.authorize(principal, rtype, Access.SEARCH)
        resource = self.parse_body(rtype, body)
        if not criteria:
            raise ServerError(ErrorKind.INVALID, "conditional update needs search parameters", parameter=rtype)
        with self.store.transaction(principal.tenant, write=True) as tx:
            return self.conditional_in(tx, principal, rtype, criteria, resource, base=base, if_match=if_match)

    def conditional_in(self, tx: FhirTx, principal: Principal, rtype: str, criteria: list[tuple[str, str]],
                       resource: dict, *, base: str, if_match: str | None = None) -> Result:
        """Conditional update inside ``tx``."""
        self.authorize(principal, rtype, Access.SEARCH)
        tx.serialize(f"conditional/{rtype}")
        found = self._matches(tx, rtype, criteria)
        if len(found) > 1:
            raise PreconditionFailed("the criteria match more than one resource", parameter=rtype)
        if found:
            if resource.get("id", found[0].resource_id) != found[0].resource_id:
                raise ServerError(ErrorKind.INVALID, "the resource id differs from the matched resource",
                                  parameter=f"{rtype}.id")
            resource = {**resource, "id": found[0].resource_id}
        else:
            resource = {**resource, "id": resource.get("id") or str(uuid.uuid4())}
        return self.update_in(tx, principal, resource, if_match, base)

    def delete(self, principal: Principal, rtype: str, rid: str) -> Result:
        """Delete (FHIR R4 3.1.0.7): a new, content-less version; deleting again changes nothing."""
        self.check_type(rtype)
        self.writable(rtype)
        with self.store.transaction(principal.tenant, write=True) as tx:
            return self.delete_in(tx, principal, rtype, rid)

    def delete_in(self, tx: FhirTx, principal: Principal, rtype: str, rid: str) -> Result:
        """Delete inside ``tx``."""
        self.writable(rtype)
        self.authorize(principal, rtype, Access.DELETE)
        old = tx.current(rtype, rid, lock=True)
        if old is None:
            raise ServerError(ErrorKind.NOT_FOUND, f"{rtype}/{rid} not found")
        if old.deleted:
            return Result(204)
        now = P.now_instant()
        tx.delete(rtype, rid, old.version_id + 1, now)
        self._notify(tx, principal, "delete", Stored(rtype, rid, old.version_id + 1, now, True, None, "DELETE"), old)
        return Result(204, None, {"ETag": etag(old.version_id + 1)})

    def validate(self, principal: Principal, rtype: str, rid: str | None, body: object | None,
                 mode: str | None) -> dict:
        """``$validate`` (FHIR R4 operation-resource-validate): the OperationOutcome of ``body`` (or of the stored
        resource when ``body`` is None) against structure, profiles, bindings, references and, for mode
        create/update, the Task state machine; mode delete checks the resource exists. Nothing is stored."""
        self.check_type(rtype)
        check_mode(mode)
        self.authorize(principal, rtype, {"create": Access.CREATE, "update": Access.UPDATE,
                                          "delete": Access.DELETE}.get(mode or "", Access.READ))
        with self.store.transaction(principal.tenant, write=False) as tx:
            old = self._live(tx.current(rtype, rid), rtype, rid).resource() if rid else None
            if mode == "delete":
                if old is None:
                    raise ServerError(ErrorKind.INVALID, "mode delete needs an instance", parameter="mode")
                return informational(f"{rtype}/{rid} can be deleted")
            if body is None:
                if old is None:
                    raise ServerError(ErrorKind.INVALID, "$validate needs a resource", parameter="resource")
                body = old
            try:
                resource = self.parse_body(rtype, body)
            except ServerError as exc:
                return {"resourceType": "OperationOutcome", "issue": [
                    {"severity": "error", "code": "structure", "diagnostics": exc.message,
                     "expression": [exc.parameter or rtype]}]}
            if rid is not None and resource.get("id", rid) != rid:
                raise ServerError(ErrorKind.INVALID, "the resource id must match the URL", parameter=f"{rtype}.id")
            outcome = outcome_of(resource, old, mode)
            refs = self._reference_issues(tx, principal.tenant, resource)
        if refs:
            issues = [i for i in outcome["issue"] if i["severity"] != "information"] + refs
            outcome = {"resourceType": "OperationOutcome", "issue": issues}
        return outcome

    def history(self, principal: Principal, rtype: str, rid: str | None, items: list[tuple[str, str]], *,
                base: str) -> dict:
        """Instance or type history as a Bundle of type history, newest first (FHIR R4 3.1.0.11)."""
        self.check_type(rtype)
        self.authorize(principal, rtype, Access.READ)
        if rtype in self.projections:
            raise MethodNotAllowed(f"{rtype} is a projection without history")
        args = dict(items)
        unknown = set(args) - HISTORY_PARAMS
        if unknown:
            raise ServerError(ErrorKind.INVALID, f"unknown history parameter {sorted(unknown)[0]!r}",
                              parameter=sorted(unknown)[0])
        count = P._int("_count", args.get("_count", "20"), 1, P.MAX_COUNT)
        offset = P._int("_offset", args.get("_offset", "0"), 0, 10**9)
        since = P.date_range(args["_since"], parameter="_since")[0] if "_since" in args else None
        with self.store.transaction(principal.tenant, write=False) as tx:
            if rid is not None and tx.current(rtype, rid) is None:
                raise ServerError(ErrorKind.NOT_FOUND, f"{rtype}/{rid} not found")
            total, page = tx.history(rtype, rid, since=since, count=count, offset=offset)
        path = f"{base}/{rtype}" + (f"/{rid}" if rid else "") + "/_history"
        bundle = _bundle("history", total, [_history_entry(s, base) for s in page])
        bundle["link"] = _links(path, items, offset, count, total)
        return bundle

    def search(self, principal: Principal, rtype: str, items: list[tuple[str, str]], *, base: str,
               lenient: bool = False) -> dict:
        """Search as a Bundle of type searchset with paging links and includes (FHIR R4 3.1.1)."""
        self.check_type(rtype)
        self.authorize(principal, rtype, Access.SEARCH)
        with self.store.transaction(principal.tenant, write=False) as tx:
            return self.search_in(tx, principal, rtype, items, base=base, lenient=lenient)

    def search_in(self, tx: FhirTx, principal: Principal, rtype: str, items: list[tuple[str, str]], *, base: str,
                  lenient: bool = False) -> dict:
        """Search inside ``tx``."""
        self.check_type(rtype)
        self.authorize(principal, rtype, Access.SEARCH)
        query = P.parse_query(rtype, items, lenient=lenient)
        projection = self.projections.get(rtype)
        total, page = projection.search(principal.tenant, query) if projection else tx.search(query)
        included = self._included(tx, principal, query, page)
        entries = [_entry(s, base, "match", query) for s in page] + [_entry(s, base, "include") for s in included]
        bundle = _bundle("searchset", total, entries)
        if not query.summary_count:
            kept = [(k, v) for k, v in items if k not in query.ignored]
            bundle["link"] = _links(f"{base}/{rtype}", kept, query.offset, query.count, total)
        return bundle

    def _included(self, tx: FhirTx, principal: Principal, query: P.Query, page: list[Stored]) -> list[Stored]:
        """The _include and _revinclude resources of a page, readable by the caller, without duplicates."""
        ids = [s.resource_id for s in page]
        seen = {(s.resource_type, s.resource_id) for s in page}
        out: list[Stored] = []
        for inc in query.includes:
            targets: dict[str, list[str]] = {}
            for t, i in tx.references(query.resource_type, ids, inc.param, inc.target):
                targets.setdefault(t, []).append(i)
            for t, tids in targets.items():
                if t in SUPPORTED_TYPES and principal.allows(t, Access.READ):
                    out.extend(tx.by_ids(t, tids))
        for inc in query.revincludes:
            if inc.source in SUPPORTED_TYPES and principal.allows(inc.source, Access.READ):
                out.extend(tx.referencing(inc.source, inc.param, query.resource_type, ids))
        unique = []
        for s in out:
            if (s.resource_type, s.resource_id) not in seen:
                seen.add((s.resource_type, s.resource_id))
                unique.append(s)
        return unique


SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}


def subset(resource: dict, summary: str | None, elements: tuple[str, ...]) -> dict:
    """``resource`` cut to ``_summary`` (true, text, data) or ``_elements`` and tagged SUBSETTED
    (FHIR R4 3.1.1.5.8, 3.1.1.5.9); unchanged without either."""
    rtype = resource.get("resourceType", "")
    if summary == "data":
        keep = set(resource) - {"text"}
    elif summary == "text":
        keep = {"text"} | ALWAYS_KEPT | required_elements(rtype)
    elif summary == "true":
        keep = set(summary_elements(rtype))
    elif elements:
        keep = {e.split(".")[0] for e in elements} | ALWAYS_KEPT | required_elements(rtype)
    else:
        return resource
    out = {k: v for k, v in resource.items() if k in keep}
    meta = dict(out.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), SUBSETTED]
    out["meta"] = meta
    return out


def _bundle(kind: str, total: int, entries: list[dict]) -> dict:
    bundle: dict = {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": kind, "total": total}
    if entries:
        bundle["entry"] = entries
    return bundle


def _entry(s: Stored, base: str, mode: str, query: P.Query | None = None) -> dict:
    resource = s.resource()
    if query is not None and (query.summary or query.elements):
        resource = subset(resource, query.summary, query.elements)
    return {"fullUrl": f"{base}/{s.resource_type}/{s.resource_id}", "resource": resource,
            "search": {"mode": mode}}


_STATUS_OF_METHOD = {"POST": "201 Created", "PUT": "200 OK", "DELETE": "204 No Content"}


def _history_entry(s: Stored, base: str) -> dict:
    url = s.resource_type if s.method == "POST" else f"{s.resource_type}/{s.resource_id}"
    entry: dict = {"fullUrl": f"{base}/{s.resource_type}/{s.resource_id}",
                   "request": {"method": s.method, "url": url},
                   "response": {"status": _STATUS_OF_METHOD.get(s.method, "200 OK"), "etag": etag(s.version_id),
                                "lastModified": P.render_instant(s.last_updated)}}
    if not s.deleted:
        entry["resource"] = s.resource()
    return entry


def _links(path: str, items: list[tuple[str, str]], offset: int, count: int, total: int) -> list[dict]:
    """self, next and previous links of a page (FHIR R4 3.1.1.5.7 paging)."""
    kept = [(k, v) for k, v in items if k not in ("_offset", "_count")]

    def url(at: int) -> str:
        return f"{path}?{urlencode(kept + [('_count', str(count)), ('_offset', str(at))])}"

    links = [{"relation": "self", "url": url(offset)}]
    if count and offset + count < total:
        links.append({"relation": "next", "url": url(offset + count)})
    if count and offset > 0:
        links.append({"relation": "previous", "url": url(max(0, offset - count))})
    return links
