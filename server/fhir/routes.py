"""FHIR R4 REST routes (FHIR R4 3.1.0 RESTful API, JSON 2.6.2): parse, call one service, render."""

from __future__ import annotations

import functools
import json
from typing import Annotated
from urllib.parse import parse_qsl, urlencode

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from server.errors import ErrorKind, ServerError
from server.fhir.bundle import BundleProcessor
from server.fhir.capability import capability_statement, smart_configuration
from server.fhir.outcome import informational
from server.fhir.service import FhirService, Result
from server.security.http import principal_of
from server.security.tokens import Principal

FHIR_JSON = "application/fhir+json"
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


def _negotiate(request: Request) -> None:
    """NOT_ACCEPTABLE unless the client accepts JSON (``_format`` overrides ``Accept``; FHIR R4 2.1.0.6)."""
    fmt = request.query_params.get("_format")
    if fmt is not None:
        if fmt.split(";")[0].strip() not in JSON_FORMATS:
            raise ServerError(ErrorKind.NOT_ACCEPTABLE, f"_format {fmt!r} is not supported; use json",
                              parameter="_format")
        return
    accept = request.headers.get("accept", "")
    if not accept.strip():
        return
    types = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    if not any(t in JSON_TYPES or t in ANY for t in types):
        raise ServerError(ErrorKind.NOT_ACCEPTABLE, "only application/fhir+json is produced", parameter="Accept")


