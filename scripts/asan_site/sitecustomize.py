"""Loaded by any Python started with this directory on PYTHONPATH (``scripts/asan`` puts it there):
imports fluxmq's compiled modules from the sanitizer build in ``ASAN_FLUXMQ_LIB`` instead of the
normal ``.so`` files next to their ``.pyx`` (which stay as they are).

``ASAN_FLUXMQ_LIB`` is ``setup.py build_ext --build-lib``'s directory: ``fluxmq/_core/decoder.*.so``
and so on. A finder placed first on ``sys.meta_path`` answers for each extension module found there
(by its dotted name); every other module, the package's Python files included, is found as usual,
so the checkout's sources run with the sanitizer's C. Child processes (a node a test starts)
inherit the environment and so the same finder."""

import os

_LIB = os.environ.get("ASAN_FLUXMQ_LIB")

if _LIB:
    import importlib.machinery
    import importlib.util
    import sys

    def _modules(lib: str) -> dict[str, str]:
        found = {}
        suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
        for dirpath, _dirs, files in os.walk(os.path.join(lib, "fluxmq")):
            for name in files:
                for suffix in suffixes:
                    if name.endswith(suffix):
                        rel = os.path.relpath(os.path.join(dirpath, name[: -len(suffix)]), lib)
                        found[rel.replace(os.sep, ".")] = os.path.join(dirpath, name)
                        break
        return found

    class _SanitizerBuild:
        """``find_spec`` of the sanitizer build's extension modules (None for any other name)."""

        def __init__(self, modules: dict[str, str]):
            self.modules = modules

        def find_spec(self, fullname, path=None, target=None):
            so = self.modules.get(fullname)
            if so is None:
                return None
            loader = importlib.machinery.ExtensionFileLoader(fullname, so)
            return importlib.util.spec_from_file_location(fullname, so, loader=loader)

    sys.meta_path.insert(0, _SanitizerBuild(_modules(_LIB)))
