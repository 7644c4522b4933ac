"""LMDBStorage: the durable backend, one LMDB environment under ``storage.path``.

The sub-databases and their keys are described in ``lmdb_layout``; ``lmdb_env`` opens them and
``lmdb_batch`` holds the operations buffered between commits.

Writes are buffered per key (the last operation on a key wins) and applied in one write
transaction by ``commit``.

Outbound QoS 1/2 of a persistent session: each message is a queue entry. Sending it (from the
queue, or at once when the queue is empty) only sets its packet id's slot in a ``sent`` record,
which the commit writes once per 16 packet ids however many messages the batch sent (schema 3).
Schema 4: the entries a client stored since the last commit are written as one record (segments
of about SEGMENT_BYTES), and an entry acknowledged or taken out of the queue is marked in the
client's ``done`` record, written once per commit, instead of deleted; a record goes (``_trim``)
once all of its seqs are done. An entry done before its first commit is never written. The
``inflight`` records of schema 2 (a full copy per packet id) are still read and deleted, no
longer written; the one-entry records of schema 3 read as records of one entry.
Nothing outside ``fluxmq.storage`` touches LMDB.

Durability (``storage.sync``): ``always`` opens the environment with synchronous commits and the
FlushScheduler runs each commit in the hub's threadpool (``write_batch``), so the hub never waits
for an fsync; ``batch`` and ``none`` commit in the hub without fsync (a killed process loses nothing
committed: the pages are in the kernel's page cache), ``batch`` adding an ``env.sync`` every
``storage.sync_interval`` in the threadpool. See docs/storage.rst.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import lmdb

from fluxmq._core.sent import SentState, SentTable
from fluxmq._core.sent import trim as _trim_queue
from fluxmq.errors import StorageError

from . import records as r
from .base import Storage, StoredQueue, StoredSession, StoredState
from .lmdb_batch import _MISSING, _Batch, _View
from .lmdb_env import lock_directory, make_directory, open_dbs, open_environment, where
from .lmdb_layout import (
    _CLIENT_DBS,
    _F64,
    _GC_PREFIX,
    _PEER_BATCH,
    _PEER_PREFIX,
    _STATE_DBS,
    DONE,
    INBOUND,
    INFLIGHT,
    MAGIC,
    META,
    QUEUE,
    QUEUES,
    RETAINED,
    SCHEMA_VERSION,
    SENT,
    SESSIONS,
    SUBS,
    WILLS,
)

log = logging.getLogger("fluxmq.storage")

#: bytes of entries in one ``queue`` segment (LMDB keeps a value up to about 2 KB in its leaf page)
SEGMENT_BYTES = 1536
#: queue entries of ended sessions deleted per commit (~1 ms)
GC_CHUNK = 1000
#: commits between two trims of the ``queue`` records all of whose seqs are done, while their
#: sessions keep live entries (a session whose entries are all done is trimmed by the same commit).
#: A trim dirties the leftmost leaf pages of ``queue`` and LMDB's free list: each costs a page
#: write (``pwrite``) at the commit, once per loop turn under a steady flow when done each time.
TRIM_EVERY = 16

_SEQ = struct.Struct(">Q")
SYNC_MODES = ("always", "batch", "none")


class StorageFull(StorageError):
    """The store reached ``storage.map_size`` or the disk is full; new stored messages are refused."""


class _MapFull(StorageFull):
    """The batch did not fit the LMDB map (``storage.map_size`` plus headroom): growing it helps."""


#: back-off between retries of a failed commit (doubles per failure, up to the maximum)
RETRY_FIRST = 0.05
RETRY_MAX = 5.0


#: One client's queue seq space in the store: packet ids in flight as queue entries (``sent``
#: records, schema 3), the entries stored since the last take_batch (written as one ``queue``
#: record per client per commit, schema 4) and the seqs that are done (acknowledged or popped:
#: every seq below ``floor`` and in ``ranges``; the ``done`` record, schema 4). In C
#: (``fluxmq._core.sent``): its per-message operations run without a Python frame.
_Sent = SentState


_BIG = 1 << 64


def _covered(floor: int, ranges: list, start: int, end: int) -> bool:
    """Every seq of ``[start, end)`` is below ``floor`` or in one of the done ``ranges``."""
    start = max(start, floor)
    if start >= end:
        return True
    i = bisect.bisect_right(ranges, (start, _BIG))
    return bool(i) and ranges[i - 1][1] >= end


#: free disk space below which a failed commit is reported as a full disk
DISK_LOW = 16 << 20
MiB = 1 << 20
#: the usage (``env.info()``) is read after at most this many commits, every commit near map_size
USAGE_EVERY = 64
#: the least growth per commit assumed when spacing those reads (pages a small commit may add)
USAGE_STEP = 64 << 10


def _free_bytes(path: Path) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return 1 << 62
    return st.f_bavail * st.f_frsize


def _fmt_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}GiB"


class LMDBStorage(Storage):
    """The LMDB backend (see the module docstring for layout and durability)."""

    durable = True

    def __init__(
        self,
        path: str | os.PathLike,
        map_size: int = 1 << 30,
        sync: str = "batch",
        sync_interval: float = 1.0,
        verify: bool = True,
    ) -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"storage sync mode {sync!r}")
        self.path = Path(path)
        self.sync_mode = sync
        self.sync_interval = sync_interval
        self.map_size = map_size
        self.verify = verify
        # Room above map_size so the batch that crosses the limit still commits; from then on new
        # stored messages are refused until space is freed.
        self.headroom = max(8 << 20, map_size // 16)
        self.refusing = False
        # the usage is read again after _usage_span commits (_check_usage sets it: _note_usage)
        self._usage_used = 0
        self._usage_span = 1
        self._usage_commits = 0
        self.failed: str | None = None
        self.last_error: StorageError | None = None  # of the latest failed commit, until one succeeds
        self._failures = 0  # consecutive failed commits (their batch is kept and retried)
        self._stakes_cache: tuple | None = None
        self._retry_at = 0.0
        self._batch = _Batch()
        self._writing: _Batch | None = None  # batch being written by write_batch in a thread
        self._gc: dict[str, int] = {}  # client id -> queue seqs below this are garbage, being deleted
        self._prefixes: dict[str, bytes] = {}  # client id -> records.client_prefix (bounded)
        # client prefix -> its done (floor, ranges) for the next trim (_write_sent), and the
        # commits taken since the last one
        self._trims: dict[bytes, tuple[int, list]] = {}
        self._takes = 0
        # operations recorded by this object's own methods; ``op_count`` adds the table's (``ops``,
        # a C field: the relay reads both, without the property's frame)
        self.direct_ops = 0
        self.has_pending = False
        # client id -> its queue seq space (only clients that have entries or packet ids in it)
        table = self._table = self.sent_table = SentTable(self, self._prefix)  # (the relay calls it in C)
        table.dirty = self._batch.sent_dirty
        self._sent: dict[str, _Sent] = table.states
        # The record methods that run once or twice per message of a persistent session: the C
        # ones, bound on the instance (the methods of the same names below only forward to them).
        self.put_sent = table.put_sent
        self.put_sent_entry = table.put_sent_entry
        self.release_inflight = table.release_inflight
        self.delete_inflight = table.delete_inflight
        self.queue_append = table.queue_append
        self.queue_pop = table.queue_pop
        self._background = None
        self._closing = False
        self._syncing = False
        # Keys of the stored sessions recorded online (disconnected_at 0): only they read "last
        # alive" at a restart, so the background tick writes it only while there are some.
        self._online: set[bytes] = set()
        # A commit landed since the last fsync: the batch-mode tick has something to sync.
        self._unsynced = False
        self._lock_file = None
        self._queue_log = None
        self.env = None
        try:
            make_directory(self.path)
            self._lock_file = lock_directory(self.path)
            self.env = open_environment(self.path, map_size + self.headroom, sync == "always", verify)
            self._dbs = open_dbs(self.env, self.path)
            self._psize = self.env.stat()["psize"]
            self._check_usage(at_start=True)
        except BaseException:
            if self.env is not None:
                self.env.close()
            self._unlock()
            raise

    def _where(self) -> str:
        return where(self.path)

    def _unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # -- usage and the refusal flag ----------------------------------------------------------------

    def used_bytes(self) -> int:
        """Bytes of live pages (an upper bound, cheap while far from the limit)."""
        high = (self.env.info()["last_pgno"] + 1) * self._psize
        if high < self.map_size:
            return high
        # The high-water mark counts freed pages LMDB will reuse: count the live ones instead.
        pages = 4  # two meta pages, main and free database roots
        with self.env.begin() as txn:
            for db in self._dbs:
                st = txn.stat(db)
                pages += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        return pages * self._psize

    def _check_usage(self, at_start: bool = False) -> None:
        used = self.used_bytes()
        self._note_usage(used)
        if at_start and used >= self.map_size:
            # The node must start and serve what it holds: open with room above the data, refuse
            # new stored messages until usage drops (deletes free pages), and say what to raise.
            self._grow_map(used + self.headroom)
            raise_to = -(-used * 3 // 2 // MiB) * MiB
            log.error(
                "storage_over_map_size",
                extra={
                    "path": str(self.path),
                    "used": _fmt_size(used),
                    "map_size": _fmt_size(self.map_size),
                    "key": "storage.map_size",
                    "raise_to": raise_to,
                    "effect": f"new stored messages are refused; raise storage.map_size to {_fmt_size(raise_to)} "
                    "or more, or delete stored data",
                },
            )
            self._set_refusing(True, f"the stored data ({_fmt_size(used)}) is over storage.map_size")
            return
        if used >= self.map_size:
            self._set_refusing(
                True, f"storage.map_size {_fmt_size(self.map_size)} reached ({_fmt_size(used)} used)"
            )
        elif self.refusing and used < self.map_size * 0.9 and self.failed is None and not self._failures:
            self._set_refusing(False, "")

    def _note_usage(self, used: int) -> None:
        """When to read the usage next (``batch_done`` counts the commits; every commit while
        refusing): after the commits that could fill a quarter of the room left below map_size at
        the growth per commit seen since the last read (at least USAGE_STEP), at most USAGE_EVERY;
        so every commit near map_size, and the refusal comes before a steady load passes map_size
        by more than a quarter of what was left (the headroom takes it)."""
        grown = max(used - self._usage_used, 0) // max(self._usage_commits, 1)
        self._usage_used = used
        self._usage_commits = 0
        span = (self.map_size - used) // (4 * max(grown, USAGE_STEP))
        self._usage_span = min(max(span, 1), USAGE_EVERY)

    def _grow_map(self, size: int) -> bool:
        """Resize the LMDB map to ``size`` (hub, no transaction open); False when it cannot grow."""
        current = self.env.info()["map_size"]
        if size <= current:
            return False
        try:
            self.env.set_mapsize(size)
        except lmdb.Error as exc:
            log.error("storage_map_grow_failed", extra={"path": str(self.path), "error": str(exc)})
            return False
        self._usage_span = 0  # a batch overflowed the headroom: the usage is read after it
        log.warning(
            "storage_map_grown",
            extra={
                "path": str(self.path),
                "from": _fmt_size(current),
                "to": _fmt_size(size),
                "map_size": _fmt_size(self.map_size),
            },
        )
        return True

    def _grow_for(self, batch: _Batch) -> bool:
        """A batch did not fit the map: grow it to take the batch (twice its bytes, for pages and
        the copy-on-write tree), bounded by the free disk space. False when it cannot grow."""
        current = self.env.info()["map_size"]
        want = max(current * 2, current + 4 * batch.size_bytes())
        data = self.path / "data.mdb"
        try:
            file_size = data.stat().st_size
        except OSError:
            file_size = 0
        room = _free_bytes(self.path) - DISK_LOW
        want = min(want, file_size + room)
        return self._grow_map(want)

    def _set_refusing(self, on: bool, why: str) -> None:
        if on == self.refusing:
            return
        self.refusing = on
        if on:
            log.error(
                "storage_full",
                extra={
                    "path": str(self.path),
                    "reason": why,
                    "effect": "new stored messages are refused (0x97)",
                },
            )
        else:
            log.warning("storage_space_available", extra={"path": str(self.path)})

    # -- buffering (hub only; never does I/O) ------------------------------------------------------

    @property
    def op_count(self) -> int:
        return self.direct_ops + self._table.ops

    @op_count.setter
    def op_count(self, value: int) -> None:
        self.direct_ops = value - self._table.ops

    def _put(self, db: int, key: bytes, value: bytes | None) -> None:
        self._batch.ops[db][key] = value
        self.direct_ops += 1
        if not self.has_pending:
            self.has_pending = True
            cb = self.on_pending
            if cb is not None:
                cb()

    def _delete_prefix(self, dbs, prefix: bytes) -> None:
        batch = self._batch
        for db in dbs:
            ops = batch.ops[db]
            if ops:  # drop buffered writes the prefix delete supersedes
                for key in [k for k in ops if k.startswith(prefix)]:
                    del ops[key]
            batch.prefix_deletes.append((db, prefix))
        self.direct_ops += 1
        if not self.has_pending:
            self.has_pending = True
            cb = self.on_pending
            if cb is not None:
                cb()

    def put_session(
        self, client_id: str, expiry_interval: int, disconnected_at: float, username: str | None
    ) -> None:
        key = client_id.encode()
        self._put(SESSIONS, key, r.encode_session(expiry_interval, disconnected_at, username))
        if disconnected_at:
            self._online.discard(key)
        else:
            # Online from this commit on: it carries a fresh "last alive", so a crash before the next
            # tick still counts the session gone at most storage.sync_interval before it.
            self._online.add(key)
            self.touch_alive()

    def delete_session(self, client_id: str, queue_next: int = 0) -> None:
        key = client_id.encode()
        self._online.discard(key)
        self._put(SESSIONS, key, None)
        self._put(WILLS, key, None)
        self._delete_prefix(_CLIENT_DBS, r.client_prefix(client_id))
        self._forget_sent(client_id)
        self._gc_queue(client_id, queue_next)

    def clear_session_state(self, client_id: str, queue_next: int = 0) -> None:
        self._delete_prefix(_STATE_DBS, r.client_prefix(client_id))
        self._forget_sent(client_id)
        self._gc_queue(client_id, queue_next)

    def _forget_sent(self, client_id: str) -> None:
        # The prefix delete removes the client's ``sent`` records; a batch still naming the
        # emptied object then finds nothing to write.
        state = self._table.drop(client_id)
        if state is not None:
            state.forget()
            self._trims.pop(state.prefix, None)  # (its records go by prefix or as garbage)

    def _gc_queue(self, client_id: str, end: int) -> None:
        """Mark the client's queue entries below ``end`` as garbage: recorded durably now, deleted a
        chunk per commit, so ending a session with a long queue never stalls the event loop. A new
        queue for the client starts at ``queue_floor`` (>= end), so it never meets the garbage."""
        prefix = r.client_prefix(client_id)
        ops = self._batch.ops[QUEUE]
        if ops:
            for key in [k for k in ops if k.startswith(prefix)]:
                del ops[key]
        end = max(end, self._gc.get(client_id, 0))
        if end <= 0:
            return
        self._gc[client_id] = end
        self._put(META, _GC_PREFIX + client_id.encode(), _SEQ.pack(end))

    def queue_floor(self, client_id: str) -> int:
        """The first seq a new queue of ``client_id`` may use (above any garbage still on disk)."""
        return self._gc.get(client_id, 0)

    def put_subscription(
        self,
        client_id: str,
        filter: str,
        qos: int,
        no_local: bool,
        retain_as_published: bool,
        retain_handling: int,
        subscription_id: int,
    ) -> None:
        self._put(
            SUBS,
            r.client_prefix(client_id) + filter.encode(),
            r.encode_subscription(qos, no_local, retain_as_published, retain_handling, subscription_id),
        )

    def delete_subscription(self, client_id: str, filter: str) -> None:
        self._put(SUBS, r.client_prefix(client_id) + filter.encode(), None)

    def put_inflight(
        self, client_id: str, packet_id: int, message, qos: int, retain: bool, subscription_ids
    ) -> None:
        self._put(
            INFLIGHT,
            r.pid_key(r.client_prefix(client_id), packet_id),
            r.encode_entry(message, qos, retain, subscription_ids),
        )

    def _prefix(self, client_id: str) -> bytes:
        prefix = self._prefixes.get(client_id)
        if prefix is None:
            if len(self._prefixes) >= 4096:
                self._prefixes.clear()
            prefix = self._prefixes[client_id] = r.client_prefix(client_id)
        return prefix

    def _sent_state(self, client_id: str) -> _Sent:
        return self._table.state(client_id)

    # The per-message record methods: __init__ binds the C ones (fluxmq._core.sent.SentTable) on
    # the instance; these forward to them, and the table falls back to the _*_record methods for
    # what is not in a client's seq space.

    def put_sent(self, client_id: str, packet_id: int, seq: int) -> None:
        self._table.put_sent(client_id, packet_id, seq)

    def put_sent_entry(self, client_id: str, packet_id: int, seq: int, entry: bytes) -> None:
        self._table.put_sent_entry(client_id, packet_id, seq, entry)

    def release_inflight(self, client_id: str, packet_id: int) -> None:
        self._table.release_inflight(client_id, packet_id)

    def delete_inflight(self, client_id: str, packet_id: int) -> None:
        self._table.delete_inflight(client_id, packet_id)

    def queue_append(self, client_id: str, seq: int, entry: bytes) -> None:
        self._table.queue_append(client_id, seq, entry)

    def queue_pop(self, client_id: str, seq: int) -> None:
        self._table.queue_pop(client_id, seq)

    def _release_inflight_record(self, client_id: str, packet_id: int) -> None:
        key = r.pid_key(r.client_prefix(client_id), packet_id)  # a schema 2 record
        value = self._read(INFLIGHT, key)
        if value is not None:
            self._put(INFLIGHT, key, r.mark_released(value))

    def _delete_inflight_record(self, client_id: str, packet_id: int) -> None:
        self._put(INFLIGHT, r.pid_key(r.client_prefix(client_id), packet_id), None)

    def _queue_pop_record(self, client_id: str, seq: int) -> None:
        self._put(QUEUE, r.seq_key(self._prefix(client_id), seq), None)

    def put_inbound_qos2(self, client_id: str, packet_id: int) -> None:
        self._put(INBOUND, r.pid_key(r.client_prefix(client_id), packet_id), b"")

    def delete_inbound_qos2(self, client_id: str, packet_id: int) -> None:
        self._put(INBOUND, r.pid_key(r.client_prefix(client_id), packet_id), None)

    def queue_read(self, client_id: str, seqs) -> list:
        """The entries at ``seqs`` (None where there is none, or it is done)."""
        state = self._sent.get(client_id)
        out: list = []
        missing: list[int] = []
        for i, seq in enumerate(seqs):
            if state is not None:
                if state.is_done(seq):
                    out.append(None)
                    continue
                entry = state.unwritten_entry(seq)
                if entry is not None:
                    out.append(entry)
                    continue
            out.append(None)
            missing.append(i)
        if missing:
            prefix = self._prefix(client_id)
            with self.env.begin(db=self._dbs[QUEUE]) as txn:
                cur = txn.cursor()
                start = end = -1
                entries: list = []
                for i in missing:
                    seq = seqs[i]
                    if not start <= seq < end:
                        start, entries = _record_at(cur, prefix, seq)
                        end = start + len(entries)
                    if start <= seq < end:
                        out[i] = bytes(entries[seq - start])
        return out

    def put_retained(self, topic: str, message) -> None:
        self._put(RETAINED, topic.encode(), r.encode_message(message))

    def delete_retained(self, topic: str) -> None:
        self._put(RETAINED, topic.encode(), None)

    def put_will(self, client_id: str, message, delay: int) -> None:
        self._put(WILLS, client_id.encode(), r.encode_will(message, delay))

    def delete_will(self, client_id: str) -> None:
        self._put(WILLS, client_id.encode(), None)

    def touch_alive(self) -> None:
        self._put(META, b"last_alive", _F64.pack(time.time()))

    def put_peer_batch(self, sender: str, epoch: int, seq: int) -> None:
        self._put(META, _PEER_PREFIX + sender.encode(), _PEER_BATCH.pack(epoch, seq))

    def queue_log(self):
        """The durable queues' log store, written through this backend's batch (queue_log.py)."""
        if self._queue_log is None:
            from .queue_log import LMDBQueueLog

            self._queue_log = LMDBQueueLog(self, QUEUES)
        return self._queue_log

    def has_queue_data(self) -> bool:
        with self.env.begin() as txn:
            return txn.stat(self._dbs[QUEUES])["entries"] > 0

    # -- reads (buffered operations first, then the batch being written, then LMDB) ----------------

    def _read(self, db: int, key: bytes) -> bytes | None:
        return self._read_many(db, [key])[0]

    def _read_many(self, db: int, keys: list[bytes]) -> list:
        out: list = []
        pending = self._batch.ops[db]
        writing = self._writing.ops[db] if self._writing is not None else None
        txn = None
        try:
            for key in keys:
                value = pending.get(key, _MISSING)
                if value is _MISSING and writing is not None:
                    value = writing.get(key, _MISSING)
                if value is _MISSING:
                    if txn is None:
                        txn = self.env.begin(db=self._dbs[db])
                    value = txn.get(key)
                out.append(value)
        finally:
            if txn is not None:
                txn.abort()
        return out

    def _view(self, db: int) -> _View:
        """A reader of ``db`` as it is now, which later writes do not change (see ``_View``)."""
        pending = self._batch.ops[db]
        over = dict(self._writing.ops[db]) if self._writing is not None else {}
        over.update(pending)
        return _View(self.env.begin(db=self._dbs[db]), over)

    # -- commit ------------------------------------------------------------------------------------

    def take_batch(self) -> _Batch | None:
        """Detach the buffered operations for ``write_batch`` (hub); None when there are none."""
        if not self.has_pending:
            return None
        batch, self._batch = self._batch, _Batch()
        self.has_pending = False
        self._table.dirty = self._batch.sent_dirty
        self._table.woken = False
        if batch.sent_dirty:
            self._write_sent(batch)
        if self._gc:
            batch.gc = next(iter(self._gc.items()))
        self._writing = batch  # reads look here until batch_done (only the hub touches it)
        return batch

    def _write_sent(self, batch: _Batch) -> None:
        """Turn the batch's changed ``sent`` records, staged entries and done marks into operations
        (hub, at take_batch): per client one ``queue`` record of the entries stored since the last
        batch (segments of about SEGMENT_BYTES, small enough for LMDB to keep them in its leaf
        pages, whose headers it checks, instead of overflow pages; those already done left out),
        its ``done`` record and its changed ``sent`` records. In C (``SentTable.take_ops``), the
        records laid out as ``records`` defines them."""
        ops = batch.ops
        trims = self._trims  # (the latest done marks of each client: they only grow)
        emptied = self._table.take_ops(
            batch.sent_dirty, ops[QUEUE], ops[SENT], ops[DONE], trims, batch.logs, batch, SEGMENT_BYTES
        )
        batch.sent_dirty = set()
        self._takes += 1
        if trims and (emptied or self._takes >= TRIM_EVERY):
            # All-done records go with this commit: every TRIM_EVERY commits, or at once when a
            # client's entries are all done. Until then they stay, marked done in the ``done``
            # record (a restart skips them; the next trim after it deletes them).
            batch.trims = trims
            self._trims = {}
            self._takes = 0

    def write_taken(self, batch: _Batch, run: Callable | None = None) -> None:
        """Write a batch from ``take_batch`` and finish it (hub). ``run(fn, args)`` runs the write
        (the threadpool's ``apply`` under ``sync: always``). A batch that does not fit the map grows
        it and is written again; any other failure keeps the batch for the next commit (it is
        merged under what was recorded since) and raises StorageError."""
        ok = False
        try:
            while True:
                try:
                    if run is None:
                        self.write_batch(batch)
                    else:
                        error = run(self._write_returning_error, (batch,))
                        if error is not None:
                            raise error
                    ok = True
                    return
                except _MapFull:
                    # In the hub with no transaction open (the write returned): safe to remap.
                    if not self._grow_for(batch):
                        raise
        except StorageError as exc:
            self.failed_commit(exc)
            raise
        finally:
            self.batch_done(batch, ok)

    def write_batch(self, batch: _Batch) -> None:
        """Apply ``batch`` in one write transaction; safe to run in a threadpool thread.

        Raises StorageFull (map size or disk full) or StorageError; the batch is then not applied.
        """
        dbs = self._dbs
        try:
            with self.env.begin(write=True) as txn:
                for db, prefix in batch.prefix_deletes:
                    cur = txn.cursor(dbs[db])
                    if cur.set_range(prefix):
                        while cur.key().startswith(prefix):
                            if not cur.delete():
                                break
                for db, ops in enumerate(batch.ops):
                    if not ops:
                        continue
                    handle = dbs[db]
                    puts = [(k, v) for k, v in ops.items() if v is not None]
                    if puts:
                        txn.cursor(handle).putmulti(puts)
                    if len(puts) != len(ops):
                        # One cursor: deletes of consecutive keys (a queue drained in order) step
                        # along instead of seeking each key (about half the cost).
                        cur = txn.cursor(handle)
                        at, seek, delete = cur.key, cur.set_key, cur.delete
                        for k in [k for k, v in ops.items() if v is None]:
                            if at() == k or seek(k):
                                delete()
                if batch.trims:
                    self._trim(txn, batch.trims)
                if batch.gc is not None:  # after the ops: it may delete a gc mark they wrote
                    batch.gc_done = self._gc_chunk(txn, *batch.gc)
        except lmdb.MapFullError:
            raise _MapFull(f"{self._where()}: storage.map_size reached") from None
        except lmdb.Error as exc:
            # A full disk surfaces as ENOSPC or, from LMDB's page writes, as EIO: ask the file system.
            free = _free_bytes(self.path)
            if errno.ENOSPC == getattr(exc, "errno", None) or "space" in str(exc) or free < DISK_LOW:
                raise StorageFull(f"{self._where()}: disk full ({_fmt_size(free)} free)") from None
            raise StorageError(f"{self._where()}: commit failed: {exc}") from None

    def _write_returning_error(self, batch: _Batch) -> StorageError | None:
        # In a threadpool thread: an exception raised there would also be printed by gevent.
        try:
            self.write_batch(batch)
        except StorageError as exc:
            return exc
        return None

    def _trim(self, txn, trims: dict[bytes, tuple[int, list]]) -> None:
        """Delete the ``queue`` records whose seqs are all done (a client's records are in seq
        order and apart: from its first one up to the first with a live seq; with done ranges
        above the floor, on up to the end of the last range). In C (``_core.sent.trim``)."""
        _trim_queue(txn.cursor(self._dbs[QUEUE]), trims)

    def _gc_chunk(self, txn, client_id: str, end: int) -> bool:
        """Delete up to GC_CHUNK garbage queue entries of ``client_id``; True when none is left."""
        prefix = r.client_prefix(client_id)
        stop = r.seq_key(prefix, end)
        cur = txn.cursor(self._dbs[QUEUE])
        n = 0
        if cur.set_range(prefix):
            while n < GC_CHUNK:
                key = cur.key()
                if not key.startswith(prefix) or key >= stop:
                    break
                if not cur.delete():
                    break
                n += 1
            else:
                return False
        txn.delete(_GC_PREFIX + client_id.encode(), db=self._dbs[META])
        return True

    def batch_done(self, batch: _Batch, ok: bool = True) -> None:
        """Called after ``write_batch`` (hub): reads stop looking at the batch; usage is re-checked.
        A failed batch goes back under the pending operations, so the next commit retries it."""
        if self._writing is batch:
            self._writing = None
        if ok:  # its segments are on disk now: reads find them there
            for state in batch.logs:
                state.unwritten = [u for u in state.unwritten if u[0] is not batch]
            batch.logs = []
        callbacks = batch.callbacks
        batch.callbacks = []
        if ok:
            if self._failures:
                log.warning(
                    "storage_commit_recovered", extra={"path": str(self.path), "failures": self._failures}
                )
                self._failures = 0
                self.last_error = None
            if batch.gc is not None:
                cid, end = batch.gc
                if batch.gc_done and self._gc.get(cid) == end:
                    del self._gc[cid]
            if self._gc and not self.has_pending:
                self._wake()  # the next chunk of garbage goes with the next commit
            self._unsynced = True
            self._usage_commits += 1
            if self._usage_commits >= self._usage_span or self.refusing:
                self._check_usage()
            error = None
        else:
            error = self.last_error or StorageError(f"{self._where()}: commit failed")
            batch.merge_newer(self._batch)
            self._batch = batch
            self._table.dirty = batch.sent_dirty
            if not self.has_pending:
                self.has_pending = True  # not _wake: the FlushScheduler retries after the back-off
        for callback in callbacks:
            try:
                callback(error)
            except Exception:
                log.exception("after_commit_callback_failed")

    def _wake(self) -> None:
        self.has_pending = True
        cb = self.on_pending
        if cb is not None:
            cb()

    def commit(self) -> None:
        batch = self.take_batch()
        if batch is not None:
            self.write_taken(batch)

    def failed_commit(self, exc: StorageError) -> None:
        """A commit failed: its batch is kept and retried after a back-off; new stored messages are
        refused until a commit succeeds (and, when full, until space comes back)."""
        self.last_error = exc
        self._failures += 1
        delay = min(RETRY_MAX, RETRY_FIRST * (1 << min(self._failures - 1, 16)))
        self._retry_at = time.monotonic() + delay
        log.error(
            "storage_commit_failed",
            extra={
                "path": str(self.path),
                "error": str(exc),
                "failures": self._failures,
                "retry_in": delay,
                "pending": len(self._batch),
            },
        )
        self._set_refusing(True, str(exc))

    def retry_due(self) -> bool:
        return not self._failures or time.monotonic() >= self._retry_at

    def retry_in(self) -> float:
        """Seconds until a failed commit may be retried (0 when none failed)."""
        return max(0.0, self._retry_at - time.monotonic()) if self._failures else 0.0

    def after_commit(self, callback: Callable[[Exception | None], None]) -> None:
        if self.has_pending:
            self._batch.callbacks.append(callback)
        elif self._writing is not None:
            self._writing.callbacks.append(callback)
        else:
            callback(None)

    def note_stake(self, client_id: str) -> None:
        self._batch.stakes.add(client_id)

    def stake_clients(self) -> set[str]:
        # Asked every flush turn while a failed batch waits for its retry: rebuilt only when new
        # operations (or stakes) were recorded since.
        key = (id(self._batch), self.op_count, len(self._batch.stakes))
        if self._stakes_cache is None or self._stakes_cache[0] != key:
            self._stakes_cache = (key, self._batch.clients())
        return self._stakes_cache[1]

    def sync(self) -> None:
        if self.sync_mode != "none":
            self.env.sync(True)

    def abort(self) -> None:
        """Close without committing what is buffered: what a killed process leaves behind (tests)."""
        self.env.close()
        self._unlock()

    # -- load --------------------------------------------------------------------------------------

    def load(self) -> StoredState:
        """Read everything back (at start, before any client connects)."""
        state = StoredState()
        sessions = state.sessions
        bad = 0
        dbs = self._dbs
        try:
            with self.env.begin() as txn:
                raw = txn.get(b"last_alive", db=dbs[META])
                if raw is not None and len(raw) == 8:
                    state.last_alive = _F64.unpack(raw)[0]
                cur = txn.cursor(dbs[META])
                if cur.set_range(_GC_PREFIX):
                    for key, value in cur:
                        if not key.startswith(_GC_PREFIX):
                            break
                        self._gc[bytes(key[len(_GC_PREFIX) :]).decode()] = _SEQ.unpack(value)[0]
                if cur.set_range(_PEER_PREFIX):
                    for key, value in cur:
                        if not key.startswith(_PEER_PREFIX):
                            break
                        if len(value) == _PEER_BATCH.size:
                            sender = bytes(key[len(_PEER_PREFIX) :]).decode(errors="replace")
                            state.peer_batches[sender] = _PEER_BATCH.unpack(value)
                for key, value in txn.cursor(dbs[SESSIONS]):
                    try:
                        expiry, disconnected_at, username = r.decode_session(value)
                    except (r.RecordError, ValueError, struct.error):
                        bad += 1
                        continue
                    cid = key.decode()
                    sessions[cid] = StoredSession(cid, expiry, disconnected_at, username)
                for db, apply in (
                    (SUBS, _load_sub),
                    (INFLIGHT, _load_inflight),
                    (INBOUND, _load_inbound),
                    (WILLS, None),
                ):
                    for key, value in txn.cursor(dbs[db]):
                        try:
                            if db == WILLS:
                                s = sessions.get(key.decode())
                                if s is not None:
                                    s.will = r.decode_will(value)
                                continue
                            cid, suffix = r.split_key(key)
                            s = sessions.get(cid)
                            if s is not None:
                                apply(s, suffix, value)
                        except (r.RecordError, ValueError, struct.error, UnicodeDecodeError):
                            bad += 1
                done = self._load_done(txn)
                sent_seqs = self._load_sent(txn, sessions, done)
                self._load_queues(txn, sessions, sent_seqs, done)
                for cid, s in sessions.items():  # an empty queue starts above its garbage
                    floor = self._gc.get(cid, 0)
                    if not s.queue.count and s.queue.next < floor:
                        s.queue.first = s.queue.next = floor
                for _key, value in txn.cursor(dbs[RETAINED]):
                    try:
                        state.retained.append(r.decode_message(value))
                    except (r.RecordError, ValueError, struct.error, UnicodeDecodeError):
                        bad += 1
        except (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.PanicError, lmdb.BadValsizeError):
            raise StorageError(
                f"{self._where()}: data.mdb is damaged (reading it failed); refusing to use it"
            ) from None
        if bad:
            log.error("storage_bad_records", extra={"path": str(self.path), "skipped": bad})
        log.info(
            "storage_loaded",
            extra={
                "sessions": len(sessions),
                "retained": len(state.retained),
                "queued": sum(s.queue.count for s in sessions.values()),
                "used": _fmt_size(self.used_bytes()),
            },
        )
        return state

    def _load_done(self, txn) -> dict[str, tuple[int, list]]:
        """Each client's ``done`` record (schema 4): client id -> (floor, done ranges)."""
        done: dict[str, tuple[int, list]] = {}
        for key, value in txn.cursor(self._dbs[DONE]):
            try:
                cid, _ = r.split_key(key)
                done[cid] = r.decode_done(value)
            except (r.RecordError, ValueError, struct.error, UnicodeDecodeError):
                log.error("storage_bad_records", extra={"path": str(self.path), "db": "done", "skipped": 1})
        return done

    def _load_sent(
        self, txn, sessions: dict[str, StoredSession], done: dict[str, tuple[int, list]]
    ) -> dict[str, set[int]]:
        """Packet ids in flight as queue entries: into each session's ``inflight``, and into
        ``_sent``; returns the seqs they hold per client (they are not queued)."""
        seqs: dict[str, set[int]] = {}
        cur = txn.cursor(self._dbs[QUEUE])
        for key, value in txn.cursor(self._dbs[SENT]):
            try:
                cid, suffix = r.split_key(key)
                bucket = r.key_pid(suffix)
                slots = r.decode_sent(value)
            except (r.RecordError, ValueError, struct.error, UnicodeDecodeError):
                log.error("storage_bad_records", extra={"path": str(self.path), "db": "sent", "skipped": 1})
                continue
            s = sessions.get(cid)
            if s is None:
                continue
            prefix = r.client_prefix(cid)
            floor = self._gc.get(cid, 0)
            d_floor, d_ranges = done.get(cid, (0, []))
            state = self._sent_state(cid)
            dropped = False
            for i in range(r.SENT_SLOTS):
                v = slots[i]
                if not v:
                    continue
                seq = (v >> 1) - 1
                entry = None
                if seq >= floor and not _covered(d_floor, d_ranges, seq, seq + 1):
                    start, entries = _record_at(cur, prefix, seq)
                    if start <= seq < start + len(entries):
                        entry = entries[seq - start]
                try:
                    fields = r.decode_entry(entry) if entry is not None else None
                except (r.RecordError, ValueError, struct.error, UnicodeDecodeError):
                    fields = None
                if fields is None:
                    # Its entry is gone (cannot happen by commits: both change in one transaction):
                    # nothing to resend, and the record is rewritten by the first commit, which
                    # comes before (or holds) any new entry that could take that seq.
                    dropped = True
                    continue
                pid = bucket * r.SENT_SLOTS + i
                s.inflight[pid] = (*fields[:4], bool(v & 1))
                seqs.setdefault(cid, set()).add(seq)
                state.set(pid, v)
            state.disk.add(bucket)
            state.dirty.discard(bucket)
            state.uncache()  # (its flag of the bucket in ``dirty``)
            if dropped:  # written by the next commit (load runs in a thread: no wake-up from here)
                state.dirty.add(bucket)
                self._batch.sent_dirty.add(state)
        return seqs

    def _load_queues(
        self,
        txn,
        sessions: dict[str, StoredSession],
        sent_seqs: dict[str, set[int]],
        done: dict[str, tuple[int, list]],
    ) -> None:
        """Index the queues (count, bytes, QoS 0 seqs) from the ``queue`` records, leaving out the
        done seqs, garbage and entries in flight; each client's done marks are rebuilt from what is
        live (every seq between two live ones is done), which also upgrades a schema 3 store."""
        # 100k entries: compare raw prefixes, read one byte of each entry, decode nothing.
        prefix = b""
        q = None
        cid = ""
        sent: set[int] | None = None
        floor = 0
        d_floor, d_ranges = 0, []
        live_first = -1
        live_last = -1
        gaps: list[tuple[int, int]] = []

        def finish() -> None:
            if q is None:
                return
            top = max(d_floor, d_ranges[-1][1] if d_ranges else 0)
            if live_first < 0:
                self._table.drop(cid)
                if q.next < top:  # new entries go above every seq the done record names
                    q.first = q.next = top
                return
            if top > live_last + 1:  # done seqs above the last live one: new entries go above them
                gaps.append((live_last + 1, top))
                q.next = max(q.next, top)
                if not q.count:
                    q.first = q.next
            state = self._sent_state(cid)
            state.floor = live_first
            state.ranges = gaps
            state.end = max(live_last + 1, top)
            state.done_dirty = False  # the record on disk names the same live seqs
            self._batch.sent_dirty.discard(state)
            state.in_dirty = None

        cursor = txn.cursor(self._dbs[QUEUE])
        for key, value in cursor.iternext(keys=True, values=True):
            if not key.startswith(prefix) or not prefix:
                finish()
                cid, _ = r.split_key(key)
                prefix = r.client_prefix(cid)
                s = sessions.get(cid)
                q = s.queue if s is not None else None
                floor = self._gc.get(cid, 0)
                sent = sent_seqs.get(cid)
                d_floor, d_ranges = done.get(cid, (0, []))
                live_first = live_last = -1
                gaps = []
                if q is not None:
                    q.first = q.next = floor
            if q is None:
                continue
            start = r.key_seq(key[len(prefix) :])
            try:
                entries = r.record_entries(value)
            except r.RecordError:
                log.error("storage_bad_records", extra={"path": str(self.path), "db": "queue", "skipped": 1})
                continue
            for seq, entry in enumerate(entries, start):
                if seq < floor:
                    continue  # garbage of an ended session, still being deleted
                if seq < d_floor or (d_ranges and _covered(d_floor, d_ranges, seq, seq + 1)):
                    continue  # done (acknowledged or popped)
                if live_last >= 0 and seq > live_last + 1:
                    gaps.append((live_last + 1, seq))
                if live_first < 0:
                    live_first = seq
                live_last = seq
                if sent is not None and seq in sent:
                    # in flight, not queued; a new entry goes above it
                    q.next = max(q.next, seq + 1)
                    if seq >= q.first and q.count:
                        q.skip.add(seq)
                    elif not q.count:
                        q.first = seq + 1
                    continue
                if not q.count:
                    q.first = seq
                q.next = seq + 1
                q.count += 1
                q.bytes += len(entry)
                if entry[1] == 0:
                    q.qos0.append(seq)
        finish()
        for cid, s in sessions.items():  # a client without queue records: above its done marks
            d = done.get(cid)
            if d is not None and cid not in self._sent:
                top = max(d[0], d[1][-1][1] if d[1] else 0)
                if s.queue.next < top and not s.queue.count:
                    s.queue.first = s.queue.next = top

    # -- lifecycle ---------------------------------------------------------------------------------

    def ping(self) -> tuple[bool, str]:
        if self.failed:
            return False, self.failed
        try:
            self.env.info()
        except lmdb.Error as exc:
            return False, f"lmdb: {exc}"
        if self.refusing:
            return False, "lmdb: full, new stored messages are refused"
        return True, ""

    def start_background(self) -> None:
        """Spawn the greenlet that records liveness and (``batch``) fsyncs every ``sync_interval``.

        At rest it writes nothing: "last alive" only while a stored session is online (no other
        record reads it), the fsync only after a commit (bench/RESULTS.md, "The latency tail: what
        the hub runs besides messages")."""
        import gevent

        def run() -> None:
            pool = gevent.get_hub().threadpool
            while not self._closing:
                gevent.sleep(self.sync_interval)
                if self._closing:
                    return
                if self._online:
                    self.touch_alive()
                if self.sync_mode == "batch" and self._unsynced:
                    self._unsynced = False
                    self._syncing = True
                    try:
                        pool.apply(self.env.sync, (True,))
                    except lmdb.Error as exc:
                        log.error("storage_sync_failed", extra={"error": str(exc)})
                    finally:
                        self._syncing = False

        self._background = gevent.spawn(run)

    def close(self) -> None:
        background, self._background = self._background, None
        self._closing = True
        self.closed = True
        if background is not None:
            if self._syncing:
                background.join(30)  # an fsync is running in a thread: the env must outlive it
            background.kill(block=False)
        try:
            self.commit()
        except StorageError as exc:
            log.error("storage_close_commit_failed", extra={"error": str(exc)})
        try:
            self.env.sync(True)
        finally:
            self.env.close()
            self._unlock()


def _record_at(cur, prefix: bytes, seq: int) -> tuple[int, list]:
    """(first seq, entries) of the ``queue`` record holding ``seq`` of the client with ``prefix``
    ((-1, []) when there is none); ``cur`` is a cursor on ``queue``."""
    key = prefix + _SEQ.pack(seq)
    if cur.set_range(key) and cur.key() == key:
        value = cur.value()
    elif (cur.prev() if cur.key() else cur.last()) and cur.key().startswith(prefix):
        value = cur.value()
    else:
        return -1, []
    start = r.key_seq(cur.key()[len(prefix) :])
    try:
        entries = r.record_entries(value)
    except r.RecordError:
        return -1, []
    return start, entries


def _load_sub(s: StoredSession, suffix: bytes, value) -> None:
    s.subscriptions.append((suffix.decode(), *r.decode_subscription(value)))


def _load_inflight(s: StoredSession, suffix: bytes, value) -> None:
    s.inflight[r.key_pid(suffix)] = r.decode_entry(value)


def _load_inbound(s: StoredSession, suffix: bytes, value) -> None:
    s.inbound_qos2.add(r.key_pid(suffix))


__all__ = ["LMDBStorage", "StorageFull", "StoredQueue", "SCHEMA_VERSION", "MAGIC"]
