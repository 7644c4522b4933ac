"""Tests of fluxmq._core.codec: round trips, stream splitting, fast paths and interop.

The property table below is written from the MQTT 5.0 specification (section 2.2.2.2) on purpose,
independently of the codec's own table, and is itself cross-checked against paho-mqtt's table.
Interop tests drive real clients (paho-mqtt and Debian's mosquitto_pub/mosquitto_sub) against a
one-connection peer on 127.0.0.1 that speaks only through the codec under test.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fluxmq._core import codec
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
    Decoder,
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
    append_publish,
    encode,
    encode_publish,
)
from fluxmq.errors import MalformedPacket, MQTTError, PacketTooLarge

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VERSIONS = (3, 4, 5)
WILL = "will"

# MQTT 5.0 section 2.2.2.2: identifier -> (value kind, packet types it may appear in).
SPEC_PROPERTIES: dict[int, tuple[str, set]] = {
    0x01: ("bool", {PUBLISH, WILL}),
    0x02: ("u32", {PUBLISH, WILL}),
    0x03: ("str", {PUBLISH, WILL}),
    0x08: ("str", {PUBLISH, WILL}),
    0x09: ("bin", {PUBLISH, WILL}),
    0x0B: ("subid", {PUBLISH, SUBSCRIBE}),
    0x11: ("u32", {CONNECT, CONNACK, DISCONNECT}),
    0x12: ("str", {CONNACK}),
    0x13: ("u16", {CONNACK}),
    0x15: ("str", {CONNECT, CONNACK, AUTH}),
    0x16: ("bin", {CONNECT, CONNACK, AUTH}),
    0x17: ("bool", {CONNECT}),
    0x18: ("u32", {WILL}),
    0x19: ("bool", {CONNECT}),
    0x1A: ("str", {CONNACK}),
    0x1C: ("str", {CONNACK, DISCONNECT}),
    0x1F: ("str", {CONNACK, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK, DISCONNECT, AUTH}),
    0x21: ("u16nz", {CONNECT, CONNACK}),
    0x22: ("u16", {CONNECT, CONNACK}),
    0x23: ("u16nz", {PUBLISH}),
    0x24: ("bool", {CONNACK}),
    0x25: ("bool", {CONNACK}),
    0x26: (
        "pairs",
        {
            CONNECT,
            CONNACK,
            PUBLISH,
            WILL,
            PUBACK,
            PUBREC,
            PUBREL,
            PUBCOMP,
            SUBSCRIBE,
            SUBACK,
            UNSUBSCRIBE,
            UNSUBACK,
            DISCONNECT,
            AUTH,
        },
    ),
    0x27: ("u32nz", {CONNECT, CONNACK}),
    0x28: ("bool", {CONNACK}),
    0x29: ("bool", {CONNACK}),
    0x2A: ("bool", {CONNACK}),
}
PROPERTY_KINDS = (
    WILL,
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
    DISCONNECT,
    AUTH,
)

# -- strategies ------------------------------------------------------------------------------

TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=10)
TOPIC = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00+#"), min_size=1, max_size=12
)
BINARY = st.binary(max_size=16)
PACKET_ID = st.integers(1, 0xFFFF)
VALUES = {
    "bool": st.integers(0, 1),
    "u16": st.integers(0, 0xFFFF),
    "u16nz": st.integers(1, 0xFFFF),
    "u32": st.integers(0, 0xFFFFFFFF),
    "u32nz": st.integers(1, 0xFFFFFFFF),
    "str": TEXT,
    "bin": BINARY,
    "pairs": st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=3),
}


@st.composite
def properties(draw, kind) -> dict:
    """Valid properties for ``kind`` (a packet type or WILL)."""
    allowed = sorted(pid for pid, (_, kinds) in SPEC_PROPERTIES.items() if kind in kinds)
    chosen = draw(st.lists(st.sampled_from(allowed), unique=True, max_size=4))
    props = {}
    for pid in chosen:
        value_kind = SPEC_PROPERTIES[pid][0]
        if value_kind == "subid":
            props[pid] = draw(
                st.lists(st.integers(1, 268_435_455), min_size=1, max_size=3 if kind == PUBLISH else 1)
            )
        else:
            props[pid] = draw(VALUES[value_kind])
    return props


def props_for(kind, version):
    return properties(kind) if version == 5 else st.just({})


@st.composite
def connects(draw, version) -> Connect:
    username = draw(st.none() | TEXT)
    password = draw(st.none() | BINARY)
    if version < 5 and username is None:
        password = None  # 3.1.1 MQTT-3.1.2-22
    will = None
    if draw(st.booleans()):
        will = Will(
            draw(TOPIC),
            draw(BINARY),
            draw(st.integers(0, 2)),
            draw(st.booleans()),
            draw(props_for(WILL, version)),
        )
    return Connect(
        client_id=draw(TEXT),
        clean_start=draw(st.booleans()),
        keepalive=draw(st.integers(0, 0xFFFF)),
        protocol_version=version,
        username=username,
        password=password,
        will=will,
        properties=draw(props_for(CONNECT, version)),
    )


@st.composite
def publishes(draw, version) -> Publish:
    qos = draw(st.integers(0, 2))
    props = draw(props_for(PUBLISH, version))
    topic = draw(TOPIC)
    if version == 5 and codec.TOPIC_ALIAS in props and draw(st.booleans()):
        topic = ""  # resolved by the protocol layer from the alias
    return Publish(
        topic,
        draw(st.binary(max_size=64)),
        qos,
        draw(st.booleans()),
        draw(st.booleans()) if qos else False,
        draw(PACKET_ID) if qos else 0,
        props,
    )


def publish_acks(cls, version):
    reason = st.integers(0, 255) if version == 5 else st.just(0)
    return st.builds(cls, PACKET_ID, reason, props_for(cls.type, version))


@st.composite
def subscribes(draw, version) -> Subscribe:
    subs = []
    for _ in range(draw(st.integers(1, 3))):
        if version == 5:
            subs.append(
                Subscription(
                    draw(TEXT),
                    draw(st.integers(0, 2)),
                    draw(st.booleans()),
                    draw(st.booleans()),
                    draw(st.integers(0, 2)),
                )
            )
        else:
            subs.append(Subscription(draw(TEXT), draw(st.integers(0, 2))))
    return Subscribe(draw(PACKET_ID), subs, draw(props_for(SUBSCRIBE, version)))


def packet_strategies(version) -> dict:
    """One strategy per packet type valid in ``version``."""
    codes = st.lists(st.integers(0, 255), min_size=1, max_size=4)
    reason = st.integers(0, 255) if version == 5 else st.just(0)
    strategies = {
        CONNECT: connects(version),
        CONNACK: st.builds(
            Connack,
            st.booleans() if version >= 4 else st.just(False),
            st.integers(0, 255),
            props_for(CONNACK, version),
        ),
        PUBLISH: publishes(version),
        PUBACK: publish_acks(Puback, version),
        PUBREC: publish_acks(Pubrec, version),
        PUBREL: publish_acks(Pubrel, version),
        PUBCOMP: publish_acks(Pubcomp, version),
        SUBSCRIBE: subscribes(version),
        SUBACK: st.builds(Suback, PACKET_ID, codes, props_for(SUBACK, version)),
        UNSUBSCRIBE: st.builds(
            Unsubscribe, PACKET_ID, st.lists(TEXT, min_size=1, max_size=3), props_for(UNSUBSCRIBE, version)
        ),
        UNSUBACK: st.builds(
            Unsuback, PACKET_ID, codes if version == 5 else st.none(), props_for(UNSUBACK, version)
        ),
        PINGREQ: st.builds(Pingreq),
        PINGRESP: st.builds(Pingresp),
        DISCONNECT: st.builds(Disconnect, reason, props_for(DISCONNECT, version)),
    }
    if version == 5:
        strategies[AUTH] = st.builds(Auth, reason, props_for(AUTH, version))
    return strategies


def any_packet(version, exclude=(CONNECT,)):
    return st.one_of([s for t, s in packet_strategies(version).items() if t not in exclude])


def decode_one(data: bytes, version: int) -> object:
    packets = Decoder(version=version).feed(data)
    assert len(packets) == 1
    return packets[0]


# -- round trips -----------------------------------------------------------------------------

ROUND_TRIP_CASES = [(t, v) for v in VERSIONS for t in packet_strategies(v)]


@pytest.mark.parametrize(("ptype", "version"), ROUND_TRIP_CASES)
@FAST
@given(data=st.data())
def test_round_trip_every_packet_type(ptype, version, data):
    """encode then decode gives an equal packet, for every type, version and property set."""
    packet = data.draw(packet_strategies(version)[ptype])
    encoded = encode(packet, version)
    decoder = Decoder(version=0 if ptype == CONNECT else version)
    decoded = decoder.feed(encoded)
    assert decoded == [packet]
    assert type(decoded[0]) is type(packet) and decoded[0].type == ptype
    assert isinstance(decoded[0].properties if ptype not in (PINGREQ, PINGRESP) else {}, dict)
    if ptype == CONNECT:
        assert decoder.version == version
    assert len(decoder) == 0


@settings(max_examples=150, deadline=None)
@given(version=st.sampled_from(VERSIONS), data=st.data())
def test_any_split_of_a_stream_gives_the_same_packets(version, data):
    """Feeding a stream in arbitrary pieces decodes exactly the packets fed in one piece."""
    connect = data.draw(connects(version))
    packets = [connect] + data.draw(st.lists(any_packet(version), max_size=12))
    stream = b"".join(encode(p, version) for p in packets)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    decoder = Decoder()  # the CONNECT sets the version for the rest of the stream
    got = []
    start = 0
    for cut in cuts + [len(stream)]:
        piece = stream[start:cut]
        got.extend(decoder.feed(data.draw(st.sampled_from([bytes, bytearray, memoryview]))(piece)))
        start = cut
    assert got == packets
    assert len(decoder) == 0
    assert decoder.version == version


def test_byte_at_a_time_and_whole_stream_agree():
    """The degenerate splits: one byte per feed, and everything at once (pending buffer path)."""
    packets = [
        Connect("c", protocol_version=5),
        Publish("a/b", b"x" * 300, 1, packet_id=9),
        Puback(9),
        Pingreq(),
        Subscribe(3, [Subscription("a/#", 1)]),
        Disconnect(0x04),
    ]
    stream = b"".join(encode(p, 5) for p in packets)
    decoder = Decoder()
    got = []
    for i in range(len(stream)):
        got.extend(decoder.feed(stream[i : i + 1]))
    assert got == packets
    assert Decoder().feed(stream) == packets


# -- decoder behaviour ------------------------------------------------------------------------


def test_version_defaults_to_311_rules_before_connect():
    """Before a CONNECT, 5.0-only shapes are not accepted: a 3-byte PUBACK is malformed in 3.1.1."""
    with pytest.raises(MalformedPacket):
        Decoder().feed(bytes([0x40, 0x03, 0x00, 0x01, 0x10]))
    assert Decoder(version=5).feed(bytes([0x40, 0x03, 0x00, 0x01, 0x10])) == [Puback(1, 0x10)]


def test_packets_after_connect_use_its_version_in_the_same_feed():
    stream = encode(Connect("c", protocol_version=5), 5) + encode(Puback(7, 0x10, {0x1F: "why"}), 5)
    decoder = Decoder()
    assert decoder.feed(stream)[1] == Puback(7, 0x10, {0x1F: "why"})
    assert decoder.version == 5


def test_max_packet_size_counts_the_whole_packet_and_may_change_between_feeds():
    packet = encode_publish("t", b"x" * 10, 0, False, False, 0, None, 4)  # 2 + 2 + 1 + 10 bytes
    assert len(packet) == 15
    assert len(Decoder(max_packet_size=15).feed(packet)) == 1
    decoder = Decoder(max_packet_size=100)
    assert len(decoder.feed(packet)) == 1
    decoder.max_packet_size = 14
    with pytest.raises(PacketTooLarge):
        decoder.feed(packet)


def test_error_carries_the_packets_decoded_before_it_and_the_decoder_stays_failed():
    good = encode(Pingreq(), 4) + encode(Puback(5), 4)
    decoder = Decoder(version=4)
    with pytest.raises(MalformedPacket) as info:
        decoder.feed(good + bytes([0x00, 0x00]))
    assert info.value.packets == [Pingreq(), Puback(5)]
    with pytest.raises(MalformedPacket):
        decoder.feed(encode(Pingreq(), 4))


def test_pending_bytes_are_kept_and_compacted():
    packet = encode_publish("a", b"p" * 50, 1, False, False, 3, None, 4)
    decoder = Decoder(version=4)
    assert decoder.feed(packet + packet[:10]) == [Publish("a", b"p" * 50, 1, packet_id=3)]
    assert len(decoder) == 10
    assert decoder.feed(packet[10:] + packet[:1]) == [Publish("a", b"p" * 50, 1, packet_id=3)]
    assert len(decoder) == 1


def test_empty_feed_returns_nothing():
    assert Decoder().feed(b"") == []


@pytest.mark.parametrize(
    ("length", "header"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16_383, b"\xff\x7f"),
        (16_384, b"\x80\x80\x01"),
        (2_097_151, b"\xff\xff\x7f"),
        (2_097_152, b"\x80\x80\x80\x01"),
    ],
)
def test_remaining_length_encoding_matches_spec_table(length, header):
    """MQTT 5.0 table 1-1 (Variable Byte Integer sizes): the encoder uses the minimum bytes."""
    if length == 0:
        encoded = encode(Pingreq(), 4)
    else:
        encoded = encode_publish("t", b"\xaa" * (length - 3), 0, False, False, 0, None, 4)
    assert encoded[1 : 1 + len(header)] == header
    assert len(encoded) == 1 + len(header) + length
    assert len(Decoder().feed(encoded)) == 1


def test_largest_remaining_length_is_read_from_the_header():
    """0xFF 0xFF 0xFF 0x7F is 268,435,455 (the maximum); with a limit it is refused from the header."""
    decoder = Decoder(max_packet_size=1_000_000)
    with pytest.raises(MQTTError) as info:
        decoder.feed(b"\x30\xff\xff\xff\x7f")
    assert "268435460" in str(info.value)


# CONNECTs captured from mosquitto_pub 2.0.11: -i pub-1 -k 30 -u user -P pw --will-topic w/t
# --will-payload bye --will-qos 1 (5.0 also: -D connect session-expiry-interval 60
# -D connect user-property k v; it adds Receive Maximum 20 on its own).
MOSQUITTO_PUB_CONNECTS = {
    3: "102700064d514973647003ce001e00057075622d310003772f74000362796500047573657200027077",
    4: "102500044d51545404ce001e00057075622d310003772f74000362796500047573657200027077",
    5: "103600044d51545405ce001e0f110000003c2600016b00017621001400057075622d31000003772f7400036279"
    "6500047573657200027077",
}


@pytest.mark.parametrize("version", VERSIONS)
def test_known_connect_vectors_from_mosquitto_pub(version):
    """Independent bytes (no live client needed): they decode to the command line's fields, and
    re-encoding the decoded packet reproduces them byte for byte."""
    wire = bytes.fromhex(MOSQUITTO_PUB_CONNECTS[version])
    decoder = Decoder()
    (connect,) = decoder.feed(wire)
    props = {0x11: 60, 0x26: [("k", "v")], 0x21: 20} if version == 5 else None
    assert connect == Connect("pub-1", True, 30, version, None, "user", b"pw", Will("w/t", b"bye", 1), props)
    assert decoder.version == version
    assert encode(connect, version) == wire


# -- packet classes ---------------------------------------------------------------------------


def test_constants_match_the_spec():
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
    assert set(names.values()) == set(SPEC_PROPERTIES)


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


# -- encoder --------------------------------------------------------------------------------


@FAST
@given(version=st.sampled_from(VERSIONS), data=st.data())
def test_encode_publish_equals_generic_encode(version, data):
    p = data.draw(publishes(version))
    assert encode_publish(
        p.topic, p.payload, p.qos, p.retain, p.dup, p.packet_id, p.properties, version
    ) == encode(p, version)


@FAST
@given(version=st.sampled_from(VERSIONS), data=st.data(), packet_id=PACKET_ID, dup=st.booleans())
def test_append_publish_patches_packet_id_and_dup(version, data, packet_id, dup):
    """A template encoded once is copied with the subscriber's packet id and DUP flag."""
    p = data.draw(publishes(version))
    template = encode_publish(p.topic, p.payload, p.qos, p.retain, False, 0, p.properties, version)
    out = bytearray(b"prefix")
    append_publish(out, template, packet_id, dup)
    append_publish(out, template, packet_id ^ 1 or 1, False)
    assert out[:6] == b"prefix"
    first, second = Decoder(version=version).feed(out[6:])
    want_id = packet_id if p.qos else 0
    assert first == Publish(p.topic, p.payload, p.qos, p.retain, dup and p.qos > 0, want_id, p.properties)
    assert second.packet_id == ((packet_id ^ 1 or 1) if p.qos else 0) and not second.dup
    assert bytes(out[6 : 6 + len(template)]) == encode_publish(
        p.topic, p.payload, p.qos, p.retain, dup and p.qos > 0, want_id, p.properties, version
    )


