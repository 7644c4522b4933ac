"""The workers of one node as a local cluster (``fluxmq.cluster.workers.WorkerNode``): their links
batch by ``server.workers_batch_max_size``, not by the bound between nodes. Two real WorkerNodes
(brokers, Unix-socket transport) in this process."""

from __future__ import annotations

import time

import gevent

from fluxmq.cluster.workers import WorkerNode
from fluxmq.config.loader import load_config
from tests.protocol.test_publish_relay import Net
from tests.protocol.test_publish_relay_workers import Context


def test_links_between_workers_batch_by_their_own_bound(tmp_path) -> None:
    config = load_config(
        env={},
        overrides=[
            "server.workers=2",
            "server.workers_batch_max_size=3000",
            "cluster.transport.route_batch_max_size=10",
        ],
    )
    nodes = []
    for i in range(2):
        run = tmp_path / f"run{i}"
        run.mkdir()
        nodes.append(WorkerNode(Context(i, 2, str(run), sockets_dir=str(tmp_path)), Net().broker, config))
    for node in nodes:
        node.start()
    try:
        deadline = time.monotonic() + 10
        while not all(n.transport.reachable() for n in nodes):
            assert time.monotonic() < deadline, "the workers' links did not come up"
            gevent.sleep(0.01)
        link = nodes[0].transport.links[nodes[1].node_id]
        assert link.settings.batch_max_size == 3000
        before = link.stats.batches
        for i in range(3000):  # in one loop turn: the sender takes them when it next runs
            link.forward_queue.append("t", "pub", 0, i.to_bytes(4, "big"))
        assert link.drain(10)
        assert link.stats.batches - before == 1
        assert link.stats.messages >= 3000
        assert nodes[1].peers.received_messages == 3000
    finally:
        for node in nodes:
            node.stop(0.5)
