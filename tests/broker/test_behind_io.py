"""sleep_behind_io: periodic work (the worker's heartbeat, $SYS, the heap trim) resumes after the input
that arrived in the poll where its sleep ended, not before it as ``gevent.sleep``'s timer does."""

from __future__ import annotations

import time

import gevent
import greenlet
import pytest
from gevent import socket

import fluxmq.broker.sys_topics as sys_topics_module
import fluxmq.node.heap_trim as heap_trim_module
import fluxmq.node.worker as worker_module
from fluxmq.broker import behind_io
from fluxmq.broker.behind_io import sleep_behind_io
from fluxmq.broker.broker import Broker
from fluxmq.broker.stats import BrokerStats
from fluxmq.broker.sys_topics import SysTopics
from fluxmq.node.heap_trim import HeapTrim


def _reader_and_sleeper(a, b, order: list[str]) -> list:
    """A reader of ``a`` (it notes "input", then queues its "write" as a loop callback, as the flush
    scheduler does) and a greenlet in ``sleep_behind_io(0.01)`` (then "sleeper"), both waiting; the
    hub kept busy past the sleep's expiry and a byte sent on ``b``, so the hub's next poll finds
    both. The two greenlets, not yet resumed."""

    def reader() -> None:
        a.recv(1)
        order.append("input")
        gevent.get_hub().loop.run_callback(order.append, "write")

    def sleeper() -> None:
        sleep_behind_io(0.01)
        order.append("sleeper")

    readers = [gevent.spawn(reader), gevent.spawn(sleeper)]
    gevent.sleep(0)  # both wait: the reader in recv, the sleeper on its timer
    time.sleep(0.05)  # the hub is busy past the timer's expiry (not gevent's sleep: no poll)
    b.send(b"x")  # the byte is there when the hub polls next
    return readers


def test_input_of_the_poll_where_the_sleep_ends_is_served_first() -> None:
    """The sleep's timer expires and a byte arrives while the hub is busy (one poll finds both): the
    reader runs, and the write it queued, before the sleeper resumes."""
    a, b = socket.socketpair()
    order: list[str] = []
    try:
        readers = _reader_and_sleeper(a, b, order)
        gevent.joinall(readers, timeout=10, raise_error=True)
        assert order == ["input", "write", "sleeper"]
    finally:
        a.close()
        b.close()


def test_the_sleeper_is_not_resumed_before_the_write_the_input_queued() -> None:
    """As above, but the sleeper's greenlet must not run at all before that write: its timer only
    queues the switch behind the callbacks already queued. (Switched to at once, it ran its cold
    Python, ~60-90 us, before the write of a lone message, once per heartbeat.)"""
    a, b = socket.socketpair()
    order: list[str] = []
    sleeping = []

    def trace(event: str, args) -> None:
        if event in ("switch", "throw") and sleeping and args[1] is sleeping[0]:
            order.append("resumed")

    try:
        readers = _reader_and_sleeper(a, b, order)
        sleeping.append(readers[1])
        order.clear()  # from here: the poll that finds both
        previous = greenlet.settrace(trace)
        try:
            gevent.joinall(readers, timeout=10, raise_error=True)
        finally:
            greenlet.settrace(previous)
        assert order == ["input", "write", "resumed", "sleeper"]
    finally:
        a.close()
        b.close()


def test_a_sleeper_killed_in_its_sleep_ends_and_its_timer_wakes_no_one() -> None:
    """Killed while it waits: the greenlet ends and its timer is closed (it never fires into it)."""
    asleep = gevent.spawn(sleep_behind_io, 0.01)
    gevent.sleep(0)
    asleep.kill(block=True, timeout=5)
    assert asleep.dead and asleep.successful()  # GreenletExit
    gevent.sleep(0.03)  # past the timer's expiry: nothing is woken or raised
    assert asleep.dead


def test_a_sleep_behind_io_sleeps_when_nothing_arrives() -> None:
    # libev counts a timer from the loop's cached time, taken at its last iteration: a test process
    # busy since then (a loaded machine) would see the sleep end early by that much (14.3 ms of 20)
    gevent.get_hub().loop.update_now()
    started = time.monotonic()
    sleep_behind_io(0.02)
    assert time.monotonic() - started >= 0.015


class _Slept(Exception):
    pass


def _stop_at_the_sleep(monkeypatch, module) -> list[float]:
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        raise _Slept

    monkeypatch.setattr(module, "sleep_behind_io", sleep)
    return slept


@pytest.mark.parametrize("what", ["heartbeat", "sys topics", "heap trim"])
def test_the_nodes_periodic_work_sleeps_behind_io(monkeypatch, what: str) -> None:
    if what == "heartbeat":
        slept = _stop_at_the_sleep(monkeypatch, worker_module)
        w = worker_module.BrokerWorker.__new__(worker_module.BrokerWorker)
        w.cfg = type("Cfg", (), {"timeout": 30})()
        w.notify = lambda: None
        run = w._beat
    elif what == "sys topics":
        slept = _stop_at_the_sleep(monkeypatch, sys_topics_module)
        run = SysTopics(Broker(), 10.0)._run
    else:
        slept = _stop_at_the_sleep(monkeypatch, heap_trim_module)
        run = HeapTrim(BrokerStats(), trim=lambda pad: 1, every=10.0)._run
    with pytest.raises(_Slept):
        run()
    assert slept and slept[0] > 0


def test_the_sleeper_yields_the_cpu_after_the_queued_writes(monkeypatch) -> None:
    """The writes woke their readers: a reader on the broker's CPU gets it before the sleeper's turn
    (``os.sched_yield`` once the loop callbacks queued before the sleeper ran)."""
    order: list[str] = []
    monkeypatch.setattr(behind_io.os, "sched_yield", lambda: order.append("yield"))
    gevent.get_hub().loop.run_callback(order.append, "write")
    sleep_behind_io(0.001)
    order.append("sleeper")
    assert order == ["write", "yield", "sleeper"]