def test_append_publish_rejects_non_publish_and_bad_ids():
    with pytest.raises(ValueError):
        append_publish(bytearray(), encode(Puback(1), 4), 1, False)
    template = encode_publish("t", b"", 1, False, False, 0, None, 4)
    with pytest.raises(ValueError):
        append_publish(bytearray(), template, 0, False)
    with pytest.raises(ValueError):
        append_publish(bytearray(), template[:5], 1, False)


@pytest.mark.parametrize(
    "bad",
    [
        lambda: encode_publish("t", b"", 3, False, False, 1, None, 4),
        lambda: encode_publish("t", b"", 0, False, True, 0, None, 4),
        lambda: encode_publish("a\x00b", b"", 0, False, False, 0, None, 4),
        lambda: encode_publish("t" * 65536, b"", 0, False, False, 0, None, 4),
        lambda: encode(Pingreq(), 6),
        lambda: encode(Puback(1), 6),
        lambda: encode(Puback(70000), 4),
        lambda: encode(Auth(), 4),
        lambda: encode(Connect(password=b"p", protocol_version=4), 4),
        lambda: encode(Subscribe(1, []), 4),
        lambda: encode(Unsubscribe(1, []), 5),
        lambda: encode(Subscribe(1, [Subscription("a", retain_handling=3)]), 5),
        lambda: encode(Publish("t", properties={0x11: 5}), 5),
        lambda: encode(Publish("t", properties={0x7F: 5}), 5),
        lambda: encode(Publish("t", properties={0x01: 256}), 5),
        lambda: encode(Subscribe(1, [Subscription("a")], {0x0B: [1, 2]}), 5),
        lambda: encode(Connack(properties={0x12: b"not str"}), 5),
    ],
)
def test_encoder_refuses_what_the_decoder_would_reject(bad):
    with pytest.raises((ValueError, TypeError, OverflowError)):
        bad()


