"""Durable queues across the nodes of a cluster without Raft (fluxmq/cluster/queue_nodes.py): one
owning node per queue, recorded in etcd; a producer on one node and a consumer on another meet.

Two real ``fluxmq-node`` processes of one worker each on the session's shared etcd (a prefix of
this module's), shared by the module's tests (each uses its own queues and client ids); the test
that kills the owner starts it again with its data before it ends. Every wait is bounded.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.subscribeoptions import SubscribeOptions

from fluxmq._core import codec as c
from tests.conftest import HOST, NodeFactory, free_port
from tests.e2e.mqtt5raw import Paho5, Raw5, paho5, props, raw5, unique
from tests.e2e.test_cluster_etcd import Cluster, nominal, wait_for
from tests.e2e.test_http_bridge import http_request
from tests.e2e.test_queues import nothing_more, receive, settle, user_props

pytestmark = pytest.mark.e2e

WAIT = 15.0
CONFIGURED = "xq-configured"  # in both nodes' config: claimed at start by the first node started
CAPTURED = "xq-captured"  # configured on both nodes too, capturing the ordinary topics xcap/#
TOKEN = "qcluster-admin-token"  # the admin API's (state-changing calls need one)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def cluster(etcd_server, tmp_path_factory):
    yield from queue_cluster(etcd_server, tmp_path_factory.mktemp("qcluster"), lambda cl: cl.start_all(1))


def queue_cluster(etcd_server, base, start, extra=dict) -> Iterator[Cluster]:
    """A module's Cluster of q1 and q2, CONFIGURED and CAPTURED in both configs (plus ``extra()``
    each), the admin API on TOKEN; ``start(cluster)`` starts them; closed when the module is done."""
    factory = NodeFactory(base / "nodes")
    (base / "nodes").mkdir()
    cl = Cluster(factory, base, etcd_server.endpoint, f"/t-{uuid.uuid4().hex[:8]}/", ["q1", "q2"])
    (base / "admin-token").write_text(TOKEN)
    for config in cl.configs.values():
        config["queues"] = [{"name": CONFIGURED}, {"name": CAPTURED, "topics": ["xcap/#"]}]
        config["server.admin.token_file"] = str(base / "admin-token")
        config.update(extra())
    try:
        start(cl)
        yield cl
    finally:
        factory.close()


def join(
    node, name: str, group: str, auto_ack: bool = False, client_id: str = "", connect_props=None
) -> Paho5:
    """A 5.0 consumer on ``node``, a member of ``group`` of queue ``name`` (SUBACK granted)."""
    client = paho5(node, client_id or unique("qc"), connect_props)
    sub_props = props(PacketTypes.SUBSCRIBE)
    sub_props.UserProperty = [("consumer-group", group)] + ([("auto-ack", "true")] if auto_ack else [])
    codes = client.subscribe(f"$queue/{name}", options=SubscribeOptions(qos=1), properties=sub_props)
    assert [int(rc.value) for rc in codes] == [1], codes
    return client


def append(node, name: str, payloads) -> list[int]:
    """QoS 1 appends from a raw 5.0 client on ``node``: the PUBACK reason code of each."""
    raw = raw5(node, unique("qp"))
    try:
        return [
            raw.publish(f"$queue/{name}", p, 1, packet_id=i + 1).reason_code for i, p in enumerate(payloads)
        ]
    finally:
        raw.disconnect()


def test_producer_on_one_node_and_a_group_on_another_get_every_message_once(cluster) -> None:
    """The first node that needs a queue owns it (etcd); a group joined on the other node gets each
    acknowledged append once, and its 5.0 ``$ack`` settles them at the owner (a new member of the
    group gets nothing again)."""
    q1, q2 = cluster.nodes["q1"], cluster.nodes["q2"]
    crosses(q1, q2, unique("xq"), lambda n: cluster.value(f"queues/{n}/owner"))


def crosses(producer, consumer, name: str, owner_of) -> None:
    """20 appends on ``producer`` (its node claims the queue: ``owner_of(name)`` says so) reach a
    5.0 group on ``consumer`` once each; its ``$ack`` settles them (the group gets nothing again)."""
    payloads = [f"m{i}".encode() for i in range(20)]
    assert append(producer, name, payloads) == [0] * 20
    assert owner_of(name) == producer.config["cluster"]["node_id"]  # the node, not a worker
    c = join(consumer, name, "g")
    try:
        got = receive(c, 20, WAIT)
        assert sorted(m.payload for m in got) == sorted(payloads)
        assert {user_props(m)["queue"] for m in got} == {name}
        for m in got:
            settle(c, name, "$ack", m)
        assert nothing_more(c)
    finally:
        c.disconnect()
    again = join(consumer, name, "g")
    try:
        assert nothing_more(again, 1.0)
    finally:
        again.disconnect()


def test_a_configured_queue_is_claimed_at_start_by_the_first_node(cluster) -> None:
    q1, q2 = cluster.nodes["q1"], cluster.nodes["q2"]
    assert cluster.value(f"queues/{CONFIGURED}/owner") == "q1"
    payloads = [f"c{i}".encode() for i in range(5)]
    assert append(q2, CONFIGURED, payloads) == [0] * 5
    c = join(q1, CONFIGURED, "cg", auto_ack=True)
    try:
        assert sorted(m.payload for m in receive(c, 5, WAIT)) == sorted(payloads)
        assert nothing_more(c)
    finally:
        c.disconnect()


def two_members_share(first, second, name: str, owner_of) -> None:
    """Members of one group on ``first`` (joined first: its node claims the queue, ``owner_of(name)``
    says so) and on ``second``; 40 appends on ``second`` reach one of them each, once, and each
    member takes a share."""
    a = join(first, name, "shared", auto_ack=True)
    b = join(second, name, "shared", auto_ack=True)
    try:
        assert owner_of(name) == first.config["cluster"]["node_id"]
        payloads = [f"s{i}".encode() for i in range(40)]
        assert append(second, name, payloads) == [0] * 40
        got_a: list[bytes] = []
        got_b: list[bytes] = []

        def all_in() -> bool:
            for client, got in ((a, got_a), (b, got_b)):
                while not client.messages.empty():
                    got.append(client.messages.get().payload)
            return len(got_a) + len(got_b) >= 40

        assert wait_for(all_in, WAIT), (len(got_a), len(got_b))
        assert nothing_more(a) and nothing_more(b)
        assert sorted(got_a + got_b) == sorted(payloads)  # each once
        assert got_a and got_b  # the member on the other node took its share
    finally:
        a.disconnect()
        b.disconnect()


def test_two_members_of_one_group_on_two_nodes_share_the_messages(cluster) -> None:
    two_members_share(
        cluster.nodes["q2"],
        cluster.nodes["q1"],
        unique("xq-share"),
        lambda n: cluster.value(f"queues/{n}/owner"),
    )


def test_owner_down_refuses_appends_and_loses_nothing_acknowledged(cluster) -> None:
    """kill -9 the owning node: an append on the other node is refused (never acknowledged); once
    the owner is back every acknowledged append is there, the refused one is not, and a member
    joined on the other node before the kill gets what is appended after (it joined again)."""
    q2 = cluster.nodes["q2"]
    name = unique("xq-down")
    join(cluster.nodes["q1"], name, "keep").disconnect()  # q1 owns it; group "keep" reads later
    payloads = [f"d{i}".encode() for i in range(10)]
    assert append(cluster.nodes["q1"], name, payloads) == [0] * 10
    old = join(q2, name, "old", auto_ack=True)
    try:
        assert sorted(m.payload for m in receive(old, 10, WAIT)) == sorted(payloads)
        cluster.nodes["q1"].kill()
        codes = append(q2, name, [b"refused"])
        assert codes[0] >= 0x80, codes
        old311 = Raw5(q2, version=4)  # a 3.1.1 publisher has no reason code: it is disconnected
        assert old311.connect(unique("qp311")).reason_code == 0
        old311.send(c.Publish(f"$queue/{name}", b"refused-311", 1, False, False, 1, None))
        assert not any(isinstance(p, c.Puback) for p in old311.wait_closed(WAIT))
        q1 = cluster.start("q1")  # same id, same data
        for node in (q1, q2):
            assert wait_for(lambda node=node: nominal(node, 1)), node.http_get("/cluster/status")
        more = [f"a{i}".encode() for i in range(5)]
        assert wait_for(lambda: append(q2, name, more[:1]) == [0], WAIT)  # q2 sees q1 again
        assert append(q2, name, more[1:]) == [0] * 4
        seen: list[bytes] = []
        assert wait_for(
            lambda: seen.extend(m.payload for m in iter_messages(old)) or set(more) <= set(seen), WAIT
        ), seen
        assert b"refused" not in seen and b"refused-311" not in seen
    finally:
        old.disconnect()
    late = join(q2, name, "keep", auto_ack=True)
    try:
        got = receive(late, 15, WAIT)
        assert sorted(m.payload for m in got) == sorted(payloads + more)
        assert nothing_more(late)
    finally:
        late.disconnect()


def test_a_persistent_consumer_resumed_while_the_owner_is_down_is_a_member_once_it_is_back(cluster) -> None:
    """Its membership is kept (no SUBACK can refuse a rejoin) and joins the owner's group again when
    the owner is back, without a new SUBSCRIBE."""
    q2 = cluster.nodes["q2"]
    name = unique("xq-resume")
    join(cluster.nodes["q1"], name, "keep").disconnect()  # q1 owns it
    cid = unique("qres")
    expiry = props(PacketTypes.CONNECT)
    expiry.SessionExpiryInterval = 300
    join(q2, name, "res", auto_ack=True, client_id=cid, connect_props=expiry).disconnect()
    cluster.nodes["q1"].kill()
    resumed = paho5(q2, cid, expiry, clean_start=False)
    try:
        assert resumed.connack[1] is True  # session present: it rejoins its group (the owner is down)
        q1 = cluster.start("q1")
        for node in (q1, q2):
            assert wait_for(lambda node=node: nominal(node, 1)), node.http_get("/cluster/status")
        more = [f"r{i}".encode() for i in range(5)]
        assert wait_for(lambda: append(q2, name, more[:1]) == [0], WAIT)
        assert append(q2, name, more[1:]) == [0] * 4
        seen: list[bytes] = []
        assert wait_for(
            lambda: seen.extend(m.payload for m in iter_messages(resumed)) or set(more) <= set(seen), WAIT
        ), seen
    finally:
        resumed.disconnect()


def iter_messages(client: Paho5):
    while not client.messages.empty():
        yield client.messages.get()


def test_the_admin_api_names_each_queue_s_owner_node(cluster) -> None:
    q1, q2 = cluster.nodes["q1"], cluster.nodes["q2"]
    here, there = unique("xq-adm"), unique("xq-adm")
    assert append(q1, here, [b"x"]) == [0]
    assert append(q2, there, [b"y"]) == [0]
    status, _, body = http_request(q1, "GET", "/queues", headers=AUTH, port=q1.admin_port)
    assert status == 200, body
    assert body["owners"][here] == "q1" and body["owners"][there] == "q2"
    listed = {q["name"]: q for q in body["queues"]}
    assert listed[here]["owner"] == "q1" and listed[here]["depth"] == 1
    assert there not in listed  # held by q2: its records are there only
    status, _, body = http_request(q1, "GET", f"/queues/{there}", headers=AUTH, port=q1.admin_port)
    assert status == 404 and "q2" in body["error"], body


def test_records_stored_before_clustering_move_to_the_owner_and_are_served_once(
    cluster, tmp_path_factory
) -> None:
    """A node that joins with stored records of a queue another node owns: they move to the owner
    (deleted here once stored there), never served by both; the node logs it."""
    q1, q2 = cluster.nodes["q1"], cluster.nodes["q2"]
    name = unique("xq-old")
    join(q1, name, "keep").disconnect()  # q1 owns it
    fresh = [f"n{i}".encode() for i in range(5)]
    assert append(q1, name, fresh) == [0] * 5
    data = tmp_path_factory.mktemp("q3data")
    lone = cluster.factory({"storage.path": str(data)})  # the same data, before it joins the cluster
    old = [f"o{i}".encode() for i in range(8)]
    assert append(lone, name, old) == [0] * 8
    assert lone.stop() == 0
    cluster.configs["q3"] = {
        **cluster.configs["q1"],
        "server.tcp.plain.addr": f"{HOST}:{free_port()}",
        "server.health_addr": f"{HOST}:{free_port()}",
        "cluster.transport.bind_addr": f"{HOST}:{free_port()}",
        "cluster.node_id": "q3",
        "storage.path": str(data),
    }
    q3 = cluster.start("q3")
    try:
        assert wait_for(lambda: nominal(q3, 2)), q3.http_get("/cluster/status")
        c = join(q2, name, "keep", auto_ack=True)
        try:
            got = receive(c, 13, WAIT)
            assert sorted(m.payload for m in got) == sorted(fresh + old)  # each once
            assert nothing_more(c, 1.0)
        finally:
            c.disconnect()
        assert wait_for(lambda: "queue_moved" in q3.log_text(), WAIT), q3.log_tail()
        assert "queue_stranded" in q3.log_text()
        status, _, body = http_request(q3, "GET", "/queues", headers=AUTH, port=q3.admin_port)
        assert name not in {q["name"] for q in body["queues"]} and body["owners"][name] == "q1"
    finally:
        q3.stop()
        del cluster.nodes["q3"]


def reassign(node, path: str, to: str | None = None) -> tuple[int, dict]:
    """``POST {path}`` on ``node``'s admin API with ``{"node": to}`` (no body: ``node`` itself)."""
    body = json.dumps({"node": to}).encode() if to is not None else None
    status, _, answer = http_request(node, "POST", path, body, AUTH, port=node.admin_port)
    return status, answer


