"""Broker: the protocol-agnostic core and the public API every front end calls.

MQTT connections, the HTTP bridge, the admin API and (later) CoAP and the cluster all go through
these methods; the broker reaches clients only through ``Delivery`` objects.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from time import perf_counter

import gevent
from gevent.event import AsyncResult, Event

from fluxmq._core.trie import parse_shared, validate_filter, validate_topic
from fluxmq.errors import NotAuthorized, QueueRefused, QuotaExceeded, ServerUnavailable, StorageError
from fluxmq.storage.base import Storage, StoredState
from fluxmq.storage.memory import MemoryStorage

from .delivery import Delivery
from .events import EventSink
from .message import MESSAGE_EXPIRY_INTERVAL, Message, TrackedMessage
from .retained import RetainedStore
from .router import Router
from .session import (
    DROP_NEW,
    EXPIRY_NEVER,
    Inflight,
    PersistentSession,
    Session,
    SessionLimits,
    Subscription,
    Will,
)
from .session_state import (
    InflightState,
    QueuedState,
    SessionState,
    SessionStateError,
    SubscriptionState,
    decode_session_state,
    encode_session_state,
    queued_item,
)
from .stats import LATENCY_SAMPLE_MASK, BrokerStats

log = logging.getLogger("fluxmq.broker")

# Client ids of the local sessions of the node's bridges (fluxmq.bridge): refused to MQTT clients
# (the protocol layer checks), and never expired by broker.max_session_expiry, not even at restore.
BRIDGE_SESSION_PREFIX = "$bridge/"
#: topics and filters of durable queues (fluxmq.queues)
QUEUE_PREFIX = "$queue/"


class BrokerSettings:
    """The broker's knobs, taken from the ``broker`` config section."""

    __slots__ = ("max_inflight", "max_queued_messages", "max_queued_bytes", "queue_overflow",
                 "max_retained_messages", "shared_subscription_strategy", "max_qos", "retain_available",
                 "node_id", "persistent_max_queued_messages", "persistent_max_queued_bytes",
                 "max_sessions", "max_session_expiry")

    def __init__(self, max_inflight: int = 100, max_queued_messages: int = 1000,
                 max_queued_bytes: int = 16 << 20, queue_overflow: str = "drop_new",
                 max_retained_messages: int = 10000, shared_subscription_strategy: str = "round_robin",
                 max_qos: int = 2, retain_available: bool = True, node_id: str = "single-node",
                 persistent_max_queued_messages: int = 100000, persistent_max_queued_bytes: int = 100 << 20,
                 max_sessions: int = 0, max_session_expiry: int = 0) -> None:
        self.max_inflight = max_inflight
        self.max_queued_messages = max_queued_messages
        self.max_queued_bytes = max_queued_bytes
        self.queue_overflow = queue_overflow
        self.max_retained_messages = max_retained_messages
        self.shared_subscription_strategy = shared_subscription_strategy
        self.max_qos = max_qos
        self.retain_available = retain_available
        self.node_id = node_id
        # Bounds of the on-disk queues of persistent sessions (storage.max_queued_*).
        self.persistent_max_queued_messages = persistent_max_queued_messages
        self.persistent_max_queued_bytes = persistent_max_queued_bytes
        # Sessions the node holds, online and offline (0 = no limit): past it a new client id is refused.
        self.max_sessions = max_sessions
        # Cap of every session's expiry interval in seconds (0 = no cap); 3.1.1 persistent sessions,
        # which never expire by themselves, expire after it.
        self.max_session_expiry = max_session_expiry


# Messages a shared-subscription hand-over looks at per loop turn: with LMDB about 20 us each (read,
# decode, route, deliver), so a turn of the hand-over holds the hub for a few milliseconds.
HAND_OVER_CHUNK = 256
# Between chunks the hand-over sleeps on a timer: sleep(0) would only queue a callback, and a
# greenlet re-queueing itself that way kept the loop from running its timers for 100 ms and more.
HAND_OVER_PAUSE = 0.001


class SharedHandOver:
    """One offline member's walk over its unfinished messages, handed to other members of its groups
    a chunk per loop turn (``Session.hand_over_steps``). ``largest_step`` and ``turns`` say how the
    work was split."""

    __slots__ = ("session", "steps", "ending", "stopped", "moved", "turns", "largest_step")

    def __init__(self, session: Session, steps, ending: bool = False) -> None:
        self.session = session
        self.steps = steps
        self.ending = ending  # the session ends once it is done (Broker._end_session)
        self.stopped = False
        self.moved = 0
        self.turns = 0
        self.largest_step = 0  # messages looked at in the largest turn


class SubscribeResult:
    """Outcome of one subscription: the granted QoS and the retained messages to send after SUBACK."""

    __slots__ = ("granted_qos", "retained", "subscription")

    def __init__(self, granted_qos: int, retained: list, subscription: Subscription | None) -> None:
        self.granted_qos = granted_qos
        self.retained = retained
        self.subscription = subscription


