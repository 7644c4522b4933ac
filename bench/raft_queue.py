"""Replicated durable queue (issue 12): publish -> PUBACK throughput and latency, beside a local queue.

Real ``fluxmq-node`` processes (tests.conftest.NodeFactory, ``storage.type: lmdb``, ``sync: batch``):

``local``
    one node, queue ``bench`` not replicated (the PUBACK waits for the turn's LMDB commit).
``raft-leader``
    three nodes on loopback, ``replication: {enabled, mode: sync, replication_factor: 3,
    min_in_sync_replicas: 2}``; the producer on the Raft leader (PUBACK after the majority has it).
``raft-follower``
    the same, the producer on a follower (``write_policy: forward``: pysyncobj forwards to the leader).

Each phase also gives the node CPU per PUBACKed message (utime + stime of the nodes' processes from
/proc, all nodes together: the figure to compare on a shared machine) and the Raft snapshots written
meanwhile (log compaction, every ``compaction_entries`` entries; the default 5,000 falls in one of
the phases); the paced phase gives the PUBACKs over 10 ms as episodes (messages sent less than
50 ms apart): one stall of the node shows as one episode of many messages, a busy machine as many
short ones.

One raw MQTT 5.0 producer, no consumer (replication changes the publish path). Throughput: ``--count``
QoS 1 PUBLISHes with ``--window`` unacknowledged, PUBACKs per second. Latency: ``--rate`` msg/s
paced for ``--seconds``, publish -> PUBACK, p50/p99. Every node shares the machine's two cores.

    .venv/bin/python -m bench.raft_queue --count 20000 --rate 1000 --seconds 5

``--distribution``: node CPU per delivered message for ``cluster.raft.distribution_mode`` forward
and replicate, the producer on the leader and an auto-ack consumer on each follower (and, for
reference, forward with one consumer on the leader: nothing crosses nodes but the log):

    .venv/bin/python -m bench.raft_queue --distribution --count 20000

``--workers``: three nodes of ``server.workers: 2`` (static peers, no etcd), the producer on worker 0
(the node's Raft member) then on worker 1 of the leader node (appends forwarded to worker 0):

    .venv/bin/python -m bench.raft_queue --workers --count 20000
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
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
from bench.queues import _utf8, connect5, pump, subscribe5  # noqa: E402
from tests.conftest import NodeFactory, free_port  # noqa: E402


def produce(
    port: int, count: int, window: int, rate: float = 0.0, seconds: float = 0.0, worker: str = ""
) -> dict:
    s = (
        on_worker(port, worker)
        if worker
        else connect5(port, f"bench-raft-{os.getpid()}-{time.monotonic_ns()}")
    )
    s.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ)
    head = _utf8("$queue/bench/k")
    payload = b"p" * 64
    sent_at: dict[int, float] = {}
    lat: list[float] = []
    trace: list[tuple[float, float]] = []  # (sent, seconds from t0; latency) of each PUBACKed message
    failed = 0
    sent = acked = 0
    buf = bytearray()
    t0 = time.perf_counter()
    end = t0 + seconds if rate else t0 + 300
    total = int(rate * seconds) if rate else count
    while acked + failed < total and time.perf_counter() < end + 10:
        now = time.perf_counter()
        due = total if not rate else min(total, int((now - t0) * rate) + 1)
        if sent < due and sent - acked - failed < window:
            n = min(200, due - sent, window - (sent - acked - failed))
            frames = []
            for k in range(n):
                pid = (sent + k) % 65535 + 1
                sent_at[pid] = now
                frames.append(_frame(0x32, head + struct.pack(">H", pid) + b"\x00" + payload))
            s.sendall(b"".join(frames))
            sent += n
        for _key, _ in sel.select(timeout=0.0005 if rate else 0.02):
            try:
                data = s.recv(262144)
            except BlockingIOError:
                continue
            if not data:
                raise RuntimeError("connection closed")
            buf += data
            got = time.perf_counter()
            for first, body in _complete(buf):
                if first >> 4 != 4:
                    continue
                pid = struct.unpack_from(">H", body)[0]
                if len(body) > 2 and body[2] >= 0x80:
                    failed += 1
                else:
                    acked += 1
                    at = sent_at.pop(pid, got)
                    lat.append(got - at)
                    trace.append((at - t0, got - at))
    elapsed = time.perf_counter() - t0
    s.close()
    lat.sort()
    out = {"acked": acked, "failed": failed, "rate": round(acked / elapsed)}
    if lat:
        out["p50_ms"] = round(lat[len(lat) // 2] * 1000, 2)
        out["p99_ms"] = round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 2)
        out["max_ms"] = round(lat[-1] * 1000, 2)
    if rate:
        out.update(stalls(trace))
    return out


def on_worker(port: int, worker: str, tries: int = 40):
    """A connection that landed on ``worker`` (``$SYS/broker/worker``, retained) of a node of several
    workers; the others are closed."""
    from bench.queues import _packets

    topic = b"$SYS/broker/worker"
    for _ in range(tries):
        s = connect5(port, f"bench-raft-{os.getpid()}-{time.monotonic_ns()}")
        s.sendall(_frame(0x82, struct.pack(">HB", 1, 0) + _utf8(topic.decode()) + b"\x00"))
        buf = bytearray()
        got = ""
        for first, body in _packets(s, buf):
            if first >> 4 != 3:
                continue
            tlen = struct.unpack_from(">H", body)[0]
            if body[2 : 2 + tlen] != topic:
                continue
            i, plen, mult = 2 + tlen, 0, 1
            while True:  # the properties' length (a variable byte integer)
                b = body[i]
                i += 1
                plen += (b & 0x7F) * mult
                mult *= 128
                if not b & 0x80:
                    break
            got = body[i + plen :].decode()
            break
        if got == worker:
            s.sendall(_frame(0xA2, struct.pack(">HB", 2, 0) + _utf8(topic.decode())))  # UNSUBSCRIBE
            return s
        s.close()
    raise RuntimeError(f"no connection landed on {worker} in {tries} tries")


def stalls(trace: list[tuple[float, float]], over: float = 0.010, gap: float = 0.05) -> dict:
    """The PUBACKs slower than ``over``: how many, and the worst episodes (messages sent less than
    ``gap`` apart): one long stall shows as one episode of many messages, noise as many small ones."""
    episodes: list[list] = []  # [first sent, last sent, worst latency, messages]
    for sent, latency in trace:
        if latency <= over:
            continue
        if episodes and sent - episodes[-1][1] < gap:
            ep = episodes[-1]
            ep[1], ep[2], ep[3] = sent, max(ep[2], latency), ep[3] + 1
        else:
            episodes.append([sent, sent, latency, 1])
    worst = sorted(episodes, key=lambda ep: -ep[2])[:3]
    return {
        f"over_{round(over * 1000)}ms": sum(ep[3] for ep in episodes),
        "episodes": len(episodes),
        "worst": [
            {
                "at_s": round(ep[0], 3),
                "for_ms": round((ep[1] - ep[0]) * 1000),
                "max_ms": round(ep[2] * 1000, 1),
                "msgs": ep[3],
            }
            for ep in worst
        ],
    }


def measured(nodes, fn, *args) -> dict:
    """``fn(*args)`` (a produce), with the node CPU (utime + stime of every node's process tree,
    /proc) per PUBACKed message and the Raft snapshots written meanwhile."""
    from bench import procinfo

    pids = [n.pid for n in nodes]
    snaps = [_snapshots(n) for n in nodes]
    before = procinfo.tree_cpu_s(pids)
    started = time.time()
    out = fn(*args)
    cpu = procinfo.tree_cpu_s(pids) - before
    out["node_cpu_us_per_msg"] = round(cpu / max(1, out["acked"]) * 1e6, 1)
    if snaps[0] is not None:
        out["snapshots_written"] = max(_snapshots(n) - b for n, b in zip(nodes, snaps, strict=True))
        # when (seconds from the phase's start) each node began and ended a snapshot, and the ticks
        # that held a node's hub over 50 ms (raft_tick_slow, logged at most every 10 s): lined up
        # with the slow episodes above
        out["node_events"] = [ev for i, n in enumerate(nodes) for ev in _events(n, i, started)]
    return out


_EVENT = re.compile(
    r"^(\S+Z) \S+ \S+ event=(raft_snapshot_written|raft_tick_slow) .*?"
    r"(?:took_s=([0-9.]+)|held_hub_s=([0-9.]+))"
)


def _events(node, i: int, since: float) -> list[dict]:
    out = []
    try:
        text = node.log_path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        m = _EVENT.match(line)
        if not m:
            continue
        at = (
            datetime.datetime.strptime(m[1], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.UTC).timestamp()
        )
        if at < since:
            continue
        took = float(m[3] or m[4])
        out.append(
            {"node": i, "event": m[2], "from_s": round(at - took - since, 3), "to_s": round(at - since, 3)}
        )
    return out


def _snapshots(node) -> int | None:
    try:
        return _status(node)["snapshots_written"]
    except Exception:
        return None


def _status(node) -> dict:
    return node.http_get("/cluster/raft")[1]["groups"][0]


RAFT_GROUP = """{top}
cluster:
  raft: {{enabled: true, bind_addr: "{me}", peers: {peers}{extra}}}
