"""Give the C heap's free pages back to the system after a burst of connections (glibc ``malloc_trim``).

A CONNECT is served by a greenlet whose stack copies, read buffers and temporaries are freed when
the connection parks, but glibc keeps the freed chunks inside its heap, between the allocations
that stay: after 9,000 connections ``malloc_trim(0)`` gave back ~240 B per parked connection (a
tenth of its footprint) in 8.6 ms (``bench/RESULTS.md``, "50,000 connections on one node"). So
every ``CHECK_EVERY`` seconds, when at least ``TRIM_AFTER`` connections arrived since the last trim,
the process trims once: a hub pause of milliseconds, at most once a check, and none while the
connection count is steady. Without glibc (``malloc_trim`` missing) it does nothing.

Each look also frees the spare output allocations (``_core/outbuf``: up to 4 MiB of blocks that
busy subscribers' outputs pass around) when no output gave or took one since the previous look,
and the spares of each link's forward queue (``_core/forward``: up to 8 batch-sized blocks per
link between workers or nodes) that took and kept none since the previous look, so a worker whose
busy subscribers or links went quiet holds none after ~two looks.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable

import gevent

from fluxmq._core import forward, outbuf
from fluxmq.broker.behind_io import sleep_behind_io

log = logging.getLogger("fluxmq.node")

#: seconds between two looks at the connection counter
CHECK_EVERY = 10.0
#: connections accepted since the last trim that make the next look trim
TRIM_AFTER = 1000


def glibc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None when the C library has none."""
    try:
        # The process's own symbols (the C library is among them): ``ctypes.util.find_library``
        # would fork ``ldconfig -p`` in every worker at its start (~12 ms, and a fork of the worker).
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class HeapTrim:
    """Trims the heap when ``stats.connections_total`` grew by ``after`` since the last trim."""

    def __init__(self, stats, trim: Callable[[int], int] | None = None, every: float = CHECK_EVERY,
                 after: int = TRIM_AFTER) -> None:  # fmt: skip
        self.stats = stats
        self.trim = trim if trim is not None else glibc_malloc_trim()
        self.every = every
        self.after = after
        self._seen = stats.connections_total
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        if self.trim is not None and self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None

    def check(self) -> bool:
        """Trim now if enough connections arrived since the last trim; True if it trimmed."""
        total = self.stats.connections_total
        if self.trim is None or total - self._seen < self.after:
            return False
        self._seen = total
        started = time.perf_counter()
        self.trim(0)
        log.debug(
            "heap_trimmed",
            extra={"connections": total, "took_ms": round((time.perf_counter() - started) * 1e3, 2)},
        )
        return True

    def release_spares(self) -> int:
        """Free the spare output allocations, and the links' forward-queue spares, that were not used
        since the last look; the bytes freed."""
        freed = outbuf.release_unused() + forward.release_unused()
        if freed:
            log.debug("output_spares_released", extra={"bytes": freed})
        return freed

    def _run(self) -> None:
        while True:
            sleep_behind_io(self.every)
            self.check()
            self.release_spares()
