"""Delivery leases (fluxmq/replication/lease.py): the same commands give the same grants."""

from __future__ import annotations

from fluxmq.replication.lease import DEMAND_TTL, LeaseTable


def test_each_offset_is_leased_to_one_node_until_its_lease_expires_in_log_time() -> None:
    t = LeaseTable(0)
    assert t.grant("a", 3, 100.0, 10, 30.0) == ([0, 1, 2], [1, 1, 1])
    assert t.grant("b", 5, 101.0, 4, 30.0) == ([3], [1])  # only what the log holds
    assert t.grant("b", 5, 129.9, 10, 30.0) == ([4, 5, 6, 7, 8], [1] * 5)  # a's leases still hold
    t.settled(1)
    # log time 130: a's leases of 0 and 2 expired (1 is settled); b takes them over, count 2
    assert t.grant("b", 5, 130.0, 10, 30.0) == ([0, 2, 9], [2, 2, 1])
    assert t.held[0][0] == "b" and 1 not in t.held


def test_a_release_is_leased_again_once_due_and_only_by_its_holder() -> None:
    t = LeaseTable(5)
    assert t.grant("a", 2, 10.0, 7, 30.0) == ([5, 6], [1, 1])
    assert not t.release("b", 5, 11.0)  # not b's lease
    assert t.release("a", 5, 12.0)  # a nack: due after its backoff
    assert t.grant("b", 2, 11.0, 7, 30.0) == ([], [])
    assert t.grant("b", 2, 12.0, 7, 30.0) == ([5], [2])
    assert t.leasable(7, 12.0) is False
    assert t.leasable(8, 12.0) is True


def test_a_table_dumped_and_loaded_grants_what_the_original_grants() -> None:
    a = LeaseTable(0)
    a.grant("x", 4, 1.0, 6, 5.0)
    a.release("x", 2, 3.0)
    a.settled(0)
    b = LeaseTable.load(a.dump())
    for table in (a, b):
        assert table.grant("y", 10, 6.5, 8, 5.0) == ([2, 1, 3, 4, 5, 6, 7], [2, 2, 2, 1, 1, 1, 1])


def test_appended_offsets_are_spread_over_the_standing_demands_whoever_asked_first() -> None:
    """A request that gets nothing leaves its demand standing; offsets appended later go to every
    node with a demand by weighted round robin (members with room), not to the first to ask."""
    t = LeaseTable(0)
    assert t.request("leader", 100, 1.0, 0, 30.0, 0, 1) == ([], [])
    assert t.request("f1", 100, 1.0, 0, 30.0, 0, 1) == ([], [])
    assert t.request("f2", 100, 1.0, 0, 30.0, 0, 2) == ([], [])
    got = t.push(8, 1.5)  # one append of 8: whole rounds (1 + 1 + 2)
    assert got == {
        "f1": ([0, 1], [1, 1]),
        "f2": ([2, 3, 4, 5], [1] * 4),
        "leader": ([6, 7], [1, 1]),
    }
    # appends of one record each: each node in turn, f2 twice as often
    seen = [next(iter(t.push(off + 1, 2.0))) for off in range(8, 16)]
    assert sorted(seen) == ["f1", "f1", "f2", "f2", "f2", "f2", "leader", "leader"], seen
    assert seen[:4] != ["leader"] * 4
    assert t.held[8][0] == seen[0] and t.given == {"leader": 4, "f1": 4, "f2": 8}


def test_a_demand_ends_when_met_withdrawn_or_lapsed_and_counts_grants_made_meanwhile() -> None:
    t = LeaseTable(0)
    t.request("a", 3, 10.0, 0, 30.0, 0, 1)
    t.request("b", 2, 10.0, 0, 30.0, 0, 1)
    # whole rounds (contiguous runs), then one at a time: the demands met, the rest waits
    assert t.push(10, 10.0) == {"a": ([0, 1, 4], [1, 1, 1]), "b": ([2, 3], [1, 1])}
    assert t.next == 5 and t.standing("a", 10.0)[0] == 0
    # b asked for 4 having seen 0 grants; 2 were granted to it since: 2 more stand
    assert t.request("b", 4, 10.0, 10, 30.0, 0, 1) == ([5, 6], [1, 1])
    assert t.standing("b", 10.0) == (0, 10.0 + DEMAND_TTL)
    t.request("b", 5, 11.0, 10, 30.0, 4, 1)  # takes 7, 8, 9; 2 stand
    assert t.standing("b", 11.0) == (2, 11.0 + DEMAND_TTL)
    t.request("b", 0, 11.5, 10, 30.0, 7, 1)  # its members left: withdrawn
    assert t.push(12, 11.5) == {} and t.next == 10
    t.request("a", 5, 12.0, 12, 30.0, 3, 1)  # takes 10, 11; 3 stand until 12 + DEMAND_TTL
    assert t.push(13, 12.0 + DEMAND_TTL - 0.1) == {"a": ([12], [1])}
    assert t.push(14, 12.0 + DEMAND_TTL) == {}  # lapsed (a died, or did not ask again in time)
    assert "a" not in t.wants and t.next == 13


def test_a_dumped_table_keeps_its_demands_and_pushes_what_the_original_pushes() -> None:
    a = LeaseTable(0)
    a.request("x", 5, 1.0, 0, 30.0, 0, 1)
    a.request("y", 5, 1.0, 0, 30.0, 0, 3)
    a.push(3, 1.0)
    b = LeaseTable.load(a.dump())
    assert a.push(9, 2.0) == b.push(9, 2.0)
    assert a.dump() == b.dump()
    old = LeaseTable.load((4, {}, {}))  # a dump from before standing demands
    assert old.wants == {} and old.push(9, 1.0) == {}
