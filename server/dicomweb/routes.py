"""DICOMweb routes (PS3.18 10.4 WADO-RS, 10.5 STOW-RS, 10.6 QIDO-RS): parse, call one service, render."""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from server.dicom import json as dicom_json
from server.dicom.attributes import Level
from server.dicomweb.frames import Body
from server.dicomweb.media import accepts, parse_accept
from server.dicomweb.search import QidoService
from server.dicomweb.stow import StowService
from server.dicomweb.wado import Streamed, Target, WadoService
from server.errors import ErrorKind, ServerError
from server.security.http import principal_of, require
from server.security.tokens import Access, Principal

DICOM_JSON = "application/dicom+json"
RESOURCE = "ImagingStudy"

router = APIRouter(prefix="/dicomweb", tags=["DICOMweb"])


def _reader(request: Request) -> Principal:
    return require(principal_of(request), RESOURCE, Access.READ)


def _writer(request: Request) -> Principal:
    return require(principal_of(request), RESOURCE, Access.CREATE)


Reader = Annotated[Principal, Depends(_reader)]
Writer = Annotated[Principal, Depends(_writer)]


def _stow(request: Request) -> StowService:
    return request.app.state.stow


def _wado(request: Request) -> WadoService:
    return request.app.state.wado


def _qido(request: Request) -> QidoService:
    return request.app.state.qido


async def _pixel_reader(request: Request) -> Principal:
    """The Reader check on the event loop (frames, bulk data, retrieve): a plain ``def`` dependency costs a
    thread-pool hop per request, verifying an HS256 token does not."""
    return _reader(request)


async def _pixel_wado(request: Request) -> WadoService:
    return request.app.state.wado


PixelReader = Annotated[Principal, Depends(_pixel_reader)]
PixelWado = Annotated[WadoService, Depends(_pixel_wado)]
Stow = Annotated[StowService, Depends(_stow)]
Wado = Annotated[WadoService, Depends(_wado)]
Qido = Annotated[QidoService, Depends(_qido)]


def base_url(request: Request) -> str:
    """The DICOMweb base URL used in RetrieveURL and BulkDataURI."""
    configured = request.app.state.settings.public_base_url
    root = configured.rstrip("/") if configured else str(request.base_url).rstrip("/")
    return f"{root}/dicomweb"


def _json_response(body, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dicom_json.dumps_bytes(body), status_code=status, media_type=DICOM_JSON, headers=headers)


def _streamed(s: Streamed) -> StreamingResponse:
    return StreamingResponse(s.chunks, media_type=s.media_type)


# ---- STOW-RS ----------------------------------------------------------------------------------
STOW_DOC = {
    "description": "Store Instances (PS3.18 10.5). Body: multipart/related; type=\"application/dicom\" or a single "
                   "application/dicom. Answers the Store Instances Response in application/dicom+json.",
    "responses": {200: {"description": "all stored"}, 202: {"description": "some failed or warnings"},
                  400: {"description": "nothing stored, bad syntax"}, 409: {"description": "nothing stored, conflict"},
                  415: {"description": "unsupported media type"}},
}


@router.post("/studies", **STOW_DOC)
async def stow_studies(request: Request, principal: Writer, stow: Stow) -> Response:
    return await _store(request, principal, stow, None)


@router.post("/studies/{study}", **STOW_DOC)
async def stow_study(study: str, request: Request, principal: Writer, stow: Stow) -> Response:
    return await _store(request, principal, stow, study)


async def _store(request: Request, principal: Principal, stow: StowService, study: str | None) -> Response:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > request.app.state.settings.max_stow_bytes:
        raise ServerError(ErrorKind.TOO_LARGE, "request body exceeds the configured limit")
    result = await stow.store(request.stream(), request.headers.get("content-type"), tenant=principal.tenant,
                              study_uid=study, base_url=base_url(request))
    return _json_response(result.body, result.status)


# ---- QIDO-RS ----------------------------------------------------------------------------------
async def _search(request: Request, principal: Principal, qido: QidoService, level: Level,
                  study: str | None = None, series: str | None = None) -> Response:
    items = parse_accept(request.headers.get("accept"))
    if accepts(items, DICOM_JSON) is None and accepts(items, "application/json") is None:
        raise ServerError(ErrorKind.NOT_ACCEPTABLE, "QIDO-RS results are available as application/dicom+json only")
    result = await anyio.to_thread.run_sync(
        lambda: qido.search(principal.tenant, level, list(request.query_params.multi_items()),
                            study_uid=study, series_uid=series, base_url=base_url(request)))
    headers = {}
    if result.warnings:
        host = request.url.hostname or "telerad-bridge"
        headers["Warning"] = ", ".join(f'299 {host} "{w}"' for w in result.warnings)
    if not result.items:
        return Response(status_code=204, headers=headers)
    return _json_response(result.items, 200, headers)


QIDO_DOC = {"description": "Search (PS3.18 10.6): matching by keyword or tag, includefield, limit, offset, "
                           "fuzzymatching. 200 with application/dicom+json, 204 when nothing matches."}


@router.get("/studies", **QIDO_DOC)
async def search_studies(request: Request, principal: Reader, qido: Qido) -> Response:
    return await _search(request, principal, qido, Level.STUDY)


@router.get("/series", **QIDO_DOC)
async def search_series(request: Request, principal: Reader, qido: Qido) -> Response:
    return await _search(request, principal, qido, Level.SERIES)


@router.get("/instances", **QIDO_DOC)
async def search_instances(request: Request, principal: Reader, qido: Qido) -> Response:
    return await _search(request, principal, qido, Level.INSTANCE)


