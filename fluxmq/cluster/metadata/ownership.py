"""SessionOwnership: ``/sessions/{client}/owner`` = the node id owning the session, under its lease.

Every change is one etcd transaction, so two nodes can never both believe they took a session:

* acquire: ``if create_revision == 0 then put(owner=me, lease=mine)``; when the key exists the
  transaction returns it instead. The key exists only while its owner's lease lives (a dead node's
  keys go when its lease expires), so an existing owner is a live node.
* take over from ``take_from``: ``if mod_revision == the one seen (owner was take_from) then put``.
  Two nodes racing to take one session from the same owner: one transaction wins, the other sees
  the new owner and must ask it.
* release: ``if value == me then delete``; a node that lost the session never deletes the new
  owner's key.
"""

from __future__ import annotations

import logging

from fluxmq.errors import ClusterError

from .client import EtcdClient, cmp_create, cmp_mod, cmp_value, op_delete, op_get, op_put, range_kvs

__all__ = ["SessionOwnership"]

log = logging.getLogger("fluxmq.cluster.ownership")

#: transactions tried before giving up when the key keeps changing under us
MAX_ATTEMPTS = 16


class SessionOwnership:
    """Compare-and-swap ownership of client ids for one node (``lease`` returns its current lease)."""

    def __init__(self, client: EtcdClient, prefix: str, node_id: str, lease) -> None:
        self.client = client
        self.prefix = prefix + "sessions/"
        self.node_id = node_id
        self._lease = lease  # callable -> the node's current lease id
        self.owned: set[str] = set()
        self.acquired = 0
        self.conflicts = 0

    def key(self, client_id: str) -> str:
        return f"{self.prefix}{client_id}/owner"

    def acquire(self, client_id: str, take_from: str | None = None) -> str | None:
        """Make this node the owner of ``client_id``. None: it is ours now. A node id: that live node
        owns it (take its state over from it, then call again with ``take_from`` = that node)."""
        key = self.key(client_id)
        me = self.node_id.encode()
        for _ in range(MAX_ATTEMPTS):
            lease = self._lease()
            ok, responses = self.client.txn([cmp_create(key, 0)], [op_put(key, me, lease)], [op_get(key)])
            if ok:
                return self._won(client_id)
            kvs = range_kvs(responses[0]) if responses else []
            if not kvs:
                continue  # released or expired between the compare and the read: try again
            current = kvs[0]
            owner = current["value"].decode(errors="replace")
            if owner == self.node_id and current["lease"] == lease:
                return self._won(client_id)
            if owner != self.node_id and owner != take_from:
                self.conflicts += 1
                return owner
            # Ours under an older lease (re-registration), or the owner we took the state from:
            # replace exactly the version we saw.
            ok, _ = self.client.txn([cmp_mod(key, current["mod_revision"])], [op_put(key, me, lease)])
            if ok:
                return self._won(client_id)
        raise ClusterError(f"session {client_id!r}: ownership kept changing for {MAX_ATTEMPTS} attempts")

    def _won(self, client_id: str) -> None:
        self.owned.add(client_id)
        self.acquired += 1
        return None

    def release(self, client_id: str) -> bool:
        """Delete the owner key only if this node owns it; True when it did."""
        self.owned.discard(client_id)
        ok, _ = self.client.txn(
            [cmp_value(self.key(client_id), self.node_id)], [op_delete(self.key(client_id))]
        )
        return ok

    def forget(self, client_id: str) -> None:
        """Another node took ``client_id`` over (it moved the owner key itself): not ours any more,
        so not listed for ``reacquire_all``."""
        self.owned.discard(client_id)

    def owned_by(self, client_id: str) -> str | None:
        kv = self.client.get(self.key(client_id))
        return kv["value"].decode(errors="replace") if kv is not None else None

    def reacquire_all(self) -> list[str]:
        """After a new lease: take again every session this node owned; returns those another node
        took meanwhile (they are no longer ours)."""
        lost = []
        for client_id in sorted(self.owned):
            try:
                owner = self.acquire(client_id)
            except ClusterError as exc:
                log.warning("session_reacquire_failed", extra={"client_id": client_id, "error": str(exc)})
                owner = "?"
            if owner is not None:
                self.owned.discard(client_id)
                lost.append(client_id)
        return lost
