"""SMTP ingress: receives DRG DICOM e-mails and acknowledges each only after the sink stored it.

RFC 5321 (SMTP; section 4.2 reply codes, section 6.1 "MUST NOT lose the message" once 250 is sent),
RFC 1870 (SIZE), RFC 3207 (STARTTLS), RFC 3463 (enhanced status codes). Built on ``aiosmtpd``.

Memory bound: DATA is read in chunks (``_Session.smtp_DATA``, aiosmtpd's per-line reader costs 15-25 % of
the CPU per DICOM mail) into one buffer, then copied once into the bytes the sink gets: about 2 x the mail size
at the peak, per connection in DATA. ``max_bytes`` caps it (also
advertised in the EHLO ``SIZE`` keyword and checked against ``MAIL FROM ... SIZE=``); aiosmtpd offers no
hook to spool DATA to a file, so a spooling threshold is not implemented. ``max_connections`` bounds the
sessions (421 above it), so the memory bound is ``max_connections x 3 x max_bytes``.

Stop: the listener closes, mails whose sink is running get their reply (up to ``grace_seconds``), then
every open session is told ``421`` (RFC 5321 section 3.8) and closed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, syntax

from server.errors import ServerError
from server.mail.transport import (
    REPLY_RCPT_NOT_LOCAL,
    REPLY_RCPT_OK,
    REPLY_STORED,
    REPLY_TOO_MANY_RCPTS,
    REPLY_UNEXPECTED,
    SMTP_REPLY_BY_KIND,
    Received,
    Sink,
    Source,
    utcnow,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * 1024**2


@dataclass(frozen=True)
class SmtpIngressConfig:
    """Settings of the SMTP ingress (to be wired into ``server.config.Settings``)."""

    host: str = "127.0.0.1"
    port: int = 2525
    hostname: str = "localhost"  # name in the greeting and the EHLO reply
    max_bytes: int = DEFAULT_MAX_BYTES  # largest mail (SIZE); replies 552 above
    local_domains: tuple[str, ...] = ()  # RCPT accepted for these domains ...
    local_addresses: tuple[str, ...] = ()  # ... and these full addresses; 550 for all others
    cert_file: Path | None = None  # PEM certificate chain: STARTTLS is offered when set
    key_file: Path | None = None
    require_tls: bool = False  # 530 to every command but EHLO/NOOP/QUIT before STARTTLS
    max_recipients: int = 100  # 452 4.5.3 above (RFC 5321 section 4.5.3.1.8 asks for >= 100)
    max_connections: int = 64  # concurrent sessions; 421 to further ones
    grace_seconds: float = 30.0  # on stop, wait this long for running sinks
    timeout_seconds: float = 300.0  # idle timeout of a connection (RFC 5321 section 4.5.3.2)
    sink_threads: int = 8  # worker threads running the sink

    def tls_context(self) -> ssl.SSLContext | None:
        """The server TLS context from ``cert_file``/``key_file``, or None when TLS is off."""
        if self.cert_file is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


REPLY_BUSY = b"421 4.3.2 Too many connections, try again later\r\n"
REPLY_SHUTDOWN = b"421 4.3.2 Service shutting down, try again later\r\n"
ERROR_LINE_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"  # aiosmtpd's wording
ERROR_TOO_MUCH = "552 Error: Too much mail data"
_DATA_CHUNK = 256 * 1024  # stream limit while reading DATA: readuntil scans and hands over up to this much


def _longest_line(data: bytes) -> int:
    """Length of the longest "\r\n"-separated line of ``data`` without its CRLF (C-speed split)."""
    return max(map(len, data.split(b"\r\n")))


class _Session(SMTP):
    """aiosmtpd's SMTP protocol, registered with the ingress while connected."""

    def __init__(self, ingress: SmtpIngress, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._ingress = ingress

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._ingress.connections.add(self)  # called again after STARTTLS: a set
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._ingress.connections.discard(self)
        super().connection_lost(error)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd 1.4.6's ``SMTP.smtp_DATA`` with a chunked reader instead of one ``readuntil`` per line.

        Same replies in the same cases: 503/501 before 354; after the data (drained in full, RFC 5321
        section 4.2.5) 500 "Line too long" or 552 for whichever aiosmtpd meets first in the stream, nothing
        kept; dot-unstuffing of every line starting with "."; bytes after the end marker stay in the reader
        (pipelining, RFC 2920); connection loss closes the writer and ends the session.
        """
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return

        reader = self._reader
        # aiosmtpd creates the reader with limit=line_length_limit (1001): readuntil() would overrun every
        # kilobyte and the transport pause at 2 kB. Raised while in DATA, restored before the next command.
        stream_limit: int = reader._limit  # type: ignore[attr-defined]
        reader._limit = max(stream_limit, _DATA_CHUNK)  # type: ignore[attr-defined]
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            data, error = await self._read_data(stream_limit)
        finally:
            reader._limit = stream_limit  # type: ignore[attr-defined]
        if error is not None:
            await self.push(error)
            self._set_post_data_state()
            return

        # De-transparency (RFC 5321 section 4.5.2): every line starting with "." loses it.
        original_content = data[1:] if data[:1] == b"." else data
        del data
        if b"\r\n." in original_content:
            original_content = original_content.replace(b"\r\n.", b"\r\n")

        # From here on a copy of aiosmtpd 1.4.6's SMTP.smtp_DATA tail (content, handler hook, reply).
        content: str | bytes
        if self._decode_data:
            if self.enable_SMTPUTF8:
                content = original_content.decode("utf-8", errors="surrogateescape")
            else:
                try:
                    content = original_content.decode("ascii", errors="strict")
                except UnicodeDecodeError:
                    await self.push("500 Error: strict ASCII mode")
                    return
        else:
            content = original_content
        self.envelope.content = content
        self.envelope.original_content = original_content

        if "DATA" in self._handle_hooks:
            status = await self._call_handler_hook("DATA")
        else:
            status = MISSING
            if hasattr(self.event_handler, "process_message"):
                warnings.warn("Use handler.handle_DATA() instead of .process_message()", DeprecationWarning)
                assert self.session is not None
                args = (self.session.peer, self.envelope.mail_from, self.envelope.rcpt_tos, self.envelope.content)
                if asyncio.iscoroutinefunction(self.event_handler.process_message):
                    status = await self.event_handler.process_message(*args)
                else:
                    status = self.event_handler.process_message(*args)
                if status is None:
                    status = MISSING
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    async def _read_data(self, stream_limit: int) -> tuple[bytes, str | None]:
        """The (dot-stuffed) content up to the end marker, consumed from the reader; or an error reply.

        The end is ".\r\n" at a line start (the data starts at one). ``readuntil(b".\r\n")`` stops at
        every ".\r\n"; one not preceded by "\r\n" is content. A ``LimitOverrunError`` hands over what can
        be consumed without cutting a ".\r\n" in two.

        Errors as aiosmtpd 1.4.6 orders them: it reads lines (split at "\r\n" only) and, for each line,
        sets 500 first when the line's length without CRLF exceeds its stream limit (``stream_limit``,
        before counting the line), then 552 when the byte count passes ``data_size_limit``, then 500 when the
        line with CRLF exceeds ``line_length_limit``; the first one set wins.
        """
        reader = self._reader
        data = bytearray()
        limit = self.data_size_limit
        max_line = self.line_length_limit - 2  # longest line without its CRLF
        num_bytes = 0  # bytes of content received, counted as aiosmtpd does (stuffed, CRLFs, no end marker)
        tail = b"\r\n"  # the last two bytes received; the data starts at a line start
        error: str | None = None
        crossing: bytearray | None = None  # the line crossing data_size_limit, while its outcome is open
        while True:
            try:
                chunk = await reader.readuntil(b".\r\n")
                before = chunk[-5:-3] if len(chunk) >= 5 else (tail + chunk[:-3])[-2:]
                end = before == b"\r\n"
                if end:
                    chunk = chunk[:-3]
            except asyncio.LimitOverrunError as exc:
                chunk = await reader.read(exc.consumed)
                end = False
            except (asyncio.CancelledError, asyncio.IncompleteReadError) as exc:
                # The connection got reset during DATA (aiosmtpd: eof_received/connection_lost cancel us).
                log.info("Connection lost during DATA")
                self._writer.close()
                if isinstance(exc, asyncio.IncompleteReadError):
                    raise asyncio.CancelledError from exc
                raise
            if chunk:
                num_bytes += len(chunk)
                tail = chunk[-2:] if len(chunk) >= 2 else (tail + chunk)[-2:]
                if error is None:
                    if crossing is not None:
                        crossing += chunk
                        error = self._crossing_outcome(crossing, stream_limit)
                        if error is not None:
                            crossing = None
                    else:
                        data += chunk
                        if limit and num_bytes > limit:
                            # data holds all received bytes: index `limit` is the first one over
                            start = data.rfind(b"\r\n", 0, limit)  # CRLF ending the previous line
                            start = start + 2 if start >= 0 else 0
                            if _longest_line(bytes(data[:start])) > max_line:
                                error = ERROR_LINE_TOO_LONG
                            else:
                                crossing = data[start:]
                                error = self._crossing_outcome(crossing, stream_limit)
                                if error is not None:
                                    crossing = None
                            data = bytearray()  # discard at once: memory stays near data_size_limit
            if end:
                break
        # the content ends with CRLF, so a line crossing the size limit has been decided
        assert crossing is None
        if error is not None:
            return b"", error
        raw = bytes(data)
        del data
        if _longest_line(raw) > max_line:
            return b"", ERROR_LINE_TOO_LONG
        return raw, None

    @staticmethod
    def _crossing_outcome(line: bytearray, stream_limit: int) -> str | None:
        """The reply for the line that passed the size limit, once known (None while the line is open).

        aiosmtpd reads a line longer than its stream limit in fragments and sets 500 before counting the
        first one; a shorter line is counted whole and passes the size limit first: 552.
        """
        end = line.find(b"\r\n")
        if end >= 0:
            return ERROR_LINE_TOO_LONG if end > stream_limit else ERROR_TOO_MUCH
        if len(line) - 1 > stream_limit:  # the last byte may be the CR of the CRLF
            return ERROR_LINE_TOO_LONG
        return None


class _Busy(asyncio.Protocol):
    """Answers 421 and closes: a session over ``max_connections`` (RFC 5321 section 3.8)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(REPLY_BUSY)
        transport.close()


