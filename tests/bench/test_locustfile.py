"""Smoke test of bench/locustfile.py: a short headless locust run against a real Mosquitto."""

from __future__ import annotations

import csv
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.brokers import REPO, Mosquitto


def test_broker_address_accepts_only_loopback() -> None:
    if importlib.util.find_spec("locust") is None:
        pytest.skip("locust is not installed (pip install -e '.[bench]')")
    # In a child interpreter: importing locust monkey-patches ssl, which breaks (RecursionError)
    # once earlier tests of the same run have imported ssl.
    code = """
from bench.locustfile import broker_address
assert broker_address("mqtt://127.0.0.1:1884") == ("127.0.0.1", 1884)
assert broker_address("127.0.0.2") == ("127.0.0.2", 1883)
try:
    broker_address("mqtt://192.0.2.1:1883")
except ValueError as exc:
    assert "non-loopback" in str(exc), exc
else:
    raise AssertionError("a non-loopback address was accepted")
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]


def test_headless_run_reports_every_request_kind(tmp_path: Path) -> None:
    locust = Path(sys.executable).parent / "locust"
    if not locust.exists() and shutil.which("locust") is None:
        pytest.skip("locust is not installed (pip install -e '.[bench]')")
    if not Mosquitto.available():
        pytest.skip("mosquitto is not installed (apt-get install mosquitto; scripts/test installs it)")
    exe = str(locust) if locust.exists() else shutil.which("locust")
    with Mosquitto() as broker:
        cmd = [exe, "-f", "bench/locustfile.py", "--headless", "-u", "6", "-r", "6", "--run-time", "3s",
               "--stop-timeout", "5", "--host", f"mqtt://127.0.0.1:{broker.port}", "--mqtt-topics", "5",
               "--csv", str(tmp_path / "run"), "--only-summary"]  # fmt: skip
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(tmp_path / "run_stats.csv") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    for name in ("connect", "subscribe", "publish qos0", "publish qos1", "deliver qos1"):
        assert name in rows, sorted(rows)
        assert int(rows[name]["Request Count"]) > 0
    assert int(rows["connect"]["Failure Count"]) == 0
    assert int(rows["publish qos1"]["Failure Count"]) == 0
