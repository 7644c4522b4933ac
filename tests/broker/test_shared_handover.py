"""Shared-subscription hand-over (Broker._hand_over_shared via close_session, Session.take_unfinished,
Router.pick_member exclude) with the in-memory storage and recording deliveries."""

from __future__ import annotations

from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.broker.message import Message
from fluxmq.broker.session import Session, SessionLimits
from fluxmq.broker.stats import BrokerStats
from tests.broker.test_session import RecordingDelivery


def online(broker: Broker, client_id: str, expiry: int = 0, quota: int = 10) -> tuple[Session, RecordingDelivery]:
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
