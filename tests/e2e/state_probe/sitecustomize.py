"""Test-only: what a node's workers hold, counted from their real objects (tests/e2e/test_churn.py).

Put on a node's ``PYTHONPATH`` with ``STATE_PROBE_DIR`` set, this runs in each of its processes.
Once a worker has started its broker (``BrokerWorker.load_wsgi``), a greenlet of that worker looks
into ``STATE_PROBE_DIR`` every 0.2 s: for each ``ask-{tag}`` file it writes ``state-{tag}-{pid}.json``
with, after a full collection, the number of live objects of every ``fluxmq`` class and the total
length of every container (dict, set, list, deque) held by an attribute of one (summed per class and
attribute, ``Session.subscriptions``) or by a ``fluxmq`` module (``fluxmq.module:NAME``). Nothing
else of the node changes; without ``STATE_PROBE_DIR`` this file does nothing.
"""

from __future__ import annotations

import os

_DIR = os.environ.get("STATE_PROBE_DIR")
_CONTAINERS = None


def _length(value):
    return len(value) if isinstance(value, _CONTAINERS) else None


def _attributes(cls):
    names = set()
    for klass in cls.__mro__:
        slots = getattr(klass, "__slots__", ())
        names.update((slots,) if isinstance(slots, str) else slots)
        for name, value in vars(klass).items():
            if type(value).__name__ in ("getset_descriptor", "member_descriptor"):  # Cython, slots
                names.add(name)
    names.discard("__dict__")
    names.discard("__weakref__")
    return names


def state() -> dict:
    """{"objects": {class: count}, "held": {"Class.attribute" or "module:NAME": total length}}."""
    import collections
    import gc
    import sys

    global _CONTAINERS
    _CONTAINERS = (dict, set, list, collections.deque, collections.OrderedDict)
    gc.collect()
    objects: collections.Counter = collections.Counter()
    held: collections.Counter = collections.Counter()
    attributes: dict = {}
    for obj in gc.get_objects():
        cls = type(obj)
        module = getattr(cls, "__module__", None)
        if not isinstance(module, str) or not module.startswith("fluxmq"):
            continue
        name = f"{module}.{cls.__qualname__}"
        objects[name] += 1
        names = attributes.get(cls)
        if names is None:
            names = attributes[cls] = _attributes(cls)
        own = getattr(obj, "__dict__", None)
        for attr in names.union(own) if isinstance(own, dict) else names:
            try:
                n = _length(getattr(obj, attr))
            except Exception:  # a property that needs a running part, an unset slot
                continue
            if n is not None:
                held[f"{name}.{attr}"] += n
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith("fluxmq"):
            continue
        for attr, value in list(vars(module).items()):
            if attr.startswith("__"):
                continue
            n = _length(value)
            if n is not None:
                held[f"{module_name}:{attr}"] += n
    return {"objects": dict(objects), "held": dict(held)}


def _answer() -> None:
    import glob
    import json

    import gevent

    while True:
        for ask in glob.glob(os.path.join(_DIR, "ask-*")):
            out = os.path.join(_DIR, f"state-{os.path.basename(ask)[4:]}-{os.getpid()}.json")
            if not os.path.exists(out):
                with open(out + ".tmp", "w") as f:
                    json.dump(state(), f)
                os.rename(out + ".tmp", out)
        gevent.sleep(0.2)


def _install() -> None:
    """Wrap ``BrokerWorker.load_wsgi`` as ``fluxmq.node.worker`` is imported."""
    from tests.e2e.import_hook import after_import

    def patch(module) -> None:
        start = module.BrokerWorker.load_wsgi

        def load_wsgi(worker):
            start(worker)
            import gevent

            gevent.spawn(_answer)

        module.BrokerWorker.load_wsgi = load_wsgi

    after_import("fluxmq.node.worker", patch)


if _DIR:
    _install()
