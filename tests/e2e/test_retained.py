"""Retained messages: set, replace, clear, delivery on subscribe with the subscription's QoS cap."""

from __future__ import annotations

import pytest

from fluxmq._core import codec as c
from tests.e2e.mqttraw import paho_connected, raw_connected, unique

pytestmark = pytest.mark.e2e


@pytest.fixture
def publisher(node):
    client = raw_connected(node, unique("ret-pub"))
    yield client
    client.disconnect()


def _subscribe_and_collect(node, filter: str, qos: int = 2) -> list:
    """PUBLISH packets a fresh raw subscriber of ``filter`` receives right after its SUBACK (bounded by a
    PINGREQ sent after the SUBSCRIBE: its PINGRESP comes after everything the SUBSCRIBE caused)."""
    client = raw_connected(node, unique("ret-sub"))
    try:
        client.send(c.Subscribe(1, [c.Subscription(filter, qos)]), c.Pingreq())
        packets, _ = client.collect_until(lambda p: isinstance(p, c.Pingresp))
        assert isinstance(packets[0], c.Suback)
        return packets[1:]
    finally:
        client.disconnect()


def test_retained_message_sent_on_subscribe_with_retain_1_MQTT_3_3_1_6(node, publisher) -> None:
    """A new subscription gets the topic's retained message [MQTT-3.3.1-6] with RETAIN 1 [MQTT-3.3.1-8]."""
    topic = unique("ret/set")
    publisher.publish_qos1(topic, b"kept", 1, retain=True)
    got = _subscribe_and_collect(node, topic, 1)
    assert [(p.topic, p.payload, p.retain, p.qos) for p in got] == [(topic, b"kept", True, 1)]


def test_live_delivery_has_retain_0_MQTT_3_3_1_9(node, publisher) -> None:
    """A retained PUBLISH reaches established subscriptions with RETAIN 0 [MQTT-3.3.1-9]."""
    topic = unique("ret/live")
    sub = raw_connected(node, unique("ret-live-sub"))
    try:
        sub.subscribe(1, (topic, 0))
        publisher.publish_qos1(topic, b"live", 1, retain=True)
        msg = sub.expect(c.Publish)
        assert (msg.payload, msg.retain) == (b"live", False)
    finally:
        sub.disconnect()


def test_retained_message_replaced_MQTT_3_3_1_5(node, publisher) -> None:
    """A new retained message on a topic replaces the old one [MQTT-3.3.1-5]."""
    topic = unique("ret/replace")
    publisher.publish_qos1(topic, b"old", 1, retain=True)
    publisher.publish_qos1(topic, b"new", 2, retain=True)
    got = _subscribe_and_collect(node, topic)
    assert [p.payload for p in got] == [b"new"]


def test_retained_qos0_replaces_too_MQTT_3_3_1_7(node, publisher) -> None:
    """A retained QoS 0 message replaces the retained message of its topic [MQTT-3.3.1-7]."""
    topic = unique("ret/q0")
    publisher.publish_qos1(topic, b"q1", 1, retain=True)
    publisher.publish(topic, b"q0", 0, retain=True)
    publisher.publish_qos1(unique("ret/q0-barrier"), b"", 2)  # the QoS 0 one was handled before this PUBACK
    got = _subscribe_and_collect(node, topic)
    assert [(p.payload, p.qos) for p in got] == [(b"q0", 0)]


def test_empty_retained_payload_clears_MQTT_3_3_1_10(node, publisher) -> None:
    """A retained PUBLISH with an empty payload reaches subscribers as normal and removes the retained
    message [MQTT-3.3.1-10]; it is not stored itself [MQTT-3.3.1-11]."""
    topic = unique("ret/clear")
    publisher.publish_qos1(topic, b"something", 1, retain=True)
    sub = raw_connected(node, unique("ret-clear-sub"))
    try:
        sub.subscribe(1, (topic, 0))
        assert sub.expect(c.Publish).payload == b"something"  # the retained one
        publisher.publish_qos1(topic, b"", 2, retain=True)
        cleared = sub.expect(c.Publish)
        assert (cleared.payload, cleared.retain) == (b"", False)
    finally:
        sub.disconnect()
    assert _subscribe_and_collect(node, topic) == []


