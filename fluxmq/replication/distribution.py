"""distribution_mode forward: consumers on any replica of a replicated queue, the leader deciding.

The delivering leader's consumer groups (``fluxmq.queues.group.ConsumerGroup``) keep deciding who
gets what, with their windows, visibility timeouts, backoffs, partitions and DLQ; what is new is
that a member may be connected to another node. Everything between nodes travels in the Raft log
(no channel of its own, so it works wherever the group runs, static peers included):

- ``m`` (every node, for its own members): a member joined or left a group (key = client id and
  filter, its key filter, window, auto-ack, and the node's incarnation). Applied everywhere, so a
  new leader knows the members of every node; the leader makes each one of another node a
  ``Member`` whose session is a ``RemoteSession``. A node reconciles what the log says of it with
  its members every RECONCILE seconds (a registration lost in an election is sent again, those of
  an earlier incarnation are removed).
- ``l`` (the leader): a delivery to a member on another node is a lease command, batched per
  member and loop turn: its offsets and delivery counts. The node of that member, once the entry
  is applied (after the appends it names), delivers the records from its own replica.
- settlement: a consumer's ``$ack`` (or auto-ack PUBACK) on any node is the usual progress commit
  (``c``), held until committed; the leader, applying it, releases the member's pending record.
  A nack or reject on a follower is an ``n`` command the leader applies to its group (backoff,
  redelivery to another member, DLQ); a lease the node cannot deliver (the member left, its
  window is taken) is given back with ``b``, naming those its client can never take (over its
  Maximum Packet Size: the leader's group offers them to another member or sets them aside).
- a node that does not answer the leader for NODE_SILENCE seconds: its members leave the
  leader's groups (what they held is delivered again, at least once) until it answers again.

A delivery count is in the ``l`` command and in the replicated counts (``k``, every dispatch), so
it goes on across a failover. The single-node and non-replicated paths are untouched: only a
replicated queue with ``distribution_mode: forward`` uses ``ReplicatedGroup``.
"""

from __future__ import annotations

import heapq
import logging
import time

from fluxmq.broker.session import REFUSED
from fluxmq.queues.group import ConsumerGroup, Member, Pending
from fluxmq.queues.remote import RemoteMemberSession

from .lease import DEMAND_TTL

log = logging.getLogger("fluxmq.replication")

#: a node the leader has not heard from for this long holds no members (what they held goes
#: to others): above RAFT_MAX_TIMEOUT, so a node that is only slow for an election's span keeps them
NODE_SILENCE = 2.0
#: how often a node compares what the log says of its members with its members (and the leader
#: looks at who answers)
RECONCILE = 0.5


def member_key(member: Member) -> str:
    return f"{member.session.client_id}\x00{member.filter}"


class RemoteSession(RemoteMemberSession):
    """The session side of a member connected to another node, as the delivering leader sees it:
    a delivery to it is a lease command in the group's next Raft entry."""

    __slots__ = ("raft", "key", "key_filter", "queue", "group")

    def __init__(
        self, raft, node: str, key: str, key_filter: str, queue: str, group: str, window: int
    ) -> None:
        super().__init__(node, key.split("\x00", 1)[0], window)
        self.raft = raft  # RaftGroup
        self.key = key
        self.key_filter = key_filter
        self.queue = queue
        self.group = group

    def send_tracked(self, message) -> int:
        if not self.alive:
            return 0
        ticket = message.ticket
        if ticket is None:  # a work queue's delivery is its own ticket (fluxmq.queues.delivery)
            ticket = message
        if not isinstance(ticket, tuple):  # a Pending, or a delivery with its attributes
            self.raft.stage_lease(self.queue, self.group, self.node, self.key, ticket.offset, ticket.attempt)
        else:  # a stream's (offset, 0)
            self.raft.stage_lease(self.queue, self.group, self.node, self.key, ticket[0], 1)
        return 1


def _remote(member: Member) -> bool:
    return member.session.__class__ is RemoteSession


