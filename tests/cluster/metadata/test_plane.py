"""MetadataPlane wired to a transport through CLUSTER.md's interface (call, handle, set_peers,
peer_state). The gRPC transport is another engineer's part and does not exist on this branch, so
``LoopbackTransport`` stands in for it: it routes ``call`` to the other plane's registered handler
in-process, which is what the real one does over gRPC."""

from __future__ import annotations

from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.broker.message import Message
from fluxmq.cluster.metadata import EtcdSettings
from fluxmq.cluster.metadata.plane import MetadataPlane
from tests.cluster.metadata.conftest import wait_for


class LoopbackTransport:
    registry: dict[str, LoopbackTransport] = {}

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.handlers: dict = {}
        self.peers: dict[str, str] = {}
        self.calls: list = []
        self.reachable: set[str] = set()
        LoopbackTransport.registry[node_id] = self

    def call(self, node_id: str, kind: str, payload: bytes, timeout: float) -> bytes:
        self.calls.append((node_id, kind, payload))
        return LoopbackTransport.registry[node_id].handlers[kind](self.node_id, payload)

    def handle(self, kind: str, fn) -> None:
        self.handlers[kind] = fn

    def set_peers(self, peers: dict[str, str]) -> None:
        self.peers = dict(peers)

    def peer_state(self) -> dict[str, dict]:
        return {node: {"reachable": node in self.reachable} for node in self.peers}


def test_a_plane_with_a_transport_fetches_large_payloads_and_follows_membership(
    etcd_server, etcd_prefix, tmp_path
):
    planes, transports, brokers = {}, {}, {}
    settings = EtcdSettings(
        endpoints=[etcd_server.endpoint], lease_ttl=2, prefix=etcd_prefix, hybrid_retained_size_threshold=16
    )
    try:
        for node in ("a", "b"):
            brokers[node] = Broker(BrokerSettings())
            planes[node] = MetadataPlane(
                settings, node, f"127.0.0.1:79{len(planes)}0", brokers[node], state_dir=tmp_path / node
            )
            transports[node] = LoopbackTransport(node)
            planes[node].attach_transport(transports[node])
            planes[node].start()
        assert wait_for(lambda: transports["a"].peers == {"b": "127.0.0.1:7910"})
        assert transports["b"].peers == {"a": "127.0.0.1:7900"}

        big = b"x" * 1000
        brokers["a"].publish(Message("big/one", big, 0, True))
        assert wait_for(lambda: brokers["b"].retained.get("big/one") is not None)
        assert brokers["b"].retained.get("big/one").payload == big
        assert transports["b"].calls == [("a", "retained.fetch", b"big/one")]

        assert planes["a"].health.check() == (True, "0/1 peers reachable")
        transports["a"].reachable.add("b")
        assert planes["a"].health.check() == (True, "")

        planes["b"].stop()
        assert wait_for(lambda: transports["a"].peers == {})
    finally:
        for plane in planes.values():
            plane.stop()
