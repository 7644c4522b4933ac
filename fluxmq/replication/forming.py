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
altogether), and the groups start. From then on everything is the ``RaftService``'s, but the
record keeps being read (``_watch``, every WATCH_INTERVAL):

- a node outside the set starts its replica once the record lists it (in ``joining``, written by
  the leader when the operator adds it by node id, or in ``members``), with the recorded members
  and itself as peers, and catches up from the leader (the log or a snapshot);
- a member the record no longer lists (removed) stops its replica and refuses with the reason;
- the leader re-writes ``members`` from its committed configuration when they differ (a change
  committed while etcd did not answer, or a leader gone between the commit and the write);
- the leader settles a ``joining`` entry no add of its own waits for (``_settle``): one its
  committed configuration has is moved to ``members`` (the rewrite above); one it has not is taken
  out of ``joining`` once ORPHAN_WAIT has passed with this node the leader all along (the add's
  leader died before committing it, or its withdrawal found etcd down), and the joining node stops
  its replica and says why. Undone, not finished: a member is added by an operator's request that
  was answered, never by the group on its own; the operator's request failed, they make it again.
"""

from __future__ import annotations

import logging
import os

import gevent

from fluxmq.broker.held import HeldAck
from fluxmq.errors import ClusterError

from .config import with_members
from .group import MemberChangeRefused
from .log import ReplicatedQueueLog, refused
from .service import RaftService, reach

log = logging.getLogger("fluxmq.replication")

#: pause between two attempts to agree on the members (each reads one etcd key)
AGREE_INTERVAL = 0.5
#: pause before starting the groups again after a failed start (the Raft port taken)
START_RETRY = 2.0
#: pause between two reads of the member record once the members are known (joins, removals, repair)
WATCH_INTERVAL = 1.0
#: how long an add by node id waits for the joining node to start its replica (it reads the record
#: every WATCH_INTERVAL, then binds its Raft port)
JOIN_WAIT = 20.0
#: how long the leader (leading all along) leaves a ``joining`` entry that no add of its own waits
#: for before taking it out: the add's leader, if alive, has had JOIN_WAIT to make it (or
#: to withdraw it) since it wrote the entry; a leader that lost and regains leadership meanwhile
#: and still waits is its own add (``_joining``), never taken out
ORPHAN_WAIT = JOIN_WAIT
#: TEST ONLY (tests/e2e/test_raft_join_etcd.py): a file path; a leader adding a node through the
#: record removes that file, if it exists, and exits between writing ``joining`` and the add, the
#: whole node halting (a leader dying mid-join). Never set it in production.
TEST_EXIT_IN_JOIN = "FLUXMQ_TEST_EXIT_IN_JOIN"
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
        self.record = None  # the RaftMembers of raft/members in etcd (set by the node), for change_member
        self.record_note = ""  # why the record is not in step with this node, when it is not
        self.removed = ""  # why this node stopped its replica (removed from the record)
        self._joining = ""  # the node an add through the record waits for (this node the leader)
        # joining node id -> when this node, leading since, first saw no add of its own wait for it
        self._orphans: dict[str, float] = {}
        self._listed_as = ""  # "joining" or "members": where this node read itself in the record last

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
        self._logs[name] = qlog  # rebound when the group forms (or when this node joins it later)
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
        self._agree(agree)
        if self.record is not None:
            self._watch()

    def _agree(self, agree) -> None:
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
                qlog.group = self.outside  # kept in _logs: rebound if this node is added later
            log.warning("raft_not_a_member", extra={"members": listed})
            return
        service = RaftService(
            with_members(
                self.raft,
                self.self_addr,
                sorted(members.values()),
                # the size the set was agreed with (recorded since; else this node's count)
                (self.record.agreed or self.record.count) if self.record is not None else 0,
            ),
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
        self.outside = None
        self.members = dict(members)
        log.info("raft_members_formed", extra={"members": listed, "groups": ",".join(service.groups)})

    # -- the record, once the members are known --------------------------------------------------

    def _watch(self) -> None:
        """Read ``raft/members`` every WATCH_INTERVAL for good: join, leave, repair (module doc)."""
        logged = ""
        while True:
            gevent.sleep(WATCH_INTERVAL)
            try:
                found = self.record.read()
                note = self._follow(found) if found is not None and found[0] else ""
            except ClusterError as exc:
                note = f"etcd: {exc}"
            except Exception as exc:  # a replica that failed to start: tried again at the next read
                note = f"{type(exc).__name__}: {exc}"
                if note != logged:
                    log.exception("raft_member_record_not_followed")
            self.record_note = note
            if note != logged:
                logged = note
                if note:
                    log.warning("raft_member_record_behind", extra={"why": note})

    def _follow(self, found: tuple[dict[str, str], dict[str, str]]) -> str:
        """Act on the record read (members, joining); returns what is not in step, or ""."""
        members, joining = found
        listed = self.self_addr in members.values() or self.self_addr in joining.values()
        if self.service is None:
            if listed and self.outside is not None:
                self.removed = ""
                log.info("raft_member_joining", extra={"members": ",".join(sorted(members.values()))})
                self.form({**members, self.node_id: self.self_addr})
                if self.service is not None:
                    self._listed_as = "members" if self.self_addr in members.values() else "joining"
            return ""
        if not listed:
            self._leave(members, self._listed_as == "joining")
            return ""
        self._listed_as = "members" if self.self_addr in members.values() else "joining"
        g = self.service.groups.get("default")
        if g is None or not g.is_leader():
            self._orphans.clear()  # not the leader: nothing to settle, the wait starts again once it is
            return ""
        committed = g.committed_peers()
        if committed is None:
            return ""  # a change, or entries, not committed yet: settled at a later read
        if sorted(members.values()) != committed or any(a in committed for a in joining.values()):
            # the Raft change is the truth: the record follows it (a change committed while etcd did
            # not answer, or a leader gone between the commit and the write); a joining node the
            # configuration has is moved to members
            self.members = self.record.rewrite(committed)
            log.warning("raft_members_repaired", extra={"members": ",".join(committed)})
            joining = {n: a for n, a in joining.items() if a not in committed}
        self._settle(joining)
        return ""

    def _settle(self, joining: dict[str, str]) -> None:
        """On the leader, its configuration committed at this read: take out of ``joining`` the
        entries (not in the configuration) that no add of this node waits for, once ORPHAN_WAIT has
        passed since it first saw each, leading all along (module doc). Another node's add cannot commit while this node leads with
        its log committed, so nothing else will finish them."""
        now = gevent.get_hub().loop.now()
        self._orphans = {n: self._orphans.get(n, now) for n in joining if n != self._joining}
        for node_id, since in list(self._orphans.items()):
            if now - since < ORPHAN_WAIT:
                continue
            # unless: an add of it begun here meanwhile (self._joining is set before its record write)
            self.record.end_join(node_id, unless=lambda node_id=node_id: self._joining == node_id)
            del self._orphans[node_id]
            log.warning(
                "raft_join_undone",
                extra={
                    "node": node_id,
                    "addr": joining[node_id],
                    "why": f"in joining for {ORPHAN_WAIT:.0f}s with no add of it waiting on the leader "
                    "and not in the committed configuration",
                },
            )

    def _leave(self, members: dict[str, str], joining: bool = False) -> None:
        """This member was removed from the record (``joining``: this node, still joining, was taken
        out of ``joining``): stop its replica, refuse with the reason."""
        service, self.service = self.service, None
        self._listed_as = ""
        listed = ", ".join(f"{n}={a}" for n, a in sorted(members.items()))
        if joining:
            reason = self.removed = (
                f"this node ({self.node_id}) holds no replica: its join was undone (the add was not "
                "committed: refused, or its leader stopped before committing it) and it stopped its "
                f"replica; add it again on the leader (members recorded in etcd: {listed})"
            )
        else:
            reason = self.removed = (
                f"this node ({self.node_id}) holds no replica: it was removed from the Raft members "
                f"recorded in etcd ({listed}) and stopped its replica"
            )
        self.outside = StandInGroup(lambda: reason, code=0x80)
        self.members = dict(members)
        for group in service.groups.values():
            for name, qlog in group.logs.items():
                qlog.group = self.outside
                self._logs[name] = qlog
        service.stop()
        log.warning("raft_join_undone" if joining else "raft_member_removed", extra={"members": listed})

    # -- as RaftService --------------------------------------------------------------------------

    def stop(self) -> None:
        if self._runner is not None:
            self._runner.kill(block=True, timeout=2)
            self._runner = None
        if self.service is not None:
            self.service.stop()

    def change_member(self, group: str, action: str, addr: str, node_id: str = "") -> list[str]:
        """As ``RaftService.change_member``; once committed, the member set recorded in etcd
        (``raft/members``) is changed the same way (``node_id``: the new member's key there), so
        every node started later forms with it. Without ``addr`` the node ``node_id`` is added by
        its etcd registration (its announced Raft address). An add to the default group goes
        through the record's ``joining``: the new node starts its replica on seeing itself there
        (no static peers), and the add is made once it answers. A change committed whose record
        failed is re-written by the leader's watch (``_follow``), or by the same request again."""
        if self.service is None:
            raise MemberChangeRefused(503, f"the Raft group is not formed on this node ({self.waiting})")
        g = self.service.groups.get(group)
        record = self.record if group == "default" else None
        if not addr:
            if g is None:
                self.service.change_member(group, action, addr)  # 404: no such group
            if record is None:
                raise MemberChangeRefused(
                    409, f"group {group}'s members are not recorded in etcd: give the new member's addr"
                )
            addr = self._resolve(record, node_id)
        if g is not None and record is not None:
            try:
                recorded = set((record.recorded() or {}).values())
            except ClusterError as exc:
                raise MemberChangeRefused(503, f"etcd: {exc}") from None
            if (action == "add" and addr in g.peers and addr not in recorded) or (
                action == "remove" and addr not in g.peers and addr in recorded
            ):
                self._record(record, action, addr, node_id, g.peers)  # committed before, not recorded
                return g.peers
            if action == "add" and addr not in g.peers:
                return self._join(record, g, addr, node_id)
        members = self.service.change_member(group, action, addr)
        if record is not None:
            self._record(record, action, addr, node_id, members)
        return members

    def _resolve(self, record, node_id: str) -> str:
        """The Raft address node ``node_id`` announces in its etcd registration."""
        try:
            registered, addr = record.registration(node_id)
        except ClusterError as exc:
            raise MemberChangeRefused(503, f"etcd: {exc}") from None
        if not registered:
            raise MemberChangeRefused(
                404,
                f"node {node_id} is not registered in etcd ({record.meta.prefix}nodes/{node_id}): "
                "start it first (cluster.raft.enabled, no cluster.raft.peers)",
            )
        if not addr:
            raise MemberChangeRefused(
                409,
                f"node {node_id} is registered in etcd but announces no Raft address (its "
                "cluster.raft.enabled is off, or it runs static cluster.raft.peers)",
            )
        return addr

    def _join(self, record, g, addr: str, node_id: str) -> list[str]:
        """Add the node at ``addr`` through the record: ``joining`` first, then the add once it
        answers, then ``members``."""
        g.check_change("add", addr)  # not the leader (naming it), no quorum...: before the record
        if self._joining:
            raise MemberChangeRefused(
                409,
                f"node {self._joining} is joining group {g.name} (not committed yet): one change at a time",
            )
        try:
            announcer = record.node_at(addr)
        except ClusterError as exc:
            raise MemberChangeRefused(503, f"etcd: {exc} (nothing changed)") from None
        if announcer == addr and not _answers(addr):
            # no live node announces the address, so none will start a replica there on reading the
            # record: waiting JOIN_WAIT for it would only delay the refusal
            raise MemberChangeRefused(
                409,
                f"nothing answers at {addr} and no node registered in etcd announces it as its Raft "
                "address: start the new node first (nothing changed)",
            )
        node_id = node_id or announcer
        self._joining = node_id  # before the record's write: the watch (_settle) leaves it alone
        try:
            record.begin_join(node_id, addr)
        except ClusterError as exc:
            self._joining = ""
            raise MemberChangeRefused(503, f"etcd: {exc} (nothing changed)") from None
        try:
            _test_exit_in_join()
            self._await_replica(node_id, addr)
            members = self.service.change_member(g.name, "add", addr)
        except MemberChangeRefused:
            if addr not in g.peers:  # not appended: the node is no member, it stops its replica
                try:
                    record.end_join(node_id)
                except ClusterError:
                    log.warning("raft_join_not_withdrawn", extra={"node": node_id, "addr": addr})
            raise
        finally:
            self._joining = ""
        self._record(record, "add", addr, node_id, members)
        return members

    def _await_replica(self, node_id: str, addr: str) -> None:
        deadline = gevent.get_hub().loop.now() + JOIN_WAIT
        while True:
            try:
                reach(addr, 1.0)
                return
            except (OSError, ValueError) as exc:
                if gevent.get_hub().loop.now() >= deadline:
                    raise MemberChangeRefused(
                        409,
                        f"node {node_id} did not start its replica at {addr} within {JOIN_WAIT:.0f}s "
                        f"({exc}): it starts it on reading itself in raft/members, so it must run on "
                        "this etcd prefix with cluster.raft.enabled",
                    ) from None
            gevent.sleep(0.2)

    def _record(self, record, action: str, addr: str, node_id: str, members: list[str]) -> None:
        try:
            self.members = record.change(action, addr, node_id)
        except ClusterError as exc:
            self.record_note = f"etcd: {exc}"
            raise MemberChangeRefused(
                503,
                f"the change is committed (members: {', '.join(members)}) but raft/members in etcd was "
                f"not updated ({exc}): this node, the leader, re-writes it from its committed "
                "configuration once etcd answers",
            ) from None

    def status(self) -> list[dict]:
        if self.service is not None:
            out = self.service.status()
            if self.record_note:
                for st in out:
                    if st.get("name") == "default":
                        st["record"] = self.record_note  # raft/members not in step (etcd down)
            return out
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


def _answers(addr: str) -> bool:
    try:
        reach(addr, 1.0)
    except (OSError, ValueError):
        return False
    return True


def _test_exit_in_join() -> None:
    """TEST ONLY (TEST_EXIT_IN_JOIN): exit between writing ``joining`` and the add, once."""
    path = os.environ.get(TEST_EXIT_IN_JOIN)
    if path and os.path.exists(path):
        os.remove(path)
        log.error("test_exit_in_join", extra={"env": TEST_EXIT_IN_JOIN})
        os._exit(3)  # gunicorn's WORKER_BOOT_ERROR: the arbiter halts the node (a dead machine), no restart
