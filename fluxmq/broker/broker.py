"""Broker: the protocol-agnostic core and the public API every front end calls.

MQTT connections, the HTTP bridge, the admin API and (later) CoAP and the cluster all go through
these methods; the broker reaches clients only through ``Delivery`` objects.

``Broker`` here holds the node's state and the small core; its methods live by concern in mixins:
``session_lifecycle``, ``shared_handover``, ``publishing``, ``subscriptions``, ``restore`` and
``cluster_hooks``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from gevent.event import Event

from fluxmq._core.broker_core import BrokerCore
from fluxmq.errors import QueueRefused
from fluxmq.storage.base import Storage
from fluxmq.storage.memory import MemoryStorage

from .cluster_hooks import ClusterHooks
from .events import EventSink
from .prefixes import BRIDGE_SESSION_PREFIX, QUEUE_PREFIX
from .publishing import Publishing
from .restore import StoreRestore
from .retained import RetainedStore
from .router import Router
from .session import DROP_NEW, Session, SessionLimits, Will
from .session_lifecycle import SessionLifecycle
from .shared_handover import HAND_OVER_CHUNK, SharedHandOver, SharedHandOvers
from .stats import BrokerStats
from .subscriptions import SubscribeResult, Subscriptions

# Re-exported: front ends and the bridge import these from here.
__all__ = ["BRIDGE_SESSION_PREFIX", "QUEUE_PREFIX", "Broker", "BrokerSettings", "SubscribeResult"]

log = logging.getLogger("fluxmq.broker")


class BrokerSettings:
    """The broker's knobs, taken from the ``broker`` config section."""

    __slots__ = (
        "max_inflight",
        "max_queued_messages",
        "max_queued_bytes",
        "queue_overflow",
        "max_retained_messages",
        "shared_subscription_strategy",
        "max_qos",
        "retain_available",
        "node_id",
        "persistent_max_queued_messages",
        "persistent_max_queued_bytes",
        "max_sessions",
        "max_session_expiry",
    )

    def __init__(
        self,
        max_inflight: int = 100,
        max_queued_messages: int = 1000,
        max_queued_bytes: int = 16 << 20,
        queue_overflow: str = "drop_new",
        max_retained_messages: int = 10000,
        shared_subscription_strategy: str = "round_robin",
        max_qos: int = 2,
        retain_available: bool = True,
        node_id: str = "single-node",
        persistent_max_queued_messages: int = 100000,
        persistent_max_queued_bytes: int = 100 << 20,
        max_sessions: int = 0,
        max_session_expiry: int = 0,
    ) -> None:
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


class Broker(
    BrokerCore, SessionLifecycle, SharedHandOvers, ClusterHooks, Publishing, Subscriptions, StoreRestore
):
    """Sessions, routing, retained messages and wills of one node. The fields the relay reads per
    message (``stats``, ``router``, ``_store``, ``peers``, ``queues``, ``_on_published``,
    ``_on_delivered``) are typed fields of ``BrokerCore`` (``fluxmq/_core/broker_core.pyx``)."""

    def __init__(self, settings: BrokerSettings | None = None, storage: Storage | None = None) -> None:
        self.settings = settings or BrokerSettings()
        s = self.settings
        self.stats = BrokerStats()
        self.limits = SessionLimits(
            s.max_inflight, s.max_queued_messages, s.max_queued_bytes, s.queue_overflow
        )
        self.persistent_limits = SessionLimits(
            s.max_inflight, s.persistent_max_queued_messages, s.persistent_max_queued_bytes, DROP_NEW
        )
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
        # Filters whose 0 -> 1 is being told to the peers (``interest_added`` waits for them): a
        # subscription to one meanwhile waits for the same acknowledgement (ClusterHooks._interest_up).
        self._interest_syncing: dict[str, Event] = {}
        # Client ids whose open_session is claiming ownership cluster-wide (set_peers only): an
        # export waits for the claim to finish, and the claim's own session ends release nothing.
        self._claiming: dict[str, Event] = {}
        # client ids whose session ended while a claim of them was open here: released when the
        # claim closes if no session of theirs is here then (see _claimed)
        self._ended_while_claiming: set[str] = set()
        # Seconds an export waits for a claim of the same client id in progress here (shorter than
        # the takeover RPC's timeout, so the caller never gives up on a state it is being sent).
        self.claim_wait = 2.0
        # client id -> (monotonic time, state) of the latest exports: a takeover request repeated
        # because the reply was lost (this node is still the registered owner) gets it again.
        self._exported: dict[str, tuple[float, bytes, str]] = {}  # client id -> (when, state, to node)
        self._exported_bytes = 0
        self.exported_keep = 30.0
        self.exported_max = 1000
        self.exported_max_bytes = 64 << 20
        # client id -> the stand-in of a session exported to another node, which forwards there what
        # still reaches this node for it (fluxmq.broker.moved), for moved_forward_for seconds; at
        # most moved_max of them (the oldest ends first)
        self._moved: dict = {}
        # stand-ins out of the router whose last messages are still being sent (moved_forwarding)
        self._moved_ending: list = []
        self.moved_forward_for = 5.0
        self.moved_max = 10000
        # client id -> until when (monotonic) a session imported here takes what its previous node
        # forwards for it (deliver_moved); gone when that session ends
        self._moved_in: dict[str, float] = {}
        # the moves whose markers this node counts (fluxmq.broker.moved.MoveMarks by token: a
        # stand-in's here, a gate's on the taking node), and client id -> the gate of a session
        # imported here while its move's markers are not all in
        self._move_marks: dict = {}
        self._gates: dict = {}
        # fluxmq.broker.peers.SharedWills (the cluster's will registry), or None: wills are this
        # node's alone. With it a will is recorded cluster-wide while pending and published once.
        self.shared_wills = None
        # Set by a node that starts its cluster after the restore: the wills the restore found due
        # wait in restored_wills (client id, will) until the cluster can tell whether they are
        # still this node's to publish (publish_restored_wills).
        self.hold_restored_wills = False
        self.restored_wills: list[tuple[str, Will]] = []
        # peer -> (link epoch, seq) of its last batch whose effects the store holds (restore): a
        # cluster node skips that batch when the peer retries it after this node's restart.
        self.restored_peer_batches: dict[str, tuple[int, int]] = {}

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

    def kick(self, client_id: str, reason_code: int = 0x98) -> bool:
        """Close the connection of ``client_id`` (admin); its will is published as on any server close."""
        session = self.sessions.get(client_id)
        if session is None or session.delivery is None:
            return False
        session.delivery.close(reason_code, "disconnected by the administrator")
        return True

    def _queue_manager(self):
        """The durable queues, made on first use (raises QueueRefused when the node has none)."""
        queues = self.queues
        if queues is None:
            if self.queue_factory is None:
                raise QueueRefused("durable queues are not available on this node", 0x90)
            queues = self.queues = self.queue_factory(self)
        return queues

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

    def session_count(self) -> int:
        return len(self.sessions)

    def subscription_count(self) -> int:
        return len(self.router)
