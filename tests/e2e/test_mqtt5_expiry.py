"""Message Expiry Interval: expired messages are never delivered (offline queue, a congested client's
queue, retained) and the forwarded interval is the time left [MQTT-3.3.2-5, MQTT-3.3.2-6]."""

from __future__ import annotations

import time

import pytest

from fluxmq._core import codec as c
from tests.e2e.mqtt5raw import module_node, paho5, props, raw5, unique

pytestmark = pytest.mark.e2e

EXP = c.MESSAGE_EXPIRY_INTERVAL


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with module_node(tmp_path_factory) as n:
        yield n


def test_online_subscriber_gets_the_interval(node) -> None:
    """A message delivered at once carries the interval (at most what was sent, at least one second less)."""
    topic = unique("exp/online")
    sub = raw5(node, unique("exp-on-sub"))
    pub = raw5(node, unique("exp-on-pub"))
    try:
        sub.subscribe(1, (topic, 1))
        pub.publish(topic, b"x", 1, packet_id=1, properties={EXP: 30})
        got = sub.expect(c.Publish)
        assert 29 <= got.properties[EXP] <= 30
        sub.ack(got)
    finally:
        sub.disconnect()
        pub.disconnect()


def test_offline_queue_drops_expired_and_forwards_the_remaining_interval_MQTT_3_3_2_5(node) -> None:
    """Queued for an offline session: the message that expired meanwhile is not delivered
    [MQTT-3.3.2-5]; the other arrives with the time it has left, not its original interval [MQTT-3.3.2-6]."""
    topic = unique("exp/offline")
    cid = unique("exp-off")
    sub = raw5(node, cid, clean_start=False, properties={c.SESSION_EXPIRY_INTERVAL: 60})
    sub.subscribe(1, (topic, 1))
    sub.disconnect()
    pub = raw5(node, unique("exp-off-pub"))
    pub.publish(topic, b"short", 1, packet_id=1, properties={EXP: 1})
    pub.publish(topic, b"long", 1, packet_id=2, properties={EXP: 10})
    pub.publish(topic, b"forever", 1, packet_id=3)
    pub.disconnect()
    time.sleep(2.2)  # let the short one expire and the long one age
    again = raw5(node, cid, clean_start=False, properties={c.SESSION_EXPIRY_INTERVAL: 0})
    try:
        got = [again.expect(c.Publish) for _ in range(2)]
        for p in got:
            again.ack(p)
        assert [p.payload for p in got] == [b"long", b"forever"]
        assert got[0].properties[EXP] <= 8
        assert EXP not in got[1].properties
    finally:
        again.disconnect()


def test_congested_queue_drops_expired(node) -> None:
    """Queued behind a full Receive Maximum window while online: expired before the window opens,
    the message is skipped."""
    topic = unique("exp/window")
    sub = raw5(node, unique("exp-win"), properties={c.RECEIVE_MAXIMUM: 1})
    pub = raw5(node, unique("exp-win-pub"))
    try:
        sub.subscribe(1, (topic, 1))
        pub.publish(topic, b"first", 1, packet_id=1)
        first = sub.expect(c.Publish)
        pub.publish(topic, b"expires", 1, packet_id=2, properties={EXP: 1})
        pub.publish(topic, b"stays", 1, packet_id=3, properties={EXP: 60})
        time.sleep(1.6)
        sub.ack(first)
        nxt = sub.expect(c.Publish)
        assert nxt.payload == b"stays" and nxt.properties[EXP] <= 59
        sub.ack(nxt)
    finally:
        sub.disconnect()
        pub.disconnect()


def test_retained_message_expires(node) -> None:
    """A retained message is not sent once its interval passed; a live one comes with the time left."""
    dead, live = unique("exp/ret/dead"), unique("exp/ret/live")
    pub = raw5(node, unique("exp-ret-pub"))
    pub.publish(dead, b"dead", 1, retain=True, packet_id=1, properties={EXP: 1})
    pub.publish(live, b"live", 1, retain=True, packet_id=2, properties={EXP: 60})
    time.sleep(1.6)
    sub = raw5(node, unique("exp-ret-sub"))
    try:
        sub.subscribe(1, (dead, 1), (live, 1))
        got = sub.expect(c.Publish)
        assert (got.topic, got.retain) == (live, True) and got.properties[EXP] <= 59
        sub.ack(got)
        sub.subscribe(2, (dead, 1))
        sub.send(c.Pingreq())
        assert isinstance(sub.recv(), c.Pingresp)  # nothing retained for the expired topic
    finally:
        pub.publish(live, b"", 1, retain=True, packet_id=3)
        pub.disconnect()
        sub.disconnect()


def test_paho_message_expiry_round_trip(node) -> None:
    topic = unique("exp/paho")
    sub = paho5(node, unique("exp-psub"))
    pub = paho5(node, unique("exp-ppub"))
    try:
        sub.subscribe(topic, 1)
        pub.publish(topic, b"p", 1, properties=props(MessageExpiryInterval=120))
        msg = sub.get()
        assert 119 <= msg.properties.MessageExpiryInterval <= 120
    finally:
        sub.disconnect()
        pub.disconnect()
