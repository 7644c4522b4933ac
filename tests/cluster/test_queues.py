"""fluxmq/cluster/queues.py pieces that need no second worker: the ops' framing and a delivery
forwarded as its owner encoded it."""

from __future__ import annotations

from fluxmq._core.codec import USER_PROPERTY, Decoder, encode_publish
from fluxmq.broker.message import WIRE_V5_QOS1
from fluxmq.cluster.queues import _decode_ops, _encode_ops, forwarded_delivery


def test_ops_keep_their_order_headers_and_blobs() -> None:
    ops = [
        (["p", 1, "c1"], b"\x00\x01blob"),
        (["a", 1, "c1", "q", "g", 7, 0], b""),
        (["d", "x"], b"z" * 70000),
    ]
    assert list(_decode_ops(_encode_ops(ops))) == ops


def test_a_forwarded_delivery_is_the_owners_encoding_with_properties_read_from_it() -> None:
    props = {
        USER_PROPERTY: [("message-id", "q:3"), ("group-id", "g"), ("delivery-count", "2")],
        0x03: "text/plain",
    }
    data = encode_publish("$queue/q/k", b"payload!", 1, False, False, 1, props, 5)
    d = forwarded_delivery("$queue/q/k", data, 8, None, ("w0", "q", "g", 3))
    assert d.payload == b"payload!" and d.topic == "$queue/q/k" and d.qos == 1
    assert d.wire_cache[WIRE_V5_QOS1] is data  # sent to a 5.0 consumer as it is
    assert d.properties == Decoder(0, 5).feed(data)[0].properties  # decoded only when asked
    assert dict(d.properties[USER_PROPERTY])["delivery-count"] == "2"
    assert (
        forwarded_delivery("t", encode_publish("t", b"", 1, False, False, 1, None, 5), 0, None, ()).payload
        == b""
    )


class _StuckTransport:
    """A peer that never answers (the owner hung): what a worker queues for it stays queued."""

    def __init__(self) -> None:
        import gevent.event

        self.release = gevent.event.Event()
        self.calls = 0

    def call(self, node, kind, payload, timeout):
        self.calls += 1
        self.release.wait()
        raise ConnectionError("gone")

    def handle(self, kind, fn) -> None:
        pass


def test_what_waits_for_an_owner_is_bounded_and_a_publish_past_the_bound_is_refused(monkeypatch) -> None:
    import gevent
    import pytest

    from fluxmq.broker.held import HeldAck
    from fluxmq.broker.message import Message
    from fluxmq.cluster import queues as cq
    from fluxmq.errors import QueueRefused
    from fluxmq.queues.placement import QueuePlacement, owner_index

    monkeypatch.setattr(cq, "MAX_OPS", 50)
    transport = _StuckTransport()
    rq = cq.RemoteQueues(None, transport, "w0", 1)
    rq.placement = QueuePlacement(0, 2)
    name = next(f"q{i}" for i in range(100) if owner_index(f"q{i}", 2) == 1)
    held = [rq.publish(name, Message(f"$queue/{name}", b"x", 1))]
    gevent.sleep(0)  # its call is in flight (and never answered)
    held += [rq.publish(name, Message(f"$queue/{name}", b"x", 1)) for _ in range(50)]  # up to the bound
    assert transport.calls == 1
    assert all(h.__class__ is HeldAck and not h.done for h in held)
    with pytest.raises(QueueRefused) as err:
        rq.publish(name, Message(f"$queue/{name}", b"x", 1))
    assert err.value.reason_code == 0x97
    transport.release.set()  # the owner's socket breaks: every waiting publish is refused, none acknowledged
    deadline = 50
    while not all(h.done for h in held) and deadline:
        gevent.sleep(0.01)
        deadline -= 1
    assert all(isinstance(h.outcome, QueueRefused) and h.outcome.reason_code == 0x80 for h in held)


class _Loopback:
    """The workers' transport between two RemoteQueues of one process: a call runs the other's handler."""

    def __init__(self) -> None:
        self.handlers: dict[str, dict] = {}

    def of(self, node: str):
        outer = self

        class _Side:
            def handle(self, kind, fn) -> None:
                outer.handlers.setdefault(node, {})[kind] = fn

            def call(self, to, kind, payload, timeout):
                return outer.handlers[to][kind](node, payload)

        return _Side()


