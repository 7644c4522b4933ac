"""bench.lone_cold's polluting copy of the C generator: the insertions find their anchors and it builds."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from bench.compare import MQTTLOAD_SRC
from bench.latency_tail import patched_source
from bench.lone_cold import POLLUTE, build

# the shared tools sit beside the main checkout; a git worktree one level deeper looks one level up
SRC = next(
    (p for p in (MQTTLOAD_SRC, MQTTLOAD_SRC.parents[3] / "shared/tools/mqttload.c") if p.exists()),
    MQTTLOAD_SRC,
)


@pytest.mark.skipif(
    not SRC.exists() or shutil.which("gcc") is None, reason="needs shared/tools/mqttload.c and gcc"
)
def test_the_polluting_generator_builds_and_takes_its_options(tmp_path) -> None:
    text = patched_source(SRC.read_text())
    for anchor, _ in POLLUTE:
        assert text.count(anchor) == 1
    gen = build(SRC, tmp_path / "mqttload_cold")
    src = (tmp_path / "mqttload_cold.c").read_text()
    assert "MQTTLOAD_POLLUTE_MB" in src and "MQTTLOAD_POLLUTE_CODE_MB" in src
    out = subprocess.run([gen, "--help"], capture_output=True, text=True, timeout=30)
    assert "--mode" in out.stdout + out.stderr
