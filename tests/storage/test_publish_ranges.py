"""The broker's public API refuses a field MQTT's wire format cannot carry (``FieldOutOfRange``, a
ValueError naming the field and its range) before anything is routed or stored: ``Broker.publish``
(what HTTP, CoAP, bridges and cluster code call), ``Message.from_publish_properties`` (the message
expiry interval), ``open_session`` (session expiry, will delay, will message) and ``subscribe``.
Before, a message expiry interval over 2^32-1 or a property out of its range went through routing
and failed in the store's record encoding (``struct.error``), leaving the message half routed.

A broker over a real LMDB store in a tmp directory, with an online and a persistent subscriber.
"""

from __future__ import annotations

import re
import time

import pytest

from fluxmq.broker import message as message_module
from fluxmq.broker.message import (
    CONTENT_TYPE,
    CORRELATION_DATA,
    MESSAGE_EXPIRY_INTERVAL,
    PAYLOAD_FORMAT_INDICATOR,
    RESPONSE_TOPIC,
    USER_PROPERTY,
    Message,
)
from fluxmq.broker.session import Will
from fluxmq.errors import FieldOutOfRange
from tests.storage.lmdb_node import Node

LONG = "x" * 65536  # one byte over a UTF-8 string's 65,535

BAD_MESSAGES = {
    "expiry deadline": (
        lambda: Message("t/a", b"x", 1, True, None, time.monotonic() + 2**32 + 60),
        "message expiry interval must be 0..4294967295",
    ),
    "expiry as a property": (
        lambda: Message("t/a", b"x", 1, True, {MESSAGE_EXPIRY_INTERVAL: 2**32}),
        "property 2 is not one a message carries",
    ),
    "qos": (lambda: Message("t/a", b"x", 3, True), "qos must be 0, 1 or 2"),
    "topic length": (lambda: Message("t/" + LONG, b"x", 1, True), "topic: MQTT-4.7.3-3"),
    "topic wildcard": (lambda: Message("t/#", b"x", 1, True), "topic: MQTT-4.7.1-1"),
    "payload type": (lambda: Message("t/a", "text", 1, True), "payload must be bytes"),
    "payload format indicator": (
        lambda: Message("t/a", b"x", 1, True, {PAYLOAD_FORMAT_INDICATOR: 2**33}),
        "payload format indicator must be 0 or 1",
    ),
    "content type": (
        lambda: Message("t/a", b"x", 1, True, {CONTENT_TYPE: LONG}),
        "content type encodes to 65536 bytes, over MQTT's 65535",
    ),
    "content type surrogate": (
        lambda: Message("t/a", b"x", 1, True, {CONTENT_TYPE: "\ud800"}),
        "content type must be well-formed UTF-8",
    ),
    "response topic": (
        lambda: Message("t/a", b"x", 1, True, {RESPONSE_TOPIC: "r/+"}),
        "response topic: MQTT-4.7.1-1",
    ),
    "correlation data": (
        lambda: Message("t/a", b"x", 1, True, {CORRELATION_DATA: b"c" * 65536}),
        "correlation data is 65536 bytes, over MQTT's 65535",
    ),
    "user property value": (
        lambda: Message("t/a", b"x", 1, True, {USER_PROPERTY: [("k", LONG)]}),
        "user properties value encodes to 65536 bytes",
    ),
    "user property type": (
        lambda: Message("t/a", b"x", 1, True, {USER_PROPERTY: [("k", 1)]}),
        "user properties value must be a str, not int",
    ),
    "origin": (lambda: Message("t/a", b"x", 1, True, origin=LONG), "origin (client identifier) encodes"),
}


def subscribers(node: Node):
    online, d, _ = node.connect("online", 0, clean=True)
    node.broker.subscribe(online, "t/#", 1)
    stored, sd, _ = node.connect("stored", 3600)
    node.broker.subscribe(stored, "t/#", 1)
    node.disconnect(stored, sd)
    node.storage.commit()
    return d, node.broker.sessions["stored"]


def nothing_routed(node: Node, d, stored) -> None:
    assert not d.sent
    assert not stored.queue
    assert node.broker.retained.match("t/#") == []
    assert not node.storage.has_pending  # nothing recorded for the commit


