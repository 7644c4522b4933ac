"""WebhookDispatcher: the broker's event sink that POSTs events to HTTP endpoints off the hot path.

The broker (and the MQTT layer) call the sink's hooks on their own greenlets. A hook looks up which
endpoints want the event (by type, and for message events by topic through a subscription trie
whose matches are cached per topic), puts one small item per endpoint in a bounded queue and
returns: no I/O, no greenlet switch, nothing built that an endpoint does not want. ``workers``
greenlets take items and send them; the JSON body is made once per event by the first worker
that needs it.

A full queue drops by ``drop_policy`` (the oldest waiting item, or the new one) and counts the
drop on the item's endpoint. A failed attempt (refused, timed out, not 2xx) is retried with
exponential backoff up to ``retry.max_attempts``; each endpoint has a circuit breaker, and while
it is open that endpoint's events are dropped at once (counted) instead of holding workers.
``stop`` drains the queue for up to ``shutdown_timeout`` and counts what is left as dropped.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import os
import time
from collections import deque
from datetime import UTC, datetime

import gevent
from gevent.event import Event

from fluxmq._core.trie import SubscriptionTrie
from fluxmq.broker.events import EventSink
from fluxmq.config.schema import WEBHOOK_EVENTS

from .endpoint import OPEN, Endpoint, EndpointError
from .settings import MESSAGE_EVENTS, WebhookSettings

log = logging.getLogger("fluxmq.webhook")

PROTOCOL_NAMES = {3: "3.1", 4: "3.1.1", 5: "5.0"}


# Event ids: a random per-process prefix and a counter (unique without a uuid4, whose os.urandom
# would be a syscall per message event).
_ID_PREFIX = os.urandom(8).hex()
_next_seq = itertools.count(1).__next__
_now = time.time


def event_id(seq: int) -> str:
    """32 hex digits, unique per event."""
    return f"{_ID_PREFIX}{seq:016x}"


class WebhookEvent:
    """One event as a worker sends it. The hooks queue only ``(endpoint, type, seq, time, make_data,
    args)`` tuples; the data dict is made from ``args`` by ``make_data`` on the worker, so producing an
    event costs the broker one tuple per endpoint."""

    __slots__ = ("type", "seq", "time", "data")

    def __init__(self, event_type: str, seq: int, at: float, data: dict) -> None:
        self.type = event_type
        self.seq = seq
        self.time = at
        self.data = data

    @property
    def id(self) -> str:
        return event_id(self.seq)

    def envelope(self, broker_id: str) -> dict:
        stamp = (
            datetime.fromtimestamp(self.time, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        )
        return {
            "event_type": self.type,
            "event_id": self.id,
            "timestamp": stamp,
            "broker_id": broker_id,
            "data": self.data,
        }

    def body(self, broker_id: str) -> bytes:
        return json.dumps(self.envelope(broker_id), separators=(",", ":")).encode("utf-8")


def _version(protocol_version: int) -> str:
    return PROTOCOL_NAMES.get(protocol_version, str(protocol_version))


class WebhookDispatcher(EventSink):
    """Queues broker events for the configured endpoints and sends them with a pool of greenlets."""

    def __init__(self, settings: WebhookSettings, broker_id: str) -> None:
        self.settings = settings
        self.broker_id = broker_id
        self.endpoints = [Endpoint(s, pool_size=settings.workers) for s in settings.endpoints]
        self._by_type: dict[str, tuple[Endpoint, ...]] = {}
        self._tries: dict[str, SubscriptionTrie | None] = {}
        # Called when wants_published / wants_delivered change (an endpoint's breaker opened or its
        # pause ended): the node re-installs the sink so the broker's per-message slots follow.
        self.on_wants_changed = None
        self._reopen_timers: dict[str, gevent.Greenlet] = {}
        self._route_events()
        self.queue: deque[tuple] = deque()  # (endpoint, type, seq, time, make_data, args)
        self._queue_size = settings.queue_size
        self._drop_newest = settings.drop_policy == "newest"
        self.accepting = False
        self._wake = Event()
        self._idle = 0
        self._busy = 0
        self._workers: list[gevent.Greenlet] = []

    def _route_events(self) -> None:
        """Which endpoints get which events, from the endpoints whose breaker is not open: an open
        one gets nothing (no event is even built for it), so a dead endpoint costs the broker
        nothing once its breaker opened."""
        live = [e for e in self.endpoints if e.breaker.state != OPEN]
        # event type -> endpoints that want it (non-message events)
        self._by_type = {t: tuple(e for e in live if t in e.settings.events) for t in WEBHOOK_EVENTS}
        # message event type -> trie of the topic filters of the endpoints that want it (None: nobody)
        tries: dict[str, SubscriptionTrie | None] = {}
        for t in MESSAGE_EVENTS:
            wanting = self._by_type[t]
            if not wanting:
                tries[t] = None
                continue
            trie = SubscriptionTrie()
            for endpoint in wanting:
                for f in endpoint.settings.topic_filters:
                    trie.add(f, endpoint.name, endpoint)
            tries[t] = trie
        self._tries = tries
        wants = (tries["message.published"] is not None, tries["message.delivered"] is not None)
        changed = wants != (getattr(self, "wants_published", None), getattr(self, "wants_delivered", None))
        self.wants_published, self.wants_delivered = wants
        if changed and self.on_wants_changed is not None:
            self.on_wants_changed()

    def _breaker_opened(self, endpoint: Endpoint) -> None:
        self._route_events()
        old = self._reopen_timers.pop(endpoint.name, None)
        if old is not None:
            old.kill(block=False)
        self._reopen_timers[endpoint.name] = gevent.spawn_later(
            endpoint.breaker.reset_timeout, self._breaker_pause_over, endpoint
        )

    def _breaker_pause_over(self, endpoint: Endpoint) -> None:
        """The endpoint gets events again; the first one is the half-open trial."""
        self._reopen_timers.pop(endpoint.name, None)
        if self.accepting:
            endpoint.breaker.half_open()
            self._route_events()

    # -- life cycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.accepting = True
        self._workers = [gevent.spawn(self._work) for _ in range(self.settings.workers)]
        log.info(
            "webhook_started",
            extra={
                "endpoints": ",".join(e.name for e in self.endpoints),
                "workers": self.settings.workers,
                "queue_size": self.settings.queue_size,
            },
        )

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking events; send what is queued for up to ``timeout`` seconds (default
        ``shutdown_timeout``); drop (and count) the rest."""
        self.accepting = False
        timeout = self.settings.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while (self.queue or self._busy) and time.monotonic() < deadline:
            gevent.sleep(min(0.01, max(0.0, deadline - time.monotonic())))
        left = len(self.queue) + self._busy
        for item in self.queue:
            item[0].shutdown_drops += 1
        self.queue.clear()
        gevent.killall(self._workers, block=True, timeout=1.0)  # an in-flight item counts itself as dropped
        self._workers = []
        gevent.killall(list(self._reopen_timers.values()), block=False)
        self._reopen_timers.clear()
        for endpoint in self.endpoints:
            endpoint.close()
        log.info("webhook_stopped", extra={"dropped": left, "sent": sum(e.sent for e in self.endpoints)})

    @property
    def busy(self) -> int:
        """Items being sent (or waiting between attempts) now."""
        return self._busy

    # -- queue --------------------------------------------------------------------------------------

    def _put(self, endpoints, event_type: str, make_data, args: tuple) -> None:
        """Queue one event for ``endpoints`` (never blocks; a full queue drops by policy, counted)."""
        queue = self.queue
        seq = _next_seq()
        at = _now()
        for endpoint in endpoints:
            if len(queue) >= self._queue_size:
                if self._drop_newest:
                    endpoint.full_drops += 1
                    if endpoint.full_drops % 1000 == 1:  # drops come in floods: log the 1st, 1001st...
                        self._log_drop(endpoint)
                    continue
                old = queue.popleft()[0]
                old.full_drops += 1
                if old.full_drops % 1000 == 1:
                    self._log_drop(old)
            queue.append((endpoint, event_type, seq, at, make_data, args))
        if self._idle:
            self._wake.set()  # wakes waiting workers from the hub; no switch here

    def _log_drop(self, endpoint: Endpoint) -> None:
        if endpoint.log_gate.allow("queue_full"):
            log.warning(
                "webhook_queue_full",
                extra={
                    "endpoint": endpoint.name,
                    "queue_size": self._queue_size,
                    "dropped": endpoint.full_drops,
                    "policy": self.settings.drop_policy,
                },
            )

    def pending(self) -> list[tuple[str, WebhookEvent]]:
        """What waits in the queue: (endpoint name, event) pairs, oldest first (for tests and debugging)."""
        return [
            (endpoint.name, WebhookEvent(event_type, seq, at, make_data(*args)))
            for endpoint, event_type, seq, at, make_data, args in self.queue
        ]

    # -- workers ------------------------------------------------------------------------------------

    def _work(self) -> None:
        queue = self.queue
        while True:
            if not queue:
                self._wake.clear()
                self._idle += 1
                try:
                    self._wake.wait()
                finally:
                    self._idle -= 1
                continue
            endpoint, event_type, seq, at, make_data, args = queue.popleft()
            self._busy += 1
            try:
                self._deliver(endpoint, event_type, seq, at, make_data, args)
            except gevent.GreenletExit:
                endpoint.shutdown_drops += 1
                raise
            except Exception:
                endpoint.failed += 1
                log.exception("webhook_error", extra={"endpoint": endpoint.name, "event_type": event_type})
            finally:
                self._busy -= 1

    def _deliver(
        self, endpoint: Endpoint, event_type: str, seq: int, at: float, make_data, args: tuple
    ) -> None:
        retry = endpoint.settings.retry
        breaker = endpoint.breaker
        attempt = 0
        body = None
        while True:
            if not breaker.allow():
                if attempt:
                    endpoint.failed += 1
                else:
                    endpoint.breaker_drops += 1
                return
            if body is None:  # made only for an endpoint that will be asked
                body = WebhookEvent(event_type, seq, at, make_data(*args)).body(self.broker_id)
            attempt += 1
            try:
                endpoint.post(body, event_type, event_id(seq))
            except EndpointError as exc:
                if breaker.failure():
                    self._breaker_opened(endpoint)
                    log.warning(
                        "webhook_breaker_open",
                        extra={
                            "endpoint": endpoint.name,
                            "url": endpoint.url,
                            "failures": breaker.failures,
                            "reset_timeout": breaker.reset_timeout,
                            "error": str(exc),
                        },
                    )
                if attempt >= retry.max_attempts:
                    endpoint.failed += 1
                    if endpoint.log_gate.allow("failed"):
                        log.warning(
                            "webhook_failed",
                            extra={
                                "endpoint": endpoint.name,
                                "url": endpoint.url,
                                "event_type": event_type,
                                "attempts": attempt,
                                "error": str(exc),
                            },
                        )
                    return
                endpoint.retried += 1
                gevent.sleep(retry.pause(attempt))
                continue
            breaker.success()
            endpoint.sent += 1
            return

    # -- EventSink hooks: pick the endpoints, queue the arguments --------------------------------------

    def _emit(self, event_type: str, make_data, args: tuple) -> None:
        endpoints = self._by_type[event_type]
        if endpoints and self.accepting:
            self._put(endpoints, event_type, make_data, args)

    def _emit_message(self, event_type: str, topic: str, make_data, args: tuple) -> None:
        trie = self._tries[event_type]
        if trie is None or not self.accepting:
            return
        found = trie.match(topic).subscribers
        if found:
            self._put(dict.fromkeys(found) if len(found) > 1 else found, event_type, make_data, args)

    def client_connected(self, *args) -> None:
        self._emit("client.connected", _connected_data, args)

    def client_disconnected(self, *args) -> None:
        self._emit("client.disconnected", _disconnected_data, args)

    def auth_success(self, *args) -> None:
        self._emit("auth.success", _auth_success_data, args)

    def auth_failure(self, *args) -> None:
        self._emit("auth.failure", _auth_failure_data, args)

    def publish_denied(self, *args) -> None:
        self._emit("authz.publish_denied", _publish_denied_data, args)

    def subscribe_denied(self, *args) -> None:
        self._emit("authz.subscribe_denied", _subscribe_denied_data, args)

    def session_takeover(self, *args) -> None:
        self._emit("client.session_takeover", _takeover_data, args)

    def subscription_created(self, *args) -> None:
        self._emit("subscription.created", _subscription_created_data, args)

    def subscription_removed(self, *args) -> None:
        self._emit("subscription.removed", _subscription_removed_data, args)

    def message_retained(self, message, cleared) -> None:
        self._emit_message("message.retained", message.topic, _retained_data, (message, cleared))

    def message_published(self, message, username, deliveries) -> None:
        self._emit_message(
            "message.published",
            message.topic,
            _published_with_payload if self.settings.include_payload else _published_data,
            (message, username, deliveries),
        )

    def message_delivered(self, message, client_id, username, qos, retain) -> None:
        self._emit_message(
            "message.delivered", message.topic, _delivered_data, (message, client_id, username, qos, retain)
        )


