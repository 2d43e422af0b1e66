"""SMTP ingress: receives DRG DICOM e-mails and acknowledges each only after the sink stored it.

RFC 5321 (SMTP; section 4.2 reply codes, section 6.1 "MUST NOT lose the message" once 250 is sent),
RFC 1870 (SIZE), RFC 3207 (STARTTLS), RFC 3463 (enhanced status codes). Built on ``aiosmtpd``.

Memory bound: aiosmtpd holds one mail in memory while it reads DATA (a list of line buffers, then the joined
bytes: about 2-3 x the mail size at the peak), per connection in DATA. ``max_bytes`` caps it (also
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

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
