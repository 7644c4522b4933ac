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


class _StopBeating(Exception):
    pass


@pytest.mark.parametrize(
    ("timeout", "interval"), [(30, 3.0), (90, 9.0), (10, 1.0), (5, 1.0), (2, 1.0), (1, 0.5)]
)
def test_the_heartbeat_beats_a_tenth_of_the_worker_timeout_and_at_least_every_second(
    monkeypatch, timeout: int, interval: float
) -> None:
    """Each beat is a turn of cold Python code on the CPU that serves the messages: with the default
    30 s timeout it beats every 3 s, not every second as gunicorn's workers do (bench/RESULTS.md,
    "The heartbeat and the arbiter's look"); but at least twice per timeout (1 s: every 0.5 s)."""
    slept: list[float] = []
    beats: list[int] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 3:
            raise _StopBeating

    monkeypatch.setattr(worker_module, "sleep_behind_io", sleep)
    w = BrokerWorker.__new__(BrokerWorker)
    w.cfg = types.SimpleNamespace(timeout=timeout)
    w.timeout = timeout / 2  # what gunicorn's arbiter gives its workers
    w.notify = lambda: beats.append(1)
    with pytest.raises(_StopBeating):
        w._beat()
    assert slept == [interval] * 3
    assert len(beats) == 3
    assert worker_module.heartbeat_interval(timeout) == interval


@pytest.mark.parametrize("timeout", [1, 2, 3, 5, 10, 11, 30, 90])
def test_a_beat_may_come_half_the_worker_timeout_late(timeout: int) -> None:
    """The arbiter kills the worker at a look that finds the heartbeat older than the timeout: between
    two beats at least half the timeout is left for a late one. Before, with a 1 s timeout the worker
    beat every second: a beat a few milliseconds late on a loaded machine was a kill whenever the
    arbiter looked in those milliseconds (tests/e2e/test_persistence.py, the store slower to load
    than the worker timeout, with every beat late)."""
    assert timeout - worker_module.heartbeat_interval(timeout) >= timeout / 2
