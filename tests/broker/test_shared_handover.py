"""Shared-subscription hand-over (Broker._hand_over_shared via close_session, Session.take_unfinished,
Router.pick_member exclude) with the in-memory storage and recording deliveries."""

from __future__ import annotations

import time
from pathlib import Path

import gevent
import pytest

from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.broker.message import Message
from fluxmq.broker.session import Session, SessionLimits
from fluxmq.broker.stats import BrokerStats
from tests.broker.test_session import RecordingDelivery
from tests.storage.lmdb_node import Node


@pytest.fixture
def node(tmp_path: Path):
    n = Node(tmp_path / "data")
    yield n
    n.storage.abort()


def online(
    broker: Broker, client_id: str, expiry: int = 0, quota: int = 10
) -> tuple[Session, RecordingDelivery]:
    session, _ = broker.open_session(client_id, True, expiry)
    d = RecordingDelivery()
    broker.attach(session, d, quota)
    return session, d


def test_take_unfinished_keeps_sent_qos2_and_unclaimed() -> None:
    s = Session("c", SessionLimits(max_inflight=2), BrokerStats())
    d = RecordingDelivery()
    s.attach(d, 2)
    m1, m2, m3, m4 = (Message(f"t/{i}", b"x", q) for i, q in ((1, 1), (2, 2), (3, 1), (4, 2)))
    for m in (m1, m2, m3, m4):
        s.deliver(m, m.qos, False, None)  # m1, m2 in flight; m3, m4 queued
    taken = s.take_unfinished(lambda m: "other" if m is not m3 else None)
    assert [m for m, _ in taken] == [m1, m4]
    assert [e.message for e in s.inflight.values()] == [m2]  # QoS 2 already sent stays [MQTT-4.8.2-5]
    assert [item[0] for item in s.queue] == [m3]
    assert s.queue_bytes == len(m3.payload) + len(m3.topic)


def test_offline_member_hands_unacked_qos1_to_an_online_member() -> None:
    broker = Broker(BrokerSettings())
    a, da = online(broker, "a", expiry=60)
    b, db = online(broker, "b")
    for s in (a, b):
        broker.subscribe(s, "$share/g/t", 1)
    for i in range(4):
        broker.publish(Message("t", str(i).encode(), 1))
    assert len(da.sent) == len(db.sent) == 2
    broker.close_session(a, da, publish_will=False)
    assert len(db.sent) == 4 and not a.inflight
    assert broker.sessions["a"] is a  # the persistent session itself stays


def test_nothing_moves_while_no_other_member_is_online_for_a_continuing_session() -> None:
    broker = Broker(BrokerSettings())
    a, da = online(broker, "a", expiry=60)
    b, db = online(broker, "b", expiry=60)
    for s in (a, b):
        broker.subscribe(s, "$share/g/t", 1)
    broker.close_session(b, db, publish_will=False)
    broker.publish(Message("t", b"x", 1))
    broker.close_session(a, da, publish_will=False)
    assert len(a.inflight) == 1 and not b.queue


def test_ending_session_hands_over_even_to_an_offline_member() -> None:
    broker = Broker(BrokerSettings())
    a, da = online(broker, "a")
    b, db = online(broker, "b", expiry=60)
    for s in (a, b):
        broker.subscribe(s, "$share/g/t", 1)
    broker.close_session(b, db, publish_will=False)
    broker.publish(Message("t", b"x", 1))
    assert len(da.sent) == 1
    broker.close_session(a, da, publish_will=False)  # expiry 0: the session ends
    assert "a" not in broker.sessions and len(b.queue) == 1


def test_message_also_got_through_an_own_subscription_stays() -> None:
    broker = Broker(BrokerSettings())
    a, da = online(broker, "a", expiry=60)
    b, db = online(broker, "b")
    broker.subscribe(a, "$share/g/t", 1)
    broker.subscribe(a, "t", 1)
    broker.subscribe(b, "$share/g/t", 1)
    broker.publish(Message("t", b"x", 1))
    before = len(db.sent)
    broker.close_session(a, da, publish_will=False)
    assert len(db.sent) == before and a.inflight


