"""FormingRaft: the Raft groups of a node whose members come from etcd, before and after they form.

With static ``cluster.raft.peers`` the groups are planned from the configuration at start
(``RaftService``). With etcd membership the members are known only once the cluster has agreed on
them (``fluxmq.cluster.metadata.raft_members``), after the node has started. Until then:

- every replicated queue exists with its log bound to a stand-in group that refuses appends with
  the reason (5.0 PUBACK 0x97 with a reason string; a 3.1.1 publisher is disconnected): never
  acknowledged, since nothing could hold the message on other nodes;
- nothing is delivered from them (not ``delivering``); what consumers register meanwhile (a group's
  floor, a settlement) is kept and handed to the group when it forms.

Once agreed (``form``), the ``RaftService`` is built from the configuration with the default group's
members replaced by the agreed ones, each queue's log is rebound to its group (or to a stand-in
that refuses with "holds no replica" when this node is outside its pick, or outside the agreed set
altogether), and the groups start. From then on everything is the ``RaftService``'s.
"""

from __future__ import annotations

import logging

import gevent

from fluxmq.broker.held import HeldAck
from fluxmq.errors import ClusterError

from .config import with_members
from .log import ReplicatedQueueLog, refused
from .service import RaftService

log = logging.getLogger("fluxmq.replication")

#: pause between two attempts to agree on the members (each reads one etcd key)
AGREE_INTERVAL = 0.5
#: pause before starting the groups again after a failed start (the Raft port taken)
START_RETRY = 2.0
#: consumer registrations/settlements kept for a group not formed yet (past it the oldest go)
MAX_KEPT_OPS = 10000


class StandInGroup:
    """What a replicated queue's log writes to while it has no Raft group here: refuses appends with
    ``reason()``; with ``keep`` it keeps staged consumer progress for the group to come."""

    name = "-"
    delivering = False
    owner = None  # no claim: this node decides nothing (ReplicatedQueueLog.deciding)
    self_addr = ""
    incarnation = ""  # no member registrations (the reconcile loop makes them once formed)

    def leader(self) -> None:
        return None

    def __init__(self, reason, code: int = 0x97, keep: bool = False) -> None:
        self.reason = reason  # () -> str
        self.code = code
        self.keep = keep
        self.ops: list[tuple] = []
        self.logs: dict[str, ReplicatedQueueLog] = {}

    def check_writable(self, queue: str) -> None:
        raise refused(f"queue {queue}: {self.reason()}", self.code)

    def stage(self, op: tuple) -> None:
        if self.keep and op[0] in ("c", "g"):
            self.ops.append(op)
            if len(self.ops) > MAX_KEPT_OPS:
                del self.ops[: len(self.ops) - MAX_KEPT_OPS]

    def stage_append(self, queue: str, blob: bytes) -> None:
        self.check_writable(queue)

    def turn_hold(self, timeout: float, settlement: bool = False) -> HeldAck:
        held = HeldAck()
        held.resolve(refused(self.reason(), self.code))
        return held


