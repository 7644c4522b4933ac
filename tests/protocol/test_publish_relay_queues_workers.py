"""The C fast path (``fluxmq._core.relay``) of durable queues on a broker with peers: two workers of
one node (``test_publish_relay_workers.Workers``: real brokers, real ``WorkerNode``s and their
Unix-socket transport, in this process), each with its ``QueueManager`` placed by
``QueuePlacement`` and reaching the other's queues through ``RemoteQueues``, as the node service
sets them up.

With peers the relay used to leave every ``$queue/`` append and every PUBACK to the Python path;
it now serves the appends ``QueueManager.append_relayed`` takes (a queue this worker owns) and the
PUBACK runs of tracked deliveries (this worker's queue's, and ``ForwardedDelivery`` of the other's)
and of a persistent session's own QoS 1 deliveries. Each scenario runs with the fast path from
the hub, from the reader and off: the same bytes, queues and counters every time; what differs is
which path ran (the Python calls counted here, ``RELAY.settled``).
"""

from __future__ import annotations

import time

import gevent
import pytest

from fluxmq._core import codec as c
from fluxmq.broker.message import Message
from fluxmq.protocol import connection as connection_module
from fluxmq.protocol.connection import RELAY
from fluxmq.queues import QueueManager
from fluxmq.queues.config import QueueConfig
from fluxmq.queues.placement import QueuePlacement, owner_index
from tests.protocol.test_publish_relay import MARK
from tests.protocol.test_publish_relay_workers import Workers, run_three

#: a queue each worker owns
MINE = next(f"q{i}" for i in range(100) if owner_index(f"q{i}", 2) == 0)
THEIRS = next(f"q{i}" for i in range(100) if owner_index(f"q{i}", 2) == 1)
AUTO_ACK = [("consumer-group", "g"), ("auto-ack", "true")]


def with_queues(w: Workers) -> list[QueueManager]:
    """A QueueManager on each worker, configured with MINE and THEIRS (each holds the one it owns)."""
    managers = []
    for i, (net, node) in enumerate(zip(w.nets, w.nodes, strict=True)):
        configs = [QueueConfig(MINE), QueueConfig(THEIRS)]
        manager = net.broker.queues = QueueManager(
            net.broker.storage, configs, placement=QueuePlacement(i, 2, configs)
        )
        node.attach_queues(manager)
        managers.append(manager)
    return managers


def read_packets(w: Workers, cid: str, kind: int, n: int) -> list:
    """The next ``n`` packets of type ``kind`` client ``cid`` reads (others, the marks, skipped)."""
    conn, _, sock = w.nets[w.where[cid]].clients[cid]
    decoder = c.Decoder(version=conn.version)
    got: list = []
    with gevent.Timeout(10):
        while len(got) < n:
            chunk = sock.recv(65536)
            assert chunk, f"{cid}: closed"
            got += [p for p in decoder.feed(chunk) if p.type == kind and getattr(p, "topic", None) != MARK]
    assert len(got) == n
    return got


def records(manager: QueueManager, name: str) -> list:
    q = manager.queues[name]
    return [(r.message.topic, r.message.payload, r.message.origin) for r in q.log.read(q.log.first, 100)]


@pytest.fixture
def python_pubacks():
    """The PUBACKs the connection's Python handler serves (client id, packet id)."""
    seen: list = []
    original = connection_module._HANDLERS[c.PUBACK]
    connection_module._HANDLERS[c.PUBACK] = lambda conn, p: (
        seen.append((conn.client_id, p.packet_id)),
        original(conn, p),
    )
    yield seen
    connection_module._HANDLERS[c.PUBACK] = original


