"""HeapTrim: the C heap is trimmed after a burst of connections, not while the count is steady."""

from __future__ import annotations

from fluxmq._core import outbuf
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


def test_spare_output_allocations_no_output_used_are_freed_at_the_second_look() -> None:
    """Busy subscribers left spare output blocks (``_core/outbuf``); once no output gives or takes
    one between two looks, the look frees them."""
    heap = HeapTrim(BrokerStats(), trim=lambda pad: 1)
    outbuf.release()
    try:
        out = bytearray(b"q" * 200_000)
        assert outbuf.keep(out)
        held = outbuf.spare_size()
        heap.release_spares()  # (a spare was kept since the last look: in use)
        assert outbuf.spare_size() == held
        assert heap.release_spares() >= held  # (and any idle forward queue's spares)
        assert outbuf.spare_size() == 0
    finally:
        outbuf.release()


def test_an_idle_links_forward_queue_spares_are_freed_at_the_second_look() -> None:
    """A link that sent large batches keeps their allocations as spares (``_core/forward``); once it
    takes and keeps none between two looks, the look frees them."""
    from collections import deque

    from fluxmq._core.forward import ForwardQueue

    heap = HeapTrim(BrokerStats(), trim=lambda pad: 1)
    runs: deque = deque()
    fq = ForwardQueue(runs, 1 << 20, 1 << 30, 1 << 20, 1 << 30)
    for _ in range(2):
        for i in range(3000):
            fq.append(f"t/{i % 5}", "pub", 0, b"p" * 100)
        fq.seal()
        runs.clear()
    held = fq.spare_bytes()
    assert held > 0
    heap.release_spares()  # (spares kept since the last look: in use)
    assert fq.spare_bytes() == held
    assert heap.release_spares() >= held
    assert fq.spare_bytes() == 0


def test_glibc_malloc_trim_is_found_without_starting_a_process(monkeypatch) -> None:
    """Every worker looks it up at its start: ``ctypes.util.find_library`` ran ``ldconfig -p`` in a
    subprocess (a fork of the worker, ~12 ms); the process's own symbols hold it."""
    import subprocess

    def no_process(*args, **kwargs):
        raise AssertionError(f"a process was started: {args!r}")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    assert glibc_malloc_trim() is not None
