"""Real mail servers on loopback for the transport tests: Dovecot (POP3/IMAP), an aiosmtpd relay, TLS certs.

Dovecot (Debian ``dovecot-imapd dovecot-pop3d``) runs from a temp dir with its own config
(``dovecot -F -c <tmp>/dovecot.conf``): listen 127.0.0.1 on free ports, plain + implicit-TLS listeners,
passdb/userdb from passwd-files (``users/%u``: one file per user, added per test),
maildir under the temp dir owned by ``nobody``, a self-signed certificate for ``localhost``/``127.0.0.1``.
Root runs it with Debian's ``dovecot``/``dovenull`` system users as internal and login users.
"""

from __future__ import annotations

import datetime as dt
import imaplib
import ipaddress
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.smtp import AuthResult, LoginPassword

DOVECOT = shutil.which("dovecot") or ("/usr/sbin/dovecot" if Path("/usr/sbin/dovecot").exists() else None)
DOVECOT_LIBEXEC = Path("/usr/lib/dovecot")  # Debian: imap and pop3 are dovecot-imapd / dovecot-pop3d


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cert(folder: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A self-signed EC certificate for ``localhost`` and ``127.0.0.1``; returns (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{name}-cert.pem", folder / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def server_tls(cert: Path, key: Path) -> ssl.SSLContext:
    """A server TLS context for a certificate made by ``make_cert``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


def client_tls(cert: Path) -> ssl.SSLContext:
    """A client TLS context trusting ``cert``."""
    return ssl.create_default_context(cafile=str(cert))


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02):
    """Poll ``predicate`` until it returns a true value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(interval)


def mail(subject: str = "DICOM-eMail", body: bytes = b"hello\r\n", *, to: str = "b@site-b.example",
         sender: str = "a@site-a.example", message_id: str | None = None) -> bytes:
    """A small RFC 5322 mail with CRLF line ends."""
    mid = message_id or f"<{uuid.uuid4().hex}@site-a.example>"
    head = (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: {mid}\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n").encode()
    return head + body


# Dovecot ---------------------------------------------------------------------------------------------

@dataclass
class Dovecot:
    """A Dovecot instance from a temp dir; ``add_user`` creates a fresh mailbox."""

    root: Path
    cert: Path
    key: Path
    ports: dict[str, int]
    process: subprocess.Popen | None = None
    users: dict[str, str] = field(default_factory=dict)

    CONF = """\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = imap pop3
listen = 127.0.0.1
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
login_trusted_networks = 127.0.0.0/8
default_internal_user = {internal}
default_login_user = {login}
first_valid_uid = 1
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/users/%u
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {root}/users/%u
}}
mail_location = maildir:~/Maildir
namespace inbox {{
  inbox = yes
  mailbox Archive {{
    auto = create
  }}
}}
service imap-login {{
  inet_listener imap {{
    port = {imap}
  }}
  inet_listener imaps {{
    port = {imaps}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {pop3}
  }}
  inet_listener pop3s {{
    port = {pop3s}
    ssl = yes
  }}
}}
"""

    @classmethod
    def start(cls) -> Dovecot:
        """Start Dovecot in a fresh temp dir and wait until all four listeners accept."""
        root = Path(tempfile.mkdtemp(prefix="telerad-dovecot-"))
        root.chmod(0o755)  # the mail processes run as the mailbox owner
        cert, key = make_cert(root / "tls")
        ports = {name: free_port() for name in ("imap", "imaps", "pop3", "pop3s")}
        internal, login = _service_users()
        (root / "users").mkdir()  # one passwd-file per user: no stale reread of a shared file
        (root / "home").mkdir()
        (root / "home").chmod(0o755)
        conf = root / "dovecot.conf"
        conf.write_text(cls.CONF.format(root=root, cert=cert, key=key, internal=internal, login=login, **ports))
        self = cls(root, cert, key, ports)
        self.process = subprocess.Popen([DOVECOT, "-F", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        try:
            for port in ports.values():
                wait_until(lambda p=port: self._accepts(p), timeout=15)
        except AssertionError:
            self.stop()
            raise RuntimeError(f"dovecot did not start: {self.log()}") from None
        return self

    def _accepts(self, port: int) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"dovecot exited: {self.process.stderr.read().decode()} {self.log()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def add_user(self, password: str = "secret") -> str:
        """A new user with an empty maildir; returns the user name."""
        user = f"u{uuid.uuid4().hex[:10]}"
        home = self.root / "home" / user
        home.mkdir()
        uid, gid = _mail_owner()
        os.chown(home, uid, gid)
        with open(self.root / "users" / user, "w") as f:
            f.write(f"{user}:{{PLAIN}}{password}:{uid}:{gid}::{home}::\n")
        self.users[user] = password
        return user

    def imap(self) -> imaplib.IMAP4_SSL:
        return imaplib.IMAP4_SSL("127.0.0.1", self.ports["imaps"], ssl_context=client_tls(self.cert), timeout=10)

    def deliver(self, user: str, *raws: bytes, folder: str = "INBOX") -> None:
        """Put mails into the user's mailbox with IMAP APPEND."""
        imap = self.imap()
        try:
            imap.login(user, self.users[user])
            for raw in raws:
                typ, data = imap.append(folder, None, None, raw)
                assert typ == "OK", data
        finally:
            imap.logout()

    def message_ids(self, user: str, folder: str = "INBOX") -> list[str]:
        """Message-IDs of the messages in a folder that are not flagged \\Deleted."""
        imap = self.imap()
        try:
            imap.login(user, self.users[user])
            imap.select(f'"{folder}"', readonly=True)
            typ, data = imap.search(None, "UNDELETED")
            ids = []
            for num in data[0].split():
                typ, parts = imap.fetch(num, "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
                ids.append(parts[0][1].decode().split(":", 1)[1].strip())
            return ids
        finally:
            imap.logout()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        shutil.rmtree(self.root, ignore_errors=True)


def _service_users() -> tuple[str, str]:
    """Dovecot's internal and login users: Debian's dovecot/dovenull as root, else the current user."""
    if os.geteuid() == 0:
        names = [n for n in ("dovecot", "dovenull") if _exists(n)]
        if len(names) == 2:
            return names[0], names[1]
        return "nobody", "nobody"
    me = pwd.getpwuid(os.geteuid()).pw_name
    return me, me


def _mail_owner() -> tuple[int, int]:
    """The uid/gid the mail processes run as: ``nobody`` when root, else the current user."""
    if os.geteuid() == 0:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    return os.geteuid(), os.getegid()


def _exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False


@pytest.fixture(scope="session")
def dovecot():
    """One Dovecot for the session (tests isolate by user); skipped when Dovecot is not installed."""
    if DOVECOT is None or not all((DOVECOT_LIBEXEC / p).exists() for p in ("imap", "pop3")):
        pytest.skip("dovecot is not installed (Debian: apt-get install dovecot-imapd dovecot-pop3d)")
    try:
        server = Dovecot.start()
    except RuntimeError as exc:
        if os.geteuid() == 0:
            raise
        pytest.skip(f"dovecot does not start without root here: {exc}")
    try:
        yield server
    finally:
        server.stop()


# An SMTP relay (smarthost) requiring STARTTLS and AUTH -------------------------------------------------

@dataclass
class RelayServer:
    """An aiosmtpd smarthost on loopback: STARTTLS and AUTH (PLAIN/LOGIN) required, records mails."""

    cert: Path
    key: Path
    username: str = "relay-user"
    password: str = "relay-pass"
    refuse: set[str] = field(default_factory=set)  # recipients answered 550
    max_bytes: int = 8 * 1024**2
    require_tls: bool = True
    offer_tls: bool = True
    received: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    port: int = 0
    _controller: object | None = None

    def start(self) -> RelayServer:
        from aiosmtpd.controller import Controller

        relay = self

        class Handler:
            async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
                if address in relay.refuse:
                    return "550 5.1.1 User unknown"
                envelope.rcpt_tos.append(address)
                return "250 2.1.5 OK"

            async def handle_DATA(self, server, session, envelope):
                relay.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
                return f"250 2.0.0 Ok: queued as RELAY{len(relay.received)}"

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = (isinstance(auth_data, LoginPassword) and auth_data.login.decode() == relay.username
                  and auth_data.password.decode() == relay.password)
            return AuthResult(success=ok, handled=False)

        tls = server_tls(self.cert, self.key) if self.offer_tls else None

        self.port = free_port()
        self._controller = Controller(Handler(), hostname="127.0.0.1", port=self.port,
                                      data_size_limit=relay.max_bytes, server_hostname="relay.test",
                                      tls_context=tls, require_starttls=self.require_tls and tls is not None,
                                      authenticator=authenticator, auth_required=True,
                                      auth_require_tls=tls is not None)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


@pytest.fixture
def tls_cert(tmp_path) -> tuple[Path, Path]:
    """A self-signed localhost certificate (cert.pem, key.pem)."""
    return make_cert(tmp_path / "tls")


@pytest.fixture
def relay_server(tls_cert):
    """A smarthost requiring STARTTLS and AUTH; stopped after the test."""
    server = RelayServer(*tls_cert).start()
    try:
        yield server
    finally:
        server.stop()


__all__ = ["Dovecot", "RelayServer", "client_tls", "dovecot", "free_port", "mail", "make_cert", "relay_server",
           "server_tls", "tls_cert", "wait_until"]
