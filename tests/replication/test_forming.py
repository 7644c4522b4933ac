"""FormingRaft before its members are known (fluxmq/replication/forming.py); the group forming from
etcd end to end is tests/e2e/test_replication_etcd.py."""

from __future__ import annotations

from types import SimpleNamespace

import gevent
import pytest

from fluxmq.errors import QueueRefused
from fluxmq.queues.config import QueueConfig, ReplicationConfig
from fluxmq.replication.forming import FormingRaft


def forming(queues) -> FormingRaft:
    raft = SimpleNamespace(bind_addr="127.0.0.1:7100", peers=[], groups={}, auto_provision_groups=True)
    return FormingRaft(raft, queues, "/nonexistent", store=None, node_id="n1", self_addr="127.0.0.1:7100")


def test_without_a_replicated_queue_nothing_is_agreed_or_recorded() -> None:
    asked = []
    f = forming([QueueConfig("plain")])
    f.run(lambda: asked.append(1) or (None, "waiting"))
    gevent.sleep(0.05)
    assert asked == [] and f.members is None and "no queue with replication.enabled" in f.waiting
    f.stop()


def test_until_agreed_a_replicated_queue_refuses_with_what_it_waits_for() -> None:
    f = forming([QueueConfig("orders", replication=ReplicationConfig(True, "default", "sync", 3, 2, 5.0))])
    f.run(lambda: (None, "waiting for node3 to register"))
    gevent.sleep(0.05)
    qlog = f.log_factory("orders", SimpleNamespace(), None)
    with pytest.raises(
        QueueRefused, match=r"its Raft group is not formed yet \(waiting for node3 to register\)"
    ):
        qlog.append_one(SimpleNamespace())
    assert qlog.delivering is False
    held = qlog.held_ack()
    assert held.done and isinstance(held.outcome, QueueRefused)
    assert f.status()[0]["forming"] == "waiting for node3 to register"
    f.stop()


def test_a_recorded_address_other_than_ours_keeps_the_node_out_with_the_reason() -> None:
    f = forming([QueueConfig("orders", replication=ReplicationConfig(True, "default", "sync", 3, 2, 5.0))])
    qlog = f.log_factory("orders", SimpleNamespace(), None)
    f.form({"n1": "127.0.0.1:9999", "n2": "127.0.0.1:7200", "n3": "127.0.0.1:7300"})
    assert f.members is None and f.service is None
    assert "etcd records this node's Raft address as 127.0.0.1:9999, but it is 127.0.0.1:7100" in f.waiting
    with pytest.raises(QueueRefused, match="127.0.0.1:9999"):
        qlog.append_one(SimpleNamespace())


def test_a_node_outside_the_agreed_set_refuses_as_holding_no_replica() -> None:
    f = forming([QueueConfig("orders", replication=ReplicationConfig(True, "default", "sync", 3, 2, 5.0))])
    qlog = f.log_factory("orders", SimpleNamespace(), None)
    f.form({"n2": "127.0.0.1:7200", "n3": "127.0.0.1:7300", "n4": "127.0.0.1:7400"})
    with pytest.raises(QueueRefused, match=r"holds no replica: it is not one of the Raft members") as info:
        qlog.append_one(SimpleNamespace())
    assert info.value.reason_code == 0x80
    later = f.log_factory("orders.dlq", SimpleNamespace(), None)  # made after: refused the same way
    with pytest.raises(QueueRefused, match="holds no replica"):
        later.append_one(SimpleNamespace())


@pytest.mark.parametrize("mode", ["forward", "replicate"])
def test_a_log_made_before_forming_distributes_as_configured(mode) -> None:
    """The queues are made at start, before etcd agreed on the members (a stand-in group, which
    knows no distribution_mode): their logs still get the mode's consumer groups, registrations
    and events. Without them the formed group served only the leader's own consumers (seen: the
    consumer on a follower received nothing in a whole leader-kill run)."""
    from fluxmq.replication.distribution import ReplicatedGroup

    f = forming([QueueConfig("orders", replication=ReplicationConfig(True, "default", "sync", 3, 2, 5.0))])
    f.raft.distribution_mode = mode
    qlog = f.log_factory("orders", SimpleNamespace(), None)
    assert qlog.group_class is ReplicatedGroup and qlog.events == []
    assert qlog.leased is (mode == "replicate") and qlog.deciding is False
    qlog.register("g", "c1\x00$queue/orders", None)  # no group yet: the reconcile loop registers it later
    assert qlog.delivering is False
    f.stop()


