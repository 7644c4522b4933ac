"""Outbound: the packets a connection sends that carry more than fixed bytes.

Deliveries (``send_publish``: the cached wire form of a message, 5.0 topic alias allocation and the
client's Maximum Packet Size), ``send_pubrel``, and the 5.0 encoding helpers every handler uses:
acks with a reason code (``_ack5``, ``_ack5_bytes``), ``_write_v5`` / ``_encode_v5`` and
``_write_at`` (an ack ahead of what routing wrote). A mixin of
``fluxmq.protocol.connection.MQTTConnection``, which holds its state.
"""

from __future__ import annotations

import logging

from fluxmq._core import codec as c
from fluxmq._core.codec import append_publish, encode, encode_publish
from fluxmq.auth.limits import LogGate
from fluxmq.broker.message import WIRE_V5_QOS1, Message
from fluxmq.errors import MessageUnencodable

log = logging.getLogger("fluxmq.protocol")

#: ``unencodable`` is logged at most once a minute per client (every drop is counted)
_UNENCODABLE_LOG = LogGate(60.0)

# Reason strings of the acknowledgement reason codes the broker sends.
_ACK_REASONS = {
    0x87: "not authorized to publish to this topic ($SYS topics are written by the broker only)",
    0x92: "packet identifier not found",
    0x97: "message refused: over broker.max_message_size, a topic limit, or storage full",
    0x99: "payload is not UTF-8 although its Payload Format Indicator says so",
}


