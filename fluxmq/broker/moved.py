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


class MoveMarks:
    """The markers of one move (``token``) that arrived here: the nodes that route by the taking
    node's interest from then on (module docstring). ``done()`` runs once every node of
    ``expected`` is in."""

    __slots__ = ("token", "expected", "marked", "done")

    def __init__(self, token: str, expected, done: Callable[[], object] | None = None) -> None:
        self.token = token
        self.expected = frozenset(expected)
        self.marked: set[str] = set()
        self.done = done

    @property
    def complete(self) -> bool:
        return self.expected <= self.marked

    def mark(self, node: str) -> None:
        if node in self.marked:
            return
        self.marked.add(node)
        done = self.done
        if done is not None and self.expected <= self.marked:
            self.done = None
            done()


def passes(origin: str, own: str, marks: MoveMarks, before: MoveMarks | None) -> bool:
    """Whether a message from ``origin`` (``own``: published here) that reached the taking node
    is given to the moved session there: published here, or its origin's marker of this move
    arrived (it routed by this node's interest since), or, for a session that came back before
    its previous move's markers were all in (``before``, that move's marks here), its origin's
    marker of that move has not arrived (the previous node never saw the message: this node's
    stand-in would have forwarded it)."""
    return origin == own or origin in marks.marked or (before is not None and origin not in before.marked)


class MovedSession:
    """The router target standing for a session that moved to node ``to_node`` (module docstring).

    ``marks`` (None: no markers, the grace alone ends it): the move's markers; a message whose
    origin (``origin()``) marked is dropped, that node sends it to ``to_node`` itself. ``gate``:
    the session was still gated here (its move here not settled) when it moved on: what the gate
    would not have given it is not forwarded either (the node before forwards it)."""

    # a router target's fields that the publish paths read: no connection, not a client's
    delivery = None
    trusted = True  # the read ACL applies on the taking node, to the session itself
    persistent = False

    def __init__(
        self,
        client_id: str,
        username,
        to_node: str,
        send: Callable[[bytes], object],
        marks: MoveMarks | None = None,
        origin: Callable[[], str] | None = None,
        gate: MoveGate | None = None,
    ) -> None:
        self.client_id = client_id
        self.username = username
        self.to_node = to_node
        self.key = client_id + KEY_SUFFIX
        self.subscriptions: list[Subscription] = []
        self._send = send
        self._outbox: list[QueuedState] = []
        self._sender = None
        self.marks = marks
        self._origin = origin
        self.gate = gate
        self.forwarded = 0
        self.dropped = 0
        self.skipped = 0  # messages whose origin sends them to the taking node itself
        self.timer = None

    def deliver(self, message, qos: int, retain: bool, subscription_ids) -> None:
        """Queue ``message`` for the session on its new node, unless its origin sends it there."""
        marks = self.marks
        if marks is not None:
            origin = self._origin()
            gate = self.gate
            if origin in marks.marked or (gate is not None and not gate.passes(origin)):
                self.skipped += 1
                return
        self.forward(message)

    def forward(self, message) -> None:
        """Queue ``message`` for the session on its new node (what a node before forwarded here)."""
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

    def ended(self) -> None:
        """Out of the router: log what it did (what is queued still goes)."""
        marks = self.marks
        log.info(
            "moved_forward_ended",
            extra={
                "client_id": self.client_id,
                "to_node": self.to_node,
                "forwarded": self.forwarded + len(self._outbox),
                "dropped": self.dropped,
                "skipped": self.skipped,
                "markers": "all" if marks is not None and marks.complete else "missing",
            },
        )


class MoveGate:
    """The router target wrapping a session imported from a move while that move's markers are not
    all in (module docstring): a message from a peer whose marker has not arrived is not given to
    it (the previous node's stand-in forwards it); anything else is, as to the session itself. Its
    other fields are the session's."""

    delivery = None  # the publish paths call ``deliver`` (the relay's fast path does not apply)

    def __init__(
        self,
        session,
        own: str,
        marks: MoveMarks,
        origin: Callable[[], str],
        before: MoveMarks | None = None,
        route=None,
    ) -> None:
        self.session = session
        self.own = own
        self.marks = marks
        self.before = before
        self._origin = origin
        self._route = route  # Router.route: the No Local check of the session's own messages
        self.held = 0  # messages not given (their origin's marker had not arrived)
        self.subscriptions: list[Subscription] = []  # the gated ones (the session's own objects)

    def __getattr__(self, name: str):
        return getattr(self.session, name)

    def passes(self, origin: str) -> bool:
        return passes(origin, self.own, self.marks, self.before)

    def deliver(self, message, qos: int, retain: bool, subscription_ids) -> None:
        origin = self._origin()
        if not passes(origin, self.own, self.marks, self.before):
            self.held += 1
            return
        session = self.session
        if message.origin == session.client_id and origin == self.own and self._route is not None:
            # the session's own message published here: No Local as for its own subscriptions
            for target, _q, qos_own, _rap, _ids in self._route(message.topic).targets:
                if target is self:
                    if qos_own < 0:
                        return
                    qos = min(qos, qos_own)
                    break
        session.deliver(message, qos, retain, subscription_ids)
