"""HandleConnect: CONNECT, CONNACK, enhanced authentication (AUTH) and refused connections.

``_on_connect`` checks the CONNECT and its will, authenticates (user name and password, a client
certificate, or an enhanced authentication exchange: ``_auth_step``), ``_accept`` opens the session
and sends CONNACK; ``_on_auth`` serves AUTH at CONNECT and re-authentication. A mixin of
``fluxmq.protocol.connection.MQTTConnection``, which holds its state.
"""

from __future__ import annotations

import logging
import time
import uuid

from fluxmq._core import codec as c
from fluxmq._core.codec import encode
from fluxmq.broker import auth_enhanced
from fluxmq.broker.broker import BRIDGE_SESSION_PREFIX
from fluxmq.broker.message import Message
from fluxmq.broker.session import EXPIRY_NEVER, Will
from fluxmq.errors import MQTTError, NotAuthorized, ProtocolError, QuotaExceeded, ServerUnavailable

from .validate import _check_response_topic, _is_utf8

log = logging.getLogger("fluxmq.protocol")

# 3.1 / 3.1.1 CONNACK return codes
RC_ACCEPTED = 0
RC_BAD_PROTOCOL = 1
RC_ID_REJECTED = 2
RC_SERVER_UNAVAILABLE = 3
RC_NOT_AUTHORIZED = 5


