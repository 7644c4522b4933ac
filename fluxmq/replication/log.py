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
from fluxmq.storage.queue_log import encode_plain_records, encode_record, record_timestamp

from .lease import LeaseTable


class ReplicatedQueueLog(QueueLog):
    """The log of one replicated queue (see the module docstring)."""

    def __init__(
        self,
        name: str,
        store,
        group,
        config,
        stored=None,
        stream: bool = False,
        distribution: str | None = None,
    ) -> None:
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
        # Delivery counts as replicated (``record_deliveries`` is a command too): group -> mark,
        # group -> {offset: count where not 1}; a new leader's groups count on from them.
        self.marks: dict[str, int] = {}
        self.counts: dict[str, dict[int, int]] = {}
        if stored is not None:
            for gname, g in stored.groups.items():
                self.marks[gname] = getattr(g, "mark", 0)
                self.counts[gname] = dict(getattr(g, "counts", None) or {})
        # distribution_mode forward (fluxmq.replication.distribution): the members every node
        # registered, group -> {(node, key): (incarnation, key filter, max_inflight, auto_ack)},
        # and what this entry changed that the broker acts on (leases, settlements from elsewhere)
        self.registered: dict[str, dict[tuple[str, str], tuple]] = {}
        self.events: list | None = None
        if distribution is None:
            # ``distribution`` is given where the log is made before its group (etcd membership,
            # forming.py: a stand-in group first, which knows no distribution_mode)
            distribution = getattr(group, "distribution", "")
        if distribution:
            from .distribution import ReplicatedGroup

            self.events = []
            self.group_class = ReplicatedGroup
        # distribution_mode replicate, a work queue (lease.py): every replica's lease tables, the
        # end of the log and the log time as the Raft log built them (rebuilt at a restart from
        # the snapshot and the entries after it, not from the store, so every replica agrees)
        self.leased = distribution == "replicate" and not stream
        self.leases: dict[str, LeaseTable] = {}
        self.log_next = 0
        self.clock = 0.0

    # -- the queue-log interface (writes become commands) ----------------------------------------

    @property
    def delivering(self) -> bool:  # type: ignore[override]
        if self.leased:  # every replica delivers what it leased, while it hears a leader
            return self.group.leader() is not None
        return self.group.delivering

    @property
    def deciding(self) -> bool:
        """distribution_mode forward: this node's consumer groups hold the leader's decisions (its
        claim is the last one applied). Not ``delivering``, which also needs a majority's answer
        within DELIVERY_LEASE and so flickers on a loaded leader: a leader that took a settlement
        or a late lease for a follower's meanwhile dropped the record from its group without
        settling or delivering it again (its floor stuck there for good)."""
        return not self.leased and self.group.owner == self.group.self_addr

    def leasable(self, group: str, now: float) -> bool:
        table = self.leases.get(group)
        return table is not None and table.leasable(self.log_next, now)

    def apply_lease(self, op: tuple, live: bool) -> bool:
        """The lease side of one applied command (every replica, replayed ones too); True when
        the command was the lease table's own (a request, a release)."""
        kind = op[0]
        if kind == "a":
            self.log_next += len(op[2])
            if op[2] and any(t.wants for t in self.leases.values()):
                # standing demands (lease.py): the appended offsets are granted at once; the
                # records' wall-clock time moves the log time (lapsing a silent node's demand)
                ts = record_timestamp(op[2][-1])
                if ts > self.clock:
                    self.clock = ts
                for gname, table in self.leases.items():
                    for node, (offsets, counts) in table.push(self.log_next, self.clock).items():
                        if live and self.events is not None:
                            self.events.append(("granted", gname, node, offsets, counts, False))
            return False
        if kind == "c":  # ("c", queue, group, floor, settled, unsettled)
            table = self.leases.get(op[2])
            if table is None:
                table = self.leases[op[2]] = LeaseTable(op[3])
            elif op[3] > table.next:
                table.next = op[3]
            if op[4] is not None:
                table.settled(op[4])
            return False
        if kind == "q":
            # ("q", queue, group, node, want, wall time, visibility_timeout[, seen, weight]): the
            # last two leave a standing demand (lease.py)
            if op[5] > self.clock:
                self.clock = op[5]
            table = self.leases.get(op[2])
            if table is None:
                offsets, counts = [], []
            elif len(op) > 7:
                offsets, counts = table.request(op[3], op[4], self.clock, self.log_next, op[6], op[7], op[8])
            else:
                offsets, counts = table.grant(op[3], op[4], self.clock, self.log_next, op[6])
            if live and self.events is not None:
                self.events.append(("granted", op[2], op[3], offsets, counts, True))
            return True
        if kind == "n":  # ("n", queue, group, node, offset, reason, reject, due)
            table = self.leases.get(op[2])
            if table is not None:
                table.release(op[3], op[4], op[7])
            return True
        if kind == "g":
            self.leases.pop(op[2], None)
        return False

    def held_ack(self):
        if self.config.mode != "sync":
            return None
        return self.group.turn_hold(self.config.ack_timeout)

    def held_settlement(self):
        """The $ack's hold: refused also when its settlement arrives stale (a claim was applied
        since it was staged, RaftGroup.epoch), so a confirmed $ack is never followed by another
        delivery of the record."""
        if self.config.mode != "sync":
            return None
        return self.group.turn_hold(self.config.ack_timeout, True)

    def append(self, messages, now: float | None = None) -> list[Record]:
        return [self.append_one(m) for m in messages]

    def append_one(self, message) -> Record:
        self.group.check_writable(self.name)
        now = time.time()
        blob = encode_record(now, message)
        self.group.stage_append(self.name, blob)
        # The offset is assigned when the entry is applied (the same on every replica).
        return Record(-1, now, message, len(blob))

    def append_relayed(self, topic: str, payloads: list[bytes], origin: str):
        """``append`` of a run of plain QoS 1 payloads to ``topic`` from client ``origin``, for the
        C fast path of a PUBLISH (``QueueManager.append_relayed``): the records are encoded in one
        C call and staged into this turn's entry together; returns the PUBACKs' hold (None: mode
        async, acknowledged after the local commit). Raises QueueRefused before any effect when
        the group refuses writes now (``check_writable``)."""
        group = self.group
        group.check_writable(self.name)
        records = encode_plain_records(
            time.time(), topic.encode(), origin.encode() if origin else b"", payloads
        )
        group.stage_appends(self.name, records)
        group.stats["appends_relayed"] += len(records)
        return self.held_ack()

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

    def register(self, group: str, key: str, member) -> None:
        """This node's member ``key`` joined (``member``) or left (None) ``group``: a command, so
        the leader of any term knows it (distribution_mode forward)."""
        g = self.group
        if not getattr(g, "incarnation", ""):
            return  # no Raft group yet (forming.py): registered by the reconcile loop once formed
        if member is None:
            self.group.stage(("m", self.name, group, g.self_addr, g.incarnation, key, "", 0, False))
            return
        rest = member.filter[len("$queue/") + len(self.name) :]
        self.group.stage(
            (
                "m",
                self.name,
                group,
                g.self_addr,
                g.incarnation,
                key,
                rest[1:],
                member.max_inflight,
                member.auto_ack,
            )
        )

    def record_deliveries(self, group: str, mark: int | None, counts: dict[int, int | None]) -> None:
        """Delivery counts are part of the replicated progress: a command like a commit, so a
        leader elected after a failover counts on (``delivery-count``, ``retry.max_retries``)."""
        self.group.stage(("k", self.name, group, mark, counts))

    # -- applied on every replica, in Raft log order ---------------------------------------------

    def apply_append(self, blobs: list[bytes]) -> None:
        self.store.append_records(self.name, self.next, blobs)  # one batch update for the entry's run
        self.count += len(blobs)
        self.bytes += sum(map(len, blobs))
        self.next += len(blobs)

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
        events = self.events
        if settled is not None:
            if settled >= prog[0] and settled not in prog[1]:
                prog[1].add(settled)
                store.settle(self.name, group, settled, True)
                if events is not None:
                    events.append(("settled", group, (settled,)))
            floor = prog[0] if floor < prog[0] else floor
            if self.leased and settled == prog[0]:
                floor = settled + 1  # replicate: no node writes the floor, it follows the settlements
        if floor > prog[0] or (self.stream and floor != prog[0] and settled is None):
            if events is not None and floor > prog[0] and not self.stream:
                # offsets the floor passes that were not recorded settled: settled (on the node
                # that computed this floor)
                passed = tuple(off for off in range(prog[0], floor) if off not in prog[1])
                if passed:
                    events.append(("settled", group, passed))
            prog[0] = floor
            gone = sorted(off for off in prog[1] if off < floor)
            for off in gone:
                prog[1].discard(off)
                store.settle(self.name, group, off, False)
            store.put_group(self.name, group, floor)
        if not self.stream and prog[0] in prog[1]:
            # a settled offset at the floor moves the floor on (as ConsumerGroup.settle does),
            # also when the settlement itself is at the floor (a member on another node acked it):
            # the replicated floor never rests on a settled record, whatever the leader's group
            # missed (a leader rebuilt from such a floor would never pass it nor deliver it)
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
        self.marks.pop(group, None)
        self.counts.pop(group, None)
        self.registered.pop(group, None)

    def apply_counts(self, group: str, mark: int | None, counts: dict) -> None:
        QueueLog.record_deliveries(self, group, mark, counts)
        if mark is not None:
            self.marks[group] = mark
        mine = self.counts.setdefault(group, {})
        for off, n in counts.items():
            if n is None:
                mine.pop(off, None)
            else:
                mine[off] = n

    def apply_member(
        self,
        group: str,
        node: str,
        incarnation: str,
        key: str,
        key_filter: str,
        max_inflight: int,
        auto_ack: bool,
    ) -> None:
        """A member on ``node`` joined (``max_inflight`` > 0) or left a group (forward mode). A
        node's first registration of a new incarnation (it restarted) drops what the old one
        registered: those consumers' connections ended with it."""
        for regs in self.registered.values():
            for k in [k for k, v in regs.items() if k[0] == node and v[0] != incarnation]:
                del regs[k]
        regs = self.registered.setdefault(group, {})
        if max_inflight > 0:
            regs[(node, key)] = (incarnation, key_filter, max_inflight, auto_ack)
        else:
            regs.pop((node, key), None)
        if self.events is not None:
            self.events.append(("members", group))


def refused(reason: str, code: int = 0x80, leader: str | None = None) -> QueueRefused:
    """A refusal carried on a 5.0 PUBACK (reason string; ``leader`` user property for reject)."""
    exc = QueueRefused(reason, code)
    if leader:
        exc.user_properties = [("leader", leader)]
    return exc
