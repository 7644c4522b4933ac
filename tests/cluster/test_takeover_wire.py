"""The exactness check of a session takeover, over real TCP: two in-process brokers (A on a real
LMDBStorage, B in memory), each with a real TCPListener on 127.0.0.1, and raw MQTT 5.0 clients on
gevent sockets. Ownership and the takeover RPC are the in-process doubles of test_handover.py
(etcd and gRPC are built elsewhere); the two-process version comes with the transport.

The client has, on A: QoS 1 and QoS 2 in flight outbound (one QoS 2 PUBREC'd, PUBREL sent, no
PUBCOMP), five messages queued behind its Receive Maximum, and an inbound QoS 2 awaiting PUBREL.
Reconnecting to B it gets exactly: the in-flight PUBLISHes again with DUP, the PUBREL again, every
queued message once, its resent inbound QoS 2 acknowledged and not routed a second time, and its
subscriptions with No Local and their subscription identifiers."""

from __future__ import annotations

from pathlib import Path

import gevent
import pytest

from fluxmq._core import codec as c
from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.cluster.handover import TAKEOVER_KIND, takeover_handler
from fluxmq.protocol.flush import FlushScheduler
from fluxmq.protocol.settings import ProtocolSettings
from fluxmq.storage.lmdb import LMDBStorage
from fluxmq.transport.tcp import TCPListener
from tests.cluster.test_handover import Network, NodePeers, Ownership, Registry
from tests.transport.harness import HOST, MQTTPeer, SocketTransport, tcp_connect

WAIT = 10.0
PROPS = {
    c.CONTENT_TYPE: "text/plain",
    c.USER_PROPERTY: [("k", "v1"), ("k", "v2")],
    c.CORRELATION_DATA: b"\x01",
}


class InProcessNode:
    def __init__(self, name: str, registry: Registry, network: Network, path: Path | None) -> None:
        self.storage = LMDBStorage(path, map_size=32 << 20) if path is not None else None
        self.broker = Broker(BrokerSettings(node_id=name), self.storage)
        if self.storage is not None:
            self.broker.restore(self.storage.load())
        self.broker.set_peers(NodePeers(Ownership(registry, name), network.caller(name), timeout=5.0))
        network.handle(name, TAKEOVER_KIND, takeover_handler(self.broker))
        self.listener = TCPListener(
            name, HOST, 0, self.broker, ProtocolSettings(), FlushScheduler(self.storage)
        )
        self.listener.start()
        self.port = self.listener.address[1]

    def stop(self) -> None:
        self.listener.stop_accepting()
        self.broker.shutdown()
        for conn in list(self.listener.connections):
            conn.close(0x8B, "test over")
        self.listener.wait_closed(WAIT)
        if self.storage is not None:
            self.storage.close()


@pytest.fixture
def nodes(tmp_path: Path):
    registry, network = Registry(), Network()
    made = [
        InProcessNode("A", registry, network, tmp_path / "a"),
        InProcessNode("B", registry, network, None),
    ]
    yield made
    for node in made:
        node.stop()


def client(node: InProcessNode, cid: str, clean: bool = True, receive_max: int = 100):
    peer = MQTTPeer(SocketTransport(tcp_connect(node.port)), version=5)
    props = {c.SESSION_EXPIRY_INTERVAL: 3600, c.RECEIVE_MAXIMUM: receive_max}
    peer.send(c.Connect(client_id=cid, clean_start=clean, keepalive=60, protocol_version=5, properties=props))
    connack = peer.expect(c.Connack)
    assert connack.reason_code == 0, connack
    return peer, connack


def subscribe(peer: MQTTPeer, pid: int, sub: c.Subscription, sub_id: int) -> None:
    peer.send(c.Subscribe(pid, [sub], {c.SUBSCRIPTION_IDENTIFIER: sub_id}))
    assert peer.expect(c.Suback).reason_codes[0] < 0x80


def publish_qos1(peer: MQTTPeer, pid: int, topic: str, payload: bytes, props: dict | None = None) -> None:
    peer.send(c.Publish(topic, payload, 1, packet_id=pid, properties=props))
    assert peer.expect(c.Puback).packet_id == pid


def received(p) -> tuple:
    props = dict(p.properties or {})
    return (p.topic, p.payload, p.qos, p.dup, props.pop(c.SUBSCRIPTION_IDENTIFIER, None), props)