class _Record:
    """A stand-in for RaftMembers whose writes fail while ``down`` (etcd not answering)."""

    def __init__(self, members: dict[str, str]) -> None:
        self.members = dict(members)
        self.joining: dict[str, str] = {}
        self.joins: list[str] = []  # begin_join's writes
        self.down = False
        self.count = 3

    def _check(self) -> None:
        from fluxmq.errors import ClusterError

        if self.down:
            raise ClusterError("etcd did not answer")

    def recorded(self) -> dict[str, str]:
        self._check()
        return dict(self.members)

    def read(self):
        self._check()
        return dict(self.members), dict(self.joining)

    def change(self, action: str, addr: str, node_id: str = "") -> dict[str, str]:
        self._check()
        self.joining = {n: a for n, a in self.joining.items() if a != addr}
        if action == "add":
            self.members[node_id or addr] = addr
        else:
            self.members = {n: a for n, a in self.members.items() if a != addr}
        return dict(self.members)

    def rewrite(self, addrs: list[str]) -> dict[str, str]:
        self._check()
        ids = {a: n for n, a in [*self.joining.items(), *self.members.items()]}
        self.members = {ids.get(a, a): a for a in addrs}
        self.joining = {n: a for n, a in self.joining.items() if a not in addrs}
        return dict(self.members)

    def node_at(self, addr: str) -> str:
        self._check()
        return next((n for n, a in self.announced.items() if a == addr), addr)

    announced: dict[str, str] = {}

    def begin_join(self, node_id: str, addr: str) -> None:
        self._check()
        self.joining[node_id] = addr
        self.joins.append(node_id)

    def end_join(self, node_id: str, unless=None) -> None:
        self._check()
        if unless is None or not unless():
            self.joining.pop(node_id, None)


class _Group:
    name = "default"

    def __init__(self, peers: list[str]) -> None:
        self.peers = sorted(peers)
        self.logs: dict = {}
        self.leading = True

        self.committing = False  # entries appended, not committed yet

    def is_leader(self) -> bool:
        return self.leading

    def committed_peers(self):
        return self.peers if self.leading and not self.committing else None

    def check_change(self, action: str, addr: str) -> None:
        pass


def _formed(members: dict[str, str], record: _Record) -> tuple[FormingRaft, _Group, list]:
    f = forming([QueueConfig("orders", replication=ReplicationConfig(True, "default", "sync", 3, 2, 5.0))])
    group = _Group(list(members.values()))
    stopped: list = []

    def change_member(name: str, action: str, addr: str) -> list[str]:
        group.peers = sorted({*group.peers, addr} if action == "add" else set(group.peers) - {addr})
        return group.peers

    f.service = SimpleNamespace(
        groups={"default": group},
        change_member=change_member,
        stop=lambda: stopped.append(1),
        status=lambda: [{"name": "default"}],
    )
    f.members = dict(members)
    f.record = record
    return f, group, stopped


def test_a_change_committed_while_etcd_is_down_is_recorded_by_the_leader_once_it_answers() -> None:
    """The Raft change is the truth: a removal committed while etcd did not answer is reported (503,
    saying it is committed), shown in /cluster/raft, and the leader's read of the record rewrites
    it from the committed configuration once etcd answers."""
    from fluxmq.replication.group import MemberChangeRefused

    three = {"n1": "127.0.0.1:7100", "n2": "127.0.0.1:7200", "n3": "127.0.0.1:7300"}
    record = _Record(three)
    f, group, _ = _formed(three, record)
    real_record = record.recorded

    def recorded_then_down() -> dict[str, str]:
        out = real_record()
        record.down = True  # etcd goes away between the check and the write
        return out

    record.recorded = recorded_then_down
    with pytest.raises(MemberChangeRefused) as info:
        f.change_member("default", "remove", "127.0.0.1:7300")
    assert info.value.status == 503 and "the change is committed" in str(info.value)
    assert "re-writes it from its committed configuration" in str(info.value)
    assert group.peers == ["127.0.0.1:7100", "127.0.0.1:7200"] and record.members == three
    assert "etcd did not answer" in f.status()[0]["record"]
    with pytest.raises(Exception, match="etcd did not answer"):
        f._follow(record.read())  # still down: nothing written, tried again at the next read
    record.down = False
    assert f._follow(record.read()) == ""
    assert record.members == {"n1": "127.0.0.1:7100", "n2": "127.0.0.1:7200"}


def test_a_member_the_record_no_longer_lists_stops_its_replica_and_says_why() -> None:
    three = {"n1": "127.0.0.1:7100", "n2": "127.0.0.1:7200", "n3": "127.0.0.1:7300"}
    record = _Record(three)
    f, group, stopped = _formed(three, record)
    service, f.service = f.service, None
    qlog = f.log_factory("orders", SimpleNamespace(), None)  # a log of the group (made before forming)
    f.service = service
    group.logs["orders"] = qlog
    f._follow(({"n2": "127.0.0.1:7200", "n3": "127.0.0.1:7300"}, {}))
    assert stopped == [1] and f.service is None
    with pytest.raises(QueueRefused, match="removed from the Raft members recorded in etcd") as info:
        qlog.append_one(SimpleNamespace())
    assert info.value.reason_code == 0x80
    assert "stopped its replica" in f.status()[0]["forming"]