def test_pick_member_exclude() -> None:
    broker = Broker(BrokerSettings())
    a, _ = online(broker, "a")
    b, _ = online(broker, "b")
    for s in (a, b):
        broker.subscribe(s, "$share/g/t", 1)
    (group,) = broker.router.route("t").groups
    assert {broker.router.pick_member(group, exclude=a).session for _ in range(4)} == {b}


# -- a persistent member's long queue: handed over in bounded steps (real LMDB) -------------------

QUEUED = 1000
CHUNK = 100


def persistent_member_with_queue(node: Node, chunk: int = CHUNK):
    """``a`` (persistent, online but congested) holds QUEUED messages t/0.. on its disk queue and
    ``b`` (persistent, online, a wide window) is the other member of group g."""
    broker = node.broker
    broker.hand_over_chunk = chunk
    a, da, _ = node.connect("a", 3600)
    da.congested = True
    broker.subscribe(a, "$share/g/t/#", 1)
    for i in range(QUEUED):
        broker.publish(Message(f"t/{i}", b"x", 1))
    node.storage.commit()
    assert len(a.queue) == QUEUED
    b, db, _ = node.connect("b", 3600)
    broker.subscribe(b, "$share/g/t/#", 1)
    b.send_quota = 65535  # takes everything at once, so what it got is db.sent
    node.storage.commit()
    return a, da, b, db


