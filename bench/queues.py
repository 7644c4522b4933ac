"""Durable queue throughput (issue 10): publish -> deliver -> ack, beside plain QoS 1 pub/sub.

One fresh fluxmq node per run (``bench.brokers.FluxmqNode``, ``storage.type=lmdb``,
``storage.sync=batch``, broker pinned to ``--broker-cpus``, this generator to ``--gen-cpus``).
The generator is one process with raw MQTT 5.0 sockets and a selector, the same code for every
scenario, so the figures compare the broker's paths:

``pubsub``
    1 publisher -> 1 subscriber, plain QoS 1 (topic ``bench/q``), the subscriber acknowledging.
``queue/N``
    1 publisher -> ``$queue/bench``; N consumers of one group (``consumer-group: g``,
    ``auto-ack: true``: each PUBACK settles, durably, with the turn's commit).

The publisher keeps ``--window`` QoS 1 PUBLISHes unacknowledged. The rate is messages delivered
and acknowledged per second, from the first PUBLISH to the last delivery. Each run measures every
scenario back to back; the table gives the medians, their ratio, and the median (and range) of
each run's queue rate over the pub/sub rate of the same run.

Usage::

    .venv/bin/python -m bench.queues                   # 3 runs, 50,000 messages each
    .venv/bin/python -m bench.queues --runs 1 --count 20000
"""

from __future__ import annotations

import argparse
import os
import selectors
import shutil
import socket
import statistics
import struct
import sys
import time

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"  # noqa: A001

from bench import procinfo  # noqa: E402
from bench.brokers import FluxmqNode  # noqa: E402
from bench.persist import _complete, _frame, _packets  # noqa: E402


def _utf8(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">H", len(data)) + data


