"""The decoder's malformed-packet and protocol-error rules, one test per rule, plus fuzzing (the
property block's rules are in test_properties.py, the UTF-8 string rules in test_wire.py).

Packets here are written byte by byte (not with the encoder under test). Statement numbers are
MQTT 5.0 unless marked 3.1.1; the error class is the one the spec's reason code calls for
(Malformed Packet 0x81, Protocol Error 0x82, Topic Name invalid 0x90, Packet too large 0x95,
Unsupported Protocol Version 0x84).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fluxmq._core.codec import Connect, Decoder, Packet, Publish, Subscribe, Subscription, encode
from fluxmq.errors import (
    MalformedPacket,
    MQTTError,
    PacketTooLarge,
    ProtocolError,
    TopicNameInvalid,
    UnsupportedProtocolVersion,
)
from tests._core.codec_strategies import any_packet, fuzz_examples
from tests._core.guarded import guarded
from tests._core.wire_builders import block, connect_v, frame, prop, rejects, s

# -- fixed header -----------------------------------------------------------------------------


def test_remaining_length_of_more_than_four_bytes_is_malformed():
    """MQTT 5.0 1.5.5 / 3.1.1 2.2.3: the Remaining Length is at most four bytes."""
    rejects(b"\x30\xff\xff\xff\xff\x01", MalformedPacket)
    # Detected on the fifth length byte, before anything follows it.
    decoder = Decoder()
    decoder.feed(b"\x30\xff\xff\xff")
    with pytest.raises(MalformedPacket):
        decoder.feed(b"\x80")


def test_reserved_packet_type_0_is_malformed():
    """MQTT 5.0 2.1.2: packet type 0 is reserved."""
    rejects(b"\x00\x00", MalformedPacket)


@pytest.mark.parametrize("version", [0, 3, 4])
def test_packet_type_15_is_reserved_before_5_0(version):
    """3.1.1 2.2.1: type 15 is reserved; it is AUTH only in 5.0."""
    rejects(b"\xf0\x00", MalformedPacket, version=version)
    assert len(Decoder(version=5).feed(b"\xf0\x00")) == 1


@pytest.mark.parametrize(
    ("name", "first"),
    [
        ("PUBREL", 0x60),
        ("PUBREL", 0x63),
        ("SUBSCRIBE", 0x80),
        ("SUBSCRIBE", 0x83),
        ("UNSUBSCRIBE", 0xA0),
        ("UNSUBSCRIBE", 0xA6),
    ],
)
def test_pubrel_subscribe_unsubscribe_need_flags_0010(name, first):
    """MQTT-3.6.1-1, MQTT-3.8.1-1, MQTT-3.10.1-1: the reserved flags are 0,0,1,0."""
    rejects(bytes([first]) + b"\x00", MalformedPacket)


def test_mqtt31_allows_dup_on_retried_subscribe():
    """MQTT 3.1 let DUP be set on a retried SUBSCRIBE/UNSUBSCRIBE/PUBREL (flags 1010)."""
    data = frame(0x8A, b"\x00\x01" + s(b"a/b") + b"\x01")
    assert Decoder(version=3).feed(data) == [Subscribe(1, [Subscription("a/b", 1)])]
    rejects(data, MalformedPacket, version=4)


@pytest.mark.parametrize("first", [0x11, 0x28, 0x41, 0x52, 0x74, 0x91, 0xB8, 0xC1, 0xD2, 0xE4])
def test_reserved_flags_of_other_packets_must_be_0(first):
    """MQTT-2.1.3-1 (3.1.1 MQTT-2.2.2-1): flags marked reserved must be as specified (0)."""
    rejects(bytes([first]) + b"\x00", MalformedPacket)


def test_publish_qos_3_is_malformed():
    """MQTT-3.3.1-4: a PUBLISH must not have both QoS bits set."""
    err = rejects(frame(0x36, s(b"t") + b"\x00\x01"), MalformedPacket)
    assert err.reason_code == 0x81


def test_publish_qos_0_with_dup_is_malformed():
    """MQTT-3.3.1-2: DUP must be 0 for all QoS 0 messages."""
    rejects(frame(0x38, s(b"t") + b"x"), MalformedPacket)


def test_packet_too_large_is_raised_from_the_fixed_header_alone():
    """MQTT-3.2.2-15 (the server's Maximum Packet Size): refused before the body is buffered."""
    decoder = Decoder(max_packet_size=1024)
    with pytest.raises(PacketTooLarge) as info:
        decoder.feed(b"\x30\x80\x80\x80\x01")  # announces a 2 MiB PUBLISH; no body sent
    assert info.value.reason_code == 0x95
    assert len(decoder) == 0
    # The limit counts the fixed header: 1 + 2 (length) + 1021 bytes is exactly the limit.
    assert len(Decoder(max_packet_size=1024).feed(frame(0x30, s(b"t") + b"x" * 1018))) == 1
    rejects(frame(0x30, s(b"t") + b"x" * 1019), PacketTooLarge, max_packet_size=1024)


# -- body length --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "data"),
    [
        (4, frame(0x30, b"\x00\x09abc")),  # topic longer than the packet
        (4, frame(0x32, s(b"t") + b"\x00")),  # packet id cut short
        (5, frame(0x30, s(b"t"))),  # property length missing
        (5, frame(0x30, s(b"t") + b"\x05\x01")),  # property length beyond the packet
        (5, frame(0x30, s(b"t") + b"\x02\x02\x00")),  # four-byte property cut short
        (4, connect_v(4, 0x02, b"\x00")),  # client id length cut short
        (4, frame(0x20, b"\x00")),  # CONNACK without return code
        (4, frame(0x40, b"\x00")),  # PUBACK without packet id
        (5, frame(0x82, b"\x00\x01\x00" + s(b"a"))),  # subscription options missing
    ],
)
def test_body_shorter_than_its_fields_is_malformed(version, data):
    """MQTT 5.0 2.1.4 / 1.5: fields must fit in the Remaining Length."""
    rejects(data, MalformedPacket, version=version)


