"""Publishing: route a message to the matching sessions and shared groups, count it, and wait for
its commit (``Broker`` mixin)."""

from __future__ import annotations

import logging

import gevent
from gevent.event import AsyncResult

from fluxmq._core.stats_core import monotonic
from fluxmq._core.trie import validate_topic
from fluxmq.errors import QuotaExceeded, StorageError

from .message import Message, check_message
from .prefixes import QUEUE_PREFIX
from .session import PersistentSession, Session
from .stats import LATENCY_SAMPLE_MASK

log = logging.getLogger("fluxmq.broker")


class Publishing:
    """``Broker.publish`` and what it calls."""

    @staticmethod
    def check_topic(topic: str) -> None:
        """Validate a topic name from a front end that has no codec check (HTTP, CoAP)."""
        validate_topic(topic)

    def publish(self, message: Message, origin: Session | None = None) -> int:
        """Route one message to every matching session; store it when retained. Returns deliveries.

        Raises FieldOutOfRange (a ValueError), before anything is routed or stored, for a message
        whose fields MQTT cannot carry (``message.check_message``): the entry of every front end
        that builds its own messages (HTTP, CoAP, bridges, cluster code)."""
        check_message(message)
        return self.publish_decoded(message, origin)

    def publish_decoded(self, message: Message, origin: Session | None = None) -> int:
        """``publish`` without the check, for a message the MQTT codec decoded (its fields are in
        range by construction): the MQTT protocol layer's entry, which pays nothing for the check
        (the C relay's messages never come here)."""
        stats = self.stats
        msg_qos = message.qos
        size = len(message.payload)
        received = stats.received_qos
        received[msg_qos] += 1
        stats.received_bytes_qos[msg_qos] += size
        # 1 publish in 64 (of each QoS) is timed until its deliveries are flushed (_observe_latency).
        started = monotonic() if not received[msg_qos] & LATENCY_SAMPLE_MASK else 0.0
        topic = message.topic
        if topic[0] == "$" and topic.startswith(QUEUE_PREFIX):
            return self._queue_manager().publish(message, origin)
        route = self.router.route(topic)
        store = self._store
        ops_before = 0
        if store is not None:
            if store.refusing and (msg_qos or message.retain) and self._would_store(message, route):
                stats.dropped("storage_full")
                if msg_qos:
                    raise QuotaExceeded("storage full")
                self._refused_qos0()  # no ack to carry the refusal: counted and logged
                return 0
            if msg_qos and origin is not None:
                ops_before = store.op_count
        if message.retain and self.retained.store(message):
            events = self.events
            if events is not None:
                events.message_retained(message, not message.payload)
        retain = message.retain
        sent_qos = stats.sent_qos
        sent_bytes = stats.sent_bytes_qos
        n = n_acked = 0
        for session, qos, qos_own, rap, sub_ids in route.targets:
            if session is origin:
                if qos_own < 0:
                    continue  # No Local [MQTT-3.8.3-3]
                qos = qos_own
            if msg_qos < qos:
                qos = msg_qos
            session.deliver(message, qos, rap and retain, sub_ids)
            n += 1
            if qos:  # QoS 1/2 deliveries are counted one by one, QoS 0 ones once below
                sent_qos[qos] += 1
                sent_bytes[qos] += size
                n_acked += 1
        if n > n_acked:
            sent_qos[0] += n - n_acked
            sent_bytes[0] += (n - n_acked) * size
        groups = route.groups
        peers = self.peers
        if peers is not None:
            # Queued for peers with matching interest (never blocks); returns the shared groups this
            # node serves (the others were given to a peer, once in the cluster).
            groups = peers.forward(message, groups)
        if groups:
            n += self._publish_shared(message, groups)
        if store is not None and msg_qos and origin is not None and store.op_count != ops_before:
            # The origin's PUBACK/PUBREC acknowledges what this publish stored (for other clients,
            # or retained): a failed commit must abandon it (FlushScheduler).
            store.note_stake(origin.client_id)
        if started:
            self._observe_latency(started)
        on_published = self._on_published
        if on_published is not None:
            on_published(message, origin.username if origin is not None else None, n)
        if self._on_delivered is not None:
            self._report_deliveries(message, route.targets, origin)
        return n

    def matched_by_peers(self, topic: str) -> bool:
        """Whether another node or worker has a subscription matching ``topic``: a publish that
        matched nothing here but was forwarded is not one "no matching subscribers" (5.0 0x10)
        may answer. Asked only when nothing matched here."""
        peers = self.peers
        return peers is not None and peers.matches(topic)

    def _report_deliveries(self, message: Message, targets, origin: Session | None) -> None:
        """message.delivered per subscriber of ``targets`` (walked again only when observed, so the
        fan-out loop above stays as it is)."""
        on_delivered = self._on_delivered
        msg_qos = message.qos
        for session, qos, qos_own, rap, _ids in targets:
            if session is origin:
                if qos_own < 0:
                    continue
                qos = qos_own
            on_delivered(
                message,
                session.client_id,
                session.username,
                msg_qos if msg_qos < qos else qos,
                rap and message.retain,
            )

    def _observe_latency(self, started: float) -> None:
        # Deliveries only filled output buffers; the FlushScheduler's hub callback (registered by
        # the first delivery of this loop turn) writes them. A callback registered now runs after
        # it, so the sample covers routing, encoding and the socket write.
        gevent.get_hub().loop.run_callback(self.stats.observe_delivery_latency, started)

    def _refused_qos0(self) -> None:
        n = self.stats.drops.get("storage_full", 0)
        if not self._qos0_refusal_logged or n % 10000 == 0:
            self._qos0_refusal_logged = True
            log.warning(
                "publish_refused_storage_full",
                extra={
                    "qos": 0,
                    "dropped_storage_full": n,
                    "effect": "retained QoS 0 messages are dropped while the storage is full",
                },
            )

    def when_committed(self) -> AsyncResult | None:
        """What ``wait_committed`` waits for, without blocking: an ``AsyncResult`` set to None
        once every operation recorded so far is committed (fsynced under ``storage.sync:
        always``), or to the error of the commit that failed; None with the memory backend. A
        caller that goes on recording meanwhile (a peer stream applying its next batches) waits
        for each result in turn: commits complete in order."""
        store = self._store
        if store is None:
            return None
        done = AsyncResult()
        store.after_commit(done.set)  # called at once when nothing is pending: get() does not wait
        return done

    def wait_committed(self, timeout: float | None = 30.0) -> None:
        """Block this greenlet until every operation recorded so far (e.g. by the ``publish`` just
        made) is committed, and fsynced under ``storage.sync: always``: the after-commit point a
        front end without a connection answers at (HTTP bridge, admin API). Returns at once with
        the memory backend or when nothing is pending. Raises StorageError when that commit fails
        or does not finish within ``timeout``. Never call it from the hub."""
        done = self.when_committed()
        if done is None:
            return
        try:
            error = done.get(timeout=timeout)
        except gevent.Timeout:
            raise StorageError(f"the commit did not finish within {timeout}s") from None
        if error is not None:
            raise StorageError(f"the commit failed: {error}") from None

    @staticmethod
    def _would_store(message: Message, route) -> bool:
        """True when publishing ``message`` writes to storage (retained, or a persistent target); a
        retained message's clear (empty payload) only frees space."""
        if message.retain and message.payload and not message.topic.startswith("$SYS"):
            return True
        if any(isinstance(t[0], PersistentSession) for t in route.targets):
            return True
        return any(isinstance(m.session, PersistentSession) for g in route.groups for m in g.members.values())

    def _publish_shared(self, message: Message, groups: list) -> int:
        n = 0
        for group in groups:
            member = self.router.pick_member(group, topic=message.topic)
            if member is None:
                continue
            ids = (member.subscription_id,) if member.subscription_id else None
            qos = message.qos if message.qos < member.qos else member.qos
            member.session.deliver(message, qos, False, ids)
            if self._on_delivered is not None:
                self._on_delivered(message, member.session.client_id, member.session.username, qos, False)
            stats = self.stats
            stats.sent_qos[qos] += 1
            stats.sent_bytes_qos[qos] += len(message.payload)
            n += 1
        return n
