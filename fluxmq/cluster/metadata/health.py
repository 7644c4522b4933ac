"""ClusterHealth: the ``cluster`` readiness check and ``/cluster/status`` of a cluster node, in the
shapes of reference 003 (``fluxmq.http.health`` renders them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["ClusterHealth"]


class ClusterHealth:
    """Reads the metadata plane (``meta``) and, when given, the transport's ``peer_state()``
    (node id -> {"reachable": bool, ...}); without it a peer counts as reachable while it is live
    in etcd. A peer that went without leaving (killed) stays counted, unreachable, so the node
    reports "degraded"; one that stopped gracefully is no longer a peer."""

    def __init__(self, meta, peer_state: Callable[[], dict[str, dict]] | None = None) -> None:
        self.meta = meta
        self.peer_state = peer_state

    def _peers(self) -> dict[str, dict[str, Any]]:
        """Every other node (live in etcd, lost since, or known to the transport) -> addr, live,
        reachable."""
        members = self.meta.members()
        lost = self.meta.lost_members()
        try:
            states = self.peer_state() if self.peer_state is not None else None
        except Exception:
            states = {}
        peers: dict[str, dict[str, Any]] = {}
        for node in sorted(set(members) | set(lost) | set(states or ())):
            if node == self.meta.node_id:
                continue
            live = node in members
            reachable = live if states is None else bool(states.get(node, {}).get("reachable"))
            peers[node] = {
                "addr": members.get(node) or lost.get(node, ""),
                "live": live,
                "reachable": reachable,
            }
        return peers

    def check(self) -> tuple[bool, str]:
        """Down (503) while the node id is unset or etcd/the lease is not ready; up with
        "k/n peers reachable" (degraded, 200) when a peer cannot be reached; else up."""
        if not self.meta.node_id:
            return False, "node id not set"
        ready, why = self.meta.ready
        if not ready:
            return False, why
        peers = self._peers()
        reachable = sum(1 for p in peers.values() if p["reachable"])
        if reachable < len(peers):
            return True, f"{reachable}/{len(peers)} peers reachable"
        return True, ""

    def status(self, sessions: int) -> dict[str, Any]:
        """The body of ``/cluster/status``: reference 003's four fields, then the members."""
        leader = getattr(self.meta.election, "leader", None) if self.meta.election is not None else None
        members = [
            {
                "node_id": self.meta.node_id,
                "addr": self.meta.transport_addr,
                "self": True,
                "live": self.meta.ready[0],
                "reachable": True,
                "leader": leader == self.meta.node_id,
            }
        ]
        for node, peer in self._peers().items():
            members.append(
                {
                    "node_id": node,
                    "addr": peer["addr"],
                    "self": False,
                    "live": peer["live"],
                    "reachable": peer["reachable"],
                    "leader": leader == node,
                }
            )
        return {
            "node_id": self.meta.node_id,
            "is_leader": self.meta.is_leader,
            "cluster_mode": True,
            "sessions": sessions,
            "members": members,
        }
