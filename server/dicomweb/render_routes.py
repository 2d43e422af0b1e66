"""Rendered and thumbnail resources (PS3.18 10.4.1.1.3, 10.4.1.1.4; issue 6): parse, call the service, answer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from server.dicom.attributes import Level
from server.dicomweb.rendered import Rendered, RenderService
from server.dicomweb.routes import Reader
from server.dicomweb.wado import Target

router = APIRouter(prefix="/dicomweb", tags=["DICOMweb"])

CACHE_CONTROL = "private, max-age=300"


def render_service(request: Request) -> RenderService:
    """The app's RenderService, made on first use (one per app, so one thumbnail cache per process)."""
    state = request.app.state
    service = getattr(state, "render", None)
    if service is None:
        service = state.render = RenderService(state.blobs, state.archive, state.wado.frames)
    return service


Renderer = Annotated[RenderService, Depends(render_service)]


def answer(result: Rendered) -> Response:
    """A rendered body, or a streamed multipart body."""
    headers = {"Cache-Control": CACHE_CONTROL, "Vary": "Accept, Authorization"}
    if result.chunks is not None:
        return StreamingResponse(result.chunks, media_type=result.media_type, headers=headers)
    return Response(result.body, media_type=result.media_type, headers=headers)


RENDERED_DOC = {
    "description": "Rendered resource (PS3.18 10.4.1.1.3, 8.3.5.1): image/jpeg (default), image/png, image/gif, "
                   "application/pdf for Encapsulated PDF; study and series as multipart/related of the rendered "
                   "instances. Query: window=center,width,function; viewport=vw,vh[,sx,sy,sw,sh]; quality=1..100; "
                   "accept=<media type>.",
    "responses": {400: {"description": "malformed parameter"}, 404: {"description": "unknown UIDs or frame"},
                  406: {"description": "no acceptable rendering"}},
}
THUMBNAIL_DOC = {
    "description": "Thumbnail (PS3.18 10.4.1.1.4): one small image (image/jpeg default, image/png, image/gif) of a "
                   "representative frame; viewport (default 128,128) and quality honoured.",
    "responses": RENDERED_DOC["responses"],
}


async def _rendered(request: Request, principal, service: RenderService, target: Target,
                    frames: str | None = None) -> Response:
    return answer(await service.rendered(principal.tenant, target, list(request.query_params.multi_items()),
                                         request.headers.get("accept"), frames))


async def _thumbnail(request: Request, principal, service: RenderService, target: Target,
                     frames: str | None = None) -> Response:
    return answer(await service.thumbnail(principal.tenant, target, list(request.query_params.multi_items()),
                                          request.headers.get("accept"), frames))


@router.get("/studies/{study}/rendered", **RENDERED_DOC)
async def study_rendered(study: str, request: Request, principal: Reader, service: Renderer) -> Response:
    return await _rendered(request, principal, service, Target(Level.STUDY, study))


@router.get("/studies/{study}/series/{series}/rendered", **RENDERED_DOC)
async def series_rendered(study: str, series: str, request: Request, principal: Reader,
                          service: Renderer) -> Response:
    return await _rendered(request, principal, service, Target(Level.SERIES, study, series))


@router.get("/studies/{study}/series/{series}/instances/{instance}/rendered", **RENDERED_DOC)
async def instance_rendered(study: str, series: str, instance: str, request: Request, principal: Reader,
                            service: Renderer) -> Response:
    return await _rendered(request, principal, service, Target(Level.INSTANCE, study, series, instance))


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/rendered", **RENDERED_DOC)
async def frames_rendered(study: str, series: str, instance: str, frames: str, request: Request,
                          principal: Reader, service: Renderer) -> Response:
    return await _rendered(request, principal, service, Target(Level.INSTANCE, study, series, instance), frames)


@router.get("/studies/{study}/thumbnail", **THUMBNAIL_DOC)
async def study_thumbnail(study: str, request: Request, principal: Reader, service: Renderer) -> Response:
    return await _thumbnail(request, principal, service, Target(Level.STUDY, study))


@router.get("/studies/{study}/series/{series}/thumbnail", **THUMBNAIL_DOC)
async def series_thumbnail(study: str, series: str, request: Request, principal: Reader,
                           service: Renderer) -> Response:
    return await _thumbnail(request, principal, service, Target(Level.SERIES, study, series))


@router.get("/studies/{study}/series/{series}/instances/{instance}/thumbnail", **THUMBNAIL_DOC)
async def instance_thumbnail(study: str, series: str, instance: str, request: Request, principal: Reader,
                             service: Renderer) -> Response:
    return await _thumbnail(request, principal, service, Target(Level.INSTANCE, study, series, instance))


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/thumbnail", **THUMBNAIL_DOC)
async def frames_thumbnail(study: str, series: str, instance: str, frames: str, request: Request,
                           principal: Reader, service: Renderer) -> Response:
    return await _thumbnail(request, principal, service, Target(Level.INSTANCE, study, series, instance), frames)
