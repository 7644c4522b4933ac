"""fluxmq.coap is a front end beside http: it may import broker, auth, _core, config and errors,
never the MQTT protocol layer, the transports or the HTTP apps (docs/architecture.rst)."""

from __future__ import annotations

import ast
from pathlib import Path

import fluxmq.coap

FORBIDDEN = ("fluxmq.protocol", "fluxmq.transport", "fluxmq.http", "fluxmq.node")


def test_coap_imports_only_downward() -> None:
    for path in Path(fluxmq.coap.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert not name.startswith(FORBIDDEN), f"{path.name} imports {name}"
