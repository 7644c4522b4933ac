"""Router.pick_member: which member of a shared group gets a message (MQTT 5.0 4.8.2)."""

from __future__ import annotations

from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.broker.message import Message

from .test_session import RecordingDelivery


def member(broker: Broker, client_id: str, expiry: int = 0) -> RecordingDelivery:
    session, _ = broker.open_session(client_id, True, expiry)
    d = RecordingDelivery()
    broker.attach(session, d, 100)
    broker.subscribe(session, "$share/g/t", 1)
    return d


def test_a_closing_member_is_never_picked_while_another_can_take_the_message() -> None:
    broker = Broker(BrokerSettings())
    closing = member(broker, "a")
    open_one = member(broker, "b")
    closing.closed = True  # its teardown has not detached the session yet
    for i in range(10):
        assert broker.publish(Message("t", b"%d" % i, 1)) == 1
    assert not closing.sent
    assert len(open_one.sent) == 10


def test_a_closing_member_is_not_preferred_to_an_offline_one() -> None:
    broker = Broker(BrokerSettings())
    closing = member(broker, "a")
    offline = member(broker, "b", expiry=3600)
    session = broker.sessions["b"]
    broker.close_session(session, offline, False)  # offline; its session and subscription stay
    closing.closed = True
    broker.publish(Message("t", b"x", 1))
    assert not closing.sent
    assert len(session.queue) == 1  # delivered when "b" comes back