def test_a_queue_of_a_node_gone_for_good_gets_a_new_owner_and_loses_nothing(cluster) -> None:
    """The admin API gives the queue of a killed node to the node answering: refused (409) while
    the owner lived; then appends there are acknowledged and a consumer there gets them; when the
    old owner comes back, what it acknowledged before the kill moves to the new owner (each record
    once) and it no longer serves the queue (an append there goes to the new owner)."""
    q2 = cluster.nodes["q2"]
    name = unique("xq-gone")
    join(cluster.nodes["q1"], name, "keep").disconnect()  # q1 owns it; group "keep" reads later
    before = [f"b{i}".encode() for i in range(10)]
    assert append(cluster.nodes["q1"], name, before) == [0] * 10  # stored on q1 only
    status, body = reassign(q2, f"/queues/{name}/owner", "q2")
    assert status == 409 and "'q1' is live" in body["error"], body
    status, body = reassign(q2, f"/queues/{name}/owner", "nobody")
    assert status == 409 and "'nobody' is not live" in body["error"], body
    cluster.nodes["q1"].kill()
    assert wait_for(lambda: reassign(q2, f"/queues/{name}/owner")[0] != 409, WAIT)  # q1's lease expired
    assert cluster.value(f"queues/{name}/owner") == "q2"
    assert reassign(q2, f"/queues/{name}/owner") == (
        200,
        {"queue": name, "old_owner": "q2", "new_owner": "q2"},
    )
    after = [f"a{i}".encode() for i in range(5)]
    assert append(q2, name, after) == [0] * 5
    c = join(q2, name, "keep", auto_ack=True)
    try:
        assert sorted(m.payload for m in receive(c, 5, WAIT)) == sorted(after)
        q1 = cluster.start("q1")  # same id, same data: its records of the queue move to q2
        for node in (q1, q2):
            assert wait_for(lambda node=node: nominal(node, 1)), node.http_get("/cluster/status")
        assert sorted(m.payload for m in receive(c, 10, WAIT)) == sorted(before)
        assert append(q1, name, [b"via-q1"]) == [0]  # q1 no longer serves it: to q2
        assert [m.payload for m in receive(c, 1, WAIT)] == [b"via-q1"]
        assert nothing_more(c)
        assert wait_for(lambda: "queue_moved" in q1.log_text(), WAIT), q1.log_tail()
        status, _, listed = http_request(q1, "GET", "/queues", headers=AUTH, port=q1.admin_port)
        assert name not in {q["name"] for q in listed["queues"]} and listed["owners"][name] == "q2"
    finally:
        c.disconnect()