def test_appends_to_this_workers_queue_are_served_in_c_and_the_others_reach_their_owner(tmp_path) -> None:
    """A run of QoS 1 appends to a queue this worker owns is appended by the fast path
    (``append_relayed``), with peers as without; a run to the queue the other worker owns is
    declined there once (not asked again for each of its PUBLISHes) and each goes through
    ``QueueManager.publish`` to its owner, acknowledged once stored there. Every run: the same
    PUBACKs, the same records on each owner, the same counters."""
    paths = []

    def scenario(w: Workers) -> list:
        managers = with_queues(w)
        manager = managers[0]
        published, asked = [], []
        publish, append_relayed = manager.publish, manager.append_relayed
        manager.publish = lambda message, origin=None: (
            published.append(message.topic) or publish(message, origin)
        )
        manager.append_relayed = lambda topic, payloads, cid: (
            asked.append((topic, len(payloads))) or append_relayed(topic, payloads, cid)
        )
        w.client("pub", 0, version=5)
        mine, theirs = f"$queue/{MINE}/k", f"$queue/{THEIRS}"
        w.send(
            "pub",
            [c.Publish(mine, b"m%d" % i, qos=1, packet_id=1 + i) for i in range(3)]
            + [c.Publish(theirs, b"t%d" % i, qos=1, packet_id=4 + i) for i in range(3)]
            + [c.Publish(mine, b"m%d" % i, qos=1, packet_id=4 + i) for i in range(3, 5)],  # 7, 8
        )
        acks = read_packets(w, "pub", c.PUBACK, 8)
        paths.append((published, asked))
        return [
            sorted((a.packet_id, a.reason_code) for a in acks),
            records(managers[0], MINE),
            records(managers[1], THEIRS),
            sorted(managers[0].queues) + sorted(managers[1].queues),
        ]

    [acks, mine, theirs, held], counters, _served, _forwarded = run_three(tmp_path, scenario)
    assert acks == [(pid, 0) for pid in range(1, 9)]
    assert mine == [(f"$queue/{MINE}/k", b"m%d" % i, "pub") for i in range(5)]
    assert theirs == [(f"$queue/{THEIRS}", b"t%d" % i, "pub") for i in range(3)]
    assert held == [MINE, THEIRS]  # each worker holds the queue it owns, only
    assert counters[0]["received"] == [1, 8, 0]  # (the mark, then the appends)
    (fast_published, fast_asked), (reader_published, reader_asked), (slow_published, slow_asked) = paths
    # in C: this worker's appends, two runs of one call each; the other's run asked once, declined
    assert (
        fast_asked
        == reader_asked
        == [(f"$queue/{MINE}/k", 3), (f"$queue/{THEIRS}", 3), (f"$queue/{MINE}/k", 2)]
    )
    assert fast_published == reader_published == [f"$queue/{THEIRS}"] * 3
    # without the fast path every append is QueueManager.publish's
    assert slow_asked == [] and len(slow_published) == 8


def test_pubacks_of_queue_deliveries_are_settled_in_c_on_the_owner_and_on_the_other_worker(
    tmp_path, python_pubacks
) -> None:
    """An auto-ack consumer on the worker owning the queue (its deliveries tracked by the group
    there) and one on the other worker (a remote member: its deliveries are ``ForwardedDelivery``,
    settled by an op to the owner): their PUBACKs are settled by the fast path, none through the
    Python handler; both groups end with everything settled, as through the Python path."""
    settled = []

    def scenario(w: Workers) -> list:
        managers = with_queues(w)
        before = RELAY.settled
        python_pubacks.clear()
        w.client("near", 0, version=5)
        w.client("far", 1, version=5)
        w.subscribe("near", f"$queue/{MINE}", 1, user_properties=AUTO_ACK)
        w.subscribe(
            "far", f"$queue/{MINE}", 1, user_properties=[("consumer-group", "h"), ("auto-ack", "true")]
        )
        for i in range(3):
            w.nets[0].broker.publish(Message(f"$queue/{MINE}", b"q%d" % i, 1))
        got = {}
        for cid in ("near", "far"):
            delivered = read_packets(w, cid, c.PUBLISH, 3)
            got[cid] = [p.payload for p in delivered]
            w.send(cid, [c.Puback(p.packet_id) for p in delivered])
        q = managers[0].queues[MINE]
        deadline = time.monotonic() + 10
        while any(g.pending or g.floor < 3 for g in q.groups.values()):
            assert time.monotonic() < deadline, "the PUBACKs did not settle every delivery"
            gevent.sleep(0.01)
        settled.append((RELAY.settled - before, sorted(python_pubacks)))
        return [got, {name: (g.floor, sorted(g.pending)) for name, g in q.groups.items()}, q.stats["acked"]]

    [got, groups, acked], counters, _served, _forwarded = run_three(tmp_path, scenario)
    assert got["near"] == got["far"] == [b"q0", b"q1", b"q2"]
    assert groups == {"g": (3, []), "h": (3, [])} and acked == 6
    assert counters[0]["inflight"]["near"] == [] and counters[1]["inflight"]["far"] == []
    fast, reader, slow = settled
    assert fast == reader == (6, [])  # both consumers' PUBACKs, in C
    assert slow == (0, sorted([("near", pid) for pid in (1, 2, 3)] + [("far", pid) for pid in (1, 2, 3)]))