def test_a_refusal_of_the_owner_keeps_its_user_properties() -> None:
    """write_policy reject on a node of several workers: the owner (worker 0, the node's Raft member)
    refuses with the leader's MQTT address as a user property; the PUBACK of worker 1 carries it too
    (docs/replication.rst, "Several workers on a node")."""
    from fluxmq.broker.message import Message
    from fluxmq.queues.placement import QueuePlacement, owner_index
    from fluxmq.replication.log import refused

    class _Manager:
        def publish(self, message, session):
            raise refused("queue q: this node is a follower", 0x83, leader="127.0.0.1:1884")

    class _Broker:
        queues = None

        def _queue_manager(self):
            return _Manager()

    from fluxmq.broker.held import wait_held
    from fluxmq.cluster.queues import RemoteQueues

    loop = _Loopback()
    RemoteQueues(_Broker(), loop.of("w0"), "w0", 1)
    worker = RemoteQueues(None, loop.of("w1"), "w1", 1)
    worker.placement = QueuePlacement(1, 2)
    name = next(f"q{i}" for i in range(100) if owner_index(f"q{i}", 2) == 0)
    error = wait_held(worker.publish(name, Message(f"$queue/{name}", b"x", 1)), timeout=5)
    assert error.reason_code == 0x83 and "follower" in str(error)
    assert error.user_properties == [("leader", "127.0.0.1:1884")]


def test_the_owner_applies_a_whole_batch_before_waiting_for_its_quorum() -> None:
    """A replicated queue's appends forwarded by another worker: the owner stages every append of a
    batch, then waits for their HeldAcks together (one Raft entry for them all). It waited for each
    append's commit before applying the next: one entry and one quorum round trip per message
    (886 msg/s and 1.3 ms of node CPU per message from worker 1, against 20,600 msg/s from worker
    0; bench/raft_queue.py --workers)."""
    import gevent

    from fluxmq.broker.held import HeldAck, wait_held
    from fluxmq.broker.message import Message
    from fluxmq.cluster.queues import RemoteQueues
    from fluxmq.queues.placement import QueuePlacement, owner_index

    helds: list[HeldAck] = []

    class _Manager:
        def publish(self, message, session):
            helds.append(HeldAck())
            return helds[-1]

    class _Broker:
        queues = None

        def _queue_manager(self):
            return _Manager()

        def wait_committed(self) -> None:
            pass

    seen: list[int] = []

    def quorum() -> None:  # commits what is staged once the batch is staged, or after a bound
        for _ in range(100):
            if len(helds) == 3:
                break
            gevent.sleep(0.02)
        seen.append(len(helds))
        for h in helds:
            h.resolve(None)
        while len(helds) < 3:  # the old way: the next append only now; let it finish
            gevent.sleep(0.02)
            for h in helds:
                h.resolve(None)

    loop = _Loopback()
    RemoteQueues(_Broker(), loop.of("w0"), "w0", 1)
    worker = RemoteQueues(None, loop.of("w1"), "w1", 1)
    worker.placement = QueuePlacement(1, 2)
    name = next(f"q{i}" for i in range(100) if owner_index(f"q{i}", 2) == 0)
    committer = gevent.spawn(quorum)
    pending = [worker.publish(name, Message(f"$queue/{name}", b"x%d" % i, 1)) for i in range(3)]
    assert [wait_held(h, timeout=10) for h in pending] == [None, None, None]
    committer.join(10)
    assert seen == [3]  # all three staged before the first commit


def test_an_ack_from_a_client_of_another_worker_that_is_no_member_here_settles_no_members_delivery(
    tmp_path,
) -> None:
    """A ``$ack`` from a client of worker 1 reaches the owner (worker 0) as an op naming its client;
    when that client is no member there any more (it left, or its worker was not heard from and its
    members were dropped: what they held went to other members), the owner settled it as an ack
    "from no client", by offset: a replicated queue's record held by another member was settled
    and the $ack confirmed (0x00), where the same $ack on worker 0 gets 0x10 (an ack settles a
    record only for the member holding it, ``ReplicatedGroup.ack``). It settles nothing now."""
    from fluxmq.broker.message import Message
    from fluxmq.cluster.queues import RemoteQueues
    from fluxmq.storage.records import encode_message
    from tests.replication.test_distribution import _leader_with_a_remote_member

    raft, q, qlog, g = _leader_with_a_remote_member(tmp_path)
    raft.turn_hold = lambda timeout, settlement: None  # the settlement's hold: committed at once here
    manager = q.manager

    class _Broker:
        queues = manager

        def _queue_manager(self):
            return manager

    loop = _Loopback()
    owner = RemoteQueues(_Broker(), loop.of("w0"), "w0", 1)
    ack = Message(
        "$queue/q/$ack", b"", 1, properties={USER_PROPERTY: [("message-id", "q:1"), ("group-id", "g")]}
    )
    assert owner._apply("w1", ["p", 7, "gone-client"], encode_message(ack)) == 0
    assert 1 in g.pending and not g.is_settled(1)  # still the other member's delivery
    # an ack from no client (the HTTP bridge on worker 1: no client id) still settles by offset
    assert owner._apply("w1", ["p", 7, ""], encode_message(ack)) == 1
    assert 1 not in g.pending


