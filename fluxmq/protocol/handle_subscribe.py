"""HandleSubscribe: SUBSCRIBE and UNSUBSCRIBE.

A mixin of ``fluxmq.protocol.connection.MQTTConnection``, which holds its state.
"""

from __future__ import annotations

import logging

from fluxmq._core import codec as c
from fluxmq._core.codec import encode
from fluxmq.errors import ProtocolError, QueueRefused, TopicFilterInvalid

log = logging.getLogger("fluxmq.protocol")


class HandleSubscribe:
    """SUBSCRIBE / SUBACK and UNSUBSCRIBE / UNSUBACK."""

    __slots__ = ()

    def _on_subscribe(self, p) -> None:
        broker = self.broker
        session = self.session
        v5 = self.version == 5
        sub_id = 0
        if v5 and p.properties:
            ids = p.properties.get(c.SUBSCRIPTION_IDENTIFIER)
            if ids:
                sub_id = ids[0]
                if sub_id == 0:
                    raise ProtocolError("subscription identifier 0")
        codes = []
        results = []
        refused = []
        denied = []
        queue_refusals = []
        policy = self._policy
        for s in p.subscriptions:
            if policy is not None:
                subs = session.subscriptions
                code = policy.check_subscribe(s.filter, len(subs) + (s.filter not in subs))
                if code:
                    if code == 0x87 and broker.events is not None:
                        broker.events.subscribe_denied(
                            self.client_id, session.username, self.peer, s.filter, s.qos, code
                        )
                    # 0x87 (ACL) or 0x97 (quota); 3.x has only 0x80 [MQTT-3.9.3-2]
                    codes.append(code if v5 else 0x80)
                    denied.append(s.filter)
                    continue
            try:
                if v5 and s.no_local and s.filter.startswith("$share/"):
                    raise ProtocolError("No Local on a shared subscription")  # [MQTT-3.8.3-4]
                result = broker.subscribe(
                    session,
                    s.filter,
                    s.qos,
                    s.no_local if v5 else False,
                    s.retain_as_published if v5 else False,
                    s.retain_handling if v5 else 0,
                    sub_id,
                    p.properties.get(c.USER_PROPERTY) if v5 and p.properties else None,
                )
            except QueueRefused as exc:
                # 3.x has only 0x80 [MQTT-3.9.3-2]
                log.info(
                    "subscribe_refused",
                    extra={"client_id": self.client_id, "filter": s.filter, "reason": exc.reason},
                )
                codes.append(exc.reason_code if v5 else 0x80)
                queue_refusals.append(exc.reason)
                continue
            except TopicFilterInvalid:
                log.info(
                    "subscribe_refused",
                    extra={"client_id": self.client_id, "filter": s.filter, "reason": "invalid_filter"},
                )
                codes.append(0x8F if v5 else 0x80)
                refused.append(s.filter)
                continue
            codes.append(result.granted_qos)
            results.append(result)
        if v5:
            props = None
            if refused and self._problem_info:
                props = {c.REASON_STRING: "invalid topic filter: " + ", ".join(refused)}
            if denied and self._problem_info:
                text = "not authorized or over a limit: " + ", ".join(denied)
                props = {c.REASON_STRING: props[c.REASON_STRING] + "; " + text if props else text}
            if queue_refusals and self._problem_info:
                text = "; ".join(queue_refusals)
                props = {c.REASON_STRING: props[c.REASON_STRING] + "; " + text if props else text}
            self._write_v5(c.Suback(p.packet_id, codes, props))
        else:
            self._write(encode(c.Suback(p.packet_id, codes, None), self.version))
        for result in results:
            if result.retained:
                broker.deliver_retained(session, result)

    def _on_unsubscribe(self, p) -> None:
        codes = []
        for f in p.filters:
            codes.append(0x00 if self.broker.unsubscribe(self.session, f) else 0x11)
        self._write(encode(c.Unsuback(p.packet_id, codes if self.version == 5 else None, None), self.version))
