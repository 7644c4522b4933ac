"""The stand-in of a session that moved to another node (``fluxmq.broker.moved.MovedSession``):
what it holds for its send is bounded, and what it sends arrives in order; with a move's markers, it forwards only what came from a node
whose marker had not arrived, and the taking node's gate gives the session only the rest."""

from __future__ import annotations

import gevent

from fluxmq.broker import moved
from fluxmq.broker.message import Message
from fluxmq.broker.moved import MovedSession
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