@pytest.mark.parametrize(
    ("version", "data"),
    [
        (4, frame(0xC0, b"\x00")),  # PINGREQ with a body
        (4, frame(0xD0, b"\x00")),  # PINGRESP with a body
        (4, frame(0x40, b"\x00\x01\x00")),  # 3.1.1 PUBACK of 3 bytes
        (4, frame(0xB0, b"\x00\x01\x00")),  # 3.1.1 UNSUBACK with codes
        (4, frame(0xE0, b"\x00")),  # 3.1.1 DISCONNECT with a body
        (4, frame(0x20, b"\x00\x00\x00")),  # CONNACK of 3 bytes in 3.1.1
        (4, connect_v(4, 0x02, s(b"cid") + b"\x00")),  # CONNECT with a stray byte
        (5, frame(0x40, b"\x00\x01\x10\x00\x00")),  # PUBACK with bytes after the properties
        (5, frame(0xE0, b"\x00\x00\x00")),  # DISCONNECT with bytes after the properties
        (5, frame(0x20, b"\x00\x00\x00\x00")),  # CONNACK with bytes after the properties
    ],
)
def test_bytes_left_over_inside_a_packet_are_malformed(version, data):
    """MQTT 5.0 2.1.4: the Remaining Length is exactly the variable header plus payload."""
    rejects(data, MalformedPacket, version=version)


@pytest.mark.parametrize("topic", [b"a/+", b"#", b"a/#/b", b"+/x", b"sport+"])
def test_wildcard_in_publish_topic_is_invalid(topic):
    """MQTT-3.3.2-2: the Topic Name in a PUBLISH must not contain wildcard characters."""
    err = rejects(frame(0x30, s(topic) + b"p"), TopicNameInvalid)
    assert err.reason_code == 0x90


def test_empty_publish_topic_is_invalid_before_5_0():
    """MQTT-4.7.3-1: topic names are at least one character long."""
    rejects(frame(0x30, s(b"") + b"p"), TopicNameInvalid, version=4)


def test_empty_publish_topic_needs_a_topic_alias_in_5_0():
    """MQTT 5.0 3.3.2.1: a zero-length Topic Name without a Topic Alias is a Protocol Error."""
    rejects(frame(0x30, s(b"") + b"\x00p"), ProtocolError, version=5)
    packets = Decoder(version=5).feed(frame(0x30, s(b"") + block(prop(0x23, b"\x00\x05")) + b"p"))
    assert packets == [Publish("", b"p", properties={0x23: 5})]


def test_topic_alias_zero_is_topic_alias_invalid_MQTT_3_3_2_8():
    """A Topic Alias of 0 is a protocol error with its own reason code, 0x94 Topic Alias invalid."""
    with pytest.raises(ProtocolError) as info:
        Decoder(version=5).feed(frame(0x30, s(b"t") + block(prop(0x23, b"\x00\x00")) + b"p"))
    assert info.value.reason_code == 0x94


def test_wildcard_or_empty_will_topic_is_invalid():
    """MQTT-3.1.3-11 and MQTT-4.7.3-1 applied to the Will Topic."""
    rejects(connect_v(4, 0x06, s(b"c") + s(b"w/#") + s(b"m")), TopicNameInvalid, version=0)
    rejects(connect_v(4, 0x06, s(b"c") + s(b"") + s(b"m")), TopicNameInvalid, version=0)


