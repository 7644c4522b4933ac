"""Maximum Packet Size both ways: the broker's limit (CONNACK, DISCONNECT 0x95) and the client's (an
outbound message too big for one client is dropped for that client only; reason strings are left out
of packets they would make too big)."""

from __future__ import annotations

import pytest
from paho.mqtt.packettypes import PacketTypes

from fluxmq._core import codec as c
from tests.e2e.mqtt5raw import disconnect_of, module_node, paho5, props, raw5, unique

pytestmark = pytest.mark.e2e

BROKER_MAX = 4096


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with module_node(tmp_path_factory, {"broker.max_packet_size": BROKER_MAX}) as n:
        yield n


def test_connack_announces_the_broker_maximum(node) -> None:
    client = raw5(node, unique("ps-connack"))
    try:
        assert client.connack.properties[c.MAXIMUM_PACKET_SIZE] == BROKER_MAX
    finally:
        client.disconnect()


def test_inbound_packet_over_the_broker_maximum_is_0x95(node) -> None:
    """A PUBLISH larger than the announced Maximum Packet Size: DISCONNECT 0x95 Packet too large
    [MQTT-3.2.2-15 is the client's duty; the server reacts with 0x95]."""
    client = raw5(node, unique("ps-95"))
    client.send(c.Publish(unique("ps/big"), b"x" * BROKER_MAX, 1, False, False, 1))
    assert disconnect_of(client.wait_closed()).reason_code == 0x95


@pytest.mark.parametrize("qos", [0, 1])
def test_outbound_too_big_for_one_client_is_dropped_for_it_only_MQTT_3_1_2_28(node, qos: int) -> None:
    """A subscriber with Maximum Packet Size 200 does not get a 500-byte message, gets the small ones in
    order, and its window is not used up by the dropped one; a subscriber without a limit gets all
    [MQTT-3.1.2-27, MQTT-3.1.2-28]."""
    topic = unique("ps/out")
    small = raw5(node, unique("ps-small"), properties={c.MAXIMUM_PACKET_SIZE: 200, c.RECEIVE_MAXIMUM: 1})
    big = raw5(node, unique("ps-big"))
    pub = raw5(node, unique("ps-pub"))
    try:
        small.subscribe(1, (topic, 1))
        big.subscribe(1, (topic, 1))
        for i, payload in enumerate([b"a", b"x" * 500, b"b"], 1):
            pub.publish(topic, payload, qos, packet_id=i)
        got_small = []
        for _ in range(2):
            got_small.append(small.expect(c.Publish))
            small.ack(got_small[-1])
        assert [p.payload for p in got_small] == [b"a", b"b"]
        assert all(len(c.encode(p, 5)) <= 200 for p in got_small)
        got_big = [big.expect(c.Publish) for _ in range(3)]
        assert [len(p.payload) for p in got_big] == [1, 500, 1]
    finally:
        for client in (small, big, pub):
            client.disconnect()


def test_reason_string_left_out_when_it_would_exceed_the_client_maximum_MQTT_3_4_2_2(node) -> None:
    """An error PUBACK carries a reason string, unless that would make it larger than the client's
    Maximum Packet Size [MQTT-3.4.2-2]; the reason code is still there."""
    roomy = raw5(node, unique("ps-rs"))
    tight = raw5(node, unique("ps-rs-tight"), properties={c.MAXIMUM_PACKET_SIZE: 16})
    try:
        assert c.REASON_STRING in roomy.publish("$SYS/x", b"x", 1, packet_id=1).properties
        ack = tight.publish("$SYS/x", b"x", 1, packet_id=1)
        assert (ack.reason_code, ack.properties) == (0x87, {})
    finally:
        roomy.disconnect()
        tight.disconnect()


def test_paho_with_maximum_packet_size(node) -> None:
    topic = unique("ps/paho")
    sub = paho5(node, unique("ps-psub"), props(PacketTypes.CONNECT, MaximumPacketSize=300))
    pub = paho5(node, unique("ps-ppub"))
    try:
        sub.subscribe(topic, 1)
        pub.publish(topic, b"y" * 1000, 1)
        pub.publish(topic, b"fits", 1)
        assert sub.get().payload == b"fits"
    finally:
        sub.disconnect()
        pub.disconnect()
