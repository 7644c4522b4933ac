"""QueueManager: what the broker hands ``$queue/`` publishes and subscriptions to.

The broker calls four methods (``publish``, ``subscribe``, ``unsubscribe``, ``session_gone``);
nothing here imports a listener or a wire codec. Appends, settlements and group progress go into
the storage's pending batch, so the FlushScheduler's commit (before any acknowledgement of the
loop turn is written) makes them durable: a publisher's PUBACK means the append is stored, and
an acked record is never delivered again after a restart.
"""

from __future__ import annotations

import logging
import time
import zlib

import gevent

from fluxmq.broker.message import USER_PROPERTY, Message, TrackedMessage
from fluxmq.errors import QueueRefused

from .config import CLASSIC, STREAM, QueueConfig, valid_queue_name
from .delivery import ACK, NACK, REJECT, SETTLE_ACTIONS, build_delivery, parse_message_id, user_properties
from .group import ConsumerGroup, Member
from .log import QueueLog
from .remote import RemoteMemberSession
from .retention import apply_retention, truncate_settled

log = logging.getLogger("fluxmq.queues")

PREFIX = "$queue/"
#: bounds on what clients can create (bounded memory and store): queues made by auto_create,
#: consumer groups per queue; past them a publish gets 0x97, a subscription 0x97
MAX_AUTO_QUEUES = 10_000
MAX_GROUPS_PER_QUEUE = 1_000
#: keys a compacted queue remembers beyond twice those of its live records before it drops the gone ones
COMPACT_SLACK = 1024
#: how often pending deliveries, backoffs and retention are looked at
TICK = 0.1


def _local_log(name: str, store, stored=None) -> QueueLog:
    if stored is None:
        return QueueLog(name, store)
    return QueueLog(name, store, stored.first, stored.next, stored.count, stored.bytes)


class QueueCounters(dict):
    """A queue's counters by name; an unknown name reads 0 (and is not added). A plain dict store per
    ``+= 1``: ``collections.Counter`` defines ``__delitem__``, which sends every item assignment
    through a Python-level ``__setitem__`` call (3-4x the cost, three counts per queue message)."""

    __slots__ = ()

    def __missing__(self, key: str) -> int:
        return 0


class Queue:
    """One queue: its settings, log, consumer groups and counters."""

    def __init__(self, manager: QueueManager, config: QueueConfig, qlog: QueueLog) -> None:
        self.manager = manager
        self.config = config
        self.name = config.name
        self.log = qlog
        # a replicated log may deliver through a group class of its own (fluxmq.replication)
        self.group_class = qlog.group_class or ConsumerGroup
        self.groups: dict[str, ConsumerGroup] = {}
        self.stats = QueueCounters()
        self._key_at = len(PREFIX) + len(self.name) + 1
        # retention.compact: key -> offset of its newest record (rebuilt from the log at start);
        # keys whose record retention deleted go once it holds more than _prune_at (``_compact``)
        self.newest: dict[str, int] | None = {} if config.retention.compact else None
        self._prune_at = COMPACT_SLACK

    def routing_key(self, topic: str) -> str:
        """``$queue/{name}/{routing key}`` -> routing key ("" for ``$queue/{name}``); a captured
        ordinary publish's routing key is its topic."""
        return topic[self._key_at :] if topic.startswith(PREFIX) else topic

    def delivery_message(
        self, record, group: str, count: int, settle, ticket, extra=(), group_pair=None, group_bytes=None
    ) -> Message:
        return build_delivery(record, self.name, group, count, settle, ticket, extra, group_pair, group_bytes)

    def record_key(self, message: Message) -> str:
        """Partition and compaction key: user property ``partition-key``, else the routing key."""
        props = message.properties
        if props:
            for name, value in props.get(USER_PROPERTY, ()):
                if name == "partition-key":
                    return value
        return self.routing_key(message.topic)

    def partition_of(self, record) -> int:
        """One key always lands in one partition (CRC-32 of the key)."""
        return zlib.crc32(self.record_key(record.message).encode()) % self.config.partitions

    def offset_at(self, ms: int) -> int:
        """The first offset appended at or after wall time ``ms`` (milliseconds); the end if none."""
        lo, hi = self.log.first, self.log.next
        while lo < hi:  # append times grow with offsets
            mid = (lo + hi) // 2
            rec = self.log.get(mid)
            if rec is None or rec.timestamp * 1000 < ms:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def depth(self) -> int:
        return self.log.count

    def append(self, message: Message) -> int:
        limits = self.config.limits
        if limits.max_depth and self.log.count >= limits.max_depth:
            self.stats["refused_full"] += 1
            raise QueueRefused(f"queue {self.name} is full (limits.max_depth {limits.max_depth})", 0x97)
        if limits.max_message_size and len(message.payload) > limits.max_message_size:
            raise QueueRefused(f"message over limits.max_message_size of queue {self.name}", 0x97)
        stored = message
        if message.qos != 1 or message.retain:  # kept as a QoS 1, non-retained message
            stored = Message(
                message.topic,
                message.payload,
                1,
                False,
                message.properties,
                message.expires_at,
                message.origin,
            )
        rec = self.log.append_one(stored)
        self.stats["appended"] += 1
        if self.newest is not None:
            self._compact(rec)
        return rec.offset

    def _compact(self, rec) -> None:
        """Keep only the newest record of ``rec``'s key: the older one is deleted in the same commit."""
        key = self.record_key(rec.message)
        newest = self.newest
        older = newest.get(key)
        newest[key] = rec.offset
        if older is not None and self.log.delete(older):
            self.stats["compacted"] += 1
        if len(newest) > self._prune_at:
            # Keys whose newest record is gone (retention deleted the front of the log): not kept
            # for ever, one per key ever seen. Amortized: the next look waits for as many again.
            first = self.log.first
            self.newest = newest = {k: off for k, off in newest.items() if off >= first}
            self._prune_at = 2 * len(newest) + COMPACT_SLACK

    def rebuild_compaction(self) -> None:
        qlog = self.log
        off = qlog.first
        while off < qlog.next:
            for rec in qlog.read(off, 1000):
                self._compact(rec)
            off += 1000

    def dead_letter(self, record, reason: str, count: int) -> bool:
        """Append ``record`` to this queue's DLQ with x-death-reason, x-delivery-count and
        x-original-topic; False when it cannot be stored now (the caller keeps it pending)."""
        cfg = self.config
        if not cfg.dlq.enabled:
            self.stats["dropped_no_dlq"] += 1
            log.warning(
                "queue_message_dropped",
                extra={
                    "queue": self.name,
                    "offset": record.offset,
                    "reason": reason,
                    "why": "dlq.enabled is false",
                },
            )
            return True
        manager = self.manager
        if manager.storage_refusing():
            return False
        message = record.message
        props = dict(message.properties) if message.properties else {}
        user = list(props.get(USER_PROPERTY, ()))
        user += [
            ("x-death-reason", reason),
            ("x-delivery-count", str(count)),
            ("x-original-topic", message.topic),
        ]
        props[USER_PROPERTY] = user
        dlq = manager.queue(cfg.dlq_queue, create=True)
        try:
            dlq.append(Message(f"{PREFIX}{dlq.name}", message.payload, 1, False, props))
        except QueueRefused as exc:
            log.warning("dlq_append_failed", extra={"queue": self.name, "dlq": dlq.name, "error": str(exc)})
            return False
        self.stats["dead_lettered"] += 1
        manager.kick(dlq)
        return True


