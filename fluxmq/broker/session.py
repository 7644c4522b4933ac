"""Session: the per-client state that outlives a connection (subscriptions, inflight, queue).

Outbound delivery rules kept here, independent of any wire protocol:

- QoS 1/2 messages go in flight only while the client's window (``send_quota``: 5.0 Receive
  Maximum, else ``broker.max_inflight``) has room and its output is not congested; the rest wait
  in a bounded queue in arrival order.
- A reconnecting persistent session resends its in-flight PUBLISHes with DUP set and its PUBRELs,
  then drains the queue [MQTT-4.4.0-1].
- QoS 0 for an offline session is dropped (like Mosquitto's default); for an online but congested
  client it waits in the same bounded queue, where it is the first to go when the queue is full.
- A connection that is closing (``Delivery.closed``, before its teardown detaches the session)
  cannot take anything now: QoS 1/2 is queued as for a congested client (a persistent session
  delivers it on reconnect), QoS 0 is dropped as for an offline session.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator

from fluxmq._core.broker_core import SessionCore
from fluxmq.errors import MessageUnencodable
from fluxmq.storage.base import Storage, StoredQueue
from fluxmq.storage.queue import DiskQueue

from .delivery import Delivery
from .message import Message, TrackedMessage
from .stats import BrokerStats

log = logging.getLogger("fluxmq.broker.session")

EXPIRY_NEVER = 0xFFFFFFFF
#: ``Session.send_tracked``: the client can never take this message (a negative number: callers
#: test ``> 0`` for a send)
REFUSED = -1

# Queue overflow policies (config broker.queue_overflow).
DROP_NEW = "drop_new"
DROP_OLDEST = "drop_oldest"
DISCONNECT = "disconnect"


_NO_QUEUE = ()  # the empty queue of a Session that has never queued anything

# Disk queue entries read at once by a shared-subscription hand-over walk.
HAND_OVER_READ = 32


class SessionLimits:
    """Bounds applied to every session; built once from the broker config."""

    __slots__ = ("max_inflight", "max_queued_messages", "max_queued_bytes", "queue_overflow")

    def __init__(
        self,
        max_inflight: int = 100,
        max_queued_messages: int = 1000,
        max_queued_bytes: int = 16 << 20,
        queue_overflow: str = DROP_NEW,
    ) -> None:
        self.max_inflight = max_inflight
        self.max_queued_messages = max_queued_messages
        self.max_queued_bytes = max_queued_bytes
        self.queue_overflow = queue_overflow


class Subscription:
    """One subscription of a session: the value stored in the subscription trie."""

    __slots__ = (
        "session",
        "filter",
        "qos",
        "no_local",
        "retain_as_published",
        "retain_handling",
        "subscription_id",
        "share_group",
    )

    def __init__(
        self,
        session: Session,
        filter: str,
        qos: int,
        no_local: bool = False,
        retain_as_published: bool = False,
        retain_handling: int = 0,
        subscription_id: int = 0,
        share_group: str | None = None,
    ) -> None:
        self.session = session
        self.filter = filter  # as the client wrote it, $share/... included
        self.qos = qos
        self.no_local = no_local
        self.retain_as_published = retain_as_published
        self.retain_handling = retain_handling
        self.subscription_id = subscription_id
        self.share_group = share_group

    @classmethod
    def like(cls, s, target) -> Subscription:
        """A subscription of ``target`` with the filter and options of ``s`` (a Subscription or a
        ``session_state.SubscriptionState``): an imported session's, a moved one's stand-in's."""
        return cls(
            target,
            s.filter,
            s.qos,
            s.no_local,
            s.retain_as_published,
            s.retain_handling,
            s.subscription_id,
            s.share_group,
        )


class Inflight:
    """An outbound QoS 1/2 message awaiting its acknowledgement."""

    __slots__ = ("message", "qos", "retain", "subscription_ids", "released")

    def __init__(self, message: Message, qos: int, retain: bool, subscription_ids) -> None:
        self.message = message
        self.qos = qos
        self.retain = retain
        self.subscription_ids = subscription_ids
        self.released = False  # QoS 2: PUBREC received, PUBREL sent, awaiting PUBCOMP


