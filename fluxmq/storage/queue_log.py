"""Queue logs: the stored side of durable queues (``$queue/...``), one log per queue plus the
settled state of each consumer group.

Two implementations of one interface (``QueueLogStore``): ``LMDBQueueLog`` writes through the
LMDB backend's batch (the same group commit as every other record of the loop turn, so a PUBACK
held until the commit means the append is stored), ``MemoryQueueLog`` keeps everything in dicts for
``storage.type: memory``. A replicated log can implement the same methods later.

LMDB layout, sub-database ``queues`` (schema version 3; see docs/storage.rst)::

    b"L" name NUL u64be offset          -> u8 version | f64 wall time | message blob (records)
    b"G" name NUL group                 -> u64le floor: every offset below it is settled by the group
    b"A" name NUL group NUL u64be offset -> b"": settled above the floor (out of order)
    b"R" raft group                      -> u64le: last Raft index applied (fluxmq.replication)
    b"D" name NUL group                 -> u64le delivered mark: every unsettled offset below it
                                           was delivered once, unless a "C" record says otherwise
    b"C" name NUL group NUL u64be offset -> u32le delivery count where it is not 1 (0: passed over,
                                           never delivered; 2 and more: delivered again)
    b"M" client_id NUL filter           -> u8 version | u8 flags (1: auto-ack) | group: a persistent
                                           session's consumer-group membership

Queue names, group names, client ids and filters never contain U+0000 (MQTT strings may not).
Schema 3 added "D", "C" and "M" (a schema 2 store has none: its groups start with no delivery
known, its sessions with no membership).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from fluxmq._core.queue_wire import offset_keys, plain_records

from . import records as r

_TS = struct.Struct("<Bd")
_U64 = struct.Struct("<Q")
_OFF = struct.Struct(">Q")
_U32 = struct.Struct("<I")
RECORD_FORMAT = 1
MEMBER_FORMAT = 1
_AUTO_ACK = 1


#: the record header and a message blob's header in one (the common message: no properties or
#: expiry, so the blob is its header, the topic, the origin and the payload)
_TS_MSG = struct.Struct("<Bd" + r._MSG.format.lstrip("<"))


def encode_record(timestamp: float, message) -> bytes:
    """One queue record: its append time (wall clock, seconds) and the message blob."""
    if message.properties or message.expires_at is not None or message.wire_cache:
        return _TS.pack(RECORD_FORMAT, timestamp) + r.encode_message(message)
    topic = message.topic.encode()
    origin = message.origin.encode() if message.origin else b""
    payload = message.payload
    flags = message.qos | (4 if message.retain else 0) | (16 if origin else 0)
    return b"".join(
        (
            _TS_MSG.pack(
                RECORD_FORMAT, timestamp, r.FORMAT, flags, 0.0, len(topic), len(origin), 0, len(payload)
            ),
            topic,
            origin,
            payload,
        )
    )


def encode_plain_records(timestamp: float, topic: bytes, origin: bytes, payloads: list[bytes]) -> list[bytes]:
    """``encode_plain_record`` of each payload (built in C, ``_core.queue_wire.plain_records``)."""
    head = _TS_MSG.pack(
        RECORD_FORMAT, timestamp, r.FORMAT, 17 if origin else 1, 0.0, len(topic), len(origin), 0, 0
    )
    return plain_records(head[:-4], topic + origin, payloads)  # the payload length: per record


def encode_plain_record(timestamp: float, topic: bytes, origin: bytes, payload: bytes) -> bytes:
    """``encode_record`` of a QoS 1, non-retained message without properties or expiry, from its
    encoded topic and origin (b"": none): the relayed append's, without a Message to look at."""
    return b"".join(
        (
            _TS_MSG.pack(
                RECORD_FORMAT,
                timestamp,
                r.FORMAT,
                17 if origin else 1,
                0.0,
                len(topic),
                len(origin),
                0,
                len(payload),
            ),
            topic,
            origin,
            payload,
        )
    )


def record_timestamp(buf) -> float:
    """The append time of a record from ``encode_record`` (0.0 when it is not one)."""
    if len(buf) < _TS.size or buf[0] != RECORD_FORMAT:
        return 0.0
    return _TS.unpack_from(buf, 0)[1]


def decode_record(buf) -> tuple[float, tuple]:
    """(timestamp, message fields) of a record from ``encode_record``."""
    if len(buf) < _TS.size or buf[0] != RECORD_FORMAT:
        raise r.RecordError("queue record is truncated or has an unknown format version")
    _, ts = _TS.unpack_from(buf, 0)
    return ts, r.decode_message(bytes(buf[_TS.size :]))


_LOG_PREFIXES: dict[str, bytes] = {}


def log_prefix(queue: str) -> bytes:
    prefix = _LOG_PREFIXES.get(queue)
    if prefix is None:
        prefix = b"L" + queue.encode() + b"\x00"
        if len(_LOG_PREFIXES) < 4096:  # bounded: queue names are bounded per node anyway
            _LOG_PREFIXES[queue] = prefix
    return prefix