def publish(node, topic: str, payloads) -> list[int]:
    """QoS 1 ordinary publishes from a raw 5.0 client on ``node``: the PUBACK reason code of each."""
    raw = raw5(node, unique("op"))
    try:
        return [raw.publish(topic, p, 1, packet_id=i + 1).reason_code for i, p in enumerate(payloads)]
    finally:
        raw.disconnect()


def payloads_of(client: Paho5, want: set[bytes], seen: list[bytes]) -> bool:
    """Adds what ``client`` got to ``seen``; True once ``want`` is all in."""
    seen.extend(m.payload for m in iter_messages(client))
    return want <= set(seen)


def test_a_reassigned_queue_s_capture_runs_on_its_new_owner_at_once_and_once(cluster, monkeypatch) -> None:
    """A configured queue captures ordinary topics on its owner only. Its node killed and the
    queue given to the other node, that node captures at once (no restart); the old node back,
    it strands the queue and no longer captures: what is published on it goes to the new
    owner's capture, each message once, and what it captured before the kill moves there.

    What q2 published while q1 was down also waited in q2's link for q1 (a killed node keeps its
    links), where q1's capture had matched it: q1 restarts with its queue placement delayed
    (TEST-ONLY ``FLUXMQTEST_PLACE_QUEUES_DELAY``, a slow etcd) so that the link is back first. Before,
    q1 applied those batches at once, its capture (installed at start) stored them, and the
    stranded records brought them to q2 a second time (a loaded CI run, 1 in 3)."""
    capture_follows_a_reassigned_queue(cluster, monkeypatch, lambda node: nominal(node, 1))


