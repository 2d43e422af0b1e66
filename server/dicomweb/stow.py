"""STOW-RS: store instances from a streamed request body (PS3.18 10.5).

The body is parsed as it arrives; each part is spooled to a temporary file (hashed on the way), parsed
once, made durable under its content address, and indexed in batches. A part that fails (not DICOM,
truncated, missing UIDs, another study than the URL names, duplicate with other bytes) fails alone.
The response is sent only after every stored instance's blob is fsynced and its index row committed.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio

from server.config import DuplicatePolicy, Settings
from server.dicom.attributes import Level
from server.dicom.parse import IngestWarning, ParsedInstance, parse_part10
from server.dicomweb.media import MediaType, boundary_of, parse_media_type
from server.dicomweb.multipart import MultipartParser, PartData, PartEnd, PartStart
from server.dicomweb.status import (
    FAILURE_BY_KIND,
    Failed,
    FailureReason,
    Outcome,
    Stored,
    WarningReason,
    stow_status,
)
from server.errors import ErrorKind, ServerError
from server.store.archive import Archive, NewInstance, Verdict
from server.store.blobs import BlobStore, SpoolFile

log = logging.getLogger(__name__)

DICOM = "application/dicom"
WRITE_BATCH = 1 << 20  # bytes gathered before one write call in a worker thread
INDEX_BATCH = 200  # instances per index transaction
PARALLEL_PARTS = 8  # parts parsed and placed concurrently while the body keeps streaming

# Ingest warnings reported in the Store Instances Response; the others (index values that could not be
# used, undecodable text) leave the stored bytes untouched and are only logged.
WARNING_BY_INGEST: dict[IngestWarning, WarningReason] = {
    IngestWarning.SOP_CLASS_MISMATCH: WarningReason.DOES_NOT_MATCH_SOP_CLASS,
    IngestWarning.SOP_INSTANCE_MISMATCH: WarningReason.DOES_NOT_MATCH_SOP_CLASS,
}


@dataclass(frozen=True)
class StowResult:
    """HTTP status and Store Instances Response body (DICOM JSON)."""

    status: int
    body: dict


@dataclass
class _Ready:
    """A part whose blob is durable, waiting to be indexed."""

    parsed: ParsedInstance
    blob: str
    size: int
    slot: int


@dataclass
class _Request:
    """State of one STOW request."""

    tenant: str
    study_uid: str | None
    outcomes: list[Outcome | None] = field(default_factory=list)
    ready: list[_Ready] = field(default_factory=list)


class StowService:
    """Stores instances into the blob store and the archive index."""

    def __init__(self, settings: Settings, blobs: BlobStore, archive: Archive) -> None:
        self.settings = settings
        self.blobs = blobs
        self.archive = archive

    async def store(self, body: AsyncIterator[bytes], content_type: str | None, *, tenant: str,
                    study_uid: str | None, base_url: str) -> StowResult:
        """Store every part of a request body and answer the Store Instances Response (PS3.18 10.5.3)."""
        media = _request_media(content_type)
        boundary = None if media.essence == DICOM else boundary_of(media)
        req = _Request(tenant=tenant, study_uid=study_uid)
        limiter = anyio.Semaphore(PARALLEL_PARTS)
        try:
            async with anyio.create_task_group() as tg:
                if boundary is None:
                    await self._single_part(body, req, tg, limiter)
                else:
                    await self._multipart(body, boundary, req, tg, limiter)
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None
        if req.ready:
            await self._index(req)
        outcomes = [o for o in req.outcomes if o is not None]
        return StowResult(stow_status(outcomes), _response(outcomes, base_url))

    def _writer(self, problem: Failed | None = None) -> "_PartWriter":
        return _PartWriter(self.blobs, self.settings.max_part_bytes, problem)

    async def _single_part(self, body: AsyncIterator[bytes], req: _Request, tg, limiter) -> None:
        writer = self._writer()
        try:
            async for chunk in body:
                self._check_total(writer.total)
                await writer.add(chunk)
        except BaseException:
            await writer.discard()
            raise
        await self._finish_part(writer, req, tg, limiter)

    async def _multipart(self, body: AsyncIterator[bytes], boundary: str, req: _Request, tg, limiter) -> None:
        """Store each complete part; a body that breaks off or turns malformed fails from there on,
        the complete parts before it are still stored (PS3.18 10.5.3: per-instance failures)."""
        parser = MultipartParser(boundary)
        writer: _PartWriter | None = None
        total = 0
        try:
            async for chunk in body:
                total += len(chunk)
                self._check_total(total)
                for event in parser.feed(chunk):
                    if isinstance(event, PartData):
                        await writer.add(event.data)
                    elif isinstance(event, PartStart):
                        writer = self._writer(_part_media_problem(event.headers))
                    else:
                        current, writer = writer, None
                        await self._finish_part(current, req, tg, limiter)
            parser.close()
        except ServerError as exc:
            if writer is not None:
                await writer.discard()
                writer = None
            if exc.kind is not ErrorKind.INVALID:
                raise
            req.outcomes.append(Failed(FailureReason.CANNOT_UNDERSTAND, exc.message))
        except BaseException:
            if writer is not None:
                await writer.discard()
            raise

    def _check_total(self, total: int) -> None:
        if total > self.settings.max_stow_bytes:
            raise ServerError(ErrorKind.TOO_LARGE,
                              f"request body exceeds the limit of {self.settings.max_stow_bytes} bytes")

    async def _finish_part(self, writer: "_PartWriter", req: _Request, tg, limiter) -> None:
        """Queue a received part for parsing and placing; at most PARALLEL_PARTS in flight."""
        slot = len(req.outcomes)
        req.outcomes.append(None)
        if writer.problem is not None:
            await writer.discard()
            req.outcomes[slot] = writer.problem
            return
        await limiter.acquire()
        tg.start_soon(self._process_part, writer, req, slot, limiter)
        if len(req.ready) >= INDEX_BATCH:
            await self._index(req)

    async def _process_part(self, writer: "_PartWriter", req: _Request, slot: int, limiter) -> None:
        try:
            outcome_or_ready = await anyio.to_thread.run_sync(self._parse_and_place, writer, req.study_uid, slot)
        finally:
            limiter.release()
        if isinstance(outcome_or_ready, _Ready):
            req.ready.append(outcome_or_ready)
        else:
            req.outcomes[slot] = outcome_or_ready

    def _parse_and_place(self, writer: "_PartWriter", study_uid: str | None, slot: int) -> _Ready | Failed:
        """Write the part's last bytes, parse it and move it to its content address (worker thread).

        Not yet durable: ``_index`` syncs the whole batch before the index commits.
        """
        spool = None
        try:
            spool = writer.write_pending()
            spool.start_writeback()
            parsed = parse_part10(spool.path)
            _check_complete(parsed)
            if study_uid is not None and parsed.study_uid != study_uid:
                spool.discard()
                return Failed(FailureReason.STUDY_UID_MISMATCH,
                              f"StudyInstanceUID {parsed.study_uid} does not match the study {study_uid} of the request URL",
                              parsed.sop_class_uid, parsed.sop_instance_uid)
            size = spool.size
            return _Ready(parsed, self.blobs.place(spool), size, slot)
        except ServerError as exc:
            if spool is not None:
                spool.discard()
            return Failed(FAILURE_BY_KIND[exc.kind], exc.message)
        except Exception:
            if spool is not None:
                spool.discard()
            log.exception("STOW part could not be processed")
            return Failed(FailureReason.PROCESSING_FAILURE, "processing failure")

    async def _index(self, req: _Request) -> None:
        """Make a batch of placed blobs durable, then index it in one transaction (worker thread)."""
        batch, req.ready = req.ready, []
        items = [NewInstance(r.parsed, r.blob, r.size) for r in batch]
        replace = self.settings.duplicate_policy is DuplicatePolicy.REPLACE

        def sync_and_index():
            self.blobs.sync([r.blob for r in batch])
            return self.archive.index_batch(req.tenant, items, replace=replace)

        results = await anyio.to_thread.run_sync(sync_and_index)
        for ready, result in zip(batch, results):
            req.outcomes[ready.slot] = _outcome(ready.parsed, result.verdict, result.message)


class _PartWriter:
    """Gathers a part's chunks and writes them to a spool file in worker threads (created on first write)."""

    def __init__(self, blobs: BlobStore, limit: int, problem: Failed | None = None) -> None:
        self.blobs = blobs
        self.limit = limit
        self.problem = problem
        self.spool: SpoolFile | None = None
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.total = 0

    async def add(self, data: bytes) -> None:
        """Take a chunk; over the per-part limit the part fails with A700 and its bytes are dropped."""
        self.total += len(data)
        if self.problem is not None:
            return
        if self.total > self.limit:
            self.problem = Failed(FailureReason.OUT_OF_RESOURCES,
                                  f"part exceeds the limit of {self.limit} bytes per instance")
            self.pending.clear()
            return
        self.pending.append(bytes(data))
        self.pending_size += len(data)
        if self.pending_size >= WRITE_BATCH:
            await anyio.to_thread.run_sync(self.write_pending)

    def write_pending(self) -> SpoolFile:
        """Write what is gathered to the spool, creating it if needed (blocking)."""
        if self.spool is None:
            self.spool = self.blobs.spool()
        if self.pending:
            chunks, self.pending, self.pending_size = self.pending, [], 0
            self.spool.write(b"".join(chunks) if len(chunks) > 1 else chunks[0])
        return self.spool

    async def discard(self) -> None:
        """Drop the part's spool file, if any."""
        if self.spool is not None:
            await anyio.to_thread.run_sync(self.spool.discard)


