"""The queue log interface: what a queue needs from its storage, one log per queue.

``QueueLog`` is the seam a replicated log (Raft, in its own issue) implements later: ``append`` a
batch, ``read`` from an offset, ``commit`` a group's progress, ``truncate`` old records. This one
writes through the node's storage (``Storage.queue_log()``: LMDB or memory), buffered into the loop
turn's group commit like every other record.
"""

from __future__ import annotations

import time

from fluxmq.broker.message import Message
from fluxmq.storage.queue_log import QueueLogStore, decode_record, encode_record

#: records read at once when a group's cursor leaves the cache
READ_AHEAD = 64
#: decoded records kept per queue (recent appends and read-ahead)
CACHE_RECORDS = 4096


class Record(Message):
    """One stored message of a queue: the message itself (``message`` is the record), with its
    offset, append time and stored size. One object per record, not a record holding a message."""

    __slots__ = ("offset", "timestamp", "size", "wire", "queue_name")

    def __init__(self, offset: int, timestamp: float, message: Message, size: int) -> None:
        Message.__init__(
            self,
            message.topic,
            message.payload,
            message.qos,
            message.retain,
            message.properties,
            message.expires_at,
            message.origin,
        )
        self.offset = offset
        self.timestamp = timestamp  # wall clock, seconds
        self.size = size
        self.wire = None  # its deliveries' PUBLISH before the per-delivery properties (delivery.py)
        self.queue_name = ""

    @property
    def message(self) -> Record:
        return self


_new = object.__new__


