"""A session just handed over to another node: the old node's stand-in, and the taking node's gate.

When a session moves (``Broker.export_session`` here, ``Broker.import_session`` on the taking
node), its subscriptions leave this node before the taking node's interest in them is known to the
peers (it travels with their route batches). Without more, a message published meanwhile on any
node, or forwarded here by a peer that did not know yet, finds no subscriber anywhere. So a
``MovedSession`` stands in the router in the moved session's place (its subscriptions, and its
shared ones as members of their groups, ``MovedShare``): this node's interest in those filters is
not withdrawn, and what matches them is sent to the taking node *for that session* (``send``;
there ``Broker.deliver_moved`` routes it to that session alone, never to anyone else).

Each message then reaches the session once, through the move's markers (``MoveMarks``; sent and
read by ``fluxmq.cluster.markers``): every node, when it applies the taking node's interest, puts a
marker into its ordered streams to both nodes, after every message it routed before and before
every one it routes after (this node and the taking node mark their own publishes the same way).

* The stand-in forwards a message only when its origin's marker has not arrived here (the
  origin routed it without the taking node's interest: the taking node may not have it); after
  the marker it drops it (the origin sent it to the taking node itself). The origin is the peer
  whose batch is being applied (``Peers.applying``), else this node: nothing per message. Once
  every node's marker is in, the stand-in ends at once and its interest goes.
* The taking node wraps the imported session in a ``MoveGate`` (a router target, only during
  the move): a message from a peer whose marker has not arrived there is not given to the session
  (that peer routed it by its older view: the stand-in forwards it); anything else is. Once every
  peer's marker is in, the session's own subscriptions replace the gate's.
* A session that moves on before its gate opened: its new stand-in forwards only what the gate
  would have given (the node before forwards the rest, passed on here by ``deliver_moved``), and
  lasts its grace. A session that comes back before the markers of its move from here are all in
  is gated with them too (``passes``).
* Shared subscriptions: a peer gives a group's message to one node, so the marker rule above does
  not hold for them (after its marker a peer still picks this node, in turn, while it holds this
  node's interest in the group). What a group gives the stand-in (only when no online member of
  the group is here: those come first) is always forwarded, naming the shared subscription; the
  taking node gives it to the session by that subscription, never gated (no peer sent it there
  too). Once every node's marker is in, this node withdraws its interest in the groups and sends
  ``WITHDRAWN``; the shares stay in the router until every peer answered that it applied the
  withdrawal (after every group message it gave this node before), or a second grace
  (``Broker._stand_in_done``).
* Fallback: a stand-in and a gate end after ``Broker.moved_forward_for`` seconds whatever came;
  a node whose marker did not arrive by then (unreachable that long) may see its messages of the
  window lost or doubled. Without markers (no token: a node of an older version, a double in a
  test) the stand-in forwards for the whole grace and the session is not gated.
* Bounded: at most as many messages wait per stand-in as the session's queue holds on this node
  (``Broker.moved_max_queued``: ``storage.max_queued_messages`` for a persistent session, at least
  ``MAX_QUEUED``; past it they are dropped and counted), sent ``MAX_QUEUED`` per call at most, and
  the stand-ins end after the grace, or the oldest first past ``Broker.moved_max``.
* Not on any hot path: nothing is added per message while no session is moving; a stand-in and
  a gate are router targets like a session, whose ``deliver`` appends to an outbox or delivers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import gevent

from .session import Subscription
from .session_state import QueuedState, SessionState, SubscriptionState, encode_session_state

log = logging.getLogger("fluxmq.broker.moved")

#: messages a stand-in holds for its send at least (its bound is the session's queue bound, when
#: higher: ``MovedSession``'s ``limit``), and at most in one call
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
    would not have given it is not forwarded either (the node before forwards it). ``limit``:
    messages waiting for the send at most (``MAX_QUEUED`` by default), the rest dropped and counted."""

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
        limit: int | None = None,
    ) -> None:
        self.client_id = client_id
        self.limit = MAX_QUEUED if limit is None else limit
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
        #: the session's shared subscriptions, standing in as members of their groups (``MovedShare``)
        self.shares: list[Subscription] = []
        #: their filters still hold this node's interest (False once it is withdrawn: the tail)
        self.shares_held = False
        self.withdrawn: MoveMarks | None = None  # the tail's markers (every peer applied the withdrawal)

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

    def forward(self, message, share: Subscription | None = None) -> None:
        """Queue ``message`` for the session on its new node (what a node before forwarded here);
        ``share``: it is the share of the session's shared subscription ``share`` (the group gave it
        to the session), not a match of its own subscriptions."""
        if len(self._outbox) >= self.limit:
            self.dropped += 1
            return
        # The message as published: the taking node applies the session's own options to it.
        self._outbox.append((QueuedState(message, message.qos, message.retain, None), share))
        if self._sender is None:
            self._sender = gevent.spawn(self._send_all)

    def _send_all(self) -> None:
        """Send what is queued, in order, one call per run of messages for the same subscription
        kind (its own, or one shared subscription: named in the call's state; ``MAX_QUEUED`` at
        most), until nothing is left."""
        try:
            while self._outbox:
                outbox = self._outbox
                share = outbox[0][1]
                n = 1
                most = min(len(outbox), MAX_QUEUED)
                while n < most and outbox[n][1] is share:
                    n += 1
                batch = [q for q, _s in outbox[:n]]
                del outbox[:n]
                subs = []
                if share is not None:
                    subs = [SubscriptionState(share.filter, share.qos, share_group=share.share_group)]
                blob = encode_session_state(SessionState(self.client_id, subscriptions=subs, queued=batch))
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
                "shared": len(self.shares),
                # the peers' answers to the withdrawal of the shares' groups (none: no shares)
                "withdrawn": (
                    "none"
                    if not self.shares
                    else "all"
                    if self.withdrawn is not None and self.withdrawn.complete
                    else "missing"
                ),
            },
        )


class MovedShare:
    """The router target of one shared subscription of a moved session (``MovedSession.shares``):
    a member of its group here, with no connection, so the group's online members here come
    first (``Router.pick_member``); what the group gives it goes to the session on its new node,
    always (a peer gives a group's message to one node only: the taking node cannot have it too)."""

    delivery = None  # offline: the group's online members here come first
    persistent = False
    inflight = ()
    queue = ()
    send_quota = 0

    def __init__(self, stand_in: MovedSession, share: Subscription) -> None:
        self.stand_in = stand_in
        self.share = share  # the session's subscription: its filter, QoS and group
        self.client_id = stand_in.client_id
        self.username = stand_in.username

    def deliver(self, message, qos: int, retain: bool, subscription_ids) -> None:
        self.stand_in.forward(message, self.share)


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
