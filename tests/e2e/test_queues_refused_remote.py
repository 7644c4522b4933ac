"""Durable queues: a record a member on ANOTHER worker or node can never take (over its 5.0
Maximum Packet Size). The member's worker says so to the queue's owner (``REFUSED`` in its answer
to the delivery, fluxmq/cluster/queues.py), and the owner's group treats it as a local session's
refusal (tests/e2e/test_queues_refused.py): the record goes to another member, or, when none can
take it, is set aside (stored, counted once as ``undeliverable``, shown per group) while the
records behind it go on, and is offered again when a member joins. Before, the owner heard a plain
"not sent": it offered the record to that member again every 0.2 s for ever (each offer a
``packet_too_large`` drop there), a partition's owner was never passed over, and nothing was set
aside.

Two setups, each with the queue's owner away from the small member: one node of two workers
(``server.workers: 2``; the queues hash to w0, the small member is on w1) and two clustered nodes
of one worker each on the session's etcd (the queues are claimed by q1 at start, the small member
is on q2). Real nodes, paho 5.0 clients; every wait is bounded.
"""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from paho.mqtt.packettypes import PacketTypes

from fluxmq.queues.placement import owner_index
from tests.conftest import NodeFactory
from tests.e2e.mqtt5raw import Paho5, paho5, props, unique
from tests.e2e.test_cluster_etcd import Cluster, wait_for
from tests.e2e.test_metrics import sample, scrape
from tests.e2e.test_queues import nothing_more, queue_state, receive, settle
from tests.e2e.test_queues_refused import BIG, SMALL_MPS, drain
from tests.e2e.test_replication import QUEUE as RAFT_QUEUE
from tests.e2e.test_replication import _mode, start_cluster, wait_all_know_leader
from tests.e2e.test_workers import on_worker, wait_crossing
from tests.e2e.test_workers_queues import join

pytestmark = pytest.mark.e2e

WAIT = 15.0
PLAIN = "rr-plain"  # a work queue
PARTED = "rr-parted"  # a work queue of two partitions
STREAM = "rr-stream"  # a stream


def owned_by_w0(prefix: str) -> str:
    """A queue name owned by worker 0 of a node of two workers."""
    for i in range(200):
        name = f"{prefix}-{i}"
        if owner_index(name, 2) == 0:
            return name
    raise AssertionError("no name hashed to w0")


def key_of_partition(part: int, partitions: int = 2) -> str:
    """A routing key whose records land in partition ``part`` (CRC-32 of the key)."""
    for i in range(100):
        if zlib.crc32(f"k{i}".encode()) % partitions == part:
            return f"k{i}"
    raise AssertionError("no key")


@dataclass
class Setup:
    """Where the clients of a test connect: ``remote(**kw)`` away from the queues' owner (another
    worker or node), ``local(**kw)`` with it; ``owner`` answers the admin view of the queues,
    ``nodes`` are scraped for the drops (each node sums its workers)."""

    remote: Callable[..., Paho5]
    local: Callable[..., Paho5]
    owner: object
    nodes: list
    plain: str
    parted: str
    stream: str


def queues_yaml(plain: str, parted: str, stream: str) -> str:
    return f"queues: [{{name: {plain}}}, {{name: {parted}, partitions: 2}}, {{name: {stream}, type: stream}}]"