def test_3x_encodings_leave_out_5_0_fields():
    assert encode(Puback(5, 0x10, {0x1F: "x"}), 4) == b"\x40\x02\x00\x05"
    assert encode(Disconnect(0x04), 4) == b"\xe0\x00"
    assert encode(Publish("t", b"", properties={0x23: 1}), 4) == b"\x30\x03\x00\x01t"
    assert encode(Connack(True, 0), 3) == b"\x20\x02\x00\x00"  # no session present in 3.1


def test_5_0_short_forms_of_acks_disconnect_and_auth():
    """MQTT 5.0 3.4.2.1/3.14.2.1: reason code and property length may be left out."""
    assert encode(Puback(5), 5) == b"\x40\x02\x00\x05"
    assert encode(Pubrel(5, 0x92), 5) == b"\x62\x03\x00\x05\x92"
    assert encode(Disconnect(), 5) == b"\xe0\x00"
    assert encode(Disconnect(0x8E), 5) == b"\xe0\x01\x8e"
    assert encode(Auth(0x18, {0x15: "m"}), 5) == b"\xf0\x06\x18\x04\x15\x00\x01m"
    assert Decoder(version=5).feed(b"\xf0\x00") == [Auth()]


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


# -- interop with real clients ---------------------------------------------------------------


