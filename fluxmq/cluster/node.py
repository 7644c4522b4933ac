"""ClusterNode: everything of the cluster on one node, built by the node service when ``cluster.enabled``.

It owns the gRPC transport and ``ClusterPeers`` (the data plane) and, unless the node runs with
static peers only, the ``MetadataPlane`` in etcd, and wires them together:

* **Peers.** With etcd, the transport's peers follow etcd membership (``plane.attach_transport``);
  with static ``cluster.transport.peers`` and no etcd configured they are that list.
* **Sessions.** ``ClusterPeers.claim_session`` / ``release_session`` go through
  ``ClusterSessions`` (compare-and-swap ownership in etcd, the ``session.takeover`` call to the
  previous owner); this node answers takeovers (``handover.serve_handover``). Persistent
  sessions restored from this node's store are kept only when this node can own them in etcd: a
  session another live node owns now was taken over while this node was down, and the copy here is
  stale (dropped).
* **Wills.** ``Broker.shared_wills`` records a pending will in etcd (``WillRegistry``); the broker
  claims it back before publishing, and the leader publishes the wills of dead nodes, so a will is
  published once cluster-wide.
* **Retained.** Other nodes' retained messages are applied here; payloads over the hybrid threshold
  are fetched with the ``retained.fetch`` call (``attach_transport``).
* **Shutdown.** ``drain`` keeps answering takeovers while the clients of this node move elsewhere,
  hands the other sessions out, and stays up while their stand-ins still forward what reached this
  node for them; then ``stop`` releases what is left and revokes the lease.

When etcd is used: ``cluster.etcd.endpoints`` or ``initial_cluster`` set, or no static peers at all
(``uses_etcd``). Static peers without etcd own nothing cluster-wide (each node's sessions are its
own) and share no retained messages or wills.
"""

from __future__ import annotations

import itertools
import logging
import os
import time

import gevent
from gevent.event import Event

from fluxmq.errors import ClusterError

from .config import ClusterSettings

log = logging.getLogger("fluxmq.cluster")

#: control call asking a peer to take one of our sessions over (we are stopping); payload the client id
ADOPT_KIND = "session.adopt"
#: sessions handed to peers at once during a drain
ADOPT_CONCURRENCY = 4
#: longest a starting node waits for the peers' interest before its listeners accept clients, and
#: the wills a restart found due before they are published (seconds)
PEER_INTEREST_WAIT = 5.0

#: TEST-ONLY environment variable: seconds each batch of messages from a peer waits before it is
#: applied here (``delayed_apply``). It widens, in the e2e tests, the window in which what a peer
#: forwarded is still on its way (a stopping node exporting a session meanwhile); never set it in
#: production. Not a ``FLUXMQ_`` variable: those are configuration keys.
APPLY_DELAY_ENV = "FLUXMQTEST_PEER_APPLY_DELAY"

#: TEST-ONLY environment variable: every Nth takeover this node asks for that hands a session over
#: loses its answer on the way back (``losing_takeover_replies``): the owner exported the session,
#: this node's claim fails (CONNACK 0x88) and the client retries, as after a takeover call that
#: timed out on a loaded host. Never set it in production.
LOSE_TAKEOVER_REPLY_ENV = "FLUXMQTEST_LOSE_TAKEOVER_REPLY_EVERY"
#: TEST-ONLY environment variable: every Nth answer to a take-back of this node that carries the
#: messages a failed claim kept (``KEPT_MOVED_REPLY``) is lost the same way. Never in production.
LOSE_TAKE_BACK_ANSWER_ENV = "FLUXMQTEST_LOSE_TAKE_BACK_ANSWER_EVERY"
#: TEST-ONLY environment variable: seconds a starting node waits before it places its durable
#: queues (``place_queues``), as a slow etcd would make it wait; its peers' links reach it meanwhile.
#: Never set it in production.
PLACE_QUEUES_DELAY_ENV = "FLUXMQTEST_PLACE_QUEUES_DELAY"

_grpc_ready = False


