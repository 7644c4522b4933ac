"""MQTTConnection: the MQTT 3.1 / 3.1.1 / 5.0 state machine of one client connection.

It reads from a transport stream in its own greenlet, decodes every complete packet a ``recv``
returned, hands each to its handler, and writes replies and deliveries into one output buffer that
the FlushScheduler sends once per loop turn. It implements ``fluxmq.broker.delivery.Delivery``.

The stream is any object with ``recv(n)``, ``settimeout(t)``, ``send_nowait(buf) -> int``,
``send_all(data, timeout)``, ``shutdown()``, ``close()`` and ``peer`` (the transport layer's
SocketStream, TLS and WebSocket streams). A stream whose ``recv`` may be interrupted at any of its
waits by a thrown ``TimeoutError`` says so with ``deadline_by_caller = True``: the connection then
keeps its read deadlines (connect timeout, park, keep alive) on one lazily re-armed libev timer
instead of a socket timeout, which would cost a gevent ``Timeout`` set up and torn down per ``recv``.
A stream with ``recv_nowait(n)`` (plain TCP) lets a parked connection answer PINGREQs from the hub,
without waking a greenlet. A stream with a ``drained`` attribute (plain TCP: the last ``recv`` emptied
the kernel's buffer) lets the turn's last reader write the turn's output before it waits
(``FlushScheduler.flush_now``) instead of leaving it to the flush callback.
"""

from __future__ import annotations

import logging
import time
import uuid
from functools import partial

import gevent

from fluxmq._core import codec as c
from fluxmq._core.codec import Decoder, append_publish, encode, encode_publish
from fluxmq._core.relay import PublishRelay
from fluxmq.broker import auth_enhanced
from fluxmq.broker.broker import BRIDGE_SESSION_PREFIX, Broker
from fluxmq.broker.held import HeldAck
from fluxmq.broker.message import Message
from fluxmq.broker.session import EXPIRY_NEVER, Inflight, Session, Will
from fluxmq.broker.stats import LATENCY_SAMPLE_MASK
from fluxmq.errors import (
    MQTTError,
    NotAuthorized,
    ProtocolError,
    QueueRefused,
    QuotaExceeded,
    ServerUnavailable,
    StorageError,
    TopicFilterInvalid,
)

from .settings import ProtocolSettings

log = logging.getLogger("fluxmq.protocol")

# 3.1 / 3.1.1 CONNACK return codes
RC_ACCEPTED = 0
RC_BAD_PROTOCOL = 1
RC_ID_REJECTED = 2
RC_SERVER_UNAVAILABLE = 3
RC_NOT_AUTHORIZED = 5

_PINGRESP = b"\xd0\x00"
_PINGREQ = b"\xc0\x00"  # the only form of a PINGREQ (remaining length 0) in every protocol version

# libev priority of a parked connection's wake-up watcher (libev's range is -2..2; gevent's own
# watchers, a reading connection's included, have 0).
_WAKE_PRIORITY = 1

# Input bytes a connection handles before it lets the hub run. gevent's recv returns without
# switching while data is ready, so a client that never pauses would otherwise keep the hub to
# itself: no flush (acks, deliveries), no other client, no worker heartbeat. One switch per 128 KiB
# is ~3,000 small QoS 0 PUBLISHes: nothing per message.
YIELD_EVERY = 128 * 1024
# The yield is a sleep this long, not sleep(0): sleep(0) resumes from the hub's callback queue,
# which gevent drains (up to 50 callbacks between clock checks) before it polls for I/O, so a
# flooder could run many slices while other clients' input waits. A timer resumes it only after
# the loop has polled, so every slice is followed by the others' input, the flush and the timers.
_YIELD_SLEEP = 1e-6

# client.disconnected reasons of a close from the broker side, by reason code (docs/webhooks.rst).
_CLOSE_REASONS = {0x8E: "session_taken_over", 0x8B: "server_shutdown", 0x98: "administrative_action",
                  0x97: "quota_exceeded"}


# Bytes _drain hands the socket per write: a reading client completes one quickly.
_DRAIN_CHUNK = 256 << 10
# A client that took a chunk within this many seconds counts as reading (may grow its allowance).
_READING_WITHIN = 1.0


class _Close(Exception):
    """Internal: stop reading and tear the connection down."""


# Reason strings of the acknowledgement reason codes the broker sends.
_ACK_REASONS = {
    0x87: "not authorized to publish to this topic ($SYS topics are written by the broker only)",
    0x92: "packet identifier not found",
    0x97: "message refused: over broker.max_message_size, a topic limit, or storage full",
    0x99: "payload is not UTF-8 although its Payload Format Indicator says so",
}


def _connect_level(data) -> int:
    """The protocol level of a CONNECT at the start of ``data`` (0 when it is not one): the decoder
    only learns the version from a CONNECT it could decode."""
    if len(data) < 2 or data[0] != 0x10:
        return 0
    pos = 1
    while pos < len(data) and pos < 5 and data[pos] & 0x80:
        pos += 1
    pos += 1
    if len(data) < pos + 2:
        return 0
    name_len = (data[pos] << 8) | data[pos + 1]
    level_at = pos + 2 + name_len
    return data[level_at] if level_at < len(data) and name_len in (4, 6) else 0


