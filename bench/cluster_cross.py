"""Cross-node throughput and latency of a 2-node cluster (issue 11), against the same node.

Starts two fluxmq nodes (memory storage, ``cluster.enabled`` with static peers, or with ``--etcd``
peers from etcd membership on a private etcd) and runs
``bench.loadgen`` four ways: throughput (1 publisher -> 1 subscriber, QoS 0 and 1) with the
subscriber on the publisher's node and on the other node, and latency at ``--rate`` msg/s both ways.

Usage::

    python -m bench.cluster_cross [--duration 5] [--rate 1000] [--qos 0,1] [--window 1000] [--etcd] [--sets k=v ...]

Prints the loadgen RESULT lines and a summary: cross-node rate as a ratio of same-node, and
p50/p99 latency in ms.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.brokers import REPO, FluxmqNode, free_port


def wait_peers(node: FluxmqNode, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{node.host}:{node.health_port}/ready", timeout=1) as r:
                body = json.loads(r.read())
                if body.get("mode") == "nominal" and "cluster" in body.get("checks", {}):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("peers not reachable")


def start_etcd(workdir: Path, host: str = "127.0.0.1") -> tuple[subprocess.Popen, str]:
    client, peer = free_port(), free_port()
    url, purl = f"http://{host}:{client}", f"http://{host}:{peer}"
    proc = subprocess.Popen(
        [
            shutil.which("etcd") or "etcd",
            "--name",
            "bench",
            "--data-dir",
            str(workdir / "etcd"),
            "--listen-client-urls",
            url,
            "--advertise-client-urls",
            url,
            "--listen-peer-urls",
            purl,
            "--initial-advertise-peer-urls",
            purl,
            "--initial-cluster",
            f"bench={purl}",
            "--log-level",
            "error",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("etcd did not start")


def loadgen(*args: str) -> dict[str, str]:
    cmd = [sys.executable, "-m", "bench.loadgen", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT")), None)
    if line is None:
        raise RuntimeError(f"loadgen failed: {out.stderr[-1500:]}")
    print(line, flush=True)
    return dict(re.findall(r"(\w+)=(\S+)", line))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--qos", default="0,1")
    p.add_argument("--window", type=int, default=1000, help="loadgen --window (deliveries in flight)")
    p.add_argument("--sets", nargs="*", default=[], help="extra --set k=v for both nodes")
    p.add_argument(
        "--etcd",
        action="store_true",
        help="peers from etcd membership (a private etcd is started) instead of static peers",
    )
    args = p.parse_args(argv)
    ports = {"b1": free_port(), "b2": free_port()}
    peers = ",".join(f"{n}=127.0.0.1:{port}" for n, port in ports.items())
    nodes = []
    etcd = None
    work = Path(tempfile.mkdtemp(prefix="bench-cross-"))
    try:
        if args.etcd:
            etcd, endpoint = start_etcd(work)
            membership = [f"cluster.etcd.endpoints={endpoint}", "cluster.etcd.prefix=/bench/"]
        else:
            membership = [f"cluster.transport.peers={peers}"]
        for name in ports:
            sets = [
                "cluster.enabled=true",
                f"cluster.node_id={name}",
                f"cluster.transport.bind_addr=127.0.0.1:{ports[name]}",
                *membership,
                *args.sets,
            ]
            nodes.append(FluxmqNode(sets=sets).start())
        for node in nodes:
            wait_peers(node)
        a, b = nodes
        pids = ["--pid", str(a.pid), "--pid", str(b.pid)]  # broker_cpu: both nodes' process trees
        summary = []
        for qos in args.qos.split(","):
            common = [
                "--mode",
                "throughput",
                "--port",
                str(a.port),
                "--pubs",
                "1",
                "--subs",
                "1",
                "--qos",
                qos,
                "--duration",
                str(args.duration),
                "--procs",
                "1",
                "--window",
                str(args.window),
                *pids,
            ]
            same = loadgen(*common, "--label", f"same-node-q{qos}")
            cross = loadgen(*common, "--sub-port", str(b.port), "--label", f"cross-node-q{qos}")
            ratio = float(cross["rate"]) / float(same["rate"])
            summary.append(
                f"QoS {qos} 1->1: same-node {float(same['rate']):,.0f}/s (brokers' CPU "
                f"{same['broker_cpu']}), cross-node {float(cross['rate']):,.0f}/s (brokers' CPU "
                f"{cross['broker_cpu']}), ratio {ratio:.2f}, lost {cross.get('lost')}"
            )
        lat = [
            "--mode",
            "latency",
            "--port",
            str(a.port),
            "--rate",
            str(args.rate),
            "--duration",
            str(args.duration),
            "--procs",
            "1",
        ]
        same = loadgen(*lat, "--label", "same-node-latency")
        cross = loadgen(*lat, "--sub-port", str(b.port), "--label", "cross-node-latency")
        for name, r in (("same-node", same), ("cross-node", cross)):
            summary.append(
                f"latency at {args.rate:.0f} msg/s, {name}: p50 {r.get('p50_ms', r.get('p50'))} ms, "
                f"p99 {r.get('p99_ms', r.get('p99'))} ms"
            )
        with urllib.request.urlopen(f"http://127.0.0.1:{a.health_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        found = dict(
            re.findall(r'^fluxmq_cluster_peer_(forwarded_\w+?)(?:_total)?\{peer="b2"\} (\S+)$', text, re.M)
        )
        if found:
            batches, messages = float(found["forwarded_batches"]), float(found["forwarded_messages"])
            summary.append(
                f"b1 -> b2: {messages:,.0f} messages in {batches:,.0f} batches "
                f"({messages / max(batches, 1):.1f} per batch)"
            )
        print("\n".join(summary))
    finally:
        for node in nodes:
            node.cleanup()
        if etcd is not None:
            etcd.kill()
            etcd.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