@pytest.mark.parametrize("case", list(BAD_MESSAGES))
def test_publish_refuses_a_field_out_of_range_before_routing(node: Node, case: str) -> None:
    d, stored = subscribers(node)
    make, says = BAD_MESSAGES[case]
    with pytest.raises(FieldOutOfRange, match=re.escape(says)):
        node.broker.publish(make())
    nothing_routed(node, d, stored)
    # the broker and its store go on: the next message is routed, stored and committed
    assert node.broker.publish(Message("t/b", b"ok", 1, True)) == 2
    node.storage.commit()
    assert [m.payload for m in node.restart().broker.retained.match("t/#")] == [b"ok"]


def test_a_payload_over_mqtts_largest_is_refused(node: Node, monkeypatch) -> None:
    monkeypatch.setattr(message_module, "MAX_PAYLOAD", 10)  # (268,435,455 bytes: not allocated here)
    d, stored = subscribers(node)
    with pytest.raises(FieldOutOfRange, match="payload is 11 bytes, over MQTT's 10"):
        node.broker.publish(Message("t/a", b"x" * 11, 1, True))
    nothing_routed(node, d, stored)


@pytest.mark.parametrize("expiry", [2**32, -1, 1.5, 10**400])
def test_a_message_expiry_interval_out_of_range_is_refused_where_it_enters(node: Node, expiry) -> None:
    d, stored = subscribers(node)
    with pytest.raises(FieldOutOfRange, match="message expiry interval must be an integer 0..4294967295"):
        node.broker.publish(
            Message.from_publish_properties("t/a", b"x", 1, True, {MESSAGE_EXPIRY_INTERVAL: expiry})
        )
    nothing_routed(node, d, stored)


def test_the_largest_message_expiry_interval_is_stored_and_restored(node: Node) -> None:
    subscribers(node)
    m = Message.from_publish_properties("t/a", b"x", 1, True, {MESSAGE_EXPIRY_INTERVAL: 2**32 - 1})
    assert node.broker.publish(m) == 2
    node.storage.commit()
    node = node.restart()
    [restored] = node.broker.retained.match("t/#")
    assert 2**32 - 10 < restored.remaining_expiry() <= 2**32 - 1
    assert len(node.broker.sessions["stored"].queue) == 1


@pytest.mark.parametrize(
    "expiry, will, says",
    [
        (2**32, None, "session expiry interval must be an integer 0..4294967295"),
        (60, Will(Message("w", b"x", 1), 2**32), "will delay interval must be an integer 0..4294967295"),
        (60, Will(Message("w", b"x", 1, False, {USER_PROPERTY: [("k", 1)]}), 0), "user properties value"),
        (
            60,
            Will(Message("w", b"x", 1, False, {MESSAGE_EXPIRY_INTERVAL: 2**32}), 0),
            "will message expiry interval must be an integer 0..4294967295",
        ),
    ],
)
def test_open_session_refuses_an_interval_or_will_out_of_range(node: Node, expiry, will, says) -> None:
    with pytest.raises(FieldOutOfRange, match=re.escape(says)):
        node.broker.open_session("c", False, expiry, will)
    assert "c" not in node.broker.sessions
    assert not node.storage.has_pending
    assert "c" not in node.restart().broker.sessions


def test_a_will_keeps_its_message_expiry_interval_until_published(node: Node) -> None:
    """The MQTT layer keeps a will's Message Expiry Interval in its properties until the will is
    published (its lifetime starts then): in range, open_session takes it."""
    will = Will(Message("w", b"gone", 1, True, {MESSAGE_EXPIRY_INTERVAL: 2**32 - 1}), 0)
    s, d, _ = node.connect("c", 60, will=will)
    node.disconnect(s, d, publish_will=True)
    [published] = node.broker.retained.match("w")
    assert published.payload == b"gone" and published.remaining_expiry() > 2**32 - 10


@pytest.mark.parametrize(
    "kwargs, says",
    [
        ({"qos": 3}, "qos must be 0, 1 or 2"),
        ({"retain_handling": 3}, "retain handling must be 0, 1 or 2"),
        ({"subscription_id": 2**28}, "subscription identifier must be 0..268435455"),
    ],
)
def test_subscribe_refuses_a_field_out_of_range(node: Node, kwargs: dict, says: str) -> None:
    s, _, _ = node.connect("c", 3600)
    args = {"qos": 1, **kwargs}
    with pytest.raises(FieldOutOfRange, match=re.escape(says)):
        node.broker.subscribe(s, "t/#", args.pop("qos"), **args)
    assert not s.subscriptions and not node.storage.has_pending
    assert not node.restart().broker.sessions["c"].subscriptions
