"""Several workers of one node (``server.workers: 2``, issue 16) end to end: a real ``fluxmq-node``
whose arbiter runs two gevent workers sharing the MQTT port (SO_REUSEPORT), paho clients placed on
a chosen worker.

Placement: the kernel spreads connections over the workers; ``$SYS/broker/worker`` (retained, and
republished every ``broker.sys_interval``) names the worker a client is connected to, so a test
connects until it holds a client on each worker (``on_worker``).
"""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.error
import urllib.request

import pytest

from fluxmq._core import codec as c
from tests.conftest import NodeFactory, RunningNode
from tests.e2e.mqtt5raw import Paho5, Raw5, paho5, unique
from tests.e2e.mqttraw import unsubscribed, wait_until

pytestmark = pytest.mark.e2e

WAIT = 10.0
WORKER_TOPIC = "$SYS/broker/worker"
MAX_TRIES = 60  # connections tried to land a client on a given worker (each lands on one of 2)


def worker_of(client: Paho5, timeout: float = WAIT) -> str:
    """The worker ``client`` is connected to (subscribes to $SYS/broker/worker, then unsubscribes)."""
    client.subscribe(WORKER_TOPIC, 0)
    deadline = time.monotonic() + timeout
    while True:
        msg = client.get(max(0.0, deadline - time.monotonic()))
        if msg.topic == WORKER_TOPIC:
            break
    unsubscribed(client.client, WORKER_TOPIC)
    while not client.messages.empty():  # a $SYS republish that crossed the UNSUBSCRIBE
        client.messages.get_nowait()
    return msg.payload.decode()


def on_worker(node: RunningNode, worker: str, prefix: str = "c", **kwargs) -> Paho5:
    """A connected client on ``worker`` (other connections are closed)."""
    for _ in range(MAX_TRIES):
        client = paho5(node, unique(prefix), **kwargs)
        if worker_of(client) == worker:
            return client
        client.disconnect()
    raise AssertionError(f"no connection landed on {worker} in {MAX_TRIES} tries")


def wait_restarted(node: RunningNode, pid: int, timeout: float = 30.0) -> None:
    """Until the arbiter replaced worker ``pid`` (killed) and the node is ready again."""
    deadline = time.monotonic() + timeout
    while True:
        pids = node.worker_pids()
        if len(pids) == 2 and pid not in pids:
            break
        assert time.monotonic() < deadline, f"worker not restarted: {pids}"
        time.sleep(0.1)
    node.wait_ready()


