"""WADO-RS frames, transcoded instances and byte ranges (PS3.18 8.7.3, 8.7.4, 10.4.1.1.6; RFC 9110 14).

Negotiation is pure (``negotiate_frames``, ``parse_range``); ``FrameService`` reads only the Pixel Data a
request needs: the instance row gives the Pixel Data's byte range (recorded at ingest), the frame map
(native slices, or the encapsulated fragments per frame from the offset tables, PS3.5 A.4) is computed once
per stored blob and kept in an LRU keyed by the blob's content address (immutable, so never stale).
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import anyio

from server.dicom import transcode as tc
from server.dicom.pixels import (FrameSpan, PixelDescription, cut_bits, describe, encapsulated_frames,
                                 extended_offsets, native_frames, parse_frame_list, scan_items)
from server.dicomweb.media import AcceptItem, parse_accept
from server.dicomweb.multipart import multipart_chunks, new_boundary
from server.errors import ErrorKind, ServerError
from server.store.archive import Archive
from server.store.blobs import BlobStore

OCTET = "application/octet-stream"
ANY = "*"
PIXEL_DATA = "7FE00010"
EXTENDED_OFFSET_TABLE = "7FE00001"
CACHE_SIZE = 512
ROW_CACHE_SIZE, ROW_TTL = 4096, 1.0  # instance rows kept for frame requests, seconds each is trusted
FAST_BYTES = 2 * 1024 * 1024  # frame bytes of one request read on the event loop when nothing needs decoding

# PS3.18 Table 8.7.3-5 (frames): media type -> transfer syntaxes, the default first. application/octet-stream
# carries native frames (Explicit VR Little Endian); with transfer-syntax=* it carries the stored syntax.
FRAME_MEDIA_TYPES: dict[str, tuple[str, ...]] = {
    OCTET: (tc.EXPLICIT_LE,),
    "image/jpeg": (tc.JPEG_BASELINE, tc.JPEG_EXTENDED, tc.JPEG_LOSSLESS, tc.JPEG_LOSSLESS_SV1),
    "image/jls": (tc.JPEG_LS_LOSSLESS, tc.JPEG_LS_NEAR),
    "image/jp2": (tc.J2K_LOSSLESS, tc.J2K),
    "image/jpx": ("1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93"),
    "image/jphc": (tc.HTJ2K_LOSSLESS, tc.HTJ2K_RPCL, tc.HTJ2K),
    "image/dicom-rle": (tc.RLE,),
}
ALIASES = {"image/x-jls": "image/jls", "image/x-dicom-rle": "image/dicom-rle"}
# image/jpeg with transfer-syntax=* serves the stored syntax only when browsers can show it (never lossless)
STORED_OK = {"image/jpeg": (tc.JPEG_BASELINE,)}
MEDIA_OF_SYNTAX = {ts: media for media, syntaxes in FRAME_MEDIA_TYPES.items() for ts in syntaxes}


def media_of(ts: str) -> str:
    """The frame media type of a transfer syntax (PS3.18 Table 8.7.3-5); native syntaxes are octet-stream."""
    return MEDIA_OF_SYNTAX.get(ts, OCTET)


@dataclass(frozen=True)
class Choice:
    """The representation chosen for frames: media type, transfer syntax, multipart or a single body."""

    media_type: str
    transfer_syntax: str
    multipart: bool = True


@dataclass(frozen=True)
class FrameIndex:
    """Everything needed to cut frames of one stored blob: syntax, description, frame spans."""

    transfer_syntax: str
    desc: PixelDescription
    spans: tuple[FrameSpan, ...]


@dataclass(frozen=True)
class Body:
    """A response: status, media type, headers and body chunks (or bytes)."""

    status: int
    media_type: str | None
    headers: dict[str, str]
    chunks: AsyncIterator[bytes] | None = None
    content: bytes = b""


def _covers(media_range: str, media: str) -> bool:
    """Whether a media range ("*/*", "image/*", exact) covers a media type (RFC 9110 12.5.1)."""
    if media_range in ("*/*", media):
        return True
    return media_range.endswith("/*") and media.split("/", 1)[0] == media_range[:-2]


def _candidates(item: AcceptItem, stored_ts: str) -> list[Choice]:
    """The representations one Accept item allows, best first (PS3.18 8.7.3.5.2, 8.7.4)."""
    media = item.media
    if media.essence == "multipart/related":
        wanted, multipart = (media.param("type") or "*/*").split(";", 1)[0].strip().lower(), True
    else:
        wanted, multipart = media.essence, media.essence == "*/*"
    wanted = ALIASES.get(wanted, wanted)
    ts = media.param("transfer-syntax")
    if wanted in FRAME_MEDIA_TYPES:
        allowed = FRAME_MEDIA_TYPES[wanted]
        if ts is None:
            return [Choice(wanted, allowed[0], multipart)]
        if ts == ANY:
            stored_ok = STORED_OK.get(wanted, allowed)
            if wanted == OCTET or stored_ts in stored_ok:
                return [Choice(wanted, stored_ts, multipart)]
            return [Choice(wanted, allowed[0], multipart)]
        if ts in allowed or (wanted == OCTET and ts == stored_ts):
            return [Choice(wanted, ts, multipart)]
        return []
    if "/" not in wanted or not wanted.endswith("*"):
        return []
    target = stored_ts if ts in (None, ANY) else ts
    if not _covers(wanted, media_of(target)):
        return []
    return [Choice(media_of(target), target, multipart)]


def negotiate_frames(accept: str | None, stored_ts: str, desc: PixelDescription | None,
                     single_frame: bool) -> Choice:
    """The frame representation to answer with (PS3.18 8.7.3, 10.4.1.1.6), or NOT_ACCEPTABLE (406).

    Accept items are tried by q; within an item the syntax comes from its ``transfer-syntax`` parameter or
    the media type's default; ``*`` means the stored syntax. Single-part bodies only for one frame.
    """
    reasons: list[str] = []
    for item in parse_accept(accept):
        if item.q <= 0:
            continue
        for choice in _candidates(item, tc.EXPLICIT_LE if stored_ts == tc.IMPLICIT_LE else stored_ts):
            if not choice.multipart and not single_frame:
                reasons.append(f"{choice.media_type} as a single part needs exactly one frame")
                continue
            reason = tc.cannot_produce(stored_ts, choice.transfer_syntax, desc)
            if reason is None:
                return choice
            reasons.append(f"{choice.media_type}; transfer-syntax={choice.transfer_syntax}: {reason}")
    detail = "; ".join(dict.fromkeys(reasons)) or "no frame media type of PS3.18 Table 8.7.3-5 was accepted"
    raise ServerError(ErrorKind.NOT_ACCEPTABLE, f"cannot serve the frames as asked ({detail})")


def parse_range(header: str | None, total: int) -> tuple[int, int] | None:
    """The first-to-last byte positions of a single ``bytes=`` range (RFC 9110 14.1.2), or None for the whole.

    None also for forms we answer with the whole representation (several ranges, other units, syntax we do
    not parse), as RFC 9110 14.2 allows. Raises ``RangeNotSatisfiable`` for a range outside the value.
    """
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or (first and not first.isdigit()) or (last and not last.isdigit()) or not (first or last):
        return None
    if not first:  # suffix range: the last N bytes
        if int(last) == 0 or total == 0:
            raise RangeNotSatisfiable(total)
        return max(0, total - int(last)), total - 1
    start = int(first)
    end = min(int(last), total - 1) if last else total - 1
    if start >= total or (last and int(last) < start):
        raise RangeNotSatisfiable(total)
    return start, end


class RangeNotSatisfiable(Exception):
    """A Range the value cannot satisfy: 416 with ``Content-Range: bytes */total`` (RFC 9110 15.5.17)."""

    def __init__(self, total: int) -> None:
        super().__init__(f"range not satisfiable (length {total})")
        self.total = total


def ranged(payload: bytes, range_header: str | None) -> tuple[bytes, str | None]:
    """The payload cut to a single Range, with its Content-Range value (RFC 9110 14.4), or whole and None."""
    span = parse_range(range_header, len(payload))
    if span is None:
        return payload, None
    start, end = span
    return payload[start:end + 1], f"bytes {start}-{end}/{len(payload)}"


def not_satisfiable(total: int) -> Body:
    """The 416 answer (RFC 9110 15.5.17)."""
    return Body(416, None, {"Content-Range": f"bytes */{total}"})


def payload_body(payload: bytes, part_type: str, multipart: bool, range_header: str | None,
                 outer_type: str | None = None) -> Body:
    """One payload (a frame or a bulk value) as multipart/related or single part, honouring a Range."""
    try:
        cut, content_range = ranged(payload, range_header)
    except RangeNotSatisfiable as exc:
        return not_satisfiable(exc.total)
    status = 206 if content_range else 200
    if not multipart:
        headers = {"Content-Range": content_range} if content_range else {}
        return Body(status, part_type, {**headers, "Accept-Ranges": "bytes"}, content=cut)
    part_headers = {"Content-Type": part_type}
    if content_range:
        part_headers["Content-Range"] = content_range
    return multipart_body(status, outer_type or part_type.split(";", 1)[0], [(part_headers, cut)])


def multipart_body(status: int, type_param: str, parts: Sequence[tuple[dict[str, str], bytes]]) -> Body:
    """A multipart/related body of ready parts, as one bytes value (PS3.18 8.7.4, RFC 2387)."""
    boundary = new_boundary()
    content = b"".join(multipart_chunks(boundary, [(headers, [payload]) for headers, payload in parts]))
    media_type = f'multipart/related; type="{type_param}"; boundary={boundary}'
    return Body(status, media_type, {"Accept-Ranges": "bytes"}, content=content)


class FrameIndexCache:
    """A thread-safe LRU: FrameIndex by blob digest (blobs are content-addressed, so entries never go stale), or
    any other value by any hashable key (the instance rows of ``FrameService._row``)."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


