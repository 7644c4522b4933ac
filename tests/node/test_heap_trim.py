"""HeapTrim: the C heap is trimmed after a burst of connections, not while the count is steady."""

from __future__ import annotations

from fluxmq.broker.stats import BrokerStats
from fluxmq.node.heap_trim import HeapTrim, glibc_malloc_trim


def test_glibc_malloc_trim_is_found_and_runs() -> None:
    trim = glibc_malloc_trim()
    assert trim is not None  # the machines fluxmq runs on have glibc
    assert trim(0) in (0, 1)


def test_trims_once_per_burst_of_connections() -> None:
    stats = BrokerStats()
    calls: list[int] = []
    heap = HeapTrim(stats, trim=lambda pad: calls.append(pad) or 1, after=1000)
    stats.connections_total += 999
    assert not heap.check() and calls == []  # fewer than a burst: nothing to give back
    stats.connections_total += 1
    assert heap.check() and calls == [0]
    assert not heap.check() and calls == [0]  # steady count: no second trim
    stats.connections_total += 5000
    assert heap.check() and calls == [0, 0]


def test_without_malloc_trim_it_does_nothing() -> None:
    heap = HeapTrim(BrokerStats(), trim=None)
    heap.trim = None  # a C library without malloc_trim
    heap.stats.connections_total += 10_000
    assert not heap.check()
    heap.start()  # no greenlet to run
    assert heap._greenlet is None
