"""Run fluxmq and Mosquitto side by side under the same load and print the table with ratios.

Usage (from the repository root)::

    bench/compare                      # every scenario, 3 runs each, both brokers (~4-7 min)
    bench/compare --quick              # 1 run, fewer messages (~1-2 min)
    bench/compare --scenario fanout --scenario latency
    bench/compare --brokers mosquitto --generator mqttload   # cross-check with shared/tools/mqttload.c

Each run starts a fresh broker on a free 127.0.0.1 port (Mosquitto from a generated config;
fluxmq-node from a generated YAML), pins it with ``taskset`` (broker on CPU 1, generator on CPU 0
by default), runs one bounded generator scenario against it, and stops it again.  Runs alternate
between the brokers so that noise from other work on the machine hits both alike.  The Markdown
table (median of the runs, ratio fluxmq / Mosquitto, target) goes to stdout and to
``bench/out/compare-<timestamp>.md``, with every run's raw figures (also as JSON beside it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/compare.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"  # noqa: A001

from bench import procinfo  # noqa: E402
from bench.brokers import REPO, BrokerError, BrokerProcess, FluxmqNode, Mosquitto  # noqa: E402
from bench.loadgen import parse_result_line  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "out"
MQTTLOAD_SRC = REPO.parent / "shared" / "tools" / "mqttload.c"
HOLD_CONNS = 50_000


@dataclass
class Metric:
    """One table row taken from a scenario's RESULT line."""

    key: str  # RESULT key
    title: str
    unit: str
    higher_is_better: bool
    target: str  # human text
    # how the target is judged: "mosq" (>= / <= Mosquitto), "abs:<number>",
    # "frac_of:<fraction>:<scenario>:<key>" (at least that fraction of another row's fluxmq median)
    rule: str
    fmt: str = "{:,.0f}"


@dataclass
class Scenario:
    """One generator invocation and the rows it feeds."""

    name: str
    title: str
    args: list[str]
    quick_args: list[str]
    metrics: list[Metric]
    timeout: float
    brokers: tuple[str, ...] = ("mosquitto", "fluxmq")
    fluxmq_sets: list[str] = field(default_factory=list)
    loadgen_only: list[str] = field(default_factory=list)  # generator options mqttload lacks
    needs_nofile: int = 0


