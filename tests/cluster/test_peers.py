"""ClusterPeers and the broker's side of the Peers contract: interest refcounts, forwarding once per
node, cluster-wide shared groups, and batches applied once per sequence id.

The broker, its sessions and the batches are real; the peer links are stand-ins that record what
is queued for each peer (the gRPC links themselves are tested end to end in
tests/e2e/test_cluster_data_plane.py).
"""

from __future__ import annotations

import gevent
import gevent.event

from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.broker.message import Message
from fluxmq.cluster.batch import Outgoing, build_batch, decode_items
from fluxmq.cluster.peers import ClusterPeers
from fluxmq.cluster.proto import cluster_pb2 as pb
from fluxmq.storage.records import encode_message
from tests.broker.test_session import RecordingDelivery


class RecordingPeers:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.forwarded: list[str] = []

    def interest_added(self, filter: str) -> None:
        self.events.append(("+", filter))

    def interest_removed(self, filter: str) -> None:
        self.events.append(("-", filter))

    def matches(self, topic):
        return False

    def forward(self, message, groups):
        self.forwarded.append(message.topic)
        return groups


class StandInLink:
    def __init__(self, connected: bool = True) -> None:
        self.connected = connected
        self.queued: list[Outgoing] = []

    def retry_now(self) -> None:  # (the peer's snapshot came: ends a real link's backoff)
        pass

    def enqueue(self, entry: Outgoing) -> bool:
        self.queued.append(entry)
        return True


class StandInTransport:
    def __init__(self, *names: str) -> None:
        self.links = {n: StandInLink() for n in names}

    def interest_changed(self, filter, added):
        return []


def online(broker: Broker, client_id: str):
    session, _ = broker.open_session(client_id, True, 0)
    delivery = RecordingDelivery()
    broker.attach(session, delivery, 100)
    return session, delivery


def batch(
    sender: str, epoch: int, seq: int, messages=(), interest=(), snapshot=False, groups=(), match_local=True
):
    entries = [Outgoing(encode_message(m), tuple(groups), match_local, m.expires_at) for m in messages]
    return build_batch(sender, epoch, seq, entries, interest, snapshot)[0]


def test_broker_tells_peers_a_filter_on_first_and_last_subscription() -> None:
    broker = Broker()
    a, _ = online(broker, "a")
    b, _ = online(broker, "b")
    broker.subscribe(a, "t/#", 1)
    peers = RecordingPeers()
    broker.set_peers(peers)  # replays what is held already
    assert peers.events == [("+", "t/#")]
    broker.subscribe(b, "t/#", 1)
    broker.subscribe(a, "t/#", 0)  # a replaced subscription is not a new one
    broker.subscribe(b, "$share/g/x", 1)
    assert peers.events == [("+", "t/#"), ("+", "$share/g/x")]
    broker.unsubscribe(a, "t/#")
    assert peers.events[-1] == ("+", "$share/g/x")
    broker.close_session(b, b.delivery, True)  # expiry 0: the session ends, its filters go
    assert peers.events[-2:] == [("-", "t/#"), ("-", "$share/g/x")]
    assert broker.interest_filters() == []


class AckLaterPeers(RecordingPeers):
    """Peers whose acknowledgement of a new filter comes once ``acked`` is set (``interest_added``
    waits for it, as ``ClusterPeers`` waits for the reachable peers)."""

    interest_sync_timeout = 10.0

    def __init__(self) -> None:
        super().__init__()
        self.acked = gevent.event.Event()

    def interest_added(self, filter: str) -> None:
        super().interest_added(filter)
        self.acked.wait(self.interest_sync_timeout)