class _Handler:
    """aiosmtpd hooks: RCPT restricted to local recipients, DATA handed to the sink off the event loop."""

    def __init__(self, ingress: SmtpIngress) -> None:
        self._ingress = ingress

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if not self._ingress.is_local(address):
            return REPLY_RCPT_NOT_LOCAL.render()
        if len(envelope.rcpt_tos) >= self._ingress.max_recipients:
            return REPLY_TOO_MANY_RCPTS.render()
        envelope.rcpt_tos.append(address)
        return REPLY_RCPT_OK.render()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        queue_id = uuid.uuid4().hex[:16].upper()
        peer = session.peer
        meta = Received(
            source=Source.SMTP,
            id=queue_id,
            size=len(raw),
            received_at=utcnow(),
            mail_from=envelope.mail_from,
            rcpt_tos=tuple(envelope.rcpt_tos),
            peer=f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer),
            helo=session.host_name,
            tls=session.ssl is not None,
        )
        try:
            await self._ingress.run_sink(raw, meta)
        except ServerError as exc:
            reply = SMTP_REPLY_BY_KIND[exc.kind]
            log.warning("smtp %s from %s refused by the sink: %s %s", queue_id, meta.peer, reply.code,
                        exc.message)
            return reply.render()
        except Exception:  # a failing sink is a temporary local error; the client retries
            log.exception("smtp %s from %s: sink failed (correlation id %s)", queue_id, meta.peer, queue_id)
            return REPLY_UNEXPECTED.render()
        return f"{REPLY_STORED.render()} {queue_id}"


