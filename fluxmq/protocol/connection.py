"""MQTTConnection: the MQTT 3.1 / 3.1.1 / 5.0 state machine of one client connection.

It reads from a transport stream in its own greenlet, decodes every complete packet a ``recv``
returned, hands each to its handler, and writes replies and deliveries into one output buffer that
the FlushScheduler sends once per loop turn. It implements ``fluxmq.broker.delivery.Delivery``.

This module holds the connection's state, the read loop, the output buffer and its flush, the
Delivery interface, close and teardown, PINGREQ and DISCONNECT. The rest comes from mixins, one
concern each: ``handle_connect`` (CONNECT, AUTH), ``handle_publish`` (PUBLISH and the QoS acks),
``handle_subscribe``, ``outbound`` (deliveries and 5.0 encoding), ``deadline`` and ``parking``.

The stream is any object with ``recv(n)``, ``settimeout(t)``, ``send_nowait(buf) -> int``,
``send_all(data, timeout)``, ``shutdown()``, ``close()`` and ``peer`` (the transport layer's
SocketStream, TLS and WebSocket streams). A stream whose ``recv`` may be interrupted at any of its
waits by a thrown ``TimeoutError`` says so with ``deadline_by_caller = True``: the connection then
keeps its read deadlines (connect timeout, park, keep alive) on one lazily re-armed libev timer
instead of a socket timeout, which would cost a gevent ``Timeout`` set up and torn down per ``recv``.
A stream with ``recv_nowait(n)`` (plain TCP) lets a parked connection answer PINGREQs from the hub,
without waking a greenlet. A stream with a ``drained`` attribute (plain TCP: the last ``recv`` emptied
the kernel's buffer) lets the turn's last reader write the turn's output before it waits
(``FlushScheduler.flush_now``) instead of leaving it to the flush callback. With both (plain TCP),
a connected reader waits for input on an I/O watcher whose hub callback serves a read the relay
covers wholly, without switching to the reader greenlet (``_on_input``): a lone message costs no
greenlet switch. That callback and ``flush_nowait`` are C methods of the base class
``ConnectionCore`` (``_hub_read.pyx``), on the typed fields of ``_core.conn_state.ConnState``; a
stream with ``plain_socket = True`` (plain TCP: the socket's bytes are the MQTT stream) is read and
written there with libc on its descriptor, any other through ``recv_nowait`` and ``send_nowait``.
"""

from __future__ import annotations

import logging
import time

import gevent

from fluxmq._core import codec as c
from fluxmq._core.codec import Decoder, encode
from fluxmq._core.relay import PublishRelay
from fluxmq.broker.broker import Broker
from fluxmq.broker.message import Message, TrackedMessage
from fluxmq.broker.session import Inflight, PersistentSession, Session
from fluxmq.broker.stats import LATENCY_SAMPLE_MASK
from fluxmq.errors import MalformedPacket, MQTTError, ProtocolError, StorageError

from ._hub_read import HUB_READS, ConnectionCore, set_relay
from .close_signal import _Close
from .deadline import ReadDeadline
from .handle_connect import (  # noqa: F401 (re-exported: the CONNACK return codes were named here)
    RC_ACCEPTED,
    RC_BAD_PROTOCOL,
    RC_ID_REJECTED,
    RC_NOT_AUTHORIZED,
    RC_SERVER_UNAVAILABLE,
    HandleConnect,
)
from .handle_publish import HandlePublish
from .handle_subscribe import HandleSubscribe
from .outbound import Outbound
from .parking import _PINGRESP, Parking
from .settings import ProtocolSettings

log = logging.getLogger("fluxmq.protocol")

#: the DISCONNECT reason codes of MQTT 5.0 (Table 3-10): a client may use no other [MQTT-3.14.2-1]
DISCONNECT_REASON_CODES = frozenset(
    (0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90) + tuple(range(0x93, 0xA3))
)

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
_CLOSE_REASONS = {
    0x8E: "session_taken_over",
    0x8B: "server_shutdown",
    0x98: "administrative_action",
    0x97: "quota_exceeded",
}


# Bytes _drain hands the socket per write: a reading client completes one quickly.
_DRAIN_CHUNK = 256 << 10
# A client that took a chunk within this many seconds counts as reading (may grow its allowance).
_READING_WITHIN = 1.0


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