class FormingRaft:
    """The node's ``raft`` (same interface as ``RaftService``) while the members come from etcd."""

    def __init__(
        self,
        raft,
        queue_configs,
        data_dir: str,
        store,
        origin=lambda key: "",
        mqtt_addr: str = "",
        node_id: str = "",
        self_addr: str = "",
    ) -> None:
        self.raft = raft
        self.queue_configs = list(queue_configs)
        self.configs = {c.name: c for c in self.queue_configs}
        self.data_dir = data_dir
        self.store = store
        self.origin = origin
        self.mqtt_addr = mqtt_addr
        self.node_id = node_id
        self.self_addr = self_addr
        self.waiting = "waiting for the cluster to agree on the Raft members in etcd"
        self.pending = StandInGroup(lambda: f"its Raft group is not formed yet ({self.waiting})", keep=True)
        self.outside: StandInGroup | None = None  # this node is not in the agreed set
        self.members: dict[str, str] | None = None
        self.service: RaftService | None = None
        self.manager = None
        self._logs: dict[str, ReplicatedQueueLog] = {}
        self._runner: gevent.Greenlet | None = None

    # -- the queue manager's log factory (as RaftService's) ------------------------------------

    def log_factory(self, name: str, store, stored=None):
        if self.service is not None:
            return self.service.log_factory(name, store, stored)
        from fluxmq.queues.manager import _local_log

        config, plan_name = self.configs.get(name), name
        if config is None and name.endswith(".dlq"):
            base = self.configs.get(name[:-4])
            if base is not None and base.replication.enabled:
                config, plan_name = base, base.name
        if config is None or not config.replication.enabled:
            return _local_log(name, store, stored)
        group = self.outside or self.pending
        qlog = ReplicatedQueueLog(
            name,
            store,
            group,
            config.replication,
            stored,
            config.type == "stream" and plan_name == name,
            # the stand-in knows no distribution_mode: without it the queue's groups would stay
            # plain leader-only groups after forming (consumers on followers never served)
            getattr(self.raft, "distribution_mode", "") or "",
        )
        if group is self.pending:
            self._logs[name] = qlog
        return qlog

    def attach(self, manager) -> None:
        self.manager = manager
        if self.service is not None:
            self.service.attach(manager)

    # -- forming ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Nothing runs before the members are known (``run``)."""

    def run(self, agree) -> None:
        """Try ``agree() -> (members or None, why)`` every AGREE_INTERVAL in a greenlet until the
        members are known, then ``form`` the groups. Without a replicated queue there is nothing to
        form, and nothing is recorded (a set agreed for no queue could not hold the ones added later)."""
        if not any(c.replication.enabled for c in self.queue_configs):
            self.waiting = "no queue with replication.enabled: no Raft group to form"
            return
        self._runner = gevent.spawn(self._agree_loop, agree)

    def _agree_loop(self, agree) -> None:
        logged = ""
        while self.members is None:
            pause = AGREE_INTERVAL
            try:
                members, why = agree()
            except ClusterError as exc:
                members, why = None, f"etcd: {exc}"
            if members is not None:
                try:
                    self.form(members)
                except Exception as exc:
                    # e.g. the Raft port taken (pysyncobj's BindError): the node stays up, refusing
                    # with the reason, and tries again (a static-peer node would not have started)
                    why = f"starting the Raft group failed ({type(exc).__name__}: {exc}); trying again"
                    if why != logged:
                        log.exception("raft_group_not_started")
                    pause = START_RETRY
                else:
                    if self.members is not None:
                        return
                    why = self.waiting  # form() said why not
            self.waiting = why
            if why != logged:
                logged = why
                log.info("raft_members_pending", extra={"why": why})
            gevent.sleep(pause)

    def form(self, members: dict[str, str]) -> None:
        """Build and start the groups from the agreed ``members`` (node id -> Raft address)."""
        mine = members.get(self.node_id)
        if mine is not None and mine != self.self_addr:
            # The recorded set names another address for this node: binding ours would split the group.
            why = (
                f"etcd records this node's Raft address as {mine}, but it is {self.self_addr} "
                "(cluster.raft.bind_addr): restore it, or delete the raft/members key with every "
                "node stopped"
            )
            if why != self.waiting:
                log.error(
                    "raft_member_address_changed", extra={"recorded": mine, "configured": self.self_addr}
                )
            self.waiting = why
            return
        listed = ", ".join(f"{n}={a}" for n, a in sorted(members.items()))
        if mine is None:
            self.members = dict(members)
            reason = (
                f"this node ({self.node_id}) holds no replica: it is not one of the Raft members agreed in "
                f"etcd ({listed})"
            )
            self.outside = StandInGroup(lambda: reason, code=0x80)
            for qlog in self._logs.values():
                qlog.group = self.outside
            self._logs.clear()
            log.warning("raft_not_a_member", extra={"members": listed})
            return
        service = RaftService(
            with_members(self.raft, self.self_addr, sorted(members.values())),
            self.queue_configs,
            self.data_dir,
            self.store,
            self.origin,
            mqtt_addr=self.mqtt_addr,
        )
        if self.manager is not None:
            service.attach(self.manager)
        held: dict[str, object] = {}  # queue name -> its group, for the queues this node holds
        for name, qlog in self._logs.items():
            base = name[:-4] if name not in self.configs and name.endswith(".dlq") else name
            plan = service.queue_plans.get(base)
            if plan is None:
                qlog.group = StandInGroup(
                    lambda name=name: f"this node holds no replica of queue {name} (replication_factor)",
                    code=0x80,
                )
                continue
            group = held[name] = service.groups[plan.key]
            group.logs[name] = qlog  # before the start: the journal replayed at start applies to it
        try:
            service.start()  # binds the Raft ports (yields while it retries): writes still refused
        except BaseException:
            service.stop()
            raise
        manager = self.manager
        for name, group in held.items():
            self._logs[name].group = group
            q = manager.queues.get(name) if manager is not None else None
            if q is not None:
                manager.kick_soon(q)  # a claim applied during the start found the queue refusing
        for op in self.pending.ops:
            group = held.get(op[1])
            if group is not None:
                group.stage(op)
        self._logs.clear()
        self.pending.ops = []
        self.service = service
        self.members = dict(members)
        log.info("raft_members_formed", extra={"members": listed, "groups": ",".join(service.groups)})

    # -- as RaftService --------------------------------------------------------------------------

    def stop(self) -> None:
        if self._runner is not None:
            self._runner.kill(block=True, timeout=2)
            self._runner = None
        if self.service is not None:
            self.service.stop()

    def status(self) -> list[dict]:
        if self.service is not None:
            return self.service.status()
        forming = self.waiting if self.outside is None else self.outside.reason()
        return [
            {
                "name": "default",
                "self": self.self_addr,
                "peers": sorted((self.members or {}).values()),
                "leader": None,
                "leader_mqtt": None,
                "lag": {},
                "delivering": False,
                "applied": 0,
                "forming": forming,
                "entries_submitted": 0,
                "entries_applied": 0,
                "entries_refused": 0,
                "acks_timed_out": 0,
                "snapshots_written": 0,
                "snapshots_installed": 0,
                "settlements_stale": 0,
                "queues": {},
            }
        ]
