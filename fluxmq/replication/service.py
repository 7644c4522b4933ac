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

from fluxmq.config.values import parse_addr
from fluxmq.errors import ConfigError

from .group import RaftGroup
from .log import ReplicatedQueueLog, refused

log = logging.getLogger("fluxmq.replication")


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


def plan(raft, queue_configs, origin=lambda key: "") -> tuple[dict[str, GroupPlan], dict[str, GroupPlan | None]]:
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
            raise ConfigError("queues", "a replication.group listed in cluster.raft.groups", origin("queues"),
                              problem=f"queue replication.group {name!r} is not in cluster.raft.groups and "
                                      "cluster.raft.auto_provision_groups is false")
        self_addr, members = groups["default"]
        groups[name] = (_shift(self_addr, n), tuple(_shift(m, n) for m in members))
    shift = len(wanted) + 1
    plans: dict[str, GroupPlan] = {}
    queues: dict[str, GroupPlan | None] = {}
    subsets: dict[tuple[str, tuple[int, ...]], tuple[str, int]] = {}
    for c in sorted(replicated, key=lambda c: c.name):
        r = c.replication
        self_addr, members = groups[r.group]
        if r.replication_factor > len(members):
            raise ConfigError(f"queues[{c.name}].replication.replication_factor", "at most the group's members",
                              origin("queues"), problem=f"replication_factor {r.replication_factor} but group "
                              f"{r.group!r} has {len(members)} members ({', '.join(members)})")
        majority = r.replication_factor // 2 + 1
        if r.min_in_sync_replicas > r.replication_factor:
            raise ConfigError(f"queues[{c.name}].replication.min_in_sync_replicas", "at most replication_factor",
                              origin("queues"), got=r.min_in_sync_replicas)
        if r.min_in_sync_replicas > majority:
            raise ConfigError(f"queues[{c.name}].replication.min_in_sync_replicas",
                              f"at most {majority} (the Raft majority of replication_factor {r.replication_factor})",
                              origin("queues"), problem=f"min_in_sync_replicas {r.min_in_sync_replicas} is above "
                              f"the Raft majority {majority}: waiting for more than a majority is not implemented "
                              "yet")
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

    def __init__(self, raft, queue_configs, data_dir: str, store, origin=lambda key: "", mqtt_addr: str = "") -> None:
        self.raft = raft
        self.configs = {c.name: c for c in queue_configs}
        self.store = store
        self.plans, self.queue_plans = plan(raft, queue_configs, origin)
        self.groups: dict[str, RaftGroup] = {}
        from .tls_transport import raft_tls

        tls = raft_tls(raft, origin)  # cluster.raft.tls: one set of contexts for every group
        for key, p in self.plans.items():
            group = self.groups[key] = RaftGroup(key, p.self_addr, list(p.members), data_dir, store,
                                                 raft.write_policy, on_applied=self._applied,
                                                 on_delivering=self._took_over,
                                                 password=getattr(raft, "password", ""), mqtt_addr=mqtt_addr,
                                                 compaction_entries=raft.compaction_entries, tls=tls)
            group.on_unknown = self._unknown_queue
        self.manager = None

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
        qlog = ReplicatedQueueLog(name, store, group, config.replication, stored,
                                  config.type == "stream" and plan_name == name)
        group.logs[name] = qlog
        return qlog

    def attach(self, manager) -> None:
        self.manager = manager

    def start(self) -> None:
        if self.raft.distribution_mode:
            log.warning("raft_distribution_mode_not_implemented", extra={
                "distribution_mode": self.raft.distribution_mode,
                "effect": "only the Raft leader of a group delivers its queues, to consumers connected to it"})
        for group in self.groups.values():
            group.start()

    def stop(self) -> None:
        for group in self.groups.values():
            group.stop()

    def status(self) -> list[dict]:
        return [g.status() for g in self.groups.values()]

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
            from fluxmq.queues.group import ConsumerGroup

            for gname, (floor, settled) in qlog.progress.items():
                if gname not in q.groups:
                    q.groups[gname] = ConsumerGroup(q, gname, floor, set(settled))
        if qlog.delivering:
            manager.kick_soon(q)

    def _took_over(self, group: RaftGroup) -> None:
        """This node became the group's delivering leader: its consumer groups restart from the
        replicated progress (what the previous leader delivered and nobody settled is delivered again)."""
        manager = self.manager
        if manager is None:
            return
        from fluxmq.queues.group import ConsumerGroup

        for name, qlog in group.logs.items():
            q = manager.queues.get(name)
            if q is None:
                continue
            for gname, (floor, settled) in qlog.progress.items():
                old = q.groups.get(gname)
                fresh = ConsumerGroup(q, gname, floor, set(settled))
                if old is not None:
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
        self._truncating = 0
        self._truncate_retry = 0.0
        self.stream = False

    @property
    def delivering(self) -> bool:  # type: ignore[override]
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
