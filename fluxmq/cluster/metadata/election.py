"""LeaderElection: one node of the cluster leads (publishes dead nodes' wills, answers is_leader).

The leader key ``{prefix}election/leader`` holds the leader's node id under its lease, created only
if absent (one transaction). Every node watches it; when it goes (the leader stopped, or its lease
expired), the others campaign again and exactly one transaction wins.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fluxmq.errors import ClusterError

from .client import EtcdClient, PrefixMirror, cmp_create, op_put

__all__ = ["LeaderElection"]

log = logging.getLogger("fluxmq.cluster.election")


class LeaderElection:
    def __init__(
        self,
        client: EtcdClient,
        prefix: str,
        node_id: str,
        lease: Callable[[], int],
        lease_alive: Callable[[], bool],
    ) -> None:
        self.client = client
        self.prefix = prefix + "election/"
        self.key = self.prefix + "leader"
        self.node_id = node_id
        self._lease = lease
        self._lease_alive = lease_alive
        self.leader: str | None = None
        self._leader_lease = 0
        self.on_change: list[Callable[[bool], None]] = []
        self._mirror: PrefixMirror | None = None

    @property
    def is_leader(self) -> bool:
        return self.leader == self.node_id and self._leader_lease == self._lease() and self._lease_alive()

    def start(self) -> None:
        self._mirror = PrefixMirror(self.client, self.prefix, self._changed, name="election")
        self._mirror.start()
        self.campaign()

    def stop(self) -> None:
        if self._mirror is not None:
            self._mirror.stop()

    def campaign(self) -> bool:
        """Try to become leader (a no-op when someone leads); True when this node leads."""
        try:
            self.client.txn([cmp_create(self.key, 0)], [op_put(self.key, self.node_id, self._lease())])
        except ClusterError as exc:
            log.warning("campaign_failed", extra={"error": str(exc)})
        return self.is_leader

    def _changed(self, key: str, kv: dict | None, old: dict | None) -> None:
        if key != self.key:
            return
        was = self.is_leader
        if kv is None:
            self.leader, self._leader_lease = None, 0
            if self._lease_alive():
                self.campaign()  # its own put arrives as the next event
        else:
            self.leader, self._leader_lease = kv["value"].decode(errors="replace"), kv["lease"]
        now = self.is_leader
        if now != was:
            log.info("leadership_changed", extra={"is_leader": now, "leader": self.leader})
            for callback in list(self.on_change):
                try:
                    callback(now)
                except Exception:
                    log.exception("leader_callback_failed")
