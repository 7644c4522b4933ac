"""Tests of fluxmq._core.wire, the MQTT data representation (MQTT 5.0 section 1.5), through the
decoder and the encoder that use it: Variable Byte Integers and UTF-8 strings.
"""

from __future__ import annotations

import pytest

from fluxmq._core import codec, wire
from fluxmq._core.codec import Decoder, Pingreq, Publish, encode, encode_publish
from fluxmq.errors import MalformedPacket, MQTTError
from tests._core.wire_builders import block, connect_v, frame, prop, rejects, s


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


BAD_UTF8 = [b"\xff", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"a\xf4\x90\x80\x80"]


@pytest.mark.parametrize("bad", BAD_UTF8)
@pytest.mark.parametrize("where", ["topic", "client_id", "user_property", "filter"])
def test_ill_formed_utf8_is_malformed(bad, where):
    """MQTT-1.5.4-1 (3.1.1 MQTT-1.5.3-1): ill-formed UTF-8, overlongs and surrogates (ED A0 80)."""
    data = {
        "topic": frame(0x30, s(bad) + b"p"),
        "client_id": connect_v(4, 0x02, s(bad)),
        "user_property": frame(0x30, s(b"t") + block(prop(0x26, s(b"k") + s(bad)))),
        "filter": frame(0x82, b"\x00\x01" + s(bad) + b"\x00"),
    }[where]
    rejects(data, MalformedPacket, version=5 if where == "user_property" else 4)


@pytest.mark.parametrize("where", ["topic", "client_id", "username", "will_topic", "filter", "reason_string"])
def test_null_character_in_a_string_is_malformed(where):
    """MQTT-1.5.4-2 (3.1.1 MQTT-1.5.3-2): a UTF-8 string must not include U+0000."""
    data = {
        "topic": frame(0x30, s(b"a\x00b")),
        "client_id": connect_v(4, 0x02, s(b"\x00")),
        "username": connect_v(4, 0x82, s(b"c") + s(b"us\x00er")),
        "will_topic": connect_v(4, 0x06, s(b"c") + s(b"w\x00") + s(b"")),
        "filter": frame(0x82, b"\x00\x01" + s(b"a/\x00") + b"\x00"),
        "reason_string": frame(0x40, b"\x00\x01\x10" + block(prop(0x1F, s(b"\x00")))),
    }[where]
    rejects(data, MalformedPacket, version=5 if where == "reason_string" else 4)


def test_valid_multibyte_utf8_decodes():
    """Sanity for the above: multi-byte UTF-8 (including 4-byte) is accepted as is."""
    topic = "h\u00e9/\u4e2d/\U0001f600"
    assert Decoder().feed(frame(0x30, s(topic.encode()) + b"x")) == [Publish(topic, b"x")]


def test_max_remaining_length_is_the_largest_four_byte_variable_byte_integer():
    assert codec.MAX_REMAINING_LENGTH == wire.MAX_REMAINING_LENGTH == 128**4 - 1
