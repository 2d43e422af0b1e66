"""The gateway's configuration values built from the settings: retry policy, outbound routes, SMTP ingress.

Pure: reads ``Settings`` and returns the frozen config objects of ``server.mail`` and ``server.gateway.jobs``.
"""

from __future__ import annotations

import re

from server.config import Settings
from server.errors import ErrorKind, ServerError
from server.gateway.jobs import Backoff
from server.gateway.sites import Sites
from server.mail.relay import RelayConfig, Route
from server.mail.smtp_in import SmtpIngressConfig
from server.mail.transport import TlsMode

_ROUTE = re.compile(r"^\s*(?P<domain>[A-Za-z0-9.-]+)\s*=\s*(?:\[(?P<h6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+))"
                    r"(?::(?P<port>\d{1,5}))?(?:/(?P<tls>none|starttls|implicit))?\s*$")


def send_policy(settings: Settings) -> Backoff:
    """Retry policy of outbound mails and MDNs: doubling from the base delay up to the cap, with jitter."""
    return Backoff(base=settings.send_retry_base_seconds, factor=2.0,
                   cap=max(settings.send_retry_max_seconds, settings.send_retry_base_seconds),
                   jitter=0.2, max_attempts=settings.send_max_attempts)


def parse_routes(spec: str | None) -> dict[str, Route]:
    """Per-domain routes ``domain=host[:port][/tls],...`` (like an MTA's transport map; TLS default starttls).

    ``b.example=127.0.0.1:2526/none`` sends mail for ``…@b.example`` straight to a node on loopback.
    """
    routes: dict[str, Route] = {}
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        m = _ROUTE.match(item)
        if m is None:
            raise ServerError(ErrorKind.INVALID, f"bad mail route {item!r} (domain=host[:port][/none|starttls|"
                                                 "implicit])", parameter="mail_routes")
        port = int(m["port"] or 25)
        if not 0 < port < 65536:
            raise ServerError(ErrorKind.INVALID, f"bad port in mail route {item!r}", parameter="mail_routes")
        routes[m["domain"].lower().rstrip(".")] = Route(host=m["h6"] or m["host"], port=port,
                                                        tls=TlsMode(m["tls"] or "starttls"))
    return routes


def relay_config(settings: Settings) -> RelayConfig:
    """The outbound SMTP configuration: the smarthost (with AUTH) and the per-domain routes."""
    smarthost = None
    if settings.relay_host:
        smarthost = Route(host=settings.relay_host, port=settings.relay_port, tls=TlsMode(settings.relay_tls),
                          username=settings.relay_username, password=settings.relay_password)
    return RelayConfig(smarthost=smarthost, routes=parse_routes(settings.mail_routes),
                       helo_name=settings.smtp_hostname, ca_file=settings.relay_ca_file,
                       verify_tls=settings.relay_verify_tls, timeout_seconds=settings.relay_timeout_seconds)


def ingress_config(settings: Settings, sites: Sites, port: int) -> SmtpIngressConfig:
    """The SMTP ingress configuration: RCPT accepted for our sites' addresses only."""
    return SmtpIngressConfig(host=settings.smtp_host, port=port, hostname=settings.smtp_hostname,
                             max_bytes=settings.smtp_max_bytes, local_addresses=sites.addresses,
                             cert_file=settings.smtp_tls_cert, key_file=settings.smtp_tls_key,
                             require_tls=settings.smtp_require_tls)
