"""bench.queued_fanout runs both modes (each subscriber reads every delivery) and the Python path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("extra", [[], ["--python"]])
def test_both_modes_deliver_everything_and_report_a_ratio(extra) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.queued_fanout", "--rounds", "1", "--subs", "3", "--turns", "4", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["direct", "queued", "ratio"]
