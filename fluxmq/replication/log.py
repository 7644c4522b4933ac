"""ReplicatedQueueLog: a queue's log whose writes are Raft commands, applied on every replica.

It implements the queue-log interface (``fluxmq.queues.log.QueueLog``: append, read from an offset,
commit a group's progress, truncate) so the queue manager and its consumer groups need not know.
Writes do not touch the local store when they are made: they are staged as commands of this loop
turn's Raft entry (``RaftGroup.stage``). Every replica, this one included, applies the committed
entry to its own queue log store in log order (``apply_*``), so offsets are assigned at apply time
and are the same everywhere. Reads (``get``, ``read``) see only applied records, so a consumer is
never given a message that is not committed.
"""

from __future__ import annotations

import time

from fluxmq.errors import QueueRefused
from fluxmq.queues.log import QueueLog, Record
from fluxmq.storage.queue_log import encode_record


class ReplicatedQueueLog(QueueLog):
    """The log of one replicated queue (see the module docstring)."""

    def __init__(self, name: str, store, group, config, stored=None, stream: bool = False) -> None:
        if stored is None:
            super().__init__(name, store)
        else:
            super().__init__(name, store, stored.first, stored.next, stored.count, stored.bytes)
        self.group = group  # fluxmq.replication.group.RaftGroup
        self.config = config  # fluxmq.queues.config.ReplicationConfig
        # Consumer-group progress as applied from the Raft log: group -> [floor, settled offsets].
        # The leader rebuilds its ConsumerGroups from it when it takes over delivery.
        self.progress: dict[str, list] = {}
        if stored is not None:
            for gname, g in stored.groups.items():
                self.progress[gname] = [g.floor, set(g.settled)]
        self._truncating = 0  # highest ``below`` of a truncate staged and not yet applied
        self._truncate_retry = 0.0
        self.stream = stream  # a stream's group floor is a cursor (it may move back)

    # -- the queue-log interface (writes become commands) ----------------------------------------

    @property
    def delivering(self) -> bool:  # type: ignore[override]
        return self.group.delivering

    def held_ack(self):
        if self.config.mode != "sync":
            return None
        return self.group.turn_hold(self.config.ack_timeout)

    def append(self, messages, now: float | None = None) -> list[Record]:
        return [self.append_one(m) for m in messages]

    def append_one(self, message) -> Record:
        self.group.check_writable(self.name)
        now = time.time()
        blob = encode_record(now, message)
        self.group.stage_append(self.name, blob)
        # The offset is assigned when the entry is applied (the same on every replica).
        return Record(-1, now, message, len(blob))

    def commit(self, group: str, floor: int, settled: int | None = None, unsettled=()) -> None:
        self.group.stage(("c", self.name, group, floor, settled, tuple(unsettled)))

    def truncate(self, below: int, limit: int) -> int:
        stop = min(below, self.first + limit, self.next)
        now = time.monotonic()
        if stop <= self.first or (stop <= self._truncating and now < self._truncate_retry):
            return 0  # staged already (retention asks every tick); again if it was never applied
        self._truncating = stop
        self._truncate_retry = now + 2 * self.config.ack_timeout
        self.group.stage(("t", self.name, stop))
        return 0  # counted when applied

    def delete(self, offset: int) -> bool:
        if self.get(offset) is None:
            return False
        self.group.stage(("d", self.name, offset))
        return True

    def forget_group(self, group: str) -> None:
        self.group.stage(("g", self.name, group))

    # -- applied on every replica, in Raft log order ---------------------------------------------

    def apply_append(self, blobs: list[bytes]) -> None:
        store = self.store
        offset = self.next
        for blob in blobs:
            store.append(self.name, offset, blob)
            self.count += 1
            self.bytes += len(blob)
            offset += 1
        self.next = offset

    def apply_commit(self, group: str, floor: int, settled, unsettled) -> None:
        """Merge a group's progress: settled offsets only accumulate and a work queue's floor only
        rises, whichever node computed it (a late subscriber on a follower registers the group at
        an older floor; an ex-leader's member acks from stale state). A stream's floor is its
        cursor and may move back (a seek)."""
        prog = self.progress.get(group)
        if prog is None:
            prog = self.progress[group] = [floor, set()]
            QueueLog.commit(self, group, floor)
        store = self.store
        if settled is not None:
            if settled >= prog[0] and settled not in prog[1]:
                prog[1].add(settled)
                store.settle(self.name, group, settled, True)
            floor = prog[0] if floor < prog[0] else floor
        if floor > prog[0] or (self.stream and floor != prog[0] and settled is None):
            prog[0] = floor
            gone = sorted(off for off in prog[1] if off < floor)
            for off in gone:
                prog[1].discard(off)
                store.settle(self.name, group, off, False)
            store.put_group(self.name, group, floor)
            # a settled offset the floor just reached moves the floor on (as ConsumerGroup.settle does)
            while prog[0] in prog[1]:
                prog[1].discard(prog[0])
                store.settle(self.name, group, prog[0], False)
                prog[0] += 1
                store.put_group(self.name, group, prog[0])

    def apply_truncate(self, below: int) -> None:
        QueueLog.truncate(self, below, max(0, below - self.first))

    def apply_delete(self, offset: int) -> None:
        QueueLog.delete(self, offset)

    def apply_forget(self, group: str) -> None:
        QueueLog.forget_group(self, group)
        self.progress.pop(group, None)


def refused(reason: str, code: int = 0x80, leader: str | None = None) -> QueueRefused:
    """A refusal carried on a 5.0 PUBACK (reason string; ``leader`` user property for reject)."""
    exc = QueueRefused(reason, code)
    if leader:
        exc.user_properties = [("leader", leader)]
    return exc