# -- event data (made on a worker from the arguments the hook queued; docs/webhooks.rst) -------------


def _client(client_id, username, peer, protocol_version) -> dict:
    """The fields that name the client in the connection and auth events."""
    return {
        "client_id": client_id,
        "username": username,
        "peer": peer,
        "protocol_version": _version(protocol_version),
    }


def _connected_data(
    client_id,
    username,
    peer,
    protocol_version,
    clean_start,
    keepalive,
    session_present,
    session_expiry,
    listener,
) -> dict:
    return {
        **_client(client_id, username, peer, protocol_version),
        "clean_start": clean_start,
        "keepalive": keepalive,
        "session_present": session_present,
        "session_expiry": session_expiry,
        "listener": listener,
    }


def _disconnected_data(
    client_id, username, peer, protocol_version, reason, will_published, connected_seconds
) -> dict:
    return {
        **_client(client_id, username, peer, protocol_version),
        "reason": reason,
        "will_published": will_published,
        "connected_seconds": round(connected_seconds, 3),
    }


def _auth_success_data(client_id, username, peer, protocol_version, method) -> dict:
    return {**_client(client_id, username, peer, protocol_version), "method": method}


def _auth_failure_data(client_id, username, peer, protocol_version, method, reason, reason_code) -> dict:
    return {
        **_client(client_id, username, peer, protocol_version),
        "method": method,
        "reason": reason,
        "reason_code": reason_code,
    }


