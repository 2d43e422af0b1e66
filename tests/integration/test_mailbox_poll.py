"""POP3 and IMAP polling against a real Dovecot: a message leaves the server only after the sink stored it."""

from __future__ import annotations

import asyncio

import pytest

from server.errors import ErrorKind, ServerError
from server.mail.poll import AfterStore, MailboxConfig, MailboxPoller, PollError, Protocol, poll_once
from server.mail.transport import Source, TlsMode
from tests.mail_servers import Dovecot, dovecot, mail  # noqa: F401

PORTS = {(Protocol.POP3, TlsMode.IMPLICIT): "pop3s", (Protocol.POP3, TlsMode.STARTTLS): "pop3",
         (Protocol.POP3, TlsMode.NONE): "pop3", (Protocol.IMAP, TlsMode.IMPLICIT): "imaps",
         (Protocol.IMAP, TlsMode.STARTTLS): "imap", (Protocol.IMAP, TlsMode.NONE): "imap"}
BOTH = [Protocol.POP3, Protocol.IMAP]


def _config(server: Dovecot, user: str, protocol: Protocol, tls: TlsMode = TlsMode.IMPLICIT, **kw) -> MailboxConfig:
    return MailboxConfig(name="box", protocol=protocol, host="localhost",
                         port=server.ports[PORTS[(protocol, tls)]], username=user, password=server.users[user],
                         tls=tls, ca_file=server.cert, timeout_seconds=10, **kw)


