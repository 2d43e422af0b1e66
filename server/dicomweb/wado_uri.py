"""WADO-URI (PS3.18 9): parameter parsing and the service behind ``GET /wado?requestType=WADO&...``.

One object per request, named by ``studyUID``, ``seriesUID`` and ``objectUID`` (9.1.2.1). ``contentType``
(9.1.2.2.1, Accept syntax, a comma-separated list) chooses ``application/dicom`` (the stored bytes, or
re-encoded with ``transferSyntax`` 9.1.2.3.6, or de-identified with ``anonymize=yes`` 9.1.2.3.1), a rendered
``image/jpeg`` (the default for images), ``image/png`` or ``image/gif``, or ``application/pdf`` (the default
for an Encapsulated PDF). Rendering parameters (9.1.2.3.2 annotation - ignored, 9.1.2.3.3 rows/columns,
9.1.2.3.4 region, 9.1.2.3.5 windowCenter/windowWidth, frameNumber, imageQuality) go through the same
pipeline as the WADO-RS rendered resources (``server.dicom.render``).

Malformed parameters are INVALID (400), unknown objects NOT_FOUND (404), what we cannot produce
(presentation states, a non-image as an image, an object without a default we can make) NOT_ACCEPTABLE (406).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from server.dicom import render
from server.dicom.attributes import Level
from server.dicom.deidentify import Pseudonymizer
from server.dicom.parse import is_valid_uid
from server.dicom.render import GIF, JPEG, PNG, RenderParams, Viewport
from server.dicom.transcode import transcode_instance
from server.dicomweb.media import accepts, parse_accept
from server.dicomweb.rendered import PDF, Kind, RenderService, kind_of
from server.dicomweb.wado import Target
from server.errors import ErrorKind, ServerError

DICOM = "application/dicom"
ANONYMIZE_YES = "yes"
PARAMETERS = ("requestType", "studyUID", "seriesUID", "objectUID", "contentType", "charset", "anonymize",
              "annotation", "rows", "columns", "region", "windowCenter", "windowWidth", "frameNumber",
              "imageQuality", "presentationUID", "presentationSeriesUID", "transferSyntax")
RENDERING = ("rows", "columns", "region", "windowCenter", "windowWidth", "frameNumber", "imageQuality")
CANDIDATES = {Kind.IMAGE: (JPEG, PNG, GIF, DICOM), Kind.PDF: (PDF, DICOM), Kind.NONE: (DICOM,)}
DEFAULTS = {Kind.IMAGE: JPEG, Kind.PDF: PDF}


@dataclass(frozen=True)
class WadoUriRequest:
    """A parsed WADO-URI request (PS3.18 9.1.2)."""

    study: str
    series: str
    sop: str
    content_type: str | None
    params: RenderParams
    frame: int | None
    anonymize: bool
    transfer_syntax: str | None
    rendering: tuple[str, ...]  # the rendering parameters present, for the application/dicom check


@dataclass(frozen=True)
class WadoUriResult:
    """A WADO-URI response: bytes, or the stored file as it is."""

    media_type: str
    body: bytes | None = None
    path: Path | None = None


def _bad(parameter: str, message: str) -> ServerError:
    return ServerError(ErrorKind.INVALID, f"{parameter}: {message}", parameter=parameter)


def _uid(values: dict[str, str], name: str, required: bool = True) -> str | None:
    value = values.get(name)
    if value is None:
        if required:
            raise _bad(name, "required")
        return None
    if not is_valid_uid(value.strip()):
        raise _bad(name, f"{value[:70]!r} is not a UID")
    return value.strip()


def _fraction(text: str) -> float:
    value = render.parse_number(text, "region")
    if not 0.0 <= value <= 1.0:
        raise _bad("region", "values must lie between 0.0 and 1.0")
    return value


def _region(text: str) -> tuple[float, float, float, float]:
    """``region=xmin,ymin,xmax,ymax`` as fractions of the image (PS3.18 9.1.2.3.4) -> sx, sy, sw, sh."""
    parts = text.split(",")
    if len(parts) != 4:
        raise _bad("region", "must be xmin,ymin,xmax,ymax")
    x0, y0, x1, y1 = (_fraction(p) for p in parts)
    if x1 <= x0 or y1 <= y0:
        raise _bad("region", "xmax and ymax must exceed xmin and ymin")
    return x0, y0, x1 - x0, y1 - y0


def _window(values: dict[str, str]) -> render.Window | None:
    """windowCenter and windowWidth, both or neither (PS3.18 9.1.2.3.5; linear, PS3.3 C.11.2.1.2)."""
    center, width = values.get("windowCenter"), values.get("windowWidth")
    if center is None and width is None:
        return None
    if center is None or width is None:
        raise _bad("windowCenter" if center is None else "windowWidth", "windowCenter and windowWidth go together")
    return render.window_of(render.parse_number(center, "windowCenter"), render.parse_number(width, "windowWidth"),
                            parameter="windowWidth")


def _viewport(values: dict[str, str]) -> Viewport | None:
    """rows/columns bound the output keeping the aspect ratio; region crops (PS3.18 9.1.2.3.3, 9.1.2.3.4)."""
    rows = render.parse_integer(values["rows"], "rows", 1, render.MAX_VIEWPORT) if "rows" in values else None
    columns = render.parse_integer(values["columns"], "columns", 1, render.MAX_VIEWPORT) if "columns" in values else None
    region = _region(values["region"]) if "region" in values else None
    if rows is None and columns is None and region is None:
        return None
    return Viewport(columns, rows, region, fractional=True)


def parse_wado_uri(items: Sequence[tuple[str, str]]) -> WadoUriRequest:
    """Check and parse the query of a WADO-URI request (PS3.18 9.1.2, Table 9.1-1..)."""
    values: dict[str, str] = {}
    for name, value in items:
        if name in PARAMETERS:
            if name in values:
                raise _bad(name, "given more than once")
            values[name] = value
    if values.get("requestType") != "WADO":
        raise _bad("requestType", "must be WADO")
    for name in ("presentationUID", "presentationSeriesUID"):
        if name in values:
            raise ServerError(ErrorKind.NOT_ACCEPTABLE, f"{name}: presentation states are not applied")
    anonymize = values.get("anonymize")
    if anonymize is not None and anonymize != ANONYMIZE_YES:
        raise _bad("anonymize", "the only value is yes")
    frame = render.parse_integer(values["frameNumber"], "frameNumber", 1, 2**31 - 1) if "frameNumber" in values else None
    quality = render.parse_quality(values["imageQuality"], "imageQuality") if "imageQuality" in values else None
    content_type = values.get("contentType")
    if content_type is not None:
        parse_accept(content_type)  # malformed lists are INVALID here, not at negotiation
    return WadoUriRequest(
        study=_uid(values, "studyUID"), series=_uid(values, "seriesUID"), sop=_uid(values, "objectUID"),
        content_type=content_type, params=RenderParams(_window(values), _viewport(values), quality),
        frame=frame, anonymize=anonymize is not None, transfer_syntax=_uid(values, "transferSyntax", False),
        rendering=tuple(n for n in RENDERING if n in values))


def first_listed(content_type: str, candidates: Sequence[str]) -> str:
    """The first type of the ``contentType`` list we can produce (a range: our first match; PS3.18 9.1.2.2.1)."""
    for item in parse_accept(content_type):  # stable: equal weights keep the listed order
        for media in candidates:
            if item.q > 0 and accepts([item], media) is not None:
                return media
    raise ServerError(ErrorKind.NOT_ACCEPTABLE, f"this object can be returned as {', '.join(candidates)}",
                      parameter="contentType")


def choose_media(request: WadoUriRequest, kind: Kind) -> str:
    """The response media type: the first acceptable of ``contentType``, else the object's default."""
    if request.content_type is None:
        media = DEFAULTS.get(kind)
        if media is None:
            raise ServerError(ErrorKind.NOT_ACCEPTABLE, "this object has no rendered default; ask for "
                              "contentType=application/dicom")
    else:
        media = first_listed(request.content_type, CANDIDATES[kind])
    if media == DICOM and request.rendering:
        raise _bad(request.rendering[0], "not allowed with contentType=application/dicom")
    if media != DICOM and (request.anonymize or request.transfer_syntax):
        name = "anonymize" if request.anonymize else "transferSyntax"
        raise _bad(name, "allowed with contentType=application/dicom only")
    return media


