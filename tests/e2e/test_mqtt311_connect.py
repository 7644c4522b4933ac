"""CONNECT / CONNACK end to end (MQTT 3.1.1): return codes, client id rules, the session present flag."""

from __future__ import annotations

import paho.mqtt.client as mqtt
import pytest

from fluxmq._core import codec as c
from tests.e2e.mqttraw import (
    ConnectionClosed,
    PahoClient,
    RawClient,
    paho_connected,
    raw_connected,
    unique,
    wait_until,
)

pytestmark = pytest.mark.e2e


def connect_bytes(client_id: str, level: int = 4, name: bytes = b"MQTT", flags: int = 0x02) -> bytes:
    """A CONNECT built by hand, so the protocol level and name can be anything."""
    cid = client_id.encode()
    body = len(name).to_bytes(2, "big") + name + bytes((level, flags)) + b"\x00\x3c"
    body += len(cid).to_bytes(2, "big") + cid
    assert len(body) < 128
    return bytes((0x10, len(body))) + body


def test_connect_accepted_return_code_0_MQTT_3_2_2_1(node) -> None:
    """CONNACK 0 with session present 0 for a clean session [MQTT-3.2.2-1], the first packet sent [MQTT-3.2.0-1]."""
    with RawClient.to(node) as client:
        client.send_bytes(connect_bytes(unique("ok")))
        assert client.recv() == c.Connack(False, 0)


def test_unsupported_protocol_level_returns_1_and_closes_MQTT_3_1_2_2(node) -> None:
    """An unknown protocol level gets CONNACK 0x01 and the connection is closed [MQTT-3.1.2-2, MQTT-3.2.2-5]."""
    with RawClient.to(node) as client:
        client.send_bytes(connect_bytes(unique("lvl"), level=7))
        packets = client.wait_closed()
    assert packets == [c.Connack(False, 1)]


def test_empty_client_id_needs_clean_session_MQTT_3_1_3_8(node) -> None:
    """Empty client id with clean session 0: CONNACK 0x02 and close [MQTT-3.1.3-8], session present 0 [MQTT-3.2.2-4]."""
    with RawClient.to(node) as client:
        connack = client.connect("", clean=False)
        assert connack == c.Connack(False, 2)
        assert client.wait_closed() == []


def test_refused_connect_data_after_it_is_not_processed_MQTT_3_1_4_5(node) -> None:
    """A PUBLISH sent right after a refused CONNECT is not routed [MQTT-3.1.4-5]."""
    topic = unique("refused/data")
    sentinel = unique("refused/sentinel")
    sub = paho_connected(node, unique("refused-sub"))
    try:
        sub.subscribe(topic, 1)
        sub.subscribe(sentinel, 1)
        with RawClient.to(node) as client:
            client.send(c.Connect("", False, 60, 4), c.Publish(topic, b"must not arrive", 0))
            assert client.expect(c.Connack).reason_code == 2
            client.wait_closed()
        pub = paho_connected(node, unique("refused-pub"))
        pub.publish(sentinel, b"S", 1)
        pub.disconnect()
        before, _ = sub.collect_until(sentinel)
        assert [m.topic for m in before] == []
    finally:
        sub.disconnect()


def test_empty_client_id_with_clean_session_gets_unique_id_MQTT_3_1_3_6(node) -> None:
    """Empty client id with clean session 1 is accepted and treated as a unique client [MQTT-3.1.3-6]."""
    topic = unique("anon/t")
    a = raw_connected(node, "")
    b = raw_connected(node, "")  # would take over ``a`` if both had the same (empty) identity
    try:
        assert a.subscribe(1, (topic, 0)).reason_codes == [0]
        b.publish(topic, b"from b")
        msg = a.expect(c.Publish)
        assert (msg.topic, msg.payload) == (topic, b"from b")
        b.send(c.Pingreq())
        assert isinstance(b.recv(), c.Pingresp)  # b is still connected too
    finally:
        a.close()
        b.close()


def test_long_client_id_accepted_MQTT_3_1_3_5(node) -> None:
    """3.1.1 servers accept 1-23 character ids [MQTT-3.1.3-5]; fluxmq accepts longer ones too."""
    for cid in ("a", "Z9" * 11 + "x", "client-" + "x" * 200, "ünïcødé-id"):
        client = raw_connected(node, cid)
        client.disconnect()


