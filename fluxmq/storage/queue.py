"""DiskQueue: a persistent session's offline queue, kept in the store; in memory only its index.

It offers the deque subset ``Session`` uses (``append``, ``popleft``, ``[0]``, ``len``, ``clear``)
plus ``evict_qos0``. Items are ``(message, qos, retain, subscription_ids)`` tuples like the memory
queue's. Memory per session: a few integers, the seqs of queued QoS 0 entries (rare: QoS 0 is only
queued while an online client is congested) and a read-ahead window of at most ``READ_AHEAD``
encoded entries while the queue is being drained.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from . import records as r
from .base import Storage, StoredQueue

log = logging.getLogger("fluxmq.storage")

READ_AHEAD = 32


class DiskQueue:
    """The on-disk queue of one client id (see the module docstring)."""

    __slots__ = ("_store", "_cid", "_factory", "first", "next", "count", "bytes", "_qos0", "_ahead",
                 "_head")

    def __init__(self, store: Storage, client_id: str, message_factory: Callable,
                 index: StoredQueue | None = None) -> None:
        self._store = store
        self._cid = client_id
        self._factory = message_factory
        if index is None:  # a new queue starts above entries of an ended session still being deleted
            floor = store.queue_floor(client_id)
            index = StoredQueue(first=floor, next=floor)
        self.first = index.first  # every seq below is gone
        self.next = index.next
        self.count = index.count
        self.bytes = index.bytes  # encoded bytes of the queued entries
        self._qos0: deque[int] = deque(index.qos0)
        self._ahead: deque[tuple[int, bytes]] = deque()  # (seq, entry) read but not yet popped
        self._head = None  # decoded item of _ahead[0]

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:
        return self.count > 0

    def append(self, item: tuple) -> int:
        """Store an item at the tail; returns its encoded size."""
        message, qos, retain, subscription_ids = item
        return self.append_entry(r.encode_entry(message, qos, retain, subscription_ids))

    def append_entry(self, entry: bytes) -> int:
        """Store an already encoded entry (``records.encode_entry``, framing checked with
        ``records.check_entry``) at the tail: a session handed over from another node."""
        qos = r.entry_qos(entry)
        seq = self.next
        self.next = seq + 1
        self._store.queue_append(self._cid, seq, entry)
        if self.count == 0:
            self.first = seq
        self.count += 1
        self.bytes += len(entry)
        if qos == 0:
            self._qos0.append(seq)
        return len(entry)

    def encoded_entries(self, batch: int = 1024) -> list[bytes]:
        """Every queued entry as stored, head first (a session handed over to another node)."""
        out: list[bytes] = []
        seq, end = self.first, self.next
        while seq < end:
            seqs = range(seq, min(end, seq + batch))
            out.extend(bytes(entry) for entry in self._store.queue_read(self._cid, seqs) if entry is not None)
            seq = seqs[-1] + 1
        return out

    def _fill(self) -> bool:
        """Read the next window of entries. Seqs with no entry (evicted QoS 0, or lost to a failed
        commit) are skipped; if the index promised more than the store holds, it is reset."""
        ahead = self._ahead
        while not ahead and self.count:
            start = self.first
            if start >= self.next:
                log.error("queue_index_mismatch", extra={"client_id": self._cid, "missing": self.count})
                self._reset()
                return False
            seqs = range(start, min(self.next, start + READ_AHEAD))
            for seq, entry in zip(seqs, self._store.queue_read(self._cid, seqs), strict=True):
                if entry is not None:
                    ahead.append((seq, bytes(entry)))
            if not ahead:
                self.first = seqs[-1] + 1
        return bool(ahead)

    def _reset(self) -> None:
        self.count = 0
        self.bytes = 0
        self.first = self.next
        self._qos0.clear()
        self._ahead.clear()
        self._head = None

    def __getitem__(self, i: int) -> tuple:
        """Only ``[0]``: the head item, decoded once."""
        if i != 0:
            raise IndexError("DiskQueue supports only [0]")
        if self._head is None:
            if not self._fill():
                raise IndexError("queue is empty")
            fields, qos, retain, ids, _ = r.decode_entry(self._ahead[0][1])
            self._head = (self._factory(*fields), qos, retain, ids)
        return self._head

    def popleft(self) -> tuple:
        """Remove and return the head item."""
        item = self[0]
        seq, entry = self._ahead.popleft()
        self._head = None
        self._store.queue_pop(self._cid, seq)
        self.first = seq + 1  # everything up to the head is gone
        self._removed(len(entry))
        if item[1] == 0 and self._qos0 and self._qos0[0] == seq:
            self._qos0.popleft()
        return item

    def _removed(self, size: int) -> None:
        self.count -= 1
        self.bytes -= size
        if self.count <= 0:
            self._reset()

    def evict_qos0(self) -> bool:
        """Delete the oldest queued QoS 0 entry; False when there is none."""
        while self._qos0:
            seq = self._qos0.popleft()
            for i, (s, entry) in enumerate(self._ahead):
                if s == seq:
                    del self._ahead[i]
                    if i == 0:
                        self._head = None
                    size = len(entry)
                    break
            else:
                found = self._store.queue_read(self._cid, [seq])[0]
                if found is None:
                    continue
                size = len(found)
            self._store.queue_pop(self._cid, seq)
            self._removed(size)
            return True
        return False

    def entries(self, start: int, stop: int) -> list[tuple[int, tuple | None, int]]:
        """``(seq, item, size)`` for each seq in ``[start, stop)``, ``(seq, None, 0)`` where there is
        no entry: a walk over the queue that leaves it as it is (a shared-subscription hand-over)."""
        seqs = range(start, stop)
        out: list[tuple[int, tuple | None, int]] = []
        factory = self._factory
        for seq, entry in zip(seqs, self._store.queue_read(self._cid, seqs), strict=True):
            if entry is None:
                out.append((seq, None, 0))
                continue
            fields, qos, retain, ids, _ = r.decode_entry(entry)
            out.append((seq, (factory(*fields), qos, retain, ids), len(entry)))
        return out

    def remove(self, seq: int, size: int) -> None:
        """Delete the entry at ``seq`` (read by ``entries``, ``size`` bytes) wherever it is: the
        entries around it stay where they are, so taking one item out writes one delete."""
        ahead = self._ahead
        for i, (s, _) in enumerate(ahead):
            if s == seq:
                del ahead[i]
                if i == 0:
                    self._head = None
                break
        self._store.queue_pop(self._cid, seq)
        if seq == self.first:
            self.first = seq + 1
        self._removed(size)

    def clear(self) -> None:
        """Forget the index; the caller deletes the entries (``Storage.clear_session_state``)."""
        self._reset()

    def drop_read_ahead(self) -> None:
        """Free the read-ahead window (the session went offline)."""
        self._ahead.clear()
        self._head = None

    def __repr__(self) -> str:
        return f"DiskQueue({self._cid!r}, count={self.count}, bytes={self.bytes}, first={self.first}, next={self.next})"