def _check_complete(parsed: ParsedInstance) -> None:
    """INVALID for an image whose pixel data is missing: a file cut between two elements (PS3.3 C.7.6.3)."""
    columns = parsed.columns[Level.INSTANCE]
    if parsed.pixel is None and columns.get("rows") and columns.get("columns"):
        raise ServerError(ErrorKind.INVALID,
                          "truncated: the data set describes an image (Rows, Columns) but has no Pixel Data")


def _unwrap(group: BaseExceptionGroup) -> BaseException:
    """The first ServerError of a task group's failure, else the group itself."""
    matched, _ = group.split(ServerError)
    while isinstance(matched, BaseExceptionGroup):
        matched = matched.exceptions[0]
    return matched if matched is not None else group


def _request_media(content_type: str | None) -> MediaType:
    """The request's media type if STOW-RS accepts it, else UNSUPPORTED (415, PS3.18 10.5.1.2)."""
    if not content_type:
        raise ServerError(ErrorKind.UNSUPPORTED, "Content-Type is required: multipart/related; type=\"application/dicom\"")
    media = parse_media_type(content_type)
    if media.essence == DICOM:
        return media
    if media.essence == "multipart/related":
        part_type = (media.param("type") or DICOM).lower()
        if part_type == DICOM:
            return media
        raise ServerError(ErrorKind.UNSUPPORTED,
                          f"multipart/related with type={part_type} is not supported; use type=\"application/dicom\"")
    raise ServerError(ErrorKind.UNSUPPORTED,
                      f"media type {media.essence} is not supported; use multipart/related; type=\"application/dicom\"")