class HandleConnect:
    """CONNECT / CONNACK and AUTH."""

    __slots__ = ()

    def _on_connect(self, p) -> None:
        if self.session is not None or self._pending_connect is not None:
            raise ProtocolError("second CONNECT")  # [MQTT-3.1.0-2]
        version = self.version = p.protocol_version
        settings = self.settings
        broker = self.broker
        client_id = p.client_id
        assigned = False
        props = p.properties if version == 5 else None

        if self.over_limit or not broker.accepting:
            self._refuse(
                RC_SERVER_UNAVAILABLE,
                0x97 if self.over_limit else 0x88,
                "connection limit reached" if self.over_limit else "server shutting down",
            )
            return
        if version == 3 and not 1 <= len(client_id) <= 23:
            self._refuse(RC_ID_REJECTED, 0x85, "MQTT 3.1 client identifiers have 1 to 23 characters")
            return
        if client_id.startswith(BRIDGE_SESSION_PREFIX):
            # The local sessions of the node's bridges (fluxmq.bridge): a client taking one over
            # would receive and acknowledge away what is queued for a peer broker.
            self._refuse(RC_ID_REJECTED, 0x85, "client identifiers starting with $bridge/ are reserved")
            return
        if not client_id:
            if version == 4 and not p.clean_start:
                # An empty client id needs a clean session [MQTT-3.1.3-8].
                self._refuse(RC_ID_REJECTED, 0x85, "empty client identifier needs clean session")
                return
            client_id = f"auto-{uuid.uuid4().hex}"
            assigned = True
        self.client_id = client_id

        authenticator = None
        if version == 5:
            expiry = props.get(c.SESSION_EXPIRY_INTERVAL, 0)
            receive_max = props.get(c.RECEIVE_MAXIMUM, 65535)
            if receive_max == 0:
                raise ProtocolError("Receive Maximum 0")
            self._client_max_packet = props.get(c.MAXIMUM_PACKET_SIZE, 0)
            self._problem_info = bool(props.get(c.REQUEST_PROBLEM_INFORMATION, 1))
            method = props.get(c.AUTHENTICATION_METHOD)
            if method is not None:
                authenticator = settings.authenticators.get(method)
                if authenticator is None:
                    self._refuse(0, 0x8C, f"authentication method {method!r} is not supported")
                    return
            elif c.AUTHENTICATION_DATA in props:
                raise ProtocolError("Authentication Data without an Authentication Method")
        else:
            expiry = 0 if p.clean_start else EXPIRY_NEVER
            receive_max = settings.max_inflight
        send_quota = min(receive_max, settings.max_inflight)

        will = None
        if p.will is not None:
            w = p.will
            if w.qos > settings.max_qos:
                self._refuse(RC_SERVER_UNAVAILABLE, 0x9B, "will QoS not supported")
                return
            if w.retain and not settings.retain_available:
                self._refuse(RC_SERVER_UNAVAILABLE, 0x9A, "retain not supported")
                return
            delay = 0
            if version == 5:
                wp = w.properties
                delay = wp.get(c.WILL_DELAY_INTERVAL, 0) if wp else 0
                if wp and c.RESPONSE_TOPIC in wp:
                    _check_response_topic(wp[c.RESPONSE_TOPIC])
                if wp and wp.get(c.PAYLOAD_FORMAT_INDICATOR) == 1 and not _is_utf8(w.payload):
                    self._refuse(0, 0x99, "will payload is not UTF-8 as its Payload Format Indicator says")
                    return
                message = Message.from_publish_properties(w.topic, w.payload, w.qos, w.retain, wp, client_id)
                if wp and c.MESSAGE_EXPIRY_INTERVAL in wp:
                    # A will's expiry counts from its publication, not from CONNECT (MQTT 5.0
                    # 3.1.3.2.4): the broker turns the interval into a deadline when it publishes it.
                    message.expires_at = None
                    message.properties = {
                        **(message.properties or {}),
                        c.MESSAGE_EXPIRY_INTERVAL: wp[c.MESSAGE_EXPIRY_INTERVAL],
                    }
            else:
                message = Message(w.topic, w.payload, w.qos, w.retain, None, None, client_id)
            will = Will(message, delay)

        pending = (p, will, expiry, send_quota, assigned)
        if (
            settings.refuse_anonymous
            and authenticator is None
            and getattr(self.stream, "cert_username", None) is None
        ):
            self._refuse_unidentified(p.username)
            return
        auth = broker.auth
        if auth is not None and authenticator is None and getattr(self.stream, "cert_username", None) is None:
            # User name and password (a verified client certificate or an enhanced authentication
            # method authenticates the client instead).
            result = auth.authenticate(client_id, p.username, p.password, self.peer)
            self._emit_auth(
                result.ok,
                p.username,
                "anonymous" if p.username is None else "password",
                result.reason,
                result.reason_code if version == 5 else result.return_code,
            )
            if not result.ok:
                self._refuse(result.return_code, result.reason_code, result.reason)
                return
        if authenticator is None:
            # A TLS listener with use_cert_cn_as_username puts the client certificate's CN there.
            self._accept(pending, None, getattr(self.stream, "cert_username", None) or p.username)
            return
        # Enhanced authentication (MQTT 5.0 4.12): CONNACK waits until the exchange succeeds; every
        # AUTH and the CONNACK repeat the method [MQTT-4.12.0-5].
        self._pending_connect = pending
        self._auth_method = authenticator.method
        self._auth_exchange = authenticator.start(client_id, p.username)
        self._auth_step(self._auth_exchange.step(props.get(c.AUTHENTICATION_DATA)))

    def _accept(self, pending: tuple, auth_props: dict | None, username: str | None) -> None:
        """Open the session and send CONNACK (after enhanced authentication, when there is one)."""
        p, will, expiry, send_quota, assigned = pending
        self._pending_connect = None
        version = self.version
        settings = self.settings
        broker = self.broker
        client_id = self.client_id
        keepalive = p.keepalive
        server_keepalive = None
        if settings.max_keepalive and (
            keepalive > settings.max_keepalive or (keepalive == 0 and not settings.allow_zero_keepalive)
        ):
            keepalive = settings.max_keepalive
            server_keepalive = keepalive
        self.keepalive = keepalive

        auth = broker.auth
        if auth is not None:
            policy = self._policy = auth.policy(client_id, username, self.peer)
            if policy is not None and will is not None and not policy.can_write_will(will.message.topic):
                if client_id not in broker.sessions:  # no session will forget it: drop its compiled ACL
                    auth.forget(client_id)
                self._refuse(RC_NOT_AUTHORIZED, 0x87, "not authorized to publish the will to its topic")
                return
        try:
            session, present = broker.open_session(client_id, p.clean_start, expiry, will, username)
        except (QuotaExceeded, ServerUnavailable) as err:
            # broker.max_sessions: a new client id and no room (0x97); the cluster cannot establish
            # this node as the session's owner (0x88). 3.x: return code 3, Server unavailable.
            if auth is not None:
                auth.forget(client_id)  # its ACL was compiled by policy() above
            self._refuse(RC_SERVER_UNAVAILABLE, err.reason_code, str(err))
            return
        except NotAuthorized as exc:  # the client id belongs to another user
            self._refuse(RC_NOT_AUTHORIZED, 0x87, exc.reason)
            return
        self.session = session

        if version == 5:
            props = p.properties
            out_props: dict = {}
            if assigned:
                out_props[c.ASSIGNED_CLIENT_IDENTIFIER] = client_id  # [MQTT-3.2.2-16]
            if server_keepalive is not None:
                out_props[c.SERVER_KEEP_ALIVE] = server_keepalive  # [MQTT-3.2.2-21]
            if session.expiry_interval != expiry:
                # Capped by broker.max_session_expiry: the client is told the value in use (MQTT 5.0 3.2.2.3.2).
                out_props[c.SESSION_EXPIRY_INTERVAL] = session.expiry_interval
            if settings.max_inflight < 65535:
                out_props[c.RECEIVE_MAXIMUM] = settings.max_inflight
            out_props[c.MAXIMUM_PACKET_SIZE] = settings.max_packet_size
            if settings.max_qos < 2:
                out_props[c.MAXIMUM_QOS] = settings.max_qos
            if not settings.retain_available:
                out_props[c.RETAIN_AVAILABLE] = 0
            if settings.max_topic_alias:
                out_props[c.TOPIC_ALIAS_MAXIMUM] = settings.max_topic_alias
            # Absent means available too; said explicitly so clients need not guess.
            out_props[c.WILDCARD_SUBSCRIPTION_AVAILABLE] = 1
            out_props[c.SUBSCRIPTION_IDENTIFIER_AVAILABLE] = 1
            out_props[c.SHARED_SUBSCRIPTION_AVAILABLE] = 1
            # Response Information only when asked for [MQTT-3.1.2-31].
            if props.get(c.REQUEST_RESPONSE_INFORMATION) and settings.response_information:
                out_props[c.RESPONSE_INFORMATION] = settings.response_information.replace("%c", client_id)
            if auth_props:
                out_props.update(auth_props)
            alias_max = props.get(c.TOPIC_ALIAS_MAXIMUM, 0)
            if alias_max and settings.topic_alias_policy != "none":
                self._alias_max_out = alias_max
                self._aliases_out = {}
            self._write(encode(c.Connack(present, 0, out_props), 5))
        else:
            self._write(encode(c.Connack(present and version == 4, RC_ACCEPTED, None), version))

        # Keep alive x1.5 [MQTT-3.1.2-24]; 0 disables it (read_timeout still applies if set).
        self._keepalive_limit = keepalive * 1.5 if keepalive else settings.read_timeout
        timeout = self._idle_timeout()
        if self._parking:
            # Most clients go quiet after connecting (a SUBSCRIBE at most): park at the first recv
            # that finds nothing, so a connect storm never holds a greenlet per client.
            self._idle_spent = 0.0
            timeout = 0.0
        self._connect_until = 0.0
        self._set_deadline(timeout)
        log.debug(
            "connect",
            extra={
                "peer": self.peer,
                "client_id": client_id,
                "version": version,
                "clean_start": p.clean_start,
                "keepalive": keepalive,
                "present": present,
            },
        )
        if not broker.attach(session, self, send_quota):
            return  # taken by another node's CONNECT meanwhile: closed as taken over
        events = broker.events
        if events is not None:
            self._announced = (username, time.monotonic())
            events.client_connected(
                client_id,
                username,
                self.peer,
                version,
                p.clean_start,
                keepalive,
                present,
                session.expiry_interval,
                self.listener,
            )

    def _auth_step(self, step) -> None:
        """Answer one step of an enhanced authentication exchange (at CONNECT or re-authentication)."""
        method = self._auth_method
        if step.outcome == auth_enhanced.CONTINUE:
            props = {c.AUTHENTICATION_METHOD: method}
            if step.data is not None:
                props[c.AUTHENTICATION_DATA] = step.data
            self._write(encode(c.Auth(0x18, props), 5))
            return
        self._auth_exchange = None
        if step.outcome == auth_enhanced.SUCCESS:
            props = {c.AUTHENTICATION_METHOD: method}
            if step.data is not None:
                props[c.AUTHENTICATION_DATA] = step.data
            if self.session is None:
                pending = self._pending_connect
                username = step.username if step.username is not None else pending[0].username
                self._emit_auth(True, username, method)
                self._accept(pending, props, username)
            else:
                log.info("reauthenticated", extra={"client_id": self.client_id, "user": step.username})
                self._write(encode(c.Auth(0x00, props), 5))
            return
        log.info(
            "authentication_failed",
            extra={"peer": self.peer, "client_id": self.client_id, "method": method, "reason": step.reason},
        )
        self._emit_auth(
            False,
            self.session.username if self.session is not None else self._pending_connect[0].username,
            method,
            step.reason or "authentication failed",
            step.reason_code or 0x87,
        )
        if self.session is None:
            self._pending_connect = None
            self._refuse(0, step.reason_code, step.reason)
        else:
            # A failed re-authentication ends the connection [MQTT-4.12.1-2]; DISCONNECT has 0x87.
            raise MQTTError(step.reason or "re-authentication failed", 0x87)

    def _refuse_unidentified(self, username: str | None) -> None:
        """CONNECT on a listener that refuses anonymous clients (``ProtocolSettings.refuse_anonymous``):
        nothing is configured that could verify a user name, so one is no credential either."""
        if username is None:
            reason = (
                "anonymous clients are refused on a network listener: set auth.allow_anonymous: true, "
                "or auth.password_file or auth.http.url"
            )
        else:
            reason = (
                "user names cannot be verified on a network listener without auth.password_file or "
                "auth.http.url (or set auth.allow_anonymous: true)"
            )
        self._refuse(RC_NOT_AUTHORIZED, 0x87, reason)

    def _refuse(self, rc_v3: int, rc_v5: int, reason: str) -> None:
        log.info(
            "connect_refused",
            extra={
                "peer": self.peer,
                "client_id": self.client_id,
                "code": hex(rc_v5 if self.version == 5 else rc_v3),
                "reason": reason,
            },
        )
        if self.version == 5:
            self._write_v5(c.Connack(False, rc_v5, {c.REASON_STRING: reason}))  # [MQTT-3.2.2-19]
        else:
            self._write(encode(c.Connack(False, rc_v3, None), self.version))
        self.closed = True

    def _on_auth(self, p) -> None:
        props = p.properties
        method = props.get(c.AUTHENTICATION_METHOD)
        if self._auth_method is None:
            raise ProtocolError("AUTH without an authentication method at CONNECT")  # MQTT 5.0 4.12
        if method != self._auth_method:
            raise ProtocolError("AUTH with another authentication method than CONNECT's")  # [MQTT-4.12.1-1]
        code = p.reason_code
        if code == 0x19 and self.session is not None and self._auth_exchange is None:
            # Re-authentication: a new exchange on the live connection [MQTT-4.12.1].
            authenticator = self.settings.authenticators.get(method)
            if authenticator is None:
                raise MQTTError("authentication method no longer available", 0x87)
            self._auth_exchange = authenticator.start(self.client_id, self.session.username)
        elif code != 0x18 or self._auth_exchange is None:
            raise ProtocolError(f"unexpected AUTH reason code 0x{code:02X}")
        self._auth_step(self._auth_exchange.step(props.get(c.AUTHENTICATION_DATA)))

    def _emit_auth(
        self, ok: bool, username: str | None, method: str, reason: str = "", reason_code: int = 0
    ) -> None:
        events = self.broker.events
        if events is None:
            return
        if ok:
            events.auth_success(self.client_id, username, self.peer, self.version, method)
        else:
            events.auth_failure(
                self.client_id, username, self.peer, self.version, method, reason, reason_code
            )
