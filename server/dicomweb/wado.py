"""WADO-RS: retrieve instances, metadata and bulk data (PS3.18 10.4).

Instances are streamed from their blobs in the stored transfer syntax. Metadata is assembled from the
DICOM JSON precomputed at ingest (no DICOM parsing at retrieve time), with an ETag per revision.
Instances in another transfer syntax are transcoded on request (``server.dicom.transcode``); frames live
in ``frames.py``; bulk data honours a single HTTP Range.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio

from server.dicom.attributes import Level
from server.dicom import transcode as tc
from server.dicom.pixels import describe
from server.dicomweb.frames import (Body, FrameService, RangeNotSatisfiable, multipart_body, not_satisfiable,
                                    parse_range)
from server.dicomweb.media import AcceptItem, accepts, parse_accept
from server.dicomweb.multipart import amultipart_chunks, new_boundary
from server.errors import ErrorKind, ServerError
from server.store.archive import Archive
from server.store.blobs import BlobStore

READ_CHUNK = 1 << 20
SMALL_BLOB = 4 << 20  # read in one call up to this size
DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET = "application/octet-stream"
ANY_TRANSFER_SYNTAX = "*"
PIXEL_DATA = "7FE00010"
MAX_TRANSCODE_BYTES = 512 << 20  # an instance is transcoded in memory: larger ones only as stored
# How the precomputed metadata text starts every BulkDataURI: the JSON-escaped base placeholder (\x01)
PLACEHOLDER_URI = '"BulkDataURI":"\\u0001'



@dataclass(frozen=True)
class Target:
    """The resource a WADO-RS request names (PS3.18 10.4.1)."""

    level: Level
    study_uid: str
    series_uid: str | None = None
    sop_uid: str | None = None


@dataclass(frozen=True)
class Streamed:
    """A streamed response: media type and body chunks."""

    media_type: str
    chunks: AsyncIterator[bytes]


@dataclass(frozen=True)
class MetadataResponse:
    """A metadata response; ``body`` is None when the client's ETag still matches (304)."""

    etag: str
    body: bytes | None
    gzipped: bool


def negotiate_dicom(accept: str | None) -> str | None:
    """The transfer syntax the client asks for, or None for "as stored" (PS3.18 8.7.3, 10.4.1.2).

    Accepts ``multipart/related; type="application/dicom"`` (or ``type="*/*"``, ``*/*``) with an optional
    ``transfer-syntax`` parameter; anything else is NOT_ACCEPTABLE (406).
    """
    items = parse_accept(accept)
    item = (accepts(items, "multipart/related", type_param=DICOM)
            or accepts(items, "multipart/related", type_param="*/*"))
    if item is None:
        raise ServerError(ErrorKind.NOT_ACCEPTABLE,
                          "only multipart/related; type=\"application/dicom\" can be served for this resource")
    ts = item.media.param("transfer-syntax")
    return None if ts in (None, ANY_TRANSFER_SYNTAX) else ts


