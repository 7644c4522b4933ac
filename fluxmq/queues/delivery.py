"""Deliveries and settlements on the wire: the user properties a delivery carries and how a
settlement (``$queue/{name}/$ack|$nack|$reject``) names what it settles."""

from __future__ import annotations

from fluxmq._core.codec import encode_publish
from fluxmq._core.queue_wire import plain_delivery, record_delivery
from fluxmq.broker.message import USER_PROPERTY, WIRE_V5_QOS1, Message, TrackedMessage

ACK, NACK, REJECT = "$ack", "$nack", "$reject"
SETTLE_ACTIONS = (ACK, NACK, REJECT)


def user_properties(props: list | None) -> dict[str, str]:
    """5.0 user properties as a dict (the last value of a repeated name wins)."""
    return dict(props) if props else {}


def message_id(queue: str, offset: int) -> str:
    return f"{queue}:{offset}"


def parse_message_id(text: str) -> tuple[str, int] | None:
    """``{queue}:{offset}`` -> (queue, offset); None when it is not one."""
    queue, sep, offset = text.rpartition(":")
    if not sep or not queue or not (offset.isascii() and offset.isdigit()):  # int() refuses '²'
        return None
    return queue, int(offset)


def user_property(name: str, value: str) -> bytes:
    """One 5.0 User Property as it is encoded in a PUBLISH's properties."""
    n, v = name.encode(), value.encode()
    return b"\x26" + len(n).to_bytes(2, "big") + n + len(v).to_bytes(2, "big") + v


class Delivery(TrackedMessage):
    """A durable queue's delivery. Its 5.0 PUBLISH is made in one buffer (``fluxmq._core.queue_wire``:
    the record's topic, payload and own properties, then message-id, queue, offset, group-id,
    delivery-count and a stream's position as user properties): no property dict per delivery.
    ``properties`` is built only when something asks for it (a consumer with topic aliases, whose
    PUBLISH the connection encodes itself).

    A work queue's delivery is also its group's pending entry and its own ticket (``ticket`` None):
    ``member``, ``deadline``, ``attempt`` (its delivery count), ``part`` and ``offset`` are those of
    ``group.Pending``, set by the group that sends it. One object per delivery, where there were
    three (the delivery, its ``Pending`` and the session's ``Inflight``)."""

    __slots__ = ("_record", "_group_pair", "attempt", "_extra", "member", "deadline", "part", "offset")

    @property
    def properties(self) -> dict | None:
        try:
            props = _PROPERTIES.__get__(self)
        except AttributeError:  # never set (build_delivery leaves it): made from the record below
            props = None
        if props is None and self._record is not None:
            message = self._record.message
            user = [
                *((message.properties or {}).get(USER_PROPERTY) or ()),
                *_common_pairs(self._record),
                self._group_pair,
                ("delivery-count", str(self.attempt)),
                *self._extra,
            ]
            props = dict(message.properties) if message.properties else {}
            props.pop(USER_PROPERTY, None)
            props[USER_PROPERTY] = user  # last, as in the prebuilt encoding
            _PROPERTIES.__set__(self, props)
        return props

    @properties.setter
    def properties(self, value) -> None:
        _PROPERTIES.__set__(self, value)

    def identity(self) -> tuple[str, str, int]:
        """(queue, group, offset) of this delivery."""
        record = self._record
        return record.queue_name, self._group_pair[1], record.offset


_PROPERTIES = Message.__dict__["properties"]  # the slot behind Delivery.properties
_new = object.__new__


def _common_pairs(record) -> tuple:
    offset = str(record.offset)
    return (
        ("message-id", record.queue_name + ":" + offset),
        ("queue", record.queue_name),
        ("offset", offset),
    )


def _record_wire(record) -> tuple[bytes, bytes]:
    """(topic and packet id, properties) of the deliveries of a record with properties of its own,
    before the per-delivery user properties: encoded by the codec once per record."""
    message = record.message
    props = dict(message.properties)
    # The user properties last, so that a delivery's own follow them in the encoding.
    props[USER_PROPERTY] = [*(props.pop(USER_PROPERTY, None) or ()), *_common_pairs(record)]
    data = encode_publish(message.topic, message.payload, 1, False, False, 1, props, 5)
    # 0x32 | remaining length | topic | packet id | properties length | properties | payload
    i = 1
    while data[i] & 0x80:
        i += 1
    start = i + 1
    topic_end = start + 2 + int.from_bytes(data[start : start + 2], "big") + 2  # with the packet id
    j, plen, shift = topic_end, 0, 0
    while True:
        byte = data[j]
        plen |= (byte & 0x7F) << shift
        j += 1
        if not byte & 0x80:
            break
        shift += 7
    wire = record.wire = (data[start:topic_end], data[j : j + plen])  # the payload is the message's
    return wire


def build_delivery(
    record,
    queue: str,
    group: str,
    count: int,
    settle,
    ticket,
    extra=(),
    group_pair=None,
    group_bytes: bytes | None = None,
) -> TrackedMessage:
    """The PUBLISH a consumer gets: the original topic, payload and properties, plus the user
    properties message-id, queue, offset, group-id and delivery-count (and ``extra`` pairs).
    ``group_pair``: the caller's prebuilt ("group-id", group); ``group_bytes`` its encoding."""
    if group_pair is None:
        group_pair = ("group-id", group)
    if group_bytes is None:
        group_bytes = user_property(*group_pair)
    extra_bytes = b"".join([user_property(k, v) for k, v in extra]) if extra else b""
    message = record  # a queue record is its message (log.Record)
    payload = message.payload
    record.queue_name = queue
    if message.properties:
        wire = record.wire
        if wire is None:
            wire = _record_wire(record)
        data = record_delivery(wire[0], wire[1], group_bytes, count, extra_bytes, payload)
    else:
        data = plain_delivery(message.topic, queue, record.offset, group_bytes, count, extra_bytes, payload)
    d = _new(Delivery)
    d.topic = message.topic
    d.payload = payload
    d.qos = 1
    d.retain = False
    d.expires_at = None
    d.origin = None
    d.wire_cache = {WIRE_V5_QOS1: data}
    d.settle = settle
    d.ticket = ticket
    d._record = record
    d._group_pair = group_pair
    d.attempt = count
    d._extra = extra
    return d


def work_delivery(
    record,
    queue: str,
    count: int,
    settle,
    group_pair,
    group_bytes: bytes,
    member,
    deadline: float,
    offset: int,
) -> Delivery:
    """``build_delivery`` of a work queue's record without properties of its own (the common
    case), with the group's pending attributes set (``part`` -1: not partitioned): one call per
    delivery of a group's run (``ConsumerGroup._deliver_run``). A record with properties goes
    through ``build_delivery``."""
    payload = record.payload
    record.queue_name = queue
    d = _new(Delivery)
    d.topic = topic = record.topic
    d.payload = payload
    d.qos = 1
    d.retain = False
    d.expires_at = None
    d.origin = None
    d.wire_cache = {WIRE_V5_QOS1: plain_delivery(topic, queue, offset, group_bytes, count, b"", payload)}
    d.settle = settle
    d.ticket = None
    d._record = record
    d._group_pair = group_pair
    d.attempt = count
    d._extra = ()
    d.member = member
    d.deadline = deadline
    d.part = -1
    d.offset = offset
    return d
