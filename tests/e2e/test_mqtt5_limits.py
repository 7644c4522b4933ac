"""Broker-side limits announced in CONNACK and enforced with the right reason codes: broker.max_qos,
retain_available, max_topic_alias, max_inflight, max_packet_size, max_message_size, max_keepalive and a
session queue that overflows with queue_overflow: disconnect."""

from __future__ import annotations

import pytest

from fluxmq._core import codec as c
from tests.e2e.mqtt5raw import Raw5, disconnect_of, module_node, paho5, raw5, unique

pytestmark = pytest.mark.e2e

LIMITS = {
    "broker.max_qos": 1,
    "broker.retain_available": False,
    "broker.max_topic_alias": 2,
    "broker.max_inflight": 2,
    "broker.max_packet_size": 1024,
    "broker.max_message_size": 512,
    "broker.max_keepalive": 30,
    "broker.max_queued_messages": 2,
    "broker.queue_overflow": "disconnect",
}


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with module_node(tmp_path_factory, LIMITS) as n:
        yield n


def test_connack_announces_every_limit_MQTT_3_2_2_9(node) -> None:
    """Maximum QoS 1 [MQTT-3.2.2-9], Retain Available 0, Topic Alias Maximum 2, Receive Maximum 2,
    Maximum Packet Size 1024, and Server Keep Alive 30 for a client that asked for 60 [MQTT-3.2.2-21]."""
    client = raw5(node, unique("lim-connack"), keepalive=60)
    try:
        p = client.connack.properties
        assert (
            p[c.MAXIMUM_QOS],
            p[c.RETAIN_AVAILABLE],
            p[c.TOPIC_ALIAS_MAXIMUM],
            p[c.RECEIVE_MAXIMUM],
            p[c.MAXIMUM_PACKET_SIZE],
            p[c.SERVER_KEEP_ALIVE],
        ) == (1, 0, 2, 2, 1024, 30)
    finally:
        client.disconnect()


def test_keepalive_within_the_maximum_gets_no_server_keep_alive_MQTT_3_2_2_22(node) -> None:
    client = raw5(node, unique("lim-ka"), keepalive=20)
    try:
        assert c.SERVER_KEEP_ALIVE not in client.connack.properties
    finally:
        client.disconnect()


def test_paho_sees_the_limits(node) -> None:
    client = paho5(node, unique("lim-paho"))
    try:
        p = client.connack[2]
        assert (p.MaximumQoS, p.RetainAvailable, p.ReceiveMaximum) == (1, 0, 2)
    finally:
        client.disconnect()


def test_subscribe_qos2_is_granted_the_maximum_MQTT_3_2_2_10(node) -> None:
    """SUBSCRIBE with QoS 2 is accepted and granted QoS 1 [MQTT-3.2.2-10]."""
    client = raw5(node, unique("lim-sub"))
    try:
        assert client.subscribe(1, ("lim/#", 2)).reason_codes == [1]
    finally:
        client.disconnect()


def test_publish_over_maximum_qos_is_0x9B(node) -> None:
    client = raw5(node, unique("lim-9b"))
    client.send(c.Publish(unique("lim/q2"), b"x", 2, False, False, 1))
    assert disconnect_of(client.wait_closed()).reason_code == 0x9B


def test_retained_publish_is_0x9A(node) -> None:
    client = raw5(node, unique("lim-9a"))
    client.send(c.Publish(unique("lim/ret"), b"x", 1, True, False, 1))
    assert disconnect_of(client.wait_closed()).reason_code == 0x9A


@pytest.mark.parametrize(
    "will, code", [(c.Will("lim/w", b"x", 2, False), 0x9B), (c.Will("lim/w", b"x", 0, True), 0x9A)]
)
def test_will_over_the_limits_is_refused_at_connect_MQTT_3_2_2_12(node, will, code: int) -> None:
    """A will with QoS 2 gets CONNACK 0x9B [MQTT-3.2.2-12]; a retained will gets 0x9A [MQTT-3.2.2-13]."""
    client = Raw5(node)
    assert client.connect(unique("lim-will"), will=will).reason_code == code
    assert client.wait_closed() == []


def test_topic_alias_over_the_maximum_is_0x94(node) -> None:
    client = raw5(node, unique("lim-94"))
    client.publish(unique("lim/al"), b"x", properties={c.TOPIC_ALIAS: 2})
    client.publish(unique("lim/al"), b"x", properties={c.TOPIC_ALIAS: 3})
    assert disconnect_of(client.wait_closed()).reason_code == 0x94


def test_packet_over_the_maximum_is_0x95(node) -> None:
    client = raw5(node, unique("lim-95"))
    client.send(c.Publish(unique("lim/big"), b"x" * 1100, 1, False, False, 1))
    assert disconnect_of(client.wait_closed()).reason_code == 0x95


def test_payload_over_max_message_size_gets_puback_0x97(node) -> None:
    """A payload over broker.max_message_size (the packet itself fits) is refused on its PUBACK."""
    client = raw5(node, unique("lim-97"))
    try:
        ack = client.publish(unique("lim/msg"), b"x" * 600, 1, packet_id=1)
        assert ack.reason_code == 0x97 and c.REASON_STRING in ack.properties
    finally:
        client.disconnect()


def test_broker_max_inflight_caps_the_window_of_a_client_with_a_larger_receive_maximum(node) -> None:
    """broker.max_inflight 2: even a client announcing Receive Maximum 100 has at most 2 in flight."""
    topic = unique("lim/window")
    sub = raw5(node, unique("lim-win"), properties={c.RECEIVE_MAXIMUM: 100})
    pub = raw5(node, unique("lim-win-pub"))
    try:
        sub.subscribe(1, (topic, 1))
        for pid in range(1, 5):
            pub.publish(topic, str(pid).encode(), 1, packet_id=pid)
        sub.send(c.Pingreq())
        got = []
        while not isinstance(packet := sub.recv(), c.Pingresp):
            got.append(packet)
        assert [p.payload for p in got] == [b"1", b"2"]
    finally:
        sub.disconnect()
        pub.disconnect()


def test_session_queue_overflow_disconnects_with_0x97(node) -> None:
    """queue_overflow: disconnect with max_queued_messages 2: the third queued message closes the
    subscriber with DISCONNECT 0x97 Quota exceeded."""
    topic = unique("lim/queue")
    sub = raw5(node, unique("lim-q"), properties={c.RECEIVE_MAXIMUM: 1})
    pub = raw5(node, unique("lim-q-pub"))
    try:
        sub.subscribe(1, (topic, 1))
        for pid in range(1, 5):  # one in flight, two queued, the fourth overflows
            pub.publish(topic, b"m", 1, packet_id=pid)
        assert disconnect_of(sub.wait_closed()).reason_code == 0x97
    finally:
        pub.disconnect()