def test_a_subscription_made_while_its_filter_is_on_its_way_to_the_peers_waits_for_them_too() -> None:
    """Not only the first subscription to a filter new to the node: one made while the peers have
    not acknowledged it yet returns (its SUBACK, an Observe's 2.05, a stream's start) after them."""
    broker = Broker()
    a, _ = online(broker, "a")
    b, _ = online(broker, "b")
    peers = AckLaterPeers()
    broker.set_peers(peers)
    returned: list[str] = []

    def subscribe(session, name: str) -> None:
        broker.subscribe(session, "t/#", 1)
        returned.append(name)

    first = gevent.spawn(subscribe, a, "a")
    gevent.sleep(0)  # a's subscription waits for the peers
    second = gevent.spawn(subscribe, b, "b")
    gevent.sleep(0)
    gevent.sleep(0)
    assert returned == []
    peers.acked.set()
    gevent.joinall([first, second], timeout=5)
    assert sorted(returned) == ["a", "b"]
    assert peers.events == [("+", "t/#")]  # told once


def test_publish_from_peer_delivers_locally_and_is_never_forwarded() -> None:
    broker = Broker()
    s, d = online(broker, "s")
    broker.subscribe(s, "t/+", 1)
    peers = RecordingPeers()
    broker.set_peers(peers)
    assert broker.publish_from_peer(Message("t/1", b"x", 1), (), True) == 1
    assert peers.forwarded == []
    assert broker.publish_from_peer(Message("t/1", b"x", 1), (), False) == 0  # only groups asked for
    broker.publish(Message("t/2", b"y", 1))
    assert peers.forwarded == ["t/2"]
    assert [sent[0] for sent in d.sent] == ["t/1", "t/2"]


def test_a_retried_batch_is_applied_once() -> None:
    broker = Broker()
    s, d = online(broker, "s")
    broker.subscribe(s, "t", 1)
    peers = ClusterPeers("n1", broker, StandInTransport("n2"))
    b1 = batch("n2", 7, 1, [Message("t", b"1", 1)])
    assert peers.apply_batch(b1).seq == 1
    assert peers.apply_batch(b1).seq == 1  # the same batch again (its ack was lost): acked, skipped
    peers.apply_batch(batch("n2", 7, 2, [Message("t", b"2", 1)]))
    peers.apply_batch(batch("n2", 8, 1, [Message("t", b"3", 1)]))  # n2 restarted: a new epoch
    assert [sent[0] for sent in d.sent] == ["t", "t", "t"]
    assert peers.duplicate_batches == 1


def test_interest_deltas_then_a_snapshot_replaces_them() -> None:
    peers = ClusterPeers("n1", Broker(), StandInTransport("n2"))
    peers.apply_batch(batch("n2", 1, 1, interest=[("a/#", True), ("b", True), ("b", False)]))
    assert peers.remote.filters("n2") == {"a/#"}
    peers.apply_batch(batch("n2", 1, 2, interest=[("c", True), ("$share/g/d", True)], snapshot=True))
    assert peers.remote.filters("n2") == {"c", "$share/g/d"}
    assert peers.remote.match("a/x") == ([], {})
    assert peers.remote.match("d") == ([], {"$share/g/d": ["n2"]})


def test_forward_queues_once_per_node_with_matching_interest() -> None:
    broker = Broker()
    transport = StandInTransport("n2", "n3")
    peers = ClusterPeers("n1", broker, transport)
    broker.set_peers(peers)
    peers.apply_batch(batch("n2", 1, 1, interest=[("t/#", True), ("t/+", True), ("t/1", True)]))
    peers.apply_batch(batch("n3", 1, 1, interest=[("other", True)]))
    broker.publish(Message("t/1", b"x", 1, False, {0x26: [("k", "v")]}))
    assert len(transport.links["n2"].queued) == 1
    assert transport.links["n3"].queued == []
    entry = transport.links["n2"].queued[0]
    assert entry.match_local and entry.groups == ()
    [(m, groups, match_local)] = list(decode_items(build_batch("n1", 1, 1, [entry])[0].items))
    assert (m.topic, m.payload, m.qos, m.properties) == ("t/1", b"x", 1, {0x26: [("k", "v")]})
    assert groups == () and match_local


