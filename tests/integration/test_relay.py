"""Outbound relay against a real smarthost (aiosmtpd, STARTTLS + AUTH required) and our own ingress."""

from __future__ import annotations

import asyncio

import pytest

from server.errors import ErrorKind
from server.mail.relay import PermanentSendError, Relay, RelayConfig, Route, TransientSendError
from server.mail.smtp_in import SmtpIngress
from server.mail.transport import TlsMode
from tests.mail_servers import RelayServer, free_port, mail, make_cert, relay_server, tls_cert  # noqa: F401


def _relay(server: RelayServer, *, password: str | None = None, tls: TlsMode = TlsMode.STARTTLS,
           routes: dict | None = None, **kw) -> Relay:
    smarthost = Route("127.0.0.1", server.port, tls, server.username,
                      server.password if password is None else password)
    return Relay(RelayConfig(smarthost=smarthost, routes=routes or {}, helo_name="mx.site-a.example",
                             ca_file=server.cert, timeout_seconds=10, **kw))


def test_send_via_smarthost_with_starttls_and_auth(relay_server):
    raw = mail()
    sent = _relay(relay_server).send(raw, "a@site-a.example", ["b@site-b.example"])
    assert len(sent) == 1 and sent[0].code == 250 and "queued as RELAY1" in sent[0].reply
    assert sent[0].recipients == ("b@site-b.example",) and not sent[0].refused
    assert relay_server.received == [("a@site-a.example", ["b@site-b.example"], raw)]


def test_bare_lf_is_sent_as_crlf(relay_server):
    _relay(relay_server).send(b"Subject: x\n\nline1\nline2\n", "a@site-a.example", ["b@site-b.example"])
    assert relay_server.received[0][2] == b"Subject: x\r\n\r\nline1\r\nline2\r\n"


@pytest.mark.parametrize("body", [b".starts with a dot\r\n..two\r\n.\r\nend", b"no final line break", b"."])
def test_lines_starting_with_a_dot_arrive_unchanged(relay_server, body):
    """RFC 5321 4.5.2 transparency: the receiver gets exactly what was sent (the final CRLF added if missing)."""
    raw = b"Subject: dots\r\n\r\n" + body
    _relay(relay_server).send(raw, "a@site-a.example", ["b@site-b.example"])
    expected = raw if raw.endswith(b"\r\n") else raw + b"\r\n"
    assert relay_server.received[0][2] == expected


def test_login_mechanism_when_plain_is_not_offered(tls_cert):
    server = RelayServer(*tls_cert).start()
    try:
        server._controller.SMTP_kwargs["auth_exclude_mechanism"] = ["PLAIN"]  # type: ignore[attr-defined]
        relay = _relay(server)
        used: list[str] = []
        original = relay._auth

        def spy(smtp, route):
            used.append(smtp.esmtp_features["auth"])
            original(smtp, route)

        relay._auth = spy  # type: ignore[method-assign]
        sent = relay.send(mail(), "a@site-a.example", ["b@site-b.example"])
        assert sent[0].code == 250 and "PLAIN" not in used[0] and "LOGIN" in used[0]
    finally:
        server.stop()


def test_wrong_password_is_a_retryable_535(relay_server):
    """Our own credentials at our relay: the operator fixes them and the queued mails go then."""
    with pytest.raises(TransientSendError) as err:
        _relay(relay_server, password="wrong").send(mail(), "a@site-a.example", ["b@site-b.example"])
    assert err.value.code == 535 and err.value.retryable and "AUTH refused" in err.value.message
    assert "wrong" not in err.value.message
    assert relay_server.received == []


def test_server_requiring_starttls_refuses_a_plain_client(relay_server):
    route = Route("127.0.0.1", relay_server.port, TlsMode.NONE)
    relay = Relay(RelayConfig(smarthost=route, ca_file=relay_server.cert, timeout_seconds=10))
    with pytest.raises(PermanentSendError) as err:
        relay.send(mail(), "a@site-a.example", ["b@site-b.example"])
    assert err.value.code == 530


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_starttls_required_but_not_offered_is_transient(tls_cert):
    server = RelayServer(*tls_cert, offer_tls=False).start()
    try:
        with pytest.raises(TransientSendError) as err:
            _relay(server).send(mail(), "a@site-a.example", ["b@site-b.example"])
        assert err.value.kind is ErrorKind.SECURITY and err.value.retryable
    finally:
        server.stop()


def test_untrusted_certificate_is_refused(relay_server, tmp_path):
    other_ca, _ = make_cert(tmp_path / "other")
    smarthost = Route("127.0.0.1", relay_server.port, TlsMode.STARTTLS, relay_server.username,
                      relay_server.password)
    relay = Relay(RelayConfig(smarthost=smarthost, ca_file=other_ca, timeout_seconds=10))
    with pytest.raises(TransientSendError) as err:
        relay.send(mail(), "a@site-a.example", ["b@site-b.example"])
    assert err.value.kind is ErrorKind.SECURITY
    assert relay_server.received == []


