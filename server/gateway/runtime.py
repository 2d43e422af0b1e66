"""The running DICOM e-mail gateway of one process: SMTP ingress, mailbox polls, sender and receipt workers.

Composition only: builds the edges (``SmtpIngress``, ``MailboxPoller``, ``Relay``) and the gateway's workers
(``Sender``, ``Inbound``) from the settings and runs them side by side until cancelled. ``telerad serve`` runs
one gateway per data folder: in the server process (one worker), or in the supervising process beside the
HTTP worker processes (``--workers N``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from server.config import Settings
from server.errors import ErrorKind, ServerError
from server.gateway.inbound import Inbound
from server.gateway.policy import ingress_config, relay_config
from server.gateway.sender import Sender
from server.gateway.sites import Sites
from server.mail.poll import MailboxConfig, MailboxPoller
from server.mail.relay import Relay
from server.mail.smtp_in import SmtpIngress
from server.store.gateway import JobHook, release_leases

log = logging.getLogger(__name__)

_MAILBOX_KEYS = {"name", "protocol", "host", "port", "username", "password", "tls", "ca_file", "verify_tls",
                 "folder", "after", "move_to", "flag", "max_messages", "max_bytes", "timeout_seconds",
                 "interval_seconds"}


@dataclass(frozen=True)
class Mailbox:
    """A polled mailbox and the tenant whose mail it holds."""

    tenant: str
    config: MailboxConfig


def load_mailboxes(path: Path | None, sites: Sites) -> list[Mailbox]:
    """The polled mailboxes of ``mailboxes_file``: a JSON list of objects with ``tenant`` and the fields of
    ``server.mail.poll.MailboxConfig`` (``password_file`` instead of ``password`` keeps the secret out)."""
    if path is None:
        return []
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ServerError(ErrorKind.INVALID, f"cannot read the mailboxes file {path}: {exc}") from exc
    if not isinstance(items, list):
        raise ServerError(ErrorKind.INVALID, f"{path}: expected a JSON list of mailboxes")
    out: list[Mailbox] = []
    for n, item in enumerate(items, start=1):
        where = f"{path}, mailbox {n}"
        if not isinstance(item, dict) or not isinstance(item.get("tenant"), str):
            raise ServerError(ErrorKind.INVALID, f"{where}: an object with a 'tenant' is needed")
        tenant = item["tenant"]
        sites.of_tenant(tenant)  # the tenant must have a DICOM e-mail identity
        values = {k: v for k, v in item.items() if k in _MAILBOX_KEYS}
        unknown = set(item) - _MAILBOX_KEYS - {"tenant", "password_file"}
        if unknown:
            raise ServerError(ErrorKind.INVALID, f"{where}: unknown keys {sorted(unknown)}")
        if "password_file" in item:
            try:
                values["password"] = Path(item["password_file"]).read_text(encoding="utf-8").strip()
            except (OSError, TypeError, UnicodeDecodeError) as exc:
                raise ServerError(ErrorKind.INVALID, f"{where}: cannot read password_file: {exc}") from exc
        values.setdefault("name", f"{tenant}-{n}")
        if values.get("ca_file"):
            values["ca_file"] = Path(values["ca_file"])
        try:
            out.append(Mailbox(tenant, MailboxConfig(**values)))
        except (TypeError, ValueError) as exc:
            raise ServerError(ErrorKind.INVALID, f"{where}: {exc}") from exc
    return out


class Gateway:
    """The gateway's background work of one process (all tenants of the data folder)."""

    def __init__(self, settings: Settings, engine, blobs, archive, fhir, *, also: JobHook | None = None,
                 sites: Sites | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.sites = sites if sites is not None else Sites.load(settings.data_dir)
        self.relay = Relay(relay_config(settings))
        self.sender = Sender(settings, engine, blobs, archive, fhir, self.sites, self.relay, also=also)
        self.inbound = Inbound(settings, engine, blobs, archive, fhir, self.sites, also=also,
                               on_mdn=self.sender.wake)
        self.mailboxes = load_mailboxes(settings.mailboxes_file, self.sites)
        self.ingress: SmtpIngress | None = None
        if settings.smtp_port is not None:
            self.ingress = SmtpIngress.from_config(ingress_config(settings, self.sites, settings.smtp_port),
                                                   self.inbound)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        """A job was queued: the sender looks at once (any thread)."""
        self.sender.wake()

    async def start(self) -> None:
        """Release the leases a dead predecessor left, then listen for SMTP (when configured); returns once the
        ingress accepts connections."""
        mails, mdns = await asyncio.to_thread(release_leases, self.engine, time.time())
        if mails or mdns:
            log.warning("released %d mail lease(s) and %d receipt(s) left by a previous run", mails, mdns)
        if self.ingress is not None:
            await self.ingress.start()
            log.info("SMTP ingress on %s:%s for %s", self.settings.smtp_host, self.ingress.port,
                     ", ".join(self.sites.addresses) or "no site (run `telerad keys init`)")

    async def serve(self) -> None:
        """Run the sender and one poller per mailbox until cancelled; then stop the ingress (running sinks
        finish and get their reply first)."""
        stop = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.sender.run())
                for box in self.mailboxes:
                    tg.create_task(MailboxPoller(box.config, self.inbound.for_tenant(box.tenant)).run(stop))
        finally:
            stop.set()
            if self.ingress is not None:
                await self.ingress.stop()

    async def run(self) -> None:
        """``start`` then ``serve``."""
        await self.start()
        await self.serve()

    def start_in_thread(self) -> None:
        """Run the gateway on its own event loop in a daemon thread (the supervisor of ``--workers N``)."""
        started = threading.Event()

        def main() -> None:
            self._loop = asyncio.new_event_loop()
            self._task = self._loop.create_task(self.run())
            self._loop.call_soon(started.set)
            try:
                self._loop.run_until_complete(self._task)
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("the DICOM e-mail gateway stopped")
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=main, name="gateway", daemon=True)
        self._thread.start()
        started.wait()

    def stop_thread(self, timeout: float = 30.0) -> None:
        """Stop the thread of ``start_in_thread`` (running sends and sinks finish first)."""
        if self._loop is not None and self._task is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._task.cancel)
        if self._thread is not None:
            self._thread.join(timeout)