def _tp(title: str, unit: str = "deliveries/s") -> Metric:
    return Metric("rate", title, unit, True, ">= Mosquitto", "mosq")


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario(
            "qos0",
            "QoS 0, 1 publisher -> 1 subscriber",
            ["--mode", "throughput", "--qos", "0", "--count", "500000", "--duration", "5"],
            ["--mode", "throughput", "--qos", "0", "--count", "100000", "--duration", "2"],
            [_tp("QoS 0, 1 publisher -> 1 subscriber")],
            60,
        ),
        Scenario(
            "qos1",
            "QoS 1, 1 -> 1, 100 in flight",
            [
                "--mode",
                "throughput",
                "--qos",
                "1",
                "--inflight",
                "100",
                "--count",
                "250000",
                "--duration",
                "5",
            ],
            [
                "--mode",
                "throughput",
                "--qos",
                "1",
                "--inflight",
                "100",
                "--count",
                "50000",
                "--duration",
                "2",
            ],
            [_tp("QoS 1, 1 -> 1, 100 in flight")],
            60,
        ),
        Scenario(
            "fanout",
            "fan-out 1 -> 100, QoS 0",
            ["--mode", "fanout", "--subs", "100", "--count", "10000", "--duration", "5"],
            ["--mode", "fanout", "--subs", "100", "--count", "2000", "--duration", "2"],
            [_tp("fan-out 1 -> 100, QoS 0")],
            60,
        ),
        Scenario(
            "fanin",
            "fan-in 100 -> 1 (wildcard), QoS 0",
            ["--mode", "fanin", "--pubs", "100", "--count", "500000", "--duration", "5"],
            ["--mode", "fanin", "--pubs", "100", "--count", "100000", "--duration", "2"],
            [_tp("fan-in 100 -> 1 (wildcard), QoS 0")],
            60,
        ),
        Scenario(
            "idle",
            "10,000 idle connections",
            ["--mode", "conn", "--conns", "10000", "--concurrency", "200", "--hold", "1"],
            ["--mode", "conn", "--conns", "10000", "--concurrency", "200", "--hold", "0.5"],
            [
                Metric(
                    "per_conn_bytes",
                    "10,000 idle connections, broker memory per connection",
                    "B",
                    False,
                    "<= 6 KB (6,144 B)",
                    "abs:6144",
                ),
                Metric(
                    "conn_rate",
                    "connect rate (10,000 connections, 200 in progress)",
                    "conn/s",
                    True,
                    ">= 5,000/s",
                    "abs:5000",
                ),
            ],
            90,
            needs_nofile=10_000 + 100,
        ),  # fmt: skip
        Scenario(
            "latency",
            "latency at 1,000 msg/s",
            ["--mode", "latency", "--rate", "1000", "--duration", "5"],
            ["--mode", "latency", "--rate", "1000", "--duration", "2"],
            [
                Metric("p99_ms", "latency p99 at 1,000 msg/s", "ms", False, "<= Mosquitto", "mosq", "{:.3f}"),
                Metric("p50_ms", "latency p50 at 1,000 msg/s", "ms", False, "(info)", "", "{:.3f}"),
            ],
            60,
        ),
        Scenario(
            "hold50k",
            "50,000 connections held",
            ["--mode", "conn", "--conns", str(HOLD_CONNS), "--concurrency", "500", "--hold", "2"],
            ["--mode", "conn", "--conns", str(HOLD_CONNS), "--concurrency", "500", "--hold", "1"],
            [
                Metric(
                    "alive",
                    "50,000 connections held (answering PINGREQ)",
                    "conns",
                    True,
                    ">= 50,000",
                    f"abs:{HOLD_CONNS}",
                )
            ],
            240,
            needs_nofile=HOLD_CONNS + 100,
        ),  # fmt: skip
        Scenario(
            "qos1lmdb",
            "persistent QoS 1 (LMDB), 1 -> 1, 100 in flight",
            [
                "--mode",
                "throughput",
                "--qos",
                "1",
                "--inflight",
                "100",
                "--count",
                "250000",
                "--duration",
                "5",
                "--persistent",
            ],
            [
                "--mode",
                "throughput",
                "--qos",
                "1",
                "--inflight",
                "100",
                "--count",
                "50000",
                "--duration",
                "2",
                "--persistent",
            ],
            [
                Metric(
                    "rate",
                    "persistent QoS 1 (LMDB), 1 -> 1, 100 in flight",
                    "deliveries/s",
                    True,
                    ">= 3/4 of fluxmq in-memory QoS 1",
                    "frac_of:0.75:qos1:rate",
                )
            ],
            90,
            brokers=("fluxmq",),
            fluxmq_sets=["storage.type=lmdb", "storage.sync=batch"],
        ),  # fmt: skip
    ]
}
DEFAULT_SCENARIOS = ["qos0", "qos1", "fanout", "fanin", "idle", "latency", "hold50k", "qos1lmdb"]


# ------------------------------------------------------------------------------ running


def ensure_mqttload(path: str | None) -> str:
    """Path of a built mqttload: ``path`` if given, else build shared/tools/mqttload.c into bench/out/."""
    if path:
        return path
    out = OUT_DIR / "mqttload"
    if out.exists() and (not MQTTLOAD_SRC.exists() or out.stat().st_mtime >= MQTTLOAD_SRC.stat().st_mtime):
        return str(out)
    if not MQTTLOAD_SRC.exists() or shutil.which("gcc") is None:
        raise SystemExit(f"--generator mqttload needs --mqttload PATH (or gcc and {MQTTLOAD_SRC})")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(MQTTLOAD_SRC)], check=True)
    return str(out)


