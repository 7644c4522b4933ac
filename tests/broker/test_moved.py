"""The stand-in of a session that moved to another node (``fluxmq.broker.moved.MovedSession``):
what it holds for its send is bounded, and what it sends arrives in order; with a move's markers, it forwards only what came from a node
whose marker had not arrived, and the taking node's gate gives the session only the rest."""

from __future__ import annotations

import gevent

from fluxmq.broker import moved
from fluxmq.broker.message import Message
from fluxmq.broker.moved import MovedSession, MoveMarks, passes
from fluxmq.broker.session_state import decode_session_state


def test_a_stand_in_holds_at_most_max_queued_messages_and_counts_the_rest_dropped(monkeypatch) -> None:
    """Past ``MAX_QUEUED`` messages waiting for the send, the next ones are dropped and counted
    (memory stays bounded while the taking node is slow); what was kept is sent whole, in order."""
    monkeypatch.setattr(moved, "MAX_QUEUED", 5)
    sent: list[bytes] = []
    stand_in = MovedSession("c1", None, "n2", sent.append)
    for i in range(8):  # no yield: the sender greenlet has not run yet
        stand_in.deliver(Message("t", str(i).encode(), 1), 1, False, None)
    assert stand_in.dropped == 3
    gevent.sleep(0)  # the sender runs
    assert stand_in.forwarded == 5
    payloads = [q.message.payload for blob in sent for q in decode_session_state(blob).queued]
    assert payloads == [b"0", b"1", b"2", b"3", b"4"]
    stand_in.deliver(Message("t", b"5", 1), 1, False, None)  # room again once sent
    gevent.sleep(0)
    assert stand_in.forwarded == 6 and stand_in.dropped == 3


def test_a_stand_in_with_a_higher_limit_holds_more_and_sends_max_queued_per_call(monkeypatch) -> None:
    """A stand-in holds as many messages as its ``limit`` (the session's queue bound,
    ``Broker.moved_max_queued``), above ``MAX_QUEUED``, and sends them ``MAX_QUEUED`` per call at
    most, in order."""
    monkeypatch.setattr(moved, "MAX_QUEUED", 5)
    sent: list[bytes] = []
    stand_in = MovedSession("c1", None, "n2", sent.append, limit=20)
    for i in range(12):  # no yield: a stalled node's backlog at once
        stand_in.deliver(Message("t", str(i).encode(), 1), 1, False, None)
    assert stand_in.dropped == 0
    gevent.sleep(0)
    batches = [[q.message.payload for q in decode_session_state(blob).queued] for blob in sent]
    assert [len(b) for b in batches] == [5, 5, 2] and stand_in.forwarded == 12
    assert [p for b in batches for p in b] == [str(i).encode() for i in range(12)]


def test_a_gate_passes_what_came_after_its_origins_marker_and_what_only_this_node_had() -> None:
    """The taking node ("B") gives the session its own messages, and a peer's once that peer's
    marker is in; a session back on its earlier node before that move's markers were all in also
    gets a peer's messages from before the peer's marker of the earlier move (only this node had
    them: its stand-in would have forwarded them)."""
    marks = MoveMarks("t2", {"A", "P"})
    assert passes("B", "B", marks, None) and not passes("P", "B", marks, None)
    marks.mark("P")
    assert passes("P", "B", marks, None) and not passes("A", "B", marks, None)
    before = MoveMarks("t1", {"A", "B", "P"})  # the earlier move's marks, here
    back = MoveMarks("t2", {"B", "P"})
    assert passes("P", "A", back, before)  # P had not switched for the earlier move
    before.mark("P")
    assert not passes("P", "A", back, before)  # P sent it to B too: B's stand-in forwards it
    back.mark("P")
    assert passes("P", "A", back, before)


def test_a_stand_in_of_a_still_gated_session_forwards_only_what_its_gate_would_have_given() -> None:
    """A session that moves on before its gate opened: what its gate would have held (the node
    before forwards it) is not forwarded by its new stand-in either; what that node forwards is."""
    sent: list[bytes] = []
    origin = ["P"]
    gate_marks = MoveMarks("t1", {"A", "P"})

    class Gate:
        def passes(self, node):
            return passes(node, "B", gate_marks, None)

    stand_in = MovedSession(
        "c1", None, "C", sent.append, MoveMarks("t2", {"A", "B", "C", "P"}), lambda: origin[0], Gate()
    )
    stand_in.deliver(Message("t", b"held", 1), 1, False, None)
    gate_marks.mark("P")
    stand_in.deliver(Message("t", b"p", 1), 1, False, None)
    stand_in.forward(Message("t", b"from-A", 1))
    stand_in.marks.mark("P")
    stand_in.deliver(Message("t", b"p-after", 1), 1, False, None)
    gevent.sleep(0)
    assert [q.message.payload for blob in sent for q in decode_session_state(blob).queued] == [
        b"p",
        b"from-A",
    ]
    assert stand_in.skipped == 2
