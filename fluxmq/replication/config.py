"""Checks across keys for Raft replication (one ``ConfigError`` naming the key and the file each)."""

from __future__ import annotations

from fluxmq.config.values import parse_addr
from fluxmq.errors import ConfigError

#: the Raft port of a node whose cluster.raft.bind_addr is not set (etcd membership)
DEFAULT_RAFT_PORT = 7100


def etcd_membership(config) -> bool:
    """True when the Raft members come from etcd: ``cluster.enabled`` with etcd, ``cluster.raft.enabled``,
    and neither ``cluster.raft.peers`` nor ``cluster.raft.groups`` (those are static)."""
    c = config.cluster
    if not (c.enabled and c.raft.enabled) or c.raft.peers or c.raft.groups:
        return False
    from fluxmq.cluster.node import uses_etcd

    return uses_etcd(config)


def raft_addr(config) -> str:
    """This node's Raft address: ``cluster.raft.bind_addr`` when set, else (etcd membership) the host
    of ``cluster.transport.bind_addr`` (the address the other nodes already reach) on port 7100."""
    raft = config.cluster.raft
    if not etcd_membership(config) or config.origin("cluster.raft.bind_addr") != "default":
        return raft.bind_addr
    host = parse_addr(config.cluster.transport.bind_addr)[0]
    return f"[{host}]:{DEFAULT_RAFT_PORT}" if ":" in host else f"{host}:{DEFAULT_RAFT_PORT}"


def expected_members(config) -> tuple[list[str], int]:
    """(node ids, count) the Raft group of an etcd-membership cluster waits for: the members of
    ``cluster.etcd.initial_cluster`` when ``cluster.raft.expected_members`` is 0 and it names any;
    else that many nodes (0: the largest replication_factor of the replicated queues, at least 1)."""
    c = config.cluster
    count = c.raft.expected_members
    if not count:
        names = [part.split("=", 1)[0].strip() for part in c.etcd.initial_cluster.split(",") if "=" in part]
        if names and not c.etcd.endpoints:
            return sorted(set(names)), len(set(names))
        factors = [
            (item.get("replication") or {}).get("replication_factor", 1)
            for item in config.queues
            if (item.get("replication") or {}).get("enabled")
        ]
        count = max(factors, default=1)
    return [], count


class _WithMembers:
    """``cluster.raft`` with the default group's members given (from etcd) instead of configured."""

    def __init__(self, raft, bind_addr: str, peers: list[str], agreed: int = 0) -> None:
        self._raft = raft
        self.bind_addr = bind_addr
        self.peers = list(peers)
        # the size the default group was agreed with in etcd: a queue whose replication_factor is
        # that size spans the whole group, however many members it has after member changes
        self.agreed_size = agreed

    def __getattr__(self, name: str):
        return getattr(self._raft, name)


def with_members(raft, bind_addr: str, peers: list[str], agreed: int = 0):
    return _WithMembers(raft, bind_addr, peers, agreed)


def replication_problems(config) -> list[ConfigError]:
    """A queue asking for replication while ``cluster.raft.enabled`` is false (never a silent
    fallback to a local queue), Raft without the lmdb storage, replication with compaction,
    ``cluster.raft.tls`` files that cannot be loaded, and the group plan's own errors
    (replication_factor above the group size, ...)."""
    from fluxmq.queues.config import QueueConfig

    problems: list[ConfigError] = []
    origin = config.origin
    raft = config.cluster.raft
    items = list(config.queues)
    replicated = [item for item in items if (item.get("replication") or {}).get("enabled")]
    if not raft.enabled:
        for item in replicated:
            problems.append(
                ConfigError(
                    f"queues[{item['name']}].replication.enabled",
                    "cluster.raft.enabled: true",
                    origin("queues"),
                    problem=f"queue {item['name']!r} asks for replication but cluster.raft.enabled is false "
                    f"({origin('cluster.raft.enabled')}); enable Raft or remove replication.enabled",
                )
            )
        return problems
    if config.storage.type != "lmdb":
        problems.append(
            ConfigError(
                "cluster.raft.enabled",
                "storage.type: lmdb",
                origin("cluster.raft.enabled"),
                problem="Raft replication applies its log to the lmdb queue store; "
                f"storage.type is {config.storage.type!r} ({origin('storage.type')})",
            )
        )
    for item in replicated:
        if item["retention"]["compact"]:
            problems.append(
                ConfigError(
                    f"queues[{item['name']}].retention.compact",
                    "false with replication",
                    origin("queues"),
                    problem="compaction of a replicated queue is not "
                    "implemented yet (replication.enabled and retention.compact)",
                )
            )
    if raft.tls.enabled:
        from .transport import raft_tls

        try:
            raft_tls(raft, origin, warn=False)  # the files are read and the contexts built as at start
        except ConfigError as exc:
            problems.append(exc)
    if not problems:
        from .service import plan

        if etcd_membership(config):
            # Members come from etcd at run time: check the plan against as many placeholders as
            # the group will have (replication_factor above it is refused now, not at formation).
            names, count = expected_members(config)
            host, port = parse_addr(raft_addr(config))
            if host in ("0.0.0.0", "::", ""):
                return [
                    ConfigError(
                        "cluster.raft.bind_addr",
                        "an address the other nodes can dial",
                        origin("cluster.raft.bind_addr"),
                        problem=f"{raft_addr(config)} is announced in etcd as this node's Raft address "
                        "(derived from cluster.transport.bind_addr when not set): set "
                        "cluster.raft.bind_addr to this node's own host:port",
                    )
                ]
            raft = with_members(
                raft, f"member-0:{port}", [f"member-{i}:{port}" for i in range(max(count, 1))]
            )
        try:
            plan(raft, [QueueConfig.from_dict(item) for item in items], origin)
        except ConfigError as exc:
            problems.append(exc)
    return problems


def check_replication(config) -> None:
    """Raise the first replication problem (node start)."""
    problems = replication_problems(config)
    if problems:
        raise problems[0]
