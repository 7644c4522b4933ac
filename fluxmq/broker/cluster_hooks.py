"""What the cluster asks of the broker: peers and their interest in local filters, messages from
peers, and sessions moving between nodes (claim, export, import, adopt, drop, release) (``Broker``
mixin)."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

import gevent
from gevent.event import Event

from fluxmq.errors import ClaimNotStarted, QueueRefused, ServerUnavailable

from .message import Message, TrackedMessage
from .moved import MAX_QUEUED, MovedSession, MovedShare, MoveGate, MoveMarks
from .prefixes import BRIDGE_SESSION_PREFIX
from .session import Inflight, PersistentSession, Session, Subscription, Will
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

log = logging.getLogger("fluxmq.broker")

#: seconds a subscription waits for a pending interest change of its filter when the peers do not
#: name their own bound (``interest_sync_timeout``)
INTEREST_WAIT = 2.0


class ClusterHooks:
    """The broker's side of the cluster (``fluxmq.broker.peers``)."""

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

    def hold_interest(self, filter: str) -> None:
        """A subscription that is not a session's (a durable queue's capture) wants the publishes
        ``filter`` matches on the peers too."""
        self._interest_up(filter)

    def release_interest(self, filter: str) -> None:
        """The end of a ``hold_interest`` (the queue is no longer captured here)."""
        self._interest_down(filter)

    def _interest_up(self, filter: str) -> None:
        """One more local subscription with ``filter``. A filter new to this node is told to the
        peers, and ``interest_added`` waits (bounded) until the reachable ones applied it; one
        whose telling is still waiting waits for it too, so every subscription acknowledged after
        this returns gets what the peers publish from then on (docs/cluster.rst, "Subscribe, then
        publish elsewhere"), not only the first one."""
        n = self._interest.get(filter, 0)
        self._interest[filter] = n + 1
        peers = self.peers
        if peers is None:
            return
        if n == 0:
            syncing = self._interest_syncing[filter] = Event()
            try:
                peers.interest_added(filter)
            finally:
                if self._interest_syncing.get(filter) is syncing:
                    del self._interest_syncing[filter]
                syncing.set()
            return
        syncing = self._interest_syncing.get(filter)
        if syncing is not None and gevent.getcurrent() is not gevent.get_hub():
            # bounded as the first subscription's wait is (it sets the event when it ends)
            syncing.wait(getattr(peers, "interest_sync_timeout", INTEREST_WAIT))

    def _interest_down(self, filter: str) -> None:
        n = self._interest.get(filter, 0)
        if n > 1:
            self._interest[filter] = n - 1
        elif n == 1:
            del self._interest[filter]
            if self.peers is not None:
                self.peers.interest_removed(filter)

    def _claim_session(self, peers, client_id: str, clean_start: bool, only_from: str | None = None) -> None:
        """Own ``client_id`` cluster-wide before its session is opened here; import what the
        previous owner handed over."""
        pending = self._claiming.get(client_id)
        if pending is not None:
            pending.wait(self.claim_wait)  # another connection of this id is claiming it here
        done = self._claiming[client_id] = Event()
        try:
            handed = self._exported.get(client_id)
            if only_from is not None:
                state = peers.claim_session(client_id, clean_start, only_from)
            elif handed is not None and handed[2]:
                # exported to that node a moment ago: it may not own it yet, or its claim failed
                # after the export (Peers.claim_session): the copy resumes then. The claim takes
                # the copy over, even when it fails (stale if that node's claim ended meanwhile),
                # unless it failed before asking any node: then the copy stays here as it was
                try:
                    state = peers.claim_session(client_id, clean_start, None, handed[2], handed[1])
                except ClaimNotStarted:
                    raise
                except BaseException:
                    if self._exported.get(client_id) is handed:
                        self._drop_exported(client_id)
                    raise
            else:
                state = peers.claim_session(client_id, clean_start)
            self._drop_exported(client_id)  # the client id lives here now
            moving_in = getattr(peers, "moving_in", None) if state else None  # (optional in Peers)
            move = moving_in(client_id) if moving_in is not None else None
            imported = bool(state) and self._take_in(client_id, state, clean_start, move)
            self._end_moved(client_id)  # back here: a stand-in of an earlier move forwards no more
            if imported:
                moved_in = getattr(peers, "moved_in", None)  # (optional in Peers)
                if moved_in is not None:
                    moved_in(client_id)  # its interest is known to the peers now (interest_added)
            elif state:
                discarded = getattr(peers, "move_discarded", None)  # (optional in Peers)
                if discarded is not None:
                    discarded(client_id)  # nothing of the move is announced: it holds nothing more
        finally:
            # The claim ends once this loop turn is over, so open_session and the connection's
            # attach run first: an export asked for meanwhile waits and then sees the attached session.
            gevent.get_hub().loop.run_callback(self._claimed, client_id, done)

    def _claimed(self, client_id: str, done: Event) -> None:
        if self._claiming.get(client_id) is done:
            del self._claiming[client_id]
            if client_id in self._ended_while_claiming:
                # A session of this id ended during the claim (a Clean Start's old copy, or the
                # new session itself when its client disconnected within the claim's turn): with
                # none left here, nothing will release the id later, so it is released now.
                self._ended_while_claiming.discard(client_id)
                peers = self.peers
                if peers is not None and client_id not in self.sessions:
                    gevent.spawn(self._release_if_unused, peers, client_id)  # a callback may not block
        done.set()

    def _take_in(self, client_id: str, blob: bytes, clean_start: bool, move=None) -> bool:
        """The state another node handed over to a connecting client: resumed (True), or
        discarded when the session ends with the move (Clean Start, or a session that lasted as
        long as its connection; as on a local takeover, the will of a connection still open then
        goes now)."""
        try:
            state = decode_session_state(blob, raw_queue=True)
            if state.client_id != client_id:
                raise SessionStateError(f"state of {state.client_id!r} handed over for {client_id!r}")
        except SessionStateError as exc:
            log.error(
                "session_state_refused",
                extra={
                    "client_id": client_id,
                    "error": str(exc),
                    "effect": "the client starts a new session",
                },
            )
            return False
        if clean_start or state.expiry_interval == 0:
            log.info("session_moved_discarded", extra={"client_id": client_id, "clean_start": clean_start})
            if state.will is not None and state.connected:
                self._publish_will(Will(*state.will))
            return False
        self._import_state(state, move)
        return True

    def export_session(
        self,
        client_id: str,
        to_node: str | None = None,
        send: Callable[[bytes], object] | None = None,
        move=None,
    ) -> bytes | None:
        """Hand the session of ``client_id`` to another node: its connection is closed first (5.0
        DISCONNECT 0x8E, 3.x a plain close), no will is published, the session leaves the router,
        the session table and the storage, and its complete state is returned encoded
        (``session_state``). None when this node holds no such session. Ownership is not released
        here: the taking node moves it (``Peers.claim_session``).

        The same state is returned again when asked again within ``exported_keep`` seconds (the
        first reply was lost: this node is still the registered owner). Raises ServerUnavailable
        when a connection here is still claiming ``client_id`` after ``claim_wait`` seconds.

        With ``send`` (``to_node`` takes the session): for ``moved_forward_for`` seconds a stand-in
        keeps the session's QoS 1/2 subscriptions here and sends what matches them to that node
        (``send(blob)``, the node's ``deliver_moved``; ``fluxmq.broker.moved``). ``move`` (the
        cluster's: ``token``, ``nodes`` every node's id, this one's included, ``own``) has it count
        the move's markers: it ends once every node's is in."""
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
                # Asked again while still the registered owner: the first reply never arrived, or
                # the taking node's claim failed after it (the client retries there).
                log.warning("session_export_repeated", extra={"client_id": client_id})
                if send is not None and again[2] == (to_node or ""):
                    self._stand_in_again(client_id, move)
                return again[1]
            return None
        hand_over = self.hand_overs.get(session)
        if hand_over is not None and hand_over.ending:
            return None  # ended already; its shared hand-over finishes here
        if send is not None:
            self._stand_in(session, to_node or "", send, move)  # before its subscriptions leave
        blob = encode_session_state(self._take_out(session))
        self._drop_exported(client_id)
        exported[client_id] = (now, blob, to_node or "")
        self._exported_bytes += len(blob)
        self._prune_exported(now)
        log.info("session_exported", extra={"client_id": client_id, "bytes": len(blob)})
        return blob

    def _moved_subscriptions(self, subscriptions, expiry_interval: int) -> list[Subscription]:
        """The subscriptions a move stands in for (the old node) and gates (the taking node): those
        not shared, of a session that outlives its connection (an expiry; another one does not
        move with its messages), while stand-ins are on (``moved_forward_for``)."""
        if not expiry_interval or self.moved_forward_for <= 0:
            return []
        return [s for s in subscriptions if s.share_group is None]

    def _moved_shares(self, subscriptions, expiry_interval: int) -> list[Subscription]:
        """The shared subscriptions a move stands in for on the old node (``MovedShare``; never
        gated on the taking node: a peer gives each group message to one node only)."""
        if not expiry_interval or self.moved_forward_for <= 0:
            return []
        return [s for s in subscriptions if s.share_group is not None]

    def _origin_of(self, own: str) -> Callable[[], str]:
        """() -> the node a delivery in progress comes from: the peer whose batch is being applied
        (``Peers.applying``), else ``own`` (published here)."""
        peers = self.peers

        def origin() -> str:
            node = getattr(peers, "applying", None)
            return own if node is None else node

        return origin

    def _count_marks(self, marks: MoveMarks) -> None:
        """Count ``marks`` here (``move_marked``) until complete or the grace is over."""
        registry = self._move_marks
        registry[marks.token] = marks
        while len(registry) > 2 * self.moved_max:
            del registry[next(iter(registry))]
        gevent.spawn_later(2 * self.moved_forward_for, registry.pop, marks.token, None)

    def move_marked(self, token: str, node: str) -> None:
        """``node``'s marker of the move ``token`` arrived here (in its stream, after every message
        it routed before it knew the taking node's interest; ``fluxmq.cluster.markers``)."""
        marks = self._move_marks.get(token)
        if marks is not None:
            marks.mark(node)
            if marks.complete:
                self._move_marks.pop(token, None)

    def _stand_in(self, session: Session, to_node: str, send: Callable[[bytes], object], move=None) -> None:
        """Put a ``MovedSession`` in the router beside ``session``'s subscriptions
        (``_moved_subscriptions``; its shared ones as members of their groups, ``_moved_shares``),
        so that their interest stays announced when the session's own leave, until the move's
        markers are in or for ``moved_forward_for`` seconds (the shares longer: ``_stand_in_done``)."""
        subs = self._moved_subscriptions(session.subscriptions.values(), session.expiry_interval)
        shares = self._moved_shares(session.subscriptions.values(), session.expiry_interval)
        if not subs and not shares:
            return
        cid = session.client_id
        self._end_moved(cid)
        marks = origin = None
        gate = self._gates.get(cid)
        if gate is not None and (gate.session is not session or gate.marks.complete):
            gate = None
        if move is not None and move.token:
            marks = MoveMarks(move.token, move.nodes)
            origin = self._origin_of(move.own)
        stand_in = MovedSession(
            cid, session.username, to_node, send, marks, origin, gate, self.moved_max_queued
        )
        if marks is not None:
            marks.done = lambda: self._markers_in(cid, stand_in)
            self._count_marks(marks)
        for s in subs:
            stand_in.subscriptions.append(self._hold_for(stand_in.key, stand_in, s))
        for s in shares:
            stand_in.shares.append(self._hold_for(stand_in.key, MovedShare(stand_in, s), s))
        stand_in.shares_held = bool(shares)
        moved = self._moved
        moved[cid] = stand_in
        stand_in.timer = gevent.spawn_later(self.moved_forward_for, self._stand_in_done, cid, stand_in)
        while len(moved) > self.moved_max:
            self._end_moved(next(iter(moved)))
        log.info(
            "moved_forward_started",
            extra={"client_id": cid, "to_node": to_node, "subscriptions": len(subs), "shared": len(shares)},
        )

    def _stand_in_again(self, client_id: str, move=None) -> None:
        """The same node asks again for the session exported to it (its claim failed, its client
        retries): the stand-in, if still in the router, counts the new move's markers (the failed
        claim announced none of the first one's: counted, it would forward to the end of its grace
        what the peers send the taking node themselves) and lasts a grace from now, to the end of
        the new claim and its markers."""
        stand_in = self._moved.get(client_id)
        if stand_in is None or not (stand_in.subscriptions or stand_in.shares_held):
            return  # ended, or only its shares' tail is left (its markers were all in)
        if stand_in.marks is not None and move is not None and move.token:
            stand_in.marks.done = None
            marks = stand_in.marks = MoveMarks(move.token, move.nodes)
            marks.done = lambda: self._markers_in(client_id, stand_in)
            self._count_marks(marks)
        timer = stand_in.timer
        if timer is not None and timer is not gevent.getcurrent():
            timer.kill(block=False)
        stand_in.timer = gevent.spawn_later(self.moved_forward_for, self._stand_in_done, client_id, stand_in)
        log.info("moved_forward_restarted", extra={"client_id": client_id, "to_node": stand_in.to_node})

    @property
    def moved_max_queued(self) -> int:
        """Messages held at most for a session in a move outside any session: what its stand-in
        here waits to send, what a node whose claim failed keeps of what the stand-in sent it
        (``ClusterSessions.keep_moved``). As many as a persistent session's queue holds here
        (``storage.max_queued_messages``; ``broker.max_queued_messages`` on the memory store), at
        least ``moved.MAX_QUEUED`` (10,000): a node stalled for a few seconds (its etcd lease lost) gets
        the backlog of its peers' streams at once, and a lower bound dropped what the session
        itself would have held."""
        limits = self.persistent_limits if self._store is not None else self.limits
        return max(MAX_QUEUED, limits.max_queued_messages)

    def _hold_for(self, key: str, target, s: Subscription) -> Subscription:
        """``s`` (a moved session's subscription, shared or not) with ``target`` in its place, in
        the router under ``key``; its filter's interest counted."""
        sub = Subscription.like(s, target)
        if self.router.add_keyed(key, sub):
            self._interest_up(s.filter)
        return sub

    def _markers_in(self, client_id: str, stand_in: MovedSession) -> None:
        """Every node's marker of the move reached this node: each sends to the taking node itself
        what it routes from now on, so the stand-in ends (unless the session was still gated here
        when it moved on: what the node before forwards here keeps coming until its grace)."""
        gate = stand_in.gate
        if gate is None or gate.marks.complete:
            self._stand_in_done(client_id, stand_in)

    def _stand_in_done(self, client_id: str, stand_in: MovedSession) -> None:
        """The move's markers are in (or its grace is over): the stand-in ends, except for its shared
        subscriptions, whose groups a peer may still give to this node until it has applied the
        withdrawal of this node's interest in them. That interest goes now; the shares stay in the
        router, members of their groups, until every peer's marker says it applied the withdrawal
        (``markers.WITHDRAWN``), or for ``moved_forward_for`` seconds more: what a peer sent here
        before still reaches the session."""
        if self._moved.get(client_id) is not stand_in:
            return
        if not stand_in.shares_held:
            self._end_moved(client_id, stand_in)
            return
        router = self.router
        for sub in stand_in.subscriptions:
            if router.remove_keyed(stand_in.key, sub.filter):
                self._interest_down(sub.filter)
        stand_in.subscriptions = []
        stand_in.shares_held = False
        for sub in stand_in.shares:
            self._interest_down(sub.filter)
        timer = stand_in.timer
        if timer is not None and timer is not gevent.getcurrent():
            timer.kill(block=False)
        markers = getattr(self.peers, "markers", None)
        token = stand_in.marks.token if stand_in.marks is not None else None
        expected = markers.withdrawn(token + "w") if markers is not None and token else ()
        if not expected:
            stand_in.timer = gevent.spawn_later(self.moved_forward_for, self._end_moved, client_id, stand_in)
            return
        marks = stand_in.withdrawn = MoveMarks(token + "w", expected)
        marks.done = lambda: self._end_moved(client_id, stand_in)
        self._count_marks(marks)
        stand_in.timer = gevent.spawn_later(self.moved_forward_for, self._end_moved, client_id, stand_in)

    def _end_moved(self, client_id: str, stand_in: MovedSession | None = None) -> None:
        """The stand-in of ``client_id`` (only ``stand_in``, when given) leaves the router; the
        interest its filters held goes, unless a subscription here still has them."""
        current = self._moved.get(client_id)
        if current is None or (stand_in is not None and current is not stand_in):
            return
        del self._moved[client_id]
        timer = current.timer
        if timer is not None and timer is not gevent.getcurrent():
            timer.kill(block=False)
        for sub in current.subscriptions:
            if self.router.remove_keyed(current.key, sub.filter):
                self._interest_down(sub.filter)
        for sub in current.shares:
            if self.router.remove_keyed(current.key, sub.filter) and current.shares_held:
                self._interest_down(sub.filter)
        current.shares_held = False
        current.ended()
        if current.sending:
            self._moved_ending.append(current)

    def moved_forwarding(self) -> set[str]:
        """The nodes the stand-ins of sessions exported from here still forward to: those in the
        router, and those out of it whose last messages are still being sent. A stopping node
        stays up until none is left (``fluxmq.cluster.node.ClusterNode.drain``), so what reached it
        for a session it handed over still goes to the session."""
        self._moved_ending = ending = [s for s in self._moved_ending if s.sending]
        return {s.to_node for s in self._moved.values()} | {s.to_node for s in ending}

    def _gate(self, session: Session, subs: list[Subscription], move) -> None:
        """Wrap ``subs`` of ``session`` (imported from a move, in the router already) in a
        ``MoveGate`` until every peer's marker of the move is in, or for ``moved_forward_for``
        seconds. A session that comes back while the markers of its move from here are not all in
        passes what only this node had (``moved.passes``)."""
        cid = session.client_id
        if not move.peers:
            return
        before = None
        stand_in = self._moved.get(cid)
        if stand_in is not None and stand_in.marks is not None and not stand_in.marks.complete:
            before = stand_in.marks
        marks = MoveMarks(move.token, move.peers)
        gate = MoveGate(session, move.own, marks, self._origin_of(move.own), before, self.router.route)
        router = self.router
        for s in subs:
            router.add(Subscription.like(s, gate))  # (not shared: share_group None)
            gate.subscriptions.append(s)
        self._gates[cid] = gate
        marks.done = lambda: self._open_gate(cid, gate)
        self._count_marks(marks)
        gevent.spawn_later(self.moved_forward_for, self._open_gate, cid, gate)

    def _open_gate(self, client_id: str, gate: MoveGate) -> None:
        """The session's own subscriptions back in the router in place of ``gate``'s (those it
        still has: it may have unsubscribed, subscribed again or moved on meanwhile)."""
        if self._gates.get(client_id) is not gate:
            return
        del self._gates[client_id]
        session = gate.session
        if self.sessions.get(client_id) is not session:
            return
        router = self.router
        for s in gate.subscriptions:
            if session.subscriptions.get(s.filter) is s:
                router.add(s)
        log.info(
            "moved_gate_opened",
            extra={
                "client_id": client_id,
                "held": gate.held,
                "markers": "all" if gate.marks.complete else "missing",
            },
        )

    def deliver_moved(self, blob: bytes) -> int:
        """Messages the previous node of a session imported here forwarded for it (``MovedSession``
        there; ``blob`` a ``session_state`` holding only queued messages): each goes to that session
        alone, with the options of its subscriptions here that match (the read ACL applied, No
        Local against its own messages), or, when the session moved on meanwhile, to its stand-in
        here. None goes to a session of that id that was not imported (a Clean Start after the move,
        say): they were the old session's. Returns the deliveries."""
        state = decode_session_state(blob)
        cid = state.client_id
        share = state.subscriptions[0] if state.subscriptions else None  # a group's share of them
        pending = self._claiming.get(cid)
        if pending is not None:
            pending.wait(self.claim_wait)  # the import in progress here: deliver once it is done
        session = self.sessions.get(cid)
        until = self._moved_in.get(cid)
        if session is None or until is None or until < time.monotonic():
            stand_in = self._moved.get(cid)
            if stand_in is not None:
                passed = self._share_of(stand_in, share.filter) if share is not None else None
                for q in state.queued:
                    stand_in.forward(q.message, passed)
                return 0
            keep_moved = getattr(self.peers, "keep_moved", None)  # (optional in Peers)
            if session is None and keep_moved is not None and keep_moved(cid, state.queued):
                return 0  # its claim here failed: queued with the state kept for the client
            log.warning("moved_messages_dropped", extra={"client_id": cid, "messages": len(state.queued)})
            return 0
        if share is not None:
            return self._deliver_share(session, share.filter, state.queued)
        n = 0
        route = self.router.route
        for q in state.queued:
            message = q.message
            for target, qos, qos_own, rap, sub_ids in route(message.topic).targets:
                if target is not session and (type(target) is not MoveGate or target.session is not session):
                    continue
                if message.origin == cid:
                    qos = qos_own  # No Local [MQTT-3.8.3-3]: -1 when every matching one has it
                if qos < 0:
                    break
                if message.qos < qos:
                    qos = message.qos
                session.deliver(message, qos, rap and message.retain, sub_ids)
                n += 1
                break
        return n

    @staticmethod
    def _share_of(stand_in: MovedSession, filter: str) -> Subscription:
        """The shared subscription ``filter`` of the session ``stand_in`` forwards for (a message a
        node before forwarded as its group's share, passed on)."""
        for sub in stand_in.shares:
            if sub.filter == filter:
                return sub.session.share
        return Subscription(None, filter, 2, share_group=filter.split("/", 2)[1])

    def _deliver_share(self, session: Session, filter: str, queued) -> int:
        """Messages a group gave the session's shared subscription ``filter`` on its previous node
        (forwarded by its stand-in there, ``MovedShare``): to the session, with the options of that
        subscription here; dropped when the session no longer has it (logged)."""
        sub = session.subscriptions.get(filter)
        if sub is None or sub.share_group is None:
            log.warning(
                "moved_messages_dropped",
                extra={"client_id": session.client_id, "messages": len(queued), "filter": filter},
            )
            return 0
        ids = (sub.subscription_id,) if sub.subscription_id else None
        for q in queued:
            message = q.message
            session.deliver(message, message.qos if message.qos < sub.qos else sub.qos, False, ids)
        return len(queued)

    def _prune_exported(self, now: float) -> None:
        """Oldest first: drop the copies past ``exported_keep`` or over the count and byte bounds."""
        exported = self._exported
        while exported:
            first = next(iter(exported))
            if (
                now - exported[first][0] < self.exported_keep
                and len(exported) <= self.exported_max
                and self._exported_bytes <= self.exported_max_bytes
            ):
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
        old = self._unplug(session)  # durable-queue deliveries stay on this node
        state = self._snapshot(session, old is not None)
        if self.queues is not None and session.expiry_interval:
            state.queue_members = self.queues.take_memberships(session.client_id)  # they move with it
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
        subs = [
            SubscriptionState(
                s.filter,
                s.qos,
                s.no_local,
                s.retain_as_published,
                s.retain_handling,
                s.subscription_id,
                s.share_group,
            )
            for s in session.subscriptions.values()
        ]
        inflight = [
            InflightState(
                pid,
                e.message,
                e.qos,
                e.retain,
                tuple(e.subscription_ids) if e.subscription_ids else None,
                e.released,
            )
            for pid, e in session.inflight.items()
            if e.message.__class__ is not TrackedMessage
        ]  # a durable queue's, redelivered here
        queued: list
        if isinstance(session, PersistentSession):
            queued = session.queue.encoded_entries()  # as stored: passed on without decoding
        else:
            queued = [
                QueuedState(m, qos, retain, tuple(ids) if ids else None)
                for m, qos, retain, ids in session.queue
            ]
        will = (session.will.message, session.will.delay) if session.will is not None else None
        return SessionState(
            session.client_id,
            session.username,
            session.expiry_interval,
            0.0 if connected else session.disconnected_at,
            connected,
            session._next_pid,
            subs,
            inflight,
            sorted(session.inbound_qos2),
            queued,
            will,
        )

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

    def _import_state(self, state: SessionState, move=None) -> Session:
        """Build the session of ``state`` here (raises SessionStateError, changing nothing, when
        an encoded queue entry is damaged). ``move`` (the cluster's, from ``Peers.moving_in``:
        ``token``, ``peers``, ``own``, ``switch()``): the session came from a move whose old node
        stands in for it: its subscriptions are gated (``_gate``), and ``switch()`` tells the old
        node, in order with what this node routes, when they enter the router here."""
        cid = state.client_id
        expiry = (
            state.expiry_interval
            if cid.startswith(BRIDGE_SESSION_PREFIX)
            else self.capped_expiry(state.expiry_interval)
        )
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
        new_filters = []
        subs = []
        for s in state.subscriptions:
            sub = Subscription.like(s, session)
            subs.append(sub)
            session.subscriptions[s.filter] = sub
            if store is not None:
                store.put_subscription(
                    cid,
                    s.filter,
                    s.qos,
                    s.no_local,
                    s.retain_as_published,
                    s.retain_handling,
                    s.subscription_id,
                )
        # Every subscription enters the router at once (the interest waits yield): a message this
        # node routes after ``switch()`` finds them all.
        if move is not None:
            move.switch()
        for sub in subs:
            if self.router.add(sub):
                new_filters.append(sub.filter)
        if move is not None:
            gated = self._moved_subscriptions(subs, state.expiry_interval)
            if gated:
                self._gate(session, gated, move)
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
        self._take_moved(cid)
        for filter in new_filters:
            self._interest_up(filter)  # the peers hear of a filter new to this node
        if state.queue_members and expiry > 0:
            try:
                self._queue_manager().adopt_memberships(session, state.queue_members)
            except QueueRefused as exc:  # no durable queues on this node
                log.warning("queue_memberships_dropped", extra={"client_id": cid, "reason": str(exc)})
        self._arm_timer_remaining(session, max(0.0, now - session.disconnected_at))
        log.info(
            "session_imported",
            extra={
                "client_id": cid,
                "subscriptions": len(session.subscriptions),
                "inflight": len(session.inflight),
                "queued": len(queued),
            },
        )
        return session

    def _take_moved(self, client_id: str) -> None:
        """The session of ``client_id`` imported here takes what its previous node forwards for it
        (``deliver_moved``) for a while; the oldest records past that go first."""
        now = time.monotonic()
        moved_in = self._moved_in
        moved_in.pop(client_id, None)
        moved_in[client_id] = now + 2 * self.moved_forward_for
        while moved_in:
            first = next(iter(moved_in))
            if moved_in[first] >= now and len(moved_in) <= self.moved_max:
                break
            del moved_in[first]

    def _release_if_unused(self, peers, client_id: str) -> None:
        """Release ``client_id`` unless a session or a claim of it appeared here meanwhile."""
        if client_id not in self.sessions and client_id not in self._claiming:
            self._release(peers, client_id)

    @staticmethod
    def _release(peers, client_id: str) -> None:
        try:
            peers.release_session(client_id)
        except Exception as exc:  # the owner key goes with this node's lease anyway
            log.warning("session_release_failed", extra={"client_id": client_id, "error": str(exc)})

    #: the C fast path of a PUBLISH (``fluxmq._core.relay.PublishRelay``), set by the node that
    #: runs the MQTT listeners: it also delivers the plain messages peers forward
    relay = None

    def publish_relayed_from_peer(self, items: bytes, start: int) -> tuple[int, int]:
        """``publish_from_peer`` for the plain messages of a peer's batch items (framed as
        ``fluxmq.cluster.batch`` does; ``fluxmq._core.forward``) from byte ``start``, in C through
        the relay's fan-out; returns (the offset of the first item left to ``publish_from_peer``,
        messages delivered). Without a relay: ``(start, 0)``."""
        relay = self.relay
        if relay is None:
            return start, 0
        return relay.deliver_items(self, items, start)

    def peer_batch_applied(self, sender: str, epoch: int, seq: int) -> bool:
        """A peer's batch (``epoch``, ``seq``) was applied: when it stored anything (the store has
        operations pending), record it in the same commit, so that after a kill and restart this
        node skips the batch if the peer sends it again (``restored_peer_batches``). A batch that
        stored nothing adds no commit. True when the batch awaits a commit (its ack must wait for
        ``wait_committed``)."""
        store = self._store
        if store is not None and store.has_pending:
            store.put_peer_batch(sender, epoch, seq)
            return True
        return False

    def publish_from_peer(
        self, message: Message, shared_groups: tuple[str, ...] = (), match_local: bool = True
    ) -> int:
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

    def adopt_session(self, client_id: str, from_node: str | None = None) -> bool:
        """Take the session of ``client_id`` over from the node that owns it, with no connection:
        that node is stopping and hands its sessions to the others. Claimed as for a connecting
        client (``Peers.claim_session``, may block this greenlet), kept offline here with its
        timers armed. True when a session of ``client_id`` is here now; raises ServerUnavailable
        when ownership cannot be established or, with ``from_node``, when a node other than the
        stopping one owns it now (its client reconnected there: taking it would close that client)."""
        peers = self.peers
        if peers is None or client_id in self.sessions:
            return client_id in self.sessions
        self._claim_session(peers, client_id, False, from_node)
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
        old = self._unplug(session)
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
