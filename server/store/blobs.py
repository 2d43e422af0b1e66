"""Content-addressed blob files: written to a temporary name, fsynced, renamed, directory fsynced.

Paths are ``blobs/ab/cd/<sha256 hex>``; never built from a value in the payload. A crash at any point
leaves either a complete blob or a temporary file in ``tmp/`` (collected by ``sweep_tmp``); orphan blobs
without an index row are harmless and may be collected later.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import os
import re
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from server.errors import ErrorKind, ServerError

_HEX = re.compile(r"^[0-9a-f]{64}$")
SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h


@dataclass
class SpoolFile:
    """A temporary file being written, hashed as it grows."""

    path: Path
    fd: int
    sha256: "hashlib._Hash"
    size: int = 0

    def write(self, data: bytes | memoryview) -> None:
        """Append bytes; out-of-space is reported as RESOURCES (PS3.18 A700)."""
        try:
            view = memoryview(data)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ServerError(ErrorKind.RESOURCES, "out of storage space") from exc
            raise
        self.sha256.update(data)
        self.size += len(data)

    def start_writeback(self) -> None:
        """Ask the kernel to start writing the data out now, without waiting (Linux ``sync_file_range``).

        The batch's ``BlobStore.sync`` still waits for durability; starting early overlaps the disk
        writes with receiving the rest of the request.
        """
        libc = _libc()
        if self.fd >= 0 and libc is not None and hasattr(libc, "sync_file_range"):
            libc.sync_file_range(self.fd, ctypes.c_longlong(0), ctypes.c_longlong(0), SYNC_FILE_RANGE_WRITE)

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """Close and delete the temporary file."""
        self.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class BlobStore:
    """The blob folder of one data directory."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.blobs = root / "blobs"
        self.fsync = fsync
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.blobs.mkdir(parents=True, exist_ok=True)
        self._dirs: set[Path] = set()  # fan-out folders known to exist

    def spool(self) -> SpoolFile:
        """A new temporary file in the same file system as the blobs."""
        path = self.tmp / f"{uuid.uuid4().hex}.part"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        return SpoolFile(path=path, fd=fd, sha256=hashlib.sha256())

    def path_of(self, digest: str) -> Path:
        """The path of a blob by its sha256 hex digest."""
        if not _HEX.match(digest):
            raise ServerError(ErrorKind.INTERNAL, "bad blob digest")
        return self.blobs / digest[:2] / digest[2:4] / digest

    def place(self, spool: SpoolFile) -> str:
        """Move a spooled file to its content address (not yet durable: call ``sync``); returns the digest.

        If the blob exists already with the same size the spool is dropped (same content). An existing file of
        another size is what a crash can leave of a blob that was placed but never synced (``put(durable=False)``
        whose mail was never acknowledged): the spool replaces it, so the redelivery heals the blob.
        """
        digest = spool.sha256.hexdigest()
        spool.close()
        target = self.path_of(digest)
        try:
            existing = target.stat().st_size
        except FileNotFoundError:
            existing = None
        if existing == spool.size:
            spool.discard()
            return digest
        if target.parent not in self._dirs:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(target.parent)
        os.replace(spool.path, target)
        return digest

    def sync(self, digests: list[str]) -> None:
        """Make placed blobs durable: data, their directory entries and the directories themselves.

        Linux: one ``syncfs(2)`` of the blob file system covers a whole batch (one journal commit instead of
        two fsyncs per blob). Elsewhere: fsync each file and each directory up to the blob root.
        """
        if not self.fsync or not digests:
            return
        if _syncfs(self.blobs):
            return
        dirs: set[Path] = set()
        for digest in digests:
            path = self.path_of(digest)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            dirs.update((path.parent, path.parent.parent))
        for d in sorted(dirs, reverse=True) + [self.blobs]:
            _fsync_dir(d)

    def commit(self, spool: SpoolFile) -> str:
        """Place a spooled file and make it durable (fsync, atomic rename, directory fsync)."""
        digest = self.place(spool)
        self.sync([digest])
        return digest

    def put(self, data: bytes | memoryview, *, durable: bool = True) -> str:
        """Write ``data`` as a blob; returns its sha256 (content address).

        ``durable=False`` places it without a sync: the caller must ``sync`` it (alone or with the other blobs
        of the same step, one ``syncfs``) before any commit that an acknowledgement depends on. Until then a
        crash may lose or truncate it; that is only allowed where the data will be written again (a mail not yet
        acknowledged is redelivered with the same content, and ``place`` replaces a truncated blob).
        """
        spool = self.spool()
        try:
            spool.write(data)
        except BaseException:
            spool.discard()
            raise
        digest = self.place(spool)
        if durable:
            self.sync([digest])
        return digest

    def sweep_tmp(self) -> int:
        """Delete temporary files left by a crash; returns how many."""
        count = 0
        for p in self.tmp.glob("*.part"):
            p.unlink(missing_ok=True)
            count += 1
        return count


def _syncfs(path: Path) -> bool:
    """``syncfs(2)`` on the file system of ``path``; False where the call does not exist."""
    libc = _libc()
    if libc is None or not hasattr(libc, "syncfs"):
        return False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            if err in (errno.ENOSPC, errno.EDQUOT):
                raise ServerError(ErrorKind.RESOURCES, "out of storage space")
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)
    return True


@functools.lru_cache(maxsize=1)
def _libc():
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - no C library
        return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