def wait_crossing(node: RunningNode, timeout: float = 20.0) -> None:
    """Until a publish on one worker reaches a subscriber on the other (the workers' links are up)."""
    topic = unique("probe")
    with on_worker(node, "w0", "probe") as sub, on_worker(node, "w1", "probe") as pub:
        sub.subscribe(topic, 0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pub.publish(topic, b"x", 1)
            try:
                if sub.get(0.5).topic == topic:
                    return
            except AssertionError:
                continue
        raise AssertionError("the workers did not start forwarding to each other")


def start(factory: NodeFactory, extra: dict | None = None, env: dict | None = None) -> RunningNode:
    node = factory({"server.workers": 2, "broker.sys_interval": "1s", **(extra or {})}, env=env)
    wait_crossing(node)
    return node


@pytest.fixture(scope="module")
def node2(tmp_path_factory):
    factory = NodeFactory(tmp_path_factory.mktemp("workers2"))
    try:
        yield start(factory)
    finally:
        factory.close()


def test_two_workers_share_the_mqtt_port(node2) -> None:
    """Both workers accept on the one configured port (each gets connections)."""
    with on_worker(node2, "w0") as a, on_worker(node2, "w1") as b:
        assert a.connack[0].value == 0 and b.connack[0].value == 0
    assert len(node2.worker_pids()) == 2


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_publish_on_one_worker_reaches_a_subscriber_on_the_other(node2, qos: int) -> None:
    topic = unique("xw/qos")
    with on_worker(node2, "w0", "sub") as sub, on_worker(node2, "w1", "pub") as pub:
        assert sub.subscribe(topic, 2)[0].value == 2
        for i in range(20):
            pub.publish(topic, f"m{i}".encode(), qos)
        got = [sub.get(WAIT) for _ in range(20)]
    assert [m.payload for m in got] == [f"m{i}".encode() for i in range(20)]
    assert {m.qos for m in got} == {qos}


def raw_on_worker(node: RunningNode, worker: str, version: int = 5) -> Raw5:
    """A raw connection (5.0 unless ``version`` says otherwise) on ``worker`` (reads the
    acknowledgements' reason codes itself)."""
    for _ in range(MAX_TRIES):
        raw = Raw5(node, version)
        raw.connect(unique("raw"))
        raw.subscribe(1, (WORKER_TOPIC, 0))
        where = raw.wait_for(lambda p: isinstance(p, c.Publish) and p.topic == WORKER_TOPIC)
        if where.payload.decode() == worker:
            return raw
        raw.close()
    raise AssertionError(f"no connection landed on {worker} in {MAX_TRIES} tries")


@pytest.mark.parametrize("qos", [1, 2])
def test_a_5_0_publish_whose_subscriber_is_on_the_other_worker_is_not_acknowledged_0x10(
    node2, qos: int
) -> None:
    """0x10 (no matching subscribers) says the server knows nobody subscribes: a publisher whose
    only subscriber is on the other worker gets success, and 0x10 only when nobody matches."""
    topic = unique("xw/rc")

    def publish(pub: Raw5, topic: str, pid: int) -> int:
        ack = pub.publish(topic, f"m{pid}".encode(), qos, False, pid)
        if qos == 2:
            pub.send(c.Pubrel(pid))
            pub.wait_for(lambda p: isinstance(p, c.Pubcomp) and p.packet_id == pid)
        return ack.reason_code

    with on_worker(node2, "w0", "sub") as sub:
        sub.subscribe(topic, 1)
        pub = raw_on_worker(node2, "w1")
        try:
            crossed = None
            for pid in range(1, 101):  # until the subscription's interest reached w1 and a message crossed
                reason = publish(pub, topic, pid)
                try:
                    sub.get(0.2)
                except AssertionError:
                    continue
                crossed = reason
                break
            assert crossed == 0, "no message crossed" if crossed is None else f"reason code {crossed:#x}"
            assert publish(pub, unique("xw/nobody"), 200) == 0x10
        finally:
            pub.close()


def test_forwarded_messages_reach_3_1_1_and_5_0_subscribers_exactly_and_count_as_sent(node2) -> None:
    """Messages published on w0 to raw 3.1.1 and 5.0 subscribers on w1 (written there from the
    workers' batch bytes): each subscriber reads every PUBLISH with its QoS, packet ids and (5.0)
    an empty property block, and the node's sent counters on /metrics grow by exactly what they
    were sent, by QoS and bytes."""
    topic = unique("xw/direct")
    subs = [raw_on_worker(node2, "w1", 4), raw_on_worker(node2, "w1", 5)]
    try:
        for sub in subs:  # no more $SYS/broker/worker republishes: only this test's deliveries
            sub.send(c.Unsubscribe(2, [WORKER_TOPIC]))
            sub.wait_for(lambda p: isinstance(p, c.Unsuback))
            sub.subscribe(3, (f"{topic}/#", 1))
        with on_worker(node2, "w0", "pub") as pub:
            for i in range(100):  # until the subscriptions' interest reached w0 and a probe crossed
                pub.publish(f"{topic}/probe", str(i).encode(), 1)
                try:
                    for sub in subs:
                        sub.publishes_until(f"{topic}/probe", 0.5)
                except AssertionError:
                    continue
                break
            else:
                raise AssertionError("no probe crossed")
            # A probe still on its way (one a subscriber got late) would be counted after
            # ``before``: one more message, read by both, comes after every probe (one publisher).
            pub.publish(f"{topic}/synced", b"", 1)
            for sub in subs:
                sub.publishes_until(f"{topic}/synced")
            before = sent_counters(node2)
            for i in range(10):
                pub.publish(f"{topic}/0", f"a{i}".encode(), 0)
                pub.publish(f"{topic}/1", f"bb{i}".encode(), 1)
            pub.publish(f"{topic}/end", b"", 1)
            got = [
                [p for p in sub.publishes_until(f"{topic}/end") if p.topic != f"{topic}/probe"]
                for sub in subs
            ]
        after = sent_counters(node2)
    finally:
        for sub in subs:
            sub.close()
    for version, publishes in zip((4, 5), got, strict=True):
        assert [(p.topic, p.payload, p.qos) for p in publishes] == [
            (f"{topic}/{qos}", f"{'a' if qos == 0 else 'bb'}{i}".encode(), qos)
            for i in range(10)
            for qos in (0, 1)
        ], version
        assert [p.packet_id for p in publishes if p.qos] == list(
            range(publishes[1].packet_id, publishes[1].packet_id + 10)
        )
        assert all(not p.properties for p in publishes)
    grew = {key: after[key] - before[key] for key in after}
    assert grew == {
        ("sent", "0"): 2 * 10,
        ("sent", "1"): 2 * 11,  # and the sentinel
        ("bytes", "0"): 2 * 10 * 2,
        ("bytes", "1"): 2 * 10 * 3,
    }


def sent_counters(node: RunningNode) -> dict:
    """``fluxmq_messages_sent_total`` and ``fluxmq_message_bytes_sent_total`` by QoS (0, 1), from a
    scrape that both workers answered (each scrape is served by either; bounded retries)."""
    for _ in range(30):
        text = metrics(node)
        if re.search(r"^fluxmq_workers_answering 2\.0$", text, re.M):
            found = {}
            for kind, name in (
                ("sent", "fluxmq_messages_sent_total"),
                ("bytes", "fluxmq_message_bytes_sent_total"),
            ):
                for qos in ("0", "1"):
                    m = re.search(rf'^{name}{{qos="{qos}"}} (\S+)$', text, re.M)
                    assert m, text[:2000]
                    found[(kind, qos)] = float(m.group(1))
            return found
    raise AssertionError("no scrape answered by both workers")


def test_retained_set_on_one_worker_is_seen_from_the_other(node2) -> None:
    topic = unique("xw/retained")
    with on_worker(node2, "w1", "pub") as pub:
        pub.publish(topic, b"kept", 1, retain=True)
    deadline = time.monotonic() + WAIT
    while True:  # the PUBACK does not wait for the other worker: poll (bounded) with new subscriptions
        with on_worker(node2, "w0", "sub") as sub:
            sub.subscribe(topic, 1)
            try:
                msg = sub.get(0.5)
                break
            except AssertionError:
                assert time.monotonic() < deadline, "retained message not seen from the other worker"
    assert (msg.payload, msg.retain) == (b"kept", True)


def test_will_of_a_client_on_one_worker_reaches_the_other(node2) -> None:
    topic = unique("xw/will")
    with on_worker(node2, "w0", "sub") as sub:
        sub.subscribe(topic, 1)
        for _ in range(MAX_TRIES):
            dying = Paho5(node2, unique("dying"), True, 60)
            dying.client.will_set(topic, b"gone", 1)
            dying.connect()
            if worker_of(dying) == "w1":
                break
            dying.disconnect()
        else:
            raise AssertionError("no connection landed on w1")
        dying.stop()  # socket closed without DISCONNECT: the will goes
        msg = sub.get(WAIT)
    assert (msg.topic, msg.payload) == (topic, b"gone")


def test_shared_group_with_members_on_both_workers_gets_each_message_once(node2) -> None:
    topic = unique("xw/shared")
    n = 300
    with (
        on_worker(node2, "w0", "m") as m0,
        on_worker(node2, "w1", "m") as m1,
        on_worker(node2, "w0", "pub") as pub,
    ):
        for m in (m0, m1):
            m.subscribe(f"$share/g/{topic}", 1)
        time.sleep(0.2)
        for i in range(n):
            pub.publish(topic, str(i).encode(), 1)
        got: list[bytes] = []
        deadline = time.monotonic() + WAIT
        while len(got) < n and time.monotonic() < deadline:
            for m in (m0, m1):
                while not m.messages.empty():
                    got.append(m.messages.get_nowait().payload)
            time.sleep(0.05)
        time.sleep(0.3)
        for m in (m0, m1):
            while not m.messages.empty():
                got.append(m.messages.get_nowait().payload)
        from_w1 = m1.messages.qsize()
    assert sorted(got, key=int) == [str(i).encode() for i in range(n)]
    assert from_w1 == 0


def test_takeover_of_a_client_id_across_workers_keeps_the_session_exact(node2) -> None:
    """A persistent session resumed on the other worker: session present, its subscription kept, and
    the messages queued while it was offline delivered once each, in order (the client reconnects
    until it has landed on the other worker; every resume, local or moved, must be exact)."""
    cid = unique("mover")
    topic = unique("xw/takeover")
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 300
    client = paho5(node2, cid, props, clean_start=True)
    assert client.subscribe(topic, 1)[0].value == 1
    client.subscribe(WORKER_TOPIC, 0)  # part of the session: every resume hears its worker within 1 s
    first = None
    while first is None:
        msg = client.get(WAIT)
        if msg.topic == WORKER_TOPIC:
            first = msg.payload.decode()
    client.disconnect()
    moved = 0
    with on_worker(node2, "w0", "pub") as pub:
        for attempt in range(MAX_TRIES):
            batch = [f"{attempt}-{i}".encode() for i in range(5)]
            for payload in batch:
                pub.publish(topic, payload, 1)
            client = Paho5(node2, cid, False, 60)
            rc, present, _ = client.connect(props)
            assert present, f"attempt {attempt}: session not present"
            sentinel = f"{attempt}-end".encode()
            pub.publish(topic, sentinel, 1)
            got, worker = [], None
            deadline = time.monotonic() + WAIT
            while (worker is None or sentinel not in got) and time.monotonic() < deadline:
                try:
                    msg = client.get(max(0.0, deadline - time.monotonic()))
                except AssertionError:
                    raise AssertionError(f"attempt {attempt}: got {got}, worker {worker}") from None
                if msg.topic == WORKER_TOPIC:
                    worker = msg.payload.decode()
                else:
                    got.append(msg.payload)
            assert got == [*batch, sentinel], f"attempt {attempt}: {got}"
            client.disconnect()
            if worker != first:
                moved += 1
                if moved == 2:  # moved to the other worker and back
                    break
                first = worker
    assert moved == 2, "the client never landed on the other worker"


def metrics(node: RunningNode) -> str:
    with urllib.request.urlopen(f"http://{node.host}:{node.health_port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def admin_stats(node: RunningNode) -> dict:
    import json

    with urllib.request.urlopen(f"http://{node.host}:{node.admin_port}/stats", timeout=5) as resp:
        return json.loads(resp.read())


def test_sys_totals_metrics_and_admin_stats_count_the_clients_of_both_workers(node2) -> None:
    with on_worker(node2, "w0", "a") as a, on_worker(node2, "w1", "b") as b, on_worker(node2, "w1", "b"):
        # The probe of on_worker disconnected its misplaced clients; these three stay connected.
        a.subscribe("$SYS/broker/clients/connected", 0)
        deadline = time.monotonic() + WAIT
        value = None
        while value != 3 and time.monotonic() < deadline:
            msg = a.get(max(0.0, deadline - time.monotonic()))
            value = int(msg.payload)
        b.subscribe("$SYS/broker/workers/answering", 0)
        answering = b.get(WAIT).payload
        # Each scrape is served by either worker; one whose call to the other worker timed out under
        # load says so (fluxmq_workers_answering 1) and is scraped again (bounded).
        good = 0
        for _ in range(30):
            text = metrics(node2)
            if re.search(r"^fluxmq_workers_answering 2\.0$", text, re.M):
                assert re.search(r"^fluxmq_clients_connected 3\.0$", text, re.M), text[:2000]
                good += 1
                if good == 6:
                    break
        stats = []
        for _ in range(30):  # the admin API's /stats, served by either worker, answers for the node
            body = admin_stats(node2)
            if body.get("workers_answering") == 2:
                stats.append(body)
                if len(stats) == 4:
                    break
    assert value == 3
    assert answering == b"2"
    assert good == 6
    assert len(stats) == 4
    assert {(b["sessions"]["connected"], b["connections"]["current"]) for b in stats} == {(3, 3)}


def test_kill_9_of_a_worker_restarts_it_the_other_keeps_serving_persistent_sessions_back(tmp_path) -> None:
    """kill -9 of w0: w1 keeps serving, the arbiter restarts w0 under its index, the persistent session
    comes back from w0's shard with what was published for it meanwhile."""
    factory = NodeFactory(tmp_path)
    try:
        node = start(factory, {"storage.type": "lmdb"})
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 300
        topic = unique("xw/kill")
        # A persistent session on w0, with a subscription; its worker's pid.
        for _ in range(MAX_TRIES):
            cid = unique("persist")
            s = paho5(node, cid, props)
            if worker_of(s) == "w0":
                break
            s.disconnect()
        else:
            raise AssertionError("no connection landed on w0")
        assert s.subscribe(topic, 1)[0].value == 1
        s.subscribe("$SYS/broker/worker/pid", 0)
        pid = int(s.get(WAIT).payload)
        unsubscribed(s.client, "$SYS/broker/worker/pid")  # the session kept offline has no $SYS
        s.disconnect()
        other = on_worker(node, "w1", "other")
        own = unique("xw/own")
        other.subscribe(own, 1)
        assert pid in node.worker_pids()
        os.kill(pid, signal.SIGKILL)
        # The other worker keeps serving while w0 is down and restarts.
        for i in range(5):
            other.publish(own, f"alive{i}".encode(), 1)
            assert other.get(WAIT).payload == f"alive{i}".encode()
        # Published on w1 while w0 is down: waits in w1's bounded queue for w0, then reaches the
        # session w0 restores.
        other.publish(topic, b"during", 1)
        wait_restarted(node, pid)
        wait_crossing(node)
        # The restarted worker restored the session from its shard: a reconnect on any worker
        # resumes it, and it still receives its topic.
        s = Paho5(node, cid, False, 60)
        _rc, present, _ = s.connect(props)
        assert present
        other.publish(topic, b"after", 1)
        assert [s.get(WAIT).payload for _ in range(2)] == [b"during", b"after"]
        s.disconnect()
        other.disconnect()
        assert node.stop() == 0
    finally:
        factory.close()


def worker_pid(node: RunningNode, worker: str) -> int:
    """The pid of ``worker`` (asked through a client placed on it)."""
    with on_worker(node, worker, "pid") as probe:
        probe.subscribe("$SYS/broker/worker/pid", 0)
        return int(probe.collect_until("$SYS/broker/worker/pid")[1].payload)


def test_a_restarted_worker_accepts_clients_only_once_it_knows_the_other_workers_interest(tmp_path) -> None:
    """kill -9 of w1 while w0 is stopped (SIGSTOP, so w0's interest cannot reach the new w1): the new
    w1 answers no CONNECT until w0's interest snapshot arrived (bounded), so the first publish of a
    client there reaches w0's subscriber. Before, w1 accepted at once and acknowledged a QoS 1
    publish that matched nothing (bench/chaos.py, session 20: 2-4 messages per worker kill)."""
    factory = NodeFactory(tmp_path)
    w0 = None
    try:
        node = start(factory)
        topic = unique("xw/restarted")
        sub = on_worker(node, "w0", "sub")
        assert sub.subscribe(topic, 1)[0].value == 1
        w0, w1 = worker_pid(node, "w0"), worker_pid(node, "w1")
        os.kill(w0, signal.SIGSTOP)
        os.kill(w1, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while len(node.worker_pids()) != 2 or w1 in node.worker_pids():
            assert time.monotonic() < deadline, "w1 not restarted"
            time.sleep(0.05)
        # w0 is stopped: a connection it got waits; one the new w1 got is answered only once w1
        # knows w0's interest, which cannot happen before w0 runs again (3 s: below the 5 s bound).
        answered = []
        until = time.monotonic() + 3.0
        while time.monotonic() < until and not answered:
            raw = Raw5(node)
            try:
                raw.send(c.Connect(unique("early"), True, 60, 5, None, None, None, None, None))
                answered.append(raw.recv(0.3))
            except (OSError, AssertionError):
                pass  # waiting in a stopped or waiting worker's backlog
            finally:
                raw.close()
        os.kill(w0, signal.SIGCONT)
        w0 = None
        assert answered == [], f"the restarted worker answered before it knew w0's interest: {answered}"
        node.wait_ready()
        with on_worker(node, "w1", "pub") as pub:
            pub.publish(topic, b"first", 1)
        assert sub.get(WAIT).payload == b"first"
        sub.disconnect()
        assert node.stop() == 0
    finally:
        if w0 is not None:
            os.kill(w0, signal.SIGCONT)
        factory.close()


def test_grpc_between_workers_routes_too(tmp_path) -> None:
    """``server.workers_transport: grpc``: C1's gRPC transport on unix: sockets carries the same batches."""
    factory = NodeFactory(tmp_path)
    try:
        node = start(factory, {"server.workers_transport": "grpc"})
        topic = unique("xw/grpc")
        with on_worker(node, "w0", "sub") as sub, on_worker(node, "w1", "pub") as pub:
            sub.subscribe(topic, 1)
            for i in range(10):
                pub.publish(topic, f"g{i}".encode(), 1)
            assert [sub.get(WAIT).payload for _ in range(10)] == [f"g{i}".encode() for i in range(10)]
        assert "cluster_transport_listening" in node.log_text() and "port=1 tls=false" in node.log_text()
    finally:
        factory.close()


def test_websocket_port_is_shared_and_routes_across_workers(tmp_path) -> None:
    """The WebSocket listener is bound once per worker too: ws clients land on both workers, and a
    publish over TCP on one worker reaches a ws subscriber on the other."""
    from tests.conftest import free_port
    from tests.e2e.listener_clients import PahoTransportClient

    factory = NodeFactory(tmp_path)
    ws_port = free_port()
    try:
        node = start(factory, {"server.websocket.plain.addr": f"127.0.0.1:{ws_port}"})
        seen: dict[str, PahoTransportClient] = {}
        for _ in range(MAX_TRIES):
            client = PahoTransportClient(unique("ws"), transport="websockets")
            client.connect(ws_port)
            client.subscribe(WORKER_TOPIC, 0)
            worker = client.get(WAIT).payload.decode()
            if worker in seen:
                client.close()
            else:
                seen[worker] = client
                if len(seen) == 2:
                    break
        assert set(seen) == {"w0", "w1"}
        topic = unique("xw/ws")
        sub = seen["w0"]
        sub.subscribe(topic, 1)
        with on_worker(node, "w1", "pub") as pub:
            pub.publish(topic, b"over-ws", 1)
            deadline = time.monotonic() + WAIT
            while True:
                msg = sub.get(max(0.0, deadline - time.monotonic()))
                if msg.topic == topic:
                    break
        assert msg.payload == b"over-ws"
        for client in seen.values():
            client.close()
    finally:
        factory.close()


def test_coap_and_bridges_run_on_worker_zero_only(tmp_path) -> None:
    """A UDP port cannot be shared: worker 0 alone serves CoAP, and the node starts with both workers."""
    from tests.conftest import free_port

    factory = NodeFactory(tmp_path)
    try:
        node = start(factory, {"server.coap.plain.addr": f"127.0.0.1:{free_port()}"})
        assert len(node.worker_pids()) == 2
        assert node.log_text().count("broker_start_failed") == 0
    finally:
        factory.close()


def test_a_port_in_use_stops_the_node_with_one_line_and_status_3(node_factory) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        node = node_factory(
            {"server.workers": 2, "server.tcp.plain.addr": f"127.0.0.1:{port}"}, wait_ready=False
        )
        assert node.wait(20) == 3
    assert f"server.tcp.plain.addr 127.0.0.1:{port}: Address already in use" in node.log_text()


def test_going_from_one_worker_to_two_keeps_the_data_and_every_worker_sees_the_retained(tmp_path) -> None:
    """Worker 0's shard is the old storage.path; the new worker 1 fills its empty shard's retained
    messages from worker 0 at start."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    factory = NodeFactory(tmp_path)
    try:
        one = factory({"storage.type": "lmdb", "broker.sys_interval": "1s"})
        topic = unique("xw/upgrade")
        cid = unique("kept")
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 300
        with paho5(one, unique("pub")) as pub:
            pub.publish(topic, b"from-one-worker", 1, retain=True)
        s = paho5(one, cid, props)
        s.subscribe(topic + "/q", 1)
        s.disconnect()
        assert one.stop() == 0
        node = start(factory, {"storage.type": "lmdb", "storage.path": str(one.data_dir)})
        # worker 1 fills its shard once it reaches worker 0, after the node is ready: wait for that
        assert wait_until(lambda: re.search(r"event=retained_synced .*added=1\b", node.log_text())), (
            node.log_tail()
        )
        for worker in ("w0", "w1"):
            with on_worker(node, worker, "sub") as sub:
                sub.subscribe(topic, 1)
                msg = sub.get(WAIT)
                assert (msg.payload, msg.retain) == (b"from-one-worker", True), worker
        s = Paho5(node, cid, False, 60)
        _rc, present, _ = s.connect(props)
        assert present  # the session stored by the single worker, resumed on whichever worker
        s.disconnect()
    finally:
        factory.close()


def test_admin_lists_finds_and_disconnects_sessions_of_either_worker(tmp_path) -> None:
    """GET /sessions/{id} and POST /sessions/{id}/disconnect answer whichever worker takes the request."""
    import json

    factory = NodeFactory(tmp_path)
    try:
        node = factory(
            {"server.workers": 2, "broker.sys_interval": "1s"}, env={"FLUXMQ_ADMIN_TOKEN": "t0ken"}
        )
        wait_crossing(node)
        base = f"http://{node.host}:{node.admin_port}"
        auth = {"Authorization": "Bearer t0ken"}
        clients = {worker: on_worker(node, worker, "adm") for worker in ("w0", "w1")}
        cids = sorted(c.client._client_id.decode() for c in clients.values())
        for _ in range(4):  # the list, from either worker, holds the sessions of both
            req = urllib.request.Request(f"{base}/sessions?limit=1", headers=auth)
            with urllib.request.urlopen(req, timeout=5) as resp:
                first = json.loads(resp.read())
            req = urllib.request.Request(f"{base}/sessions?after={first['next']}", headers=auth)
            with urllib.request.urlopen(req, timeout=5) as resp:
                rest = json.loads(resp.read())
            listed = [row["client_id"] for row in first["sessions"] + rest["sessions"]]
            assert first["total"] == 2 and listed == cids
        for client in clients.values():
            cid = client.client._client_id.decode()
            for _ in range(6):  # each request lands on either worker
                get = urllib.request.Request(
                    f"{base}/sessions/{cid}", headers={"Authorization": "Bearer t0ken"}
                )
                with urllib.request.urlopen(get, timeout=5) as resp:
                    assert resp.status == 200 and json.loads(resp.read())["client_id"] == cid
            req = urllib.request.Request(
                f"{base}/sessions/{cid}/disconnect", method="POST", headers={"Authorization": "Bearer t0ken"}
            )
            with urllib.request.urlopen(req, timeout=5) as resp:
                assert json.loads(resp.read()) == {"client_id": cid, "disconnected": True}
            assert client.wait_disconnected(WAIT)
            client.stop()
    finally:
        factory.close()


def test_admin_delete_of_a_retained_message_deletes_it_on_every_worker(tmp_path) -> None:
    import json

    factory = NodeFactory(tmp_path)
    try:
        node = factory(
            {"server.workers": 2, "broker.sys_interval": "1s"}, env={"FLUXMQ_ADMIN_TOKEN": "t0ken"}
        )
        wait_crossing(node)
        topic = unique("xw/del")
        with on_worker(node, "w0", "pub") as pub:
            pub.publish(topic, b"doomed", 1, retain=True)
        auth = {"Authorization": "Bearer t0ken"}
        base = f"http://{node.host}:{node.admin_port}/retained/{topic}"
        deadline = time.monotonic() + WAIT
        while True:  # until both workers hold it (two GETs in a row may land on either)
            try:
                if all(
                    urllib.request.urlopen(urllib.request.Request(base, headers=auth), timeout=5).status
                    == 200
                    for _ in range(4)
                ):
                    break
            except urllib.error.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        req = urllib.request.Request(base, method="DELETE", headers=auth)
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert json.loads(resp.read())["deleted"] is True
        for worker in ("w0", "w1"):
            with on_worker(node, worker, "sub") as sub:
                sub.subscribe(topic, 1)
                with pytest.raises(AssertionError):
                    sub.get(0.5)
    finally:
        factory.close()
