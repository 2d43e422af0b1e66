"""Outbound SMTP: hands raw mails to a smarthost or, per recipient domain, to a configured route.

RFC 5321 (SMTP; section 4.2.1: 4yz transient, 5yz permanent), RFC 3207 (STARTTLS), RFC 4954 (AUTH; PLAIN
RFC 4616, LOGIN), RFC 1870 (SIZE), RFC 8314 (implicit TLS). The routes work like an MTA transport map
(Postfix ``transport(5)``): ``{"site-b.example": Route("127.0.0.1", 2526, TlsMode.NONE)}`` lets two nodes
talk directly. Failures are raised as ``TransientSendError`` (retry later) or ``PermanentSendError``
(dead-letter), each carrying the SMTP code when the server gave one.
"""

from __future__ import annotations

import asyncio
import logging
import re
import smtplib
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from server.errors import ErrorKind, ServerError
from server.mail.transport import TlsMode, client_tls_context

log = logging.getLogger(__name__)

# Permanent (5yz) reply code -> kind; other 5yz codes are FORBIDDEN (the peer's policy refused the mail).
PERMANENT_KIND_BY_CODE: dict[int, ErrorKind] = {
    530: ErrorKind.UNAUTHENTICATED,  # authentication / STARTTLS required
    534: ErrorKind.UNAUTHENTICATED,  # mechanism too weak
    535: ErrorKind.UNAUTHENTICATED,  # credentials invalid (RFC 4954)
    550: ErrorKind.NOT_FOUND,  # mailbox unavailable / unknown user
    551: ErrorKind.NOT_FOUND,  # user not local
    552: ErrorKind.TOO_LARGE,  # exceeded storage allocation / message too big
    553: ErrorKind.INVALID,  # mailbox name not allowed
    555: ErrorKind.INVALID,  # MAIL/RCPT parameters not recognised
    501: ErrorKind.INVALID,  # syntax error in parameters
}
PERMANENT_DEFAULT_KIND = ErrorKind.FORBIDDEN


class SendError(ServerError):
    """A mail could not be handed over; ``code`` is the SMTP reply code if the server gave one."""

    retryable: bool = False

    def __init__(self, kind: ErrorKind, message: str, *, code: int | None = None, reply: str | None = None,
                 host: str | None = None) -> None:
        super().__init__(kind, message)
        self.code = code
        self.reply = reply
        self.host = host


class TransientSendError(SendError):
    """4yz reply, connection refused/reset, timeout, TLS failure: the job queue retries later."""

    retryable = True


class PermanentSendError(SendError):
    """5yz reply (unknown user, too large, bad credentials, policy): retrying will not help; dead-letter."""

    retryable = False


@dataclass(frozen=True)
class Route:
    """Where mail for a domain goes: host, port, TLS mode and optional AUTH credentials."""

    host: str
    port: int = 25
    tls: TlsMode = TlsMode.STARTTLS
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tls", TlsMode(self.tls))
        if self.username is not None and self.tls is TlsMode.NONE:
            raise ValueError(f"route {self.host}:{self.port}: AUTH credentials need TLS")


@dataclass(frozen=True)
class RelayConfig:
    """Outbound SMTP settings (to be wired into ``server.config.Settings``)."""

    smarthost: Route | None = None  # used for every domain without a route
    routes: Mapping[str, Route] = field(default_factory=dict)  # recipient domain -> route
    helo_name: str = "localhost"  # our name in EHLO
    ca_file: Path | None = None  # trust anchors for the peers' certificates; default: system store
    verify_tls: bool = True  # verify certificate and host name (never off in production)
    timeout_seconds: float = 60.0  # per socket operation

    def __post_init__(self) -> None:
        routes = {d.lower().rstrip("."): r for d, r in dict(self.routes).items()}
        object.__setattr__(self, "routes", MappingProxyType(routes))

    def route_for(self, domain: str) -> Route:
        """The route of a recipient domain, else the smarthost."""
        route = self.routes.get(domain.lower().rstrip("."), self.smarthost)
        if route is None:
            raise PermanentSendError(ErrorKind.INVALID, f"no route for domain {domain!r} and no smarthost")
        return route


