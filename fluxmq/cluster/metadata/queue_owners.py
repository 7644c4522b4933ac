"""QueueOwners: ``queues/{name}/owner`` = the cluster node holding a durable queue (no Raft).

A queue that is not replicated through Raft lives on one node: its log, consumer groups and
pending deliveries are in that node's storage (``fluxmq.cluster.queue_nodes``). The record is
permanent, bound to no lease: the queue's data stays on that node's disk, so a node that is down
makes its queues unavailable until it is back, and they are never moved silently.

* claim: ``if create_revision == 0 then put(owner=me)``, else the transaction reads the key: the
  first node that needs the queue (a publish, a subscribe, a configured queue or stored records at
  start) owns it, and every other claim returns that owner. Two nodes racing: one wins.
* The owners are read once at start (one range read) and cached; a name not cached is claimed,
  which also reads an owner another node recorded meanwhile. An owner never changes, so a cached
  one never goes stale.
"""

from __future__ import annotations

import logging

from fluxmq.errors import ClusterError

from .client import EtcdClient, cmp_create, op_get, op_put, range_kvs

__all__ = ["QueueOwners"]

log = logging.getLogger("fluxmq.cluster.queue_owners")

#: transactions tried before giving up (a key deleted between the compare and the read)
MAX_ATTEMPTS = 8


class QueueOwners:
    """The owning node of each queue, as recorded in etcd under ``{prefix}queues/``."""

    def __init__(self, client: EtcdClient, prefix: str, node: str) -> None:
        self.client = client
        self.prefix = prefix + "queues/"
        self.node = node  # this node's name (cluster.node_id: every worker of the node claims for it)
        self.owners: dict[str, str] = {}
        self.claimed = 0  # claims this process won

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}/owner"

    def load(self) -> dict[str, str]:
        """Read every recorded owner (at start); returns them."""
        _revision, kvs = self.client.range(self.prefix, prefix=True)
        for kv in kvs:
            name, _, rest = kv["key"][len(self.prefix) :].rpartition("/")
            if rest == "owner" and name:
                self.owners[name] = kv["value"].decode(errors="replace")
        return dict(self.owners)

    def owner(self, name: str) -> str | None:
        """The cached owner of ``name`` (None: not known here yet; ``claim`` finds or makes it)."""
        return self.owners.get(name)

    def claim(self, name: str) -> str:
        """The owner of ``name``: this node when no node owned it (recorded now), else the node that
        does. ClusterError when etcd does not answer."""
        known = self.owners.get(name)
        if known is not None:
            return known
        key = self.key(name)
        for _ in range(MAX_ATTEMPTS):
            ok, responses = self.client.txn([cmp_create(key, 0)], [op_put(key, self.node)], [op_get(key)])
            if ok:
                self.claimed += 1
                log.info("queue_owner_claimed", extra={"queue": name, "node": self.node})
                owner = self.node
            else:
                kvs = range_kvs(responses[0]) if responses else []
                if not kvs:
                    continue  # deleted between the compare and the read (an operator): again
                owner = kvs[0]["value"].decode(errors="replace")
            self.owners[name] = owner
            return owner
        raise ClusterError(f"queue {name!r}: its owner record kept changing for {MAX_ATTEMPTS} attempts")
