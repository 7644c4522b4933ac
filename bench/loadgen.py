"""fluxmq load generator: MQTT 3.1.1 throughput, fan-out, fan-in, idle connections and latency.

Pure Python (no extra toolchain), built not to be the bottleneck: PUBLISH packets are encoded once
per publisher and only the packet id, sequence number and send time are patched; publishers write
batches of packets per ``send``; subscribers read 256 KiB at a time and parse with the reader chosen
in :func:`bench.wire.make_reader` (pure Python, or the project's Cython codec); ``--procs`` worker
processes (default one per CPU this process may run on) share the connections.

It mirrors ``shared/tools/mqttload.c`` (same modes, options, payload layout and ``RESULT`` line), so
the two cross-check each other.  Every run is bounded by a message count (``--count``) and by time
(``--duration`` of publishing, ``--timeout`` for everything) and stops by itself.  Subscribers check,
per publisher, that sequence numbers arrive in order without gaps (loss) or repeats (duplicates);
loss is reported, never hidden.  Only 127.0.0.0/8 is accepted as a target.

Modes
  throughput  P publishers, S subscribers, T topics (publisher i -> topic i%T; subscriber j
              subscribes topic j%T, or prefix/# with --wildcard)
  fanout      1 publisher, S (default 100) subscribers on one topic
  fanin       P (default 100) publishers on P topics, 1 subscriber on the wildcard prefix/#
  conn        C idle connections: connect rate, broker RSS per connection (--pid), PINGREQ each
  latency     1 publisher at --rate msgs/s, end-to-end latency percentiles

End-to-end window (``--window W``, default 1000): the generator sees both ends, so it caps the
deliveries still owed to subscribers (a message to k subscribers counts k) at W in total, W/P per
publisher.  That measures the sustainable no-loss rate rather than how fast a broker fills queues.

Output: human-readable lines on stderr and one machine-readable line on stdout::

    RESULT mode=throughput label=... qos=0 ... msgs=... deliveries=... secs=... rate=... lost=...

Usage: ``python -m bench.loadgen --mode fanout --port 1883 --pid $(pidof mosquitto)``
"""

from __future__ import annotations

import argparse
import ipaddress
import multiprocessing
import os
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/loadgen.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"  # noqa: A001

from bench import procinfo, wire  # noqa: E402

MODES = ("throughput", "fanout", "fanin", "conn", "latency")
RECV_SIZE = 256 * 1024
MAXEV = 1024
PUB, SUB, IDLE = 1, 2, 3
NEW, CONNECTING, CONNACK_WAIT, SUBACK_WAIT, READY, FAILED, CLOSED = range(7)
EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
EPOLL_BAD = select.EPOLLERR | select.EPOLLHUP
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
CONNS_PER_SOURCE_ADDR = 20000  # ephemeral ports per source address are ~28k (32768-60999)
now_ns = time.monotonic_ns  # CLOCK_MONOTONIC, as mqttload: comparable across processes
_SEQ_TS = struct.Struct("<IQ")  # seq, send time: patched into each PUBLISH payload


@dataclass
class Config:
    """One generator run; :meth:`finalize` applies the mode presets and checks bounds."""

    mode: str = "throughput"
    host: str = "127.0.0.1"
    port: int = 1883
    sub_port: int = 0  # subscribers connect here (0 = port): another node of a cluster
    pubs: int = -1
    subs: int = -1
    topics: int = -1
    wildcard: bool = False
    count: int = 2_000_000
    count_set: bool = False
    duration: float = 10.0
    size: int = 64
    qos: int = 0
    inflight: int = 100
    window: int = 1000
    batch: int = 16384
    rate: float = 1000.0
    conns: int = 1000
    concurrency: int = 200
    hold: float = 2.0
    pids: list[int] = field(default_factory=list)
    timeout: float = 60.0
    drain: float = 5.0
    settle: float = -1.0
    prefix: str = ""
    label: str = "-"
    procs: int = 0
    reader: str = "python"
    persistent: bool = False
    trace: str = ""  # latency mode: write "send_ns latency_ns" per delivery to this file
    verbose: bool = False

    def finalize(self) -> Config:
        """Apply presets (fanout/fanin/latency) and validate; returns self."""
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}")
        addr = ipaddress.ip_address(self.host)
        if addr.version != 4 or not addr.is_loopback:
            raise ValueError(f"refusing non-loopback target {self.host} (127.0.0.0/8 only)")
        if self.size < wire.MIN_PAYLOAD:
            raise ValueError(f"--size must be >= {wire.MIN_PAYLOAD}")
        if self.qos not in (0, 1):
            raise ValueError("--qos must be 0 or 1")
        if not 0 < self.timeout <= 3600:
            raise ValueError("--timeout must be in (0, 3600]")
        if self.count <= 0:
            raise ValueError("--count must be > 0")
        if not 1 <= self.inflight <= 60000:
            raise ValueError("--inflight must be in [1, 60000]")
        self.batch = max(self.batch, 256)
        if not self.prefix:
            self.prefix = f"loadgen/{os.getpid()}"
        if self.mode == "throughput":
            self.pubs = 1 if self.pubs < 0 else self.pubs
            self.subs = 1 if self.subs < 0 else self.subs
            self.topics = self.pubs if self.topics < 0 else self.topics
        elif self.mode == "fanout":
            self.pubs, self.topics, self.wildcard = 1, 1, False
            self.subs = 100 if self.subs < 0 else self.subs
        elif self.mode == "fanin":
            self.pubs = 100 if self.pubs < 0 else self.pubs
            self.subs, self.topics, self.wildcard = 1, self.pubs, True
        elif self.mode == "latency":
            self.pubs, self.topics = 1, 1
            self.subs = 1 if self.subs < 0 else self.subs
            if not 0 < self.rate <= 1e7:
                raise ValueError("--rate must be in (0, 1e7]")
            if not self.count_set:
                self.count = max(1, int(self.rate * self.duration))
            self.window = 0
        else:
            if self.conns < 1:
                raise ValueError("--conns must be >= 1")
            self.concurrency = max(1, self.concurrency)
        if self.settle < 0:
            self.settle = 1.0 if self.mode == "conn" else 0.2
        if self.mode != "conn":
            if self.pubs < 1 or self.subs < 1 or self.topics < 1:
                raise ValueError("need >= 1 publisher, subscriber and topic")
            if self.pubs > 100000 or self.subs > 100000 or self.pubs * self.subs > 50_000_000:
                raise ValueError("too many publishers/subscribers")
            if self.count > 0xFFFFFFFF * self.pubs:
                raise ValueError("--count too large")
            self.count = max(self.count, self.pubs)
        return self

    @property
    def nconns(self) -> int:
        """Connections the run opens."""
        return self.conns if self.mode == "conn" else self.pubs + self.subs

    def topic_of_pub(self, i: int) -> str:
        """The topic publisher ``i`` publishes to."""
        return f"{self.prefix}/{i % self.topics}"

    def filter_of_sub(self, j: int) -> str:
        """The filter subscriber ``j`` subscribes to."""
        return f"{self.prefix}/#" if self.wildcard else f"{self.prefix}/{j % self.topics}"

    def receives(self, j: int, i: int) -> bool:
        """True if subscriber ``j`` gets publisher ``i``'s messages."""
        return self.wildcard or j % self.topics == i % self.topics