@dataclass(frozen=True)
class Sent:
    """The outcome of one successful hand-over to one route."""

    host: str
    port: int
    code: int
    reply: str  # the server's final reply, usually with its queue id
    recipients: tuple[str, ...]
    refused: Mapping[str, tuple[int, str]] = field(default_factory=dict)  # recipient -> (code, text)


_BARE_LF = re.compile(rb"(?<!\r)\n")


def _crlf(raw: bytes) -> bytes:
    """Canonical CRLF line ends (RFC 5321 section 2.3.8): bare LF becomes CRLF (two C-speed counts first: our
    own mails are canonical already, and the regex costs ~50 ms on a 1 MB mail)."""
    if raw.count(b"\n") == raw.count(b"\r\n"):
        return raw
    return _BARE_LF.sub(b"\r\n", raw)


def _dot_stuffed(data: bytes) -> bytes:
    """The DATA content with RFC 5321 section 4.5.2 transparency and the end-of-data line, for CRLF-canonical
    ``data`` (a line starting with "." gets one more; base64 lines never do, so usually nothing to copy)."""
    if data.startswith(b"."):
        data = b"." + data
    if b"\n." in data:
        data = data.replace(b"\n.", b"\n..")
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


def _text(reply: bytes | str) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)


def _classify(code: int, reply: str, host: str, what: str) -> SendError:
    """An SMTP reply code as transient (4yz) or permanent (5yz) send error (RFC 5321 section 4.2.1)."""
    message = f"{host}: {what} refused: {code} {reply}"
    if 400 <= code < 500:
        return TransientSendError(ErrorKind.UPSTREAM, message, code=code, reply=reply, host=host)
    return PermanentSendError(PERMANENT_KIND_BY_CODE.get(code, PERMANENT_DEFAULT_KIND), message, code=code,
                              reply=reply, host=host)


