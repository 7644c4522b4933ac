"""Malformed packets and protocol violations: only the offending connection closes.

Each case opens a raw connection, sends broken bytes and checks that the broker closes that
connection (5.0 clients first get a DISCONNECT with the spec's reason code: 0x81 Malformed Packet,
0x82 Protocol Error, 0x90 Topic Name invalid, 0x95 Packet too large) while a well-behaved paho client,
connected before, keeps exchanging messages, and the node process lives on [MQTT-4.8.0-1].
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fluxmq._core import codec as c
from tests.conftest import NodeFactory
from tests.e2e.mqttraw import RawClient, paho_connected, unique

pytestmark = pytest.mark.e2e

MAX_PACKET = 4096  # broker.max_packet_size of the module's node


@pytest.fixture(scope="module")
def small_node(tmp_path_factory):
    factory = NodeFactory(tmp_path_factory.mktemp("malformed"))
    try:
        yield factory({"broker.max_packet_size": MAX_PACKET})
    finally:
        factory.close()


@pytest.fixture(scope="module")
def good(small_node):
    """The well-behaved client, connected before any broken one."""
    client = paho_connected(small_node, unique("good"))
    topic = unique("good/echo")
    client.subscribe(topic, 1)
    client.echo_topic = topic
    yield client
    client.disconnect()


def assert_still_serving(node, good) -> None:
    """The node is alive and the good client still publishes and receives."""
    assert node.returncode is None
    assert good.is_connected
    payload = unique("ping").encode()
    good.publish(good.echo_topic, payload, 1)
    assert good.get().payload == payload


# -- byte builders ---------------------------------------------------------------------------------


def rl(n: int) -> bytes:
    """Remaining Length as a variable byte integer."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def s(raw: bytes) -> bytes:
    """A length-prefixed MQTT string from raw bytes (which may be invalid UTF-8 on purpose)."""
    return len(raw).to_bytes(2, "big") + raw


def publish_raw(
    topic: bytes, payload: bytes = b"x", first: int = 0x30, pid: bytes = b"", props: bytes | None = None
) -> bytes:
    body = s(topic) + pid + (props if props is not None else b"") + payload
    return bytes((first,)) + rl(len(body)) + body


def connect_raw(version: int, flags: int, payload: bytes, name: bytes = b"MQTT") -> bytes:
    body = s(name) + bytes((version, flags)) + b"\x00\x3c" + (b"\x00" if version == 5 else b"") + payload
    return b"\x10" + rl(len(body)) + body


# Each case: bytes to send after an accepted CONNECT, as a function of the protocol version (5.0 PUBLISH
# has a properties length byte), and the 5.0 DISCONNECT reason code.
def _pub(topic: bytes, payload: bytes = b"x", first: int = 0x30, pid: bytes = b"") -> Callable[[int], bytes]:
    return lambda v: publish_raw(topic, payload, first, pid, b"\x00" if v == 5 else b"")


AFTER_CONNECT = {
    "remaining_length_5_bytes_MQTT_1_5_5": (lambda v: b"\x30\xff\xff\xff\xff\x7f", 0x81),
    "reserved_flags_subscribe_MQTT_3_8_1_1": (
        lambda v: b"\x80\x06\x00\x01\x00\x01a\x00" if v != 5 else b"\x80\x07\x00\x01\x00\x00\x01a\x00",
        0x81,
    ),
    "reserved_flags_pubrel_MQTT_2_2_2_2": (lambda v: b"\x60\x02\x00\x01", 0x81),
    "reserved_flags_pingreq_MQTT_2_2_2_2": (lambda v: b"\xc1\x00", 0x81),
    "publish_qos_3_MQTT_3_3_1_4": (_pub(b"a/b", first=0x36, pid=b"\x00\x01"), 0x81),
    "invalid_utf8_topic_MQTT_1_5_3_1": (_pub(b"a/\xc3\x28"), 0x81),
    "utf16_surrogate_in_topic_MQTT_1_5_3_1": (_pub(b"a/\xed\xa0\x80"), 0x81),
    "null_character_in_topic_MQTT_1_5_3_2": (_pub(b"a\x00b"), 0x81),
    "wildcard_plus_in_publish_topic_MQTT_3_3_2_2": (_pub(b"a/+/b"), 0x90),
    "wildcard_hash_in_publish_topic_MQTT_3_3_2_2": (_pub(b"a/#"), 0x90),
    "empty_publish_topic_MQTT_4_7_3_1": (_pub(b""), 0x82),
    "qos0_publish_with_dup_MQTT_3_3_1_2": (_pub(b"a/b", first=0x38), 0x81),
    "unsubscribe_without_filters_MQTT_3_10_3_2": (
        lambda v: b"\xa2\x02\x00\x01" if v != 5 else b"\xa2\x03\x00\x01\x00",
        0x82,
    ),
    "qos1_publish_packet_id_0_MQTT_2_3_1_1": (_pub(b"a/b", first=0x32, pid=b"\x00\x00"), 0x82),
    "subscribe_without_filters_MQTT_3_8_3_3": (
        lambda v: b"\x82\x02\x00\x01" if v != 5 else b"\x82\x03\x00\x01\x00",
        0x82,
    ),
    # 3.1.1: malformed [MQTT-3.8.3-4]; 5.0 calls Maximum QoS 3 a Protocol Error (0x82, see V5_REASON)
    "subscribe_qos_3_MQTT_3_8_3_4": (
        lambda v: b"\x82\x06\x00\x01\x00\x01a\x03" if v != 5 else b"\x82\x07\x00\x01\x00\x00\x01a\x03",
        0x81,
    ),
    "topic_length_beyond_packet": (lambda v: b"\x30\x03\x00\x10a", 0x81),
    "oversize_packet": (_pub(b"a/b", b"y" * (MAX_PACKET + 100)), 0x95),
    "oversize_remaining_length_only": (lambda v: b"\x30" + rl(MAX_PACKET * 10), 0x95),
    "second_connect_MQTT_3_1_0_2": (lambda v: c.encode(c.Connect(unique("again"), True, 60, v), v), 0x82),
    "garbage_bytes": (lambda v: b"\x00\x00garbage garbage garbage", 0x81),
    "server_only_packet_connack": (
        lambda v: b"\x20\x02\x00\x00" if v != 5 else b"\x20\x03\x00\x00\x00",
        0x82,
    ),
    "server_only_packet_suback": (
        lambda v: b"\x90\x03\x00\x01\x00" if v != 5 else b"\x90\x04\x00\x01\x00\x00",
        0x82,
    ),
}

