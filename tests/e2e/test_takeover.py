"""Session takeover: a second CONNECT with the same client id closes the first connection."""

from __future__ import annotations

import paho.mqtt.client as mqtt
import pytest

from fluxmq._core import codec as c
from tests.e2e.mqttraw import RawClient, end_session, paho_connected, raw_connected, unique

pytestmark = pytest.mark.e2e


def test_second_connect_closes_first_connection_MQTT_3_1_4_2(node) -> None:
    """The existing connection of a client id is closed when a new one connects [MQTT-3.1.4-2]."""
    cid = unique("takeover")
    first = raw_connected(node, cid)
    second = raw_connected(node, cid)
    try:
        assert first.wait_closed() == []  # 3.1.1: no packet, just the close
        second.send(c.Pingreq())
        assert isinstance(second.recv(), c.Pingresp)
    finally:
        second.disconnect()


def test_takeover_publishes_will_of_first_connection_MQTT_3_1_2_8(node) -> None:
    """The first connection did not send DISCONNECT, so its will is published when it is closed [MQTT-3.1.2-8]."""
    cid = unique("takeover-will")
    will_topic = unique("takeover/will")
    watcher = paho_connected(node, unique("tw-watch"))
    try:
        watcher.subscribe(will_topic, 1)
        first = raw_connected(node, cid, will=c.Will(will_topic, b"first gone", 1))
        second = raw_connected(node, cid)
        first.wait_closed()
        msg = watcher.get()
        assert (msg.topic, msg.payload) == (will_topic, b"first gone")
        second.disconnect()
    finally:
        watcher.disconnect()


def test_takeover_with_clean_session_0_resumes_the_session_MQTT_3_1_2_4(node) -> None:
    """clean session 0 on both: the new connection gets the session (present 1) and its subscriptions."""
    cid = unique("takeover-keep")
    topic = unique("takeover/keep")
    first = raw_connected(node, cid, clean=False)
    try:
        first.subscribe(1, (topic, 1))
        second = RawClient.to(node)
        assert second.connect(cid, clean=False) == c.Connack(True, 0)
        first.wait_closed()
        pub = paho_connected(node, unique("tk-pub"))
        pub.publish(topic, b"to the new one", 1)
        pub.disconnect()
        msg = second.expect(c.Publish)
        assert msg.payload == b"to the new one"
        second.send(c.Puback(msg.packet_id))
        second.disconnect()
    finally:
        end_session(node, cid)


def test_takeover_of_clean_session_does_not_resume_it_MQTT_3_1_2_6(node) -> None:
    """A clean session lasts as long as its network connection [MQTT-3.1.2-6]: when a clean session 0
    CONNECT takes it over, there is no stored session (present 0 [MQTT-3.2.2-3]) and no subscription."""
    cid = unique("takeover-clean")
    topic = unique("takeover/clean")
    sentinel = unique("takeover/clean-sentinel")
    first = raw_connected(node, cid, clean=True)
    first.subscribe(1, (topic, 1))
    second = RawClient.to(node)
    try:
        assert second.connect(cid, clean=False) == c.Connack(False, 0)
        first.wait_closed()
        second.subscribe(2, (sentinel, 1))
        pub = raw_connected(node, unique("tc-pub"))
        pub.publish_qos1(topic, b"X", 1)
        pub.publish_qos1(sentinel, b"S", 2)
        pub.disconnect()
        before, _ = second.collect_until(lambda p: isinstance(p, c.Publish) and p.topic == sentinel)
        assert before == []
    finally:
        second.disconnect()
        end_session(node, cid)


def test_takeover_closes_paho_client_which_stays_closed(node) -> None:
    """A paho client taken over sees its connection end (and, without auto reconnect, stays off)."""
    cid = unique("takeover-paho")
    first = paho_connected(node, cid)
    try:
        second = paho_connected(node, cid)
        assert first.wait_disconnected()
        topic = unique("takeover/paho")
        second.subscribe(topic, 1)
        second.publish(topic, b"still here", 1)
        assert second.get().payload == b"still here"
        second.disconnect()
    finally:
        first.stop()


def test_takeover_v5_sends_disconnect_0x8e_MQTT5_3_1_4_3(node) -> None:
    """5.0: the existing connection gets DISCONNECT with reason 0x8E (Session taken over) [MQTT-3.1.4-3]."""
    cid = unique("takeover-v5")
    first = raw_connected(node, cid, version=5)
    second = raw_connected(node, cid, version=5)
    try:
        packets = first.wait_closed()
        assert [type(p) for p in packets] == [c.Disconnect]
        assert packets[0].reason_code == 0x8E
    finally:
        second.disconnect()


def test_takeover_v311_by_v5_client(node) -> None:
    """Takeover works across protocol versions: a 5.0 CONNECT closes a 3.1.1 connection of the same id."""
    cid = unique("takeover-mixed")
    first = paho_connected(node, cid, protocol=mqtt.MQTTv311)
    try:
        second = raw_connected(node, cid, version=5)
        assert first.wait_disconnected()
        second.disconnect()
    finally:
        first.stop()


def test_takeover_resuming_a_3_1_1_persistent_session_does_not_publish_the_will(node) -> None:
    """clean session 0 on both: the session continues, so the old connection's will is not sent (as
    Mosquitto does); a half-open reconnect gives no spurious "offline" message."""
    cid = unique("takeover-keep-will")
    will_topic = unique("takeover/keep-will")
    sentinel = unique("takeover/keep-will-sentinel")
    watcher = raw_connected(node, unique("tkw-watch"))
    try:
        watcher.subscribe(1, (will_topic, 1), (sentinel, 1))
        first = raw_connected(node, cid, clean=False, will=c.Will(will_topic, b"first gone", 1))
        second = RawClient.to(node)
        assert second.connect(cid, clean=False) == c.Connack(True, 0)
        first.wait_closed()
        pub = raw_connected(node, unique("tkw-pub"))
        pub.publish_qos1(sentinel, b"S", 1)
        pub.disconnect()
        before, _ = watcher.collect_until(lambda p: isinstance(p, c.Publish) and p.topic == sentinel)
        assert [p for p in before if isinstance(p, c.Publish)] == []
        second.disconnect()
    finally:
        watcher.disconnect()
        end_session(node, cid)
