"""Test-only: change a module of a node's process as it is imported (the ``sitecustomize`` files of
``tests/e2e/state_probe`` and ``tests/e2e/hold_interest``, put on a node's ``PYTHONPATH``)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType


def after_import(name: str, patch: Callable[[ModuleType], None]) -> None:
    """Call ``patch(module)`` once module ``name`` is loaded (not before: a node's worker patches
    gevent first, so nothing of it is imported here)."""

    class Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Hook())
