"""Message: one application message as the broker routes it, independent of any wire protocol."""

from __future__ import annotations

import math
import time

from fluxmq._core.trie import validate_topic
from fluxmq.errors import FieldOutOfRange, TopicNameInvalid

# MQTT 5.0 property identifiers that travel with an application message (the codec names them too;
# the broker keeps its own copy so it does not depend on the wire codec).
PAYLOAD_FORMAT_INDICATOR = 0x01
MESSAGE_EXPIRY_INTERVAL = 0x02
CONTENT_TYPE = 0x03
RESPONSE_TOPIC = 0x08
CORRELATION_DATA = 0x09
SUBSCRIPTION_IDENTIFIER = 0x0B
TOPIC_ALIAS = 0x23
USER_PROPERTY = 0x26

# Properties that are forwarded from PUBLISH to subscribers unchanged [MQTT-3.3.2-*].
FORWARDED_PROPERTIES = (
    PAYLOAD_FORMAT_INDICATOR,
    CONTENT_TYPE,
    RESPONSE_TOPIC,
    CORRELATION_DATA,
    USER_PROPERTY,
)


# MQTT's ranges of a message's fields (5.0 sections 1.5 and 3.3): what the wire, and the store's
# records, can carry.
#: a Four Byte Integer: Message Expiry Interval, Session Expiry Interval, Will Delay Interval
MAX_INTERVAL = 0xFFFFFFFF
#: a UTF-8 string or binary data, in bytes
MAX_STRING = 65535
#: a Variable Byte Integer: the most a PUBLISH's remaining length (so its payload) counts
MAX_PAYLOAD = 268435455
#: a Subscription Identifier
MAX_SUBSCRIPTION_ID = 268435455


def check_interval(name: str, value) -> None:
    """Raise FieldOutOfRange unless ``value`` is an integer 0..MAX_INTERVAL (seconds)."""
    if value.__class__ is not int or not 0 <= value <= MAX_INTERVAL:
        raise FieldOutOfRange(f"{name} must be an integer 0..{MAX_INTERVAL} (seconds), not {value!r:.40}")


def _check_string(name: str, value) -> None:
    if value.__class__ is not str:
        raise FieldOutOfRange(f"{name} must be a str, not {type(value).__name__}")
    try:
        n = len(value) if value.isascii() else len(value.encode())
    except UnicodeEncodeError:
        raise FieldOutOfRange(f"{name} must be well-formed UTF-8 (no surrogate code points)") from None
    if n > MAX_STRING:
        raise FieldOutOfRange(f"{name} encodes to {n} bytes, over MQTT's {MAX_STRING}")


def _check_binary(name: str, value) -> None:
    if not isinstance(value, (bytes, bytearray)):
        raise FieldOutOfRange(f"{name} must be bytes, not {type(value).__name__}")
    if len(value) > MAX_STRING:
        raise FieldOutOfRange(f"{name} is {len(value)} bytes, over MQTT's {MAX_STRING}")


def _check_pfi(name: str, value) -> None:
    if value.__class__ not in (int, bool) or value not in (0, 1):
        raise FieldOutOfRange(f"{name} must be 0 or 1, not {value!r:.40}")


def _check_response_topic(name: str, value) -> None:
    _check_string(name, value)
    try:
        validate_topic(value)
    except TopicNameInvalid as exc:
        raise FieldOutOfRange(f"{name}: {exc.reason}") from None


def _check_user_properties(name: str, value) -> None:
    if not isinstance(value, (list, tuple)):
        raise FieldOutOfRange(f"{name} must be a list of (name, value) string pairs")
    for pair in value:
        if pair.__class__ is tuple and len(pair) == 2:
            k, v = pair
            if (
                k.__class__ is str
                and v.__class__ is str
                and len(k) + len(v) <= MAX_STRING
                and k.isascii()
                and v.isascii()
            ):
                continue  # the common pair: both fit, whatever the split
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise FieldOutOfRange(f"{name} must be a list of (name, value) string pairs, not {pair!r:.40}")
        _check_string(f"{name} name", pair[0])
        _check_string(f"{name} value", pair[1])


#: the checks of the properties a Message carries, by identifier
_PROPERTY_CHECKS = {
    PAYLOAD_FORMAT_INDICATOR: ("payload format indicator", _check_pfi),
    CONTENT_TYPE: ("content type", _check_string),
    RESPONSE_TOPIC: ("response topic", _check_response_topic),
    CORRELATION_DATA: ("correlation data", _check_binary),
    USER_PROPERTY: ("user properties", _check_user_properties),
}