def _check_response_topic(topic: str) -> None:
    """A Response Topic is a topic name: no wildcards [MQTT-3.3.2-14], not empty."""
    if not topic or "+" in topic or "#" in topic:
        raise ProtocolError("Response Topic must be a topic name without wildcards (MQTT-3.3.2-14)")


def _refusal_props(exc) -> dict:
    """A refused publish's 5.0 ack properties: its reason string, and user properties it carries
    (a replicated queue's ``leader`` under write_policy reject)."""
    props = {c.REASON_STRING: exc.reason}
    user = getattr(exc, "user_properties", None)
    if user:
        props[c.USER_PROPERTY] = list(user)
    return props


def _is_utf8(payload: bytes) -> bool:
    """True when ``payload`` is well-formed UTF-8 (what Payload Format Indicator 1 promises)."""
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class MQTTConnection:
    """One client connection (any MQTT version on the same listener)."""

    # Slots, not a __dict__: an idle connection's memory is a target (<= 6 KB per client).
    # Add new attributes here.
    __slots__ = ("broker", "stream", "settings", "flusher", "listener", "peer", "over_limit", "decoder", "out",
                 "version", "session", "client_id", "keepalive", "closed", "_torn_down", "_dirty", "_writer",
                 "_aliases_out", "_alias_max_out", "_auth_method", "_auth_exchange", "_pending_connect",
                 "_want_writable", "_publish_will", "_client_max_packet", "_problem_info", "_aliases_in", "_high",
                 "_keepalive_limit", "_can_park", "_parking", "_parked", "_idle_spent", "on_close", "__weakref__",
                 "_policy", "_npk", "close_reason", "_announced", "_progress_at", "_by_timer", "_timer",
                 "_timer_at", "_period", "_wait_from", "_reader", "_connect_until")

    def __init__(self, broker: Broker, stream, settings: ProtocolSettings, flusher, listener: str = "tcp",
                 over_limit: bool = False) -> None:
        self.broker = broker
        self.stream = stream
        self.settings = settings
        self.flusher = flusher
        self.listener = listener
        self.peer = stream.peer
        self.over_limit = over_limit
        self.decoder = Decoder(settings.max_packet_size)
        self.out = bytearray()
        self.version = 0
        self.session: Session | None = None
        self.client_id: str | None = None
        self.keepalive = 0
        self.closed = False
        self._torn_down = False
        self._dirty = False
        self._writer = None
        self._want_writable = False
        self._publish_will = True  # cleared by a normal DISCONNECT
        self._client_max_packet = 0  # 5.0 Maximum Packet Size of the client; 0 = protocol maximum
        self._problem_info = True  # 5.0 Request Problem Information
        self._aliases_in: dict[int, str] | None = None  # 5.0 inbound topic aliases, made on first use
        self._aliases_out: dict[str, int] | None = None  # 5.0 outbound: topic -> alias, when the client allows them
        self._alias_max_out = 0  # the client's Topic Alias Maximum
        self._auth_method: str | None = None  # 5.0 enhanced authentication method of this connection
        self._auth_exchange = None  # the exchange in progress (CONNECT or re-authentication)
        self._pending_connect = None  # CONNECT state held while its enhanced authentication runs
        # Pending output above which the client counts as congested: write_buffer_high, grown from
        # the node's output budget while the client keeps reading (is_congested), shrunk when drained.
        self._high = settings.write_buffer_high
        self._progress_at = 0.0  # monotonic time the client last took a chunk of a pending write
        self._keepalive_limit = 0.0  # seconds without input before the client is dropped; 0 = none
        self._can_park = hasattr(stream, "has_buffered")
        self._parking = False
        self._idle_spent = 0.0  # idle seconds already waited when the connection parks
        self._parked = None  # (io watcher, keep-alive timer, loop time it parked) while parked
        # Read deadlines on one libev timer (streams with deadline_by_caller), checked lazily when it
        # fires against the time the current recv started: nothing is armed or cancelled per recv.
        self._by_timer = getattr(stream, "deadline_by_caller", False)
        self._timer = None  # the deadline timer while a greenlet serves the connection
        self._timer_at = 0.0  # loop time the timer fires at
        self._period = None  # seconds a recv may wait (None: no limit); absolute before CONNECT
        self._wait_from = 0.0  # loop time the current recv started waiting; 0 when not in recv
        self._connect_until = 0.0  # loop time by which CONNECT must have completed (0: no limit)
        self._reader = None  # the greenlet running run(), while it runs
        self.on_close = None  # set by the listener: called once when the connection has ended
        self._npk = 0  # packets written since the last flush (added to stats.messages_sent there)
        self._policy = None  # fluxmq.auth ClientPolicy (ACL, rates, caps); None when none is configured
        self.close_reason = "connection_lost"  # why a connected client went (client.disconnected event)
        self._announced = None  # (username, connected at) once client.connected was emitted

    # -- read loop -------------------------------------------------------------------------------

    def run(self, first: bytes | None = None, repark: bool = False) -> None:
        """Serve the connection until it closes or parks; runs in a greenlet of its own.

        An idle client (nothing received for ``settings.park_after`` seconds) parks: its greenlet
        ends and a libev I/O watcher plus a keep-alive timer wake it with a new greenlet when bytes
        arrive. A connection with work to do has a greenlet; an idle one costs no greenlet stack.
        ``first``: input the wake-up already read from the socket (b"" for end of stream).
        ``repark``: park again at the first recv that finds nothing (a wake-up after a long quiet).
        """
        stream = self.stream
        stats = self.broker.stats
        handlers = _HANDLERS
        relay_serve = RELAY.serve
        parked = False
        budget = YIELD_EVERY  # input bytes left before the next yield to the hub
        connect_deadline = 0.0
        by_timer = self._by_timer
        loop = gevent.get_hub().loop
        loop_now = loop.now
        flusher = self.flusher
        # Streams that know whether their last recv emptied the kernel's buffer (plain TCP): after
        # such a read the next recv waits, so the turn's output can leave now (see below). A TLS or
        # WebSocket stream may hold or find more input without waiting; it keeps the flush callback.
        knows_drained = hasattr(stream, "drained")
        self._reader = gevent.getcurrent()
        if self.session is None:
            if self.settings.connect_timeout:
                connect_deadline = time.monotonic() + self.settings.connect_timeout
                self._connect_until = loop_now() + self.settings.connect_timeout
            self._set_deadline(self.settings.connect_timeout or None)
        else:
            timeout = self._idle_timeout()
            if repark and self._parking:
                self._idle_spent = 0.0
                timeout = 0.0
            self._set_deadline(timeout)
        try:
            while not self.closed:
                if first is not None:
                    data = first
                    first = None
                else:
                    self._wait_from = loop_now()
                    try:
                        data = stream.recv(65536)
                    except (TimeoutError, BlockingIOError):
                        self._wait_from = 0.0
                        if self._parking and self._park():
                            parked = True
                            return
                        if self._parking and self._idle_spent == 0.0:  # the try right after CONNECT found input buffered
                            self._set_deadline(self._idle_timeout())
                            continue
                        raise
                    self._wait_from = 0.0
                if not data:
                    break
                n = len(data)
                stats.bytes_received += n
                if connect_deadline and self.session is None and not by_timer:
                    # The whole CONNECT (and its AUTH exchange) must arrive within connect_timeout,
                    # not each piece: a client trickling bytes is closed like a silent one.
                    stream.settimeout(max(0.001, connect_deadline - time.monotonic()))
                bad = None
                try:
                    try:
                        packets = self.decoder.feed(data)
                    except MQTTError as exc:
                        # Packets completed before the bad one in this read are still served,
                        # then the connection closes with the error's reason code.
                        packets = list(getattr(exc, "packets", None) or ())
                        bad = exc
                    stats.messages_received += len(packets)
                    count = len(packets)
                    i = 0
                    while i < count:
                        # The common PUBLISH is routed and delivered in C (_core.relay); it stops
                        # at the first packet it does not cover, which the handler below serves.
                        i = relay_serve(self, packets, i)
                        if i >= count or self.closed:
                            break
                        packet = packets[i]
                        i += 1
                        if self.session is None and packet.type != c.CONNECT and (
                                packet.type != c.AUTH or self._pending_connect is None):
                            # The first packet must be CONNECT [MQTT-3.1.0-1]; before CONNACK only
                            # AUTH may follow it [MQTT-3.1.2-33] (a DISCONNECT just closes).
                            if packet.type != c.DISCONNECT:  # anything else is hostile or broken: one line
                                log.info("protocol_error", extra={"peer": self.peer, "client_id": self.client_id, "reason_code": "0x82", "reason": f"packet type {packet.type} before CONNACK"})
                            raise _Close()
                        handler = handlers[packet.type]
                        if handler is None:
                            raise ProtocolError(f"unexpected packet type {packet.type} from a client")
                        handler(self, packet)
                        if self.closed:
                            break
                    if bad is not None and not self.closed:
                        raise bad
                except MQTTError as exc:
                    self._on_protocol_error(exc, data)
                    break
                budget -= n
                if budget <= 0:
                    budget = YIELD_EVERY
                    gevent.sleep(_YIELD_SLEEP)  # let the flush, the heartbeat and the other clients run
                elif knows_drained and stream.drained and flusher.scheduled and not loop.pendingcnt:
                    # The kernel had nothing more: the next recv waits. With no other watcher
                    # pending in this loop turn, this connection is the turn's last reader: write
                    # the turn's output (commit first, as always) before switching back to the
                    # hub, rather than from a flush callback after it. Same batch, one hop less.
                    flusher.flush_now()
        except _Close:
            pass
        except TimeoutError:
            self._on_timeout()
        except OSError:
            pass  # reset by peer, or closed by takeover/shutdown
        except Exception:
            log.exception("connection_error", extra={"peer": self.peer, "client_id": self.client_id})
            self._send_disconnect(0x83, "implementation specific error")
        finally:
            self._wait_from = 0.0
            self._reader = None
            self._disarm()
            if not parked:
                self._teardown()

    # -- read deadlines --------------------------------------------------------------------------

    def _set_deadline(self, seconds: float | None) -> None:
        """Bound each following recv to ``seconds`` (None: unbounded; 0.0: one try, no wait); before
        CONNECT the bound is the absolute connect deadline instead."""
        if not self._by_timer:
            self.stream.settimeout(seconds)
            return
        if seconds == 0.0:
            self.stream.settimeout(0.0)  # rare: the try to park right after CONNECT
            self._period = None
            return
        self.stream.settimeout(None)
        self._period = seconds
        if seconds is None:
            return
        at = gevent.get_hub().loop.now() + seconds
        if self._timer is None or self._timer_at > at:
            self._arm(seconds)

    def _arm(self, after: float) -> None:
        self._disarm()
        timer = gevent.get_hub().loop.timer(after)
        timer.start(self._on_deadline)
        self._timer = timer
        self._timer_at = timer.loop.now() + after

    def _disarm(self) -> None:
        timer = self._timer
        if timer is not None:
            self._timer = None
            self._timer_at = 0.0  # no float kept per parked connection
            timer.stop()
            timer.close()

    def _on_deadline(self) -> None:
        # Hub callback. Raise TimeoutError in the reader if its recv has waited the whole period
        # (what a socket timeout would have done); otherwise wait for the rest of it.
        timer = self._timer
        self._timer = None
        if timer is not None:
            timer.close()
        period = self._period
        reader = self._reader
        if period is None or reader is None or self.closed:
            return
        now = gevent.get_hub().loop.now()
        wait_from = self._wait_from
        if self.session is None and self._connect_until:
            left = self._connect_until - now  # before CONNECT: one deadline for the whole exchange
            if left > 0.0 or not wait_from:
                # Past the deadline but busy in a handler (an AUTH exchange): look again shortly.
                self._arm(left if left > 0.0 else 0.05)
                return
        elif not wait_from:
            self._arm(period)  # busy in a handler: the next recv starts a new period
            return
        else:
            left = wait_from + period - now
            if left > 0.0:
                self._arm(left)
                return
        self._wait_from = 0.0
        reader.throw(TimeoutError("read timeout"))

    def _idle_timeout(self) -> float | None:
        """The recv timeout once connected: the park threshold, or the keep-alive limit if shorter."""
        limit = self._keepalive_limit
        park_after = self.settings.park_after
        if park_after and self._can_park and (not limit or park_after < limit):
            self._parking = True
            self._idle_spent = park_after
            return park_after
        self._parking = False
        return limit or None

    def _park(self) -> bool:
        """End this greenlet and wait for input on a bare watcher; False if input is buffered already."""
        stream = self.stream
        if stream.has_buffered():
            return False
        loop = gevent.get_hub().loop
        # Above the default priority: when a poll finds input on a parked connection and on one
        # that is reading, libev serves the parked one first (within one priority it serves them in
        # the reverse of the kernel's readiness order), so a packet that wakes a parked client is
        # not overtaken by one sent after it on an active connection.
        watcher = loop.io(stream.fileno(), 1, True, _WAKE_PRIORITY)
        watcher.start(self._unpark, False)
        timer = None
        if self._keepalive_limit:
            # The idle time already spent counts against keep alive.
            timer = loop.timer(max(0.001, self._keepalive_limit - self._idle_spent))
            timer.start(self._unpark, True)
        self._parked = (watcher, timer, loop.now())
        return True

    def _unpark(self, timed_out: bool) -> None:
        # Hub callback: the work continues in a new greenlet, switched to at once (as gevent wakes a
        # greenlet waiting in recv), not scheduled for the next loop turn: a woken connection's
        # input takes effect in the turn it arrived, like an active connection's. When the greenlet
        # blocks or ends, the hub carries on from here.
        first = None
        if not timed_out and not self.closed:
            recv_nowait = getattr(self.stream, "recv_nowait", None)
            if recv_nowait is not None:
                first = self._wake_in_hub(recv_nowait)
                if first is None:
                    return  # answered (PINGREQ) or nothing to read: still parked
        watcher, timer, parked_at = self._parked
        self._parked = None
        watcher.stop()
        watcher.close()
        if timer is not None:
            timer.stop()
            timer.close()
        # A client that was quiet for park_after or longer (a sensor that reports now and then) is
        # served and parks again at the first recv that finds nothing, as after CONNECT: its
        # greenlet lives for the input, not for park_after more seconds. One woken sooner after
        # parking (a client that turned busy) reads as usual.
        long_quiet = watcher.loop.now() - parked_at >= self.settings.park_after
        gevent.Greenlet(self._resume, timed_out, first, long_quiet).switch()

    def _wake_in_hub(self, recv_nowait) -> bytes | None:
        """Read what woke a parked connection, in the hub. Keep-alive traffic (PINGREQs only) is
        answered here and the connection stays parked: a client that only pings never costs a
        greenlet, its stack or a receive buffer. Anything else is returned for a greenlet to serve
        (b"" at end of stream); None when the connection stays parked."""
        try:
            data = recv_nowait(65536)
        except BlockingIOError:
            return None  # a spurious wake-up
        except OSError:
            return b""  # reset: the greenlet tears down
        n = len(data)
        if not n or len(self.decoder) or data.count(_PINGREQ) * 2 != n:
            return data
        stats = self.broker.stats
        stats.bytes_received += n
        stats.messages_received += n >> 1
        for _ in range(n >> 1):
            self._write(_PINGRESP)
        watcher, timer, parked_at = self._parked
        if timer is not None:  # input arrived: keep alive counts from now
            self._idle_spent = 0.0
            timer.stop()
            timer.close()
            timer = watcher.loop.timer(self._keepalive_limit)
            timer.start(self._unpark, True)
            self._parked = (watcher, timer, parked_at)
        return None

    def _resume(self, timed_out: bool, first: bytes | None = None, repark: bool = False) -> None:
        if not timed_out:
            self.run(first, repark)
            return
        try:
            self._on_timeout()
        finally:
            self._teardown()

    def _on_timeout(self) -> None:
        if self.session is None:
            log.info("connect_timeout", extra={"peer": self.peer})
            return
        # Keep alive x1.5 passed with nothing received [MQTT-3.1.2-24]; the will is published.
        log.info("keepalive_timeout", extra={"peer": self.peer, "client_id": self.client_id, "keepalive": self.keepalive})
        self._note_close("keepalive_timeout")
        self._send_disconnect(0x8D, "keep alive timeout")

    def _on_protocol_error(self, exc: MQTTError, data=b"") -> None:
        log.info("protocol_error", extra={"peer": self.peer, "client_id": self.client_id, "reason_code": hex(exc.reason_code), "reason": exc.reason})
        self._note_close("protocol_error")
        if self.session is None:
            if exc.reason_code == 0x84:
                # Unknown protocol level: CONNACK return code 1 in the 3.1.1 form [MQTT-3.1.2-2].
                self._write(b"\x20\x02\x00\x01")
            elif (self.decoder.version or _connect_level(data)) == 5:
                # A bad 5.0 CONNECT (or AUTH) gets a CONNACK with the reason before the close [MQTT-3.1.4-1].
                self._write(encode(c.Connack(False, exc.reason_code, None), 5))
            return
        self._send_disconnect(exc.reason_code, exc.reason)

    def _teardown(self) -> None:
        self.closed = True
        self._torn_down = True
        self._release_allowance()
        session = self.session
        will = session is not None and session.will is not None and self._publish_will
        if session is not None:
            try:
                self.broker.close_session(session, self, self._publish_will)
            except Exception:
                log.exception("close_session_failed", extra={"client_id": self.client_id})
        announced = self._announced
        if announced is not None:
            self._announced = None
            events = self.broker.events
            if events is not None:
                events.client_disconnected(self.client_id, announced[0], self.peer, self.version, self.close_reason,
                                           will, time.monotonic() - announced[1])
        if self.out and self._writer is None:
            try:
                self.flusher.ensure_committed(self)  # the bytes may acknowledge state of this turn
                self.stream.send_all(bytes(self.out), self.settings.close_timeout)
            except (OSError, TimeoutError, gevent.Timeout, StorageError):
                pass
            self.out.clear()
        if self._writer is None:
            self.stream.close()
        if self.on_close is not None:
            self.on_close(self)

    # -- output ----------------------------------------------------------------------------------

    def _write(self, data) -> None:
        self.out += data
        self._npk += 1
        if not self._dirty:
            self._dirty = True
            self.flusher.mark(self)

    def flush_nowait(self, limit: int | None = None) -> None:
        """Send what is buffered without blocking (called from the hub by the FlushScheduler).

        ``limit``: send at most the first ``limit`` bytes (``storage.sync: always``: the rest may
        acknowledge state not yet durable) and queue the connection for the next flush.
        """
        self._dirty = False
        out = self.out
        if self._npk:
            self.broker.stats.messages_sent += self._npk
            self._npk = 0
        if not out or self._writer is not None:
            return
        if limit is not None and limit < len(out):
            self._flush_prefix(limit)
            return
        try:
            n = self.stream.send_nowait(out)
        except OSError:
            out.clear()
            self.closed = True
            self.stream.shutdown()
            return
        self.broker.stats.bytes_sent += n
        if n == len(out):
            out.clear()
            if self._high > self.settings.write_buffer_high:
                self._release_allowance()
        else:
            del out[:n]
            self._writer = gevent.spawn(self._drain)
            return
        if self._want_writable:
            self._writable()

    def _flush_prefix(self, limit: int) -> None:
        out = self.out
        if limit > 0:
            try:
                n = self.stream.send_nowait(bytes(out[:limit]))
            except OSError:
                out.clear()
                self.closed = True
                self.stream.shutdown()
                return
            self.broker.stats.bytes_sent += n
            del out[:n]
            if n < limit:
                self._writer = gevent.spawn(self._drain)
                return
        self._dirty = True
        self.flusher.mark(self)

    def _drain(self) -> None:
        """Finish a write the kernel could not take at once; a client that cannot drain within
        ``write_timeout`` is dropped as a slow consumer."""
        out = self.out
        try:
            while out:
                # In chunks: each one the client takes counts as progress (is_congested grows the
                # allowance of a client that keeps reading), and what waits stays counted in out.
                n = min(len(out), _DRAIN_CHUNK)
                self.flusher.ensure_committed(self)  # the first n bytes acknowledge only committed state
                data = bytes(out[:n])
                del out[:n]
                self.stream.send_all(data, self.settings.write_timeout or None)
                self.broker.stats.bytes_sent += len(data)
                self._progress_at = time.monotonic()
                if self._want_writable and len(out) <= self._high // 2:
                    self._writable()
        except (OSError, TimeoutError, gevent.Timeout, StorageError):
            log.info("write_failed", extra={"peer": self.peer, "client_id": self.client_id})
            out.clear()
            self.closed = True
            self.stream.shutdown()
        finally:
            self._writer = None
        self._release_allowance()
        if self._torn_down:
            self.stream.close()
        elif self.closed:
            self.stream.shutdown()  # wakes the reader, whose teardown closes the socket
        elif self._want_writable:
            self._writable()

    def _writable(self) -> None:
        if len(self.out) <= self._high // 2:
            self._want_writable = False
            if self.session is not None and self.session.delivery is self:
                self.session.on_writable()

    # -- Delivery interface (called by the broker) ------------------------------------------------

    def is_congested(self) -> bool:
        if self.closed:
            # Closing, not yet torn down: nothing more goes out, but a QoS 1/2 message is kept by
            # the session (queued, delivered on reconnect), not dropped as if it could never fit.
            return True
        if len(self.out) > self._high:
            if self._grow_allowance():
                return False
            self._want_writable = True
            return True
        return False

    def _grow_allowance(self) -> bool:
        """A client that keeps reading gets more room from the node's output budget (instead of its
        messages going to the session queue and, past that, being dropped); one that stopped reading
        makes no progress and stays at its allowance. Reading: nothing is waiting for the socket
        (what it was given it took), or it took a chunk of the pending write within the last second."""
        if self._writer is not None and time.monotonic() - self._progress_at > _READING_WITHIN:
            return False
        high = self.broker.stats.output_budget.grow(self._high, self.settings.write_buffer_high)
        if high == self._high:
            return False
        self._high = high
        return len(self.out) <= high

    def _release_allowance(self) -> None:
        """Give what the allowance grew back to the node's budget (the output drained or closed)."""
        base = self.settings.write_buffer_high
        if self._high > base:
            self.broker.stats.output_budget.release(self._high - base)
            self._high = base

    def send_publish(self, message: Message, qos: int, retain: bool, packet_id: int, dup: bool,
                     subscription_ids) -> bool:
        # The session asked is_congested() first, which is True once closed.
        if self.version == 5:
            data = self._publish_bytes_v5(message, qos, retain, subscription_ids)
            if data is None:
                return False
        else:
            key = qos * 2 + retain
            cache = message.wire_cache
            if cache is None:  # the first delivery of this message: encode, no lookup
                data = encode_publish(message.topic, message.payload, qos, retain, False, 1 if qos else 0, None, 4)
                message.wire_cache = {key: data}
            else:
                data = cache.get(key)
                if data is None:
                    data = cache[key] = encode_publish(message.topic, message.payload, qos, retain, False,
                                                       1 if qos else 0, None, 4)
        if qos:
            append_publish(self.out, data, packet_id, dup)
        else:
            self.out += data
        self._npk += 1
        if not self._dirty:
            self._dirty = True
            self.flusher.mark(self)
        return True

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
            data = cache[key] = encode_publish(topic, message.payload, qos, retain, False,
                                               1 if qos else 0, props or None, 5)
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

    def close(self, reason_code: int, reason: str = "") -> None:
        """Close from the broker side: 5.0 clients get a DISCONNECT with ``reason_code`` first."""
        if not self._begin_close(reason_code, reason):
            return
        if not self.flusher.settle():
            # storage.sync always: the output may acknowledge state not yet durable; send it after.
            gevent.spawn(self._close_when_committed)
            return
        self.flush_nowait()
        if self._writer is None:
            self.stream.shutdown()

    def _begin_close(self, reason_code: int, reason: str) -> bool:
        """Log the broker-side close, queue the 5.0 DISCONNECT and mark the connection closed;
        False when it was closed already."""
        if self.closed:
            return False
        log.info("server_close", extra={"peer": self.peer, "client_id": self.client_id, "reason_code": hex(reason_code), "reason": reason})
        self._note_close(_CLOSE_REASONS.get(reason_code, "server_close"))
        self._send_disconnect(reason_code, reason)
        self.closed = True
        if self.session is not None and self.session.delivery is not self:
            self.session = None  # taken over: this connection no longer speaks for the session
        return True

    def _close_when_committed(self) -> None:
        try:
            self.flusher.ensure_committed(self)
        except StorageError:
            self.out.clear()
        self.flush_nowait()
        if self._writer is None:
            self.stream.shutdown()

    def abandon_output(self, reason_code: int, reason: str) -> None:
        """The storage could not commit what the buffered output acknowledges: drop it unsent and
        close (5.0 clients get a DISCONNECT with ``reason_code``)."""
        self.out.clear()
        if not self._begin_close(reason_code, reason):
            return
        # Not close(): it would wait for the failed batch. The DISCONNECT alone acknowledges nothing.
        self.flush_nowait()
        if self._writer is None:
            self.stream.shutdown()

    def _note_close(self, reason: str) -> None:
        """Remember why the connection ends, for client.disconnected (the first known reason wins)."""
        if self.close_reason == "connection_lost":
            self.close_reason = reason

    def _emit_auth(self, ok: bool, username: str | None, method: str, reason: str = "", reason_code: int = 0) -> None:
        events = self.broker.events
        if events is None:
            return
        if ok:
            events.auth_success(self.client_id, username, self.peer, self.version, method)
        else:
            events.auth_failure(self.client_id, username, self.peer, self.version, method, reason, reason_code)

    def _send_disconnect(self, reason_code: int, reason: str = "") -> None:
        if self.version == 5 and self.session is not None and not self.closed:
            props = {c.REASON_STRING: reason} if reason and self._problem_info else None
            self._write_v5(c.Disconnect(reason_code, props))

    # -- handlers ----------------------------------------------------------------------------------

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
            self._refuse(RC_SERVER_UNAVAILABLE, 0x97 if self.over_limit else 0x88,
                         "connection limit reached" if self.over_limit else "server shutting down")
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
                    message.properties = {**(message.properties or {}), c.MESSAGE_EXPIRY_INTERVAL: wp[c.MESSAGE_EXPIRY_INTERVAL]}
            else:
                message = Message(w.topic, w.payload, w.qos, w.retain, None, None, client_id)
            will = Will(message, delay)

        pending = (p, will, expiry, send_quota, assigned)
        if settings.refuse_anonymous and authenticator is None and getattr(self.stream, "cert_username", None) is None:
            self._refuse_unidentified(p.username)
            return
        auth = broker.auth
        if auth is not None and authenticator is None and getattr(self.stream, "cert_username", None) is None:
            # User name and password (a verified client certificate or an enhanced authentication
            # method authenticates the client instead).
            result = auth.authenticate(client_id, p.username, p.password, self.peer)
            self._emit_auth(result.ok, p.username, "anonymous" if p.username is None else "password",
                            result.reason, result.reason_code if version == 5 else result.return_code)
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
        if settings.max_keepalive and (keepalive > settings.max_keepalive
                                       or (keepalive == 0 and not settings.allow_zero_keepalive)):
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
        log.debug("connect", extra={"peer": self.peer, "client_id": client_id, "version": version, "clean_start": p.clean_start, "keepalive": keepalive, "present": present})
        broker.attach(session, self, send_quota)
        events = broker.events
        if events is not None:
            self._announced = (username, time.monotonic())
            events.client_connected(client_id, username, self.peer, version, p.clean_start, keepalive, present,
                                    session.expiry_interval, self.listener)

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
        log.info("authentication_failed", extra={"peer": self.peer, "client_id": self.client_id, "method": method, "reason": step.reason})
        self._emit_auth(False, self.session.username if self.session is not None else self._pending_connect[0].username,
                        method, step.reason or "authentication failed", step.reason_code or 0x87)
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
            reason = ("anonymous clients are refused on a network listener: set auth.allow_anonymous: true, "
                      "or auth.password_file or auth.http.url")
        else:
            reason = ("user names cannot be verified on a network listener without auth.password_file or "
                      "auth.http.url (or set auth.allow_anonymous: true)")
        self._refuse(RC_NOT_AUTHORIZED, 0x87, reason)

    def _refuse(self, rc_v3: int, rc_v5: int, reason: str) -> None:
        log.info("connect_refused", extra={"peer": self.peer, "client_id": self.client_id, "code": hex(rc_v5 if self.version == 5 else rc_v3), "reason": reason})
        if self.version == 5:
            self._write_v5(c.Connack(False, rc_v5, {c.REASON_STRING: reason}))  # [MQTT-3.2.2-19]
        else:
            self._write(encode(c.Connack(False, rc_v3, None), self.version))
        self.closed = True

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
                        self.broker.events.publish_denied(self.client_id, session.username, self.peer, topic, qos,
                                                          p.retain, refused)
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
            log.info("publish_refused", extra={"client_id": self.client_id, "topic": topic, "size": len(p.payload), "max_message_size": settings.max_message_size})
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
                        self.broker.publish(Message(topic, p.payload, 0, p.retain, None, None, self.client_id),
                                            session)
                except QueueRefused as exc:  # no ack to carry it: logged
                    log.info("publish_refused", extra={"client_id": self.client_id, "topic": topic, "reason": str(exc)})
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
                        routed = self.broker.publish(Message(topic, p.payload, 1, p.retain, None, None, self.client_id),
                                                     session)
                    if routed.__class__ is HeldAck:  # a replicated queue: the ack waits for the quorum
                        routed.add(partial(self._held_ack, pid, 1, topic))
                        return
                    if not routed and self.version == 5:
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
                    if not routed and self.version == 5:
                        reason = 0x10  # accepted, but nobody subscribes to it
                except QueueRefused as exc:
                    reason = self._refuse_queue(topic, exc)
                except QuotaExceeded:
                    reason = self._refuse_unstorable(topic)
        if reason and self.version == 5:
            self._write_at(ack_at, self._ack5_bytes(c.Pubrec, pid, reason))
        else:
            self._write_at(ack_at, bytes((0x50, 2, pid >> 8, pid & 0xFF)))

    def _held_ack(self, pid: int, qos: int, topic: str, error) -> None:
        """The outcome of a held PUBACK/PUBREC (``fluxmq.broker.held``): the ack, or a refusal that
        is never an ack (5.0: the reason code and string; 3.1.1 has no negative ack: disconnected)."""
        if self.closed:
            return
        kind = c.Puback if qos == 1 else c.Pubrec
        if error is None:
            if self.version == 5:
                self._write(self._ack5_bytes(kind, pid, 0))
            else:
                self._write(bytes((0x40 if qos == 1 else 0x50, 2, pid >> 8, pid & 0xFF)))
            return
        if qos == 2 and self.session is not None:
            self.session.inbound_qos2.discard(pid)
        code = getattr(error, "reason_code", 0x80)
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
        log.info("publish_refused", extra={"client_id": self.client_id, "topic": topic, "reason": "storage full"})
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
            message = Message.from_publish_properties(topic, p.payload, p.qos, p.retain, props, self.client_id)
        else:
            message = Message(topic, p.payload, p.qos, p.retain, None, None, self.client_id)
        return self.broker.publish(message, self.session)

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
                        broker.events.subscribe_denied(self.client_id, session.username, self.peer, s.filter,
                                                       s.qos, code)
                    # 0x87 (ACL) or 0x97 (quota); 3.x has only 0x80 [MQTT-3.9.3-2]
                    codes.append(code if v5 else 0x80)
                    denied.append(s.filter)
                    continue
            try:
                if v5 and s.no_local and s.filter.startswith("$share/"):
                    raise ProtocolError("No Local on a shared subscription")  # [MQTT-3.8.3-4]
                result = broker.subscribe(session, s.filter, s.qos, s.no_local if v5 else False,
                                          s.retain_as_published if v5 else False,
                                          s.retain_handling if v5 else 0, sub_id,
                                          p.properties.get(c.USER_PROPERTY) if v5 and p.properties else None)
            except QueueRefused as exc:
                # 3.x has only 0x80 [MQTT-3.9.3-2]
                log.info("subscribe_refused", extra={"client_id": self.client_id, "filter": s.filter, "reason": exc.reason})
                codes.append(exc.reason_code if v5 else 0x80)
                queue_refusals.append(exc.reason)
                continue
            except TopicFilterInvalid:
                log.info("subscribe_refused", extra={"client_id": self.client_id, "filter": s.filter, "reason": "invalid_filter"})
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

    def _on_pingreq(self, p) -> None:
        self._write(_PINGRESP)

    def _on_disconnect(self, p) -> None:
        # Only reason 0x00 (normal) discards the will [MQTT-3.14.4-3, MQTT-3.1.2-8]; 0x04 asks for
        # it and any error code leaves it to be published as after a network failure.
        self._publish_will = self.version == 5 and p.reason_code != 0
        self._note_close("client_disconnect")
        if self.version == 5 and p.properties:
            expiry = p.properties.get(c.SESSION_EXPIRY_INTERVAL)
            if expiry is not None:
                if self.session.expiry_interval == 0 and expiry != 0:
                    raise ProtocolError("session expiry set on DISCONNECT after 0 at CONNECT")  # MQTT 5.0 3.14.2.2.2
                self.session.expiry_interval = self.broker.capped_expiry(expiry)
                self.session.persistent = expiry > 0
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