class _RecordingTransport:
    """Every call answered at once (each op ok), recorded as (node, ops)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list]] = []

    def call(self, node, kind, payload, timeout):
        import json

        ops = list(_decode_ops(payload))
        self.calls.append((node, ops))
        return json.dumps([{"ok": 1}] * len(ops)).encode()

    def handle(self, kind, fn) -> None:
        pass


def test_members_follow_their_queue_to_the_worker_owning_it_after_its_node_restarted() -> None:
    """A queue's node comes back with another worker count: the memberships held for it on another
    node are reconciled with the worker that owns it now (and delivered from there)."""
    from types import SimpleNamespace

    import gevent

    owning = {"member": "n2/w0"}
    nodes = SimpleNamespace(node="n1", owner=lambda name: "n2", member=lambda node, name: owning["member"])
    rq, transport, session = _joined_on_n1(None, nodes, ("n2/w0", "g", True, 1, [], 5))

    def reconciled_with() -> list[str]:
        transport.calls.clear()
        rq._tick()
        gevent.sleep(0.01)
        return [node for node, ops in transport.calls if any(h[0] == "r" and h[2] for h, _b in ops)]

    assert reconciled_with() == ["n2/w0"]
    owning["member"] = "n2/w1"  # n2 restarted with two workers: w1 owns "orders" now
    assert reconciled_with() == ["n2/w1"]
    assert rq.joined[session]["$queue/orders"][0] == "n2/w1"  # its deliveries come from there

    def down(node, name):
        from fluxmq.errors import QueueRefused

        raise QueueRefused("down", 0x80)

    nodes.member = down  # the node is down again: its members wait for it where they were
    assert reconciled_with() == ["n2/w1"]
    assert rq.joined[session]["$queue/orders"][0] == "n2/w1"


def test_members_held_for_a_queue_reassigned_to_this_node_join_its_own_groups() -> None:
    """An operator gave the queue of a node gone for good to this node: the memberships its clients
    held for the old owner become members of this node's own group (same group, same auto-ack)."""
    from types import SimpleNamespace

    import gevent

    owners = {"orders": "gone"}
    joined: list[tuple] = []
    manager = SimpleNamespace(subscribe=lambda *args, **kw: joined.append((args, kw)), stranded={})
    nodes = SimpleNamespace(node="n1", owner=owners.get, member=lambda node, name: node)
    rq, transport, session = _joined_on_n1(
        SimpleNamespace(queues=manager), nodes, ("gone", "g", False, 1, [("consumer-group", "g")], 5)
    )
    rq._tick()
    assert rq.joined[session]["$queue/orders"][0] == "gone" and not joined  # it waits for its node
    owners["orders"] = "n1"  # reassigned here
    transport.calls.clear()
    rq._tick()
    gevent.sleep(0.01)
    assert session not in rq.joined
    assert joined == [
        ((session, "$queue/orders", 1, [("consumer-group", "g"), ("auto-ack", "false")], 5), {"rejoin": True})
    ]
    assert not any(node == "n1" for node, _ops in transport.calls)  # never an op to itself


def test_a_stranded_queue_s_wait_for_its_owner_is_logged_once_per_interval_with_its_count(caplog) -> None:
    """queue_move_waiting (the move tries every second while the owner is away): the first wait,
    then one line per WAIT_LOG_INTERVAL per queue, counting the waits since the last line."""
    import logging

    from fluxmq.cluster.queues import WAIT_LOG_INTERVAL, RemoteQueues

    assert 30.0 <= WAIT_LOG_INTERVAL <= 60.0
    rq = RemoteQueues(None, _RecordingTransport(), "n1", 7)
    caplog.set_level(logging.INFO, logger="fluxmq.cluster.queues")

    def lines() -> list:
        return [r for r in caplog.records if r.getMessage() == "queue_move_waiting"]

    for _ in range(10):
        rq._waiting("orders", "-", "its node gone is not available")
    rq._waiting("audit", "n2", "no answer")
    assert [(r.queue, r.waits) for r in lines()] == [("orders", 1), ("audit", 1)]
    rq._wait_gate.interval = 0.0  # the interval has passed
    rq._waiting("orders", "-", "its node gone is not available")
    assert [(r.queue, r.waits) for r in lines()][-1] == ("orders", 10)  # 9 held back, and this one