def test_retain_0_does_not_touch_retained_MQTT_3_3_1_12(node, publisher) -> None:
    """A PUBLISH with RETAIN 0 neither stores nor replaces nor removes the retained message [MQTT-3.3.1-12]."""
    topic = unique("ret/keep")
    publisher.publish_qos1(topic, b"retained", 1, retain=True)
    publisher.publish_qos1(topic, b"not retained", 2)
    publisher.publish_qos1(topic, b"", 3)
    got = _subscribe_and_collect(node, topic)
    assert [p.payload for p in got] == [b"retained"]
    other = unique("ret/never")
    publisher.publish_qos1(other, b"plain", 4)
    assert _subscribe_and_collect(node, other) == []


@pytest.mark.parametrize("msg_qos,sub_qos", [(2, 1), (2, 0), (1, 0), (0, 2), (1, 2)])
def test_retained_delivered_at_min_of_message_and_subscription_qos_MQTT_3_8_4_6(
    node, publisher, msg_qos: int, sub_qos: int
) -> None:
    """The retained message goes out at min(its QoS, the granted QoS) [MQTT-3.8.4-6]."""
    topic = unique(f"ret/cap{msg_qos}{sub_qos}")
    if msg_qos == 2:
        publisher.publish_qos2(topic, b"capped", 1, retain=True)
    elif msg_qos == 1:
        publisher.publish_qos1(topic, b"capped", 1, retain=True)
    else:
        publisher.publish(topic, b"capped", 0, retain=True)
        publisher.publish_qos1(unique("ret/barrier"), b"", 2)
    got = _subscribe_and_collect(node, topic, sub_qos)
    assert [(p.payload, p.qos, p.retain) for p in got] == [(b"capped", min(msg_qos, sub_qos), True)]


def test_wildcard_subscription_gets_every_matching_retained_MQTT_3_3_1_6(node, publisher) -> None:
    base = unique("ret/many")
    topics = [f"{base}/a", f"{base}/b/c", f"{base}/d"]
    for i, t in enumerate(topics):
        publisher.publish_qos1(t, t.encode(), i + 1, retain=True)
    publisher.publish_qos1(f"{base}x/other", b"no match", 9, retain=True)
    got = _subscribe_and_collect(node, f"{base}/#")
    assert sorted(p.topic for p in got) == sorted(topics)
    assert all(p.retain for p in got)
    got = _subscribe_and_collect(node, f"{base}/+")
    assert sorted(p.topic for p in got) == sorted([topics[0], topics[2]])


def test_resubscribe_resends_retained_MQTT_3_8_4_3(node, publisher) -> None:
    """SUBSCRIBE again with the same filter replaces the subscription and re-sends retained messages [MQTT-3.8.4-3]."""
    topic = unique("ret/resub")
    publisher.publish_qos1(topic, b"again", 1, retain=True)
    sub = raw_connected(node, unique("ret-resub"))
    try:
        sub.subscribe(1, (topic, 0))
        assert sub.expect(c.Publish).payload == b"again"
        assert sub.subscribe(2, (topic, 1)).reason_codes == [1]
        msg = sub.expect(c.Publish)
        assert (msg.payload, msg.retain, msg.qos) == (b"again", True, 1)
        sub.send(c.Puback(msg.packet_id))
    finally:
        sub.disconnect()


def test_paho_sees_retained_flag(node) -> None:
    """paho end to end: retained set, received with retain=True; live copy with retain=False."""
    topic = unique("ret/paho")
    pub = paho_connected(node, unique("ret-paho-pub"))
    sub = paho_connected(node, unique("ret-paho-sub"))
    try:
        pub.publish(topic, b"r1", 1, retain=True)
        sub.subscribe(topic, 1)
        first = sub.get()
        assert (first.payload, first.retain) == (b"r1", True)
        pub.publish(topic, b"r2", 1, retain=True)
        second = sub.get()
        assert (second.payload, second.retain) == (b"r2", False)
    finally:
        pub.disconnect()
        sub.disconnect()