# Packet type -> handler, shared by every connection (a per-connection dict of bound methods would
# cost about 1 KB per idle client). None: a packet a client must not send.
_HANDLERS: list = [None] * 16
for _type, _handler in (
    (c.CONNECT, MQTTConnection._on_connect),
    (c.PUBLISH, MQTTConnection._on_publish),
    (c.PUBACK, MQTTConnection._on_puback),
    (c.PUBREC, MQTTConnection._on_pubrec),
    (c.PUBREL, MQTTConnection._on_pubrel),
    (c.PUBCOMP, MQTTConnection._on_pubcomp),
    (c.SUBSCRIBE, MQTTConnection._on_subscribe),
    (c.UNSUBSCRIBE, MQTTConnection._on_unsubscribe),
    (c.PINGREQ, MQTTConnection._on_pingreq),
    (c.DISCONNECT, MQTTConnection._on_disconnect),
    (c.AUTH, MQTTConnection._on_auth),
):
    _HANDLERS[_type] = _handler

# The C fast path of the common PUBLISH (fluxmq._core.relay), shared by every connection of the
# process. ``RELAY.enabled = False`` sends every packet through the handlers above (tests compare
# the two paths); ``RELAY.served`` counts the PUBLISHes it handled.
RELAY = PublishRelay(MQTTConnection, Session, Message, Inflight, c.Puback, LATENCY_SAMPLE_MASK)