def capture_follows_a_reassigned_queue(cluster, monkeypatch, settled) -> None:
    """The test above on ``cluster`` (q1 and q2, CAPTURED configured on both, owned by q1);
    ``settled(node)``: the node is back in the cluster with its peers."""
    from fluxmq.cluster.node import PLACE_QUEUES_DELAY_ENV

    assert cluster.value(f"queues/{CAPTURED}/owner") == "q1"
    q2 = cluster.nodes["q2"]
    before = [f"cb{i}".encode() for i in range(5)]
    assert publish(cluster.nodes["q1"], "xcap/before", before) == [0] * 5  # captured by q1
    cluster.nodes["q1"].kill()
    assert wait_for(lambda: reassign(q2, f"/queues/{CAPTURED}/owner")[0] == 200, WAIT)
    c = join(q2, CAPTURED, "cap", auto_ack=True)
    try:
        after = [f"ca{i}".encode() for i in range(5)]
        assert publish(q2, "xcap/after", after) == [0] * 5
        assert sorted(m.payload for m in receive(c, 5, WAIT)) == sorted(after)
        monkeypatch.setenv(PLACE_QUEUES_DELAY_ENV, "4")  # > the link's reconnect backoff (2 s)
        q1 = cluster.start("q1")  # its copy of the queue is stranded, its records move to q2
        monkeypatch.delenv(PLACE_QUEUES_DELAY_ENV)
        for node in (q1, q2):
            assert wait_for(lambda node=node: settled(node)), node.http_get("/cluster/status")
        seen: list[bytes] = []
        assert wait_for(lambda: payloads_of(c, set(before), seen), WAIT), seen
        # q1 forwards xcap/# once it has heard of q2's interest: probes until one is captured
        probes: list[bytes] = []

        def probe() -> bool:
            probes.append(f"p{len(probes)}".encode())
            assert publish(q1, "xcap/probe", probes[-1:]) == [0]
            return wait_for(lambda: payloads_of(c, set(), seen) and bool(set(probes) & set(seen)), 0.5)

        assert wait_for(probe, WAIT), seen
        via_q1 = [f"cq{i}".encode() for i in range(10)]
        assert publish(q1, "xcap/via-q1", via_q1) == [0] * 10
        assert wait_for(lambda: payloads_of(c, set(via_q1), seen), WAIT), seen
        assert nothing_more(c)
        got = [p for p in seen if p not in probes]
        assert sorted(got) == sorted(before + via_q1)  # each once: q1 captured none of them
        assert "queue_stranded" in q1.log_text()
    finally:
        c.disconnect()