# -- packet identifiers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "data"),
    [
        (4, frame(0x32, s(b"t") + b"\x00\x00")),
        (5, frame(0x34, s(b"t") + b"\x00\x00\x00")),
        (4, frame(0x82, b"\x00\x00" + s(b"a") + b"\x00")),
        (4, frame(0xA2, b"\x00\x00" + s(b"a"))),
        (4, frame(0x40, b"\x00\x00")),
        (5, frame(0x62, b"\x00\x00")),
        (4, frame(0x90, b"\x00\x00\x00")),
        (4, frame(0xB0, b"\x00\x00")),
    ],
)
def test_packet_identifier_zero_is_a_protocol_error(version, data):
    """MQTT-2.2.1-3: SUBSCRIBE, UNSUBSCRIBE and QoS>0 PUBLISH need a non-zero Packet Identifier
    (and the acknowledgements echo one, so 0 is never valid there either)."""
    err = rejects(data, ProtocolError, version=version)
    assert err.reason_code == 0x82


# -- SUBSCRIBE / UNSUBSCRIBE -------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 5])
def test_subscribe_without_subscriptions_is_a_protocol_error(version):
    """MQTT-3.8.3-2 (3.1.1 MQTT-3.8.3-3): the payload holds at least one filter/options pair."""
    rejects(frame(0x82, b"\x00\x01" + (b"\x00" if version == 5 else b"")), ProtocolError, version=version)


@pytest.mark.parametrize("version", [4, 5])
def test_unsubscribe_without_filters_is_a_protocol_error(version):
    """MQTT-3.10.3-2: the UNSUBSCRIBE payload holds at least one topic filter."""
    rejects(frame(0xA2, b"\x00\x01" + (b"\x00" if version == 5 else b"")), ProtocolError, version=version)


@pytest.mark.parametrize("options", [0x40, 0x80, 0xC1])
def test_subscription_options_reserved_bits_are_malformed_in_5_0(options):
    """MQTT-3.8.3-5: bits 6 and 7 of the Subscription Options are reserved."""
    rejects(frame(0x82, b"\x00\x01\x00" + s(b"a") + bytes([options])), MalformedPacket, version=5)


@pytest.mark.parametrize("options", [0x04, 0x08, 0x10, 0x80])
def test_requested_qos_reserved_bits_are_malformed_in_3_1_1(options):
    """3.1.1 MQTT-3-8.3-4: the upper 6 bits of the Requested QoS byte are reserved."""
    rejects(frame(0x82, b"\x00\x01" + s(b"a") + bytes([options])), MalformedPacket, version=4)


def test_retain_handling_3_is_a_protocol_error():
    """MQTT 5.0 3.8.3.1: it is a Protocol Error to send a Retain Handling value of 3."""
    rejects(frame(0x82, b"\x00\x01\x00" + s(b"a") + b"\x30"), ProtocolError, version=5)


def test_subscription_qos_3():
    """MQTT 5.0 3.8.3.1 (Protocol Error) / 3.1.1 MQTT-3-8.3-4 (malformed): QoS 3 is not a QoS."""
    rejects(frame(0x82, b"\x00\x01\x00" + s(b"a") + b"\x03"), ProtocolError, version=5)
    rejects(frame(0x82, b"\x00\x01" + s(b"a") + b"\x03"), MalformedPacket, version=4)


# -- CONNECT ---------------------------------------------------------------------------------


def test_connect_reserved_flag_is_malformed():
    """MQTT-3.1.2-3: the reserved flag in the CONNECT flags must be 0."""
    rejects(connect_v(4, 0x03), MalformedPacket, version=0)


@pytest.mark.parametrize("flags", [0x0A, 0x12, 0x22])
def test_will_qos_and_retain_need_the_will_flag(flags):
    """MQTT-3.1.2-11 and MQTT-3.1.2-13 (3.1.1 MQTT-3.1.2-13, -15): without the Will Flag the Will
    QoS and Will Retain are 0."""
    rejects(connect_v(4, flags), MalformedPacket, version=0)
    rejects(connect_v(5, flags, b"\x00" + s(b"cid")), MalformedPacket, version=0)


def test_will_qos_3_is_malformed():
    """MQTT-3.1.2-12 (3.1.1 MQTT-3.1.2-14): the Will QoS must not be 3."""
    rejects(connect_v(4, 0x1E, s(b"c") + s(b"w") + s(b"m")), MalformedPacket, version=0)


