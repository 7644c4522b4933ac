"""MQTT 5.0 wills: DISCONNECT reason codes, Will Delay Interval, min(delay, session expiry), a reconnect
cancelling a delayed will, will properties and the will's own Message Expiry Interval."""

from __future__ import annotations

import time

import pytest
from paho.mqtt.packettypes import PacketTypes

from fluxmq._core import codec as c
from tests.e2e.mqtt5raw import Paho5, Raw5, module_node, props, raw5, unique

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with module_node(tmp_path_factory) as n:
        yield n


def will(topic: str, payload: bytes = b"gone", qos: int = 1, properties: dict | None = None) -> c.Will:
    return c.Will(topic, payload, qos, False, properties)


def watcher(node, topic: str) -> Raw5:
    client = raw5(node, unique("w-watch"))
    client.subscribe(1, (topic, 1), (topic + "/sentinel", 1))
    return client


def wills_before_sentinel(node, watch: Raw5, topic: str) -> list:
    """The will messages ``watch`` got on ``topic`` before a sentinel published now."""
    pub = raw5(node, unique("w-sent"))
    pub.publish(topic + "/sentinel", b"S", 1, packet_id=1)
    pub.disconnect()
    return [p for p in watch.publishes_until(topic + "/sentinel") if p.topic == topic]


@pytest.mark.parametrize("reason, published", [(0x00, False), (0x04, True), (0x80, True), (0x83, True)])
def test_disconnect_reason_decides_the_will_MQTT_3_14_4_3(node, reason: int, published: bool) -> None:
    """DISCONNECT 0x00 discards the will [MQTT-3.14.4-3]; 0x04 (with will) and any error code publish it
    [MQTT-3.1.2-8]."""
    topic = unique("will/rc")
    watch = watcher(node, topic)
    try:
        client = raw5(node, unique("w-rc"), will=will(topic))
        client.disconnect(reason)
        got = watch.expect(c.Publish) if published else None
        if published:
            assert (got.topic, got.payload) == (topic, b"gone")
            watch.ack(got)
        else:
            assert wills_before_sentinel(node, watch, topic) == []
    finally:
        watch.disconnect()


def test_disconnect_setting_expiry_after_0_is_a_protocol_error_and_publishes_the_will_MQTT_3_14_2_2(
    node,
) -> None:
    """A DISCONNECT 0x00 that sets a Session Expiry Interval when the CONNECT had 0 is a Protocol
    Error (3.14.2.2.2): the server answers DISCONNECT 0x82, and as the connection ends on a protocol
    error, not a normal disconnection, the will is published [MQTT-3.1.2-8] (Mosquitto does so too)."""
    topic = unique("will/expiry")
    watch = watcher(node, topic)
    try:
        client = raw5(node, unique("w-exp"), will=will(topic))
        client.send(c.Disconnect(0, {c.SESSION_EXPIRY_INTERVAL: 30}))
        assert [p.reason_code for p in client.wait_closed() if isinstance(p, c.Disconnect)] == [0x82]
        got = watch.expect(c.Publish)
        assert (got.topic, got.payload) == (topic, b"gone")
        watch.ack(got)
    finally:
        watch.disconnect()


def test_paho_disconnect_with_will_message_0x04(node) -> None:
    topic = unique("will/paho")
    watch = watcher(node, topic)
    client = Paho5(node, unique("w-paho"))
    client.client.will_set(
        topic, b"paho-will", 1, False, props(PacketTypes.WILLMESSAGE, ContentType="text/plain")
    )
    client.connect()
    try:
        client.disconnect(0x04)
        got = watch.expect(c.Publish)
        assert (got.payload, got.properties) == (b"paho-will", {c.CONTENT_TYPE: "text/plain"})
        watch.ack(got)
    finally:
        watch.disconnect()


def test_will_properties_are_forwarded_MQTT_3_1_3(node) -> None:
    """Payload Format Indicator, Content Type, Response Topic, Correlation Data and User Properties of
    the will reach subscribers; Will Delay Interval does not."""
    topic = unique("will/props")
    watch = watcher(node, topic)
    try:
        wp = {
            c.PAYLOAD_FORMAT_INDICATOR: 1,
            c.CONTENT_TYPE: "application/json",
            c.RESPONSE_TOPIC: "r/t",
            c.CORRELATION_DATA: b"\x01\x02",
            c.USER_PROPERTY: [("a", "1"), ("a", "2"), ("b", "x")],
            c.WILL_DELAY_INTERVAL: 0,
        }
        client = raw5(node, unique("w-props"), will=c.Will(topic, b'{"x":1}', 1, False, wp))
        client.close()
        got = watch.expect(c.Publish)
        expected = dict(wp)
        del expected[c.WILL_DELAY_INTERVAL]
        assert got.properties == expected
        watch.ack(got)
    finally:
        watch.disconnect()


def test_will_delay_then_published(node) -> None:
    """Will Delay Interval 1 with a longer session: the will comes once, after the delay (MQTT 5.0 3.1.3.2.2)."""
    topic = unique("will/delay")
    watch = watcher(node, topic)
    try:
        client = raw5(
            node,
            unique("w-delay"),
            will=will(topic, properties={c.WILL_DELAY_INTERVAL: 1}),
            properties={c.SESSION_EXPIRY_INTERVAL: 60},
        )
        client.close()
        started = time.monotonic()
        got = watch.expect(c.Publish)
        assert got.topic == topic and time.monotonic() - started >= 0.9
        watch.ack(got)
    finally:
        watch.disconnect()


