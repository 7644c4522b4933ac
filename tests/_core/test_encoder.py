"""Tests of fluxmq._core.encoder: the PUBLISH fast paths (encode_publish, append_publish), what the
encoder refuses, and the 3.x and 5.0 short forms.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fluxmq._core.codec import (
    Auth,
    Connack,
    Connect,
    Decoder,
    Disconnect,
    Pingreq,
    Puback,
    Publish,
    Pubrel,
    Subscribe,
    Subscription,
    Unsubscribe,
    append_publish,
    encode,
    encode_publish,
)
from tests._core.codec_strategies import FAST, PACKET_ID, VERSIONS, publishes


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
