"""MQTT 5.0 CONNECT/CONNACK on the shared listener: versions side by side, session expiry, the CONNACK
properties, Assigned Client Identifier, Response Information, problem information, user properties."""

from __future__ import annotations

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes

from fluxmq._core import codec as c
from tests.e2e.mqtt5raw import Paho5, Raw5, module_node, paho5, props, raw5, unique
from tests.e2e.mqttraw import PahoClient

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with module_node(tmp_path_factory) as n:
        yield n


@pytest.mark.parametrize("version", [3, 4, 5])
def test_one_listener_serves_every_version_MQTT_3_1_2_2(node, version: int) -> None:
    """The version is read from CONNECT: 3.1, 3.1.1 and 5.0 clients are accepted on the same port and
    get the CONNACK of their version (5.0 with properties) [MQTT-3.1.2-2]."""
    client = Raw5(node, version=version)
    try:
        connack = client.connect(unique("v")[:23])
        assert connack.reason_code == 0
        assert bool(connack.properties) == (version == 5)
        client.send(c.Pingreq())
        assert isinstance(client.recv(), c.Pingresp)
    finally:
        client.disconnect()


def test_versions_exchange_messages_and_3_1_1_subscribers_get_no_properties(node) -> None:
    """A 5.0 message with properties reaches 3.1 and 3.1.1 subscribers without them, and 5.0 subscribers
    with them; a 3.1.1 message reaches a 5.0 subscriber."""
    topic = unique("mix")
    sub31 = Raw5(node, version=3)
    sub311 = Raw5(node, version=4)
    sub31.connect(unique("s31")[:23])
    sub311.connect(unique("s311"))
    sub5 = raw5(node, unique("s5"))
    pub311 = PahoClient(node, unique("p311"))
    pub311.connect()
    pub5 = paho5(node, unique("p5"))
    try:
        for client in (sub31, sub311, sub5):
            client.subscribe(1, (topic, 1))
        pub5.publish(
            topic, b"from5", 1, properties=props(UserProperty=[("k", "v")], ContentType="text/plain")
        )
        pub311.publish(topic, b"from311", 1)
        for client in (sub31, sub311):
            got = [client.expect(c.Publish) for _ in range(2)]
            assert [(p.payload, p.properties) for p in got] == [(b"from5", {}), (b"from311", {})]
            for p in got:
                client.ack(p)
        got = [sub5.expect(c.Publish) for _ in range(2)]
        assert got[0].payload == b"from5"
        assert got[0].properties == {c.USER_PROPERTY: [("k", "v")], c.CONTENT_TYPE: "text/plain"}
        assert (got[1].payload, got[1].properties) == (b"from311", {})
    finally:
        pub5.disconnect()
        pub311.disconnect()
        for client in (sub31, sub311, sub5):
            client.disconnect()


def test_connack_announces_limits_and_availability_MQTT_3_2_2(node) -> None:
    """CONNACK carries Receive Maximum, Maximum Packet Size, Topic Alias Maximum and says wildcard,
    subscription identifier and shared subscriptions are available; Maximum QoS and Retain Available
    are absent at their defaults (2, available)."""
    client = raw5(node, unique("cprops"))
    try:
        p = client.connack.properties
        assert p[c.RECEIVE_MAXIMUM] == 100
        assert p[c.MAXIMUM_PACKET_SIZE] == 2097152
        assert p[c.TOPIC_ALIAS_MAXIMUM] == 100
        assert p[c.WILDCARD_SUBSCRIPTION_AVAILABLE] == 1
        assert p[c.SUBSCRIPTION_IDENTIFIER_AVAILABLE] == 1
        assert p[c.SHARED_SUBSCRIPTION_AVAILABLE] == 1
        assert c.MAXIMUM_QOS not in p and c.RETAIN_AVAILABLE not in p
        assert c.ASSIGNED_CLIENT_IDENTIFIER not in p and c.RESPONSE_INFORMATION not in p
    finally:
        client.disconnect()