def _part_media_problem(headers: dict[str, str]) -> Failed | None:
    """A failure for a part whose own Content-Type is not application/dicom (PS3.18 10.5.1.2)."""
    value = headers.get("content-type")
    if not value:
        return None
    try:
        media = parse_media_type(value)
    except ServerError as exc:
        return Failed(FailureReason.CANNOT_UNDERSTAND, exc.message)
    if media.essence != DICOM:
        return Failed(FailureReason.CANNOT_UNDERSTAND, f"part media type {media.essence} is not application/dicom")
    return None


def _outcome(p: ParsedInstance, verdict: str, message: str) -> Outcome:
    if verdict == Verdict.DUPLICATE:
        return Failed(FailureReason.DUPLICATE_SOP_INSTANCE, message, p.sop_class_uid, p.sop_instance_uid)
    if verdict == Verdict.SERIES_CONFLICT:
        return Failed(FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS, message, p.sop_class_uid, p.sop_instance_uid)
    warnings = tuple((WARNING_BY_INGEST[w], _warning_text(w)) for w in p.warnings if w in WARNING_BY_INGEST)
    if len(warnings) < len(p.warnings):
        log.info("instance %s stored with index warnings: %s", p.sop_instance_uid,
                 ", ".join(w.value for w in p.warnings if w not in WARNING_BY_INGEST))
    if verdict == Verdict.REPLACED:
        warnings += ((WarningReason.COERCION, "an earlier version of this SOP Instance was replaced"),)
    url = f"\x01/studies/{p.study_uid}/series/{p.series_uid}/instances/{p.sop_instance_uid}"
    return Stored(p.sop_class_uid, p.sop_instance_uid, url, warnings)


def _warning_text(w: IngestWarning) -> str:
    return w.name.replace("_", " ").lower()


def _tag(vr: str, *values) -> dict:
    return {"vr": vr, "Value": list(values)} if values else {"vr": vr}


def _response(outcomes: list[Outcome], base_url: str) -> dict:
    """Store Instances Response Module (PS3.18 10.5.3.2, Table 10.5.3-2) as DICOM JSON."""
    referenced, failed = [], []
    for o in outcomes:
        if isinstance(o, Stored):
            item = {"00081150": _tag("UI", o.sop_class_uid), "00081155": _tag("UI", o.sop_instance_uid),
                    "00081190": _tag("UR", o.retrieve_url.replace("\x01", base_url))}
            if o.warnings:
                item["00081196"] = _tag("US", *[int(w) for w, _ in o.warnings])
                item["0040A160"] = _tag("UT", "; ".join(t for _, t in o.warnings))
            referenced.append(item)
        else:
            item = {"00081150": _tag("UI", o.sop_class_uid) if o.sop_class_uid else _tag("UI"),
                    "00081155": _tag("UI", o.sop_instance_uid) if o.sop_instance_uid else _tag("UI"),
                    "00081197": _tag("US", int(o.reason)),
                    "0040A160": _tag("UT", o.message)}
            failed.append(item)
    body: dict = {}
    studies = {o.retrieve_url.split("/series/")[0] for o in outcomes if isinstance(o, Stored)}
    if len(studies) == 1:
        body["00081190"] = _tag("UR", studies.pop().replace("\x01", base_url))
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    return body

