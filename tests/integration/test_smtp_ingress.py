"""SMTP ingress on loopback, driven by smtplib: 250 only after the sink stored the mail (RFC 5321)."""

from __future__ import annotations

import asyncio
import base64
import smtplib
import socket
import threading
import time
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


# DATA read in chunks (_Session.smtp_DATA): same behaviour as aiosmtpd's line reader ----------------------

class _Raw:
    """A plain SMTP session on a socket: the test writes bytes as it likes and reads whole replies."""

    def __init__(self, ingress: SmtpIngress) -> None:
        self.sock = socket.create_connection(("127.0.0.1", ingress.port), timeout=30)
        self.file = self.sock.makefile("rb")
        assert self.reply()[0] == 220

    def reply(self) -> tuple[int, bytes]:
        lines = []
        while True:
            line = self.file.readline()
            assert line, "connection closed"
            lines.append(line[4:].rstrip(b"\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), b"\n".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def envelope(self) -> None:
        self.send(b"EHLO mx.site-a.example\r\nMAIL FROM:<a@site-a.example>\r\nRCPT TO:<b@site-b.example>\r\nDATA\r\n")
        assert [self.reply()[0] for _ in range(4)] == [250, 250, 250, 354]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_2_mb_mail_byte_exact(ingress_factory, tls_cert):
    store = Store()
    ingress = ingress_factory(store, max_bytes=4 * 1024**2)
    body = base64.encodebytes(bytes(range(256)) * (1536 * 1024 // 256)).replace(b"\n", b"\r\n")
    raw = mail(body=body)
    assert len(raw) > 2 * 1024**2
    with _client(ingress, tls_cert) as smtp:
        assert smtp.sendmail("a@site-a.example", ["b@site-b.example"], raw) == {}
    assert [m[0] for m in store.mails] == [raw] and store.mails[0][1].size == len(raw)


def test_lines_starting_with_a_dot_arrive_unstuffed(ingress_factory, tls_cert):
    store = Store()
    ingress = ingress_factory(store)
    body = b".first\r\nx\r\n.\r\n..\r\n...three\r\nend.\r\n.a.\r\n.\r\n"  # smtplib stuffs every leading dot
    raw = b"." + mail(body=body)  # the very first line too
    with _client(ingress, tls_cert) as smtp:
        assert smtp.sendmail("a@site-a.example", ["b@site-b.example"], raw) == {}
    assert [m[0] for m in store.mails] == [raw]


def test_empty_body(ingress_factory):
    store = Store()
    ingress = ingress_factory(store, tls=False)
    session = _Raw(ingress)
    try:
        session.envelope()
        session.send(b".\r\n")  # the end marker as the very first line: no content at all
        assert session.reply()[0] == 250
        session.send(b"MAIL FROM:<a@site-a.example>\r\nRCPT TO:<b@site-b.example>\r\nDATA\r\n")
        assert [session.reply()[0] for _ in range(3)] == [250, 250, 354]
        session.send(b"\r\n.\r\n")  # one empty line
        assert session.reply()[0] == 250
    finally:
        session.close()
    assert [m[0] for m in store.mails] == [b"", b"\r\n"]


@pytest.mark.parametrize("length", [1000, 1001, 5000, 300_000])
def test_line_too_long_is_500_and_not_stored(ingress_factory, tls_cert, length):
    store = Store()
    ingress = ingress_factory(store)
    with _client(ingress, tls_cert) as smtp:
        smtp.mail("a@site-a.example")
        smtp.rcpt("b@site-b.example")
        code, reply = smtp.data(mail(body=b"ok\r\n" + b"x" * length + b"\r\nok\r\n"))
        assert (code, reply) == (500, b"Line too long (see RFC5321 4.5.3.1.6)")
        assert smtp.sendmail("a@site-a.example", ["b@site-b.example"], mail()) == {}  # the session goes on
    assert len(store.mails) == 1


def test_longest_allowed_line_passes(ingress_factory, tls_cert):
    store = Store()
    ingress = ingress_factory(store)
    raw = mail(body=b"x" * 999 + b"\r\n")  # 1001 with its CRLF: aiosmtpd's line_length_limit
    with _client(ingress, tls_cert) as smtp:
        assert smtp.sendmail("a@site-a.example", ["b@site-b.example"], raw) == {}
    assert [m[0] for m in store.mails] == [raw]


def test_over_size_without_size_is_552_and_not_stored(ingress_factory, tls_cert):
    store = Store()
    ingress = ingress_factory(store, max_bytes=1024**2)
    line = b"QUJD" * 19 + b"\r\n"
    with _client(ingress, tls_cert) as smtp:
        smtp.mail("a@site-a.example")  # no SIZE=: the server counts
        smtp.rcpt("b@site-b.example")
        code, _ = smtp.data(mail(body=line * (3 * 1024**2 // len(line))))
        assert code == 552
        # a too long line after the limit was passed: still 552 (aiosmtpd answers the first problem)
        smtp.mail("a@site-a.example")
        smtp.rcpt("b@site-b.example")
        code, _ = smtp.data(mail(body=line * (1024**2 // len(line) + 10) + b"x" * 2000 + b"\r\n"))
        assert code == 552
        # a too long line before the limit: 500
        smtp.mail("a@site-a.example")
        smtp.rcpt("b@site-b.example")
        code, _ = smtp.data(mail(body=b"x" * 2000 + b"\r\n" + line * (2 * 1024**2 // len(line))))
        assert code == 500
        assert smtp.sendmail("a@site-a.example", ["b@site-b.example"], mail()) == {}
    assert len(store.mails) == 1


def test_two_mails_in_one_session(ingress_factory, tls_cert):
    store = Store()
    ingress = ingress_factory(store)
    first, second = mail(subject="one", body=b"a\r\n.\r\n" * 1000), mail(subject="two")
    with _client(ingress, tls_cert) as smtp:
        assert smtp.sendmail("a@site-a.example", ["b@site-b.example"], first) == {}
        assert smtp.sendmail("a@site-a.example", ["b@site-b.example"], second) == {}
    assert [m[0] for m in store.mails] == [first, second]


def test_pipelined_client(ingress_factory):
    store = Store()
    ingress = ingress_factory(store, tls=False)
    first, second = mail(subject="one", body=b"QUJD\r\n" * 5000), mail(subject="two")
    session = _Raw(ingress)
    try:
        session.envelope()
        # RFC 2920: the next commands right behind the end marker, in the same write
        session.send(first + b".\r\nMAIL FROM:<a@site-a.example>\r\nRCPT TO:<b@site-b.example>\r\nDATA\r\n")
        assert [session.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        session.send(second + b".\r\nQUIT\r\n")
        assert [session.reply()[0] for _ in range(2)] == [250, 221]
    finally:
        session.close()
    assert [m[0] for m in store.mails] == [first, second]


def test_disconnect_mid_data_stores_nothing(ingress_factory, tls_cert):
    store = Store()
    ingress = ingress_factory(store, tls=False)
    session = _Raw(ingress)
    session.envelope()
    session.send(mail(body=b"QUJD\r\n" * 50_000)[:200_000])  # no end marker
    session.close()
    deadline = time.monotonic() + 10
    while ingress.connections and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not ingress.connections  # the server ended the session
    with _client(ingress, tls_cert, tls=False) as smtp:  # and keeps serving
        assert smtp.sendmail("a@site-a.example", ["b@site-b.example"], mail()) == {}
    assert len(store.mails) == 1
