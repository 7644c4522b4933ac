"""Does the Raft leader send a follower's forwarded entries back to it? Bytes per message on each
Raft connection while a producer publishes to a replicated queue through a follower.

Three real nodes (static Raft peers, ``write_policy: forward``, as ``bench.raft_queue``); the
producer (``bench.raft_queue.produce``, 64-byte payloads, 100 in flight) on follower F1. The bytes
each end of every TCP connection between the nodes received (``ss -tinO``: ``bytes_received``)
over the run, divided by the messages: F1 -> leader is the forwarded entries, leader -> F1 and
leader -> F2 the replication. Counts, not rates: the machine's load does not change them.

    python -m bench.raft_echo [--count 20000]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.raft_queue import produce, raft_group, raft_leader
from tests.conftest import NodeFactory


def received() -> dict[tuple[int, int], int]:
    """(local port, peer port) -> bytes received, of every established TCP connection on loopback."""
    out = {}
    text = subprocess.run(["ss", "-tinOH", "state", "established"], capture_output=True, text=True).stdout
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        local, peer = int(fields[2].rpartition(":")[2]), int(fields[3].rpartition(":")[2])
        m = re.search(r"bytes_received:(\d+)", line)
        out[(local, peer)] = int(m.group(1)) if m else 0
    return out


def owner(port: int, nodes: dict[str, object]) -> str:
    """The node whose process has ``port`` open (its Raft listener, or a connection it dialled)."""
    for name, node in nodes.items():
        pids = ",".join(str(p) for p in [node.process.pid, *node.worker_pids()])
        text = subprocess.run(["ss", "-tnpH", f"sport = :{port}"], capture_output=True, text=True).stdout
        if any(f"pid={p}," in text for p in pids.split(",")):
            return name
    return f":{port}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=20000)
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="bench-raft-echo-"))
    factory = NodeFactory(base)
    try:
        nodes = raft_group(factory)
        leader = raft_leader(nodes)
        f1, f2 = [n for n in nodes if n is not leader]
        named = {"leader": leader, "F1 (producer)": f1, "F2": f2}
        produce(f1.mqtt_port, 2000, 100)  # warm-up: the group formed, the connections made
        before = received()
        produce(f1.mqtt_port, args.count, 100)
        time.sleep(1.0)  # the last commit notices
        after = received()
        for (local, peer), n in sorted(after.items()):
            got = n - before.get((local, peer), 0)
            a, b = owner(peer, named), owner(local, named)
            if got > args.count * 10 and a in named and b in named:  # between two of these nodes
                print(f"{a} -> {b}: {got / args.count:.0f} bytes per message")
    finally:
        factory.close()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