def test_assigned_client_identifier_for_an_empty_id_MQTT_3_2_2_16(node) -> None:
    """An empty client id gets a unique id in CONNACK's Assigned Client Identifier [MQTT-3.1.3-6, MQTT-3.2.2-16];
    it names the session (a takeover with it closes the first connection)."""
    a = raw5(node, "")
    b = raw5(node, "")
    try:
        ida = a.connack.properties[c.ASSIGNED_CLIENT_IDENTIFIER]
        idb = b.connack.properties[c.ASSIGNED_CLIENT_IDENTIFIER]
        assert ida and idb and ida != idb
        c2 = raw5(node, ida)
        assert disconnect_reason(a) == 0x8E
        c2.disconnect()
    finally:
        a.close()
        b.disconnect()


def disconnect_reason(client: Raw5) -> int:
    return [p for p in client.wait_closed() if isinstance(p, c.Disconnect)][-1].reason_code


def test_paho_gets_the_assigned_client_identifier(node) -> None:
    client = paho5(node, "")
    try:
        assert client.connack[2].AssignedClientIdentifier
    finally:
        client.disconnect()


def test_session_expiry_absent_means_zero(node) -> None:
    """Without Session Expiry Interval the session ends with the connection, even with Clean Start 0
    (MQTT 5.0 3.1.2.11.2: absent means 0)."""
    cid = unique("noexp")
    client = raw5(node, cid, clean_start=False)
    client.subscribe(1, (unique("noexp/t"), 1))
    client.disconnect()
    again = raw5(node, cid, clean_start=False)
    try:
        assert again.connack.session_present is False
    finally:
        again.disconnect()


@pytest.mark.parametrize("expiry", [60, 0xFFFFFFFF])
def test_session_expiry_keeps_the_session(node, expiry: int) -> None:
    """A session with an expiry (0xFFFFFFFF = never) survives the connection with its subscriptions and
    collects QoS 1 messages while offline."""
    cid = unique("exp")
    topic = unique("exp/t")
    client = raw5(node, cid, clean_start=False, properties={c.SESSION_EXPIRY_INTERVAL: expiry})
    client.subscribe(1, (topic, 1))
    client.disconnect()
    pub = raw5(node, unique("exp-pub"))
    pub.publish(topic, b"offline", 1, packet_id=1)
    pub.disconnect()
    again = raw5(node, cid, clean_start=False, properties={c.SESSION_EXPIRY_INTERVAL: expiry})
    try:
        assert again.connack.session_present is True
        msg = again.expect(c.Publish)
        assert (msg.topic, msg.payload, msg.qos) == (topic, b"offline", 1)
        again.ack(msg)
    finally:
        again.disconnect(0, {c.SESSION_EXPIRY_INTERVAL: 0})


def test_session_expiry_zero_on_disconnect_ends_the_session(node) -> None:
    """DISCONNECT may shorten the Session Expiry Interval to 0: the session ends at once."""
    cid = unique("exp0")
    client = raw5(node, cid, clean_start=False, properties={c.SESSION_EXPIRY_INTERVAL: 300})
    client.disconnect(0, {c.SESSION_EXPIRY_INTERVAL: 0})
    again = raw5(node, cid, clean_start=False, properties={c.SESSION_EXPIRY_INTERVAL: 300})
    try:
        assert again.connack.session_present is False
    finally:
        again.disconnect(0, {c.SESSION_EXPIRY_INTERVAL: 0})


def test_session_expiry_raised_on_disconnect_after_zero_is_a_protocol_error(node) -> None:
    """Session Expiry 0 at CONNECT and non-zero at DISCONNECT: the broker answers DISCONNECT 0x82
    (MQTT 5.0 3.14.2.2.2)."""
    client = raw5(node, unique("exp-raise"))
    client.send(c.Disconnect(0, {c.SESSION_EXPIRY_INTERVAL: 10}))
    assert disconnect_reason(client) == 0x82