class Relay:
    """Sends raw mails over SMTP; blocking ``send`` (run it in a thread) or ``asend`` on an event loop."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self._tls = client_tls_context(config.ca_file, verify=config.verify_tls)

    async def asend(self, raw: bytes, mail_from: str, rcpt_tos: Sequence[str]) -> list[Sent]:
        """``send`` in a worker thread."""
        return await asyncio.to_thread(self.send, raw, mail_from, rcpt_tos)

    def send(self, raw: bytes, mail_from: str, rcpt_tos: Sequence[str]) -> list[Sent]:
        """Send ``raw`` to every recipient, one transaction per route; raise a SendError on failure.

        With several routes, a failure on a later route leaves earlier ones delivered: send one recipient
        per mail (as the DRG profile does) when a retry must not duplicate.
        """
        if not rcpt_tos:
            raise PermanentSendError(ErrorKind.INVALID, "no recipients")
        by_route: dict[Route, list[str]] = {}
        for rcpt in rcpt_tos:
            domain = rcpt.rpartition("@")[2]
            if not domain:
                raise PermanentSendError(ErrorKind.INVALID, f"recipient {rcpt!r} has no domain")
            by_route.setdefault(self.config.route_for(domain), []).append(rcpt)
        data = _crlf(raw)
        return [self._send_route(route, data, mail_from, rcpts) for route, rcpts in by_route.items()]

    def _connect(self, route: Route) -> smtplib.SMTP:
        timeout = self.config.timeout_seconds
        helo = self.config.helo_name
        if route.tls is TlsMode.IMPLICIT:
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(route.host, route.port, local_hostname=helo, timeout=timeout,
                                                  context=self._tls)
        else:
            smtp = smtplib.SMTP(route.host, route.port, local_hostname=helo, timeout=timeout)
        try:
            smtp.ehlo()
            if route.tls is TlsMode.STARTTLS:
                if not smtp.has_extn("starttls"):
                    raise TransientSendError(ErrorKind.SECURITY, f"{route.host}: STARTTLS required but not offered",
                                             host=route.host)
                code, reply = smtp.starttls(context=self._tls)
                if code != 220:
                    raise _classify(code, _text(reply), route.host, "STARTTLS")
                smtp.ehlo()
            if route.username is not None:
                self._auth(smtp, route)
        except BaseException:
            smtp.close()
            raise
        return smtp

    def _auth(self, smtp: smtplib.SMTP, route: Route) -> None:
        """AUTH PLAIN (RFC 4616), else LOGIN; never over a connection without TLS."""
        if not smtp.has_extn("auth"):
            raise TransientSendError(ErrorKind.UPSTREAM, f"{route.host}: AUTH not offered (relay settings?)",
                                     host=route.host)
        offered = smtp.esmtp_features.get("auth", "").upper().split()
        smtp.user, smtp.password = route.username or "", route.password or ""
        mechanism = "PLAIN" if "PLAIN" in offered else "LOGIN" if "LOGIN" in offered else None
        if mechanism is None:
            raise TransientSendError(ErrorKind.UPSTREAM, f"{route.host}: neither AUTH PLAIN nor LOGIN offered",
                                     host=route.host)
        authobject = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
        smtp.auth(mechanism, authobject, initial_response_ok=True)

    def _send_route(self, route: Route, data: bytes, mail_from: str, rcpts: list[str]) -> Sent:
        host = f"{route.host}:{route.port}"
        try:
            smtp = self._connect(route)
            try:
                options = [f"SIZE={len(data)}"] if smtp.has_extn("size") else []
                code, reply = smtp.mail(mail_from, options)
                if code != 250:
                    raise _classify(code, _text(reply), host, "MAIL FROM")
                refused: dict[str, tuple[int, str]] = {}
                accepted: list[str] = []
                for rcpt in rcpts:
                    code, reply = smtp.rcpt(rcpt)
                    if code in (250, 251):
                        accepted.append(rcpt)
                    else:
                        refused[rcpt] = (code, _text(reply))
                if not accepted:
                    code, text = next(iter(refused.values()))
                    smtp.rset()
                    raise _classify(code, text, host, f"RCPT TO {', '.join(refused)}")
                code, reply = smtp.docmd("DATA")  # smtplib's data() runs two regexes over the whole mail
                if code != 354:
                    raise _classify(code, _text(reply), host, "DATA")
                smtp.send(_dot_stuffed(data))
                code, reply = smtp.getreply()
                if code != 250:
                    raise _classify(code, _text(reply), host, "DATA")
                try:
                    smtp.quit()
                except (smtplib.SMTPException, OSError):
                    pass  # the mail is accepted; a failing QUIT does not change that
            finally:
                smtp.close()
        except SendError:
            raise
        except smtplib.SMTPAuthenticationError as exc:
            # Our own credentials at our relay: the operator fixes them, the queued mails wait (4xx-like).
            raise TransientSendError(ErrorKind.UPSTREAM, f"{host}: AUTH refused: {exc.smtp_code} "
                                     f"{_text(exc.smtp_error)} (check the relay user and password)",
                                     code=exc.smtp_code, reply=_text(exc.smtp_error), host=host) from exc
        except smtplib.SMTPResponseException as exc:  # includes SMTPDataError
            raise _classify(exc.smtp_code, _text(exc.smtp_error), host, "command") from exc
        except smtplib.SMTPRecipientsRefused as exc:  # pragma: no cover - we send RCPT ourselves
            raise PermanentSendError(ErrorKind.NOT_FOUND, f"{host}: recipients refused", host=host) from exc
        except (socket.timeout, TimeoutError) as exc:
            raise TransientSendError(ErrorKind.TIMEOUT, f"{host}: timed out", host=host) from exc
        except ssl.SSLError as exc:
            raise TransientSendError(ErrorKind.SECURITY, f"{host}: TLS failed: {exc.__class__.__name__}",
                                     host=host) from exc
        except (smtplib.SMTPException, OSError) as exc:  # refused, reset, disconnected, DNS
            if isinstance(exc.__context__, (socket.timeout, TimeoutError)):  # smtplib wraps read timeouts
                raise TransientSendError(ErrorKind.TIMEOUT, f"{host}: timed out", host=host) from exc
            raise TransientSendError(ErrorKind.UPSTREAM, f"{host}: {exc.__class__.__name__}: {exc}",
                                     host=host) from exc
        if refused:
            log.warning("smtp relay %s: recipients refused %s", host, refused)
        return Sent(route.host, route.port, code, _text(reply), tuple(accepted), MappingProxyType(refused))