# 5.0 reason codes where a 5.0 packet breaks a rule of its own (the 3.1.1 bytes above do not apply).
V5_ONLY = {
    "unknown_property_in_publish_MQTT_2_2_2_2": (
        lambda v: publish_raw(b"a/b", b"x", props=b"\x02\x7f\x00"),
        0x81,
    ),
    "topic_alias_0_MQTT_3_3_2_8": (lambda v: publish_raw(b"a/b", b"x", props=b"\x03\x23\x00\x00"), 0x94),
    "subscribe_retain_handling_3": (lambda v: b"\x82\x07\x00\x01\x00\x00\x01a\x30", 0x82),
    "subscribe_options_reserved_bits_MQTT_3_8_3_5": (lambda v: b"\x82\x07\x00\x01\x00\x00\x01a\xc0", 0x81),
    "no_local_on_shared_subscription_MQTT_3_8_3_4": (
        lambda v: b"\x82\x10\x00\x01\x00\x00\x0a$share/g/a\x04",
        0x82,
    ),
    # a reason code that is no DISCONNECT reason code (0x05 and 0x91 are PUBACK/SUBACK ones, 0xA3 none)
    "disconnect_reason_0x05_MQTT_3_14_2_1": (lambda v: b"\xe0\x01\x05", 0x81),
    "disconnect_reason_0x91_MQTT_3_14_2_1": (lambda v: b"\xe0\x02\x91\x00", 0x81),
    "disconnect_reason_0xa3_MQTT_3_14_2_1": (lambda v: b"\xe0\x01\xa3", 0x81),
}

# Where 5.0 names a different reason than the one listed for both versions.
V5_REASON = {"subscribe_qos_3_MQTT_3_8_3_4": 0x82}


@pytest.mark.parametrize("case", sorted(AFTER_CONNECT))
def test_v311_bad_packet_closes_only_that_connection_MQTT_4_8_0_1(small_node, good, case: str) -> None:
    build, _ = AFTER_CONNECT[case]
    with RawClient.to(small_node, 4) as bad:
        assert bad.connect(unique("bad311")).reason_code == 0
        bad.send_bytes(build(4))
        assert bad.wait_closed() == []  # 3.1.1 has no way to say why: just the close
    assert_still_serving(small_node, good)


@pytest.mark.parametrize("case", sorted(AFTER_CONNECT) + sorted(V5_ONLY))
def test_v5_bad_packet_gets_disconnect_reason_MQTT5_4_13_1_1(small_node, good, case: str) -> None:
    """5.0: the broker sends DISCONNECT with the reason code before closing [MQTT-4.13.1-1]."""
    build, reason = (AFTER_CONNECT | V5_ONLY)[case]
    reason = V5_REASON.get(case, reason)
    with RawClient.to(small_node, 5) as bad:
        assert bad.connect(unique("bad5")).reason_code == 0
        bad.send_bytes(build(5))
        packets = bad.wait_closed()
    assert [(type(p).__name__, p.reason_code) for p in packets] == [("Disconnect", reason)]
    assert_still_serving(small_node, good)


