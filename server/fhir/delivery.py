"""FHIR R4 Subscription (rest-hook) delivery: the write listener that queues, the worker that sends.

FHIR R4 (4.0.1) subscription.html. ``SubscriptionListener`` runs in the transaction of every change: it keeps
the channel registry of Subscriptions current and queues one delivery per active Subscription whose criteria
match the new version (the criteria plus ``_id`` evaluated with the store's search, on the same transaction),
so a committed change is never without its notifications. Deletes notify nobody (subscription.html: "there is
no notification when a resource is deleted").

``DeliveryWorker`` (one per server process, started by the app's lifespan) leases due deliveries, sends them
with httpx, retries failures with exponential backoff and, after ``subscription_max_attempts`` tries, marks
the delivery dead and writes a new version of the Subscription with ``status`` ``error`` and the reason in
``error``; the next successful delivery sets it back to ``active``. Delivery is at least once: a worker that
dies during a send leaves the lease to expire and another worker sends again.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable

import anyio
import httpx

from server.config import Settings
from server.errors import ServerError
from server.fhir import subscription as sub
from server.fhir.service import FhirService
from server.security.tokens import Principal
from server.store import subscriptions as store
from server.store.fhir import FhirTx, Stored

log = logging.getLogger("server.subscriptions")

#: The scope of the server's own writes of Subscription status (not a client's token).
SERVER_SCOPES = frozenset({"system/Subscription.cruds"})
PURGE_EVERY = 3600.0  # seconds between purges of old delivered/cancelled deliveries


@functools.lru_cache(maxsize=1024)
def _criteria(text: str) -> sub.Criteria:
    return sub.parse_criteria(text)


def registered(resource: dict) -> store.Registered:
    """The registry row of a stored Subscription resource."""
    channel = sub.channel_of(resource)
    return store.Registered(resource["id"], channel.criteria.resource_type, resource["criteria"], channel.endpoint,
                            channel.payload, json.dumps([list(h) for h in channel.headers]), channel.status)


def channel_of(reg: store.Registered) -> sub.Channel:
    """The Channel of a registry row."""
    headers = tuple((str(n), str(v)) for n, v in json.loads(reg.headers))
    return sub.Channel(reg.subscription_id, _criteria(reg.criteria), reg.endpoint, reg.payload, headers,
                       reg.status)


class SubscriptionListener:
    """Write listener (``server.fhir.service.Listener``): registry upkeep and matching, in the change's tx."""

    def __call__(self, tx: FhirTx, principal: Principal, interaction: str, new: Stored, old: Stored | None) -> None:
        rtype = new.resource_type
        if rtype == "Subscription":
            if interaction == "delete":
                store.unregister(tx, new.resource_id)
            else:
                store.register(tx, registered(new.resource()))
        if interaction == "delete":
            return
        candidates = store.listening(tx, rtype, sub.LISTENING)
        if not candidates:
            return
        matched = [reg.subscription_id for reg in candidates if self._matches(tx, reg, new.resource_id)]
        store.enqueue(tx, matched, rtype, new.resource_id, new.version_id, time.time())

    @staticmethod
    def _matches(tx: FhirTx, reg: store.Registered, resource_id: str) -> bool:
        criteria = _criteria(reg.criteria)
        decided = sub.matches_without_search(criteria, resource_id)
        if decided is not None:
            return decided
        return tx.search(criteria.query_for(resource_id))[0] > 0


def server_principal(tenant: str) -> Principal:
    """The server itself, writing a Subscription's status in ``tenant``."""
    return Principal("telerad-bridge/subscriptions", tenant, SERVER_SCOPES)


