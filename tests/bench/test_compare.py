"""Tests of bench/compare.py's judging and report (no brokers: synthetic run results)."""

from __future__ import annotations

import argparse

from bench import compare
from bench.compare import SCENARIOS, judge, metric_values, render, run_notes


def _run(rate: float, **kw: object) -> dict:
    r = {"mode": "throughput", "rate": str(rate), "msgs": "10", "deliveries": "10", "lost": "0", "dups": "0",
         "broker_cpu": "50%", "gen_cpu": "20%", "other_cpu": "1%"}  # fmt: skip
    r.update({k: str(v) for k, v in kw.items()})
    return r


def test_metric_values_skip_failed_runs() -> None:
    runs = [_run(100), _run(300, error="aborted"), {"error": "broker_start"}, _run(200)]
    assert metric_values(runs, "rate") == [100.0, 200.0]


def test_judge_against_mosquitto_respects_direction() -> None:
    tp = SCENARIOS["qos0"].metrics[0]
    p99 = SCENARIOS["latency"].metrics[0]
    assert judge(tp, 120.0, 100.0, {}) == "yes"
    assert judge(tp, 80.0, 100.0, {}) == "no"
    assert judge(p99, 1.0, 2.0, {}) == "yes"
    assert judge(p99, 3.0, 2.0, {}) == "no"
    assert judge(tp, 80.0, None, {}) == ""


def test_judge_absolute_and_relative_targets() -> None:
    mem = SCENARIOS["idle"].metrics[0]  # <= 6 KiB per connection
    assert judge(mem, 6000.0, 700.0, {}) == "yes"
    assert judge(mem, 7000.0, 700.0, {}) == "no"
    lmdb = SCENARIOS["qos1lmdb"].metrics[0]  # >= 3/4 of fluxmq's in-memory QoS 1
    results = {"qos1": {"fluxmq": [_run(1000), _run(1200), _run(800)]}}
    assert judge(lmdb, 750.0, None, results) == "yes"
    assert judge(lmdb, 700.0, None, results) == "no"
    assert judge(lmdb, 400.0, None, {}) == ""


def test_notes_report_loss_duplicates_errors_and_noise() -> None:
    notes = run_notes([_run(1, lost=5), _run(1, dups=2), _run(1, gen_cpu="97%"), _run(1, other_cpu="80%"),
                       {"error": "broker_start", "detail": 'x error="storage.type: lmdb not built" y'}])  # fmt: skip
    assert "LOST 5" in notes and "DUPS 2" in notes
    assert "generator near 100% CPU" in notes and "other load" in notes
    assert "lmdb not built" in notes
    assert run_notes([_run(1)]) == ""


def test_render_shows_medians_and_ratio() -> None:
    args = argparse.Namespace(
        broker_cpus="1", gen_cpus="0", quick=False, runs=3, wait_quiet=0, quiet_cpus=0.25
    )
    meta = {"started": "t", "nproc": "2", "cpu": "c", "kernel": "k", "loadavg": "0", "generator": "g",
            "command": "bench/compare"}  # fmt: skip
    results = {"qos0": {"mosquitto": [_run(100), _run(300), _run(200)],
                        "fluxmq": [_run(500), _run(400), _run(450, lost=3)]}}  # fmt: skip
    md = render(args, meta, results, {"mosquitto": "2.0.11", "fluxmq": "0.1.0"})
    row = next(line for line in md.splitlines() if line.startswith("| QoS 0, 1 publisher"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "200" and cells[2] == "450" and cells[3] == "2.25x" and cells[5] == "yes"
    assert "LOST 3" in cells[6]
    assert "| Mosquitto 2.0.11 | fluxmq 0.1.0 |" in md
    assert compare.efficiency_rows(results)  # per-CPU table present for throughput rows


def test_latency_cpus_put_both_on_one_cpu_for_the_latency_scenario_only() -> None:
    """``--latency-cpus``: the same placement for both brokers, the latency scenario's alone."""
    args = compare.build_parser().parse_args(["--latency-cpus", "1"])
    assert compare.placement(args, SCENARIOS["latency"]) == ("1", "1")
    assert compare.placement(args, SCENARIOS["fanin"]) == ("1", "0")
    default = compare.build_parser().parse_args([])
    assert compare.placement(default, SCENARIOS["latency"]) == ("1", "0")
