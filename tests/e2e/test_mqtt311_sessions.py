"""Clean and persistent sessions (MQTT 3.1.1, in memory): what survives a disconnect and what does not."""

from __future__ import annotations

import pytest

from fluxmq._core import codec as c
from tests.conftest import NodeFactory
from tests.e2e.mqttraw import RawClient, end_session, paho_connected, raw_connected, unique

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["memory", "lmdb"])
def node(request, tmp_path_factory):
    """The module's node, once per storage type: session state lives in memory or in lmdb."""
    factory = NodeFactory(tmp_path_factory.mktemp(f"node-{request.param}"))
    try:
        yield factory({"storage.type": request.param})
    finally:
        factory.close()


def test_persistent_session_gets_qos1_and_qos2_queued_while_offline_in_order_MQTT_3_1_2_5(node) -> None:
    """Messages of QoS 1 and 2 published while a clean session 0 client is away are delivered, in order,
    when it reconnects, without subscribing again [MQTT-3.1.2-4, MQTT-3.1.2-5, MQTT-4.6.0-6]."""
    topic = unique("offline")
    cid = unique("offline-sub")
    sub = paho_connected(node, cid, clean_session=False)
    sub.subscribe(topic, 2)
    sub.disconnect()
    pub = paho_connected(node, unique("offline-pub"))
    try:
        for i in range(20):
            pub.publish(topic, f"m{i}".encode(), 1 + i % 2)
    finally:
        pub.disconnect()
    # a raw client sees the wire order (paho hands QoS 2 messages over only after PUBREL)
    sub = RawClient.to(node)
    try:
        assert sub.connect(cid, clean=False) == c.Connack(True, 0)
        got = [sub.expect(c.Publish) for _ in range(20)]
        assert [(m.payload, m.qos) for m in got] == [(f"m{i}".encode(), 1 + i % 2) for i in range(20)]
        for m in got:
            sub.ack(m)
    finally:
        sub.disconnect()
        end_session(node, cid)


def test_persistent_session_queue_beyond_the_inflight_window_MQTT_3_1_2_5(node) -> None:
    """More offline messages than ``broker.max_inflight`` (100) all arrive in order after reconnect."""
    topic = unique("offline-many")
    cid = unique("offline-many-sub")
    sub = paho_connected(node, cid, clean_session=False)
    sub.subscribe(topic, 1)
    sub.disconnect()
    pub = raw_connected(node, unique("offline-many-pub"))
    try:
        for i in range(250):
            pub.publish(topic, str(i).encode(), 1, packet_id=i + 1)
        for i in range(250):
            assert pub.expect(c.Puback).packet_id == i + 1
    finally:
        pub.disconnect()
    sub = paho_connected(node, cid, clean_session=False)
    try:
        got = [sub.get().payload for _ in range(250)]
        assert got == [str(i).encode() for i in range(250)]
    finally:
        sub.disconnect()
        end_session(node, cid)


def test_subscriptions_survive_reconnect_MQTT_3_1_2_4(node) -> None:
    """A resumed session keeps its subscriptions: live messages arrive without a new SUBSCRIBE [MQTT-3.1.2-4]."""
    topic = unique("keep-subs")
    cid = unique("keep-subs-sub")
    sub = paho_connected(node, cid, clean_session=False)
    sub.subscribe(topic, 1)
    sub.disconnect()
    sub = paho_connected(node, cid, clean_session=False)
    pub = paho_connected(node, unique("keep-subs-pub"))
    try:
        pub.publish(topic, b"live", 1)
        msg = sub.get()
        assert (msg.topic, msg.payload) == (topic, b"live")
    finally:
        pub.disconnect()
        sub.disconnect()
        end_session(node, cid)


def test_clean_session_discards_stored_state_MQTT_3_1_2_6(node) -> None:
    """Reconnecting with clean session 1 discards the stored session: queued messages and subscriptions
    are gone [MQTT-3.1.2-6]."""
    topic = unique("discard")
    cid = unique("discard-sub")
    sub = paho_connected(node, cid, clean_session=False)
    sub.subscribe(topic, 1)
    sub.disconnect()
    pub = paho_connected(node, unique("discard-pub"))
    try:
        pub.publish(topic, b"queued", 1)
        sub = paho_connected(node, cid, clean_session=True)
        assert sub.connack[1] is False
        # the old subscription is gone: a live message on it does not arrive either
        sentinel = unique("discard/sentinel")
        sub.subscribe(sentinel, 1)
        pub.publish(topic, b"live, unsubscribed", 1)
        pub.publish(sentinel, b"S", 1)
        before, _ = sub.collect_until(sentinel)
        assert before == []
        sub.disconnect()
    finally:
        pub.disconnect()


def test_clean_session_state_not_kept_after_disconnect_MQTT_3_1_2_6(node) -> None:
    """A clean session 1 connection's subscriptions end with it; a later clean session 0 connection starts
    empty [MQTT-3.1.2-6, MQTT-3.2.2-3]."""
    topic = unique("clean-ends")
    sentinel = unique("clean-ends/sentinel")
    cid = unique("clean-ends-sub")
    sub = raw_connected(node, cid, clean=True)
    sub.subscribe(1, (topic, 1))
    sub.disconnect()
    # a takeover-free wait: the clean connect below is refused nothing, and sees no stored session
    sub = RawClient.to(node)
    try:
        assert sub.connect(cid, clean=False) == c.Connack(False, 0)
        sub.subscribe(2, (sentinel, 1))
        pub = raw_connected(node, unique("clean-ends-pub"))
        pub.publish_qos1(topic, b"X", 1)
        pub.publish_qos1(sentinel, b"S", 2)
        pub.disconnect()
        before, msg = sub.collect_until(lambda p: isinstance(p, c.Publish) and p.topic == sentinel)
        assert [p for p in before if isinstance(p, c.Publish)] == []
        sub.send(c.Puback(msg.packet_id))
    finally:
        sub.disconnect()
        end_session(node, cid)


def test_retained_messages_outlive_sessions_MQTT_3_1_2_7(node) -> None:
    """Retained messages are not session state: they stay when the publishing session ends [MQTT-3.1.2-7]."""
    topic = unique("retained-outlives")
    pub = raw_connected(node, unique("ro-pub"), clean=True)
    pub.publish_qos1(topic, b"kept", 1, retain=True)
    pub.disconnect()
    sub = paho_connected(node, unique("ro-sub"))
    try:
        sub.subscribe(topic, 1)
        msg = sub.get()
        assert (msg.payload, msg.retain) == (b"kept", True)
    finally:
        sub.disconnect()
        cleaner = paho_connected(node, unique("ro-clean"))
        cleaner.publish(topic, b"", 1, retain=True)
        cleaner.disconnect()


def test_qos0_is_not_delivered_twice_after_reconnect(node) -> None:
    """Nothing already delivered at QoS 0 or acknowledged at QoS 1 comes again on reconnect [MQTT-4.3.1-1, MQTT-4.3.2-1]."""
    topic = unique("no-replay")
    cid = unique("no-replay-sub")
    sub = paho_connected(node, cid, clean_session=False)
    sub.subscribe(topic, 1)
    pub = paho_connected(node, unique("no-replay-pub"))
    try:
        pub.publish(topic, b"q0", 0)
        pub.publish(topic, b"q1", 1)
        assert [sub.get().payload, sub.get().payload] == [b"q0", b"q1"]
        sub.disconnect()
        sub = paho_connected(node, cid, clean_session=False)
        pub.publish(topic, b"after", 1)
        assert sub.get().payload == b"after"
    finally:
        pub.disconnect()
        sub.disconnect()
        end_session(node, cid)
