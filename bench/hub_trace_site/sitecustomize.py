"""Loaded by any Python started with this directory on PYTHONPATH: installs bench.hub_trace's
recorder when HUB_TRACE_PREFIX names a file prefix (else does nothing)."""

import os
import sys

if os.environ.get("HUB_TRACE_PREFIX"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from bench.hub_trace import install

    install(os.environ["HUB_TRACE_PREFIX"])