class Store:
    """A sink keyed by Message-ID (idempotent, like the gateway)."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, object]] = []
        self.by_id: dict[str, bytes] = {}

    def __call__(self, raw: bytes, meta) -> None:
        self.calls.append((raw, meta))
        mid = next(line for line in raw.split(b"\r\n") if line.lower().startswith(b"message-id:"))
        self.by_id[mid.split(b":", 1)[1].strip().decode()] = raw


def _mid(raw: bytes) -> str:
    line = next(line for line in raw.split(b"\r\n") if line.startswith(b"Message-ID:"))
    return line.split(b":", 1)[1].strip().decode()


@pytest.mark.parametrize("tls", [TlsMode.IMPLICIT, TlsMode.STARTTLS])
@pytest.mark.parametrize("protocol", BOTH)
def test_fetch_store_then_delete(dovecot, protocol, tls):
    user = dovecot.add_user()
    raws = [mail(subject=f"m{i}", body=b"line\r\n.dot-stuffed line\r\n" * 3) for i in range(3)]
    dovecot.deliver(user, *raws)
    store = Store()
    report = poll_once(_config(dovecot, user, protocol, tls), store)
    assert sorted(store.by_id) == sorted(_mid(r) for r in raws)
    assert {store.by_id[_mid(r)] for r in raws} == set(raws)  # byte-exact, dots un-stuffed
    assert len(report.stored) == len(report.removed) == 3 and not report.failed
    meta = store.calls[0][1]
    assert meta.source is Source(protocol.value) and meta.mailbox == "box" and meta.uid and meta.tls
    assert dovecot.message_ids(user) == []


@pytest.mark.parametrize("protocol", BOTH)
def test_sink_raising_leaves_the_message(dovecot, protocol):
    user = dovecot.add_user()
    good, bad = mail(subject="good"), mail(subject="bad")
    dovecot.deliver(user, good, bad)
    store = Store()

    def sink(raw, meta):
        if b"Subject: bad" in raw:
            raise ServerError(ErrorKind.RESOURCES, "disk full")
        store(raw, meta)

    report = poll_once(_config(dovecot, user, protocol), sink)
    assert list(store.by_id) == [_mid(good)] and len(report.failed) == 1
    assert dovecot.message_ids(user) == [_mid(bad)]
    report = poll_once(_config(dovecot, user, protocol), store)  # the next poll gets it
    assert report.removed and dovecot.message_ids(user) == []


class Crash(BaseException):
    """The process dies (not an ordinary error the poller may handle)."""


@pytest.mark.parametrize("protocol", BOTH)
def test_crash_between_sink_and_delete_fetches_again(dovecot, protocol, monkeypatch):
    user = dovecot.add_user()
    raw = mail()
    dovecot.deliver(user, raw)
    store = Store()
    poller = MailboxPoller(_config(dovecot, user, protocol), store)
    name = "_pop3_delete" if protocol is Protocol.POP3 else "_imap_remove"

    def crash(*args):
        raise Crash()

    monkeypatch.setattr(poller, name, crash)
    with pytest.raises(Crash):
        poller.poll_once()
    assert len(store.calls) == 1 and dovecot.message_ids(user) == [_mid(raw)]
    monkeypatch.undo()
    report = MailboxPoller(_config(dovecot, user, protocol), store).poll_once()
    assert len(store.calls) == 2 and list(store.by_id) == [_mid(raw)]  # fetched again, deduped by Message-ID
    assert report.removed and dovecot.message_ids(user) == []


def test_pop3_crash_after_dele_before_quit_keeps_the_message(dovecot, monkeypatch):
    """POP3 deletions commit only with QUIT (RFC 1939 section 6): a dropped connection deletes nothing."""
    user = dovecot.add_user()
    dovecot.deliver(user, mail(subject="one"), mail(subject="two"))
    store = Store()

    def sink(raw, meta):
        store(raw, meta)
        if b"Subject: two" in raw:
            raise Crash()  # after message one was DELEd, before QUIT

    with pytest.raises(Crash):
        poll_once(_config(dovecot, user, Protocol.POP3), sink)
    assert len(dovecot.message_ids(user)) == 2
    poll_once(_config(dovecot, user, Protocol.POP3), store)
    assert len(store.calls) == 4 and len(store.by_id) == 2 and dovecot.message_ids(user) == []


@pytest.mark.parametrize("protocol", BOTH)
def test_limits_max_messages_and_oversized(dovecot, protocol):
    user = dovecot.add_user()
    big = mail(subject="big", body=b"x" * 70 * 300)
    small = [mail(subject=f"s{i}") for i in range(3)]
    dovecot.deliver(user, big, *small)
    store = Store()
    config = _config(dovecot, user, protocol, max_messages=2, max_bytes=5000)
    first = poll_once(config, store)
    assert list(first.oversized.values())[0] > 5000 and len(first.oversized) == 1
    assert len(first.stored) == 2 and first.remaining == 1
    second = poll_once(config, store)
    assert len(second.stored) == 1 and second.remaining == 0 and len(second.oversized) == 1
    assert sorted(store.by_id) == sorted(_mid(m) for m in small)
    assert dovecot.message_ids(user) == [_mid(big)]  # oversized: reported, never deleted


def test_imap_move_and_flag(dovecot):
    user = dovecot.add_user()
    a, b = mail(subject="a"), mail(subject="b")
    dovecot.deliver(user, a)
    store = Store()
    poll_once(_config(dovecot, user, Protocol.IMAP, after=AfterStore.MOVE, move_to="Archive"), store)
    assert dovecot.message_ids(user) == [] and dovecot.message_ids(user, "Archive") == [_mid(a)]
    dovecot.deliver(user, b)
    flagged = _config(dovecot, user, Protocol.IMAP, after=AfterStore.FLAG)
    assert poll_once(flagged, store).removed
    assert dovecot.message_ids(user) == [_mid(b)]  # kept, but flagged
    assert not poll_once(flagged, store).stored  # and not fetched again
    assert len(store.calls) == 2


def test_run_polls_until_stopped(dovecot):
    user = dovecot.add_user()
    dovecot.deliver(user, *[mail(subject=f"r{i}") for i in range(3)])
    store = Store()
    poller = MailboxPoller(_config(dovecot, user, Protocol.IMAP, max_messages=1, interval_seconds=30), store)

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(poller.run(stop))
        deadline = asyncio.get_running_loop().time() + 15
        while len(store.by_id) < 3:  # remaining messages are polled at once, not after the interval
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    assert dovecot.message_ids(user) == []


# Last: Dovecot's auth penalty slows later logins from 127.0.0.1 after a failed one.
def test_wrong_password_and_bad_certificate_are_poll_errors(dovecot, tmp_path):
    from tests.mail_servers import make_cert

    user = dovecot.add_user()
    config = _config(dovecot, user, Protocol.IMAP)
    bad = MailboxConfig(**{**config.__dict__, "password": "wrong"})
    with pytest.raises(PollError) as err:
        poll_once(bad, Store())
    assert err.value.kind is ErrorKind.UPSTREAM and "wrong" not in err.value.message
    other_ca, _ = make_cert(tmp_path / "other")
    untrusted = MailboxConfig(**{**config.__dict__, "ca_file": other_ca, "protocol": Protocol.POP3,
                                 "port": dovecot.ports["pop3s"]})
    with pytest.raises(PollError) as err:
        poll_once(untrusted, Store())
    assert err.value.kind is ErrorKind.SECURITY