class ReplicatedGroup(ConsumerGroup):
    """A consumer group of a replicated queue in ``distribution_mode: forward``: it registers its
    node's members through the log, holds the leader's remote members, delivers the leases the
    leader gives this node's members, and forwards a follower's nacks and rejects."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.local: dict[str, Member] = {}  # this node's members by key
        self.remote: dict[tuple[str, str], Member] = {}  # (node, key) -> member (on the leader)
        # distribution_mode replicate (a work queue): this node delivers only what it leased
        self.leased = bool(getattr(self.queue.log, "leased", False))
        self.lease_counts: dict[int, int] = {}  # offset leased here -> its grants (its delivery count)
        self._asked = 0.0  # when the request in flight was staged (one at a time)
        if self.leased:
            self.loaded_mark = 1 << 62  # every count comes from the lease (_prior_count)

    # -- members ---------------------------------------------------------------------------------

    def add(self, member: Member) -> None:
        super().add(member)
        if _remote(member):
            s = member.session
            self.remote[(s.node, s.key)] = member
            return
        key = member_key(member)
        self.local[key] = member
        if not self.leased:
            self.queue.log.register(self.name, key, member)

    def remove(self, member: Member) -> None:
        lowest = min((o for o, m in self.sent.items() if m is member), default=None) if self.stream else None
        super().remove(member)
        if lowest is not None and lowest < self.cursor:
            # a stream member gone with records unacknowledged: read again (at least once)
            self.cursor = lowest
        if _remote(member):
            s = member.session
            if self.remote.get((s.node, s.key)) is member:
                del self.remote[(s.node, s.key)]
            return
        key = member_key(member)
        if self.local.get(key) is member:
            del self.local[key]
            if not self.leased:
                self.queue.log.register(self.name, key, None)
        if self.leased and not self.members and self.ready:
            # nobody here takes what this node leased: given back at once, to any node
            now = time.time()
            for off in self.ready:
                self._release_lease(off, now)
            self.ready.clear()
            self.queued.clear()
        if self.leased and self.queue.log.delivering:
            self._asked = 0.0
            self.ask()  # less room: this node's standing demand goes down (to none without members)

    def take_over(self, old: ConsumerGroup | None) -> None:
        """This node's members of ``old`` (an earlier leadership's or a follower's group) become
        this group's; what ``old`` had delivered is forgotten (its acks find nothing, the records
        go out again: at least once)."""
        if old is None:
            return
        old.pending.clear()
        old.sent.clear()
        for m in old.members:
            m.pending = 0
            if not _remote(m):
                m.group = self
                self.members.append(m)
        self.local = {k: m for k, m in getattr(old, "local", {}).items() if m in self.members}

    def sync_remote(self, registered: dict, alive: set[str], self_addr: str, raft) -> bool:
        """Make the remote members those registered on nodes that answer (leader); True on a change."""
        if self.leased:
            return False
        want = {k: v for k, v in registered.items() if k[0] != self_addr and k[0] in alive}
        changed = False
        for k, m in list(self.remote.items()):
            reg = want.get(k)
            if reg is None or reg[1] != m.session.key_filter or reg[2] != m.max_inflight:
                m.session.alive = False
                self.remove(m)
                changed = True
        qname = self.queue.name
        for (node, key), (_inc, key_filter, window, auto_ack) in want.items():
            if (node, key) in self.remote:
                continue
            session = RemoteSession(raft, node, key, key_filter, qname, self.name, window)
            filter = f"$queue/{qname}/{key_filter}" if key_filter else f"$queue/{qname}"
            self.add(Member(session, filter, key_filter, auto_ack, window, self))
            changed = True
        return changed

    def _deliver(self, member: Member, offset: int, record, now: float, part: int = -1) -> bool:
        """A work-queue delivery to a member on another node is only a lease command: the same
        bookkeeping as ``ConsumerGroup._deliver`` (count, pending, partition holders, the mark),
        without encoding a PUBLISH this node would never send (its node builds its own)."""
        session = member.session
        if self.stream or session.__class__ is not RemoteSession:
            return super()._deliver(member, offset, record, now, part)
        if not session.alive:
            return False
        counts = self.counts
        count = (
            counts.get(offset)
            or (self._prior_count(offset) if offset < self.loaded_mark or self.stored_counts else 0)
        ) + 1
        session.raft.stage_lease(session.queue, session.group, session.node, session.key, offset, count)
        counts[offset] = count
        if offset >= self.mark:
            self.mark = offset + 1
        if count != 1 or (self.stored_counts and offset in self.stored_counts):
            self._count_dirty.add(offset)
        if self.avoid:
            self.avoid.pop(offset, None)
        self.pending[offset] = Pending(
            member, now + self.queue.config.visibility_timeout, count, part, offset
        )
        if part >= 0:
            holders = self.holders.setdefault(part, {})
            holders[member] = holders.get(member, 0) + 1
        member.pending += 1
        self.queue.stats["delivered"] += 1
        return True

    # -- deliveries of leases (the member's node) --------------------------------------------------

    def deliver_leased(self, key: str, offsets, counts) -> tuple[list[int], list[int]]:
        """Deliver what the leader leased to this node's member ``key``; returns the offsets it
        could not take (given back), and those of them its client can never take (``REFUSED``:
        over its Maximum Packet Size; the leader never leases them to that member again)."""
        member = self.local.get(key)
        if member is None:
            return list(offsets), []
        queue = self.queue
        qlog = queue.log
        prog = qlog.progress.get(self.name)
        now = time.monotonic()
        back: list[int] = []
        refused: list[int] = []
        for offset, count in zip(offsets, counts, strict=True):
            if prog is not None and not self.stream and (offset < prog[0] or offset in prog[1]):
                continue  # settled meanwhile
            record = qlog.get(offset)
            if record is None:
                continue
            self._drop_local(offset)
            if self.stream:
                message = queue.delivery_message(
                    record,
                    self.name,
                    1,
                    self._on_puback,
                    (offset, 0),
                    (
                        ("x-stream-offset", str(offset)),
                        ("x-stream-timestamp", str(int(record.timestamp * 1000))),
                    ),
                    self.group_pair,
                    self.group_bytes,
                )
                pid = member.session.send_tracked(message)
                if pid <= 0:  # 0 not now, REFUSED never
                    back.append(offset)
                    if pid == REFUSED:
                        refused.append(offset)
                    continue
                self.sent[offset] = member
            else:
                p = Pending(member, now + queue.config.visibility_timeout, count, -1, offset)
                message = queue.delivery_message(
                    record, self.name, count, self._on_puback, p, (), self.group_pair, self.group_bytes
                )
                pid = member.session.send_tracked(message)
                if pid <= 0:  # 0 not now, REFUSED never
                    back.append(offset)
                    if pid == REFUSED:
                        refused.append(offset)
                    continue
                self.pending[offset] = p
                self.counts[offset] = count
            member.pending += 1
            queue.stats["delivered"] += 1
        return back, refused

    def _drop_local(self, offset: int) -> None:
        """A delivery this node made of ``offset`` no longer holds it (settled, leased again)."""
        if self.lease_counts:
            self.lease_counts.pop(offset, None)
        p = self.pending.pop(offset, None)
        if p is not None:
            p.member.pending -= 1
        m = self.sent.pop(offset, None)
        if m is not None:
            m.pending -= 1

    def moved(self, offsets) -> None:
        """The leader leased ``offsets`` to a member elsewhere: this node's own deliveries of them
        are stale (not the leader's record of that lease)."""
        if self.leased:
            dropped = False
            aside = self.refused or self.undeliverable
            for off in offsets:
                self.lease_counts.pop(off, None)
                if aside:  # set aside here (no member here can take it): another node's now
                    self._forget_refused(off)
                if off in self.queued:
                    self.queued.discard(off)
                    dropped = True
            if dropped:
                self.ready = [o for o in self.ready if o in self.queued]
                heapq.heapify(self.ready)
        pending, sent = self.pending, self.sent
        if pending or sent:
            for off in offsets:
                p = pending.get(off)
                if p is not None and not _remote(p.member):
                    self._drop_local(off)
                m = sent.get(off)
                if m is not None and not _remote(m):
                    self._drop_local(off)

    def follow(self, prog) -> None:
        """A follower's view of the replicated progress: its floor (a stream's cursor)."""
        floor = prog[0]
        if self.stream:
            if floor != self.floor:
                self.floor = self.cursor = floor
                for off in [o for o in self.sent if o < floor]:
                    self._drop_local(off)
            return
        if floor <= self.floor:
            return
        self.floor = floor
        self._floor_written = max(self._floor_written, floor)
        if self.settled:
            self.settled = {o for o in self.settled if o >= floor}
            self._unwritten = {o for o in self._unwritten if o >= floor}
        self._passed = [o for o in self._passed if o >= floor]
        self.cursor = max(self.cursor, floor)
        for off in [o for o in self.pending if o < floor]:
            self._drop_local(off)
        for off in [o for o in self.counts if o < floor]:
            del self.counts[off]

    # -- the leader's side of settlements made elsewhere ------------------------------------------

    def settled_elsewhere(self, offsets) -> None:
        """Offsets a member on another node settled (its commit applied): released here."""
        stats = self.queue.stats
        for off in offsets:
            if self.is_settled(off):
                continue
            if self._release(off) is not None:
                stats["acked"] += 1
            self.settle(off, defer=True)

    def cursor_elsewhere(self, floor: int) -> None:
        """A stream group's cursor committed on another node: the records below it are done."""
        for off in [o for o, m in self.sent.items() if o < floor and _remote(m)]:
            self.sent.pop(off).pending -= 1
        if floor > self.floor:
            self.floor = floor
            self.cursor = max(self.cursor, floor)

    def given_back(self, node: str, key: str, offsets, refused=()) -> None:
        """A member's node could not deliver its lease: to another member. ``refused`` (of
        ``offsets``): its client can never take them, as a local session's ``REFUSED`` (never
        leased to that member again: to another, or set aside)."""
        refused = set(refused) if refused else ()
        stats = self.queue.stats
        for off in offsets:
            p = self.pending.get(off)
            if (
                p is not None
                and _remote(p.member)
                and p.member.session.node == node
                and p.member.session.key == key
            ):
                self._release(off)
                if off in refused:
                    self.refused_by(off, p.member)
                    stats["delivered"] -= 1  # as a local refusal: never counted as delivered
                else:
                    self.avoid[off] = p.member
                    self._push_ready(off)
            m = self.sent.get(off)
            if m is not None and _remote(m) and m.session.node == node:
                self.sent.pop(off)
                m.pending -= 1
                if off in refused:
                    self.refused_by(off, m)
                elif off < self.cursor:
                    self.cursor = off

    def remote_nack(self, node: str, offset: int, reason: str, reject: bool) -> None:
        p = self.pending.get(offset)
        if p is None or not _remote(p.member) or p.member.session.node != node:
            return  # settled or delivered again since: the stale nack changes nothing
        if reject:
            self.reject(offset, reason)
        else:
            self.nack(offset, reason)

    # -- a follower's settlements ----------------------------------------------------------------

    def nack(self, offset: int, reason: str = "") -> bool:
        if self.stream or self.leased or self.queue.log.deciding:
            return super().nack(offset, reason)
        return self._forward(offset, reason, False)

    def reject(self, offset: int, reason: str = "") -> bool:
        if self.stream or self.leased or self.queue.log.deciding:
            return super().reject(offset, reason)
        return self._forward(offset, reason, True)

    def _forward(self, offset: int, reason: str, reject: bool) -> bool:
        """A nack or reject on a node that does not deliver: the leader decides what follows."""
        p = self.pending.pop(offset, None)
        if p is None:
            return False
        p.member.pending -= 1
        self.queue.stats["rejected" if reject else "nacked"] += 1
        qlog = self.queue.log
        qlog.group.stage(("n", qlog.name, self.name, qlog.group.self_addr, offset, reason, reject))
        return True

    # -- distribution_mode replicate: deliver what this node leased (lease.py) --------------------

    def dispatch(self, now: float | None = None) -> bool:
        if not self.leased:
            return super().dispatch(now)
        # never walk the log: what this node may deliver is in ready, put there by its grants
        self.cursor = self.queue.log.next
        more = super().dispatch(now) if self.ready else False
        self.ask()
        return more

    def ask(self) -> None:
        """Ask for as many leases as this node's members have room for (one request in flight).
        What a request does not get stands as this node's demand (lease.py), served as records
        are appended: asked again when the room differs from it, when it is half-way to lapsing,
        or when released or expired leases wait in the table."""
        now = time.monotonic()
        if now - self._asked < 1.0:
            return
        room = -len(self.ready)
        weight = 0
        for m in self.members:
            if m.session.can_take_tracked():
                free = m.max_inflight - m.pending
                if free > 0:
                    room += free
                    weight += 1
        room = max(0, room)
        qlog = self.queue.log
        table = qlog.leases.get(self.name)
        if table is None:
            return
        raft = qlog.group
        me = raft.self_addr
        standing, lapses = table.standing(me, qlog.clock)
        wall = time.time()
        if not (
            room != standing
            or (standing and qlog.clock >= lapses - DEMAND_TTL / 2)
            or (room and qlog.leasable(self.name, wall))
        ):
            return
        raft.stage(
            (
                "q",
                qlog.name,
                self.name,
                me,
                room,
                wall,
                self.queue.config.visibility_timeout,
                table.given.get(me, 0),
                weight,
            )
        )
        self._asked = now

    def granted(self, offsets, counts, answered: bool = True) -> None:
        """This node's request was applied (``answered``), or appended offsets were granted to its
        standing demand: deliver what it was granted."""
        if answered:
            self._asked = 0.0
        if not self.members:
            # its members left before the demand was withdrawn: given back at once, to any node
            now = time.time()
            for off in offsets:
                self._release_lease(off, now)
            return
        prog = self.queue.log.progress.get(self.name)
        for off, n in zip(offsets, counts, strict=True):
            if prog is not None and (off < prog[0] or off in prog[1]):
                self.queue.log.commit(self.name, 0, off)  # settled already: ends the lease
                continue
            self.lease_counts[off] = n
            self.counts.pop(off, None)
            if off in self.pending:  # leased again to this node (it expired here): a new delivery
                self._drop_local(off)
                self.lease_counts[off] = n
            self._push_ready(off)
        self.queue.manager.kick_soon(self.queue)

    def ack(self, offset: int, session=None) -> bool:
        """An ``$ack`` settles a record only for the member holding it (as an auto-ack PUBACK):
        after a takeover the new leader hands out again what nobody settled, maybe to another
        member, and the ack of the earlier delivery, staged after the claim, must not settle the
        new one (it was confirmed, then the record reached the other member). Without a session
        (an ack from no client) it settles by offset."""
        if session is not None and not self.stream:
            p = self.pending.get(offset)
            if p is not None and p.member.session is not session:
                return False
        return super().ack(offset, session)

    def _release(self, offset: int):
        p = super()._release(offset)
        if p is not None and self.leased:
            self.cursor = -1  # room again: the next kick dispatches (and asks for leases)
        return p

    def _on_puback(self, session, reason_code: int, ticket) -> None:
        if self.leased:
            self.cursor = -1  # a window slot freed: the next kick asks for leases
        super()._on_puback(session, reason_code, ticket)

    def _prior_count(self, offset: int) -> int:
        if self.leased:
            return self.lease_counts.get(offset, 1) - 1
        return super()._prior_count(offset)

    def _save_counts(self, old_mark: int) -> None:
        if self.leased:  # the counts are the leases' (lease.py), replicated with them
            self._count_dirty.clear()
            return
        super()._save_counts(old_mark)

    def _release_lease(self, offset: int, due: float) -> None:
        self.lease_counts.pop(offset, None)
        qlog = self.queue.log
        raft = qlog.group
        raft.stage(("n", qlog.name, self.name, raft.self_addr, offset, "", False, due))

    def _again(self, offset: int, member: Member | None, why: str) -> None:
        if not self.leased:
            super()._again(offset, member, why)
            return
        count = self.counts.get(offset, 0)
        retry_cfg = self.queue.config.retry
        if count >= retry_cfg.max_retries:
            self._dead_letter(offset, why)
            return
        # back to the lease table, due after the backoff (any node may take it then)
        self._release_lease(offset, time.time() + retry_cfg.backoff(count))

    def expire_pending(self, now: float) -> int:
        if not self.leased:
            return super().expire_pending(now)
        expired = [off for off, p in self.pending.items() if p.deadline <= now]
        for offset in expired:
            self._release(offset)
            self.queue.stats["timed_out"] += 1
            if self.counts.get(offset, 0) >= self.queue.config.retry.max_retries:
                self._dead_letter(offset, "max-retries")
            else:
                self._release_lease(offset, time.time())
        return len(expired)

    def settle(self, offset: int, defer: bool = False) -> None:
        if self.queue.log.deciding:
            super().settle(offset, defer)
            return
        # A follower keeps no settled state of its own (an ack whose commit was refused in an
        # election must be written again when the record comes back): each settlement is a
        # commit of that offset; the floor is the leader's to move (``follow``).
        self.counts.pop(offset, None)
        if self.avoid:
            self.avoid.pop(offset, None)
        self.queue.log.commit(self.name, 0, offset)

    def write_progress(self, floor_only: bool = False) -> None:
        # A follower's settlements above the floor are written at once: its tick does not run
        # (it does not deliver), and the leader waits for them to release the records.
        super().write_progress(floor_only and self.queue.log.deciding)
