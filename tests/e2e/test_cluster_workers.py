"""Two clustered nodes of two workers each (``server.workers: 2`` with ``cluster.enabled``, issue 16):
each worker is an etcd member under its node's name (``c1/w0``, ``c1/w1``, ...), the workers of one
node reach each other over Unix sockets and the other node's over gRPC, and the nodes act as two
nodes to the outside (``/cluster/status``).

The two nodes share the session's etcd (``etcd_server``) under a key prefix of this module and are
shared by its tests (each uses its own topics and client ids). Clients are placed on a chosen worker
with ``on_worker`` (``$SYS/broker/worker`` names the member a client is connected to).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

from fluxmq._core import codec as c
from tests.conftest import HOST, NodeFactory, RunningNode, free_port
from tests.e2e.mqtt5raw import Raw5, paho5, raw5, unique
from tests.e2e.mqttraw import unsubscribed
from tests.e2e.test_workers import on_worker, worker_of
from tests.etcd import etcd_get

pytestmark = pytest.mark.e2e

WAIT = 10.0
NODES = ("c1", "c2")
WORKERS = ("w0", "w1")


def wait_for(predicate, timeout: float = 30.0, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def two_free_ports() -> int:
    """A port p with p and p + 1 free on 127.0.0.1 a moment ago (worker i's gRPC port is p + i)."""
    for _ in range(200):
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind((HOST, p + 1))
            except OSError:
                continue
        return p
    raise AssertionError("no two consecutive free ports")


def owner(endpoint: str, prefix: str, client_id: str) -> str | None:
    """The member etcd names as the owner of ``client_id``."""
    value = etcd_get(endpoint, f"{prefix}sessions/{client_id}/owner")
    return None if value is None else value.decode()


def whole(node: RunningNode, names=NODES) -> bool:
    """/cluster/status (from whichever worker answers) lists both nodes (``names``) once, each
    reachable with both its workers."""
    status, body = node.http_get("/cluster/status")
    members = body.get("members", [])
    return (
        status == 200
        and sorted(m["node_id"] for m in members) == sorted(names)
        and all(m["reachable"] and len(m.get("workers", [])) == 2 for m in members)
    )


def start_two_nodes(factory: NodeFactory, endpoint: str, env: dict[str, dict[str, str]] | None = None):
    """c1 and c2, two workers each, in a cluster of their own (a fresh etcd key prefix), once both
    list the two nodes with their workers; ``env``: extra environment per node name.
    Returns (nodes by name, prefix)."""
    prefix = f"/t-{uuid.uuid4().hex[:8]}/"
    started: dict[str, RunningNode] = {}
    for name in NODES:
        started[name] = factory(
            {
                "server.workers": 2,
                "broker.sys_interval": "1s",
                "cluster.enabled": True,
                "cluster.node_id": name,
                "cluster.transport.bind_addr": f"{HOST}:{two_free_ports()}",
                "cluster.etcd.endpoints": [endpoint],
                "cluster.etcd.prefix": prefix,
                "cluster.etcd.lease_ttl": "3s",
                "storage.type": "lmdb",
            },
            env=(env or {}).get(name),
        )
    for node in started.values():
        # a few answers in a row: /cluster/status comes from whichever worker accepts
        assert wait_for(lambda node=node: all(whole(node) for _ in range(4))), node.http_get(
            "/cluster/status"
        )
    return started, prefix


def logs(started: dict[str, RunningNode]) -> str:
    """The nodes' log tails, for an assertion's message (a failure's evidence kept)."""
    return "\n".join(f"--- {name} ---\n{node.log_tail(120)}" for name, node in started.items())


def two_nodes_of_two_workers(etcd_server, base) -> Iterator[tuple[dict[str, RunningNode], str, str]]:
    """A module's nodes (its ``nodes`` fixture): c1 and c2 of two workers each on the shared etcd,
    as (nodes by name, etcd endpoint, prefix); stopped when the module is done."""
    factory = NodeFactory(base)
    try:
        started, prefix = start_two_nodes(factory, etcd_server.endpoint)
        yield started, etcd_server.endpoint, prefix
    finally:
        factory.close()


@pytest.fixture(scope="module")
def nodes(etcd_server, tmp_path_factory):
    yield from two_nodes_of_two_workers(etcd_server, tmp_path_factory.mktemp("cworkers"))


def test_cluster_status_shows_each_node_once(nodes) -> None:
    """Whichever worker answers: each node once with its workers, the node's id, its leadership
    and its sessions (both workers')."""
    started, _endpoint, _prefix = nodes
    with on_worker(started["c1"], "c1/w0", "held"), on_worker(started["c1"], "c1/w1", "held"):
        for _ in range(6):
            assert started["c1"].http_get("/cluster/status")[1]["sessions"] >= 2
    leaders = set()
    for name, node in started.items():
        for _ in range(6):  # answered by either worker
            status, body = node.http_get("/cluster/status")
            assert status == 200
            assert body["node_id"] == name and body["cluster_mode"] is True
            members = {m["node_id"]: m for m in body["members"]}
            assert sorted(members) == list(NODES)
            assert members[name]["self"] is True
            assert sorted(w["worker_id"] for w in members[name]["workers"]) == [f"{name}/w0", f"{name}/w1"]
            leaders |= {m["node_id"] for m in body["members"] if m["leader"]}
            assert node.http_get("/ready")[0] == 200
    assert len(leaders) == 1  # one leader in the cluster, named by its node
    url = f"http://{HOST}:{started['c1'].health_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        metrics = resp.read().decode()
    # per member, summed over c1's workers (both reach both of c2's)
    assert 'fluxmq_cluster_peer_reachable{peer="c2/w0"} 2.0' in metrics, metrics
    assert 'fluxmq_cluster_peer_reachable{peer="c2/w1"} 2.0' in metrics


@pytest.mark.parametrize("qos", [0, 1])
def test_publishers_on_each_worker_reach_subscribers_on_the_other_node(nodes, qos: int) -> None:
    """Each worker of one node publishes; a subscriber on each worker of the other node gets all of
    it, in each publisher's order, both ways."""
    started, _endpoint, _prefix = nodes
    for src, dst in (("c1", "c2"), ("c2", "c1")):
        topic = unique(f"cw/{src}")
        subs = [on_worker(started[dst], f"{dst}/{w}", "sub") for w in WORKERS]
        pubs = [on_worker(started[src], f"{src}/{w}", "pub") for w in WORKERS]
        try:
            for s in subs:
                assert s.subscribe(topic, 1)[0].value == 1
            for p, w in zip(pubs, WORKERS, strict=True):
                for i in range(10):
                    p.publish(topic, f"{w}-{i}".encode(), qos)
            expected = sorted(f"{w}-{i}".encode() for w in WORKERS for i in range(10))
            for s in subs:
                got = [s.get(WAIT) for _ in range(20)]
                assert sorted(m.payload for m in got) == expected
                for w in WORKERS:  # one publisher's messages keep their order
                    mine = [m.payload for m in got if m.payload.startswith(w.encode())]
                    assert mine == [f"{w}-{i}".encode() for i in range(10)]
                assert {m.qos for m in got} == {qos}
        finally:
            for client in subs + pubs:
                client.disconnect()


def test_takeover_from_a_worker_of_one_node_to_a_worker_of_the_other_keeps_the_session(nodes) -> None:
    """A persistent session on a worker of c1 with a message in flight (QoS 1, not acknowledged) and
    three queued behind it (Receive Maximum 1): its client connects to c2 while still connected to
    c1. The c1 connection gets DISCONNECT 0x8E, c2 answers session present, sends the in-flight
    message again with DUP and then the queued ones, each once, in order; etcd names a worker of c2
    as the owner, and a publish on c1 afterwards reaches the session on c2."""
    started, endpoint, prefix = nodes
    c1, c2 = started["c1"], started["c2"]
    cid, topic = unique("mover"), unique("cw/move")
    props = {c.SESSION_EXPIRY_INTERVAL: 300, c.RECEIVE_MAXIMUM: 1}
    a = raw5(c1, cid, clean_start=False, properties=props)
    assert a.subscribe(1, (topic, 1)).reason_codes == [1]
    first_owner = owner(endpoint, prefix, cid)
    assert first_owner in ("c1/w0", "c1/w1")
    with paho5(c2, unique("pub")) as pub:
        for i in range(4):
            pub.publish(topic, f"p{i}".encode(), 1)
    held = a.expect(c.Publish)
    assert held.payload == b"p0"  # not acknowledged: in flight at the move

    b = Raw5(c2)
    connack = b.connect(cid, clean_start=False, properties=props)
    assert connack.reason_code == 0 and connack.session_present
    gone = a.wait_closed()
    assert any(isinstance(p, c.Disconnect) and p.reason_code == 0x8E for p in gone), gone
    again = b.expect(c.Publish)
    assert (again.payload, again.dup, again.packet_id) == (b"p0", True, held.packet_id)
    b.ack(again)
    got = []
    for _ in range(3):
        p = b.expect(c.Publish)
        got.append(p.payload)
        b.ack(p)
    assert got == [b"p1", b"p2", b"p3"]
    assert owner(endpoint, prefix, cid) in ("c2/w0", "c2/w1")
    with on_worker(c1, "c1/w1" if first_owner == "c1/w0" else "c1/w0", "pub") as pub:
        pub.publish(topic, b"after", 1)
    p = b.expect(c.Publish)
    assert p.payload == b"after"
    b.ack(p)
    b.disconnect()


def test_shared_group_over_the_workers_of_both_nodes_gets_each_message_once(nodes) -> None:
    started, _endpoint, _prefix = nodes
    topic = unique("cw/shared")
    n = 200
    members = [on_worker(started[node], f"{node}/{w}", "m") for node in NODES for w in WORKERS]
    pub = on_worker(started["c1"], "c1/w1", "pub")
    try:
        for m in members:
            assert m.subscribe(f"$share/g/{topic}", 1)[0].value == 1
        time.sleep(0.5)  # the group's members on the other node are announced (interest) meanwhile
        for i in range(n):
            pub.publish(topic, str(i).encode(), 1)
        got: list[bytes] = []
        per_member = [0] * len(members)
        deadline = time.monotonic() + WAIT
        while len(got) < n and time.monotonic() < deadline:
            for k, m in enumerate(members):
                while not m.messages.empty():
                    got.append(m.messages.get_nowait().payload)
                    per_member[k] += 1
            time.sleep(0.05)
        time.sleep(0.5)
        for k, m in enumerate(members):
            while not m.messages.empty():
                got.append(m.messages.get_nowait().payload)
                per_member[k] += 1
    finally:
        for client in [*members, pub]:
            client.disconnect()
    assert sorted(got, key=int) == [str(i).encode() for i in range(n)]  # each once
    assert all(per_member), per_member  # every member, on every worker of both nodes, got some


def test_retained_set_on_one_worker_reaches_new_subscribers_on_every_worker(nodes) -> None:
    """Retained messages go through etcd for every member (the workers' own retained forwarding is
    off on a cluster node)."""
    started, _endpoint, _prefix = nodes
    topic = unique("cw/retained")
    with on_worker(started["c1"], "c1/w0", "pub") as pub:
        pub.publish(topic, b"kept", 1, retain=True)
    for node in NODES:
        for w in WORKERS:

            def seen(node=node, w=w) -> bool:
                with on_worker(started[node], f"{node}/{w}", "sub") as sub:
                    sub.subscribe(topic, 1)
                    try:
                        msg = sub.get(0.5)
                    except AssertionError:
                        return False
                    return (msg.payload, msg.retain) == (b"kept", True)

            assert wait_for(seen, WAIT), f"retained message not seen on {node}/{w}"


def test_kill_9_of_a_worker_it_comes_back_as_the_same_member_with_its_sessions(nodes) -> None:
    """kill -9 of c2/w1 holding a persistent session: the arbiter restarts it under its index, it
    registers again as c2/w1 (its previous registration revoked), owns the restored session again,
    and gets what c1 published for the session meanwhile (queued on c1's link to it)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    started, endpoint, prefix = nodes
    c1, c2 = started["c1"], started["c2"]
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 300
    topic = unique("cw/kill")
    for _ in range(60):
        cid = unique("persist")
        s = paho5(c2, cid, props, clean_start=False)
        if worker_of(s) == "c2/w1":
            break
        s.disconnect()
    else:
        raise AssertionError("no connection landed on c2/w1")
    assert s.subscribe(topic, 1)[0].value == 1
    s.subscribe("$SYS/broker/worker/pid", 0)
    pid = int(s.get(WAIT).payload)
    unsubscribed(s.client, "$SYS/broker/worker/pid")  # the session kept offline has no $SYS
    s.disconnect()
    assert owner(endpoint, prefix, cid) == "c2/w1"
    assert pid in c2.worker_pids()
    os.kill(pid, signal.SIGKILL)
    with on_worker(c1, "c1/w0", "pub") as pub:
        for i in range(3):
            pub.publish(topic, f"during{i}".encode(), 1)
    assert wait_for(lambda: pid not in c2.worker_pids() and len(c2.worker_pids()) == 2)
    for node in (c1, c2):
        assert wait_for(lambda node=node: all(whole(node) for _ in range(4))), node.http_get(
            "/cluster/status"
        )
    assert wait_for(
        lambda: owner(endpoint, prefix, cid) == "c2/w1", WAIT
    )  # the restored session, owned again
    back = paho5(c2, cid, props, clean_start=False)
    try:
        assert back.connack[1] is True  # session present
        got = [back.get(WAIT).payload for _ in range(3)]
    finally:
        back.disconnect()
    assert got == [f"during{i}".encode() for i in range(3)]


def persistent_on(node: RunningNode, worker: str, topic: str):
    """A client id whose persistent session (expiry 300 s, subscribed to ``topic`` at QoS 1) is held
    by ``worker``, offline."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 300
    for _ in range(60):
        cid = unique("sleeper")
        s = paho5(node, cid, props, clean_start=False)
        if worker_of(s) == worker:
            assert s.subscribe(topic, 1)[0].value == 1
            s.disconnect()
            return cid, props
        s.disconnect()
    raise AssertionError(f"no connection landed on {worker}")


def sigterm_hands_over_what_was_published(started, endpoint: str, prefix: str) -> None:
    """Offline persistent sessions on both workers of c1, 3 QoS 1 messages for them published (and
    acknowledged) on c2, then SIGTERM c1: each worker drains as a node does, its offline sessions go
    to c2 (c1's own workers are stopping and refuse them), and their clients resume them on c2 with
    the 3 messages, in order. (c1 stays down.)"""
    c1, c2 = started["c1"], started["c2"]
    topic = unique("cw/drain")
    sleepers = [persistent_on(c1, f"c1/{w}", topic) for w in WORKERS]
    with paho5(c2, unique("pub")) as pub:
        for i in range(3):
            pub.publish(topic, f"d{i}".encode(), 1)
    # Its length does not decide the verdict: messages still on their way to c1 at the SIGTERM reach
    # the sessions all the same (the test below delays them 2 s on purpose).
    time.sleep(0.3)
    c1.process.send_signal(signal.SIGTERM)
    assert c1.wait(30) == 0, logs(started)
    drained = re.findall(r"event=cluster_drained sessions_left=(\d+)", c1.log_text())
    assert drained == ["0", "0"], logs(started)  # every session of both workers handed to c2
    for cid, props in sleepers:
        assert owner(endpoint, prefix, cid) in ("c2/w0", "c2/w1"), logs(started)
        back = paho5(c2, cid, props, clean_start=False)
        try:
            assert back.connack[1] is True, logs(started)  # session present
            got = []
            for _ in range(3):
                try:
                    got.append(back.get(WAIT).payload)
                except AssertionError:
                    break
        finally:
            back.disconnect()
        assert got == [f"d{i}".encode() for i in range(3)], f"{cid}: {got}\n{logs(started)}"


def test_sigterm_of_a_node_hands_the_sessions_of_both_its_workers_to_the_other_node(nodes) -> None:
    """SIGTERM c1 (the module's last test using ``nodes``: c1 stays down)."""
    started, endpoint, prefix = nodes
    sigterm_hands_over_what_was_published(started, endpoint, prefix)


def test_sigterm_loses_no_message_still_on_its_way_to_the_stopping_node(etcd_server, tmp_path) -> None:
    """As above, with c1 applying each batch of messages from a peer 2 s late (the test-only
    ``FLUXMQTEST_PEER_APPLY_DELAY``, as on a loaded machine): the messages c2 acknowledged are still
    on their way to c1 when c1 hands the sessions over, and they reach the sessions on c2 all the
    same (the stopping node keeps forwarding what reaches it for a session it exported until that
    forwarding ended, within its drain)."""
    from fluxmq.cluster.node import APPLY_DELAY_ENV

    factory = NodeFactory(tmp_path)
    try:
        started, prefix = start_two_nodes(factory, etcd_server.endpoint, {"c1": {APPLY_DELAY_ENV: "2"}})
        sigterm_hands_over_what_was_published(started, etcd_server.endpoint, prefix)
    finally:
        factory.close()


def test_one_node_of_two_workers_runs_its_own_etcd_member(node_factory, tmp_path) -> None:
    """No ``cluster.etcd.endpoints``: worker 0 runs the node's etcd member (named after the node),
    worker 1 is its client; a SIGTERM stops the node and the member."""
    etcd_client, etcd_peer = free_port(), free_port()
    node = node_factory(
        {
            "server.workers": 2,
            "cluster.enabled": True,
            "cluster.node_id": "s1",
            "cluster.transport.bind_addr": f"{HOST}:{two_free_ports()}",
            "cluster.etcd.data_dir": str(tmp_path / "etcd"),
            "cluster.etcd.client_addr": f"{HOST}:{etcd_client}",
            "cluster.etcd.bind_addr": f"{HOST}:{etcd_peer}",
            "cluster.etcd.lease_ttl": "3s",
        }
    )

    def alone() -> bool:
        body = node.http_get("/cluster/status")[1]
        members = body.get("members", [])
        return [m["node_id"] for m in members] == ["s1"] and [
            w["worker_id"] for w in members[0]["workers"] if w["reachable"]
        ] == ["s1/w0", "s1/w1"]

    assert wait_for(lambda: all(alone() for _ in range(4))), node.http_get("/cluster/status")
    member_pid = int((tmp_path / "etcd.pid").read_text())
    assert node.stop() == 0
    assert wait_for(lambda: not os.path.exists(f"/proc/{member_pid}"), 15.0)


def test_a_worker_whose_port_is_taken_stops_the_node_with_one_line(node_factory, etcd_server) -> None:
    """Worker 1 listens on bind_addr's port + 1: held by another process, the node stops (never a
    port shared with a stranger through SO_REUSEPORT)."""
    port = two_free_ports()
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((HOST, port + 1))
        holder.listen(1)
        node = node_factory(
            {
                "server.workers": 2,
                "cluster.enabled": True,
                "cluster.node_id": "p1",
                "cluster.transport.bind_addr": f"{HOST}:{port}",
                "cluster.etcd.endpoints": [etcd_server.endpoint],
                "cluster.etcd.prefix": f"/t-{uuid.uuid4().hex[:8]}/",
            },
            wait_ready=False,
        )
        code = node.wait(30.0)
    assert code is not None and code != 0, node.log_tail()
    assert f"{HOST}:{port + 1}" in node.log_text() and "plus its index" in node.log_text()