class SmtpIngress:
    """An SMTP server whose ``250`` after DATA means "the sink stored it".

    Use ``await start()``/``await stop()`` on a running event loop (FastAPI lifespan), or
    ``start_in_thread()``/``stop_thread()`` to run it on its own loop in a thread (CLI, tests).
    ``port=0`` picks a free port; read it from ``port`` after start.
    """

    def __init__(self, host: str, port: int, sink: Sink, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 tls_context: ssl.SSLContext | None = None, require_tls: bool = False,
                 hostname: str = "localhost", local_domains: tuple[str, ...] | list[str] = (),
                 local_addresses: tuple[str, ...] | list[str] = (), max_recipients: int = 100,
                 timeout_seconds: float = 300.0, sink_threads: int = 8, max_connections: int = 64,
                 grace_seconds: float = 30.0) -> None:
        if require_tls and tls_context is None:
            raise ValueError("require_tls needs a tls_context")
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.host = host
        self.port = port
        self.hostname = hostname
        self.max_bytes = max_bytes
        self.max_recipients = max_recipients
        self._sink = sink
        self._tls_context = tls_context
        self._require_tls = require_tls
        self._timeout = timeout_seconds
        self._sink_threads = sink_threads
        self.max_connections = max_connections
        self._grace = grace_seconds
        self.connections: set[_Session] = set()
        self._busy = 0  # sinks running
        self._local_domains = frozenset(d.lower().rstrip(".") for d in local_domains)
        self._local_addresses = frozenset(a.lower() for a in local_addresses)
        self._handler = _Handler(self)
        self._server: asyncio.base_events.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, config: SmtpIngressConfig, sink: Sink) -> SmtpIngress:
        """An ingress built from its settings."""
        return cls(config.host, config.port, sink, max_bytes=config.max_bytes, tls_context=config.tls_context(),
                   require_tls=config.require_tls, hostname=config.hostname, local_domains=config.local_domains,
                   local_addresses=config.local_addresses, max_recipients=config.max_recipients,
                   timeout_seconds=config.timeout_seconds, sink_threads=config.sink_threads,
                   max_connections=config.max_connections, grace_seconds=config.grace_seconds)

    def is_local(self, address: str) -> bool:
        """True when ``address`` is one of ours (RFC 5321 section 3.6.2: no open relay)."""
        addr = address.strip().strip("<>").lower()
        if addr in self._local_addresses:
            return True
        _, at, domain = addr.rpartition("@")
        return bool(at) and domain.rstrip(".") in self._local_domains

    async def run_sink(self, raw: bytes, meta: Received) -> None:
        """Run the sink in a worker thread, never on the event loop."""
        assert self._executor is not None
        self._busy += 1
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._sink, raw, meta)
        finally:
            self._busy -= 1  # the reply is written in this same loop step, before stop() can close

    def _protocol(self) -> asyncio.Protocol:
        if len(self.connections) >= self.max_connections:
            log.warning("smtp ingress: %d sessions, refusing another with 421", len(self.connections))
            return _Busy()
        return _Session(
            self,
            self._handler,
            data_size_limit=self.max_bytes,
            hostname=self.hostname,
            ident="telerad-bridge ESMTP",
            tls_context=self._tls_context,
            require_starttls=self._require_tls,
            timeout=self._timeout,
            auth_required=False,
            enable_SMTPUTF8=True,
        )

    async def start(self) -> None:
        """Listen on the running event loop."""
        if self._server is not None:
            raise RuntimeError("already started")
        self._executor = ThreadPoolExecutor(max_workers=self._sink_threads, thread_name_prefix="smtp-sink")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, host=self.host, port=self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("smtp ingress listening on %s:%s", self.host, self.port)

    async def stop(self) -> None:
        """Stop listening; running sinks finish and get their reply, then open sessions get 421."""
        server, self._server = self._server, None
        loop = asyncio.get_running_loop()
        if server is not None:
            server.close()
            deadline = loop.time() + self._grace
            while self._busy and loop.time() < deadline:
                await asyncio.sleep(0.02)
            for session in list(self.connections):
                transport = session.transport
                if transport is not None and not transport.is_closing():
                    transport.write(REPLY_SHUTDOWN)  # type: ignore[attr-defined]
                    transport.close()
            await server.wait_closed()
        executor, self._executor = self._executor, None
        if executor is not None:
            await loop.run_in_executor(None, executor.shutdown, True)

    async def __aenter__(self) -> SmtpIngress:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start_in_thread(self) -> None:
        """Run the server on its own event loop in a daemon thread; returns once it listens."""
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # reported to the starting thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="smtp-ingress", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            raise failure[0]

    def stop_thread(self, timeout: float = 30.0) -> None:
        """Stop a server started with ``start_in_thread``."""
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._loop = self._thread = None
