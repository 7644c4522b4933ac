"""fluxmq configuration: a strict schema, YAML file + environment + ``--set`` merging, value parsers.

::

    from fluxmq.config import load_config, Config, parse_addr
    cfg = load_config("conf/fluxmq.yaml", env=os.environ, overrides=["broker.max_inflight=50"])
    cfg.broker.max_inflight                  # 50 (typed: durations are float seconds, sizes int bytes)
    cfg.get("server.tcp.plain.addr")         # "127.0.0.1:1883"
    cfg.origin("broker.max_inflight")        # "cli --set"
    host, port = parse_addr(cfg.server.tcp.plain.addr)

The names are imported lazily so that ``python -m fluxmq.config.schema`` runs the schema module once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fluxmq.config.loader import Config, Section, load_config
    from fluxmq.config.schema import SCHEMA, Key, Schema
    from fluxmq.config.values import parse_addr, parse_bool, parse_duration, parse_size

__all__ = [
    "SCHEMA",
    "Config",
    "Key",
    "Schema",
    "Section",
    "load_config",
    "parse_addr",
    "parse_bool",
    "parse_duration",
    "parse_size",
]

_WHERE = {
    "Config": "loader",
    "Section": "loader",
    "load_config": "loader",
    "SCHEMA": "schema",
    "Key": "schema",
    "Schema": "schema",
    "parse_addr": "values",
    "parse_bool": "values",
    "parse_duration": "values",
    "parse_size": "values",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'fluxmq.config' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fluxmq.config.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
