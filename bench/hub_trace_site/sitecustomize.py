"""Loaded by any Python started with this directory on PYTHONPATH: installs bench.hub_trace's
recorder when HUB_TRACE_PREFIX names a file prefix (else does nothing).

The recorder is loaded from its file, not by putting this checkout on ``sys.path``: the node
being traced keeps importing fluxmq from wherever its own PYTHONPATH says (e.g. another checkout)."""

import os

if os.environ.get("HUB_TRACE_PREFIX"):
    import importlib.util

    _path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hub_trace.py")
    _spec = importlib.util.spec_from_file_location("_hub_trace", _path)
    _mod = importlib.util.module_from_spec(_spec)
    import sys

    sys.modules["_hub_trace"] = _mod
    _spec.loader.exec_module(_mod)
    _mod.install(os.environ["HUB_TRACE_PREFIX"])
