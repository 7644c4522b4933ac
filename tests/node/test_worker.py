"""BrokerWorker's run loop (the process as a whole: tests/e2e/test_node.py)."""

from __future__ import annotations

import types

import gevent
import pytest

import fluxmq.node.worker as worker_module
from fluxmq.node.worker import BrokerWorker


class _Service:
    def __init__(self) -> None:
        self.stopped_with: float | None = None

    def stop(self, budget: float) -> None:
        self.stopped_with = budget


def _worker() -> BrokerWorker:
    """A BrokerWorker with what ``run`` reads, no gunicorn process around it (and no HTTP sockets)."""
    w = BrokerWorker.__new__(BrokerWorker)
    w.alive = True
    w.sockets = []
    w.wsgi_apps = []
    w.app = types.SimpleNamespace(stop_budget=5.0)
    w.service = _Service()
    w._heartbeat = gevent.spawn(lambda: None)
    return w


@pytest.mark.parametrize("how", ["handle_exit", "alive"])
def test_run_waits_for_the_stop_without_polling(monkeypatch, how: str) -> None:
    """A node at rest does not wake its hub to look at ``alive``: ``run`` sleeps on nothing
    (no ``gevent.sleep`` loop) and returns once a signal handler, or any gunicorn code, clears it."""
    slept: list[float] = []
    real_sleep = gevent.sleep

    def sleep(seconds: float = 0, *args, **kwargs) -> None:
        slept.append(seconds)
        real_sleep(seconds, *args, **kwargs)

    monkeypatch.setattr(worker_module, "gevent", types.SimpleNamespace(sleep=sleep, event=gevent.event))
    w = _worker()
    runner = gevent.spawn(w.run)
    for _ in range(5):
        real_sleep(0.01)
    assert not runner.dead
    assert slept == [], "run() polled with gevent.sleep while serving"
    if how == "handle_exit":
        w.handle_exit(15, None)
    else:
        w.alive = False  # as gunicorn's own handlers and its reloader do
    runner.join(timeout=10)
    assert runner.dead and runner.successful()
    assert w.service.stopped_with is not None  # the broker was stopped, within the budget
