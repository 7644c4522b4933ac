"""The checked-in gRPC code is what the command in cluster.proto's header makes from it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PROTO = ROOT / "fluxmq/cluster/proto/cluster.proto"
#: what the checked-in files carry above protoc's output (ruff skips generated code by it)
LINT_HEADER = (
    "# ruff: noqa\n# (generated: the line above is added after protoc; see cluster.proto's header)\n"
)


def test_generated_code_is_current(tmp_path: Path) -> None:
    header = PROTO.read_text()
    command = re.search(r"^//\s+python -m (grpc_tools\.protoc .+)$", header, re.M)
    assert command, "cluster.proto names the command that generates its code"
    args = command.group(1).split()[1:]
    target = tmp_path / "fluxmq/cluster/proto"
    target.mkdir(parents=True)
    shutil.copy(PROTO, target / "cluster.proto")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", *args], cwd=tmp_path, check=True)
    for name in ("cluster_pb2.py", "cluster_pb2_grpc.py"):
        checked_in = (ROOT / "fluxmq/cluster/proto" / name).read_text()
        assert checked_in.startswith(LINT_HEADER), name
        assert (target / name).read_text() == checked_in[len(LINT_HEADER) :], name
