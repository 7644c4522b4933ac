"""fluxmq.coap.codec without sockets: RFC 7252 §3 message format, §5.4.1 options, RFC 7959 blocks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxmq.coap import codec
from fluxmq.coap.codec import CoapMessage, parse, serialize
from fluxmq.errors import MalformedDatagram


def test_round_trip_with_extended_option_deltas_and_lengths() -> None:
    """§3.1: option deltas and lengths of 13+ and 269+ use the 1- and 2-byte extensions."""
    msg = CoapMessage(
        codec.CON,
        codec.POST,
        0x1234,
        b"\x01\x02\x03",
        [
            (codec.URI_PATH, b"a"),
            (codec.URI_PATH, b"x" * 300),
            (codec.URI_QUERY, b"qos=1"),
            (codec.SIZE1, codec.encode_uint(70000)),
            (codec.TOPIC, b"t/1"),
        ],
        b"payload",
    )
    data = serialize(msg)
    back = parse(data)
    assert (back.mtype, back.code, back.mid, back.token, back.payload) == (
        codec.CON,
        codec.POST,
        0x1234,
        b"\x01\x02\x03",
        b"payload",
    )
    assert back.options == msg.options
    assert back.uri_path() == ["a", "x" * 300]
    assert back.uri_query() == ["qos=1"]
    assert back.uint_option(codec.SIZE1) == 70000


def test_serialize_sorts_options_and_keeps_repeat_order() -> None:
    msg = CoapMessage(
        codec.NON,
        codec.GET,
        1,
        options=[(codec.URI_QUERY, b"b"), (codec.URI_PATH, b"p"), (codec.URI_QUERY, b"a")],
    )
    assert parse(serialize(msg)).options == [
        (codec.URI_PATH, b"p"),
        (codec.URI_QUERY, b"b"),
        (codec.URI_QUERY, b"a"),
    ]


def test_wire_bytes_of_a_known_message() -> None:
    """§3: Ver=1 T=CON TKL=1, 0.01 GET, mid 0x0001, token 0xAB, Uri-Path "h" (delta 11, len 1)."""
    msg = CoapMessage(codec.CON, codec.GET, 1, b"\xab", [(codec.URI_PATH, b"h")])
    assert serialize(msg) == bytes([0x41, 0x01, 0x00, 0x01, 0xAB, 0xB1]) + b"h"
    assert codec.empty(codec.ACK, 0x0102) == bytes([0x60, 0x00, 0x01, 0x02])


@pytest.mark.parametrize(
    "data, why",
    [
        (b"\x40\x01\x00", "shorter than the 4-byte header"),
        (b"\x80\x01\x00\x01", "version 2"),
        (b"\x49\x01\x00\x01" + b"t" * 9, "token length 9 is reserved (§3)"),
        (b"\x42\x01\x00\x01\x01", "truncated token"),
        (b"\x40\x01\x00\x01\xff", "payload marker then nothing (§3)"),
        (b"\x40\x01\x00\x01\xf1x", "option delta 15 without being the marker (§3.1)"),
        (b"\x40\x01\x00\x01\x1f", "option length 15 (§3.1)"),
        (b"\x40\x01\x00\x01\xd1", "truncated 1-byte delta extension"),
        (b"\x40\x01\x00\x01\x15ab", "option value past the end"),
        (b"\x41\x00\x00\x01\x01", "an Empty message with a token (§4.1)"),
        (b"\x40\x20\x00\x01", "code class 1 is reserved"),
    ],
)
def test_malformed_datagrams_raise_malformed_datagram(data: bytes, why: str) -> None:
    with pytest.raises(MalformedDatagram):
        parse(data)


def test_unknown_critical_and_elective_options() -> None:
    """§5.4.1: odd option numbers are critical; an unknown critical one must be rejected, an unknown
    elective one ignored."""
    assert codec.is_critical(codec.URI_PATH) and not codec.is_critical(codec.ETAG)
    msg = CoapMessage(codec.CON, codec.GET, 1, options=[(codec.URI_PATH, b"x"), (2048, b"e")])
    assert msg.unknown_critical() is None
    msg.add(2049, b"c")
    assert msg.unknown_critical() == 2049


def test_uint_and_block_values() -> None:
    """§3.2 minimal uint; RFC 7959 §2.2 NUM/M/SZX."""
    assert (
        codec.encode_uint(0) == b""
        and codec.encode_uint(255) == b"\xff"
        and codec.encode_uint(256) == b"\x01\x00"
    )
    assert codec.decode_uint(b"\x01\x00") == 256
    for num, more, szx in [(0, False, 0), (1, True, 6), (0xFFFFF, False, 2), (15, True, 4)]:
        assert codec.decode_block(codec.encode_block(num, more, szx)) == (num, more, szx)
    assert codec.block_size(6) == 1024
    with pytest.raises(MalformedDatagram):
        codec.decode_block(b"\x0f")  # SZX 7 is reserved
    with pytest.raises(MalformedDatagram):
        codec.decode_block(b"\x00\x00\x00\x01")


def test_non_utf8_uri_path_is_malformed() -> None:
    msg = parse(serialize(CoapMessage(codec.CON, codec.GET, 1, options=[(codec.URI_PATH, b"\xff\xfe")])))
    with pytest.raises(MalformedDatagram):
        msg.uri_path()


def test_content_formats_map_to_mqtt_content_types() -> None:
    assert codec.CONTENT_FORMATS[50] == "application/json"
    assert codec.CONTENT_TYPES["text/plain;charset=utf-8"] == 0


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_any_datagram_parses_or_raises_malformed_only(data: bytes) -> None:
    """Random bytes: a message, or MalformedDatagram (counted and dropped), never another exception."""
    try:
        msg = parse(data)
    except MalformedDatagram:
        return
    msg.unknown_critical()
    try:
        msg.uri_path()
        msg.uri_query()
    except MalformedDatagram:
        return
    # what parses re-serializes to a datagram that parses to the same message
    again = parse(serialize(msg))
    assert (again.mtype, again.code, again.mid, again.token, again.options, again.payload) == (
        msg.mtype,
        msg.code,
        msg.mid,
        msg.token,
        msg.options,
        msg.payload,
    )


@settings(max_examples=1000, deadline=None)
@given(st.binary(min_size=4, max_size=200), st.integers(0, 199), st.integers(0, 255))
def test_fuzz_mutated_valid_messages(data: bytes, where: int, value: int) -> None:
    base = bytearray(
        serialize(
            CoapMessage(
                codec.CON, codec.POST, 7, b"tk", [(codec.URI_PATH, b"a"), (codec.URI_QUERY, b"q=1")], data
            )
        )
    )
    base[where % len(base)] = value
    try:
        parse(bytes(base))
    except MalformedDatagram:
        pass