def test_reconnect_within_the_delay_cancels_the_will_MQTT_3_1_2_26(node) -> None:
    """A reconnect of the same session before the Will Delay Interval passes: no will [MQTT-3.1.2-26]."""
    topic = unique("will/cancel")
    cid = unique("w-cancel")
    watch = watcher(node, topic)
    try:
        client = raw5(
            node,
            cid,
            clean_start=False,
            will=will(topic, properties={c.WILL_DELAY_INTERVAL: 2}),
            properties={c.SESSION_EXPIRY_INTERVAL: 60},
        )
        client.close()
        again = raw5(node, cid, clean_start=False, properties={c.SESSION_EXPIRY_INTERVAL: 60})
        assert again.connack.session_present
        time.sleep(2.5)  # past the delay the will would have had
        assert wills_before_sentinel(node, watch, topic) == []
        again.disconnect(0, {c.SESSION_EXPIRY_INTERVAL: 0})
    finally:
        watch.disconnect()


def test_will_published_when_the_session_ends_before_the_delay_MQTT_3_1_2_8(node) -> None:
    """Will Delay 60 s but Session Expiry 1 s: the will goes when the session ends, min(delay, expiry)."""
    topic = unique("will/min")
    watch = watcher(node, topic)
    try:
        client = raw5(
            node,
            unique("w-min"),
            will=will(topic, properties={c.WILL_DELAY_INTERVAL: 60}),
            properties={c.SESSION_EXPIRY_INTERVAL: 1},
        )
        client.close()
        got = watch.expect(c.Publish)
        assert got.topic == topic
        watch.ack(got)
    finally:
        watch.disconnect()


def test_will_delay_with_session_expiry_zero_publishes_at_once(node) -> None:
    """No Session Expiry Interval (0): the session ends with the connection, so does the delay."""
    topic = unique("will/zero")
    watch = watcher(node, topic)
    try:
        client = raw5(node, unique("w-zero"), will=will(topic, properties={c.WILL_DELAY_INTERVAL: 60}))
        client.close()
        assert watch.expect(c.Publish).topic == topic
    finally:
        watch.disconnect()


def test_will_message_expiry_counts_from_publication(node) -> None:
    """A will's Message Expiry Interval starts when the will is published, not at CONNECT (MQTT 5.0
    3.1.3.2.4): a connection that lived longer than the interval still delivers it, with the interval."""
    topic = unique("will/exp")
    watch = watcher(node, topic)
    try:
        client = raw5(node, unique("w-exp"), will=will(topic, properties={c.MESSAGE_EXPIRY_INTERVAL: 1}))
        time.sleep(1.5)  # longer than the will's expiry
        client.close()
        got = watch.expect(c.Publish)
        assert got.properties.get(c.MESSAGE_EXPIRY_INTERVAL) == 1
        watch.ack(got)
    finally:
        watch.disconnect()


def test_will_payload_not_utf8_is_refused_with_0x99(node) -> None:
    """A will whose Payload Format Indicator says UTF-8 but whose payload is not: CONNACK 0x99."""
    client = Raw5(node)
    connack = client.connect(
        unique("w-99"), will=c.Will("w/t", b"\xff", 0, False, {c.PAYLOAD_FORMAT_INDICATOR: 1})
    )
    assert connack.reason_code == 0x99
    assert client.wait_closed() == []


def test_takeover_publishes_the_will_of_the_old_connection(node) -> None:
    """Taken over by a clean start: the old connection's will (no delay) is published."""
    topic = unique("will/take")
    cid = unique("w-take")
    watch = watcher(node, topic)
    try:
        first = raw5(node, cid, will=will(topic))
        second = raw5(node, cid)
        assert watch.expect(c.Publish).topic == topic
        first.close()
        second.disconnect()
    finally:
        watch.disconnect()


def test_resuming_takeover_does_not_publish_the_will_MQTT_3_1_3_9(node) -> None:
    """A Clean Start 0 reconnect while the old connection is still open resumes the session: it counts
    as a new connection made before the will delay passed, so the will (delay 0, session expiry 60) is
    not sent [MQTT-3.1.2-8, MQTT-3.1.3-9], as Mosquitto does; no spurious "offline" message."""
    topic = unique("will/resume")
    cid = unique("w-resume")
    watch = watcher(node, topic)
    session = {c.SESSION_EXPIRY_INTERVAL: 60}
    try:
        first = raw5(node, cid, clean_start=False, properties=session, will=will(topic))
        second = raw5(node, cid, clean_start=False, properties=session)
        assert second.connack.session_present
        assert c.Disconnect in {type(p) for p in first.wait_closed()}  # taken over (0x8E)
        assert wills_before_sentinel(node, watch, topic) == []
        second.disconnect(properties={c.SESSION_EXPIRY_INTERVAL: 0})
    finally:
        watch.disconnect()


def test_clean_start_takeover_of_a_continuing_session_publishes_the_will_MQTT_3_1_4_3(node) -> None:
    """Clean Start 1 ends the old session (MQTT 5.0 3.1.2.4); the will is published when the session
    ends, whatever its delay (MQTT 5.0 3.1.2.5, and 3.1.4 step 3 for a takeover)."""
    topic = unique("will/restart")
    cid = unique("w-restart")
    watch = watcher(node, topic)
    try:
        first = raw5(
            node,
            cid,
            clean_start=False,
            properties={c.SESSION_EXPIRY_INTERVAL: 60},
            will=will(topic, properties={c.WILL_DELAY_INTERVAL: 30}),
        )
        second = raw5(node, cid, clean_start=True)
        assert not second.connack.session_present
        first.wait_closed()
        assert [p.payload for p in wills_before_sentinel(node, watch, topic)] == [b"gone"]
        second.disconnect()
    finally:
        watch.disconnect()
