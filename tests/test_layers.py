"""The package's layers import downward only (docs/architecture.rst): each package of ``fluxmq``
may import the packages listed for it here and no other, in Python and in Cython (``import``,
``from ... import``, ``cimport``), at module level or inside a function."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import fluxmq

ROOT = Path(fluxmq.__file__).parent

#: imported by any layer; they import nothing above them
BASE = {"errors", "config", "log"}
#: the front ends' common ground: the broker's public API and what it stands on
BELOW_FRONT_ENDS = BASE | {"broker", "queues", "storage", "_core", "auth"}

ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "config": {"errors"},
    "log": {"errors", "config"},
    "_core": {"errors"},
    "storage": BASE | {"_core"},
    "auth": BASE | {"_core"},
    "broker": BASE | {"storage", "_core", "auth"},
    "queues": BASE | {"broker", "storage", "_core"},
    "protocol": BELOW_FRONT_ENDS,
    "transport": BELOW_FRONT_ENDS | {"protocol"},
    "http": BELOW_FRONT_ENDS | {"replication"},  # the admin API's Raft member changes
    "coap": BELOW_FRONT_ENDS,
    "bridge": BELOW_FRONT_ENDS,
    "webhook": BELOW_FRONT_ENDS,
    "cluster": BELOW_FRONT_ENDS,
    # Raft groups ride the cluster's membership; their TLS contexts are built as the listeners' are
    "replication": BELOW_FRONT_ENDS | {"cluster", "transport.tls"},
}
#: wires everything; nothing imports it but the entry point
TOP = {"node", "__main__"}

_CYTHON_IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+c?import\b|c?import\s+([\w.]+))", re.M)


def _imports(path: Path, package: tuple[str, ...] | None = None) -> list[str]:
    """The absolute names of the ``fluxmq`` modules ``path`` (a module of ``package``) imports."""
    text = path.read_text()
    if package is None:
        package = path.relative_to(ROOT.parent).with_suffix("").parts[:-1]
    found: list[str] = []
    if path.suffix == ".py":
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                found += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    found.append(node.module or "")
                else:
                    base = package[: len(package) - node.level + 1]
                    found.append(".".join(base + ((node.module,) if node.module else ())))
    else:
        for m in _CYTHON_IMPORT.finditer(text):
            found.append(m.group(1) or m.group(2))
    return [name for name in found if name.startswith("fluxmq.")]


def _package(path: Path) -> str:
    parts = path.relative_to(ROOT).parts
    return parts[0] if len(parts) > 1 else path.stem


def _allowed(importer: str, name: str) -> bool:
    target = name.split(".")[1]
    if target == importer or importer in TOP:
        return True
    rules = ALLOWED.get(importer)
    assert rules is not None, f"package fluxmq.{importer} has no layer in tests/test_layers.py"
    module = ".".join(name.split(".")[1:3])
    return target in rules or module in rules


def test_every_package_imports_only_the_layers_below_it() -> None:
    wrong = []
    for path in sorted(ROOT.rglob("*")):
        if path.suffix not in (".py", ".pyx", ".pxd") or "proto" in path.parts:
            continue
        importer = _package(path)
        for name in _imports(path):
            if not _allowed(importer, name):
                wrong.append(f"{path.relative_to(ROOT.parent)} imports {name}")
    assert not wrong, "imports against the layers (docs/architecture.rst):\n" + "\n".join(wrong)


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The rules catch what they are for: the broker importing the protocol layer, and a relative
    import out of a package."""
    assert not _allowed("broker", "fluxmq.protocol.connection")
    assert not _allowed("_core", "fluxmq.storage")
    assert not _allowed("cluster", "fluxmq.http.metrics")
    assert _allowed("replication", "fluxmq.transport.tls")
    assert not _allowed("replication", "fluxmq.transport.listener")
    probe = tmp_path / "probe.py"
    probe.write_text("from ..protocol import connection\nfrom . import router\nimport gevent\n")
    assert _imports(probe, ("fluxmq", "broker")) == ["fluxmq.protocol", "fluxmq.broker"]
    probe = tmp_path / "probe.pyx"
    probe.write_text("from fluxmq.storage.lmdb cimport Store\ncimport fluxmq._core.wire\n")
    assert _imports(probe, ("fluxmq", "_core")) == ["fluxmq.storage.lmdb", "fluxmq._core.wire"]