class Will:
    """A will message and its delay (5.0 Will Delay Interval; 0 for 3.x)."""

    __slots__ = ("message", "delay")

    def __init__(self, message: Message, delay: int = 0) -> None:
        self.message = message
        self.delay = delay


class Session(SessionCore):
    """State of one client identifier. ``delivery``, ``queue``, ``inflight``, ``send_quota`` and
    ``_next_pid`` are typed fields of ``SessionCore`` (``fluxmq/_core/broker_core.pyx``), read and
    written by the relay."""

    trusted = False  # a client (the router's read filter applies); broker-internal targets say True

    __slots__ = (
        "client_id",
        "persistent",
        "expiry_interval",
        "subscriptions",
        "queue_bytes",
        "queue_qos0",
        "_inbound_qos2",
        "will",
        "timer",
        "_limits",
        "_stats",
        "connected_since",
        "disconnected_at",
        "username",
        "held",
        "reread",
        "validity",
        "validity_drops",
        "on_room",
        "dropped",
    )

    def __init__(self, client_id: str, limits: SessionLimits, stats: BrokerStats) -> None:
        self.client_id = client_id
        self.persistent = False
        self.expiry_interval = 0
        self.subscriptions: dict[str, Subscription] = {}
        self.delivery: Delivery | None = None
        self.inflight: dict[int, Inflight] = {}
        # items: (message, qos, retain, subscription_ids); an empty tuple until the first enqueue, so
        # a session that never queues does not carry a deque (768 bytes per idle client)
        self.queue: deque | tuple = _NO_QUEUE
        self.queue_bytes = 0
        self.queue_qos0 = 0  # QoS 0 items in the queue, so eviction knows when to look
        # Packet ids in flight from an earlier connection that this one has not been resent yet:
        # a client that reconnects with a smaller Receive Maximum gets them as its window frees.
        self.held: deque | tuple = ()
        # QoS 2 ids received, PUBREC sent, PUBREL pending: made at first use (``inbound_qos2``), as
        # an empty set is 216 bytes and most clients never publish at QoS 2
        self._inbound_qos2: set[int] | None = None
        self.send_quota = limits.max_inflight
        self.will: Will | None = None
        self.timer = None  # pending will-delay or session-expiry timer
        self._next_pid = 1
        self._limits = limits
        self._stats = stats
        self.connected_since = 0.0
        self.disconnected_at = 0.0
        self.username: str | None = None
        # [items at the head of the queue to check, can_read(session, topic)] after another user
        # resumed the session (recheck_reads); None otherwise, so pump pays one test per message.
        self.reread: list | None = None
        # Seconds a queued message stays valid (a bridge's message_validity); 0 = no limit. Only
        # queued messages carry the deadline, so the direct send path pays nothing.
        self.validity = 0.0
        self.validity_drops = 0  # queued messages dropped as expired when their turn came
        self.dropped = 0  # messages dropped for this client, any reason (the admin API shows it)
        # Called with the session when its output drains (durable queues waiting to send); None
        # for a client that consumes no queue.
        self.on_room = None

    @property
    def limits(self) -> SessionLimits:
        """The queue bounds of this session."""
        return self._limits

    @limits.setter
    def limits(self, limits: SessionLimits) -> None:
        self._limits = limits

    def _valid_until(self, message: Message) -> Message:
        """``message`` with an expiry no later than ``validity`` seconds from now (a copy when shortened)."""
        deadline = time.monotonic() + self.validity
        if message.expires_at is not None and message.expires_at <= deadline:
            return message
        return message.copy(expires_at=deadline)

    # -- delivery --------------------------------------------------------------------------------

    def _drop(self, reason: str) -> None:
        """Count a message dropped for this client: node-wide by reason, and for this session."""
        self._stats.dropped(reason)
        self.dropped += 1

    def _send(self, d: Delivery, message: Message, qos: int, retain: bool, pid: int, dup: bool, ids) -> bool:
        """``d.send_publish``; False, the drop counted, for a message this client can never take:
        over its Maximum Packet Size, or one its protocol cannot encode (``MessageUnencodable``)."""
        try:
            if d.send_publish(message, qos, retain, pid, dup, ids):
                return True
            self._drop("packet_too_large")
        except MessageUnencodable:
            self._drop("unencodable")
        return False

    def deliver(self, message: Message, qos: int, retain: bool, subscription_ids) -> None:
        """Take one message for this client: send it now, queue it, or drop it by policy."""
        d = self.delivery
        if d is None:
            if qos == 0:
                self._drop("offline_qos0")
                return
            self._enqueue(message, qos, retain, subscription_ids)
            return
        if self.queue or d.is_congested():
            if qos == 0 and d.closed:
                self._drop("offline_qos0")  # closing: as good as offline for QoS 0
                return
            self._enqueue(message, qos, retain, subscription_ids)
            if (
                len(self.queue) > 1
                and (len(self.inflight) < self.send_quota or self.queue_qos0 or self.held)
                and not d.is_congested()
            ):
                # The output has room again (drained, or the client's allowance grew) before the
                # low-water mark called on_writable: move the queue on now rather than overflow it.
                # (With the window full, nothing held and no QoS 0 queued, pump could send nothing:
                # the common case of a client behind its window pays no call.)
                self.pump()
            return
        if qos == 0:
            self._send(d, message, 0, retain, 0, False, subscription_ids)
            return
        if len(self.inflight) < self.send_quota:
            self._send_new(d, message, qos, retain, subscription_ids)
        else:
            self._enqueue(message, qos, retain, subscription_ids)

    def _send_new(self, d: Delivery, message: Message, qos: int, retain: bool, subscription_ids) -> int:
        """Send a new QoS 1/2 PUBLISH; returns its packet id, or 0 when the client cannot take it."""
        pid = self._alloc_packet_id()
        if self._send(d, message, qos, retain, pid, False, subscription_ids):
            self.inflight[pid] = Inflight(message, qos, retain, subscription_ids)
            return pid
        # Too large for this client (5.0 Maximum Packet Size) or not encodable for it: dropped for
        # this client only, never in flight (a persistent session's entry goes too: acknowledged
        # and dropped). (A client that cannot take it *now*, congested or closing, never gets
        # here: is_congested() sent the message to the queue.)
        return 0

    def send_tracked(self, message: Message) -> int:
        """Send a QoS 1 message whose settlement the caller tracks (``TrackedMessage``, a durable
        queue's delivery): only when the client's window and output have room, never queued or
        stored with the session. Returns its packet id, 0 when the client cannot take it now,
        ``REFUSED`` (negative) when it can never take this message (over its Maximum Packet Size,
        or unencodable for it: the drop is counted), so a caller gives it to someone else."""
        d = self.delivery
        inflight = self.inflight
        if d is None or self.queue or self.held or len(inflight) >= self.send_quota or d.is_congested():
            return 0
        pid = self._next_pid  # _alloc_packet_id, inline (once per delivery)
        while pid in inflight:
            pid = pid + 1 if pid < 65535 else 1
        self._next_pid = pid + 1 if pid < 65535 else 1
        if self._send(d, message, 1, False, pid, False, None):
            inflight[pid] = message  # its own in-flight entry (TrackedMessage): not stored, no Inflight
            return pid
        return REFUSED  # too large for this client, or not encodable for it

    def can_take_tracked(self) -> bool:
        """True when ``send_tracked`` would send now."""
        d = self.delivery
        return (
            d is not None
            and not self.queue
            and not self.held
            and len(self.inflight) < self.send_quota
            and not d.is_congested()
        )

    def _alloc_packet_id(self) -> int:
        pid = self._next_pid
        inflight = self.inflight
        # The window is at most 65,535, so a free id always exists when we get here.
        while pid in inflight:
            pid = pid + 1 if pid < 65535 else 1
        self._next_pid = pid + 1 if pid < 65535 else 1
        return pid

    def _enqueue(self, message: Message, qos: int, retain: bool, subscription_ids) -> None:
        limits = self._limits
        size = len(message.payload) + len(message.topic)
        queue = self.queue
        if len(queue) >= limits.max_queued_messages or self.queue_bytes + size > limits.max_queued_bytes:
            policy = limits.queue_overflow
            if policy == DROP_OLDEST and queue:
                self._drop_item(queue.popleft())
                self._drop("queue_full")
            elif policy == DISCONNECT:
                self._drop("queue_full")
                if self.delivery is not None:
                    self.delivery.close(0x97, "session queue full")
                return
            elif qos == 0 or not self._evict_qos0():
                # drop_new: make room by evicting the oldest queued QoS 0 message first; a new QoS 0
                # message never evicts anything.
                self._drop("queue_full")
                return
        if queue is _NO_QUEUE:
            queue = self.queue = deque()
        if self.validity:
            message = self._valid_until(message)
        queue.append((message, qos, retain, subscription_ids))
        self.queue_bytes += size
        if qos == 0:
            self.queue_qos0 += 1

    def _evict_qos0(self) -> bool:
        if not self.queue_qos0:
            return False
        queue = self.queue
        for i, item in enumerate(queue):
            if item[1] == 0:
                del queue[i]
                self._drop_item(item)
                self._drop("queue_full")
                return True
        return False

    def _drop_item(self, item) -> None:
        self.queue_bytes -= len(item[0].payload) + len(item[0].topic)
        if item[1] == 0:
            self.queue_qos0 -= 1

    def pump(self) -> None:
        """Move queued messages to the client while its window and output allow."""
        d = self.delivery
        if d is None:
            return
        if self.held:
            self._resend_held(d)
        queue = self.queue
        if not queue:
            return
        inflight = self.inflight
        quota = self.send_quota
        while queue and not d.is_congested():
            message, qos, retain, sub_ids = queue[0]
            if qos and len(inflight) >= quota:
                return
            queue.popleft()
            # _drop_item's count, without an item tuple per message (PersistentSession has its own pump)
            self.queue_bytes -= len(message.payload) + len(message.topic)
            if qos == 0:
                self.queue_qos0 -= 1
            if message.expires_at is not None and message.expired():
                self._drop("expired")
                if self.validity:
                    self.validity_drops += 1
                continue
            if self.reread is not None and not self._still_readable(message):
                continue
            if qos == 0:
                self._send(d, message, 0, retain, 0, False, sub_ids)
            else:
                self._send_new(d, message, qos, retain, sub_ids)

    def queue_has_room(self) -> bool:
        """True when one more message can be queued without dropping one (the shared hand-over
        asks before it gives this session a message another member still holds)."""
        limits = self._limits
        return len(self.queue) < limits.max_queued_messages and self.queue_bytes < limits.max_queued_bytes

    def recheck_reads(self, can_read, queued_only: bool = False) -> None:
        """Another user resumed this session: what it holds passed the previous user's read rules.

        In-flight messages not yet released are checked now (a few, bounded by the window); queued
        ones as they leave the queue, so a long disk queue is not read in one turn. A message that
        ``can_read(self, topic)`` refuses is dropped and counted as ``not_authorized``.
        """
        if not queued_only:
            for pid, entry in list(self.inflight.items()):
                if not entry.released and not can_read(self, entry.message.topic):
                    self._forget_inflight(pid)
                    self._drop("not_authorized")
        if self.queue:
            # Items queued later were routed by the new user's rules; checking some of them again
            # (after evictions shortened the old part) is harmless.
            self.reread = [len(self.queue), can_read]

    def _still_readable(self, message: Message) -> bool:
        reread = self.reread
        reread[0] -= 1
        if reread[0] <= 0:
            self.reread = None
        if reread[1](self, message.topic):
            return True
        self._drop("not_authorized")
        return False

    def take_unfinished(self, claim) -> list:
        """Remove the QoS 1/2 messages this client has not finished that ``claim(message)`` returns a
        new owner for; returns ``[(message, owner)]`` in delivery order (in flight, then queued).
        All at once: the broker hands over in bounded steps with ``hand_over_steps``."""
        return [taken for taken in self.hand_over_steps(claim) if taken is not None]

    def hand_over_steps(self, claim, follow_tail: bool = False) -> Iterator[tuple[Message, object] | None]:
        """Walk the messages this client has not finished, one yield per message (or empty queue
        slot) looked at: ``(message, owner)`` when ``claim(message)`` gave it a new owner (it is
        removed from this session then), None when it stays. The caller may stop between yields
        and resume in a later loop turn, so handing over a long queue never stalls the hub.

        Used to hand a shared-subscription member's messages to another member: QoS 1 in flight and
        queued QoS 1/2 qualify; a QoS 2 PUBLISH already sent never does, it is completed with this
        client or not at all [MQTT-4.8.2-4, MQTT-4.8.2-5]. Messages that stay are not moved or
        rewritten. Resuming is safe while the session is offline (new messages are appended behind
        the walk, and looked at too with ``follow_tail``); stop the walk before the session is
        attached again or its state cleared.
        """
        inflight = self.inflight
        for pid, entry in list(inflight.items()):  # at most the client's window
            if entry.qos == 2 or inflight.get(pid) is not entry:
                yield None
                continue
            owner = claim(entry.message)
            if owner is None:
                yield None
                continue
            self._forget_inflight(pid)
            yield entry.message, owner
        yield from self._hand_over_queued(claim, follow_tail)

    def _hand_over_queued(self, claim, follow_tail: bool) -> Iterator[tuple[Message, object] | None]:
        # The walk goes by index up to the current length, so it always follows the tail.
        queue = self.queue
        i = 0
        while queue is self.queue and i < len(queue):
            item = queue[i]
            owner = claim(item[0]) if item[1] else None
            if owner is None:
                i += 1
                yield None
                continue
            del queue[i]
            self._drop_item(item)
            yield item[0], owner

    def _forget_inflight(self, packet_id: int) -> None:
        del self.inflight[packet_id]

    # -- acknowledgements from the client -------------------------------------------------------

    def on_puback(self, packet_id: int, reason_code: int = 0) -> bool:
        """PUBACK for an outbound QoS 1 message; False if the id is not in flight as QoS 1.
        A tracked delivery (durable queue) is told, with the 5.0 reason code."""
        entry = self.inflight.get(packet_id)
        if entry is None or entry.qos != 1:
            return False
        if isinstance(entry, TrackedMessage):  # its own in-flight entry (send_tracked): the common case
            del self.inflight[packet_id]  # never stored with the session: nothing to delete
            if self.queue or self.held:
                self.pump()
            ticket = entry.ticket
            entry.settle(self, reason_code, entry if ticket is None else ticket)
            return True
        message = entry.message
        tracked = isinstance(message, TrackedMessage)  # (a durable queue's delivery class derives from it)
        if tracked:
            del self.inflight[packet_id]  # never stored with the session (send_tracked): nothing to delete
        else:
            self._forget_inflight(packet_id)  # before pump() may reuse the id
        if self.queue or self.held:
            self.pump()
        if tracked:
            ticket = message.ticket
            message.settle(self, reason_code, message if ticket is None else ticket)
        return True

    def on_pubrec(self, packet_id: int, reason_code: int = 0) -> bool:
        """PUBREC for an outbound QoS 2 message; the caller answers with PUBREL."""
        entry = self.inflight.get(packet_id)
        if entry is None or entry.qos != 2:
            return False
        if reason_code >= 0x80:
            # 5.0: the receiver refused it; the exchange ends here, no PUBREL (MQTT 5.0 4.3.3).
            self._forget_inflight(packet_id)
            if self.queue or self.held:
                self.pump()
            return True
        if not entry.released:
            entry.released = True
            self._released(packet_id)
        return True

    def _released(self, packet_id: int) -> None:
        """Hook: a QoS 2 message in flight reached PUBREL (a durable session records it)."""

    def on_pubcomp(self, packet_id: int) -> bool:
        """PUBCOMP ends an outbound QoS 2 exchange."""
        entry = self.inflight.get(packet_id)
        if entry is None or not entry.released:
            return False
        self._forget_inflight(packet_id)
        if self.queue or self.held:
            self.pump()
        return True

    # -- connection lifecycle --------------------------------------------------------------------

    def attach(self, delivery: Delivery, send_quota: int) -> None:
        """Bind a new connection: resend what was in flight (DUP set, PUBREL for released QoS 2)
        in order [MQTT-4.4.0-1], at most the client's Receive Maximum of them now and the rest as
        acknowledgements free its window [MQTT-4.9.0-2]; then drain the queue."""
        self.delivery = delivery
        self.send_quota = min(send_quota, 65535)
        self.held = deque(self.inflight) if self.inflight else ()
        self.pump()

    def _resend_held(self, d: Delivery) -> None:
        held = self.held
        inflight = self.inflight
        quota = self.send_quota
        # A closing connection takes nothing more: the rest stays in flight for the next connection
        # (never dropped as if too large).
        while held and len(inflight) - len(held) < quota and not d.closed:
            pid = held.popleft()
            entry = inflight.get(pid)
            if entry is None:
                continue  # acknowledged or handed over meanwhile
            if entry.released:
                d.send_pubrel(pid)
            elif not self._send(d, entry.message, entry.qos, entry.retain, pid, True, entry.subscription_ids):
                self._forget_inflight(pid)
        if not held:
            self.held = ()

    def detach(self) -> None:
        """The connection ended; state stays for a persistent session."""
        self.delivery = None

    @property
    def inbound_qos2(self) -> set[int]:
        """The inbound QoS 2 packet ids awaiting PUBREL (the set is made at first use)."""
        ids = self._inbound_qos2
        if ids is None:
            ids = self._inbound_qos2 = set()
        return ids

    @inbound_qos2.setter
    def inbound_qos2(self, ids: set[int]) -> None:
        self._inbound_qos2 = ids

    def clear_state(self) -> None:
        """Forget inflight, queue and QoS 2 ids (clean start or end of session)."""
        self.inflight.clear()
        self.held = ()
        self.queue = _NO_QUEUE
        self.queue_bytes = 0
        self.queue_qos0 = 0
        if self._inbound_qos2:
            self._inbound_qos2.clear()
        self.reread = None

    def on_writable(self) -> None:
        """The client's output drained below its low-water mark."""
        if self.queue or self.held:
            self.pump()
        if self.on_room is not None:
            self.on_room(self)

    def __repr__(self) -> str:
        state = "online" if self.delivery is not None else "offline"
        return (
            f"Session({self.client_id!r}, {state}, subs={len(self.subscriptions)}, "
            f"inflight={len(self.inflight)}, queued={len(self.queue)})"
        )


