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
from tests.e2e.mqtt5raw import unique
from tests.e2e.test_cluster_etcd import Cluster
from tests.e2e.test_cluster_queues import crosses, two_members_share
from tests.e2e.test_cluster_workers import two_nodes_of_two_workers

pytestmark = pytest.mark.e2e

WAIT = 15.0


@pytest.fixture(scope="module")
def nodes(etcd_server, tmp_path_factory):
    yield from two_nodes_of_two_workers(etcd_server, tmp_path_factory.mktemp("cqworkers"))


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
    crosses(started["c1"], started["c2"], queue_on(worker, "xqw"), lambda n: recorded(endpoint, prefix, n))


@pytest.mark.parametrize("worker", [0, 1])
def test_two_members_of_one_group_on_two_nodes_share_the_messages(nodes, worker: int) -> None:
    started, endpoint, prefix = nodes
    two_members_share(
        started["c2"],
        started["c1"],
        queue_on(worker, "xqw-share"),
        lambda name: recorded(endpoint, prefix, name),
    )
