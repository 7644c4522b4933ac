"""FlushScheduler: one socket write per connection per event-loop turn, after the turn's commit.

Handlers and deliveries only append bytes to a connection's output buffer and mark it dirty; once
the running greenlet yields, a single hub callback writes every dirty buffer with one non-blocking
``send``. A publish to N subscribers therefore costs N buffer appends and at most N syscalls per
loop turn however many messages the turn carried, and no greenlet switch per message. The turn's
last reader (a connection about to wait for input when no other watcher is pending in the turn)
runs that flush itself (``flush_now``) instead: the same batch, written before the switch back to
the hub and without dispatching the callback, so a lone message goes out in the turn it came in
with one hop less. Unless its read queued a loop callback (the wake of a link to another worker of
the node, for its first message of a batch): then the callback flushes, after the link has sent the
batch, so the other worker writes its subscribers' share while this one writes its own.

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

from ._hub_read import FlushCore

log = logging.getLogger("fluxmq.protocol.flush")


class FlushScheduler(FlushCore):
    """Collects dirty connections and flushes them once per loop turn: from a hub callback, or from
    the turn's last reader (``flush_now``)."""

    # _dirty, scheduled, _callback, _loop, storage and holding are typed C fields of FlushState
    # (fluxmq/_core/conn_state.pyx, which also holds mark), the base of FlushCore
    # (fluxmq/protocol/_hub_read.pyx: release and the flush without storage).
    __slots__ = (
        "_always",
        "_write_lock",
        "_pool",
        "_retry",
    )

    def __init__(self, storage=None) -> None:
        self._dirty: list = []
        self.scheduled = False  # a flush callback is pending (read by readers: see flush_now)
        self._callback = None  # the loop callback that runs the flush, while one is scheduled
        hub = gevent.get_hub()
        self._loop = hub.loop
        # Only a durable storage takes part; the memory backend leaves the flush as it was.
        self.storage = storage if storage is not None and storage.durable else None
        self._always = False
        self._write_lock = None
        self._pool = None
        self._retry = None  # greenlet that re-runs the flush when a failed commit may be retried
        # True while a hub callback serves a read (MQTTConnection._on_input): marks only queue the
        # connection, and the callback's ``release`` writes the batch or schedules the flush.
        self.holding = False
        if self.storage is not None:
            self.storage.on_pending = self._wake
            if getattr(self.storage, "sync_mode", "") == "always":
                self._always = True
                self._write_lock = Semaphore()
                self._pool = hub.threadpool

    def _wake(self) -> None:
        """The storage buffered the first operation of a batch: commit it this turn even if no
        connection is dirty (a timer, a will, an HTTP publish)."""
        if not self.scheduled and not self.holding:  # held: release() commits it
            self.scheduled = True
            self._callback = self._loop.run_callback(self._flush)

    def flush_now(self) -> None:
        """Run the pending flush here and now instead of in its loop callback.

        For a reader about to wait for input when no other watcher is pending in this loop turn:
        the turn's output (a lone message, its ack) leaves before the switch back to the hub, with
        the same commit-first order, and no callback is dispatched for it. Called from the hub's
        last ready connection, it batches the same writes the callback would have."""
        callback = self._callback
        if callback is not None:
            callback.stop()
            try:
                self._flush()
            except Exception:  # another connection's trouble must not end the calling reader
                log.exception("flush_failed", extra={"peer": "-"})

    # mark(conn) (FlushState's), release(last) and _flush() (FlushCore's): in C. _flush runs _flush_stored when a
    # durable storage takes part.

    def _flush_stored(self) -> None:
        """The flush with a durable storage: the turn's commit first (see the module docstring)."""
        st = self.storage
        if st is not None:
            if self._always and self._write_lock.locked():
                return  # the writer re-runs the flush once its batch is durable
            if st.has_pending:
                if not st.retry_due():
                    # A failed batch waits for its retry: output acknowledging it cannot leave.
                    self._abandon_stakes(st.last_error, self._dirty)
                    self._retry_later()
                elif self._always:
                    # Each connection is flushed only up to what it holds now: later bytes may
                    # acknowledge state of the next batch.
                    dirty = [(conn, len(conn.out)) for conn in self._dirty]
                    self._dirty = []
                    gevent.spawn(self._write_then_flush, dirty)
                    return
                else:
                    self._commit()
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
                try:
                    st.write_taken(batch, self._pool.apply)
                except StorageError as exc:
                    error = exc
        if error is not None:
            self._abandon_stakes(error, self._dirty)
            self._retry_later()
        return error

    def _commit(self) -> bool:
        """Commit in the hub (``batch``/``none``); on failure abandon the output that acknowledges
        the failed batch (it is kept and retried after a back-off)."""
        st = self.storage
        try:
            st.commit()
            return True
        except StorageError as exc:
            self._abandon_stakes(exc, self._dirty)
            self._retry_later()
            return False

    def _abandon_stakes(self, exc: StorageError | None, conns: list) -> None:
        """Drop the unsent output of the connections in ``conns`` that acknowledges part of the
        pending (failed) batch, and close them (5.0: DISCONNECT 0x97); the others keep theirs.

        A connection is at stake when the batch holds an operation of its client id (its session,
        subscriptions, QoS 1/2 state, queue, will) or when it acknowledged a message the batch
        stores for others (``Storage.note_stake``): a clean QoS 0 subscriber never is."""
        if not conns:
            return
        stakes = self.storage.stake_clients()
        doomed = [c for c in conns if getattr(c, "client_id", None) in stakes]
        if not doomed:
            return
        if conns is self._dirty:
            gone = set(map(id, doomed))
            self._dirty = [c for c in conns if id(c) not in gone]
        self._commit_failed(exc or StorageError("commit failed"), doomed)

    def _retry_later(self) -> None:
        """Run a flush when the failed batch's back-off ends, so it is retried even if idle."""
        if self._retry is None:
            delay = self.storage.retry_in()
            self._retry = gevent.spawn_later(delay + 0.001, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        if self.storage.has_pending:
            self._wake()

    def _write_then_flush(self, dirty: list) -> None:
        error = self._write_pending()
        stakes: set[str] = set()
        if error is not None:
            stakes = self.storage.stake_clients()
            doomed = [conn for conn, _ in dirty if getattr(conn, "client_id", None) in stakes]
            if doomed:
                self._commit_failed(error, doomed)
        for conn, n in dirty:
            if stakes and getattr(conn, "client_id", None) in stakes:
                continue  # abandoned above
            try:
                conn.flush_nowait(n)
            except Exception:
                log.exception("flush_failed", extra={"peer": getattr(conn, "peer", "?")})
        if self._dirty or (self.storage.has_pending and self.storage.retry_due()):
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
        return not st.has_pending or (st.retry_due() and self._commit())

    def ensure_committed(self, conn=None) -> None:
        """Commit (and with ``sync: always`` fsync) every operation recorded so far; may wait (in a
        greenlet, never in the hub). Raises StorageError when the commit fails, or while a failed
        commit waits for its retry, unless ``conn`` (whose output is about to be written) has
        nothing at stake in the failed batch."""
        st = self.storage
        if st is None:
            return
        try:
            self._ensure_committed()
        except StorageError:
            if conn is not None and getattr(conn, "client_id", None) not in st.stake_clients():
                return  # its output acknowledges nothing the failed batch holds
            raise

    def _ensure_committed(self) -> None:
        st = self.storage
        if st.has_pending and not st.retry_due():
            raise st.last_error or StorageError("commit failed")
        if not self._always:
            if st.has_pending and not self._commit():
                raise st.last_error or StorageError("commit failed")
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