class MQTTConnection(
    ConnectionCore, HandleConnect, HandlePublish, HandleSubscribe, Outbound, ReadDeadline, Parking
):
    """One client connection (any MQTT version on the same listener)."""

    # Slots, not a __dict__: an idle connection's memory is a target (<= 6 KB per client).
    # Add new attributes here (the hot ones of every read, relay and flush are typed C fields:
    # fluxmq/_core/conn_state.pxd).
    __slots__ = (
        "listener",
        "peer",
        "over_limit",
        "keepalive",
        "_torn_down",
        "_alias_max_out",
        "_auth_method",
        "_auth_exchange",
        "_pending_connect",
        "_publish_will",
        "_problem_info",
        "_aliases_in",
        "_keepalive_limit",
        "_can_park",
        "_parking",
        "_parked",
        "_idle_spent",
        "on_close",
        "__weakref__",
        "close_reason",
        "_announced",
        "_progress_at",
        "_by_timer",
        "_timer",
        "_timer_at",
        "_period",
        "_connect_until",
    )

    def __init__(
        self,
        broker: Broker,
        stream,
        settings: ProtocolSettings,
        flusher,
        listener: str = "tcp",
        over_limit: bool = False,
    ) -> None:
        self.broker = broker
        self._stats = broker.stats
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
        # 5.0 outbound: topic -> alias, when the client allows them
        self._aliases_out: dict[str, int] | None = None
        self._alias_max_out = 0  # the client's Topic Alias Maximum
        self._auth_method: str | None = None  # 5.0 enhanced authentication method of this connection
        self._auth_exchange = None  # the exchange in progress (CONNECT or re-authentication)
        self._pending_connect = None  # CONNECT state held while its enhanced authentication runs
        # Pending output above which the client counts as congested: write_buffer_high, grown from
        # the node's output budget while the client keeps reading (is_congested), shrunk when drained.
        self._high = self._high_base = settings.write_buffer_high
        self._progress_at = 0.0  # monotonic time the writer started or the client last took a chunk
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
        relay_forward = RELAY.forward_raw
        parked = False
        budget = YIELD_EVERY  # input bytes left before the next yield to the hub
        connect_deadline = 0.0
        by_timer = self._by_timer
        hub = gevent.get_hub()
        loop = hub.loop
        loop_now = loop.now
        flusher = self.flusher
        # Streams that know whether their last recv emptied the kernel's buffer (plain TCP): after
        # such a read the next recv waits, so the turn's output can leave now (see below). A TLS or
        # WebSocket stream may hold or find more input without waiting; it keeps the flush callback.
        knows_drained = hasattr(stream, "drained")
        # Plain TCP with deadlines on the timer: once connected, an empty kernel buffer is waited
        # for by an I/O watcher whose hub callback serves relay-covered input itself (_on_input).
        hub_reads = HUB_READS if by_timer and hasattr(stream, "recv_nowait") else None
        if self._fd < 0 and not self._torn_down and getattr(stream, "plain_socket", False):
            # the socket's bytes are the stream's: the hub callback reads and the flush writes
            # with libc on its descriptor (ConnectionCore)
            self._fd = stream.fileno()
        watcher = None  # that watcher, made at the first such wait; closed when run() returns
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
                packets = None
                if first is not None:
                    data = first
                    first = None
                else:
                    self._wait_from = loop_now()
                    try:
                        if (
                            hub_reads is not None
                            and stream.drained
                            and hub_reads.enabled
                            and self.session is not None
                            and (self._idle_spent or not self._parking)
                        ):
                            # The kernel had nothing more and this is not the try to park: wait
                            # for input on the watcher. Its hub callback serves what the relay
                            # covers without switching here; anything else is handed over.
                            if watcher is None:
                                watcher = loop.io(stream.fileno(), 1)
                            watcher.start(self._on_input, loop)
                            try:
                                data = hub.switch()
                            finally:
                                watcher.stop()
                            if type(data) is tuple:
                                data, packets, i, bad = data
                        else:
                            data = stream.recv(65536)
                    except (TimeoutError, BlockingIOError):
                        self._wait_from = 0.0
                        if self._parking and self._park():
                            parked = True
                            return
                        if self._parking and self._idle_spent == 0.0:
                            # the try right after CONNECT found input buffered
                            self._set_deadline(self._idle_timeout())
                            continue
                        raise
                    self._wait_from = 0.0
                if not data:
                    break
                n = len(data)
                try:
                    if packets is None:
                        stats.bytes_received += n
                        if connect_deadline and self.session is None and not by_timer:
                            # The whole CONNECT (and its AUTH exchange) must arrive within
                            # connect_timeout, not each piece: a client trickling bytes is closed
                            # like a silent one.
                            stream.settimeout(max(0.001, connect_deadline - time.monotonic()))
                        bad = None
                        used = 0
                        if type(data) is bytes and self.session is not None:
                            # the common QoS 0 PUBLISHes served from the read's bytes, without
                            # decoding them (_core.relay); the decoder takes the rest
                            used = relay_forward(self, data)
                            if used:
                                stats.messages_received += RELAY.raw_packets
                        try:
                            if used == 0:
                                packets = self.decoder.feed(data)
                            elif used < n:
                                packets = self.decoder.feed(memoryview(data)[used:])
                            else:
                                packets = []
                        except MQTTError as exc:
                            # Packets completed before the bad one in this read are still served,
                            # then the connection closes with the error's reason code.
                            packets = list(getattr(exc, "packets", None) or ())
                            bad = exc
                        stats.messages_received += len(packets)
                        i = 0
                    # else: handed over by _on_input, which counted the read and served packets[:i]
                    count = len(packets)
                    while i < count:
                        # The common PUBLISH is routed and delivered in C (_core.relay); it stops
                        # at the first packet it does not cover, which the handler below serves.
                        i = relay_serve(self, packets, i)
                        if i >= count or self.closed:
                            break
                        packet = packets[i]
                        i += 1
                        if (
                            self.session is None
                            and packet.type != c.CONNECT
                            and (packet.type != c.AUTH or self._pending_connect is None)
                        ):
                            # The first packet must be CONNECT [MQTT-3.1.0-1]; before CONNACK only
                            # AUTH may follow it [MQTT-3.1.2-33] (a DISCONNECT just closes).
                            if packet.type != c.DISCONNECT:  # anything else is hostile or broken: one line
                                log.info(
                                    "protocol_error",
                                    extra={
                                        "peer": self.peer,
                                        "client_id": self.client_id,
                                        "reason_code": "0x82",
                                        "reason": f"packet type {packet.type} before CONNACK",
                                    },
                                )
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
            if watcher is not None:
                watcher.close()
            self._disarm()
            if not parked:
                self._teardown()

    def _on_timeout(self) -> None:
        if self.session is None:
            log.info("connect_timeout", extra={"peer": self.peer})
            return
        # Keep alive x1.5 passed with nothing received [MQTT-3.1.2-24]; the will is published.
        log.info(
            "keepalive_timeout",
            extra={"peer": self.peer, "client_id": self.client_id, "keepalive": self.keepalive},
        )
        self._note_close("keepalive_timeout")
        self._send_disconnect(0x8D, "keep alive timeout")

    def _on_protocol_error(self, exc: MQTTError, data=b"") -> None:
        log.info(
            "protocol_error",
            extra={
                "peer": self.peer,
                "client_id": self.client_id,
                "reason_code": hex(exc.reason_code),
                "reason": exc.reason,
            },
        )
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
                events.client_disconnected(
                    self.client_id,
                    announced[0],
                    self.peer,
                    self.version,
                    self.close_reason,
                    will,
                    time.monotonic() - announced[1],
                )
        if self.out and self._writer is None:
            try:
                self.flusher.ensure_committed(self)  # the bytes may acknowledge state of this turn
                self.stream.send_all(bytes(self.out), self.settings.close_timeout)
            except (OSError, TimeoutError, gevent.Timeout, StorageError):
                pass
            self.out.clear()
        if self._writer is None:
            self._fd = -1  # the number may be reused by the next socket: C writes stop here
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

    # flush_nowait(limit=None): ConnectionCore's, in C (fluxmq/protocol/_hub_read.pyx).

    def _spawn_drain(self) -> None:
        """The kernel took part of the output: a greenlet writes the rest (``_drain``).

        The client took everything it was given before this write (no writer was running), so it
        counts as reading from now: without this, its first allowance grow would be judged against
        the last chunk of an earlier drain, or against no chunk at all, and refused as a stall."""
        self._progress_at = time.monotonic()
        self._writer = gevent.spawn(self._drain)

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
                self._spawn_drain()
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
            self._fd = -1
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
        log.info(
            "server_close",
            extra={
                "peer": self.peer,
                "client_id": self.client_id,
                "reason_code": hex(reason_code),
                "reason": reason,
            },
        )
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

    def _send_disconnect(self, reason_code: int, reason: str = "") -> None:
        if self.version == 5 and self.session is not None and not self.closed:
            props = {c.REASON_STRING: reason} if reason and self._problem_info else None
            self._write_v5(c.Disconnect(reason_code, props))

    def _on_pingreq(self, p) -> None:
        self._write(_PINGRESP)

    def _on_disconnect(self, p) -> None:
        if self.version == 5 and p.reason_code not in DISCONNECT_REASON_CODES:
            # [MQTT-3.14.2-1]: a Malformed Packet, answered DISCONNECT 0x81 [MQTT-4.13.1-1]; no
            # normal disconnection either, so the will is published [MQTT-3.1.2-8].
            raise MalformedPacket(
                f"DISCONNECT reason code {p.reason_code:#04x} is not a DISCONNECT reason code"
            )
        expiry = p.properties.get(c.SESSION_EXPIRY_INTERVAL) if self.version == 5 and p.properties else None
        if expiry is not None and expiry != 0 and self.session.expiry_interval == 0:
            # MQTT 5.0 3.14.2.2.2. Checked before the will is discarded: a DISCONNECT that is a
            # protocol error is no normal disconnection, so the will is published [MQTT-3.1.2-8].
            raise ProtocolError("session expiry set on DISCONNECT after 0 at CONNECT")
        # Only reason 0x00 (normal) discards the will [MQTT-3.14.4-3, MQTT-3.1.2-8]; 0x04 asks for
        # it and any error code leaves it to be published as after a network failure.
        self._publish_will = self.version == 5 and p.reason_code != 0
        self._note_close("client_disconnect")
        if expiry is not None:
            self.session.expiry_interval = self.broker.capped_expiry(expiry)
            self.session.persistent = expiry > 0
        self.closed = True


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
RELAY = PublishRelay(
    MQTTConnection,
    Session,
    Message,
    Inflight,
    c.Puback,
    LATENCY_SAMPLE_MASK,
    TrackedMessage,
    PersistentSession,
)
set_relay(RELAY)