@pytest.fixture(scope="module", params=["workers", "cluster"])
def setup(request, tmp_path_factory):
    factory = NodeFactory(tmp_path_factory.mktemp("qrefused"))
    try:
        if request.param == "workers":
            plain, parted, stream = (owned_by_w0(unique(n)) for n in (PLAIN, PARTED, STREAM))
            node = factory(
                {"server.workers": 2, "broker.sys_interval": "1s"},
                config_text=queues_yaml(plain, parted, stream),
            )
            wait_crossing(node)
            yield Setup(
                lambda **kw: on_worker(node, "w1", "qr", **kw),
                lambda **kw: on_worker(node, "w0", "ql", **kw),
                node,
                [node],
                plain,
                parted,
                stream,
            )
        else:
            etcd_server = request.getfixturevalue("etcd_server")
            base = tmp_path_factory.mktemp("qrefused-cluster")
            cl = Cluster(factory, base, etcd_server.endpoint, f"/t-{uuid.uuid4().hex[:8]}/", ["q1", "q2"])
            plain, parted, stream = unique(PLAIN), unique(PARTED), unique(STREAM)
            for config in cl.configs.values():
                config["queues"] = [
                    {"name": plain},
                    {"name": parted, "partitions": 2},
                    {"name": stream, "type": "stream"},
                ]
            cl.start_all(1)
            q1, q2 = cl.nodes["q1"], cl.nodes["q2"]
            assert cl.value(f"queues/{plain}/owner") == "q1"  # claimed at start by the first node
            assert cl.value(f"queues/{parted}/owner") == "q1"
            assert cl.value(f"queues/{stream}/owner") == "q1"
            yield Setup(
                lambda **kw: paho5(q2, unique("qr"), kw.get("properties")),
                lambda **kw: paho5(q1, unique("ql"), kw.get("properties")),
                q1,
                [q1, q2],
                plain,
                parted,
                stream,
            )
    finally:
        factory.close()


def small_member(s: Setup, name: str, group: str) -> Paho5:
    """A member of ``group`` of queue ``name`` away from its owner, that no delivery of BIG fits."""
    c = s.remote(properties=props(PacketTypes.CONNECT, MaximumPacketSize=SMALL_MPS))
    join(c, f"$queue/{name}/#", group)
    return c


def too_large_drops(s: Setup) -> float:
    return sum(sample(scrape(n), "fluxmq_messages_dropped_total", reason="packet_too_large") for n in s.nodes)


def publish_all(client_of: Callable[..., Paho5], topic: str, payloads) -> None:
    pub = client_of()
    try:
        for payload in payloads:
            pub.publish(topic, payload, 1)
    finally:
        pub.disconnect()


def test_a_record_a_remote_member_refuses_goes_to_another_member(setup: Setup) -> None:
    """A partitioned queue: BIG's partition belongs to the small member (joined first, away from
    the owner); its refusal makes the owner give BIG to the other member (before: offered to the
    partition's owner again every 0.2 s, never to the other)."""
    name = setup.parted
    before = too_large_drops(setup)  # (the module's other test counts its own)
    small = small_member(setup, name, "g")
    large = setup.local()
    join(large, f"$queue/{name}/#", "g")
    try:
        topic = f"$queue/{name}/{key_of_partition(0)}"  # partition 0: the first member's
        publish_all(setup.local, topic, [BIG] + [b"s%d" % i for i in range(6)])
        got = drain(name, {"large": large, "small": small}, 7, WAIT)
        assert len(got["large"]) + len(got["small"]) == 7, got
        assert any(m.payload == BIG for m in got["large"]), got
        assert too_large_drops(setup) - before == 1  # offered to the small member once
        state = queue_state(setup.owner, name)
        assert state["groups"]["g"]["undeliverable"] == 0, state
        assert state["counters"]["delivered"] == 7, state  # the refused offer is no delivery
        assert state["counters"].get("undeliverable", 0) == 0, state
    finally:
        small.disconnect()
        large.disconnect()


def test_a_record_no_remote_member_can_take_is_set_aside_and_the_rest_go_on(setup: Setup) -> None:
    """The two members are away from the owner and both refuse BIG: it is offered to each once,
    then set aside (counted once, shown by the owner), the records behind it delivered, BIG not
    offered again at later dispatches; a member that can take it joins (away from the owner too):
    it gets it."""
    name = setup.plain
    before = too_large_drops(setup)
    smalls = {"a": small_member(setup, name, "g"), "b": small_member(setup, name, "g")}
    try:
        publish_all(setup.local, f"$queue/{name}/x", [BIG] + [b"s%d" % i for i in range(5)])
        got = drain(name, smalls, 5, WAIT)
        assert sorted(m.payload for m in got["a"] + got["b"]) == [b"s%d" % i for i in range(5)], got
        # before: never set aside (offered again every 0.2 s)
        assert wait_for(lambda: queue_state(setup.owner, name)["groups"]["g"]["undeliverable"] == 1, WAIT)
        assert too_large_drops(setup) - before == 2  # once to each
        # more records and settlements (more dispatches): BIG is not offered again
        publish_all(setup.remote, f"$queue/{name}/x", [b"t%d" % i for i in range(5)])
        got = drain(name, smalls, 5, WAIT)
        assert len(got["a"]) + len(got["b"]) == 5, got
        assert too_large_drops(setup) - before == 2
        state = queue_state(setup.owner, name)
        assert state["groups"]["g"]["undeliverable"] == 1, state
        assert state["groups"]["g"]["lag"] == 1, state
        assert state["counters"]["undeliverable"] == 1, state
        samples = scrape(setup.owner)
        assert sample(samples, "fluxmq_queue_undeliverable_total", queue=name) == 1
        assert sample(samples, "fluxmq_queue_group_undeliverable", queue=name, group="g") == 1
        large = setup.remote()
        try:
            join(large, f"$queue/{name}/#", "g")
            m = large.get(WAIT)
            assert m.payload == BIG
            settle(large, name, "$ack", m)
        finally:
            large.disconnect()
        assert queue_state(setup.owner, name)["groups"]["g"]["undeliverable"] == 0
    finally:
        for c in smalls.values():
            c.disconnect()