def log_key(queue: str, offset: int) -> bytes:
    prefix = _LOG_PREFIXES.get(queue)
    return (prefix or log_prefix(queue)) + _OFF.pack(offset)


def group_key(queue: str, group: str) -> bytes:
    return b"G" + queue.encode() + b"\x00" + group.encode()


def ack_prefix(queue: str, group: str) -> bytes:
    return b"A" + queue.encode() + b"\x00" + group.encode() + b"\x00"


def mark_key(queue: str, group: str) -> bytes:
    return b"D" + queue.encode() + b"\x00" + group.encode()


def count_prefix(queue: str, group: str) -> bytes:
    return b"C" + queue.encode() + b"\x00" + group.encode() + b"\x00"


def member_prefix(client_id: str) -> bytes:
    return b"M" + client_id.encode() + b"\x00"


@dataclass
class StoredGroup:
    floor: int = 0
    settled: set[int] = field(default_factory=set)
    mark: int = 0  # every unsettled offset below it was delivered (once, unless in counts)
    counts: dict[int, int] = field(default_factory=dict)  # offset -> deliveries, where not 1


@dataclass
class StoredMember:
    """A persistent session's membership of a consumer group, as ``load_members`` found it."""

    client_id: str
    filter: str  # as subscribed: $queue/{name}[/{filter}]
    group: str
    auto_ack: bool


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

    def append_plain(
        self, queue: str, offset: int, timestamp: float, topic: bytes, origin: bytes, payloads: list[bytes]
    ) -> list[int]:
        """``append`` of ``encode_plain_record(timestamp, topic, origin, payload)`` for each payload,
        at ``offset`` and on; returns their sizes."""
        sizes = []
        for i, payload in enumerate(payloads):
            record = encode_plain_record(timestamp, topic, origin, payload)
            self.append(queue, offset + i, record)
            sizes.append(len(record))
        return sizes

    def append_records(self, queue: str, offset: int, records: list[bytes]) -> None:
        """``append`` of each record, at ``offset`` and on (a replicated entry's batch)."""
        for i, record in enumerate(records):
            self.append(queue, offset + i, record)

    def read(self, queue: str, from_offset: int, n: int) -> list[tuple[int, bytes]]:
        """Up to ``n`` records at offsets ``from_offset``.. (missing ones skipped), pending writes included."""
        raise NotImplementedError

    def view(self, queues) -> QueueLogView:
        """The records of ``queues`` as they are now, for reading while writes go on (a Raft
        snapshot written in slices, fluxmq.replication.snapshot): appends, truncations and deletes
        made after this do not show. ``close()`` it when done."""
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

    # Delivery counts (a group's progress too, written at most once per dispatch; a store that
    # does not keep them restarts the counts at 1 after a restart).

    def put_mark(self, queue: str, group: str, mark: int) -> None:
        """Every unsettled offset below ``mark`` was delivered by the group (once, unless
        ``put_count`` recorded another count)."""

    def put_count(self, queue: str, group: str, offset: int, count: int | None) -> None:
        """Record the delivery count of one offset below the mark where it is not 1 (None: forget it)."""

    # Memberships of persistent sessions (node-local session state, not part of a queue's log).

    def put_member(self, client_id: str, filter: str, group: str, auto_ack: bool) -> None:
        """A persistent session is a member of ``group`` through ``filter``."""

    def delete_member(self, client_id: str, filter: str) -> None:
        pass

    def delete_members(self, client_id: str) -> None:
        """Every membership of ``client_id`` (its session ended)."""

    def load_members(self) -> list[StoredMember]:
        return []


