"""Durable queues across the nodes of a cluster without Raft: what the hop to the owning node costs.

Each run starts a private etcd (``bench.cluster_cross.start_etcd``) and two fluxmq nodes of one
worker on it (``bench.brokers.FluxmqNode``: ``cluster.enabled``, etcd membership, ``storage.type:
lmdb``, ``storage.sync: batch``, both nodes pinned to ``--broker-cpus``, this generator to
``--gen-cpus``). Node ``a`` starts first and claims every configured queue at its start
(``fluxmq.cluster.queue_nodes``: the first node that needs a queue owns it), which the run checks in
etcd (``queues/{name}/owner`` is ``a``) before it measures; node ``b`` starts once ``a`` is ready.
Each scenario has a queue of its own (``$queue/bench-{scenario}``, ``max_inflight: 1000``) and
one auto-ack consumer group (``consumer-group: g``, ``auto-ack: true``, as in ``bench.queues``):

``local``
    producer and consumer on ``a`` (the owner): no hop.
``append-hop``
    producer on ``b``, consumer on ``a``: each append is an op to ``a``, PUBACKed once ``a``
    committed it.
``deliver-hop``
    producer on ``a``, consumer on ``b``: the consumer is a remote member of ``a``'s group; each
    delivery goes ``a`` -> ``b`` and each PUBACK back.
``both-hops``
    producer and consumer on ``b``: both of the above.
``pubsub-cross``
    for reference, plain QoS 1 pub/sub across the nodes (publisher on ``b``, subscriber on ``a``).
``alone``
    for reference, ``local`` on a third node started beside them without ``cluster``, the same
    storage and queues, pinned alike (what the owner's own path costs outside a cluster).

The generator is ``bench.queues.run_once`` (``bench.queues.pump``: ``--count`` QoS 1 PUBLISHes
with ``--window`` unacknowledged, numbered payloads so that a delivery seen twice is counted). The
rate is deliveries per second from the first PUBLISH to the last delivery. Every run first warms
each path up with ``--warmup`` messages on queues of their own (``warm-{scenario}``), then
measures the scenarios back to back; the table gives each scenario's median rate over
``--runs``, each run's rate over the ``local`` rate of the same run (median; min-max), the nodes'
CPU per delivery (utime + stime of each node's processes, /proc), and the duplicates. A scenario
that stalls (nothing delivered for 300 s: ``pump``'s bound) is reported with what it got, not
retried.

Usage::

    .venv/bin/python -m bench.cluster_queues                        # 3 runs, 20,000 messages each
    .venv/bin/python -m bench.cluster_queues --runs 1 --count 5000 --scenarios local,append-hop
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"  # noqa: A001

from bench import procinfo  # noqa: E402
from bench.brokers import FluxmqNode, free_port  # noqa: E402
from bench.cluster_cross import start_etcd, wait_peers  # noqa: E402
from bench.queues import run_once  # noqa: E402

PREFIX = "/bench/"
#: name -> (the producer's node, the consumer's node, a durable queue (else plain QoS 1 pub/sub))
SCENARIOS: dict[str, tuple[str, str, bool]] = {
    "local": ("a", "a", True),
    "append-hop": ("b", "a", True),
    "deliver-hop": ("a", "b", True),
    "both-hops": ("b", "b", True),
    "pubsub-cross": ("b", "a", False),
    "alone": ("alone", "alone", True),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.cluster_queues", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--count", type=int, default=20_000)
    p.add_argument("--window", type=int, default=1000)
    p.add_argument(
        "--warmup", type=int, default=1000, help="messages per scenario before measuring (0: none)"
    )
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="a comma-separated subset, in order")
    p.add_argument("--sync", default="batch", choices=["none", "batch", "always"])
    p.add_argument("--broker-cpus", default="1", help="both nodes (taskset -c; empty: not pinned)")
    p.add_argument("--gen-cpus", default="0")
    p.add_argument("--json", action="store_true", help="also print every run's figures as JSON")
    args = p.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenarios {unknown}: choose from {', '.join(SCENARIOS)}")
    if "local" not in args.scenarios:
        p.error("the scenarios must include local (every ratio is to it)")
    return args


def start_nodes(endpoint: str, queues: list[str], args: argparse.Namespace) -> dict[str, FluxmqNode]:
    """Nodes ``a`` then ``b`` (``b`` started once ``a`` is ready: ``a`` claims every queue)."""
    config = json.dumps([{"name": q, "max_inflight": 1000} for q in queues])
    nodes: dict[str, FluxmqNode] = {}
    try:
        for name in ("a", "b"):
            sets = [
                "cluster.enabled=true",
                f"cluster.node_id={name}",
                f"cluster.transport.bind_addr=127.0.0.1:{free_port()}",
                f"cluster.etcd.endpoints={endpoint}",
                f"cluster.etcd.prefix={PREFIX}",
                "storage.type=lmdb",
                f"storage.sync={args.sync}",
                f"queues={config}",
            ]
            nodes[name] = FluxmqNode(cpus=args.broker_cpus or None, max_inflight=1000, sets=sets).start()
        for node in nodes.values():
            wait_peers(node)
        return nodes
    except BaseException:
        for node in nodes.values():
            node.cleanup()
        raise


def check_owner(endpoint: str, queues: list[str], owner: str = "a") -> None:
    """Every queue recorded in etcd as ``owner``'s; RuntimeError naming those that are not."""
    from tests.etcd import etcd_get  # noqa: PLC0415 - the tests' etcd gateway reader

    got = {q: etcd_get(endpoint, f"{PREFIX}queues/{q}/owner") for q in queues}
    wrong = {q: v for q, v in got.items() if v != owner.encode()}
    if wrong:
        raise RuntimeError(f"queues not owned by node {owner}: {wrong}")


