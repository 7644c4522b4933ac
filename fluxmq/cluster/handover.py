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
* When the taking node has imported the session and every peer applied its interest
  (``ClusterSessions.moved_in``, ``ClusterTransport.interest_applied``), it drains its link to
  the old owner and calls it with ``session.moved.done``: the old owner withdraws the stand-in's
  interest (``Broker.withdraw_moved``), has every other peer drain its link to it (``link.drain``),
  and then ends the stand-in (``Broker.end_moved``) instead of waiting out its grace. A QoS 1/2 message then reaches the session twice only when published in those few
  milliseconds (the peers send it to both nodes). If a peer is unreachable or a call fails, the
  stand-in lasts its whole grace.
* ``serve_handover(transport, broker)`` installs these handlers.
* ``ClusterSessions`` implements ``Peers.claim_session`` / ``release_session`` over an ownership
  registry (``acquire_session(client_id, take_from=None) -> previous owner | None``,
  ``release_session(client_id)``: etcd, ``fluxmq.cluster.metadata``) and a control RPC
  (``call(node_id, kind, payload, timeout) -> bytes``: gRPC, ``fluxmq.cluster.transport``).

A takeover, with client C connecting to node B while node A owns its session::

    B: acquire_session(C)             -> "A"        (A stays owner)
    B: call("A", "session.takeover", C)              A: export_session(C): DISCONNECT 0x8E to the
                                                        old connection, state out of A, no will
    B: acquire_session(C, take_from="A") -> None     (CAS A -> B)
    B: import_session, CONNACK session_present=1
    A: (until B says done, at most Broker.moved_forward_for seconds) what matches C's QoS 1/2
       subscriptions here: call("B", "session.moved", messages) -> B: deliver_moved: to C only
    B: (every peer applied B's interest) drain(A), call("A", "session.moved.done", C)
    A: withdraw_moved(C, B); every other peer P: call(P, "link.drain") (P's link to A applied)
    A: end_moved(C, B)
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import gevent

from fluxmq.broker.session_state import (
    SessionState,
    SessionStateError,
    decode_session_state,
    encode_session_state,
)
from fluxmq.errors import ServerUnavailable, StorageError

log = logging.getLogger("fluxmq.cluster.handover")

#: control RPC kind of a takeover request
TAKEOVER_KIND = "session.takeover"
#: control RPC kind of the messages a moved session's previous node forwards to it
MOVED_KIND = "session.moved"
#: seconds a forward of moved messages may take
MOVED_TIMEOUT = 5.0
#: control RPC kind: the taking node tells the old owner its interest is known (payload client id)
MOVED_DONE_KIND = "session.moved.done"
#: control RPC kind: "what you queued for me so far, have it applied here" (the caller's link)
LINK_DRAIN_KIND = "link.drain"
#: seconds the taking node waits for the peers to apply its interest before it says done
INTEREST_TIMEOUT = 2.0
#: seconds the answering node waits for the commit that removes the session from its store
COMMIT_TIMEOUT = 2.0
#: seconds a claiming node waits for the owner to apply what it forwarded there before the claim
DRAIN_TIMEOUT = 0.5

__all__ = [
    "LINK_DRAIN_KIND",
    "MOVED_DONE_KIND",
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
    broker, call: Callable[[str, str, bytes, float], bytes] | None = None
) -> Callable[[str, bytes], bytes]:
    """The transport handler of ``session.takeover`` for ``broker``: ``fn(from_node, payload)``
    exports the session named by ``payload`` and returns its state (``b""``: no such session).
    With ``call`` (the transport's) what still reaches this node for the session afterwards is
    forwarded to ``from_node`` for a few seconds (``Broker.export_session``'s ``send``)."""

    def handle(from_node: str, payload: bytes) -> bytes:
        try:
            client_id = bytes(payload).decode()
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

            state = broker.export_session(client_id, from_node, send)
        if state:
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


def moved_handler(broker) -> Callable[[str, bytes], bytes]:
    """The transport handler of ``session.moved``: the messages a session's previous node forwards
    for it, delivered to that session only (``Broker.deliver_moved``)."""

    def handle(from_node: str, payload: bytes) -> bytes:
        try:
            n = broker.deliver_moved(bytes(payload))
        except SessionStateError as exc:
            log.warning("moved_messages_refused", extra={"from_node": from_node, "error": str(exc)})
            return b""
        return str(n).encode()

    return handle


def moved_done_handler(broker, transport) -> Callable[[str, bytes], bytes]:
    """The transport handler of ``session.moved.done`` (from the node that took the session):
    once every other peer has drained its link to this node, the stand-in ends; answered at once."""

    def finish(to_node: str, client_id: str) -> None:
        others = [n for n in transport.links if n != to_node]
        if not all(transport.links[n].connected for n in others if n in transport.links):
            return  # a peer may send what it queued here later: the stand-in lasts its grace
        # Every peer sends to ``to_node`` already: the interest goes now (fewer copies sent to both
        # nodes meanwhile); the stand-in forwards what was queued here before, until the drains.
        if not broker.withdraw_moved(client_id, to_node):
            return
        calls = [gevent.spawn(transport.call, n, LINK_DRAIN_KIND, b"", DRAIN_TIMEOUT + 1.0) for n in others]
        gevent.joinall(calls, timeout=DRAIN_TIMEOUT + 2.0)
        if all(g.successful() and g.value == b"1" for g in calls):
            broker.end_moved(client_id, to_node)

    def handle(from_node: str, payload: bytes) -> bytes:
        try:
            client_id = bytes(payload).decode()
        except UnicodeDecodeError:
            return b""
        gevent.spawn(finish, from_node, client_id)
        return b""

    return handle


def serve_handover(transport, broker) -> None:
    """Serve ``session.takeover`` (with the forwarding of what reaches the old node afterwards),
    ``session.moved``, ``session.moved.done`` and ``link.drain`` for ``broker`` on ``transport``."""
    transport.handle(TAKEOVER_KIND, takeover_handler(broker, transport.call))
    transport.handle(MOVED_KIND, moved_handler(broker))
    transport.handle(MOVED_DONE_KIND, moved_done_handler(broker, transport))
    transport.handle(
        LINK_DRAIN_KIND,
        lambda from_node, _payload: b"1" if transport.drain(from_node, DRAIN_TIMEOUT) else b"",
    )


class ClusterSessions:
    """``Peers.claim_session`` and ``release_session`` over an ownership registry and an RPC.

    ``claim_session`` makes this node the owner of a client id: when another live node owns it,
    that node hands the state over (its connection closed first), then ownership moves with a
    compare-and-swap from that node. If ownership moved elsewhere meanwhile (a race with a third
    node), the new owner is asked in turn, at most ``max_moves`` times. Any failure of the registry
    or of the owner to answer raises ServerUnavailable (CONNACK 0x88; the client retries).
    """

    def __init__(
        self,
        ownership,
        call: Callable[[str, str, bytes, float], bytes],
        timeout: float = 5.0,
        max_moves: int = 3,
        max_kept: int = 10000,
        drain: Callable[[str, float], object] | None = None,
        interest_applied: Callable[[float], bool] | None = None,
    ) -> None:
        self.ownership = ownership
        self.call = call
        # (node_id, timeout): wait until what this node forwarded to ``node_id`` so far is applied
        # there, so the state it hands over holds the messages published here before the claim
        self.drain = drain
        # (timeout) -> every peer applied every interest change of this node so far (True), so that
        # a moved session's previous owner may stop forwarding; None: not checked
        self.interest_applied = interest_applied
        self.timeout = timeout
        self.max_moves = max_moves
        # States handed over to a claim that then failed (the registry refused or moved on): the
        # previous owner gave them up already, so they are kept for the client's next claim here
        # (a client refused with 0x88 retries) rather than lost. Bounded; the oldest goes first.
        self.kept: dict[str, bytes] = {}
        self.max_kept = max_kept
        # client id -> the node whose state the last claim took (its stand-in forwards to here
        # until ``moved_in`` tells it to stop)
        self._took_from: dict[str, str] = {}

    def _acquire(self, client_id: str, take_from: str | None) -> str | None:
        try:
            if take_from is None:
                return self.ownership.acquire_session(client_id)
            return self.ownership.acquire_session(client_id, take_from=take_from)
        except ServerUnavailable:
            raise
        except Exception as exc:
            raise ServerUnavailable(f"ownership of {client_id!r} cannot be established: {exc}") from exc

    def claim_session(self, client_id: str, clean_start: bool, only_from: str | None = None) -> bytes | None:
        """Own ``client_id``; returns the state its previous owner handed over, or None. With
        ``only_from`` (an adoption asked by that stopping node) the session is taken from that node
        only: owned by any other, the claim is refused (its client lives there now)."""
        state = self.kept.pop(client_id, None)
        take_from: str | None = None
        try:
            for _ in range(self.max_moves + 1):
                owner = self._acquire(client_id, take_from)
                if owner is None:
                    return state
                if only_from is not None and owner != only_from:
                    raise ServerUnavailable(
                        f"{client_id!r} moved to node {owner}: not adopted from {only_from}"
                    )
                if self.drain is not None:
                    self.drain(owner, DRAIN_TIMEOUT)
                try:
                    reply = self.call(owner, TAKEOVER_KIND, client_id.encode(), self.timeout)
                except Exception as exc:
                    raise ServerUnavailable(
                        f"node {owner} owning {client_id!r} does not answer: {exc}"
                    ) from exc
                if reply:
                    if state is not None:
                        log.warning(
                            "takeover_state_replaced", extra={"client_id": client_id, "from_node": owner}
                        )
                    state = bytes(reply)
                    took = self._took_from
                    took.pop(client_id, None)
                    took[client_id] = owner
                    if len(took) > self.max_kept:  # claims whose state was discarded (Clean Start)
                        del took[next(iter(took))]
                take_from = owner
            raise ServerUnavailable(f"ownership of {client_id!r} kept moving ({self.max_moves} takeovers)")
        except ServerUnavailable:
            self._took_from.pop(client_id, None)
            if state is not None:
                self._keep(client_id, state)
            raise

    def moved_in(self, client_id: str) -> None:
        """The state the last claim of ``client_id`` took is imported here, its interest known to
        the peers: tell its previous node, once what this node queued for it is applied there, that
        its stand-in may end (in a greenlet of its own; a failure leaves the stand-in its grace)."""
        owner = self._took_from.pop(client_id, None)
        if owner is not None:
            gevent.spawn(self._moved_done, client_id, owner)

    def _moved_done(self, client_id: str, owner: str) -> None:
        # Every peer sends what matches the session here now (or the stand-in lasts its grace),
        # and what this node queued for the old owner before is applied there.
        if self.interest_applied is not None and not self.interest_applied(INTEREST_TIMEOUT):
            return
        if self.drain is not None and not self.drain(owner, DRAIN_TIMEOUT):
            return
        try:
            self.call(owner, MOVED_DONE_KIND, client_id.encode(), self.timeout)
        except Exception as exc:
            log.info("moved_done_failed", extra={"client_id": client_id, "node": owner, "error": str(exc)})

    def _keep(self, client_id: str, state: bytes) -> None:
        kept = self.kept
        kept[client_id] = state
        while len(kept) > self.max_kept:
            dropped = next(iter(kept))
            del kept[dropped]
            log.warning("takeover_state_dropped", extra={"client_id": dropped, "reason": "max_kept"})
        log.warning(
            "takeover_state_kept",
            extra={"client_id": client_id, "effect": "returned to the client's next claim on this node"},
        )

    def release_session(self, client_id: str) -> None:
        """Give up ownership of ``client_id`` (the registry deletes it only if this node owns it)."""
        self.ownership.release_session(client_id)