def collect_until(peer: MQTTPeer, topic: str) -> list:
    """Every packet until the PUBLISH of ``topic`` (kept as the last)."""
    out = []
    with gevent.Timeout(WAIT, AssertionError(f"no {topic} within {WAIT}s: {out!r}")):
        while True:
            p = peer.recv(WAIT)
            out.append(p)
            if isinstance(p, c.Publish) and p.topic == topic:
                return out


def test_takeover_over_tcp_delivers_exactly_what_qos_allows(nodes) -> None:
    a, b = nodes
    # -- on A ----------------------------------------------------------------------------------------
    old, connack = client(a, "mover", clean=False, receive_max=3)
    assert not connack.session_present
    subscribe(old, 1, c.Subscription("a/#", 2, no_local=True), 7)
    subscribe(old, 2, c.Subscription("b/#", 1), 9)
    watch_a, _ = client(a, "watch-a")
    subscribe(watch_a, 1, c.Subscription("in/#", 2), 1)
    pub, _ = client(a, "pub-a")
    publish_qos1(pub, 1, "a/1", b"one", PROPS)
    pub.send(c.Publish("a/2", b"two", 2, packet_id=2, properties=PROPS))
    pub.expect(c.Pubrec)
    pub.send(c.Pubrel(2))
    pub.expect(c.Pubcomp)
    publish_qos1(pub, 3, "b/3", b"three")
    for i in range(5):
        publish_qos1(pub, 10 + i, f"a/q{i}", f"q{i}".encode(), PROPS)
    first = [old.expect(c.Publish) for _ in range(3)]  # Receive Maximum 3: the rest is queued
    assert [(p.topic, p.qos, p.packet_id, p.dup) for p in first] == [
        ("a/1", 1, 1, False),
        ("a/2", 2, 2, False),
        ("b/3", 1, 3, False),
    ]
    old.send(c.Pubrec(2))  # outbound QoS 2 PUBREC'd ...
    assert old.expect(c.Pubrel).packet_id == 2  # ... PUBREL sent, PUBCOMP never comes
    old.send(c.Publish("in/x", b"inbound", 2, packet_id=50, properties=PROPS))  # inbound QoS 2 ...
    assert old.expect(c.Pubrec).packet_id == 50  # ... PUBREC'd, PUBREL never comes
    got = watch_a.expect(c.Publish)
    assert (got.topic, got.payload) == ("in/x", b"inbound")
    watch_a.send(c.Pubrec(got.packet_id))
    watch_a.expect(c.Pubrel)
    watch_a.send(c.Pubcomp(got.packet_id))
    session_a = a.broker.sessions["mover"]
    assert len(session_a.queue) == 5 and sorted(session_a.inflight) == [1, 2, 3]

    # -- the client reconnects to B ------------------------------------------------------------------
    watch_b, _ = client(b, "watch-b")
    subscribe(watch_b, 1, c.Subscription("in/#", 2), 1)
    new, connack = client(b, "mover", clean=False)
    assert connack.session_present
    assert old.wait_closed(WAIT)
    assert [(type(p), getattr(p, "reason_code", None)) for p in old.packets] == [(c.Disconnect, 0x8E)]
    assert "mover" not in a.broker.sessions

    # Resent first, in order: PUBLISH 1 (DUP), PUBREL 2, PUBLISH 3 (DUP); then the queue, once each.
    pub_b, _ = client(b, "pub-b")
    publish_qos1(pub_b, 1, "b/sentinel", b"end")
    packets = collect_until(new, "b/sentinel")
    assert [(type(p).__name__, p.packet_id) for p in packets[:3]] == [
        ("Publish", 1),
        ("Pubrel", 2),
        ("Publish", 3),
    ]
    assert received(packets[0]) == ("a/1", b"one", 1, True, [7], PROPS)
    assert received(packets[2]) == ("b/3", b"three", 1, True, [9], {})
    rest = [received(p) for p in packets[3:]]
    assert rest == [(f"a/q{i}", f"q{i}".encode(), 1, False, [7], PROPS) for i in range(5)] + [
        ("b/sentinel", b"end", 1, False, [9], {})
    ]
    assert len({p.packet_id for p in packets if isinstance(p, c.Publish)}) == len(rest) + 2  # no id reused

    # The resent inbound QoS 2 (as if its PUBREC was lost) is acknowledged, not routed again.
    new.send(c.Publish("in/x", b"inbound", 2, dup=True, packet_id=50, properties=PROPS))
    assert new.expect(c.Pubrec).packet_id == 50
    new.send(c.Pubrel(50))
    assert new.expect(c.Pubcomp).packet_id == 50
    # No Local still holds: its own publish on a/# is not sent back; another client's is.
    publish_qos1(new, 60, "a/own", b"mine")
    publish_qos1(pub_b, 2, "a/other", b"theirs")
    after = collect_until(new, "a/other")
    assert [received(p)[:2] for p in after if isinstance(p, c.Publish)] == [("a/other", b"theirs")]
    publish_qos1(pub_b, 3, "in/sentinel", b"end")
    seen = [received(p)[:2] for p in collect_until(watch_b, "in/sentinel") if isinstance(p, c.Publish)]
    assert seen == [("in/sentinel", b"end")]  # in/x was not delivered a second time

    # A's storage holds nothing of the session any more (the hand-over removed it).
    a.storage.commit()
    assert "mover" not in a.storage.load().sessions
    for peer in (new, pub, pub_b, watch_a, watch_b):
        peer.send(c.Disconnect(0))