def test_a_stream_record_no_remote_member_can_take_is_set_aside_and_nothing_is_sent_twice(
    setup: Setup,
) -> None:
    """A stream whose only member is away from the owner and refuses BIG: set aside once, the
    records behind it sent once each (before: the owner read the stream again from BIG every
    0.2 s, sending the records behind it again with it)."""
    name = setup.stream
    before = too_large_drops(setup)
    small = small_member(setup, name, "g")
    try:
        publish_all(setup.local, f"$queue/{name}/x", [BIG] + [b"s%d" % i for i in range(5)])
        got = receive(small, 5, WAIT)
        assert sorted(m.payload for m in got) == [b"s%d" % i for i in range(5)]
        assert wait_for(lambda: queue_state(setup.owner, name)["groups"]["g"]["undeliverable"] == 1, WAIT)
        assert nothing_more(small, 1.0)
        assert too_large_drops(setup) - before == 1
        assert queue_state(setup.owner, name)["counters"]["undeliverable"] == 1
    finally:
        small.disconnect()


def test_a_replicated_record_a_member_on_a_follower_refuses_is_set_aside_by_the_leader(node_factory) -> None:
    """A replicated queue in ``distribution_mode: forward`` (three Raft nodes): the leader leases
    BIG to the only member, on a follower, whose client can never take it. The follower says so
    when it gives the lease back (``b``), and the leader sets it aside (counted once, shown) while
    the records behind it go on (before: leased again, one Raft entry each, for ever)."""
    nodes = start_cluster(node_factory, raft_extra=_mode("forward"))
    leader = nodes[wait_all_know_leader(nodes)]
    follower = nodes[(nodes.index(leader) + 1) % 3]
    small = paho5(follower, unique("qr"), props(PacketTypes.CONNECT, MaximumPacketSize=SMALL_MPS))
    join(small, f"$queue/{RAFT_QUEUE}/#", "g")

    def drops() -> float:
        return sample(scrape(follower), "fluxmq_messages_dropped_total", reason="packet_too_large")

    try:
        publish_all(
            lambda: paho5(leader, unique("qp")),
            f"$queue/{RAFT_QUEUE}/x",
            [BIG] + [b"s%d" % i for i in range(5)],
        )
        got = receive(small, 5, WAIT)
        assert sorted(m.payload for m in got) == [b"s%d" % i for i in range(5)]
        for m in got:
            settle(small, RAFT_QUEUE, "$ack", m)
        assert wait_for(lambda: queue_state(leader, RAFT_QUEUE)["groups"]["g"]["undeliverable"] == 1, WAIT)
        assert drops() == 1
        publish_all(
            lambda: paho5(leader, unique("qp")), f"$queue/{RAFT_QUEUE}/x", [b"t%d" % i for i in range(5)]
        )
        for m in receive(small, 5, WAIT):
            settle(small, RAFT_QUEUE, "$ack", m)
        assert drops() == 1  # not leased to it again
        state = queue_state(leader, RAFT_QUEUE)
        assert state["groups"]["g"]["undeliverable"] == 1 and state["groups"]["g"]["lag"] == 1, state
        assert state["counters"]["undeliverable"] == 1, state
    finally:
        small.disconnect()
