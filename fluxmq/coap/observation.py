"""An RFC 7641 observation: the ``Delivery`` of an observer's broker session, which queues what the
broker routes to it for the bridge's notifier (``CoapBridge.schedule``) to send."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fluxmq.broker.message import Message

    from .bridge import CoapBridge, Transport


class Observation:
    """One RFC 7641 observation: the ``Delivery`` of its broker session, with a bounded queue (drop
    oldest), like the HTTP bridge's SSE stream. Never blocks or switches greenlets in ``send_publish``."""

    version = 0  # not an MQTT connection
    listener = "coap_observe"

    def __init__(
        self,
        bridge: CoapBridge,
        key: tuple,
        peer: Any,
        transport: Transport,
        token: bytes,
        filter: str,
        client_id: str,
        budget: int | None,
    ) -> None:
        self.bridge = bridge
        self.key = key
        self.peer = peer
        self.transport = transport
        self.token = token
        self.filter = filter
        self.client_id = client_id
        self.budget = budget  # the largest notification an unverified observer may get, or None
        self.proven = budget is None  # the peer has shown it receives at its address (DTLS, login, an ACK)
        self.session: Any = None
        self.queue: deque = deque()
        self.seq = 1
        self.since_con = 0
        # the CON in flight: [mid, datagram, retransmissions, next send (monotonic), timeout]
        self.pending_con: list | None = None
        self.closed = False  # closing or ended: takes nothing more (the Delivery contract)
        self.ended = False  # its session is closed and it is out of the bridge's tables
        self.dropped = 0
        self.scheduled = False
        self.end_reason: str | None = None  # set by close(): the notifier ends the observation

    # Delivery interface (called by the broker)

    def send_publish(
        self,
        message: Message,
        qos: int,
        retain: bool,
        packet_id: int,
        dup: bool,
        subscription_ids: tuple[int, ...] | None,
    ) -> bool:
        if self.closed:
            return False
        queue = self.queue
        if len(queue) >= self.bridge.settings.observe_queue_size:
            queue.popleft()
            self.dropped += 1
            self.bridge.broker.stats.dropped("coap_queue_full")
        queue.append(message)
        if not self.scheduled:
            self.scheduled = True
            self.bridge.schedule(self)
        return True

    def send_pubrel(self, packet_id: int) -> None:
        """Never called: observations subscribe at QoS 0."""

    def is_congested(self) -> bool:
        # The observation's own bounded queue absorbs bursts; a closing one takes nothing more,
        # which the session counts as an offline drop (as the HTTP bridge's SSE stream).
        return self.closed

    def close(self, reason_code: int, reason: str = "") -> None:
        """The broker ends the session (shutdown, admin kick, queue overflow): ended by the notifier,
        not here, since the broker may be in the middle of routing a message to this session."""
        if not self.closed:
            self.closed = True
            self.end_reason = reason or f"closed by the broker ({reason_code:#x})"
            if not self.scheduled:
                self.scheduled = True
                self.bridge.schedule(self)