def placement(args: argparse.Namespace, sc: Scenario) -> tuple[str, str]:
    """(broker CPUs, generator CPUs) of a scenario's runs: ``--latency-cpus`` puts both on the same
    CPUs for the latency scenario (no wake-up of the broker's idle vCPU in each sample: see
    bench/README.rst, "Latency: the two modes"), every other scenario keeps them apart."""
    if sc.name == "latency" and getattr(args, "latency_cpus", ""):
        return args.latency_cpus, args.latency_cpus
    return args.broker_cpus, args.gen_cpus


def generator_command(args: argparse.Namespace, sc: Scenario, broker: BrokerProcess, run_args: list[str],
                      label: str) -> list[str]:  # fmt: skip
    """The pinned generator command line for one run."""
    gen_cpus = placement(args, sc)[1]
    pin = ["taskset", "-c", gen_cpus] if gen_cpus else []
    # mqttload reads one PID's CPU (the worker, not the idle arbiter); loadgen sums the tree.
    pid = broker.cpu_pid if args.generator == "mqttload" else broker.pid
    common = ["--host", "127.0.0.1", "--port", str(broker.port), "--pid", str(pid), "--label", label,
              "--timeout", str(int(sc.timeout))]  # fmt: skip
    if args.generator == "mqttload":
        return pin + [args.mqttload] + run_args + common
    extra = ["--reader", args.reader] + (["--procs", str(args.procs)] if args.procs else []) + sc.loadgen_only
    return pin + [sys.executable, "-m", "bench.loadgen"] + run_args + common + extra


def start_broker(name: str, args: argparse.Namespace, sc: Scenario) -> BrokerProcess:
    """A fresh, ready broker for one run."""
    broker_cpus = placement(args, sc)[0]
    if name == "mosquitto":
        b: BrokerProcess = Mosquitto(cpus=broker_cpus)
    else:
        b = FluxmqNode(cpus=broker_cpus, sets=list(sc.fluxmq_sets) + list(args.fluxmq_set))
    try:
        return b.start(timeout=60)
    except BaseException:
        b.cleanup()
        raise


def run_one(args: argparse.Namespace, sc: Scenario, broker_name: str, run: int, log: Any) -> dict[str, Any]:
    """One generator run against a fresh broker; returns the parsed RESULT (plus ``error`` on failure)."""
    label = f"{sc.name}-{broker_name}-{run}"
    quiet = {}
    if args.wait_quiet > 0:
        waited, busy = procinfo.wait_quiet(args.quiet_cpus, args.wait_quiet)
        quiet = {"waited_s": round(waited, 1), "busy_before": round(busy, 2)}
    try:
        broker = start_broker(broker_name, args, sc)
    except BrokerError as e:
        log.write(f"\n### {label}: broker failed to start\n{e}\n")
        return {"error": "broker_start", "detail": str(e)[:300], **quiet}
    run_args = sc.quick_args if args.quick else sc.args
    try:
        cmd = generator_command(args, sc, broker, run_args, label)
        log.write(f"\n### {label}\n$ {' '.join(cmd)}\n")
        log.flush()
        t0 = time.monotonic()
        try:
            p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=sc.timeout + 60)
            out, err, rc = p.stdout, p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:  # subprocess.run killed its own child
            out, err, rc = (e.stdout or b"").decode(), (e.stderr or b"").decode(), -1
        log.write(err + out + f"(exit {rc}, {time.monotonic() - t0:.1f} s)\n")
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        res: dict[str, Any] = parse_result_line(lines[-1]) if lines else {"error": f"no_result_exit_{rc}"}
        res.update(quiet)
        if broker.proc is not None and broker.proc.poll() is not None:
            res.setdefault("error", f"broker_exited_{broker.proc.returncode}")
            log.write(f"broker output:\n{broker.log_tail()}\n")
        return res
    finally:
        broker.cleanup()


