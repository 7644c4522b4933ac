"""Retained messages and wills through etcd between two nodes' metadata planes and real brokers
(fluxmq/cluster/metadata/replicated.py)."""

from __future__ import annotations

import json
import os
import signal

import gevent

from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.broker.message import CONTENT_TYPE, USER_PROPERTY, Message
from fluxmq.cluster.metadata.client import EtcdClient
from fluxmq.cluster.metadata.replicated import (
    RetainedReplica,
    WillRegistry,
    decode_entry,
    encode_clear,
    encode_entry,
    stamp_of,
)
from tests.cluster.metadata.conftest import SHORT_TTL, crash, wait_for
from tests.cluster.metadata.test_member import _answers, _members

THRESHOLD = 64


def _pair(meta_factory):
    """Two nodes a and b, each a broker with its retained replica; b fetches large payloads from a."""
    metas = {n: meta_factory(n) for n in ("a", "b")}
    brokers = {n: Broker(BrokerSettings()) for n in metas}
    replicas: dict[str, RetainedReplica] = {}
    fetches = []

    def fetch(node, topic):
        fetches.append((node, topic))
        return replicas[node].serve_fetch(topic)

    for n in metas:
        replicas[n] = RetainedReplica(metas[n], brokers[n], THRESHOLD, fetch)
        replicas[n].start()
    return metas, brokers, replicas, fetches


def _retained(broker, topic):
    message = broker.retained.get(topic)
    return message.payload if message is not None else None


def test_small_and_large_retained_messages_reach_the_other_node(meta_factory):
    metas, brokers, replicas, fetches = _pair(meta_factory)
    try:
        props = {CONTENT_TYPE: "text/plain", USER_PROPERTY: [("k", "v")]}
        brokers["a"].publish(Message("r/small", b"hello", 1, True, props))
        big = bytes(range(256)) * 4
        brokers["a"].publish(Message("r/big", big, 0, True))
        assert wait_for(lambda: _retained(brokers["b"], "r/small") == b"hello")
        got = brokers["b"].retained.get("r/small")
        assert (got.qos, got.retain, got.properties) == (1, True, props)
        assert wait_for(lambda: _retained(brokers["b"], "r/big") == big)
        assert fetches == [("a", "r/big")]  # only the large one went over the transport
        stored = metas["b"].client.get(metas["b"].prefix + "retained/r/big")
        assert len(stored["value"]) < 200  # etcd holds a reference, not the payload
        brokers["a"].publish(Message("r/small", b"", 0, True))  # clear
        assert wait_for(lambda: _retained(brokers["b"], "r/small") is None)
        assert _retained(brokers["b"], "r/big") == big
    finally:
        for replica in replicas.values():
            replica.stop()


def test_a_change_from_the_other_node_is_not_written_back(meta_factory):
    metas, brokers, replicas, _ = _pair(meta_factory)
    try:
        brokers["a"].publish(Message("r/t", b"x", 0, True))
        assert wait_for(lambda: _retained(brokers["b"], "r/t") == b"x")
        gevent.sleep(0.3)
        assert replicas["b"].written == 0  # applied on b, never echoed to etcd
        assert replicas["a"].written == 1
    finally:
        for replica in replicas.values():
            replica.stop()


def test_concurrent_changes_of_one_topic_converge_on_every_node(meta_factory):
    metas, brokers, replicas, _ = _pair(meta_factory)
    try:
        for i in range(30):
            brokers["a"].publish(Message("r/c", f"a{i}".encode(), 0, True))
            brokers["b"].publish(Message("r/c", f"b{i}".encode(), 0, True))
            gevent.sleep(0)
        assert replicas["a"].flush() and replicas["b"].flush()
        final = metas["a"].client.get(metas["a"].prefix + "retained/r/c")
        assert wait_for(lambda: _retained(brokers["a"], "r/c") == _retained(brokers["b"], "r/c") is not None)
        assert _retained(brokers["a"], "r/c") == decode_entry(final["value"])[1].payload  # etcd's last word
        assert _retained(brokers["a"], "r/c") in (b"a29", b"b29")
    finally:
        for replica in replicas.values():
            replica.stop()


def test_a_late_node_gets_what_etcd_holds(meta_factory):
    a = meta_factory("a")
    broker_a = Broker(BrokerSettings())
    replica_a = RetainedReplica(a, broker_a, THRESHOLD, lambda n, t: b"")
    replica_a.start()
    try:
        broker_a.publish(Message("r/early", b"1", 0, True))
        assert replica_a.flush()
        b = meta_factory("b")
        broker_b = Broker(BrokerSettings())
        replica_b = RetainedReplica(b, broker_b, THRESHOLD, lambda n, t: b"")
        replica_b.start()
        assert _retained(broker_b, "r/early") == b"1"  # read at start, before any event
        replica_b.stop()
    finally:
        replica_a.stop()