def test_a_queue_given_back_to_the_node_still_holding_its_records_serves_them_once(cluster) -> None:
    """q1 owned the queue; killed, the queue went to q2, which took appends; q2 killed too, q1 came
    back and its records wait to move to q2 (queue_move_waiting). The operator gives the queue
    back to q1: it serves its own records again (each once: never sent to itself, never a new log
    over them) and takes appends at once; when q2 is back, what q2 took meanwhile moves to q1,
    each once."""
    name = unique("xq-back")
    join(cluster.nodes["q1"], name, "keep").disconnect()  # q1 owns it; group "keep" reads later
    before = [f"b{i}".encode() for i in range(10)]
    assert append(cluster.nodes["q1"], name, before) == [0] * 10
    cluster.nodes["q1"].kill()
    q2 = cluster.nodes["q2"]
    assert wait_for(lambda: reassign(q2, f"/queues/{name}/owner")[0] == 200, WAIT)
    meanwhile = [f"m{i}".encode() for i in range(5)]
    assert append(q2, name, meanwhile) == [0] * 5  # stored on q2 only
    q2.kill()
    q1 = cluster.start("q1")
    assert wait_for(lambda: "queue_move_waiting" in q1.log_text(), WAIT), q1.log_tail()
    assert wait_for(lambda: reassign(q1, f"/queues/{name}/owner")[0] == 200, WAIT)  # q2's lease expired
    assert cluster.value(f"queues/{name}/owner") == "q1"
    c = join(q1, name, "keep", auto_ack=True)
    try:
        assert sorted(m.payload for m in receive(c, 10, WAIT)) == sorted(before)
        assert "queue_unstranded" in q1.log_text()
        assert append(q1, name, [b"after"]) == [0]
        assert [m.payload for m in receive(c, 1, WAIT)] == [b"after"]
        q2 = cluster.start("q2")  # its records of the queue move to q1
        for node in (q1, q2):
            assert wait_for(lambda node=node: nominal(node, 1)), node.http_get("/cluster/status")
        assert sorted(m.payload for m in receive(c, 5, WAIT)) == sorted(meanwhile)
        assert nothing_more(c, 1.0)
    finally:
        c.disconnect()