def test_shared_group_message_goes_to_one_node_of_the_cluster() -> None:
    broker = Broker(BrokerSettings(shared_subscription_strategy="round_robin"))
    local, d = online(broker, "local")
    broker.subscribe(local, "$share/g/t", 1)
    transport = StandInTransport("n2", "n3")
    peers = ClusterPeers("n1", broker, transport)
    broker.set_peers(peers)
    peers.apply_batch(batch("n2", 1, 1, interest=[("$share/g/t", True)]))
    peers.apply_batch(batch("n3", 1, 1, interest=[("t", True)]))  # a normal subscriber, no member
    for i in range(9):
        broker.publish(Message("t", str(i).encode(), 1))
    to_n2 = transport.links["n2"].queued
    to_n3 = transport.links["n3"].queued
    assert len(d.sent) + len(to_n2) == 9  # each message to exactly one member node
    assert len(d.sent) >= 3 and len(to_n2) >= 3
    assert all(e.groups == ("$share/g/t",) and not e.match_local for e in to_n2)
    assert len(to_n3) == 9 and all(e.groups == () and e.match_local for e in to_n3)
    # the receiving side delivers a group's message to one local member
    receiver = Broker()
    m1, d1 = online(receiver, "m1")
    m2, d2 = online(receiver, "m2")
    receiver.subscribe(m1, "$share/g/t", 1)
    receiver.subscribe(m2, "$share/g/t", 1)
    rpeers = ClusterPeers("n2", receiver, StandInTransport("n1"))
    rpeers.apply_batch(build_batch("n1", 1, 1, to_n2)[0])
    assert len(d1.sent) + len(d2.sent) == len(to_n2)


def test_a_node_that_reported_its_group_busy_is_passed_over() -> None:
    broker = Broker()
    local, d = online(broker, "local")
    broker.subscribe(local, "$share/g/t", 1)
    transport = StandInTransport("n2")
    peers = ClusterPeers("n1", broker, transport)
    broker.set_peers(peers)
    peers.apply_batch(batch("n2", 1, 1, interest=[("$share/g/t", True)]))
    peers.on_ack("n2", pb.BatchAck(seq=1, busy_groups=["$share/g/t"]))
    for i in range(4):
        broker.publish(Message("t", str(i).encode(), 1))
    assert len(d.sent) == 4 and transport.links["n2"].queued == []


def test_a_damaged_batch_is_acknowledged_and_counted_not_raised() -> None:
    broker = Broker()
    peers = ClusterPeers("n1", broker, StandInTransport("n2"))
    good = batch("n2", 1, 1, [Message("t", b"1", 1)])
    damaged = pb.Batch(sender="n2", epoch=1, seq=2, items=good.items[:-2], count=1)
    assert peers.apply_batch(damaged).seq == 2
    assert peers.bad_batches == 1


def test_restored_subscriptions_are_announced_when_peers_are_installed(tmp_path) -> None:
    from tests.storage.test_broker_restore import Node

    node = Node(tmp_path / "data")
    a, da, _ = node.connect("a", 3600)
    b, db, _ = node.connect("b", 3600)
    node.broker.subscribe(a, "t/#", 1)
    node.broker.subscribe(b, "t/#", 1)
    node.broker.subscribe(b, "$share/g/u", 1)
    node.storage.commit()
    node.disconnect(a, da)
    node.disconnect(b, db)
    restarted = node.restart()
    peers = RecordingPeers()
    restarted.broker.set_peers(peers)
    assert sorted(peers.events) == [("+", "$share/g/u"), ("+", "t/#")]
    # counted per subscription: the filter stays while one restored session still holds it
    session = restarted.broker.sessions["a"]
    restarted.broker.unsubscribe(session, "t/#")
    assert ("-", "t/#") not in peers.events
    restarted.storage.close()


class _FailingDelivery(RecordingDelivery):
    """Raises while sending one payload (a fault in a delivery: a bug, a store that fails)."""

    def __init__(self, bad: bytes) -> None:
        super().__init__()
        self.bad = bad
        self.payloads: list[bytes] = []

    def send_publish(self, message, qos, retain, packet_id, dup, subscription_ids) -> bool:
        if message.payload == self.bad:
            raise RuntimeError("delivery failed")
        self.payloads.append(message.payload)
        return super().send_publish(message, qos, retain, packet_id, dup, subscription_ids)


