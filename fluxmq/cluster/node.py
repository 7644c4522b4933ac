"""ClusterNode: the cluster's data plane of one node, built by the node service when ``cluster.enabled``.

It starts the gRPC transport, installs ``ClusterPeers`` in the broker (which replays the broker's
interest), and opens links to the static peers of ``cluster.transport.peers``. Membership from
elsewhere (etcd, issue 11's metadata plane) is fed with ``transport.set_peers(members)`` at any
time; control calls go through ``transport.call`` / ``transport.handle``.
"""

from __future__ import annotations

import logging
import time

from .config import ClusterSettings

log = logging.getLogger("fluxmq.cluster")

_grpc_ready = False


def init_grpc_for_gevent() -> None:
    """Make grpcio cooperate with gevent (once per process, before any grpc object is made; the
    process is monkey-patched already: the node's worker is)."""
    global _grpc_ready
    if not _grpc_ready:
        from grpc.experimental import gevent as grpc_gevent

        grpc_gevent.init_gevent()
        _grpc_ready = True


class ClusterNode:
    """The transport, the peers and their wiring to one broker."""

    def __init__(self, settings: ClusterSettings, broker) -> None:
        init_grpc_for_gevent()
        from .peers import ClusterPeers
        from .transport import ClusterTransport

        self.settings = settings
        self.node_id = settings.node_id
        self.broker = broker
        # The incarnation: a restarted node's sequence ids start again under a new epoch.
        self.epoch = time.time_ns()
        t = settings.transport
        self.peers = ClusterPeers(settings.node_id, broker, None, broker.settings.shared_subscription_strategy,
                                  t.interest_sync_timeout)
        self.transport = ClusterTransport(settings.node_id, self.epoch, t, self.peers.apply_batch,
                                          broker.interest_filters, on_ack=self.peers.on_ack,
                                          on_peer_removed=self.peers.peer_removed)
        self.peers.transport = self.transport
        self._started = False

    def start(self) -> None:
        self.transport.start()
        self.broker.set_peers(self.peers)
        self.transport.set_peers(self.settings.transport.peers)
        self._started = True
        log.info("cluster_node_started", extra={"node_id": self.node_id,
                                                "peers": ",".join(sorted(self.transport.links)) or "-"})

    def stop(self, timeout: float = 1.0) -> None:
        """Stop forwarding (what is queued gets ``timeout`` to reach reachable peers), close links."""
        if not self._started:
            return
        self._started = False
        if self.broker.peers is self.peers:
            self.broker.set_peers(None)
        self.transport.stop(timeout)
        log.info("cluster_node_stopped", extra={"node_id": self.node_id})

    def peer_state(self) -> dict[str, dict]:
        return self.transport.peer_state()

    def received(self) -> dict[str, int]:
        """What the peers sent here: batches and messages applied, retried batches skipped,
        damaged batches."""
        p = self.peers
        return {"batches": p.received_batches, "messages": p.received_messages,
                "duplicates": p.duplicate_batches, "bad": p.bad_batches}

    def readiness(self) -> tuple[bool, str]:
        """(up, details) for /ready: up while the transport serves; details (degraded) when a peer
        does not answer."""
        links = self.transport.links
        if not links:
            return True, ""
        up = len(self.transport.reachable())
        return True, "" if up == len(links) else f"{up}/{len(links)} peers reachable"
