"""The admin API and ``/metrics`` of a worker answer for its whole node (``server.workers`` > 1).

Each worker serves its own figures, sessions and queues to the others over the workers' control
calls (``WorkerNode.transport``: ``"metrics"``, ``"admin.stats"``, ``"admin.session"``,
``"admin.sessions"``, ``"retained.delete"``, ``"admin.queue"``, ``"admin.queues"``), and its HTTP apps
ask the others the same way. The node layer joins the two here: the cluster package does not import
the HTTP one, nor the reverse (docs/architecture.rst).
"""

from __future__ import annotations

import json
import logging

from fluxmq.cluster.workers import STATS_TIMEOUT
from fluxmq.http.admin import session_summary
from fluxmq.http.bridge import HTTPError
from fluxmq.http.metrics import NodeTotalsRegistry, families_to_json
from fluxmq.http.walk import page

log = logging.getLogger("fluxmq.node.worker_totals")


def metrics_totals(workers, registry):
    """``/metrics`` of this worker as the node's: this worker's registry merged with the others'
    (each other worker serves its own registry to the ``"metrics"`` call)."""
    workers.transport.handle("metrics", lambda _from, _p: json.dumps(families_to_json(registry)).encode())
    return NodeTotalsRegistry(registry, lambda: list(workers.gather("metrics").values()))


def admin_totals(workers, admin) -> None:
    """The admin API answers for the node: ``/stats`` sums the workers' figures (``"admin.stats"``
    call, ``AdminAPI.other_stats``); ``GET /sessions/{id}`` and ``POST /sessions/{id}/disconnect``
    are answered by the worker that owns the client id (``"admin.session"`` call)."""

    def serve(_from: str, _payload: bytes) -> bytes:
        return json.dumps(admin.local_stats()[1]).encode()

    workers.transport.handle("admin.stats", serve)
    admin.other_stats = lambda: list(workers.gather("admin.stats").values())

    def serve_session(_from: str, payload: bytes) -> bytes:
        client_id, action = json.loads(payload)
        method = admin.get_session if action == "get" else admin.disconnect
        try:
            status, body = method({}, [client_id])
        except HTTPError as exc:
            status, body = exc.status, {"error": exc.message}
        return json.dumps([status, body]).encode()

    def elsewhere(client_id: str, action: str):
        owner = workers.ownership.owned_by(client_id)
        if (
            owner is None
            or owner == workers.node_id
            or owner.rpartition("/")[0] != workers.node_id.rpartition("/")[0]
        ):
            return None  # here, nowhere, or on another node (answered here as on any cluster node)
        try:
            status, body = json.loads(
                workers.transport.call(owner, "admin.session", json.dumps([client_id, action]).encode(), 5.0)
            )
        except Exception as exc:
            raise HTTPError(503, f"worker {owner} holding {client_id!r} does not answer: {exc}") from None
        return status, body

    workers.transport.handle("admin.session", serve_session)
    admin.session_elsewhere = elsewhere

    def serve_delete(_from: str, payload: bytes) -> bytes:
        workers.broker.retained.delete(bytes(payload).decode())
        return b""

    def delete_everywhere(topic: str) -> None:
        for node in workers.local():
            try:
                workers.transport.call(node, "retained.delete", topic.encode(), STATS_TIMEOUT)
            except Exception as exc:
                log.warning(
                    "retained_delete_not_forwarded",
                    extra={"peer": node, "topic": topic, "error": str(exc)},
                )

    workers.transport.handle("retained.delete", serve_delete)
    admin.retained_deleted = delete_everywhere

    def serve_sessions(_from: str, payload: bytes) -> bytes:
        connected, after, n = json.loads(payload)
        total, ordered = admin.local_sessions(connected, after)
        return json.dumps([total, [session_summary(x) for x in page(ordered, 0, n)]]).encode()

    def other_sessions(connected, after, n: int) -> list:
        out = []
        request = json.dumps([connected, after, n]).encode()
        for node in workers.local():
            try:
                out.append(json.loads(workers.transport.call(node, "admin.sessions", request, 5.0)))
            except Exception as exc:
                raise HTTPError(503, f"worker {node} does not answer: {exc}") from None
        return out

    workers.transport.handle("admin.sessions", serve_sessions)
    admin.other_sessions = other_sessions

    # Durable queues: each is on its owning worker (fluxmq.cluster.queues); a request about one
    # is answered there, and the list is every worker's.
    actions = {
        "get": admin.get_queue,
        "peek": admin.peek_queue,
        "purge": admin.purge_queue,
        "replay": admin.replay_queue,
    }

    def serve_queue(_from: str, payload: bytes) -> bytes:
        name, action, query_string = json.loads(payload)
        try:
            status, body = actions[action]({"QUERY_STRING": query_string}, [name])
        except HTTPError as exc:
            status, body = exc.status, {"error": exc.message}
        return json.dumps([status, body]).encode()

    def queue_elsewhere(name: str, action: str, query_string: str):
        manager = workers.broker.queues
        placement = manager.placement if manager is not None else None
        if placement is None:
            return None
        nodes = placement.nodes
        if (
            nodes is not None
            and not placement.is_replicated(name)
            and nodes.owners.owner(placement.source(name)) != nodes.node
        ):
            return None  # no such queue, or another node's (answered here: 404 naming it)
        if placement.owns(name):
            return None
        owner = workers.context.member(placement.owner(name))
        try:
            reply = workers.transport.call(
                owner, "admin.queue", json.dumps([name, action, query_string]).encode(), 30.0
            )
        except Exception as exc:
            raise HTTPError(503, f"worker {owner} owning queue {name!r} does not answer: {exc}") from None
        status, body = json.loads(reply)
        return status, body

    def serve_queues(_from: str, _payload: bytes) -> bytes:
        manager = workers.broker.queues
        return json.dumps(manager.describe() if manager is not None else []).encode()

    def other_queues() -> list:
        out = []
        for node in workers.local():
            try:
                out.append(json.loads(workers.transport.call(node, "admin.queues", b"", 5.0)))
            except Exception as exc:
                raise HTTPError(503, f"worker {node} does not answer: {exc}") from None
        return out

    workers.transport.handle("admin.queue", serve_queue)
    workers.transport.handle("admin.queues", serve_queues)
    admin.queue_elsewhere = queue_elsewhere
    admin.other_queues = other_queues