def test_a_forwarded_message_whose_delivery_raises_is_skipped_and_the_rest_of_the_batch_delivered(
    caplog,
) -> None:
    """The plain messages of a batch go through the C relay's fan-out (``deliver_items``); one whose
    delivery raised there stopped the batch, and where the relay stopped was unknown: the messages
    after it, accepted by their publishers on the peer, were lost. Only the failing one is skipped
    now (counted and logged), as on the Python path, with the relay on and off."""
    from fluxmq.protocol.connection import RELAY

    for relay in (RELAY, None):
        broker = Broker()
        broker.relay = relay
        session, _ = broker.open_session("s", True, 0)
        delivery = _FailingDelivery(b"2")
        broker.attach(session, delivery, 100)
        broker.subscribe(session, "t", 1)
        peers = ClusterPeers("n1", broker, StandInTransport("n2"))
        caplog.clear()
        messages = [Message("t", b"%d" % i, i % 2) for i in range(1, 6)]
        assert peers.apply_batch(batch("n2", 1, 1, messages)).seq == 1
        assert delivery.payloads == [b"1", b"3", b"4", b"5"], relay
        assert peers.failed_messages == 1 and peers.bad_batches == 0
        assert peers.received_messages == 5
        assert [r for r in caplog.records if r.getMessage() == "forwarded_publish_failed"]
        if relay is not None:
            assert relay.forwarded >= 4  # served in C, not handed to the Python path


def test_a_batch_stored_before_a_kill_is_skipped_when_retried_after_the_restart(tmp_path) -> None:
    """The receiver is killed after it stored a batch for a persistent session but before its ack
    reached the sender, which sends that batch again to the restarted node (same sender epoch and
    sequence id): skipped, so the session holds the message once (a QoS 2 message stays exactly once).
    A batch whose commit the kill lost is applied again when retried (nothing lost)."""
    from tests.storage.test_broker_restore import Node

    node = Node(tmp_path / "data")
    s, d, _ = node.connect("sub", 3600)
    node.broker.subscribe(s, "t", 2)
    node.disconnect(s, d)
    peers = ClusterPeers("n1", node.broker, StandInTransport("n2"))
    stored = batch("n2", 7, 1, [Message("t", b"1", 2)])
    lost = batch("n2", 7, 2, [Message("t", b"2", 1)])
    peers.apply_batch(stored)
    node.storage.commit()
    peers.apply_batch(lost)  # its commit never happens: the kill comes first
    node = node.restart()
    peers = ClusterPeers("n1", node.broker, StandInTransport("n2"))
    assert peers.apply_batch(stored).seq == 1  # acknowledged again, not applied
    assert peers.duplicate_batches == 1
    assert peers.apply_batch(lost).seq == 2
    assert peers.duplicate_batches == 1
    node.storage.commit()
    s, d, _ = node.connect("sub", 3600)
    assert [(topic, qos) for topic, qos, *_ in d.sent] == [("t", 2), ("t", 1)]
    node.storage.abort()


def test_a_batch_that_stores_nothing_costs_no_commit(tmp_path) -> None:
    """Recording the batch as applied rides on the commit of what it stored: a batch delivered only
    to clean sessions leaves nothing to commit."""
    from tests.storage.test_broker_restore import Node

    node = Node(tmp_path / "data")
    s, _d, _ = node.connect("clean", 0, clean=True)
    node.broker.subscribe(s, "t", 1)
    node.storage.commit()
    peers = ClusterPeers("n1", node.broker, StandInTransport("n2"))
    peers.apply_batch(batch("n2", 7, 1, [Message("t", b"1", 1)]))
    assert not node.storage.has_pending
    node.storage.abort()


