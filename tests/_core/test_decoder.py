"""Tests of fluxmq._core.decoder's behaviour: versions, the maximum packet size, errors, the pending
buffer, the repeated-topic cache and known CONNECT vectors. The malformed-packet rules are in
test_decoder_malformed.py.
"""

from __future__ import annotations

import pytest

from fluxmq._core.codec import Connect, Decoder, Pingreq, Puback, Publish, Will, encode, encode_publish
from fluxmq.errors import MalformedPacket, PacketTooLarge
from tests._core.codec_strategies import VERSIONS


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
