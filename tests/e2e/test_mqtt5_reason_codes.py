"""MQTT 5.0 reason codes on every acknowledgement and on DISCONNECT in both directions, with reason
strings (limits that need their own config are in test_mqtt5_limits.py)."""

from __future__ import annotations

import pytest

from fluxmq._core import codec as c
from tests.e2e.mqtt5raw import Raw5, disconnect_of, module_node, paho5, raw5, unique

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with module_node(tmp_path_factory) as n:
        yield n


def test_puback_and_pubrec_success_and_no_matching_subscribers(node) -> None:
    """PUBACK/PUBREC 0x00 when a subscriber got the message, 0x10 when nobody subscribes (MQTT 5.0 3.4.2.1)."""
    topic = unique("rc/pub")
    sub = raw5(node, unique("rc-sub"))
    pub = raw5(node, unique("rc-pub"))
    try:
        assert pub.publish(topic, b"x", 1, packet_id=1).reason_code == 0x10
        assert pub.publish(topic, b"x", 2, packet_id=2).reason_code == 0x10
        pub.send(c.Pubrel(2))
        assert pub.expect(c.Pubcomp) == c.Pubcomp(2)
        sub.subscribe(1, (topic, 0))
        assert pub.publish(topic, b"x", 1, packet_id=3).reason_code == 0x00
        assert pub.publish(topic, b"x", 2, packet_id=4).reason_code == 0x00
        pub.send(c.Pubrel(4))
        assert pub.expect(c.Pubcomp).reason_code == 0
    finally:
        sub.disconnect()
        pub.disconnect()


@pytest.mark.parametrize("qos", [1, 2])
def test_publish_to_sys_is_not_authorized_with_reason_string(node, qos: int) -> None:
    """A PUBLISH to $SYS is refused with 0x87 Not authorized and a reason string; nobody receives it."""
    client = raw5(node, unique("rc-sys"))
    try:
        ack = client.publish("$SYS/broker/fake", b"x", qos, packet_id=9)
        assert ack.reason_code == 0x87
        assert "broker" in ack.properties[c.REASON_STRING]
    finally:
        client.disconnect()


def test_unknown_packet_ids_get_0x92_MQTT_4_3_3(node) -> None:
    """PUBREL for an unknown id gets PUBCOMP 0x92, PUBREC for an unknown id gets PUBREL 0x92."""
    client = raw5(node, unique("rc-92"))
    try:
        client.send(c.Pubrel(77))
        comp = client.expect(c.Pubcomp)
        assert (comp.packet_id, comp.reason_code) == (77, 0x92)
        assert c.REASON_STRING in comp.properties
        client.send(c.Pubrec(78))
        rel = client.expect(c.Pubrel)
        assert (rel.packet_id, rel.reason_code) == (78, 0x92)
    finally:
        client.disconnect()


def test_suback_codes_granted_qos_and_invalid_filter(node) -> None:
    """SUBACK has the granted QoS per filter and 0x8F for an invalid one, with a reason string."""
    client = raw5(node, unique("rc-suback"))
    try:
        ack = client.subscribe(1, ("a/0", 0), ("a/1", 1), ("a/2", 2), ("a/#/b", 1), ("$share/g+/x", 1))
        assert ack.reason_codes == [0, 1, 2, 0x8F, 0x8F]
        assert "a/#/b" in ack.properties[c.REASON_STRING]
    finally:
        client.disconnect()


def test_unsuback_success_and_no_subscription_existed(node) -> None:
    """UNSUBACK 0x00 for a removed subscription and 0x11 for a filter that had none."""
    client = raw5(node, unique("rc-unsuback"))
    try:
        client.subscribe(1, ("u/a", 1))
        client.send(c.Unsubscribe(2, ["u/a", "u/none"]))
        assert client.expect(c.Unsuback).reason_codes == [0x00, 0x11]
    finally:
        client.disconnect()


def test_paho_sees_reason_codes(node) -> None:
    """paho MQTTv5: SUBACK codes, and an error PUBACK still completes the publish."""
    client = paho5(node, unique("rc-paho"))
    try:
        codes = client.subscribe("p/#", 2)
        assert [int(code.value) for code in codes] == [2]
        client.publish("$SYS/nope", b"x", 1)
    finally:
        client.disconnect()


def test_takeover_disconnects_with_0x8E_MQTT_3_1_4_3(node) -> None:
    """A second connection with the same client id closes the first with DISCONNECT 0x8E [MQTT-3.1.4-3]."""
    cid = unique("rc-take")
    first = raw5(node, cid)
    second = raw5(node, cid)
    try:
        assert disconnect_of(first.wait_closed()).reason_code == 0x8E
    finally:
        second.disconnect()


def test_paho_gets_takeover_reason(node) -> None:
    cid = unique("rc-ptake")
    first = paho5(node, cid)
    second = paho5(node, cid)
    try:
        assert first.wait_disconnected()
        assert int(first.disconnect_reason.value) == 0x8E
    finally:
        first.stop()
        second.disconnect()


def test_keepalive_timeout_disconnects_with_0x8D_MQTT_3_1_2_24(node) -> None:
    """Nothing received for 1.5 x keep alive: DISCONNECT 0x8D, then close [MQTT-3.1.2-24]."""
    client = raw5(node, unique("rc-ka"), keepalive=1)
    assert disconnect_of(client.wait_closed()).reason_code == 0x8D


def test_second_connect_is_a_protocol_error_0x82_MQTT_3_1_0_2(node) -> None:
    client = raw5(node, unique("rc-2conn"))
    client.send(c.Connect(unique("again"), True, 60, 5))
    packets = client.wait_closed()
    assert disconnect_of(packets).reason_code == 0x82
    assert c.REASON_STRING in disconnect_of(packets).properties