class WadoService:
    """Reads instances, metadata and bulk data for one tenant at a time."""

    def __init__(self, blobs: BlobStore, archive: Archive) -> None:
        self.blobs = blobs
        self.archive = archive
        self.frames = FrameService(blobs, archive)

    async def retrieve(self, tenant: str, target: Target, accept: str | None) -> Streamed:
        """Instances of a study, series or one instance as multipart/related (PS3.18 10.4.1.1.1).

        Without a ``transfer-syntax`` (or with ``*``) each instance streams byte-exact as stored; with one,
        instances stored otherwise are transcoded (PS3.18 8.7.3.5), after checking that every one of them
        can be: else NOT_ACCEPTABLE (406) before anything is sent.
        """
        wanted_ts = negotiate_dicom(accept)
        rows = await anyio.to_thread.run_sync(self._rows, tenant, target, wanted_ts is not None)
        if wanted_ts is not None:
            await anyio.to_thread.run_sync(_check_transcodable, rows, wanted_ts)
        boundary = new_boundary()
        first = None
        if wanted_ts is not None and rows[0].transfer_syntax_uid != wanted_ts:  # fail before the 200 is sent
            first = await anyio.to_thread.run_sync(_transcoded, self.blobs.path_of(rows[0].blob), rows[0].size,
                                                   wanted_ts)
        parts = _dicom_parts(self.blobs, rows, wanted_ts, first)
        media_type = f'multipart/related; type="{DICOM}"; boundary={boundary}'
        return Streamed(media_type, amultipart_chunks(boundary, parts))

    async def metadata(self, tenant: str, target: Target, base_url: str, *, accept: str | None,
                       if_none_match: str | None, accept_encoding: str | None) -> MetadataResponse:
        """DICOM JSON metadata of a study, series or instance (PS3.18 10.4.1.1.2), ETag and gzip."""
        items = parse_accept(accept)
        if accepts(items, DICOM_JSON) is None and accepts(items, "application/json") is None:
            raise ServerError(ErrorKind.NOT_ACCEPTABLE, "metadata is available as application/dicom+json only")
        gz = _wants_gzip(accept_encoding)
        return await anyio.to_thread.run_sync(self._metadata, tenant, target, base_url, if_none_match, gz)

    def _metadata(self, tenant: str, target: Target, base_url: str, if_none_match: str | None,
                  gz: bool) -> MetadataResponse:
        """Revision check, then the precomputed JSON joined (one worker-thread call)."""
        revision = self.archive.revision(tenant, target.level, target.study_uid, target.series_uid, target.sop_uid)
        if revision is None:
            raise ServerError(ErrorKind.NOT_FOUND, f"{target.level.value} not found")
        etag = '"' + hashlib.sha1(f"{revision}|{base_url}|{gz}".encode()).hexdigest() + '"'
        if if_none_match and (if_none_match.strip() == "*" or etag in [t.strip() for t in if_none_match.split(",")]):
            return MetadataResponse(etag, None, gz)
        rows = self._rows(tenant, target, True)
        return MetadataResponse(etag, _assemble(rows, base_url, gz), gz)

    async def bulk(self, tenant: str, target: Target, tag_path: str, accept: str | None,
                   range_header: str | None = None) -> Body:
        """One bulk data value referenced by a BulkDataURI (PS3.18 10.4.1.1.5), honouring a single Range.

        ``multipart/related; type="application/octet-stream"`` (the Range cuts the part: 206 and the part's
        Content-Range) or a single ``application/octet-stream`` body (206 with Content-Range, RFC 9110 14.4);
        a Range outside the value: 416. Bulk data is served as stored (no transcoding).
        """
        multipart = _bulk_multipart(accept)
        rows = await anyio.to_thread.run_sync(self._rows, tenant, target, False)
        row = rows[0]
        location = json.loads(row.bulk).get(tag_path)
        if location is None:
            raise ServerError(ErrorKind.NOT_FOUND, f"no bulk data at {tag_path}")
        offset, length = location
        path = self.blobs.path_of(row.blob)
        span = _bulk_span(range_header, length)
        if span is None:
            return not_satisfiable(length)
        if span == (0, length - 1) or length == 0:
            if not multipart:  # whole value, single part: stream it
                return Body(200, OCTET, {"Accept-Ranges": "bytes", "Content-Length": str(length)},
                            _read_range(path, offset, length))
            boundary = new_boundary()

            async def parts():
                yield {"Content-Type": OCTET}, _read_range(path, offset, length)

            return Body(200, f'multipart/related; type="{OCTET}"; boundary={boundary}', {"Accept-Ranges": "bytes"},
                        amultipart_chunks(boundary, parts()))
        start, end = span
        data = await anyio.to_thread.run_sync(_read_small, path, offset + start, end - start + 1)
        content_range = f"bytes {start}-{end}/{length}"
        if not multipart:
            return Body(206, OCTET, {"Content-Range": content_range, "Accept-Ranges": "bytes"}, content=data)
        return multipart_body(206, OCTET, [({"Content-Type": OCTET, "Content-Range": content_range}, data)])

    async def exists(self, tenant: str, target: Target) -> None:
        """NOT_FOUND unless the tenant has the study, series or instance."""
        revision = await anyio.to_thread.run_sync(
            lambda: self.archive.revision(tenant, target.level, target.study_uid, target.series_uid, target.sop_uid))
        if revision is None:
            raise ServerError(ErrorKind.NOT_FOUND, f"{target.level.value} not found")

    def _rows(self, tenant: str, target: Target, with_meta: bool):
        rows = self.archive.instances(tenant, target.study_uid, target.series_uid, target.sop_uid, with_meta=with_meta)
        if not rows:
            raise ServerError(ErrorKind.NOT_FOUND, f"{target.level.value} not found")
        return rows


def _wants_gzip(accept_encoding: str | None) -> bool:
    if not accept_encoding:
        return False
    for item in accept_encoding.split(","):
        name, _, params = item.strip().partition(";")
        if name.strip().lower() == "gzip":
            return params.replace(" ", "") not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False


def _assemble(rows, base_url: str, gz: bool) -> bytes:
    """A JSON array of the precomputed instance objects, the BulkDataURI base filled in."""
    text = "[" + ",".join(r.meta for r in rows) + "]"
    data = text.replace(PLACEHOLDER_URI, '"BulkDataURI":"' + json.dumps(base_url)[1:-1]).encode("utf-8")
    return gzip.compress(data, compresslevel=1) if gz else data


