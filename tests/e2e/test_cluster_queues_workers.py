"""Durable queues across two clustered nodes of two workers each (``server.workers: 2`` with
``cluster.enabled``; fluxmq/cluster/queue_nodes.py): a queue is owned by one node (etcd), then by
one worker of that node (CRC-32 over its worker count, which each worker announces in etcd), and
the workers of the other node send their appends and deliveries straight to that worker.

The two nodes share the session's etcd under a prefix of this module and are shared by its tests;
clients land on whichever worker accepts them. Every wait is bounded.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fluxmq.queues.placement import owner_index
from tests.conftest import NodeFactory
from tests.e2e.mqtt5raw import unique
from tests.e2e.test_cluster_etcd import Cluster
from tests.e2e.test_cluster_queues import append, join
from tests.e2e.test_cluster_workers import start_two_nodes, wait_for
from tests.e2e.test_queues import nothing_more, receive, settle

pytestmark = pytest.mark.e2e

WAIT = 15.0


@pytest.fixture(scope="module")
def nodes(etcd_server, tmp_path_factory):
    factory = NodeFactory(tmp_path_factory.mktemp("cqworkers"))
    try:
        started, prefix = start_two_nodes(factory, etcd_server.endpoint)
        yield started, etcd_server.endpoint, prefix
    finally:
        factory.close()


def recorded(endpoint: str, prefix: str, name: str) -> str | None:
    """The owner etcd records for queue ``name``."""
    return Cluster.value(SimpleNamespace(endpoint=endpoint, prefix=prefix), f"queues/{name}/owner")


def queue_on(worker: int, prefix: str) -> str:
    """A fresh queue name owned by worker ``worker`` of its node."""
    for _ in range(200):
        name = unique(prefix)
        if owner_index(name, 2) == worker:
            return name
    raise AssertionError(f"no name hashed to w{worker}")


@pytest.mark.parametrize("worker", [0, 1])
def test_appends_on_one_node_reach_a_group_on_the_other_once(nodes, worker: int) -> None:
    started, endpoint, prefix = nodes
    c1, c2 = started["c1"], started["c2"]
    name = queue_on(worker, "xqw")
    payloads = [f"m{i}".encode() for i in range(20)]
    assert append(c1, name, payloads) == [0] * 20
    assert recorded(endpoint, prefix, name) == "c1"  # the node, not one of its workers
    consumer = join(c2, name, "g")
    try:
        got = receive(consumer, 20, WAIT)
        assert sorted(m.payload for m in got) == sorted(payloads)
        for m in got:
            settle(consumer, name, "$ack", m)
        assert nothing_more(consumer)
    finally:
        consumer.disconnect()
    again = join(c2, name, "g")
    try:
        assert nothing_more(again, 1.0)
    finally:
        again.disconnect()


@pytest.mark.parametrize("worker", [0, 1])
def test_two_members_of_one_group_on_two_nodes_share_the_messages(nodes, worker: int) -> None:
    started, endpoint, prefix = nodes
    c1, c2 = started["c1"], started["c2"]
    name = queue_on(worker, "xqw-share")
    a = join(c2, name, "shared", auto_ack=True)  # c2 owns it: its subscribe claimed it
    b = join(c1, name, "shared", auto_ack=True)
    try:
        assert recorded(endpoint, prefix, name) == "c2"
        payloads = [f"s{i}".encode() for i in range(40)]
        assert append(c1, name, payloads) == [0] * 40
        got_a: list[bytes] = []
        got_b: list[bytes] = []

        def all_in() -> bool:
            for client, got in ((a, got_a), (b, got_b)):
                while not client.messages.empty():
                    got.append(client.messages.get().payload)
            return len(got_a) + len(got_b) >= 40

        assert wait_for(all_in, WAIT), (len(got_a), len(got_b))
        assert nothing_more(a) and nothing_more(b)
        assert sorted(got_a + got_b) == sorted(payloads)  # each once
        assert got_a and got_b
    finally:
        a.disconnect()
        b.disconnect()
