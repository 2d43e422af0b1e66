"""batch and transaction Bundles (FHIR R4 3.1.0.11 batch/transaction, 2.36.0 Bundle): no HTTP, no SQL.

A transaction runs in one store transaction (all or nothing) in the order DELETE, POST, PUT, GET
(FHIR R4 3.1.0.11.2), after ``urn:uuid:`` full URLs of created resources are replaced by their new
``Type/id`` in every reference of the Bundle. A batch runs each entry in its own transaction.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from server.errors import ErrorKind, ServerError
from server.fhir.outcome import error_outcome
from server.fhir.service import FhirService, Result
from server.security.tokens import Principal
from server.store.fhir import FhirTx

ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "GET": 3}
STATUS_TEXT = {200: "200 OK", 201: "201 Created", 204: "204 No Content"}


@dataclass
class Op:
    """One entry of a batch or transaction."""

    index: int
    method: str
    rtype: str
    rid: str | None
    query: list[tuple[str, str]]
    resource: dict | None
    full_url: str | None
    if_none_exist: str | None
    if_match: str | None
    new_id: str | None = None
    found: dict = field(default_factory=dict)


def _invalid(index: int, what: str, message: str) -> ServerError:
    return ServerError(ErrorKind.INVALID, message, parameter=f"Bundle.entry[{index}].{what}")


def _op(index: int, entry: object, base: str) -> Op:
    if not isinstance(entry, dict) or not isinstance(entry.get("request"), dict):
        raise _invalid(index, "request", "entry without request")
    request = entry["request"]
    method, url = request.get("method"), request.get("url")
    if method not in ORDER or not isinstance(url, str) or not url:
        raise _invalid(index, "request", "request needs method GET, POST, PUT or DELETE and a url")
    if url.startswith(base):
        url = url[len(base):]
    path, _, qs = url.strip("/").partition("?")
    parts = path.split("/")
    shape = {"GET": (1, 2), "POST": (1,), "PUT": (1, 2) if qs else (2,), "DELETE": (2,)}[method]
    if len(parts) not in shape or not parts[0]:
        raise _invalid(index, "request.url", f"unsupported {method} url {url!r}")
    resource = entry.get("resource")
    if method in ("POST", "PUT") and not isinstance(resource, dict):
        raise _invalid(index, "resource", f"{method} needs a resource")
    return Op(index, method, parts[0], parts[1] if len(parts) == 2 else None,
              parse_qsl(qs, keep_blank_values=True), resource, entry.get("fullUrl"),
              request.get("ifNoneExist"), request.get("ifMatch"))


def _ops(body: object, base: str) -> tuple[str, list[Op]]:
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise ServerError(ErrorKind.INVALID, "POST to the base needs a Bundle", parameter="Bundle")
    kind = body.get("type")
    if kind not in ("batch", "transaction"):
        raise ServerError(ErrorKind.INVALID, "Bundle.type must be batch or transaction", parameter="Bundle.type")
    entries = body.get("entry", [])
    if not isinstance(entries, list):
        raise ServerError(ErrorKind.INVALID, "Bundle.entry must be a list", parameter="Bundle.entry")
    return kind, [_op(i, e, base) for i, e in enumerate(entries)]


def _rewrite(node: object, ids: dict[str, str]) -> object:
    """``node`` with every reference to a full URL of ``ids`` replaced by ``Type/id``."""
    if isinstance(node, list):
        return [_rewrite(item, ids) for item in node]
    if isinstance(node, dict):
        out = {k: _rewrite(v, ids) for k, v in node.items()}
        if isinstance(out.get("reference"), str) and out["reference"] in ids:
            out["reference"] = ids[out["reference"]]
        return out
    return node


def _entry(result: Result | dict) -> dict:
    if isinstance(result, dict):  # a search Bundle
        return {"resource": result, "response": {"status": "200 OK"}}
    response = {"status": STATUS_TEXT.get(result.status, str(result.status))}
    if "Location" in result.headers:
        response["location"] = result.headers["Location"]
    if "ETag" in result.headers:
        response["etag"] = result.headers["ETag"]
    entry: dict = {"response": response}
    if result.resource is not None:
        entry["resource"] = result.resource
        response["lastModified"] = result.resource.get("meta", {}).get("lastUpdated")
    return entry


class BundleProcessor:
    """Runs batch and transaction Bundles with a FhirService."""

    def __init__(self, service: FhirService) -> None:
        self.service = service

    def process(self, principal: Principal, body: object, *, base: str) -> dict:
        """The batch-response or transaction-response Bundle of a batch or transaction (FHIR R4 3.1.0.11)."""
        kind, ops = _ops(body, base)
        for op in ops:
            self.service.check_type(op.rtype)
            if op.resource is not None:
                op.resource = self.service.parse_body(op.rtype, op.resource)
        if kind == "transaction":
            results = self._transaction(principal, ops, base)
        else:
            results = [self._batch_entry(principal, op, base) for op in ops]
        return {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": f"{kind}-response",
                "entry": results}

    def _batch_entry(self, principal: Principal, op: Op, base: str) -> dict:
        try:
            with self.service.store.transaction(principal.tenant, write=op.method != "GET") as tx:
                return _entry(self._run(tx, principal, op, base))
        except ServerError as exc:
            if exc.kind is ErrorKind.INTERNAL:
                raise
            status, outcome = error_outcome(exc)
            return {"response": {"status": str(status), "outcome": outcome}}

    def _transaction(self, principal: Principal, ops: list[Op], base: str) -> list[dict]:
        results: dict[int, dict] = {}
        with self.service.store.transaction(principal.tenant, write=True) as tx:
            ids = self._assign_ids(tx, principal, ops)
            tx.planned = frozenset(ids.values())  # references to these resolve once the transaction is done
            for op in sorted(ops, key=lambda o: (ORDER[o.method], o.index)):
                if op.resource is not None:
                    op.resource = _rewrite(op.resource, ids)
                try:
                    results[op.index] = _entry(self._run(tx, principal, op, base))
                except ServerError as exc:
                    exc.message = f"Bundle.entry[{op.index}]: {exc.message}"
                    raise
        return [results[i] for i in range(len(ops))]

    def _assign_ids(self, tx: FhirTx, principal: Principal, ops: list[Op]) -> dict[str, str]:
        """Full URL -> Type/id of the resources the transaction creates (or finds with ifNoneExist)."""
        ids: dict[str, str] = {}
        for op in ops:
            if op.method != "POST":
                continue
            if op.if_none_exist:
                found = self.service.existing(tx, principal, op.rtype, op.if_none_exist)
                if found is not None:
                    op.found = {"id": found.resource_id}
            op.new_id = op.found.get("id") or str(uuid.uuid4())
            if op.full_url:
                ids[op.full_url] = f"{op.rtype}/{op.new_id}"
        return ids

    def _run(self, tx: FhirTx, principal: Principal, op: Op, base: str) -> Result | dict:
        svc = self.service
        if op.method == "GET":
            if op.rid is None:
                return svc.search_in(tx, principal, op.rtype, op.query, base=base)
            return svc.read_in(tx, principal, op.rtype, op.rid)
        if op.method == "DELETE":
            return svc.delete_in(tx, principal, op.rtype, op.rid)
        if op.method == "POST":
            if op.found:
                return svc.read_in(tx, principal, op.rtype, op.found["id"])
            return svc.create_in(tx, principal, op.resource, base=base, if_none_exist=op.if_none_exist,
                                 new_id=op.new_id)
        if op.rid is None:
            return svc.conditional_in(tx, principal, op.rtype, op.query, op.resource, base=base,
                                      if_match=op.if_match)
        if op.resource.get("id") != op.rid:
            raise _invalid(op.index, "resource.id", "the resource id must match the request url")
        return svc.update_in(tx, principal, op.resource, op.if_match, base)