class SeqChecker:
    """Per-subscriber delivery accounting: order, gaps (loss) and duplicates per publisher.

    ``row`` counts unique deliveries per publisher (shared by the subscribers of one worker, and
    read by publishers for the end-to-end window); ``lat`` collects latencies in ns, or is None.
    """

    __slots__ = ("exp", "row", "lat", "sent", "npubs", "total", "unique", "dups", "gaps", "bad", "other",
                 "last_recv")  # fmt: skip

    def __init__(
        self, npubs: int, row: Any, lat: list[int] | None = None, sent: list[int] | None = None
    ) -> None:
        self.exp = [0] * npubs
        self.row = row
        self.lat = lat
        self.sent = sent  # with ``lat``: each delivery's send time (ns), for --trace
        self.npubs = npubs
        self.total = self.unique = self.dups = self.gaps = self.bad = self.other = 0
        self.last_recv = 0

    def feed(self, events: list[tuple], now: int) -> bytearray | None:
        """Account reader events received at ``now`` (ns); returns the PUBACKs to send, if any."""
        exp, row, lat, npubs = self.exp, self.row, self.lat, self.npubs
        acks = None
        total = unique = dups = gaps = bad = 0
        for ev in events:
            if ev[0] != 3:
                self.other += 1
                continue
            _, qos, pid, pub, seq, ts = ev
            total += 1
            if qos:
                if acks is None:
                    acks = bytearray()
                acks += b"\x40\x02"
                acks += pid.to_bytes(2, "big")
            if pub < 0 or pub >= npubs:
                bad += 1
                continue
            e = exp[pub]
            if seq == e:
                exp[pub] = e + 1
            elif seq > e:
                gaps += seq - e
                exp[pub] = seq + 1
            else:
                dups += 1
                continue
            unique += 1
            row[pub] += 1
            if lat is not None:
                lat.append(now - ts)
                if self.sent is not None:
                    self.sent.append(ts)
        self.total += total
        self.unique += unique
        self.dups += dups
        self.gaps += gaps
        self.bad += bad
        if unique:
            self.last_recv = now
        return acks


class Conn:
    """One client connection and its role state."""

    __slots__ = (
        "sock", "fd", "role", "idx", "state", "reader", "wbuf", "wblocked", "quota", "sent", "acked",
        "inflight", "next_pid", "done", "tmpl", "checker", "pinged", "ponged", "fan",
    )  # fmt: skip

    def __init__(self, role: int, idx: int, reader_kind: str) -> None:
        self.sock: socket.socket | None = None
        self.fd = -1
        self.role = role
        self.idx = idx
        self.state = NEW
        self.reader = wire.make_reader(reader_kind)
        self.wbuf = bytearray()
        self.wblocked = False
        self.quota = self.sent = self.acked = self.inflight = 0
        self.next_pid = 0
        self.done = False
        self.tmpl: wire.PublishTemplate | None = None
        self.checker: SeqChecker | None = None
        self.pinged = self.ponged = False
        self.fan = 0


class Shared:
    """State the worker processes share: per-publisher sent counts and done flags, per-worker
    rows of unique deliveries per publisher, an abort flag, and phase barriers."""

    def __init__(self, npubs: int, nworkers: int, ctx: Any = None, barrier_timeout: float = 60.0) -> None:
        self.nworkers = nworkers
        self.timeout = barrier_timeout
        if ctx is None or nworkers == 1:
            self.sent: Any = [0] * npubs
            self.done: Any = [0] * npubs
            self.rows: list[Any] = [[0] * npubs]
            self.abort: Any = [0]
            self.barrier = None
        else:
            self.sent = ctx.RawArray("q", npubs)
            self.done = ctx.RawArray("b", npubs)
            self.rows = [ctx.RawArray("q", npubs) for _ in range(nworkers)]
            self.abort = ctx.RawArray("i", 1)
            self.barrier = ctx.Barrier(nworkers)

    def sync(self) -> bool:
        """Wait for every worker (no-op with one); False if the run was aborted."""
        if self.barrier is None:
            return not self.abort[0]
        try:
            self.barrier.wait(self.timeout)
        except threading.BrokenBarrierError:
            self.abort[0] = 1
            return False
        return not self.abort[0]

    def set_abort(self) -> None:
        """Make every worker stop at its next check."""
        self.abort[0] = 1
        if self.barrier is not None:
            self.barrier.abort()


