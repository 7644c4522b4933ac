"""Which process owns a durable queue: which worker of a node (``server.workers`` > 1) and, on a
cluster (``cluster.enabled`` with etcd), which node.

Every queue has one owning worker: it holds the queue's log, consumer groups, pending deliveries,
DLQ and retention in its storage shard, exactly as a single worker does. The owner is a stable
hash of the queue's name over the worker count (CRC-32, the same on every worker and every start
with the same count). A dead-letter queue lives with the queue it belongs to (its records are
appended by that queue's groups): ``{name}.dlq`` and a configured ``dlq.topic`` are placed by the
name of their source queue.

A queue replicated through Raft (``replication.enabled``) is placed on **worker 0**, the node's Raft
member (docs/replication.rst, "Several workers on a node"): the node's Raft groups run there alone,
and the other workers reach its replicated queues as they reach any other owner.

On a cluster with etcd, a queue that is not replicated has one owning **node** first
(``nodes``, set by the cluster once etcd answers: ``fluxmq.cluster.queue_nodes.QueueNodes``,
recorded in etcd by the first node that needs the queue); within that node the worker is picked as
above, over that node's worker count. A replicated queue stays with each node's Raft member.
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
        # A cluster's owner registry (QueueNodes): ``node`` (this node's name), ``owner(base)`` (the
        # owning node of a queue, claimed when none; raises QueueRefused when it cannot be known)
        self.nodes = None
        for c in configs:
            dlq = c.dlq_queue
            if dlq != c.name + DLQ_SUFFIX:
                self.dlq_of[dlq] = c.name
            if c.replication.enabled:
                self.replicated.add(c.name)

    def source(self, name: str) -> str:
        """The queue ``name`` is placed by: itself, or the queue a dead-letter queue belongs to."""
        source = self.dlq_of.get(name, name)
        if source.endswith(DLQ_SUFFIX) and len(source) > len(DLQ_SUFFIX):
            source = source[: -len(DLQ_SUFFIX)]
        return source

    def is_replicated(self, name: str) -> bool:
        if not self.replicated:
            return False
        return self.dlq_of.get(name, name) in self.replicated or self.source(name) in self.replicated

    def owner(self, name: str) -> int:
        """The index of the owning worker within the owning node."""
        if self.replicated and self.is_replicated(name):
            return RAFT_WORKER
        return owner_index(self.dlq_of.get(name, name), self.count)

    def owner_node(self, name: str) -> str | None:
        """On a cluster: the other node owning queue ``name`` (claimed when no node did); None when
        it is this node's (or there is no cluster, or the queue is replicated). Raises QueueRefused
        when the owner cannot be known now (etcd does not answer)."""
        nodes = self.nodes
        if nodes is None or (self.replicated and self.is_replicated(name)):
            return None
        node = nodes.owner(self.source(name))
        return None if node == nodes.node else node

    def owns(self, name: str, wait: bool = True) -> bool:
        """Whether this worker owns queue ``name``. ``wait=False``, for a caller that must not switch
        greenlets (the C fast path of a PUBLISH): on a cluster, False also while the owning node is
        not known here yet (``owner_node`` would claim it in etcd)."""
        nodes = self.nodes
        if nodes is not None:
            if wait:
                if self.owner_node(name) is not None:
                    return False
            elif (
                not (self.replicated and self.is_replicated(name))
                and nodes.known(self.source(name)) != nodes.node
            ):
                return False
        return self.count <= 1 or self.owner(name) == self.index
