"""The workers of one node as a local cluster (``fluxmq.cluster.workers.WorkerNode``): their links
batch by ``server.workers_batch_max_size``, not by the bound between nodes. Two real WorkerNodes
(brokers, Unix-socket transport) in this process."""

from __future__ import annotations

import time

import gevent

from fluxmq.cluster.proto import cluster_pb2 as pb
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


def test_links_between_the_workers_of_a_cluster_node_batch_by_the_workers_bound(tmp_path) -> None:
    """On a cluster node (``cluster.enabled``) each worker is a member whose transport is a
    ``NodeWorkersTransport``: its links to the node's other workers (Unix sockets) batch by
    ``server.workers_batch_max_size``, its links to other nodes by ``route_batch_max_size``."""
    from dataclasses import replace

    from fluxmq.cluster.config import cluster_settings
    from fluxmq.cluster.unix import NodeWorkersTransport, _unix_server
    from fluxmq.cluster.workers import WorkerMember

    config = load_config(
        env={},
        overrides=[
            "server.workers=2",
            "server.workers_batch_max_size=3000",
            "cluster.transport.route_batch_max_size=10",
            "cluster.enabled=true",
            "cluster.node_id=n1",
            "cluster.etcd.endpoints=[http://127.0.0.1:1]",
        ],
    )
    settings = cluster_settings(config).transport
    received = []
    transports = []
    for i in range(2):
        context = Context(i, 2, str(tmp_path), node_name="n1", sockets_dir=str(tmp_path))
        member = WorkerMember.of(config, context, str(tmp_path / f"state{i}"))
        assert member.batch_max_size == 3000
        transports.append(
            NodeWorkersTransport(
                member.member_id,
                1,
                replace(settings, bind_addr=member.grpc_addr),
                lambda batch: (received.append(batch.count), pb.BatchAck(seq=batch.seq))[1],
                lambda: [],
                unix_addr=member.unix_addr,
                local_peers=member.local_peers,
                local_batch_max_size=member.batch_max_size,
            )
        )
    a, b = transports
    servers = [_unix_server(t, t.unix_addr) for t in transports]  # (the gRPC server is not needed)
    try:
        a.set_peers({"n2/w0": "127.0.0.1:1"})  # another node's member: the cluster bound
        assert a.links["n2/w0"].settings.batch_max_size == 10
        link = a.links["n1/w1"]
        assert link.settings.batch_max_size == 3000
        deadline = time.monotonic() + 10
        while not link.connected:
            assert time.monotonic() < deadline, "the link between the workers did not come up"
            gevent.sleep(0.01)
        before = link.stats.batches
        for i in range(3000):  # in one loop turn: the sender takes them when it next runs
            link.forward_queue.append("t", "pub", 0, i.to_bytes(4, "big"))
        assert link.drain(10)
        assert link.stats.batches - before == 1
        assert sum(received) == 3000
    finally:
        for t in transports:
            for node_id in list(t.links):
                t._remove(node_id)
        for server in servers:
            server.stop(timeout=0.2)
