"""A session just handed over to another node, still forwarding what reaches it here.

When a session moves (``Broker.export_session`` here, ``Broker.import_session`` on the taking
node), its subscriptions leave this node before the taking node's interest in them is known to the
peers (it travels with their route batches). Without more, a message published meanwhile on any
node, or forwarded here by a peer that did not know yet, finds no subscriber anywhere. So for
``Broker.moved_forward_for`` seconds after the export a ``MovedSession`` stands in the router in
the moved session's place (its QoS 1/2 subscriptions, shared ones excepted): this node's interest
in those filters is not withdrawn, and what matches them is sent to the taking node *for that
session* (``send``; there ``Broker.deliver_moved`` routes it to that session alone, never to anyone
else). The stand-in ends once the cluster layer knows that every peer sends to the taking node and
nothing queued here before is still on its way (``Broker.withdraw_moved`` then ``end_moved``:
``fluxmq.cluster.handover``), when the session comes back here, or at the latest after the grace;
then it leaves the router and the interest goes as it would have at the export.

* Only QoS 1/2 deliveries are forwarded: a QoS 0 one may be lost in the move (at most once) but is
  never doubled. A QoS 1/2 message that also reached the taking node directly (its interest was
  known to the publisher's node already, before the stand-in ended) arrives there twice: QoS 1
  allows it; the second copy of a QoS 2 message is a second PUBLISH with a new packet id.
* Bounded: at most ``MAX_QUEUED`` messages wait per stand-in (past it they are dropped and
  counted), and the stand-ins end after the grace, or the oldest first past ``Broker.moved_max``.
* Not on any hot path: nothing is added per message while no session is moving; a stand-in is a
  router target like a session's, whose ``deliver`` appends to its outbox.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import gevent

from .session import Subscription
from .session_state import QueuedState, SessionState, encode_session_state

log = logging.getLogger("fluxmq.broker.moved")

#: messages a stand-in holds for its send at most (past it they are dropped, counted)
MAX_QUEUED = 10000
#: the router key of a stand-in's subscriptions (beside the client id's own, which a session of
#: the same id coming back here takes)
KEY_SUFFIX = "\x00moved"


class MovedSession:
    """The router target standing for a session that moved to node ``to_node`` (module docstring)."""

    # a router target's fields that the publish paths read: no connection, not a client's
    delivery = None
    trusted = True  # the read ACL applies on the taking node, to the session itself
    persistent = False

    def __init__(self, client_id: str, username, to_node: str, send: Callable[[bytes], object]) -> None:
        self.client_id = client_id
        self.username = username
        self.to_node = to_node
        self.key = client_id + KEY_SUFFIX
        self.subscriptions: list[Subscription] = []
        self._send = send
        self._outbox: list[QueuedState] = []
        self._sender = None
        self.forwarded = 0
        self.dropped = 0
        self.timer = None
        self.withdrawn = False  # its interest went already (``Broker.withdraw_moved``)

    def deliver(self, message, qos: int, retain: bool, subscription_ids) -> None:
        """Queue ``message`` for the session on its new node (QoS 0: not forwarded)."""
        if not qos:
            return
        if len(self._outbox) >= MAX_QUEUED:
            self.dropped += 1
            return
        # The message as published: the taking node applies the session's own options to it.
        self._outbox.append(QueuedState(message, message.qos, message.retain, None))
        if self._sender is None:
            self._sender = gevent.spawn(self._send_all)

    def _send_all(self) -> None:
        """Send what is queued, in order, one call per run of messages, until nothing is left."""
        try:
            while self._outbox:
                batch, self._outbox = self._outbox, []
                blob = encode_session_state(SessionState(self.client_id, queued=batch))
                try:
                    self._send(blob)
                except Exception as exc:
                    self.dropped += len(batch)
                    log.error(
                        "moved_forward_failed",
                        extra={
                            "client_id": self.client_id,
                            "to_node": self.to_node,
                            "messages": len(batch),
                            "error": str(exc),
                        },
                    )
                else:
                    self.forwarded += len(batch)
        finally:
            self._sender = None

    @property
    def sending(self) -> bool:
        """Messages are queued here or their send is in progress."""
        return bool(self._outbox) or self._sender is not None

    def ended(self) -> None:
        """Out of the router: log what it did (what is queued still goes)."""
        log.info(
            "moved_forward_ended",
            extra={
                "client_id": self.client_id,
                "to_node": self.to_node,
                "forwarded": self.forwarded + len(self._outbox),
                "dropped": self.dropped,
            },
        )
