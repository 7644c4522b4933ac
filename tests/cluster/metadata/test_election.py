"""Leader election under the node lease (fluxmq/cluster/metadata/election.py)."""

from __future__ import annotations

from tests.cluster.metadata.conftest import SHORT_TTL, crash, wait_for


def test_exactly_one_leader_and_failover_when_it_stops(meta_factory):
    metas = [meta_factory(f"n{i}") for i in range(3)]
    assert wait_for(lambda: sum(m.is_leader for m in metas) == 1)
    leader = next(m for m in metas if m.is_leader)
    leader.stop()
    rest = [m for m in metas if m is not leader]
    assert wait_for(lambda: sum(m.is_leader for m in rest) == 1)


def test_failover_when_the_leaders_lease_expires(meta_factory):
    a = meta_factory("a")
    assert wait_for(lambda: a.is_leader)
    b = meta_factory("b")
    assert not b.is_leader
    crash(a)
    assert wait_for(lambda: b.is_leader, timeout=SHORT_TTL * 5)
