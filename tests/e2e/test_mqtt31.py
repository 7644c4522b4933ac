"""MQTT 3.1 (protocol name ``MQIsdp``, level 3) clients: connect rules, QoS flows, mixing with 3.1.1 / 5.0.

MQTT 3.1 has no OASIS statement numbers; the rules checked come from the IBM 3.1 specification
(client identifier 1 to 23 characters, CONNACK return code 2 otherwise; no session present flag).
"""

from __future__ import annotations

import paho.mqtt.client as mqtt
import pytest

from fluxmq._core import codec as c
from tests.e2e.mqttraw import PahoClient, RawClient, end_session, paho_connected, raw_connected, unique

pytestmark = pytest.mark.e2e


def test_v31_connect_accepted(node) -> None:
    with RawClient.to(node, 3) as client:
        assert client.connect(unique("v31")[:23]) == c.Connack(False, 0)
        client.disconnect()


@pytest.mark.parametrize("cid", ["", "x" * 24, "a-client-id-of-30-characters!!"])
def test_v31_client_id_outside_1_to_23_rejected_with_code_2(node, cid: str) -> None:
    """3.1: a client id of 0 or more than 23 characters gets CONNACK 0x02 (identifier rejected), then close."""
    with RawClient.to(node, 3) as client:
        assert client.connect(cid, clean=True) == c.Connack(False, 2)
        assert client.wait_closed() == []


def test_v31_paho_long_client_id_refused(node) -> None:
    """paho MQTTv31 with a 24-character client id: refused as "Client identifier not valid"."""
    client = PahoClient(node, "p" * 24, protocol=mqtt.MQTTv31)
    try:
        rc, _ = client.connect()
        assert rc.is_failure and rc.getName() == "Client identifier not valid"
        assert client.wait_disconnected()
    finally:
        client.stop()


def test_v31_23_character_client_id_accepted(node) -> None:
    with RawClient.to(node, 3) as client:
        cid = ("v31-" + unique("x"))[:23].ljust(23, "z")
        assert len(cid) == 23
        assert client.connect(cid).reason_code == 0
        client.disconnect()


def test_v31_has_no_session_present_flag(node) -> None:
    """3.1's CONNACK first byte is reserved: 0 even when a stored session is resumed."""
    cid = unique("v31sp")[:23]
    first = raw_connected(node, cid, version=3, clean=False)
    first.disconnect()
    with RawClient.to(node, 3) as again:
        assert again.connect(cid, clean=False) == c.Connack(False, 0)
        again.disconnect()
    end_session(node, cid)


def test_v31_unsupported_level_with_mqisdp_name_closes(node) -> None:
    """A CONNECT naming ``MQIsdp`` with level 4 is no known protocol: CONNACK 0x01 or a plain close."""
    cid = b"x"
    body = b"\x00\x06MQIsdp\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    with RawClient.to(node, 3) as client:
        client.send_bytes(bytes((0x10, len(body))) + body)
        assert client.wait_closed() in ([], [c.Connack(False, 1)])


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_v31_paho_publish_and_subscribe(node, qos: int) -> None:
    """paho MQTTv31 on both ends, each QoS."""
    topic = unique("v31/t")
    sub = paho_connected(node, unique("v31s")[:23], protocol=mqtt.MQTTv31)
    pub = paho_connected(node, unique("v31p")[:23], protocol=mqtt.MQTTv31)
    try:
        assert sub.subscribe(topic, qos) == [qos]
        pub.publish(topic, b"three-one", qos)
        msg = sub.get()
        assert (msg.topic, msg.payload, msg.qos) == (topic, b"three-one", qos)
    finally:
        pub.disconnect()
        sub.disconnect()


def test_v31_persistent_session_gets_queued_messages(node) -> None:
    """3.1 clean session 0: QoS 1 messages published while away arrive on reconnect, and the unacknowledged
    one is resent with DUP and the same packet id."""
    topic = unique("v31/persist")
    cid = unique("v31per")[:23]
    sub = raw_connected(node, cid, version=3, clean=False)
    sub.subscribe(1, (topic, 1))
    pub = paho_connected(node, unique("v31pp")[:23])
    try:
        pub.publish(topic, b"m1", 1)
        first = sub.expect(c.Publish)
        sub.drop()  # without PUBACK
        pub.publish(topic, b"m2", 1)
        sub = RawClient.to(node, 3)
        assert sub.connect(cid, clean=False).reason_code == 0
        again = sub.expect(c.Publish)
        assert (again.payload, again.dup, again.packet_id) == (b"m1", True, first.packet_id)
        queued = sub.expect(c.Publish)
        assert (queued.payload, queued.dup) == (b"m2", False)
        sub.ack(again)
        sub.ack(queued)
        sub.disconnect()
    finally:
        pub.disconnect()
        end_session(node, cid)


@pytest.mark.parametrize("other", [mqtt.MQTTv311, mqtt.MQTTv5])
def test_v31_interoperates_with_newer_clients(node, other: int) -> None:
    """A 3.1 publisher reaches a 3.1.1 / 5.0 subscriber, and the other way round."""
    t1, t2 = unique("v31/to-new"), unique("v31/from-new")
    old = paho_connected(node, unique("v31o")[:23], protocol=mqtt.MQTTv31)
    new = paho_connected(node, unique("new"), protocol=other)
    try:
        old.subscribe(t2, 1)
        new.subscribe(t1, 1)
        old.publish(t1, b"old to new", 1)
        new.publish(t2, b"new to old", 1)
        assert new.get().payload == b"old to new"
        assert old.get().payload == b"new to old"
    finally:
        old.disconnect()
        new.disconnect()


def test_v31_will_published(node) -> None:
    """3.1 wills work as in 3.1.1: published when the connection drops without DISCONNECT."""
    topic = unique("v31/will")
    watcher = paho_connected(node, unique("v31w"))
    try:
        watcher.subscribe(topic, 1)
        client = raw_connected(node, unique("v31will")[:23], version=3, will=c.Will(topic, b"31 gone", 1))
        client.close()
        msg = watcher.get()
        assert (msg.topic, msg.payload) == (topic, b"31 gone")
    finally:
        watcher.disconnect()