class Outbound:
    """Deliveries, PUBREL and the 5.0 encoding of acks and other packets."""

    __slots__ = ()

    def send_publish(
        self, message: Message, qos: int, retain: bool, packet_id: int, dup: bool, subscription_ids
    ) -> bool:
        # The session asked is_congested() first, which is True once closed.
        try:
            if self.version == 5:
                cache = message.wire_cache
                if (
                    cache is not None
                    and qos == 1
                    and not retain
                    and subscription_ids is None
                    and self._aliases_out is None
                    and message.expires_at is None
                ):
                    # _publish_bytes_v5's common shape with its encoding made already (a durable
                    # queue's delivery brings it): no lookup of anything else
                    data = cache.get(WIRE_V5_QOS1)
                    if data is not None and (
                        not self._client_max_packet or len(data) <= self._client_max_packet
                    ):
                        append_publish(self.out, data, packet_id, dup)
                        self._npk += 1
                        if not self._dirty:
                            self._dirty = True
                            self.flusher.mark(self)
                        return True
                data = self._publish_bytes_v5(message, qos, retain, subscription_ids)
                if data is None:
                    return False
            else:
                key = qos * 2 + retain
                cache = message.wire_cache
                if cache is None:  # the first delivery of this message: encode, no lookup
                    data = encode_publish(
                        message.topic, message.payload, qos, retain, False, 1 if qos else 0, None, 4
                    )
                    message.wire_cache = {key: data}
                else:
                    data = cache.get(key)
                    if data is None:
                        data = cache[key] = encode_publish(
                            message.topic, message.payload, qos, retain, False, 1 if qos else 0, None, 4
                        )
            if qos:
                append_publish(self.out, data, packet_id, dup)
            else:
                self.out += data
            self._npk += 1
            if not self._dirty:
                self._dirty = True
                self.flusher.mark(self)
            return True
        except (ValueError, TypeError, OverflowError) as exc:  # a value the codec refuses
            raise self._unencodable(message, exc) from exc

    def _unencodable(self, message: Message, exc: Exception) -> MessageUnencodable:
        """Log (at most once a minute per client) a message the codec refused for this client."""
        held = _UNENCODABLE_LOG.let_through(self.client_id)
        if held is not None:
            log.warning(
                "unencodable",
                extra={
                    "client_id": self.client_id,
                    "topic": message.topic.encode("utf-8", "backslashreplace").decode(),
                    "error": str(exc)[:200],
                    "held_back": held,
                },
            )
        return MessageUnencodable(str(exc))

    def _publish_bytes_v5(self, message: Message, qos: int, retain: bool, subscription_ids):
        expiry = message.remaining_expiry() if message.expires_at is not None else None
        alias = 0
        if self._aliases_out is not None:
            alias = self._aliases_out.get(message.topic, 0)
            new_alias = not alias
            if new_alias:
                alias = self._new_alias()
        if expiry is None and subscription_ids is None and not alias:
            key = 8 + qos * 2 + retain  # the common shape: an int key, no tuple per message (WIRE_V5_QOS1)
        else:
            key = (qos, retain, subscription_ids, expiry, alias, alias and new_alias)
        cache = message.wire_cache
        if cache is None:
            cache = message.wire_cache = {}
        data = cache.get(key)
        if data is None:
            props = message.properties
            if not isinstance(key, int):  # per-delivery properties: on a copy (the common shape has none)
                props = dict(props) if props else {}
            if expiry is not None:
                props[c.MESSAGE_EXPIRY_INTERVAL] = expiry  # the remaining lifetime [MQTT-3.3.2-6]
            if subscription_ids:
                props[c.SUBSCRIPTION_IDENTIFIER] = list(subscription_ids)
            topic = message.topic
            if alias:
                props[c.TOPIC_ALIAS] = alias
                if not new_alias:
                    topic = ""  # the client maps the alias to the topic it last carried (MQTT 5.0 3.3.2.3.4)
            if len(cache) >= 32 and not isinstance(key, int):
                cache.clear()  # expiry and alias shapes vary per delivery: keep the cache bounded
            data = cache[key] = encode_publish(
                topic, message.payload, qos, retain, False, 1 if qos else 0, props or None, 5
            )
        if self._client_max_packet and len(data) > self._client_max_packet:
            return None  # dropped for this client only [MQTT-3.1.2-27, -28]
        if alias:
            self._use_alias(message.topic, alias, new_alias)
        return data

    def _new_alias(self) -> int:
        """The alias a topic without one would get now; 0 when the policy gives it none."""
        aliases = self._aliases_out
        if len(aliases) < self._alias_max_out:
            return len(aliases) + 1
        if self.settings.topic_alias_policy == "lru":
            return aliases[next(iter(aliases))]  # the least recently used topic gives up its alias
        return 0  # first_n: the first topics keep theirs, the others go with their name

    def _use_alias(self, topic: str, alias: int, new_alias: bool) -> None:
        """Record that ``topic`` went out with ``alias`` (only once the PUBLISH is really sent)."""
        aliases = self._aliases_out
        if new_alias:
            if len(aliases) >= self._alias_max_out:
                del aliases[next(iter(aliases))]
            aliases[topic] = alias
        elif self.settings.topic_alias_policy == "lru":
            del aliases[topic]  # dicts keep insertion order: re-inserting makes it the most recent
            aliases[topic] = alias

    def send_pubrel(self, packet_id: int) -> None:
        self._write(bytes((0x62, 2, packet_id >> 8, packet_id & 0xFF)))

    def _ack5(self, kind, packet_id: int, reason_code: int) -> None:
        """Queue a 5.0 PUBACK/PUBREC/PUBREL/PUBCOMP with a reason code (see ``_ack5_bytes``)."""
        self._write(self._ack5_bytes(kind, packet_id, reason_code))

    def _ack5_bytes(self, kind, packet_id: int, reason_code: int) -> bytes:
        """A 5.0 ack with a reason code, and its reason string when the client asked for problem
        information [MQTT-3.1.2-32] and it fits the client's maximum."""
        reason = _ACK_REASONS.get(reason_code) if self._problem_info else None
        return self._encode_v5(kind(packet_id, reason_code, {c.REASON_STRING: reason} if reason else None))

    def _write_v5(self, packet) -> None:
        """Encode and queue a 5.0 packet (see ``_encode_v5``)."""
        self._write(self._encode_v5(packet))

    def _encode_v5(self, packet) -> bytes:
        """Encode a 5.0 packet; its reason string and user properties are left out when they would
        make it larger than the client's Maximum Packet Size [MQTT-3.4.2-2, -3]."""
        data = encode(packet, 5)
        if packet.properties and self._client_max_packet and len(data) > self._client_max_packet:
            packet.properties = None
            data = encode(packet, 5)
        return data

    def _write_at(self, at: int, data: bytes) -> None:
        """Queue ``data`` at offset ``at`` of the output, ahead of what was written since that offset
        was taken (in the same handler: nothing was sent meanwhile, unless the connection closed)."""
        out = self.out
        if at >= len(out) or self.closed:
            self._write(data)
            return
        out[at:at] = data  # moves only the bytes written since ``at`` (this client's own deliveries)
        self._npk += 1
        if not self._dirty:
            self._dirty = True
            self.flusher.mark(self)