def test_the_ack_of_a_batch_that_stored_anything_leaves_only_after_its_commit(tmp_path) -> None:
    """The receiving stream (the transport's servicer over ``ClusterPeers.receive``, as a node wires
    it) answers a batch stored for a persistent session only once the commit holding it is done:
    the sender drops an acknowledged batch, so an ack sent before the commit and a kill between
    them lost the batch. The ack waits for the turn's commit (none of its own); a batch that stored
    nothing is acknowledged at once. Meanwhile the stream reads and applies the batches after it
    (pipelined: it read no further batch until the commit, one fsync wait per stored batch under
    ``storage.sync: always``), and the acks leave in order, each once its own commit is done.
    Real LMDB and broker; here the test makes the turn's commits."""
    import gevent
    from gevent.queue import Queue

    from fluxmq.cluster.transport import _Servicer
    from tests.storage.test_broker_restore import Node

    class Receiving:  # the transport's side the servicer reads
        def __init__(self, on_batch) -> None:
            self.on_batch = on_batch

    def stream(peers, feed: Queue, got: list):
        def requests():
            while (b := feed.get()) is not None:
                yield b

        acks = _Servicer(Receiving(peers.receive)).Route(requests(), None)
        return gevent.spawn(lambda: [got.append(a.seq) for a in acks])

    def settle(cond) -> bool:
        for _ in range(200):  # bounded: 2 s
            if cond():
                return True
            gevent.sleep(0.01)
        return cond()

    node = Node(tmp_path / "data")
    s, d, _ = node.connect("sub", 3600)
    node.broker.subscribe(s, "t", 1)
    c, _dc, _ = node.connect("clean", 0, clean=True)
    node.broker.subscribe(c, "c", 1)
    node.disconnect(s, d)
    peers = ClusterPeers("n1", node.broker, StandInTransport("n2"))
    batches = [
        batch("n2", 7, 1, [Message("c", b"0", 1)]),  # only a clean session: nothing stored
        batch("n2", 7, 2, [Message("t", b"1", 1)]),  # stored for the persistent session
        batch("n2", 7, 3, [Message("c", b"2", 1)]),  # nothing stored, behind a pending ack
        batch("n2", 7, 4, [Message("t", b"3", 1)]),
        batch("n2", 7, 5, [Message("t", b"4", 1)]),
    ]
    feed: Queue = Queue()
    got: list[int] = []
    acks = stream(peers, feed, got)
    feed.put(batches[0])
    assert settle(lambda: got == [1])  # at once: nothing to commit
    assert not node.storage.has_pending
    for b in batches[1:3]:
        feed.put(b)
    assert settle(lambda: peers.received_batches == 3)  # applied while 2's commit is pending
    gevent.sleep(0.3)
    assert got == [1] and node.storage.has_pending  # stored, not committed: no ack, nor 3's after it
    node.storage.commit()  # the turn's commit
    assert settle(lambda: got == [1, 2, 3])
    feed.put(batches[3])
    assert settle(lambda: node.storage.has_pending)
    node.storage.commit()  # 4's commit ...
    feed.put(batches[4])
    assert settle(lambda: peers.received_batches == 5)
    assert settle(lambda: got == [1, 2, 3, 4])
    gevent.sleep(0.3)
    assert got == [1, 2, 3, 4]  # ... not 5's: its ack waits for its own commit
    acks.kill()
    node = node.restart()  # killed before that commit: batch 5 was never acknowledged ...
    peers = ClusterPeers("n1", node.broker, StandInTransport("n2"))
    feed, got = Queue(), []
    acks = stream(peers, feed, got)
    for b in batches[3:]:
        feed.put(b)  # ... so it comes again, after 4 (committed: skipped)
    feed.put(None)
    assert settle(lambda: peers.received_batches + peers.duplicate_batches == 2)
    node.storage.commit()
    acks.get(timeout=10)
    assert got == [4, 5]
    assert peers.duplicate_batches == 1
    s, d, _ = node.connect("sub", 3600)
    assert [topic for topic, *_ in d.sent] == ["t", "t", "t"]  # each once
    node.storage.abort()