D = "127.0.0.1:7400"


def test_a_join_whose_leader_died_is_taken_out_of_joining_by_the_next_leader(monkeypatch) -> None:
    """The leader that wrote ``joining`` died before committing the add: the next leader, its
    configuration committed and without D, takes D out of ``joining`` once ORPHAN_WAIT has passed
    with it the leader all along, never while an add of its own waits for D."""
    from fluxmq.replication import forming as mod

    three = {"n1": "127.0.0.1:7100", "n2": "127.0.0.1:7200", "n3": "127.0.0.1:7300"}
    record = _Record(three)
    record.joining = {"d": D}
    f, group, _ = _formed(three, record)
    assert f._follow(record.read()) == ""
    assert record.joining == {"d": D}  # within ORPHAN_WAIT: its leader, if alive, may still add it
    monkeypatch.setattr(mod, "ORPHAN_WAIT", 0.0)
    group.committing = True  # entries not committed at this read: settled at a later one, the wait kept
    f._follow(record.read())
    assert record.joining == {"d": D} and "d" in f._orphans
    group.committing = False
    group.leading = False  # not the leader: nothing settled, and the wait starts again once it is
    f._follow(record.read())
    assert record.joining == {"d": D} and f._orphans == {}
    group.leading = True
    f._joining = "d"  # an add of this node's own waits for it: left
    f._follow(record.read())
    assert record.joining == {"d": D}
    f._joining = ""
    f._follow(record.read())
    assert record.joining == {} and record.members == three and group.peers == sorted(three.values())


def test_a_join_the_committed_configuration_has_is_moved_to_members() -> None:
    """The add did commit (its leader died before writing the record): the next leader moves D."""
    three = {"n1": "127.0.0.1:7100", "n2": "127.0.0.1:7200", "n3": "127.0.0.1:7300"}
    record = _Record(three)
    record.joining = {"d": D}
    f, group, _ = _formed(three, record)
    group.peers = sorted([*three.values(), D])
    f._follow(record.read())
    assert record.members == {**three, "d": D} and record.joining == {}


def test_a_joining_node_taken_out_of_joining_stops_its_replica_and_says_its_join_was_undone() -> None:
    three = {"n1": "127.0.0.1:7100", "n2": "127.0.0.1:7200", "n3": "127.0.0.1:7300"}
    record = _Record(three)
    f, group, stopped = _formed({**three, "n4": D}, record)
    f.self_addr, f.node_id = D, "n4"
    group.leading = False
    f._follow((three, {"n4": D}))  # it runs a replica while joining
    assert f.service is not None and not stopped
    f._follow((three, {}))
    assert stopped == [1] and f.service is None
    assert "its join was undone" in f.status()[0]["forming"]


def test_an_add_by_address_nobody_announces_or_answers_is_refused_at_once() -> None:
    """No live node announces the address and nothing answers there: nobody would start a replica
    on reading the record, so the add is refused without waiting JOIN_WAIT and nothing is written."""
    from fluxmq.replication.group import MemberChangeRefused
    from tests.conftest import free_port

    three = {"n1": "127.0.0.1:7100", "n2": "127.0.0.1:7200", "n3": "127.0.0.1:7300"}
    record = _Record(three)
    f, group, _ = _formed(three, record)
    nowhere = f"127.0.0.1:{free_port()}"
    with pytest.raises(MemberChangeRefused) as info:
        f.change_member("default", "add", nowhere)
    assert info.value.status == 409 and "nothing answers at" in str(info.value), info.value
    assert record.joins == [] and record.members == three and nowhere not in group.peers


def test_the_request_made_again_on_the_new_leader_adds_the_node_left_in_joining(monkeypatch) -> None:
    """Before the next leader takes D out of ``joining``, the operator makes the add again there: it
    is an add of this leader's own, which its reads of the record leave alone while it waits."""
    from fluxmq.replication import forming as mod

    monkeypatch.setattr(mod, "ORPHAN_WAIT", 0.0)
    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    addr = f"127.0.0.1:{listener.getsockname()[1]}"  # D's replica answers there
    three = {"n1": "127.0.0.1:7100", "n2": "127.0.0.1:7200", "n3": "127.0.0.1:7300"}
    record = _Record(three)
    record.joining = {"d": addr}  # left by the leader that died
    record.announced = {"d": addr}
    f, group, _ = _formed(three, record)
    seen: list = []
    wait = f._await_replica

    def await_replica(node_id: str, at: str) -> None:
        f._follow(record.read())  # the leader's read of the record while its add waits
        seen.append(dict(record.joining))
        wait(node_id, at)

    f._await_replica = await_replica
    try:
        members = f.change_member("default", "add", addr)
    finally:
        listener.close()
    assert seen == [{"d": addr}]  # not taken out meanwhile
    assert addr in members and record.members == {**three, "d": addr} and record.joining == {}