class OneConnectionPeer:
    """Accepts one client on 127.0.0.1 and talks to it only through the codec under test."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(20)
        self.port = self.listener.getsockname()[1]
        self.conn: socket.socket | None = None
        self.decoder = Decoder()
        self.queue: list = []

    def accept(self) -> None:
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(20)

    def receive(self):
        while not self.queue:
            data = self.conn.recv(65536)
            if not data:
                raise EOFError("client closed the connection")
            self.queue.extend(self.decoder.feed(data))
        return self.queue.pop(0)

    def send(self, packet, version: int) -> None:
        self.conn.sendall(encode(packet, version))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


@pytest.fixture
def peer():
    p = OneConnectionPeer()
    yield p
    p.close()


mosquitto_clients = pytest.mark.skipif(
    shutil.which("mosquitto_pub") is None, reason="mosquitto-clients not installed"
)
MOSQUITTO_VERSIONS = {3: "mqttv31", 4: "mqttv311", 5: "mqttv5"}


@mosquitto_clients
@pytest.mark.parametrize("version", VERSIONS)
def test_mosquitto_pub_session_decodes_and_accepts_our_replies(peer, version):
    """mosquitto_pub's CONNECT/PUBLISH/DISCONNECT decode; it accepts our CONNACK and PUBACK."""
    args = [
        "mosquitto_pub",
        "-h",
        "127.0.0.1",
        "-p",
        str(peer.port),
        "-V",
        MOSQUITTO_VERSIONS[version],
        "-i",
        "interop-pub",
        "-k",
        "30",
        "-q",
        "1",
        "-r",
        "-t",
        "interop/\u00e9t\u00e9",
        "-m",
        "hello",
        "-u",
        "user",
        "-P",
        "secret",
        "--will-topic",
        "will/t",
        "--will-payload",
        "gone",
        "--will-qos",
        "2",
        "--will-retain",
    ]
    if version == 5:
        args += [
            "-D",
            "connect",
            "user-property",
            "k",
            "v",
            "-D",
            "publish",
            "content-type",
            "text/plain",
            "-D",
            "publish",
            "message-expiry-interval",
            "99",
        ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        peer.accept()
        connect = peer.receive()
        assert isinstance(connect, Connect)
        assert (connect.protocol_version, connect.protocol_name) == (
            version,
            "MQIsdp" if version == 3 else "MQTT",
        )
        assert (connect.client_id, connect.keepalive, connect.username, connect.password) == (
            "interop-pub",
            30,
            "user",
            b"secret",
        )
        assert connect.will == Will("will/t", b"gone", 2, True)
        if version == 5:
            assert connect.properties[codec.USER_PROPERTY] == [("k", "v")]
        peer.send(Connack(False, 0), version)
        publish = peer.receive()
        assert (publish.topic, publish.payload, publish.qos, publish.retain) == (
            "interop/\u00e9t\u00e9",
            b"hello",
            1,
            True,
        )
        assert publish.packet_id > 0
        if version == 5:
            assert publish.properties == {codec.CONTENT_TYPE: "text/plain", codec.MESSAGE_EXPIRY_INTERVAL: 99}
        peer.send(Puback(publish.packet_id), version)
        assert isinstance(peer.receive(), Disconnect)
        assert proc.wait(timeout=20) == 0, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


@mosquitto_clients
@pytest.mark.parametrize("version", VERSIONS)
def test_mosquitto_sub_receives_our_publish(peer, version):
    """mosquitto_sub's SUBSCRIBE decodes; it prints the PUBLISH we encode and acknowledges it."""
    args = [
        "mosquitto_sub",
        "-h",
        "127.0.0.1",
        "-p",
        str(peer.port),
        "-V",
        MOSQUITTO_VERSIONS[version],
        "-i",
        "interop-sub",
        "-q",
        "2",
        "-t",
        "a/#",
        "-t",
        "b/+",
        "-C",
        "1",
        "-v",
    ]
    if version == 5:
        args += ["-D", "subscribe", "subscription-identifier", "42"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        peer.accept()
        assert isinstance(peer.receive(), Connect)
        peer.send(Connack(), version)
        subscribe = peer.receive()
        assert isinstance(subscribe, Subscribe)
        assert [(s.filter, s.qos) for s in subscribe.subscriptions] == [("a/#", 2), ("b/+", 2)]
        if version == 5:
            assert subscribe.properties == {codec.SUBSCRIPTION_IDENTIFIER: [42]}
        peer.send(Suback(subscribe.packet_id, [2, 2]), version)
        peer.send(
            Publish("a/b/c", b"from fluxmq", 1, packet_id=77, properties={codec.USER_PROPERTY: [("x", "y")]}),
            version,
        )
        assert peer.receive() == Puback(77)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert out.decode().strip() == "a/b/c from fluxmq"
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("version", VERSIONS)
def test_paho_client_session_round_trips_through_the_codec(peer, version):
    """paho-mqtt 2.x as the client: every packet it builds decodes, every reply we encode parses."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode
    from paho.mqtt.subscribeoptions import SubscribeOptions

    v5 = version == 5
    events: dict[str, object] = {}
    done = {name: threading.Event() for name in ("connect", "subscribe", "message", "unsubscribe")}
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id="paho-interop",
        protocol={3: mqtt.MQTTv31, 4: mqtt.MQTTv311, 5: mqtt.MQTTv5}[version],
    )
    client.username_pw_set("alice", "pw")
    will_props = None
    if v5:
        will_props = Properties(PacketTypes.WILLMESSAGE)
        will_props.WillDelayInterval = 10
        will_props.UserProperty = [("w", "1")]
    client.will_set("will/topic", b"bye", 1, True, properties=will_props)

    def on_connect(_c, _u, flags, reason_code, properties):
        events["connack"] = (
            flags.session_present,
            reason_code.value,
            getattr(properties, "AssignedClientIdentifier", None),
        )
        done["connect"].set()

    def on_subscribe(_c, _u, mid, reason_codes, _p):
        events["suback"] = (mid, [rc.value for rc in reason_codes])
        done["subscribe"].set()

    def on_message(_c, _u, msg):
        events["message"] = (
            msg.topic,
            msg.payload,
            msg.qos,
            msg.retain,
            getattr(msg.properties, "UserProperty", None) if v5 else None,
        )
        done["message"].set()

    def on_unsubscribe(_c, _u, mid, _rc, _p):
        events["unsuback"] = mid
        done["unsubscribe"].set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.on_unsubscribe = on_unsubscribe
    connect_props = None
    if v5:
        connect_props = Properties(PacketTypes.CONNECT)
        connect_props.SessionExpiryInterval = 3600
        connect_props.ReceiveMaximum = 20
    client.connect("127.0.0.1", peer.port, keepalive=45, properties=connect_props)
    client.loop_start()
    try:
        peer.accept()
        connect = peer.receive()
        assert (connect.client_id, connect.keepalive, connect.protocol_version) == (
            "paho-interop",
            45,
            version,
        )
        assert (connect.username, connect.password) == ("alice", b"pw")
        assert connect.will == Will(
            "will/topic", b"bye", 1, True, {0x18: 10, 0x26: [("w", "1")]} if v5 else None
        )
        if v5:
            assert connect.properties == {0x11: 3600, 0x21: 20}
        peer.send(Connack(version >= 4, 0, {0x12: "assigned-id", 0x21: 10} if v5 else None), version)
        assert done["connect"].wait(20)
        assert events["connack"] == (version >= 4, 0, "assigned-id" if v5 else None)

        if v5:
            sub_props = Properties(PacketTypes.SUBSCRIBE)
            sub_props.SubscriptionIdentifier = 5
            client.subscribe(
                [
                    ("x/+", SubscribeOptions(1, noLocal=True, retainAsPublished=True, retainHandling=2)),
                    ("y/#", SubscribeOptions(2)),
                ],
                properties=sub_props,
            )
        else:
            client.subscribe([("x/+", 1), ("y/#", 2)])
        subscribe = peer.receive()
        want = [Subscription("x/+", 1, v5, v5, 2 if v5 else 0), Subscription("y/#", 2)]
        assert subscribe.subscriptions == want
        assert subscribe.properties == ({0x0B: [5]} if v5 else {})
        peer.send(Suback(subscribe.packet_id, [1, 2]), version)
        assert done["subscribe"].wait(20)
        assert events["suback"] == (subscribe.packet_id, [1, 2])

        peer.send(
            Publish(
                "x/1",
                b"\x00\x01payload",
                2,
                True,
                False,
                300,
                {0x26: [("a", "b"), ("a", "c")], 0x0B: [5]} if v5 else None,
            ),
            version,
        )
        assert peer.receive() == Pubrec(300)
        peer.send(Pubrel(300), version)
        assert peer.receive() == Pubcomp(300)
        assert done["message"].wait(20)
        assert events["message"] == (
            "x/1",
            b"\x00\x01payload",
            2,
            True,
            [("a", "b"), ("a", "c")] if v5 else None,
        )

        pub_props = None
        if v5:
            pub_props = Properties(PacketTypes.PUBLISH)
            pub_props.ResponseTopic = "reply/to"
            pub_props.CorrelationData = b"\x01\x02"
        client.publish("out/topic", b"to broker", qos=2, properties=pub_props)
        publish = peer.receive()
        assert (publish.topic, publish.payload, publish.qos) == ("out/topic", b"to broker", 2)
        assert publish.properties == ({0x08: "reply/to", 0x09: b"\x01\x02"} if v5 else {})
        peer.send(Pubrec(publish.packet_id), version)
        assert peer.receive() == Pubrel(publish.packet_id)
        peer.send(Pubcomp(publish.packet_id), version)

        client.unsubscribe(["x/+", "y/#"])
        unsubscribe = peer.receive()
        assert unsubscribe.filters == ["x/+", "y/#"]
        peer.send(Unsuback(unsubscribe.packet_id, [0, 0x11] if v5 else None), version)
        assert done["unsubscribe"].wait(20)
        assert events["unsuback"] == unsubscribe.packet_id

        if v5:
            client.disconnect(ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"))
        else:
            client.disconnect()
        assert peer.receive() == Disconnect(0x04 if v5 else 0)
    finally:
        client.loop_stop()


def test_a_publishers_repeated_topic_shares_its_str_and_other_topics_are_still_checked() -> None:
    """The decoder keeps the last PUBLISH topic (str and bytes): the next message to the same
    topic shares the str without the topic's check and decode; any other topic, even of the same
    length, is decoded and checked as always."""
    from fluxmq._core.codec import Decoder, Publish, TopicNameInvalid, encode

    dec = Decoder()
    dec.version = 4
    a, b, c = dec.feed(b"".join(encode(Publish(t, b"x"), 4) for t in ("s/1", "s/1", "s/2")))
    assert (a.topic, b.topic, c.topic) == ("s/1", "s/1", "s/2") and a.topic is b.topic
    (d,) = dec.feed(encode(Publish("s/2", b"y"), 4))
    assert d.topic is c.topic and d.payload == b"y"
    (e,) = dec.feed(encode(Publish("é/2", b"z"), 4))
    assert e.topic == "é/2"
    with pytest.raises(TopicNameInvalid):
        Decoder().feed(b"\x30\x05\x00\x03s/1" + b"\x30\x05\x00\x03s/+")
    dec2 = Decoder()
    dec2.feed(encode(Publish("s/1", b""), 4))
    with pytest.raises(TopicNameInvalid):
        dec2.feed(b"\x30\x05\x00\x03s/#")
