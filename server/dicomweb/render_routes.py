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

HEADERS = {"Cache-Control": "private, max-age=300", "Vary": "Accept, Authorization"}


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
    if result.chunks is not None:
        return StreamingResponse(result.chunks, media_type=result.media_type, headers=HEADERS)
    return Response(result.body, media_type=result.media_type, headers=HEADERS)


ERROR_RESPONSES = {400: {"description": "malformed or missing parameter"},
                   404: {"description": "unknown UIDs, object or frame"},
                   406: {"description": "no acceptable representation can be produced"}}
RENDERED_DOC = {
    "description": "Rendered resource (PS3.18 10.4.1.1.3, 8.3.5.1): image/jpeg (default), image/png, image/gif, "
                   "application/pdf for Encapsulated PDF; study and series as multipart/related of the rendered "
                   "instances. Query: window=center,width,function; viewport=vw,vh[,sx,sy,sw,sh]; quality=1..100; "
                   "accept=<media type>.",
    "responses": ERROR_RESPONSES,
}
THUMBNAIL_DOC = {
    "description": "Thumbnail (PS3.18 10.4.1.1.4): one small image (image/jpeg default, image/png, image/gif) of a "
                   "representative frame; viewport (default 128,128) and quality honoured.",
    "responses": ERROR_RESPONSES,
}


LEVEL_PATHS = (("/studies/{study}", Level.STUDY), ("/studies/{study}/series/{series}", Level.SERIES),
               ("/studies/{study}/series/{series}/instances/{instance}", Level.INSTANCE),
               ("/studies/{study}/series/{series}/instances/{instance}/frames/{frames}", Level.INSTANCE))


def _endpoints(resource: str):
    """The study, series, instance and frames endpoints of ``resource`` ("rendered" or "thumbnail")."""
    async def call(request: Request, principal, service: RenderService, target: Target,
                   frames: str | None = None) -> Response:
        method = service.rendered if resource == "rendered" else service.thumbnail
        return answer(await method(principal.tenant, target, list(request.query_params.multi_items()),
                                   request.headers.get("accept"), frames))

    async def study_endpoint(study: str, request: Request, principal: Reader, service: Renderer) -> Response:
        return await call(request, principal, service, Target(Level.STUDY, study))

    async def series_endpoint(study: str, series: str, request: Request, principal: Reader,
                              service: Renderer) -> Response:
        return await call(request, principal, service, Target(Level.SERIES, study, series))

    async def instance_endpoint(study: str, series: str, instance: str, request: Request, principal: Reader,
                                service: Renderer) -> Response:
        return await call(request, principal, service, Target(Level.INSTANCE, study, series, instance))

    async def frames_endpoint(study: str, series: str, instance: str, frames: str, request: Request,
                              principal: Reader, service: Renderer) -> Response:
        return await call(request, principal, service, Target(Level.INSTANCE, study, series, instance), frames)

    return study_endpoint, series_endpoint, instance_endpoint, frames_endpoint


for _resource, _doc in (("rendered", RENDERED_DOC), ("thumbnail", THUMBNAIL_DOC)):
    for (_prefix, _level), _endpoint in zip(LEVEL_PATHS, _endpoints(_resource)):
        _what = "frames" if _prefix.endswith("{frames}") else _level.value
        router.add_api_route(f"{_prefix}/{_resource}", _endpoint, methods=["GET"], name=f"{_resource} ({_what})",
                             **_doc)
