"""Whole-slide tiles for web viewers: a tile of a pyramid level as its stored bytes (issue 6).

The pyramid of a series (``server.dicom.wsi.describe``) is built once from the instances' precomputed DICOM
JSON and kept in an LRU keyed by tenant, study and series; it is checked against the series' revision (one
indexed read) at most once a second, and at once when a tile is not in the cached pyramid (a level stored
since), so a tile costs no SQL. An instance replaced under the ``replace`` duplicate policy may be served
from its old blob for up to that second. A tile is the stored frame (PS3.5 A.4 fragments, never decoded) cut by the
frames service's frame index, answered with the image media type of its transfer syntax (PS3.18 Table
8.7.3-5), a strong ETag from the blob's content address and the frame number, and immutable caching.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import anyio

from server.dicom.attributes import Level
from server.dicom.wsi import Pyramid, TiledImage, describe
from server.dicomweb.frames import FAST_BYTES, FrameIndexCache, FrameService, media_of
from server.errors import ErrorKind, ServerError
from server.store.archive import Archive

CACHE_SIZE = 256
RECHECK_SECONDS = 1.0  # how long a cached pyramid is used before the series' revision is read again
IMMUTABLE = "private, max-age=31536000, immutable"


@dataclass(frozen=True)
class InstanceRef:
    """What the frames service needs of an instance row to cut its frames."""

    study_uid: str
    series_uid: str
    sop_uid: str
    transfer_syntax_uid: str
    blob: str
    bulk: str


@dataclass(frozen=True)
class SlideEntry:
    """A series' pyramid and its instances, valid for one revision of the series."""

    revision: str
    pyramid: Pyramid
    instances: dict[str, InstanceRef]


