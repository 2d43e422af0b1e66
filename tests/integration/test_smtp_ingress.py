"""SMTP ingress on loopback, driven by smtplib: 250 only after the sink stored the mail (RFC 5321)."""

from __future__ import annotations

import asyncio
import smtplib
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from server.errors import ErrorKind, ServerError
from server.mail.smtp_in import SmtpIngress, SmtpIngressConfig
from server.mail.transport import SMTP_REPLY_BY_KIND, Source
from tests.mail_servers import client_tls, mail, server_tls, tls_cert  # noqa: F401


class Store:
    """A sink recording mails, optionally failing first; records the thread it ran on."""

    def __init__(self, fail_times: int = 0, error: Exception | None = None) -> None:
        self.mails: list[tuple[bytes, object]] = []
        self.threads: set[str] = set()
        self.fail_times = fail_times
        self.error = error or RuntimeError("disk on fire")
        self.lock = threading.Lock()

    def __call__(self, raw: bytes, meta) -> None:
        with self.lock:
            self.threads.add(threading.current_thread().name)
            try:
                asyncio.get_running_loop()
                on_loop = True
            except RuntimeError:
                on_loop = False
            assert not on_loop, "the sink must not run on the event loop"
            if self.fail_times:
                self.fail_times -= 1
                raise self.error
            self.mails.append((raw, meta))


@pytest.fixture
def ingress_factory(tls_cert):
    started: list[SmtpIngress] = []

    def make(sink, **kw) -> SmtpIngress:
        kw.setdefault("local_domains", ["site-b.example"])
        kw.setdefault("max_bytes", 1024**2)
        if kw.pop("tls", True):
            kw.setdefault("tls_context", server_tls(*tls_cert))
        ingress = SmtpIngress("127.0.0.1", 0, sink, hostname="mx.site-b.example", **kw)
        ingress.start_in_thread()
        started.append(ingress)
        return ingress

    yield make
    for ingress in started:
        ingress.stop_thread()


def _client(ingress: SmtpIngress, cert, *, tls: bool = True) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", ingress.port, timeout=30)
    smtp.ehlo("mx.site-a.example")
    if tls:
        smtp.starttls(context=client_tls(cert[0]))
        smtp.ehlo("mx.site-a.example")
    return smtp


def test_starttls_size_and_stored_before_250(ingress_factory, tls_cert):
    store = Store()
    ingress = ingress_factory(store, max_bytes=123456)
    raw = mail()
    with _client(ingress, tls_cert, tls=False) as smtp:
        assert smtp.has_extn("starttls")
        smtp.starttls(context=client_tls(tls_cert[0]))
        smtp.ehlo("mx.site-a.example")
        assert smtp.esmtp_features["size"] == "123456"
        smtp.mail("a@site-a.example", [f"SIZE={len(raw)}"])
        smtp.rcpt("b@site-b.example")
        code, reply = smtp.data(raw)
    assert code == 250 and reply.startswith(b"2.0.0 Ok: stored as ")
    assert len(store.mails) == 1  # stored before the 250 came back
    got, meta = store.mails[0]
    assert got == raw
    assert meta.source is Source.SMTP and meta.tls and meta.mail_from == "a@site-a.example"
    assert meta.rcpt_tos == ("b@site-b.example",) and meta.helo == "mx.site-a.example"
    assert reply.decode().endswith(meta.id)
    assert all(t.startswith("smtp-sink") for t in store.threads)


def test_require_tls_refuses_mail_before_starttls(ingress_factory, tls_cert):
    store = Store()
    ingress = ingress_factory(store, require_tls=True)
    with _client(ingress, tls_cert, tls=False) as smtp:
        code, _ = smtp.mail("a@site-a.example")
        assert code == 530
    with _client(ingress, tls_cert) as smtp:
        assert smtp.sendmail("a@site-a.example", ["b@site-b.example"], mail()) == {}
    assert len(store.mails) == 1


def test_rcpt_not_local_is_550(ingress_factory, tls_cert):
    ingress = ingress_factory(Store(), local_domains=["site-b.example"], local_addresses=["x@other.example"])
    with _client(ingress, tls_cert) as smtp:
        smtp.mail("a@site-a.example")
        assert smtp.rcpt("b@elsewhere.example")[0] == 550
        assert smtp.rcpt("x@other.example")[0] == 250
        assert smtp.rcpt("B@Site-B.Example")[0] == 250


def test_size_declared_over_limit_is_552(ingress_factory, tls_cert):
    ingress = ingress_factory(Store(), max_bytes=1000)
    with _client(ingress, tls_cert) as smtp:
        code, _ = smtp.mail("a@site-a.example", ["SIZE=5000"])
        assert code == 552


def test_oversized_data_is_552_and_not_stored(ingress_factory, tls_cert):
    store = Store()
    ingress = ingress_factory(store, max_bytes=10_000)
    with _client(ingress, tls_cert) as smtp:
        smtp.mail("a@site-a.example")  # no SIZE: the limit is found while reading DATA
        smtp.rcpt("b@site-b.example")
        code, _ = smtp.data(mail(body=(b"y" * 76 + b"\r\n") * 200))
        assert code == 552
        # the session goes on: a small mail still passes
        assert smtp.sendmail("a@site-a.example", ["b@site-b.example"], mail()) == {}
    assert len(store.mails) == 1


