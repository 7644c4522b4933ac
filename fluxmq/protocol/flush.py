"""FlushScheduler: one socket write per connection per event-loop turn.

Handlers and deliveries only append bytes to a connection's output buffer and mark it dirty; once
the running greenlet yields, a single hub callback writes every dirty buffer with one non-blocking
``send``. A publish to N subscribers therefore costs N buffer appends and at most N syscalls per
loop turn however many messages the turn carried, and no greenlet switch per message.
"""

from __future__ import annotations

import logging

import gevent

log = logging.getLogger("fluxmq.protocol.flush")


class FlushScheduler:
    """Collects dirty connections and flushes them from one hub callback per loop turn."""

    __slots__ = ("_dirty", "_scheduled", "_loop")

    def __init__(self) -> None:
        self._dirty: list = []
        self._scheduled = False
        self._loop = gevent.get_hub().loop

    def mark(self, conn) -> None:
        """Queue ``conn`` for the next flush (the caller guards against marking twice)."""
        self._dirty.append(conn)
        if not self._scheduled:
            self._scheduled = True
            self._loop.run_callback(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            try:
                conn.flush_nowait()
            except Exception:  # one broken connection must not stop the others' output
                log.exception("flush_failed", extra={"peer": getattr(conn, "peer", "?")})
