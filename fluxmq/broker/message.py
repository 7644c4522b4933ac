"""Message: one application message as the broker routes it, independent of any wire protocol."""

from __future__ import annotations

import time

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
        """Build a message from a PUBLISH's properties: keep the forwardable ones, turn expiry into a deadline."""
        expires_at = None
        fwd = None
        if properties:
            expiry = properties.get(MESSAGE_EXPIRY_INTERVAL)
            if expiry is not None:
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
