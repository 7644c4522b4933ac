"""HandlePublish: an inbound PUBLISH, its acknowledgement and the QoS 1/2 acks of both directions.

``_on_publish`` checks (topic alias, policy, QoS, size, ``$SYS``, payload format), routes and
acknowledges; a refusal goes on a 5.0 ack or closes a 3.x connection. Also PUBACK, PUBREC, PUBREL
and PUBCOMP from the client. A mixin of ``fluxmq.protocol.connection.MQTTConnection``, which holds
its state.
"""

from __future__ import annotations

import logging
from functools import partial

from fluxmq._core import codec as c
from fluxmq.broker.held import HeldAck
from fluxmq.broker.message import Message
from fluxmq.errors import MQTTError, ProtocolError, QueueRefused, QuotaExceeded

from .close_signal import _Close
from .outbound import _ACK_REASONS
from .validate import _check_response_topic, _is_utf8

log = logging.getLogger("fluxmq.protocol")


def _refusal_props(exc) -> dict:
    """A refused publish's 5.0 ack properties: its reason string, and user properties it carries
    (a replicated queue's ``leader`` under write_policy reject)."""
    props = {c.REASON_STRING: exc.reason}
    user = getattr(exc, "user_properties", None)
    if user:
        props[c.USER_PROPERTY] = list(user)
    return props


