"""Session hand-over between nodes: the takeover RPC's two ends.

* The state codec is ``fluxmq.broker.session_state`` (re-exported here): the broker encodes and
  decodes it itself and never imports this package.
* ``takeover_handler(broker)`` answers ``kind="session.takeover"`` on the node that owns a session:
  payload = client id (UTF-8), reply = the encoded state (``Broker.export_session``, its removal
  committed to the local store first), or ``b""`` when this node holds no session of that id. It
  raises ServerUnavailable while a connection of that id is still claiming it on this node. Given
  the transport's ``call``, the export leaves a stand-in that forwards to the caller, for a few
  seconds, what still reaches this node for the session (``fluxmq.broker.moved``): control RPC
  ``session.moved`` (``moved_handler``: ``Broker.deliver_moved`` on the taking node).
* The takeover request names the move (payload ``client id NUL token``; a client id holds no
  NUL [MQTT-1.5.4-2]). The taking node gates the imported session and marks its streams
  (``ClusterSessions.moving_in``, ``moved_in``; ``fluxmq.cluster.markers``); the old owner's
  stand-in counts the markers of that token and ends once every node's is in, or after its grace.
* ``serve_handover(transport, broker, peers)`` installs these handlers.
* ``ClusterSessions`` implements ``Peers.claim_session`` / ``release_session`` over an ownership
  registry (``acquire_session(client_id, take_from=None) -> previous owner | None``,
  ``release_session(client_id)``: etcd, ``fluxmq.cluster.metadata``) and a control RPC
  (``call(node_id, kind, payload, timeout) -> bytes``: gRPC, ``fluxmq.cluster.transport``).

A takeover, with client C connecting to node B while node A owns its session::

    B: acquire_session(C)             -> "A"        (A stays owner)
    B: call("A", "session.takeover", C + NUL + T)    A: export_session(C): DISCONNECT 0x8E to the
                                                        old connection, state out of A, no will;
                                                        a stand-in counting the markers of T
    B: acquire_session(C, take_from="A") -> None     (CAS A -> B)
    B: import_session: SWITCH(T) -> A, C's subscriptions gated in B's router, its interest out
    B: REQUEST(T) -> every peer; CONNACK session_present=1
    P: (applying REQUEST) APPLIED(T) -> A and -> B; A (applying it): counts itself, APPLIED -> B
    A: (until every node's marker, at most Broker.moved_forward_for seconds) what matches C's
       subscriptions here, from a node whose marker has not come: call("B", "session.moved",
       messages) -> B: deliver_moved: to C only
    B: the gate opens once every peer's APPLIED is in (or after the grace)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import gevent

from fluxmq.broker.session_state import (
    SessionState,
    SessionStateError,
    decode_session_state,
    encode_session_state,
)
from fluxmq.errors import ClaimNotStarted, OwnerRestarting, ServerUnavailable, StorageError

log = logging.getLogger("fluxmq.cluster.handover")

#: control RPC kind of a takeover request
TAKEOVER_KIND = "session.takeover"
#: control RPC kind of the messages a moved session's previous node forwards to it
MOVED_KIND = "session.moved"
#: seconds a forward of moved messages may take
MOVED_TIMEOUT = 5.0
#: seconds the answering node waits for the commit that removes the session from its store
COMMIT_TIMEOUT = 2.0
#: seconds a claiming node waits for the owner to apply what it forwarded there before the claim
DRAIN_TIMEOUT = 0.5
#: messages a node keeps per client id from the stand-in of a move whose claim failed here, by
#: default (``ClusterSessions``' ``max_kept_moved``: a node passes as many as a stand-in holds,
#: ``Broker.moved_max_queued``)
MAX_KEPT_MOVED = 10000
#: seconds a node keeps what a failed claim of a client id left here, the state (``kept``) and the
#: messages of its move (``kept_moved``): as long as the old node keeps the copy of its export for
#: the client's retry (``Broker.exported_keep``); ``ClusterSessions``' ``kept_for``
KEPT_FOR = 30.0
#: bytes of the states a node keeps from failed claims, at most (as ``Broker.exported_max_bytes``)
MAX_KEPT_BYTES = 64 << 20
#: seconds between two looks at the registry while a claim waits for a restarting owner
RESTART_POLL = 0.1
#: seconds a failed takeover call's owner is looked at for its death (``ClusterSessions._died``)
DIED_WAIT = 1.0
#: first bytes of a takeover reply that carries no state, only what the stand-in of a move whose
#: claim failed on the answering node forwarded there (``ClusterSessions.take_kept``): a session
#: state (``b"FXSS"``...) follows, holding those messages alone. The asking node resumes the copy
#: of its own export with them (``claim_session``'s ``exported``).
KEPT_MOVED_REPLY = b"FXKM"

__all__ = [
    "KEPT_MOVED_REPLY",
    "MOVED_KIND",
    "TAKEOVER_KIND",
    "ClusterSessions",
    "SessionState",
    "SessionStateError",
    "decode_session_state",
    "encode_session_state",
    "moved_handler",
    "serve_handover",
    "takeover_handler",
]


def takeover_handler(
    broker,
    call: Callable[[str, str, bytes, float], bytes] | None = None,
    markers=None,
    take_kept: Callable[[str, str], bytes | None] | None = None,
    handed_over: Callable[[str], object] | None = None,
) -> Callable[[str, bytes], bytes]:
    """The transport handler of ``session.takeover`` for ``broker``: ``fn(from_node, payload)``
    exports the session named by ``payload`` (``client id`` or ``client id NUL token``) and returns
    its state (``b""``: no such session). With ``call`` (the transport's) what still reaches this
    node for the session afterwards is forwarded to ``from_node`` (``Broker.export_session``'s
    ``send``) until the move's markers are in (``markers``: ``fluxmq.cluster.markers.MoveMarkers``,
    and a token) or for a few seconds.

    ``take_kept`` (``ClusterSessions.take_kept``): with no session here, the state a failed claim of
    this node keeps for the client (``ClusterSessions.kept``) is handed over instead, or, with none,
    what that claim kept of its move (``KEPT_MOVED_REPLY``: the asking node resumes its copy). The node the
    state came from took the session back from here (``claim_session``'s ``handed_to``), since the
    registry still names it: answered empty, it would start the client afresh and the kept state
    would be lost (or, at the client's next claim here, replace the session it lives on).

    ``handed_over`` (``ClusterSessions.handed_over``): called with the client id once its state left
    here, so this node stops counting the session as its own."""

    def handle(from_node: str, payload: bytes) -> bytes:
        try:
            client_id, _, token = bytes(payload).decode().partition("\x00")
        except UnicodeDecodeError:
            log.warning(
                "takeover_refused", extra={"from_node": from_node, "reason": "client id is not UTF-8"}
            )
            return b""
        if call is None:
            state = broker.export_session(client_id)  # ServerUnavailable goes back as the call's error
        else:

            def send(blob: bytes) -> None:
                call(from_node, MOVED_KIND, blob, MOVED_TIMEOUT)

            move = markers.move_out(token) if markers is not None and token else None
            state = broker.export_session(client_id, from_node, send, move)
        if not state and take_kept is not None:
            state = take_kept(client_id, from_node)
        if state:
            if handed_over is not None:
                handed_over(client_id)
            # The session's removal here is committed before the state leaves: a crash of this
            # node afterwards cannot bring back a second copy at its restart.
            try:
                broker.wait_committed(COMMIT_TIMEOUT)
            except StorageError as exc:
                log.error(
                    "takeover_commit_failed",
                    extra={
                        "client_id": client_id,
                        "error": str(exc),
                        "effect": "a restart here may restore a stale copy",
                    },
                )
        log.info(
            "takeover_served",
            extra={"from_node": from_node, "client_id": client_id, "bytes": len(state) if state else 0},
        )
        return state or b""

    return handle


def moved_handler(
    broker, pass_back: Callable[[bytes], bytes | None] | None = None
) -> Callable[[str, bytes], bytes]:
    """The transport handler of ``session.moved``: the messages a session's previous node forwards
    for it, delivered to that session only (``Broker.deliver_moved``), or passed on to the node
    that took the session back from here (``pass_back``: ``ClusterSessions.pass_back``)."""

    def handle(from_node: str, payload: bytes) -> bytes:
        if pass_back is not None:
            passed = pass_back(bytes(payload))
            if passed is not None:
                return passed
        try:
            n = broker.deliver_moved(bytes(payload))
        except SessionStateError as exc:
            log.warning("moved_messages_refused", extra={"from_node": from_node, "error": str(exc)})
            return b""
        return str(n).encode()

    return handle


def serve_handover(transport, broker, peers=None) -> None:
    """Serve ``session.takeover`` and ``session.moved`` for ``broker`` on ``transport``, with what
    ``peers`` (``ClusterPeers``) has of them: the move's ``markers`` that end the forwarding of
    what reaches the old node afterwards, ``take_kept`` (a failed claim's kept state),
    ``handed_over`` (told of each state that left) and ``pass_back`` (what reaches here after a
    take-back took what a failed claim kept)."""
    markers = getattr(peers, "markers", None)
    take_kept = getattr(peers, "take_kept", None)
    handed_over = getattr(peers, "handed_over", None)
    transport.handle(TAKEOVER_KIND, takeover_handler(broker, transport.call, markers, take_kept, handed_over))
    transport.handle(MOVED_KIND, moved_handler(broker, getattr(peers, "pass_back", None)))


class ClusterSessions:
    """``Peers.claim_session`` and ``release_session`` over an ownership registry and an RPC.

    ``claim_session`` makes this node the owner of a client id: when another live node owns it,
    that node hands the state over (its connection closed first), then ownership moves with a
    compare-and-swap from that node. If ownership moved elsewhere meanwhile (a race with a third
    node), the new owner is asked in turn, at most ``max_moves`` times. Any failure of the registry
    or of the owner to answer raises ServerUnavailable (CONNACK 0x88; the client retries).

    An owner the registry reports as restarting (``OwnerRestarting``: a worker killed -9 or stopped
    alone that its arbiter starts again, whose store holds the session) is waited for, at most
    ``restart_wait`` seconds, in this greenlet (the registry looked at every ``RESTART_POLL`` s):
    once it is back and holds its restored copy, the session is taken over from it as from any
    owner; not back in time, ServerUnavailable (never a fresh session while the copy may come
    back). A Clean Start does not wait: it takes the id from the dead owner at once (the restarted
    one drops its copy).
    """

    def __init__(
        self,
        ownership,
        call: Callable[[str, str, bytes, float], bytes],
        timeout: float = 5.0,
        max_moves: int = 3,
        max_kept: int = 10000,
        drain: Callable[[str, float], object] | None = None,
        markers=None,
        restart_wait: float = 0.0,
        max_kept_moved: int = MAX_KEPT_MOVED,
        max_kept_bytes: int = MAX_KEPT_BYTES,
    ) -> None:
        self.ownership = ownership
        self.call = call
        self.restart_wait = restart_wait
        # (node_id, timeout): wait until what this node forwarded to ``node_id`` so far is applied
        # there, so the state it hands over holds the messages published here before the claim
        self.drain = drain
        # the node's markers (``fluxmq.cluster.markers.MoveMarkers``): a move's gate and marks;
        # None: none (the old owner's stand-in lasts its grace)
        self.markers = markers
        self.timeout = timeout
        self.max_moves = max_moves
        # States handed over to a claim that then failed (the registry refused or moved on): the
        # previous owner gave them up already, so they are kept for the client's next claim here
        # (a client refused with 0x88 retries) rather than lost, for ``kept_for`` seconds, as
        # long as the registry names no other node than it did then (``_kept_state``). Bounded in
        # ids and bytes; the oldest goes first. Client id -> (until when, the state, the node the
        # registry named then, "" for this one or none, the node a take-back of it did not get the
        # answer of or ""); ``kept_dropped`` counts those dropped unused (expired, stale, over
        # the bounds).
        self.kept: dict[str, tuple[float, bytes, str, str]] = {}
        self.max_kept = max_kept
        self.max_kept_bytes = max_kept_bytes
        self.kept_bytes = 0
        self.kept_dropped = 0
        self.kept_for = KEPT_FOR
        self.clock: Callable[[], float] = time.monotonic  # (tests move it)
        # What the previous owner's stand-in forwarded here for a client id whose claim failed after
        # its takeover call (``keep_moved``): kept apart from the state, since the client's retry
        # may take the state again from that node (the copy of its export, without them), and
        # added to whatever state the next claim returns (or a take-back takes). Bounded as ``kept``
        # in ids, ``max_kept_moved`` messages each, ``kept_for`` seconds: client id -> (until
        # when, the messages)
        self.kept_moved: dict[str, tuple[float, list]] = {}
        self.max_kept_moved = max_kept_moved
        # client id -> (the node whose state the last claim took, the move's token): its stand-in
        # forwards to here until the markers ``moved_in`` asks for are in
        self._took_from: dict[str, tuple[str, str]] = {}
        # client id -> (until when, the node that took the session back from here and with it what
        # ``kept_moved`` held, ``take_kept``): what the stand-in still forwards here goes there
        self._handed_back: dict[str, tuple[float, str]] = {}
        # client id -> (until when, the node, the messages): what ``take_kept`` answered that node's
        # take-back with. Answered again with them while they last, as that node asks again only
        # when it did not get the answer (``claim_session``'s ``back_from``); gone at a claim here.
        self._sent_back: dict[str, tuple[float, str, list]] = {}
        self._moves = 0

    def _acquire(self, client_id: str, take_from: str | None) -> str | None:
        try:
            if take_from is None:
                return self.ownership.acquire_session(client_id)
            return self.ownership.acquire_session(client_id, take_from=take_from)
        except ServerUnavailable:
            raise
        except Exception as exc:
            raise ServerUnavailable(f"ownership of {client_id!r} cannot be established: {exc}") from exc

    def _acquire_restarted(
        self, client_id: str, take_from: str | None, clean_start: bool
    ) -> tuple[str | None, float | None]:
        """``_acquire``, through an owner that is restarting (class docstring): a Clean Start takes
        the id from it at once; otherwise the claim waits until it is back (its live name returned:
        it hands the session over) or has no copy (None), at most ``restart_wait`` seconds. Also
        returns until when the takeover call may be tried again after a wait (``_ask``), else None."""
        try:
            return self._acquire(client_id, take_from), None
        except OwnerRestarting as exc:
            if clean_start:
                log.info("takeover_from_restarting", extra={"client_id": client_id, "owner": exc.owner})
                return self._acquire(client_id, exc.owner), None
            restarting = exc
        log.info(
            "claim_waits_for_restart",
            extra={"client_id": client_id, "owner": restarting.owner, "timeout": self.restart_wait},
        )
        deadline = time.monotonic() + self.restart_wait
        while time.monotonic() < deadline:
            gevent.sleep(RESTART_POLL)  # this connection's greenlet: the worker's others run on
            try:
                return self._acquire(client_id, take_from), deadline
            except OwnerRestarting as exc:
                restarting = exc
        raise ServerUnavailable(
            f"worker {restarting.owner} owning {client_id!r} is not back from its restart "
            f"within {self.restart_wait:g} s"
        )

    def _died(self, client_id: str, owner: str) -> bool:
        """After a failed takeover call: True once the registry no longer names ``owner`` as the
        live owner of ``client_id`` (a worker killed -9 fails its calls a moment before its process
        is gone), looked at for ``DIED_WAIT`` seconds. Only where owners restart (``restart_wait``):
        elsewhere False at once, the failure is the answer."""
        if not self.restart_wait:
            return False
        deadline = time.monotonic() + DIED_WAIT
        while True:
            try:
                if self.ownership.owned_by(client_id) != owner:
                    return True
            except Exception:
                return False
            if time.monotonic() >= deadline:
                return False
            gevent.sleep(RESTART_POLL)

    def _ask(self, owner: str, payload: bytes, until: float | None) -> bytes:
        """The takeover call to ``owner``. With ``until`` (the owner is back from its restart a
        moment ago: the links to it may not be up yet) a failed call is tried again, after the
        drain, until then (a repeated export returns the same state)."""
        while True:
            try:
                return self.call(owner, TAKEOVER_KIND, payload, self.timeout)
            except Exception:
                if until is None or time.monotonic() >= until:
                    raise
            gevent.sleep(RESTART_POLL)
            if self.drain is not None:
                self.drain(owner, DRAIN_TIMEOUT)

    def claim_session(
        self,
        client_id: str,
        clean_start: bool,
        only_from: str | None = None,
        handed_to: str | None = None,
        exported: bytes | None = None,
    ) -> bytes | None:
        """Own ``client_id``; returns the state its previous owner handed over, or None. With
        ``only_from`` (an adoption asked by that stopping node) the session is taken from that node
        only: owned by any other, the claim is refused (its client lives there now).

        ``handed_to``: this node exported the session to that node a moment ago (its takeover), and
        a client of the id connects here meanwhile. That node writes itself as the owner only at
        the end of its claim, so the registry may still name this node: taken as ours, the session
        would start anew here while that node resumes the handed-over one, two clients live. So
        while the registry names this node, the session is taken back from ``handed_to`` (whose
        export waits for its claim to end), as from any owner.

        ``exported``: the copy of that export (``handed_to``'s). When that node holds no state (its
        claim failed after the export: the reply was lost, or the compare-and-swap failed) it
        answers with what the stand-in forwarded there (``KEPT_MOVED_REPLY``), and the session
        resumes from the copy with those messages, not anew. The claim takes the copy over (the
        caller drops its own): kept (``kept``) when the take-back gets no answer, and stale,
        dropped, when the registry names another node (that node's claim ended: it may have moved
        the session on since, back here even). A claim that fails before asking any node (the
        registry refused: this node's lease lost) raises ``ClaimNotStarted`` and leaves the copy to
        the caller, checked again at the next claim: kept here it would outlive that check (a
        session that ended on that node since came back here).

        A state an earlier claim here kept (``kept``, for ``kept_for`` seconds) is this claim's
        unless the registry names another node than it did when it was kept: the session was
        claimed there since (and may have ended there), so the state is stale and goes."""
        state, kept_named, back_from = self._kept_state(client_id)
        named = ""  # the last node other than this one the registry named (``_keep``)
        # A take-back of ours whose answer was lost: that node still holds what it answered with
        # (``take_kept``): asked again, its copy (the state kept) resumes with those messages.
        reasking = bool(back_from) and state is not None and handed_to is None and only_from is None
        if reasking:
            handed_to, exported, state = back_from, state, None
        self._handed_back.pop(client_id, None)
        self._sent_back.pop(client_id, None)  # a move through here: what went back is not resent
        take_from: str | None = None
        asked = False  # a takeover call went out: its node may have exported and forward here
        carried: list = []  # messages a take-back brought without a state (``KEPT_MOVED_REPLY``)
        copy = exported if handed_to is not None and only_from is None else None
        try:
            for _ in range(self.max_moves + 1):
                owner, back_until = self._acquire_restarted(client_id, take_from, clean_start)
                if kept_named is not None:
                    if owner is not None and owner != kept_named:
                        self._drop_kept(client_id, "claimed elsewhere since")  # (docstring)
                        state = None
                    kept_named = None
                named = owner or named
                taking_back = owner is None and handed_to and take_from is None and only_from is None
                if taking_back:
                    owner = handed_to  # on its way there: take it back from there (docstring)
                elif take_from is None:
                    copy = None  # stale (docstring)
                if owner is None:
                    return self._with_kept_moved(client_id, self._with_queued(client_id, state, carried))
                if only_from is not None and owner != only_from:
                    raise ServerUnavailable(
                        f"{client_id!r} moved to node {owner}: not adopted from {only_from}"
                    )
                if self.drain is not None:
                    self.drain(owner, DRAIN_TIMEOUT)
                token = ""
                if self.markers is not None:
                    self._moves += 1
                    token = f"{self.markers.own}/{time.time_ns()}/{self._moves}"
                asked = True
                try:
                    payload = f"{client_id}\x00{token}" if token else client_id
                    reply = self._ask(owner, payload.encode(), back_until)
                except Exception as exc:
                    if reasking and taking_back:
                        # as before that node answered: the copy resumes without what it holds
                        log.warning(
                            "takeover_take_back_unanswered", extra={"client_id": client_id, "node": owner}
                        )
                        state, copy, take_from = copy, None, owner
                        continue
                    if taking_back:
                        if self._give_back(client_id, owner):
                            handed_to = None
                            continue  # claimed again: waits for its restart
                    elif self._died(client_id, owner):
                        continue  # killed a moment ago: claimed again, through its restart
                    raise ServerUnavailable(
                        f"node {owner} owning {client_id!r} does not answer: {exc}"
                    ) from exc
                if reply and bytes(reply[:4]) == KEPT_MOVED_REPLY:
                    carried.extend(self._carried(client_id, owner, bytes(reply[4:])))
                    if state is None and copy is not None:
                        state = copy  # its claim failed there: the session is the copy here
                        log.warning(
                            "takeover_resumed_from_export",
                            extra={"client_id": client_id, "from_node": owner, "messages": len(carried)},
                        )
                elif reply:
                    if state is not None:
                        log.warning(
                            "takeover_state_replaced", extra={"client_id": client_id, "from_node": owner}
                        )
                    state = bytes(reply)
                    took = self._took_from
                    took.pop(client_id, None)
                    took[client_id] = (owner, token)
                    if len(took) > self.max_kept:  # imports that never ended (an exception)
                        del took[next(iter(took))]
                elif reasking and state is None:
                    state = copy  # nothing there any more (its 30 s over): the copy resumes
                copy = None  # answered: used, or replaced by what that node held
                take_from = owner
            raise ServerUnavailable(f"ownership of {client_id!r} kept moving ({self.max_moves} takeovers)")
        except ServerUnavailable as exc:
            self._took_from.pop(client_id, None)
            back_from = ""
            if not asked:
                if reasking:  # nothing moved: kept as it was
                    state, named, back_from = copy, kept_named or "", handed_to
                copy = None  # nothing moved: the caller keeps its copy (ClaimNotStarted below)
            elif state is None and copy is not None:
                # the take-back did not get an answer: resumed at the next claim here, which asks
                # that node again for what it answered with
                state, back_from = copy, handed_to or ""
            if state is not None:
                self._keep(client_id, self._with_queued(client_id, state, carried), named, back_from)
            if asked:
                kept = self._kept_moved(client_id)  # what its stand-in forwards here until the retry
                if state is None:
                    kept.extend(carried)
            elif exported is not None and not reasking and not isinstance(exc, ClaimNotStarted):
                raise ClaimNotStarted(str(exc)) from exc
            raise

    def _kept_moved(self, client_id: str) -> list:
        """The messages kept for ``client_id`` from a failed claim's move (a new, empty entry
        unless one is still there), the expired entries and the oldest past ``max_kept`` dropped."""
        kept_moved = self.kept_moved
        now = self.clock()
        entry = kept_moved.get(client_id)
        if entry is None or entry[0] < now:
            kept_moved.pop(client_id, None)
            entry = kept_moved[client_id] = (now + self.kept_for, [])
        while kept_moved:
            first = next(iter(kept_moved))
            if kept_moved[first][0] >= now and len(kept_moved) <= self.max_kept:
                break
            del kept_moved[first]
        return entry[1]

    def _with_kept_moved(self, client_id: str, state: bytes | None) -> bytes | None:
        """``state`` (a claim's result) with what the stand-in of a failed claim's move forwarded
        here since (``keep_moved``) queued after its own messages; dropped (logged) with no state."""
        until, queued = self.kept_moved.pop(client_id, (0.0, None))
        if not queued or until < self.clock():
            return state
        return self._with_queued(client_id, state, queued)

    @staticmethod
    def _with_queued(client_id: str, state: bytes | None, queued: list) -> bytes | None:
        """``state`` with ``queued`` (QueuedState) after its own queued messages; with no state they
        are dropped (logged)."""
        if not queued:
            return state
        if state is None:
            log.warning("moved_messages_dropped", extra={"client_id": client_id, "messages": len(queued)})
            return state
        decoded = decode_session_state(state)
        decoded.queued.extend(queued)
        return encode_session_state(decoded)

    def _give_back(self, client_id: str, owner: str) -> bool:
        """A take-back whose node does not answer (a worker killed -9, restarting): the id was
        acquired here only to take the session back, and this node holds no copy of it. Left
        ours, the restarted node would drop its restored copy as taken by another (and what this
        node had queued for it would reach it after the copy left); released, it keeps its copy
        and the client's next claim takes it over from there, after the drain. Where the registry
        can name the restarting ``owner`` again (``give_to``) it does, and True: the claim goes on,
        waiting for that restart (a retry before it would find the id nobody's: a fresh
        session)."""
        give_to = getattr(self.ownership, "give_to", None)
        try:
            if give_to is not None and give_to(client_id, owner):
                return True
            self.ownership.release_session(client_id)
        except Exception as exc:  # the claim fails anyway (0x88): the registry's trouble is logged
            log.warning("takeover_release_failed", extra={"client_id": client_id, "error": str(exc)})
        return False

    def moving_in(self, client_id: str):
        """The move the last claim of ``client_id`` took its state from, for the import
        (``fluxmq.cluster.markers.MoveIn``), or None (no markers, no token)."""
        took = self._took_from.get(client_id)
        if took is None or self.markers is None or not took[1]:
            return None
        return self.markers.move_in(took[1], took[0])

    def moved_in(self, client_id: str) -> None:
        """The state the last claim of ``client_id`` took is imported here, its interest sent:
        every peer is asked, behind that interest in its stream, to mark its streams to both nodes
        (``fluxmq.cluster.markers``). Never blocks."""
        took = self._took_from.pop(client_id, None)
        if took is not None and self.markers is not None and took[1]:
            self.markers.move_in(took[1], took[0]).announce()

    def move_discarded(self, client_id: str) -> None:
        """The state the last claim of ``client_id`` took was discarded (Clean Start): its move is
        forgotten, nothing announced (the old owner's stand-in ends after its grace)."""
        self._took_from.pop(client_id, None)

    def handed_over(self, client_id: str) -> None:
        """This node handed the session of ``client_id`` over to another (``takeover_handler``): the
        registry stops counting it as this node's (``forget_session``, when it keeps such a list:
        the taking node moves the ownership itself)."""
        forget = getattr(self.ownership, "forget_session", None)
        if forget is not None:
            forget(client_id)

    def take_kept(self, client_id: str, to_node: str | None = None) -> bytes | None:
        """The state a failed claim keeps for ``client_id``, taken out (another node's takeover
        asks for a session this node has only kept: ``takeover_handler``); with no state, what the
        claim kept of its move (``KEPT_MOVED_REPLY``), and what still comes of it goes to
        ``to_node`` (``pass_back``). What went to ``to_node`` in such an answer goes again in the
        next (``_sent_back``)."""
        state = self._kept_state(client_id)[0]
        if state is not None:
            log.warning("takeover_state_kept_handed_over", extra={"client_id": client_id})
            self._sent_back.pop(client_id, None)
            return self._with_kept_moved(client_id, state)
        until, queued = self.kept_moved.get(client_id, (0.0, None))
        sent = self._sent_back.pop(client_id, None)
        if queued is None or until < self.clock():
            self.kept_moved.pop(client_id, None)
            return None
        # A claim failed here after its takeover call, with no state (the reply was lost): the
        # asking node (the one the registry still names) holds the copy of its export and resumes
        # it; what its stand-in forwarded here goes back with the answer, not dropped. The entry
        # stays, empty: if this answer is lost too, the asker's retry still resumes its copy, and
        # asks here again (``claim_session``'s ``back_from``: only then, so never twice received)
        # for what this answer carried, kept until then.
        self.kept_moved[client_id] = (until, [])
        now = self.clock()
        if sent is not None and sent[1] == to_node and sent[0] >= now:
            queued = sent[2] + queued  # (twice ``max_kept_moved`` at most)
        if to_node:
            handed_back = self._handed_back
            handed_back.pop(client_id, None)
            handed_back[client_id] = (until, to_node)
            while len(handed_back) > self.max_kept:
                del handed_back[next(iter(handed_back))]
            if queued:
                sent_back = self._sent_back
                sent_back[client_id] = (until, to_node, queued)
                while len(sent_back) > self.max_kept or sent_back[next(iter(sent_back))][0] < now:
                    del sent_back[next(iter(sent_back))]
        log.warning("moved_messages_handed_back", extra={"client_id": client_id, "messages": len(queued)})
        return KEPT_MOVED_REPLY + encode_session_state(SessionState(client_id, queued=queued))

    def pass_back(self, blob: bytes) -> bytes | None:
        """``session.moved`` messages (``blob``) for a client id whose session a take-back took
        from here with what this node kept of its move (``take_kept``): sent on to that node, whose
        reply is returned; None (delivered here as any) otherwise. A stand-in's send that was on its
        way when this node answered the take-back reaches the session, not the kept entry here. An
        answer of no delivery there (the session left it again, or its claim failed: its stand-in
        sends them back here) or a failed call ends the passing on."""
        handed_back = self._handed_back
        if not handed_back:
            return None
        try:
            client_id = decode_session_state(blob).client_id
        except SessionStateError:
            return None
        entry = handed_back.get(client_id)
        if entry is None:
            return None
        if entry[0] < self.clock():
            del handed_back[client_id]
            return None
        try:
            reply = bytes(self.call(entry[1], MOVED_KIND, blob, MOVED_TIMEOUT))
        except Exception as exc:
            handed_back.pop(client_id, None)
            log.warning(
                "moved_pass_back_failed",
                extra={"client_id": client_id, "to_node": entry[1], "error": str(exc)},
            )
            return None
        if reply in (b"", b"0"):
            handed_back.pop(client_id, None)
        return reply

    @staticmethod
    def _carried(client_id: str, node: str, blob: bytes) -> list:
        """The messages of a ``KEPT_MOVED_REPLY`` (after its prefix); none (logged) when damaged."""
        try:
            state = decode_session_state(blob)
        except SessionStateError as exc:
            log.warning(
                "moved_messages_refused", extra={"client_id": client_id, "from_node": node, "error": str(exc)}
            )
            return []
        if state.client_id != client_id:
            log.warning("moved_messages_refused", extra={"client_id": client_id, "from_node": node})
            return []
        return state.queued

    def keep_moved(self, client_id: str, queued: list) -> bool:
        """Messages the session's previous node forwarded here after handing it over, when this
        node's claim then failed (``Broker.deliver_moved``): kept (``kept_moved``) and queued after
        the own messages of the state the next claim here returns, or that a take-back takes: the
        kept state, or the previous node's copy of its export when the client's retry asks it
        again (its reply was lost, or the compare-and-swap failed). False when no claim of
        ``client_id`` failed here after its takeover call."""
        if client_id not in self.kept_moved and client_id not in self.kept:
            return False
        kept = self._kept_moved(client_id)
        room = self.max_kept_moved - len(kept)
        if room < len(queued):
            log.warning(
                "moved_messages_dropped",
                extra={"client_id": client_id, "messages": len(queued) - max(room, 0), "reason": "bound"},
            )
        kept.extend(queued[: max(room, 0)])
        return True

    def _keep(self, client_id: str, state: bytes, named: str, back_from: str = "") -> None:
        """Keep ``state`` for the next claim of ``client_id`` here, for ``kept_for`` seconds, while
        the registry names ``named`` ("": this node or none) or no node (``_kept_state``); that
        claim takes it back from ``back_from`` again (a take-back whose answer was lost)."""
        self._kept_state(client_id)  # (its bytes out of the count)
        now = self.clock()
        self.kept[client_id] = (now + self.kept_for, state, named, back_from)
        self.kept_bytes += len(state)
        self._prune_kept(now)
        log.warning(
            "takeover_state_kept",
            extra={"client_id": client_id, "effect": "returned to the client's next claim on this node"},
        )

    def kept_states(self) -> int:
        """How many states failed claims keep here (the expired ones dropped first)."""
        self._prune_kept(self.clock())
        return len(self.kept)

    def _kept_state(self, client_id: str) -> tuple[bytes | None, str | None, str]:
        """The state a failed claim keeps for ``client_id``, taken out, the node the registry
        named then ("": this node or none) and ``_keep``'s ``back_from``; (None, None, "") with
        none or an expired one (dropped)."""
        self._prune_kept(self.clock())
        entry = self.kept.pop(client_id, None)
        if entry is None:
            return None, None, ""
        self.kept_bytes -= len(entry[1])
        return entry[1:]

    def _prune_kept(self, now: float) -> None:
        """Oldest first: drop the kept states past ``kept_for`` or over the count and byte bounds."""
        kept = self.kept
        while kept:
            first = next(iter(kept))
            until, state = kept[first][:2]
            if until >= now and len(kept) <= self.max_kept and self.kept_bytes <= self.max_kept_bytes:
                break
            del kept[first]
            self.kept_bytes -= len(state)
            self._drop_kept(first, "expired" if until < now else "bound")

    def _drop_kept(self, client_id: str, reason: str) -> None:
        """A kept state (out of ``kept``) not used: counted and logged."""
        self.kept_dropped += 1
        log.warning("takeover_state_dropped", extra={"client_id": client_id, "reason": reason})

    def release_session(self, client_id: str) -> None:
        """Give up ownership of ``client_id`` (the registry deletes it only if this node owns it)."""
        self.ownership.release_session(client_id)