def _publish_denied_data(client_id, username, peer, topic, qos, retain, reason_code) -> dict:
    return {
        "client_id": client_id,
        "username": username,
        "peer": peer,
        "topic": topic,
        "qos": qos,
        "retain": retain,
        "reason_code": reason_code,
    }


def _subscribe_denied_data(client_id, username, peer, filter, qos, reason_code) -> dict:
    return {
        "client_id": client_id,
        "username": username,
        "peer": peer,
        "filter": filter,
        "qos": qos,
        "reason_code": reason_code,
    }


def _takeover_data(client_id, username, previous_username, resumed) -> dict:
    return {
        "client_id": client_id,
        "username": username,
        "previous_username": previous_username,
        "session_resumed": resumed,
    }


def _subscription_created_data(
    client_id,
    username,
    filter,
    qos,
    requested_qos,
    no_local,
    retain_as_published,
    retain_handling,
    subscription_id,
    share_group,
    replaced,
) -> dict:
    return {
        "client_id": client_id,
        "username": username,
        "filter": filter,
        "qos": qos,
        "requested_qos": requested_qos,
        "no_local": no_local,
        "retain_as_published": retain_as_published,
        "retain_handling": retain_handling,
        "subscription_id": subscription_id,
        "share_group": share_group,
        "replaced": replaced,
    }


def _subscription_removed_data(client_id, username, filter) -> dict:
    return {"client_id": client_id, "username": username, "filter": filter}


def _retained_data(message, cleared) -> dict:
    return {
        "client_id": message.origin,
        "topic": message.topic,
        "qos": message.qos,
        "payload_size": len(message.payload),
        "cleared": cleared,
    }


def _published_data(message, username, deliveries) -> dict:
    return {
        "client_id": message.origin,
        "username": username,
        "topic": message.topic,
        "qos": message.qos,
        "retain": message.retain,
        "payload_size": len(message.payload),
        "deliveries": deliveries,
    }


def _published_with_payload(message, username, deliveries) -> dict:
    data = _published_data(message, username, deliveries)
    data["payload"] = base64.b64encode(message.payload).decode("ascii")
    return data


def _delivered_data(message, client_id, username, qos, retain) -> dict:
    return {
        "client_id": client_id,
        "username": username,
        "publisher": message.origin,
        "topic": message.topic,
        "qos": qos,
        "retain": retain,
        "payload_size": len(message.payload),
    }
