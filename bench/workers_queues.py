"""Durable queues across workers (issue 16): what a forwarded append and a remote member cost.

One ``fluxmq-node`` with ``server.workers: 2`` (``storage.type=lmdb``, ``storage.sync=batch``)
per scenario, queue ``bench`` (owned by worker ``w{crc32("bench") % 2}``, ``max_inflight: 1000``),
one publisher keeping ``--window`` QoS 1 PUBLISHes unacknowledged and one auto-ack consumer
(``bench.queues.run_once``'s loop), each placed on a chosen worker by reading
``$SYS/broker/worker`` first:

``local``       publisher and consumer on the owner
``remote-pub``  publisher on the other worker (each append forwarded, PUBACK after the owner's commit)
``remote-con``  consumer on the other worker (a remote member: deliveries and PUBACKs cross)
``remote-both`` both on the other worker

Figures: messages delivered and acknowledged per second, and the CPU time of every process of the
node per message (``/proc/<pid>/stat``, user + system): the second is what to compare on a shared
machine.

Usage::

    python -m bench.workers_queues [--runs 3] [--count 20000] [--window 1000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import time
import zlib

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"  # noqa: A001

from bench import procinfo  # noqa: E402
from bench.brokers import FluxmqNode  # noqa: E402
from bench.persist import _frame, _packets  # noqa: E402
from bench.queues import _utf8, connect5, pump, subscribe5  # noqa: E402

OWNER = f"w{zlib.crc32(b'bench') % 2}"
OTHER = "w1" if OWNER == "w0" else "w0"
SCENARIOS = {
    "local": (OWNER, OWNER),
    "remote-pub": (OTHER, OWNER),
    "remote-con": (OWNER, OTHER),
    "remote-both": (OTHER, OTHER),
}


def worker_of(s) -> str:
    """The worker a raw 5.0 connection landed on ($SYS/broker/worker, then unsubscribed)."""
    s.sendall(_frame(0x82, struct.pack(">H", 7) + b"\x00" + _utf8("$SYS/broker/worker") + b"\x00"))
    buf = bytearray()
    worker = None
    for first, body in _packets(s, buf):
        if first >> 4 == 3:
            tlen = struct.unpack_from(">H", body)[0]
            if body[2 : 2 + tlen] == b"$SYS/broker/worker":
                props_len = body[2 + tlen]  # a short properties length (one byte) from the broker
                worker = body[2 + tlen + 1 + props_len :].decode()
                break
    s.sendall(_frame(0xA2, struct.pack(">H", 8) + b"\x00" + _utf8("$SYS/broker/worker")))
    for first, _body in _packets(s, buf):
        if first >> 4 == 11:
            break
    return worker


def placed(port: int, worker: str, prefix: str):
    for i in range(100):
        s = connect5(port, f"{prefix}-{i}-{time.monotonic_ns()}")
        if worker_of(s) == worker:
            return s
        s.close()
    raise RuntimeError(f"no connection landed on {worker}")


def prepare(port: int, pub_on: str, con_on: str) -> tuple:
    sub = placed(port, con_on, "bench-c")
    subscribe5(sub, "$queue/bench", [("consumer-group", "g"), ("auto-ack", "true")])
    return placed(port, pub_on, "bench-p"), sub


def run_once(pub, sub, count: int, window: int) -> float:
    delivered, _acked, elapsed, _per = pump(pub, [sub], "$queue/bench", count, window, counted=b"$queue/")
    pub.close()
    sub.close()
    return delivered / elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.workers_queues", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--count", type=int, default=20_000)
    p.add_argument("--window", type=int, default=1000)
    args = p.parse_args(argv)
    rates: dict[str, list[float]] = {name: [] for name in SCENARIOS}
    cpu: dict[str, list[float]] = {name: [] for name in SCENARIOS}
    for _ in range(args.runs):
        for name, (pub_on, con_on) in SCENARIOS.items():
            node = FluxmqNode(max_inflight=1000, sets=[
                "server.workers=2", "storage.type=lmdb", "storage.sync=batch", "broker.sys_interval=1s",
                'queues=[{"name": "bench", "max_inflight": 1000}]'])  # fmt: skip
            node.start()
            try:
                time.sleep(1.0)  # the workers' links
                pub, sub = prepare(node.port, pub_on, con_on)
                pids = [node.proc.pid]
                before = procinfo.tree_cpu_s(pids)
                rates[name].append(run_once(pub, sub, args.count, args.window))
                cpu[name].append((procinfo.tree_cpu_s(pids) - before) / args.count * 1e6)
            finally:
                node.stop()
            print(f"{name}: {rates[name][-1]:,.0f} msg/s, {cpu[name][-1]:.0f} us CPU/msg", file=sys.stderr)
    print(
        f"| scenario (owner {OWNER}; {args.count:,} msgs, median of {args.runs}) | msg/s | node CPU us/msg "
        "(median; min-max) |"
    )
    print("|---|---:|---:|")
    for name in SCENARIOS:
        c = cpu[name]
        print(
            f"| {name} | {statistics.median(rates[name]):,.0f} | {statistics.median(c):.0f}; "
            f"{min(c):.0f}-{max(c):.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
