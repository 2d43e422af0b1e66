"""WADO-RS: retrieve instances, metadata and bulk data (PS3.18 10.4).

Instances are streamed from their blobs in the stored transfer syntax. Metadata is assembled from the
DICOM JSON precomputed at ingest (no DICOM parsing at retrieve time), with an ETag per revision.
Frames, rendered images, thumbnails and transcoding are not implemented yet: 406 Not Acceptable.
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
from server.dicomweb.frames import FrameService
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
        """Instances of a study, series or one instance as multipart/related (PS3.18 10.4.1.1.1)."""
        wanted_ts = negotiate_dicom(accept)
        rows = await anyio.to_thread.run_sync(self._rows, tenant, target, False)
        if wanted_ts is not None:
            other = sorted({r.transfer_syntax_uid for r in rows} - {wanted_ts})
            if other:
                raise ServerError(ErrorKind.NOT_ACCEPTABLE,
                                  f"transcoding to {wanted_ts} is not supported; stored as {', '.join(other)} "
                                  "(ask for transfer-syntax=*)")
        boundary = new_boundary()
        parts = _dicom_parts(self.blobs, rows)
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

    async def bulk(self, tenant: str, target: Target, tag_path: str, accept: str | None) -> Streamed:
        """One bulk data value referenced by a BulkDataURI, as multipart/related octet-stream (PS3.18 10.4.1.1.5)."""
        items = parse_accept(accept)
        if accepts(items, "multipart/related", type_param=OCTET) is None and \
                accepts(items, "multipart/related", type_param="*/*") is None:
            raise ServerError(ErrorKind.NOT_ACCEPTABLE,
                              "bulk data is available as multipart/related; type=\"application/octet-stream\" only")
        rows = await anyio.to_thread.run_sync(self._rows, tenant, target, False)
        row = rows[0]
        location = json.loads(row.bulk).get(tag_path)
        if location is None:
            raise ServerError(ErrorKind.NOT_FOUND, f"no bulk data at {tag_path}")
        offset, length = location
        boundary = new_boundary()
        path = self.blobs.path_of(row.blob)

        async def parts():
            yield {"Content-Type": OCTET}, _read_range(path, offset, length)

        return Streamed(f'multipart/related; type="{OCTET}"; boundary={boundary}', amultipart_chunks(boundary, parts()))

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


async def _dicom_parts(blobs: BlobStore, rows):
    for r in rows:
        headers = {"Content-Type": f"{DICOM}; transfer-syntax={r.transfer_syntax_uid}",
                   "Content-Length": str(r.size)}
        yield headers, _read_range(blobs.path_of(r.blob), 0, r.size)


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


__all__ = ["AcceptItem", "MetadataResponse", "Streamed", "Target", "WadoService", "negotiate_dicom"]