def _varint(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n % 128, n // 128
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def connect5(port: int, cid: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    props = b"\x21" + struct.pack(">H", 65535)  # Receive Maximum
    body = b"\x00\x04MQTT\x05\x02\x00\x3c" + _varint(len(props)) + props + _utf8(cid)
    s.sendall(_frame(0x10, body))
    buf = bytearray()
    first, ack = next(_packets(s, buf))
    if first != 0x20 or ack[1] != 0:
        raise RuntimeError(f"CONNACK {ack!r}")
    return s


def subscribe5(s: socket.socket, filter: str, user: list[tuple[str, str]]) -> None:
    props = b"".join(b"\x26" + _utf8(k) + _utf8(v) for k, v in user)
    s.sendall(_frame(0x82, struct.pack(">H", 1) + _varint(len(props)) + props + _utf8(filter) + b"\x01"))
    buf = bytearray()
    first, body = next(_packets(s, buf))
    if first != 0x90 or body[-1] != 1:
        raise RuntimeError(f"SUBACK {body!r}")


def run_once(
    port: int,
    topic: str,
    filter: str,
    consumers: int,
    count: int,
    window: int,
    group: bool,
    sub_port: int | None = None,
    seen: set[bytes] | None = None,
) -> float:
    """Deliveries per second of ``pump`` with ``consumers`` on ``sub_port`` (default: ``port``, the
    publisher's), each a member of group ``g`` (auto-ack) when ``group``; ``seen`` as in ``pump``."""
    user = [("consumer-group", "g"), ("auto-ack", "true")] if group else []
    subs = []
    for i in range(consumers):
        s = connect5(sub_port or port, f"bench-c{i}-{os.getpid()}-{time.monotonic_ns()}")
        subscribe5(s, filter, user)
        subs.append(s)
    pub = connect5(port, f"bench-p-{os.getpid()}-{time.monotonic_ns()}")
    delivered, _acked, elapsed, _per = pump(pub, subs, topic, count, window, seen=seen)
    for s in [pub, *subs]:
        s.close()
    return delivered / elapsed


def pump(
    pub: socket.socket,
    subs: list[socket.socket],
    topic: str,
    count: int,
    window: int,
    counted: bytes = b"",
    strict: bool = True,
    poll: float = 0.05,
    seen: set[bytes] | None = None,
) -> tuple[int, int, float, dict[int, int]]:
    """Publish ``count`` QoS 1 messages (64-byte payloads) to ``topic`` from ``pub``, at most
    ``window`` unacknowledged (200 a write), and PUBACK every PUBLISH the ``subs`` receive, until
    ``count`` deliveries on topics starting with ``counted`` (every one by default); a refused
    PUBACK raises. Returns (deliveries, PUBACKs, seconds from the first PUBLISH, deliveries per
    sub's fileno). After 300 s: ``RuntimeError`` if ``strict``, else what was counted. With ``seen``
    the payloads are numbered (still 64 bytes) and each counted delivery's payload is added to it:
    ``deliveries - len(seen)`` were duplicates. The loop of
    bench/queues.py, bench/workers_queues.py and bench/raft_queue.py: one generator for every
    scenario, so that their figures compare the broker's paths."""
    for s in [pub, *subs]:
        s.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(pub, selectors.EVENT_READ, ("pub", bytearray()))
    for s in subs:
        sel.register(s, selectors.EVENT_READ, ("sub", bytearray()))
    head = _utf8(topic)
    payload = b"p" * 64
    sent = acked = delivered = 0
    per: dict[int, int] = {}
    t0 = time.perf_counter()
    deadline = t0 + 300
    while delivered < count:
        if time.perf_counter() > deadline:
            if not strict:
                break
            raise RuntimeError(f"timed out: {delivered} of {count} delivered, {acked} acknowledged")
        if sent < count and sent - acked < window:
            n = min(200, count - sent, window - (sent - acked))
            pub.sendall(
                b"".join(
                    _frame(
                        0x32,
                        head
                        + struct.pack(">H", (sent + k) % 65535 + 1)
                        + b"\x00"
                        + (payload if seen is None else b"%064d" % (sent + k)),
                    )
                    for k in range(n)
                )
            )
            sent += n
        for key, _ in sel.select(timeout=poll):
            sock = key.fileobj
            role, buf = key.data
            try:
                data = sock.recv(262144)
            except BlockingIOError:
                continue
            if not data:
                raise RuntimeError("connection closed")
            buf += data
            acks = []
            for first, body in _complete(buf):
                if role == "pub" and first >> 4 == 4:
                    if len(body) > 2 and body[2] >= 0x80:
                        raise RuntimeError(f"PUBACK refused: {body!r}")
                    acked += 1
                elif role == "sub" and first >> 4 == 3:
                    tlen = struct.unpack_from(">H", body)[0]
                    acks.append(b"\x40\x02" + body[2 + tlen : 4 + tlen])
                    if body[2 : 2 + tlen].startswith(counted):
                        delivered += 1
                        if seen is not None:
                            seen.add(bytes(body[-64:]))  # the payload ends the PUBLISH
                        per[sock.fileno()] = per.get(sock.fileno(), 0) + 1
            if acks:
                sock.setblocking(True)
                sock.sendall(b"".join(acks))
                sock.setblocking(False)
    return delivered, acked, time.perf_counter() - t0, per


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.queues", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--count", type=int, default=50_000)
    p.add_argument("--window", type=int, default=1000)
    p.add_argument("--consumers", default="1,4,16")
    p.add_argument("--sync", default="batch", choices=["none", "batch", "always"])
    p.add_argument("--broker-cpus", default="1")
    p.add_argument("--gen-cpus", default="0")
    args = p.parse_args(argv)
    if args.gen_cpus and shutil.which("taskset"):
        os.sched_setaffinity(0, {int(c) for c in args.gen_cpus.split(",")})
    scenarios = [("pubsub", "bench/q", "bench/q", 1, False)]
    scenarios += [
        (f"queue/{n}", "$queue/bench", "$queue/bench/#", int(n), True) for n in args.consumers.split(",")
    ]
    results: dict[str, list[float]] = {name: [] for name, *_ in scenarios}
    cpu: dict[str, list[float]] = {name: [] for name, *_ in scenarios}  # the node's CPU us per message
    for _ in range(args.runs):
        for name, topic, filter, n, group in scenarios:
            # The same window for both: 1,000 in flight per subscriber (broker.max_inflight) and per
            # queue consumer (the queue's max_inflight).
            node = FluxmqNode(
                cpus=args.broker_cpus,
                max_inflight=1000,
                sets=[
                    "storage.type=lmdb",
                    f"storage.sync={args.sync}",
                    'queues=[{"name": "bench", "max_inflight": 1000}]',
                ],
            )
            node.start()
            try:
                pids = [node.proc.pid]
                before = procinfo.tree_cpu_s(pids)
                results[name].append(run_once(node.port, topic, filter, n, args.count, args.window, group))
                cpu[name].append((procinfo.tree_cpu_s(pids) - before) / args.count * 1e6)
            finally:
                node.cleanup()  # (the run's LMDB store goes with its directory)
            print(f"{name}: {results[name][-1]:,.0f} msg/s", file=sys.stderr)
    base = statistics.median(results["pubsub"])
    # Each run's queue rates against the pub/sub rate of the same run (measured seconds apart):
    # steadier than the ratio of the medians when the machine's load changes between runs.
    print(
        f"| scenario (storage.sync={args.sync}, {args.count:,} msgs, median of {args.runs}) | msg/s "
        "| vs QoS 1 pub/sub | per run vs its pub/sub (median; min-max) |"
    )
    print("|---|---:|---:|---:|")
    for name, rates in results.items():
        med = statistics.median(rates)
        ratios = [r / p for r, p in zip(rates, results["pubsub"], strict=True)]
        print(
            f"| {name} | {med:,.0f} | {med / base:.2f} | {statistics.median(ratios):.2f}; "
            f"{min(ratios):.2f}-{max(ratios):.2f} |"
        )
    # The node's CPU time per message (user + system, every process of the node): what the rate
    # would be bound by on a core of its own, less sensitive to other load than the rates.
    base_cpu = statistics.median(cpu["pubsub"])
    print()
    print("| scenario | node CPU us/msg (median; min-max) | pub/sub CPU / this CPU |")
    print("|---|---:|---:|")
    for name, values in cpu.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.1f}; {min(values):.1f}-{max(values):.1f} | {base_cpu / med:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
