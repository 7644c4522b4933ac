"""bench.link_batch_instr runs the link's steady-state path (without callgrind: the path itself)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("extra", [[], ["--ack-message"]])
def test_the_link_streams_the_batches_asked_for_and_counts_them(extra) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.link_batch_instr", "30", "5", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the run's first batch starts it; each ack then brings the next one: 30 more
    assert "batches 31" in proc.stderr.splitlines()


def test_the_harness_alone_runs_without_a_link() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.link_batch_instr", "30", "5", "--harness"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
