"""The node service loads the cluster only when it is enabled."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_node_modules_do_not_import_the_cluster() -> None:
    """Everything a single node imports (service, worker, app, health, metrics) leaves fluxmq.cluster
    and grpc unloaded; fluxmq.node.service imports them in _start_cluster only."""
    code = (
        "import sys, fluxmq.node.service, fluxmq.node.app, fluxmq.node.worker, fluxmq.node.check; "
        "print(sorted(m for m in sys.modules if m.startswith(('fluxmq.cluster', 'grpc'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