class HandlePublish:
    """PUBLISH from the client and the acks PUBACK, PUBREC, PUBREL, PUBCOMP."""

    __slots__ = ()

    def _on_publish(self, p) -> None:
        session = self.session
        qos = p.qos
        topic = p.topic
        settings = self.settings
        props = p.properties if self.version == 5 else None
        if props:
            alias = props.get(c.TOPIC_ALIAS)
            if alias is not None:
                topic = self._resolve_alias(alias, topic)
            if c.RESPONSE_TOPIC in props:
                _check_response_topic(props[c.RESPONSE_TOPIC])
            if c.SUBSCRIPTION_IDENTIFIER in props:
                raise ProtocolError("Subscription Identifier in a PUBLISH from a client (MQTT-3.3.4-6)")
        if not topic:
            raise ProtocolError("empty topic name")  # [MQTT-4.7.3-1]
        policy = self._policy
        if policy is not None:
            # ACL, rates, topic caps; a topic already allowed (and nothing per message) is one lookup
            fast = policy.fast
            if fast is None or fast.get(topic) != 0:
                refused = policy.check_publish(topic, len(p.payload))
                if refused:
                    if refused == 0x87 and self.broker.events is not None:
                        self.broker.events.publish_denied(
                            self.client_id, session.username, self.peer, topic, qos, p.retain, refused
                        )
                    self._refuse_publish(p, qos, refused)
                    return
        if qos > settings.max_qos:
            raise MQTTError("QoS not supported", 0x9B)
        if p.retain and not settings.retain_available:
            raise MQTTError("retain not supported", 0x9A)
        accepted = True
        reason = 0
        if len(p.payload) > settings.max_message_size:
            accepted, reason = False, 0x97
            self.broker.stats.dropped("message_too_large")
            log.info(
                "publish_refused",
                extra={
                    "client_id": self.client_id,
                    "topic": topic,
                    "size": len(p.payload),
                    "max_message_size": settings.max_message_size,
                },
            )
        elif topic[0] == "$" and (topic == "$SYS" or topic.startswith("$SYS/")):
            accepted, reason = False, 0x87  # $SYS belongs to the broker
        elif props and props.get(c.PAYLOAD_FORMAT_INDICATOR) == 1 and not _is_utf8(p.payload):
            # The broker may check what the indicator promises (MQTT 5.0 3.3.2.3.2): 0x99 on the ack, or
            # DISCONNECT for QoS 0, which has none.
            if qos == 0:
                raise MQTTError(_ACK_REASONS[0x99], 0x99)
            accepted, reason = False, 0x99
        if qos == 0:
            if accepted:
                try:
                    if props:
                        self._route(topic, p, props)
                    else:  # the common shape, without _route's frame
                        self.broker.publish_decoded(
                            Message(topic, p.payload, 0, p.retain, None, None, self.client_id), session
                        )
                except QueueRefused as exc:  # no ack to carry it: logged
                    log.info(
                        "publish_refused",
                        extra={"client_id": self.client_id, "topic": topic, "reason": str(exc)},
                    )
            return
        pid = p.packet_id
        # The ack's reason code needs routing first, but the ack goes ahead of whatever routing
        # wrote to this client's own output (its own message, when it subscribes to the topic):
        # naive synchronous clients wait for the ack first. It still leaves only after the turn's
        # commit, like every byte of the output.
        ack_at = len(self.out)
        if qos == 1:
            if accepted:
                try:
                    if props:
                        routed = self._route(topic, p, props)
                    else:
                        routed = self.broker.publish_decoded(
                            Message(topic, p.payload, 1, p.retain, None, None, self.client_id), session
                        )
                    if routed.__class__ is HeldAck:  # a replicated queue: the ack waits for the quorum
                        routed.add(partial(self._held_ack, pid, 1, topic))
                        return
                    if not routed and self.version == 5 and not self.broker.matched_by_peers(topic):
                        reason = 0x10  # accepted, but nobody subscribes to it
                except QueueRefused as exc:
                    reason = self._refuse_queue(topic, exc)
                    if reason and self._problem_info:
                        self._write_v5(c.Puback(pid, reason, _refusal_props(exc)))
                        return
                except QuotaExceeded:
                    reason = self._refuse_unstorable(topic)
            if reason and self.version == 5:
                self._write_at(ack_at, self._ack5_bytes(c.Puback, pid, reason))
            else:
                self._write_at(ack_at, bytes((0x40, 2, pid >> 8, pid & 0xFF)))
            return
        # QoS 2: route once at PUBLISH, remember the id until PUBREL so a resend is not routed again
        # [MQTT-4.3.3-9, -10].
        inbound = session.inbound_qos2
        if pid not in inbound:
            if len(inbound) >= settings.max_inflight:
                raise MQTTError("receive maximum exceeded", 0x93)
            if accepted:
                try:
                    routed = self._route(topic, p, props)
                    inbound.add(pid)
                    if routed.__class__ is HeldAck:  # a replicated queue: the PUBREC waits for the quorum
                        routed.add(partial(self._held_ack, pid, 2, topic))
                        return
                    if not routed and self.version == 5 and not self.broker.matched_by_peers(topic):
                        reason = 0x10  # accepted, but nobody subscribes to it
                except QueueRefused as exc:
                    reason = self._refuse_queue(topic, exc)
                except QuotaExceeded:
                    reason = self._refuse_unstorable(topic)
        if reason and self.version == 5:
            self._write_at(ack_at, self._ack5_bytes(c.Pubrec, pid, reason))
        else:
            self._write_at(ack_at, bytes((0x50, 2, pid >> 8, pid & 0xFF)))

    def hold_acks(self, held, pids: list[int], topic: str) -> None:
        """The PUBACKs of a run of QoS 1 PUBLISHes to ``topic`` that the C fast path appended to a
        replicated queue (``_core.relay``): written together once ``held`` (a HeldAck) is resolved
        as acknowledged, else each refused as ``_held_ack`` refuses one."""
        held.add(partial(self._held_acks, pids, topic))

    def _held_acks(self, pids: list[int], topic: str, error) -> None:
        if self.closed:
            return
        if error is None:
            # success without properties: the 4-byte form in 3.1.1 and 5.0 alike (as the relay writes)
            self._write(b"".join([bytes((0x40, 2, pid >> 8, pid & 0xFF)) for pid in pids]))
            self._npk += len(pids) - 1  # packets written (one counted by _write)
            return
        for pid in pids:
            self._held_ack(pid, 1, topic, error)  # a 3.1.1 publisher is disconnected at the first

    def _held_ack(self, pid: int, qos: int, topic: str, error) -> None:
        """The outcome of a held PUBACK/PUBREC (``fluxmq.broker.held``): the ack, or a refusal that
        is never an ack (5.0: the reason code and string; 3.1.1 has no negative ack: disconnected)."""
        if self.closed:
            return
        kind = c.Puback if qos == 1 else c.Pubrec
        code = 0 if error is None else getattr(error, "reason_code", 0x80)
        if code < 0x80:
            # acknowledged; a success code other than 0 comes as a QueueRefused (0x10: a settlement
            # another worker answered as finding no delivery to settle, as a local one is)
            if self.version == 5:
                self._write(self._ack5_bytes(kind, pid, code))
            else:
                self._write(bytes((0x40 if qos == 1 else 0x50, 2, pid >> 8, pid & 0xFF)))
            return
        if qos == 2 and self.session is not None:
            self.session.inbound_qos2.discard(pid)
        log.info("publish_refused", extra={"client_id": self.client_id, "topic": topic, "reason": str(error)})
        if self.version != 5:
            self._note_close("publish_refused")
            self.close(0x80, str(error))
            return
        self._write_v5(kind(pid, code, _refusal_props(error) if self._problem_info else None))

    def _refuse_publish(self, p, qos: int, reason_code: int) -> None:
        """A PUBLISH the client's policy refuses. ACL (0x87): 5.0 gets it on its PUBACK/PUBREC; 3.x
        has no negative ack, so the message is acknowledged and dropped. A topic cap (0x97) goes on
        a 5.0 ack too; a rate (0x96), or a refusal with no ack to carry it, closes the connection."""
        if reason_code != 0x87 and (qos == 0 or reason_code == 0x96 or self.version != 5):
            self._close_over_limit(reason_code)
            return
        if qos == 0:
            return
        pid = p.packet_id
        if self.version == 5:
            self._ack5(c.Puback if qos == 1 else c.Pubrec, pid, reason_code)
        else:
            self._write(bytes((0x40 if qos == 1 else 0x50, 2, pid >> 8, pid & 0xFF)))

    def _close_over_limit(self, reason_code: int) -> None:
        """Over a rate or a cap (already logged, once a minute): 5.0 gets DISCONNECT with
        ``reason_code`` (0x96 message rate too high, 0x97 quota exceeded), 3.x is disconnected."""
        self._note_close("rate_limited" if reason_code == 0x96 else "over_limit")
        self._send_disconnect(reason_code, "message rate too high" if reason_code == 0x96 else "over a limit")
        self.closed = True

    def _refuse_unstorable(self, topic: str) -> int:
        """The storage is full and this QoS 1/2 message would be stored: 5.0 gets reason 0x97 (quota
        exceeded); 3.x has no negative ack, so the connection closes without one."""
        log.info(
            "publish_refused", extra={"client_id": self.client_id, "topic": topic, "reason": "storage full"}
        )
        if self.version != 5:
            raise _Close()
        return 0x97

    def _refuse_queue(self, topic: str, exc: QueueRefused) -> int:
        """A durable queue refused the publish (no such queue 0x90, full 0x97): 5.0 gets the code
        on its ack; 3.x has no negative ack, so the connection closes without one."""
        log.info("publish_refused", extra={"client_id": self.client_id, "topic": topic, "reason": exc.reason})
        if self.version != 5:
            raise _Close()
        return exc.reason_code

    def _route(self, topic: str, p, props) -> int:
        """Publish the PUBLISH's message; returns the number of deliveries."""
        if props:
            message = Message.from_publish_properties(
                topic, p.payload, p.qos, p.retain, props, self.client_id
            )
        else:
            message = Message(topic, p.payload, p.qos, p.retain, None, None, self.client_id)
        return self.broker.publish_decoded(message, self.session)

    def _resolve_alias(self, alias: int, topic: str) -> str:
        if alias == 0 or alias > self.settings.max_topic_alias:
            raise MQTTError("topic alias out of range", 0x94)
        aliases = self._aliases_in
        if aliases is None:
            aliases = self._aliases_in = {}
        if topic:
            aliases[alias] = topic
            return topic
        known = aliases.get(alias)
        if known is None:
            raise ProtocolError("unknown topic alias")
        return known

    def _on_puback(self, p) -> None:
        self.session.on_puback(p.packet_id, p.reason_code if self.version == 5 else 0)

    def _on_pubrec(self, p) -> None:
        known = self.session.on_pubrec(p.packet_id, p.reason_code)
        if p.reason_code >= 0x80:
            return
        pid = p.packet_id
        if known or self.version != 5:
            self._write(bytes((0x62, 2, pid >> 8, pid & 0xFF)))
        else:
            self._ack5(c.Pubrel, pid, 0x92)

    def _on_pubrel(self, p) -> None:
        pid = p.packet_id
        inbound = self.session.inbound_qos2
        if pid in inbound or self.version != 5:
            inbound.discard(pid)
            self._write(bytes((0x70, 2, pid >> 8, pid & 0xFF)))
        else:
            self._ack5(c.Pubcomp, pid, 0x92)

    def _on_pubcomp(self, p) -> None:
        self.session.on_pubcomp(p.packet_id)
