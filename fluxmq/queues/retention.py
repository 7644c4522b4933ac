"""Retention: deleting a queue's oldest records in the background, a chunk per tick.

A work queue's record is deleted once every group has settled it. ``retention.max_age``,
``max_length_messages`` and ``max_length_bytes`` delete older records even before that (a limit
forces it): such a drop is counted (``retention_dropped``) and logged, never silent.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("fluxmq.queues")

#: records deleted per queue per tick (one chunk of the loop turn's commit)
RETENTION_CHUNK = 1000


def truncate_settled(q) -> int:
    """Delete a work queue's records every group has settled (a chunk); returns how many."""
    qlog = q.log
    groups = q.groups
    if not groups or not qlog.count:
        return 0
    below = min(g.floor for g in groups.values())
    if below <= qlog.first:
        return 0
    return qlog.truncate(below, RETENTION_CHUNK)


def apply_retention(q) -> int:
    """Delete what ``q``'s groups settled and what its limits force out; returns records deleted."""
    qlog = q.log
    if not qlog.count:
        return 0
    groups = q.groups.values()
    stream = q.config.type == "stream"
    # A stream keeps its records for replay: only the limits delete them.
    settled_below = qlog.first if stream else min((g.floor for g in groups), default=qlog.first)
    below = settled_below
    ret = q.config.retention
    forced_below = qlog.first
    if ret.max_length_messages and qlog.count > ret.max_length_messages:
        forced_below = max(forced_below, qlog.next - ret.max_length_messages)
    if ret.max_age:
        cutoff = time.time() - ret.max_age
        off = qlog.first
        while off < qlog.next and off - qlog.first < RETENTION_CHUNK:
            rec = qlog.get(off)
            if rec is not None and rec.timestamp > cutoff:
                break
            off += 1
        forced_below = max(forced_below, off)
    if ret.max_length_bytes and qlog.bytes > ret.max_length_bytes:
        off, excess = qlog.first, qlog.bytes - ret.max_length_bytes
        while excess > 0 and off < qlog.next and off - qlog.first < RETENTION_CHUNK:
            rec = qlog.get(off)
            excess -= rec.size if rec is not None else 0
            off += 1
        forced_below = max(forced_below, off)
    below = max(below, forced_below)
    if below <= qlog.first:
        return 0
    start = qlog.first
    n = qlog.truncate(below, RETENTION_CHUNK)
    forced = 0 if stream else max(0, min(qlog.first, forced_below) - max(start, settled_below))
    if stream and n:
        q.stats["retention_deleted"] += n
        for g in groups:  # a group behind the retained range goes on from the oldest record
            if g.cursor < qlog.first:
                g.cursor = qlog.first
    if forced:
        # Unsettled records a limit pushed out: every group moves past them.
        for g in groups:
            for off in range(max(start, g.floor), qlog.first):
                if not g.is_settled(off):
                    g._release(off)
                    g.settle(off)
        q.stats["retention_dropped"] += forced
        log.warning(
            "queue_retention_dropped",
            extra={
                "queue": q.name,
                "records": forced,
                "reason": "a retention limit forced out unsettled records",
            },
        )
    return n