def _num(v: Any) -> float | None:
    try:
        return float(str(v).rstrip("%"))
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------ report


def cell(values: list[float], fmt: str) -> str:
    """Median of the values, formatted."""
    return fmt.format(statistics.median(values)) if values else "-"


def metric_values(runs: list[dict[str, Any]], key: str) -> list[float]:
    """The metric from every run that finished without error."""
    out = []
    for r in runs:
        if r.get("error"):
            continue
        v = _num(r.get(key))
        if v is not None and v >= 0:
            out.append(v)
    return out


def _cell_text(text: str, limit: int = 200) -> str:
    """Text made safe for one Markdown table cell."""
    return " ".join(str(text).replace("|", "/").split())[-limit:]


def _reason(detail: str) -> str:
    """The broker's own error text from a start failure, shortened (e.g. an unsupported config value)."""
    i = detail.find('error="')
    if i < 0:
        return ""
    text = detail[i + 7 :].split('"', 1)[0]
    return f" ({text[-160:]})"


def run_notes(runs: list[dict[str, Any]]) -> str:
    """Loss, duplicates, errors, generator-bound or noisy runs, summarized."""
    notes = []
    lost = sum(int(_num(r.get("lost")) or 0) for r in runs)
    dups = sum(int(_num(r.get("dups")) or 0) for r in runs)
    errs = sorted({str(r["error"]) + _reason(r.get("detail", "")) for r in runs if r.get("error")})
    if lost:
        notes.append(f"LOST {lost:,}")
    if dups:
        notes.append(f"DUPS {dups:,}")
    if errs:
        notes.append("error: " + ", ".join(errs))
    if any((_num(r.get("gen_cpu")) or 0) >= 90 for r in runs):
        notes.append("generator near 100% CPU")
    if any((_num(r.get("other_cpu")) or 0) >= 25 for r in runs):
        notes.append("other load on the machine")
    return "; ".join(notes)


def judge(metric: Metric, flux: float | None, mosq: float | None, results: dict) -> str:
    """'yes' / 'no' / '' for a fluxmq figure against the metric's target."""
    if flux is None or not metric.rule:
        return ""
    if metric.rule == "mosq":
        if mosq is None:
            return ""
        ok = flux >= mosq if metric.higher_is_better else flux <= mosq
    elif metric.rule.startswith("abs:"):
        lim = float(metric.rule[4:])
        ok = flux >= lim if metric.higher_is_better else flux <= lim
    elif metric.rule.startswith("frac_of:"):
        _, frac, sname, key = metric.rule.split(":")
        base = metric_values(results.get(sname, {}).get("fluxmq", []), key)
        if not base:
            return ""
        ok = flux >= statistics.median(base) * float(frac)
    else:
        return ""
    return "yes" if ok else "no"


def per_cpu_values(runs: list[dict[str, Any]]) -> list[float]:
    """Deliveries per broker CPU-second of every good throughput run."""
    out = []
    for r in runs:
        rate, cpu = _num(r.get("rate")), _num(r.get("broker_cpu"))
        if (
            not r.get("error")
            and rate
            and cpu
            and cpu > 0
            and "deliveries" in r
            and r.get("mode") != "latency"
        ):
            out.append(rate * 100.0 / cpu)
    return out


def efficiency_rows(results: dict[str, dict[str, Any]]) -> list[str]:
    """Table rows of deliveries per broker CPU-second for the throughput scenarios."""
    rows = []
    for name, per_broker in results.items():
        sc = SCENARIOS[name]
        if sc.metrics[0].key != "rate":
            continue
        mv = per_cpu_values(per_broker.get("mosquitto", []))
        fv = per_cpu_values(per_broker.get("fluxmq", []))
        if not mv and not fv:
            continue
        ratio = f"{statistics.median(fv) / statistics.median(mv):.2f}x" if mv and fv else ""
        rows.append(f"| {sc.title} | {cell(mv, '{:,.0f}')} | {cell(fv, '{:,.0f}')} | {ratio} |")
    return rows