@pytest.mark.parametrize("version, code", [(5, 0x88), (4, 3)])
def test_a_claim_that_cannot_be_made_answers_server_unavailable(nodes, version: int, code: int) -> None:
    """No quorum (or the owner does not answer): CONNACK 0x88, 3.1.1 return code 3 (Server unavailable)."""
    a, _ = nodes
    a.broker.peers.ownership.registry.down = True
    peer = MQTTPeer(SocketTransport(tcp_connect(a.port)), version=version)
    peer.send(c.Connect(client_id="refused", clean_start=False, keepalive=60, protocol_version=version))
    connack = peer.expect(c.Connack)
    assert connack.reason_code == code and not connack.session_present
    assert peer.wait_closed(WAIT)
    assert "refused" not in a.broker.sessions


def test_a_311_client_moves_with_a_plain_close_and_its_queue(nodes) -> None:
    a, b = nodes
    old = MQTTPeer(SocketTransport(tcp_connect(a.port)), version=4)
    old.send(c.Connect(client_id="mover311", clean_start=False, keepalive=60, protocol_version=4))
    assert not old.expect(c.Connack).session_present
    old.send(c.Subscribe(1, [c.Subscription("q/#", 1)]))
    old.expect(c.Suback)
    old.send(c.Disconnect())
    assert old.wait_closed(WAIT)
    pub, _ = client(a, "pub311")
    for i in range(3):
        publish_qos1(pub, i + 1, f"q/{i}", f"m{i}".encode())
    live = MQTTPeer(SocketTransport(tcp_connect(a.port)), version=4)  # online again on A, then moves
    live.send(c.Connect(client_id="mover311", clean_start=False, keepalive=60, protocol_version=4))
    assert live.expect(c.Connack).session_present
    first = [live.expect(c.Publish) for _ in range(3)]  # delivered on A, never acknowledged
    new = MQTTPeer(SocketTransport(tcp_connect(b.port)), version=4)
    new.send(c.Connect(client_id="mover311", clean_start=False, keepalive=60, protocol_version=4))
    assert new.expect(c.Connack).session_present
    assert live.wait_closed(WAIT) and live.packets == []  # 3.1.1: a plain close, no packet
    again = [new.expect(c.Publish) for _ in range(3)]
    assert [(p.topic, p.packet_id, p.dup) for p in again] == [(p.topic, p.packet_id, True) for p in first]
    for p in again:
        new.send(c.Puback(p.packet_id))
    publish_qos1(new, 9, "q/own", b"x")  # no No Local in 3.1.1: it comes back
    assert new.expect(c.Publish).topic == "q/own"


def test_a_client_leaving_a_draining_node_resumes_elsewhere_with_nothing_lost(nodes) -> None:
    """Graceful stop of A: its connections are closed (0x8B) but its persistent sessions stay owned by
    A while it drains, so the client reconnecting to B takes its whole session over from A."""
    a, b = nodes
    old, _ = client(a, "drained", clean=False)
    subscribe(old, 1, c.Subscription("d/#", 1), 4)
    pub, _ = client(a, "pub-d")
    publish_qos1(pub, 1, "d/1", b"one")
    first = old.expect(c.Publish)  # in flight, never acknowledged
    a.listener.stop_accepting()
    a.broker.shutdown()
    assert old.wait_closed(WAIT)
    assert [(type(p), p.reason_code) for p in old.packets] == [(c.Disconnect, 0x8B)]
    new, connack = client(b, "drained", clean=False)
    assert connack.session_present
    again = new.expect(c.Publish)
    assert (again.topic, again.packet_id, again.dup) == ("d/1", first.packet_id, True)
    assert received(again)[4] == [4]
