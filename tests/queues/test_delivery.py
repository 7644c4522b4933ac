"""fluxmq/queues/delivery.py: a delivery's PUBLISH is made from its record's encoding with only the
per-delivery user properties appended; it must be the PUBLISH the codec makes of its properties."""

from __future__ import annotations

import pytest

from fluxmq._core.codec import encode_publish
from fluxmq.broker.message import USER_PROPERTY, WIRE_V5_QOS1, Message
from fluxmq.queues.delivery import build_delivery
from fluxmq.queues.log import Record


@pytest.mark.parametrize("props", [None, {USER_PROPERTY: [("a", "b")], 0x03: "text/plain"}, {0x09: b"corr"}])
@pytest.mark.parametrize("count", [1, 2, 17])
@pytest.mark.parametrize("extra", [(), (("x-stream-offset", "5"), ("x-stream-timestamp", "1700000000000"))])
@pytest.mark.parametrize("size", [0, 200, 20000])  # a 1, 2 and 3 byte remaining length
def test_the_prebuilt_publish_is_the_codecs_encoding_of_its_properties(props, count, extra, size) -> None:
    record = Record(12345, 1.0, Message("$queue/q/k/é", b"x" * size, 1, False, props), 10)
    d = build_delivery(record, "q", "g", count, None, None, extra, ("group-id", "g"))
    again = build_delivery(
        record, "q", "g", count, None, None, extra, ("group-id", "g")
    )  # the record's cached part
    user = dict(d.properties[USER_PROPERTY])
    assert user["message-id"] == "q:12345" and user["offset"] == "12345" and user["queue"] == "q"
    assert user["group-id"] == "g" and user["delivery-count"] == str(count)
    assert all(user[k] == v for k, v in extra)
    for delivery in (d, again):
        assert delivery.wire_cache[WIRE_V5_QOS1] == encode_publish(
            delivery.topic, delivery.payload, 1, False, False, 1, delivery.properties, 5
        )


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("size", [0, 200, 20000])
def test_a_work_delivery_is_the_general_build_with_its_pending_attributes(count, size) -> None:
    from fluxmq.queues.delivery import user_property, work_delivery

    record = Record(77, 1.0, Message("$queue/q/k", b"y" * size, 1), 10)
    general = build_delivery(record, "q", "g", count, None, None, (), ("group-id", "g"))
    member = object()
    d = work_delivery(
        record, "q", count, None, ("group-id", "g"), user_property("group-id", "g"), member, 5.0, 77
    )
    assert d.wire_cache == general.wire_cache
    assert d.properties == general.properties
    assert (d.topic, d.payload, d.qos, d.retain, d.ticket, d.attempt) == (
        general.topic,
        general.payload,
        1,
        False,
        None,
        count,
    )
    assert (d.member, d.deadline, d.part, d.offset) == (member, 5.0, -1, 77)