class WadoUriService:
    """Serves WADO-URI requests from the archive, rendering through the RenderService."""

    def __init__(self, renderer: RenderService) -> None:
        self.renderer = renderer

    async def retrieve(self, tenant: str, request: WadoUriRequest) -> WadoUriResult:
        """The object in the chosen representation (PS3.18 9.1, 9.2)."""
        target = Target(Level.INSTANCE, request.study, request.series, request.sop)
        [row] = await anyio.to_thread.run_sync(self.renderer.rows, tenant, target)
        media = choose_media(request, kind_of(row))
        if media == DICOM:
            return await self._dicom(row, request)
        indices = None
        if request.frame is not None:
            if request.frame > (row.number_of_frames or 1):
                raise ServerError(ErrorKind.NOT_FOUND, f"frame {request.frame} does not exist")
            indices = [request.frame - 1]
        body = await anyio.to_thread.run_sync(self.renderer.render_row, tenant, row, media, request.params, indices)
        return WadoUriResult(media, body)

    async def _dicom(self, row, request: WadoUriRequest) -> WadoUriResult:
        path = self.renderer.blobs.path_of(row.blob)
        wanted = request.transfer_syntax
        if not request.anonymize and (wanted is None or wanted == row.transfer_syntax_uid):
            return WadoUriResult(DICOM, path=path)
        return WadoUriResult(DICOM, await anyio.to_thread.run_sync(_transform, path, row.transfer_syntax_uid,
                                                                   wanted, request.anonymize))


def _transform(path: Path, stored_ts: str, wanted_ts: str | None, anonymize: bool) -> bytes:
    """The stored instance re-encoded in ``wanted_ts`` and/or de-identified (PS3.15 E.1, random secret)."""
    data = path.read_bytes()
    if wanted_ts is not None and wanted_ts != stored_ts:
        data = transcode_instance(data, wanted_ts)
    if anonymize:
        data = Pseudonymizer(secrets.token_bytes(32)).deidentify(data).data
    return data


__all__ = ["WadoUriRequest", "WadoUriResult", "WadoUriService", "choose_media", "first_listed", "parse_wado_uri"]
