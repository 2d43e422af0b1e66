"""Shared values of the mail transport edges: TLS modes, the received-mail envelope, the SMTP reply table.

The receiving edges (``smtp_in``, ``poll``) hand each raw mail to a caller-supplied ``Sink``; they
acknowledge the mail (SMTP ``250``, POP3 ``DELE``+``QUIT``, IMAP ``\\Deleted``+``EXPUNGE``) only after the
sink returned, i.e. after the mail is durably stored (RFC 5321 section 6.1: "it MUST NOT lose the message").
"""

from __future__ import annotations

import datetime as dt
import enum
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from server.errors import ErrorKind


class TlsMode(str, enum.Enum):
    """How a client connection is protected (RFC 3207 STARTTLS, RFC 2595 STLS/STARTTLS, RFC 8314 implicit)."""

    STARTTLS = "starttls"  # plain connect, then STARTTLS/STLS; fail when the server does not offer it
    IMPLICIT = "tls"  # TLS from the first byte (SMTPS 465, IMAPS 993, POP3S 995)
    NONE = "none"  # no TLS (loopback and tests only; credentials are never sent in the clear)

    @classmethod
    def _missing_(cls, value: object) -> TlsMode | None:
        """``implicit`` is accepted for ``tls`` (the word the settings and the README use)."""
        return cls.IMPLICIT if isinstance(value, str) and value.lower() == "implicit" else None


class Source(str, enum.Enum):
    """Which edge received a mail."""

    SMTP = "smtp"
    POP3 = "pop3"
    IMAP = "imap"


@dataclass(frozen=True)
class Received:
    """Trace data of one received mail, handed to the sink beside the raw bytes (RFC 5321 section 4.4)."""

    source: Source
    id: str  # our id of this reception: SMTP queue id, or "<mailbox>:<UID>" for a mailbox
    size: int
    received_at: dt.datetime
    mail_from: str | None = None  # SMTP envelope (None for mailbox polls)
    rcpt_tos: tuple[str, ...] = ()
    peer: str | None = None  # SMTP client address "host:port" or the polled server
    helo: str | None = None
    tls: bool = False
    mailbox: str | None = None  # name of the polled mailbox config
    uid: str | None = None  # POP3 UIDL or IMAP UID


Sink = Callable[[bytes, Received], None]
"""Durably stores one raw mail or raises (a ServerError picks the reply); runs in a worker thread.

Must be idempotent: a crash between the sink and the acknowledgement delivers the same mail again (the
gateway dedups by Message-ID)."""


@dataclass(frozen=True)
class SmtpReply:
    """An SMTP reply code with its enhanced status code (RFC 5321 section 4.2, RFC 3463)."""

    code: int
    status: str
    text: str

    def render(self) -> str:
        """The reply line as sent on the wire."""
        return f"{self.code} {self.status} {self.text}"


# ErrorKind raised by the sink -> reply to the SMTP client. 4xx: the client keeps the mail and retries.
SMTP_REPLY_BY_KIND: dict[ErrorKind, SmtpReply] = {
    ErrorKind.INVALID: SmtpReply(554, "5.6.0", "Message content rejected"),
    ErrorKind.UNSUPPORTED: SmtpReply(554, "5.6.1", "Media not supported"),
    ErrorKind.NOT_ACCEPTABLE: SmtpReply(554, "5.6.0", "Message content rejected"),
    ErrorKind.NOT_FOUND: SmtpReply(550, "5.1.1", "Mailbox unavailable"),
    ErrorKind.CONFLICT: SmtpReply(554, "5.6.0", "Message conflicts with stored data"),
    ErrorKind.UNAUTHENTICATED: SmtpReply(530, "5.7.0", "Authentication required"),
    ErrorKind.FORBIDDEN: SmtpReply(550, "5.7.1", "Delivery not authorized"),
    ErrorKind.TOO_LARGE: SmtpReply(552, "5.3.4", "Message too big for system"),
    ErrorKind.SECURITY: SmtpReply(554, "5.7.5", "Cryptographic failure"),
    ErrorKind.UPSTREAM: SmtpReply(451, "4.4.0", "Temporary failure, try again later"),
    ErrorKind.TIMEOUT: SmtpReply(451, "4.4.2", "Timeout, try again later"),
    ErrorKind.INTERNAL: SmtpReply(451, "4.3.0", "Local error in processing, try again later"),
    ErrorKind.RESOURCES: SmtpReply(452, "4.3.1", "Insufficient system storage, try again later"),
}

REPLY_STORED = SmtpReply(250, "2.0.0", "Ok: stored as")
REPLY_RCPT_OK = SmtpReply(250, "2.1.5", "Ok")
REPLY_RCPT_NOT_LOCAL = SmtpReply(550, "5.1.1", "Recipient not local to this server")
REPLY_TOO_MANY_RCPTS = SmtpReply(452, "4.5.3", "Too many recipients")
REPLY_UNEXPECTED = SMTP_REPLY_BY_KIND[ErrorKind.INTERNAL]


def client_tls_context(ca_file: Path | str | None = None, *, verify: bool = True) -> ssl.SSLContext:
    """A client TLS context: system trust store (or ``ca_file``), hostname check on unless ``verify=False``."""
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def utcnow() -> dt.datetime:
    """Now, timezone-aware (UTC)."""
    return dt.datetime.now(dt.timezone.utc)


__all__ = [
    "REPLY_RCPT_NOT_LOCAL", "REPLY_RCPT_OK", "REPLY_STORED", "REPLY_TOO_MANY_RCPTS", "REPLY_UNEXPECTED",
    "SMTP_REPLY_BY_KIND", "Received", "Sink", "SmtpReply", "Source", "TlsMode", "client_tls_context",
]
