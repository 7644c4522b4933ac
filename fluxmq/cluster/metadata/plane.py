"""MetadataPlane: everything of one node that lives in etcd, built from the config and started and
stopped as one (the cluster node calls it; the transport supplies ``fetch`` and ``peer_state``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from fluxmq.broker.message import Message

from .config import EtcdSettings
from .health import ClusterHealth
from .metadata import ClusterMetadata
from .replicated import RetainedReplica, WillRegistry

__all__ = ["MetadataPlane"]

log = logging.getLogger("fluxmq.cluster.metadata")


def _no_fetch(node_id: str, topic: str) -> bytes:
    raise LookupError(f"no transport to fetch the retained payload of {topic!r} from {node_id}")


class MetadataPlane:
    """ClusterMetadata + RetainedReplica + WillRegistry + ClusterHealth of one node."""

    def __init__(
        self,
        settings: EtcdSettings,
        node_id: str,
        transport_addr: str,
        broker,
        state_dir: str | Path | None = None,
        prefix: str | None = None,
        fetch: Callable[[str, str], bytes] | None = None,
        peer_state: Callable[[], dict[str, dict]] | None = None,
        publish: Callable[[Message], object] | None = None,
        announce: dict[str, str] | None = None,
        member_name: str | None = None,
    ) -> None:
        self.meta = ClusterMetadata(
            settings,
            node_id,
            transport_addr,
            prefix=prefix or settings.prefix,
            state_dir=state_dir,
            announce=announce,
            member_name=member_name,
        )
        self.retained = RetainedReplica(
            self.meta, broker, settings.hybrid_retained_size_threshold, fetch or _no_fetch
        )
        self.wills = WillRegistry(self.meta, publish or broker.publish)
        self.health = ClusterHealth(self.meta, peer_state)
        self._started: list = []
        self._follow_members: Callable[[dict[str, str]], None] | None = None

    @classmethod
    def from_config(cls, config, broker, worker=None, **hooks) -> MetadataPlane:
        """From ``cluster.node_id``, ``cluster.transport.bind_addr`` and ``cluster.etcd.*``; the node's
        restart record is kept in ``storage.path``. ``worker`` (``fluxmq.cluster.workers.WorkerMember``,
        several workers): this worker's member id, address, storage shard and etcd settings instead."""
        if worker is not None:
            return cls(
                worker.etcd,
                worker.member_id,
                worker.grpc_addr,
                broker,
                state_dir=worker.state_dir,
                member_name=config.cluster.node_id,
                **hooks,
            )
        return cls(
            EtcdSettings.from_config(config),
            config.cluster.node_id,
            config.cluster.transport.bind_addr,
            broker,
            state_dir=config.storage.path,
            **hooks,
        )

    def attach_transport(self, transport, fetch_timeout: float = 5.0) -> None:
        """Wire the inter-node transport (CLUSTER.md's interface): large retained payloads are fetched
        with ``transport.call(node, "retained.fetch", topic)`` and served by ``handle``; the cluster
        check reads ``peer_state()``; the transport's peers follow etcd membership (``set_peers``,
        this node excluded; peers lost without leaving are kept). Call before or after ``start``."""
        self.retained.fetch = lambda node, topic: transport.call(
            node, "retained.fetch", topic.encode(), fetch_timeout
        )
        transport.handle(
            "retained.fetch", lambda from_node, payload: self.retained.serve_fetch(payload.decode())
        )
        self.health.peer_state = transport.peer_state
        me = self.meta.node_id

        def follow(members: dict[str, str]) -> None:
            # A peer that went without leaving (killed, cut off) keeps its link: what is forwarded to
            # it waits in its bounded queue until it is back (its persistent sessions come back with
            # it). A peer that left gracefully is dropped.
            peers = {**self.meta.lost_members(), **members}
            transport.set_peers({node: addr for node, addr in peers.items() if node != me})

        self._follow_members = follow
        if self.meta.membership is not None:
            self.meta.on_members(follow)
            follow(self.meta.members())

    def start(self) -> None:
        """Start the member (unless external endpoints are set), register, then follow retained
        messages and wills. ClusterError (one line) when etcd does not answer or the id is live."""
        try:
            for part in (self.meta, self.retained, self.wills):
                part.start()
                self._started.append(part)
                if part is self.meta and self._follow_members is not None:
                    self.meta.on_members(self._follow_members)
                    self._follow_members(self.meta.members())
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Write what is pending, then revoke the lease (this node's sessions are free at once) and
        stop the member."""
        if self.retained in self._started:
            self.retained.flush(2.0)
        for part in reversed(self._started):
            try:
                part.stop()
            except Exception:
                log.exception("metadata_stop_failed", extra={"part": type(part).__name__})
        self._started.clear()
