"""Tests of fluxmq._core.properties: the property identifiers, the table of where each property may
appear (checked against the specification's table in codec_strategies, itself checked against
paho-mqtt's), the writer's and the reader's rules, and interop with paho's property packing.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given

from fluxmq._core import codec
from fluxmq._core import properties as mqtt_properties
from fluxmq._core.codec import (
    AUTH,
    CONNACK,
    CONNECT,
    DISCONNECT,
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
    Decoder,
    Disconnect,
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
)
from fluxmq.errors import MalformedPacket, ProtocolError
from tests._core.codec_strategies import FAST, PROPERTY_KINDS, SPEC_PROPERTIES, WILL, properties
from tests._core.wire_builders import SAMPLE_VALUE, block, decode5, frame, prop, s, with_properties


def test_property_identifiers_match_the_spec():
    names = {
        "PAYLOAD_FORMAT_INDICATOR": 0x01,
        "MESSAGE_EXPIRY_INTERVAL": 0x02,
        "CONTENT_TYPE": 0x03,
        "RESPONSE_TOPIC": 0x08,
        "CORRELATION_DATA": 0x09,
        "SUBSCRIPTION_IDENTIFIER": 0x0B,
        "SESSION_EXPIRY_INTERVAL": 0x11,
        "ASSIGNED_CLIENT_IDENTIFIER": 0x12,
        "SERVER_KEEP_ALIVE": 0x13,
        "AUTHENTICATION_METHOD": 0x15,
        "AUTHENTICATION_DATA": 0x16,
        "REQUEST_PROBLEM_INFORMATION": 0x17,
        "WILL_DELAY_INTERVAL": 0x18,
        "REQUEST_RESPONSE_INFORMATION": 0x19,
        "RESPONSE_INFORMATION": 0x1A,
        "SERVER_REFERENCE": 0x1C,
        "REASON_STRING": 0x1F,
        "RECEIVE_MAXIMUM": 0x21,
        "TOPIC_ALIAS_MAXIMUM": 0x22,
        "TOPIC_ALIAS": 0x23,
        "MAXIMUM_QOS": 0x24,
        "RETAIN_AVAILABLE": 0x25,
        "USER_PROPERTY": 0x26,
        "MAXIMUM_PACKET_SIZE": 0x27,
        "WILDCARD_SUBSCRIPTION_AVAILABLE": 0x28,
        "SUBSCRIPTION_IDENTIFIER_AVAILABLE": 0x29,
        "SHARED_SUBSCRIPTION_AVAILABLE": 0x2A,
    }
    assert {name: getattr(codec, name) for name in names} == names
    assert {name: getattr(mqtt_properties, name) for name in names} == names
    assert set(names.values()) == set(SPEC_PROPERTIES)


@pytest.mark.parametrize("kind", PROPERTY_KINDS)
def test_property_table_of_the_encoder_matches_the_spec(kind):
    """Every property is accepted exactly where section 2.2.2.2 allows it (and Will Properties)."""
    samples = {
        "bool": 1,
        "u16": 7,
        "u16nz": 7,
        "u32": 7,
        "u32nz": 7,
        "str": "s",
        "bin": b"b",
        "pairs": [("k", "v")],
        "subid": [7],
    }
    for pid, (value_kind, kinds) in SPEC_PROPERTIES.items():
        packet = packet_with_properties(kind, {pid: samples[value_kind]})
        if kind in kinds:
            encoded = encode(packet, 5)
            assert Decoder(version=0 if kind in (CONNECT, WILL) else 5).feed(encoded) == [packet]
        else:
            with pytest.raises(ValueError):
                encode(packet, 5)


def packet_with_properties(kind, props):
    """A minimal valid packet of ``kind`` carrying ``props`` (for WILL: in the Will Properties)."""
    factories = {
        WILL: lambda: Connect("c", protocol_version=5, will=Will("w", b"", properties=props)),
        CONNECT: lambda: Connect("c", protocol_version=5, properties=props),
        CONNACK: lambda: Connack(properties=props),
        PUBLISH: lambda: Publish("t", b"p", properties=props),
        PUBACK: lambda: Puback(1, 0x10, props),
        PUBREC: lambda: Pubrec(1, 0x10, props),
        PUBREL: lambda: Pubrel(1, 0x92, props),
        PUBCOMP: lambda: Pubcomp(1, 0x92, props),
        SUBSCRIBE: lambda: Subscribe(1, [Subscription("a")], props),
        SUBACK: lambda: Suback(1, [0], props),
        UNSUBSCRIBE: lambda: Unsubscribe(1, ["a"], props),
        UNSUBACK: lambda: Unsuback(1, [0], props),
        DISCONNECT: lambda: Disconnect(0x04, props),
        AUTH: lambda: Auth(0x18, props),
    }
    return factories[kind]()


def test_spec_property_table_agrees_with_paho():
    """Cross-check of the table above with paho-mqtt's independent one (99 = Will Properties)."""
    from paho.mqtt.properties import Properties

    paho = Properties(PUBLISH).properties
    kind_of = {99: WILL}
    assert set(paho) == set(SPEC_PROPERTIES)
    for pid, (_, paho_kinds) in paho.items():
        assert {kind_of.get(k, k) for k in paho_kinds} == SPEC_PROPERTIES[pid][1], hex(pid)