def test_auth_without_method_is_a_protocol_error_0x82(node) -> None:
    client = raw5(node, unique("rc-auth"))
    client.send(c.Auth(0x19, {c.AUTHENTICATION_METHOD: "SCRAM-SHA-256"}))
    assert disconnect_of(client.wait_closed()).reason_code == 0x82


def test_malformed_packet_disconnects_with_0x81(node) -> None:
    """A PUBLISH with QoS 3 is malformed: DISCONNECT 0x81 [MQTT-3.3.1-4]."""
    client = raw5(node, unique("rc-81"))
    client.send_bytes(b"\x36\x05\x00\x01t\x00\x01")
    assert disconnect_of(client.wait_closed()).reason_code == 0x81


def test_invalid_utf8_payload_with_format_indicator(node) -> None:
    """Payload Format Indicator 1 with a payload that is not UTF-8: PUBACK/PUBREC 0x99 for QoS 1/2,
    DISCONNECT 0x99 for QoS 0 (MQTT 5.0 3.3.2.3.2); a valid one is routed."""
    topic = unique("rc-pfi")
    sub = raw5(node, unique("rc-pfi-sub"))
    sub.subscribe(1, (topic, 1))
    client = raw5(node, unique("rc-pfi"))
    try:
        bad = {c.PAYLOAD_FORMAT_INDICATOR: 1}
        assert client.publish(topic, b"\xff\xfe", 1, packet_id=1, properties=bad).reason_code == 0x99
        assert client.publish(topic, b"\xc3\x28", 2, packet_id=2, properties=bad).reason_code == 0x99
        assert client.publish(topic, "ok ü".encode(), 1, packet_id=3, properties=bad).reason_code == 0
        got = sub.expect(c.Publish)
        assert (got.payload, got.properties) == ("ok ü".encode(), {c.PAYLOAD_FORMAT_INDICATOR: 1})
        client.publish(topic, b"\xed\xa0\x80", 0, properties=bad)  # an encoded surrogate is not UTF-8
        assert disconnect_of(client.wait_closed()).reason_code == 0x99
    finally:
        client.close()
        sub.disconnect()


def test_client_disconnect_with_error_code_is_accepted(node) -> None:
    """The client may DISCONNECT with an error reason code; the broker sends nothing back and closes."""
    client = raw5(node, unique("rc-cdis"))
    client.send(c.Disconnect(0x80, {c.REASON_STRING: "client trouble"}))
    assert client.wait_closed() == []


def test_shutdown_disconnects_with_0x8B(node_factory) -> None:
    """Stopping the node sends DISCONNECT 0x8B Server shutting down to 5.0 clients."""
    n = node_factory()
    client = raw5(n, unique("rc-8b"))
    paho = paho5(n, unique("rc-8b-paho"))
    n.process.send_signal(15)
    assert disconnect_of(client.wait_closed()).reason_code == 0x8B
    assert paho.wait_disconnected() and int(paho.disconnect_reason.value) == 0x8B
    paho.stop()
    assert n.wait() == 0


def test_connect_refused_when_auth_method_unknown_0x8C_MQTT_4_12_0_1(node) -> None:
    """No enhanced authentication configured: a CONNECT with a method gets CONNACK 0x8C and a close."""
    client = Raw5(node)
    connack = client.connect(unique("rc-8c"), properties={c.AUTHENTICATION_METHOD: "SCRAM-SHA-256"})
    assert connack.reason_code == 0x8C and c.REASON_STRING in connack.properties
    assert client.wait_closed() == []


def test_subscription_identifier_from_a_client_is_a_protocol_error_MQTT_3_3_4_6(node) -> None:
    """A client must not put a Subscription Identifier in a PUBLISH [MQTT-3.3.4-6]: DISCONNECT 0x82."""
    client = raw5(node, unique("rc-subid"))
    client.publish(unique("rc/subid"), b"x", properties={c.SUBSCRIPTION_IDENTIFIER: [3]})
    assert disconnect_of(client.wait_closed()).reason_code == 0x82


def test_connack_reason_string_left_out_when_too_big_MQTT_3_2_2_19(node) -> None:
    """A refusing CONNACK keeps its reason code but drops the reason string when the client's Maximum
    Packet Size is too small for it [MQTT-3.2.2-19]."""
    client = Raw5(node)
    connack = client.connect(
        unique("rc-small"), properties={c.AUTHENTICATION_METHOD: "X-UNKNOWN", c.MAXIMUM_PACKET_SIZE: 8}
    )
    assert (connack.reason_code, connack.properties) == (0x8C, {})
    client.close()


def test_reason_strings_on_disconnect_and_connack_follow_request_problem_information_MQTT_3_1_2_29(
    node,
) -> None:
    """Request Problem Information 0 allows a Reason String on CONNACK and DISCONNECT only
    [MQTT-3.1.2-29]; fluxmq keeps it on a refusing CONNACK (the client has nothing else to learn the
    reason from) and leaves it off its DISCONNECT, as the client asked (docs/conformance.rst)."""
    quiet = {c.REQUEST_PROBLEM_INFORMATION: 0}
    client = raw5(node, unique("rpi0-disc"), properties=quiet)
    client.send(c.Connect(unique("again"), True, 60, 5))
    disconnect = disconnect_of(client.wait_closed())
    assert disconnect.reason_code == 0x82 and c.REASON_STRING not in disconnect.properties
    refused = Raw5(node)
    connack = refused.connect(
        unique("rpi0-connack"), properties={**quiet, c.AUTHENTICATION_METHOD: "X-UNKNOWN"}
    )
    assert connack.reason_code == 0x8C and c.REASON_STRING in connack.properties
    assert refused.wait_closed() == []
