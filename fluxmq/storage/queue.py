"""DiskQueue: a persistent session's offline queue, kept in the store; in memory only its index.

It offers the deque subset ``Session`` uses (``append``, ``popleft``, ``[0]``, ``len``, ``clear``)
plus ``evict_qos0``, and ``take`` / ``put_in_flight`` for a PersistentSession whose QoS 1/2
messages in flight stay in the queue's seq space (``Storage.put_sent``, ``put_sent_entry``). Items are ``(message,
qos, retain, subscription_ids)`` tuples like the memory queue's. Memory per offline session: a few
integers and the seqs of queued QoS 0 entries (rare: QoS 0 is only queued while an online client
is congested).

While the session is online (``cache_tail``), the newest entries (at most ``MEM_ENTRIES`` and
``MEM_BYTES`` per session, ``MEM_TOTAL`` encoded bytes in the whole process) are also kept as the
items they were appended as: a client that drains its queue as
fast as it fills takes them back without reading or decoding anything. Older entries are read from
the store ``READ_AHEAD`` at a time.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from fluxmq._core import dqueue as _dq
from fluxmq._core.dqueue import QueueCore

from . import records as r
from .base import Storage, StoredQueue

log = logging.getLogger("fluxmq.storage")
plain_entry = r.plain_entry

READ_AHEAD = 32
#: newest entries an online session's queue also keeps in memory (as appended; they are on disk too)
MEM_ENTRIES = 1024
MEM_BYTES = 256 << 10
MEM_TOTAL = 64 << 20


#: Encoded bytes of the entries every DiskQueue of the process keeps in memory (``used``; a C
#: field, which the relay's appends and pops update too).
_MemUse = _dq.MEM_USE
_dq.configure(MEM_ENTRIES, MEM_BYTES, MEM_TOTAL)


class DiskQueue(QueueCore):
    """The on-disk queue of one client id (see the module docstring). Its fields are C fields
    (``fluxmq._core.dqueue.QueueCore``), as is ``pop_plain``."""

    __slots__ = ()

    def __init__(
        self, store: Storage, client_id: str, message_factory: Callable, index: StoredQueue | None = None
    ) -> None:
        self._store = store
        self._cid = client_id
        self._factory = message_factory
        if index is None:  # a new queue starts above entries of an ended session still being deleted
            floor = store.queue_floor(client_id)
            index = StoredQueue(first=floor, next=floor)
        self.first = index.first  # every seq below is gone (or in flight)
        self.next = index.next
        self.count = index.count
        self.bytes = index.bytes  # encoded bytes of the queued entries
        self.qos0: deque[int] = deque(index.qos0)  # every queued QoS 0 seq (and maybe a few gone)
        self._ahead: deque[tuple[int, bytes]] = deque()  # (seq, entry) read but not yet popped
        self._head = None  # (seq, item, size) of the head, decoded once
        self._skip = set(index.skip)  # seqs in [first, next) whose entries are in flight, not queued
        # (seq, item, size) of every queued entry with seq >= _mem_from (-1: none kept)
        self._mem: deque[tuple[int, tuple, int]] = deque()
        self._mem_from = -1
        self._mem_bytes = 0
        self._caching = False

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:
        return self.count > 0

    def append(self, item: tuple) -> int:
        """Store an item at the tail; returns its encoded size."""
        message, qos, retain, subscription_ids = item
        entry = None if subscription_ids else plain_entry(message, qos, retain)
        if entry is None:
            entry = r.encode_entry(message, qos, retain, subscription_ids)
        if not self._caching or self._mem_from < 0 or len(self._mem) >= MEM_ENTRIES:
            return self.append_entry(entry, item)
        # append_entry's path for an online queue whose in-memory tail has room (one call less)
        seq = self.next
        self.next = seq + 1
        self._store.queue_append(self._cid, seq, entry)
        size = len(entry)
        if not self.count:
            self.first = seq
        self.count += 1
        self.bytes += size
        if not qos:
            self.qos0.append(seq)
        self._mem.append((seq, item, size))
        self._mem_bytes += size
        _MemUse.used += size
        if self._mem_bytes > MEM_BYTES or _MemUse.used > MEM_TOTAL:
            self._trim_mem()
        return size

    def append_entry(self, entry: bytes, item: tuple | None = None) -> int:
        """Store an already encoded entry (``records.encode_entry``, framing checked with
        ``records.check_entry``) at the tail: a session handed over from another node. ``item``:
        the entry as appended, when the caller has it (kept in memory while ``cache_tail`` is on)."""
        qos = r.entry_qos(entry)
        seq = self.next
        self.next = seq + 1
        self._store.queue_append(self._cid, seq, entry)
        size = len(entry)
        if self.count == 0:
            self.first = seq
        self.count += 1
        self.bytes += size
        if qos == 0:
            self.qos0.append(seq)
        if self._caching:
            if item is None:
                fields, q, retain, ids, _ = r.decode_entry(entry)
                item = (self._factory(*fields), q, retain, ids)
            mem = self._mem
            if self._mem_from < 0:
                self._mem_from = seq  # nothing queued at or above seq is missing from _mem
            mem.append((seq, item, size))
            self._mem_bytes += size
            _MemUse.used += size
            self._trim_mem()
        return size

    def _trim_mem(self) -> None:
        """Keep the in-memory tail within MEM_ENTRIES, MEM_BYTES and the process's MEM_TOTAL."""
        mem = self._mem
        while mem and (len(mem) > MEM_ENTRIES or self._mem_bytes > MEM_BYTES or _MemUse.used > MEM_TOTAL):
            old, _, old_size = mem.popleft()  # read from the store again when its turn comes
            self._mem_bytes -= old_size
            _MemUse.used -= old_size
            self._mem_from = old + 1
            head = self._head
            if head is not None and head[0] == old:
                self._head = None

    def encoded_entries(self, batch: int = 1024) -> list[bytes]:
        """Every queued entry as stored, head first (a session handed over to another node)."""
        out: list[bytes] = []
        seq, end = self.first, self.next
        while seq < end:
            seqs = range(seq, min(end, seq + batch))
            skip = self._skip  # in flight (schema 3): handed over with the in-flight state, not as queued
            seqs = [s for s in seqs if s not in skip]
            out.extend(bytes(entry) for entry in self._store.queue_read(self._cid, seqs) if entry is not None)
            seq = min(end, seq + batch)
        return out

    def put_in_flight(self, message, qos: int, retain: bool, subscription_ids, packet_id: int) -> int:
        """Store a message sent at once (in flight, not queued) in the seq space, named by
        ``packet_id`` (``Storage.put_sent_entry``); returns its seq."""
        seq = self.next
        self.next = seq + 1
        if self.count:
            self._skip.add(seq)  # not for the queue's readers (a PersistentSession sends at once
            # only with an empty queue)
        else:
            self.first = self.next
        entry = None if subscription_ids else plain_entry(message, qos, retain)
        if entry is None:
            entry = r.encode_entry(message, qos, retain, subscription_ids)
        self._store.put_sent_entry(self._cid, packet_id, seq, entry)
        return seq

    def cache_tail(self, on: bool) -> None:
        """Keep the newest entries in memory as well (an online session) or not (offline)."""
        self._caching = on
        if not on:
            self.drop_read_ahead()

    def peek(self) -> tuple | None:
        """(seq, item, size) of the head, or None when the queue is empty. Seqs with no entry
        (evicted QoS 0, or lost to a failed commit) are skipped; if the index promised more than
        the store holds, it is reset."""
        head = self._head
        if head is not None:
            return head
        ahead = self._ahead
        while self.count:
            if ahead:
                seq, entry = ahead[0]
                fields, qos, retain, ids, _ = r.decode_entry(entry)
                head = self._head = (seq, (self._factory(*fields), qos, retain, ids), len(entry))
                return head
            start = self.first
            mem_from = self._mem_from
            if 0 <= mem_from <= start:
                if self._mem:
                    head = self._head = self._mem[0]
                    return head
                stop = start  # the index promised entries the queue does not hold
            else:
                stop = self.next if mem_from < 0 else min(self.next, mem_from)
            if start >= stop:
                log.error("queue_index_mismatch", extra={"client_id": self._cid, "missing": self.count})
                self._reset()
                return None
            seqs = range(start, min(stop, start + READ_AHEAD))
            skip = self._skip
            for seq, entry in zip(seqs, self._store.queue_read(self._cid, seqs), strict=True):
                if entry is not None and (not skip or seq not in skip):
                    ahead.append((seq, bytes(entry)))
            if not ahead:
                self.first = seqs[-1] + 1
        return None

    def _reset(self) -> None:
        self.count = 0
        self.bytes = 0
        self.first = self.next
        self.qos0.clear()
        self._ahead.clear()
        self._head = None
        self._skip.clear()
        self._mem.clear()
        self._mem_from = -1
        _MemUse.used -= self._mem_bytes
        self._mem_bytes = 0

    def __getitem__(self, i: int) -> tuple:
        """Only ``[0]``: the head item, decoded once."""
        if i != 0:
            raise IndexError("DiskQueue supports only [0]")
        head = self.peek()
        if head is None:
            raise IndexError("queue is empty")
        return head[1]

    def take(self) -> tuple[tuple, int]:
        """Remove the head from the queue and return ``(item, seq)``; its entry stays in the store
        until the caller deletes it (``Storage.queue_pop`` or ``delete_inflight``)."""
        head = self.peek()
        if head is None:
            raise IndexError("queue is empty")
        self.drop_head(head)
        return head[1], head[0]

    def drop_head(self, head: tuple) -> None:
        """``take`` of the head ``peek`` just returned."""
        seq, item, size = head
        self._head = None
        ahead = self._ahead
        if ahead and ahead[0][0] == seq:
            ahead.popleft()
        else:
            self._mem.popleft()
            self._mem_bytes -= size
            _MemUse.used -= size
        self.first = seq + 1  # everything up to the head is gone
        if item[1] == 0 and self.qos0 and self.qos0[0] == seq:
            self.qos0.popleft()
        self.bytes -= size
        self.count -= 1
        if self.count <= 0:
            self._reset()

    def pop_head(self) -> tuple | None:
        """``peek`` then ``drop_head`` in one call (a session's pump with room in its window): the
        head's (seq, item, size), removed from the queue, or None when it is empty."""
        head = self._head
        mem = self._mem
        if head is None and mem and not self._ahead and self.count and 0 <= self._mem_from <= self.first:
            # the common case of an online queue: the head is the oldest in-memory entry (peek's rule)
            seq, item, size = head = mem.popleft()
            self._mem_bytes -= size
            _MemUse.used -= size
            self.first = seq + 1
            if item[1] == 0 and self.qos0 and self.qos0[0] == seq:
                self.qos0.popleft()
            self.bytes -= size
            self.count -= 1
            if self.count <= 0:
                self._reset()
            return head
        head = self.peek()
        if head is not None:
            self.drop_head(head)
        return head

    def popleft(self) -> tuple:
        """Remove and return the head item, deleting its entry."""
        item, seq = self.take()
        self._store.queue_pop(self._cid, seq)
        return item

    def _removed(self, size: int) -> None:
        self.count -= 1
        self.bytes -= size
        if self.count <= 0:
            self._reset()

    def _unlink(self, seq: int) -> int | None:
        """Forget the read-ahead or in-memory copy of ``seq``; its size when there was one."""
        head = self._head
        if head is not None and head[0] == seq:
            self._head = None
        for i, (s, entry) in enumerate(self._ahead):
            if s == seq:
                del self._ahead[i]
                return len(entry)
        if 0 <= self._mem_from <= seq:
            for i, (s, _, size) in enumerate(self._mem):
                if s == seq:
                    del self._mem[i]
                    self._mem_bytes -= size
                    _MemUse.used -= size
                    return size
        return None

    def evict_qos0(self) -> bool:
        """Delete the oldest queued QoS 0 entry; False when there is none."""
        while self.qos0:
            seq = self.qos0.popleft()
            size = self._unlink(seq)
            if size is None:
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
        no queued entry: a walk over the queue that leaves it as it is (a shared-subscription
        hand-over)."""
        seqs = range(start, stop)
        out: list[tuple[int, tuple | None, int]] = []
        factory = self._factory
        skip = self._skip
        for seq, entry in zip(seqs, self._store.queue_read(self._cid, seqs), strict=True):
            if entry is None or seq in skip:
                out.append((seq, None, 0))
                continue
            fields, qos, retain, ids, _ = r.decode_entry(entry)
            out.append((seq, (factory(*fields), qos, retain, ids), len(entry)))
        return out

    def remove(self, seq: int, size: int) -> None:
        """Delete the entry at ``seq`` (read by ``entries``, ``size`` bytes) wherever it is: the
        entries around it stay where they are, so taking one item out writes one delete."""
        self._unlink(seq)
        self._store.queue_pop(self._cid, seq)
        if seq == self.first:
            self.first = seq + 1
        self._removed(size)

    def clear(self) -> None:
        """Forget the index; the caller deletes the entries (``Storage.clear_session_state``)."""
        self._reset()

    def drop_read_ahead(self) -> None:
        """Free the read-ahead window and the in-memory entries (the session went offline)."""
        self._ahead.clear()
        self._head = None
        self._mem.clear()
        self._mem_from = -1
        _MemUse.used -= self._mem_bytes
        self._mem_bytes = 0

    def __repr__(self) -> str:
        return f"DiskQueue({self._cid!r}, count={self.count}, bytes={self.bytes}, first={self.first}, next={self.next})"