async def _body(request: Request) -> object:
    """The JSON body of a create/update; 415 for other media types, 400 for malformed JSON."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in JSON_TYPES:
        raise ServerError(ErrorKind.UNSUPPORTED, f"content type {ctype or 'missing'!r} is not supported; "
                          f"use {FHIR_JSON}", parameter="Content-Type")
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServerError(ErrorKind.INVALID, "malformed JSON body", parameter="Resource") from exc


def _prefer(request: Request) -> dict[str, str]:
    out = {}
    for part in request.headers.get("prefer", "").replace(";", ",").split(","):
        key, _, value = part.strip().partition("=")
        if key:
            out[key.lower()] = value.strip().strip('"').lower()
    return out


def _json(body: dict, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return Response(data, status_code=status, media_type=FHIR_JSON, headers=headers)


def _render(request: Request, result: Result) -> Response:
    """A result, with the body ``Prefer: return=`` asks for (FHIR R4 3.1.0.8.2)."""
    wanted = _prefer(request).get("return", "representation")
    if result.resource is None or wanted == "minimal":
        return Response(status_code=result.status, headers=result.headers)
    if wanted == "operationoutcome":
        return _json(informational(f"{request.method} done"), result.status, result.headers)
    return _json(result.resource, result.status, result.headers)


async def _run(fn, *args, **kwargs):
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


def _items(request: Request) -> list[tuple[str, str]]:
    return list(request.query_params.multi_items())


def _lenient(request: Request) -> bool:
    return _prefer(request).get("handling") == "lenient"


# ---- conformance -----------------------------------------------------------------------------------------
@router.get("/metadata", description="CapabilityStatement (FHIR R4 3.1.0.13 capabilities); no token needed.")
async def metadata(request: Request) -> Response:
    _negotiate(request)
    return _json(capability_statement(base_url(request)))


@router.get("/.well-known/smart-configuration", description="SMART App Launch 2.0 discovery.")
async def smart_fhir(request: Request) -> Response:
    return Response(json.dumps(smart_configuration(base_url(request))), media_type="application/json")


@well_known.get("/.well-known/smart-configuration", description="SMART App Launch 2.0 discovery.")
async def smart_root(request: Request) -> Response:
    return Response(json.dumps(smart_configuration(base_url(request))), media_type="application/json")


@router.post("", description="batch or transaction Bundle (FHIR R4 3.1.0.11); a transaction is all or nothing.")
async def batch_or_transaction(request: Request, principal: Caller, fhir: Service) -> Response:
    body = await _body(request)
    return _json(await _run(BundleProcessor(fhir).process, principal, body, base=base_url(request)))


# ---- type level ------------------------------------------------------------------------------------------
@router.post("/{rtype}/_search", description="search-type with a form body (FHIR R4 3.1.1.3).")
async def search_post(rtype: str, request: Request, principal: Caller, fhir: Service) -> Response:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    form: list[tuple[str, str]] = []
    if ctype == "application/x-www-form-urlencoded":
        form = parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True)
    elif ctype:
        raise ServerError(ErrorKind.UNSUPPORTED, "_search takes application/x-www-form-urlencoded",
                          parameter="Content-Type")
    bundle = await _run(fhir.search, principal, rtype, _items(request) + form, base=base_url(request),
                        lenient=_lenient(request))
    return _json(bundle)


@router.get("/{rtype}/_history", description="history-type (FHIR R4 3.1.0.11).")
async def history_type(rtype: str, request: Request, principal: Caller, fhir: Service) -> Response:
    return _json(await _run(fhir.history, principal, rtype, None, _items(request), base=base_url(request)))


@router.get("/{rtype}", description="search-type (FHIR R4 3.1.1); unknown parameters 400 unless "
                                    "Prefer: handling=lenient.")
async def search_get(rtype: str, request: Request, principal: Caller, fhir: Service) -> Response:
    bundle = await _run(fhir.search, principal, rtype, _items(request), base=base_url(request),
                        lenient=_lenient(request))
    return _json(bundle)


@router.post("/{rtype}", description="create, conditional with If-None-Exist or search parameters on the URL "
                                     "(FHIR R4 3.1.0.5, 3.1.0.8).")
async def create(rtype: str, request: Request, principal: Caller, fhir: Service) -> Response:
    body = await _body(request)
    condition = request.headers.get("if-none-exist")
    criteria = [(k, v) for k, v in _items(request) if k not in ("_format", "_pretty")]
    if condition is None and criteria:  # search parameters on the URL act as If-None-Exist (fhirpy, Aidbox)
        condition = urlencode(criteria)
    result = await _run(fhir.create, principal, rtype, body, base=base_url(request), if_none_exist=condition)
    return _render(request, result)


@router.put("/{rtype}", description="conditional update (FHIR R4 3.1.0.4.3).")
async def conditional_update(rtype: str, request: Request, principal: Caller, fhir: Service) -> Response:
    body = await _body(request)
    criteria = [(k, v) for k, v in _items(request) if k not in ("_format", "_pretty")]
    result = await _run(fhir.conditional_update, principal, rtype, criteria, body, base=base_url(request),
                        if_match=request.headers.get("if-match"))
    return _render(request, result)


# ---- instance level --------------------------------------------------------------------------------------
@router.get("/{rtype}/{rid}", description="read (FHIR R4 3.1.0.2); 410 when deleted.")
async def read(rtype: str, rid: str, request: Request, principal: Caller, fhir: Service) -> Response:
    return _render(request, await _run(fhir.read, principal, rtype, rid))


@router.put("/{rtype}/{rid}", description="update or create with the client's id (FHIR R4 3.1.0.4); If-Match.")
async def update(rtype: str, rid: str, request: Request, principal: Caller, fhir: Service) -> Response:
    body = await _body(request)
    result = await _run(fhir.update, principal, rtype, rid, body, base=base_url(request),
                        if_match=request.headers.get("if-match"))
    return _render(request, result)


@router.delete("/{rtype}/{rid}", description="delete (FHIR R4 3.1.0.7).")
async def delete(rtype: str, rid: str, request: Request, principal: Caller, fhir: Service) -> Response:
    return _render(request, await _run(fhir.delete, principal, rtype, rid))


@router.get("/{rtype}/{rid}/_history", description="history-instance (FHIR R4 3.1.0.11).")
async def history_instance(rtype: str, rid: str, request: Request, principal: Caller, fhir: Service) -> Response:
    return _json(await _run(fhir.history, principal, rtype, rid, _items(request), base=base_url(request)))


@router.get("/{rtype}/{rid}/_history/{vid}", description="vread (FHIR R4 3.1.0.3).")
async def vread(rtype: str, rid: str, vid: str, request: Request, principal: Caller, fhir: Service) -> Response:
    return _render(request, await _run(fhir.vread, principal, rtype, rid, vid))
