"""Failover pause of a replicated queue (issue 12): kill -9 the Raft leader, ``--kills`` times.

Three real nodes (tests.conftest.NodeFactory) with a replicated queue (``mode: sync``). Each round a
raw MQTT 5.0 producer on a follower publishes QoS 1 at ``--rate`` msg/s (refused ones are counted,
not retried); the leader's processes get SIGKILL; the pause is the time from the kill to the first
successful PUBACK of a message published after it. The killed node is restarted on its data
directory before the next round (it catches up from the Raft log). Prints the pauses, their p50 and
p99 (nearest rank: over 10 kills, the longest).

    .venv/bin/python -m bench.raft_failover --kills 10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import selectors
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"  # noqa: A001

from bench.persist import _complete, _frame  # noqa: E402
from bench.queues import _utf8, connect5  # noqa: E402
from bench.raft_queue import raft_group  # noqa: E402
from tests.conftest import NodeFactory  # noqa: E402


def status(node) -> dict | None:
    try:
        return node.http_get("/cluster/raft", timeout=1.0)[1]["groups"][0]
    except Exception:
        return None


def leader_of(nodes, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for i, n in enumerate(nodes):
            st = status(n)
            if st is not None and st["delivering"]:
                return i
        time.sleep(0.05)
    raise RuntimeError("no leader")


def one_round(nodes, leader: int, rate: float) -> float:
    follower = nodes[(leader + 1) % 3]
    s = connect5(follower.mqtt_port, f"failover-{time.monotonic_ns()}")
    s.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ)
    head = _utf8("$queue/bench/k")
    sent_at: dict[int, float] = {}
    buf = bytearray()
    pid = 0
    t0 = time.monotonic()
    killed_at = None
    next_send = t0
    deadline = t0 + 60
    try:
        while time.monotonic() < deadline:
            now = time.monotonic()
            if now >= next_send:
                pid = pid % 65535 + 1
                sent_at[pid] = now
                s.sendall(_frame(0x32, head + struct.pack(">H", pid) + b"\x00" + b"p" * 64))
                next_send += 1.0 / rate
            if killed_at is None and now - t0 > 1.0:
                nodes[leader].kill()
                killed_at = time.monotonic()
            for _key, _ in sel.select(timeout=max(0.0, min(0.01, next_send - time.monotonic()))):
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                if not data:
                    raise RuntimeError("producer connection closed")
                buf += data
                for first, body in _complete(buf):
                    if first >> 4 != 4:
                        continue
                    p = struct.unpack_from(">H", body)[0]
                    ok = len(body) <= 2 or body[2] < 0x80
                    sent = sent_at.pop(p, 0.0)
                    if ok and killed_at is not None and sent > killed_at:
                        return time.monotonic() - killed_at
        raise RuntimeError("no successful PUBACK within 60 s of the kill")
    finally:
        s.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--rate", type=float, default=200.0)
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    factory = NodeFactory(base)
    pauses = []
    try:
        nodes = raft_group(factory)
        for _ in range(args.kills):
            leader = leader_of(nodes)
            pauses.append(one_round(nodes, leader, args.rate))
            nodes[leader] = factory.restart(nodes[leader])
            print(f"pause {pauses[-1]:.3f} s", flush=True)
    finally:
        factory.close()
        shutil.rmtree(base, ignore_errors=True)
    pauses.sort()
    # nearest rank: with 10 kills the p99 is the longest pause
    p99 = pauses[min(len(pauses), math.ceil(0.99 * len(pauses))) - 1]
    print(
        json.dumps(
            {
                "kills": len(pauses),
                "p50_s": round(pauses[len(pauses) // 2], 3),
                "p99_s": round(p99, 3),
                "max_s": round(pauses[-1], 3),
                "all": [round(p, 3) for p in pauses],
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
