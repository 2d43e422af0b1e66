"""Mailbox polling: fetches DRG mails over POP3 or IMAP and removes each only after the sink stored it.

POP3: RFC 1939 (RETR, DELE; deletions commit only with QUIT, so a dropped connection deletes nothing),
RFC 2595 (STLS), RFC 8314 (POP3S). IMAP: RFC 3501 (UID FETCH BODY.PEEK[], UID STORE +FLAGS (\\Deleted),
EXPUNGE), RFC 4315 (UIDPLUS: UID EXPUNGE removes only our messages), RFC 6851 (MOVE), RFC 2595 (STARTTLS).

Order per message: fetch -> sink (durable store) -> delete/move/flag. A crash between the sink and the
delete means the mail is fetched again by the next poll, so the sink must be idempotent (the gateway
dedups by Message-ID). A message over ``max_bytes`` is skipped and reported, never deleted.
Blocking (poplib/imaplib): run ``poll_once`` in a worker thread, or use ``apoll``/``run``.
"""

from __future__ import annotations

import asyncio
import enum
import imaplib
import logging
import poplib
import re
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from server.errors import ErrorKind, ServerError
from server.mail.transport import Received, Sink, Source, TlsMode, client_tls_context, utcnow

log = logging.getLogger(__name__)


class Protocol(str, enum.Enum):
    """Mailbox access protocol."""

    POP3 = "pop3"
    IMAP = "imap"


class AfterStore(str, enum.Enum):
    """What happens to a message on the server once the sink stored it (IMAP; POP3 always deletes)."""

    DELETE = "delete"  # \\Deleted + UID EXPUNGE (UIDPLUS) or EXPUNGE
    MOVE = "move"  # UID MOVE to ``move_to`` (RFC 6851), else UID COPY + \\Deleted + expunge
    FLAG = "flag"  # set keyword ``flag``; polls skip messages carrying it


@dataclass(frozen=True)
class MailboxConfig:
    """One polled mailbox (to be wired into ``server.config.Settings``)."""

    name: str  # our label, used in ids and logs
    protocol: Protocol
    host: str
    port: int
    username: str
    password: str = field(repr=False)
    tls: TlsMode = TlsMode.IMPLICIT
    ca_file: Path | None = None  # trust anchors; default: system store
    verify_tls: bool = True
    folder: str = "INBOX"  # IMAP only
    after: AfterStore = AfterStore.DELETE  # IMAP only
    move_to: str | None = None  # IMAP folder for AfterStore.MOVE
    flag: str = "$TeleradStored"  # IMAP keyword for AfterStore.FLAG
    max_messages: int = 100  # per poll
    max_bytes: int = 64 * 1024**2  # larger messages are skipped and reported, not deleted
    timeout_seconds: float = 60.0
    interval_seconds: float = 60.0  # pause between polls in ``run``

    def __post_init__(self) -> None:
        object.__setattr__(self, "protocol", Protocol(self.protocol))
        object.__setattr__(self, "tls", TlsMode(self.tls))
        object.__setattr__(self, "after", AfterStore(self.after))
        if self.after is AfterStore.MOVE and not self.move_to:
            raise ValueError(f"mailbox {self.name}: after=move needs move_to")
        if self.protocol is Protocol.POP3 and self.after is not AfterStore.DELETE:
            raise ValueError(f"mailbox {self.name}: POP3 can only delete after storing")


@dataclass
class PollReport:
    """What one poll did; ``failed`` and ``oversized`` messages stay on the server."""

    mailbox: str
    seen: int = 0  # messages on the server eligible for this poll
    stored: list[str] = field(default_factory=list)  # UIDs handed to the sink successfully
    removed: list[str] = field(default_factory=list)  # UIDs deleted / moved / flagged afterwards
    failed: dict[str, str] = field(default_factory=dict)  # UID -> reason (sink raised, fetch failed)
    oversized: dict[str, int] = field(default_factory=dict)  # UID -> size
    remaining: int = 0  # eligible messages left for the next poll (max_messages)


class PollError(ServerError):
    """The mailbox could not be polled (connect, TLS, login, protocol); nothing was removed."""


def _upstream(config: MailboxConfig, exc: BaseException) -> PollError:
    kind = ErrorKind.TIMEOUT if isinstance(exc, (socket.timeout, TimeoutError)) else ErrorKind.UPSTREAM
    if isinstance(exc, ssl.SSLError):
        kind = ErrorKind.SECURITY
    return PollError(kind, f"mailbox {config.name} ({config.host}:{config.port}): {exc.__class__.__name__}: {exc}")


