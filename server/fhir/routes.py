"""FHIR R4 REST routes (FHIR R4 3.1.0 RESTful API, JSON 2.6.2): parse, call one service, render."""

from __future__ import annotations

import functools
import json
from typing import Annotated
from urllib.parse import parse_qsl, urlencode

import anyio
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from server.errors import ErrorKind, ServerError
from server.fhir.bundle import BundleProcessor
from server.fhir.capability import capability_statement, smart_configuration
from server.fhir.model import from_xml, to_xml
from server.fhir.outcome import informational
from server.fhir import params as P
from server.fhir.service import FhirService, Result, subset
from server.security.http import principal_of
from server.security.tokens import Principal

FHIR_JSON = "application/fhir+json"
FHIR_XML = "application/fhir+xml"
JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
JSON_FORMATS = ("json", *JSON_TYPES)
XML_TYPES = ("xml", "application/fhir+xml", "application/xml", "text/xml", "application/xml+fhir")
ANY = ("*/*", "application/*")

router = APIRouter(prefix="/fhir", tags=["FHIR"])
well_known = APIRouter(tags=["FHIR"])


def _service(request: Request) -> FhirService:
    return request.app.state.fhir


def _caller(request: Request) -> Principal:
    principal = principal_of(request)
    _negotiate(request)
    return principal


Service = Annotated[FhirService, Depends(_service)]
Caller = Annotated[Principal, Depends(_caller)]


def base_url(request: Request) -> str:
    """The FHIR base URL used in Location, fullUrl and links."""
    configured = request.app.state.settings.public_base_url
    root = configured.rstrip("/") if configured else str(request.base_url).rstrip("/")
    return f"{root}/fhir"


def _negotiate(request: Request) -> str:
    """"json" or "xml" (``_format`` overrides ``Accept``; FHIR R4 2.1.0.6); NOT_ACCEPTABLE for others."""
    fmt = request.query_params.get("_format")
    if fmt is not None:
        fmt = fmt.split(";")[0].strip().lower().replace(" ", "+")  # an unescaped '+' arrives as ' '
        if fmt in JSON_FORMATS or fmt in XML_TYPES:
            return "json" if fmt in JSON_FORMATS else "xml"
        raise ServerError(ErrorKind.NOT_ACCEPTABLE, f"_format {fmt!r} is not supported; use json or xml",
                          parameter="_format")
    accept = request.headers.get("accept", "")
    if not accept.strip():
        return "json"
    for t in (part.split(";")[0].strip().lower() for part in accept.split(",")):  # first acceptable wins
        if t in JSON_TYPES or t in ANY:
            return "json"
        if t in XML_TYPES:
            return "xml"
    raise ServerError(ErrorKind.NOT_ACCEPTABLE, "only application/fhir+json and application/fhir+xml are "
                      "produced", parameter="Accept")


async def _read(request: Request) -> bytes:
    """The request body, refused with TOO_LARGE (413) past ``max_fhir_bytes`` before it is all held in memory."""
    limit = request.app.state.settings.max_fhir_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ServerError(ErrorKind.TOO_LARGE, f"the body exceeds {limit} bytes", parameter="Content-Length")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServerError(ErrorKind.TOO_LARGE, f"the body exceeds {limit} bytes", parameter="Resource")
        chunks.append(chunk)
    return b"".join(chunks)