class QueueManager:
    """Every queue of the node (see the module docstring)."""

    def __init__(
        self,
        storage,
        configs: list[QueueConfig] | None = None,
        auto_create: bool = True,
        stats=None,
        log_factory=None,
        placement=None,
    ) -> None:
        self.storage = storage
        # Several workers (``server.workers`` > 1): a ``fluxmq.queues.placement.QueuePlacement``;
        # this manager holds only the queues it owns, and ``remote`` (set by the workers' cluster,
        # ``fluxmq.cluster.queues.RemoteQueues``) carries what concerns the others to their owners.
        self.placement = placement
        self.remote = None
        # queue -> its stored state, for the queues of this shard another worker owns (the worker
        # count changed): their unsettled records move to the owner (take_stranded, drop_stranded)
        self.stranded: dict[str, object] = {}
        self._stranded_logs: dict[str, QueueLog] = {}
        self._moving: set[str] = set()  # stranded queues with a batch taken and not yet settled
        # install_captures: (router, interest, release); queue -> its capture target and filters
        self._capture_to = None
        self._captured: dict[str, tuple] = {}
        self.store = storage.queue_log()
        # log_factory(name, store, stored or None) -> QueueLog: a replicated log for the queues a
        # replication group holds (fluxmq.replication), else the local one.
        self.log_factory = log_factory or _local_log
        self.auto_create = auto_create
        self.configs = {c.name: c for c in configs or ()}
        self.queues: dict[str, Queue] = {}
        self.members: dict[object, list[Member]] = {}  # session -> its memberships
        self.resumable: dict[str, list[tuple]] = {}  # client id -> memberships of its offline session
        self._stored_members: set[str] = set()  # client ids whose memberships are in the store
        self.broker_stats = stats
        self._kicked: set[Queue] = set()
        self._kick_scheduled = False
        self._timer = None
        self._closing = False
        for name, stored in self.store.load_queues().items():
            if not self.owns(name):
                # Stored when the node ran another number of workers: another worker owns the queue
                # now. Left unread in this shard (never served twice); see docs/cluster.rst.
                self.stranded[name] = stored
                log.warning(
                    "queue_stranded",
                    extra={"queue": name, "records": stored.count, "owner": f"w{placement.owner(name)}"},
                )
                continue
            self._load(name, stored)
        for name in self.configs:
            if self.owns(name):
                self.queue(name, create=True)
        log.info(
            "queues_loaded",
            extra={"queues": len(self.queues), "records": sum(q.log.count for q in self.queues.values())},
        )

    # -- queues ----------------------------------------------------------------------------------

    def owns(self, name: str) -> bool:
        """True when this process holds queue ``name`` (always, unless queues are spread over workers)."""
        placement = self.placement
        return placement is None or placement.owns(name)

    def _elsewhere(self):
        """The carrier to the queues this worker does not own (QueueRefused while it is not set up)."""
        remote = self.remote
        if remote is None:
            raise QueueRefused("the worker owning this queue is not reachable yet", 0x80)
        return remote

    def _make(self, name: str, qlog: QueueLog | None = None) -> Queue:
        config = self.configs.get(name) or QueueConfig(name)
        q = Queue(self, config, qlog or self.log_factory(name, self.store, None))
        self.queues[name] = q
        self._capture(q)  # served here from now on: its capture too (once captures are installed)
        return q

    def _load(self, name: str, stored, qlog: QueueLog | None = None) -> Queue:
        """Queue ``name`` served from its stored state (``stored``: its log's offsets and its groups'
        progress; ``qlog``: its log when one is open already)."""
        q = self._make(name, qlog or self.log_factory(name, self.store, stored))
        for gname, g in stored.groups.items():
            q.groups[gname] = q.group_class(
                q, gname, g.floor, set(g.settled), getattr(g, "mark", 0), getattr(g, "counts", None)
            )
        if q.newest is not None:
            q.rebuild_compaction()
        return q

    def queue(self, name: str, create: bool = False) -> Queue | None:
        q = self.queues.get(name)
        if q is None and create:
            if name in self.stranded:
                # its records are still in this shard: served from them (same offsets), never a
                # new log over them
                if not self.owns(name):
                    raise QueueRefused(
                        f"queue {name} is owned elsewhere now (its records here move to its owner)", 0x80
                    )
                q = self.unstrand(name)
                if q is None:
                    raise QueueRefused(f"queue {name}: its records are moving back here, try again", 0x80)
                return q
            q = self._make(name)
            log.info("queue_created", extra={"queue": name, "type": q.config.type})
        return q

    def _queue_for(self, name: str, refuse_code: int) -> Queue:
        q = self.queues.get(name)
        if q is None:
            if not valid_queue_name(name):
                raise QueueRefused(f"invalid queue name {name!r}", refuse_code)
            if not self.auto_create and not name.endswith(".dlq"):
                raise QueueRefused(f"no queue {name!r} (queue_manager.auto_create is off)", refuse_code)
            if len(self.queues) - len(self.configs) >= MAX_AUTO_QUEUES:
                log.warning(
                    "queue_refused",
                    extra={"queue": name, "reason": "auto-created queue limit", "limit": MAX_AUTO_QUEUES},
                )
                raise QueueRefused(f"too many queues ({MAX_AUTO_QUEUES} auto-created)", 0x97)
            q = self.queue(name, create=True)
        return q

    def install_captures(self, router, interest=None, release=None) -> int:
        """Route the ordinary publishes each queue's ``topics`` list matches into the queue
        (capture.py); returns the filters installed. Raises ConfigError for a bad filter (of any
        configured queue, served here or not).

        ``interest(filter)`` (``Broker.hold_interest``) makes the filter this process's interest for
        its peers, ``release(filter)`` (``Broker.release_interest``) ends it: with several workers or
        nodes only a queue's owner captures, and the others forward it the publishes its capture
        filters match (the cluster's ordinary routing). A queue this process serves from then on (an
        operator made its node the owner) captures from then on; one it stops serving (stranded:
        another node owns it now) no longer does."""
        from fluxmq._core.trie import validate_filter
        from fluxmq.errors import ConfigError, TopicFilterInvalid

        for config in self.configs.values():
            for f in config.topics:
                try:
                    validate_filter(f)
                except TopicFilterInvalid as exc:
                    raise ConfigError(
                        f"queues[{config.name}].topics", "topic filters", problem=f"{f!r}: {exc}"
                    ) from None
                if f.startswith("$queue/"):
                    raise ConfigError(
                        f"queues[{config.name}].topics",
                        "ordinary topic filters",
                        problem=f"{f!r}: a queue captures ordinary topics, not $queue/",
                    )
        self._capture_to = (router, interest, release)
        return sum(self._capture(q) for q in list(self.queues.values()))

    def _capture(self, q: Queue) -> int:
        """``q``'s capture filters into the router (and the peers' view of this process's interest)."""
        if self._capture_to is None or not q.config.topics or q.name in self._captured:
            return 0
        from fluxmq.broker.session import Subscription

        from .capture import CaptureTarget

        router, interest, _release = self._capture_to
        target = CaptureTarget(self, q.name)
        filters = list(q.config.topics)
        for f in filters:
            router.add(Subscription(target, f, 2))
            if interest is not None:
                interest(f)
        self._captured[q.name] = (target, filters)
        return len(filters)

    def _uncapture(self, name: str) -> None:
        """Queue ``name`` is no longer served here: its capture filters leave the router."""
        entry = self._captured.pop(name, None)
        if entry is None:
            return
        router, _interest, release = self._capture_to
        target, filters = entry
        for f in filters:
            router.remove(f, target)
            if release is not None:
                release(f)

    # -- a worker count change: queues of this shard owned by another worker ------------------------

    def strand(self, owners: dict[str, str]) -> None:
        """Queues this process loaded that another node owns (``owners``: queue -> node; a cluster
        found them owned elsewhere at start): no longer served here (never twice); their stored
        records move to the owner (``take_stranded``, as after a worker count change)."""
        stored = self.store.load_queues()
        for name, node in owners.items():
            q = self.queues.pop(name, None)
            if q is None:
                continue
            self._uncapture(name)  # its owner's capture takes the publishes now
            self._kicked.discard(q)
            for group in q.groups.values():
                for m in list(group.members):  # (none at start: no client is connected yet)
                    self._leave(m)
            held = stored.get(name)
            if held is not None:
                self.stranded[name] = held
            records = held.count if held is not None else 0
            # A configured queue every node creates at start, owned elsewhere with nothing stored
            # here, is routine (info); stranded records are worth a warning.
            (log.warning if records else log.info)(
                "queue_stranded", extra={"queue": name, "records": records, "owner": node}
            )

    def move_away(self, owners: dict[str, str]) -> None:
        """Queues this process serves that another node owns now (``owners``: queue -> node; an
        operator reassigned them while this node was cut off): stranded as at start, and the
        memberships of this process's clients in them join the new owner's groups (``remote``,
        kept as a rejoin while it does not answer). Other workers' members are left to follow
        their owner (their worker's reconcile)."""
        queues = {self.queues[n] for n in owners if n in self.queues}
        rejoin = []
        for session, mine in list(self.members.items()):
            gone = [m for m in mine if m.group.queue in queues]
            for m in gone:
                mine.remove(m)
                if not isinstance(session, RemoteMemberSession):
                    rejoin.append((session, m.filter, m.group.name, m.auto_ack))
            if gone and not mine:
                del self.members[session]
                session.on_room = None
        self.strand(owners)  # (the members leave their groups there)
        if rejoin:
            gevent.spawn(self._rejoin, rejoin)

    def _rejoin(self, rejoin: list) -> None:
        for session, filter, group, auto_ack in rejoin:
            user = [("consumer-group", group), ("auto-ack", "true" if auto_ack else "false")]
            try:
                self.subscribe(session, filter, 1, user, 5, rejoin=True)
            except QueueRefused as exc:
                log.warning(
                    "queue_member_not_rejoined",
                    extra={"client_id": session.client_id, "filter": filter, "reason": str(exc)},
                )

    def take_stranded(self, name: str, limit: int = 256) -> list:
        """Up to ``limit`` records of stranded queue ``name`` still to move to its owner, oldest
        first: those some group has not settled (every record of a stream, or of a queue without
        groups). Records every group settled are deleted on the way. [] when nothing is left."""
        stored = self.stranded[name]
        qlog = self._stranded_logs.get(name)
        if qlog is None:
            qlog = self._stranded_logs[name] = _local_log(name, self.store, stored)
        groups = list(stored.groups.values())
        config = self.configs.get(name)
        keep_all = not groups or (config is not None and config.type == STREAM)
        self._moving.add(name)  # until drop_stranded or keep_stranded says what became of them
        out: list = []
        at = qlog.first
        while at < qlog.next and len(out) < limit:
            chunk = qlog.read(at, limit)
            if not chunk:
                at += limit
                continue
            for rec in chunk:
                off = rec.offset
                if keep_all or any(off >= g.floor and off not in g.settled for g in groups):
                    if len(out) < limit:
                        out.append(rec)
                else:
                    qlog.delete(off)  # settled by every group: nothing to move
            at = chunk[-1].offset + 1
        return out

    def drop_stranded(self, name: str, records) -> None:
        """``records`` of stranded queue ``name`` are stored by its owner now: deleted here (with
        the queue's groups once it is empty)."""
        self._moving.discard(name)
        qlog = self._stranded_logs[name]
        for rec in records:
            qlog.delete(rec.offset)
        if qlog.count <= 0:
            for group in self.stranded[name].groups:
                qlog.forget_group(group)
            del self.stranded[name]
            del self._stranded_logs[name]

    def keep_stranded(self, name: str) -> None:
        """The records ``take_stranded`` gave of queue ``name`` did not move (its owner refused them
        or did not answer): they stay here, to be taken again."""
        self._moving.discard(name)

    def unstrand(self, name: str) -> Queue | None:
        """Stranded queue ``name`` is owned by this process again (an operator gave it back to this
        node before all its records had moved): served again from what this shard holds of it, its
        records not moved (same offsets and message ids) and its groups' progress, so each record
        is here once (those moved are the other node's; it moves them back if it returns). None
        while a batch of it is on its way (``take_stranded`` not yet settled): its mover calls this
        again once it is."""
        if name in self._moving or name not in self.stranded:
            return None
        stored = self.stranded.pop(name)
        q = self._load(name, stored, self._stranded_logs.pop(name, None))
        log.warning("queue_unstranded", extra={"queue": name, "records": q.log.count})
        self.kick_soon(q)
        self._ensure_timer()
        return q

    def adopt_record(self, name: str, message: Message) -> int:
        """A record of queue ``name`` (owned here) moved from another worker's shard: appended."""
        q = self._queue_for(name, 0x90)
        q.append(message)
        self.kick_soon(q)
        return 1

    def storage_refusing(self) -> bool:
        return bool(getattr(self.storage, "refusing", False))

    # -- the broker's calls ----------------------------------------------------------------------

    def publish(self, message: Message, origin=None) -> int:
        """A PUBLISH to ``$queue/...``: a settlement (``.../$ack|$nack|$reject``) or an append.
        Returns 1 when it was taken; raises QueueRefused (0x90 no such queue, 0x97 full)."""
        rest = message.topic[len(PREFIX) :]
        name, _, key = rest.partition("/")
        if self.placement is not None and not self.placement.owns(name):
            # Another worker owns it: a HeldAck resolved once the owner stored it (or refused).
            return self._elsewhere().publish(name, message, origin)
        if key in SETTLE_ACTIONS:
            return self._settle(name, key, message, origin)
        if self.storage.refusing:
            raise QueueRefused("storage full", 0x97)
        q = self.queues.get(name) or self._queue_for(name, 0x90)
        q.append(message)
        if origin is not None:
            # The origin's PUBACK acknowledges the append: a failed commit must abandon it.
            self.storage.note_stake(origin.client_id)
        self._kicked.add(q)  # kick_soon, inline (once per message)
        if not self._kick_scheduled:
            self._kick_scheduled = True
            gevent.get_hub().loop.run_callback(self._run_kicked)
        return q.log.held_ack() or 1

    def append_relayed(self, topic: str, payloads: list[bytes], client_id: str) -> int:
        """``publish`` of the common append, for the C fast path of a PUBLISH (``_core.relay``): a
        run of QoS 1 PUBLISHes without properties to one ``$queue/{name}[/{key}]`` topic of a local
        queue, from client ``client_id``. Appends the first n payloads it takes and returns n (the
        caller counts and acknowledges them; the acks leave after the turn's commit, as with
        ``publish``); 0, before any effect, for what the full path must serve or refuse (a
        settlement, a queue another worker or node owns or whose owning node is not known here
        yet, an unknown queue, storage full, a queue limit at
        the first, a replicated log's group refusing writes now, a compacted replicated queue). A
        replicated log's sync appends return ``(n, held)``: the PUBACKs wait for ``held`` (a
        HeldAck resolved at the Raft commit), which the caller hands to the connection."""
        name, _, key = topic[7:].partition("/")  # len(PREFIX)
        if key and key[0] == "$" and key in SETTLE_ACTIONS:
            return 0
        placement = self.placement
        if placement is not None and not placement.owns(name, wait=False):
            # another worker or node owns it (publish forwards it), or a cluster's owner is not
            # known here yet (publish claims it: never within the relay's call, which must not
            # switch greenlets)
            return 0
        q = self.queues.get(name)
        if q is None or self.storage.refusing:
            return 0
        replicated = q.log.__class__ is not QueueLog
        if replicated and (q.newest is not None or not hasattr(q.log, "append_relayed")):
            return 0
        limits = q.config.limits
        n = len(payloads)
        if limits.max_depth:
            n = min(n, limits.max_depth - q.log.count)
        if limits.max_message_size:
            for i in range(n):
                if len(payloads[i]) > limits.max_message_size:
                    n = i
                    break
        if n <= 0:
            return 0
        if replicated:
            # a replicated log (fluxmq.replication): staged into this turn's Raft entry; the
            # PUBACKs wait for its commit (the hold), a refusal of the group declines (the full path
            # refuses it)
            try:
                held = q.log.append_relayed(
                    topic, payloads if n == len(payloads) else payloads[:n], client_id
                )
            except QueueRefused:
                return 0
            q.stats["appended"] += n
            self.storage.note_stake(client_id)
            self._kicked.add(q)
            if not self._kick_scheduled:
                self._kick_scheduled = True
                gevent.get_hub().loop.run_callback(self._run_kicked)
            return n if held is None else (n, held)
        records = q.log.append_plain(topic, payloads if n == len(payloads) else payloads[:n], client_id)
        q.stats["appended"] += n
        if q.newest is not None:
            for rec in records:
                q._compact(rec)
        # The origin's PUBACKs acknowledge the appends: a failed commit must abandon them.
        self.storage.note_stake(client_id)
        self._kicked.add(q)  # kick_soon, inline
        if not self._kick_scheduled:
            self._kick_scheduled = True
            gevent.get_hub().loop.run_callback(self._run_kicked)
        return n

    def subscribe(
        self, session, filter: str, qos: int, user_props: list | None, version: int, rejoin: bool = False
    ) -> int:
        """Join a consumer group; returns the granted QoS (1). Raises QueueRefused (0x83 QoS 0,
        0x8F no such queue). A persistent session's membership is stored (``rejoin``: it is
        already), so it survives a restart of the node."""
        rest = filter[len(PREFIX) :]
        name, _, key_filter = rest.partition("/")
        if qos == 0:
            raise QueueRefused(
                "a durable queue needs a QoS 1 or 2 subscription (deliveries are acknowledged)", 0x83
            )
        if not valid_queue_name(name):
            raise QueueRefused(f"invalid queue name {name!r}", 0x8F)
        props = user_properties(user_props)
        group_name = props.get("consumer-group") or session.client_id
        auto_ack = version != 5 or props.get("auto-ack", "").lower() == "true"
        if self.placement is not None and not self.placement.owns(name):
            # A member of the owner's group, delivered through this worker (raises QueueRefused).
            self._elsewhere().subscribe(session, filter, qos, user_props, version, rejoin)
            self._store_member(session, filter, group_name, auto_ack, rejoin)
            return 1
        q = self._queue_for(name, 0x8F)
        start = props.get("stream-offset") if q.config.type == STREAM else None
        position = self._stream_position(q, start) if start else None
        group = q.groups.get(group_name)
        if group is None:
            if len(q.groups) >= MAX_GROUPS_PER_QUEUE:
                raise QueueRefused(f"queue {name} has {MAX_GROUPS_PER_QUEUE} consumer groups already", 0x97)
            group = q.groups[group_name] = q.group_class(q, group_name)
            # A new group starts at the oldest record still stored and remembers that durably.
            group.floor = group.cursor = q.log.first
            q.log.commit(group_name, group.floor)
        mine = self.members.setdefault(session, [])
        for old in [m for m in mine if m.filter == filter]:
            self._leave(old)  # a repeated SUBSCRIBE replaces the membership
            mine.remove(old)
        if group.stream and not group.members:
            # The first member resumes where the group's last commit left off, or seeks.
            if position is not None:
                group.seek(position)
            else:
                group.cursor = group.floor
        max_inflight = min(q.config.max_inflight, session.send_quota or q.config.max_inflight)
        member = Member(session, filter, key_filter, auto_ack, max_inflight, group)
        group.add(member)
        mine.append(member)
        self._store_member(session, filter, group_name, auto_ack, rejoin)
        session.on_room = self._on_room
        log.info(
            "queue_member_joined",
            extra={"queue": name, "group": group_name, "client_id": session.client_id, "auto_ack": auto_ack},
        )
        self.kick(q)
        self._ensure_timer()
        return 1

    def _store_member(self, session, filter: str, group_name: str, auto_ack: bool, rejoin: bool) -> None:
        """A persistent session's membership is stored (with its session, in this worker's shard),
        so it survives a restart of the node."""
        if not rejoin and getattr(session, "persistent", False):
            cid = session.client_id
            self.store.put_member(cid, filter, group_name, auto_ack)
            self.storage.note_stake(cid)  # the SUBACK acknowledges the stored membership
            self._stored_members.add(cid)

    @staticmethod
    def _stream_position(q: Queue, start: str) -> int:
        """``stream-offset``: first, last, next, an offset, or timestamp=<unix ms>."""
        qlog = q.log
        if start == "first":
            return qlog.first
        if start == "last":
            return max(qlog.first, qlog.next - 1)
        if start == "next":
            return qlog.next
        if start.isascii() and start.isdigit():  # str.isdigit alone takes "²", which int() refuses
            return int(start)
        if start.isascii() and start.startswith("timestamp=") and start[10:].isdigit():
            return q.offset_at(int(start[10:]))
        raise QueueRefused(
            f"stream-offset {start!r}: expected first, last, next, an offset or timestamp=<ms>", 0x83
        )

    def unsubscribe(self, session, filter: str) -> bool:
        remote = self.remote
        if remote is not None and remote.unsubscribe(session, filter):
            if session.client_id in self._stored_members:
                self.store.delete_member(session.client_id, filter)
            return True
        mine = self.members.get(session)
        if not mine:
            return False
        found = [m for m in mine if m.filter == filter]
        for m in found:
            mine.remove(m)
            self._leave(m)
        if found and session.client_id in self._stored_members:
            self.store.delete_member(session.client_id, filter)
        if not mine:
            self.members.pop(session, None)
            session.on_room = None
        return bool(found)

    def session_gone(self, session) -> None:
        """The session's connection ended: its memberships end and what it held is redelivered.
        A persistent session's memberships come back when it resumes (``session_attached``)."""
        mine = self.members.pop(session, None)
        remote = self.remote
        elsewhere = remote.session_gone(session) if remote is not None else None
        if not mine and not elsewhere:
            return
        session.on_room = None
        # What it held goes back to its groups (below): not resent from the session's in-flight
        # window when it reconnects (a stale duplicate the group no longer tracks).
        inflight = session.inflight
        for pid in [pid for pid, e in inflight.items() if isinstance(e.message, TrackedMessage)]:
            del inflight[pid]
        mine = mine or []
        if session.expiry_interval:
            self.resumable[session.client_id] = [(m.filter, m.group.name, m.auto_ack) for m in mine] + list(
                elsewhere or ()
            )
        for m in mine:
            self._leave(m)

    def session_attached(self, session) -> None:
        """A client connected: a resumed persistent session rejoins the groups it was in."""
        saved = self.resumable.pop(session.client_id, None)
        if not saved:
            return
        for filter, group, auto_ack in saved:
            user = [("consumer-group", group), ("auto-ack", "true" if auto_ack else "false")]
            try:
                self.subscribe(session, filter, 1, user, 5, rejoin=True)
            except QueueRefused as exc:  # the queue is gone (auto_create off, no longer configured)
                log.warning(
                    "queue_member_not_rejoined",
                    extra={"client_id": session.client_id, "filter": filter, "reason": str(exc)},
                )
                if session.client_id in self._stored_members:
                    self.store.delete_member(session.client_id, filter)

    def session_ended(self, client_id: str) -> None:
        """The session of ``client_id`` ended (expired, clean start, ended with its connection):
        its memberships end, stored ones included."""
        self.resumable.pop(client_id, None)
        if client_id in self._stored_members:
            self._stored_members.discard(client_id)
            self.store.delete_members(client_id)

    def take_memberships(self, client_id: str) -> list[tuple]:
        """The memberships of ``client_id``'s offline session, which moves to another worker or
        node: forgotten here, stored ones included. [(filter, group, auto_ack)]."""
        saved = self.resumable.pop(client_id, None) or []
        if client_id in self._stored_members:
            self._stored_members.discard(client_id)
            self.store.delete_members(client_id)
        return saved

    def adopt_memberships(self, session, members) -> None:
        """A session moved here with its memberships (``take_memberships`` where it was): it
        rejoins them when its client attaches, and a persistent one's are stored here."""
        self.resumable[session.client_id] = list(members)
        if getattr(session, "persistent", False):
            for filter, group, auto_ack in members:
                self.store.put_member(session.client_id, filter, group, auto_ack)
            self._stored_members.add(session.client_id)

    def restore_members(self, sessions: dict) -> int:
        """At start, after the broker restored its sessions: each persistent session is a member
        of the groups it was in again (it rejoins them when it connects, without a SUBSCRIBE).
        Memberships of sessions that ended meanwhile are deleted. Returns the memberships kept."""
        kept = 0
        gone: set[str] = set()
        for m in self.store.load_members():
            session = sessions.get(m.client_id)
            if session is None or not session.expiry_interval:
                gone.add(m.client_id)
                continue
            self.resumable.setdefault(m.client_id, []).append((m.filter, m.group, m.auto_ack))
            self._stored_members.add(m.client_id)
            kept += 1
        for cid in gone:
            self.store.delete_members(cid)
        if kept or gone:
            log.info("queue_members_restored", extra={"members": kept, "ended_sessions": len(gone)})
        return kept

    def _leave(self, member: Member) -> None:
        group = member.group
        group.remove(member)
        self.kick(group.queue)

    # -- settlement ------------------------------------------------------------------------------

    def _settle(self, name: str, action: str, message: Message, origin) -> int:
        props = user_properties(message.properties.get(USER_PROPERTY) if message.properties else None)
        parsed = parse_message_id(props.get("message-id", ""))
        q = self.queues.get(name)
        if parsed is None or q is None or parsed[0] != name:
            return 0
        offset = parsed[1]
        group_name = props.get("group-id")
        if group_name is None and origin is not None:
            mine = [m.group.name for m in self.members.get(origin, ()) if m.group.queue is q]
            group_name = mine[0] if mine else origin.client_id
        group = q.groups.get(group_name)
        if group is None:
            return 0
        reason = props.get("reason", "")
        if action == ACK:
            done = group.ack(offset, origin)
        elif action == NACK:
            done = group.nack(offset, reason)
        elif action == REJECT:
            done = group.reject(offset, reason)
        else:
            done = False
        if done:
            if origin is not None:
                self.storage.note_stake(origin.client_id)
            self.kick_soon(q)
            return q.log.held_settlement() or 1
        return 0

    # -- dispatch --------------------------------------------------------------------------------

    def kick(self, q: Queue) -> None:
        """Dispatch ``q``'s groups now (in the caller's greenlet: no switch per message)."""
        if not q.log.delivering:
            return
        more = False
        for group in q.groups.values():
            if (
                group.members
                and (group.ready or group.retry or group.cursor < q.log.next)
                and group.dispatch()
            ):
                more = True
        if more:
            self._kicked.add(q)
            if not self._kick_scheduled:
                self._kick_scheduled = True
                gevent.get_hub().loop.run_callback(self._run_kicked)

    def kick_soon(self, q: Queue) -> None:
        """Dispatch ``q``'s groups once at the end of this loop turn: the appends and settlements a
        turn carries (a read of many PUBLISHes or PUBACKs) cost one dispatch, not one each."""
        self._kicked.add(q)
        if not self._kick_scheduled:
            self._kick_scheduled = True
            gevent.get_hub().loop.run_callback(self._run_kicked)

    def _run_kicked(self) -> None:
        self._kick_scheduled = False
        kicked, self._kicked = self._kicked, set()
        for q in kicked:
            try:
                settled = False
                for group in q.groups.values():
                    if group.progress_dirty:  # this turn's PUBACK settlements: one write each group
                        group.write_progress(floor_only=True)
                        settled = True
                if settled and q.config.type == CLASSIC:
                    # What every group settled goes now, while its records are cached (the tick's
                    # retention would read their sizes back from the store) and the log is short.
                    truncate_settled(q)
                self.kick(q)
            except Exception:  # one queue's failure must not stop the others' deliveries
                log.exception("queue_dispatch_failed", extra={"queue": q.name})

    def _on_room(self, session) -> None:
        for m in self.members.get(session, ()):
            self.kick_soon(m.group.queue)

    # -- timers ----------------------------------------------------------------------------------

    def _ensure_timer(self) -> None:
        if self._timer is None and not self._closing:
            self._timer = gevent.spawn(self._run_timer)

    def start(self) -> None:
        self._ensure_timer()

    def _run_timer(self) -> None:
        while not self._closing:
            gevent.sleep(TICK)
            if self.storage.closed:  # its owner closed the store without stopping the queues first
                self._timer = None
                return
            try:
                self.tick()
            except Exception:
                log.exception("queue_tick_failed")

    def tick(self, now: float | None = None) -> None:
        """Visibility timeouts, due backoffs and retention (every TICK)."""
        now = time.monotonic() if now is None else now
        for q in list(self.queues.values()):
            if not q.log.delivering:
                continue
            for group in q.groups.values():
                if group.progress_dirty:
                    group.write_progress()
                if group.pending:
                    group.expire_pending(now)
                if group.stream and group.members:
                    group.auto_commit(now)
                if group.dead_pending:
                    group.retry_dead_letters()
            if any(g.members and (g.ready or g.retry or g.cursor < q.log.next) for g in q.groups.values()):
                self.kick(q)
            ret = q.config.retention
            if q.config.type == CLASSIC or ret.max_age or ret.max_length_messages or ret.max_length_bytes:
                apply_retention(q)

    def stop(self) -> None:
        self._closing = True
        if not self.storage.closed:
            for q in self.queues.values():
                for group in q.groups.values():
                    if group.progress_dirty:
                        group.write_progress()
        if self._timer is not None:
            self._timer.kill(block=False)
            self._timer = None

    # -- operations ------------------------------------------------------------------------------

    def describe(self, name: str | None = None) -> list[dict]:
        """Per queue: depth, oldest age, consumers, per-group lag and counters (admin, metrics)."""
        out = []
        now = time.time()
        for q in self.queues.values():
            if name is not None and q.name != name:
                continue
            oldest = q.log.get(q.log.first) if q.log.count else None
            out.append(
                {
                    "name": q.name,
                    "type": q.config.type,
                    "depth": q.log.count,
                    "bytes": q.log.bytes,
                    "first_offset": q.log.first,
                    "next_offset": q.log.next,
                    "oldest_age": round(now - oldest.timestamp, 3) if oldest is not None else 0.0,
                    "consumers": sum(len(g.members) for g in q.groups.values()),
                    "groups": {
                        name: {
                            "lag": g.lag(),
                            "pending": len(g.pending),
                            "members": len(g.members),
                            "undeliverable": len(g.undeliverable),
                        }
                        for name, g in q.groups.items()
                    },
                    "counters": dict(q.stats),
                }
            )
        return out

    def peek(self, name: str, offset: int | None, limit: int) -> list:
        """Up to ``limit`` stored records from ``offset`` (default: the oldest) without delivering them."""
        q = self.queues[name]
        qlog = q.log
        at = qlog.first if offset is None else max(offset, qlog.first)
        out = []
        while at < qlog.next and len(out) < limit:
            chunk = qlog.read(at, min(256, limit - len(out)) + 16)
            out.extend(chunk[: limit - len(out)])
            at = chunk[-1].offset + 1 if chunk else at + 256
        return out

    def purge(self, name: str) -> int:
        """Delete every record of queue ``name``; its groups move past them. Returns the count."""
        q = self.queues[name]
        qlog = q.log
        n = qlog.count
        while qlog.first < qlog.next:
            qlog.truncate(qlog.next, 10000)
        for group in q.groups.values():
            group.write_progress()
            for m in group.members:
                m.pending = 0
            group.pending.clear()
            group.holders.clear()
            group.sent.clear()
            group.ready.clear()
            group.queued.clear()
            group.retry.clear()
            group.counts.clear()
            group.avoid.clear()
            if group.stored_counts:
                qlog.record_deliveries(group.name, None, dict.fromkeys(group.stored_counts))
                group.stored_counts.clear()
            for off in sorted(group.settled):
                qlog.commit(group.name, group.floor, None, (off,))
            group.settled.clear()
            group.floor = group.cursor = qlog.next
            qlog.commit(group.name, group.floor)
        if q.newest is not None:
            q.newest.clear()
        q.stats["purged"] += n
        log.warning("queue_purged", extra={"queue": name, "records": n})
        return n

    def replay_dlq(self, name: str, limit: int = 1000) -> int:
        """Move up to ``limit`` records of the dead-letter queue ``name`` back to the queue they
        came from (by ``x-original-topic``), without the ``x-`` properties. Returns the count."""
        dlq = self.queues[name]
        qlog = dlq.log
        moved = 0
        at = qlog.first
        while at < qlog.next and moved < limit:
            for rec in qlog.read(at, min(256, limit - moved)):
                message = rec.message
                props = dict(message.properties) if message.properties else {}
                user = props.get(USER_PROPERTY, ())
                original = dict(user).get("x-original-topic")
                if original is None:
                    continue
                kept = [
                    (k, v)
                    for k, v in user
                    if k not in ("x-death-reason", "x-delivery-count", "x-original-topic")
                ]
                if kept:
                    props[USER_PROPERTY] = kept
                else:
                    props.pop(USER_PROPERTY, None)
                if original.startswith(PREFIX):
                    target = original[len(PREFIX) :].split("/", 1)[0]
                else:  # a captured publish: back to the queue the DLQ belongs to
                    target = name[:-4] if name.endswith(".dlq") else name
                tq = self.queue(target, create=True)
                tq.append(Message(original, message.payload, 1, False, props or None))
                qlog.delete(rec.offset)
                dlq.stats["replayed"] += 1
                moved += 1
                self.kick(tq)
            at += 256
        log.info("queue_dlq_replayed", extra={"queue": name, "records": moved})
        return moved
