"""ClusterHealth: the ``cluster`` readiness check and ``/cluster/status`` of a cluster node, in the
shapes of reference 003 (``fluxmq.http.health`` renders them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["ClusterHealth", "node_of"]


def node_of(member: str) -> str:
    """The node a member belongs to: ``n1`` for worker member ``n1/w0`` (several workers on a node,
    docs/cluster.rst), the member itself otherwise."""
    return member.partition("/")[0]


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

    @property
    def grouped(self) -> bool:
        """True when some node's members are its workers (``n1/w0``): each node is reported once
        (a one-worker node in such a cluster too). A cluster of one-worker nodes keeps the flat list."""
        meta = self.meta
        return any("/" in m for m in (meta.node_id, *meta.members(), *meta.lost_members()))

    def _nodes(self) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """The other nodes (node -> addr, live, reachable, workers) and this node's other workers
        (member -> ...), from ``_peers`` grouped by ``node_of``. A node is live while one of its
        workers is, reachable while every one of them known here is."""
        mine = node_of(self.meta.node_id)
        nodes: dict[str, dict[str, Any]] = {}
        own: dict[str, Any] = {}
        for member, peer in self._peers().items():
            node = node_of(member)
            if node == mine:
                own[member] = peer
                continue
            entry = nodes.setdefault(
                node, {"addr": peer["addr"], "live": False, "reachable": True, "workers": {}}
            )
            entry["workers"][member] = peer
            entry["live"] = entry["live"] or peer["live"]
            entry["reachable"] = entry["reachable"] and peer["reachable"]
        return nodes, own

    def check(self) -> tuple[bool, str]:
        """Down (503) while the node id is unset or etcd/the lease is not ready; up with
        "k/n peers reachable" (degraded, 200) when a peer cannot be reached; else up. With several
        workers a peer is a node, and an unreachable worker of this node degrades it too, as the
        node's own etcd member not answering does (one of several: the others serve meanwhile)."""
        if not self.meta.node_id:
            return False, "node id not set"
        ready, why = self.meta.ready
        if not ready:
            return False, why
        own: dict[str, Any] = {}
        if self.grouped:
            peers, own = self._nodes()
        else:
            peers = self._peers()
        details = []
        reachable = sum(1 for p in peers.values() if p["reachable"])
        if reachable < len(peers):
            details.append(f"{reachable}/{len(peers)} peers reachable")
        up = sum(1 for p in own.values() if p["reachable"])
        if up < len(own):
            details.append(f"{up}/{len(own)} other workers of this node reachable")
        if self.meta.member_down:  # (served through the other members meanwhile)
            details.append(self.meta.member_down)
        return True, "; ".join(details)

    def status(self, sessions: int) -> dict[str, Any]:
        """The body of ``/cluster/status``: reference 003's four fields, then the members."""
        leader = getattr(self.meta.election, "leader", None) if self.meta.election is not None else None
        if self.grouped:
            return self._node_status(sessions, leader)
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

    def _node_status(self, sessions: int, leader: str | None) -> dict[str, Any]:
        """``/cluster/status`` of a node whose members are its workers: each node once, its workers
        under ``workers``; ``node_id`` and ``is_leader`` are the node's."""
        me = self.meta.node_id
        mine = node_of(me)
        leading = node_of(leader) if leader else None
        nodes, own = self._nodes()

        def workers(members: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
            return [
                {"worker_id": m, "addr": p["addr"], "live": p["live"], "reachable": p["reachable"]}
                for m, p in sorted(members.items())
            ]

        live = self.meta.ready[0]
        members = [
            {
                "node_id": mine,
                "addr": self.meta.transport_addr,
                "self": True,
                "live": live,
                "reachable": all(p["reachable"] for p in own.values()),
                "leader": leading == mine,
                "workers": workers(
                    {me: {"addr": self.meta.transport_addr, "live": live, "reachable": True}, **own}
                ),
            }
        ]
        for node, entry in sorted(nodes.items()):
            members.append(
                {
                    "node_id": node,
                    "addr": entry["addr"],
                    "self": False,
                    "live": entry["live"],
                    "reachable": entry["reachable"],
                    "leader": leading == node,
                    "workers": workers(entry["workers"]),
                }
            )
        return {
            "node_id": mine,
            "is_leader": leading == mine,
            "cluster_mode": True,
            "sessions": sessions,
            "members": members,
        }