class FrameService:
    """Frames of stored instances, in the stored or a transcoded syntax (PS3.18 10.4.1.1.6)."""

    def __init__(self, blobs: BlobStore, archive: Archive, cache_size: int = CACHE_SIZE) -> None:
        self.blobs = blobs
        self.archive = archive
        self.cache = FrameIndexCache(cache_size)
        self.rows = FrameIndexCache(ROW_CACHE_SIZE)  # (tenant, study, series, sop) -> (expiry, row)

    async def frames(self, tenant: str, study: str, series: str, sop: str, frame_list: str,
                     accept: str | None, range_header: str | None) -> Body:
        """The frames of ``frame_list`` as negotiated; a Range applies to a single frame's bytes. When the row and
        the frame map are in memory and the stored syntax is served, the work is a few ``pread`` calls of page-cached
        bytes and runs on the event loop (a worker-thread hop would cost more than it); otherwise in a worker thread
        (SQL, offset tables, codecs)."""
        fast = self._cached(tenant, study, series, sop)
        if fast is not None:
            row, index = fast
            numbers = parse_frame_list(frame_list, len(index.spans))
            choice = negotiate_frames(accept, index.transfer_syntax, index.desc, len(numbers) == 1)
            size = sum(length for n in numbers for _, length in index.spans[n - 1].pieces)
            if choice.transfer_syntax == index.transfer_syntax and size <= FAST_BYTES:
                return self._answer(row, index, numbers, choice, range_header)
        return await anyio.to_thread.run_sync(
            self._frames, tenant, study, series, sop, frame_list, accept, range_header)

    def _cached(self, tenant: str, study: str, series: str, sop: str):
        """(row, FrameIndex) of an instance when both are in memory and fresh, else None."""
        hit = self.rows.get((tenant, study, series, sop))
        if hit is None or hit[0] <= time.monotonic():
            return None
        index = self.cache.get(hit[1].blob)
        return (hit[1], index) if index is not None else None

    def _frames(self, tenant: str, study: str, series: str, sop: str, frame_list: str,
                accept: str | None, range_header: str | None) -> Body:
        row = self._row(tenant, study, series, sop)
        index = self.frame_index(tenant, row)
        numbers = parse_frame_list(frame_list, len(index.spans))
        choice = negotiate_frames(accept, index.transfer_syntax, index.desc, len(numbers) == 1)
        return self._answer(row, index, numbers, choice, range_header)

    def _answer(self, row, index: FrameIndex, numbers: list[int], choice: Choice, range_header: str | None) -> Body:
        part_type = f"{choice.media_type}; transfer-syntax={choice.transfer_syntax}"
        payloads = self.read_frames(row.blob, index, numbers, choice.transfer_syntax)
        if len(payloads) == 1:
            return payload_body(payloads[0], part_type, choice.multipart, range_header, choice.media_type)
        return multipart_body(200, choice.media_type, [({"Content-Type": part_type}, p) for p in payloads])

    def read_frames(self, blob: str, index: FrameIndex, numbers: list[int], target_ts: str) -> list[bytes]:
        """Frames ``numbers`` (1-based) of a blob in ``target_ts``: read with pread, decoded and encoded if needed.

        Blocking (file reads, codecs): call it from a worker thread.
        """
        path = self.blobs.path_of(blob)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise ServerError(ErrorKind.INTERNAL, "blob missing") from exc
        try:
            raw = [_read_span(fd, index.spans[n - 1]) for n in numbers]
        finally:
            os.close(fd)
        return [tc.convert_frame(data, index.transfer_syntax, target_ts, index.desc) for data in raw]

    def _row(self, tenant: str, study: str, series: str, sop: str):
        """The instance's index row, from memory for ``ROW_TTL`` seconds after it was read (a frame request then
        costs no SQL; an instance replaced meanwhile is served from its old, still stored blob for at most that
        long, as the WSI tiles do). Unknown instances are never remembered."""
        key = (tenant, study, series, sop)
        now = time.monotonic()
        hit = self.rows.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        rows = self.archive.instances(tenant, study, series, sop)
        if not rows:
            raise ServerError(ErrorKind.NOT_FOUND, "instance not found")
        self.rows.put(key, (now + ROW_TTL, rows[0]))
        return rows[0]

    def frame_index(self, tenant: str, row) -> FrameIndex:
        """The FrameIndex of an instance row, from the LRU or computed from its metadata and offset tables.

        ``row`` needs ``study_uid``, ``series_uid``, ``sop_uid``, ``transfer_syntax_uid``, ``blob`` and ``bulk``
        (the JSON of tag path -> [offset, length]); NOT_FOUND when the instance has no Pixel Data. Blocking.
        """
        cached = self.cache.get(row.blob)
        if cached is not None:
            return cached
        bulk = json.loads(row.bulk)
        if PIXEL_DATA not in bulk:
            raise ServerError(ErrorKind.NOT_FOUND, "the instance has no pixel data, so no frames")
        [full] = self.archive.instances(tenant, row.study_uid, row.series_uid, row.sop_uid, with_meta=True)
        meta = json.loads(full.meta)
        desc = describe(meta)
        if desc is None:
            raise ServerError(ErrorKind.NOT_FOUND, "the instance has no image pixel description, so no frames")
        offset, length = bulk[PIXEL_DATA]
        index = FrameIndex(row.transfer_syntax_uid, desc, self._spans(row, meta, bulk, offset, length, desc))
        self.cache.put(row.blob, index)
        return index

    def _spans(self, row, meta: dict, bulk: dict, offset: int, length: int,
               desc: PixelDescription) -> tuple[FrameSpan, ...]:
        if row.transfer_syntax_uid in tc.NATIVE:
            return native_frames(offset, length, desc)
        path = self.blobs.path_of(row.blob)
        with open(path, "rb") as f:
            fd = f.fileno()
            bot_item, fragments = scan_items(lambda o, n: os.pread(fd, n, o), offset, offset + length)
            bot = os.pread(fd, bot_item.length, bot_item.offset)
            eot = _extended_table(fd, meta, bulk)
        return encapsulated_frames(bot, fragments, desc.number_of_frames, eot)


def _extended_table(fd: int, meta: dict, bulk: dict) -> tuple[int, ...] | None:
    """The Extended Offset Table (7FE0,0001) from the file (bulk) or inline metadata (PS3.3 C.7.6.3.1.8)."""
    if EXTENDED_OFFSET_TABLE in bulk:
        offset, length = bulk[EXTENDED_OFFSET_TABLE]
        return extended_offsets(os.pread(fd, length, offset))
    inline = (meta.get(EXTENDED_OFFSET_TABLE) or {}).get("InlineBinary")
    if inline:
        return extended_offsets(base64.b64decode(inline))
    return None


def _read_span(fd: int, span: FrameSpan) -> bytes:
    """A frame's stored bytes: its pieces joined; a 1-bit frame repacked from bit 0."""
    chunks = []
    for offset, length in span.pieces:
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise ServerError(ErrorKind.INTERNAL, "blob shorter than indexed")
        chunks.append(data)
    data = b"".join(chunks) if len(chunks) != 1 else chunks[0]
    return cut_bits(data, span.bit_shift, span.bits) if span.bits else data


__all__ = ["Body", "Choice", "FrameIndex", "FrameService", "RangeNotSatisfiable", "media_of",
           "negotiate_frames", "parse_range", "payload_body"]