def render(args: argparse.Namespace, meta: dict[str, str], results: dict[str, dict[str, list[dict]]],
           versions: dict[str, str]) -> str:  # fmt: skip
    """The Markdown report: summary table, then every run."""
    mname = f"Mosquitto {versions.get('mosquitto', '?')}"
    fname = f"fluxmq {versions.get('fluxmq', '?')}"
    lines = [
        f"# fluxmq vs Mosquitto, {meta['started']}",
        "",
        f"- machine: {meta['nproc']} CPUs ({meta['cpu']}), {meta['kernel']}; load average at start "
        f"{meta['loadavg']}, at end {meta.get('loadavg_end', '?')}",
        f"- method: broker pinned to CPU {args.broker_cpus or '-'}, generator to CPU {args.gen_cpus or '-'} "
        + (f"(latency: both on CPU {args.latency_cpus}) " if getattr(args, "latency_cpus", "") else "")
        + f"({meta['generator']}); 64-byte payloads; {'quick: ' if args.quick else ''}median of {args.runs} "
        f"run(s); a fresh broker per run, brokers alternating; deliveries per second end to end with loss "
        f"and duplicates checked per publisher"
        + (
            f"; each run waited up to {args.wait_quiet:.0f} s for other load <= {args.quiet_cpus} CPU"
            if args.wait_quiet
            else ""
        ),
        f"- git: {meta.get('git', '?')}; command: `{meta['command']}`",
        "",
        f"| scenario | {mname} | {fname} | fluxmq / Mosquitto | target | met | notes |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for name, per_broker in results.items():
        sc = SCENARIOS[name]
        for m in sc.metrics:
            mv = metric_values(per_broker.get("mosquitto", []), m.key)
            fv = metric_values(per_broker.get("fluxmq", []), m.key)
            mmed = statistics.median(mv) if mv else None
            fmed = statistics.median(fv) if fv else None
            if "mosquitto" not in sc.brokers:
                mcell = "n/a"
            else:
                mcell = cell(mv, m.fmt) if mv else ("not run" if "mosquitto" not in per_broker else "error")
            if "fluxmq" not in per_broker:
                fcell = "not run"
            else:
                fcell = cell(fv, m.fmt) if fv else "error"
            ratio = f"{fmed / mmed:.2f}x" if fmed is not None and mmed else ""
            notes = []
            for b in ("mosquitto", "fluxmq"):
                n = run_notes(per_broker.get(b, []))
                if n:
                    notes.append(f"{b}: {n}")
            skip = per_broker.get("_skipped")
            if skip:
                mcell = fcell = "skipped"
                notes = [skip]
            unit = f" ({m.unit})" if m.unit else ""
            lines.append(
                f"| {m.title}{unit} | {mcell} | {fcell} | {ratio} | {m.target} | "
                f"{judge(m, fmed, mmed, results)} | {'; '.join(notes)} |"
            )
    eff = efficiency_rows(results)
    if eff:
        lines += [
            "",
            "Deliveries per second of broker CPU (rate / broker CPU share; less sensitive to other load on "
            "the machine than the rates above, but blind to a broker that idles while waiting):",
            "",
            f"| scenario | {mname} | {fname} | fluxmq / Mosquitto |",
            "|---|---:|---:|---:|",
        ] + eff
    lines += [
        "",
        "## Runs",
        "",
        "| run | value(s) | msgs | deliveries | lost | dups | broker CPU | generator CPU | other procs | "
        "busy before | error |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, per_broker in results.items():
        sc = SCENARIOS[name]
        for b, runs in per_broker.items():
            if b.startswith("_"):
                continue
            for i, r in enumerate(runs, 1):
                vals = ", ".join(f"{m.key}={r.get(m.key, '-')}" for m in sc.metrics)
                pc = per_cpu_values([r])
                if pc:
                    vals += f" ({pc[0]:,.0f} per broker CPU-s)"
                lines.append(
                    f"| {name} {b} #{i} | {vals} | {r.get('msgs', r.get('ok', '-'))} | "
                    f"{r.get('deliveries', r.get('alive', '-'))} | {r.get('lost', '-')} | {r.get('dups', '-')} | "
                    f"{r.get('broker_cpu', '-')} | {r.get('gen_cpu', '-')} | {r.get('other_cpu', '-')} | "
                    f"{r.get('busy_before', '-')} | {r.get('error', '')} {_cell_text(r.get('detail', ''))} |"
                )
    lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="bench/compare", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--scenario",
        action="append",
        default=[],
        choices=sorted(SCENARIOS),
        help=f"run only this scenario (repeatable; default: {' '.join(DEFAULT_SCENARIOS)})",
    )
    p.add_argument("--quick", action="store_true", help="1 run per scenario and broker, fewer messages")
    p.add_argument("--runs", type=int, default=None, help="runs per scenario and broker (default 3, quick 1)")
    p.add_argument("--brokers", default="mosquitto,fluxmq", help="comma list of mosquitto, fluxmq")
    p.add_argument("--broker-cpus", default="1", help="taskset CPU list for the broker ('' = no pinning)")
    p.add_argument("--gen-cpus", default="0", help="taskset CPU list for the generator ('' = no pinning)")
    p.add_argument(
        "--no-pin", action="store_true", help="do not pin (same as --broker-cpus '' --gen-cpus '')"
    )
    p.add_argument(
        "--latency-cpus",
        default="",
        help="latency scenario only: broker and generator both on these CPUs (one mode, see README)",
    )
    p.add_argument(
        "--generator",
        choices=("loadgen", "mqttload"),
        default="loadgen",
        help="bench/loadgen.py (default) or the C tool shared/tools/mqttload.c (cross-check)",
    )
    p.add_argument(
        "--mqttload", default=None, help="path of a built mqttload (default: build it into bench/out)"
    )
    p.add_argument("--reader", default="python", choices=("python", "codec"), help="loadgen's parser")
    p.add_argument(
        "--procs", type=int, default=0, help="loadgen worker processes (default: one per pinned CPU)"
    )
    p.add_argument(
        "--fluxmq-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra --set for fluxmq-node (repeatable)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each run wait up to SECONDS for the machine to be idle (other work below "
        "--quiet-cpus); figures on a shared machine are noisy",
    )
    p.add_argument(
        "--quiet-cpus",
        type=float,
        default=0.25,
        metavar="N",
        help="CPUs' worth of other load that counts as quiet (default 0.25)",
    )
    p.add_argument("--out", default=str(OUT_DIR), help="directory for compare-<timestamp>.md/.json/.log")
    return p  # fmt: skip


def _git_head() -> str:
    try:
        r = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %s"], capture_output=True,
                           text=True, timeout=10)  # fmt: skip
        return r.stdout.strip()[:80] or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; returns 0 if every run produced figures."""
    args = build_parser().parse_args(argv)
    if args.no_pin:
        args.broker_cpus = args.gen_cpus = args.latency_cpus = ""
    usable = os.sched_getaffinity(0)
    for opt in ("broker_cpus", "gen_cpus", "latency_cpus"):
        cpus = getattr(args, opt)
        if cpus and not all(c.isdigit() and int(c) in usable for c in cpus.replace("-", ",").split(",")):
            print(f"compare: CPU {cpus} not usable here; not pinning", file=sys.stderr)
            args.broker_cpus = args.gen_cpus = args.latency_cpus = ""
    if (args.broker_cpus or args.gen_cpus or args.latency_cpus) and shutil.which("taskset") is None:
        print("compare: taskset not found; not pinning", file=sys.stderr)
        args.broker_cpus = args.gen_cpus = args.latency_cpus = ""
    args.runs = args.runs or (1 if args.quick else 3)
    if args.generator == "mqttload":
        args.mqttload = ensure_mqttload(args.mqttload)
    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    for b in brokers:
        if b not in ("mosquitto", "fluxmq"):
            raise SystemExit(f"unknown broker {b!r}")
    if "mosquitto" in brokers and not Mosquitto.available():
        print("compare: mosquitto not installed (apt-get install mosquitto); skipping it", file=sys.stderr)
        brokers.remove("mosquitto")
    if "fluxmq" in brokers and not FluxmqNode.available():
        print("compare: fluxmq-node not importable; skipping it", file=sys.stderr)
        brokers.remove("fluxmq")
    if not brokers:
        raise SystemExit("compare: no broker to run")
    nofile = procinfo.raise_nofile()
    names = args.scenario or DEFAULT_SCENARIOS

    started = dt.datetime.now(dt.UTC)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = procinfo.machine_info()
    gen = (f"mqttload ({args.mqttload})" if args.generator == "mqttload"
           else f"bench/loadgen.py, reader {args.reader}, {args.procs or 'one per usable CPU:'} worker process(es)")  # fmt: skip
    meta.update(started=started.strftime("%Y-%m-%d %H:%M UTC"), generator=gen, git=_git_head(),
                command="bench/compare " + " ".join(argv if argv is not None else sys.argv[1:]))  # fmt: skip
    versions = {}
    for name, cls in (("mosquitto", Mosquitto), ("fluxmq", FluxmqNode)):
        if name in brokers:
            probe = cls()
            versions[name] = probe.version()
            probe.cleanup()
    results: dict[str, dict[str, Any]] = {}
    log_path = out_dir / f"compare-{stamp}.log"
    t_start = time.monotonic()
    with open(log_path, "w") as log:
        for name in names:
            sc = SCENARIOS[name]
            per: dict[str, Any] = {}
            results[name] = per
            if sc.needs_nofile and nofile < sc.needs_nofile:
                per["_skipped"] = (f"not run: RLIMIT_NOFILE is {nofile:,} here (hard limit), "
                                   f"needs {sc.needs_nofile:,} per process")  # fmt: skip
                print(f"compare: {name}: {per['_skipped']}", file=sys.stderr)
                continue
            for run in range(1, args.runs + 1):
                for b in brokers:
                    if b not in sc.brokers:
                        continue
                    t0 = time.monotonic()
                    res = run_one(args, sc, b, run, log)
                    per.setdefault(b, []).append(res)
                    shown = ", ".join(f"{m.key}={res.get(m.key, '-')}" for m in sc.metrics)
                    extra = f" lost={res['lost']}" if "lost" in res else ""
                    err = f" ERROR {res['error']}" if res.get("error") else ""
                    print(f"compare: {name} {b} run {run}: {shown}{extra}{err} ({time.monotonic() - t0:.1f} s)",
                          file=sys.stderr, flush=True)  # fmt: skip
    meta["loadavg_end"] = procinfo.machine_info()["loadavg"]
    report = render(args, meta, results, versions)
    report += (
        f"\nTotal time {time.monotonic() - t_start:.0f} s. Generator and broker logs: `{log_path.name}`.\n"
    )
    md = out_dir / f"compare-{stamp}.md"
    md.write_text(report)
    (out_dir / f"compare-{stamp}.json").write_text(
        json.dumps({"meta": meta, "versions": versions, "results": results}, indent=1)
    )
    sys.stdout.write(report)
    print(f"compare: wrote {md}", file=sys.stderr)
    failed = any(r.get("error") for per in results.values() for b, runs in per.items() if not b.startswith("_")
                 for r in runs)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
