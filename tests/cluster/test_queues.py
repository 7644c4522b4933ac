"""fluxmq/cluster/queues.py pieces that need no second worker: the ops' framing and a delivery
forwarded as its owner encoded it."""

from __future__ import annotations

from fluxmq._core.codec import USER_PROPERTY, Decoder, encode_publish
from fluxmq.broker.message import WIRE_V5_QOS1
from fluxmq.cluster.queues import _decode_ops, _encode_ops, forwarded_delivery


def test_ops_keep_their_order_headers_and_blobs() -> None:
    ops = [
        (["p", 1, "c1"], b"\x00\x01blob"),
        (["a", 1, "c1", "q", "g", 7, 0], b""),
        (["d", "x"], b"z" * 70000),
    ]
    assert list(_decode_ops(_encode_ops(ops))) == ops


def test_a_forwarded_delivery_is_the_owners_encoding_with_properties_read_from_it() -> None:
    props = {
        USER_PROPERTY: [("message-id", "q:3"), ("group-id", "g"), ("delivery-count", "2")],
        0x03: "text/plain",
    }
    data = encode_publish("$queue/q/k", b"payload!", 1, False, False, 1, props, 5)
    d = forwarded_delivery("$queue/q/k", data, 8, None, ("w0", "q", "g", 3))
    assert d.payload == b"payload!" and d.topic == "$queue/q/k" and d.qos == 1
    assert d.wire_cache[WIRE_V5_QOS1] is data  # sent to a 5.0 consumer as it is
    assert d.properties == Decoder(0, 5).feed(data)[0].properties  # decoded only when asked
    assert dict(d.properties[USER_PROPERTY])["delivery-count"] == "2"
    assert (
        forwarded_delivery("t", encode_publish("t", b"", 1, False, False, 1, None, 5), 0, None, ()).payload
        == b""
    )