def init_grpc_for_gevent() -> None:
    """Make grpcio cooperate with gevent (once per process, before any grpc object is made; the
    process is monkey-patched already: the node's worker is)."""
    global _grpc_ready
    if not _grpc_ready:
        from grpc.experimental import gevent as grpc_gevent

        grpc_gevent.init_gevent()
        _grpc_ready = True


def uses_etcd(config) -> bool:
    """True when the node runs the metadata plane: etcd is configured (external endpoints or an
    initial cluster), or there are no static peers to go by."""
    c = config.cluster
    return bool(c.etcd.endpoints or c.etcd.initial_cluster or not c.transport.peers)


def losing_takeover_replies(call, environ=os.environ):
    """The transport's ``call``, or, with ``LOSE_TAKEOVER_REPLY_ENV`` set (tests only), ``call``
    raising instead of returning every Nth state a takeover brings back; with
    ``LOSE_TAKE_BACK_ANSWER_ENV``, every Nth answer that brings back messages alone."""
    every = int(environ.get(LOSE_TAKEOVER_REPLY_ENV) or 0)
    every_back = int(environ.get(LOSE_TAKE_BACK_ANSWER_ENV) or 0)
    if every <= 0 and every_back <= 0:
        return call
    from .handover import KEPT_MOVED_REPLY, TAKEOVER_KIND, decode_session_state

    log.warning(
        "takeover_replies_lost",
        extra={"every": every, "every_back": every_back, "reason": "FLUXMQTEST_LOSE_* (tests only)"},
    )
    states, backs = itertools.count(1), itertools.count(1)

    def call_losing(node: str, kind: str, payload: bytes, timeout: float) -> bytes:
        reply = call(node, kind, payload, timeout)
        if kind != TAKEOVER_KIND or not reply:
            return reply
        if bytes(reply[:4]) != KEPT_MOVED_REPLY:  # (no state: what a failed claim kept)
            if every > 0 and next(states) % every == 0:
                raise ConnectionError(f"the takeover's reply from {node} dropped ({LOSE_TAKEOVER_REPLY_ENV})")
        elif every_back > 0 and decode_session_state(bytes(reply[4:])).queued:
            if next(backs) % every_back == 0:
                log.warning("take_back_answer_dropped", extra={"node": node})
                raise ConnectionError(
                    f"the take-back's answer from {node} dropped ({LOSE_TAKE_BACK_ANSWER_ENV})"
                )
        return reply

    return call_losing


def delayed_apply(receive, environ=os.environ):
    """``receive`` (the transport's ``on_batch``), or, with ``APPLY_DELAY_ENV`` set (tests only),
    ``receive`` behind a sleep of that many seconds for each batch that carries messages (in the
    stream's greenlet: its later batches and its acks wait too, as behind a slow node)."""
    delay = float(environ.get(APPLY_DELAY_ENV) or 0)
    if delay <= 0:
        return receive
    log.warning("peer_apply_delayed", extra={"seconds": delay, "reason": f"{APPLY_DELAY_ENV} (tests only)"})

    def receive_later(batch):
        if batch.count:
            gevent.sleep(delay)
        return receive(batch)

    return receive_later


class SharedWillsHook:
    """``fluxmq.broker.peers.SharedWills`` over the metadata plane's ``WillRegistry``: never raises
    (etcd trouble is logged; a will that cannot be claimed is published, at least once rather than
    lost), and never blocks the hub (a call made there runs in a greenlet of its own)."""

    def __init__(self, registry) -> None:
        self.registry = registry

    def will_set(self, client_id: str, message, delay: float) -> None:
        if gevent.getcurrent() is gevent.get_hub():
            gevent.spawn(self._set, client_id, message, delay)
        else:
            self._set(client_id, message, delay)

    def _set(self, client_id: str, message, delay: float) -> None:
        try:
            if message is None:
                self.registry.cancel(client_id)
            else:
                self.registry.put(client_id, message, delay)
        except Exception as exc:
            log.warning("will_record_failed", extra={"client_id": client_id, "error": str(exc)})

    def will_claim(self, client_id: str) -> bool:
        if gevent.getcurrent() is gevent.get_hub():
            return True  # cannot wait here; the broker's hub-side paths do not publish wills
        try:
            return self.registry.claim(client_id)
        except Exception as exc:
            log.warning(
                "will_claim_failed",
                extra={
                    "client_id": client_id,
                    "error": str(exc),
                    "effect": "published (etcd did not answer)",
                },
            )
            return True


