"""Persistent QoS 1 as a share of in-memory QoS 1, measured back-to-back with mqttload (issue 16).

Each repeat runs two fresh fluxmq nodes one after the other (broker pinned to ``--broker-cpus``,
generator to ``--gen-cpus``, like ``bench/compare``):

``memory``
    ``storage.type: memory``, ``mqttload --mode throughput --qos 1 --inflight 100`` (clean
    sessions): the in-memory QoS 1 figure of ``bench/compare``'s ``qos1`` scenario;
``lmdb``
    ``storage.type: lmdb``, ``storage.sync: batch``, the same load with ``--persistent`` (3.1.1
    clean session 0): every delivery's in-flight state goes through the store.

The order inside a repeat alternates (memory first, then lmdb first), so a drift of the machine's
load hits both alike. Each pair gives a ratio lmdb / memory, of the rates and of the deliveries per
second of broker CPU (steadier when other work competes for the broker's CPU); the table shows
every run with the worker's CPU share and the other processes' CPU (mqttload's ``other_cpu``: the
machine is shared), and the median ratios.

Usage::

    .venv/bin/python -m bench.persist_ratio              # 3 repeats (~1 minute)
    .venv/bin/python -m bench.persist_ratio --runs 5 --count 500000
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"  # noqa: A001

from bench import procinfo  # noqa: E402
from bench.brokers import FluxmqNode  # noqa: E402
from bench.compare import ensure_mqttload  # noqa: E402
from bench.loadgen import parse_result_line  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "bench" / "out"
CONFIGS = {
    "memory": (["storage.type=memory"], []),
    "lmdb": (
        ["storage.type=lmdb", "storage.sync=batch", "storage.max_queued_messages=1000000"],
        ["--persistent"],
    ),
}


def per_cpu(res: dict[str, str]) -> float:
    """Deliveries per second of broker CPU (rate / the worker's CPU share)."""
    cpu = float(res["broker_cpu"].rstrip("%")) or 1.0
    return float(res["rate"]) * 100.0 / cpu


def cpu_us(res: dict[str, str]) -> float:
    """Broker CPU microseconds per delivery (the worker's CPU share over the rate)."""
    return float(res["broker_cpu"].rstrip("%")) / 100.0 / max(float(res["rate"]), 1.0) * 1e6


def run_one(name: str, args: argparse.Namespace) -> dict[str, str]:
    sets, extra = CONFIGS[name]
    node = FluxmqNode(cpus=args.broker_cpus or None, sets=sets + list(args.set))
    node.start(timeout=60)
    try:
        # mqttload reports the CPU of one process: the worker (fluxmq-node is an arbiter plus it).
        pids = procinfo.tree(node.pid)
        broker_pid = pids[-1] if pids else node.pid
        pin = ["taskset", "-c", args.gen_cpus] if args.gen_cpus and shutil.which("taskset") else []
        cmd = pin + [
            args.mqttload,
            "--mode",
            "throughput",
            "--qos",
            "1",
            "--inflight",
            "100",
            "--count",
            str(args.count),
            "--duration",
            str(args.duration),
            "--host",
            "127.0.0.1",
            "--port",
            str(node.port),
            "--pid",
            str(broker_pid),
            "--label",
            name,
            "--timeout",
            "90",
        ]
        p = subprocess.run(cmd + extra, cwd=REPO, capture_output=True, text=True, timeout=150)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            raise RuntimeError(f"mqttload gave no RESULT (exit {p.returncode}): {p.stderr[-500:]}")
        res = parse_result_line(lines[-1])
        if res.get("lost", "0") != "0" or res.get("dups", "0") != "0" or "error" in res:
            raise RuntimeError(f"mqttload run not clean: {lines[-1]}")
        return res
    finally:
        node.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.persist_ratio", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--count", type=int, default=250_000)
    p.add_argument("--duration", type=float, default=5)
    p.add_argument("--broker-cpus", default="1")
    p.add_argument("--gen-cpus", default="0")
    p.add_argument(
        "--mqttload", default=None, help="path of a built mqttload (default: build into bench/out)"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra fluxmq-node --set")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each run wait up to SECONDS for other load below --quiet-cpus",
    )
    p.add_argument("--quiet-cpus", type=float, default=0.5)
    args = p.parse_args(argv)
    args.mqttload = ensure_mqttload(args.mqttload)
    rows = []
    ratios: list[float] = []
    cpu_ratios: list[float] = []
    for run in range(args.runs):
        order = ["memory", "lmdb"] if run % 2 == 0 else ["lmdb", "memory"]
        got = {}
        for name in order:
            if args.wait_quiet > 0:
                procinfo.wait_quiet(args.quiet_cpus, args.wait_quiet)
            res = run_one(name, args)
            got[name] = res
            print(
                f"run {run + 1} {name:6} rate {res['rate']:>8} broker_cpu {res['broker_cpu']:>5} "
                f"other_cpu {res['other_cpu']:>5}",
                file=sys.stderr,
                flush=True,
            )
        ratio = float(got["lmdb"]["rate"]) / float(got["memory"]["rate"])
        ratios.append(ratio)
        cpu_ratio = per_cpu(got["lmdb"]) / per_cpu(got["memory"])
        cpu_ratios.append(cpu_ratio)
        rows.append((run + 1, got, ratio, cpu_ratio))
    lines = [
        f"mqttload QoS 1, 1 -> 1, 100 in flight, 64-byte payloads, {args.count} msgs or {args.duration:g} s; "
        f"broker on CPU {args.broker_cpus}, generator on CPU {args.gen_cpus}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "| repeat | in-memory QoS 1 (deliveries/s) | broker CPU | us/delivery | other | persistent LMDB "
        "batch (deliveries/s) | broker CPU | us/delivery | other | ratio | ratio per broker CPU-s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run, got, ratio, cpu_ratio in rows:
        m, d = got["memory"], got["lmdb"]
        lines.append(
            f"| {run} | {float(m['rate']):,.0f} | {m['broker_cpu']} | {cpu_us(m):.1f} | {m['other_cpu']} | "
            f"{float(d['rate']):,.0f} | {d['broker_cpu']} | {cpu_us(d):.1f} | {d['other_cpu']} | "
            f"{ratio:.0%} | {cpu_ratio:.0%} |"
        )
    lines.append(
        f"| median | | | | | | | | | **{statistics.median(ratios):.0%}** | "
        f"**{statistics.median(cpu_ratios):.0%}** |"
    )
    table = "\n".join(lines) + "\n"
    print(table)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / f"persist-ratio-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
