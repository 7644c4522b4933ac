"""Tests of fluxmq._core.packets: the packet type numbers, the classes' constructors, equality, repr
and typed attributes.
"""

from __future__ import annotations

import pytest

from fluxmq._core import codec, packets
from fluxmq._core.codec import (
    AUTH,
    CONNACK,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
    encode,
    encode_publish,
)


def test_packet_type_numbers_match_the_spec():
    assert (codec.MQTT31, codec.MQTT311, codec.MQTT5) == (3, 4, 5)
    assert [
        CONNECT,
        CONNACK,
        PUBLISH,
        PUBACK,
        PUBREC,
        PUBREL,
        PUBCOMP,
        SUBSCRIBE,
        SUBACK,
        UNSUBSCRIBE,
        UNSUBACK,
        PINGREQ,
        PINGRESP,
        DISCONNECT,
        AUTH,
    ] == list(range(1, 16))
    classes = [
        Connect,
        Connack,
        Publish,
        Puback,
        Pubrec,
        Pubrel,
        Pubcomp,
        Subscribe,
        Suback,
        Unsubscribe,
        Unsuback,
        Pingreq,
        Pingresp,
        Disconnect,
        Auth,
    ]
    assert [cls.type for cls in classes] == list(range(1, 16))
    assert [getattr(packets, name) for name in ("CONNECT", "PUBLISH", "AUTH")] == [1, 3, 15]


def test_constructor_defaults_follow_the_contract():
    connect = Connect()
    assert (
        connect.client_id,
        connect.clean_start,
        connect.keepalive,
        connect.protocol_version,
        connect.protocol_name,
        connect.username,
        connect.password,
        connect.will,
        connect.properties,
    ) == ("", True, 60, 4, "MQTT", None, None, None, {})
    assert Connect(protocol_version=3).protocol_name == "MQIsdp"
    publish = Publish("t")
    assert (publish.payload, publish.qos, publish.retain, publish.dup, publish.packet_id) == (
        b"",
        0,
        False,
        False,
        0,
    )
    sub = Subscription("f")
    assert (sub.qos, sub.no_local, sub.retain_as_published, sub.retain_handling) == (0, False, False, 0)
    assert Unsuback(1).reason_codes is None
    assert (Disconnect().reason_code, Auth().reason_code) == (0, 0)


def test_equality_and_repr():
    assert Publish("t", b"x", properties=None) == Publish("t", b"x", properties={})
    assert Publish("t", b"x") != Publish("t", b"y")
    assert Puback(1) != Pubrec(1)  # same fields, different type
    assert Pingreq() == Pingreq() and Pingreq() != Pingresp()
    assert Unsuback(1, None) == Unsuback(1, [])
    assert Connect("a", will=Will("w", b"1")) != Connect("a", will=Will("w", b"2"))
    text = repr(Publish("a/b", b"z" * 100, 1, packet_id=4))
    assert text.startswith("Publish(topic='a/b'") and "packet_id=4" in text and len(text) < 200
    assert repr(Pingreq()) == "Pingreq()"
    with pytest.raises(TypeError):
        hash(Publish("t"))


def test_public_attributes_are_writable_and_typed():
    publish = Publish("t")
    publish.topic = "u"
    publish.qos = 2
    publish.packet_id = 65535
    assert encode(publish, 4)[0] == 0x34
    with pytest.raises(TypeError):
        publish.topic = b"bytes"
    with pytest.raises(AttributeError):
        publish.not_a_field = 1  # no __dict__: slots-like memory use


def test_publish_accepts_bytes_like_payload():
    assert Publish("t", bytearray(b"ab")).payload == b"ab"
    assert encode_publish("t", memoryview(b"cd"), 0, False, False, 0, None, 4) == encode(
        Publish("t", b"cd"), 4
    )
