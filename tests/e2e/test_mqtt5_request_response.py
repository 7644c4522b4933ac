"""Request/response: Response Topic, Correlation Data, Content Type, Payload Format Indicator and User
Properties pass through unaltered (user properties in order, duplicates kept) [MQTT-3.3.2-4,
MQTT-3.3.2-15 to MQTT-3.3.2-20]; Response Information gives a requester its reply topic base."""

from __future__ import annotations

import pytest
from paho.mqtt.packettypes import PacketTypes

from fluxmq._core import codec as c
from tests.e2e.mqtt5raw import disconnect_of, module_node, paho5, props, raw5, unique

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with module_node(tmp_path_factory) as n:
        yield n


ALL = {
    c.PAYLOAD_FORMAT_INDICATOR: 1,
    c.CONTENT_TYPE: "application/json; charset=utf-8",
    c.RESPONSE_TOPIC: "replies/for/me",
    c.CORRELATION_DATA: b"\x00\x01corr\xff",
    c.USER_PROPERTY: [("b", "2"), ("a", "1"), ("b", "2"), ("b", "3"), ("", ""), ("ü", "値")],
}


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_application_properties_pass_through_unaltered(node, qos: int) -> None:
    """Every forwardable property reaches the subscriber byte for byte, user properties in their order
    with duplicates and empty strings kept [MQTT-3.3.2-17, MQTT-3.3.2-18]."""
    topic = unique("rr/pass")
    sub = raw5(node, unique("rr-sub"))
    pub = raw5(node, unique("rr-pub"))
    try:
        sub.subscribe(1, (topic, 2))
        pub.publish(topic, b'{"q": 1}', qos, packet_id=1 if qos else 0, properties=ALL)
        got = sub.expect(c.Publish)
        assert got.properties == ALL
        sub.ack(got)
    finally:
        sub.disconnect()
        pub.disconnect()


def test_retained_message_keeps_its_properties(node) -> None:
    topic = unique("rr/retained")
    pub = raw5(node, unique("rr-rpub"))
    pub.publish(topic, b"{}", 1, retain=True, packet_id=1, properties=ALL)
    sub = raw5(node, unique("rr-rsub"))
    try:
        sub.subscribe(1, (topic, 1))
        got = sub.expect(c.Publish)
        assert got.retain and got.properties == ALL
        sub.ack(got)
    finally:
        pub.publish(topic, b"", 1, retain=True, packet_id=2)
        pub.disconnect()
        sub.disconnect()


def test_response_topic_with_a_wildcard_is_refused_MQTT_3_3_2_14(node) -> None:
    """A Response Topic must not contain wildcards [MQTT-3.3.2-14]: the publisher is disconnected."""
    client = raw5(node, unique("rr-wild"))
    client.publish(unique("rr/wild"), b"x", properties={c.RESPONSE_TOPIC: "replies/#"})
    assert disconnect_of(client.wait_closed()).reason_code in (0x82, 0x90)


def test_request_response_between_paho_clients(node) -> None:
    """A requester asks for Response Information, subscribes under it, sends a request with Response
    Topic and Correlation Data; the responder answers there with the same Correlation Data."""
    service = unique("rr/service")
    responder = paho5(node, unique("rr-responder"))
    requester = paho5(node, unique("rr-requester"), props(PacketTypes.CONNECT, RequestResponseInformation=1))
    try:
        base = requester.connack[2].ResponseInformation
        assert base
        reply_topic = f"{base}/answers"
        requester.subscribe(reply_topic, 1)
        responder.subscribe(service, 1)
        requester.publish(
            service,
            b"2+2",
            1,
            properties=props(
                ResponseTopic=reply_topic,
                CorrelationData=b"req-1",
                ContentType="text/plain",
                UserProperty=[("trace", "t1"), ("trace", "t2")],
            ),
        )
        request = responder.get()
        assert (request.payload, request.properties.ResponseTopic, request.properties.CorrelationData) == (
            b"2+2",
            reply_topic,
            b"req-1",
        )
        assert request.properties.UserProperty == [("trace", "t1"), ("trace", "t2")]
        assert request.properties.ContentType == "text/plain"
        responder.publish(
            request.properties.ResponseTopic,
            b"4",
            1,
            properties=props(CorrelationData=request.properties.CorrelationData),
        )
        reply = requester.get()
        assert (reply.topic, reply.payload, reply.properties.CorrelationData) == (reply_topic, b"4", b"req-1")
    finally:
        requester.disconnect()
        responder.disconnect()


def test_paho_payload_format_indicator_and_content_type(node) -> None:
    topic = unique("rr/pfi")
    sub = paho5(node, unique("rr-psub"))
    pub = paho5(node, unique("rr-ppub"))
    try:
        sub.subscribe(topic, 0)
        pub.publish(
            topic, "grüße".encode(), 1, properties=props(PayloadFormatIndicator=1, ContentType="text/plain")
        )
        msg = sub.get()
        assert (msg.payload.decode(), msg.properties.PayloadFormatIndicator, msg.properties.ContentType) == (
            "grüße",
            1,
            "text/plain",
        )
    finally:
        sub.disconnect()
        pub.disconnect()