class QueueLog:
    """The log of one queue over a ``QueueLogStore``; offsets are dense and grow from 0."""

    #: False while this node must not deliver from the log nor apply retention to it (a replicated
    #: log on a node that is not its group's leader: fluxmq.replication)
    delivering = True
    #: the consumer-group class of the queue (None: ``fluxmq.queues.group.ConsumerGroup``); a
    #: replicated log whose deliveries reach consumers on other nodes gives its own
    group_class = None

    def held_ack(self):
        """What the publisher's (or settler's) ack of this loop turn waits for beyond the local
        commit: a ``fluxmq.broker.held.HeldAck`` (replicated, ``mode: sync``), or None."""
        return None

    def held_settlement(self):
        """What a consumer's ``$ack`` (``$nack``, ``$reject``) of this loop turn waits for beyond
        the local commit: as ``held_ack``, and a replicated log may refuse it on its own (a
        settlement of a delivery a new leader has forgotten)."""
        return self.held_ack()

    def __init__(
        self, name: str, store: QueueLogStore, first: int = 0, next: int = 0, count: int = 0, size: int = 0
    ) -> None:
        self.name = name
        self.store = store
        self.first = first  # lowest offset that may be present
        self.next = next  # offset of the next append
        self.count = count  # records present
        self.bytes = size
        self._cache: dict[int, Record] = {}  # recent appends and read-ahead, bounded

    def append(self, messages: list[Message], now: float | None = None) -> list[Record]:
        """Append a batch; returns its records (offsets assigned in order)."""
        now = time.time() if now is None else now
        out = []
        for message in messages:
            blob = encode_record(now, message)
            offset = self.next
            self.next += 1
            self.store.append(self.name, offset, blob)
            rec = Record(offset, now, message, len(blob))
            self.count += 1
            self.bytes += rec.size
            self._remember(rec)
            out.append(rec)
        return out

    def append_one(self, message: Message) -> Record:
        """``append`` of one message (the publish path)."""
        now = time.time()
        cached = message.wire_cache is not None
        blob = encode_record(now, message)
        if not cached and message.wire_cache is not None:
            # Only the log needs this encoding: not a dict kept per cached record (the collector
            # walks every live one), nor the blob twice in memory.
            message.wire_cache = None
        offset = self.next
        self.next = offset + 1
        self.store.append(self.name, offset, blob)
        rec = Record(offset, now, message, len(blob))
        self.count += 1
        self.bytes += rec.size
        cache = self._cache
        cache[offset] = rec
        cache.pop(offset - CACHE_RECORDS, None)  # O(1) eviction of what the window left behind
        if len(cache) > 2 * CACHE_RECORDS:  # read-ahead of old offsets: bounded all the same
            cache.clear()
            cache[offset] = rec
        return rec

    def append_plain(self, topic: str, payloads: list[bytes], origin: str) -> list[Record]:
        """``append`` of QoS 1 messages to one topic without properties or expiry from client
        ``origin`` (a run of relayed PUBLISHes): the records are made and encoded (as
        ``encode_record``) directly, and stored in one call."""
        now = time.time()
        first = self.next
        self.next = first + len(payloads)
        sizes = self.store.append_plain(
            self.name, first, now, topic.encode(), origin.encode() if origin else b"", payloads
        )
        cache = self._cache
        out = []
        offset = first
        for payload, size in zip(payloads, sizes, strict=True):
            rec = _new(Record)  # Record.__init__ without a Message to copy from
            rec.topic = topic
            rec.payload = payload
            rec.qos = 1
            rec.retain = False
            rec.properties = None
            rec.expires_at = None
            rec.origin = origin
            rec.wire_cache = None
            rec.offset = offset
            rec.timestamp = now
            rec.size = size
            rec.wire = None
            rec.queue_name = ""
            cache[offset] = rec
            cache.pop(offset - CACHE_RECORDS, None)
            out.append(rec)
            offset += 1
        self.count += len(payloads)
        self.bytes += sum(sizes)
        if len(cache) > 2 * CACHE_RECORDS:
            cache.clear()
            cache.update((rec.offset, rec) for rec in out[-CACHE_RECORDS:])
        return out

    def _remember(self, rec: Record) -> None:
        cache = self._cache
        cache[rec.offset] = rec
        if len(cache) > 2 * CACHE_RECORDS:
            cache.clear()
            cache[rec.offset] = rec

    def get(self, offset: int) -> Record | None:
        """The record at ``offset``, None when it was truncated or never written."""
        rec = self._cache.get(offset)
        if rec is not None:
            return rec
        if offset < self.first or offset >= self.next:
            return None
        found = None
        for rec in self.read(offset, READ_AHEAD):
            self._remember(rec)
            if rec.offset == offset:
                found = rec
        return found

    def read(self, from_offset: int, n: int) -> list[Record]:
        """Up to ``n`` records from ``from_offset`` (missing offsets skipped)."""
        n = max(0, min(n, self.next - from_offset))
        out = []
        for offset, blob in self.store.read(self.name, from_offset, n):
            ts, fields = decode_record(blob)
            out.append(Record(offset, ts, Message(*fields), len(blob)))
        return out

    def commit(self, group: str, floor: int, settled: int | None = None, unsettled=()) -> None:
        """A group's progress: every offset below ``floor`` settled, ``settled`` settled above it,
        ``unsettled`` offsets no longer recorded apart (the floor passed them)."""
        store = self.store
        for offset in unsettled:
            store.settle(self.name, group, offset, False)
        if settled is not None:
            store.settle(self.name, group, settled, True)
        else:
            store.put_group(self.name, group, floor)

    def record_deliveries(self, group: str, mark: int | None, counts: dict[int, int | None]) -> None:
        """A group's delivery counts, part of its progress: ``mark`` (when not None) says every
        unsettled offset below it was delivered once, ``counts`` the offsets below it where the
        count is not 1 (None: back to 1, or settled). Written at most once per dispatch."""
        store = self.store
        if mark is not None:
            store.put_mark(self.name, group, mark)
        for offset, n in counts.items():
            store.put_count(self.name, group, offset, n)

    def truncate(self, below: int, limit: int) -> int:
        """Delete up to ``limit`` records from the front, below offset ``below`` (retention);
        returns how many were deleted."""
        stop = min(below, self.first + limit, self.next)
        if stop <= self.first:
            return 0
        # Sizes for the byte count: from the cache, else from the stored bytes as they are (no
        # decoding of records that are about to go, and no filling of the cache with them).
        cache = self._cache
        sizes = []
        missing = False
        for off in range(self.first, stop):
            rec = cache.pop(off, None)
            if rec is None:
                missing = True
            else:
                sizes.append(rec.size)
        if missing:
            sizes = [len(blob) for _, blob in self.store.read(self.name, self.first, stop - self.first)]
        self.store.truncate(self.name, range(self.first, stop))
        n = len(sizes)
        self.count -= n
        self.bytes -= sum(sizes)
        self.first = stop
        return n

    def delete(self, offset: int) -> bool:
        """Delete one record (compaction); False when it is not there."""
        rec = self.get(offset)
        if rec is None:
            return False
        self.store.truncate(self.name, (offset,))
        self._cache.pop(offset, None)
        self.count -= 1
        self.bytes -= rec.size
        return True

    def forget_group(self, group: str) -> None:
        self.store.delete_group(self.name, group)
