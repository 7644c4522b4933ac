"""The owning node of each durable queue in etcd (fluxmq/cluster/metadata/queue_owners.py): claimed
once by the first node, never two owners, permanent (no lease), read by every node at start."""

from __future__ import annotations

import gevent
import pytest

from fluxmq.cluster.metadata.client import EtcdClient
from fluxmq.cluster.metadata.queue_owners import QueueOwners

ROUNDS = 20


@pytest.fixture
def owners_of(etcd_server, etcd_prefix):
    clients: list[EtcdClient] = []

    def make(node: str) -> QueueOwners:
        client = EtcdClient([etcd_server.endpoint], timeout=3.0)
        clients.append(client)
        return QueueOwners(client, etcd_prefix, node)

    yield make
    for client in clients:
        client.close()


def test_racing_nodes_end_with_one_owner_that_every_claim_returns(owners_of) -> None:
    nodes = [owners_of(f"n{i}") for i in range(4)]
    for r in range(ROUNDS):
        name = f"race-{r}"
        greenlets = [gevent.spawn(o.claim, name) for o in nodes]
        gevent.joinall(greenlets, raise_error=True)
        results = {g.value for g in greenlets}
        assert len(results) == 1, (name, results)
        (owner,) = results
        assert owner in {o.node for o in nodes}
        assert sum(o.claimed for o in nodes) == r + 1  # one transaction won each round
    # a claim made later (another node, nothing cached) returns the recorded owner
    late = owners_of("n9")
    assert late.claim("race-0") == nodes[0].owner("race-0")
    assert late.claimed == 0


def test_owners_are_read_at_start_and_outlive_their_node(owners_of, etcd_server, etcd_prefix) -> None:
    a = owners_of("a")
    assert a.claim("orders") == "a"
    assert a.claim("orders.audit") == "a"
    a.client.close()  # node a is gone: its records are not bound to any lease
    b = owners_of("b")
    assert b.owner("orders") is None  # nothing read yet
    assert b.load() == {"orders": "a", "orders.audit": "a"}
    assert b.owner("orders") == "a"
    assert b.claim("orders") == "a"
    assert b.claim("payments") == "b"
