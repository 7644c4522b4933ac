"""The broker over a real LMDBStorage: what persistent sessions write, and a restart restoring it.

A "restart" closes the storage (as a SIGKILL would leave it: only committed batches count) and
builds a new Broker on a reopened LMDBStorage, as BrokerService.start does.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.broker.message import Message
from fluxmq.broker.session import EXPIRY_NEVER, PersistentSession, Session, Will
from fluxmq.errors import QuotaExceeded
from fluxmq.storage.lmdb import LMDBStorage
from tests.storage.lmdb_node import MiB, Node


def test_offline_queue_is_on_disk_and_survives_a_restart(node: Node) -> None:
    s, d, _ = node.connect("sub", 3600)
    node.broker.subscribe(s, "q/#", 2)
    node.disconnect(s, d)
    for i in range(300):
        node.publish(f"q/{i}", f"m{i}".encode(), qos=1 + i % 2)
    assert len(node.broker.sessions["sub"].queue) == 300
    queued_bytes = node.broker.sessions["sub"].queue_bytes
    assert queued_bytes > 300 * 10
    node = node.restart()
    s = node.broker.sessions["sub"]
    assert isinstance(s, PersistentSession) and len(s.queue) == 300
    assert s.queue_bytes == queued_bytes  # what metrics and the admin API report
    assert "q/#" in s.subscriptions
    s, d, present = node.connect("sub", 3600)
    assert present
    sent = list(d.sent)
    while s.inflight:  # ack everything: the rest of the queue follows in order
        for pid in list(s.inflight):
            entry = s.inflight[pid]
            if entry.qos == 1:
                s.on_puback(pid)
            else:
                s.on_pubrec(pid)
                s.on_pubcomp(pid)
        sent = d.sent
    assert [t for t, *_ in sent] == [f"q/{i}" for i in range(300)]
    assert [q for _, q, *_ in sent] == [1 + i % 2 for i in range(300)]
    node.storage.commit()
    node = node.restart()
    assert len(node.broker.sessions["sub"].queue) == 0 and not node.broker.sessions["sub"].inflight


def test_inflight_is_resent_with_dup_and_released_qos2_gets_pubrel(node: Node) -> None:
    s, d, _ = node.connect("sub", EXPIRY_NEVER)
    node.broker.subscribe(s, "t", 2)
    node.publish("t", b"one", qos=1)
    node.publish("t", b"two", qos=2)
    pid1, pid2 = d.sent[0][3], d.sent[1][3]
    s.on_pubrec(pid2)  # PUBREL sent, PUBCOMP pending
    node.storage.commit()
    node = node.restart()
    s, d, _ = node.connect("sub", EXPIRY_NEVER)
    assert d.sent == [("t", 1, False, pid1, True, None)]  # DUP set [MQTT-4.4.0-1]
    assert d.pubrels == [pid2]


def test_inbound_qos2_ids_survive_so_a_resend_is_not_routed_twice(node: Node) -> None:
    s, d, _ = node.connect("pub", 3600)
    s.inbound_qos2.add(17)
    node.storage.commit()
    node = node.restart()
    assert 17 in node.broker.sessions["pub"].inbound_qos2
    s, d, _ = node.connect("pub", 3600)
    s.inbound_qos2.discard(17)  # PUBREL
    node.storage.commit()
    node = node.restart()
    assert node.broker.sessions["pub"].inbound_qos2 == set()


def test_uncommitted_operations_are_lost_committed_ones_are_not(node: Node) -> None:
    s, d, _ = node.connect("sub", 3600)
    node.broker.subscribe(s, "t", 1)
    node.disconnect(s, d)
    node.publish("t", b"committed")
    node.broker.publish(Message("t", b"never committed", 1))  # no commit: its ack was never sent
    node = node.restart()
    s, d, _ = node.connect("sub", 3600)
    assert [m[0] for m in d.sent] == ["t"] and len(d.sent) == 1


def test_clean_sessions_never_touch_storage(node: Node) -> None:
    s, d, _ = node.connect("clean", 0, clean=True)
    assert type(s) is Session
    assert not node.storage.has_pending
    node.broker.subscribe(s, "x", 1)
    node.broker.publish(Message("x", b"1", 1))
    s.on_puback(d.sent[0][3])
    assert not node.storage.has_pending


def test_session_expires_by_wall_clock_across_downtime_and_its_will_is_published(node: Node) -> None:
    watcher, wd, _ = node.connect("watcher", 3600)
    node.broker.subscribe(watcher, "will/#", 1)
    node.disconnect(watcher, wd)
    s, d, _ = node.connect("short", 60, will=Will(Message("will/short", b"gone", 1), 3000))
    node.disconnect(s, d, publish_will=True)
    # Pretend it disconnected two minutes ago (the node was down meanwhile).
    node.storage.put_session("short", 60, time.time() - 120, None)
    node.storage.commit()
    node = node.restart()
    assert "short" not in node.broker.sessions
    assert [q[0].topic for q in [node.broker.sessions["watcher"].queue[0]]] == ["will/short"]
    node.storage.commit()
    node = node.restart()
    assert "short" not in node.broker.sessions and len(node.broker.sessions["watcher"].queue) == 1


def test_will_delay_elapsed_in_downtime_is_published_else_rearmed(node: Node) -> None:
    watcher, wd, _ = node.connect("watcher", 3600)
    node.broker.subscribe(watcher, "will/#", 1)
    node.disconnect(watcher, wd)
    a, ad, _ = node.connect("a", 3600, will=Will(Message("will/a", b"a", 1), 5))
    b, bd, _ = node.connect("b", 3600, will=Will(Message("will/b", b"b", 1), 1000))
    node.disconnect(a, ad, publish_will=True)
    node.disconnect(b, bd, publish_will=True)
    node.storage.put_session("a", 3600, time.time() - 10, None)
    node.storage.put_session("b", 3600, time.time() - 10, None)
    node.storage.commit()
    node = node.restart()
    q = node.broker.sessions["watcher"].queue
    assert len(q) == 1 and q[0][0].topic == "will/a"
    assert node.broker.sessions["a"].will is None
    assert node.broker.sessions["b"].will is not None and node.broker.sessions["b"].timer is not None


def test_will_of_a_session_online_at_the_crash_is_published_at_restart(node: Node) -> None:
    watcher, wd, _ = node.connect("watcher", 3600)
    node.broker.subscribe(watcher, "will/#", 1)
    node.disconnect(watcher, wd)
    node.connect("online", EXPIRY_NEVER, will=Will(Message("will/online", b"x", 1), 0))
    node.storage.touch_alive()
    node.storage.commit()
    node = node.restart()
    assert node.broker.sessions["watcher"].queue[0][0].topic == "will/online"
    assert "online" in node.broker.sessions  # the session itself lives on (it never expires)


def test_normal_disconnect_discards_the_stored_will(node: Node) -> None:
    s, d, _ = node.connect("c", 3600, will=Will(Message("will/c", b"x", 1), 0))
    node.disconnect(s, d, publish_will=False)
    node = node.restart()
    assert node.broker.sessions["c"].will is None
    assert node.storage.load().sessions["c"].will is None


def test_retained_messages_with_properties_are_served_after_a_restart(node: Node) -> None:
    node.publish("r/a", b"kept", qos=1, retain=True, properties={0x03: "text/plain", 0x26: [("k", "v")]})
    node.publish("r/b", b"gone", qos=0, retain=True)
    node.publish("r/b", b"", qos=0, retain=True)  # cleared
    node.publish("r/exp", b"soon", qos=0, retain=True, expires_at=time.monotonic() + 0.05)
    node.publish("$SYS/broker/x", b"not stored", qos=0, retain=True)
    time.sleep(0.1)
    node = node.restart()
    found = node.broker.retained.match("#")
    assert [(m.topic, m.payload, m.properties) for m in found] == [
        ("r/a", b"kept", {0x03: "text/plain", 0x26: [("k", "v")]})
    ]
    assert node.broker.retained.match("$SYS/#") == []


def test_unsubscribe_and_clean_start_forget_stored_state(node: Node) -> None:
    s, d, _ = node.connect("c", 3600)
    node.broker.subscribe(s, "a", 1)
    node.broker.subscribe(s, "b", 1)
    node.broker.unsubscribe(s, "a")
    node.disconnect(s, d)
    node.publish("b", b"1")
    node = node.restart()
    assert list(node.broker.sessions["c"].subscriptions) == ["b"]
    s, d, present = node.connect("c", 3600, clean=True)
    assert not present and not s.subscriptions and len(s.queue) == 0
    node = node.restart()
    rec = node.storage.load().sessions["c"]
    assert rec.subscriptions == [] and rec.queue.count == 0


@pytest.fixture
def small(tmp_path: Path):
    n = Node(tmp_path / "small", persistent_max_queued_messages=3, persistent_max_queued_bytes=1 << 20)
    yield n
    n.storage.abort()


def test_disk_queue_overflow_evicts_qos0_first_then_refuses_new(small: Node) -> None:
    s, d, _ = small.connect("c", 3600)
    small.broker.subscribe(s, "t", 1)
    d.congested = True  # online but slow: QoS 0 is queued too
    small.broker.publish(Message("t", b"q1", 1))
    small.broker.publish(Message("t", b"z0", 0))
    small.broker.publish(Message("t", b"q2", 1))
    small.broker.publish(Message("t", b"q3", 1))  # full: the queued QoS 0 goes
    small.broker.publish(Message("t", b"q4", 1))  # full, no QoS 0 left: refused
    small.broker.publish(Message("t", b"z1", 0))  # a new QoS 0 never evicts
    small.storage.commit()
    assert small.broker.stats.drops["queue_full"] == 3
    small = small.restart()
    q = small.broker.sessions["c"].queue
    assert len(q) == 3
    items = []
    while q:
        items.append(q.popleft()[0].payload)
    assert items == [b"q1", b"q2", b"q3"]


def test_full_storage_refuses_messages_that_would_be_stored(node: Node) -> None:
    s, d, _ = node.connect("sub", 3600)
    node.broker.subscribe(s, "p/#", 1)
    c, cd, _ = node.connect("clean", 0, clean=True)
    node.broker.subscribe(c, "c/#", 1)
    node.storage.refusing = True
    with pytest.raises(QuotaExceeded):
        node.broker.publish(Message("p/1", b"x", 1))
    with pytest.raises(QuotaExceeded):
        node.broker.publish(Message("c/r", b"x", 1, True))  # retained: stored
    assert node.broker.publish(Message("c/1", b"x", 1)) == 1  # only a clean session: not stored
    assert node.broker.publish(Message("p/0", b"x", 0)) == 1  # QoS 0 is never refused


def test_a_retained_qos0_message_is_refused_while_the_storage_is_full(node: Node, caplog) -> None:
    """Every QoS is refused when it would be stored (issue 17 item 4): a retained QoS 0 message is
    dropped and counted as storage_full, logged once; clearing a retained message still works (it
    frees space). Before: QoS 0 bypassed the refusal and filled the map until commits failed."""
    import logging

    caplog.set_level(logging.WARNING, logger="fluxmq.broker")
    node.publish("r/keep", b"old", qos=0, retain=True)
    c, cd, _ = node.connect("clean", 0, clean=True)
    node.broker.subscribe(c, "r/#", 0)
    node.storage.refusing = True
    for _ in range(3):
        assert node.broker.publish(Message("r/new", b"x" * 1000, 0, True)) == 0
    assert node.broker.retained.get("r/new") is None
    assert node.broker.stats.drops.get("storage_full") == 3
    assert len([r for r in caplog.records if r.getMessage() == "publish_refused_storage_full"]) == 1
    assert cd.sent == []  # refused as a whole, as a QoS 1/2 message is
    node.broker.publish(Message("r/keep", b"", 0, True))  # a clear is not refused
    assert node.broker.retained.get("r/keep") is None


def test_a_qos1_publish_stored_for_others_stakes_its_publisher(node: Node) -> None:
    """The PUBACK of a QoS 1 message queued for an offline persistent session acknowledges the
    batch: a failed commit must abandon it. A publish stored nowhere stakes nothing."""
    s, d, _ = node.connect("sub", 3600)
    node.broker.subscribe(s, "p/#", 1)
    node.disconnect(s, d)
    pub, pd, _ = node.connect("pub", 0, clean=True)
    node.broker.publish(Message("other/1", b"x", 1), pub)
    assert "pub" not in node.storage.stake_clients()
    node.broker.publish(Message("p/1", b"x", 1), pub)
    assert {"pub", "sub"} <= node.storage.stake_clients()
    node.storage.commit()
    assert node.storage.stake_clients() == set()


@pytest.mark.parametrize("sync", ["none", "batch", "always"])
def test_wait_committed_returns_once_the_batch_holding_the_message_is_committed(
    tmp_path: Path, sync: str
) -> None:
    """The after-commit hook of the front ends without a connection (HTTP bridge, admin API)."""
    import gevent

    from fluxmq.protocol.flush import FlushScheduler

    store = LMDBStorage(tmp_path / "data", map_size=64 * MiB, sync=sync)
    FlushScheduler(store)
    broker = Broker(BrokerSettings(), store)
    try:
        broker.publish(Message("kept", b"v", 1, True))
        assert store.has_pending
        broker.wait_committed(timeout=10)
        with store.env.begin() as txn:
            assert txn.get(b"kept", db=store._dbs[6]) is not None  # committed when it returned
        broker.wait_committed(timeout=10)  # nothing pending: at once
        gevent.sleep(0)
    finally:
        store.close()


def test_wait_committed_raises_when_the_commit_fails(tmp_path: Path) -> None:
    from fluxmq.errors import StorageError
    from fluxmq.protocol.flush import FlushScheduler
    from tests.storage.test_lmdb import FailingStorage

    store = FailingStorage(tmp_path / "data", map_size=64 * MiB)
    FlushScheduler(store)
    broker = Broker(BrokerSettings(), store)
    try:
        store.fail = 1
        broker.publish(Message("kept", b"v", 1, True))
        with pytest.raises(StorageError):
            broker.wait_committed(timeout=10)
    finally:
        store.close()


def test_wait_committed_with_the_memory_backend_returns_at_once() -> None:
    broker = Broker(BrokerSettings())
    broker.publish(Message("kept", b"v", 1, True))
    broker.wait_committed(timeout=0)


def test_when_committed_is_set_by_the_commit_holding_what_was_recorded_before_it(tmp_path: Path) -> None:
    """``when_committed`` is ``wait_committed`` without the wait: a peer stream takes one per stored
    batch and goes on applying; each is set by the commit that holds what came before it, in
    order (None with the memory backend)."""
    store = LMDBStorage(tmp_path / "data", map_size=64 * MiB, sync="always")
    broker = Broker(BrokerSettings(), store)
    try:
        assert broker.when_committed().ready()  # nothing pending: set at once
        broker.publish(Message("a", b"v", 1, True))
        first = broker.when_committed()
        store.commit()
        broker.publish(Message("b", b"v", 1, True))
        second = broker.when_committed()
        assert first.ready() and first.get() is None
        assert not second.ready()  # the next commit's
        store.commit()
        assert second.ready() and second.get() is None
    finally:
        store.close()
    assert Broker(BrokerSettings()).when_committed() is None


def test_bridge_outbound_store_survives_a_restart_and_is_never_capped(tmp_path: Path) -> None:
    """Issue 14: a bridge's outbound store ($bridge/NAME) keeps what the peer has not acknowledged
    across a restart, and broker.max_session_expiry never ends it (an ordinary session does end)."""
    from fluxmq.bridge.config import BridgeConfig, TopicRoute
    from fluxmq.bridge.link import BridgeLink

    node = Node(tmp_path / "data", max_session_expiry=1)
    cfg = BridgeConfig("cloud", "127.0.0.1", 1, max_queued_messages=50, topics=(TopicRoute("q/#", "out", 1),))
    BridgeLink(cfg, node.broker)._open_session()
    s, d, _ = node.connect("ordinary", EXPIRY_NEVER)
    node.broker.subscribe(s, "q/#", 1)
    node.disconnect(s, d)
    for i in range(3):
        node.publish(f"q/{i}", b"m")
    time.sleep(1.2)  # past the 1 s cap while "down"
    node = node.restart()
    assert "ordinary" not in node.broker.sessions
    bridge = node.broker.sessions["$bridge/cloud"]
    assert len(bridge.queue) == 3 and bridge.expiry_interval == EXPIRY_NEVER
    link = BridgeLink(cfg, node.broker)
    assert link._open_session() is bridge and bridge.limits.max_queued_messages == 50
    node.storage.abort()