def test_response_information_only_when_requested_MQTT_3_1_2_31(node) -> None:
    """Request Response Information 1 gets Response Information (here from the default
    ``$response/%c``); without the request there is none [MQTT-3.1.2-31]."""
    cid = unique("rri")
    client = raw5(node, cid, properties={c.REQUEST_RESPONSE_INFORMATION: 1})
    plain = raw5(node, unique("rri0"), properties={c.REQUEST_RESPONSE_INFORMATION: 0})
    try:
        assert client.connack.properties[c.RESPONSE_INFORMATION] == f"$response/{cid}"
        assert c.RESPONSE_INFORMATION not in plain.connack.properties
    finally:
        client.disconnect()
        plain.disconnect()


def test_paho_request_response_information(node) -> None:
    cid = unique("prri")
    client = paho5(node, cid, props(PacketTypes.CONNECT, RequestResponseInformation=1))
    try:
        assert client.connack[2].ResponseInformation == f"$response/{cid}"
    finally:
        client.disconnect()


@pytest.mark.parametrize("request_problem", [None, 1, 0])
def test_reason_strings_follow_request_problem_information_MQTT_3_1_2_32(node, request_problem) -> None:
    """An error PUBACK carries a Reason String unless the client set Request Problem Information 0
    [MQTT-3.1.2-32]."""
    properties = {} if request_problem is None else {c.REQUEST_PROBLEM_INFORMATION: request_problem}
    client = raw5(node, unique("rpi"), properties=properties)
    try:
        ack = client.publish("$SYS/forbidden", b"x", 1, packet_id=5)
        assert ack.reason_code == 0x87
        assert (c.REASON_STRING in ack.properties) == (request_problem != 0)
    finally:
        client.disconnect()


def test_connect_user_properties_are_accepted(node) -> None:
    client = raw5(node, unique("cup"), properties={c.USER_PROPERTY: [("a", "1"), ("a", "2")]})
    client.disconnect()


@pytest.mark.parametrize("prop", [c.RECEIVE_MAXIMUM, c.MAXIMUM_PACKET_SIZE])
def test_zero_receive_maximum_or_packet_size_is_a_protocol_error(node, prop: int) -> None:
    """Receive Maximum 0 and Maximum Packet Size 0 are Protocol Errors: CONNACK 0x82, then close."""
    client = Raw5(node)
    client.send_bytes(zero_property_connect(unique("zero"), prop))
    packets = client.wait_closed()
    assert [type(p) for p in packets] == [c.Connack] and packets[0].reason_code == 0x82


def zero_property_connect(client_id: str, prop: int) -> bytes:
    """A 5.0 CONNECT carrying ``prop`` (a two- or four-byte integer property) with the value 0."""
    size = 2 if prop == c.RECEIVE_MAXIMUM else 4
    props_bytes = bytes([prop]) + b"\0" * size
    cid = client_id.encode()
    body = (
        b"\x00\x04MQTT\x05\x02\x00\x3c"
        + bytes([len(props_bytes)])
        + props_bytes
        + len(cid).to_bytes(2, "big")
        + cid
    )
    return bytes([0x10, len(body)]) + body


def test_paho_mqttv5_connects_with_properties(node) -> None:
    client = Paho5(node, unique("pconn"))
    try:
        rc, present, p = client.connect(
            props(
                PacketTypes.CONNECT,
                SessionExpiryInterval=30,
                ReceiveMaximum=10,
                MaximumPacketSize=100000,
                TopicAliasMaximum=0,
                UserProperty=[("x", "y")],
            )
        )
        assert rc == 0 and present is False
        assert p.ReceiveMaximum == 100 and p.SharedSubscriptionAvailable == 1
    finally:
        client.disconnect()
    assert client.client.protocol == mqtt.MQTTv5