def test_password_without_username_is_malformed_in_3_1_1():
    """3.1.1 MQTT-3.1.2-22: if the User Name Flag is 0, the Password Flag must be 0."""
    rejects(connect_v(4, 0x42, s(b"c") + s(b"pw")), MalformedPacket, version=0)
    rejects(connect_v(3, 0x42, s(b"c") + s(b"pw")), MalformedPacket, version=0)
    # 5.0 allows a password without a user name (MQTT 5.0 3.1.2.9).
    connect = Decoder().feed(connect_v(5, 0x42, b"\x00" + s(b"c") + s(b"pw")))[0]
    assert (connect.username, connect.password) == (None, b"pw")


@pytest.mark.parametrize(
    ("name", "level"),
    [
        (b"MQTT", 6),
        (b"MQTT", 2),
        (b"MQTT", 0x84),
        (b"MQTT", 3),
        (b"MQIsdp", 4),
        (b"MQIsdp", 5),
        (b"HTTP", 4),
        (b"", 4),
    ],
)
def test_unknown_protocol_name_or_level_is_unsupported(name, level):
    """MQTT-3.1.2-1 and MQTT-3.1.2-2: reply 0x84 (3.1.1 return code 1) to an unknown name/level."""
    err = rejects(connect_v(level, 0x02, name=name), UnsupportedProtocolVersion, version=0)
    assert err.reason_code == 0x84


def test_mqtt31_client_id_length_is_not_the_codecs_business():
    """The 3.1 limit of 23 characters is a protocol-layer decision; the codec passes it on."""
    connect = Decoder().feed(connect_v(3, 0x02, s(b"x" * 40)))[0]
    assert connect == Connect("x" * 40, protocol_version=3)


def test_connack_reserved_flags_are_malformed():
    """MQTT-3.2.2-1 (3.1.1 too): bits 7-1 of the Connect Acknowledge Flags are reserved."""
    rejects(frame(0x20, b"\x02\x00"), MalformedPacket, version=4)
    rejects(frame(0x20, b"\x80\x00\x00"), MalformedPacket, version=5)


# -- fuzzing ---------------------------------------------------------------------------------


FIRST_BYTES = [
    0x10,
    0x20,
    0x30,
    0x31,
    0x32,
    0x35,
    0x3B,
    0x3C,
    0x40,
    0x50,
    0x62,
    0x70,
    0x82,
    0x90,
    0xA2,
    0xB0,
    0xC0,
    0xD0,
    0xE0,
    0xF0,
]


FRAMES = st.builds(frame, st.sampled_from(FIRST_BYTES), st.binary(max_size=48))


FUZZ = settings(max_examples=fuzz_examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_only_mqtt_errors(data: bytes, version: int, max_packet_size: int = 0) -> tuple:
    """Feed ``data`` whole and in two pieces; both give the same packets and the same error type."""
    results = []
    for cut in (len(data), len(data) // 2):
        decoder = Decoder(max_packet_size=max_packet_size, version=version)
        packets = []
        error = None
        try:
            with guarded(data[:cut]) as head, guarded(data[cut:]) as tail:
                packets.extend(decoder.feed(head))
                packets.extend(decoder.feed(tail))
        except MQTTError as exc:
            error = type(exc)
            packets.extend(exc.packets)
        assert all(isinstance(p, Packet) for p in packets)
        results.append((packets, error))
    assert results[0] == results[1]
    return results[0]


@FUZZ
@given(
    data=st.binary(max_size=256),
    version=st.sampled_from([0, 3, 4, 5]),
    max_packet_size=st.sampled_from([0, 40]),
)
def test_random_bytes_raise_only_mqtt_errors(data, version, max_packet_size):
    """No IndexError, UnicodeDecodeError, crash or hang on arbitrary input."""
    check_only_mqtt_errors(data, version, max_packet_size)


@FUZZ
@given(frames=st.lists(FRAMES, min_size=1, max_size=6), version=st.sampled_from([0, 3, 4, 5]))
def test_random_bodies_in_well_formed_frames_raise_only_mqtt_errors(frames, version):
    """Frames with a valid header and random body reach every packet parser."""
    check_only_mqtt_errors(b"".join(frames), version)


@st.composite
def mutated_streams(draw):
    version = draw(st.sampled_from([3, 4, 5]))
    packets = draw(st.lists(any_packet(version), min_size=1, max_size=4))
    data = bytearray(b"".join(encode(p, version) for p in packets))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        if action == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif action == "set":
            data[position] = draw(st.integers(0, 255))
        elif action == "insert":
            data.insert(position, draw(st.integers(0, 255)))
        elif len(data) > 1:
            del data[position]
    return version, bytes(data)


@FUZZ
@given(case=mutated_streams())
def test_mutated_valid_streams_raise_only_mqtt_errors(case):
    """Bit flips and byte edits of valid packets: decoded or rejected with an MQTT error."""
    version, data = case
    check_only_mqtt_errors(data, version)
