"""RaftService: the node's Raft groups, built from ``cluster.raft.*`` and the queues' ``replication``.

Planning (``plan``) is deterministic from the configuration alone, so every node of the cluster,
given the same file, computes the same groups, members and ports:

- a group is ``cluster.raft.groups[name]`` (``default``: ``cluster.raft.bind_addr`` and ``peers``),
  or, with ``auto_provision_groups``, the default group's members on ports shifted by n (n = 1.. in
  the order of the names);
- a queue with ``replication_factor`` below its group's size is held by that many members, picked by
  rendezvous hashing of the queue name over the members; each distinct pick is a Raft group of its
  own on ports shifted again (after the provisioned ones). A node outside a queue's pick holds no
  replica of it: a publish there is refused with a reason string.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import gevent
import gevent.event
import gevent.socket

from fluxmq.config.values import parse_addr
from fluxmq.errors import ConfigError

from .distribution import NODE_SILENCE, RECONCILE, ReplicatedGroup
from .group import MemberChangeRefused, RaftGroup
from .log import ReplicatedQueueLog, refused

log = logging.getLogger("fluxmq.replication")


#: how long the admin API waits for a member change to be committed
MEMBER_CHANGE_TIMEOUT = 10.0


@dataclass(frozen=True)
class GroupPlan:
    key: str  # the Raft group's name (journal file, applied index)
    self_addr: str
    members: tuple[str, ...]


def _shift(addr: str, n: int) -> str:
    host, port = parse_addr(addr)
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port + n}"


def _pick(queue: str, members: tuple[str, ...], n: int) -> tuple[str, ...]:
    """``n`` members for ``queue`` by rendezvous hashing (stable when members come and go)."""
    ranked = sorted(members, key=lambda m: hashlib.sha256(f"{queue}\x00{m}".encode()).digest())
    return tuple(sorted(ranked[:n]))


def plan(
    raft, queue_configs, origin=lambda key: ""
) -> tuple[dict[str, GroupPlan], dict[str, GroupPlan | None]]:
    """(groups this node is a member of, queue name -> its group plan, None when not held here).

    Raises ConfigError naming the key for an impossible request."""
    base_self = raft.bind_addr
    base_members = tuple(sorted(set(raft.peers) | {base_self}))
    declared = {g["name"]: g for g in raft.groups}
    groups: dict[str, tuple[str, tuple[str, ...]]] = {}
    if "default" in declared:
        d = declared["default"]
        groups["default"] = (d["bind_addr"], tuple(sorted(set(d["peers"]) | {d["bind_addr"]})))
    else:
        groups["default"] = (base_self, base_members)
    for name, g in declared.items():
        if name != "default":
            groups[name] = (g["bind_addr"], tuple(sorted(set(g["peers"]) | {g["bind_addr"]})))
    replicated = [c for c in queue_configs if c.replication.enabled]
    wanted = sorted({c.replication.group for c in replicated} - set(groups))
    for n, name in enumerate(wanted, 1):
        if not raft.auto_provision_groups:
            raise ConfigError(
                "queues",
                "a replication.group listed in cluster.raft.groups",
                origin("queues"),
                problem=f"queue replication.group {name!r} is not in cluster.raft.groups and "
                "cluster.raft.auto_provision_groups is false",
            )
        self_addr, members = groups["default"]
        groups[name] = (_shift(self_addr, n), tuple(_shift(m, n) for m in members))
    shift = len(wanted) + 1
    plans: dict[str, GroupPlan] = {}
    queues: dict[str, GroupPlan | None] = {}
    subsets: dict[tuple[str, tuple[int, ...]], tuple[str, int]] = {}
    # members from etcd: the default group's members are the record's, changed by member changes;
    # a queue that spanned the group as agreed keeps spanning it (never re-planned into a sub-group)
    agreed = getattr(raft, "agreed_size", 0)
    for c in sorted(replicated, key=lambda c: c.name):
        r = c.replication
        self_addr, members = groups[r.group]
        if agreed and r.group == "default" and r.replication_factor == agreed:
            if "default" not in plans:
                plans["default"] = GroupPlan("default", self_addr, members)
            queues[c.name] = plans["default"]
            continue
        if r.replication_factor > len(members):
            raise ConfigError(
                f"queues[{c.name}].replication.replication_factor",
                "at most the group's members",
                origin("queues"),
                problem=f"replication_factor {r.replication_factor} but group "
                f"{r.group!r} has {len(members)} members ({', '.join(members)})",
            )
        majority = r.replication_factor // 2 + 1
        if r.min_in_sync_replicas > r.replication_factor:
            raise ConfigError(
                f"queues[{c.name}].replication.min_in_sync_replicas",
                "at most replication_factor",
                origin("queues"),
                got=r.min_in_sync_replicas,
            )
        if r.min_in_sync_replicas > majority:
            raise ConfigError(
                f"queues[{c.name}].replication.min_in_sync_replicas",
                f"at most {majority} (the Raft majority of replication_factor {r.replication_factor})",
                origin("queues"),
                problem=f"min_in_sync_replicas {r.min_in_sync_replicas} is above "
                f"the Raft majority {majority}: waiting for more than a majority is not implemented "
                "yet",
            )
        if r.replication_factor == len(members):
            key, mine, picked = r.group, self_addr, members
        else:
            picked = _pick(c.name, members, r.replication_factor)
            idx = tuple(members.index(m) for m in picked)
            sub = subsets.get((r.group, idx))
            if sub is None:
                shift += 1
                sub = subsets[(r.group, idx)] = (f"{r.group}.{'-'.join(map(str, idx))}", shift)
            key, n = sub
            if self_addr not in picked:
                queues[c.name] = None
                continue
            mine, picked = _shift(self_addr, n), tuple(_shift(m, n) for m in picked)
        if key not in plans:
            plans[key] = GroupPlan(key, mine, picked)
        queues[c.name] = plans[key]
    return plans, queues


class RaftService:
    """Builds and drives the node's Raft groups; gives the queue manager its replicated logs."""

    def __init__(
        self, raft, queue_configs, data_dir: str, store, origin=lambda key: "", mqtt_addr: str = ""
    ) -> None:
        self.raft = raft
        self.configs = {c.name: c for c in queue_configs}
        self.store = store
        self.plans, self.queue_plans = plan(raft, queue_configs, origin)
        # distribution_mode: "forward" delivers to consumers on every replica (distribution.py)
        # distribution_mode: consumers on every replica, "forward" (the leader decides) or
        # "replicate" (each node delivers what it leased), distribution.py and lease.py
        self.distribution = raft.distribution_mode or ""
        self.groups: dict[str, RaftGroup] = {}
        from .transport import raft_tls

        tls = raft_tls(raft, origin)  # cluster.raft.tls: one set of contexts for every group
        for key, p in self.plans.items():
            group = self.groups[key] = RaftGroup(
                key,
                p.self_addr,
                list(p.members),
                data_dir,
                store,
                raft.write_policy,
                on_applied=self._applied,
                on_delivering=self._took_over,
                password=getattr(raft, "password", ""),
                mqtt_addr=mqtt_addr,
                compaction_entries=raft.compaction_entries,
                tls=tls,
                distribution=self.distribution,
                compression=raft.compression,
            )
            group.on_unknown = self._unknown_queue
            group.on_superseded = self._superseded
        self.manager = None
        self._reconciler = None

    # -- the queue manager's log factory ---------------------------------------------------------

    def log_factory(self, name: str, store, stored=None):
        from fluxmq.queues.manager import _local_log

        config = self.configs.get(name)
        plan_name = name
        if config is None and name.endswith(".dlq"):
            # The dead-letter queue of a replicated queue is replicated with it (same group, mode).
            base = self.configs.get(name[:-4])
            if base is not None and base.replication.enabled:
                config, plan_name = base, base.name
        if config is None or not config.replication.enabled:
            return _local_log(name, store, stored)
        p = self.queue_plans.get(plan_name)
        if p is None:
            return _NotHeldLog(name, store, stored)
        group = self.groups[p.key]
        qlog = ReplicatedQueueLog(
            name, store, group, config.replication, stored, config.type == "stream" and plan_name == name
        )
        group.logs[name] = qlog
        return qlog

    def attach(self, manager) -> None:
        self.manager = manager

    def start(self) -> None:
        for group in self.groups.values():
            group.start()
        if self.distribution:
            self._reconciler = gevent.spawn(self._reconcile_loop)

    def stop(self) -> None:
        if self._reconciler is not None:
            self._reconciler.kill(block=False)
            self._reconciler = None
        for group in self.groups.values():
            group.stop()

    def status(self) -> list[dict]:
        return [g.status() for g in self.groups.values()]

    def change_member(
        self, group: str, action: str, addr: str, node_id: str = "", timeout: float = MEMBER_CHANGE_TIMEOUT
    ) -> list[str]:
        """Add or remove (``action``) the member at ``addr`` of the Raft group ``group``, on this
        node, its leader; waits (this greenlet) until the change is committed and returns the
        members then. Raises ``MemberChangeRefused`` (with the admin API's status) otherwise.
        (``node_id``: used by ``FormingRaft``, for the record in etcd.)"""
        g = self.groups.get(group)
        if g is None:
            raise MemberChangeRefused(
                404, f"no Raft group {group!r} on this node (groups: {', '.join(self.groups)})"
            )
        if action not in ("add", "remove"):
            raise MemberChangeRefused(400, f"unknown member change {action!r}")
        if not addr:
            raise MemberChangeRefused(
                409,
                f"group {group}'s members are static (cluster.raft.peers), not recorded in etcd: "
                "give the new member's addr",
            )
        try:
            host, port = parse_addr(addr)
        except (ValueError, ConfigError) as exc:
            raise MemberChangeRefused(400, f"addr {addr!r} is not host:port ({exc})") from None
        if not host or not port:
            raise MemberChangeRefused(400, f"addr {addr!r} is not host:port")
        if action == "add" and addr not in g.peers:
            # Added, the member counts in the majority at once (the entry itself needs it): with
            # nothing there, a group with a dead member would have no majority left.
            try:
                reach(addr, 2.0)
            except OSError as exc:
                raise MemberChangeRefused(
                    409,
                    f"nothing answers at {addr} ({exc}): start the new member "
                    "first (docs/replication.rst, Changing members)",
                ) from None
        result = gevent.event.AsyncResult()
        g.change_member(action, addr, result.set)
        try:
            error = result.get(timeout=timeout)
        except gevent.Timeout:
            raise MemberChangeRefused(
                504,
                f"the change was not committed within {timeout:.0f}s (is a majority of "
                f"group {group} up?); it may still be: see GET /cluster/raft",
            ) from None
        if error is not None:
            raise MemberChangeRefused(503, f"Raft group {group}: {error}")
        return g.peers

    # -- callbacks from the groups ---------------------------------------------------------------

    def _unknown_queue(self, name: str):
        manager = self.manager
        if manager is None:
            return None
        q = manager.queue(name, create=True)
        return q.log if isinstance(q.log, ReplicatedQueueLog) and not isinstance(q.log, _NotHeldLog) else None

    def _applied(self, qlog) -> None:
        manager = self.manager
        if manager is None:
            return
        q = manager.queues.get(qlog.name)
        if q is None:
            return
        if len(qlog.progress) > len(q.groups):
            # A group registered through another node: known here too, so retention on the
            # leader never deletes what it has not settled.
            for gname, (floor, settled) in qlog.progress.items():
                if gname not in q.groups:
                    q.groups[gname] = q.group_class(
                        q, gname, floor, set(settled), qlog.marks.get(gname, 0), qlog.counts.get(gname)
                    )
        if qlog.events:
            events, qlog.events = qlog.events, []
            self._distribute(q, qlog, events)
        if qlog.delivering:
            manager.kick_soon(q)

    # -- distribution_mode forward (distribution.py) ---------------------------------------------

    def _distribute(self, q, qlog, events) -> None:
        """Act on what an applied entry says to this node: deliver its leases, release what was
        settled or leased elsewhere, apply other nodes' nacks and members (the forward leader)."""
        group = qlog.group
        me = group.self_addr
        # the forward leader: by its claim, not ``delivering`` (which flickers on a loaded leader:
        # a settlement taken as a follower's dropped the record from the leader's group for good)
        deciding = qlog.deciding
        members_changed = False
        for ev in events:
            kind = ev[0]
            g = q.groups.get(ev[2]) if kind in ("l", "b", "n") else q.groups.get(ev[1])
            if g is None or not hasattr(g, "deliver_leased"):
                continue
            if kind == "granted":  # ("granted", group, node, offsets, counts, answered): replicate
                if ev[2] == me:
                    g.granted(ev[3], ev[4], ev[5])
                else:
                    g.moved(ev[3])
            elif kind == "l":  # ("l", queue, group, node, key, offsets, counts): forward
                if ev[3] == me:
                    if group.lease_superseded():
                        continue  # the new term's claim delivers them again (RaftGroup.lease_superseded)
                    back, refused = g.deliver_leased(ev[4], ev[5], ev[6])
                    if back and group.leader() is not None:
                        # (what its client can never take, when any, as a 7th field: a node of
                        # before reads the first six, and gives it to the member again)
                        b = ("b", q.name, g.name, me, ev[4], back)
                        group.stage((*b, refused) if refused else b)
                        if ev[4] not in g.local:  # a member of an earlier run of this node
                            qlog.register(g.name, ev[4], None)
                elif not deciding:
                    # this node's delivery of those offsets is stale; never on the leader, whose
                    # state is the decision itself (a lease applied late must not drop the
                    # delivery it made since, to a member of its own)
                    g.moved(ev[5])
            elif kind == "settled":
                if deciding:
                    g.settled_elsewhere(ev[2])
                else:
                    for off in ev[2]:
                        g._drop_local(off)
            elif kind == "b":  # ("b", queue, group, node, key, offsets[, refused offsets])
                if deciding:
                    g.given_back(ev[3], ev[4], ev[5], ev[6] if len(ev) > 6 else ())
            elif kind == "n":  # ("n", queue, group, node, offset, reason, reject, due)
                if deciding:
                    g.remote_nack(ev[3], ev[4], ev[5], ev[6])
            elif kind == "members":
                members_changed = True
        if deciding:
            if members_changed:
                alive = group.answering(NODE_SILENCE)
                for gname, g in q.groups.items():
                    if hasattr(g, "sync_remote"):
                        g.sync_remote(qlog.registered.get(gname, {}), alive, me, group)
            for gname, g in q.groups.items():
                prog = qlog.progress.get(gname)
                if prog is None or not hasattr(g, "cursor_elsewhere"):
                    continue
                if qlog.stream:
                    g.cursor_elsewhere(prog[0])
                elif prog[0] > g.floor:
                    # the replicated floor passed the leader's own (settlements at the floor
                    # move it, log.py): settled here too (windows, partition holders), never to
                    # sit below it for good
                    g.settled_elsewhere(range(g.floor, prog[0]))
        else:
            for gname, g in q.groups.items():
                prog = qlog.progress.get(gname)
                if prog is not None and hasattr(g, "follow"):
                    g.follow(prog)

    def _reconcile_loop(self) -> None:
        while True:
            gevent.sleep(RECONCILE)
            try:
                self._reconcile()
            except Exception:
                log.exception("raft_reconcile_failed")

    def _reconcile(self) -> None:
        """Every RECONCILE seconds: what the log says of this node's members is made true again (a
        registration lost in an election, one of an earlier run), and the leader's remote members
        follow who answers it (a silent node's members leave; what they held goes to others)."""
        manager = self.manager
        if manager is None:
            return
        for group in self.groups.values():
            if group.leader() is None:
                continue
            me, inc = group.self_addr, group.incarnation
            delivering = group.delivering
            alive = group.answering(NODE_SILENCE) if delivering else None
            for name, qlog in group.logs.items():
                q = manager.queues.get(name)
                if q is None or qlog.events is None:
                    continue
                for gname, regs in qlog.registered.items():
                    g = q.groups.get(gname)
                    local = getattr(g, "local", {})
                    for (node, key), reg in list(regs.items()):
                        if node == me and (key not in local or reg[0] != inc):
                            qlog.register(gname, key, None)
                for gname, g in q.groups.items():
                    if not hasattr(g, "local"):
                        continue
                    if g.leased:  # replicate: ask for leases that expired or came due meanwhile,
                        # keep this node's standing demand from lapsing (lease.py), withdraw it
                        if qlog.delivering:
                            if g.members:
                                manager.kick_soon(q)
                            g.ask()
                        continue
                    regs = qlog.registered.get(gname, {})
                    for key, m in g.local.items():
                        reg = regs.get((me, key))
                        if reg is None or reg[0] != inc or reg[2] != m.max_inflight:
                            qlog.register(gname, key, m)
                    if delivering and g.sync_remote(regs, alive, me, group):
                        manager.kick_soon(q)

    def _superseded(self, group: RaftGroup) -> None:
        """Another node's claim was applied here: this node's deliveries of the group's work
        queues were made before it (as a follower, or as the leader it no longer is) and the new
        owner has forgotten them (it delivers those records again). They are dropped, so a
        consumer's $ack of one finds nothing and is never confirmed; one staged before the claim
        is refused when applied (RaftGroup.epoch)."""
        manager = self.manager
        if manager is None:
            return
        for name, qlog in group.logs.items():
            q = manager.queues.get(name)
            if q is None or qlog.leased:
                continue  # replicate: the leases belong to nodes, whoever leads
            dropped = False
            for g in q.groups.values():
                if g.stream or not g.pending:
                    continue  # a stream's cursor commits stay at least once (docs/replication.rst)
                for off in list(g.pending):
                    g._release(off)
                dropped = True
            if dropped:
                manager.kick_soon(q)

    def _took_over(self, group: RaftGroup) -> None:
        """This node became the group's delivering leader: its consumer groups restart from the
        replicated progress (what the previous leader delivered and nobody settled is delivered
        again, at once: a settlement of it staged before the claim is stale when applied,
        RaftGroup.epoch) and the replicated delivery counts."""
        manager = self.manager
        if manager is None:
            return
        for name, qlog in group.logs.items():
            q = manager.queues.get(name)
            if q is None:
                continue
            if qlog.leased:
                continue  # replicate: each node delivers its own leases, whoever leads
            alive = group.answering(NODE_SILENCE) if qlog.events is not None else None
            for gname, (floor, settled) in qlog.progress.items():
                old = q.groups.get(gname)
                fresh = q.group_class(
                    q, gname, floor, set(settled), qlog.marks.get(gname, 0), qlog.counts.get(gname)
                )
                if isinstance(fresh, ReplicatedGroup):
                    fresh.take_over(old)
                    fresh.sync_remote(qlog.registered.get(gname, {}), alive, group.self_addr, group)
                elif old is not None:
                    # Deliveries of an earlier leadership are forgotten (their acks find nothing and
                    # the records go out again: at least once), so no count goes negative.
                    old.pending.clear()
                    old.sent.clear()
                    for m in old.members:
                        m.pending = 0
                        m.group = fresh
                    fresh.members = old.members
                q.groups[gname] = fresh
            manager.kick_soon(q)
        log.info("raft_delivery_taken_over", extra={"group": group.name, "queues": len(group.logs)})