class MailboxPoller:
    """Polls one mailbox and hands every message to the sink."""

    def __init__(self, config: MailboxConfig, sink: Sink) -> None:
        self.config = config
        self._sink = sink
        self._tls = client_tls_context(config.ca_file, verify=config.verify_tls)

    def poll_once(self) -> PollReport:
        """One poll: fetch up to ``max_messages``, store each, then remove it. Raises PollError."""
        try:
            if self.config.protocol is Protocol.POP3:
                return self._poll_pop3()
            return self._poll_imap()
        except (poplib.error_proto, imaplib.IMAP4.error, OSError) as exc:
            raise _upstream(self.config, exc) from exc

    async def apoll(self) -> PollReport:
        """``poll_once`` in a worker thread."""
        return await asyncio.to_thread(self.poll_once)

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every ``interval_seconds`` (at once again while messages remain) until ``stop`` is set."""
        while not stop.is_set():
            remaining = 0
            try:
                report = await self.apoll()
                remaining = report.remaining
            except PollError as exc:
                log.warning("%s", exc.message)
            except Exception:
                log.exception("mailbox %s: poll failed", self.config.name)
            if remaining:
                continue
            try:
                await asyncio.wait_for(stop.wait(), self.config.interval_seconds)
            except asyncio.TimeoutError:
                pass

    def _meta(self, source: Source, uid: str, size: int, tls: bool) -> Received:
        return Received(source=source, id=f"{self.config.name}:{uid}", size=size, received_at=utcnow(),
                        peer=f"{self.config.host}:{self.config.port}", tls=tls, mailbox=self.config.name, uid=uid)

    def _store(self, report: PollReport, raw: bytes, meta: Received) -> bool:
        """Run the sink; a failure is reported and leaves the message on the server."""
        try:
            self._sink(raw, meta)
        except ServerError as exc:
            report.failed[meta.uid or ""] = f"{exc.kind.value}: {exc.message}"
            log.warning("mailbox %s: message %s not stored: %s", self.config.name, meta.uid, exc.message)
            return False
        except Exception as exc:
            report.failed[meta.uid or ""] = exc.__class__.__name__
            log.exception("mailbox %s: sink failed for message %s", self.config.name, meta.uid)
            return False
        report.stored.append(meta.uid or "")
        return True

    def _oversized(self, report: PollReport, uid: str, size: int) -> None:
        report.oversized[uid] = size
        log.warning("mailbox %s: message %s has %d bytes > %d, left on the server", self.config.name, uid, size,
                    self.config.max_bytes)

    # POP3 ------------------------------------------------------------------------------------------

    def _pop3_connect(self) -> poplib.POP3:
        c = self.config
        if c.tls is TlsMode.IMPLICIT:
            pop: poplib.POP3 = poplib.POP3_SSL(c.host, c.port, timeout=c.timeout_seconds, context=self._tls)
        else:
            pop = poplib.POP3(c.host, c.port, timeout=c.timeout_seconds)
            if c.tls is TlsMode.STARTTLS:
                pop.stls(self._tls)
        return pop

    def _poll_pop3(self) -> PollReport:
        c = self.config
        report = PollReport(c.name)
        pop = self._pop3_connect()
        committed = False
        try:
            pop.user(c.username)
            pop.pass_(c.password)
            sizes = {}
            for line in pop.list()[1]:
                num, size = line.split()
                sizes[int(num)] = int(size)
            uids = {}
            for line in pop.uidl()[1]:
                num, uid = line.split(maxsplit=1)
                uids[int(num)] = uid.decode("ascii", "replace")
            nums = sorted(sizes)
            report.seen = len(nums)
            eligible = []
            for num in nums:
                uid = uids.get(num, str(num))
                if sizes[num] > c.max_bytes:
                    self._oversized(report, uid, sizes[num])
                else:
                    eligible.append(num)
            batch, report.remaining = eligible[: c.max_messages], max(0, len(eligible) - c.max_messages)
            for num in batch:
                uid = uids.get(num, str(num))
                _, lines, _ = pop.retr(num)
                raw = b"\r\n".join(lines) + b"\r\n"  # poplib strips CRLF and un-stuffs dots
                if self._store(report, raw, self._meta(Source.POP3, uid, len(raw), c.tls is not TlsMode.NONE)):
                    self._pop3_delete(pop, num)
                    report.removed.append(uid)
            pop.quit()  # UPDATE state: the DELEs take effect only now (RFC 1939 section 6)
            committed = True
        finally:
            if not committed:
                try:
                    pop.close()  # no QUIT: the server keeps every message (RFC 1939 section 6)
                except OSError:
                    pass
        return report

    def _pop3_delete(self, pop: poplib.POP3, num: int) -> None:
        pop.dele(num)

    # IMAP ------------------------------------------------------------------------------------------

    def _imap_connect(self) -> imaplib.IMAP4:
        c = self.config
        if c.tls is TlsMode.IMPLICIT:
            imap: imaplib.IMAP4 = imaplib.IMAP4_SSL(c.host, c.port, ssl_context=self._tls,
                                                    timeout=c.timeout_seconds)
        else:
            imap = imaplib.IMAP4(c.host, c.port, timeout=c.timeout_seconds)
            if c.tls is TlsMode.STARTTLS:
                imap.starttls(self._tls)
        return imap

    def _poll_imap(self) -> PollReport:
        c = self.config
        report = PollReport(c.name)
        imap = self._imap_connect()
        try:
            imap.login(c.username, c.password)
            self._refresh_capabilities(imap)
            typ, _ = imap.select(_quote(c.folder))
            if typ != "OK":
                raise imaplib.IMAP4.error(f"cannot select {c.folder}")
            criteria = f"UNKEYWORD {c.flag}" if c.after is AfterStore.FLAG else "UNDELETED"
            typ, data = imap.uid("SEARCH", None, criteria)
            uids = [u.decode() for u in (data[0] or b"").split()] if typ == "OK" else []
            report.seen = len(uids)
            sizes = self._imap_sizes(imap, set(uids))
            eligible = []
            for uid in uids:
                if sizes.get(uid, 0) > c.max_bytes:
                    self._oversized(report, uid, sizes[uid])
                else:
                    eligible.append(uid)
            batch, report.remaining = eligible[: c.max_messages], max(0, len(eligible) - c.max_messages)
            for uid in batch:
                raw = self._imap_fetch(imap, uid)
                if raw is None:
                    report.failed[uid] = "fetch returned no body"
                    continue
                if self._store(report, raw, self._meta(Source.IMAP, uid, len(raw), c.tls is not TlsMode.NONE)):
                    self._imap_remove(imap, uid)
                    report.removed.append(uid)
            if report.removed and c.after is not AfterStore.FLAG and not self._uidplus(imap):
                imap.expunge()  # without UIDPLUS this also removes others' \Deleted messages
            try:
                imap.logout()
            except (imaplib.IMAP4.error, OSError):
                pass
        except BaseException:
            try:
                imap.shutdown()  # no EXPUNGE, no logout: messages not yet removed stay
            except OSError:
                pass
            raise
        return report

    @staticmethod
    def _refresh_capabilities(imap: imaplib.IMAP4) -> None:
        """Re-read CAPABILITY after login: servers add UIDPLUS, MOVE only then (imaplib does not)."""
        typ, data = imap.capability()
        if typ == "OK" and data and isinstance(data[-1], bytes):
            imap.capabilities = tuple(data[-1].decode("ascii", "replace").upper().split())

    @staticmethod
    def _uidplus(imap: imaplib.IMAP4) -> bool:
        return "UIDPLUS" in imap.capabilities

    def _imap_sizes(self, imap: imaplib.IMAP4, uids: set[str]) -> dict[str, int]:
        """RFC822.SIZE of the given UIDs (one UID FETCH 1:* instead of a long UID list)."""
        if not uids:
            return {}
        typ, data = imap.uid("FETCH", "1:*", "(RFC822.SIZE)")
        sizes: dict[str, int] = {}
        for item in data if typ == "OK" else []:
            line = item[0] if isinstance(item, tuple) else item
            if not isinstance(line, bytes):
                continue
            m_uid, m_size = _UID.search(line), _SIZE.search(line)
            if m_uid and m_size:
                uid = m_uid.group(1).decode()
                if uid in uids:
                    sizes[uid] = int(m_size.group(1))
        return sizes

    def _imap_fetch(self, imap: imaplib.IMAP4, uid: str) -> bytes | None:
        typ, data = imap.uid("FETCH", uid, "(BODY.PEEK[])")  # PEEK: fetching does not set \Seen
        if typ != "OK":
            return None
        for item in data:
            if isinstance(item, tuple):
                m = _UID.search(item[0])
                if m and m.group(1).decode() == uid:
                    return item[1]
        return None

    def _imap_remove(self, imap: imaplib.IMAP4, uid: str) -> None:
        c = self.config
        if c.after is AfterStore.FLAG:
            self._imap_ok(imap.uid("STORE", uid, "+FLAGS.SILENT", f"({c.flag})"), "STORE")
            return
        if c.after is AfterStore.MOVE:
            if "MOVE" in imap.capabilities:
                self._imap_ok(imap.uid("MOVE", uid, _quote(c.move_to or "")), "MOVE")
                return
            self._imap_ok(imap.uid("COPY", uid, _quote(c.move_to or "")), "COPY")
        self._imap_ok(imap.uid("STORE", uid, "+FLAGS.SILENT", r"(\Deleted)"), "STORE")
        if self._uidplus(imap):
            self._imap_ok(imap.uid("EXPUNGE", uid), "UID EXPUNGE")

    @staticmethod
    def _imap_ok(result: tuple[str, list], what: str) -> None:
        if result[0] != "OK":
            raise imaplib.IMAP4.error(f"{what} failed: {result[1]!r}")


_UID = re.compile(rb"UID (\d+)")
_SIZE = re.compile(rb"RFC822\.SIZE (\d+)")


def _quote(mailbox: str) -> str:
    """An IMAP mailbox name as a quoted string (RFC 3501 section 4.3)."""
    return '"' + mailbox.replace("\\", "\\\\").replace('"', '\\"') + '"'


def poll_once(config: MailboxConfig, sink: Sink) -> PollReport:
    """One poll of one mailbox (see ``MailboxPoller.poll_once``)."""
    return MailboxPoller(config, sink).poll_once()