def _wills(meta_factory, names):
    metas = {n: meta_factory(n) for n in names}
    published = {n: [] for n in names}
    registries = {n: WillRegistry(metas[n], published[n].append, sweep_interval=0.2) for n in names}
    for registry in registries.values():
        registry.start()
    return metas, registries, published


def test_the_wills_of_a_dead_node_are_published_once_by_the_leader(meta_factory):
    metas, registries, published = _wills(meta_factory, ["a", "b", "c"])
    try:
        assert wait_for(lambda: metas["a"].is_leader)  # a started first: a leads
        for i in range(5):
            assert registries["a"].put(f"dev{i}", Message(f"will/{i}", b"gone", 1, False))
        assert registries["b"].put("other", Message("will/b", b"b", 0, False))
        crash(metas["a"])  # a dies: its lease expires, b or c leads and publishes a's wills
        registries["a"].stop()
        assert wait_for(lambda: len(published["b"]) + len(published["c"]) == 5, timeout=SHORT_TTL * 6)
        gevent.sleep(0.6)  # more sweeps: nothing is published twice
        topics = sorted(m.topic for m in published["b"] + published["c"])
        assert topics == [f"will/{i}" for i in range(5)]
        assert published["a"] == []
        assert (
            metas["b"].client.range(metas["b"].prefix + "wills/", prefix=True)[1][0]["key"].endswith("/other")
        )
    finally:
        for registry in registries.values():
            registry.stop()


def test_racing_sweeps_publish_each_will_exactly_once(meta_factory):
    metas, registries, published = _wills(meta_factory, ["a", "b", "c"])
    try:
        for i in range(20):
            registries["a"].put(f"dev{i}", Message(f"will/{i}", b"x", 0, False))
        crash(metas["a"])
        registries["a"].stop()
        assert wait_for(lambda: set(metas["b"].members()) == {"b", "c"}, timeout=SHORT_TTL * 6)
        # Both survivors sweep at once (as two nodes that each believe they lead would), racing the
        # leader's own sweeper too.
        done = [g.value for g in gevent.joinall([gevent.spawn(registries[n].sweep) for n in ("b", "c")])]
        gevent.sleep(0.6)
        topics = [m.topic for m in published["b"] + published["c"]]
        assert sorted(topics) == sorted(f"will/{i}" for i in range(20)), done
    finally:
        for registry in registries.values():
            registry.stop()


def test_a_will_the_owner_published_itself_or_cancelled_is_not_published_again(meta_factory):
    metas, registries, published = _wills(meta_factory, ["a", "b"])
    try:
        registries["a"].put("dev", Message("will/dev", b"x", 0, False))
        registries["a"].put("calm", Message("will/calm", b"y", 0, False))
        assert registries["a"].claim("dev") is True  # a publishes it itself
        assert registries["a"].cancel("calm") is True  # clean disconnect
        crash(metas["a"])
        registries["a"].stop()
        assert wait_for(lambda: metas["b"].is_leader, timeout=SHORT_TTL * 6)
        gevent.sleep(0.8)
        assert published["b"] == []
    finally:
        for registry in registries.values():
            registry.stop()


def test_a_topic_cleared_while_a_node_was_down_stays_cleared(meta_factory, tmp_path):
    a = meta_factory("a")
    broker_a, broker_b = Broker(BrokerSettings()), Broker(BrokerSettings())
    replica_a = RetainedReplica(a, broker_a, THRESHOLD, lambda n, t: b"")
    replica_a.start()
    # b's store has a topic from before it joined: its first start contributes it to the cluster.
    broker_b.retained.store(Message("r/old", b"from b's store", 0, True))
    b = meta_factory("b", state_dir=tmp_path / "b")
    replica_b = RetainedReplica(b, broker_b, THRESHOLD, lambda n, t: b"")
    replica_b.start()
    try:
        assert replica_b.flush()
        assert wait_for(lambda: _retained(broker_a, "r/old") == b"from b's store")
        replica_b.stop()
        b.stop()  # b is down (its store keeps r/old) ...
        broker_a.publish(Message("r/old", b"", 0, True))  # ... while a clears the topic
        assert replica_a.flush()
        b2 = meta_factory("b", state_dir=tmp_path / "b")  # b again, same store and state
        replica_b = RetainedReplica(b2, broker_b, THRESHOLD, lambda n, t: b"")
        replica_b.start()
        assert replica_b.flush()
        assert _retained(broker_b, "r/old") is None  # removed at start, not written back
        gevent.sleep(0.3)
        assert _retained(broker_a, "r/old") is None
    finally:
        replica_b.stop()
        replica_a.stop()


