"""Walking every session from an HTTP request without stalling the hub.

The admin API and ``/metrics`` read all sessions (100,000 take 15-200 ms to sort or sum in one go),
and they run on the broker's hub, so every client would wait that long. These helpers walk a
snapshot of the sessions in slices of ``SLICE`` and yield to the hub between slices
(``gevent.sleep(0)``): the request takes as long as before, but no other greenlet waits more than
one slice (about a millisecond). Figures: ``bench/RESULTS.md`` ("Hub stalls of admin, metrics and
logging").

Sorted pages never sort everything at once either: each slice is sorted on its own and the sorted
runs are merged lazily (``heapq.merge``), consuming only as far as the page needs.

The results are as consistent as a walk allows: a session that comes or goes during the walk may be
counted or not; gauges and pages are approximate under churn, never wrong about a session seen.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator
from operator import attrgetter
from typing import Any

import gevent

SLICE = 2000  # sessions handled per hub turn (well under a millisecond each for sums and sorts)


def slices(items: list, size: int = SLICE) -> Iterator[list]:
    """``items`` in consecutive slices of ``size``, yielding to the hub before every slice but the first."""
    for start in range(0, len(items), size):
        if start:
            gevent.sleep(0)
        yield items[start : start + size]


def session_totals(sessions: dict) -> tuple[int, int, int, int]:
    """(queued messages, queued bytes, in-flight messages, deepest queue) over every session."""
    queued = queued_bytes = inflight = deepest = 0
    for chunk in slices(list(sessions.values())):
        for session in chunk:
            depth = len(session.queue)
            queued += depth
            queued_bytes += session.queue_bytes
            inflight += len(session.inflight)
            if depth > deepest:
                deepest = depth
    return queued, queued_bytes, inflight, deepest


def sorted_sessions(
    sessions: dict, keep: Callable[[Any], bool] | None = None, after: str | None = None
) -> tuple[int, Iterator[Any]]:
    """(how many sessions ``keep`` accepts, an iterator over those after ``after`` by client id).

    ``keep(session)`` filters (None: all). Only the slices are sorted here; the iterator merges the
    sorted runs as it is consumed, so take what the page needs from it with ``page`` (which yields
    to the hub while it skips). The runs hold the sessions themselves, not (key, session) pairs: a
    pair per session would be 100,000 new objects surviving into the collector's oldest generation
    and trigger a full collection (hundreds of milliseconds) during the walk."""
    runs: list[list[Any]] = []
    total = 0
    for chunk in slices(list(sessions.values())):
        run = [s for s in chunk if keep(s)] if keep is not None else chunk
        total += len(run)
        if after is not None:
            run = [s for s in run if s.client_id > after]
        run.sort(key=_client_id)
        runs.append(run)
    return total, heapq.merge(*runs, key=_client_id)


def page(items: Iterable, offset: int, limit: int) -> list:
    """Items ``offset`` .. ``offset + limit`` of ``items``, yielding to the hub every ``SLICE`` skipped."""
    out = []
    for index, item in enumerate(items):
        if index >= offset + limit:
            break
        if index < offset:
            if index and index % SLICE == 0:
                gevent.sleep(0)
            continue
        out.append(item)
    return out


_client_id = attrgetter("client_id")
