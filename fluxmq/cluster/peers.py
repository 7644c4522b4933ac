"""ClusterPeers: the broker's ``Peers`` for a cluster of nodes (the data plane's routing decisions).

* **Interest out.** ``interest_added`` / ``interest_removed`` (the broker calls them when its first
  subscription with a filter appears and its last one goes) go to every peer over its ordered
  stream. A filter new to this node waits (bounded by ``interest_sync_timeout``) until every
  reachable peer has applied it, so a subscriber whose SUBACK has been sent receives what is
  published afterwards on any reachable node.
* **Forwarding.** ``forward`` matches the topic against each peer's interest (``RemoteInterest``)
  and queues the message once per node with a matching filter. Shared groups are decided here,
  cluster-wide: for each ``$share/{group}/{filter}`` with members on several nodes, the publishing
  node picks one node (``broker.shared_subscription_strategy`` over the nodes, preferring those with
  an online, non-full member); the chosen node then picks its local member. So each message of a
  group is delivered once in the cluster, not once per node.
* **The C relay.** A plain PUBLISH (``fluxmq._core.relay``: QoS 0/1, no properties, not retained,
  no shared groups here or on a peer) is forwarded by the relay itself, with what ``forward``
  would do for it: ``relay_route(topic)`` (cached in ``relay_routes``, emptied on every interest
  change) names the peers with matching interest, and the relay appends the message to each one's
  link queue (``PeerLink.forward_queue``). Anything else comes through ``forward``.
* **Receiving.** ``apply_batch`` applies a peer's batch: its interest changes, then each message
  through ``Broker.publish_from_peer`` (delivered locally, never forwarded again); the plain ones
  go through the relay's fan-out (``Broker.publish_relayed_from_peer``), the others are decoded. A batch whose
  sequence id was applied already (a retry after a broken stream) is acknowledged and skipped; a
  batch that stored anything is recorded in the same commit (``Broker.peer_batch_applied``), so
  its retry after this node's kill and restart is skipped too. The stream's ack of such a batch
  (``receive``) leaves only after that commit (the turn's group commit), so no acknowledged batch
  is lost to a kill before it; the stream applies the next batches meanwhile (pipelined, the
  acks sent in order, each once its own commit is done). A message whose delivery raises
  (either path) is skipped alone, logged and counted (``failed_messages``); only a damaged batch
  (``BatchError``) loses the rest of it.

QoS across nodes: the publisher's PUBACK (PUBREC) means what it means on one node (routed, and
stored for local persistent sessions) plus *queued for every peer with matching interest*; it does
not wait for the peers (docs/cluster.rst).
"""

from __future__ import annotations

import logging
import random
import time

import gevent

from fluxmq.errors import ForwardedItemFailed, StorageError
from fluxmq.storage.records import encode_message

from .batch import MARKER_GROUP, BatchError, FramedBatch, Outgoing, ack_message, decode_item
from .interest import RemoteInterest
from .markers import MoveMarkers
from .proto import cluster_pb2 as pb

log = logging.getLogger("fluxmq.cluster.peers")

#: how long a node that reported a shared group busy (no online non-full member) is passed over
BUSY_FOR = 1.0


def group_key(group) -> str:
    return f"$share/{group.name}/{group.filter}"


def group_ready(group) -> bool:
    """True when the local group has an online member that is not congested (Router.pick_member's
    first choice)."""
    for m in group.members.values():
        d = m.session.delivery
        if (
            d is not None
            and not d.closed
            and not d.is_congested()
            and len(m.session.inflight) < m.session.send_quota
        ):
            return True
    return False


class PendingAck:
    """The ack of a peer's batch that stored something, to be sent once the commit holding it is
    done (``get``)."""

    __slots__ = ("ack", "done")

    #: how long a commit may take before the stream gives up on it (as ``Broker.wait_committed``)
    TIMEOUT = 30.0

    def __init__(self, ack: int | pb.BatchAck, done) -> None:
        self.ack = ack
        self.done = done  # AsyncResult: None once committed, else the commit's error

    def get(self) -> int | pb.BatchAck:
        """The ack once its commit is done; raises StorageError when that commit failed or did not
        finish within TIMEOUT (the stream ends without it, the sender sends the batch again)."""
        try:
            error = self.done.get(timeout=self.TIMEOUT)
        except gevent.Timeout:
            raise StorageError(f"the commit did not finish within {self.TIMEOUT}s") from None
        if error is not None:
            raise StorageError(f"the commit failed: {error}") from None
        return self.ack