class StaticHealth:
    """The ``cluster`` check and ``/cluster/status`` of a node with static peers and no etcd."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node

    def check(self) -> tuple[bool, str]:
        states = self.node.transport.peer_state()
        if not states:
            return True, ""
        up = sum(1 for s in states.values() if s.get("reachable"))
        return True, "" if up == len(states) else f"{up}/{len(states)} peers reachable"

    def status(self, sessions: int) -> dict:
        node = self.node
        members = [
            {
                "node_id": node.node_id,
                "addr": node.settings.transport.bind_addr,
                "self": True,
                "live": True,
                "reachable": True,
                "leader": False,
            }
        ]
        for peer, state in sorted(node.transport.peer_state().items()):
            members.append(
                {
                    "node_id": peer,
                    "addr": node.transport.links[peer].addr if peer in node.transport.links else "",
                    "self": False,
                    "live": bool(state.get("reachable")),
                    "reachable": bool(state.get("reachable")),
                    "leader": False,
                }
            )
        return {
            "node_id": node.node_id,
            "is_leader": False,
            "cluster_mode": True,
            "sessions": sessions,
            "members": members,
        }


class ClusterNode:
    """The transport, the peers, the metadata plane (etcd) and their wiring to one broker."""

    def __init__(
        self,
        settings: ClusterSettings,
        broker,
        config=None,
        announce: dict[str, str] | None = None,
        worker=None,
    ) -> None:
        """``worker`` (``fluxmq.cluster.workers.WorkerMember``): this process is one of the node's
        workers, a member of the cluster of its own (``n1/w0``) that reaches the node's other workers
        over Unix sockets (docs/cluster.rst, "Several workers on a cluster node")."""
        init_grpc_for_gevent()
        from .handover import ClusterSessions, serve_handover
        from .peers import ClusterPeers
        from .transport import ClusterTransport

        transport_class = ClusterTransport
        extra: dict = {}
        if worker is not None:
            import dataclasses

            from .unix import NodeWorkersTransport

            settings = dataclasses.replace(
                settings,
                node_id=worker.member_id,
                transport=dataclasses.replace(settings.transport, bind_addr=worker.grpc_addr),
            )
            transport_class = NodeWorkersTransport
            extra = {
                "unix_addr": worker.unix_addr,
                "local_peers": worker.local_peers,
                "local_batch_max_size": worker.batch_max_size,
            }
        self.settings = settings
        self.node_id = settings.node_id
        self.broker = broker
        # The incarnation: a restarted node's sequence ids start again under a new epoch.
        self.epoch = time.time_ns()
        t = settings.transport
        self.peers = ClusterPeers(
            settings.node_id,
            broker,
            None,
            broker.settings.shared_subscription_strategy,
            t.interest_sync_timeout,
        )
        self.transport = transport_class(
            settings.node_id,
            self.epoch,
            t,
            delayed_apply(self.peers.receive),
            broker.interest_filters,
            on_ack=self.peers.on_ack,
            on_peer_removed=self.peers.peer_removed,
            **extra,
        )
        self.peers.transport = self.transport
        serve_handover(self.transport, broker, self.peers)
        self.transport.handle(ADOPT_KIND, self._adopt)
        self.draining = False
        self.adopted_out = 0
        self._stopping_peers: set[str] = set()  # peers that refused an adoption because they stop too
        self.plane = None
        self.health = StaticHealth(self)
        self.stale_sessions_dropped = 0
        self.topics = None  # ClusterTopics: $SYS/broker/cluster/*
        if config is not None and uses_etcd(config):
            from .metadata.plane import MetadataPlane

            self.plane = MetadataPlane.from_config(
                config, broker, worker=worker, publish=broker.publish_will_message, announce=announce
            )
            self.plane.attach_transport(self.transport)
            self.peers.sessions = ClusterSessions(
                self.plane.meta,
                losing_takeover_replies(self.transport.call),
                drain=self.transport.drain,
                markers=self.peers.markers,
                max_kept_moved=broker.moved_max_queued,
            )
            self.health = self.plane.health
        # Durable queues across nodes (fluxmq.cluster.queue_nodes): a node of one worker reaches
        # the queues of the others as the workers of one node do (a worker's WorkerNode has its own).
        self.queues = None
        self._placed = None
        if self.plane is not None:
            if worker is None:  # (a worker's WorkerNode has its own, placed by its ``start``)
                from .queues import RemoteQueues

                node_id = self.node_id
                self.queues = RemoteQueues(
                    broker, self.transport, node_id, self.epoch, lambda _index: node_id
                )
            # Its peers' batches (other nodes', and its node's other workers') wait until it knows
            # which queues it owns (``start``): the capture of a configured queue it starts with
            # would take what a peer kept for it while it was away (a killed node or worker keeps
            # its links), though another node owns the queue now and captured it already; that
            # copy would move there with the stranded records, a second one.
            self._placed = Event()
            self._receive = self.transport.on_batch
            self.transport.on_batch = self._after_placement(self._receive)
        self._started = False

    @classmethod
    def from_config(cls, config, broker, announce: dict[str, str] | None = None, worker=None) -> ClusterNode:
        """From a loaded Config; ConfigError (one line) when the cluster settings cannot work.
        ``announce``: more addresses this node's etcd registration carries (its Raft address);
        ``worker``: this process is one of the node's workers (``__init__``)."""
        from .config import cluster_settings
        from .metadata.config import cluster_config_problems

        settings = cluster_settings(config)
        if uses_etcd(config):
            problems = cluster_config_problems(config)
            if problems:
                raise problems[0]
        return cls(settings, broker, config, announce, worker)

    def start(self, place=None) -> None:
        """Transport, then etcd (membership, ownership of the restored sessions, wills held back by
        the restore), then the durable queues are placed (``place(meta)`` on a worker: its
        ``WorkerNode``'s; the peers' batches wait until then), then the peers go into the broker.
        ClusterError (one line) when etcd does not answer or the node id is live already."""
        self.transport.start()
        plane = self.plane
        try:
            if plane is not None:
                if self.settings.transport.peers:
                    log.warning(
                        "static_peers_ignored",
                        extra={"reason": "etcd is configured: the peers are its members"},
                    )
                plane.start()
                plane.meta.on_sessions_lost = self._sessions_lost
                self._own_restored_sessions()
                if self._placed is not None:
                    delay = float(os.environ.get(PLACE_QUEUES_DELAY_ENV) or 0)
                    if delay > 0:
                        log.warning(
                            "queue_placement_delayed",
                            extra={"seconds": delay, "reason": f"{PLACE_QUEUES_DELAY_ENV} (tests only)"},
                        )
                        gevent.sleep(delay)
                    if self.queues is not None:
                        self.place_queues(self.queues)
                    elif place is not None:
                        place(plane.meta)
                    self._placed.set()
                    self.transport.on_batch = self._receive  # (the streams from now on: no wait)
                self.broker.shared_wills = SharedWillsHook(plane.wills)
            else:
                log.warning(
                    "cluster_without_etcd",
                    extra={
                        "peers": ",".join(sorted(self.settings.transport.peers)) or "-",
                        "effect": "static peers: publishes are routed, but sessions, retained messages and wills "
                        "are not shared (set cluster.etcd.endpoints or initial_cluster for that)",
                    },
                )
                self.transport.set_peers(self.settings.transport.peers)
            self.broker.set_peers(self.peers)
            if self.broker.restored_wills:
                gevent.spawn(self._publish_restored_wills, PEER_INTEREST_WAIT)
            else:
                self.broker.hold_restored_wills = False
            from .status import ClusterTopics

            self.topics = ClusterTopics(self)
            if plane is not None:
                plane.meta.on_members(self.topics.changed)
            self.topics.start()
        except BaseException:
            if self._placed is not None:
                self._placed.set()  # (the held streams end with the transport)
            self.broker.shared_wills = None
            if plane is not None:
                plane.stop()
            self.transport.stop(0)
            raise
        self._started = True
        log.info(
            "cluster_node_started",
            extra={
                "node_id": self.node_id,
                "etcd": plane is not None,
                "peers": ",".join(sorted(self.transport.links)) or "-",
            },
        )

    def _after_placement(self, receive):
        """``receive`` (the transport's ``on_batch``) once ``start`` placed the queues; a stream's
        batches wait in its greenlet until then (unacknowledged: the peer keeps them)."""
        placed = self._placed

        def receive_placed(batch):
            if not placed.is_set():
                placed.wait()
            return receive(batch)

        return receive_placed

    def place_queues(self, queues) -> None:
        """``queues`` (a ``RemoteQueues``) places each durable queue on its owning node, recorded in
        etcd (``fluxmq.cluster.queue_nodes``), and moves the records of those owned elsewhere."""
        from .queue_nodes import QueueNodes

        queues.place_on_nodes(QueueNodes(self.plane.meta))
        queues.start()
        queues.move_stranded()

    def attach_queues(self, manager) -> None:
        """``manager`` (the node's QueueManager) reaches the queues other nodes own."""
        if self.queues is not None:
            self.queues.attach(manager)

    def queue_owners(self) -> dict[str, str]:
        """Every durable queue's owning node recorded in etcd (read again; the ones known here when
        etcd does not answer); {} without etcd."""
        meta = self.plane.meta if self.plane is not None else None
        registry = meta.queue_owners if meta is not None else None
        if registry is None:
            return {}
        try:
            return registry.load()
        except ClusterError as exc:
            log.warning("queue_owners_not_read", extra={"error": str(exc)})
            return dict(registry.owners)

    def reassign_queues(self, name: str = "", gone: str = "", to: str = "") -> dict:
        """An operator's change of owning node (``QueueOwners.reassign``): queue ``name``, or every
        queue of node ``gone``, goes to live node ``to`` (default: this one). Raises ClusterError
        (an ``OwnerChangeRefused`` with its HTTP ``status``) when it cannot be done."""
        meta = self.plane.meta if self.plane is not None else None
        registry = meta.queue_owners if meta is not None else None
        if registry is None:
            from .metadata.queue_owners import no_owners_here

            raise no_owners_here()
        to = to or registry.node
        if name:
            old, new = registry.reassign(name, to)
            return {"queue": name, "old_owner": old, "new_owner": new}
        return {"node": gone, "new_owner": to, **registry.reassign_node(gone, to)}

    def queue_state(self) -> dict[str, dict]:
        """Durable queues across nodes, per other node (``/metrics``): ``RemoteQueues.state``."""
        return self.queues.state() if self.queues is not None else {}

    def wait_interest(self) -> None:
        """Before the listeners accept: until every peer's interest arrived (bounded), so that a
        client's first publish here reaches the subscribers of every peer (a node or worker
        restarted while they run: a publish routed before their snapshot matched nothing there)."""
        self.peers.wait_snapshots(PEER_INTEREST_WAIT)

    def _publish_restored_wills(self, wait: float) -> None:
        """The wills the restore found due go once the peers told us their interest (bounded by
        ``wait``): published earlier they would reach only this node's subscribers."""
        self.peers.wait_snapshots(wait)
        try:
            published = self.broker.publish_restored_wills()
        except Exception:
            log.exception("restored_wills_failed")
            return
        log.info("restored_wills_published", extra={"published": published})

    def _own_restored_sessions(self) -> None:
        """Each session restored from this node's store is this node's again only if no other live
        node owns its client id now; one that does took it over while this node was down (or
        before its lease expired), so the copy here is stale and is dropped (its will too: the
        session lives on there)."""
        meta = self.plane.meta
        held = set(self.broker.interest_filters())  # the links opened with etcd's members announced these
        for client_id in list(self.broker.sessions):
            try:
                owner = meta.acquire_session(client_id)
            except Exception as exc:
                log.warning("restored_session_unowned", extra={"client_id": client_id, "error": str(exc)})
                continue
            if owner is not None and owner != self.node_id:
                self._drop_stale(client_id)
                log.warning(
                    "restored_session_dropped",
                    extra={"client_id": client_id, "owner": owner, "reason": "another node owns it now"},
                )
        for filter in held - set(self.broker.interest_filters()):
            self.transport.interest_changed(filter, False)  # the peers are not installed yet: tell the links

    def _sessions_lost(self, client_ids: list[str]) -> None:
        """Our lease was lost and other nodes took these sessions meanwhile: the copies here are stale."""
        for client_id in client_ids:
            self._drop_stale(client_id)

    def _drop_stale(self, client_id: str) -> None:
        """Drop this node's stale copy of a session another node owns, and its will record in etcd
        (its client lives on elsewhere: that will must never be published for this copy)."""
        self.broker.drop_session(client_id)
        self.stale_sessions_dropped += 1
        try:
            self.plane.wills.cancel(client_id)
        except Exception as exc:
            log.warning("stale_will_not_cancelled", extra={"client_id": client_id, "error": str(exc)})

    def _adopt(self, from_node: str, payload: bytes) -> bytes:
        """``session.adopt``: a stopping peer asks this node to take one of its sessions over."""
        from fluxmq.errors import ServerUnavailable

        if self.draining or not self._started:
            raise ServerUnavailable(f"node {self.node_id} is stopping")
        client_id = bytes(payload).decode()
        adopted = self.broker.adopt_session(client_id, from_node)
        log.info(
            "session_adopted", extra={"client_id": client_id, "from_node": from_node, "adopted": adopted}
        )
        return b"1" if adopted else b""

    def _hand_out(self, deadline: float, client_ids: list[str]) -> None:
        """Ask the reachable peers (round robin, a few at once) to take these sessions over, so a
        client that comes back later finds its session on a live node. The other nodes are asked
        before the other workers of this node (they stop with it, as a rule)."""
        from gevent.pool import Pool

        mine = self.node_id.partition("/")[0] + "/" if "/" in self.node_id else None
        peers = sorted(self.transport.reachable(), key=lambda n: (mine is not None and n.startswith(mine), n))
        if not peers:
            return
        pool = Pool(ADOPT_CONCURRENCY)

        def hand(i: int, client_id: str) -> None:
            for attempt in range(len(peers)):
                if client_id not in self.broker.sessions or time.monotonic() >= deadline:
                    return  # moved meanwhile (its client reconnected elsewhere), or out of time
                peer = peers[(i + attempt) % len(peers)]
                try:
                    self.transport.call(
                        peer, ADOPT_KIND, client_id.encode(), max(0.1, min(5.0, deadline - time.monotonic()))
                    )
                except Exception as exc:
                    if "is stopping" in str(exc):
                        self._stopping_peers.add(peer)
                    log.info(
                        "session_adopt_refused",
                        extra={"client_id": client_id, "peer": peer, "error": str(exc)},
                    )
                    continue
                self.adopted_out += 1
                return

        for i, client_id in enumerate(client_ids):
            if time.monotonic() >= deadline:
                break
            pool.spawn(hand, i, client_id)
        pool.join(timeout=max(0.0, deadline - time.monotonic()))
        pool.kill(block=False)

    def drain(self, timeout: float) -> int:
        """After the broker closed its connections (SIGTERM): keep answering takeovers and hand the
        sessions still here to the other nodes, until none is left or ``timeout`` passes, so their
        clients find them on a live node whenever they come back; then, within the same
        ``timeout``, stay up while the stand-ins of the sessions that left still forward to a
        reachable node what reached this one for them. Returns the sessions left (released by
        ``stop``; their state stays in this node's store)."""
        self.draining = True  # a stopping node adopts nothing (two stopping nodes would swap)
        if self.plane is None or timeout <= 0 or not self.transport.reachable():
            return len(self.broker.sessions)
        deadline = time.monotonic() + timeout
        tried: set[str] = set()
        # Ends early when every session moved, or when no peer that is not stopping itself answers
        # (the whole cluster is stopping: nobody is left to take them). A session that arrived
        # meanwhile (an adoption this node had begun before it stopped: the workers of one node
        # stop together) is handed out in turn.
        while (
            self.broker.sessions
            and time.monotonic() < deadline
            and set(self.transport.reachable()) - self._stopping_peers
        ):
            new = [client_id for client_id in self.broker.sessions if client_id not in tried]
            if new:
                tried.update(new)
                self._hand_out(deadline, new)
            else:
                gevent.sleep(0.05)
        # The sessions exported from here (handed out above, or taken by their clients reconnecting
        # elsewhere) left stand-ins that forward to their new node what still reaches this one for
        # them: what a peer forwarded here before it knew the new owner (a batch on its way, or
        # applied late on a loaded machine). This node stays up (its links and stand-ins working)
        # until they ended (every node's marker arrived, or their grace) or forward only to nodes
        # that are gone, within the same deadline: stopped before, those messages are lost.
        forwarding = self._forwarding()
        while forwarding and time.monotonic() < deadline:
            gevent.sleep(0.05)
            forwarding = self._forwarding()
        left = len(self.broker.sessions)
        log.info("cluster_drained", extra={"sessions_left": left, "still_forwarding_to": len(forwarding)})
        return left

    def _forwarding(self) -> set[str]:
        """The reachable nodes that stand-ins of sessions exported from here still forward to."""
        moved_forwarding = getattr(self.broker, "moved_forwarding", None)
        if moved_forwarding is None:
            return set()
        return moved_forwarding() & set(self.transport.reachable())

    def stop(self, timeout: float = 1.0) -> None:
        """Stop forwarding (what is queued gets ``timeout`` to reach reachable peers), release the
        sessions still here and revoke the lease, close the links."""
        if not self._started:
            return
        self._started = False
        if self.queues is not None:
            self.queues.stop()
        if self.topics is not None:
            self.topics.stop()
        broker = self.broker
        if self.plane is not None:
            broker.release_sessions()
            broker.shared_wills = None
        if broker.peers is self.peers:
            broker.set_peers(None)
        deadline = time.monotonic() + timeout
        if self.plane is not None:
            self.plane.stop()  # the lease goes: every key of this node at once
        self.transport.stop(max(0.0, deadline - time.monotonic()))
        log.info("cluster_node_stopped", extra={"node_id": self.node_id})

    def peer_state(self) -> dict[str, dict]:
        return self.transport.peer_state()

    def received(self) -> dict[str, int]:
        """What the peers sent here: batches and messages applied, retried batches skipped,
        damaged batches, messages whose delivery here raised."""
        p = self.peers
        return {
            "batches": p.received_batches,
            "messages": p.received_messages,
            "duplicates": p.duplicate_batches,
            "bad": p.bad_batches,
            "failed": p.failed_messages,
        }

    def figures(self) -> dict[str, int]:
        """Cluster-wide duties of this node for /metrics: leadership, sessions handed to peers at a
        stop, stale restored sessions dropped, wills of dead nodes published (as leader), will
        claims lost (published elsewhere), states kept from failed claims (``ClusterSessions.kept``)
        and those dropped unused, and the retained replica's counts (``RetainedReplica.figures``)."""
        plane = self.plane
        wills = plane.wills if plane is not None else None
        retained = plane.retained if plane is not None else None
        sessions = self.peers.sessions
        return {
            **(retained.figures() if retained is not None else {}),
            "kept_states": sessions.kept_states() if sessions is not None else 0,
            "kept_dropped": sessions.kept_dropped if sessions is not None else 0,
            "leader": int(plane is not None and plane.meta.is_leader),
            "adopted_out": self.adopted_out,
            "stale_dropped": self.stale_sessions_dropped,
            "wills_for_dead": wills.published if wills is not None else 0,
            "will_claims_lost": wills.lost_races if wills is not None else 0,
        }

    def readiness(self) -> tuple[bool, str]:
        """(up, details) for /ready: the ``cluster`` check (etcd and peer reachability)."""
        return self.health.check()