class DeliveryWorker:
    """Sends queued notifications: lease, POST/PUT, record, retry with backoff, dead letter."""

    def __init__(self, settings: Settings, fhir: FhirService, queue: store.DeliveryQueue, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.fhir = fhir
        self.queue = queue
        self.clock = clock
        self._next_purge = 0.0

    async def run(self) -> None:
        """Poll the queue until cancelled; a failing round is logged once and the loop goes on."""
        timeout = httpx.Timeout(self.settings.subscription_timeout_seconds)
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
            while True:
                try:
                    busy = await self.round(client)
                except Exception:  # noqa: BLE001 - keep delivering; the store may be busy for a moment
                    log.exception("subscription delivery round failed")
                    busy = False
                if not busy:
                    await anyio.sleep(await anyio.to_thread.run_sync(self._idle_wait))

    def _maintain(self) -> None:
        """At most once per ``PURGE_EVERY`` seconds: forget deliveries older than ``subscription_keep_seconds``."""
        now = self.clock()
        if now >= self._next_purge:
            self._next_purge = now + PURGE_EVERY
            self.queue.purge(now - self.settings.subscription_keep_seconds)

    def _idle_wait(self) -> float:
        self._maintain()
        poll = self.settings.subscription_poll_seconds
        due = self.queue.next_due()
        if due is None:
            return poll
        return max(0.0, min(poll, due - self.clock()))

    async def round(self, client: httpx.AsyncClient) -> bool:
        """Lease and send one batch; True when a batch was sent (look again at once)."""
        s = self.settings
        due = await anyio.to_thread.run_sync(self.queue.next_due)  # a read: no write lock while idle
        if due is None or due > self.clock():
            return False
        batch = await anyio.to_thread.run_sync(functools.partial(
            self.queue.claim, self.clock(), limit=s.subscription_batch, lease=s.subscription_lease_seconds,
            statuses=sub.LISTENING))
        if not batch:
            return False
        async with anyio.create_task_group() as tg:
            for delivery in batch:
                tg.start_soon(self._deliver, client, delivery)
        return True

    async def _deliver(self, client: httpx.AsyncClient, delivery: store.Delivery) -> None:
        try:
            content = await anyio.to_thread.run_sync(self._content, delivery)
            channel = channel_of(delivery.channel)
            request = sub.notification(channel, delivery.resource_type, delivery.resource_id, content)
        except Exception:  # noqa: BLE001 - one bad delivery must not stop the batch; counted as a failed try
            log.exception("subscription %s/%s: cannot build the notification", delivery.tenant,
                          delivery.subscription_id)
            error = "internal error preparing the notification"
        else:
            error = await self._send(client, request)
        await anyio.to_thread.run_sync(self._record, delivery, error)

    def _content(self, delivery: store.Delivery) -> str | None:
        with self.fhir.store.transaction(delivery.tenant, write=False) as tx:
            stored = tx.version(delivery.resource_type, delivery.resource_id, delivery.version_id)
        return stored.content if stored is not None else None

    @staticmethod
    async def _send(client: httpx.AsyncClient, request: sub.Notification) -> str | None:
        """None when the endpoint answered 2xx, else the reason (shown in Subscription.error)."""
        try:
            response = await client.request(request.method, request.url, headers=list(request.headers),
                                            content=request.body)
        except httpx.TimeoutException:
            return "the endpoint did not answer in time"
        except httpx.HTTPError as exc:
            return f"cannot reach the endpoint ({type(exc).__name__})"
        if 200 <= response.status_code < 300:
            return None
        return f"the endpoint answered HTTP {response.status_code}"

    def _record(self, delivery: store.Delivery, error: str | None) -> None:
        """Store the outcome; at the limit dead + Subscription error; a success after errors: active again."""
        s = self.settings
        now = self.clock()
        what = f"{delivery.resource_type}/{delivery.resource_id}/_history/{delivery.version_id}"
        try:
            with self.fhir.store.transaction(delivery.tenant, write=True) as tx:
                if error is None:
                    store.finish(tx, delivery.pk, state=store.DELIVERED)
                    self._set_status(tx, delivery, sub.Status.ACTIVE, None, only_from=sub.Status.ERROR)
                elif delivery.attempts >= s.subscription_max_attempts:
                    reason = f"notification of {what} failed after {delivery.attempts} tries: {error}"
                    store.finish(tx, delivery.pk, state=store.DEAD, error=error)
                    self._set_status(tx, delivery, sub.Status.ERROR, reason)
                    log.warning("subscription %s/%s: %s", delivery.tenant, delivery.subscription_id, reason)
                else:
                    wait = sub.backoff(delivery.attempts, base=s.subscription_retry_base_seconds,
                                       cap=s.subscription_retry_max_seconds)
                    store.finish(tx, delivery.pk, state=store.PENDING, error=error, run_after=now + wait)
        except ServerError as exc:  # a concurrent change of the Subscription: the lease expires, we try again
            log.info("subscription %s/%s: outcome not recorded (%s); retried after the lease",
                     delivery.tenant, delivery.subscription_id, exc.message)

    def _set_status(self, tx: FhirTx, delivery: store.Delivery, status: str, error: str | None, *,
                    only_from: str | None = None) -> None:
        current = tx.current("Subscription", delivery.subscription_id, lock=True)
        if current is None or current.deleted:
            return
        resource = current.resource()
        if only_from is not None and resource.get("status") != only_from:
            return
        if resource.get("status") == sub.Status.OFF:
            return
        if resource.get("status") == status and resource.get("error") == error:
            return
        self.fhir.update_in(tx, server_principal(delivery.tenant), sub.with_status(resource, status, error),
                            None, "")
