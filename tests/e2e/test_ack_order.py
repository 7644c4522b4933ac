"""A client subscribed to the topic it publishes to gets its PUBACK/PUBREC before its own message.

The order of an acknowledgement and a delivery is not fixed by the spec, but naive synchronous
clients wait for the ack of their PUBLISH before they read anything else; Mosquitto sends the ack
first, and so does fluxmq (``MQTTConnection._on_publish`` puts the ack ahead of what routing wrote).
"""

from __future__ import annotations

import pytest

from fluxmq._core import codec as c

from .mqttraw import raw_connected, unique


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("qos", [1, 2])
def test_ack_of_own_publish_comes_before_its_delivery_to_itself(node, version: int, qos: int) -> None:
    topic = unique("self")
    with raw_connected(node, unique("selfsub"), version=version) as client:
        client.subscribe(1, (topic, qos))
        client.publish(topic, b"mine", qos, packet_id=7)
        first = client.recv()
        assert isinstance(first, c.Puback if qos == 1 else c.Pubrec), f"first packet was {first!r}"
        assert first.packet_id == 7 and first.reason_code == 0
        delivered = client.recv()
        assert isinstance(delivered, c.Publish) and delivered.payload == b"mine" and delivered.qos == qos


@pytest.mark.parametrize("version", [4, 5])
def test_ack_comes_first_with_several_self_deliveries_in_one_read(node, version: int) -> None:
    topic = unique("self")
    with raw_connected(node, unique("selfsub"), version=version) as client:
        client.subscribe(1, (topic, 1), (topic + "/#", 1))
        client.send(*(c.Publish(topic, b"%d" % i, 1, False, False, i + 1, None) for i in range(20)))
        order = []
        while len(order) < 40:
            packet = client.recv()
            order.append(
                ("ack", packet.packet_id) if isinstance(packet, c.Puback) else ("msg", packet.payload)
            )
        expected = []
        for i in range(20):
            expected += [("ack", i + 1), ("msg", b"%d" % i)]
        assert order == expected


def test_ack_comes_first_under_sync_always(node_factory) -> None:
    """With ``storage.sync: always`` output is sent in prefixes held back until their fsync; the
    ack still leaves first, for a persistent subscriber too (its delivery is stored)."""
    node = node_factory({"storage.sync": "always"})
    topic = unique("self")
    with raw_connected(node, unique("selfsub"), clean=False) as client:
        client.subscribe(1, (topic, 1))
        for pid in (1, 2, 3):
            client.publish(topic, b"%d" % pid, 1, packet_id=pid)
            first = client.recv()
            assert isinstance(first, c.Puback) and first.packet_id == pid, f"first packet was {first!r}"
            delivered = client.recv()
            assert isinstance(delivered, c.Publish) and delivered.payload == b"%d" % pid
            client.ack(delivered)