class ClusterPeers:
    """Implements ``fluxmq.broker.peers.Peers`` over a ``ClusterTransport``."""

    def __init__(
        self,
        node_id: str,
        broker,
        transport,
        strategy: str = "round_robin",
        interest_sync_timeout: float = 2.0,
    ) -> None:
        self.node_id = node_id
        self.broker = broker
        self.transport = transport
        self.strategy = strategy
        self.interest_sync_timeout = interest_sync_timeout
        self.remote = RemoteInterest()
        #: topic -> ids of the peers a plain message to it goes to (None: ``forward`` decides); the C
        #: relay reads it on every read it serves, and calls ``relay_route`` for a topic it lacks
        #: (an attribute, not a property: ``remote.plain_routes`` itself, emptied in place; the
        #: relay reads it once per peers object, so it is never replaced).
        self.relay_routes: dict = self.remote.plain_routes
        # sender -> (epoch, last applied seq); from the store at a restart (Broker.peer_batch_applied)
        self._applied: dict[str, tuple[int, int]] = dict(broker.restored_peer_batches)
        self._cursors: dict[str, int] = {}
        self._busy: dict[tuple[str, str], float] = {}  # (node, group key) -> until (monotonic)
        self._rng = random.Random()
        self.snapshots_from: set[str] = set()  # peers whose interest snapshot arrived (since start)
        self.received_batches = 0
        self.received_messages = 0
        self.duplicate_batches = 0
        self.bad_batches = 0
        self.failed_messages = 0  # forwarded messages whose local delivery raised (each logged)
        self.markers = MoveMarkers(self)  # a moving session's markers (fluxmq.cluster.markers)

    #: the peer whose batch is being applied (the origin of the deliveries in progress), else None
    applying: str | None = None

    # -- Peers: interest -------------------------------------------------------------------------

    def interest_added(self, filter: str) -> None:
        pending = self.transport.interest_changed(filter, True)
        timeout = self.interest_sync_timeout
        if pending and timeout > 0 and gevent.getcurrent() is not gevent.get_hub():
            if not self.transport.wait_interest(pending, timeout):
                log.warning("interest_sync_timeout", extra={"filter": filter, "timeout": timeout})

    def interest_removed(self, filter: str) -> None:
        self.transport.interest_changed(filter, False)

    # -- Peers: forwarding ---------------------------------------------------------------------

    @property
    def relay_links(self) -> dict:
        """node id -> its link (``PeerLink``, whose ``forward_queue`` the relay appends to); the
        relay reads it only for a topic that goes to a peer, once per peers object: it must stay
        the same dict (the transport's, changed in place)."""
        return self.transport.links

    @property
    def relay_links_version(self):
        """The transport's ``links_version`` (a ``LinksVersion``, bumped in place whenever its links
        change), or None: the relay then finds a route's queues on every read."""
        return getattr(self.transport, "links_version", None)

    def relay_route(self, topic: str) -> tuple[str, ...] | None:
        """What ``forward`` does with a plain message to ``topic``: the peers it is queued for, or
        None when only ``forward`` can decide (a ``$`` topic, shared groups on a peer)."""
        if topic.startswith("$"):
            return None
        return self.remote.plain(topic)

    def matches(self, topic: str) -> bool:
        if topic.startswith("$SYS"):
            return False
        nodes, remote_groups = self.remote.match(topic)
        return bool(nodes or remote_groups)

    def forward(self, message, groups: list) -> list:
        topic = message.topic
        if topic.startswith("$SYS"):
            return groups  # every node has its own $SYS tree
        nodes, remote_groups = self.remote.match(topic)
        if not nodes and not remote_groups:
            return groups
        links = self.transport.links
        assigned: dict[str, list[str]] = {}
        local = groups
        if remote_groups:
            local_by_key = {group_key(g): g for g in groups}
            local = [g for key, g in local_by_key.items() if key not in remote_groups]
            for key, holders in remote_groups.items():
                mine = local_by_key.get(key)
                node = self._pick_node(key, [n for n in holders if n in links], mine)
                if node is None:
                    if mine is not None:
                        local.append(mine)
                else:
                    assigned.setdefault(node, []).append(key)
        blob = encode_message(message)
        expires_at = message.expires_at
        for node in nodes:
            link = links.get(node)
            if link is not None:
                link.enqueue(Outgoing(blob, tuple(assigned.pop(node, ())), True, expires_at))
        for node, keys in assigned.items():
            links[node].enqueue(Outgoing(blob, tuple(keys), False, expires_at))
        return local

    def _pick_node(self, key: str, remote: list[str], mine) -> str | None:
        """The node that serves one message of shared group ``key``: None = this node."""
        if not remote:
            return None
        links = self.transport.links
        now = time.monotonic()
        busy = self._busy
        ready = [n for n in remote if links[n].connected and busy.get((n, key), 0.0) <= now]
        if mine is not None and group_ready(mine):
            ready.append(None)
        pool = ready
        if not pool:
            reachable = [n for n in remote if links[n].connected]
            pool = ([None] if mine is not None else []) + reachable
        if not pool:
            pool = [None] if mine is not None else remote
        if len(pool) == 1:
            return pool[0]
        if self.strategy == "random":
            return self._rng.choice(pool)
        if self.strategy == "least_inflight" and None in ready:
            return None  # the local member's load is known; the peers' is not
        pool.sort(key=lambda n: n or "")
        cursor = self._cursors.get(key, -1) + 1
        self._cursors[key] = cursor % (1 << 30)
        return pool[cursor % len(pool)]

    def on_ack(self, node_id: str, ack: pb.BatchAck) -> None:
        until = time.monotonic() + BUSY_FOR
        for key in ack.busy_groups:
            self._busy[(node_id, key)] = until
        if len(self._busy) > 10000:
            now = time.monotonic()
            self._busy = {k: v for k, v in self._busy.items() if v > now}

    def peer_removed(self, node_id: str) -> None:
        """Our link to ``node_id`` closed (removed from the peers, or its address changed). Its
        interest is kept: it comes over *its* stream to us, which may still be up, and a peer that
        comes back replaces it with a snapshot; without a link nothing is forwarded to it anyway."""
        self._busy = {k: v for k, v in self._busy.items() if k[0] != node_id}

    # -- Peers: ownership ------------------------------------------------------------------------
    # ``sessions`` is a ``fluxmq.cluster.handover.ClusterSessions`` over etcd ownership and the
    # takeover call (ClusterNode sets it); with static peers and no etcd it is None and nothing is
    # owned cluster-wide (each node's sessions are its own, as on a single node).

    sessions = None

    def claim_session(
        self,
        client_id: str,
        clean_start: bool,
        only_from: str | None = None,
        handed_to: str | None = None,
        exported: bytes | None = None,
    ) -> bytes | None:
        sessions = self.sessions
        if sessions is None:
            return None
        return sessions.claim_session(client_id, clean_start, only_from, handed_to, exported)

    def release_session(self, client_id: str) -> None:
        sessions = self.sessions
        if sessions is not None:
            sessions.release_session(client_id)

    def keep_moved(self, client_id: str, queued: list) -> bool:
        """``ClusterSessions.keep_moved`` (False while there is no registry)."""
        sessions = self.sessions
        return sessions.keep_moved(client_id, queued) if sessions is not None else False

    def handed_over(self, client_id: str) -> None:
        """``ClusterSessions.handed_over`` (nothing while there is no registry)."""
        sessions = self.sessions
        if sessions is not None:
            sessions.handed_over(client_id)

    def take_kept(self, client_id: str, to_node: str | None = None) -> bytes | None:
        """``ClusterSessions.take_kept`` (None while there is no registry)."""
        sessions = self.sessions
        return sessions.take_kept(client_id, to_node) if sessions is not None else None

    def pass_back(self, blob: bytes) -> bytes | None:
        """``ClusterSessions.pass_back`` (None while there is no registry)."""
        sessions = self.sessions
        return sessions.pass_back(blob) if sessions is not None else None

    def moving_in(self, client_id: str):
        sessions = self.sessions
        return sessions.moving_in(client_id) if sessions is not None else None

    def moved_in(self, client_id: str) -> None:
        sessions = self.sessions
        if sessions is not None:
            sessions.moved_in(client_id)

    def move_discarded(self, client_id: str) -> None:
        sessions = self.sessions
        if sessions is not None:
            sessions.move_discarded(client_id)

    # -- receiving -----------------------------------------------------------------------------

    def receive(self, batch: pb.Batch) -> int | pb.BatchAck | PendingAck:
        """A peer's batch from its stream (the transport's ``on_batch``): applied at once; its ack
        is a ``PendingAck`` to be sent once what it stored is committed (the turn's commit,
        ``Broker.when_committed``: no commit of its own), so a kill before that commit cannot lose
        an acknowledged batch (the sender keeps it and sends it again). The stream reads and
        applies its next batches meanwhile (``transport._Servicer.Route`` sends the acks in order,
        each once its commit is done). A batch that stored nothing is acknowledged at once (after
        the acks before it). A retried batch skipped as applied waits for what is pending too (its
        first copy may be in it). Runs in the stream's greenlet, never in the hub."""
        ack, stored = self._apply(batch)
        if stored:
            done = self.broker.when_committed()
            if done is not None and not done.ready():  # (ready at once: nothing was pending)
                return PendingAck(ack, done)
        return ack

    def wait_snapshots(self, timeout: float) -> bool:
        """Until every peer's link is connected and its interest snapshot arrived here (bounded by
        ``timeout``); False (logged, naming them) when the bound passed first. What this node routes
        before then misses the subscribers of the peers whose snapshot it lacks."""
        deadline = time.monotonic() + timeout
        while True:
            links = self.transport.links
            missing = [n for n, link in links.items() if not link.connected or n not in self.snapshots_from]
            if not missing:
                return True
            if time.monotonic() >= deadline:
                log.warning(
                    "peer_interest_not_known", extra={"peers": ",".join(sorted(missing)), "waited": timeout}
                )
                return False
            gevent.sleep(0.05)

    def apply_batch(self, batch: pb.Batch) -> pb.BatchAck:
        """Apply one batch from a peer (interest, then messages); idempotent per sequence id. The
        ack is returned at once (``receive`` waits for the commit of what the batch stored)."""
        return ack_message(self._apply(batch)[0])

    def _apply(self, batch: pb.Batch) -> tuple[int | pb.BatchAck, bool]:
        """``apply_batch``'s work; also True when the ack must wait for the commit in progress."""
        sender = batch.sender
        last = self._applied.get(sender)
        if last is not None and last[0] == batch.epoch and batch.seq <= last[1]:
            self.duplicate_batches += 1
            return batch.seq, True
        remote = self.remote
        if batch.snapshot:
            remote.replace(sender, [c.filter for c in batch.interest if c.added])
            self.snapshots_from.add(sender)
            link = self.transport.links.get(sender) if self.transport is not None else None
            if link is not None:
                link.retry_now()  # the sender is up: our link to it need not wait out its backoff
        else:
            for change in batch.interest:
                if change.added:
                    remote.add(sender, change.filter)
                else:
                    remote.remove(sender, change.filter)
        busy: list[str] = []
        broker = self.broker
        n = 0
        items = batch.items  # (a FramedBatch's: the received frame, its items from items_start on)
        i, end = batch.items_start if type(batch) is FramedBatch else 0, len(items)
        now = time.monotonic()
        relayed = broker.publish_relayed_from_peer
        # the origin of the deliveries made while the batch is applied (a moved session's stand-in
        # and gate read it: ``fluxmq.cluster.markers``); no yield until it is cleared
        self.applying = sender
        try:
            while i < end:
                try:
                    i, k = relayed(items, i)  # the plain messages from i on, in C
                except ForwardedItemFailed as exc:
                    # one message's delivery raised: only it is skipped (logged, counted), as below
                    log.error(
                        "forwarded_publish_failed",
                        exc_info=exc.__cause__,
                        extra={"peer": sender, "seq": batch.seq, "at": exc.start},
                    )
                    self.failed_messages += 1
                    n += exc.delivered + 1
                    i = exc.end
                    continue
                except Exception:  # before any item (the relay's setup): nothing is known delivered
                    log.exception("forwarded_publish_failed", extra={"peer": sender, "at": i})
                    self.bad_batches += 1
                    break
                n += k
                if i >= end:
                    break
                message, groups, match_local, i = decode_item(items, i, now)
                n += 1
                if groups:
                    if groups[0] == MARKER_GROUP:  # a move's marker, applied in its place
                        n -= 1
                        self.markers.received_from(sender, message.payload)
                        continue
                    for g in broker.router.route(message.topic).groups:
                        key = group_key(g)
                        if key in groups and not group_ready(g):
                            busy.append(key)
                try:
                    broker.publish_from_peer(message, groups, match_local)
                except Exception:
                    log.exception("forwarded_publish_failed", extra={"peer": sender, "topic": message.topic})
                    self.failed_messages += 1
        except BatchError as exc:
            # Never crash the stream on bad input: the rest of this batch is lost (logged, counted).
            self.bad_batches += 1
            log.warning(
                "bad_forwarded_batch",
                extra={
                    "peer": sender,
                    "seq": batch.seq,
                    "error": str(exc),
                    "applied": n,
                    "count": batch.count,
                },
            )
        finally:
            self.applying = None
        self._applied[sender] = (batch.epoch, batch.seq)
        stored = broker.peer_batch_applied(sender, batch.epoch, batch.seq)
        self.received_batches += 1
        self.received_messages += n
        # (a plain ack is its sequence id: a BatchAck made per batch for the Unix transport, which
        # frames a plain ack without one, cost more than the rest of the ack; gRPC's Route makes it)
        return (pb.BatchAck(seq=batch.seq, busy_groups=busy) if busy else batch.seq), stored
