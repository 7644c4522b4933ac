"""Deliveries and settlements on the wire: the user properties a delivery carries and how a
settlement (``$queue/{name}/$ack|$nack|$reject``) names what it settles."""

from __future__ import annotations

from fluxmq.broker.message import USER_PROPERTY, TrackedMessage

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
    if not sep or not queue or not offset.isdigit():
        return None
    return queue, int(offset)


#: delivery-count values as text, the common ones made once
_COUNTS = tuple(("delivery-count", str(n)) for n in range(16))


def build_delivery(record, queue: str, group: str, count: int, settle, ticket, extra=(),
                   group_pair=None, queue_pair=None) -> TrackedMessage:
    """The PUBLISH a consumer gets: the original topic, payload and properties, plus the user
    properties message-id, group-id, queue, offset and delivery-count (and ``extra`` pairs).
    ``group_pair``/``queue_pair``: the caller's prebuilt ("group-id", group) and ("queue", queue)."""
    message = record.message
    offset = str(record.offset)
    mine = [("message-id", queue + ":" + offset), group_pair or ("group-id", group),
            queue_pair or ("queue", queue), ("offset", offset),
            _COUNTS[count] if count < 16 else ("delivery-count", str(count))]
    if extra:
        mine.extend(extra)
    props = message.properties
    if props:
        props = dict(props)
        user = props.get(USER_PROPERTY)
        props[USER_PROPERTY] = user + mine if user else mine
    else:
        props = {USER_PROPERTY: mine}
    return TrackedMessage(message.topic, message.payload, props, settle, ticket)