def test_server_unavailable_return_code_3(node_factory) -> None:
    """Over ``server.tcp.plain.max_connections`` a CONNECT gets CONNACK 0x03 and the connection closes [MQTT-3.2.2-5]."""
    n = node_factory({"server.tcp.plain.max_connections": 1})
    first = None

    def first_accepted() -> bool:
        # The fixture's readiness probe may still count for a moment: retry until our client is the one.
        nonlocal first
        client = RawClient.to(n)
        try:
            if client.connect(unique("only")).reason_code == 0:
                first = client
                return True
        except ConnectionClosed:
            pass
        client.close()
        return False

    assert wait_until(first_accepted, 10)
    try:
        with RawClient.to(n) as second:
            assert second.connect(unique("over")) == c.Connack(False, 3)
            assert second.wait_closed() == []
        # paho sees the refusal as "Server unavailable" and its connection ends
        refused = PahoClient(n, unique("paho-over"))
        rc, present = refused.connect()
        assert rc.is_failure and rc.getName() == "Server unavailable" and present is False
        assert refused.wait_disconnected()
        refused.stop()
        first.send(c.Pingreq())
        assert isinstance(first.recv(), c.Pingresp)
        # the slot is freed when the first client leaves: a new client is accepted again
        first.disconnect()
        assert wait_until(first_accepted, 10)
    finally:
        first.close()


def test_session_present_0_with_clean_session_even_if_stored_MQTT_3_2_2_1(node) -> None:
    """A clean session CONNECT gets session present 0 even when a session was stored [MQTT-3.2.2-1]."""
    cid = unique("sp1")
    client = raw_connected(node, cid, clean=False)
    client.subscribe(1, (unique("sp1/t"), 1))
    client.disconnect()
    with RawClient.to(node) as again:
        assert again.connect(cid, clean=True) == c.Connack(False, 0)
        again.disconnect()


def test_session_present_1_when_session_stored_MQTT_3_2_2_2(node) -> None:
    """clean session 0 with a stored session: session present 1 [MQTT-3.2.2-2]."""
    cid = unique("sp2")
    client = raw_connected(node, cid, clean=False)
    client.disconnect()
    with RawClient.to(node) as again:
        assert again.connect(cid, clean=False) == c.Connack(True, 0)
        again.disconnect()
    # and the session is still there for a third connection
    with RawClient.to(node) as third:
        assert third.connect(cid, clean=False) == c.Connack(True, 0)
        third.disconnect()


def test_session_present_0_without_stored_session_MQTT_3_2_2_3(node) -> None:
    """clean session 0 without a stored session: session present 0 [MQTT-3.2.2-3]."""
    with RawClient.to(node) as client:
        assert client.connect(unique("sp3"), clean=False) == c.Connack(False, 0)
        client.disconnect()


def test_clean_session_ends_with_connection_MQTT_3_1_2_6(node) -> None:
    """A clean session is not kept after the connection: a later clean session 0 CONNECT finds none [MQTT-3.1.2-6]."""
    cid = unique("sp4")
    will_topic = unique("sp4/will")
    watcher = paho_connected(node, unique("sp4-watch"))
    try:
        watcher.subscribe(will_topic, 0)
        client = raw_connected(node, cid, clean=True, will=c.Will(will_topic, b"gone"))
        client.subscribe(1, (unique("sp4/t"), 1))
        client.close()  # ungraceful: the session must end all the same
        assert watcher.get().topic == will_topic  # the broker has handled the close
    finally:
        watcher.disconnect()
    with RawClient.to(node) as probe:
        assert probe.connect(cid, clean=False) == c.Connack(False, 0)
        probe.disconnect()


def test_paho_session_present_flag_MQTT_3_2_2_2(node) -> None:
    """paho sees session present 0 on the first and 1 on the second clean_session=False connect."""
    cid = unique("paho-sp")
    first = paho_connected(node, cid, clean_session=False)
    assert first.connack[1] is False
    first.disconnect()
    second = paho_connected(node, cid, clean_session=False)
    try:
        assert second.connack[1] is True
    finally:
        second.disconnect()
    third = paho_connected(node, cid, clean_session=True)
    try:
        assert third.connack[1] is False
    finally:
        third.disconnect()


def test_paho_v311_connects_with_return_code_0_MQTT_3_1_4_4(node) -> None:
    client = paho_connected(node, unique("paho-ok"), protocol=mqtt.MQTTv311)
    try:
        rc, present = client.connack
        assert rc == 0 and present is False
    finally:
        client.disconnect()


def test_username_and_password_accepted_without_auth_MQTT_3_1_2_19(node) -> None:
    """CONNECT with user name and password (flags 0xC2) is accepted when no authentication is configured
    [MQTT-3.1.2-19, MQTT-3.1.2-21]."""
    with RawClient.to(node) as client:
        client.send(c.Connect(unique("userpw"), True, 60, 4, None, "user", b"secret"))
        assert client.expect(c.Connack) == c.Connack(False, 0)
        client.disconnect()