def check_message(message: Message, will: bool = False) -> None:
    """Raise FieldOutOfRange, naming the field and its range, unless every field of ``message``
    fits MQTT's wire format (and so the store's records): a valid topic name, QoS 0..2, a payload
    of at most MAX_PAYLOAD bytes, an expiry at most MAX_INTERVAL seconds away, only the
    forwardable properties, each in its range. ``Broker.publish`` asks it first, so a message a
    front end built wrong is refused before anything is routed or stored; the MQTT codec's
    messages pass it by construction. ``will``: a will's message, whose properties may hold its
    Message Expiry Interval until it is published (``publish_will_message``)."""
    topic = message.topic
    if topic.__class__ is not str:
        raise FieldOutOfRange(f"topic must be a str, not {type(topic).__name__}")
    try:
        validate_topic(topic)
    except TopicNameInvalid as exc:
        raise FieldOutOfRange(f"topic: {exc.reason}") from None
    qos = message.qos
    if qos.__class__ is not int or not 0 <= qos <= 2:
        raise FieldOutOfRange(f"qos must be 0, 1 or 2, not {qos!r:.40}")
    if message.retain.__class__ is not bool and message.retain not in (0, 1):
        raise FieldOutOfRange(f"retain must be a bool, not {message.retain!r:.40}")
    payload = message.payload
    if not isinstance(payload, (bytes, bytearray)):
        raise FieldOutOfRange(f"payload must be bytes, not {type(payload).__name__}")
    if len(payload) > MAX_PAYLOAD:
        raise FieldOutOfRange(f"payload is {len(payload)} bytes, over MQTT's {MAX_PAYLOAD}")
    expires_at = message.expires_at
    if expires_at is not None:
        if expires_at.__class__ not in (float, int) or math.isnan(expires_at):
            raise FieldOutOfRange(f"expires_at must be a monotonic time (float), not {expires_at!r:.40}")
        left = expires_at - time.monotonic()
        if left > MAX_INTERVAL + 1:  # (+1: the deadline of a full interval, read a moment later)
            raise FieldOutOfRange(
                f"message expiry interval must be 0..{MAX_INTERVAL} seconds, not {left:.0f} (expires_at)"
            )
    if message.origin is not None:
        _check_string("origin (client identifier)", message.origin)
    props = message.properties
    if props:
        if not isinstance(props, dict):
            raise FieldOutOfRange(f"properties must be a dict, not {type(props).__name__}")
        for pid, value in props.items():
            check = _PROPERTY_CHECKS.get(pid)
            if check is None and will and pid == MESSAGE_EXPIRY_INTERVAL:
                check_interval("will message expiry interval", value)
                continue
            if check is None:
                raise FieldOutOfRange(
                    f"property {pid!r:.10} is not one a message carries (only payload format "
                    "indicator, content type, response topic, correlation data and user properties; "
                    "the message expiry interval goes through Message.from_publish_properties)"
                )
            check[1](check[0], value)


class Message:
    """An application message.

    ``properties`` holds the forwardable 5.0 properties (never Topic Alias or Subscription Identifier,
    which are per connection); ``expires_at`` is a monotonic deadline from Message Expiry Interval or
    None. ``wire_cache`` belongs to the front end that encodes the message: the MQTT protocol layer
    keeps one encoding per delivery shape there, so fan-out encodes once per shape.
    """

    __slots__ = ("topic", "payload", "qos", "retain", "properties", "expires_at", "origin", "wire_cache")

    def __init__(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        properties: dict | None = None,
        expires_at: float | None = None,
        origin: str | None = None,
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.properties = properties
        self.expires_at = expires_at
        self.origin = origin
        self.wire_cache = None

    @classmethod
    def from_publish_properties(
        cls,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        properties: dict | None,
        origin: str | None = None,
    ) -> Message:
        """Build a message from a PUBLISH's properties: keep the forwardable ones, turn expiry into a
        deadline (raises FieldOutOfRange for an expiry interval outside 0..MAX_INTERVAL)."""
        expires_at = None
        fwd = None
        if properties:
            expiry = properties.get(MESSAGE_EXPIRY_INTERVAL)
            if expiry is not None:
                if expiry.__class__ is not int or not 0 <= expiry <= MAX_INTERVAL:
                    check_interval("message expiry interval", expiry)  # raises FieldOutOfRange
                expires_at = time.monotonic() + expiry
            fwd = {k: v for k, v in properties.items() if k in FORWARDED_PROPERTIES} or None
        return cls(topic, payload, qos, retain, fwd, expires_at, origin)

    def expired(self, now: float | None = None) -> bool:
        """True when the message's expiry interval has passed."""
        if self.expires_at is None:
            return False
        return (time.monotonic() if now is None else now) >= self.expires_at

    def remaining_expiry(self, now: float | None = None) -> int | None:
        """Seconds left of the Message Expiry Interval (rounded up), or None when it has none."""
        if self.expires_at is None:
            return None
        left = self.expires_at - (time.monotonic() if now is None else now)
        return max(0, int(left + 0.999))

    def copy(self, **changes) -> Message:
        """A copy with some fields changed (the wire cache is not copied)."""
        m = Message(
            self.topic, self.payload, self.qos, self.retain, self.properties, self.expires_at, self.origin
        )
        for k, v in changes.items():
            setattr(m, k, v)
        return m

    def __repr__(self) -> str:
        return (
            f"Message(topic={self.topic!r}, qos={self.qos}, retain={self.retain}, {len(self.payload)} bytes)"
        )


#: ``wire_cache`` key of a message's MQTT 5.0 QoS 1, non-retained PUBLISH with no per-connection
#: properties (protocol/outbound.py: 8 + qos * 2 + retain): a sender that builds that encoding
#: itself (a durable queue's delivery) puts it there.
WIRE_V5_QOS1 = 10


class TrackedMessage(Message):
    """A delivery whose settlement its sender tracks (a durable queue's): ``settle(session,
    reason_code, ticket)`` is called when the client's PUBACK for it arrives (``ticket`` None: the
    message is its own ticket, and ``settle`` gets the message). Sent with
    ``Session.send_tracked``: never queued or stored with the session.

    A tracked message is its own entry in ``Session.inflight`` (it has the attributes of
    ``session.Inflight``: ``message`` is itself, QoS 1, no subscription ids, never released), so a
    delivery allocates no entry object beside it."""

    __slots__ = ("settle", "ticket")

    subscription_ids = None
    released = False

    @property
    def message(self) -> TrackedMessage:
        return self

    def __init__(self, topic: str, payload: bytes, properties: dict | None, settle, ticket) -> None:
        Message.__init__(self, topic, payload, 1, False, properties)
        self.settle = settle
        self.ticket = ticket
