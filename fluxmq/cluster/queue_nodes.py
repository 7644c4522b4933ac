"""Durable queues across the nodes of a cluster without Raft: one owning node per queue.

The owner of a queue that is not replicated is a **node**, recorded permanently in etcd by the
first node that needs the queue (``fluxmq.cluster.metadata.queue_owners``): a publish or subscribe
on a queue with no owner yet, a configured queue at start, or stored records found at start (so
data written before clustering stays served). Within the owning node the worker is picked as for
the workers of one node (``fluxmq.queues.placement``: CRC-32 of the name over its worker count), and
everything else is ``fluxmq.cluster.queues.RemoteQueues``, the same carrier the workers of one node
use: appends and settlements are ops to the owner (acknowledged once committed there), consumers
elsewhere are remote members of the owner's groups, reconciled every second.

How a caller finds the owning worker's member id: a single-worker node is member ``{node}``; the
workers of a node with several are members ``{node}/w{i}`` and each announces the node's worker
count in its etcd registration (``workers``), so a caller computes the owner's index itself and
sends to it directly (one hop for every append and delivery; sending to any worker of the node and
letting it pass the op on would need a second hop for each delivery back, and for the members a
proxy that the owner's groups cannot see).

A node that is down (no live registration) makes its queues unavailable: an append there is refused
at once (never acknowledged), a subscribe is refused, and the members already joined get nothing
until it is back (their reconcile joins them again). Nothing moves to another node.
"""

from __future__ import annotations

import logging

import gevent

from fluxmq.errors import ClusterError, QueueRefused
from fluxmq.queues.placement import owner_index

log = logging.getLogger("fluxmq.cluster.queue_nodes")

#: the registration field in which each worker of a node with several announces their count
WORKERS_FIELD = "workers"


class QueueNodes:
    """The owning node of each queue and the member id of its owning worker (``QueuePlacement.nodes``)."""

    def __init__(self, meta) -> None:
        """``meta``: the started ``ClusterMetadata`` (its ``queue_owners``, members and announcements)."""
        self.meta = meta
        self.owners = meta.queue_owners
        self.node = self.owners.node
        self.counts: dict[str, int] = {}  # node -> its worker count when last seen live

    def owner(self, name: str) -> str:
        """The node owning queue ``name`` (a source queue's name: a DLQ's is its queue's); claimed for
        this node when none owns it. QueueRefused (0x80) when etcd does not answer."""
        node = self.owners.owners.get(name)
        if node is not None:
            return node
        if gevent.getcurrent() is gevent.get_hub():
            # cannot wait for etcd here: claimed in a greenlet, this operation refused (try again)
            gevent.spawn(self._claim_quietly, name)
            raise QueueRefused(f"queue {name}: its owning node is being looked up, try again", 0x80)
        try:
            return self.owners.claim(name)
        except ClusterError as exc:
            raise QueueRefused(f"queue {name}: its owning node is not known ({exc})", 0x80) from None

    def known(self, name: str) -> str | None:
        """The node owning queue ``name`` as far as this process knows now (None: not known yet);
        never asks etcd (``owner`` claims)."""
        return self.owners.owners.get(name)

    def _claim_quietly(self, name: str) -> None:
        try:
            self.owners.claim(name)
        except ClusterError as exc:
            log.warning("queue_owner_unknown", extra={"queue": name, "error": str(exc)})

    def member(self, node: str, name: str) -> str:
        """The member id of the worker of ``node`` owning queue ``name``; QueueRefused (0x80) when
        ``node`` is not live (down, restarting: its queues wait for it)."""
        members = self.meta.members()
        if node in members:
            self.counts[node] = 1
            return node  # a node of one worker
        mine = node + "/w"
        for member, count in self.meta.announced(WORKERS_FIELD).items():
            if member.startswith(mine):
                try:
                    n = int(count)
                except ValueError:
                    continue
                self.counts[node] = n
                return f"{node}/w{owner_index(name, n)}"
        raise QueueRefused(f"queue {name}: its node {node} is not available", 0x80)

    def last_member(self, node: str, name: str) -> str:
        """The member of ``node`` that owned queue ``name`` when this process last saw the node live
        (its worker count then); ``node`` itself when it never did."""
        n = self.counts.get(node, 1)
        return node if n <= 1 else f"{node}/w{owner_index(name, n)}"