class _NotHeldLog(ReplicatedQueueLog):
    """A replicated queue this node holds no replica of (outside its replication_factor pick)."""

    def __init__(self, name, store, stored=None) -> None:
        from fluxmq.queues.log import QueueLog

        QueueLog.__init__(self, name, store)
        self.progress = {}
        self.marks, self.counts, self.registered, self.events = {}, {}, {}, None
        self.leased, self.leases, self.log_next, self.clock = False, {}, 0, 0.0
        self._truncating = 0
        self._truncate_retry = 0.0
        self.stream = False

    @property
    def delivering(self) -> bool:  # type: ignore[override]
        return False

    @property
    def deciding(self) -> bool:  # type: ignore[override]
        return False

    def held_ack(self):
        return None

    def append_one(self, message):
        raise refused(f"queue {self.name}: this node holds no replica of it (replication_factor)", 0x80)

    def commit(self, group, floor, settled=None, unsettled=()) -> None:
        pass

    def truncate(self, below: int, limit: int) -> int:
        return 0


def advertised_mqtt_addr(cfg) -> str:
    """``cluster.raft.advertise_mqtt_addr``, or the plain (else TLS) MQTT listener's address with a
    wildcard host replaced by ``cluster.raft.bind_addr``'s host; "" without an MQTT listener."""
    raft = cfg.cluster.raft
    if raft.advertise_mqtt_addr:
        return raft.advertise_mqtt_addr
    addr = cfg.server.tcp.plain.addr or cfg.server.tcp.tls.addr
    if not addr:
        return ""
    host, port = parse_addr(addr)
    if host in ("0.0.0.0", "::", ""):
        host = parse_addr(raft.bind_addr)[0]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def journal_dir(storage_path: str) -> str:
    return os.path.join(storage_path, "raft")


def reach(addr: str, timeout: float) -> None:
    """Open and close one TCP connection to ``addr`` (host:port): raises OSError when nothing
    answers there within ``timeout``, ValueError when ``addr`` is not host:port."""
    try:
        host, port = parse_addr(addr)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    gevent.socket.create_connection((host, port), timeout=timeout).close()