def test_recipient_refused_is_permanent_550(relay_server):
    relay_server.refuse.add("nobody@site-b.example")
    with pytest.raises(PermanentSendError) as err:
        _relay(relay_server).send(mail(), "a@site-a.example", ["nobody@site-b.example"])
    assert err.value.code == 550 and err.value.kind is ErrorKind.NOT_FOUND
    # one of two refused: the mail goes to the other, the refusal is reported
    sent = _relay(relay_server).send(mail(), "a@site-a.example", ["nobody@site-b.example", "b@site-b.example"])
    assert sent[0].recipients == ("b@site-b.example",) and sent[0].refused["nobody@site-b.example"][0] == 550


def test_too_large_is_permanent_552(relay_server):
    relay_server.max_bytes = 1000
    relay_server._controller.SMTP_kwargs["data_size_limit"] = 1000  # type: ignore[attr-defined]
    with pytest.raises(PermanentSendError) as err:
        _relay(relay_server).send(mail(body=b"x" * 70 * 100), "a@site-a.example", ["b@site-b.example"])
    assert err.value.code == 552 and err.value.kind is ErrorKind.TOO_LARGE


def test_server_down_is_transient():
    relay = Relay(RelayConfig(smarthost=Route("127.0.0.1", free_port(), TlsMode.STARTTLS), timeout_seconds=5))
    with pytest.raises(TransientSendError) as err:
        relay.send(mail(), "a@site-a.example", ["b@site-b.example"])
    assert err.value.kind is ErrorKind.UPSTREAM and err.value.code is None and err.value.retryable


def test_no_route_and_no_smarthost_is_permanent():
    with pytest.raises(PermanentSendError):
        Relay(RelayConfig()).send(mail(), "a@site-a.example", ["b@site-b.example"])


def test_credentials_without_tls_are_refused():
    with pytest.raises(ValueError):
        Route("127.0.0.1", 25, TlsMode.NONE, "user", "pw")


def test_per_domain_route_to_our_own_ingress(relay_server, tls_cert):
    """Site A's relay talks to site B's ingress directly; other domains still go to the smarthost."""
    stored: list[bytes] = []
    ingress = SmtpIngress("127.0.0.1", 0, lambda raw, meta: stored.append(raw), tls_context=None,
                          local_addresses=["b@site-b.example"], hostname="mx.site-b.example")
    ingress.start_in_thread()
    try:
        routes = {"Site-B.Example": Route("127.0.0.1", ingress.port, TlsMode.NONE)}
        relay = _relay(relay_server, routes=routes)
        raw = mail()
        sent = relay.send(raw, "a@site-a.example", ["b@site-b.example", "c@site-c.example"])
        assert {(s.port, s.recipients) for s in sent} == {(ingress.port, ("b@site-b.example",)),
                                                          (relay_server.port, ("c@site-c.example",))}
        assert stored == [raw]
        assert [r[1] for r in relay_server.received] == [["c@site-c.example"]]
        # a recipient the ingress does not serve: 550 from our own ingress, permanent
        with pytest.raises(PermanentSendError) as err:
            relay.send(raw, "a@site-a.example", ["z@site-b.example"])
        assert err.value.code == 550 and stored == [raw]
    finally:
        ingress.stop_thread()


def test_per_domain_route_with_starttls_to_our_ingress(tls_cert):
    from tests.mail_servers import server_tls

    stored: list[bytes] = []
    ingress = SmtpIngress("127.0.0.1", 0, lambda raw, meta: stored.append(raw),
                          tls_context=server_tls(*tls_cert), require_tls=True, local_domains=["site-b.example"],
                          hostname="mx.site-b.example")
    ingress.start_in_thread()
    try:
        relay = Relay(RelayConfig(routes={"site-b.example": Route("localhost", ingress.port, TlsMode.STARTTLS)},
                                  ca_file=tls_cert[0], timeout_seconds=10))
        sent = asyncio.run(relay.asend(mail(), "a@site-a.example", ["b@site-b.example"]))
        assert sent[0].reply.startswith("2.0.0 Ok: stored as ") and len(stored) == 1
    finally:
        ingress.stop_thread()


def test_silent_server_is_a_transient_timeout():
    import socket

    with socket.socket() as listener:  # accepts (backlog) but never greets
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        route = Route("127.0.0.1", listener.getsockname()[1], TlsMode.STARTTLS)
        with pytest.raises(TransientSendError) as err:
            Relay(RelayConfig(smarthost=route, timeout_seconds=0.5)).send(mail(), "a@x.example", ["b@y.example"])
    assert err.value.kind is ErrorKind.TIMEOUT


def test_greeting_421_is_transient_and_554_permanent():
    import socket
    import threading

    for greeting, cls in ((b"421 4.3.2 busy\r\n", TransientSendError), (b"554 5.7.1 go away\r\n", PermanentSendError)):
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)

            def serve() -> None:
                conn, _ = listener.accept()
                conn.sendall(greeting)
                conn.close()

            threading.Thread(target=serve, daemon=True).start()
            route = Route("127.0.0.1", listener.getsockname()[1], TlsMode.STARTTLS)
            with pytest.raises(cls) as err:
                Relay(RelayConfig(smarthost=route, timeout_seconds=5)).send(mail(), "a@x.example", ["b@y.example"])
            assert err.value.code == int(greeting[:3])