def test_a_persistent_sessions_pubacks_are_settled_in_c_with_peers(tmp_path, python_pubacks) -> None:
    """A persistent subscriber (LMDB, window 2) on a worker with peers: the PUBACKs of its QoS 1
    deliveries are settled by the fast path (the store's in-flight entry done, and the queued rest
    sent as the window frees: ``pump``), none through the Python handler; the same bytes and
    in-flight ids every run."""
    settled = []

    def scenario(w: Workers) -> list:
        before = RELAY.settled
        python_pubacks.clear()
        w.client("pub", 1)
        w.client("dur", 0, quota=2, clean=False)
        w.subscribe("dur", "t", 1)
        w.send("pub", [c.Publish("t", b"m%d" % i, qos=1, packet_id=1 + i) for i in range(4)])
        read_packets(w, "pub", c.PUBACK, 4)
        first = read_packets(w, "dur", c.PUBLISH, 2)
        w.send("dur", [c.Puback(p.packet_id) for p in first])
        rest = read_packets(w, "dur", c.PUBLISH, 2)  # sent as the PUBACKs free the window
        w.send("dur", [c.Puback(p.packet_id) for p in rest])
        session = w.nets[0].clients["dur"][0].session
        deadline = time.monotonic() + 10
        while session.inflight:
            assert time.monotonic() < deadline, "the last PUBACKs were not served"
            gevent.sleep(0.01)
        settled.append((RELAY.settled - before, sorted(python_pubacks)))
        return [[(p.payload, p.packet_id) for p in first + rest]]

    [delivered], counters, _served, _forwarded = run_three(tmp_path, scenario, lmdb=True)
    assert delivered == [(b"m%d" % i, 1 + i) for i in range(4)]
    assert counters[0]["inflight"]["dur"] == [] and counters[0]["queued"]["dur"] == 0
    fast, reader, slow = settled
    assert fast == reader == (4, [])
    assert slow == (0, [("dur", pid) for pid in (1, 2, 3, 4)])


def test_a_declined_run_is_remembered_for_its_read_only(tmp_path) -> None:
    """A run of appends to a queue not made yet is declined once (the Python path makes the queue
    with the first and appends them all); the next read's run to it is appended in C again (the
    declined run is the read's, however the next read's packet list is allocated)."""
    fresh = next(f"f{i}" for i in range(100) if owner_index(f"f{i}", 2) == 0)
    asked = []

    def scenario(w: Workers) -> list:
        manager = with_queues(w)[0]
        append_relayed = manager.append_relayed

        def counted(topic, payloads, cid):
            taken = append_relayed(topic, payloads, cid)
            asked.append((len(payloads), taken))
            return taken

        manager.append_relayed = counted
        w.client("pub", 0)
        for r in range(3):
            w.send(
                "pub",
                [c.Publish(f"$queue/{fresh}", b"%d%d" % (r, i), qos=1, packet_id=1 + i) for i in range(3)],
            )
            read_packets(w, "pub", c.PUBACK, 3)
        return [records(manager, fresh)]

    [appended], _counters, _served, _forwarded = run_three(tmp_path, scenario)
    assert [p for _t, p, _o in appended] == [b"%d%d" % (r, i) for r in range(3) for i in range(3)]
    # the hub's run and the reader's: the first read declined once, the next two appended in C
    assert asked == [(3, 0), (3, 3), (3, 3)] * 2
