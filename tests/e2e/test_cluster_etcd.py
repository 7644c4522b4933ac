"""Three real ``fluxmq-node`` processes that find each other through etcd (issue 11, "What must work"):
membership feeds the gRPC peers, ownership and takeover through etcd, retained messages and wills
across nodes, kill -9 and restart, SIGTERM drain, two nodes racing for one client id.

The nodes share the session's etcd (``etcd_server``, tests/conftest.py) under a key prefix
of this module, and the module's three nodes are shared by its tests (each uses its own topics and
client ids). The tests that kill or stop a node restart it with the same data before they end. The
etcd restart test runs two nodes of its own on a private etcd.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from fluxmq._core import codec as c
from tests.conftest import HOST, NodeFactory, RunningNode, free_port
from tests.e2e.mqtt5raw import Raw5, paho5, raw5, unique
from tests.e2e.test_cluster_data_plane import crosses_at_qos
from tests.e2e.test_cluster_data_plane import (
    test_publish_properties_arrive_intact_across_nodes as _properties_across_nodes,
)
from tests.e2e.test_cluster_data_plane import (
    test_shared_group_over_three_nodes_gets_each_message_once as _shared_group_once,
)
from tests.etcd import etcd_get, start_etcd

pytestmark = pytest.mark.e2e

WAIT = 10.0


def wait_for(predicate, timeout: float = 20.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


class Cluster:
    """Nodes on one etcd: the config of each is kept, so a node can be started again with its data."""

    def __init__(
        self, factory: NodeFactory, base: Path, endpoint: str, prefix: str, names: list[str]
    ) -> None:
        self.factory = factory
        self.configs = {}
        for name in names:
            data = base / name
            data.mkdir(parents=True, exist_ok=True)
            self.configs[name] = {
                "server.tcp.plain.addr": f"{HOST}:{free_port()}",
                "server.health_addr": f"{HOST}:{free_port()}",
                "storage.path": str(data),
                "cluster.enabled": True,
                "cluster.node_id": name,
                "cluster.drain_timeout": "5s",
                "cluster.transport.bind_addr": f"{HOST}:{free_port()}",
                "cluster.etcd.endpoints": [endpoint],
                "cluster.etcd.prefix": prefix,
                "cluster.etcd.lease_ttl": "2s",
                "cluster.etcd.hybrid_retained_size_threshold": 1024,
            }
        self.nodes: dict[str, RunningNode] = {}
        self.endpoint = endpoint
        self.prefix = prefix

    def start(self, name: str) -> RunningNode:
        node = self.factory(self.configs[name], wait_ready=True)
        self.nodes[name] = node
        return node

    def start_all(self, peers: int) -> None:
        """Start every node, then wait until each sees ``peers`` live peers."""
        for name in self.configs:
            self.start(name)
        for node in self.nodes.values():
            assert wait_for(lambda node=node: nominal(node, peers)), node.http_get("/cluster/status")

    def owner(self, client_id: str) -> str | None:
        """The node etcd names as the owner of ``client_id``."""
        return self.value(f"sessions/{client_id}/owner")

    def value(self, key: str) -> str | None:
        """The value of ``key`` under the cluster's prefix (read with etcd's JSON gateway)."""
        value = etcd_get(self.endpoint, f"{self.prefix}{key}")
        return None if value is None else value.decode()


def nominal(node: RunningNode, peers: int) -> bool:
    status, body = node.http_get("/ready")
    if status != 200 or body.get("mode") != "nominal":
        return False
    members = node.http_get("/cluster/status")[1].get("members", [])
    return len([m for m in members if not m["self"] and m["reachable"]]) == peers


@pytest.fixture(scope="module")
def cluster(etcd_server, tmp_path_factory):
    base = tmp_path_factory.mktemp("ecluster")
    factory = NodeFactory(base / "nodes")
    (base / "nodes").mkdir()
    cl = Cluster(factory, base, etcd_server.endpoint, f"/t-{uuid.uuid4().hex[:8]}/", ["e1", "e2", "e3"])
    # e2's lease outlives a restart (test_will_due_at_a_quick_restart_reaches_the_other_nodes_once)
    cl.configs["e2"]["cluster.etcd.lease_ttl"] = "20s"
    try:
        cl.start_all(2)
        yield cl
    finally:
        factory.close()


# -- routing with etcd membership -------------------------------------------------------------------


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_cross_node_qos_with_etcd_membership(cluster, qos: int) -> None:
    """No static peers: the nodes learned each other's transport from etcd."""
    e1, e2 = cluster.nodes["e1"], cluster.nodes["e2"]
    crosses_at_qos(e1, e2, qos)
    status = e1.http_get("/cluster/status")[1]
    assert status["cluster_mode"] is True and status["node_id"] == "e1"
    assert {m["node_id"]: m["reachable"] for m in status["members"]} == {"e1": True, "e2": True, "e3": True}
    leaders = 0
    for node in cluster.nodes.values():
        with urllib.request.urlopen(f"http://{HOST}:{node.health_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        leaders += int(float(re.search(r"^fluxmq_cluster_is_leader (\S+)$", text, re.M).group(1)))
        assert re.search(r'^fluxmq_cluster_peer_forwarded_batches(?:_total)?\{peer="e\d"\} ', text, re.M)
    assert leaders == 1


def test_data_plane_checks_with_etcd_membership(cluster) -> None:
    """C1's checks of a 5.0 publish's properties and of a shared group over three nodes (3,000
    messages, each once), run again on nodes that found each other in etcd."""
    nodes = [cluster.nodes[n] for n in ("e1", "e2", "e3")]
    _properties_across_nodes(nodes)
    _shared_group_once(nodes)


def test_sys_cluster_topics_name_the_real_members(cluster) -> None:
    e3 = cluster.nodes["e3"]
    with paho5(e3, unique("sys")) as sub:
        sub.subscribe("$SYS/broker/cluster/#", 0)
        got = {}
        deadline = time.monotonic() + WAIT  # published at every change, checked every 2 s

        def settled() -> bool:
            return (
                len(got) == 3
                and got["status"] == b"ok"
                and all(n["reachable"] for n in json.loads(got["nodes"]))
            )

        while not settled() and time.monotonic() < deadline:
            m = sub.get(WAIT)
            got[m.topic.rsplit("/", 1)[1]] = m.payload
    assert got["status"] == b"ok"
    nodes = json.loads(got["nodes"])
    assert sorted(n["node_id"] for n in nodes) == ["e1", "e2"]
    assert all(n["reachable"] for n in nodes)
    assert set(json.loads(got["sync"])) == {"e1", "e2"}


# -- takeover ---------------------------------------------------------------------------------------


def test_takeover_moves_inflight_and_queued_messages_exactly(cluster) -> None:
    """Client on e1 with Receive Maximum 2 and, at the move: QoS 2 p0 received and PUBREC'd (PUBREL
    sent by e1, no PUBCOMP yet), QoS 1 p1 not acknowledged, eight QoS 1/2 messages queued behind
    them, and an inbound QoS 2 of its own awaiting PUBREL. It connects to e2 while still connected
    to e1: the e1 connection gets DISCONNECT 0x8E, e2 answers session present, sends the PUBREL of
    p0 again and p1 again with DUP, completes the inbound QoS 2 without routing it a second time,
    then sends the eight queued, each exactly once, in order, with their QoS."""
    e1, e2, e3 = cluster.nodes["e1"], cluster.nodes["e2"], cluster.nodes["e3"]
    cid, topic, own = unique("mover"), unique("ex/move"), unique("ex/own")
    props = {c.SESSION_EXPIRY_INTERVAL: 300, c.RECEIVE_MAXIMUM: 2}
    with paho5(e3, unique("watch")) as watch:
        watch.subscribe(own, 2)
        a = raw5(e1, cid, clean_start=False, properties=props)
        assert a.subscribe(1, (topic, 2)).reason_codes == [2]
        with paho5(e3, unique("pub")) as pub:
            for i in range(10):
                pub.publish(topic, f"p{i}".encode(), 1 if i % 2 else 2)
        first = [a.expect(c.Publish) for _ in range(2)]
        assert [(p.payload, p.qos) for p in first] == [(b"p0", 2), (b"p1", 1)]
        a.send(c.Pubrec(first[0].packet_id))
        assert a.expect(c.Pubrel).packet_id == first[0].packet_id  # no PUBCOMP: p0 stays in flight
        assert a.publish(own, b"mine", 2, packet_id=7).packet_id == 7  # PUBREC, no PUBREL yet
        assert watch.get(WAIT).payload == b"mine"
        assert cluster.owner(cid) == "e1"

        b = Raw5(e2)
        connack = b.connect(cid, clean_start=False, properties=props)
        assert connack.reason_code == 0 and connack.session_present
        gone = a.wait_closed()
        assert any(isinstance(p, c.Disconnect) and p.reason_code == 0x8E for p in gone), gone
        again = [b.recv(WAIT) for _ in range(2)]
        pubrel = [p for p in again if isinstance(p, c.Pubrel)]
        resent = [p for p in again if isinstance(p, c.Publish)]
        assert [p.packet_id for p in pubrel] == [first[0].packet_id], again
        assert [(p.payload, p.qos, p.dup, p.packet_id) for p in resent] == [
            (b"p1", 1, True, first[1].packet_id)
        ]
        b.send(c.Pubcomp(first[0].packet_id), c.Puback(first[1].packet_id), c.Pubrel(7))
        got, completed = [], []
        while len(got) < 8 or not completed:
            packet = b.recv(WAIT)
            if isinstance(packet, c.Publish):
                got.append((packet.payload, packet.qos))
                b.ack(packet)
            elif isinstance(packet, c.Pubcomp):
                completed.append(packet.packet_id)
        assert completed == [7]
        assert got == [(f"p{i}".encode(), 1 if i % 2 else 2) for i in range(2, 10)]
        assert cluster.owner(cid) == "e2"
        # the subscriptions moved with the session: e2 announced them, so e3 now routes to e2
        with paho5(e3, unique("pub")) as pub:
            pub.publish(topic, b"after", 1)
        p = b.expect(c.Publish)
        assert p.payload == b"after"
        b.ack(p)
        b.disconnect()
        time.sleep(0.3)
        assert watch.messages.empty()  # the inbound QoS 2 was routed once, on e1


def test_two_nodes_racing_for_one_client_id_end_with_one_owner(cluster) -> None:
    """CONNECT to e1 and e3 at once, 20 rounds: each round ends with exactly one live connection, on
    the node etcd names as the owner."""
    e1, e3 = cluster.nodes["e1"], cluster.nodes["e3"]
    cid = unique("racer")
    props = {c.SESSION_EXPIRY_INTERVAL: 60}
    for _round in range(20):
        clients = {"e1": Raw5(e1), "e3": Raw5(e3)}
        answers: dict[str, object] = {}

        def go(name: str, clients=clients, answers=answers) -> None:
            try:
                answers[name] = clients[name].connect(cid, clean_start=False, properties=props)
            except Exception as exc:  # closed by the other's takeover before its CONNACK was read
                answers[name] = exc

        threads = [threading.Thread(target=go, args=(n,)) for n in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT + 5)
        # Both may have their CONNACK: the takeover that follows the second closes the first
        # connection, when the machine gets round to it. Wait for that state, then check it.
        alive = [
            name
            for name in clients
            if isinstance(answers.get(name), c.Connack) and answers[name].reason_code == 0
        ]

        def settled(alive=alive, clients=clients) -> bool:
            alive[:] = [name for name in alive if clients[name].answers_ping()]
            return not alive or (len(alive) == 1 and cluster.owner(cid) == alive[0])

        wait_for(settled, timeout=WAIT)  # a closed connection stays closed: none left is final
        if len(alive) != 1 or cluster.owner(cid) != alive[0]:
            logs = sorted(
                f"{line[:24]} {name} {line[24:]}"
                for name, node in (("e1", e1), ("e3", e3))
                for line in node.log_text().splitlines()
                if cid in line
            )
            raise AssertionError((_round, answers, alive, cluster.owner(cid), logs[-16:]))
        for client in clients.values():
            client.close()


# -- retained and wills -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [100, 20000])
def test_retained_set_on_one_node_reaches_new_subscribers_on_the_others(cluster, size: int) -> None:
    """Small (replicated through etcd) and large (over the 1 KiB threshold: fetched from its owner)."""
    e1 = cluster.nodes["e1"]
    topic = unique(f"ex/ret{size}")
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    with paho5(e1, unique("pub")) as pub:
        pub.publish(topic, payload, 1, retain=True)
    for name in ("e2", "e3"):

        def arrived(name=name) -> bool:
            with paho5(cluster.nodes[name], unique("late")) as sub:
                sub.subscribe(topic, 1)
                try:
                    m = sub.get(0.5)
                except AssertionError:
                    return False
                assert m.retain and m.payload == payload
                return True

        assert wait_for(arrived, timeout=15, step=0.1), name
    # /metrics counts it: written to etcd by e1, applied (and, when large, fetched) on the others
    assert (e1.metric("fluxmq_cluster_retained_written_total") or 0) >= 1
    for name in ("e2", "e3"):
        assert (cluster.nodes[name].metric("fluxmq_cluster_retained_applied_total") or 0) >= 1
        if size > 1024:
            assert (cluster.nodes[name].metric("fluxmq_cluster_retained_fetched_total") or 0) >= 1
    assert e1.metric("fluxmq_cluster_retained_clear_records") == 0  # every node live: no clear record


@pytest.mark.parametrize("size", [10, 5000])
def test_will_published_once_cluster_wide(cluster, size: int) -> None:
    """A client on e1 drops its connection: its will reaches subscribers on e2 and e3 once each."""
    e1, e2, e3 = (cluster.nodes[n] for n in ("e1", "e2", "e3"))
    topic = unique("ex/will")
    payload = b"w" * size
    with paho5(e2, unique("s2")) as s2, paho5(e3, unique("s3")) as s3:
        s2.subscribe(topic, 1)
        s3.subscribe(topic, 1)
        w = raw5(e1, unique("wc"), will=c.Will(topic, payload, 1))
        w.close()  # no DISCONNECT: the will goes
        for sub in (s2, s3):
            assert sub.get(WAIT).payload == payload
        time.sleep(0.5)  # a second copy (the leader's, say) would arrive by now
        for sub in (s2, s3):
            assert sub.messages.empty()


# -- a node killed, restarted; a node stopped gracefully --------------------------------------------


def test_kill9_others_stay_ready_then_the_node_rejoins_with_its_sessions(cluster) -> None:
    e1, e2, e3 = (cluster.nodes[n] for n in ("e1", "e2", "e3"))
    keeper, willer = unique("keeper"), unique("willer")
    topic, will_topic = unique("ex/kept"), unique("ex/dead")
    mover, old_topic, new_topic = unique("moved"), unique("ex/old"), unique("ex/new")
    k = raw5(e3, keeper, clean_start=False, properties={c.SESSION_EXPIRY_INTERVAL: 600})
    k.subscribe(1, (topic, 1), (will_topic, 1))
    k.disconnect()
    m = raw5(e3, mover, clean_start=False, properties={c.SESSION_EXPIRY_INTERVAL: 600})
    m.subscribe(1, (old_topic, 1))
    m.disconnect()
    with paho5(e1, unique("pub")) as pub:
        for i in range(5):
            pub.publish(topic, f"q{i}".encode(), 1)  # queued in keeper's session on e3
    with paho5(e2, unique("wsub")) as wsub:
        wsub.subscribe(will_topic, 1)
        # persistent, so e3's store holds the will too and its restore finds it due
        w = raw5(
            e3,
            willer,
            will=c.Will(will_topic, b"e3 died", 1),
            clean_start=False,
            properties={c.SESSION_EXPIRY_INTERVAL: 600},
        )  # stays connected until the kill
        assert wait_for(lambda: cluster.value(f"wills/{willer}") is not None, timeout=WAIT)
        e3.kill()
        w.close()
        for node in (e1, e2):
            assert wait_for(
                lambda node=node: (
                    node.http_get("/ready")[1].get("checks", {}).get("cluster")
                    == {"status": "up", "details": "1/2 peers reachable"}
                ),
                timeout=20,
            ), node.http_get("/ready")
            assert node.http_get("/ready")[0] == 200
        assert wsub.get(WAIT).payload == b"e3 died"  # the leader published the dead node's will
        # e1 and e2 keep routing among themselves
        t2 = unique("ex/two")
        with paho5(e2, unique("s")) as s, paho5(e1, unique("p")) as p:
            s.subscribe(t2, 1)
            p.publish(t2, b"still", 1)
            assert s.get(WAIT).payload == b"still"
        # e3's lease is gone: a client whose session is on e3 starts afresh on e1 meanwhile
        m = raw5(e1, mover, clean_start=False, properties={c.SESSION_EXPIRY_INTERVAL: 600})
        assert not m.connack.session_present
        m.subscribe(1, (new_topic, 1))
        m.disconnect()

        back = cluster.start("e3")  # same id, same data
        for node in (e1, e2, back):
            assert wait_for(lambda node=node: nominal(node, 2), timeout=30), node.http_get("/cluster/status")
        time.sleep(0.5)
        assert wsub.messages.empty(), "the will was published a second time by the restarted node"
    # keeper's persistent session is back on e3, with what was queued for it: taken over from e1
    assert cluster.owner(keeper) == "e3"
    k = raw5(e1, keeper, clean_start=False, properties={c.SESSION_EXPIRY_INTERVAL: 600})
    assert k.connack.session_present
    # and what was published for it while e3 was dead (the will, by e1's or e2's leader) waited in
    # the killed peer's queue: once, not a second time from e3's own restore
    got = []
    while len(got) < 6:
        p = k.expect(c.Publish)
        got.append(p.payload)
        k.ack(p)
    assert got == [f"q{i}".encode() for i in range(5)] + [b"e3 died"]
    with pytest.raises(AssertionError):
        k.expect(c.Publish, 1.0)
    k.disconnect()
    # e3's copy of the moved client's session was stale (e1 owned the id at e3's restart): dropped.
    # The client ends its session on e1; connecting to e3 afterwards finds no session at all (a kept
    # stale copy would be resumed there, with the subscription the client replaced long ago).
    assert cluster.owner(mover) == "e1"
    m = raw5(e1, mover, clean_start=True)  # Session Expiry 0: the session ends with this connection
    m.disconnect()
    assert wait_for(lambda: cluster.owner(mover) is None, timeout=10), cluster.owner(mover)
    m = raw5(back, mover, clean_start=False, properties={c.SESSION_EXPIRY_INTERVAL: 600})
    assert not m.connack.session_present
    m.disconnect()


def test_will_due_at_a_quick_restart_reaches_the_other_nodes_once(cluster) -> None:
    """kill -9 e2 (lease TTL 20 s) and start it again right away. Its client's will has a 1 s delay:
    the leader saw e2 gone only for the instant of its re-registration, so it publishes nothing,
    while e2's restore finds the will due. e2 claims it back in etcd and publishes it once the
    peers' interest is known: a subscriber on e1 gets it, exactly once."""
    e1 = cluster.nodes["e1"]
    topic = unique("ex/quick")
    with paho5(e1, unique("qsub")) as sub:
        sub.subscribe(topic, 1)
        quick = unique("quick")
        w = raw5(
            cluster.nodes["e2"],
            quick,
            clean_start=False,
            will=c.Will(topic, b"gone", 1, False, {c.WILL_DELAY_INTERVAL: 1}),
            properties={c.SESSION_EXPIRY_INTERVAL: 600},
        )
        assert wait_for(lambda: cluster.value(f"wills/{quick}") is not None, timeout=WAIT)
        cluster.nodes["e2"].kill()
        w.close()
        time.sleep(1.0)  # the delay passes while e2 is down
        back = cluster.start("e2")
        assert sub.get(WAIT + 5).payload == b"gone"
        for node in (e1, back):
            assert wait_for(lambda node=node: nominal(node, 2), timeout=30)
        time.sleep(1.0)
        assert sub.messages.empty(), "the will was published twice"
    assert "restored_wills_published published=1" in back.log_text()


def test_sigterm_hands_sessions_to_the_nodes_clients_reconnect_to(cluster) -> None:
    """SIGTERM e2: its persistent client is told 0x8B, reconnects to e1 during the drain, and resumes
    there with the messages queued for it on e2; a client that was offline all along resumes its
    session on another node after e2 stopped. Then e2 is started again."""
    e1, e2 = cluster.nodes["e1"], cluster.nodes["e2"]
    cid, topic = unique("drainee"), unique("ex/drain")
    props = {c.SESSION_EXPIRY_INTERVAL: 600}
    sleeper, nap = unique("sleeper"), unique("ex/nap")
    z = raw5(e2, sleeper, clean_start=False, properties=props)
    z.subscribe(1, (nap, 1))
    z.disconnect()
    d = raw5(e2, cid, clean_start=False, properties=props)
    d.subscribe(1, (topic, 1))
    d.disconnect()
    with paho5(e1, unique("pub")) as pub:
        for i in range(5):
            pub.publish(topic, f"d{i}".encode(), 1)
            pub.publish(nap, f"z{i}".encode(), 1)
    # Its length does not decide the verdict: messages still on their way to e2 at the SIGTERM reach
    # the sessions all the same (test_cluster_workers.py's
    # test_sigterm_loses_no_message_still_on_its_way_to_the_stopping_node delays them on purpose).
    time.sleep(0.3)
    e2.process.send_signal(15)
    assert wait_for(lambda: not e2.mqtt_accepts(), timeout=10)
    d = raw5(e1, cid, clean_start=False, properties=props)
    assert d.connack.session_present
    got = []
    while len(got) < 5:
        p = d.expect(c.Publish)
        got.append(p.payload)
        d.ack(p)
    assert got == [f"d{i}".encode() for i in range(5)]
    assert e2.wait(30) == 0
    assert cluster.owner(cid) == "e1"
    d.disconnect()
    # a client that was offline all along finds its session on a live node after e2 stopped: e2
    # handed it to e1 or e3 during the drain
    assert cluster.owner(sleeper) in ("e1", "e3")
    z = raw5(cluster.nodes["e3"], sleeper, clean_start=False, properties=props)
    assert z.connack.session_present
    got = []
    while len(got) < 5:
        p = z.expect(c.Publish)
        got.append(p.payload)
        z.ack(p)
    assert got == [f"z{i}".encode() for i in range(5)]
    z.disconnect()
    back = cluster.start("e2")
    for node in (cluster.nodes["e1"], back, cluster.nodes["e3"]):
        assert wait_for(lambda node=node: nominal(node, 2), timeout=30)


# -- etcd restarted under two nodes -----------------------------------------------------------------


def test_etcd_restart_under_the_nodes(tmp_path) -> None:
    etcd = start_etcd(tmp_path, "restart")
    factory = NodeFactory(tmp_path / "nodes")
    (tmp_path / "nodes").mkdir()
    try:
        cl = Cluster(factory, tmp_path, etcd.endpoint, "/r/", ["r1", "r2"])
        for name in cl.configs:
            cl.configs[name]["cluster.etcd.lease_ttl"] = "10s"
            cl.start(name)
        r1, r2 = cl.nodes["r1"], cl.nodes["r2"]
        assert wait_for(lambda: nominal(r1, 1) and nominal(r2, 1))
        cid = unique("survivor")
        s = raw5(r1, cid, clean_start=False, properties={c.SESSION_EXPIRY_INTERVAL: 600})
        s.disconnect()
        etcd.proc.kill()
        etcd.proc.wait(10)
        etcd.start()  # same data dir and ports
        assert wait_for(lambda: nominal(r1, 1) and nominal(r2, 1), timeout=30)
        topic = unique("ex/after")
        with paho5(r2, unique("s")) as sub, paho5(r1, unique("p")) as pub:
            sub.subscribe(topic, 1)
            pub.publish(topic, b"after", 1)
            assert sub.get(WAIT).payload == b"after"
        s = raw5(r2, cid, clean_start=False, properties={c.SESSION_EXPIRY_INTERVAL: 600})
        assert s.connack.session_present  # taken over from r1 after the restart
        assert cl.owner(cid) == "r2"
        s.disconnect()
    finally:
        factory.close()
        etcd.stop()