def start_alone(queues: list[str], args: argparse.Namespace) -> FluxmqNode:
    """A node without ``cluster``: the same storage, queues and pinning as ``start_nodes``'."""
    config = json.dumps([{"name": q, "max_inflight": 1000} for q in queues])
    sets = ["storage.type=lmdb", f"storage.sync={args.sync}", f"queues={config}"]
    return FluxmqNode(cpus=args.broker_cpus or None, max_inflight=1000, sets=sets).start()


def scenario(nodes: dict[str, FluxmqNode], name: str, prefix: str, count: int, window: int) -> dict:
    """One scenario on queue (or topic) ``{prefix}-{name}``: its rate, each node's CPU per delivery
    (us), the deliveries seen twice, or the error that ended it."""
    producer, consumer, queue = SCENARIOS[name]
    if queue:
        topic = filter = f"$queue/{prefix}-{name}"
    else:
        topic = filter = f"{prefix}/{name}"
    pids = {n: [node.pid] for n, node in nodes.items()}
    before = {n: procinfo.tree_cpu_s(p) for n, p in pids.items()}
    seen: set[bytes] = set()
    out: dict = {}
    try:
        out["rate"] = run_once(
            nodes[producer].port, topic, filter, 1, count, window, queue, nodes[consumer].port, seen
        )
        out["dups"] = count - len(seen)
    except (RuntimeError, OSError) as exc:
        out["error"] = f"{exc} ({len(seen)} distinct)"
    for n, p in pids.items():
        out[f"cpu_{n}"] = (procinfo.tree_cpu_s(p) - before[n]) / count * 1e6
    return out


def one_run(args: argparse.Namespace) -> dict[str, dict]:
    """A fresh etcd and two nodes; the warm-up, then every scenario once."""
    work = Path(tempfile.mkdtemp(prefix="bench-cqueues-"))
    etcd, endpoint = start_etcd(work)
    try:
        queued = [s for s in args.scenarios if SCENARIOS[s][2]]
        queues = [f"{p}-{s}" for p in ("bench", "warm") for s in queued]
        nodes = start_nodes(endpoint, queues, args)
        try:
            check_owner(endpoint, queues)
            if "alone" in args.scenarios:
                nodes["alone"] = start_alone(queues, args)
            if args.warmup:
                for name in args.scenarios:
                    warm = scenario(nodes, name, "warm", args.warmup, args.window)
                    if "error" in warm:
                        print(f"warm-up {name}: {warm['error']}", file=sys.stderr)
            return {name: scenario(nodes, name, "bench", args.count, args.window) for name in args.scenarios}
        finally:
            for node in nodes.values():
                node.cleanup()
    finally:
        etcd.kill()
        etcd.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def table(runs: list[dict[str, dict]], count: int, sync: str) -> list[str]:
    """The markdown table of ``runs`` (each ``one_run``'s result): per scenario the median rate,
    each run's rate over that run's ``local`` (median; min-max), the median CPU us per delivery of
    each node of the scenario (``a`` and ``b``, or ``alone``) and their sum, the duplicates of all
    runs and the errors."""
    names = list(runs[0])
    lines = [
        f"| scenario (sync={sync}, {count:,} msgs, median of {len(runs)}) | deliveries/s "
        "| vs local, same run (median; min-max) | node CPU us/msg (median) | duplicates | errors |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name in names:
        got = [r[name] for r in runs]
        rates = [g["rate"] for g in got if "rate" in g]
        ratios = [
            r[name]["rate"] / r["local"]["rate"] for r in runs if "rate" in r[name] and "rate" in r["local"]
        ]
        which = ["alone"] if SCENARIOS[name][0] == "alone" else ["a", "b"]
        cpu = " + ".join(f"{n} {statistics.median(g[f'cpu_{n}'] for g in got):.1f}" for n in which)
        if len(which) > 1:
            cpu += f" = {statistics.median(sum(g[f'cpu_{n}'] for n in which) for g in got):.1f}"
        errors = "; ".join(g["error"] for g in got if "error" in g) or "-"
        rate = f"{statistics.median(rates):,.0f}" if rates else "-"
        ratio = f"{statistics.median(ratios):.2f}; {min(ratios):.2f}-{max(ratios):.2f}" if ratios else "-"
        dups = sum(g.get("dups", 0) for g in got)
        lines.append(f"| {name} | {rate} | {ratio} | {cpu} | {dups} | {errors} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.gen_cpus and shutil.which("taskset"):
        os.sched_setaffinity(0, {int(c) for c in args.gen_cpus.split(",")})
    runs = []
    for i in range(args.runs):
        load = os.getloadavg()[0]
        started = time.strftime("%H:%M:%S", time.gmtime())
        runs.append(one_run(args))
        summary = ", ".join(f"{n} {r.get('rate', 0):,.0f}/s" for n, r in runs[-1].items())
        print(
            f"run {i + 1} ({started} UTC, load {load:.2f} -> {os.getloadavg()[0]:.2f}): {summary}",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(runs, indent=1))
    print("\n".join(table(runs, args.count, args.sync)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