def test_v5_topic_alias_over_maximum_gets_0x94_MQTT_3_3_2_9(small_node, good) -> None:
    """A Topic Alias above the Topic Alias Maximum of the CONNACK: DISCONNECT 0x94 [MQTT-3.3.2-9]."""
    with RawClient.to(small_node, 5) as bad:
        connack = bad.connect(unique("alias5"))
        assert connack.reason_code == 0
        over = connack.properties.get(c.TOPIC_ALIAS_MAXIMUM, 0) + 1
        alias = b"\x03\x23" + over.to_bytes(2, "big")
        bad.send_bytes(publish_raw(b"a/b", b"x", props=alias))
        packets = bad.wait_closed()
    assert [(type(p).__name__, p.reason_code) for p in packets] == [("Disconnect", 0x94)]
    assert_still_serving(small_node, good)


BEFORE_CONNECT = {
    "first_packet_pingreq_MQTT_3_1_0_1": b"\xc0\x00",
    "first_packet_publish_MQTT_3_1_0_1": publish_raw(b"a/b"),
    "first_packet_subscribe_MQTT_3_1_0_1": b"\x82\x06\x00\x01\x00\x01a\x00",
    "garbage_first": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "zero_bytes_first": b"\x00" * 64,
    "connect_reserved_flag_MQTT_3_1_2_3": connect_raw(4, 0x03, s(b"rsv")),
    "connect_password_without_username_MQTT_3_1_2_22": connect_raw(4, 0x42, s(b"pw") + s(b"secret")),
    "connect_will_qos_without_will_flag_MQTT_3_1_2_13": connect_raw(4, 0x0A, s(b"wq")),
    "connect_will_qos_3_MQTT_3_1_2_14": connect_raw(4, 0x1E, s(b"wq3") + s(b"w/t") + s(b"m")),
    "connect_will_retain_without_will_MQTT_3_1_2_15": connect_raw(4, 0x22, s(b"wr")),
    "connect_invalid_utf8_client_id_MQTT_1_5_3_1": connect_raw(4, 0x02, s(b"\xff\xfe")),
    "connect_truncated_payload": connect_raw(4, 0x02, b"\x00\x10ab"),
}


@pytest.mark.parametrize("case", sorted(BEFORE_CONNECT))
def test_bad_first_packet_closes_without_connack_MQTT_3_1_4_1(small_node, good, case: str) -> None:
    """A first packet that is not a valid CONNECT: the connection is closed without CONNACK
    [MQTT-3.1.0-1, MQTT-3.1.4-1, MQTT-3.2.2-6]."""
    with RawClient.to(small_node, 4) as bad:
        bad.send_bytes(BEFORE_CONNECT[case])
        assert bad.wait_closed() == []
    assert_still_serving(small_node, good)


def test_wrong_protocol_name_closes_MQTT_3_1_2_1(small_node, good) -> None:
    """An unknown protocol name: the connection is closed (a CONNACK 0x01 before it is allowed)
    [MQTT-3.1.2-1]."""
    with RawClient.to(small_node, 4) as bad:
        bad.send_bytes(connect_raw(4, 0x02, s(b"name"), name=b"MQTX"))
        assert bad.wait_closed() in ([], [c.Connack(False, 1)])
    assert_still_serving(small_node, good)


def test_truncated_packet_then_close(small_node, good) -> None:
    """Half a PUBLISH and then the client vanishes: nothing is routed, the broker carries on."""
    topic = good.echo_topic
    with RawClient.to(small_node, 4) as bad:
        assert bad.connect(unique("trunc")).reason_code == 0
        data = c.encode(c.Publish(topic, b"half a message", 1, packet_id=3), 4)
        bad.send_bytes(data[: len(data) // 2])
    payload = unique("after-truncated").encode()
    good.publish(topic, payload, 1)
    assert good.get().payload == payload  # and not the half message before it
    assert_still_serving(small_node, good)


def test_bytes_after_malformed_packet_are_not_processed(small_node, good) -> None:
    """Bytes following a malformed packet in the same write are never acted on [MQTT-4.8.0-1]."""
    with RawClient.to(small_node, 4) as bad:
        assert bad.connect(unique("after-bad")).reason_code == 0
        follow = c.encode(c.Publish(good.echo_topic, b"must not be routed", 0), 4)
        bad.send_bytes(b"\xc1\x00" + follow)
        assert bad.wait_closed() == []
    payload = unique("sentinel").encode()
    good.publish(good.echo_topic, payload, 1)
    assert good.get().payload == payload


def test_many_bad_connections_in_a_row(small_node, good) -> None:
    """A burst of broken connections leaves the broker serving."""
    for i in range(50):
        with RawClient.to(small_node, 4) as bad:
            first = 0x20 + (i * 37) % 0xE0  # any type but CONNECT, Remaining Length 0, then junk
            bad.send_bytes(bytes((first, 0)) + bytes((i * 11 + k) % 256 for k in range(30)))
            bad.wait_closed()
    assert_still_serving(small_node, good)
