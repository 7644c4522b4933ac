"""Bounded per-session queues: a subscriber that never reads stalls neither the publisher nor others.

The check is about memory and progress, not speed: every wait has a generous bound, and the node's
memory is compared with the amount of data pushed at the slow subscriber.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from fluxmq._core import codec as c
from tests.conftest import NodeFactory
from tests.e2e.mqttraw import RawClient, end_session, paho_connected, raw_connected, unique

pytestmark = pytest.mark.e2e

MESSAGES = 20_000
PAYLOAD = 4096  # 20,000 x 4 KiB = ~80 MiB aimed at the slow subscriber
BATCH = 100  # QoS 0 messages between two QoS 1 ones (the publisher waits for those PUBACKs)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_slow_subscriber_does_not_stall_publisher_or_others(node) -> None:
    """A raw subscriber never reads its socket while ~80 MiB of QoS 0 messages are published to it and to
    a normal paho subscriber. The publisher's QoS 1 PUBACKs keep coming, the normal subscriber gets
    every message in order, and the worker's memory grows by far less than what the slow one was sent
    (its queue and output buffer are bounded)."""
    workers = node.worker_pids()
    assert len(workers) == 1, workers
    worker = workers[0]
    topic = unique("flood")
    payload = b"x" * (PAYLOAD - 8)

    slow = raw_connected(node, unique("slow"))
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small, so the broker side fills fast
    assert slow.subscribe(1, (topic, 0)).reason_codes == [0]
    normal = paho_connected(node, unique("normal"))
    normal.subscribe(topic, 0)
    pub = RawClient.to(node)
    assert pub.connect(unique("flood-pub")).reason_code == 0
    rss_before = rss_bytes(worker)
    try:
        pid = 0
        seq = 0
        for _ in range(MESSAGES // BATCH):
            batch = []
            for _ in range(BATCH - 1):
                batch.append(c.encode_publish(topic, b"%08d" % seq + payload, 0, False, False, 0, None, 4))
                seq += 1
            pid = pid % 65535 + 1
            batch.append(c.encode_publish(topic, b"%08d" % seq + payload, 1, False, False, pid, None, 4))
            seq += 1
            pub.send_bytes(b"".join(batch))
            # the broker keeps acknowledging: a stalled fan-out would stop these PUBACKs
            assert pub.wait_for(lambda p, pid=pid: isinstance(p, c.Puback) and p.packet_id == pid, 30)
            # pace on the normal subscriber (not on the slow one): it must have got this batch
            for i in range(seq - BATCH, seq):
                msg = normal.get(timeout=30)
                assert int(msg.payload[:8]) == i
        rss_after = rss_bytes(worker)
        grown = rss_after - rss_before
        sent = MESSAGES * PAYLOAD
        # An unbounded queue for the slow subscriber would hold ~all of ``sent``.
        assert grown < sent // 2, f"worker RSS grew by {grown >> 20} MiB for {sent >> 20} MiB sent"
        assert grown < 300 << 20
        # the node still serves new clients
        check = paho_connected(node, unique("after-flood"))
        t = unique("after-flood/t")
        check.subscribe(t, 1)
        check.publish(t, b"ok", 1)
        assert check.get().payload == b"ok"
        check.disconnect()
    finally:
        pub.close()
        normal.disconnect()
        slow.close()
    assert node.returncode is None


@pytest.fixture(scope="module", params=["memory", "lmdb"])
def small_queues(request, tmp_path_factory):
    """A node with a 10-message inflight window and 50-message session queues, for each storage type
    (persistent sessions queue in ``storage.max_queued_messages`` under lmdb)."""
    factory = NodeFactory(tmp_path_factory.mktemp("smallq"))
    try:
        yield factory(
            {
                "storage.type": request.param,
                "broker.max_inflight": 10,
                "broker.max_queued_messages": 50,
                "storage.max_queued_messages": 50,
            }
        )
    finally:
        factory.close()


def test_unacknowledging_subscriber_gets_at_most_the_inflight_window(small_queues) -> None:
    """A subscriber that does not PUBACK has at most ``broker.max_inflight`` QoS 1 messages in flight; the
    rest wait in its queue and flow, in order, as it acknowledges [MQTT-4.6.0-6]."""
    node = small_queues
    topic = unique("window")
    sub = raw_connected(node, unique("window-sub"))
    pub = raw_connected(node, unique("window-pub"))
    try:
        sub.subscribe(1, (topic, 1))
        for i in range(30):
            pub.publish_qos1(topic, str(i).encode(), i + 1)  # each PUBACK: the message has been routed
        sub.send(c.Pingreq())
        first, _ = sub.collect_until(lambda p: isinstance(p, c.Pingresp))
        assert [int(p.payload) for p in first] == list(range(10))
        got = [int(p.payload) for p in first]
        pending = list(first)
        while len(got) < 30:
            sub.send(c.Puback(pending.pop(0).packet_id))
            nxt = sub.expect(c.Publish)
            pending.append(nxt)
            got.append(int(nxt.payload))
        assert got == list(range(30))
        for p in pending:
            sub.send(c.Puback(p.packet_id))
    finally:
        pub.disconnect()
        sub.disconnect()


def test_offline_queue_is_bounded(small_queues) -> None:
    """An offline persistent session queues at most ``broker.max_queued_messages`` (50); with the default
    ``drop_new`` policy the first 50 of 80 arrive on reconnect, in order, and nothing after them."""
    node = small_queues
    topic = unique("bounded")
    cid = unique("bounded-sub")
    sub = raw_connected(node, cid, clean=False)
    sub.subscribe(1, (topic, 1))
    sub.disconnect()
    pub = raw_connected(node, unique("bounded-pub"))
    try:
        for i in range(80):
            pub.publish_qos1(topic, str(i).encode(), i + 1)
    finally:
        pub.disconnect()
    sub = RawClient.to(node)
    try:
        assert sub.connect(cid, clean=False).session_present
        got = []
        while len(got) < 50:
            p = sub.expect(c.Publish)
            got.append(int(p.payload))
            sub.send(c.Puback(p.packet_id))
        sub.send(c.Pingreq())
        rest, _ = sub.collect_until(lambda p: isinstance(p, c.Pingresp))
        assert got == list(range(50))
        assert [p for p in rest if isinstance(p, c.Publish)] == []
    finally:
        sub.disconnect()
        end_session(node, cid)
