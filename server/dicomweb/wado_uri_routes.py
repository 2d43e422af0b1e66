"""WADO-URI (PS3.18 9; issue 6): ``GET /wado?requestType=WADO&studyUID=…&seriesUID=…&objectUID=…``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from server.dicomweb.render_routes import ERROR_RESPONSES, HEADERS, Renderer, answer
from server.dicomweb.rendered import Rendered
from server.dicomweb.routes import Reader
from server.dicomweb.wado_uri import WadoUriService, parse_wado_uri

router = APIRouter(tags=["DICOMweb"])

WADO_URI_DOC = {
    "description": "WADO-URI (PS3.18 9): requestType=WADO, studyUID, seriesUID, objectUID; contentType "
                   "application/dicom (transferSyntax, anonymize=yes), image/jpeg (default for images), image/png, "
                   "image/gif, application/pdf (default for Encapsulated PDF); rows, columns, region, windowCenter, "
                   "windowWidth, frameNumber, imageQuality. Bearer token as for DICOMweb.",
    "responses": ERROR_RESPONSES,
}


@router.get("/wado", **WADO_URI_DOC)
async def wado_uri(request: Request, principal: Reader, renderer: Renderer) -> Response:
    parsed = parse_wado_uri(list(request.query_params.multi_items()))
    result = await WadoUriService(renderer).retrieve(principal.tenant, parsed)
    if result.path is not None:
        return FileResponse(result.path, media_type=result.media_type, headers=HEADERS)
    return answer(Rendered(result.media_type, result.body))
