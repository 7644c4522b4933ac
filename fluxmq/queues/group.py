"""Consumer groups of a work queue: members, the pending list and what the group has settled.

A group delivers each record of its queue to one member. A delivered record stays pending until
it is settled (ack, reject, dead-lettered, expired); a nack or a visibility timeout puts it back
for redelivery. Progress is durable: ``floor`` (every offset below it settled) and the offsets
settled above it are written through the queue log, so after a restart exactly the unsettled
records are delivered again.

So are the delivery counts, once per dispatch: the ``mark`` (every unsettled offset below it was
delivered once) and the offsets below it whose count is not 1 (0: passed over for a member with
room, never delivered; 2 and more: delivered again). A dispatch runs before the turn's flush, and
the flush commits before it writes, so a count is stored before its delivery leaves the node:
after a crash the count goes on where the consumer saw it.

A member that can never take a record (over its 5.0 Maximum Packet Size, unencodable for it: its
session's ``send_tracked`` says ``REFUSED``; for a member connected to another process, its
carrier says so later: ``refused_by``) is not offered it again (``refused``); the record goes to
another member. When no member of the group can take it, it is set aside
(``undeliverable``: stored, unsettled, counted and shown per group) and the records behind it go
on; a member joining the group gets it offered again. So such a record neither blocks its group
nor is tried at every dispatch.
"""

from __future__ import annotations

import heapq
import logging
import time

from fluxmq.broker.session import REFUSED

from .config import STREAM
from .delivery import build_delivery, user_property, work_delivery
from .remote import RemoteMemberSession

log = logging.getLogger("fluxmq.queues")

#: records a dispatch looks at per call, so one call never holds the hub long
DISPATCH_BUDGET = 1024
#: dispatch's run of new records to a group's only member (``_deliver_run``); off: the general loop
#: only (tests compare the two)
RUN_FAST_PATH = True
#: PUBACK settlements above a group's floor left for the tick's write before the end of a turn
#: writes them anyway
UNWRITTEN_MAX = 4096


def filter_matches(levels: list[str] | None, key: str) -> bool:
    """MQTT topic-filter match of a member's filter levels against a routing key (None = all)."""
    if levels is None:
        return True
    parts = key.split("/") if key else []
    for i, level in enumerate(levels):
        if level == "#":
            return True
        if i >= len(parts):
            return False
        if level != "+" and level != parts[i]:
            return False
    return len(parts) == len(levels)


class Member:
    """One subscription of a session to a queue in a group."""

    __slots__ = ("session", "filter", "levels", "auto_ack", "max_inflight", "pending", "group")

    def __init__(
        self, session, filter: str, key_filter: str, auto_ack: bool, max_inflight: int, group
    ) -> None:
        self.session = session
        self.filter = filter  # as subscribed ($queue/name/...)
        self.levels = None if key_filter in ("", "#") else key_filter.split("/")
        self.auto_ack = auto_ack
        self.max_inflight = max_inflight
        self.pending = 0  # records delivered to it and not yet settled or timed out
        self.group = group

    def has_room(self) -> bool:
        return self.pending < self.max_inflight and self.session.can_take_tracked()


class Pending:
    """A delivered, unsettled record; also the delivery's ticket (its PUBACK names it). A local work
    queue delivery (``delivery.Delivery``) carries these attributes itself and is used in its place."""

    __slots__ = ("member", "deadline", "attempt", "part", "offset")

    def __init__(
        self, member: Member, deadline: float, attempt: int, part: int = -1, offset: int = -1
    ) -> None:
        self.member = member
        self.deadline = deadline  # monotonic: redelivered after it (visibility_timeout)
        self.attempt = attempt
        self.part = part  # partition of the record (-1: the queue is not partitioned)
        self.offset = offset


