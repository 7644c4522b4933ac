"""FlushScheduler: one socket write per connection per event-loop turn, after the turn's commit.

Handlers and deliveries only append bytes to a connection's output buffer and mark it dirty; once
the running greenlet yields, a single hub callback writes every dirty buffer with one non-blocking
``send``. A publish to N subscribers therefore costs N buffer appends and at most N syscalls per
loop turn however many messages the turn carried, and no greenlet switch per message.

Group commit: with a durable storage the same callback first commits everything the turn recorded
(one LMDB transaction), so a PUBACK/PUBREC/SUBACK/CONNACK leaves only after the state it
acknowledges is committed. ``storage.sync: always`` commits in the hub's threadpool (the commit
includes an fsync) and flushes each dirty connection only up to the bytes it held when its batch
was taken; bytes appended meanwhile wait for the next batch, and a connection's bytes are never
reordered. Other paths that write a socket directly (a slow client's drain, teardown, a broker-side
close) call ``ensure_committed`` or ``settle`` first.
"""

from __future__ import annotations

import logging

import gevent
from gevent.lock import Semaphore

from fluxmq.errors import StorageError

log = logging.getLogger("fluxmq.protocol.flush")


class FlushScheduler:
    """Collects dirty connections and flushes them from one hub callback per loop turn."""

    __slots__ = ("_dirty", "_scheduled", "_loop", "storage", "_always", "_write_lock", "_pool")

    def __init__(self, storage=None) -> None:
        self._dirty: list = []
        self._scheduled = False
        hub = gevent.get_hub()
        self._loop = hub.loop
        # Only a durable storage takes part; the memory backend leaves the flush as it was.
        self.storage = storage if storage is not None and storage.durable else None
        self._always = False
        self._write_lock = None
        self._pool = None
        if self.storage is not None:
            self.storage.on_pending = self._wake
            if getattr(self.storage, "sync_mode", "") == "always":
                self._always = True
                self._write_lock = Semaphore()
                self._pool = hub.threadpool

    def mark(self, conn) -> None:
        """Queue ``conn`` for the next flush (the caller guards against marking twice)."""
        self._dirty.append(conn)
        if not self._scheduled:
            self._scheduled = True
            self._loop.run_callback(self._flush)

    def _wake(self) -> None:
        """The storage buffered the first operation of a batch: commit it this turn even if no
        connection is dirty (a timer, a will, an HTTP publish)."""
        if not self._scheduled:
            self._scheduled = True
            self._loop.run_callback(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        st = self.storage
        if st is not None:
            if self._always:
                if self._write_lock.locked():
                    return  # the writer re-runs the flush once its batch is durable
                if st.has_pending:
                    # Each connection is flushed only up to what it holds now: later bytes may
                    # acknowledge state of the next batch.
                    dirty = [(conn, len(conn.out)) for conn in self._dirty]
                    self._dirty = []
                    gevent.spawn(self._write_then_flush, dirty)
                    return
            elif st.has_pending and not self._commit():
                return
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            try:
                conn.flush_nowait()
            except Exception:  # one broken connection must not stop the others' output
                log.exception("flush_failed", extra={"peer": getattr(conn, "peer", "?")})

    # -- sync: always ----------------------------------------------------------------------------

    def _write_pending(self) -> StorageError | None:
        """Write the pending batch in the threadpool (waits for a write in progress first)."""
        st = self.storage
        error = None
        with self._write_lock:
            batch = st.take_batch()
            if batch is not None:
                ok = False
                try:
                    self._pool.apply(st.write_batch, (batch,))
                    ok = True
                except StorageError as exc:
                    st.failed_commit(exc)
                    error = exc
                finally:
                    st.batch_done(batch, ok)
        if error is not None:
            self._abandon_dirty(error)
        return error

    def _commit(self) -> bool:
        """Commit in the hub (``batch``/``none``); on failure abandon what the dirty connections hold."""
        try:
            self.storage.commit()
            return True
        except StorageError as exc:
            self._abandon_dirty(exc)
            return False

    def _abandon_dirty(self, exc: StorageError) -> None:
        # Every byte queued since the failed batch was taken may acknowledge part of it.
        dirty, self._dirty = self._dirty, []
        self._commit_failed(exc, dirty)

    def _write_then_flush(self, dirty: list) -> None:
        error = self._write_pending()
        if error is not None:
            self._commit_failed(error, [conn for conn, _ in dirty])
        else:
            for conn, n in dirty:
                try:
                    conn.flush_nowait(n)
                except Exception:
                    log.exception("flush_failed", extra={"peer": getattr(conn, "peer", "?")})
        if self._dirty or self.storage.has_pending:
            self._wake()

    # -- for paths that write a socket outside the flush -------------------------------------------

    def settle(self) -> bool:
        """Commit what is pending if that needs no waiting; True when every recorded operation is
        committed (always True without durable storage). Never switches greenlets."""
        st = self.storage
        if st is None:
            return True
        if self._always:
            return not st.has_pending and not self._write_lock.locked()
        return not st.has_pending or self._commit()

    def ensure_committed(self) -> None:
        """Commit (and with ``sync: always`` fsync) every operation recorded so far; may wait (in a
        greenlet, never in the hub). Raises StorageError when the commit fails."""
        st = self.storage
        if st is None:
            return
        if not self._always:
            if st.has_pending and not self._commit():
                raise StorageError("commit failed")
            return
        if st.has_pending or self._write_lock.locked():
            error = self._write_pending()
            if self._dirty:
                self._wake()
            if error is not None:
                raise error

    def _commit_failed(self, exc: StorageError, conns: list) -> None:
        """The batch these connections' output acknowledges is not stored: drop that output unsent
        and close them (5.0: DISCONNECT 0x97), so no client holds an ack for lost state."""
        log.error("commit_failed", extra={"error": str(exc), "connections_closed": len(conns)})
        for conn in conns:
            try:
                conn.abandon_output(0x97, "storage full")
            except Exception:
                log.exception("abandon_failed", extra={"peer": getattr(conn, "peer", "?")})
