"""bench.cluster_queues' arguments and table (the measurement itself needs etcd and two nodes)."""

from __future__ import annotations

import pytest

from bench.cluster_queues import SCENARIOS, parse_args, table


def test_the_scenarios_default_to_all_and_a_subset_keeps_its_order() -> None:
    assert parse_args([]).scenarios == list(SCENARIOS)
    assert parse_args(["--scenarios", "both-hops,local"]).scenarios == ["both-hops", "local"]


@pytest.mark.parametrize("scenarios", ["local,sideways", "append-hop,deliver-hop"])
def test_an_unknown_scenario_or_none_to_compare_with_is_refused(scenarios: str) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--scenarios", scenarios])


def _got(rate: float | None, a: float, b: float, dups: int = 0) -> dict:
    out = {"cpu_a": a, "cpu_b": b}
    if rate is None:
        out["error"] = "timed out: 10 of 100 delivered, 100 acknowledged (10 distinct)"
    else:
        out.update(rate=rate, dups=dups)
    return out


def test_each_run_is_compared_with_its_own_local_rate_and_duplicates_and_stalls_are_shown() -> None:
    runs = [
        {"local": _got(100.0, 10, 0), "append-hop": _got(50.0, 15, 10)},
        {"local": _got(200.0, 12, 0), "append-hop": _got(60.0, 17, 12, dups=2)},
        {"local": _got(150.0, 11, 0), "append-hop": _got(None, 30, 20)},
    ]
    for run, alone in zip(runs, (4.0, 3.0, 5.0), strict=True):
        run["alone"] = {"rate": 300.0, "dups": 0, "cpu_a": 0.0, "cpu_b": 0.0, "cpu_alone": alone}
    lines = table(runs, 100, "batch")
    assert lines[0].startswith("| scenario (sync=batch, 100 msgs, median of 3) |")
    local, hop = lines[2].split(" | "), lines[3].split(" | ")
    assert local[1:5] == ["150", "1.00; 1.00-1.00", "a 11.0 + b 0.0 = 11.0", "0"]
    # per run: 50/100 and 60/200 (the stalled run has no ratio), not the medians' 55/150
    assert hop[1:5] == ["55", "0.40; 0.30-0.50", "a 17.0 + b 12.0 = 29.0", "2"]
    assert hop[5] == "timed out: 10 of 100 delivered, 100 acknowledged (10 distinct) |"
    # the node without a cluster: its own CPU only
    assert lines[4].split(" | ")[1:5] == ["300", "2.00; 1.50-3.00", "alone 4.0", "0"]
