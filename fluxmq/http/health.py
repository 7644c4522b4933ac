"""Health endpoints (``/health``, ``/ready``, ``/cluster/status``), shaped exactly as reference 003.

The app reads the node through the small ``BrokerService`` surface only: ``is_ready()`` (component
name -> ``(up, details)``) and ``session_count()``. A cluster node also gives a ``ClusterHealthSource``
(``fluxmq.cluster.metadata.health.ClusterHealth``): its ``check()`` becomes the ``cluster`` readiness
check and its ``status()`` the ``/cluster/status`` body; without one the single-node answers stay.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from fluxmq.http.router import Router

log = logging.getLogger(__name__)

SINGLE_NODE_ID = "single-node"


class HealthSource(Protocol):
    """What the health app needs from the node (``fluxmq.node.service.BrokerService`` provides it)."""

    def is_ready(self) -> dict[str, tuple[bool, str]]: ...

    def session_count(self) -> int: ...


class ClusterHealthSource(Protocol):
    """What a cluster node adds: the ``cluster`` check and the ``/cluster/status`` body."""

    def check(self) -> tuple[bool, str]: ...

    def status(self, sessions: int) -> dict[str, Any]: ...


def health_body() -> tuple[int, dict[str, Any]]:
    """Liveness: answering at all means the process is alive; no dependency is checked."""
    return 200, {"status": "healthy"}


def ready_body(checks: dict[str, tuple[bool, str]]) -> tuple[int, dict[str, Any]]:
    """Readiness from the per-component checks, in the order the service reports them.

    Any component down: 503 ``not_ready`` naming the first one down. All up: 200 ``ready``, mode
    ``degraded`` when an up component still reports details (e.g. "1/2 peers reachable"), else
    ``nominal``. ``details`` appear in a check only when non-empty.
    """
    rendered: dict[str, dict[str, str]] = {}
    first_down = None
    degraded = False
    for name, (up, details) in checks.items():
        entry = {"status": "up" if up else "down"}
        if details:
            entry["details"] = details
            degraded = degraded or up
        if not up and first_down is None:
            first_down = name
        rendered[name] = entry
    if first_down is not None:
        return 503, {"status": "not_ready", "details": f"{first_down} unavailable", "checks": rendered}
    return 200, {"status": "ready", "mode": "degraded" if degraded else "nominal", "checks": rendered}


def cluster_status_body(sessions: int) -> tuple[int, dict[str, Any]]:
    """Membership of a single node (clustering disabled)."""
    return 200, {"node_id": SINGLE_NODE_ID, "is_leader": False, "cluster_mode": False, "sessions": sessions}


def raft_groups(service: Any) -> list[dict[str, Any]] | None:
    """Each Raft group of the node for ``/cluster/status`` (health listener and admin API): leader
    (Raft and MQTT address), term, commit index, applied index, quorum and per-replica lag (entries
    behind the commit index, known on the leader only). None when Raft is off (the key is omitted)."""
    source = getattr(service, "raft_status", None)
    groups = source() if source is not None else []
    if not groups:
        return None
    keys = (
        "name",
        "peers",
        "leader",
        "leader_mqtt",
        "term",
        "commit_index",
        "applied",
        "has_quorum",
        "delivering",
        "lag",
        "forming",
    )
    return [{k: g.get(k) for k in keys} for g in groups]


def make_health_app(service: HealthSource, cluster: ClusterHealthSource | None = None) -> Router:
    """The WSGI app served on ``server.health_addr``: a Router other endpoints can be added to."""

    def ready(environ: dict) -> tuple[int, dict[str, Any]]:
        try:
            checks = service.is_ready()
            if cluster is not None:
                checks["cluster"] = cluster.check()
        except Exception as exc:  # a failing check must answer 503, never a 500 page
            log.warning("readiness check failed error=%r", exc)
            checks = {"broker": (False, f"readiness check failed: {exc}")}
        return ready_body(checks)

    def status(environ: dict) -> tuple[int, dict[str, Any]]:
        if cluster is None:
            code, body = cluster_status_body(service.session_count())
        else:
            code, body = 200, cluster.status(service.session_count())
        groups = raft_groups(service)
        if groups is not None:
            body["raft_groups"] = groups
        return code, body

    router = Router()
    router.add("/health", lambda environ: health_body())
    router.add("/ready", ready)
    router.add("/cluster/status", status)
    raft_status = getattr(service, "raft_status", None)
    if raft_status is not None:
        # Raft groups of replicated queues: leader, term, commit index, per-replica lag (issue 12)
        router.add("/cluster/raft", lambda environ: (200, {"groups": raft_status()}))
    return router