@dataclass(frozen=True)
class Tile:
    """A tile answer: bytes (None when the client's ETag matches: 304), media type and ETag."""

    content: bytes | None
    media_type: str
    etag: str


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 13.1.2: ``*`` or any listed (weak-compared) entity tag."""
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


class WsiService:
    """Pyramids and tiles of whole-slide series, for one tenant at a time."""

    def __init__(self, archive: Archive, frames: FrameService, cache_size: int = CACHE_SIZE,
                 recheck_seconds: float = RECHECK_SECONDS) -> None:
        self.archive = archive
        self.frames = frames
        self.cache = FrameIndexCache(cache_size)  # (tenant, study, series) -> (SlideEntry, checked at)
        self.recheck_seconds = recheck_seconds

    async def tile(self, tenant: str, study: str, series: str, level: int, col: int, row: int,
                   if_none_match: str | None) -> Tile:
        """The stored bytes of tile (col, row) of a level (0 = highest resolution); NOT_FOUND outside the grid.

        When the pyramid and the level's frame map are in memory and fresh, the work is one ``pread`` of
        page-cached bytes and runs on the event loop (as the frames service does); otherwise in a worker thread.
        """
        fast = self._cached_tile(tenant, study, series, level, col, row, if_none_match)
        if fast is not None:
            return fast
        return await anyio.to_thread.run_sync(self._tile, tenant, study, series, level, col, row, if_none_match)

    def _cached_tile(self, tenant: str, study: str, series: str, level: int, col: int, row: int,
                     if_none_match: str | None) -> Tile | None:
        """The tile when everything it needs is cached and fresh and it is small, else None."""
        cached = self.cache.get((tenant, study, series))
        if cached is None or time.monotonic() - cached[1] >= self.recheck_seconds:
            return None
        entry = cached[0]
        try:
            image, number = entry.pyramid.tile(level, col, row)
        except ServerError:
            return None  # the worker-thread path checks the series again before answering 404
        ref = entry.instances[image.sop_uid]
        index = self.frames.cache.get(ref.blob)
        if index is None or not 1 <= number <= len(index.spans) or \
                sum(length for _, length in index.spans[number - 1].pieces) > FAST_BYTES:
            return None
        return self._frame(tenant, entry, image, number, if_none_match)

    async def associated(self, tenant: str, study: str, series: str, kind: str, if_none_match: str | None) -> Tile:
        """The single-frame LABEL, OVERVIEW or THUMBNAIL image of the slide as stored (PS3.3 C.8.12.4.1.1)."""
        return await anyio.to_thread.run_sync(self._associated, tenant, study, series, kind, if_none_match)

    async def pyramid(self, tenant: str, study: str, series: str) -> dict[str, Any]:
        """A JSON description of the pyramid: levels with sizes, tile grids and media types; associated images."""
        entry = await anyio.to_thread.run_sync(self._entry, tenant, study, series, True)
        p = entry.pyramid
        return {"studyInstanceUID": study, "seriesInstanceUID": series,
                "levels": [dict(level=i, **_image_json(image)) for i, image in enumerate(p.levels)],
                "labels": [_image_json(i) for i in p.labels], "overviews": [_image_json(i) for i in p.overviews],
                "thumbnails": [_image_json(i) for i in p.thumbnails]}

    def _tile(self, tenant: str, study: str, series: str, level: int, col: int, row: int,
              if_none_match: str | None) -> Tile:
        entry = self._entry(tenant, study, series)
        try:
            image, number = entry.pyramid.tile(level, col, row)
        except ServerError:  # not in the cached pyramid: look again in case the series changed since
            entry = self._entry(tenant, study, series, True)
            image, number = entry.pyramid.tile(level, col, row)
        return self._frame(tenant, entry, image, number, if_none_match)

    def _associated(self, tenant: str, study: str, series: str, kind: str, if_none_match: str | None) -> Tile:
        entry = self._entry(tenant, study, series, True)
        images = {"label": entry.pyramid.labels, "overview": entry.pyramid.overviews,
                  "thumbnail": entry.pyramid.thumbnails}[kind]
        single = [i for i in images if i.number_of_frames == 1]
        if not single:
            raise ServerError(ErrorKind.NOT_FOUND, f"the slide has no single-frame {kind} image")
        return self._frame(tenant, entry, single[0], 1, if_none_match)

    def _frame(self, tenant: str, entry: SlideEntry, image: TiledImage, number: int,
               if_none_match: str | None) -> Tile:
        """Frame ``number`` of the image in its stored syntax, cut by the frames service (no decoding)."""
        ref = entry.instances[image.sop_uid]
        etag = f'"{ref.blob[:40]}.{number}"'
        media_type = media_of(ref.transfer_syntax_uid)
        if _etag_matches(if_none_match, etag):
            return Tile(None, media_type, etag)
        index = self.frames.frame_index(tenant, ref)
        if not 1 <= number <= len(index.spans):
            raise ServerError(ErrorKind.NOT_FOUND, f"frame {number} of the tile is not in the stored pixel data")
        [content] = self.frames.read_frames(ref.blob, index, [number], index.transfer_syntax)
        return Tile(content, media_type, etag)

    def _entry(self, tenant: str, study: str, series: str, recheck: bool = False) -> SlideEntry:
        """The series' pyramid from the LRU; NOT_FOUND if the series is absent.

        A cached pyramid is checked against the series' revision (one indexed read) when it is older than
        ``recheck_seconds`` or when asked, and rebuilt when the series changed.
        """
        key = (tenant, study, series)
        now = time.monotonic()
        cached = self.cache.get(key)
        if cached is not None and not recheck and now - cached[1] < self.recheck_seconds:
            return cached[0]
        revision = self.archive.revision(tenant, Level.SERIES, study, series)
        if revision is None:
            raise ServerError(ErrorKind.NOT_FOUND, "series not found")
        entry = cached[0] if cached is not None and cached[0].revision == revision else \
            self._build(tenant, study, series, revision)
        self.cache.put(key, (entry, now))
        return entry

    def _build(self, tenant: str, study: str, series: str, revision: str) -> SlideEntry:
        rows = self.archive.instances(tenant, study, series, with_meta=True)
        pyramid = describe((r.sop_uid, r.transfer_syntax_uid, json.loads(r.meta)) for r in rows)
        used = {i.sop_uid for i in (*pyramid.levels, *pyramid.labels, *pyramid.overviews, *pyramid.thumbnails)}
        refs = {r.sop_uid: InstanceRef(r.study_uid, r.series_uid, r.sop_uid, r.transfer_syntax_uid, r.blob, r.bulk)
                for r in rows if r.sop_uid in used}
        return SlideEntry(revision, pyramid, refs)


def _image_json(image: TiledImage) -> dict[str, Any]:
    return {"sopInstanceUID": image.sop_uid, "width": image.total_columns, "height": image.total_rows,
            "tileWidth": image.tile_columns, "tileHeight": image.tile_rows, "columns": image.tiles_across,
            "rows": image.tiles_down, "sparse": not image.full, "frames": image.number_of_frames,
            "transferSyntaxUID": image.transfer_syntax_uid, "mediaType": media_of(image.transfer_syntax_uid),
            "pixelSpacingMm": list(image.pixel_spacing) if image.pixel_spacing else None}


__all__ = ["IMMUTABLE", "Tile", "WsiService"]
