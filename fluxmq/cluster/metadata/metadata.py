"""ClusterMetadata: the metadata plane of one node (CLUSTER.md, "Metadata (C2 provides)").

Keys under ``prefix`` (default ``/fluxmq/``)::

    nodes/{node_id}            {"addr", "started_at", "pid", "host", "lease", "raft"?} under the node lease
    raft/members               the Raft group's initial members, agreed once     (raft_members.py)
    sessions/{client}/owner    node id                                         under the owner's lease
    election/leader            node id                                         under the leader's lease
    retained/{topic}           retained message or a reference to its owner    (replicated.py)
    retained_cleared/{topic}   when a retained topic was cleared, and by whom  (replicated.py)
    wills/{client}             pending will and its owner node                 (replicated.py)
    queues/{name}/owner        the node holding a durable queue (no lease; watched) (queue_owners.py)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import gevent

from fluxmq.errors import ClusterError

from .client import EtcdClient
from .config import EtcdSettings
from .election import LeaderElection
from .member import EtcdMember
from .membership import Membership, NodeLease
from .ownership import SessionOwnership
from .queue_owners import QueueOwners

__all__ = ["ClusterMetadata"]

log = logging.getLogger("fluxmq.cluster.metadata")

#: with several members: how often the node's own member is asked whether it answers, and how long
#: its answer may take (seconds)
MEMBER_PROBE = (1.0, 0.5)
#: answers in a row after which the calls that moved on to the other members come back to the
#: node's own: a member back from a hang may still think itself the leader for a moment, and its
#: lessor, whose clock jumped, then calls every lease expired ("etcd says the lease expired")
MEMBER_BACK = 5
#: how long a graceful stop waits for etcd's members to answer before its quorum writes (seconds)
QUORUM_PROBE_TIMEOUT = 1.0
#: while one of a graceful stop's writes waits, the quorum is probed again this often (seconds): the
#: nodes of a cluster stopped at the same moment take their members with them after the first probe
#: found them, and a write left without a quorum is abandoned instead of waited out
QUORUM_RECHECK = 0.3


class ClusterMetadata:
    """Membership, session ownership and leader election of this node, in etcd."""

    def __init__(
        self,
        etcd_config,
        node_id: str,
        transport_addr: str,
        prefix: str | None = None,
        state_dir: str | Path | None = None,
        announce: dict[str, str] | None = None,
        member_name: str | None = None,
    ) -> None:
        """``etcd_config``: EtcdSettings, a loaded Config or its ``cluster.etcd`` section; ``prefix``
        defaults to ``cluster.etcd.prefix``; ``state_dir`` (where the node records its last lease)
        defaults to the etcd data dir's parent (the node passes ``storage.path``); ``announce``: more
        addresses of this node its registration carries (``{"raft": host:port}``); ``member_name``: the
        supervised etcd member's name when it is not ``node_id`` (a worker ``n1/w0`` runs member ``n1``)."""
        if not node_id:
            raise ClusterError("cluster.node_id: required when cluster.enabled is true")
        self.settings = (
            etcd_config if isinstance(etcd_config, EtcdSettings) else EtcdSettings.from_config(etcd_config)
        )
        self.node_id = node_id
        self.transport_addr = transport_addr
        self.announce = dict(announce or {})
        prefix = prefix or self.settings.prefix
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        if state_dir is None:
            state_dir = Path(self.settings.data_dir).absolute().parent
        self.state_file = Path(state_dir) / f"cluster-node-{node_id.replace('/', '-')}.json"
        self.member_name = member_name or node_id
        self.member: EtcdMember | None = None
        self.client: EtcdClient | None = None
        self.lease: NodeLease | None = None
        self.membership: Membership | None = None
        self.ownership: SessionOwnership | None = None
        self.election: LeaderElection | None = None
        self.queue_owners: QueueOwners | None = None
        self.on_sessions_lost: Callable[[list[str]], None] | None = None
        self.member_down = ""  # why the node's own member does not answer ("" while it does)
        self._prober: gevent.Greenlet | None = None
        self._status = "not started"
        self._started = False

    # -- life cycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start (when configured) the local etcd member, connect, register under a renewed lease,
        watch the members and campaign. ClusterError with one line when etcd does not answer within
        ``cluster.etcd.start_timeout`` or the node id is already live."""
        s = self.settings
        try:
            if s.supervised:
                self.member = EtcdMember(s, self.member_name)
                self._status = "etcd member starting"
                self.member.start()
            self.client = EtcdClient(
                s.client_endpoints(), s.request_timeout, s.tls_ca_file, s.tls_cert_file, s.tls_key_file
            )
            self._wait_for_etcd(s.start_timeout)
            if s.sync_endpoints:
                # The node's own member down (its worker 0 restarting, the member killed or hung)
                # leaves the others with a quorum: reached through them, the node keeps its lease.
                try:
                    self.client.sync_endpoints()
                except ClusterError as exc:
                    log.warning("etcd_endpoints_not_synced", extra={"error": str(exc)})
                if len(self.client.endpoints) > 1:
                    self._prober = gevent.spawn(self._probe_member)
            self.lease = lease = NodeLease(self.client, s.lease_ttl)
            lease.grant()
            self.membership = Membership(
                self.client, self.prefix, self.node_id, self.transport_addr, self.state_file, self.announce
            )
            self.membership.register(lease.id)
            self.ownership = SessionOwnership(self.client, self.prefix, self.node_id, lambda: lease.id)
            # durable queues are owned by nodes, not workers: every worker claims for its node
            self.queue_owners = QueueOwners(self.client, self.prefix, self.member_name)
            self.queue_owners.start()  # read, then watched: a reassign reaches every node
            self.election = LeaderElection(
                self.client, self.prefix, self.node_id, lambda: lease.id, lambda: lease.alive
            )
            lease.on_lost = self._lease_lost
            lease.on_replaced = self._lease_replaced
            lease.start()
            self.membership.watch()
            self.election.start()
        except BaseException:
            self._teardown(revoke=True)
            raise
        self._started = True
        self._status = ""
        log.info(
            "cluster_metadata_started",
            extra={"node_id": self.node_id, "lease": lease.id, "endpoints": ",".join(self.client.endpoints)},
        )

    def _wait_for_etcd(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            try:
                self.client.post("maintenance/status", {}, timeout=min(2.0, self.settings.request_timeout))
                self.client.range(self.prefix + "nodes/", prefix=True, keys_only=True)  # a quorum read
                return
            except ClusterError as exc:
                last = str(exc)
            if time.monotonic() >= deadline:
                break
            gevent.sleep(0.2)  # a member that died meanwhile is restarted by its supervisor
        where = f"; member log {self.member.log_path}" if self.member is not None else ""
        raise ClusterError(f"etcd not ready within {timeout:g}s (cluster.etcd.start_timeout){where}: {last}")

    def stop(self) -> None:
        """Mark the registration "leaving", revoke the lease (every key this node owns goes at once)
        and stop the member. Both writes need a quorum of etcd members: when fewer answer (the last
        nodes of a cluster that is stopping, whose members already stopped) they are skipped, not
        waited out for their request timeouts; nobody is left to see them, and the lease expires
        once etcd runs again."""
        revoke = True
        if self._started and self.membership is not None and self.lease is not None and self.lease.alive:
            revoke = self._quorum_answers() and self._while_quorum(self.membership.leave)
        self._teardown(revoke=revoke)
        self._started = False
        self._status = "stopped"

    def _quorum_answers(self) -> bool:
        try:
            answering, members = self.client.members_answering(QUORUM_PROBE_TIMEOUT)
        except ClusterError as exc:
            log.warning("etcd_quorum_gone", extra={"error": str(exc), "skipped": "leave,lease_revoke"})
            return False
        if members and answering <= members // 2:
            log.warning(
                "etcd_quorum_gone",
                extra={"answering": answering, "members": members, "skipped": "leave,lease_revoke"},
            )
            return False
        return True

    def _while_quorum(self, write: Callable[[], object]) -> bool:
        """Run ``write`` (one of the stop's etcd writes) while a quorum answers: True once it
        returned; False when a probe (every ``QUORUM_RECHECK`` seconds) finds the quorum gone first,
        the write then abandoned (the other nodes stop at the same moment, with their members)."""
        writing = gevent.spawn(write)
        while not writing.ready():
            writing.join(QUORUM_RECHECK)
            if not writing.ready() and not self._quorum_answers():
                writing.kill(block=False)
                return False
        return True

    def _probe_member(self) -> None:
        """Whether the node's own member answers (``member_down``, the ``cluster`` check's detail);
        once it has answered MEMBER_BACK times in a row the calls come back to it."""
        every, timeout = MEMBER_PROBE
        in_a_row = 0
        while True:
            gevent.sleep(every)
            answers = self.client.first_answers(timeout)
            in_a_row = in_a_row + 1 if answers else 0
            if not answers:
                self.client.first_down(True)
            elif in_a_row == MEMBER_BACK:
                self.client.first_down(False)
            down = (
                ""
                if answers
                else f"etcd member {self.member_name} not answering at {self.client.endpoints[0]}"
            )
            if down != self.member_down:
                if down:
                    log.warning(
                        "etcd_member_not_answering",
                        extra={"member": self.member_name, "using": "other members"},
                    )
                else:
                    log.info("etcd_member_answering", extra={"member": self.member_name})
                self.member_down = down

    def _teardown(self, revoke: bool) -> None:
        if self._prober is not None:
            self._prober.kill(block=False)
            self._prober = None
        if self.election is not None:
            self.election.stop()
        if self.membership is not None:
            self.membership.stop()
        if self.queue_owners is not None:
            self.queue_owners.stop()
        if self.lease is not None:
            lease = self.lease
            if revoke:
                self._while_quorum(lambda: lease.stop(revoke=True))
            lease.stop(revoke=False)
        if self.client is not None:
            self.client.close()
        if self.member is not None:
            self.member.stop()

    def _lease_lost(self) -> None:
        log.error("cluster_not_ready", extra={"why": "etcd lease lost", "node_id": self.node_id})

    def _lease_replaced(self, lease_id: int) -> None:
        """A new lease after a loss: register, take our sessions again, campaign."""
        self.membership.register(lease_id)
        lost = self.ownership.reacquire_all()
        if lost:
            log.warning("sessions_lost_with_lease", extra={"count": len(lost)})
            if self.on_sessions_lost is not None:
                self.on_sessions_lost(lost)
        self.election.campaign()

    # -- state -------------------------------------------------------------------------------------
    @property
    def ready(self) -> tuple[bool, str]:
        """(True, "") while registered under a live lease; else (False, why)."""
        if not self._started:
            return False, f"cluster metadata {self._status or 'not started'}"
        lease = self.lease
        if not lease.alive:
            return False, f"etcd lease lost ({lease.error})" if lease.error else "etcd lease lost"
        return True, ""

    def members(self) -> dict[str, str]:
        """Live node id -> transport address (this node included)."""
        return self.membership.members() if self.membership is not None else {}

    def lost_members(self) -> dict[str, str]:
        """Nodes seen live since this node started that went without leaving (killed, cut off)."""
        return self.membership.lost() if self.membership is not None else {}

    def announced(self, name: str) -> dict[str, str]:
        """Live node id -> the address it announces as ``name`` (``raft``)."""
        return self.membership.announced(name) if self.membership is not None else {}

    def on_members(self, callback: Callable[[dict[str, str]], None]) -> None:
        self.membership.on_members(callback)

    @property
    def is_leader(self) -> bool:
        return self.election is not None and self.election.is_leader

    def on_leadership(self, callback: Callable[[bool], None]) -> None:
        self.election.on_change.append(callback)

    @property
    def lease_id(self) -> int:
        return self.lease.id if self.lease is not None else 0

    # -- sessions ----------------------------------------------------------------------------------
    def acquire_session(self, client_id: str, take_from: str | None = None) -> str | None:
        """CAS under the node lease. None: this node owns ``client_id`` now. A node id: that live node
        owns it; take its state, then call again with ``take_from`` set to it."""
        self._check_lease()
        return self.ownership.acquire(client_id, take_from)

    def release_session(self, client_id: str) -> bool:
        """Delete the owner key only if this node owns it."""
        return self.ownership.release(client_id)

    def forget_session(self, client_id: str) -> None:
        """This node handed the session over: not one to take again after a new lease."""
        self.ownership.forget(client_id)

    def owned_by(self, client_id: str) -> str | None:
        return self.ownership.owned_by(client_id)

    def _check_lease(self) -> None:
        if self.lease is None or not self.lease.alive:
            raise ClusterError(f"node {self.node_id!r} holds no live etcd lease: {self.ready[1]}")