def test_after_a_restart_a_node_claims_only_the_wills_still_in_etcd_under_its_name(meta_factory):
    metas, registries, published = _wills(meta_factory, ["a"])
    a = metas["a"]
    try:
        registries["a"].put("kept", Message("will/kept", b"1", 0, False))
        registries["a"].put("taken", Message("will/taken", b"2", 0, False))
        registries["a"].stop()
        a.client.delete(a.prefix + "wills/taken")  # the leader published it while a was taken for dead
        again = WillRegistry(a, published["a"].append)  # a's broker restored: a new registry
        again.start()
        try:
            assert again.claim("kept") is True  # still ours: a publishes it (exactly once) ...
            assert again.claim("kept") is False  # ... and only once
            assert again.claim("taken") is False  # published elsewhere already
            assert again.claim("never-stored") is False
        finally:
            again.stop()
    finally:
        for registry in registries.values():
            registry.stop()


def test_retained_entries_carry_their_stamp_and_old_entries_read_as_stamp_0():
    message = Message("r/t", b"v", 1, True)
    stamped = encode_entry("n1", message, True, at=1700000000123)
    assert stamp_of({"value": stamped}) == (1700000000123, "n1")
    body, got = decode_entry(stamped)
    assert (body["at"], got.payload, got.qos) == (1700000000123, b"v", 1)
    old = encode_entry("n0", message)  # a version without stamps wrote it
    assert "at" not in json.loads(old)
    assert stamp_of({"value": old}) == (0, "n0")
    assert decode_entry(old)[1].payload == b"v"  # still read
    assert stamp_of({"value": encode_clear("n2", 5)}) == (5, "n2")
    assert stamp_of({"value": b"not json"}) == (0, "")
    assert stamp_of(None) is None


def test_an_entry_of_an_older_version_is_applied_and_a_later_change_replaces_it(meta_factory):
    metas, brokers, replicas, _ = _pair(meta_factory)
    try:
        a = metas["a"]
        a.client.put(
            a.prefix + "retained/r/old", encode_entry("elder", Message("r/old", b"unstamped", 0, True))
        )
        assert wait_for(lambda: _retained(brokers["b"], "r/old") == b"unstamped")
        brokers["b"].publish(Message("r/old", b"stamped", 0, True))
        assert wait_for(lambda: _retained(brokers["a"], "r/old") == b"stamped")
        assert replicas["b"].written == 1 and replicas["b"].superseded == 0
    finally:
        for replica in replicas.values():
            replica.stop()


def test_with_every_node_live_set_and_clear_lifetimes_leave_no_clear_record(meta_factory):
    """A clear made while no node is lost (and not written late) is a plain delete: a workload that
    sets and clears retained topics leaves nothing per topic in etcd or in the nodes' memory. Before,
    each clear left a ``retained_cleared/`` record for an hour (and a copy in every node)."""
    metas, brokers, replicas, _ = _pair(meta_factory)
    cleared = metas["a"].prefix + "retained_cleared/"
    try:
        for i in range(50):
            node = "ab"[i % 2]
            brokers[node].publish(Message(f"r/life/{i}", b"1", 0, True))
            brokers[node].publish(Message(f"r/life/{i}", b"", 0, True))
        for replica in replicas.values():
            assert replica.flush()
        assert metas["a"].client.range(cleared, prefix=True)[1] == []
        assert metas["a"].client.range(metas["a"].prefix + "retained/r/life/", prefix=True)[1] == []
        assert not replicas["a"]._cleared.items and not replicas["b"]._cleared.items
    finally:
        for replica in replicas.values():
            replica.stop()


def test_a_clear_leaves_a_stamped_record_while_a_node_is_lost_until_a_set_or_the_sweep_removes_it(
    meta_factory, tmp_path
):
    """Node c is killed (counted lost: it may come back with older changes to write): a's clears
    leave stamped records. A set deletes its record; the leader's sweep keeps the others while c is
    lost (``clear_keep``), and deletes them once no node has been lost for ``clear_grace``."""
    metas, brokers, replicas, _ = _pair(meta_factory)
    a = metas["a"]
    cleared = a.prefix + "retained_cleared/"
    c = meta_factory("c", state_dir=tmp_path / "node-c")
    try:
        assert wait_for(lambda: set(a.members()) == {"a", "b", "c"})
        crash(c)
        assert wait_for(lambda: "c" in a.membership.lost(), timeout=SHORT_TTL * 5)
        for topic in ("r/x", "r/y"):
            brokers["a"].publish(Message(topic, b"1", 0, True))
            brokers["a"].publish(Message(topic, b"", 0, True))
        assert replicas["a"].flush()
        assert sorted(kv["key"] for kv in a.client.range(cleared, prefix=True)[1]) == [
            cleared + "r/x",
            cleared + "r/y",
        ]
        assert a.client.get(a.prefix + "retained/r/x") is None
        brokers["b"].publish(Message("r/x", b"2", 0, True))  # a set deletes the record
        assert replicas["b"].flush()
        assert wait_for(lambda: _retained(brokers["a"], "r/x") == b"2")
        assert [kv["key"] for kv in a.client.range(cleared, prefix=True)[1]] == [cleared + "r/y"]
        replicas["a"].clear_grace = 0.0
        assert replicas["a"].sweep_cleared() == 0  # c is lost: kept for clear_keep
        meta_factory("c", state_dir=tmp_path / "node-c")  # c is back: nobody lost
        assert wait_for(lambda: not a.membership.lost())
        assert wait_for(lambda: replicas["a"].sweep_cleared() == 1)
        assert a.client.range(cleared, prefix=True)[1] == []
    finally:
        for replica in replicas.values():
            replica.stop()