class Broker:
    """Sessions, routing, retained messages and wills of one node."""

    def __init__(self, settings: BrokerSettings | None = None, storage: Storage | None = None) -> None:
        self.settings = settings or BrokerSettings()
        s = self.settings
        self.stats = BrokerStats()
        self.limits = SessionLimits(s.max_inflight, s.max_queued_messages, s.max_queued_bytes, s.queue_overflow)
        self.persistent_limits = SessionLimits(s.max_inflight, s.persistent_max_queued_messages,
                                               s.persistent_max_queued_bytes, DROP_NEW)
        # Persistent sessions are written through to a durable storage; with the memory backend
        # (durable False) every session is a plain in-memory Session.
        self.storage = storage if storage is not None else MemoryStorage()
        self._store = self.storage if self.storage.durable else None
        self.router = Router(s.shared_subscription_strategy)
        self.retained = RetainedStore(s.max_retained_messages, self._store)
        self.sessions: dict[str, Session] = {}
        # Shared-subscription hand-overs still running (a long queue goes in HAND_OVER_CHUNK steps).
        self.hand_overs: dict[Session, SharedHandOver] = {}
        self.hand_over_chunk = HAND_OVER_CHUNK
        self.connected = 0
        self.accepting = True
        self._qos0_refusal_logged = False
        # fluxmq.auth.service.AuthService, or None: no authentication, ACLs or limits at all.
        self.auth = None
        # Durable queues ($queue/...): a fluxmq.queues.QueueManager, made on first use by
        # queue_factory(broker) (set by the node), so plain publish/subscribe never imports them.
        self.queues = None
        self.queue_factory: Callable[[Broker], object] | None = None
        # Event observers (fluxmq.broker.events): None costs one check per hook; the per-message
        # hooks stay None unless the sink wants them, so they cost nothing more on the hot path.
        self.events: EventSink | None = None
        self._on_published = None
        self._on_delivered = None
        # The rest of the cluster (fluxmq.broker.peers.Peers), or None: a single node, no per-message cost.
        self.peers = None
        # Local subscriptions per filter (plain and $share/...): peers hear of a filter on 0 -> 1 and 1 -> 0.
        self._interest: dict[str, int] = {}
        # Client ids whose open_session is claiming ownership cluster-wide (set_peers only): an
        # export waits for the claim to finish, and the claim's own session ends release nothing.
        self._claiming: dict[str, Event] = {}
        # Seconds an export waits for a claim of the same client id in progress here (shorter than
        # the takeover RPC's timeout, so the caller never gives up on a state it is being sent).
        self.claim_wait = 2.0
        # client id -> (monotonic time, state) of the latest exports: a takeover request repeated
        # because the reply was lost (this node is still the registered owner) gets it again.
        self._exported: dict[str, tuple[float, bytes]] = {}
        self._exported_bytes = 0
        self.exported_keep = 30.0
        self.exported_max = 1000
        self.exported_max_bytes = 64 << 20
        # fluxmq.broker.peers.SharedWills (the cluster's will registry), or None: wills are this
        # node's alone. With it a will is recorded cluster-wide while pending and published once.
        self.shared_wills = None
        # Set by a node that starts its cluster after the restore: the wills the restore found due
        # wait in restored_wills (client id, will) until the cluster can tell whether they are
        # still this node's to publish (publish_restored_wills).
        self.hold_restored_wills = False
        self.restored_wills: list[tuple[str, Will]] = []

    def set_peers(self, peers) -> None:
        """Install (or with None remove) the node's ``Peers``; installing replays ``interest_added``
        for every filter held already (restored sessions)."""
        self.peers = peers
        if peers is not None:
            for filter in list(self._interest):
                peers.interest_added(filter)

    def interest_filters(self) -> list[str]:
        """Every filter with at least one local subscription (a peer's snapshot of this node)."""
        return list(self._interest)

    def _interest_up(self, filter: str) -> None:
        n = self._interest.get(filter, 0)
        self._interest[filter] = n + 1
        if n == 0 and self.peers is not None:
            self.peers.interest_added(filter)

    def _interest_down(self, filter: str) -> None:
        n = self._interest.get(filter, 0)
        if n > 1:
            self._interest[filter] = n - 1
        elif n == 1:
            del self._interest[filter]
            if self.peers is not None:
                self.peers.interest_removed(filter)

    def set_events(self, sink: EventSink | None) -> None:
        """Install (or with None remove) the node's event observer."""
        self.events = sink
        self._on_published = sink.message_published if sink is not None and sink.wants_published else None
        self._on_delivered = sink.message_delivered if sink is not None and sink.wants_delivered else None

    def set_auth(self, auth) -> None:
        """Install the node's ``AuthService``: cached routes are filtered by its read rules."""
        self.auth = auth
        self.router.read_filter = auth.session_can_read if auth is not None and auth.checks_reads else None
        if auth is not None:
            auth.on_rules_changed = self._rules_changed
        self.router.invalidate()

    def _rules_changed(self) -> None:
        auth = self.auth
        self.router.read_filter = auth.session_can_read if auth is not None and auth.checks_reads else None
        self.router.invalidate()

    # -- sessions --------------------------------------------------------------------------------

    def open_session(self, client_id: str, clean_start: bool, expiry_interval: int,
                     will: Will | None = None, username: str | None = None,
                     limits: SessionLimits | None = None, capped: bool = True) -> tuple[Session, bool]:
        """Find or create the session of ``client_id`` for a new connection; returns (session, present).

        An existing connection with the same client id is closed first (takeover, 5.0 reason 0x8E)
        [MQTT-3.1.4-3]. Call ``attach`` once the CONNACK is written. ``expiry_interval`` is capped by
        ``broker.max_session_expiry``: the session's ``expiry_interval`` holds the value in use.
        Raises QuotaExceeded for a new client id while the node holds ``broker.max_sessions``
        sessions; a client id that has a session may always reconnect or take over. Raises NotAuthorized,
        changing nothing, when the client id belongs to another user (``auth.bind_client_id_to_username``).
        ``limits`` replaces the node-wide queue bounds for this session (a bridge's outbound store
        is bounded by its own ``max_queued_messages``); ``capped=False`` exempts it from
        ``broker.max_session_expiry`` (a bridge's store lives as long as the bridge is configured).

        With peers installed (a cluster) this node first becomes the only owner of ``client_id``
        (``Peers.claim_session``, which may block this greenlet): a session another node held is
        handed over and resumed here (discarded under ``clean_start``, the other connection closed
        either way). Raises ServerUnavailable (0x88) when ownership cannot be established.
        """
        peers = self.peers
        if peers is not None:
            self._claim_session(peers, client_id, clean_start)
        session = self.sessions.get(client_id)
        # A session whose end waits for its shared hand-over has ended for its client already.
        hand_over = self.hand_overs.get(session) if session is not None else None
        ending = hand_over is not None and hand_over.ending
        limit = self.settings.max_sessions
        if session is None and limit and len(self.sessions) >= limit:
            log.warning("session_refused", extra={"client_id": client_id, "sessions": len(self.sessions),
                                                  "reason": "broker.max_sessions"})
            raise QuotaExceeded(f"session limit reached (broker.max_sessions {limit})")
        if capped:
            expiry_interval = self.capped_expiry(expiry_interval)
        if session is not None:
            auth = self.auth
            # An ending session (its hand-over still running) has no owner left to protect.
            if not ending and auth is not None and not auth.may_take_over(session.username, username):
                raise NotAuthorized("client identifier in use by another user")
            self._stop_hand_over(session)  # back online: what was not handed over yet stays with it
            # A session with expiry 0 (3.x clean session) ends with its network connection, so a
            # takeover does not resume it [MQTT-3.1.2-6].
            ended = clean_start or session.expiry_interval == 0 or ending
            old = session.delivery
            if old is not None:
                session.detach()
                self.connected -= 1
                if self.queues is not None:
                    self.queues.session_gone(session)
                old_will = session.will
                session.will = None
                old.close(0x8E, "session taken over")
                events = self.events
                if events is not None:
                    events.session_takeover(client_id, username, session.username, not ended)
                # The old connection's will goes only when its session ends here (MQTT 5.0 3.1.2.5).
                # A resumed session counts as reconnected before the will delay passed, whatever the
                # delay, so it cancels the will [MQTT-3.1.3-9], as Mosquitto does: a half-open
                # reconnect gives no spurious "offline" message.
                if old_will is not None and ended:
                    self._publish_will(old_will, client_id)
            else:
                # A reconnect within the will delay cancels the pending will.
                session.will = None
            self._cancel_timer(session)
            if ended:
                self._end_session(session)
                session = None
        present = session is not None
        if session is None:
            if self._store is not None and expiry_interval > 0:
                session = PersistentSession(client_id, limits or self.persistent_limits, self.stats, self._store)
            else:
                session = Session(client_id, limits or self.limits, self.stats)
            self.sessions[client_id] = session
        elif limits is not None:
            session.limits = limits
        session.expiry_interval = expiry_interval
        session.persistent = expiry_interval > 0
        session.will = will
        auth = self.auth
        if auth is not None and present and session.username != username:
            # Resumed by another user: its cached routes, in-flight and queued messages were filtered
            # by the previous user's read rules.
            if session.subscriptions:
                self.router.invalidate()
            session.username = username
            if auth.checks_reads:
                session.recheck_reads(auth.session_can_read)
        session.username = username
        shared_wills = self.shared_wills
        if shared_wills is not None:
            shared_wills.will_set(client_id, will.message if will is not None else None,
                                  will.delay if will is not None else 0)
        if isinstance(session, PersistentSession):
            store = session.store
            store.put_session(client_id, expiry_interval, 0.0, username)
            # Stored at connect, so a crash publishes it at restart like any unclean close.
            if will is not None:
                store.put_will(client_id, will.message, will.delay)
            else:
                store.delete_will(client_id)
        return session, present

    def _claim_session(self, peers, client_id: str, clean_start: bool) -> None:
        """Own ``client_id`` cluster-wide before its session is opened here; import what the
        previous owner handed over."""
        pending = self._claiming.get(client_id)
        if pending is not None:
            pending.wait(self.claim_wait)  # another connection of this id is claiming it here
        done = self._claiming[client_id] = Event()
        try:
            state = peers.claim_session(client_id, clean_start)
            self._drop_exported(client_id)  # the client id lives here now
            if state:
                self._take_in(client_id, state, clean_start)
        finally:
            # The claim ends once this loop turn is over, so open_session and the connection's
            # attach run first: an export asked for meanwhile waits and then sees the attached session.
            gevent.get_hub().loop.run_callback(self._claimed, client_id, done)

    def _claimed(self, client_id: str, done: Event) -> None:
        if self._claiming.get(client_id) is done:
            del self._claiming[client_id]
        done.set()

    def _take_in(self, client_id: str, blob: bytes, clean_start: bool) -> None:
        """The state another node handed over to a connecting client: resumed, or discarded when
        the session ends with the move (Clean Start, or a session that lasted as long as its
        connection; as on a local takeover, the will of a connection still open then goes now)."""
        try:
            state = decode_session_state(blob, raw_queue=True)
            if state.client_id != client_id:
                raise SessionStateError(f"state of {state.client_id!r} handed over for {client_id!r}")
        except SessionStateError as exc:
            log.error("session_state_refused", extra={"client_id": client_id, "error": str(exc),
                                                      "effect": "the client starts a new session"})
            return
        if clean_start or state.expiry_interval == 0:
            log.info("session_moved_discarded", extra={"client_id": client_id, "clean_start": clean_start})
            if state.will is not None and state.connected:
                self._publish_will(Will(*state.will))
            return
        self._import_state(state)

    def export_session(self, client_id: str) -> bytes | None:
        """Hand the session of ``client_id`` to another node: its connection is closed first (5.0
        DISCONNECT 0x8E, 3.x a plain close), no will is published, the session leaves the router,
        the session table and the storage, and its complete state is returned encoded
        (``session_state``). None when this node holds no such session. Ownership is not released
        here: the taking node moves it (``Peers.claim_session``).

        The same state is returned again when asked again within ``exported_keep`` seconds (the
        first reply was lost: this node is still the registered owner). Raises ServerUnavailable
        when a connection here is still claiming ``client_id`` after ``claim_wait`` seconds."""
        pending = self._claiming.get(client_id)
        if pending is not None:
            # A connection here is claiming it: hand over what it gets, once it has it.
            if not pending.wait(self.claim_wait):
                raise ServerUnavailable(f"a connection of {client_id!r} is still claiming it here")
        session = self.sessions.get(client_id)
        exported = self._exported
        now = time.monotonic()
        self._prune_exported(now)
        if session is None:
            again = exported.get(client_id)
            if again is not None:
                # Asked again while still the registered owner: the first reply never arrived.
                log.warning("session_export_repeated", extra={"client_id": client_id})
                return again[1]
            return None
        hand_over = self.hand_overs.get(session)
        if hand_over is not None and hand_over.ending:
            return None  # ended already; its shared hand-over finishes here
        blob = encode_session_state(self._take_out(session))
        self._drop_exported(client_id)
        exported[client_id] = (now, blob)
        self._exported_bytes += len(blob)
        self._prune_exported(now)
        log.info("session_exported", extra={"client_id": client_id, "bytes": len(blob)})
        return blob

    def _prune_exported(self, now: float) -> None:
        """Oldest first: drop the copies past ``exported_keep`` or over the count and byte bounds."""
        exported = self._exported
        while exported:
            first = next(iter(exported))
            if (now - exported[first][0] < self.exported_keep and len(exported) <= self.exported_max
                    and self._exported_bytes <= self.exported_max_bytes):
                break
            self._drop_exported(first)

    def _drop_exported(self, client_id: str) -> None:
        kept = self._exported.pop(client_id, None)
        if kept is not None:
            self._exported_bytes -= len(kept[1])

    def _take_out(self, session: Session) -> SessionState:
        """Detach, snapshot and forget ``session`` (its connection closed with 0x8E, no will)."""
        self._stop_hand_over(session)
        self._cancel_timer(session)
        old = session.delivery
        if old is not None:
            session.detach()
            self.connected -= 1
            if self.queues is not None:
                self.queues.session_gone(session)  # durable-queue deliveries stay on this node
        state = self._snapshot(session, old is not None)
        if session.will is not None and self.shared_wills is not None:
            self.shared_wills.will_set(session.client_id, None, 0)  # the taking node records it as its own
        session.will = None
        if old is not None:
            old.close(0x8E, "session taken over")
        self._forget_session(session, release=False)
        return state

    @staticmethod
    def _snapshot(session: Session, connected: bool) -> SessionState:
        """The complete state of ``session`` (see ``session_state.SessionState``)."""
        subs = [SubscriptionState(s.filter, s.qos, s.no_local, s.retain_as_published, s.retain_handling,
                                  s.subscription_id, s.share_group) for s in session.subscriptions.values()]
        inflight = [InflightState(pid, e.message, e.qos, e.retain,
                                  tuple(e.subscription_ids) if e.subscription_ids else None, e.released)
                    for pid, e in session.inflight.items()
                    if e.message.__class__ is not TrackedMessage]  # a durable queue's, redelivered here
        queued: list
        if isinstance(session, PersistentSession):
            queued = session.queue.encoded_entries()  # as stored: passed on without decoding
        else:
            queued = [QueuedState(m, qos, retain, tuple(ids) if ids else None)
                      for m, qos, retain, ids in session.queue]
        will = (session.will.message, session.will.delay) if session.will is not None else None
        return SessionState(session.client_id, session.username, session.expiry_interval,
                            0.0 if connected else session.disconnected_at, connected, session._next_pid,
                            subs, inflight, sorted(session.inbound_qos2), queued, will)

    def import_session(self, client_id: str, state: bytes) -> Session:
        """Rebuild a session another node exported (``export_session``), offline, as it was there:
        a PersistentSession written through to the storage when it has an expiry and the storage is
        durable, its subscriptions in the router, its will and expiry timers armed. A session of
        ``client_id`` held here is replaced (its connection closed, no will). Raises
        SessionStateError when ``state`` is not a valid state of ``client_id``."""
        decoded = decode_session_state(state, raw_queue=True)
        if decoded.client_id != client_id:
            raise SessionStateError(f"state of {decoded.client_id!r} handed over for {client_id!r}")
        session = self._import_state(decoded)
        self._drop_exported(client_id)
        return session

    def _import_state(self, state: SessionState) -> Session:
        """Build the session of ``state`` here (raises SessionStateError, changing nothing, when
        an encoded queue entry is damaged)."""
        cid = state.client_id
        expiry = state.expiry_interval if cid.startswith(BRIDGE_SESSION_PREFIX) else self.capped_expiry(
            state.expiry_interval)
        store = self._store if expiry > 0 else None
        queued = state.queued
        if store is None:  # a memory queue holds messages: decode the entries passed on as stored
            queued = [queued_item(item) for item in queued]
        old = self.sessions.get(cid)
        if old is not None:
            self._take_out(old)
        if store is not None:
            session = PersistentSession(cid, self.persistent_limits, self.stats, store)
        else:
            session = Session(cid, self.limits, self.stats)
        now = time.time()
        session.expiry_interval = expiry
        session.persistent = expiry > 0
        session.username = state.username
        session.disconnected_at = state.disconnected_at or now
        if store is not None:
            store.put_session(cid, expiry, session.disconnected_at, state.username)
        for s in state.subscriptions:
            sub = Subscription(session, s.filter, s.qos, s.no_local, s.retain_as_published, s.retain_handling,
                               s.subscription_id, s.share_group)
            if self.router.add(sub):
                self._interest_up(s.filter)  # the peers hear of a filter new to this node
            session.subscriptions[s.filter] = sub
            if store is not None:
                store.put_subscription(cid, s.filter, s.qos, s.no_local, s.retain_as_published,
                                       s.retain_handling, s.subscription_id)
        for e in state.inflight:
            entry = Inflight(e.message, e.qos, e.retain, e.subscription_ids)
            entry.released = e.released
            session.inflight[e.packet_id] = entry
            if store is not None:
                # Written once, in the queue's seq space, named by its packet id (schema 3).
                session.queue.put_in_flight(e.message, e.qos, e.retain, e.subscription_ids, e.packet_id)
                if e.released:
                    store.release_inflight(cid, e.packet_id)
        session._next_pid = state.next_packet_id if 1 <= state.next_packet_id <= 65535 else 1
        for pid in state.inbound_qos2:
            session.inbound_qos2.add(pid)  # written through for a PersistentSession
        # Queued messages are taken whatever this node's queue bounds: they were accepted already.
        if queued:
            if isinstance(session, PersistentSession):
                disk = session.queue
                for q in queued:
                    if isinstance(q, bytes):
                        disk.append_entry(q)
                    else:
                        disk.append((q.message, q.qos, q.retain, q.subscription_ids))
                session.queue_bytes = disk.bytes
            else:
                session.queue = queue = deque()
                for q in queued:
                    queue.append((q.message, q.qos, q.retain, q.subscription_ids))
                    session.queue_bytes += len(q.message.payload) + len(q.message.topic)
                    if q.qos == 0:
                        session.queue_qos0 += 1
        if state.will is not None:
            session.will = Will(*state.will)
            if store is not None:
                store.put_will(cid, session.will.message, session.will.delay)
            if self.shared_wills is not None:
                self.shared_wills.will_set(cid, session.will.message, session.will.delay)
        self.sessions[cid] = session
        self._arm_timer_remaining(session, max(0.0, now - session.disconnected_at))
        log.info("session_imported", extra={"client_id": cid, "subscriptions": len(session.subscriptions),
                                            "inflight": len(session.inflight), "queued": len(queued)})
        return session

    def capped_expiry(self, expiry_interval: int) -> int:
        """``expiry_interval`` (seconds; EXPIRY_NEVER for a 3.1.1 persistent session) under the
        ``broker.max_session_expiry`` cap; 0 (the session ends with its connection) stays 0."""
        cap = self.settings.max_session_expiry
        return cap if cap and expiry_interval > cap else expiry_interval

    def attach(self, session: Session, delivery: Delivery, send_quota: int) -> None:
        """Bind the connection to its session; resends in-flight messages and drains the queue."""
        self.connected += 1
        self.stats.connections_total += 1
        session.connected_since = time.time()
        session.attach(delivery, send_quota or self.settings.max_inflight)
        if self.queues is not None and self.queues.resumable:
            self.queues.session_attached(session)

    def close_session(self, session: Session, delivery: Delivery, publish_will: bool) -> None:
        """The connection of ``session`` ended (``publish_will`` False after a normal DISCONNECT)."""
        if session.delivery is not delivery:
            return  # taken over: the new connection owns the session now
        session.detach()
        self.connected -= 1
        if self.queues is not None:
            self.queues.session_gone(session)  # its queue deliveries go to other members
        session.disconnected_at = time.time()
        will = session.will if publish_will else None
        if will is None and session.will is not None and self.shared_wills is not None:
            self.shared_wills.will_set(session.client_id, None, 0)  # a normal DISCONNECT discards it
        session.will = None
        if session.expiry_interval == 0:
            if will is not None:
                self._publish_will(will, session.client_id)
            self._end_session(session, wait_hand_over=True)
            return
        self._hand_over_shared(session, ending=False)
        if will is not None:
            if will.delay == 0:
                self._publish_will(will, session.client_id)
            else:
                session.will = will
        if isinstance(session, PersistentSession):
            session.store.put_session(session.client_id, session.expiry_interval, session.disconnected_at,
                                      session.username)
            if session.will is None:
                session.store.delete_will(session.client_id)
        self._arm_timer(session)

    def _arm_timer(self, session: Session) -> None:
        """One timer per offline session: the pending will's delay or the session's expiry, whichever is first."""
        delays = []
        if session.will is not None:
            delays.append(session.will.delay)
        if session.expiry_interval != EXPIRY_NEVER:
            delays.append(session.expiry_interval)
        if delays:
            session.timer = gevent.spawn_later(min(delays), self._on_timer, session)

    def _on_timer(self, session: Session) -> None:
        session.timer = None
        if session.delivery is not None or self.sessions.get(session.client_id) is not session:
            return
        elapsed = time.time() - session.disconnected_at
        if session.will is not None and elapsed + 0.05 >= session.will.delay:
            will, session.will = session.will, None
            if isinstance(session, PersistentSession):
                session.store.delete_will(session.client_id)
            self._publish_will(will, session.client_id)
        if session.expiry_interval != EXPIRY_NEVER and elapsed + 0.05 >= session.expiry_interval:
            if session.will is not None:  # the session ends before the will delay: publish it now
                will, session.will = session.will, None
                self._publish_will(will, session.client_id)
            self._end_session(session, wait_hand_over=True)
            return
        self._arm_timer_remaining(session, elapsed)

    def _arm_timer_remaining(self, session: Session, elapsed: float) -> None:
        delays = []
        if session.will is not None:
            delays.append(session.will.delay - elapsed)
        if session.expiry_interval != EXPIRY_NEVER:
            delays.append(session.expiry_interval - elapsed)
        if delays:
            session.timer = gevent.spawn_later(max(0.0, min(delays)), self._on_timer, session)

    @staticmethod
    def _cancel_timer(session: Session) -> None:
        if session.timer is not None:
            session.timer.kill(block=False)
            session.timer = None

    def _end_session(self, session: Session, wait_hand_over: bool = False) -> None:
        """Drop a session: its subscriptions leave the router and its state is forgotten.

        Its unfinished shared-subscription messages go to other members first. With
        ``wait_hand_over`` (nobody needs the client id now: expiry, Session Expiry 0) a long
        hand-over runs a chunk per loop turn and the session ends when it is done; meanwhile it is
        recorded as ended, so a crash does not bring it back and a reconnect does not resume it.
        """
        self._cancel_timer(session)
        if not self._hand_over_shared(session, ending=True, in_steps=wait_hand_over):
            if isinstance(session, PersistentSession):
                # Recorded as ending (expiry 0, will already published or discarded by the caller):
                # after a crash the restore deletes it instead of resuming it.
                store = session.store
                store.put_session(session.client_id, 0, session.disconnected_at or time.time(), session.username)
                store.delete_will(session.client_id)
            return  # _hand_over_rest ends it
        self._forget_session(session)

    def _forget_session(self, session: Session, release: bool = True) -> None:
        """The end of ``_end_session``: out of the router, the store and the session table; with
        peers installed the client id's ownership is released too (not when the session moved to
        another node, ``release`` False, nor while a connection here is claiming it)."""
        if self.queues is not None:
            self.queues.session_ended(session.client_id)  # its queue memberships end too (stored ones)
        for filter in list(session.subscriptions):
            self.router.remove(filter, session)
            self._interest_down(filter)
        session.subscriptions.clear()
        session.clear_state()
        if isinstance(session, PersistentSession):
            session.store.delete_session(session.client_id, session.queue.next)
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
            if self.auth is not None:
                self.auth.forget(session.client_id)
            peers = self.peers
            if peers is not None and release and session.client_id not in self._claiming:
                self._release(peers, session.client_id)

    @staticmethod
    def _release(peers, client_id: str) -> None:
        try:
            peers.release_session(client_id)
        except Exception as exc:  # the owner key goes with this node's lease anyway
            log.warning("session_release_failed", extra={"client_id": client_id, "error": str(exc)})

    def _hand_over_shared(self, session: Session, ending: bool, in_steps: bool = True) -> bool:
        """Give the QoS 1/2 messages an offline shared-subscription member got through its group, and
        has not finished, to other members of the group (MQTT 5.0 4.8.2).

        Unacknowledged QoS 1 and queued QoS 1/2 move; a QoS 2 PUBLISH already sent stays with the
        member [MQTT-4.8.2-4, -5], and so does a message it also got through a subscription of its
        own. While the session continues (``ending`` False) only online members with room in their
        queue take them (the rest stays); when it ends any other member does, queueing it if offline.

        Returns True when the hand-over is done; otherwise (``in_steps``, and more than
        ``hand_over_chunk`` messages to look at) it goes on a chunk per loop turn, and an ending
        session ends when it is done.
        """
        self._stop_hand_over(session)
        subs = session.subscriptions
        if not subs or not any(sub.share_group for sub in subs.values()):
            return True
        router = self.router

        def claim(message: Message) -> Subscription | None:
            if message.expires_at is not None and message.expired():
                return None
            route = router.route(message.topic)
            if any(target[0] is session for target in route.targets):
                return None
            for group in route.groups:
                if session.client_id in group.members:
                    member = router.pick_member(group, exclude=session, topic=message.topic)
                    if member is None:
                        continue
                    taker = member.session
                    if ending or (taker.delivery is not None and taker.queue_has_room()):
                        # A continuing session keeps what the taker would drop over its queue bound.
                        return member
            return None

        # An ending session's walk follows its queue's tail: a message queued to it meanwhile (a
        # group with every member offline may pick it) is handed over too.
        hand_over = SharedHandOver(session, session.hand_over_steps(claim, follow_tail=ending), ending)
        if self._hand_over_step(hand_over, self.hand_over_chunk if in_steps else 0):
            self._handed_over(hand_over)
            return True
        self.hand_overs[session] = hand_over
        gevent.spawn(self._hand_over_rest, hand_over)
        return False

    def _hand_over_step(self, hand_over: SharedHandOver, budget: int) -> bool:
        """Look at up to ``budget`` messages (0: all), delivering the claimed ones; True when done."""
        n = 0
        done = True
        for taken in hand_over.steps:
            n += 1
            if taken is not None:
                message, member = taken
                ids = (member.subscription_id,) if member.subscription_id else None
                member.session.deliver(message, message.qos if message.qos < member.qos else member.qos, False, ids)
                hand_over.moved += 1
            if n == budget:
                done = False
                break
        hand_over.turns += 1
        if n > hand_over.largest_step:
            hand_over.largest_step = n
        return done

    def _hand_over_rest(self, hand_over: SharedHandOver) -> None:
        session = hand_over.session
        try:
            while True:
                gevent.sleep(HAND_OVER_PAUSE)  # the rest of the loop turn (I/O, commits, timers) runs between chunks
                if hand_over.stopped:
                    return
                if self._hand_over_step(hand_over, self.hand_over_chunk):
                    del self.hand_overs[session]
                    self._handed_over(hand_over)
                    if hand_over.ending:
                        self._forget_session(session)
                    return
        finally:
            if self.hand_overs.get(session) is hand_over:
                del self.hand_overs[session]

    def _stop_hand_over(self, session: Session) -> None:
        """Stop a running hand-over (the session reconnects, ends or the node stops); what it has
        not looked at yet stays with the session."""
        hand_over = self.hand_overs.pop(session, None)
        if hand_over is not None:
            hand_over.stopped = True
            hand_over.steps.close()
            self._handed_over(hand_over)

    @staticmethod
    def _handed_over(hand_over: SharedHandOver) -> None:
        if hand_over.moved:
            log.info("shared_handed_over", extra={"client_id": hand_over.session.client_id,
                                                  "messages": hand_over.moved, "turns": hand_over.turns,
                                                  "complete": not hand_over.stopped})

    def publish_restored_wills(self) -> int:
        """Publish the wills the restore held back (``hold_restored_wills``); returns how many went
        (with shared wills installed, only those still this node's to publish)."""
        due, self.restored_wills = self.restored_wills, []
        self.hold_restored_wills = False
        return sum(1 for cid, will in due if self._publish_will(will, cid))

    def _publish_will(self, will: Will, client_id: str | None = None) -> bool:
        """Publish ``will`` of ``client_id``'s session. With shared wills installed (a cluster) it
        is claimed first: False, nothing published, when another node published it already (this
        node was taken for dead) or it changed hands. ``client_id`` None: publish unconditionally
        (a will handed over with a session that ends on arrival; the sender dropped its record)."""
        shared_wills = self.shared_wills
        if client_id is not None and shared_wills is not None and not shared_wills.will_claim(client_id):
            log.info("will_not_published", extra={"client_id": client_id, "reason": "not this node's any more"})
            return False
        self.publish_will_message(will.message)
        return True

    def publish_will_message(self, message: Message) -> None:
        """Publish a will's message now (its Message Expiry Interval starts now)."""
        will_topic = message.topic
        props = message.properties
        if props and MESSAGE_EXPIRY_INTERVAL in props:
            # The protocol layer keeps a will's Message Expiry Interval in its properties: the
            # lifetime starts now, when it is published.
            props = dict(props)
            interval = props.pop(MESSAGE_EXPIRY_INTERVAL)
            message = message.copy(properties=props or None, expires_at=time.monotonic() + interval)
        try:
            self.publish(message)
        except QuotaExceeded:
            log.warning("will_refused", extra={"topic": will_topic, "reason": "storage full"})

    def kick(self, client_id: str, reason_code: int = 0x98) -> bool:
        """Close the connection of ``client_id`` (admin); its will is published as on any server close."""
        session = self.sessions.get(client_id)
        if session is None or session.delivery is None:
            return False
        session.delivery.close(reason_code, "disconnected by the administrator")
        return True

    # -- publish ---------------------------------------------------------------------------------

    @staticmethod
    def check_topic(topic: str) -> None:
        """Validate a topic name from a front end that has no codec check (HTTP, CoAP)."""
        validate_topic(topic)

    def publish(self, message: Message, origin: Session | None = None) -> int:
        """Route one message to every matching session; store it when retained. Returns deliveries."""
        stats = self.stats
        msg_qos = message.qos
        size = len(message.payload)
        received = stats.received_qos
        received[msg_qos] += 1
        stats.received_bytes_qos[msg_qos] += size
        # 1 publish in 64 (of each QoS) is timed until its deliveries are flushed (_observe_latency).
        started = perf_counter() if not received[msg_qos] & LATENCY_SAMPLE_MASK else 0.0
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

    def publish_from_peer(self, message: Message, shared_groups: tuple[str, ...] = (), match_local: bool = True) -> int:
        """Deliver a message another node forwarded: to the matching local subscriptions (unless
        ``match_local`` is False) and to one local member of each ``$share/{group}/{filter}`` of
        ``shared_groups`` (the sender gave those groups' message to this node). Never forwarded
        again; a retained message is not stored here (retained state is replicated apart). Returns
        deliveries."""
        stats = self.stats
        route = self.router.route(message.topic)
        store = self._store
        if store is not None and store.refusing and message.qos and self._would_store(message, route):
            stats.dropped("storage_full")
            return 0
        n = 0
        msg_qos = message.qos
        retain = message.retain
        size = len(message.payload)
        if match_local:
            sent_qos = stats.sent_qos
            sent_bytes = stats.sent_bytes_qos
            for session, qos, _qos_own, rap, sub_ids in route.targets:
                if msg_qos < qos:
                    qos = msg_qos
                session.deliver(message, qos, rap and retain, sub_ids)
                sent_qos[qos] += 1
                sent_bytes[qos] += size
                n += 1
            if self._on_delivered is not None:
                self._report_deliveries(message, route.targets, None)
        if shared_groups and route.groups:
            groups = [g for g in route.groups if f"$share/{g.name}/{g.filter}" in shared_groups]
            if groups:
                n += self._publish_shared(message, groups)
        return n

    def _queue_manager(self):
        """The durable queues, made on first use (raises QueueRefused when the node has none)."""
        queues = self.queues
        if queues is None:
            if self.queue_factory is None:
                raise QueueRefused("durable queues are not available on this node", 0x90)
            queues = self.queues = self.queue_factory(self)
        return queues

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
            on_delivered(message, session.client_id, session.username, msg_qos if msg_qos < qos else qos,
                         rap and message.retain)

    def _observe_latency(self, started: float) -> None:
        # Deliveries only filled output buffers; the FlushScheduler's hub callback (registered by
        # the first delivery of this loop turn) writes them. A callback registered now runs after
        # it, so the sample covers routing, encoding and the socket write.
        gevent.get_hub().loop.run_callback(self.stats.observe_delivery_latency, started)

    def _refused_qos0(self) -> None:
        n = self.stats.drops.get("storage_full", 0)
        if not self._qos0_refusal_logged or n % 10000 == 0:
            self._qos0_refusal_logged = True
            log.warning("publish_refused_storage_full", extra={
                "qos": 0, "dropped_storage_full": n,
                "effect": "retained QoS 0 messages are dropped while the storage is full"})

    def wait_committed(self, timeout: float | None = 30.0) -> None:
        """Block this greenlet until every operation recorded so far (e.g. by the ``publish`` just
        made) is committed, and fsynced under ``storage.sync: always``: the after-commit point a
        front end without a connection answers at (HTTP bridge, admin API). Returns at once with
        the memory backend or when nothing is pending. Raises StorageError when that commit fails
        or does not finish within ``timeout``. Never call it from the hub."""
        store = self._store
        if store is None:
            return
        done = AsyncResult()
        store.after_commit(done.set)  # called at once when nothing is pending: get() does not wait
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

    # -- subscriptions ---------------------------------------------------------------------------

    def subscribe(self, session: Session, filter: str, qos: int, no_local: bool = False,
                  retain_as_published: bool = False, retain_handling: int = 0,
                  subscription_id: int = 0, user_properties: list | None = None) -> SubscribeResult:
        """Add or replace a subscription [MQTT-3.8.4-3]; raises TopicFilterInvalid for a bad filter.

        A ``$queue/{name}[/{filter}]`` filter joins a durable queue's consumer group instead (its
        5.0 ``user_properties`` name the group and options); raises QueueRefused when refused."""
        validate_filter(filter)
        if filter.startswith(QUEUE_PREFIX):
            version = session.delivery.version if session.delivery is not None else 5
            granted = self._queue_manager().subscribe(session, filter, qos, user_properties, version)
            return SubscribeResult(granted, [], None)
        granted = min(qos, self.settings.max_qos)
        shared = parse_shared(filter)
        sub = Subscription(session, filter, granted, no_local, retain_as_published, retain_handling,
                           subscription_id, shared[0] if shared else None)
        is_new = self.router.add(sub)
        session.subscriptions[filter] = sub
        events = self.events
        if events is not None:
            events.subscription_created(session.client_id, session.username, filter, granted, qos, no_local,
                                        retain_as_published, retain_handling, subscription_id,
                                        shared[0] if shared else None, not is_new)
        if isinstance(session, PersistentSession):
            session.store.put_subscription(session.client_id, filter, granted, no_local, retain_as_published,
                                           retain_handling, subscription_id)
        retained: list = []
        # Retained messages are never sent for a shared subscription; Retain Handling 1 sends them
        # only for a new subscription, 2 never [MQTT-3.3.1-9, -10, -11].
        if shared is None and (retain_handling == 0 or (retain_handling == 1 and is_new)):
            retained = self.retained.match(filter)
            auth = self.auth
            if retained and auth is not None and auth.checks_reads:
                # A retained message the subscriber may not read is never sent (auth.acl_file).
                retained = [m for m in retained if auth.can_read(session.client_id, session.username, m.topic)]
        if is_new:
            # Last: with peers, a filter new to this node may wait here (bounded) until the reachable
            # peers know it, so publishes made after the SUBACK on any node reach this subscriber.
            self._interest_up(filter)
        return SubscribeResult(granted, retained, sub)

    def deliver_retained(self, session: Session, result: SubscribeResult) -> None:
        """Send the retained messages found by ``subscribe`` (after the SUBACK went out)."""
        sub = result.subscription
        ids = (sub.subscription_id,) if sub and sub.subscription_id else None
        for message in result.retained:
            qos = message.qos if message.qos < result.granted_qos else result.granted_qos
            session.deliver(message, qos, True, ids)  # retain flag set [MQTT-3.3.1-8]
            if self._on_delivered is not None:
                self._on_delivered(message, session.client_id, session.username, qos, True)

    def unsubscribe(self, session: Session, filter: str) -> bool:
        """Remove a subscription; False when the session had none with that filter."""
        if filter.startswith(QUEUE_PREFIX) and self.queues is not None:
            return self.queues.unsubscribe(session, filter)
        if session.subscriptions.pop(filter, None) is None:
            return False
        self.router.remove(filter, session)
        self._interest_down(filter)
        if isinstance(session, PersistentSession):
            session.store.delete_subscription(session.client_id, filter)
        events = self.events
        if events is not None:
            events.subscription_removed(session.client_id, session.username, filter)
        return True

    # -- node lifecycle --------------------------------------------------------------------------

    def restore(self, state: StoredState, pause: Callable[[], None] | None = None,
                slice_size: int = 2000) -> None:
        """Rebuild what the storage loaded at start, before any client connects.

        ``pause`` is called after every ``slice_size`` sessions or retained messages (the node
        yields to the hub there, so a large store does not stall it).

        Sessions expire by wall-clock time across the downtime (a session online at the crash counts
        as disconnected when the node was last known alive); wills whose delay elapsed meanwhile,
        or whose session expired, are published once everything else is restored; the others are
        re-armed. Retained messages are served at once.
        """
        store = self._store
        if store is None:
            return
        now = time.time()
        n = 0
        for fields in state.retained:
            n += 1
            if pause is not None and n % slice_size == 0:
                pause()
            message = Message(*fields)
            if message.expired():
                store.delete_retained(message.topic)
                continue
            self.retained.restore(message)
        due: list[tuple[str, Will]] = []
        for rec in state.sessions.values():
            n += 1
            if pause is not None and n % slice_size == 0:
                pause()
            cid = rec.client_id
            gone_at = rec.disconnected_at or state.last_alive or now
            elapsed = max(0.0, now - gone_at)
            will = None
            if rec.will is not None:
                fields, delay = rec.will
                will = Will(Message(*fields), delay)
            # broker.max_session_expiry applies to sessions stored before it was set or lowered too
            # (a bridge's outbound store excepted: it lives as long as the bridge is configured).
            expiry = (rec.expiry_interval if cid.startswith(BRIDGE_SESSION_PREFIX)
                      else self.capped_expiry(rec.expiry_interval))
            if expiry == 0 or (expiry != EXPIRY_NEVER and elapsed >= expiry):
                if will is not None:
                    due.append((cid, will))  # the session ended during the downtime: its will goes now
                store.delete_session(cid, rec.queue.next)
                continue
            session = PersistentSession(cid, self.persistent_limits, self.stats, store, rec.queue)
            session.expiry_interval = expiry
            session.username = rec.username
            session.disconnected_at = gone_at
            if not rec.disconnected_at or expiry != rec.expiry_interval:  # online at the stop, or capped now
                store.put_session(cid, expiry, gone_at, rec.username)
            for filter, qos, no_local, rap, rh, sub_id in rec.subscriptions:
                shared = parse_shared(filter)
                sub = Subscription(session, filter, qos, no_local, rap, rh, sub_id, shared[0] if shared else None)
                if self.router.add(sub):
                    self._interest_up(filter)
                session.subscriptions[filter] = sub
            for pid, (fields, qos, retain, ids, released) in rec.inflight.items():
                entry = Inflight(Message(*fields), qos, retain, ids)
                entry.released = released
                session.inflight[pid] = entry
            if session.inflight:
                session._next_pid = max(session.inflight) % 65535 + 1
            set.update(session.inbound_qos2, rec.inbound_qos2)
            if session.queue and self.auth is not None and self.auth.checks_reads:
                # Which entries another user queued before a resume is not stored: all are re-checked
                # against the owner's read rules as they leave the queue.
                session.recheck_reads(self.auth.session_can_read, queued_only=True)
            if will is not None:
                if elapsed >= will.delay:
                    due.append((cid, will))
                    store.delete_will(cid)
                else:
                    session.will = will
            self.sessions[cid] = session
            self._arm_timer_remaining(session, elapsed)
        if self.hold_restored_wills:
            self.restored_wills.extend(due)
        else:
            for cid, will in due:
                self._publish_will(will, cid)
        limit = self.settings.max_sessions
        if limit and len(self.sessions) > limit:
            # Stored sessions are kept (their messages were acknowledged); only new ids wait for room.
            log.warning("sessions_over_limit", extra={"sessions": len(self.sessions), "max_sessions": limit})
        log.info("restored", extra={"sessions": len(self.sessions), "retained": len(self.retained),
                                    "wills_published": len(due)})

    def shutdown(self) -> None:
        """Close every client connection (5.0 reason 0x8B); wills are published as on a server close.

        With peers installed, a session that ends with its connection releases its client id as its
        connection closes; a persistent session stays owned by this node, so a client reconnecting
        to another node while this one drains takes its whole session over from here. The node
        gives the rest up when it stops (``release_sessions``, or its lease's revocation)."""
        self.accepting = False
        for session in list(self.hand_overs):
            self._stop_hand_over(session)
        for session in list(self.sessions.values()):
            if session.delivery is not None:
                session.delivery.close(0x8B, "server shutting down")

    def adopt_session(self, client_id: str) -> bool:
        """Take the session of ``client_id`` over from the node that owns it, with no connection:
        that node is stopping and hands its sessions to the others. Claimed as for a connecting
        client (``Peers.claim_session``, may block this greenlet), kept offline here with its
        timers armed. True when a session of ``client_id`` is here now; raises ServerUnavailable
        when ownership cannot be established."""
        peers = self.peers
        if peers is None or client_id in self.sessions:
            return client_id in self.sessions
        self._claim_session(peers, client_id, False)
        if client_id in self.sessions:
            return True
        self._release(peers, client_id)  # nothing was handed over: do not keep an empty claim
        return False

    def drop_session(self, client_id: str) -> bool:
        """Forget the session of ``client_id`` here, without its will and without releasing its
        ownership: another node owns the client id now, so the copy here is stale (a restored
        session taken over elsewhere while this node was down). False when there is none."""
        session = self.sessions.get(client_id)
        if session is None:
            return False
        self._stop_hand_over(session)
        self._cancel_timer(session)
        old = session.delivery
        if old is not None:
            session.detach()
            self.connected -= 1
            if self.queues is not None:
                self.queues.session_gone(session)
        session.will = None
        if isinstance(session, PersistentSession):
            session.store.delete_will(client_id)
        if old is not None:
            old.close(0x8E, "session taken over")
        self._forget_session(session, release=False)
        return True

    def release_sessions(self) -> None:
        """Give up the ownership of every client id held here (the last step of a graceful stop,
        after the drain in which other nodes could still take sessions over)."""
        peers = self.peers
        if peers is not None:
            for client_id in list(self.sessions):
                self._release(peers, client_id)

    def session_count(self) -> int:
        return len(self.sessions)

    def subscription_count(self) -> int:
        return len(self.router)