def _loads(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ServerError(ErrorKind.INVALID, "malformed JSON body", parameter="Resource") from exc


async def _body(request: Request) -> object:
    """The body of a create/update as JSON; 415 for other media types, 400 for malformed JSON or XML, 413 when
    too large. Parsing runs in a worker thread."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in XML_TYPES and ctype != "xml":
        return await _run(from_xml, await _read(request))
    if ctype not in JSON_TYPES:
        raise ServerError(ErrorKind.UNSUPPORTED, f"content type {ctype or 'missing'!r} is not supported; "
                          f"use {FHIR_JSON} or {FHIR_XML}", parameter="Content-Type")
    return await _run(_loads, await _read(request))


def _prefer(request: Request) -> dict[str, str]:
    out = {}
    for part in request.headers.get("prefer", "").replace(";", ",").split(","):
        key, _, value = part.strip().partition("=")
        if key:
            out[key.lower()] = value.strip().strip('"').lower()
    return out


def _json(body: dict, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    try:
        data = orjson.dumps(body)  # compact UTF-8, as below, several times faster
    except TypeError:  # orjson.JSONEncodeError: e.g. an integer beyond 64 bits
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return Response(data, status_code=status, media_type=FHIR_JSON, headers=headers)


async def _out(request: Request, body: dict, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """``body`` in the negotiated format: JSON, or XML (FHIR R4 2.6.1) rendered off the event loop."""
    if _negotiate(request) == "xml":
        return Response(await _run(to_xml, body), status_code=status, media_type=FHIR_XML, headers=headers)
    return _json(body, status, headers)


def outcome_response(request: Request, outcome: dict, status: int, headers: dict[str, str]) -> Response:
    """An error's OperationOutcome in the format the client asked for (JSON when that cannot be told)."""
    try:
        fmt = _negotiate(request)
    except ServerError:
        fmt = "json"
    if fmt == "xml":
        return Response(to_xml(outcome), status_code=status, media_type=FHIR_XML, headers=headers)
    return _json(outcome, status, headers)


async def _render(request: Request, result: Result) -> Response:
    """A result, with the body ``Prefer: return=`` asks for (FHIR R4 3.1.0.8.2)."""
    wanted = _prefer(request).get("return", "representation")
    if result.resource is None or wanted == "minimal":
        return Response(status_code=result.status, headers=result.headers)
    if wanted == "operationoutcome":
        return await _out(request, informational(f"{request.method} done"), result.status, result.headers)
    return await _out(request, result.resource, result.status, result.headers)


async def _run(fn, *args, **kwargs):
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


def _items(request: Request) -> list[tuple[str, str]]:
    return list(request.query_params.multi_items())


def _lenient(request: Request) -> bool:
    return _prefer(request).get("handling") == "lenient"


# ---- conformance -----------------------------------------------------------------------------------------
@router.get("/metadata", description="CapabilityStatement (FHIR R4 3.1.0.13 capabilities); no token needed.")
async def metadata(request: Request) -> Response:
    return await _out(request, capability_statement(base_url(request)))


@router.get("/.well-known/smart-configuration", description="SMART App Launch 2.0 discovery.")
async def smart_fhir(request: Request) -> Response:
    return Response(json.dumps(smart_configuration(base_url(request))), media_type="application/json")


@well_known.get("/.well-known/smart-configuration", description="SMART App Launch 2.0 discovery.")
async def smart_root(request: Request) -> Response:
    return Response(json.dumps(smart_configuration(base_url(request))), media_type="application/json")


@router.post("", description="batch or transaction Bundle (FHIR R4 3.1.0.11); a transaction is all or nothing.")
async def batch_or_transaction(request: Request, principal: Caller, fhir: Service) -> Response:
    body = await _body(request)
    return await _out(request, await _run(BundleProcessor(fhir).process, principal, body, base=base_url(request)))


# ---- type level ------------------------------------------------------------------------------------------
@router.post("/{rtype}/_search", description="search-type with a form body (FHIR R4 3.1.1.3).")
async def search_post(rtype: str, request: Request, principal: Caller, fhir: Service) -> Response:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    form: list[tuple[str, str]] = []
    if ctype == "application/x-www-form-urlencoded":
        form = parse_qsl((await _read(request)).decode("utf-8", "replace"), keep_blank_values=True)
    elif ctype:
        raise ServerError(ErrorKind.UNSUPPORTED, "_search takes application/x-www-form-urlencoded",
                          parameter="Content-Type")
    bundle = await _run(fhir.search, principal, rtype, _items(request) + form, base=base_url(request),
                        lenient=_lenient(request))
    return await _out(request, bundle)


def _validate_input(body: object, rtype: str) -> tuple[object | None, str | None]:
    """The resource and mode of a ``$validate`` request: a Parameters (``resource``, ``mode``; ``profile`` is
    not supported) or the bare resource (operation-resource-validate.html)."""
    if isinstance(body, dict) and body.get("resourceType") == "Parameters":
        resource, mode = None, None
        for p in body.get("parameter", []):
            if p.get("name") == "resource":
                resource = p.get("resource")
            elif p.get("name") == "mode":
                mode = p.get("valueCode") or p.get("valueString")
            elif p.get("name") == "profile":
                raise ServerError(ErrorKind.UNSUPPORTED, "$validate against a named profile is not supported; "
                                  "the resource's meta.profile is used", parameter="Parameters.parameter")
        return resource, mode
    return body, None


@router.post("/{rtype}/$validate", description="$validate on the type (FHIR R4 operation-resource-validate): "
                                              "200 with an OperationOutcome listing every issue.")
async def validate_type(rtype: str, request: Request, principal: Caller, fhir: Service) -> Response:
    resource, mode = _validate_input(await _body(request), rtype)
    mode = mode or request.query_params.get("mode")
    return await _out(request, await _run(fhir.validate, principal, rtype, None, resource, mode))


@router.post("/{rtype}/{rid}/$validate", description="$validate on an instance (mode update or delete).")
async def validate_instance(rtype: str, rid: str, request: Request, principal: Caller, fhir: Service) -> Response:
    resource, mode = _validate_input(await _body(request), rtype)
    mode = mode or request.query_params.get("mode") or "update"
    return await _out(request, await _run(fhir.validate, principal, rtype, rid, resource, mode))


@router.get("/{rtype}/{rid}/$validate", description="$validate of the stored resource, or of its deletion "
                                                   "with mode=delete.")
async def validate_stored(rtype: str, rid: str, request: Request, principal: Caller, fhir: Service) -> Response:
    mode = request.query_params.get("mode")
    return await _out(request, await _run(fhir.validate, principal, rtype, rid, None, mode))


@router.get("/{rtype}/_history", description="history-type (FHIR R4 3.1.0.11).")
async def history_type(rtype: str, request: Request, principal: Caller, fhir: Service) -> Response:
    bundle = await _run(fhir.history, principal, rtype, None, _items(request), base=base_url(request))
    return await _out(request, bundle)


@router.get("/{rtype}", description="search-type (FHIR R4 3.1.1); unknown parameters 400 unless "
                                    "Prefer: handling=lenient.")
async def search_get(rtype: str, request: Request, principal: Caller, fhir: Service) -> Response:
    bundle = await _run(fhir.search, principal, rtype, _items(request), base=base_url(request),
                        lenient=_lenient(request))
    return await _out(request, bundle)


@router.post("/{rtype}", description="create, conditional with If-None-Exist or search parameters on the URL "
                                     "(FHIR R4 3.1.0.5, 3.1.0.8).")
async def create(rtype: str, request: Request, principal: Caller, fhir: Service) -> Response:
    body = await _body(request)
    condition = request.headers.get("if-none-exist")
    criteria = [(k, v) for k, v in _items(request) if k not in ("_format", "_pretty")]
    if condition is None and criteria:  # search parameters on the URL act as If-None-Exist (fhirpy, Aidbox)
        condition = urlencode(criteria)
    result = await _run(fhir.create, principal, rtype, body, base=base_url(request), if_none_exist=condition)
    return await _render(request, result)


@router.put("/{rtype}", description="conditional update (FHIR R4 3.1.0.4.3).")
async def conditional_update(rtype: str, request: Request, principal: Caller, fhir: Service) -> Response:
    body = await _body(request)
    criteria = [(k, v) for k, v in _items(request) if k not in ("_format", "_pretty")]
    result = await _run(fhir.conditional_update, principal, rtype, criteria, body, base=base_url(request),
                        if_match=request.headers.get("if-match"))
    return await _render(request, result)


# ---- instance level --------------------------------------------------------------------------------------
@router.get("/{rtype}/{rid}", description="read (FHIR R4 3.1.0.2); 410 when deleted.")
async def read(rtype: str, rid: str, request: Request, principal: Caller, fhir: Service) -> Response:
    result = await _run(fhir.read, principal, rtype, rid)
    summary, elements = request.query_params.get("_summary"), request.query_params.get("_elements")
    if result.resource is not None and (summary or elements):
        query = P.parse_query(rtype, [(k, v) for k, v in (("_summary", summary), ("_elements", elements)) if v],
                              lenient=False)
        result = Result(result.status, subset(result.resource, query.summary, query.elements), result.headers)
    return await _render(request, result)


@router.put("/{rtype}/{rid}", description="update or create with the client's id (FHIR R4 3.1.0.4); If-Match.")
async def update(rtype: str, rid: str, request: Request, principal: Caller, fhir: Service) -> Response:
    body = await _body(request)
    result = await _run(fhir.update, principal, rtype, rid, body, base=base_url(request),
                        if_match=request.headers.get("if-match"))
    return await _render(request, result)


@router.delete("/{rtype}/{rid}", description="delete (FHIR R4 3.1.0.7).")
async def delete(rtype: str, rid: str, request: Request, principal: Caller, fhir: Service) -> Response:
    return await _render(request, await _run(fhir.delete, principal, rtype, rid))


@router.get("/{rtype}/{rid}/_history", description="history-instance (FHIR R4 3.1.0.11).")
async def history_instance(rtype: str, rid: str, request: Request, principal: Caller, fhir: Service) -> Response:
    bundle = await _run(fhir.history, principal, rtype, rid, _items(request), base=base_url(request))
    return await _out(request, bundle)


@router.get("/{rtype}/{rid}/_history/{vid}", description="vread (FHIR R4 3.1.0.3).")
async def vread(rtype: str, rid: str, vid: str, request: Request, principal: Caller, fhir: Service) -> Response:
    return await _render(request, await _run(fhir.vread, principal, rtype, rid, vid))
