"""BridgeLink: the MQTT client side of one bridge, speaking to the peer with our own sans-IO codec.

It runs in the worker's gevent hub (a greenlet reads, one writes; no threads). Locally it is the
``Delivery`` of the broker session ``$bridge/{name}``: that session subscribes the outbound
patterns, and is persistent on a durable storage, so its in-flight window and disk queue are the
outbound store. A QoS 1/2 message leaves it only when the peer's PUBACK/PUBCOMP names the packet id
the session allocated (the same id is used on the peer connection), and while the peer is away
messages queue on disk up to ``max_queued_messages``.

Inbound PUBLISHes from the peer are published locally with this session as their origin (so the
No Local outbound subscriptions never send them back) and acknowledged through the node's
``FlushScheduler``: the PUBACK/PUBREC is written only after the turn's storage commit.
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict

import gevent
from gevent import socket, ssl  # gevent's own: cooperative whether or not the process is patched
from gevent.event import Event

from fluxmq._core import codec as c
from fluxmq.broker.broker import Broker
from fluxmq.broker.message import MESSAGE_EXPIRY_INTERVAL, USER_PROPERTY, Message
from fluxmq.broker.session import EXPIRY_NEVER, SessionLimits
from fluxmq.errors import FluxMQError

from .config import BRIDGE_MARKER, ROUTE_MARKER, BridgeConfig, filter_matches

log = logging.getLogger("fluxmq.bridge")

CONNECT_TIMEOUT = 10.0
HIGH_WATER = 1 << 20  # pending output bytes over which the link counts as congested
RECEIVE_MAXIMUM = 1000  # our inbound window announced to a 5.0 peer
# Echo guard for 3.1.1 peers (no No Local): fingerprints of recently sent messages, bounded.
ECHO_GUARD_SIZE = 4096

# Link states (status reports them)
CONNECTING = "connecting"
CONNECTED = "connected"
DOWN = "down"


class LinkCounters:
    """What a link has done, for status, the admin API and /metrics."""

    __slots__ = ("forwarded_out", "forwarded_in", "dropped_loop", "connects", "errors")

    def __init__(self) -> None:
        self.forwarded_out = 0
        self.forwarded_in = 0
        self.dropped_loop = 0  # echoes and relays refused (no loops)
        self.connects = 0
        self.errors = 0


class BridgeLink:
    """One bridge: the peer connection and the local outbound session (see the module docstring)."""

    listener = "bridge"

    def __init__(
        self,
        config: BridgeConfig,
        broker: Broker,
        flusher=None,
        node_id: str = "",
        on_change=None,
        max_packet_size: int = 2 << 20,
    ) -> None:
        self.config = config
        # The largest packet taken from the peer (broker.max_packet_size): memory stays bounded
        # whatever the peer sends; a 5.0 peer is told in CONNECT and never sends more.
        self.max_packet_size = max_packet_size
        self.broker = broker
        self.flusher = flusher
        self.node_id = node_id or config.client_id
        self.on_change = on_change  # called with the link when its state changes
        self.version = config.version
        self.peer = f"{config.host}:{config.port}"
        self.state = DOWN
        self.since = time.time()
        self.last_error = ""
        self.counters = LinkCounters()
        self.session = None
        self.out = bytearray()  # bytes for the peer not yet handed to the writer
        self._marked = False
        self._wbuf: list[bytes] = []
        self._wpending = 0
        self._wake = Event()
        self._sock = None
        self._greenlet = None
        self._writer = None
        self._stopped = False
        self._closing = False
        self._echo: OrderedDict[tuple[str, bytes], int] = OrderedDict()
        self._out_routes = tuple(t for t in config.topics if t.outbound)
        self._in_routes = tuple(t for t in config.topics if t.inbound)
        self._marker = ROUTE_MARKER if config.mesh else BRIDGE_MARKER
        # Topics are rewritten only when some route has a prefix: without one, no per-message match.
        self._rewrite_out = any(r.local_prefix or r.remote_prefix for r in self._out_routes)
        self._rewrite_in = any(r.local_prefix or r.remote_prefix for r in self._in_routes)
        self._in_qos = max((r.qos for r in self._in_routes), default=0)
        # Bounded by the bridge's own message count, and by the node's byte bound for such a queue
        # (storage.max_queued_bytes on disk, broker.max_queued_bytes in memory).
        node_limits = broker.persistent_limits if broker.storage.durable else broker.limits
        self._limits = SessionLimits(
            max_inflight=broker.settings.max_inflight,
            max_queued_messages=config.max_queued_messages,
            max_queued_bytes=node_limits.max_queued_bytes,
        )

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the outbound session (it queues from now on) and start connecting."""
        self._open_session()
        self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        self._stopped = True
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
        self._teardown()

    def _open_session(self):
        # Never expires (not even under broker.max_session_expiry): what waits for the peer stays
        # as long as the bridge is configured.
        session, _ = self.broker.open_session(
            self.config.local_client_id, False, EXPIRY_NEVER, limits=self._limits, capped=False
        )
        session.validity = self.config.message_validity
        # The outbound patterns: No Local keeps what came in over this link from going back
        # [MQTT-3.8.3-3]; Retain As Published keeps the retain flag; Retain Handling 1 sends the
        # retained messages once, when the subscription is new, not at every restart.
        for route in self._out_routes:
            self.broker.subscribe(
                session,
                route.local_filter,
                route.qos,
                no_local=True,
                retain_as_published=True,
                retain_handling=1,
            )
        self.session = session
        return session

    def _set_state(self, state: str, error: str = "") -> None:
        if state != self.state:
            self.state = state
            self.since = time.time()
        if error:
            self.last_error = error
        if self.on_change is not None:
            try:
                self.on_change(self)
            except Exception:
                log.exception("bridge_status_failed", extra={"bridge": self.config.name})

    def _run(self) -> None:
        cfg = self.config
        delay = cfg.reconnect_initial
        while not self._stopped:
            self._set_state(CONNECTING)
            try:
                self._connect_and_serve()
                delay = cfg.reconnect_initial  # it was up: start the backoff again
            except (OSError, FluxMQError, ValueError, ssl.SSLError) as exc:
                self.counters.errors += 1
                log.warning(
                    "bridge_link_failed",
                    extra={"bridge": cfg.name, "peer": self.peer, "error": str(exc) or type(exc).__name__},
                )
                self.last_error = str(exc) or type(exc).__name__
            except Exception as exc:  # a bug must not end the link for the life of the node
                self.counters.errors += 1
                log.exception("bridge_link_error", extra={"bridge": cfg.name, "peer": self.peer})
                self.last_error = f"internal error: {type(exc).__name__}"
            finally:
                self._teardown()
            if self._stopped:
                return
            self._set_state(DOWN)
            gevent.sleep(jittered(delay))
            delay = min(delay * 2, cfg.reconnect_max)

    def _connect_and_serve(self) -> None:
        cfg = self.config
        sock = socket.create_connection((cfg.host, cfg.port), timeout=CONNECT_TIMEOUT)
        if cfg.tls is not None:
            sock = self._tls_context().wrap_socket(sock, server_hostname=cfg.host)
        self._sock = sock
        decoder = c.Decoder(self.max_packet_size, self.version)
        props = {}
        if self.version == 5:
            # A persistent session at the peer: what it queued for us survives our outage.
            props = {
                0x11: 0 if cfg.clean_start else EXPIRY_NEVER,
                0x21: RECEIVE_MAXIMUM,
                0x27: self.max_packet_size,
            }
        connect = c.Connect(
            cfg.client_id,
            cfg.clean_start,
            int(cfg.keepalive),
            self.version,
            username=cfg.username or None,
            password=cfg.password,
            properties=props or None,
        )
        sock.sendall(c.encode(connect, self.version))
        connack, rest = self._read_connack(sock, decoder)
        if connack.reason_code != 0:
            raise FluxMQError(f"peer refused the connection (CONNACK {connack.reason_code:#x})")
        send_quota = self.broker.settings.max_inflight
        if self.version == 5 and connack.properties:
            send_quota = min(send_quota, connack.properties.get(0x21, send_quota))
        self.counters.connects += 1
        self._closing = False
        self._writer = gevent.spawn(self._write_loop)
        session = self._open_session()
        rest = self._subscribe_remote(sock, decoder, rest)
        self.broker.attach(session, self, send_quota)
        self._set_state(CONNECTED)
        log.info(
            "bridge_connected",
            extra={"bridge": cfg.name, "peer": self.peer, "session_present": connack.session_present},
        )
        pinger = gevent.spawn(self._ping_loop) if cfg.keepalive > 0 else None
        try:
            for packet in rest:
                self._handle(packet)
            read_timeout = cfg.keepalive * 1.5 if cfg.keepalive > 0 else None
            sock.settimeout(read_timeout)
            while not self._closing:
                data = sock.recv(65536)
                if not data:
                    raise FluxMQError("peer closed the connection")
                for packet in decoder.feed(data):
                    self._handle(packet)
        except TimeoutError:
            raise FluxMQError("peer silent for 1.5 x keepalive") from None
        finally:
            if pinger is not None:
                pinger.kill(block=False)

    def _read_connack(self, sock, decoder) -> tuple:
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while True:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            data = sock.recv(65536)
            if not data:
                raise FluxMQError("peer closed the connection before CONNACK")
            packets = decoder.feed(data)
            if packets:
                first = packets[0]
                if not isinstance(first, c.Connack):
                    raise FluxMQError(f"expected CONNACK, got {type(first).__name__}")
                return first, packets[1:]

    def _tls_context(self) -> ssl.SSLContext:
        tls = self.config.tls or {}
        ctx = ssl.create_default_context(cafile=tls.get("ca_file") or None)  # verifies by default
        if tls.get("cert_file"):
            ctx.load_cert_chain(tls["cert_file"], tls.get("key_file") or None)
        if tls.get("insecure"):
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _subscribe_remote(self, sock, decoder, rest: list) -> list:
        """SUBSCRIBE the inbound patterns at the peer and wait for the SUBACK before the outbound
        session is attached, so the SUBSCRIBE's packet id cannot meet one the session allocates.
        PUBLISHes the peer sends meanwhile are handled in order; returns the packets after SUBACK."""
        if not self._in_routes:
            return rest
        subs = [
            c.Subscription(
                r.remote_filter, r.qos, no_local=self.version == 5, retain_as_published=self.version == 5
            )
            for r in self._in_routes
        ]
        inflight = self.session.inflight
        pid = next(i for i in range(1, 65536) if i not in inflight)
        self._queue(c.encode(c.Subscribe(pid, subs), self.version))
        deadline = time.monotonic() + CONNECT_TIMEOUT
        pending = list(rest)
        while True:
            while pending:
                packet = pending.pop(0)
                if type(packet) is c.Suback:
                    refused = [code for code in packet.reason_codes if code >= 0x80]
                    if refused:
                        log.warning(
                            "bridge_subscribe_refused", extra={"bridge": self.config.name, "codes": refused}
                        )
                    return pending
                self._handle(packet)
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            data = sock.recv(65536)
            if not data:
                raise FluxMQError("peer closed the connection before SUBACK")
            pending = decoder.feed(data)

    def _ping_loop(self) -> None:
        interval = max(1.0, self.config.keepalive / 2)
        ping = c.encode(c.Pingreq(), self.version)
        while not self._closing:
            gevent.sleep(interval)
            self._queue(ping)

    def _teardown(self) -> None:
        self._closing = True
        session = self.session
        if session is not None and session.delivery is self:
            self.broker.close_session(session, self, publish_will=False)
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
        if self._writer is not None:
            self._writer.kill(block=False)
            self._writer = None
        self.out.clear()
        self._wbuf.clear()
        self._wpending = 0
        self._marked = False

    # -- output (through the FlushScheduler: after the turn's commit) ------------------------------

    def _queue(self, data: bytes) -> None:
        if self._sock is None:
            return
        self.out += data
        self._mark()

    def _mark(self) -> None:
        if self._marked:
            return
        self._marked = True
        if self.flusher is not None:
            self.flusher.mark(self)
        else:
            gevent.get_hub().loop.run_callback(self.flush_nowait)

    def flush_nowait(self, n: int | None = None) -> None:
        """Called by the FlushScheduler once the turn's records are committed: hand the bytes
        (the first ``n`` with ``storage.sync: always``) to the writer greenlet."""
        self._marked = False
        out = self.out
        if n is None or n >= len(out):
            chunk = bytes(out)
            out.clear()
        else:
            chunk = bytes(out[:n])
            del out[:n]
            self._mark()
        if chunk:
            self._wbuf.append(chunk)
            self._wpending += len(chunk)
            self._wake.set()

    def abandon_output(self, reason_code: int, reason: str = "") -> None:
        """The commit these bytes acknowledge failed: send nothing and drop the connection."""
        self.out.clear()
        self.close(reason_code, reason)

    def _write_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            sock = self._sock
            while self._wbuf and sock is not None:
                chunks, self._wbuf = self._wbuf, []
                data = b"".join(chunks)
                try:
                    sock.sendall(data)
                except OSError:
                    self.close(0x80, "write failed")
                    return
                self._wpending -= len(data)
            session = self.session
            if session is not None and session.delivery is self and self._wpending < HIGH_WATER // 2:
                session.on_writable()

    # -- Delivery (called by the broker; never blocks) ---------------------------------------------

    def send_publish(
        self, message: Message, qos: int, retain: bool, packet_id: int, dup: bool, subscription_ids
    ) -> bool:
        props = message.properties
        if props and self.config.mesh and _has_marker(props, ROUTE_MARKER):
            # A cluster peer's message: that peer sends it to every node itself (no relays, no loops).
            self.counters.dropped_loop += 1
            if qos:
                gevent.get_hub().loop.run_callback(self._settle_locally, packet_id, qos)
            return True
        topic = message.topic
        if self._rewrite_out:
            for route in self._out_routes:
                if filter_matches(route.local_filter, topic):
                    topic = route.to_remote(topic)
                    break
        out_props = None
        if self.version == 5:
            out_props = dict(props) if props else {}
            marks = list(out_props.get(USER_PROPERTY, ()))
            marks.append((self._marker, self.node_id))
            out_props[USER_PROPERTY] = marks
            left = message.remaining_expiry()
            if left is not None:
                out_props[MESSAGE_EXPIRY_INTERVAL] = max(1, left)
        else:
            self._remember_sent(topic, message.payload)
        self._queue(
            c.encode_publish(topic, message.payload, qos, retain, dup, packet_id, out_props, self.version)
        )
        self.counters.forwarded_out += 1
        return True

    def _settle_locally(self, packet_id: int, qos: int) -> None:
        session = self.session
        if session is None:
            return
        if qos == 1:
            session.on_puback(packet_id)
        else:
            session.on_pubrec(packet_id)
            session.on_pubcomp(packet_id)

    def send_pubrel(self, packet_id: int) -> None:
        self._queue(c.encode(c.Pubrel(packet_id), self.version))

    @property
    def closed(self) -> bool:
        """True once the peer connection is closing or gone (the session keeps what it holds)."""
        return self._closing or self._sock is None

    def is_congested(self) -> bool:
        return self._closing or len(self.out) + self._wpending > HIGH_WATER

    def close(self, reason_code: int, reason: str = "") -> None:
        """Drop the peer connection (the run loop reconnects unless stopped)."""
        self._closing = True
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- from the peer ----------------------------------------------------------------------------

    def _handle(self, packet) -> None:
        session = self.session
        t = type(packet)
        if t is c.Publish:
            self._on_publish(packet)
        elif t is c.Puback:
            session.on_puback(packet.packet_id)
        elif t is c.Pubrec:
            if session.on_pubrec(packet.packet_id, packet.reason_code) and packet.reason_code < 0x80:
                self.send_pubrel(packet.packet_id)
            elif packet.reason_code < 0x80:
                self.send_pubrel(packet.packet_id)  # unknown id: complete the peer's exchange
        elif t is c.Pubcomp:
            session.on_pubcomp(packet.packet_id)
        elif t is c.Pubrel:
            session.inbound_qos2.discard(packet.packet_id)
            self._queue(c.encode(c.Pubcomp(packet.packet_id), self.version))
        elif t is c.Disconnect:
            raise FluxMQError(f"peer sent DISCONNECT {packet.reason_code:#x}")
        # PINGRESP and anything else: nothing to do

    def _on_publish(self, packet) -> None:
        qos = packet.qos
        pid = packet.packet_id
        session = self.session
        if qos == 2 and pid in session.inbound_qos2:
            self._queue(c.encode(c.Pubrec(pid), self.version))  # a resend: already published once
            return
        if self._accept(packet):
            topic = packet.topic
            cap = self._in_qos
            if self._rewrite_in:
                cap = -1
                for r in self._in_routes:
                    if filter_matches(r.remote_filter, topic):
                        topic = r.to_local(topic)
                        cap = r.qos
                        break
            if cap >= 0:
                # The peer caps by our subscription's QoS already; a peer that does not is capped here.
                mqos = qos if qos <= cap else cap
                props = packet.properties
                message = (
                    Message.from_publish_properties(topic, packet.payload, mqos, packet.retain, props)
                    if props
                    else Message(topic, packet.payload, mqos, packet.retain)
                )
                # Raises QuotaExceeded when the store is full: no ack goes out and the link drops,
                # so the peer sends it again later.
                self.broker.publish(message, origin=session)
                self.counters.forwarded_in += 1
        if qos == 1:
            self._queue(c.encode(c.Puback(pid), self.version))
        elif qos == 2:
            session.inbound_qos2.add(pid)
            self._queue(c.encode(c.Pubrec(pid), self.version))

    def _accept(self, packet) -> bool:
        """False for our own message coming back (5.0 marker, or the 3.1.1 echo guard)."""
        props = packet.properties
        if props:
            for key, value in props.get(USER_PROPERTY, ()):
                if key in (BRIDGE_MARKER, ROUTE_MARKER) and value == self.node_id:
                    self.counters.dropped_loop += 1
                    return False
        if self.version != 5 and self._echo:
            fp = (packet.topic, packet.payload)
            n = self._echo.get(fp)
            if n:
                if n == 1:
                    del self._echo[fp]
                else:
                    self._echo[fp] = n - 1
                self.counters.dropped_loop += 1
                return False
        return True

    def _remember_sent(self, topic: str, payload: bytes) -> None:
        if not self._in_routes:
            return
        fp = (topic, payload)
        echo = self._echo
        echo[fp] = echo.get(fp, 0) + 1
        if len(echo) > ECHO_GUARD_SIZE:
            echo.popitem(last=False)

    # -- status ------------------------------------------------------------------------------------

    def queued(self) -> int:
        """Outbound messages held: queued plus in flight."""
        s = self.session
        return len(s.queue) + len(s.inflight) if s is not None else 0

    def snapshot(self) -> dict:
        """A JSON-ready view of this link (credentials never appear)."""
        cfg = self.config
        s = self.session
        return {
            "name": cfg.name,
            "peer": self.peer,
            "client_id": cfg.client_id,
            "state": self.state,
            "since": round(self.since, 3),
            "protocol_version": cfg.protocol_version,
            "mesh": cfg.mesh,
            "tls": cfg.tls is not None,
            "queued": self.queued(),
            "forwarded_out": self.counters.forwarded_out,
            "forwarded_in": self.counters.forwarded_in,
            "dropped_validity": s.validity_drops if s is not None else 0,
            "dropped_loop": self.counters.dropped_loop,
            "connects": self.counters.connects,
            "last_error": self.last_error,
        }


def jittered(delay: float, rand=None) -> float:
    """A reconnect wait: ``delay`` (which doubles per failure up to ``reconnect.max``) with jitter,
    uniform in [delay/2, delay], so links that failed together do not reconnect together."""
    return delay * (0.5 + (rand or random.random)() / 2)


def _has_marker(props: dict, key: str) -> bool:
    for k, _ in props.get(USER_PROPERTY, ()):
        if k == key:
            return True
    return False