def test_40_mb_mail_with_raised_limit(ingress_factory, tls_cert):
    store = Store()
    ingress = ingress_factory(store, max_bytes=48 * 1024**2)
    line = b"QUJD" * 19 + b"\r\n"  # base64-like 78-byte lines
    body = line * (40 * 1024**2 // len(line))
    raw = mail(body=body)
    with _client(ingress, tls_cert) as smtp:
        assert smtp.sendmail("a@site-a.example", ["b@site-b.example"], raw) == {}
    assert len(store.mails) == 1 and store.mails[0][0] == raw and store.mails[0][1].size == len(raw)


def test_sink_failure_is_451_and_the_retry_succeeds(ingress_factory, tls_cert):
    store = Store(fail_times=1)
    ingress = ingress_factory(store)
    raw = mail()
    with _client(ingress, tls_cert) as smtp:
        smtp.mail("a@site-a.example")
        smtp.rcpt("b@site-b.example")
        code, reply = smtp.data(raw)
        assert code == 451 and b"disk on fire" not in reply  # never internals to the peer
        assert store.mails == []
        assert smtp.sendmail("a@site-a.example", ["b@site-b.example"], raw) == {}  # the client retries
    assert [m[0] for m in store.mails] == [raw]


@pytest.mark.parametrize("kind", [ErrorKind.TOO_LARGE, ErrorKind.SECURITY, ErrorKind.RESOURCES])
def test_sink_server_error_maps_to_its_reply(ingress_factory, tls_cert, kind):
    ingress = ingress_factory(Store(fail_times=1, error=ServerError(kind, "no")))
    with _client(ingress, tls_cert) as smtp:
        smtp.mail("a@site-a.example")
        smtp.rcpt("b@site-b.example")
        code, reply = smtp.data(mail())
    expected = SMTP_REPLY_BY_KIND[kind]
    assert code == expected.code and reply.decode().startswith(expected.status)


def test_every_error_kind_has_an_smtp_reply():
    assert set(SMTP_REPLY_BY_KIND) == set(ErrorKind)
    for kind, reply in SMTP_REPLY_BY_KIND.items():
        assert 400 <= reply.code < 600 and reply.status[0] == str(reply.code)[0], kind


def test_concurrent_senders(ingress_factory, tls_cert):
    gate = threading.Barrier(6, timeout=20)

    class Slow(Store):
        def __call__(self, raw, meta):
            gate.wait()  # all six sinks run at once: the loop is not blocked by any of them
            super().__call__(raw, meta)

    store = Slow()
    ingress = ingress_factory(store, sink_threads=8)

    def send(i: int) -> None:
        with _client(ingress, tls_cert) as smtp:
            assert smtp.sendmail("a@site-a.example", ["b@site-b.example"], mail(subject=f"n{i}")) == {}

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(send, range(6)))
    assert sorted(m[1].rcpt_tos[0] for m in store.mails) == ["b@site-b.example"] * 6
    assert len({m[1].id for m in store.mails}) == 6


def test_start_stop_on_a_running_loop(tls_cert):
    store = Store()
    config = SmtpIngressConfig(port=0, local_domains=("site-b.example",), cert_file=tls_cert[0],
                               key_file=tls_cert[1], require_tls=True)

    async def main() -> None:
        async with SmtpIngress.from_config(config, store) as ingress:
            def send() -> None:
                with _client(ingress, tls_cert) as smtp:
                    smtp.sendmail("a@site-a.example", ["b@site-b.example"], mail())
            await asyncio.to_thread(send)

    asyncio.run(main())
    assert len(store.mails) == 1


def test_sessions_over_max_connections_get_421(ingress_factory, tls_cert):
    ingress = ingress_factory(Store(), max_connections=2)
    first, second = _client(ingress, tls_cert, tls=False), _client(ingress, tls_cert, tls=False)
    try:
        with pytest.raises(smtplib.SMTPConnectError) as err:
            smtplib.SMTP("127.0.0.1", ingress.port, timeout=10)
        assert err.value.smtp_code == 421
    finally:
        first.quit()
        second.quit()
    with _client(ingress, tls_cert) as smtp:  # a slot is free again
        assert smtp.noop()[0] == 250


def test_stop_lets_a_running_sink_answer_then_closes_idle_sessions(tls_cert):
    entered, release = threading.Event(), threading.Event()
    stored: list[bytes] = []

    def sink(raw, meta):
        entered.set()
        release.wait(10)
        stored.append(raw)

    ingress = SmtpIngress("127.0.0.1", 0, sink, local_domains=["site-b.example"], grace_seconds=10)
    ingress.start_in_thread()
    idle = smtplib.SMTP("127.0.0.1", ingress.port, timeout=10)
    idle.ehlo()
    replies: list[tuple[int, bytes]] = []

    def send() -> None:
        smtp = smtplib.SMTP("127.0.0.1", ingress.port, timeout=10)
        smtp.ehlo()
        smtp.mail("a@site-a.example")
        smtp.rcpt("b@site-b.example")
        replies.append(smtp.data(mail()))
        smtp.close()  # no QUIT: the server closes this session right after the reply

    sender = threading.Thread(target=send)
    sender.start()
    assert entered.wait(10)
    stopper = threading.Thread(target=ingress.stop_thread)
    stopper.start()
    release.set()
    stopper.join(15)
    sender.join(15)
    assert replies and replies[0][0] == 250 and len(stored) == 1  # the stored mail got its 250
    with pytest.raises(smtplib.SMTPServerDisconnected):  # the idle session was told 421 and closed
        idle.noop()
        idle.noop()
    idle.close()