class Worker:
    """The connections of one process and its epoll loop; ``run()`` returns its counts as a dict."""

    def __init__(self, cfg: Config, wid: int, shared: Shared) -> None:
        self.cfg = cfg
        self.wid = wid
        self.sh = shared
        self.nw = shared.nworkers
        self.ep = select.epoll()
        self.by_fd: dict[int, Conn] = {}
        self.conns: list[Conn] = []
        self.pending = self.connected = self.failed = self.dropped = self.subacked = self.pongs = 0
        self.t_first_connect = self.t_last_connack = 0
        self.abort_reason = ""
        self.running = False
        self.deadline = 0
        self.lat_due = 0
        self.pub_window = 0
        self.max_sched_lag = 0
        self.pubacks = 0
        self.src_addrs = 0
        self.reader_kind = wire.resolve_reader_kind(cfg.reader)

    # ------------------------------------------------------------------ connections

    def log(self, msg: str) -> None:
        """Verbose diagnostics on stderr."""
        if self.cfg.verbose:
            print(f"loadgen[{self.wid}]: {msg}", file=sys.stderr, flush=True)

    def _close(self, c: Conn, state: int) -> None:
        if c.sock is not None:
            try:
                self.ep.unregister(c.fd)
            except (OSError, ValueError):
                pass
            self.by_fd.pop(c.fd, None)
            c.sock.close()
            c.sock = None
            c.fd = -1
        c.state = state

    def _fail(self, c: Conn, why: str) -> None:
        if c.state in (CONNECTING, CONNACK_WAIT):
            self.pending -= 1
            self.failed += 1
        elif c.state in (SUBACK_WAIT, READY):
            self.dropped += 1
            if not self.abort_reason and c.role != IDLE:
                self.abort_reason = why
        self.log(f"conn {c.idx} role {c.role} failed: {why}")
        self._close(c, FAILED)

    def _connect_packet(self, c: Conn) -> bytes:
        r = "p" if c.role == PUB else "s" if c.role == SUB else "c"
        return wire.encode_connect(f"lg{os.getpid()}-{r}{c.idx}", clean=not self.cfg.persistent)

    def _open(self, c: Conn, seq: int) -> None:
        cfg = self.cfg
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as e:
            self.failed += 1
            c.state = FAILED
            self.log(f"socket: {e}")
            return
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.sock, c.fd, c.state = s, s.fileno(), CONNECTING
        self.pending += 1
        if not self.t_first_connect:
            self.t_first_connect = now_ns()
        self.by_fd[c.fd] = c
        try:
            if self.src_addrs:
                # beyond ~28k connections one source address runs out of ephemeral ports
                s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                s.bind((f"127.0.0.{2 + seq % self.src_addrs}", 0))
            err = s.connect_ex((cfg.host, cfg.sub_port if c.role == SUB and cfg.sub_port else cfg.port))
        except OSError as e:
            err = e.errno or -1
        if err not in (0, 115):  # EINPROGRESS
            self.ep.register(c.fd, EPOLLOUT)
            self._fail(c, f"connect: {os.strerror(err) if err > 0 else err}")
            return
        # on loopback the handshake has usually completed by now: send CONNECT at once and save an
        # epoll round trip per connection (the generator, not the broker, limits connect rates)
        pkt = c.wbuf or self._connect_packet(c)
        try:
            n = s.send(pkt)
        except (BlockingIOError, InterruptedError):
            c.wbuf = bytearray(pkt)  # not connected yet: send on EPOLLOUT
            self.ep.register(c.fd, EPOLLOUT)
            return
        except OSError as e:
            self.ep.register(c.fd, EPOLLOUT)
            self._fail(c, f"connect: {e}")
            return
        c.state = CONNACK_WAIT
        c.wbuf = bytearray(pkt[n:])
        if c.wbuf:
            c.wblocked = True
            self.ep.register(c.fd, EPOLLIN | EPOLLOUT)
        else:
            self.ep.register(c.fd, EPOLLIN)

    def _send_connect(self, c: Conn) -> None:
        if not c.wbuf:
            c.wbuf += self._connect_packet(c)
        c.state = CONNACK_WAIT
        self.ep.modify(c.fd, EPOLLIN)
        self._flush(c)

    def _flush(self, c: Conn) -> bool:
        """Send what is buffered; False if the connection died."""
        if not c.wbuf:
            return True
        try:
            n = c.sock.send(c.wbuf)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            self._fail(c, f"write: {e}")
            return False
        if n < len(c.wbuf):
            del c.wbuf[:n]
            if not c.wblocked:
                c.wblocked = True
                self.ep.modify(c.fd, EPOLLIN | EPOLLOUT)
        else:
            c.wbuf.clear()
            if c.wblocked:
                c.wblocked = False
                self.ep.modify(c.fd, EPOLLIN)
        return True

    def _open_batch(self, todo: list[Conn], nxt: int, limit: int) -> int:
        while nxt < len(todo) and self.pending < limit:
            self._open(todo[nxt], todo[nxt].idx)
            nxt += 1
        return nxt

    # ------------------------------------------------------------------ events

    def _handle(self, timeout: float) -> None:
        try:
            evs = self.ep.poll(timeout, MAXEV)
        except InterruptedError:
            return
        by_fd = self.by_fd
        for fd, e in evs:
            c = by_fd.get(fd)
            if c is None:
                continue
            if c.state == CONNECTING:
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if e & EPOLL_BAD else 0
                if err or e & EPOLL_BAD:
                    self._fail(c, f"connect: {os.strerror(err) if err else 'hangup'}")
                else:
                    self._send_connect(c)
                continue
            if e & EPOLLOUT:
                if not self._flush(c):
                    continue
                if c.role == PUB and self.running and not c.wblocked:
                    self._pub_fill(c)
                    if c.sock is None:
                        continue
            if e & (EPOLLIN | EPOLL_BAD):
                self._read(c)

    def _read(self, c: Conn) -> None:
        try:
            data = c.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._fail(c, f"read: {e}")
            return
        if not data:
            self._fail(c, "closed by broker")
            return
        now = now_ns()
        try:
            evs = c.reader.feed(data)
        except Exception as e:  # malformed stream from the broker
            self._fail(c, f"parse: {e}")
            return
        if c.role == SUB and c.state == READY:
            acks = c.checker.feed(evs, now)
            if acks:
                c.wbuf += acks
                if not c.wblocked:
                    self._flush(c)
            return
        for ev in evs:
            t = ev[0]
            if t == 4:
                if c.role == PUB and c.inflight > 0:
                    c.inflight -= 1
                    c.acked += 1
                    self.pubacks += 1
            elif t == 2:
                if c.state != CONNACK_WAIT:
                    continue
                self.pending -= 1
                if ev[1] == 0:
                    c.state = READY
                    self.connected += 1
                    self.t_last_connack = now
                else:
                    self.failed += 1
                    self.log(f"conn {c.idx}: CONNACK rc={ev[1]}")
                    self._close(c, FAILED)
                    return
            elif t == 9:
                if c.state == SUBACK_WAIT:
                    if ev[1] in (0, 1, 2):
                        c.state = READY
                        self.subacked += 1
                    else:
                        self.abort_reason = "subscribe refused"
                        self._close(c, FAILED)
                        return
            elif t == 13:
                if c.pinged and not c.ponged:
                    c.ponged = True
                    self.pongs += 1
            elif t == 3 and c.checker is not None:
                # a PUBLISH right after SUBACK in the same read
                acks = c.checker.feed([ev], now)
                if acks:
                    c.wbuf += acks
        if c.wbuf and not c.wblocked:
            self._flush(c)

    # ------------------------------------------------------------------ publishing

    def _recv_by_pub(self, i: int) -> int:
        rows = self.sh.rows
        if len(rows) == 1:
            return rows[0][i]
        return sum(r[i] for r in rows)

    def _pub_fill(self, c: Conn) -> None:
        if c.state != READY or c.done or c.wblocked:
            return
        cfg = self.cfg
        tmpl = c.tmpl
        plen = tmpl.length
        bm = max(1, cfg.batch // plen)
        qos = cfg.qos
        latency = cfg.mode == "latency"
        window = self.pub_window
        f = c.fan
        n = c.quota - c.sent
        if n <= 0:
            c.done = True
            return
        if latency:
            n = min(n, self.lat_due - c.sent)
            if qos:
                n = min(n, cfg.inflight - c.inflight)
            if n <= 0:
                return
        else:
            # hysteresis: once a window is full, wait until a batch worth (or a quarter of the
            # window) is free again instead of dribbling out a message per delivery or PUBACK
            if window and f:
                used = c.sent * f - self._recv_by_pub(c.idx)
                lw = max(1, min(window // f // 4, bm))
                if used > 0 and window - used < lw * f:
                    return
                room = (window - used) // f if used > 0 else max(1, window // f)
                n = min(n, room)
            if qos:
                free = cfg.inflight - c.inflight
                if free < max(1, min(cfg.inflight // 4, bm)):
                    return
                n = min(n, free)
        if n <= 0:
            return
        off_seq = tmpl.off_seq
        off_pid = tmpl.off_pid
        pack_seq = _SEQ_TS.pack_into
        while n > 0:
            k = n if n < bm else bm
            chunk = tmpl.block(k)
            ts = now_ns()
            seq = c.sent
            if qos:
                pid = c.next_pid
                for j in range(k):
                    o = j * plen
                    pid = pid + 1 if pid < 65535 else 1
                    chunk[off_pid + o] = pid >> 8
                    chunk[off_pid + o + 1] = pid & 255
                    pack_seq(chunk, off_seq + o, (seq + j) & 0xFFFFFFFF, ts)
                c.next_pid = pid
                c.inflight += k
            else:
                for j in range(k):
                    pack_seq(chunk, off_seq + j * plen, (seq + j) & 0xFFFFFFFF, ts)
            c.sent += k
            n -= k
            c.wbuf += chunk
            if not self._flush(c) or c.wblocked:
                break
        if c.sent >= c.quota:
            c.done = True

    # ------------------------------------------------------------------ runs

    def run(self) -> dict[str, Any]:
        """Run this worker's share of the scenario; returns its counts."""
        cfg = self.cfg
        self.deadline = now_ns() + int(cfg.timeout * 1e9)
        try:
            if cfg.mode == "conn":
                return self._run_conn()
            return self._run_pubsub()
        except Exception as e:
            self.sh.set_abort()
            return {"error": f"{type(e).__name__}: {e}"}
        finally:
            for c in self.conns:
                self._close(c, CLOSED)
            self.ep.close()

    def _mine(self, n: int, offset: int = 0) -> list[int]:
        return [i for i in range(n) if (i + offset) % self.nw == self.wid]

    def _wait(self, cond: Any) -> None:
        while not cond() and now_ns() < self.deadline and not self.abort_reason and not self.sh.abort[0]:
            self._handle(0.05)

    def _run_pubsub(self) -> dict[str, Any]:
        cfg = self.cfg
        sh = self.sh
        P, S = cfg.pubs, cfg.subs
        lat: list[int] | None = [] if cfg.mode == "latency" else None
        lat_sent: list[int] | None = [] if lat is not None and cfg.trace else None
        row = sh.rows[self.wid]
        pubs: list[Conn] = []
        subs: list[Conn] = []
        for i in self._mine(P):
            c = Conn(PUB, i, self.reader_kind)
            c.quota = cfg.count // P + (1 if i < cfg.count % P else 0)
            c.tmpl = wire.PublishTemplate(cfg.topic_of_pub(i), cfg.qos, cfg.size, i)
            c.fan = sum(1 for j in range(S) if cfg.receives(j, i))
            pubs.append(c)
        for j in self._mine(S, P):
            c = Conn(SUB, j, self.reader_kind)
            c.checker = SeqChecker(P, row, lat, lat_sent)
            subs.append(c)
        self.conns = pubs + subs
        for c in self.conns:  # encoded before any timing
            c.wbuf = bytearray(self._connect_packet(c))
        self.pub_window = max(1, cfg.window // P) if cfg.window > 0 else 0
        fan_local = [sum(1 for c in subs if cfg.receives(c.idx, i)) for i in range(P)]
        per_worker = max(1, cfg.concurrency // self.nw)

        # 1. connect
        nxt = 0
        while now_ns() < self.deadline and not self.abort_reason and not sh.abort[0]:
            nxt = self._open_batch(self.conns, nxt, per_worker)
            if nxt >= len(self.conns) and self.pending == 0:
                break
            self._handle(0.05)
        if self.connected != len(self.conns):
            sh.set_abort()
            return {"error": f"connect ok={self.connected} of={len(self.conns)} failed={self.failed}"}
        if not sh.sync():
            return {"error": "aborted (another worker failed)"}
        # 2. subscribe
        for c in subs:
            c.wbuf += wire.encode_subscribe(1, cfg.filter_of_sub(c.idx), cfg.qos)
            c.state = SUBACK_WAIT
            self._flush(c)
        self._wait(lambda: self.subacked >= len(subs))
        if self.subacked != len(subs):
            sh.set_abort()
            return {"error": f"subscribe subacked={self.subacked} of={len(subs)} {self.abort_reason}"}
        t_settle = now_ns() + int(cfg.settle * 1e9)
        while now_ns() < t_settle:
            self._handle(0.01)
        if not sh.sync():
            return {"error": "aborted (another worker failed)"}

        # 3. publish
        pids = cfg.pids if self.wid == 0 else []
        bcpu0 = procinfo.tree_cpu_s(pids) if pids else -1.0
        rss0 = procinfo.tree_rss_kb(pids) if pids else -1
        rss_peak = rss0
        stat0 = procinfo.host_stat()
        gcpu0 = procinfo.self_cpu_s()
        self.running = True
        t0 = now_ns()
        # latency mode: the count (rate x duration) is the bound; a second of grace for scheduling lag
        grace = 1.0 if cfg.mode == "latency" else 0.0
        pub_deadline = min(t0 + int((cfg.duration + grace) * 1e9), self.deadline)
        drain_ns = int(cfg.drain * 1e9)
        publishing = bool(pubs)
        t_pub_end = 0 if pubs else t0
        t_all_done = 0
        last_rss = t0
        rate = cfg.rate
        latency = cfg.mode == "latency"
        qos = cfg.qos
        P_range = range(P)
        while True:
            now = now_ns()
            if now >= self.deadline or self.abort_reason or sh.abort[0]:
                break
            timeout = 0.001
            if publishing:
                if latency:
                    c0 = pubs[0]
                    self.lat_due = min(int((now - t0) * rate / 1e9) + 1, c0.quota)
                    sched = t0 + int(c0.sent * 1e9 / rate)
                    if c0.sent < self.lat_due and now > sched:
                        self.max_sched_lag = max(self.max_sched_lag, now - sched)
                all_done = True
                for c in pubs:
                    if now >= pub_deadline:
                        c.done = True
                    if not c.done:
                        self._pub_fill(c)
                    if not c.done or c.wbuf or (qos and c.inflight > 0 and c.sock is not None):
                        all_done = False
                if all_done:
                    publishing = False
                    t_pub_end = now_ns()
                    for c in pubs:
                        sh.sent[c.idx] = c.sent
                        sh.done[c.idx] = 1
                elif latency:
                    c0 = pubs[0]
                    nxt_due = t0 + int(c0.sent * 1e9 / rate)
                    timeout = max(0.0, min(0.001, (nxt_due - now_ns()) / 1e9))
            else:
                if not t_all_done and all(sh.done[i] for i in P_range):
                    t_all_done = now
                if t_all_done:
                    owed = sum(sh.sent[i] * fan_local[i] for i in P_range)
                    got = sum(c.checker.unique for c in subs)
                    if got >= owed:
                        break
                    last = max([t_all_done] + [c.checker.last_recv for c in subs])
                    if now - last > drain_ns:
                        break
                timeout = 0.02
            if pids and now - last_rss > 200_000_000:
                rss_peak = max(rss_peak, procinfo.tree_rss_kb(pids))
                last_rss = now
            self._handle(timeout)
        self.running = False
        t_end = now_ns()
        gcpu = procinfo.self_cpu_s() - gcpu0
        bcpu = procinfo.tree_cpu_s(pids) - bcpu0 if pids and bcpu0 >= 0 else -1.0
        stat1 = procinfo.host_stat()
        if not t_pub_end:
            t_pub_end = t_end
        sh.sync()  # nobody closes sockets until everyone is done
        checkers = [c.checker for c in subs]
        return {
            "sent": {c.idx: c.sent for c in pubs},
            "pubacks": self.pubacks,
            "total": sum(k.total for k in checkers),
            "unique": sum(k.unique for k in checkers),
            "dups": sum(k.dups for k in checkers),
            "gaps": sum(k.gaps for k in checkers),
            "bad": sum(k.bad for k in checkers),
            "t_first_pub": t0,
            "t_pub_end": t_pub_end,
            "t_last_recv": max([k.last_recv for k in checkers] + [0]),
            "t_end": t_end,
            "gen_cpu_s": gcpu,
            "broker_cpu_s": bcpu,
            "rss0": rss0,
            "rss_peak": max(rss_peak, procinfo.tree_rss_kb(pids)) if pids else -1,
            "stat0": stat0,
            "stat1": stat1,
            "lat": lat or [],
            "lat_sent": lat_sent or [],
            "sched_lag": self.max_sched_lag,
            "abort": self.abort_reason,
            "dropped": self.dropped,
        }

    def _run_conn(self) -> dict[str, Any]:
        cfg = self.cfg
        sh = self.sh
        mine = self._mine(cfg.conns)
        self.conns = [Conn(IDLE, i, self.reader_kind) for i in mine]
        for c in self.conns:  # encoded before any timing
            c.wbuf = bytearray(self._connect_packet(c))
        if cfg.conns > CONNS_PER_SOURCE_ADDR:
            self.src_addrs = cfg.conns // CONNS_PER_SOURCE_ADDR + 1
        pids = cfg.pids if self.wid == 0 else []
        per_worker = max(1, cfg.concurrency // self.nw)
        rss0 = procinfo.tree_rss_kb(pids) if pids else -1
        bcpu0 = procinfo.tree_cpu_s(pids) if pids else -1.0
        gcpu0 = procinfo.self_cpu_s()
        stat0 = procinfo.host_stat()
        if not sh.sync():
            return {"error": "aborted (another worker failed)"}
        t0 = now_ns()
        nxt = 0
        while now_ns() < self.deadline and not sh.abort[0]:
            nxt = self._open_batch(self.conns, nxt, per_worker)
            if nxt >= len(self.conns) and self.pending == 0:
                break
            self._handle(0.05)
        t1 = now_ns()
        timed_out = self.pending
        gcpu = procinfo.self_cpu_s() - gcpu0
        stat1 = procinfo.host_stat()
        sh.sync()
        bcpu = procinfo.tree_cpu_s(pids) - bcpu0 if pids and bcpu0 >= 0 else -1.0
        t_settle = now_ns() + int(cfg.settle * 1e9)
        while now_ns() < t_settle:
            self._handle(0.05)
        sh.sync()
        rss1 = procinfo.tree_rss_kb(pids) if pids else -1
        t_hold = now_ns() + int(cfg.hold * 1e9)
        while now_ns() < t_hold:
            self._handle(0.1)
        # liveness: PINGREQ on every open connection, wait (bounded) for PINGRESP
        pinged = 0
        for c in self.conns:
            if c.state == READY and c.sock is not None:
                c.wbuf += wire.PINGREQ
                c.pinged = True
                pinged += 1
                self._flush(c)
        t_ping = now_ns() + 15_000_000_000
        while self.pongs < pinged and now_ns() < t_ping:
            self._handle(0.05)
        sh.sync()
        rss2 = procinfo.tree_rss_kb(pids) if pids else -1
        for c in self.conns:
            if c.sock is not None and c.state == READY:
                try:
                    c.sock.send(wire.DISCONNECT)
                except OSError:
                    pass
        return {
            "connected": self.connected,
            "failed": self.failed,
            "timed_out": timed_out,
            "dropped": self.dropped,
            "pinged": pinged,
            "pongs": self.pongs,
            "t_first_connect": self.t_first_connect or t0,
            "t_last_connack": self.t_last_connack,
            "t0": t0,
            "t1": t1,
            "rss0": rss0,
            "rss1": rss1,
            "rss2": rss2,
            "gen_cpu_s": gcpu,
            "broker_cpu_s": bcpu,
            "stat0": stat0,
            "stat1": stat1,
        }


# ---------------------------------------------------------------------- driver


def _worker_main(cfg: Config, wid: int, shared: Shared, conn: Any) -> None:
    try:
        res = Worker(cfg, wid, shared).run()
    except BaseException as e:  # report, never hang the parent
        shared.set_abort()
        res = {"error": f"{type(e).__name__}: {e}"}
    conn.send(res)
    conn.close()


def default_procs() -> int:
    """One worker process per CPU this process may run on."""
    return len(os.sched_getaffinity(0))


def run(cfg: Config) -> dict[str, Any]:
    """Run one bounded generator scenario and return the merged result (see :func:`result_line`)."""
    cfg.finalize()
    procinfo.raise_nofile()
    nw = cfg.procs or default_procs()
    nw = max(1, min(nw, cfg.nconns))
    if nw == 1:
        shared = Shared(max(cfg.pubs, 1), 1)
        parts = [Worker(cfg, 0, shared).run()]
    else:
        ctx = multiprocessing.get_context("fork")
        shared = Shared(max(cfg.pubs, 1), nw, ctx, barrier_timeout=cfg.timeout + 5)
        procs, pipes = [], []
        for wid in range(nw):
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker_main, args=(cfg, wid, shared, w), daemon=True)
            p.start()
            w.close()
            procs.append(p)
            pipes.append(r)
        parts = []
        limit = time.monotonic() + cfg.timeout + 60
        for p, r in zip(procs, pipes, strict=True):
            left = max(0.1, limit - time.monotonic())
            parts.append(r.recv() if r.poll(left) else {"error": "worker did not report"})
            p.join(max(0.1, limit - time.monotonic()))
            if p.is_alive():  # our own child, by its handle
                p.kill()
                p.join(5)
    return merge(cfg, parts, nw)


def _pct(sorted_ns: list[int], p: float) -> float:
    n = len(sorted_ns)
    if n == 0:
        return -1.0
    i = min(n - 1, int(p / 100.0 * (n - 1) + 0.5))
    return sorted_ns[i] / 1e6


def write_trace(path: str, pairs: list[tuple[int, int]]) -> None:
    """``--trace``: one line per delivery, ``send_ns latency_ns`` (CLOCK_MONOTONIC), in send order, so
    a slow sample can be set beside what the broker did at that moment (``bench/hub_trace.py``)."""
    with open(path, "w") as f:
        f.writelines(f"{ts} {lat}\n" for ts, lat in sorted(pairs))


def merge(cfg: Config, parts: list[dict[str, Any]], nw: int) -> dict[str, Any]:
    """Combine the workers' counts into one result dict."""
    errors = [p["error"] for p in parts if "error" in p]
    res: dict[str, Any] = {"mode": cfg.mode, "label": cfg.label, "procs": nw}
    res["reader"] = wire.resolve_reader_kind(cfg.reader)
    if errors:
        res["error"] = errors[0].replace(" ", "_")
        return res
    gen_cpu = sum(p["gen_cpu_s"] for p in parts)
    bcpu = parts[0]["broker_cpu_s"]
    if cfg.mode == "conn":
        connected = sum(p["connected"] for p in parts)
        t_first = min(p["t_first_connect"] for p in parts)
        t_last = max(p["t_last_connack"] for p in parts)
        wall = (max(p["t1"] for p in parts) - min(p["t0"] for p in parts)) / 1e9
        secs = (t_last - t_first) / 1e9 if t_last > t_first else wall
        steal, other = procinfo.host_usage(parts[0]["stat0"], parts[0]["stat1"], gen_cpu + max(bcpu, 0))
        rss0, rss1, rss2 = parts[0]["rss0"], parts[0]["rss1"], parts[0]["rss2"]
        pongs, pinged = sum(p["pongs"] for p in parts), sum(p["pinged"] for p in parts)
        res.update(
            conns=cfg.conns, ok=connected, failed=sum(p["failed"] for p in parts),
            timed_out=sum(p["timed_out"] for p in parts), dropped=sum(p["dropped"] for p in parts),
            alive=pongs, connect_secs=round(secs, 3), conn_rate=round(connected / secs) if secs > 0 else 0,
            rss_before_kb=rss0, rss_after_kb=rss1, rss_after_ping_kb=rss2,
            per_conn_bytes=round((rss1 - rss0) * 1024 / connected) if rss0 >= 0 and rss1 >= 0 and connected else -1,
            gen_cpu=f"{100 * gen_cpu / wall:.0f}%" if wall > 0 else "0%",
            broker_cpu=f"{100 * bcpu / wall:.0f}%" if wall > 0 and bcpu >= 0 else "-1%",
            steal=f"{steal:.1f}%", other_cpu=f"{other:.0f}%",
        )  # fmt: skip
        res["_ok"] = connected == cfg.conns and pongs == pinged
        return res
    sent: dict[int, int] = {}
    for p in parts:
        sent.update(p["sent"])
    fan = [sum(1 for j in range(cfg.subs) if cfg.receives(j, i)) for i in range(cfg.pubs)]
    msgs = sum(sent.values())
    expected = sum(sent.get(i, 0) * fan[i] for i in range(cfg.pubs))
    unique = sum(p["unique"] for p in parts)
    t_first = min(p["t_first_pub"] for p in parts)
    t_end = max(p["t_end"] for p in parts)
    t_last_recv = max(p["t_last_recv"] for p in parts)
    t_last = t_last_recv if t_last_recv > t_first else t_end
    secs = (t_last - t_first) / 1e9
    wall = (t_end - t_first) / 1e9
    pub_secs = (max(p["t_pub_end"] for p in parts) - t_first) / 1e9
    abort = next((p["abort"] for p in parts if p["abort"]), "")
    steal, other = procinfo.host_usage(parts[0]["stat0"], parts[0]["stat1"], gen_cpu + max(bcpu, 0))
    res["qos"] = cfg.qos
    lost = expected - unique
    if cfg.mode == "latency":
        if cfg.trace:
            write_trace(
                cfg.trace,
                [pair for p in parts for pair in zip(p.get("lat_sent", ()), p["lat"], strict=False)],
            )
        lat = sorted(x for p in parts for x in p["lat"])
        mean = sum(lat) / len(lat) / 1e6 if lat else -1.0
        res.update(
            subs=cfg.subs, size=cfg.size, target_rate=round(cfg.rate), msgs=msgs, deliveries=unique,
            secs=round(secs, 3), rate=round(unique / secs) if secs > 0 else 0, lost=lost,
            dups=sum(p["dups"] for p in parts), gaps=sum(p["gaps"] for p in parts),
            p50_ms=round(_pct(lat, 50), 3), p90_ms=round(_pct(lat, 90), 3), p99_ms=round(_pct(lat, 99), 3),
            p999_ms=round(_pct(lat, 99.9), 3), max_ms=round(_pct(lat, 100), 3), mean_ms=round(mean, 3),
            sched_lag_max_ms=round(max(p["sched_lag"] for p in parts) / 1e6, 3),
        )  # fmt: skip
    else:
        res.update(
            pubs=cfg.pubs, subs=cfg.subs, topics=cfg.topics, size=cfg.size, window=cfg.window, msgs=msgs,
            deliveries=unique, secs=round(secs, 3), rate=round(unique / secs) if secs > 0 else 0,
            in_rate=round(msgs / secs) if secs > 0 else 0, pub_secs=round(pub_secs, 3), lost=lost,
            dups=sum(p["dups"] for p in parts), gaps=sum(p["gaps"] for p in parts),
        )  # fmt: skip
    res.update(
        bad=sum(p["bad"] for p in parts), pubacks=sum(p["pubacks"] for p in parts),
        gen_cpu=f"{100 * gen_cpu / wall:.0f}%" if wall > 0 else "0%",
        broker_cpu=f"{100 * bcpu / wall:.0f}%" if wall > 0 and bcpu >= 0 else "-1%",
        steal=f"{steal:.1f}%", other_cpu=f"{other:.0f}%",
    )  # fmt: skip
    if cfg.mode != "latency":
        res.update(broker_rss_kb=parts[0]["rss0"], broker_rss_peak_kb=parts[0]["rss_peak"])
    if abort:
        res["error"] = "aborted"
        res["abort_reason"] = abort.replace(" ", "_")
    res["expected"] = expected
    res["_ok"] = lost == 0 and not abort and res["dups"] == 0
    return res


def result_line(res: dict[str, Any]) -> str:
    """The machine-readable ``RESULT key=value ...`` line (keys as mqttload's, plus a few)."""
    return "RESULT " + " ".join(f"{k}={v}" for k, v in res.items() if not k.startswith("_"))


def parse_result_line(line: str) -> dict[str, str]:
    """Parse a ``RESULT k=v ...`` line (from this generator or mqttload) into a dict of strings."""
    out: dict[str, str] = {}
    for tok in line.split()[1:]:
        k, _, v = tok.partition("=")
        out[k] = v
    return out


def summary(res: dict[str, Any]) -> str:
    """Human-readable summary of a result."""
    if "error" in res and "msgs" not in res and "ok" not in res:
        return f"{res['mode']}: ERROR {res['error']}"
    if res["mode"] == "conn":
        return (
            f"conn: asked={res['conns']} ok={res['ok']} failed={res['failed']} timed_out={res['timed_out']} "
            f"dropped={res['dropped']} alive={res['alive']} connect_secs={res['connect_secs']} "
            f"({res['conn_rate']} conn/s)\n"
            f"      broker RSS {res['rss_before_kb']} kB -> {res['rss_after_kb']} kB (after ping "
            f"{res['rss_after_ping_kb']} kB): {res['per_conn_bytes']} bytes/conn; gen cpu {res['gen_cpu']}, "
            f"broker cpu {res['broker_cpu']}, other procs {res['other_cpu']}"
        )
    s = (
        f"{res['mode']}: qos={res['qos']} sent={res['msgs']} expected={res['expected']} "
        f"delivered={res['deliveries']} lost={res['lost']} dups={res['dups']} bad={res['bad']} "
        f"pubacks={res['pubacks']}\n"
        f"      {res['secs']} s end-to-end: {res['rate']} deliveries/s; gen cpu {res['gen_cpu']} "
        f"({res['procs']} proc, {res['reader']} reader), broker cpu {res['broker_cpu']}, "
        f"host steal {res['steal']}, other procs {res['other_cpu']}"
    )
    if res["mode"] == "latency":
        s += (
            f"\n      latency ms: mean {res['mean_ms']} p50 {res['p50_ms']} p90 {res['p90_ms']} "
            f"p99 {res['p99_ms']} p99.9 {res['p999_ms']} max {res['max_ms']} "
            f"(max sched lag {res['sched_lag_max_ms']} ms)"
        )
    if res.get("error"):
        s += f"\n      ABORTED: {res.get('abort_reason', res['error'])}"
    return s


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (options as mqttload's)."""
    p = argparse.ArgumentParser(
        prog="python -m bench.loadgen",
        description="MQTT 3.1.1 load generator (throughput, fanout, fanin, conn, latency); 127.0.0.0/8 only.",
    )
    d = Config()
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--host", default=d.host, help="broker address, must be in 127.0.0.0/8")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument(
        "--sub-port", type=int, default=0, help="subscribers connect to this port (another cluster node)"
    )
    p.add_argument("--pubs", type=int, default=-1, help="publishers (throughput, fanin)")
    p.add_argument("--subs", type=int, default=-1, help="subscribers (throughput, fanout, latency)")
    p.add_argument("--topics", type=int, default=-1, help="topics (throughput; default = pubs)")
    p.add_argument("--wildcard", action="store_true", help="subscribers use prefix/#")
    p.add_argument("--count", type=int, default=None, help=f"max messages published in total ({d.count})")
    p.add_argument("--duration", type=float, default=d.duration, help="max seconds of publishing")
    p.add_argument("--size", type=int, default=d.size, help="payload bytes, >= 16")
    p.add_argument("--qos", type=int, default=d.qos, choices=(0, 1))
    p.add_argument(
        "--inflight", type=int, default=d.inflight, help="QoS 1: max unacked PUBLISH per publisher"
    )
    p.add_argument("--window", type=int, default=d.window, help="cap on deliveries in flight (0 = flood)")
    p.add_argument("--batch", type=int, default=d.batch, help="publisher write batch in bytes")
    p.add_argument("--rate", type=float, default=d.rate, help="latency mode: msgs/s")
    p.add_argument("--conns", type=int, default=d.conns, help="conn mode: connections")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="connects in progress at once")
    p.add_argument("--hold", type=float, default=d.hold, help="conn mode: seconds to hold before the ping")
    p.add_argument("--pid", type=int, action="append", default=[], help="broker pid (RSS/CPU over its tree)")
    p.add_argument("--timeout", type=float, default=d.timeout, help="hard limit for the whole run, s")
    p.add_argument("--drain", type=float, default=d.drain, help="wait after publishing for stragglers, s")
    p.add_argument("--settle", type=float, default=-1.0, help="pause after subscribing/connecting, s")
    p.add_argument("--prefix", default="", help="topic prefix (default loadgen/<pid>)")
    p.add_argument("--label", default=d.label, help="copied into the RESULT line")
    p.add_argument("--procs", type=int, default=0, help="worker processes (default: one per usable CPU)")
    p.add_argument(
        "--reader",
        default=d.reader,
        choices=("python", "codec"),
        help="stream parser: pure Python with a fast path (default) or fluxmq's Cython codec",
    )
    p.add_argument(
        "--persistent", action="store_true", help="connect with clean session 0 (persistent sessions)"
    )
    p.add_argument(
        "--trace", default="", help="latency mode: write 'send_ns latency_ns' per delivery to this file"
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def config_from_args(argv: list[str] | None = None) -> Config:
    """Parse command-line arguments into a finalized :class:`Config`."""
    a = build_parser().parse_args(argv)
    cfg = Config(
        mode=a.mode, host=a.host, port=a.port, sub_port=a.sub_port, pubs=a.pubs, subs=a.subs, topics=a.topics, wildcard=a.wildcard,
        count=a.count if a.count is not None else Config.count, count_set=a.count is not None,
        duration=a.duration, size=a.size, qos=a.qos, inflight=a.inflight, window=a.window, batch=a.batch,
        rate=a.rate, conns=a.conns, concurrency=a.concurrency, hold=a.hold, pids=a.pid, timeout=a.timeout,
        drain=a.drain, settle=a.settle, prefix=a.prefix, label=a.label, procs=a.procs, reader=a.reader,
        persistent=a.persistent, trace=a.trace, verbose=a.verbose,
    )  # fmt: skip
    return cfg.finalize()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: run, print the summary on stderr and the RESULT line on stdout."""
    try:
        cfg = config_from_args(argv)
    except ValueError as e:
        print(f"loadgen: {e}", file=sys.stderr)
        return 2
    res = run(cfg)
    print(summary(res), file=sys.stderr)
    print(result_line(res), flush=True)
    return 0 if res.get("_ok") else 1


if __name__ == "__main__":
    sys.exit(main())