queues:
  - name: bench
    replication: {{enabled: true, mode: sync, replication_factor: 3, min_in_sync_replicas: 2}}
"""


def raft_group(factory: NodeFactory, raft: str = "", top: str = "") -> list:
    """Three nodes, static Raft peers, of one group holding the replicated queue ``bench`` (sync,
    factor 3, 2 in sync), started side by side; ``raft`` adds ``cluster.raft`` keys (``"k: v"``),
    ``top`` other sections (YAML lines). Returns them once all are ready (the benches of Raft
    measure this group)."""
    peers = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    extra = f", {raft}" if raft else ""
    nodes = [
        factory(
            config_text=RAFT_GROUP.format(top=top, me=p, peers=json.dumps(peers), extra=extra),
            wait_ready=False,
        )
        for p in peers
    ]
    for n in nodes:
        n.wait_ready()
    return nodes


def raft_leader(nodes: list, timeout: float = 20.0):
    """The node that delivers the group (its leader), None when none does within ``timeout``."""
    deadline = time.monotonic() + timeout
    leader = None
    while leader is None and time.monotonic() < deadline:
        leader = next((n for n in nodes if (_status_or_none(n) or {}).get("delivering")), None)
        time.sleep(0.1)
    return leader


def _consumer(port: int, name: str):
    s = connect5(port, name)
    subscribe5(s, "$queue/bench", [("consumer-group", "g"), ("auto-ack", "true")])
    s.setblocking(False)
    return s


def consume(producer_port: int, consumer_ports: list[int], count: int, window: int) -> dict:
    """``count`` QoS 1 publishes (``window`` unacknowledged) to the producer's node, auto-ack
    consumers (one per port, group ``g``) PUBACK each delivery; returns when all are delivered."""
    pub = connect5(producer_port, f"bench-rq-p-{os.getpid()}-{time.monotonic_ns()}")
    subs = [
        _consumer(p, f"bench-rq-c{i}-{os.getpid()}-{time.monotonic_ns()}")
        for i, p in enumerate(consumer_ports)
    ]
    delivered, acked, elapsed, per = pump(pub, subs, "$queue/bench/k", count, window, strict=False, poll=0.02)
    for c in [pub, *subs]:
        c.close()
    return {
        "delivered": delivered,
        "acked": acked,
        "rate": round(delivered / elapsed),
        "per_consumer": sorted(per.values()),
    }


def distribution_cpu(factory, mode: str, count: int, window: int, where: str) -> dict:
    """Three nodes with ``distribution_mode: mode``; the producer on the leader and one auto-ack
    consumer on each follower (``where`` followers) or one on the leader (``where`` leader): the
    node CPU (utime + stime of the three nodes' processes, /proc) per message delivered."""
    from bench import procinfo

    nodes = raft_group(factory, f"distribution_mode: {mode}")
    try:
        deadline = time.monotonic() + 20
        leader = raft_leader(nodes)
        while time.monotonic() < deadline and not all(_status(n)["leader"] for n in nodes):
            time.sleep(0.1)
        followers = [n for n in nodes if n is not leader]
        ports = [n.mqtt_port for n in followers] if where == "followers" else [leader.mqtt_port]
        consume(leader.mqtt_port, ports, 500, window)  # warm up (imports, caches)
        pids = [n.pid for n in nodes]
        before = procinfo.tree_cpu_s(pids)
        per_node_before = [procinfo.tree_cpu_s([n.pid]) for n in nodes]
        out = consume(leader.mqtt_port, ports, count, window)
        cpu = procinfo.tree_cpu_s(pids) - before
        per_node = [
            round((procinfo.tree_cpu_s([n.pid]) - b) / count * 1e6, 1)
            for n, b in zip(nodes, per_node_before, strict=True)
        ]
        out.update(
            cpu_us_per_msg=round(cpu / count * 1e6, 1),
            cpu_us_per_msg_leader=per_node[nodes.index(leader)],
            cpu_us_per_msg_followers=[v for n, v in zip(nodes, per_node, strict=True) if n is not leader],
            entries_applied=_status(leader)["entries_applied"],
        )
        return out
    finally:
        for n in nodes:
            n.stop()


def workers_cpu(factory, count: int, window: int) -> dict:
    """Three nodes of two workers (static peers, no etcd): the producer on worker 0 (the node's Raft
    member, owning the queue) and on worker 1 (each append forwarded to worker 0 over the node's
    Unix socket) of the leader node; node CPU per PUBACKed message, all nodes' processes."""
    nodes = raft_group(factory, top="\nserver: {workers: 2}\nstorage: {type: lmdb}")
    try:
        leader = raft_leader(nodes, 30)
        produce(leader.mqtt_port, 2000, window, worker="w1")  # warm up (imports, the workers' links)
        return {
            w: measured(nodes, produce, leader.mqtt_port, count, window, 0.0, 0.0, w) for w in ("w0", "w1")
        }
    finally:
        for n in nodes:
            n.stop()


def _status_or_none(node) -> dict | None:
    try:
        return _status(node)
    except Exception:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument(
        "--workers",
        action="store_true",
        help="three nodes of two workers: the producer on the Raft worker (w0) and on the other (w1)",
    )
    ap.add_argument(
        "--distribution",
        action="store_true",
        help="node CPU per delivered message for each distribution_mode (consumers on followers)",
    )
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="bench-raft-"))
    factory = NodeFactory(base)
    results = {}
    if args.workers:
        try:
            results = workers_cpu(factory, args.count, args.window)
        finally:
            factory.close()
            shutil.rmtree(base, ignore_errors=True)
        print(json.dumps(results, indent=1))
        return 0
    if args.distribution:
        try:
            results["forward, consumer on the leader"] = distribution_cpu(
                factory, "forward", args.count, args.window, "leader"
            )
            for mode in ("forward", "replicate"):
                results[f"{mode}, consumers on the followers"] = distribution_cpu(
                    factory, mode, args.count, args.window, "followers"
                )
        finally:
            factory.close()
            shutil.rmtree(base, ignore_errors=True)
        print(json.dumps(results, indent=1))
        return 0
    try:
        local = factory(config_text="queues:\n  - name: bench\n")
        results["local"] = {
            "throughput": measured([local], produce, local.mqtt_port, args.count, args.window),
            "paced": measured([local], produce, local.mqtt_port, 0, args.window, args.rate, args.seconds),
        }
        local.stop()
        nodes = raft_group(factory)
        leader = raft_leader(nodes)
        follower = next(n for n in nodes if n is not leader)
        for name, node in (("raft-leader", leader), ("raft-follower", follower)):
            results[name] = {
                "throughput": measured(nodes, produce, node.mqtt_port, args.count, args.window),
                "paced": measured(nodes, produce, node.mqtt_port, 0, args.window, args.rate, args.seconds),
            }
        results["entries_applied"] = _status(leader)["entries_applied"]
    finally:
        factory.close()
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
