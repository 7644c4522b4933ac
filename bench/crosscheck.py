"""Cross-check bench/loadgen.py against shared/tools/mqttload.c on the same broker (Mosquitto).

Runs each scenario with both generators, alternating run by run against a fresh pinned Mosquitto
(so load from other work on the machine hits both alike), and prints their medians side by side:
if loadgen's figures are well below mqttload's while its CPU is near 100 %, the Python generator
is the bottleneck.  Usage::

    .venv/bin/python -m bench.crosscheck [--quick] [--runs 3] [--scenario qos0 ...] [--mqttload PATH]

Writes ``bench/out/crosscheck-<timestamp>.md`` as well as printing it.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import statistics
import sys
from pathlib import Path

from bench import procinfo
from bench.compare import (
    OUT_DIR,
    SCENARIOS,
    _num,
    build_parser,
    ensure_mqttload,
    metric_values,
    per_cpu_values,
    run_one,
)  # fmt: skip

DEFAULT = ["qos0", "qos1", "fanout", "fanin", "idle", "latency"]


def main(argv: list[str] | None = None) -> int:
    """Run the cross-check and print the Markdown table."""
    p = argparse.ArgumentParser(prog="python -m bench.crosscheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", action="append", default=[], choices=DEFAULT)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--runs", type=int, default=None)
    p.add_argument("--mqttload", default=None, help="built mqttload (default: build into bench/out)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS")
    a = p.parse_args(argv)
    base = build_parser().parse_args(
        (["--quick"] if a.quick else []) + ["--wait-quiet", str(a.wait_quiet), "--brokers", "mosquitto"]
    )
    base.runs = a.runs or (1 if a.quick else 3)
    base.mqttload = ensure_mqttload(a.mqttload)
    procinfo.raise_nofile()
    gens = ["loadgen", "mqttload"]
    started = dt.datetime.now(dt.UTC)
    out_dir = Path(OUT_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    results: dict[str, dict[str, list[dict]]] = {}
    with open(out_dir / f"crosscheck-{stamp}.log", "w") as log:
        for name in a.scenario or DEFAULT:
            sc = SCENARIOS[name]
            results[name] = {g: [] for g in gens}
            for run in range(1, base.runs + 1):
                for g in gens:
                    args = copy.copy(base)
                    args.generator = g
                    res = run_one(args, sc, "mosquitto", run, log)
                    results[name][g].append(res)
                    shown = ", ".join(f"{m.key}={res.get(m.key, '-')}" for m in sc.metrics)
                    print(f"crosscheck: {name} {g} run {run}: {shown} gen_cpu={res.get('gen_cpu', '-')} "
                          f"broker_cpu={res.get('broker_cpu', '-')} other={res.get('other_cpu', '-')}"
                          f"{' ERROR ' + str(res['error']) if res.get('error') else ''}",
                          file=sys.stderr, flush=True)  # fmt: skip
    m = procinfo.machine_info()
    lines = [
        f"# loadgen vs mqttload on Mosquitto, {started.strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        f"{m['nproc']} CPUs ({m['cpu']}), {m['kernel']}; load average at end {m['loadavg']}; broker on CPU "
        f"{base.broker_cpus}, generator on CPU {base.gen_cpus}; median of {base.runs} alternating run(s).",
        "",
        "| scenario | loadgen | mqttload | loadgen / mqttload | loadgen per broker CPU-s | "
        "mqttload per broker CPU-s | loadgen CPU | mqttload CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, per in results.items():
        for met in SCENARIOS[name].metrics:
            lv, mv = metric_values(per["loadgen"], met.key), metric_values(per["mqttload"], met.key)
            lmed = statistics.median(lv) if lv else None
            mmed = statistics.median(mv) if mv else None
            lpc, mpc = per_cpu_values(per["loadgen"]), per_cpu_values(per["mqttload"])
            lcpu = [_num(r.get("gen_cpu")) for r in per["loadgen"] if _num(r.get("gen_cpu")) is not None]
            mcpu = [_num(r.get("gen_cpu")) for r in per["mqttload"] if _num(r.get("gen_cpu")) is not None]
            lines.append(
                f"| {met.title} ({met.unit}) | {met.fmt.format(lmed) if lmed is not None else '-'} | "
                f"{met.fmt.format(mmed) if mmed is not None else '-'} | "
                f"{f'{lmed / mmed:.2f}' if lmed is not None and mmed else ''} | "
                f"{f'{statistics.median(lpc):,.0f}' if lpc else ''} | "
                f"{f'{statistics.median(mpc):,.0f}' if mpc else ''} | "
                f"{f'{statistics.median(lcpu):.0f}%' if lcpu else ''} | "
                f"{f'{statistics.median(mcpu):.0f}%' if mcpu else ''} |"
            )
    report = "\n".join(lines) + "\n"
    (out_dir / f"crosscheck-{stamp}.md").write_text(report)
    sys.stdout.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
