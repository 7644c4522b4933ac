"""Delivery leases (fluxmq/replication/lease.py): the same commands give the same grants."""

from __future__ import annotations

from fluxmq.replication.lease import LeaseTable


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
