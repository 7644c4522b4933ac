"""The workers of one node as a local cluster (``server.workers`` > 1): each worker is a member.

Nothing here is a second routing path: every worker runs the cluster's own pieces (issue 11),
``ClusterPeers`` (interest tries per member, batched forwarding with sequence ids, shared groups
decided once) over a ``ClusterTransport`` whose addresses are Unix sockets in the node's run
directory (``unix:{run_dir}/w{i}.sock``), and ``ClusterSessions`` (C3's takeover) over an ownership
registry that needs no etcd. The transport is ``fluxmq.cluster.unix.UnixTransport`` (the same
service and ``PeerLink``, protobuf frames on plain Unix sockets) unless ``server.workers_transport``
is ``grpc``. What is particular to workers:

* **Membership** is static: the arbiter starts ``count`` workers with indexes 0..count-1 and
  restarts a dead one under its index, so the member list never changes; a restarted worker's link
  reconnects (a new epoch) and receives what was queued for it meanwhile (bounded, as for a node).
* **Ownership** (``fluxmq.storage.worker_owners.LocalOwnership``): client id -> ``"w{i} {pid}"`` in a small LMDB environment in
  the run directory, shared by the workers; a claim is a compare-and-swap in one write transaction.
  An entry whose pid is no longer alive belongs to nobody, unless the arbiter is restarting its
  worker (``WorkerContext.restarts``: another index of the node) and that worker has not adopted
  its restored sessions yet: a claim without Clean Start then waits for it (``RESTART_WAIT``) and
  takes the session over from it, a Clean Start takes the id at once; once the node is stopping
  (``WorkerContext.stopping``) the claim is refused at once (the copy is back at the next start). A
  restarted worker keeps the restored sessions nobody claimed meanwhile and drops those another
  worker took. A worker stopped gracefully keeps its ids as a killed one (``WorkerNode.stop``):
  alone (SIGTERM to its pid) the arbiter restarts it with its shard; at the node's stop they are
  the next start's.
* **Retained** messages are kept by every worker (each in its own storage shard): a retained
  publish is sent to every worker, those without matching interest only store it; a starting worker
  fills in what its shard lacks from another worker's snapshot (``retained.snapshot`` call).
* **$SYS totals** are the sum of the workers' figures (``sys_totals``), asked for with a control
  call ``"stats"``; ``$SYS/broker/worker`` names the worker a client is connected to. ``/metrics``
  and the admin API answer for the node through the same calls (``fluxmq.node.worker_totals``, which
  joins the HTTP apps to this class: the cluster package does not import the HTTP one).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
import time

import gevent

from fluxmq.broker.message import Message
from fluxmq.storage.records import decode_message, encode_message
from fluxmq.storage.worker_owners import LocalOwnership

from .batch import Outgoing
from .config import cluster_settings
from .handover import ClusterSessions, serve_handover
from .node import PEER_INTEREST_WAIT, delayed_apply, init_grpc_for_gevent
from .peers import ClusterPeers
from .queues import RemoteQueues

log = logging.getLogger("fluxmq.cluster.workers")

#: seconds a worker waits for another's figures ($SYS totals, /metrics)
STATS_TIMEOUT = 1.0
#: seconds a starting worker waits for another to answer its retained snapshot request
RETAINED_SYNC_WAIT = 10.0
#: seconds a claim (no Clean Start) of a client id owned by a worker killed and being restarted
#: waits for it to be back with its restored copy before it is refused with 0x88 (the client
#: retries): the arbiter's restart and the store's load take a few seconds
RESTART_WAIT = 10.0
#: TEST-ONLY environment variable: seconds a restarted worker waits before it joins the others (as
#: if the arbiter were slow to start it again: a claim waiting for it runs out). Never set it in
#: production. Not a ``FLUXMQ_`` variable: those are configuration keys.
RESTART_DELAY_ENV = "FLUXMQTEST_WORKER_RESTART_DELAY"
_LEN = struct.Struct(">I")
#: $SYS figures that are the same on every worker (not summed)
NOT_SUMMED = frozenset({"version", "uptime", "retained messages/count"})


@dataclasses.dataclass(frozen=True)
class WorkerMember:
    """Worker ``index`` of a cluster node as a member of the cluster (docs/cluster.rst, "Several
    workers on a cluster node"): member ``{node}/w{index}``, gRPC on the port of
    ``cluster.transport.bind_addr`` plus ``index``, the node's other workers over their Unix sockets,
    its restart record in its storage shard, and etcd: worker 0 runs the supervised member (when
    there is one), the others are its clients. Its links to the node's other workers batch by
    ``server.workers_batch_max_size`` (``batch_max_size``), those to other nodes by
    ``cluster.transport.route_batch_max_size``."""

    member_id: str
    grpc_addr: str
    unix_addr: str
    local_peers: dict
    state_dir: str
    etcd: object  # fluxmq.cluster.metadata.config.EtcdSettings
    batch_max_size: int = 2048

    @classmethod
    def of(cls, config, context, state_dir: str) -> WorkerMember:
        """From the loaded Config and the worker's ``WorkerContext`` (``state_dir``: its shard)."""
        from fluxmq.config import parse_addr

        from .metadata.config import EtcdSettings

        host, port = parse_addr(config.cluster.transport.bind_addr)
        shown = f"[{host}]" if ":" in host else host
        etcd = EtcdSettings.from_config(config)
        if etcd.supervised and context.index != 0:
            etcd = dataclasses.replace(etcd, endpoints=etcd.client_endpoints())  # worker 0's member
        return cls(
            member_id=context.node_id,
            grpc_addr=f"{shown}:{port + context.index}",
            unix_addr="unix:" + context.socket_path(context.index),
            local_peers={
                context.member(i): "unix:" + context.socket_path(i)
                for i in range(context.count)
                if i != context.index
            },
            state_dir=state_dir,
            etcd=etcd,
            batch_max_size=config.server.workers_batch_max_size,
        )


class _WorkerBroker:
    """The broker as ``ClusterPeers`` sees it on a worker: a forwarded retained message is stored
    here too (every worker keeps every retained message), then delivered as from any peer."""

    def __init__(self, broker) -> None:
        self._broker = broker

    def __getattr__(self, name: str):
        return getattr(self._broker, name)

    def publish_from_peer(self, message, shared_groups=(), match_local=True) -> int:
        broker = self._broker
        if message.retain:
            broker.retained.store(message)
        return broker.publish_from_peer(message, shared_groups, match_local)


class WorkerPeers(ClusterPeers):
    """``ClusterPeers`` plus what a worker adds: retained messages go to every worker, and client
    ids are owned through ``ClusterSessions`` over ``LocalOwnership``."""

    sessions: ClusterSessions | None = None

    def forward(self, message, groups: list) -> list:
        local = super().forward(message, groups)
        if message.retain and not message.topic.startswith("$SYS"):
            # Every worker keeps every retained message: the workers the message was not forwarded
            # to (no matching interest) get it to store only.
            nodes, _groups = self.remote.match(message.topic)
            blob = None
            for node, link in self.transport.links.items():
                if node not in nodes:
                    if blob is None:
                        blob = encode_message(message)
                    link.enqueue(Outgoing(blob, (), False, message.expires_at))
        return local


class _NodeHealth:
    """The cluster check and ``/cluster/status`` of a worker of a cluster node: the ``ClusterHealth``
    of its member, with ``sessions`` the node's (this worker's plus the others' ``clients/total``)."""

    def __init__(self, health, worker) -> None:
        self._health = health
        self._worker = worker

    def check(self) -> tuple[bool, str]:
        return self._health.check()

    def status(self, sessions: int) -> dict:
        for figures in self._worker.gather().values():
            try:
                sessions += int(figures.get("clients/total", 0))
            except ValueError:
                pass
        return self._health.status(sessions)


class WorkerNode:
    """One worker's membership in the node's local cluster: transport, peers, ownership, totals."""

    def __init__(self, context, broker, config, node=None) -> None:
        """``node``: the ``ClusterNode`` of this worker on a cluster node (``cluster.enabled``): its
        transport, peers and etcd ownership are the ones used here (the worker is member
        ``n1/w{i}`` of the cluster; docs/cluster.rst, "Several workers on a cluster node")."""
        self.context = context
        self.node_id = context.node_id
        self.broker = broker
        self.node = node
        self._started = False
        self._sync = None
        if node is not None:
            self.epoch = node.epoch
            self.settings = node.settings.transport
            self.peers = node.peers
            self.transport = node.transport
            self.ownership = node.plane.meta  # etcd owns the client ids (owned_by for the admin API)
        else:
            self._local_cluster(context, broker, config)
        self.transport.handle("stats", self._serve_stats)
        # durable queues: each has one owning worker, the others reach it (fluxmq.cluster.queues)
        self.queues = RemoteQueues(broker, self.transport, self.node_id, self.epoch, context.member)

    def _local_cluster(self, context, broker, config) -> None:
        """The node's workers as a cluster of their own (no ``cluster.enabled``)."""
        if config.server.workers_transport == "grpc":
            init_grpc_for_gevent()
            from .transport import ClusterTransport as Transport
        else:
            from .unix import UnixTransport as Transport

        self.epoch = time.time_ns()
        base = cluster_settings(config).transport  # queue bounds and batching: cluster.transport.*
        self.settings = settings = dataclasses.replace(
            base,
            # (between workers a batch is bounded by its own key: larger than between nodes)
            batch_max_size=config.server.workers_batch_max_size,
            bind_addr="unix:" + context.socket_path(context.index),
            tls_enabled=False,
            peers={
                context.member(i): "unix:" + context.socket_path(i)
                for i in range(context.count)
                if i != context.index
            },
        )
        self.peers = WorkerPeers(
            self.node_id,
            _WorkerBroker(broker),
            None,
            broker.settings.shared_subscription_strategy,
            settings.interest_sync_timeout,
        )
        self.transport = Transport(
            self.node_id,
            self.epoch,
            settings,
            delayed_apply(self.peers.receive),  # (a test-only delay, as a cluster node's)
            broker.interest_filters,
            on_ack=self.peers.on_ack,
            on_peer_removed=self.peers.peer_removed,
        )
        self.peers.transport = self.transport
        self.ownership = LocalOwnership(
            os.path.join(context.run_dir, "owners"), self.node_id, context.restarts, context.stopping
        )
        self.peers.sessions = ClusterSessions(
            self.ownership,
            self.transport.call,
            drain=self.transport.drain,
            markers=self.peers.markers,
            restart_wait=RESTART_WAIT,
            max_kept_moved=broker.moved_max_queued,
        )
        serve_handover(self.transport, broker, self.peers)
        self.transport.handle("retained.snapshot", self._serve_retained)

    def local(self) -> list[str]:
        """The node's other workers that answer (member ids): what the node's totals, the admin API
        and the retained deletes ask (never the other nodes' members)."""
        if self.node is not None:
            return self.transport.local()
        return self.transport.reachable()

    # -- as the cluster node (cluster.enabled): what the service, health and metrics read ----------

    @property
    def health(self):
        return _NodeHealth(self.node.health, self) if self.node is not None else None

    @property
    def topics(self):
        return self.node.topics if self.node is not None else None

    @property
    def draining(self) -> bool:
        return self.node.draining if self.node is not None else False

    @draining.setter
    def draining(self, value: bool) -> None:
        if self.node is not None:
            self.node.draining = value

    def __getattr__(self, name: str):
        # figures (cluster.enabled only): the ClusterNode's
        if name == "figures" and self.__dict__.get("node") is not None:
            return self.__dict__["node"].figures
        raise AttributeError(name)

    def drain(self, timeout: float) -> int:
        """After the broker closed its connections (SIGTERM): a cluster node's drain
        (``ClusterNode.drain``). A worker of a node of its own hands nothing out (its ids stay its
        own for its restart: ``stop``), but a session taken over from it (its client back on
        another worker a moment before the stop, or during it) left a stand-in that forwards what
        still reaches this worker for it: a batch on its way, applied late. Stopped alone, the
        worker stays up until those stand-ins ended or forward only to workers gone, at most
        ``timeout`` (stopped before, those messages were lost: the peer sends an unacknowledged
        batch again to the restarted worker, which no longer has the session). Not once the node
        stops (the run directory's mark): its stop stays as quick as before. Returns the sessions
        left here."""
        if self.node is not None:
            return self.node.drain(timeout)
        moved_forwarding = getattr(self.broker, "moved_forwarding", None)
        deadline = time.monotonic() + timeout
        while (
            moved_forwarding is not None
            and not self.context.stopping()
            and time.monotonic() < deadline
            and moved_forwarding() & set(self.transport.reachable())
        ):
            gevent.sleep(0.05)
        return len(self.broker.sessions)

    def attach_queues(self, manager) -> None:
        """``manager`` (this worker's QueueManager) reaches the queues other workers own."""
        self.queues.attach(manager)

    def start(self) -> None:
        if self.node is not None:
            # The cluster node: transport (gRPC and the node's Unix socket), etcd membership,
            # ownership of the restored sessions, peers into the broker. Retained messages and
            # wills go through etcd, so nothing of the workers' own retained sharing runs.
            # Durable queues are owned by nodes (etcd), then by a worker of the owning node: placed
            # before the node's peers' batches are applied (``ClusterNode.start``), as a node's.
            self.node.start(place=self._place_on_nodes)
            stale: list[str] = []
        else:
            delay = float(os.environ.get(RESTART_DELAY_ENV) or 0)
            if delay and self.ownership.adopted_before():
                log.warning("worker_restart_delayed", extra={"seconds": delay, "env": RESTART_DELAY_ENV})
                until = time.monotonic() + delay
                while time.monotonic() < until and not self.context.stopping():  # (a node stop: at once)
                    gevent.sleep(0.1)
            path = self.context.socket_path(self.context.index)
            try:
                os.unlink(path)  # left by a worker killed before it could remove it
            except FileNotFoundError:
                pass
            self.transport.start()
            stale = self.ownership.adopt(list(self.broker.sessions))
            for client_id in stale:
                # Taken over by another worker while this one was down: that copy is the live one.
                self.broker.export_session(client_id)
                log.info(
                    "restored_session_dropped",
                    extra={"client_id": client_id, "reason": "owned by another worker"},
                )
            self.broker.set_peers(self.peers)
            self.transport.set_peers(self.settings.peers)
        if self.broker.queues is not None:
            self.attach_queues(self.broker.queues)
        self.queues.start()
        self.queues.move_stranded()
        self._started = True
        if self.node is None:
            self._sync = gevent.spawn(self._sync_retained)
        log.info(
            "worker_joined",
            extra={"node_id": self.node_id, "workers": self.context.count, "restored_dropped": len(stale)},
        )

    def _place_on_nodes(self, meta) -> None:
        from .queue_nodes import QueueNodes

        self.queues.place_on_nodes(QueueNodes(meta))

    def wait_interest(self) -> None:
        """Before the listeners accept: until the other workers' (and nodes') interest arrived
        (``ClusterNode.wait_interest``; bounded); not once the node stops (the others stop too)."""
        if self.node is None and self.context.stopping():
            return
        self.peers.wait_snapshots(PEER_INTEREST_WAIT)

    def stop(self, timeout: float = 1.0) -> None:
        if not self._started:
            return
        self._started = False
        self.queues.stop()
        if self.node is not None:
            self.node.stop(timeout)
            return
        self._sync.kill(block=False)
        if self.broker.peers is self.peers:
            # The ids of the sessions held here stay this (soon dead) process's, as a killed worker's:
            # its store, committed by the stop, holds them, and the arbiter restarts it with that
            # shard unless the node stops (then they are the next start's). Given up, a client back
            # on another worker meanwhile got a fresh session and the restarted worker dropped its
            # copy. Whether the node stops does not matter: nothing waits on it, so no race with
            # the arbiter's mark when every process of the node gets SIGTERM at once.
            if not self.broker.storage.durable:
                self.broker.release_sessions()  # in memory: nothing comes back with the restart
            self.broker.set_peers(None)
        self.transport.stop(timeout)
        self.ownership.close()
        try:
            os.unlink(self.context.socket_path(self.context.index))
        except OSError:
            pass

    # -- retained messages missing from this worker's shard ----------------------------------------

    def _serve_retained(self, _from: str, _payload: bytes) -> bytes:
        """Every retained message of this worker ($SYS aside), each length-prefixed."""
        out = bytearray()
        for topic, message in list(self.broker.retained.items()):
            if topic.startswith("$SYS") or message.expired():
                continue
            blob = encode_message(message)
            out += _LEN.pack(len(blob))
            out += blob
        return bytes(out)

    def _sync_retained(self) -> None:
        """Once at start, from the first other worker that answers: store the retained messages this
        worker's shard lacks (a node going from 1 worker to several, or a worker whose peers' queues
        for it overflowed while it was down). A topic held here already is left as it is (it may be
        newer than the snapshot: what is set meanwhile is forwarded anyway)."""
        deadline = time.monotonic() + RETAINED_SYNC_WAIT
        while not self.transport.reachable() and time.monotonic() < deadline:
            gevent.sleep(0.1)
        for node in self.transport.reachable():  # (no cluster: every peer is a worker of this node)
            try:
                data = self.transport.call(node, "retained.snapshot", b"", RETAINED_SYNC_WAIT)
            except Exception as exc:
                log.warning("retained_sync_failed", extra={"peer": node, "error": str(exc)})
                continue
            retained = self.broker.retained
            added = i = 0
            while i + 4 <= len(data):
                (n,) = _LEN.unpack_from(data, i)
                topic, payload, qos, _retain, props, expires_at, origin = decode_message(
                    data[i + 4 : i + 4 + n]
                )
                i += 4 + n
                if retained.get(topic) is None:
                    retained.store(Message(topic, payload, qos, True, props, expires_at, origin))
                    added += 1
            log.info("retained_synced", extra={"peer": node, "added": added})
            return

    def peer_state(self) -> dict[str, dict]:
        return self.transport.peer_state()

    def queue_owners(self) -> dict[str, str]:
        """Every durable queue's owning node (cluster.enabled with etcd; ``ClusterNode.queue_owners``)."""
        return self.node.queue_owners() if self.node is not None else {}

    def reassign_queues(self, name: str = "", gone: str = "", to: str = "") -> dict:
        """``ClusterNode.reassign_queues`` (cluster.enabled with etcd)."""
        if self.node is None:
            from .metadata.queue_owners import no_owners_here

            raise no_owners_here()
        return self.node.reassign_queues(name, gone, to)

    def queue_state(self) -> dict[str, dict]:
        """Durable queues across workers, per other worker (``/metrics``): ``RemoteQueues.state``."""
        return self.queues.state()

    def received(self) -> dict[str, int]:
        """What the other workers sent here (``/metrics``, as ``ClusterNode.received``)."""
        p = self.peers
        return {
            "batches": p.received_batches,
            "messages": p.received_messages,
            "duplicates": p.duplicate_batches,
            "bad": p.bad_batches,
            "failed": p.failed_messages,
        }

    def readiness(self) -> tuple[bool, str] | None:
        """The ``cluster`` check of a cluster node's worker; None on a node of its own (the workers
        that serve are the ``workers`` check: ``WorkerContext.readiness``)."""
        return self.node.readiness() if self.node is not None else None

    # -- totals across workers -------------------------------------------------------------------

    def _local_values(self) -> dict[str, str]:
        from fluxmq.broker.sys_topics import SysTopics

        topics = SysTopics(self.broker, 0)
        return {**topics.values(), **topics.queue_values()}

    def _serve_stats(self, from_node: str, payload: bytes) -> bytes:
        return json.dumps(self._local_values()).encode()

    def gather(self, kind: str = "stats") -> dict[str, dict]:
        """node_id -> the figures each other reachable worker answered with."""
        out = {}
        for node in self.local():
            try:
                out[node] = json.loads(self.transport.call(node, kind, b"", STATS_TIMEOUT))
            except Exception as exc:
                log.debug("worker_stats_unavailable", extra={"peer": node, "error": str(exc)})
        return out

    def sys_totals(self, values: dict[str, str]) -> dict[str, str]:
        """This worker's $SYS figures turned into the node's: summed over the workers that answer."""
        totals = dict(values)
        others = self.gather()
        for figures in others.values():
            for key, text in figures.items():
                if key in NOT_SUMMED:
                    continue
                try:
                    totals[key] = str(int(totals.get(key, "0")) + int(text))
                except ValueError:
                    continue
        totals["worker"] = self.node_id  # the worker this client is connected to (tests, operators)
        totals["worker/pid"] = str(os.getpid())
        totals["workers"] = str(self.context.count)
        totals["workers/answering"] = str(1 + len(others))
        return totals
