"""Rendered and thumbnail resources: the service (PS3.18 10.4.1.1.3, 10.4.1.1.4, 8.3.5.1, 8.7.4).

A rendered instance is one consumer image (``image/jpeg`` by default, ``image/png``, ``image/gif``; an
animated GIF of all frames for a multi-frame instance asked for ``image/gif``) or, for an Encapsulated
PDF instance, the PDF itself (``application/pdf``). Rendered frames: one frame is one image; several
frames are a ``multipart/related`` of one image per frame, or one animated GIF. A rendered study or
series is a ``multipart/related; type="<media type>"`` with one part per instance that can be rendered
in the negotiated media type (PS3.18 10.4.1.1.3: "the rendered Instances of the Study/Series").

A thumbnail is one small image of a representative frame: the first series of a study that has an
image, its middle instance, that instance's middle frame (or the requested frame); ``viewport`` bounds it,
128x128 by default. Thumbnails are kept in an in-process LRU keyed by tenant, blob, frame and
parameters, so one tenant never gets another tenant's bytes.

Only the needed frame is read: native Pixel Data by its offset in the blob (recorded at ingest),
encapsulated Pixel Data fragment by fragment; the CPU work runs in worker threads.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import orjson

from server.dicom import render, transcode
from server.dicom.attributes import Level
from server.dicom.encapsulate import ENCAPSULATED_PDF_STORAGE, extract_pdf
from server.dicom.pixels import parse_frame_list
from server.dicom.render import GIF, JPEG, PNG, RenderParams, Viewport
from server.dicomweb.frames import FrameIndex, FrameService
from server.dicomweb.media import AcceptItem, accepts, parse_accept, parse_media_type
from server.dicomweb.multipart import amultipart_chunks, new_boundary
from server.dicomweb.wado import Target
from server.errors import ErrorKind, ServerError
from server.store.archive import Archive
from server.store.blobs import BlobStore

log = logging.getLogger(__name__)

PDF = "application/pdf"
PIXEL_DATA = "7FE00010"
IMAGE_MEDIA = (JPEG, PNG, GIF)
THUMBNAIL_VIEWPORT = Viewport(128, 128)
THUMBNAIL_QUALITY = 75
QUERY_PARAMETERS = ("window", "viewport", "quality", "accept", "annotation", "iccprofile", "charset")
CACHE_ENTRIES = 512
MAX_GIF_PIXELS = 100_000_000  # all frames of one animated GIF together (memory bound)
CACHE_BYTES = 64 << 20


class Kind(enum.Enum):
    """What an instance can be rendered as (PS3.18 Table 8.7.4-1 resource categories)."""

    IMAGE = "image"
    PDF = "pdf"
    NONE = "none"


def kind_of(row) -> Kind:
    """IMAGE when the instance has Pixel Data, PDF for an Encapsulated PDF, else NONE."""
    if row.sop_class_uid == ENCAPSULATED_PDF_STORAGE:
        return Kind.PDF
    return Kind.IMAGE if f'"{PIXEL_DATA}"' in row.bulk else Kind.NONE


def candidates_of(kind: Kind) -> tuple[str, ...]:
    """The media types an instance of ``kind`` renders to, the default first (PS3.18 Table 8.7.4-1)."""
    return {Kind.IMAGE: IMAGE_MEDIA, Kind.PDF: (PDF,), Kind.NONE: ()}[kind]


@dataclass(frozen=True)
class Rendered:
    """A rendered response: one body, or the chunks of a multipart body."""

    media_type: str
    body: bytes | None = None
    chunks: AsyncIterator[bytes] | None = None


@dataclass(frozen=True)
class Request:
    """The parsed query of a rendered or thumbnail request (PS3.18 8.3.3.1, 8.3.5.1)."""

    params: RenderParams
    accept: str | None


def parse_query(items: Sequence[tuple[str, str]], *, thumbnail: bool = False) -> Request:
    """The rendering parameters; a parameter given twice or a malformed value is INVALID (400).

    Parameters we do not implement (``annotation``, ``iccprofile``, ``charset``) and unknown ones are
    ignored, as PS3.18 8.3 asks of an origin server.
    """
    seen: dict[str, str] = {}
    for name, value in items:
        if name in QUERY_PARAMETERS:
            if name in seen:
                raise ServerError(ErrorKind.INVALID, f"{name} given more than once", parameter=name)
            seen[name] = value
    window = render.parse_window(seen["window"]) if "window" in seen else None
    viewport = render.parse_viewport(seen["viewport"]) if "viewport" in seen else None
    quality = render.parse_quality(seen["quality"]) if "quality" in seen else None
    if thumbnail:
        viewport = viewport or THUMBNAIL_VIEWPORT
        quality = quality or THUMBNAIL_QUALITY
    return Request(RenderParams(window, viewport, quality), seen.get("accept"))


def _items(accept_header: str | None, accept_param: str | None, multipart: bool) -> list[AcceptItem]:
    """Accept items; the ``accept`` query parameter wins over the header (PS3.18 8.3.3.1). For a multipart
    resource ``multipart/related; type="X"`` stands for X."""
    items = parse_accept(accept_param if accept_param else accept_header)
    if not multipart:
        return items
    out = []
    for item in items:
        inner = item.media.param("type") if item.media.essence == "multipart/related" else None
        out.append(AcceptItem(parse_media_type(inner), item.q) if inner else item)
    return out


def negotiate(items: list[AcceptItem], candidates: Sequence[str]) -> str:
    """The acceptable candidate with the highest q, earlier candidates first on ties; else NOT_ACCEPTABLE."""
    best: tuple[float, str] | None = None
    for media in candidates:
        item = accepts(items, media)
        if item is not None and (best is None or item.q > best[0]):
            best = (item.q, media)
    if best is None:
        offered = ", ".join(candidates) or "nothing (the resource has no renderable instance)"
        raise ServerError(ErrorKind.NOT_ACCEPTABLE, f"this resource can be rendered as {offered}")
    return best[1]


class ThumbnailCache:
    """A thread-safe LRU of encoded thumbnails, bounded by entries and bytes; keys start with the tenant."""

    def __init__(self, entries: int = CACHE_ENTRIES, max_bytes: int = CACHE_BYTES) -> None:
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._entries, self._max_bytes, self._bytes = entries, max_bytes, 0
        self.hits = 0

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
                self.hits += 1
            return value

    def put(self, key: tuple, value: bytes) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            self._bytes += len(value) - (len(old) if old else 0)
            self._items[key] = value
            while self._items and (len(self._items) > self._entries or self._bytes > self._max_bytes):
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)


class RenderService:
    """Renders stored instances for one tenant at a time (PS3.18 10.4.1.1.3/4, 9 via wado_uri.py)."""

    def __init__(self, blobs: BlobStore, archive: Archive, frames: FrameService | None = None,
                 cache: ThumbnailCache | None = None) -> None:
        self.blobs = blobs
        self.archive = archive
        self.frames = frames or FrameService(blobs, archive)
        self.cache = cache or ThumbnailCache()

    # ---- rendered (PS3.18 10.4.1.1.3) ----------------------------------------------------------
    async def rendered(self, tenant: str, target: Target, query: Sequence[tuple[str, str]], accept: str | None,
                       frames: str | None = None) -> Rendered:
        """A rendered study, series, instance or frame list."""
        request = parse_query(query)
        rows = await anyio.to_thread.run_sync(self.rows, tenant, target)
        if target.level is not Level.INSTANCE:
            return await self._multipart(tenant, rows, request, accept)
        row = rows[0]
        kind = kind_of(row)
        numbers = parse_frame_list(frames, row.number_of_frames or 1) if frames is not None else None
        if numbers is not None and kind is not Kind.IMAGE:
            raise ServerError(ErrorKind.NOT_ACCEPTABLE, "frames can be rendered from images only")
        media = negotiate(_items(accept, request.accept, False), candidates_of(kind))
        if numbers is not None and len(numbers) > 1 and media != GIF:
            return await self._frame_parts(tenant, row, numbers, media, request.params)
        indices = [n - 1 for n in numbers] if numbers else None
        body = await anyio.to_thread.run_sync(self.render_row, tenant, row, media, request.params, indices)
        return Rendered(media, body)

    async def _multipart(self, tenant: str, rows: list, request: Request, accept: str | None) -> Rendered:
        """One part per renderable instance of a study or series, in the negotiated media type."""
        kinds = {kind_of(r) for r in rows}
        offered = [m for k in (Kind.IMAGE, Kind.PDF) if k in kinds for m in candidates_of(k)]
        media = negotiate(_items(accept, request.accept, True), offered)
        chosen = [r for r in rows if media in candidates_of(kind_of(r))]
        first = await anyio.to_thread.run_sync(self.render_row, tenant, chosen[0], media, request.params, None)

        async def parts():
            yield {"Content-Type": media}, [first]
            for row in chosen[1:]:
                try:
                    body = await anyio.to_thread.run_sync(self.render_row, tenant, row, media, request.params, None)
                except ServerError as exc:  # the status is sent: leave the instance out rather than break the body
                    if exc.kind not in (ErrorKind.NOT_ACCEPTABLE, ErrorKind.INTERNAL):
                        raise
                    log.warning("instance %s left out of a rendered %s: %s", row.sop_uid, media, exc.message)
                    continue
                yield {"Content-Type": media}, [body]

        return _multipart_of(media, parts())

    async def _frame_parts(self, tenant: str, row, numbers: list[int], media: str,
                           params: RenderParams) -> Rendered:
        """Several rendered frames as a multipart/related of one image per frame."""
        async def parts():
            for n in numbers:
                body = await anyio.to_thread.run_sync(self.render_row, tenant, row, media, params, [n - 1])
                yield {"Content-Type": media}, [body]

        return _multipart_of(media, parts())

    # ---- thumbnail (PS3.18 10.4.1.1.4) ---------------------------------------------------------
    async def thumbnail(self, tenant: str, target: Target, query: Sequence[tuple[str, str]], accept: str | None,
                        frames: str | None = None) -> Rendered:
        """One small image of a representative frame of a study, series, instance or frame."""
        request = parse_query(query, thumbnail=True)
        rows = await anyio.to_thread.run_sync(self.rows, tenant, target)
        row = representative(rows)
        if row is None:
            raise ServerError(ErrorKind.NOT_ACCEPTABLE, f"the {target.level.value} has no image for a thumbnail")
        count = row.number_of_frames or 1
        index = parse_frame_list(frames, count)[0] - 1 if frames is not None else count // 2
        media = negotiate(_items(accept, request.accept, False), IMAGE_MEDIA)
        key = (tenant, row.blob, index, media, request.params)
        body = self.cache.get(key)
        if body is None:
            body = await anyio.to_thread.run_sync(self.render_row, tenant, row, media, request.params, [index])
            self.cache.put(key, body)
        return Rendered(media, body)

    # ---- the work of one instance (worker thread) -------------------------------------------------
    def render_row(self, tenant: str, row, media: str, params: RenderParams, indices: list[int] | None) -> bytes:
        """One instance rendered in ``media``: frames ``indices`` (default: the first, all for a GIF)."""
        full = self.archive.instances(tenant, row.study_uid, row.series_uid, row.sop_uid, with_meta=True)
        if not full:
            raise ServerError(ErrorKind.NOT_FOUND, "instance not found")
        row = full[0]
        path = self.blobs.path_of(row.blob)
        if media == PDF:
            return extract_pdf(path.read_bytes())
        meta = orjson.loads(row.meta)
        index = self.frames.frame_index(tenant, row)
        if indices is None:
            indices = list(range(len(index.spans))) if media == GIF else [0]
        check_gif_size(index, indices)
        raw = self.frames.read_frames(row.blob, index, [i + 1 for i in indices], index.transfer_syntax)
        return render_frames(raw, index, meta, _bulk_reader(path, json.loads(row.bulk)), media, params)

    def rows(self, tenant: str, target: Target) -> list:
        """The instance rows of a study, series or instance (no metadata); NOT_FOUND when there are none."""
        rows = self.archive.instances(tenant, target.study_uid, target.series_uid, target.sop_uid)
        if not rows:
            raise ServerError(ErrorKind.NOT_FOUND, f"{target.level.value} not found")
        return rows


def check_gif_size(index: FrameIndex, indices: list[int]) -> None:
    """NOT_ACCEPTABLE when the frames of one rendering exceed MAX_GIF_PIXELS together (memory bound)."""
    if len(indices) * index.desc.rows * index.desc.columns > MAX_GIF_PIXELS:
        raise ServerError(ErrorKind.NOT_ACCEPTABLE, f"{len(indices)} frames are too many for one animated GIF; "
                          "ask for fewer frames (frames/{list}/rendered)")


def render_frames(raw: Sequence[bytes], index: FrameIndex, meta: dict[str, Any], read_bulk: Callable[[str], bytes],
                  media: str, params: RenderParams) -> bytes:
    """Decode stored frames of one instance and render them (PS3.18 8.3.5.1)."""
    frames = [transcode.decode_frame(data, index.transfer_syntax, index.desc) for data in raw]
    presentation = render.presentation_of(meta, read_bulk)
    presentation = dataclasses.replace(presentation, photometric=frames[0].desc.photometric_interpretation)
    return render.render([f.pixels for f in frames], presentation, media, params, render.frame_time_ms(meta))


def _bulk_reader(path: Path, bulk: dict[str, Any]) -> Callable[[str], bytes]:
    """Reads a bulk value (e.g. LUT Data) of the blob by the offsets recorded at ingest."""
    def read(tag_path: str) -> bytes:
        location = bulk.get(tag_path)
        if location is None:
            raise ServerError(ErrorKind.INTERNAL, f"bulk data {tag_path} not indexed")
        offset, length = location
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise ServerError(ErrorKind.INTERNAL, "blob shorter than indexed")
        return data
    return read


def representative(rows: Sequence) -> Any | None:
    """The middle image instance of the first series (in stable order) that has images."""
    by_series: dict[str, list] = {}
    for r in rows:
        if kind_of(r) is Kind.IMAGE:
            by_series.setdefault(r.series_uid, []).append(r)
    if not by_series:
        return None
    images = next(iter(by_series.values()))
    return images[(len(images) - 1) // 2]


def _multipart_of(media: str, parts) -> Rendered:
    boundary = new_boundary()
    return Rendered(f'multipart/related; type="{media}"; boundary={boundary}',
                    chunks=amultipart_chunks(boundary, parts))


__all__ = ["Kind", "RenderService", "Rendered", "Request", "ThumbnailCache", "candidates_of", "check_gif_size", "render_frames",
           "kind_of", "negotiate", "parse_query", "representative"]