async def _dicom_parts(blobs: BlobStore, rows, wanted_ts: str | None = None, first: bytes | None = None):
    """The parts of a retrieve: stored bytes streamed, or each instance transcoded (``first`` done already)."""
    for i, r in enumerate(rows):
        path = blobs.path_of(r.blob)
        if wanted_ts is None or r.transfer_syntax_uid == wanted_ts:
            headers = {"Content-Type": f"{DICOM}; transfer-syntax={r.transfer_syntax_uid}",
                       "Content-Length": str(r.size)}
            yield headers, _read_range(path, 0, r.size)
            continue
        data = first if i == 0 and first is not None else \
            await anyio.to_thread.run_sync(_transcoded, path, r.size, wanted_ts)
        yield {"Content-Type": f"{DICOM}; transfer-syntax={wanted_ts}", "Content-Length": str(len(data))}, [data]


def _transcoded(path: Path, size: int, wanted_ts: str) -> bytes:
    """A stored instance re-encoded in ``wanted_ts`` (PS3.18 8.7.3.5; one worker-thread call)."""
    return tc.transcode_instance(_read_small(path, 0, size), wanted_ts)


def _check_transcodable(rows, wanted_ts: str) -> None:
    """NOT_ACCEPTABLE unless every instance can be delivered in ``wanted_ts`` (PS3.18 8.7.3.5, 406)."""
    if wanted_ts not in tc.WRITABLE_NATIVE | tc.ENCODABLE and any(r.transfer_syntax_uid != wanted_ts for r in rows):
        raise ServerError(ErrorKind.NOT_ACCEPTABLE, f"instances cannot be transcoded to {wanted_ts}; stored as "
                          f"{', '.join(sorted({r.transfer_syntax_uid for r in rows}))} (ask for transfer-syntax=*)")
    for r in rows:
        if r.transfer_syntax_uid != wanted_ts and r.size > MAX_TRANSCODE_BYTES:
            raise ServerError(ErrorKind.NOT_ACCEPTABLE, f"instance {r.sop_uid} is too large to transcode "
                              f"({r.size} bytes); ask for transfer-syntax=* or for its frames")
        if r.transfer_syntax_uid == wanted_ts or PIXEL_DATA not in json.loads(r.bulk):
            continue
        reason = tc.cannot_produce(r.transfer_syntax_uid, wanted_ts, describe(json.loads(r.meta)))
        if reason:
            raise ServerError(ErrorKind.NOT_ACCEPTABLE, f"instance {r.sop_uid} cannot be delivered as {wanted_ts}: "
                              f"{reason} (ask for transfer-syntax=*)")


def _bulk_multipart(accept: str | None) -> bool:
    """Whether bulk data goes as multipart/related (True) or a single octet-stream body (PS3.18 8.7.3, 406)."""
    items = parse_accept(accept)
    if accepts(items, "multipart/related", type_param=OCTET) or accepts(items, "multipart/related", type_param="*/*"):
        return True
    if any(i.q > 0 and i.media.essence == OCTET for i in items):
        return False
    raise ServerError(ErrorKind.NOT_ACCEPTABLE,
                      "bulk data is available as multipart/related; type=\"application/octet-stream\" or "
                      "application/octet-stream only")


def _bulk_span(range_header: str | None, length: int) -> tuple[int, int] | None:
    """The byte span a Range asks of a bulk value, the whole value without one; None when not satisfiable."""
    try:
        span = parse_range(range_header, length)
    except RangeNotSatisfiable:
        return None
    return span if span is not None else (0, length - 1)


def _read_small(path: Path, offset: int, length: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
    except FileNotFoundError as exc:
        raise ServerError(ErrorKind.INTERNAL, "blob missing") from exc
    if len(data) != length:
        raise ServerError(ErrorKind.INTERNAL, "blob shorter than indexed")
    return data


async def _read_range(path: Path, offset: int, length: int) -> AsyncIterator[bytes]:
    """Bytes ``offset .. offset+length`` of a blob, read off the event loop (in chunks when large)."""
    if length <= SMALL_BLOB:
        yield await anyio.to_thread.run_sync(_read_small, path, offset, length)
        return
    try:
        f = await anyio.to_thread.run_sync(open, path, "rb")
    except FileNotFoundError as exc:
        raise ServerError(ErrorKind.INTERNAL, "blob missing") from exc
    try:
        await anyio.to_thread.run_sync(f.seek, offset)
        remaining = length
        while remaining > 0:
            chunk = await anyio.to_thread.run_sync(f.read, min(READ_CHUNK, remaining))
            if not chunk:
                raise ServerError(ErrorKind.INTERNAL, "blob shorter than indexed")
            remaining -= len(chunk)
            yield chunk
    finally:
        await anyio.to_thread.run_sync(f.close)


__all__ = ["AcceptItem", "Body", "MetadataResponse", "Streamed", "Target", "WadoService", "negotiate_dicom"]
