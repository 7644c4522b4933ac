"""The Raft group's initial members, agreed once through etcd (fluxmq/cluster/metadata/raft_members.py),
on the session's real etcd."""

from __future__ import annotations

from fluxmq.cluster.metadata.raft_members import RaftMembers
from tests.cluster.metadata.conftest import wait_for


def node(meta_factory, node_id: str, raft: str):
    meta = meta_factory(node_id, start=False)
    meta.announce = {"raft": raft}
    meta.start()
    return meta


def test_the_registration_carries_the_raft_address(meta_factory) -> None:
    a = node(meta_factory, "a", "127.0.0.1:7100")
    meta_factory("b")  # announces nothing
    assert wait_for(lambda: set(a.members()) == {"a", "b"})
    assert a.announced("raft") == {"a": "127.0.0.1:7100"}


def test_named_members_are_agreed_once_all_are_live_and_the_same_on_every_node(meta_factory) -> None:
    names = ["n1", "n2", "n3"]
    n1 = node(meta_factory, "n1", "127.0.0.1:7100")
    node(meta_factory, "n2", "127.0.0.1:7200")
    assert wait_for(lambda: len(n1.members()) == 2)  # n1's watch has seen n2 (else it waits for both)
    members, why = RaftMembers(n1, names).agree()
    assert members is None and "waiting for n3 (cluster.etcd.initial_cluster)" in why
    assert RaftMembers(n1, names).recorded() is None  # nothing written while incomplete
    n3 = node(meta_factory, "n3", "127.0.0.1:7300")
    node(meta_factory, "extra", "127.0.0.1:7400")  # not named: never a member
    want = {"n1": "127.0.0.1:7100", "n2": "127.0.0.1:7200", "n3": "127.0.0.1:7300"}
    assert wait_for(lambda: RaftMembers(n3, names).agree()[0] == want)
    assert RaftMembers(n1, names).agree() == (want, "")


def test_a_count_takes_the_first_nodes_by_id_and_a_later_node_reads_the_recorded_set(meta_factory) -> None:
    b = node(meta_factory, "b", "127.0.0.1:7200")
    members, why = RaftMembers(b, count=2).agree()
    assert members is None and "waiting for 2 nodes" in why
    node(meta_factory, "c", "127.0.0.1:7300")
    assert wait_for(lambda: RaftMembers(b, count=2).agree()[0] is not None)
    want = {"b": "127.0.0.1:7200", "c": "127.0.0.1:7300"}
    assert RaftMembers(b, count=2).recorded() == want
    # "a" sorts first but came after the set was recorded: the record holds, on every node.
    a = node(meta_factory, "a", "127.0.0.1:7100")
    assert wait_for(lambda: len(a.members()) == 3)
    assert RaftMembers(a, count=2).agree() == (want, "")


def test_the_record_outlives_the_nodes(meta_factory) -> None:
    x = node(meta_factory, "x", "127.0.0.1:7100")
    assert RaftMembers(x, count=1).agree() == ({"x": "127.0.0.1:7100"}, "")
    x.stop()
    y = node(meta_factory, "y", "127.0.0.1:7200")
    assert RaftMembers(y, count=1).agree() == ({"x": "127.0.0.1:7100"}, "")


def test_a_member_change_rewrites_the_record_and_is_idempotent(meta_factory) -> None:
    b = node(meta_factory, "b", "127.0.0.1:7200")
    node(meta_factory, "c", "127.0.0.1:7300")
    assert wait_for(lambda: RaftMembers(b, count=2).agree()[0] is not None)
    d = node(meta_factory, "d", "127.0.0.1:7400")  # announces its Raft address: its id is found
    assert wait_for(lambda: "d" in b.announced("raft"))
    record = RaftMembers(b, count=2)
    want = {"b": "127.0.0.1:7200", "c": "127.0.0.1:7300", "d": "127.0.0.1:7400"}
    assert record.change("add", "127.0.0.1:7400") == want
    assert record.change("add", "127.0.0.1:7400") == want  # made again: the same
    assert record.change("remove", "127.0.0.1:7300") == {"b": "127.0.0.1:7200", "d": "127.0.0.1:7400"}
    assert record.change("remove", "127.0.0.1:7300") == {"b": "127.0.0.1:7200", "d": "127.0.0.1:7400"}
    # an address nobody announces, with the node id given (a member started with static peers)
    assert record.change("add", "127.0.0.1:7500", "e")["e"] == "127.0.0.1:7500"
    assert RaftMembers(d, count=2).agree()[0] == {
        "b": "127.0.0.1:7200",
        "d": "127.0.0.1:7400",
        "e": "127.0.0.1:7500",
    }


def test_a_node_of_several_workers_is_a_member_by_its_node_id(meta_factory) -> None:
    """Worker 0 (member n1/w0) announces the node's Raft address: the set names the node (n1),
    as with one worker (docs/replication.rst, "Several workers on a node")."""
    n1 = node(meta_factory, "n1/w0", "127.0.0.1:7100")
    meta_factory("n1/w1")  # the node's other worker runs no Raft: announces nothing
    node(meta_factory, "n2", "127.0.0.1:7200")
    assert wait_for(lambda: len(n1.members()) == 3)
    want = {"n1": "127.0.0.1:7100", "n2": "127.0.0.1:7200"}
    assert wait_for(lambda: RaftMembers(n1, ["n1", "n2"]).agree()[0] == want)


def test_a_join_is_recorded_then_moved_to_members_and_a_rewrite_follows_the_committed_set(
    meta_factory,
) -> None:
    """An add by node id through etcd alone (fluxmq/replication/forming.py): the node is written to
    ``joining`` first, the committed add moves it to ``members``; an abandoned join leaves the
    record; the leader's repair rewrites ``members`` from its committed configuration."""
    b = node(meta_factory, "b", "127.0.0.1:7200")
    node(meta_factory, "c", "127.0.0.1:7300")
    assert wait_for(lambda: RaftMembers(b, count=2).agree()[0] is not None)
    node(meta_factory, "d", "127.0.0.1:7400")
    meta_factory("plain")  # registered, no Raft address
    assert wait_for(lambda: len(b.members()) == 4)
    record = RaftMembers(b, count=2)
    assert record.registration("d") == (True, "127.0.0.1:7400")
    assert record.registration("plain") == (True, "")
    assert record.registration("nosuch") == (False, "")

    two = {"b": "127.0.0.1:7200", "c": "127.0.0.1:7300"}
    record.begin_join("d", "127.0.0.1:7400")
    assert record.read() == (two, {"d": "127.0.0.1:7400"})
    assert record.recorded() == two  # a joining node is no member yet (a node started now forms without it)
    record.end_join("d", unless=lambda: True)  # an add of it begun meanwhile: left
    assert record.read() == (two, {"d": "127.0.0.1:7400"})
    record.end_join("d")
    assert record.read() == (two, {})
    record.begin_join("d", "127.0.0.1:7400")
    three = {**two, "d": "127.0.0.1:7400"}
    assert record.change("add", "127.0.0.1:7400", "d") == three
    assert record.read() == (three, {})
    assert record.agreed == 2  # the size agreed at first stays in the record through changes
    # committed while etcd did not answer: the leader rewrites members from its configuration,
    # keeping the node ids the record knows
    assert record.rewrite(["127.0.0.1:7200", "127.0.0.1:7400"]) == {
        "b": "127.0.0.1:7200",
        "d": "127.0.0.1:7400",
    }
    assert record.rewrite(["127.0.0.1:7200", "127.0.0.1:7300", "127.0.0.1:7400"]) == three  # c: announced
