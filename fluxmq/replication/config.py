"""Checks across keys for Raft replication (one ``ConfigError`` naming the key and the file each)."""

from __future__ import annotations

from fluxmq.errors import ConfigError


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
            problems.append(ConfigError(
                f"queues[{item['name']}].replication.enabled", "cluster.raft.enabled: true", origin("queues"),
                problem=f"queue {item['name']!r} asks for replication but cluster.raft.enabled is false "
                        f"({origin('cluster.raft.enabled')}); enable Raft or remove replication.enabled"))
        return problems
    if config.storage.type != "lmdb":
        problems.append(ConfigError("cluster.raft.enabled", "storage.type: lmdb", origin("cluster.raft.enabled"),
                                    problem="Raft replication applies its log to the lmdb queue store; "
                                            f"storage.type is {config.storage.type!r} ({origin('storage.type')})"))
    for item in replicated:
        if item["retention"]["compact"]:
            problems.append(ConfigError(f"queues[{item['name']}].retention.compact", "false with replication",
                                        origin("queues"), problem="compaction of a replicated queue is not "
                                        "implemented yet (replication.enabled and retention.compact)"))
    if raft.tls.enabled:
        from .tls_transport import raft_tls

        try:
            raft_tls(raft, origin, warn=False)  # the files are read and the contexts built as at start
        except ConfigError as exc:
            problems.append(exc)
    if not problems:
        from .service import plan

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
