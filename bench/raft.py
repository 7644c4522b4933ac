"""pysyncobj under gevent: commits per second of a 3-node group on loopback, and what it costs the hub.

Three processes (one per Raft node) replicate an ``append(batch)`` command whose argument is a list
of ``--batch`` messages of 100 bytes, as the queue replication does. The leader's process runs the
workload and prints one JSON line; the followers only apply.

    python -m bench.raft --mode gevent --aep 0.05 --atp 0.05 --batch 64 --seconds 3

``--mode gevent``: ``gevent.monkey.patch_all()`` first, as gunicorn's gevent worker does in the node
process, so pysyncobj's tick "thread" is a greenlet of the hub. ``--mode thread``: no patching, a
real OS thread (the baseline). ``--ubatch 0`` sets ``appendEntriesUseBatch=False`` (an
append_entries per command, sent at once).

Measured: pipelined commits/s (every command submitted with a callback, at most ``--window``
outstanding), sync commits/s (one command at a time, the next after the callback) and, in gevent
mode, the worst lateness of a 1 ms timer greenlet during the run (how long the hub was held).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def node_main(args) -> None:
    if args.mode == "gevent":
        from gevent import monkey

        monkey.patch_all()
    from pysyncobj import SyncObj, SyncObjConf, replicated

    class Log(SyncObj):
        def __init__(self, me, others, conf):
            self.applied = 0
            self.messages = 0
            super().__init__(me, others, conf)

        @replicated
        def append(self, batch):
            self.applied += 1
            self.messages += len(batch)
            return self.applied

    conf = SyncObjConf(
        appendEntriesPeriod=args.aep,
        autoTickPeriod=args.atp,
        raftMinTimeout=max(0.4, args.aep * 4),
        raftMaxTimeout=max(1.4, args.aep * 8),
        connectionTimeout=max(3.5, args.aep * 10),
        appendEntriesUseBatch=bool(args.ubatch),
        dynamicMembershipChange=False,
    )
    me = args.node
    others = [p for p in args.peers.split(",") if p != me]
    obj = Log(me, others, conf)
    deadline = time.monotonic() + 20
    while obj._getLeader() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    leader = obj._getLeader()
    if leader is None or str(leader.id if hasattr(leader, "id") else leader) != me:
        # follower: stay up until the leader's run is over
        time.sleep(args.seconds * 2 + 8)
        obj.destroy()
        return
    time.sleep(0.5)
    payload = [b"x" * 100] * args.batch
    result = {"mode": args.mode, "aep": args.aep, "atp": args.atp, "batch": args.batch, "ubatch": args.ubatch}
    lateness = [0.0]
    stop = [False]
    if args.mode == "gevent":
        import gevent

        def watch():
            while not stop[0]:
                t = time.monotonic()
                gevent.sleep(0.001)
                lateness[0] = max(lateness[0], time.monotonic() - t - 0.001)

        gevent.spawn(watch)
        from gevent.event import Event as WaitEvent
    else:
        from threading import Event as WaitEvent

    # pipelined
    done = [0]
    out = [0]
    idle = WaitEvent()

    def cb(res, err):
        done[0] += 1
        out[0] -= 1
        if out[0] < args.window // 2:
            idle.set()

    t0 = time.monotonic()
    end = t0 + args.seconds
    submitted = 0
    while time.monotonic() < end:
        while out[0] < args.window:
            obj.append(payload, callback=cb)
            out[0] += 1
            submitted += 1
        idle.clear()
        idle.wait(1.0)
    while out[0] > 0 and time.monotonic() < end + 5:
        idle.clear()
        idle.wait(0.1)
    elapsed = time.monotonic() - t0
    result["pipelined_commits_s"] = round(done[0] / elapsed)
    result["pipelined_msgs_s"] = round(done[0] * args.batch / elapsed)
    result["hub_max_late_ms_pipelined"] = round(lateness[0] * 1000, 1)
    lateness[0] = 0.0
    # sync
    n = 0
    lat = []
    t0 = time.monotonic()
    end = t0 + args.seconds
    while time.monotonic() < end:
        ev = WaitEvent()
        s = time.monotonic()
        obj.append(payload, callback=lambda r, e, ev=ev: ev.set())
        ev.wait(5)
        lat.append(time.monotonic() - s)
        n += 1
    elapsed = time.monotonic() - t0
    lat.sort()
    result["sync_commits_s"] = round(n / elapsed, 1)
    result["sync_p50_ms"] = round(lat[len(lat) // 2] * 1000, 2)
    result["sync_p99_ms"] = round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 2)
    result["hub_max_late_ms_sync"] = round(lateness[0] * 1000, 1)
    stop[0] = True
    print(json.dumps(result), flush=True)
    obj.destroy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("gevent", "thread"), default="gevent")
    ap.add_argument("--aep", type=float, default=0.1, help="appendEntriesPeriod")
    ap.add_argument("--atp", type=float, default=0.05, help="autoTickPeriod")
    ap.add_argument("--batch", type=int, default=64, help="messages per command")
    ap.add_argument("--ubatch", type=int, default=1, help="appendEntriesUseBatch")
    ap.add_argument("--window", type=int, default=1000, help="pipelined commands outstanding")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--node", default="")
    ap.add_argument("--peers", default="")
    args = ap.parse_args()
    if args.node:
        node_main(args)
        return
    ports = free_ports(3)
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    base = [
        sys.executable,
        "-m",
        "bench.raft",
        "--mode",
        args.mode,
        "--aep",
        str(args.aep),
        "--atp",
        str(args.atp),
        "--batch",
        str(args.batch),
        "--ubatch",
        str(args.ubatch),
        "--window",
        str(args.window),
        "--seconds",
        str(args.seconds),
        "--peers",
        peers,
    ]
    procs = [
        subprocess.Popen(
            base + ["--node", f"127.0.0.1:{p}"],
            stdout=subprocess.PIPE,
            text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        for p in ports
    ]
    try:
        for p in procs:
            try:
                out, _ = p.communicate(timeout=args.seconds * 2 + 40)
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
            if out.strip():
                print(out.strip())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


if __name__ == "__main__":
    main()