def test_a_queue_given_back_while_a_batch_of_it_moves_is_served_here_once_the_batch_is_settled(
    tmp_path,
) -> None:
    """Node n1 strands queue "w" (an operator gave it to n2) and moves its records; while a batch
    is on its way to n2 the queue is given back to n1. The queue is not served (an append is
    refused with 0x80, never a new log over the records) until the batch is settled: n2 never
    stored it (unreachable), so the records stay and n1 serves them again, each once, and sends
    nothing to itself."""
    from types import SimpleNamespace

    import gevent
    from gevent.event import Event

    from fluxmq.broker.broker import Broker
    from fluxmq.broker.message import Message
    from fluxmq.cluster.queues import RemoteQueues
    from fluxmq.errors import QueueRefused
    from fluxmq.queues import QueueManager
    from fluxmq.queues.config import QueueConfig
    from fluxmq.queues.placement import QueuePlacement
    from fluxmq.storage.lmdb import LMDBStorage
    from tests.cluster.metadata.conftest import wait_for
    from tests.queues.test_group import member

    class GatedTransport(_RecordingTransport):
        """n2 does not answer: each call waits for ``gate``, then fails."""

        gate = Event()

        def call(self, node, kind, payload, timeout):
            self.calls.append((node, list(_decode_ops(payload))))
            self.gate.wait(5.0)
            raise ConnectionError(f"{node} is not reachable")

    storage = LMDBStorage(tmp_path / "d", map_size=64 << 20)
    owners = {"w": "n1"}
    placement = QueuePlacement(0, 1)
    placement.nodes = SimpleNamespace(
        node="n1",
        owner=owners.get,
        known=owners.get,
        member=lambda node, name: node,
        owners=SimpleNamespace(on_change=[]),
    )
    broker = Broker(storage=storage)
    broker.queues = QueueManager(storage, [QueueConfig("w")], placement=placement)
    transport = GatedTransport()
    rq = RemoteQueues(broker, transport, "n1", 7, lambda _i: "n1")
    rq.nodes = placement.nodes
    rq.attach(broker.queues)
    try:
        for i in range(3):
            broker.publish(Message("$queue/w", f"m{i}".encode(), 1))
        gevent.sleep(0)
        storage.commit()
        owners["w"] = "n2"
        rq._owner_changed("w", "n1", "n2")  # stranded; its move starts
        assert wait_for(lambda: transport.calls, 5.0)  # the batch is on its way to n2
        assert [node for node, _ops in transport.calls] == ["n2"]
        owners["w"] = "n1"
        rq._owner_changed("w", "n2", "n1")  # given back while the batch is on its way
        assert "w" in broker.queues.stranded and "w" not in broker.queues.queues
        try:
            broker.queues.publish(Message("$queue/w", b"early", 1))
            raise AssertionError("an append was taken while the queue's records were on their way")
        except QueueRefused as exc:
            assert exc.reason_code == 0x80
        transport.gate.set()  # n2 never stored the batch
        assert wait_for(lambda: "w" in broker.queues.queues, 5.0)
        assert not broker.queues.stranded
        _session, d = member(broker, "c1", "$queue/w", "g")
        gevent.sleep(0)
        assert [m.payload for _pid, m in d.sent] == [b"m0", b"m1", b"m2"]
        assert {node for node, _ops in transport.calls} == {"n2"}  # never an op to itself
    finally:
        rq.stop()
        storage.close()


def _joined_on_n1(broker, nodes, entry: tuple):
    """RemoteQueues of node n1 (one worker) with owner registry ``nodes``, and a client "c1" of n1
    joined to queue "orders" as ``entry`` says (owner, group, auto-ack, qos, user props, version)."""
    from fluxmq.cluster.queues import RemoteQueues
    from fluxmq.queues.placement import QueuePlacement

    transport = _RecordingTransport()
    rq = RemoteQueues(broker, transport, "n1", 7, lambda _i: "n1")
    rq.placement = QueuePlacement(0, 1)
    rq.placement.nodes = rq.nodes = nodes

    class Session:
        client_id = "c1"
        send_quota = 10

    session = Session()
    rq.joined[session] = {"$queue/orders": entry}
    return rq, transport, session