def wait_hand_over_done(broker: Broker, session: Session, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while session in broker.hand_overs and time.monotonic() < deadline:
        gevent.sleep(0.005)
    assert session not in broker.hand_overs, "hand-over still running"


def test_persistent_members_queue_is_handed_over_in_bounded_steps_each_message_once(node: Node) -> None:
    broker = node.broker
    a, da, b, db = persistent_member_with_queue(node)
    broker.close_session(a, da, publish_will=False)
    # The disconnect itself moves at most one chunk; the rest follows a chunk per loop turn.
    assert len(db.sent) <= CHUNK
    hand_over = broker.hand_overs[a]
    wait_hand_over_done(broker, a)
    node.storage.commit()
    assert hand_over.largest_step <= CHUNK and hand_over.turns >= QUEUED // CHUNK
    assert [sent[0] for sent in db.sent] == [f"t/{i}" for i in range(QUEUED)]  # each once, in order
    assert len(a.queue) == 0 and a.queue_bytes == 0


def test_messages_that_stay_are_not_rewritten(node: Node, monkeypatch) -> None:
    """No other member online: nothing moves, and the member's disk queue is not popped and
    re-appended (Session.take_unfinished did that to every entry)."""
    broker = node.broker
    a, da, b, db = persistent_member_with_queue(node)
    node.disconnect(b, db)
    writes = []
    for op in ("queue_append", "queue_pop"):
        real = getattr(node.storage, op)
        monkeypatch.setattr(
            node.storage, op, lambda *args, _real=real, _op=op: (writes.append(_op), _real(*args))
        )
    broker.close_session(a, da, publish_will=False)
    if hasattr(broker, "hand_overs"):
        wait_hand_over_done(broker, a)
    assert writes == []
    assert len(a.queue) == QUEUED


def test_reconnecting_member_stops_its_hand_over_and_keeps_the_rest(node: Node) -> None:
    broker = node.broker
    a, da, b, db = persistent_member_with_queue(node)
    broker.close_session(a, da, publish_will=False)
    gevent.sleep(0.005)  # let a chunk or two go
    a2, present = broker.open_session("a", False, 3600)
    assert present and a not in broker.hand_overs
    moved = len(db.sent)
    assert 0 < moved < QUEUED
    da2 = RecordingDelivery()
    broker.attach(a2, da2, 65535)
    gevent.sleep(0.02)
    assert len(db.sent) == moved  # nothing more left a after it came back
    got = [sent[0] for sent in db.sent] + [sent[0] for sent in da2.sent]
    assert sorted(got) == sorted(f"t/{i}" for i in range(QUEUED))  # each once, to one of them


def test_member_session_ending_mid_hand_over_hands_the_rest_at_once(node: Node) -> None:
    broker = node.broker
    a, da, b, db = persistent_member_with_queue(node)
    broker.close_session(a, da, publish_will=False)
    assert a in broker.hand_overs
    broker.open_session("a", True, 0)  # clean start: the old session ends
    assert a not in broker.hand_overs
    assert sorted(sent[0] for sent in db.sent) == sorted(f"t/{i}" for i in range(QUEUED))


def test_ending_members_queue_is_handed_over_in_bounded_steps_then_the_session_ends(node: Node) -> None:
    """Session Expiry 0 at the disconnect (or the expiry timer): the session ends, but only after its
    messages went to the other member a chunk per loop turn."""
    broker = node.broker
    a, da, b, db = persistent_member_with_queue(node)
    a.expiry_interval = 0  # what a DISCONNECT with Session Expiry Interval 0 sets
    broker.close_session(a, da, publish_will=False)
    assert len(db.sent) <= CHUNK
    hand_over = broker.hand_overs[a]
    wait_hand_over_done(broker, a)
    assert hand_over.largest_step <= CHUNK and hand_over.ending
    assert [sent[0] for sent in db.sent] == [f"t/{i}" for i in range(QUEUED)]
    assert "a" not in broker.sessions
    node.storage.commit()
    node = node.restart()
    assert "a" not in node.broker.sessions and len(node.broker.sessions["b"].queue) == 0


def test_a_crash_while_an_ending_session_hands_over_does_not_resume_it(node: Node) -> None:
    broker = node.broker
    a, da, b, db = persistent_member_with_queue(node)
    a.expiry_interval = 0
    broker.close_session(a, da, publish_will=False)
    assert a in broker.hand_overs
    node.storage.commit()  # the first chunk and the session's "ending" record
    broker.shutdown()
    node = node.restart()
    assert "a" not in node.broker.sessions


def test_reconnect_while_the_session_ends_does_not_resume_it(node: Node) -> None:
    broker = node.broker
    a, da, b, db = persistent_member_with_queue(node)
    a.expiry_interval = 0
    broker.close_session(a, da, publish_will=False)
    assert a in broker.hand_overs
    a2, present = broker.open_session("a", False, 3600)
    assert not present and a2 is not a and a not in broker.hand_overs
    # the rest was handed over when the old session ended at this connect
    assert sorted(sent[0] for sent in db.sent) == sorted(f"t/{i}" for i in range(QUEUED))


def test_hand_over_never_overfills_the_taker_the_rest_stays_with_the_leaving_member(tmp_path: Path) -> None:
    """The online member's queue bound would drop what it cannot take (broker.max_queued_messages):
    a continuing session keeps those messages instead, so none is lost."""
    node = Node(tmp_path / "data", max_queued_messages=100)
    try:
        broker = node.broker
        a, da, _ = node.connect("a", 3600)
        da.congested = True
        broker.subscribe(a, "$share/g/t/#", 1)
        for i in range(QUEUED):
            broker.publish(Message(f"t/{i}", b"x", 1))
        b, db = online(broker, "b", quota=10)  # a clean session: in memory, 10 in flight + 100 queued
        broker.subscribe(b, "$share/g/t/#", 1)
        broker.close_session(a, da, publish_will=False)
        wait_hand_over_done(broker, a)
        assert broker.stats.drops.get("queue_full", 0) == 0
        assert len(db.sent) == 10 and len(b.queue) == 100
        assert len(a.queue) == QUEUED - 110
    finally:
        node.storage.abort()