class ConsumerGroup:
    """One consumer group of a queue (see the module docstring)."""

    def __init__(
        self,
        queue,
        name: str,
        floor: int = 0,
        settled: set[int] | None = None,
        mark: int = 0,
        counts: dict[int, int] | None = None,
    ) -> None:
        self.queue = queue
        self.name = name
        self.group_pair = ("group-id", name)  # a delivery's user property, made once
        self.group_bytes = user_property(*self.group_pair)  # and encoded
        self._settle = self._on_puback  # a delivery's settle: bound once, not per delivery
        # Not a subclass (a replicated group overrides settle and _deliver): the inlined common cases
        # of dispatch and of a PUBACK's settlement apply.
        self._plain = self.__class__ is ConsumerGroup
        # A stream group reads the log in order from its cursor; an ack commits the cursor (no
        # pending list, no redelivery); the log keeps its records (retention limits only).
        self.stream = queue.config.type == STREAM
        self.sent: dict[int, Member] = {}  # stream: delivered, PUBACK not yet received
        # The interval counts from the group's start (the monotonic clock counts from the host's
        # boot: 0.0 here made the first tick commit at once on a host up longer than the interval).
        self.committed_at = time.monotonic()
        self.members: list[Member] = []
        self._rr = 0
        self.floor = floor
        self.settled: set[int] = settled or set()
        self.cursor = floor  # next offset this group has never looked at
        self.pending: dict[int, Pending] = {}
        self.counts: dict[int, int] = {}  # offset -> deliveries so far (unsettled records only)
        self.ready: list[int] = []  # heap of offsets to deliver before the cursor (released, parked)
        self.queued: set[int] = set()  # what is in ready
        self.retry: list[tuple[float, int]] = []  # heap of (due, offset): nacked, backing off
        self.avoid: dict[int, Member] = {}  # redeliver to another member than this one, if any
        # Partitioned queue: partition -> {member: unsettled records of it}. A partition goes to
        # its owner only once no other member holds any of its records, so order per key holds
        # across rebalancing (a new owner starts after the last settled offset).
        self.holders: dict[int, dict[Member, int]] = {}
        self.dead_pending: dict[int, str] = {}  # offset -> reason: the DLQ append failed, retried
        # offset -> the members that can never take it (send_tracked said REFUSED, here or on the
        # member's own process), until it is sent to a member here (to one elsewhere: settled; a
        # stream's: taken, or deleted by retention) or the member leaves: so at most the group's
        # unsettled records, each with at most its present members. And the offsets none of the
        # members can take, out of the dispatch until a member joins (module docstring)
        self.refused: dict[int, list[Member]] = {}
        self.undeliverable: set[int] = set()
        self._aside_counted: set[int] = set()  # set aside once already (counted once per record)
        # Delivery counts as stored (see the module docstring): what a restart found, and what
        # each dispatch changed.
        self.mark = mark
        self.loaded_mark = mark
        self.stored_counts: dict[int, int] = dict(counts or {})
        self._count_dirty: set[int] = set()
        # Progress settled by PUBACKs and not written yet: written once per loop turn
        # (write_progress, from the manager's end-of-turn dispatch), not once per PUBACK.
        self.progress_dirty = False
        self._floor_written = floor
        self._unwritten: set[int] = set()  # settled above the floor, not recorded in the store yet
        self._passed: list[int] = []  # recorded above the floor, since passed by it

    # -- members ---------------------------------------------------------------------------------

    def add(self, member: Member) -> None:
        self.members.append(member)
        if self.undeliverable:  # the new member may take what the others could not
            self._offer_aside_again()
        self._requeue_parked()

    def remove(self, member: Member) -> None:
        """A member left: what it holds is delivered again to the others, now."""
        if member in self.members:
            self.members.remove(member)
        if self.refused:  # what it refused is said by the members there are (bounded by them)
            self._forget_member(member)
        if self.undeliverable:  # a partition's owner changes (set aside again at once otherwise)
            self._offer_aside_again()
        for offset, p in list(self.pending.items()):
            if p.member is member:
                del self.pending[offset]
                self._unhold(p)
                self._push_ready(offset)
        for offset, m in list(self.sent.items()):
            if m is member:
                del self.sent[offset]
        member.pending = 0

    def _requeue_parked(self) -> None:
        pass  # parked records are in ready already; a dispatch looks at them again

    # -- dispatch --------------------------------------------------------------------------------

    def _push_ready(self, offset: int) -> None:
        if offset not in self.queued:
            self.queued.add(offset)
            heapq.heappush(self.ready, offset)

    def is_settled(self, offset: int) -> bool:
        return offset < self.floor or offset in self.settled

    def dispatch(self, now: float | None = None) -> bool:
        """Deliver what members have room for; True when it stopped on its budget (more to do)."""
        members = self.members
        if not members:
            return False
        for m in members:  # cheap exit: every member full (the common case at the append)
            if m.pending < m.max_inflight and m.session.can_take_tracked():
                break
        else:
            return False
        queue = self.queue
        qlog = queue.log
        now = time.monotonic() if now is None else now
        retry = self.retry
        while retry and retry[0][0] <= now:
            self._push_ready(heapq.heappop(retry)[1])
        ready = self.ready
        budget = DISPATCH_BUDGET
        parked: list[int] = []
        config = queue.config
        ttl = config.limits.message_ttl
        partitions = config.partitions
        stream = self.stream
        pending = self.pending
        settled = self.settled
        filtered = any(m.levels is not None for m in members)
        mark = self.mark
        if (
            not ready
            and not stream
            and partitions <= 1
            and not ttl
            and not filtered
            and not self.avoid
            and not self.stored_counts
            and self.cursor >= self.loaded_mark
            and self._plain
            and RUN_FAST_PATH
        ):
            budget -= self._deliver_run(members, budget, now)
        blocked: set[int] = set()  # partitions whose next record waits: later ones wait too
        while budget > 0:
            budget -= 1
            if ready:
                offset = ready[0]
                from_ready = True
            elif self.cursor < qlog.next:
                offset = self.cursor
                from_ready = False
            else:
                break
            if offset in pending or (not stream and (offset < self.floor or offset in settled)):
                self._pop(from_ready)
                continue
            record = qlog.get(offset)
            if record is None:  # deleted by retention or compaction meanwhile
                self._pop(from_ready)
                if not self.stream:
                    self.settle(offset)
                elif self.refused or self._aside_counted:
                    self._forget_refused(offset)
                continue
            if ttl and time.time() - record.timestamp > ttl:
                self._pop(from_ready)
                queue.stats["expired"] += 1
                if not self.stream:
                    self.settle(offset)
                continue
            key = queue.routing_key(record.message.topic) if filtered or partitions > 1 else ""
            part = -1
            refused = self.refused.get(offset) if self.refused else None
            if refused is not None and self._refused_by_all(refused, key):
                self._pop(from_ready)
                self._set_aside(offset)
                continue
            if partitions > 1:
                part = queue.partition_of(record)
                member = None if part in blocked else self._partition_owner(part, key)
                if member is not None and refused is not None and member in refused:
                    # its partition's owner can never take it: another member that can (so it
                    # holds the partition until it settles the record)
                    member = self._pick(key, None, refused)
                if member is None:
                    if not any(m.has_room() for m in self.members):
                        break
                    blocked.add(part)
                    self._pop(from_ready)
                    parked.append(offset)
                    continue
            else:
                member = self._pick(key, self.avoid.get(offset), refused)
            if member is None:
                if not any(m.has_room() for m in self.members):
                    break
                # the members that may take it are full (or none matches): others go on
                self._pop(from_ready)
                parked.append(offset)
                continue
            if from_ready:  # _pop, inline (once per delivery)
                self.queued.discard(heapq.heappop(ready))
            else:
                self.cursor = offset + 1
            if not self._deliver(member, offset, record, now, part):
                refused = self.refused.get(offset) if self.refused else None
                if refused is None or member not in refused:
                    parked.append(offset)
                    break  # it has no room after all: the others wait for the next dispatch
                # it can never take this record (_deliver noted it): offered to another member
                # by the next dispatch, or set aside; the records behind it go on
                if self._refused_by_all(refused, key):
                    self._set_aside(offset)
                else:
                    parked.append(offset)
        for offset in parked:
            self._push_ready(offset)
        if self.mark != mark or self._count_dirty:
            self._save_counts(mark)
        return budget <= 0

    def _deliver_run(self, members: list[Member], budget: int, now: float) -> int:
        """``dispatch``'s common case: new records from the cursor to a work queue's members, as
        ``_pick`` and ``_deliver`` would deliver them when there is no ready list, partition, key
        filter, TTL, member to avoid or count from before a restart (each delivery's count is 1):
        the only member, or the members in turn, those with room. Stops at the members' windows,
        the budget, the log's end, or a send a session refuses (that record is left at the cursor
        for the general loop). Returns the records looked at."""
        queue = self.queue
        qlog = queue.log
        pending = self.pending
        settled = self.settled
        counts = self.counts
        cursor = offset = self.cursor
        n = len(members)
        if n == 1:
            only = members[0]
            session = only.session
            stop = min(qlog.next, cursor + budget, cursor + only.max_inflight - only.pending)
        else:
            only = session = None
            stop = min(qlog.next, cursor + budget)
        rr = self._rr
        name = queue.name
        group = self.name
        settle = self._settle
        group_pair = self.group_pair
        group_bytes = self.group_bytes
        deadline = now + queue.config.visibility_timeout
        get = qlog.get
        sent = 0
        last = -1
        while offset < stop:
            if offset in pending or offset < self.floor or offset in settled:
                offset += 1
                continue
            record = get(offset)
            if record is None:  # deleted by retention or compaction meanwhile
                self.cursor = offset = offset + 1
                self.settle(offset - 1)
                continue
            if only is None:  # _pick, inline: the next member in turn with room
                for i in range(n):
                    member = members[(rr + i) % n]
                    if member.pending < member.max_inflight and member.session.can_take_tracked():
                        break
                else:
                    break
                session = member.session
            else:
                member = only
            count = counts.get(offset, 0) + 1
            if record.properties:
                d = build_delivery(record, name, group, count, settle, None, (), group_pair, group_bytes)
                d.member = member
                d.deadline = deadline
                d.part = -1
                d.offset = offset
            else:
                d = work_delivery(
                    record, name, count, settle, group_pair, group_bytes, member, deadline, offset
                )
            pid = session.send_tracked(d)
            if pid <= 0:
                if pid == REFUSED:  # never to this member: the general loop goes on (left at the cursor)
                    self._note_refused(offset, member)
                break
            if only is None:
                rr = (rr + i + 1) % n
                member.pending += 1
            counts[offset] = count
            if count != 1:  # (never: what lies past the cursor was not delivered in this run)
                self._count_dirty.add(offset)
            pending[offset] = d
            sent += 1
            last = offset
            offset += 1
        self.cursor = offset
        if sent:
            self._rr = rr
            if only is not None:
                only.pending += sent
            queue.stats["delivered"] += sent
            if last >= self.mark:
                self.mark = last + 1
        return offset - cursor

    def _pop(self, from_ready: bool) -> None:
        if from_ready:
            self.queued.discard(heapq.heappop(self.ready))
        else:
            self.cursor += 1

    def _partition_owner(self, part: int, key: str) -> Member | None:
        """The member owning ``part`` (members in join order, partition i -> member i mod n) when
        it may take the record now; None while another member still holds records of ``part``."""
        owner = self.members[part % len(self.members)]
        holders = self.holders.get(part)
        if holders and any(m is not owner for m in holders):
            return None
        if not owner.has_room() or not filter_matches(owner.levels, key):
            return None
        return owner

    def _unhold(self, p: Pending) -> None:
        if p.part >= 0:
            holders = self.holders.get(p.part)
            if holders is not None:
                left = holders.get(p.member, 0) - 1
                if left > 0:
                    holders[p.member] = left
                else:
                    holders.pop(p.member, None)
                    if not holders:
                        del self.holders[p.part]

    def _pick(self, key: str, avoid: Member | None, refused: list | None = None) -> Member | None:
        """The next member in turn with room that may take a record of routing key ``key``:
        ``avoid`` only when no other may, never one of ``refused``."""
        members = self.members
        n = len(members)
        if n == 1:  # the common single consumer: no rotation (its session is asked by the send)
            m = members[0]
            return (
                m
                if m.pending < m.max_inflight
                and (m.levels is None or filter_matches(m.levels, key))
                and (refused is None or m not in refused)
                else None
            )
        fallback = None
        rr = self._rr
        for i in range(n):
            m = members[(rr + i) % n]
            # has_room() and filter_matches(), inline: asked of up to every member per delivery
            if (
                m.pending >= m.max_inflight
                or not m.session.can_take_tracked()
                or (m.levels is not None and not filter_matches(m.levels, key))
                or (refused is not None and m in refused)
            ):
                continue
            if m is avoid and n > 1:
                fallback = m
                continue
            self._rr = (rr + i + 1) % n
            return m
        return fallback

    def _deliver(self, member: Member, offset: int, record, now: float, part: int = -1) -> bool:
        if self.stream:
            message = self.queue.delivery_message(
                record,
                self.name,
                1,
                self._on_puback,
                (offset, 0),
                (("x-stream-offset", str(offset)), ("x-stream-timestamp", str(int(record.timestamp * 1000)))),
                self.group_pair,
                self.group_bytes,
            )
            pid = member.session.send_tracked(message)
            if pid <= 0:
                if pid == REFUSED:
                    self._note_refused(offset, member)
                return False
            if self.refused:
                self._sent_after_refusals(offset, member)
            self.sent[offset] = member
            member.pending += 1
            self.queue.stats["delivered"] += 1
            return True
        queue = self.queue
        counts = self.counts
        # Deliveries so far (>= 1 when known; before this run: what the store says, see _prior_count).
        count = (
            counts.get(offset)
            or (self._prior_count(offset) if offset < self.loaded_mark or self.stored_counts else 0)
        ) + 1
        # The delivery is its own pending entry and ticket (delivery.Delivery): no Pending beside it.
        p = build_delivery(
            record, queue.name, self.name, count, self._settle, None, (), self.group_pair, self.group_bytes
        )
        p.member = member
        p.deadline = now + queue.config.visibility_timeout
        p.part = part
        p.offset = offset
        pid = member.session.send_tracked(p)
        if pid <= 0:
            if pid == REFUSED:
                self._note_refused(offset, member)
            return False
        if self.refused:
            self._sent_after_refusals(offset, member)
        counts[offset] = count
        if offset >= self.mark:
            self.mark = offset + 1
        if count != 1 or (self.stored_counts and offset in self.stored_counts):
            self._count_dirty.add(offset)
        if self.avoid:
            self.avoid.pop(offset, None)
        self.pending[offset] = p
        if part >= 0:
            holders = self.holders.setdefault(part, {})
            holders[member] = holders.get(member, 0) + 1
        member.pending += 1
        queue.stats["delivered"] += 1
        return True

    # -- records a member can never take -------------------------------------------------------------

    def _note_refused(self, offset: int, member: Member) -> None:
        """``member`` can never take ``offset`` (its session's ``send_tracked`` said REFUSED)."""
        refused = self.refused.get(offset)
        if refused is None:
            self.refused[offset] = [member]
        elif member not in refused:
            refused.append(member)

    def refused_by(self, offset: int, member: Member) -> None:
        """``member``, a member connected to another process, can never take ``offset`` (its
        carrier gave the delivery back, released here: its session there said ``REFUSED``): as a
        local refusal, the next dispatch offers it to another member or sets it aside."""
        self._note_refused(offset, member)
        self._push_ready(offset)

    def _refused_by_all(self, refused: list, key: str) -> bool:
        """Whether every member that may take a record of routing key ``key`` refused it."""
        matching = [m for m in self.members if m.levels is None or filter_matches(m.levels, key)]
        return bool(matching) and all(m in refused for m in matching)

    def _set_aside(self, offset: int) -> None:
        """No member can take ``offset`` (taken out of the dispatch by the caller): it waits,
        stored and unsettled, for a member to join (``add``); counted once per record."""
        self.undeliverable.add(offset)
        if offset in self._aside_counted:
            return
        self._aside_counted.add(offset)
        stats = self.queue.stats
        stats["undeliverable"] += 1
        n = stats["undeliverable"]
        if n == 1 or n % 1000 == 0:
            log.warning(
                "queue_record_undeliverable",
                extra={
                    "queue": self.queue.name,
                    "group": self.name,
                    "offset": offset,
                    "undeliverable": n,
                    "effect": "no member can take it (Maximum Packet Size): kept until a member joins",
                },
            )

    def _offer_aside_again(self) -> None:
        for offset in self.undeliverable:
            self._push_ready(offset)
        self.undeliverable.clear()

    def _sent_after_refusals(self, offset: int, member: Member) -> None:
        """``offset`` went to ``member`` after others refused it: their refusals are over, unless
        ``member`` is connected to another process, whose own refusal is still to come (kept
        until the record is settled, or each remote member would be offered it in turn for ever)."""
        if not isinstance(member.session, RemoteMemberSession):
            self._forget_refused(offset)

    def _forget_member(self, member: Member) -> None:
        for offset, refused in list(self.refused.items()):
            if member in refused:
                refused.remove(member)
                if not refused:
                    del self.refused[offset]

    def _forget_refused(self, offset: int) -> None:
        """``offset`` was delivered or settled: what its refusals said is over."""
        self.refused.pop(offset, None)
        self._aside_counted.discard(offset)
        self.undeliverable.discard(offset)

    def _prior_count(self, offset: int) -> int:
        """Deliveries of ``offset`` before this run of the node (what the store says)."""
        n = self.stored_counts.get(offset)
        if n is not None:
            return n
        return 1 if offset < self.loaded_mark else 0

    def _save_counts(self, old_mark: int) -> None:
        """Write what this dispatch changed of the delivery counts (one batch per dispatch)."""
        dirty = self._count_dirty
        mark = self.mark
        if mark != old_mark:
            counts = self.counts
            # passed over, never delivered (or set aside: no member can take it), now below the mark
            for off in (*self.ready, *self.undeliverable) if self.undeliverable else self.ready:
                if old_mark <= off < mark and not counts.get(off):
                    dirty.add(off)
        stored = self.stored_counts
        changed: dict[int, int | None] = {}
        for off in dirty:
            want = None if self.is_settled(off) or off >= mark else self.counts.get(off, 0)
            if want == 1:
                want = None
            if stored.get(off) != want:
                changed[off] = want
                if want is None:
                    stored.pop(off, None)
                else:
                    stored[off] = want
        dirty.clear()
        self.queue.log.record_deliveries(self.name, mark if mark != old_mark else None, changed)

    # -- settlement ------------------------------------------------------------------------------

    def _on_puback(self, session, reason_code: int, ticket) -> None:
        """A consumer's PUBACK: the settlement of an auto-ack member (3.1.1, or 5.0 ``auto-ack``);
        a 5.0 reason code of 0x80 or more is a nack."""
        if self.stream:
            offset = ticket[0]
            member = self.sent.pop(offset, None)
            if member is not None:
                member.pending -= 1
                if self.refused or self._aside_counted:  # taken: what refusals said is over
                    self._forget_refused(offset)
                if member.auto_ack and member.session is session and reason_code < 0x80:
                    self.commit(offset + 1)
            self.queue.manager.kick_soon(self.queue)
            return
        offset = ticket.offset
        queue = self.queue
        pending = self.pending
        member = ticket.member
        if pending.get(offset) is not ticket or member.session is not session:
            queue.manager.kick_soon(queue)  # a window slot freed
            return
        if member.auto_ack:
            if reason_code >= 0x80:
                self.nack(offset, "puback reason code")
            else:  # the ack, inline (as _release); its progress is written at the end of the turn
                del pending[offset]
                member.pending -= 1
                if ticket.part >= 0:
                    self._unhold(ticket)
                queue.stats["acked"] += 1
                if (
                    offset == self.floor
                    and self._plain
                    and not self.settled
                    and not self.stored_counts
                    and not self.avoid
                ):
                    # settle(offset, defer=True), inline for the in-order ack (once per message)
                    self.counts.pop(offset, None)
                    self.floor = offset + 1
                    self.progress_dirty = True
                else:
                    self.settle(offset, defer=True)
        manager = queue.manager
        if manager._kick_scheduled:  # kick_soon, inline (once per PUBACK)
            manager._kicked.add(queue)
        else:
            manager.kick_soon(queue)

    def _release(self, offset: int) -> Pending | None:
        p = self.pending.pop(offset, None)
        if p is not None:
            p.member.pending -= 1
            self._unhold(p)
        return p

    def commit(self, offset: int) -> bool:
        """Stream: every record below ``offset`` is consumed by the group (durable with the turn's
        commit); a commit never moves the position back."""
        if offset <= self.floor:
            return False
        self.floor = offset
        self.committed_at = time.monotonic()
        self.queue.log.commit(self.name, offset)
        return True

    def seek(self, offset: int) -> None:
        """Stream: deliver from ``offset`` on (a subscription's ``stream-offset``); committed now,
        so a replay from an old offset is also where a restart resumes."""
        qlog = self.queue.log
        offset = max(qlog.first, min(offset, qlog.next))
        self.cursor = self.floor = offset
        self.committed_at = time.monotonic()
        self.queue.log.commit(self.name, offset)

    def ack(self, offset: int, session=None) -> bool:
        """Settle a delivered record; False when it is not pending (already settled, unknown).
        ``session``: who acks (``$ack``); a replicated group checks it holds the record."""
        if self.stream:
            return self.commit(offset + 1) or offset < self.floor
        if self._release(offset) is None:
            return False
        self.queue.stats["acked"] += 1
        self.settle(offset)
        return True

    def nack(self, offset: int, reason: str = "") -> bool:
        """Deliver again after the backoff; to the DLQ after ``retry.max_retries`` deliveries."""
        if self.stream:
            return False  # a stream has no redelivery: seek by subscribing with stream-offset
        p = self._release(offset)
        if p is None:
            return False
        self.queue.stats["nacked"] += 1
        self._again(offset, p.member, "max-retries")
        return True

    def reject(self, offset: int, reason: str = "") -> bool:
        """Straight to the DLQ (or dropped when the queue has none)."""
        if self.stream or self._release(offset) is None:
            return False
        self.queue.stats["rejected"] += 1
        self._dead_letter(offset, reason or "rejected")
        return True

    def _again(self, offset: int, member: Member | None, why: str) -> None:
        count = self.counts.get(offset, 0)
        retry_cfg = self.queue.config.retry
        if count >= retry_cfg.max_retries:
            self._dead_letter(offset, why)
            return
        if member is not None:
            self.avoid[offset] = member
        heapq.heappush(self.retry, (time.monotonic() + retry_cfg.backoff(count), offset))

    def _dead_letter(self, offset: int, reason: str) -> bool:
        record = self.queue.log.get(offset)
        if record is not None and not self.queue.dead_letter(record, reason, self.counts.get(offset, 0)):
            # The DLQ append failed (storage full, DLQ full): the record stays unsettled and the
            # append is tried again (retry_dead_letters); it is never dropped.
            if offset not in self.dead_pending:
                self.queue.stats["dlq_append_failed"] += 1
            self.dead_pending[offset] = reason
            return False
        self.dead_pending.pop(offset, None)
        self.settle(offset)
        return True

    def retry_dead_letters(self) -> int:
        """Try the DLQ appends that failed again (every tick while any wait); returns those done."""
        done = 0
        for offset, reason in list(self.dead_pending.items()):
            if not self._dead_letter(offset, reason):
                break  # still failing: the rest wait for the next tick
            done += 1
        return done

    def settle(self, offset: int, defer: bool = False) -> None:
        """Record ``offset`` as settled for good (durable with the turn's commit). ``defer``: the
        progress is written at the end of the loop turn (``write_progress``), still before the
        turn's commit; for settlements nothing acknowledges (a consumer's PUBACK)."""
        self.counts.pop(offset, None)
        if self.refused or self._aside_counted:
            self._forget_refused(offset)
        if self.stored_counts and self.stored_counts.pop(offset, None) is not None:
            self.queue.log.record_deliveries(self.name, None, {offset: None})
        if self.avoid:
            self.avoid.pop(offset, None)
        if offset == self.floor:
            floor = offset + 1
            settled = self.settled
            if settled:
                unwritten = self._unwritten
                passed = self._passed
                while floor in settled:
                    settled.discard(floor)
                    if floor in unwritten:
                        unwritten.discard(floor)  # never recorded: nothing to delete
                    else:
                        passed.append(floor)
                    floor += 1
            self.floor = floor
        elif offset > self.floor and offset not in self.settled:
            self.settled.add(offset)
            self._unwritten.add(offset)
        else:
            return
        if defer:
            self.progress_dirty = True
        else:
            self.write_progress()

    def write_progress(self, floor_only: bool = False) -> None:
        """Write what was settled since the last write: the floor, the offsets settled above it,
        and the deletes of those the floor passed (one batch, not one write per settlement).

        ``floor_only`` (the end of a turn): the offsets settled above the floor wait, up to
        UNWRITTEN_MAX of them, for the next full write (the tick, within 100 ms); most are passed
        by the floor by then and never written (with many members, PUBACKs come out of order)."""
        qlog = self.queue.log
        name = self.name
        floor = self.floor
        unwritten = self._unwritten
        if unwritten and (not floor_only or len(unwritten) > UNWRITTEN_MAX):
            for off in sorted(unwritten):
                qlog.commit(name, floor, off)
            unwritten.clear()
        if floor != self._floor_written or self._passed:
            qlog.commit(name, floor, None, self._passed)
            self._passed = []
            self._floor_written = floor
        self.progress_dirty = bool(unwritten)

    # -- timers ----------------------------------------------------------------------------------

    def expire_pending(self, now: float) -> int:
        """Records whose visibility timeout passed go back for redelivery (to another member)."""
        expired = [off for off, p in self.pending.items() if p.deadline <= now]
        for offset in expired:
            p = self._release(offset)
            self.queue.stats["timed_out"] += 1
            count = self.counts.get(offset, 0)
            if count >= self.queue.config.retry.max_retries:
                self._dead_letter(offset, "max-retries")
            else:
                self.avoid[offset] = p.member
                self._push_ready(offset)
        return len(expired)

    def auto_commit(self, now: float) -> None:
        """Stream: commit what was delivered every ``auto_commit_interval``."""
        interval = self.queue.config.auto_commit_interval
        if interval and now - self.committed_at >= interval:
            self.committed_at = now
            done = min(self.sent, default=self.cursor)  # below every delivery still unacknowledged
            if done > self.floor:
                self.commit(done)

    def lag(self) -> int:
        """Records of the queue this group has not settled."""
        return max(0, self.queue.log.next - self.floor - len(self.settled))