class QueueLogView:
    """What ``QueueLogStore.view`` returns."""

    def read(self, queue: str, from_offset: int, n: int) -> list[tuple[int, bytes]]:
        """Up to ``n`` records at offsets ``from_offset``.. as they were when the view was taken."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class _MemoryView(QueueLogView):
    def __init__(self, logs: dict[str, dict[int, bytes]]) -> None:
        self.logs = logs

    def read(self, queue: str, from_offset: int, n: int) -> list[tuple[int, bytes]]:
        log = self.logs.get(queue, {})
        return [(off, log[off]) for off in range(from_offset, from_offset + n) if off in log]


class _LMDBView(QueueLogView):
    def __init__(self, view) -> None:
        self.view = view  # fluxmq.storage.lmdb_batch._View of the queues sub-database

    def read(self, queue: str, from_offset: int, n: int) -> list[tuple[int, bytes]]:
        prefix = _LOG_PREFIXES.get(queue) or log_prefix(queue)
        pack = _OFF.pack
        offsets = range(from_offset, from_offset + n)
        values = self.view.read_many([prefix + pack(off) for off in offsets])
        return [(off, bytes(v)) for off, v in zip(offsets, values, strict=True) if v is not None]

    def close(self) -> None:
        self.view.close()


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

    def view(self, queues) -> QueueLogView:
        logs = self.logs
        return _MemoryView({q: dict(logs[q]) for q in queues if q in logs})  # records are immutable

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
        prefix = _LOG_PREFIXES.get(queue) or log_prefix(queue)  # log_key, inline (once per message)
        storage = self.storage
        if storage.has_pending:  # storage._put, inline (once per message): the commit is woken already
            storage._batch.ops[self.db][prefix + _OFF.pack(offset)] = record
            storage.op_count += 1
        else:
            storage._put(self.db, prefix + _OFF.pack(offset), record)

    def append_plain(
        self, queue: str, offset: int, timestamp: float, topic: bytes, origin: bytes, payloads: list[bytes]
    ) -> list[int]:
        # encode_plain_record per payload and log_key per offset (built in C, _core.queue_wire),
        # one batch update for the run
        records = encode_plain_records(timestamp, topic, origin, payloads)
        self.append_records(queue, offset, records)
        return [len(rec) for rec in records]

    def append_records(self, queue: str, offset: int, records: list[bytes]) -> None:
        if not records:
            return
        keys = offset_keys(_LOG_PREFIXES.get(queue) or log_prefix(queue), offset, len(records))
        storage = self.storage
        storage._put(self.db, keys[0], records[0])  # wakes the commit when it is the batch's first
        if len(records) > 1:
            storage._batch.ops[self.db].update(zip(keys[1:], records[1:], strict=True))
            storage.op_count += len(records) - 1

    def read(self, queue: str, from_offset: int, n: int) -> list[tuple[int, bytes]]:
        offsets = range(from_offset, from_offset + n)
        values = self.storage._read_many(self.db, [log_key(queue, off) for off in offsets])
        return [(off, bytes(v)) for off, v in zip(offsets, values, strict=True) if v is not None]

    def view(self, queues) -> QueueLogView:
        return _LMDBView(self.storage._view(self.db))

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
        self.storage._put(self.db, mark_key(queue, group), None)
        self.storage._delete_prefix((self.db,), ack_prefix(queue, group))
        self.storage._delete_prefix((self.db,), count_prefix(queue, group))

    def put_mark(self, queue: str, group: str, mark: int) -> None:
        self.storage._put(self.db, mark_key(queue, group), _U64.pack(mark))

    def put_count(self, queue: str, group: str, offset: int, count: int | None) -> None:
        self.storage._put(
            self.db,
            count_prefix(queue, group) + _OFF.pack(offset),
            None if count is None else _U32.pack(min(count, 0xFFFFFFFF)),
        )

    def put_member(self, client_id: str, filter: str, group: str, auto_ack: bool) -> None:
        value = bytes((MEMBER_FORMAT, _AUTO_ACK if auto_ack else 0)) + group.encode()
        self.storage._put(self.db, member_prefix(client_id) + filter.encode(), value)

    def delete_member(self, client_id: str, filter: str) -> None:
        self.storage._put(self.db, member_prefix(client_id) + filter.encode(), None)

    def delete_members(self, client_id: str) -> None:
        self.storage._delete_prefix((self.db,), member_prefix(client_id))

    def load_members(self) -> list[StoredMember]:
        """Every stored membership (at start); records of an unknown format are skipped."""
        out: list[StoredMember] = []
        storage = self.storage
        with storage.env.begin(db=storage._dbs[self.db]) as txn:
            cur = txn.cursor()
            if not cur.set_range(b"M"):
                return out
            for key, value in cur:
                if key[:1] != b"M":
                    break
                cid, _, filter = bytes(key[1:]).partition(b"\x00")
                if len(value) < 2 or value[0] != MEMBER_FORMAT:
                    continue
                out.append(
                    StoredMember(
                        cid.decode(), filter.decode(), bytes(value[2:]).decode(), bool(value[1] & _AUTO_ACK)
                    )
                )
        return out

    def truncate(self, queue: str, offsets) -> None:
        prefix = _LOG_PREFIXES.get(queue) or log_prefix(queue)
        if offsets.__class__ is range and offsets.step == 1:  # retention's chunk: keys built in C
            keys = offset_keys(prefix, offsets.start, len(offsets))
        else:
            pack = _OFF.pack
            keys = [prefix + pack(off) for off in offsets]
        if not keys:
            return
        # The storage's _put for the first (it wakes the commit), the others straight into the same
        # batch: a chunk of deletes is one dict update, not a Python call per record.
        storage = self.storage
        storage._put(self.db, keys[0], None)
        storage._batch.ops[self.db].update(dict.fromkeys(keys))
        storage.op_count += len(keys) - 1

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
                if kind == b"R" or kind == b"M":
                    continue  # a replication group's applied index / memberships (load_members)
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
                elif kind == b"D":
                    q.groups.setdefault(rest.decode(), StoredGroup()).mark = _U64.unpack(value)[0]
                elif kind == b"C":
                    group, off = rest[:-9], rest[-8:]
                    g = q.groups.setdefault(group.decode(), StoredGroup())
                    g.counts[_OFF.unpack(off)[0]] = _U32.unpack(value)[0]
        for q in out.values():
            if not q.count:
                # Every record was truncated: the next offset continues above what the groups settled.
                q.next = q.first = max([g.floor for g in q.groups.values()] + [0])
            for g in q.groups.values():
                g.settled = {off for off in g.settled if off >= g.floor}
                g.counts = {off: n for off, n in g.counts.items() if off >= g.floor and off not in g.settled}
        return out