class _DurableIds(set):
    """The inbound QoS 2 ids of a persistent session: adds and removals are written through."""

    __slots__ = ("_store", "_cid")

    def __init__(self, store: Storage, client_id: str) -> None:
        super().__init__()
        self._store = store
        self._cid = client_id

    def add(self, packet_id: int) -> None:
        if packet_id not in self:
            set.add(self, packet_id)
            self._store.put_inbound_qos2(self._cid, packet_id)

    def discard(self, packet_id: int) -> None:
        if packet_id in self:
            set.discard(self, packet_id)
            self._store.delete_inbound_qos2(self._cid, packet_id)


class PersistentSession(Session):
    """A persistent session under a durable store: its state is written through to ``store``.

    Inflight QoS 1/2 (both directions) is recorded as it changes and the offline queue is a
    DiskQueue, bounded by ``limits`` (``storage.max_queued_*``). Overflow policy: the oldest queued
    QoS 0 message is evicted first; when there is none (or the new message is QoS 0) the new
    message is refused for this session and counted as ``queue_full``. Every record is buffered by
    the store and committed before any acknowledgement of the turn leaves (FlushScheduler).

    A QoS 1/2 message is written once, as an entry of the queue's seq space, and deleted once, when
    the exchange ends: sending it (from the queue, or at once) only names its packet id's entry
    (``Storage.put_sent``), so a queued-then-sent message is not written again as an inflight copy.
    """

    __slots__ = ("store",)

    def __init__(
        self,
        client_id: str,
        limits: SessionLimits,
        stats: BrokerStats,
        store: Storage,
        queue_index: StoredQueue | None = None,
    ) -> None:
        super().__init__(client_id, limits, stats)
        self.store = store
        self.persistent = True
        self.queue = DiskQueue(store, client_id, Message, queue_index)
        self.queue_bytes = self.queue.bytes  # mirrors the DiskQueue's count for metrics and admin
        self._bound_queue(limits)
        self.inbound_qos2 = _DurableIds(store, client_id)

    @property
    def limits(self) -> SessionLimits:
        """The queue bounds of this session (kept on its DiskQueue too, for the C relay)."""
        return self._limits

    @limits.setter
    def limits(self, limits: SessionLimits) -> None:
        self._limits = limits
        self._bound_queue(limits)

    def _bound_queue(self, limits: SessionLimits) -> None:
        # The relay queues a plain QoS 1 message behind a full window in C (_core/relay.pyx) within
        # these bounds, which ``_enqueue`` checks here.
        # (C fields: a bound past 2**62 is as good as none)
        self.queue.max_count = min(limits.max_queued_messages, 1 << 62)
        self.queue.max_bytes = min(limits.max_queued_bytes, 1 << 62)

    def deliver(self, message: Message, qos: int, retain: bool, subscription_ids) -> None:
        # Session.deliver, whose common case here (online, QoS 1/2, nothing queued, room in the
        # window and the output) goes straight to the send: the disk queue's count is read as an
        # attribute, not through DiskQueue.__bool__. Every other case is Session.deliver's.
        d = self.delivery
        if d is not None and qos:
            queue = self.queue
            if queue.count:
                # Session.deliver's queueing branch (the common case of a client behind its window)
                # without DiskQueue.__bool__ / __len__ frames, and without a pump call that could
                # only return (the window full, nothing held, no QoS 0 queued)
                self._enqueue(message, qos, retain, subscription_ids)
                if (
                    queue.count > 1
                    and (len(self.inflight) < self.send_quota or queue.qos0 or self.held)
                    and not d.is_congested()
                ):
                    self.pump()
                return
        if (
            d is None
            or not qos
            or self.queue.count
            or len(self.inflight) >= self.send_quota
            or d.is_congested()
        ):
            Session.deliver(self, message, qos, retain, subscription_ids)
            return
        pid = Session._send_new(self, d, message, qos, retain, subscription_ids)
        if pid:
            self.queue.put_in_flight(message, qos, retain, subscription_ids, pid)

    def _send_new(self, d: Delivery, message: Message, qos: int, retain: bool, subscription_ids) -> int:
        pid = Session._send_new(self, d, message, qos, retain, subscription_ids)
        if pid:
            self.queue.put_in_flight(message, qos, retain, subscription_ids, pid)
        return pid

    def on_puback(self, packet_id: int, reason_code: int = 0) -> bool:
        # Session.on_puback for an untracked message, with the store's delete inlined (see deliver)
        entry = self.inflight.get(packet_id)
        if entry is None or entry.qos != 1 or isinstance(entry.message, TrackedMessage):
            return Session.on_puback(self, packet_id, reason_code)
        del self.inflight[packet_id]
        self.store.delete_inflight(self.client_id, packet_id)  # before pump() may reuse the id
        if self.queue.count or self.held:
            self.pump()
        return True

    def pump(self) -> None:
        """Session.pump over the disk queue: a QoS 1/2 entry sent stays where it is, in flight."""
        d = self.delivery
        if d is None:
            return
        if self.held:
            self._resend_held(d)
        queue = self.queue
        if not queue.count:
            return
        inflight = self.inflight
        store = self.store
        cid = self.client_id
        while not d.is_congested():
            if len(inflight) < self.send_quota:
                head = queue.pop_head()
                if head is None:
                    return
                seq, (message, qos, retain, sub_ids), _ = head
            else:  # the window is full: only a QoS 0 head can go
                if not queue.qos0:
                    return  # none queued (the head is not read: a later pop_head takes it in one step)
                head = queue.peek()
                if head is None or head[1][1]:
                    return
                queue.drop_head(head)
                seq, (message, qos, retain, sub_ids), _ = head
            self.queue_bytes = queue.bytes
            if message.expires_at is not None and message.expired():
                store.queue_pop(cid, seq)
                self._drop("expired")
                if self.validity:
                    self.validity_drops += 1
                continue
            if self.reread is not None and not self._still_readable(message):
                store.queue_pop(cid, seq)
                continue
            if qos == 0:
                self._send(d, message, 0, retain, 0, False, sub_ids)
                store.queue_pop(cid, seq)
                continue
            pid = Session._send_new(self, d, message, qos, retain, sub_ids)
            if pid:
                store.put_sent(cid, pid, seq)
            else:
                store.queue_pop(cid, seq)

    def _enqueue(self, message: Message, qos: int, retain: bool, subscription_ids) -> None:
        queue = self.queue
        limits = self._limits
        if self.store.refusing:
            self._drop("storage_full")
            return
        size = len(message.payload) + len(message.topic) + 40  # about the encoded entry's size
        if queue.count >= limits.max_queued_messages or queue.bytes + size > limits.max_queued_bytes:
            if qos == 0 or not self._evict_qos0():
                self._drop("queue_full")
                return
        if self.validity:
            message = self._valid_until(message)
        queue.append((message, qos, retain, subscription_ids))
        self.queue_bytes = queue.bytes

    def _evict_qos0(self) -> bool:
        if self.queue.evict_qos0():
            self.queue_bytes = self.queue.bytes
            self._drop("queue_full")
            return True
        return False

    def _drop_item(self, item) -> None:
        self.queue_bytes = self.queue.bytes  # the DiskQueue keeps the counts

    def queue_has_room(self) -> bool:
        return not self.store.refusing and Session.queue_has_room(self)

    def _hand_over_queued(self, claim, follow_tail: bool) -> Iterator[tuple[Message, object] | None]:
        # Walk the disk queue by seq, HAND_OVER_READ entries per read; a claimed entry is deleted
        # where it is and the others are left alone (no pop and re-append of the whole queue).
        queue = self.queue
        queue.drop_read_ahead()
        seq, end = queue.first, queue.next  # what was queued when the walk began
        while queue.count and queue is self.queue:
            if follow_tail:
                end = queue.next
            if seq >= end:
                return
            stop = min(end, seq + HAND_OVER_READ)
            for at, item, size in queue.entries(seq, stop):
                owner = claim(item[0]) if item is not None and item[1] else None
                if owner is None or queue is not self.queue:
                    yield None
                    continue
                queue.remove(at, size)
                self.queue_bytes = queue.bytes
                yield item[0], owner
            seq = max(stop, queue.first)

    def _forget_inflight(self, packet_id: int) -> None:
        del self.inflight[packet_id]
        self.store.delete_inflight(self.client_id, packet_id)

    def _released(self, packet_id: int) -> None:
        self.store.release_inflight(self.client_id, packet_id)

    def attach(self, delivery: Delivery, send_quota: int) -> None:
        self.queue.cache_tail(True)
        Session.attach(self, delivery, send_quota)

    def detach(self) -> None:
        Session.detach(self)
        self.queue.cache_tail(False)

    def clear_state(self) -> None:
        self.store.clear_session_state(self.client_id, self.queue.next)
        self.inflight.clear()
        self.held = ()
        self.queue.clear()
        self.queue_bytes = 0
        set.clear(self.inbound_qos2)
        self.reread = None