def test_a_change_written_late_loses_to_a_later_one_already_in_etcd(meta_factory, tmp_path):
    """Node a's etcd member is stopped (SIGSTOP: a is cut off from etcd, the two other members keep
    the quorum b writes through). What a sets or clears meanwhile waits in memory; b changes the same
    topics later. When a's member answers again a's writes find b's newer stamps in etcd: both nodes
    end with b's values. A topic a changed after b did keeps a's value."""
    members = _members(tmp_path, 3)
    try:
        for member in members:
            member.start()
        urls = [m.settings.client_endpoints()[0] for m in members]
        assert wait_for(lambda: all(_answers(EtcdClient([u], timeout=2.0)) for u in urls), timeout=60)
        metas = {"a": meta_factory("a", endpoint=urls[0]), "b": meta_factory("b", endpoint=urls[1])}
        brokers = {n: Broker(BrokerSettings()) for n in metas}
        replicas = {n: RetainedReplica(metas[n], brokers[n], THRESHOLD, lambda n, t: b"") for n in metas}
        for replica in replicas.values():
            replica.start()
        try:
            for topic in ("r/a-clears", "r/b-clears"):
                brokers["b"].publish(Message(topic, b"before", 0, True))
            assert wait_for(lambda: _retained(brokers["a"], "r/a-clears") == b"before")
            assert wait_for(lambda: _retained(brokers["a"], "r/b-clears") == b"before")
            os.kill(members[0].pid, signal.SIGSTOP)
            try:
                brokers["b"].publish(Message("r/a-later", b"b", 0, True))
                assert replicas["b"].flush()
                gevent.sleep(0.05)  # every stamp of a below is later than b's r/a-later
                brokers["a"].publish(Message("r/a-later", b"a", 0, True))
                brokers["a"].publish(Message("r/both", b"a", 0, True))
                brokers["a"].publish(Message("r/b-clears", b"a", 0, True))
                brokers["a"].publish(Message("r/a-clears", b"", 0, True))
                gevent.sleep(0.05)  # b's changes below come later than a's
                brokers["b"].publish(Message("r/both", b"b", 0, True))
                brokers["b"].publish(Message("r/b-clears", b"", 0, True))
                brokers["b"].publish(Message("r/a-clears", b"b", 0, True))
                assert replicas["b"].flush()
                gevent.sleep(2.5)  # a's writes fail or stall meanwhile (past replicated.STALL)
                assert replicas["a"]._pending
            finally:
                os.kill(members[0].pid, signal.SIGCONT)
            assert replicas["a"].flush(30)
            expected = {"r/a-later": b"a", "r/both": b"b", "r/b-clears": None, "r/a-clears": b"b"}
            for name in ("a", "b"):
                assert wait_for(
                    lambda name=name: {t: _retained(brokers[name], t) for t in expected} == expected
                ), (
                    name,
                    {t: _retained(brokers[name], t) for t in expected},
                )
            assert replicas["a"].superseded >= 3
        finally:
            for replica in replicas.values():
                replica.stop()
    finally:
        for member in members:
            if member.pid is not None:
                os.kill(member.pid, signal.SIGCONT)
            member.stop()


def test_a_topic_changed_again_and_again_costs_one_etcd_request_per_write(meta_factory):
    """Each write compares etcd's revision of the topic; a node that writes a topic again before
    its watch brought back its previous write compares against what it wrote, not against the
    watch's older view (which would fail the compare and cost a second transaction)."""
    a = meta_factory("a")
    broker = Broker(BrokerSettings())
    replica = RetainedReplica(a, broker, THRESHOLD, lambda n, t: b"")
    replica.start()
    try:
        assert replica.flush()
        before = a.client.calls
        for i in range(200):
            broker.publish(Message("r/hot", str(i).encode(), 0, True))
            gevent.sleep(0.002)
        assert replica.flush()
        assert replica.written > 50
        assert a.client.calls - before <= replica.written + 10, (a.client.calls - before, replica.written)
        assert decode_entry(a.client.get(a.prefix + "retained/r/hot")["value"])[1].payload == b"199"
    finally:
        replica.stop()
