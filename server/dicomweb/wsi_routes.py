"""Whole-slide imaging conveniences beside the standard frames (issue 6): parse, call the service, answer.

``GET /dicomweb/studies/{s}/series/{se}/tiles`` describes the pyramid (JSON); ``.../tiles/{level}/{col}/{row}``
answers one tile's stored bytes (level 0 = highest resolution; col, row from 0 at the top left);
``.../tiles/label|overview|thumbnail`` the slide's single-frame associated image as stored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from server.dicomweb.routes import RESOURCE
from server.dicomweb.wsi import IMMUTABLE, Tile, WsiService
from server.security.http import principal_of, require
from server.security.tokens import Access, Principal

router = APIRouter(prefix="/dicomweb", tags=["DICOMweb"])


async def wsi_service(request: Request) -> WsiService:
    """The app's WsiService, made on first use (one per app, so one pyramid cache per process).

    Dependencies here are ``async``: FastAPI runs plain ``def`` dependencies in the thread pool, a thread hop
    per dependency and tile.
    """
    state = request.app.state
    service = getattr(state, "wsi", None)
    if service is None:
        service = state.wsi = WsiService(state.archive, state.wado.frames)
    return service


async def _reader(request: Request) -> Principal:
    return require(principal_of(request), RESOURCE, Access.READ)


Wsi = Annotated[WsiService, Depends(wsi_service)]
Reader = Annotated[Principal, Depends(_reader)]
NOT_FOUND = {404: {"description": "unknown series, no whole-slide image, or outside the tile grid"}}


def _answer(tile: Tile) -> Response:
    headers = {"ETag": tile.etag, "Cache-Control": IMMUTABLE, "Vary": "Authorization"}
    if tile.content is None:
        return Response(status_code=304, headers=headers)
    return Response(tile.content, media_type=tile.media_type, headers=headers)


@router.get("/studies/{study}/series/{series}/tiles", responses=NOT_FOUND,
            description="The whole-slide pyramid of a series: levels (0 = highest resolution) with size, tile size, "
                        "tile grid, sparse or full tiling, media type; label, overview and thumbnail images.")
async def pyramid(study: str, series: str, principal: Reader, wsi: Wsi) -> JSONResponse:
    return JSONResponse(await wsi.pyramid(principal.tenant, study, series), headers={"Cache-Control": "private, no-cache"})


@router.get("/studies/{study}/series/{series}/tiles/{kind}", responses=NOT_FOUND,
            description="The slide's single-frame LABEL, OVERVIEW or THUMBNAIL image in its stored encoding.")
async def associated(study: str, series: str, kind: Literal["label", "overview", "thumbnail"], request: Request,
                     principal: Reader, wsi: Wsi) -> Response:
    return _answer(await wsi.associated(principal.tenant, study, series, kind, request.headers.get("if-none-match")))


@router.get("/studies/{study}/series/{series}/tiles/{level}/{col}/{row}", responses=NOT_FOUND,
            description="One tile of a pyramid level as stored (image/jpeg, image/jp2, ...; never decoded), "
                        "TILED_FULL or TILED_SPARSE; ETag, If-None-Match -> 304, immutable caching.")
async def tile(study: str, series: str, level: int, col: int, row: int, request: Request, principal: Reader,
               wsi: Wsi) -> Response:
    return _answer(await wsi.tile(principal.tenant, study, series, level, col, row,
                                  request.headers.get("if-none-match")))
