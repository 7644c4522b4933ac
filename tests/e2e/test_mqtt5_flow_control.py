"""Receive Maximum flow control both ways: the broker never has more unacknowledged QoS 1/2 PUBLISH in
flight to a client than the client's Receive Maximum (the rest wait in order), and a client that
exceeds the broker's own Receive Maximum is disconnected with 0x93 (MQTT 5.0 4.9)."""

from __future__ import annotations

import pytest
from paho.mqtt.packettypes import PacketTypes

from fluxmq._core import codec as c
from tests.e2e.mqtt5raw import disconnect_of, module_node, paho5, props, raw5, unique

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with module_node(tmp_path_factory) as n:  # broker.max_inflight 100 = the Receive Maximum announced
        yield n


def publish_qos(node, topic: str, qos_list: list[int]) -> None:
    pub = raw5(node, unique("fc-pub"))
    try:
        for i, qos in enumerate(qos_list, 1):
            pub.publish(topic, str(i).encode(), qos, packet_id=i)
            if qos == 2:
                pub.send(c.Pubrel(i))
                pub.wait_for(lambda p, i=i: isinstance(p, c.Pubcomp) and p.packet_id == i)
    finally:
        pub.disconnect()


@pytest.mark.parametrize("qos", [1, 2])
def test_never_more_in_flight_than_receive_maximum_MQTT_3_3_4_9(node, qos: int) -> None:
    """Receive Maximum 3: 3 PUBLISHes arrive, the others wait; each completed acknowledgement
    (PUBACK, or PUBCOMP for QoS 2) lets exactly one more through, in order [MQTT-3.3.4-9, MQTT-4.9.0-2]."""
    topic = unique("fc/window")
    sub = raw5(node, unique("fc-sub"), properties={c.RECEIVE_MAXIMUM: 3})
    try:
        sub.subscribe(1, (topic, 2))
        publish_qos(node, topic, [qos] * 8)
        window = sub.publishes_so_far(ack=False)
        assert [p.payload for p in window] == [b"1", b"2", b"3"]
        received = list(window)
        while len(received) < 8:
            oldest = window.pop(0)
            if qos == 2:
                sub.send(c.Pubrec(oldest.packet_id))
                sub.wait_for(lambda p, pid=oldest.packet_id: isinstance(p, c.Pubrel) and p.packet_id == pid)
                assert sub.publishes_so_far(ack=False) == []  # PUBREC alone does not free the slot
                sub.send(c.Pubcomp(oldest.packet_id))
            else:
                sub.send(c.Puback(oldest.packet_id))
            more = sub.publishes_so_far(ack=False)
            assert len(more) == 1
            window += more
            received += more
        assert [p.payload for p in received] == [str(i).encode() for i in range(1, 9)]
        assert len({p.packet_id for p in window}) == len(window)
    finally:
        sub.disconnect()


def test_other_packets_flow_while_the_window_is_full_MQTT_3_3_4_10(node) -> None:
    """A full window delays only PUBLISH packets: PINGRESP and SUBACK still come [MQTT-3.3.4-10]."""
    topic = unique("fc/other")
    sub = raw5(node, unique("fc-other"), properties={c.RECEIVE_MAXIMUM: 1})
    try:
        sub.subscribe(1, (topic, 1))
        publish_qos(node, topic, [1, 1])
        assert len(sub.publishes_so_far(ack=False)) == 1
        assert sub.subscribe(2, (topic + "/x", 0)).reason_codes == [0]
    finally:
        sub.disconnect()


def test_pubrec_error_frees_the_slot_MQTT_4_9_0_2(node) -> None:
    """A PUBREC with a reason code >= 0x80 ends that QoS 2 exchange (no PUBREL) and frees its slot."""
    topic = unique("fc/pubrec80")
    sub = raw5(node, unique("fc-80"), properties={c.RECEIVE_MAXIMUM: 1})
    try:
        sub.subscribe(1, (topic, 2))
        publish_qos(node, topic, [2, 2])
        (first,) = sub.publishes_so_far(ack=False)
        sub.send(c.Pubrec(first.packet_id, 0x80))
        (second,) = sub.publishes_so_far(ack=False)
        assert second.payload == b"2"
        sub.ack(second)
    finally:
        sub.disconnect()


def test_client_over_the_broker_receive_maximum_is_disconnected_0x93(node) -> None:
    """The broker announces Receive Maximum 100; a 101st QoS 2 PUBLISH without PUBREL gets DISCONNECT
    0x93 Receive Maximum exceeded [MQTT-3.3.4-7 is the client's duty; 4.9 says how the server reacts]."""
    client = raw5(node, unique("fc-93"))
    assert client.connack.properties[c.RECEIVE_MAXIMUM] == 100
    topic = unique("fc/93")
    for pid in range(1, 101):
        client.publish(topic, b"x", 2, packet_id=pid)
    client.send(c.Publish(topic, b"x", 2, False, False, 101))
    assert disconnect_of(client.wait_closed()).reason_code == 0x93


def test_qos1_does_not_count_against_the_broker_maximum(node) -> None:
    """QoS 1 is acknowledged at once, so 150 of them in a row are fine."""
    client = raw5(node, unique("fc-q1"))
    try:
        topic = unique("fc/q1")
        client.send(*[c.Publish(topic, b"x", 1, False, False, pid) for pid in range(1, 151)])
        acks = [client.expect(c.Puback) for _ in range(150)]
        assert [a.packet_id for a in acks] == list(range(1, 151))
    finally:
        client.disconnect()


def test_paho_with_receive_maximum_one_gets_everything_in_order(node) -> None:
    topic = unique("fc/paho")
    sub = paho5(node, unique("fc-psub"), props(PacketTypes.CONNECT, ReceiveMaximum=1))
    try:
        sub.subscribe(topic, 1)
        publish_qos(node, topic, [1] * 20)
        assert [sub.get().payload for _ in range(20)] == [str(i).encode() for i in range(1, 21)]
    finally:
        sub.disconnect()
