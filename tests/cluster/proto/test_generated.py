"""The checked-in gRPC code is what the command in cluster.proto's header makes from it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

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


def _minimum(requirements: list[str], name: str) -> Version:
    for text in requirements:
        req = Requirement(text)
        if req.name == name:
            floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==")]
            assert floors, f"{text!r} names no minimum"
            return max(floors)
    raise AssertionError(f"pyproject.toml does not require {name}")


def test_the_declared_minimums_are_the_versions_the_code_was_generated_for() -> None:
    """The generated modules refuse to import under an older grpcio or protobuf than made them, so
    pyproject's minimums must be at least those (else an install that satisfies them fails at
    cluster start), and the pinned generator is the one whose version the files carry."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    grpc_code = (ROOT / "fluxmq/cluster/proto/cluster_pb2_grpc.py").read_text()
    grpc_made = Version(re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'", grpc_code, re.M).group(1))
    pb_code = (ROOT / "fluxmq/cluster/proto/cluster_pb2.py").read_text()
    stamp = re.search(r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),", pb_code)
    pb_made = Version(".".join(stamp.groups()))
    assert _minimum(project["dependencies"], "grpcio") >= grpc_made
    assert _minimum(project["dependencies"], "protobuf") >= pb_made
    assert _minimum(project["optional-dependencies"]["test"], "grpcio-tools") == grpc_made