@router.get("/studies/{study}/series", **QIDO_DOC)
async def search_study_series(study: str, request: Request, principal: Reader, qido: Qido) -> Response:
    return await _search(request, principal, qido, Level.SERIES, study)


@router.get("/studies/{study}/instances", **QIDO_DOC)
async def search_study_instances(study: str, request: Request, principal: Reader, qido: Qido) -> Response:
    return await _search(request, principal, qido, Level.INSTANCE, study)


@router.get("/studies/{study}/series/{series}/instances", **QIDO_DOC)
async def search_series_instances(study: str, series: str, request: Request, principal: Reader, qido: Qido) -> Response:
    return await _search(request, principal, qido, Level.INSTANCE, study, series)


# ---- WADO-RS ----------------------------------------------------------------------------------
RETRIEVE_DOC = {"description": "Retrieve (PS3.18 10.4): multipart/related; type=\"application/dicom\", "
                               "stored transfer syntax (transfer-syntax=*) or transcoded to the transfer-syntax "
                               "asked for; 406 for what cannot be produced."}
METADATA_DOC = {"description": "Metadata (PS3.18 10.4): application/dicom+json from precomputed JSON, ETag/304, gzip."}


async def _metadata(request: Request, principal: Principal, wado: WadoService, target: Target) -> Response:
    result = await wado.metadata(principal.tenant, target, base_url(request), accept=request.headers.get("accept"),
                                 if_none_match=request.headers.get("if-none-match"),
                                 accept_encoding=request.headers.get("accept-encoding"))
    headers = {"ETag": result.etag, "Cache-Control": "private, no-cache", "Vary": "Accept, Accept-Encoding, Authorization"}
    if result.body is None:
        return Response(status_code=304, headers=headers)
    if result.gzipped:
        headers["Content-Encoding"] = "gzip"
    return Response(result.body, media_type=DICOM_JSON, headers=headers)


@router.get("/studies/{study}", **RETRIEVE_DOC)
async def retrieve_study(study: str, request: Request, principal: Reader, wado: Wado) -> StreamingResponse:
    return _streamed(await wado.retrieve(principal.tenant, Target(Level.STUDY, study), request.headers.get("accept")))


@router.get("/studies/{study}/series/{series}", **RETRIEVE_DOC)
async def retrieve_series(study: str, series: str, request: Request, principal: Reader, wado: Wado) -> StreamingResponse:
    target = Target(Level.SERIES, study, series)
    return _streamed(await wado.retrieve(principal.tenant, target, request.headers.get("accept")))


@router.get("/studies/{study}/series/{series}/instances/{instance}", **RETRIEVE_DOC)
async def retrieve_instance(study: str, series: str, instance: str, request: Request, principal: Reader,
                            wado: Wado) -> StreamingResponse:
    target = Target(Level.INSTANCE, study, series, instance)
    return _streamed(await wado.retrieve(principal.tenant, target, request.headers.get("accept")))


@router.get("/studies/{study}/metadata", **METADATA_DOC)
async def study_metadata(study: str, request: Request, principal: Reader, wado: Wado) -> Response:
    return await _metadata(request, principal, wado, Target(Level.STUDY, study))


@router.get("/studies/{study}/series/{series}/metadata", **METADATA_DOC)
async def series_metadata(study: str, series: str, request: Request, principal: Reader, wado: Wado) -> Response:
    return await _metadata(request, principal, wado, Target(Level.SERIES, study, series))


@router.get("/studies/{study}/series/{series}/instances/{instance}/metadata", **METADATA_DOC)
async def instance_metadata(study: str, series: str, instance: str, request: Request, principal: Reader,
                            wado: Wado) -> Response:
    return await _metadata(request, principal, wado, Target(Level.INSTANCE, study, series, instance))


@router.get("/studies/{study}/series/{series}/instances/{instance}/bulk/{path:path}",
            description="Bulk data referenced by a BulkDataURI (PS3.18 10.4.1.1.5): multipart/related; "
                        "type=\"application/octet-stream\" or application/octet-stream; a single Range: 206/416.")
async def bulk_data(study: str, series: str, instance: str, path: str, request: Request, principal: PixelReader,
                    wado: PixelWado) -> Response:
    target = Target(Level.INSTANCE, study, series, instance)
    return _body(await wado.bulk(principal.tenant, target, path, request.headers.get("accept"),
                                 request.headers.get("range")))


FRAMES_DOC = {"description": "Frames (PS3.18 10.4.1.1.6): multipart/related with type application/octet-stream "
                              "(native), image/jpeg, image/jls, image/jp2, image/jphc, image/dicom-rle or */*; "
                              "transfer-syntax=* is the stored syntax. Range on a single frame: 206/416. "
                              "406 for what cannot be produced."}


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frames}", **FRAMES_DOC)
async def frames(study: str, series: str, instance: str, frames: str, request: Request, principal: PixelReader,
                 wado: PixelWado) -> Response:
    body = await wado.frames.frames(principal.tenant, study, series, instance, frames,
                                    request.headers.get("accept"), request.headers.get("range"))
    return _body(body)


def _body(body: Body) -> Response:
    """A frames/bulk Body as a response: streamed multipart or a single payload."""
    if body.chunks is not None:
        return StreamingResponse(body.chunks, status_code=body.status, media_type=body.media_type,
                                 headers=body.headers)
    return Response(body.content, status_code=body.status, media_type=body.media_type, headers=body.headers)