@FAST
@example(props={0x26: [("k" * 100, "v" * 100)]})  # over 127 bytes: a 2-byte Remaining Length
@given(props=properties(PUBLISH))
def test_properties_interoperate_with_paho(props):
    """Our property encoding unpacks with paho, and paho's packing decodes with us."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    encoded = encode(Publish("t", b"", properties=props), 5)
    header = 2
    while encoded[header - 1] & 0x80:  # Remaining Length continuation bytes
        header += 1
    block = encoded[header + 3 :]  # after the fixed header and the topic "t" (3 bytes)
    theirs, _ = Properties(PacketTypes.PUBLISH).unpack(block)
    for pid, value in props.items():
        name = theirs.getNameFromIdent(pid).replace(" ", "")
        got = getattr(theirs, name)
        assert got == value, name
    repacked = theirs.pack()
    length = 3 + len(repacked)
    frame = b"\x30" + (bytes([length]) if length < 128 else bytes([length & 0x7F | 0x80, length >> 7]))
    frame += b"\x00\x01t" + repacked
    assert Decoder(version=5).feed(frame) == [Publish("t", b"", properties=props)]


# -- the reader's rules (packets written byte by byte) -------------------------------------------


NOT_ALLOWED = [
    (pid, kind) for pid, (_, kinds) in SPEC_PROPERTIES.items() for kind in PROPERTY_KINDS if kind not in kinds
]


# in PROPERTY_KINDS' order, not the set's: a set's order of "will" among the ints changes with the
# hash seed, and pytest-xdist's processes must collect the same tests in the same order
ALLOWED = [
    (pid, kind) for pid, (_, kinds) in SPEC_PROPERTIES.items() for kind in PROPERTY_KINDS if kind in kinds
]


@pytest.mark.parametrize(("pid", "kind"), NOT_ALLOWED)
def test_property_not_allowed_in_the_packet_type_is_malformed(pid, kind):
    """MQTT 5.0 2.2.2.2: a property outside its packet types (table 2-4) is a Malformed Packet."""
    with pytest.raises(MalformedPacket):
        decode5(kind, with_properties(kind, block(prop(pid, SAMPLE_VALUE[SPEC_PROPERTIES[pid][0]]))))


@pytest.mark.parametrize(("pid", "kind"), ALLOWED)
def test_property_allowed_in_the_packet_type_decodes(pid, kind):
    """The positive half of table 2-4, built byte by byte."""
    value_kind = SPEC_PROPERTIES[pid][0]
    packet = decode5(kind, with_properties(kind, block(prop(pid, SAMPLE_VALUE[value_kind]))))[0]
    props = packet.will.properties if kind == WILL else packet.properties
    expected = {"str": "x", "bin": b"x", "pairs": [("k", "v")], "subid": [7], "bool": 1}.get(value_kind, 7)
    assert props == {pid: expected}


SINGLE_USE = [
    (pid, sorted(kinds, key=str)[0]) for pid, (_, kinds) in SPEC_PROPERTIES.items() if pid != 0x26
] + [(0x0B, SUBSCRIBE)]


@pytest.mark.parametrize(("pid", "kind"), SINGLE_USE)
def test_duplicated_single_use_property_is_a_protocol_error(pid, kind):
    """MQTT 5.0 3.x.2.x: "It is a Protocol Error to include <property> more than once"."""
    if pid == 0x0B and kind == PUBLISH:
        kind = SUBSCRIBE  # only PUBLISH may carry several Subscription Identifiers
    one = prop(pid, SAMPLE_VALUE[SPEC_PROPERTIES[pid][0]])
    with pytest.raises(ProtocolError):
        decode5(kind, with_properties(kind, block(one, one)))


def test_user_properties_and_publish_subscription_ids_may_repeat_in_order():
    """MQTT 5.0 3.3.2.3.7 / 3.3.2.3.8: user properties keep order and duplicates; PUBLISH may carry
    several Subscription Identifiers."""
    data = frame(
        0x30,
        s(b"t")
        + block(
            prop(0x26, s(b"a") + s(b"1")),
            prop(0x0B, b"\x02"),
            prop(0x26, s(b"a") + s(b"1")),
            prop(0x26, s(b"b") + s(b"2")),
            prop(0x0B, b"\x80\x01"),
        ),
    )
    assert Decoder(version=5).feed(data)[0].properties == {
        0x26: [("a", "1"), ("a", "1"), ("b", "2")],
        0x0B: [2, 128],
    }


@pytest.mark.parametrize(
    ("pid", "kind", "value"),
    [
        (0x0B, PUBLISH, b"\x00"),  # Subscription Identifier 0 (3.3.2.3.8)
        (0x0B, SUBSCRIBE, b"\x00"),  # (3.8.2.1.2)
        (0x21, CONNECT, b"\x00\x00"),  # Receive Maximum 0 (3.1.2.11.3)
        (0x27, CONNACK, b"\x00\x00\x00\x00"),  # Maximum Packet Size 0 (3.2.2.3.6)
        (0x23, PUBLISH, b"\x00\x00"),  # Topic Alias 0 (3.3.2.3.4)
        (0x17, CONNECT, b"\x02"),  # Request Problem Information not 0/1 (3.1.2.11.7)
        (0x19, CONNECT, b"\x02"),  # Request Response Information not 0/1 (3.1.2.11.6)
        (0x24, CONNACK, b"\x02"),  # Maximum QoS not 0/1 (3.2.2.3.4)
        (0x25, CONNACK, b"\x02"),  # Retain Available not 0/1 (3.2.2.3.5)
        (0x01, PUBLISH, b"\x02"),  # Payload Format Indicator not 0/1 (3.3.2.3.2)
        (0x28, CONNACK, b"\x05"),
        (0x29, CONNACK, b"\x05"),
        (0x2A, CONNACK, b"\x05"),
    ],
)
def test_property_values_outside_their_range_are_protocol_errors(pid, kind, value):
    """The property definitions make these values a Protocol Error."""
    with pytest.raises(ProtocolError):
        decode5(kind, with_properties(kind, block(prop(pid, value))))


def test_unknown_property_identifier_is_malformed():
    """MQTT 5.0 2.2.2.2: only the identifiers of table 2-4 exist."""
    for pid in (0x00, 0x04, 0x2B, 0x7F):
        with pytest.raises(MalformedPacket):
            decode5(PUBLISH, with_properties(PUBLISH, block(prop(pid, b"\x00"))))


def test_subscription_identifier_longer_than_four_bytes_is_malformed():
    """MQTT 5.0 1.5.5: a Variable Byte Integer is at most four bytes."""
    with pytest.raises(MalformedPacket):
        decode5(PUBLISH, with_properties(PUBLISH, block(prop(0x0B, b"\x81\x81\x81\x81\x01"))))
