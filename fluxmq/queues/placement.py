"""Which worker of a node owns a durable queue (``server.workers`` > 1).

Every queue has one owning worker: it holds the queue's log, consumer groups, pending deliveries,
DLQ and retention in its storage shard, exactly as a single worker does. The owner is a stable
hash of the queue's name over the worker count (CRC-32, the same on every worker and every start
with the same count). A dead-letter queue lives with the queue it belongs to (its records are
appended by that queue's groups): ``{name}.dlq`` and a configured ``dlq.topic`` are placed by the
name of their source queue.

A queue replicated through Raft (``replication.enabled``) is placed on **worker 0**, the node's Raft
member (docs/replication.rst, "Several workers on a node"): the node's Raft groups run there alone,
and the other workers reach its replicated queues as they reach any other owner.
"""

from __future__ import annotations

import zlib

DLQ_SUFFIX = ".dlq"
#: the worker that runs the node's Raft groups and so owns every replicated queue
RAFT_WORKER = 0


def owner_index(name: str, count: int) -> int:
    """The index (0..count-1) of the worker owning queue ``name`` (its DLQ suffix aside)."""
    if count <= 1:
        return 0
    if name.endswith(DLQ_SUFFIX) and len(name) > len(DLQ_SUFFIX):
        name = name[: -len(DLQ_SUFFIX)]
    return zlib.crc32(name.encode()) % count


class QueuePlacement:
    """The owner of each queue name for the workers of one node; ``configs`` are the configured
    queues (a configured ``dlq.topic`` follows its source queue)."""

    def __init__(self, index: int, count: int, configs=()) -> None:
        self.index = index
        self.count = count
        self.dlq_of: dict[str, str] = {}
        self.replicated: set[str] = set()  # on RAFT_WORKER
        for c in configs:
            dlq = c.dlq_queue
            if dlq != c.name + DLQ_SUFFIX:
                self.dlq_of[dlq] = c.name
            if c.replication.enabled:
                self.replicated.add(c.name)

    def owner(self, name: str) -> int:
        source = self.dlq_of.get(name, name)
        if self.replicated:
            base = source[: -len(DLQ_SUFFIX)] if source.endswith(DLQ_SUFFIX) else source
            if source in self.replicated or base in self.replicated:
                return RAFT_WORKER
        return owner_index(source, self.count)

    def owns(self, name: str) -> bool:
        return self.count <= 1 or self.owner(name) == self.index
