"""Queue logs: the stored side of durable queues (``$queue/...``), one log per queue plus the
settled state of each consumer group.

Two implementations of one interface (``QueueLogStore``): ``LMDBQueueLog`` writes through the
LMDB backend's batch (the same group commit as every other record of the loop turn, so a PUBACK
held until the commit means the append is stored), ``MemoryQueueLog`` keeps everything in dicts for
``storage.type: memory``. A replicated log can implement the same methods later.

LMDB layout, sub-database ``queues`` (schema version 2; see docs/storage.rst)::

    b"L" name NUL u64be offset          -> u8 version | f64 wall time | message blob (records)
    b"G" name NUL group                 -> u64le floor: every offset below it is settled by the group
    b"A" name NUL group NUL u64be offset -> b"": settled above the floor (out of order)
    b"R" raft group                      -> u64le: last Raft index applied (fluxmq.replication)

Queue names and group names never contain U+0000 (MQTT strings may not).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from . import records as r

_TS = struct.Struct("<Bd")
_U64 = struct.Struct("<Q")
_OFF = struct.Struct(">Q")
RECORD_FORMAT = 1


def encode_record(timestamp: float, message) -> bytes:
    """One queue record: its append time (wall clock, seconds) and the message blob."""
    return _TS.pack(RECORD_FORMAT, timestamp) + r.encode_message(message)


def decode_record(buf) -> tuple[float, tuple]:
    """(timestamp, message fields) of a record from ``encode_record``."""
    if len(buf) < _TS.size or buf[0] != RECORD_FORMAT:
        raise r.RecordError("queue record is truncated or has an unknown format version")
    _, ts = _TS.unpack_from(buf, 0)
    return ts, r.decode_message(bytes(buf[_TS.size:]))


_LOG_PREFIXES: dict[str, bytes] = {}


def log_prefix(queue: str) -> bytes:
    prefix = _LOG_PREFIXES.get(queue)
    if prefix is None:
        prefix = b"L" + queue.encode() + b"\x00"
        if len(_LOG_PREFIXES) < 4096:  # bounded: queue names are bounded per node anyway
            _LOG_PREFIXES[queue] = prefix
    return prefix


def log_key(queue: str, offset: int) -> bytes:
    return log_prefix(queue) + _OFF.pack(offset)


def group_key(queue: str, group: str) -> bytes:
    return b"G" + queue.encode() + b"\x00" + group.encode()


def ack_prefix(queue: str, group: str) -> bytes:
    return b"A" + queue.encode() + b"\x00" + group.encode() + b"\x00"


@dataclass
class StoredGroup:
    floor: int = 0
    settled: set[int] = field(default_factory=set)


@dataclass
class StoredQueueLog:
    """One queue as ``load_queues`` found it."""

    first: int = 0  # lowest offset present (== next when empty)
    next: int = 0  # offset of the next append
    count: int = 0
    bytes: int = 0
    groups: dict[str, StoredGroup] = field(default_factory=dict)


class QueueLogStore:
    """The interface the queue manager writes through (buffered like every Storage record: the
    FlushScheduler's commit makes it durable)."""

    def append(self, queue: str, offset: int, record: bytes) -> None:
        raise NotImplementedError

    def read(self, queue: str, from_offset: int, n: int) -> list[tuple[int, bytes]]:
        """Up to ``n`` records at offsets ``from_offset``.. (missing ones skipped), pending writes included."""
        raise NotImplementedError

    def put_group(self, queue: str, group: str, floor: int) -> None:
        """A group exists and has settled every offset below ``floor``."""
        raise NotImplementedError

    def settle(self, queue: str, group: str, offset: int, settled: bool = True) -> None:
        """Record (or forget) one offset settled above the group's floor."""
        raise NotImplementedError

    def delete_group(self, queue: str, group: str) -> None:
        raise NotImplementedError

    def truncate(self, queue: str, offsets) -> None:
        """Delete the records at ``offsets`` (retention, a chunk at a time)."""
        raise NotImplementedError

    def load_queues(self) -> dict[str, StoredQueueLog]:
        return {}

    def put_applied(self, group: str, index: int) -> None:
        """A replication group applied its Raft log up to ``index`` (in the same commit as the ops)."""
        raise NotImplementedError

    def applied_index(self, group: str) -> int:
        """The last Raft index ``put_applied`` committed for ``group`` (0 when none)."""
        return 0


class MemoryQueueLog(QueueLogStore):
    """Queue logs in the process only (``storage.type: memory``)."""

    def __init__(self) -> None:
        self.logs: dict[str, dict[int, bytes]] = {}
        self.applied: dict[str, int] = {}

    def put_applied(self, group: str, index: int) -> None:
        self.applied[group] = index

    def applied_index(self, group: str) -> int:
        return self.applied.get(group, 0)

    def append(self, queue: str, offset: int, record: bytes) -> None:
        self.logs.setdefault(queue, {})[offset] = record

    def read(self, queue: str, from_offset: int, n: int) -> list[tuple[int, bytes]]:
        log = self.logs.get(queue)
        if not log:
            return []
        out = []
        for off in range(from_offset, from_offset + n):
            rec = log.get(off)
            if rec is not None:
                out.append((off, rec))
        return out

    def put_group(self, queue: str, group: str, floor: int) -> None:
        pass

    def settle(self, queue: str, group: str, offset: int, settled: bool = True) -> None:
        pass

    def delete_group(self, queue: str, group: str) -> None:
        pass

    def truncate(self, queue: str, offsets) -> None:
        log = self.logs.get(queue)
        if log:
            for off in offsets:
                log.pop(off, None)


class LMDBQueueLog(QueueLogStore):
    """Queue logs in the LMDB backend's ``queues`` sub-database, written through its batch."""

    def __init__(self, storage, db: int) -> None:
        self.storage = storage
        self.db = db

    def append(self, queue: str, offset: int, record: bytes) -> None:
        self.storage._put(self.db, log_key(queue, offset), record)

    def read(self, queue: str, from_offset: int, n: int) -> list[tuple[int, bytes]]:
        offsets = range(from_offset, from_offset + n)
        values = self.storage._read_many(self.db, [log_key(queue, off) for off in offsets])
        return [(off, bytes(v)) for off, v in zip(offsets, values, strict=True) if v is not None]

    def put_group(self, queue: str, group: str, floor: int) -> None:
        self.storage._put(self.db, group_key(queue, group), _U64.pack(floor))

    def settle(self, queue: str, group: str, offset: int, settled: bool = True) -> None:
        key = ack_prefix(queue, group) + _OFF.pack(offset)
        if not settled:
            ops = self.storage._batch.ops[self.db]
            if ops.get(key) == b"":
                # Recorded by this batch (an offset is settled once, so never committed before)
                # and passed by the floor before the commit: nothing to write, not a put and a delete.
                del ops[key]
                return
        self.storage._put(self.db, key, b"" if settled else None)

    def delete_group(self, queue: str, group: str) -> None:
        self.storage._put(self.db, group_key(queue, group), None)
        self.storage._delete_prefix((self.db,), ack_prefix(queue, group))

    def truncate(self, queue: str, offsets) -> None:
        put = self.storage._put
        for off in offsets:
            put(self.db, log_key(queue, off), None)

    def put_applied(self, group: str, index: int) -> None:
        self.storage._put(self.db, b"R" + group.encode(), _U64.pack(index))

    def applied_index(self, group: str) -> int:
        value = self.storage._read_many(self.db, [b"R" + group.encode()])[0]
        return _U64.unpack(bytes(value))[0] if value is not None else 0

    def load_queues(self) -> dict[str, StoredQueueLog]:
        """Every queue's offsets, sizes and groups (at start, before any client connects)."""
        out: dict[str, StoredQueueLog] = {}
        storage = self.storage
        with storage.env.begin(db=storage._dbs[self.db]) as txn:
            for key, value in txn.cursor():
                kind = key[:1]
                if kind == b"R":
                    continue  # a replication group's applied index, not a queue
                name, _, rest = bytes(key[1:]).partition(b"\x00")
                q = out.get(name.decode())
                if q is None:
                    q = out[name.decode()] = StoredQueueLog()
                if kind == b"L":
                    off = _OFF.unpack(rest)[0]
                    if not q.count:
                        q.first = off
                    q.next = off + 1
                    q.count += 1
                    q.bytes += len(value)
                elif kind == b"G":
                    g = q.groups.setdefault(rest.decode(), StoredGroup())
                    g.floor = _U64.unpack(value)[0]
                elif kind == b"A":
                    group, off = rest[:-9], rest[-8:]  # the offset's bytes may hold NULs
                    g = q.groups.setdefault(group.decode(), StoredGroup())
                    g.settled.add(_OFF.unpack(off)[0])
        for q in out.values():
            if not q.count:
                # Every record was truncated: the next offset continues above what the groups settled.
                q.next = q.first = max([g.floor for g in q.groups.values()] + [0])
            for g in q.groups.values():
                g.settled = {off for off in g.settled if off >= g.floor}
        return out
