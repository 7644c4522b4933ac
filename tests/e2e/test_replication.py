"""Replicated durable queues (issue 12): three real fluxmq nodes on loopback with static Raft peers.

Each node is a real ``fluxmq-node`` process (node_factory); clients are paho-mqtt 2.x. A consumer
counts a message as acknowledged only when the PUBACK of its ``$queue/{name}/$ack`` publish says
success: that PUBACK is held until the settlement is replicated, as a producer's PUBACK is held
until the append is.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import deque

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.conftest import free_port
from tests.e2e.mqttraw import wait_until

QUEUE = "work"


def _raft_config(
    bind: str, peers: list[str], write_policy: str = "forward", queue_extra: str = "", raft_extra: str = ""
) -> str:
    return f"""
cluster:
  raft:
    enabled: true
    bind_addr: "{bind}"
    peers: {json.dumps(peers)}
    write_policy: {write_policy}
{raft_extra}
queues:
  - name: {QUEUE}
    replication:
      enabled: true
      mode: sync
      replication_factor: 3
      min_in_sync_replicas: 2
      ack_timeout: 3s
{queue_extra}
"""


def start_cluster(
    node_factory, write_policy: str = "forward", queue_extra: str = "", raft_extra: str = ""
) -> list:
    peers = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    nodes = [
        node_factory(
            config_text=_raft_config(peers[i], peers, write_policy, queue_extra, raft_extra), wait_ready=False
        )
        for i in range(3)
    ]
    for n in nodes:
        n.wait_ready()
    for n, addr in zip(nodes, peers, strict=True):
        n.raft_addr = addr
    return nodes


def raft_status(node) -> dict | None:
    """``node``'s first Raft group as ``/cluster/raft`` shows it; None when it does not answer within
    ``http_get``'s bound (a loaded machine answers late: the callers that read the status at once
    would fail on a None that only meant slow)."""
    try:
        return node.http_get("/cluster/raft")[1]["groups"][0]
    except (OSError, ValueError, KeyError, IndexError):
        return None


def registered(node) -> set[str]:
    """The client ids of group ``g``'s members whose registrations ``node`` applied."""
    st = raft_status(node) or {}
    return set(st.get("queues", {}).get(QUEUE, {}).get("registered", {}).get("g", ()))


def queue_count(node, queue: str = QUEUE) -> int | None:
    """How many records ``node`` applied to ``queue`` (None while it does not answer)."""
    return ((raft_status(node) or {}).get("queues", {}).get(queue) or {}).get("count")


def wait_count(node, n: int, timeout: float = 30.0) -> bool:
    """True once ``node`` applied ``n`` records to the queue. A publish acknowledged means committed
    on a follower too, which applies it at the leader's next message: a loaded machine delays that
    past any fixed sleep."""
    deadline = time.monotonic() + timeout
    while queue_count(node) != n:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def wait_leader(nodes, among=None, timeout: float = 20.0) -> int:
    """Index of the node that delivers (the Raft leader whose claim is applied)."""
    deadline = time.monotonic() + timeout
    among = range(len(nodes)) if among is None else among
    while time.monotonic() < deadline:
        for i in among:
            st = raft_status(nodes[i])
            if st is not None and st["delivering"]:
                return i
        time.sleep(0.1)
    states = [raft_status(nodes[i]) for i in among]
    raise AssertionError(f"no Raft leader delivering within {timeout:.0f}s: {states!r}")


def wait_all_know_leader(nodes, timeout: float = 20.0) -> int:
    """Index of the delivering leader once every node has heard of it (a loaded machine may
    elect before every follower knows, and a follower that does not yet know refuses writes)."""
    leader = wait_leader(nodes, timeout=timeout)
    addr = raft_status(nodes[leader])["self"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all((raft_status(n) or {}).get("leader") == addr for n in nodes):
            return leader
        time.sleep(0.1)
    raise AssertionError(f"not every node knows leader {addr}: {[raft_status(n) for n in nodes]!r}")


def client5(node, client_id: str) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(200)
    c.connect(node.host, node.mqtt_port, keepalive=30)
    c.loop_start()
    return c


class Consumer:
    """A 5.0 member of group ``g`` that acks every delivery with a QoS 1 ``$ack`` publish."""

    def __init__(self, node, name: str, receive_maximum: int | None = None) -> None:
        self.lock = threading.Lock()
        self.received: list[tuple[bytes, float]] = []
        self.acked: dict[bytes, float] = {}  # payload -> when the $ack's PUBACK said success
        # the same by queue record (message-id, queue:offset, the same on every replica): a producer
        # that published again after losing its connection appends a second record of a payload
        self.received_ids: list[tuple[str, float]] = []
        self.acked_ids: dict[str, float] = {}
        self.failed: set[bytes] = set()  # payloads whose $ack was refused: settled or not, unknown
        self._id_of: dict[int, str] = {}
        self._ack_of: dict[int, bytes] = {}
        self._early: dict[int, object] = {}
        self.client = c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        c.max_inflight_messages_set(200)
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        subscribed = threading.Event()
        c.on_subscribe = lambda *a: subscribed.set()
        connect = None
        if receive_maximum is not None:  # the member's window (min with the queue's max_inflight)
            connect = Properties(PacketTypes.CONNECT)
            connect.ReceiveMaximum = receive_maximum
        c.connect(node.host, node.mqtt_port, keepalive=30, properties=connect)
        c.loop_start()
        props = Properties(PacketTypes.SUBSCRIBE)
        props.UserProperty = [("consumer-group", "g")]
        c.subscribe(f"$queue/{QUEUE}", qos=1, properties=props)
        assert subscribed.wait(10), "no SUBACK"

    def _on_message(self, client, userdata, msg) -> None:
        now = time.monotonic()
        user = dict(msg.properties.UserProperty) if hasattr(msg.properties, "UserProperty") else {}
        with self.lock:
            self.received.append((msg.payload, now))
            self.received_ids.append((user["message-id"], now))
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("message-id", user["message-id"]), ("group-id", user["group-id"])]
        info = client.publish(f"$queue/{QUEUE}/$ack", b"", qos=1, properties=props)
        with self.lock:
            self._ack_of[info.mid] = msg.payload
            self._id_of[info.mid] = user["message-id"]
            early = self._early.pop(info.mid, None)
        if early is not None:
            self._settled(info.mid, early)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self.lock:
            if mid not in self._ack_of:
                self._early[mid] = reason_code  # the PUBACK beat the publish() return
                return
        self._settled(mid, reason_code)

    def _settled(self, mid, reason_code) -> None:
        with self.lock:
            payload = self._ack_of.pop(mid)
            record = self._id_of.pop(mid)
            if not reason_code.is_failure and reason_code.value == 0:
                self.acked[payload] = self.acked_ids[record] = time.monotonic()
            elif reason_code.is_failure:
                self.failed.add(payload)

    def stop(self) -> None:
        self.client.loop_stop()
        try:
            self.client.disconnect()
        except Exception:
            pass


class Producer:
    """Publishes QoS 1 messages (pipelined); a refused one is published again later.

    With ``follow`` (write_policy reject) it connects where a 0x83 refusal's ``leader`` user
    property points, and after losing its node it tries the ``fallback`` addresses in turn (and is
    sent on from there); what was in flight on a lost connection is published again."""

    def __init__(self, node, name: str, total: int, follow: bool = False, fallback=()) -> None:
        self.lock = threading.Lock()
        self.todo = deque(b"m%05d" % i for i in range(total))
        self.pending: dict[int, bytes] = {}
        self.early: dict[int, object] = {}
        self.acked: set[bytes] = set()
        self.refusals: list[int] = []
        self.name = name
        self.follow = follow
        self.fallback = list(fallback)  # (host, port) to try after losing the node
        self.move_to: tuple[str, int] | None = None
        self.lost = False
        self.moves: list[tuple[str, int]] = []
        self.client = self._connect(node.host, node.mqtt_port)

    def _connect(self, host: str, port: int) -> mqtt.Client:
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"{self.name}-{len(self.moves)}", protocol=mqtt.MQTTv5
        )
        c.max_inflight_messages_set(200)
        c.on_publish = self._on_publish
        c.on_disconnect = self._on_disconnect
        c.connect(host, port, keepalive=30)
        c.loop_start()
        return c

    def _on_disconnect(self, client, *args) -> None:
        if client is self.client:
            self.lost = True

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if client is not self.client:
            return  # an answer on a connection given up (its messages are queued again)
        with self.lock:
            payload = self.pending.pop(mid, None)
            if payload is None:
                self.early[mid] = (reason_code, properties)
                return
            self._outcome(payload, reason_code, properties)

    def _outcome(self, payload: bytes, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            self.refusals.append(reason_code.value)
            self.todo.append(payload)
            leader = dict(getattr(properties, "UserProperty", None) or []).get("leader")
            if self.follow and reason_code.value == 0x83 and leader:
                host, _, port = leader.rpartition(":")
                self.move_to = (host, int(port))
        else:
            self.acked.add(payload)

    def _move(self) -> None:
        """Reconnect (follow): to the named leader, else to the next fallback address."""
        with self.lock:
            target, self.move_to = self.move_to, None
            self.todo.extend(self.pending.values())  # their PUBACKs will not come: published again
            self.pending.clear()
            self.early.clear()
        old, self.lost = self.client, False
        old.loop_stop()
        targets = [target] if target else []
        targets += self.fallback[len(self.moves) % len(self.fallback) :] + self.fallback
        for host, port in targets:
            self.moves.append((host, port))
            try:
                self.client = self._connect(host, port)
                return
            except OSError:
                continue
        self.lost = True

    def pump(self, window: int = 100) -> None:
        if self.follow and (self.move_to or self.lost):
            self._move()
        with self.lock:
            room = window - len(self.pending)
            batch = [self.todo.popleft() for _ in range(min(room, len(self.todo)))]
        for payload in batch:
            info = self.client.publish(f"$queue/{QUEUE}/k", payload, qos=1)
            with self.lock:
                early = self.early.pop(info.mid, None)
                if early is not None:
                    self._outcome(payload, *early)
                else:
                    self.pending[info.mid] = payload

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


DISTRIBUTION_MODES = ["forward", "replicate"]


def _mode(distribution: str) -> str:
    return f"    distribution_mode: {distribution}\n"


# The leader-kill runs: a record the killed leader had out (to its own consumer, which dies with it)
# is leased until its visibility_timeout sends it again; 5 s instead of the default 30 s lets the run
# wait that out sooner. Consumers ack each delivery at once, and an $ack that loses a race with an
# expiry is refused (never confirmed), so the run's checks hold for any timeout.
LEASE = "    visibility_timeout: 5s\n"


def _kill_run_cluster(node_factory, write_policy: str = "forward", raft_extra: str = "") -> list:
    return start_cluster(node_factory, write_policy, queue_extra=LEASE, raft_extra=raft_extra)


@pytest.mark.timeout(360)  # 10,000 messages on a shared machine; the run's own deadline is bounded
@pytest.mark.parametrize("distribution", DISTRIBUTION_MODES)
def test_leader_kill_mid_stream_loses_no_acknowledged_message(node_factory, distribution: str) -> None:
    _leader_kill_run(node_factory, "forward", 10000, distribution, start=_kill_run_cluster)


@pytest.mark.timeout(360)
@pytest.mark.parametrize("distribution", DISTRIBUTION_MODES)
def test_leader_kill_with_reject_policy_the_producer_follows_the_leader(
    node_factory, distribution: str
) -> None:
    """write_policy reject: the producer starts on a follower, is refused with the leader's MQTT
    address, moves there; the leader is killed mid-stream, the producer reconnects to a survivor
    and is sent on to the new leader. No acknowledged message is lost."""
    producer = _leader_kill_run(node_factory, "reject", 10000, distribution, start=_kill_run_cluster)
    assert 0x83 in producer.refusals and len(producer.moves) >= 2, (producer.refusals[:5], producer.moves)


def _one_consumer(node, i: int) -> list:
    return [Consumer(node, f"cons{i}")]


def _leader_kill_run(
    node_factory,
    write_policy: str,
    total: int,
    distribution: str = "forward",
    start=start_cluster,
    consumers_on=_one_consumer,
    producer_class=None,
) -> Producer:
    """Consumers on every node (the followers' receive from their replicas); the leader is killed
    with half the messages acknowledged; consumers on the survivors settle everything.
    ``start(node_factory, write_policy=..., raft_extra=...)`` -> three ready nodes (static peers by
    default; the etcd-membership variant is tests/e2e/test_replication_etcd.py);
    ``consumers_on(node, i)`` -> the consumers of node ``i``; ``producer_class``: Producer's
    signature (several workers: tests/e2e/test_replication_workers.py places them on a worker)."""
    nodes = start(node_factory, write_policy=write_policy, raft_extra=_mode(distribution))
    leader = wait_leader(nodes)
    survivors = [i for i in range(3) if i != leader]
    on_node = {i: consumers_on(nodes[i], i) for i in range(3)}
    consumers = {(i, j): c for i, cs in on_node.items() for j, c in enumerate(cs)}

    def received_on(i: int) -> list:
        out = []
        for c in on_node[i]:
            with c.lock:
                out += c.received
        return out

    producer = (producer_class or Producer)(
        nodes[survivors[0]],
        "prod",
        total,
        follow=write_policy == "reject",
        fallback=[(nodes[i].host, nodes[i].mqtt_port) for i in survivors],
    )
    killed_at = None
    deadline = time.monotonic() + 40 + total / 100
    try:
        while len(producer.acked) < total and time.monotonic() < deadline:
            producer.pump()
            if killed_at is None and len(producer.acked) >= total // 2:
                nodes[leader].kill()  # kill -9 the leader's arbiter and worker
                for c in on_node[leader]:
                    c.stop()
                killed_at = time.monotonic()
            time.sleep(0.005)
        assert killed_at is not None, "the leader was never killed"
        assert len(producer.acked) == total, f"only {len(producer.acked)} of {total} acknowledged in time"
        new_leader = wait_leader(nodes, among=survivors)
        # Every PUBACKed message is delivered at least once (consumers ack everything they get).
        while time.monotonic() < deadline:
            delivered = set()
            for c in consumers.values():
                with c.lock:
                    delivered.update(p for p, _ in c.received)
            if producer.acked <= delivered:
                break
            time.sleep(0.1)
        missing = producer.acked - delivered
        assert not missing, (
            f"{len(missing)} acknowledged messages never delivered, e.g. {sorted(missing)[:5]}"
        )

        # Consumers ack everything they get: wait (bounded) until every message is settled, so
        # the check below also covers the redeliveries of the failover.
        def acked_times() -> dict[bytes, float]:
            out: dict[bytes, float] = {}
            for c in consumers.values():
                with c.lock:
                    for p, t in c.acked.items():
                        out[p] = min(t, out.get(p, t))
            return out

        # A message the killed node delivered may be settled without its consumer seeing the
        # $ack's PUBACK (the node died after the commit): it counts as settled, not lost. So does
        # one whose $ack was refused in the election (committed or not: if not, it comes again).
        unconfirmed = {p for p, _ in received_on(leader)}
        for c in consumers.values():
            with c.lock:
                unconfirmed |= c.failed
        while time.monotonic() < deadline and not producer.acked <= set(acked_times()) | unconfirmed:
            time.sleep(0.1)
        time.sleep(1.0)  # room for a wrong redelivery to show up
        acked_at = acked_times()
        unsettled = sorted(producer.acked - set(acked_at) - unconfirmed)
        assert not unsettled, (
            f"consumers could not settle {len(unsettled)}: {unsettled[:5]}; received "
            f"{ {i: len(c.received) for i, c in consumers.items()} }; "
            f"{[raft_status(nodes[i]) for i in survivors]}"
        )
        # and the replicated progress agrees: on the survivors the group settled every record. A
        # record whose payload was published twice (a producer that moved) may be held by a
        # delivery lost in the failover until its visibility_timeout (30 s by default) sends it
        # again: wait that long at most, whatever is left of the run's deadline
        floor_deadline = max(deadline, time.monotonic() + 45)
        while time.monotonic() < floor_deadline:
            states = [raft_status(nodes[i])["queues"][QUEUE] for i in survivors]
            if all(st["groups"].get("g") == st["next"] for st in states):
                break
            time.sleep(0.1)
        assert all(st["groups"].get("g") == st["next"] for st in states), states
        # Nothing a consumer had acknowledged (its $ack PUBACKed) is delivered again afterwards
        # (by record: a payload published twice is two records), also across the failover: an
        # $ack staged before the new leader's claim and applied after it is refused, never
        # confirmed (docs/replication.rst, Durability).
        ids_acked: dict[str, tuple[float, int]] = {}
        for i, c in consumers.items():
            with c.lock:
                for r, t in c.acked_ids.items():
                    if r not in ids_acked or t < ids_acked[r][0]:
                        ids_acked[r] = (t, i)
        again = [
            (r, i, round(t - killed_at, 3), ids_acked[r][1], round(ids_acked[r][0] - killed_at, 3))
            for i, c in consumers.items()
            for r, t in list(c.received_ids)
            if r in ids_acked and t > ids_acked[r][0]
        ]
        assert not again, (
            f"{len(again)} deliveries after the message's ack (record, receiving consumer, "
            f"received s after the kill, acking consumer, acked s after the kill; leader was "
            f"{leader}, new {new_leader}), e.g. {again[:5]}"
        )
        assert new_leader in survivors
        # consumers on followers took part, before the kill and after it
        assert all(received_on(i) for i in range(3)), {i: len(c.received) for i, c in consumers.items()}
        old_follower = [i for i in survivors if i != new_leader][0]
        late = [t for _, t in received_on(old_follower) if t > killed_at]
        assert late, "the consumer on the follower received nothing after the failover"
    finally:
        producer.stop()
        for (i, _j), c in consumers.items():
            if i != leader:
                c.stop()
    return producer


def test_minority_refuses_appends_and_never_acknowledges_them(node_factory) -> None:
    nodes = start_cluster(node_factory)
    leader = wait_leader(nodes)
    alone = leader  # the leader cut off from both followers: the minority side
    others = [i for i in range(3) if i != alone]
    producer = client5(nodes[alone], "minority-prod")
    outcomes: list = []
    producer.on_publish = lambda c, u, mid, rc, props: outcomes.append(rc)
    for i in others:
        nodes[i].process.send_signal(signal.SIGSTOP)
        for pid in nodes[i].worker_pids():
            os.kill(pid, signal.SIGSTOP)
    try:
        # At once: the leader does not know yet that it is alone, appends and waits for a commit
        # that cannot come (the held PUBACK/PUBREC is refused at ack_timeout or when it steps down).
        for i in range(10):
            producer.publish(f"$queue/{QUEUE}/k", b"early-%d" % i, qos=1 if i < 5 else 2)
        time.sleep(3.0)  # past the leader's fallback timeout: refused at once now
        for i in range(15):
            producer.publish(f"$queue/{QUEUE}/k", b"minority-%d" % i, qos=1)
        deadline = time.monotonic() + 15
        while len(outcomes) < 25 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(outcomes) == 25, f"{len(outcomes)} of 25 publishes answered (QoS 1 and 2)"
        assert all(rc.is_failure for rc in outcomes), [str(rc) for rc in outcomes]
        # QoS 2: PUBREC 0x80/0x97; paho still sends PUBREL and reports the PUBCOMP's 0x92 (the id
        # was forgotten with the refusal): not acknowledged either way.
        assert {rc.value for rc in outcomes} <= {0x80, 0x97, 0x92}
        # A 3.1.1 publisher has no negative ack: it is disconnected, never acknowledged.
        old = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="minority-311", protocol=mqtt.MQTTv311)
        acked311: list = []
        gone = threading.Event()
        old.on_publish = lambda *a: acked311.append(a)
        old.on_disconnect = lambda *a: gone.set()
        old.connect(nodes[alone].host, nodes[alone].mqtt_port)
        old.loop_start()
        old.publish(f"$queue/{QUEUE}/k", b"minority-311", qos=1)
        assert gone.wait(15), "the 3.1.1 publisher was not disconnected"
        old.loop_stop()
        assert not acked311
    finally:
        for i in others:
            for pid in nodes[i].worker_pids():
                os.kill(pid, signal.SIGCONT)
            nodes[i].process.send_signal(signal.SIGCONT)
        producer.loop_stop()
    # The majority side (healed) takes appends again, and every replica applies the same log.
    wait_leader(nodes, timeout=30)
    late = client5(nodes[others[0]], "healed-prod")
    done = threading.Event()
    codes: list = []
    late.on_publish = lambda c, u, mid, rc, props: (codes.append(rc), done.set())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done.clear()
        late.publish(f"$queue/{QUEUE}/k", b"healed", qos=1)
        assert done.wait(10)
        if not codes[-1].is_failure:
            break
        time.sleep(0.5)
    assert not codes[-1].is_failure, str(codes[-1])
    late.loop_stop()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        applied = [raft_status(n)["applied"] for n in nodes]
        if len(set(applied)) == 1:
            break
        time.sleep(0.2)
    assert len(set(applied)) == 1, f"replicas applied different logs: {applied}"
    depths = [n.http_get("/cluster/raft")[1] for n in nodes]
    assert depths


def test_reject_policy_refuses_on_a_follower_naming_the_leader(node_factory) -> None:
    nodes = start_cluster(node_factory, write_policy="reject")
    leader = wait_all_know_leader(nodes)
    follower = (leader + 1) % 3
    # A follower that does not know the leader yet refuses with 0x97 (no leader): wait (bounded)
    # until it has applied the leader's claim, which carries the MQTT address it names.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (raft_status(nodes[follower]) or {}).get("leader_mqtt"):
        time.sleep(0.1)
    c = client5(nodes[follower], "rejected")
    got: list = []
    done = threading.Event()
    c.on_publish = lambda cl, u, mid, rc, props: (got.append((rc, props)), done.set())
    c.publish(f"$queue/{QUEUE}/k", b"x", qos=1)
    assert done.wait(10)
    rc, props = got[0]
    assert rc.value == 0x83
    assert "not the Raft leader" in props.ReasonString
    # the leader's MQTT address (announced in its claim), not its Raft port
    assert dict(props.UserProperty)["leader"] == f"{nodes[leader].host}:{nodes[leader].mqtt_port}"
    c.loop_stop()
    # On the leader the same publish is acknowledged once replicated.
    c = client5(nodes[leader], "accepted")
    done.clear()
    got.clear()
    c.on_publish = lambda cl, u, mid, rc, props: (got.append((rc, props)), done.set())
    c.publish(f"$queue/{QUEUE}/k", b"x", qos=1)
    assert done.wait(10)
    assert not got[0][0].is_failure
    c.loop_stop()
    # A 3.1.1 publisher on the follower is disconnected without an ack.
    old = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="rejected-311", protocol=mqtt.MQTTv311)
    gone = threading.Event()
    acked: list = []
    old.on_publish = lambda *a: acked.append(a)
    old.on_disconnect = lambda *a: gone.set()
    old.connect(nodes[follower].host, nodes[follower].mqtt_port)
    old.loop_start()
    old.publish(f"$queue/{QUEUE}/k", b"y", qos=1)
    assert gone.wait(10)
    old.loop_stop()
    assert not acked


@pytest.mark.parametrize(
    "text, key",
    [
        ("queues:\n  - name: q\n    replication:\n      enabled: true\n", "queues[q].replication.enabled"),
        (
            "cluster:\n  raft:\n    enabled: true\n    tls:\n      enabled: true\n",
            "cluster.raft.tls.cert_file",
        ),
    ],
)
def test_config_errors_name_the_key_and_the_file(node_factory, text: str, key: str) -> None:
    node = node_factory(config_text=text, wait_ready=False)
    assert node.wait(20) not in (None, 0)
    log_text = node.log_text()
    assert key in log_text and str(node.config_path) in log_text, node.log_tail()


def _publish_acked(node, name: str, n: int, prefix: bytes, queue: str = QUEUE) -> int:
    """``n`` QoS 1 messages (``prefix`` and a number) to ``$queue/{queue}/k`` from a new client
    ``name``: how many the node acknowledged with success within 30 s."""
    c = client5(node, name)
    codes: list = []
    c.on_publish = lambda cl, u, mid, rc, props: codes.append(rc)
    for i in range(n):
        c.publish(f"$queue/{queue}/k", prefix + b"%d" % i, qos=1)
    deadline = time.monotonic() + 30
    while len(codes) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    c.loop_stop()
    c.disconnect()
    return sum(1 for rc in codes if not rc.is_failure)


def test_a_replica_killed_and_restarted_catches_up_without_applying_twice(node_factory) -> None:
    nodes = start_cluster(node_factory)
    leader = wait_leader(nodes)
    follower = (leader + 1) % 3
    assert _publish_acked(nodes[leader], "before", 300, b"a") == 300
    nodes[follower].kill()  # kill -9 after it applied (its journal and LMDB hold the first 300)
    assert _publish_acked(nodes[leader], "while-away", 300, b"b") == 300
    nodes[follower] = node_factory.restart(nodes[follower])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = [raft_status(n) for n in nodes]
        if all(st is not None for st in states) and len({st["applied"] for st in states}) == 1:
            break
        time.sleep(0.2)
    queues = [st["queues"][QUEUE] for st in states]
    assert len({st["applied"] for st in states}) == 1, states
    # The same records on every replica: the 300 applied before the kill were not appended again.
    assert queues[0] == queues[1] == queues[2] and queues[0]["next"] == 600, queues


def test_plain_appends_take_the_c_fast_path_on_the_leader_and_a_follower_acked_after_commit(
    node_factory,
) -> None:
    """A QoS 1 PUBLISH without properties to a replicated queue is staged by the C fast path
    (``_core.relay`` -> ``QueueManager.append_relayed`` -> ``ReplicatedQueueLog.append_relayed``,
    counted in the group's ``appends_relayed``), on the leader and on a follower (forwarded), and
    its PUBACK still waits for the commit: every acknowledged record is on every replica and is
    delivered."""
    nodes = start_cluster(node_factory)
    leader = wait_all_know_leader(nodes)  # the publish goes through a follower
    follower = (leader + 1) % 3
    assert _publish_acked(nodes[leader], "fast-leader", 300, b"l") == 300
    assert _publish_acked(nodes[follower], "fast-follower", 300, b"f") == 300
    # most of them (a PUBLISH read together with the CONNECT goes the Python path, as it may)
    assert raft_status(nodes[leader]).get("appends_relayed", 0) >= 250
    assert raft_status(nodes[follower]).get("appends_relayed", 0) >= 250
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = [raft_status(n) for n in nodes]
        if all(st is not None and st["queues"][QUEUE]["next"] == 600 for st in states):
            break
        time.sleep(0.1)
    assert [st["queues"][QUEUE]["next"] for st in states] == [600] * 3, states
    consumer = Consumer(nodes[leader], "fast-consumer")
    try:
        deadline = time.monotonic() + 30
        while len(consumer.received) < 600 and time.monotonic() < deadline:
            time.sleep(0.1)
        with consumer.lock:
            got = sorted(p for p, _ in consumer.received)
    finally:
        consumer.stop()
    assert got == sorted([b"l%d" % i for i in range(300)] + [b"f%d" % i for i in range(300)])


def test_a_rejected_message_reaches_the_replicated_dlq_on_every_replica(node_factory) -> None:
    nodes = start_cluster(node_factory)
    leader = wait_all_know_leader(nodes)  # the publish goes through a follower
    got = threading.Event()
    ids: list = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="rejecter", protocol=mqtt.MQTTv5)
    c.on_message = lambda cl, u, m: (ids.append(dict(m.properties.UserProperty)), got.set())
    c.connect(nodes[leader].host, nodes[leader].mqtt_port)
    c.loop_start()
    props = Properties(PacketTypes.SUBSCRIBE)
    props.UserProperty = [("consumer-group", "g")]
    c.subscribe(f"$queue/{QUEUE}", qos=1, properties=props)
    assert _publish_acked(nodes[(leader + 1) % 3], "dlq-prod", 1, b"bad") == 1
    assert got.wait(10)
    rej = Properties(PacketTypes.PUBLISH)
    rej.UserProperty = [("message-id", ids[0]["message-id"]), ("group-id", "g"), ("reason", "poison")]
    c.publish(f"$queue/{QUEUE}/$reject", b"", qos=1, properties=rej).wait_for_publish(10)
    c.loop_stop()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        counts = [(raft_status(n)["queues"].get(f"{QUEUE}.dlq") or {}).get("count") for n in nodes]
        if counts == [1, 1, 1]:
            break
        time.sleep(0.2)
    assert counts == [1, 1, 1], counts


def test_an_http_publish_to_a_replicated_queue_answers_after_the_quorum(node_factory) -> None:
    from tests.e2e.test_http_bridge import publish_json

    nodes = start_cluster(node_factory)
    leader = wait_all_know_leader(nodes)  # a follower that knows no leader yet answers 503
    follower = nodes[(leader + 1) % 3]
    status, body = publish_json(follower, {"topic": f"$queue/{QUEUE}/k", "payload": "over http", "qos": 1})
    assert status == 200, body
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        counts = [raft_status(n)["queues"][QUEUE]["count"] for n in nodes]
        if counts == [1, 1, 1]:
            break
        time.sleep(0.1)
    assert counts == [1, 1, 1]
    # /metrics gives the same view: who leads, and every replica applied the entry.
    from tests.e2e.test_metrics import sample, scrape

    # (is_leader is the delivery lease, which a loaded machine can let lapse for a moment: wait
    # for the view in which the leader holds it, as wait_leader does)
    deadline = time.monotonic() + 10
    while True:
        views = [scrape(n) for n in nodes]
        leads = [sample(v, "fluxmq_raft_is_leader", group="default") for v in views]
        if leads == [1 if i == leader else 0 for i in range(3)] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert leads == [1 if i == leader else 0 for i in range(3)]
    for v in views:
        assert sample(v, "fluxmq_raft_entries_applied_total", group="default") >= 1


def test_a_peer_without_the_raft_password_cannot_join(node_factory) -> None:
    peers = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    secrets = ["right", "right", "wrong"]
    nodes = [
        node_factory(
            config_text=_raft_config(peers[i], peers),
            wait_ready=False,
            env={"FLUXMQ_CLUSTER_RAFT_PASSWORD": secrets[i]},
        )
        for i in range(3)
    ]
    for n in nodes:
        n.wait_ready()
    leader = wait_leader(nodes, among=[0, 1])
    assert _publish_acked(nodes[leader], "with-password", 20, b"p") == 20
    follower = nodes[1 - leader]
    assert wait_count(follower, 20), raft_status(follower)
    time.sleep(1.0)  # room for a wrong join to show up
    outsider = raft_status(nodes[2])
    assert outsider is not None and outsider["leader"] is None, outsider
    assert outsider["queues"][QUEUE]["count"] == 0, outsider


def test_async_mode_acknowledges_before_any_replica_has_the_entry(node_factory) -> None:
    """The documented loss window of ``mode: async``: the leader, cut off from both followers and
    not yet aware of it, acknowledges at once; the same publish to a sync queue is refused."""
    extra = "  - name: fast\n    replication: {enabled: true, mode: async}\n"
    nodes = start_cluster(node_factory, queue_extra=extra)
    leader = wait_leader(nodes)
    producer = client5(nodes[leader], "async-prod")
    outcomes: dict[bytes, object] = {}
    mids: dict[int, bytes] = {}
    lock = threading.Lock()

    def on_publish(c, u, mid, rc, props) -> None:
        with lock:
            outcomes[mids.get(mid, b"?")] = rc

    producer.on_publish = on_publish
    others = [i for i in range(3) if i != leader]
    for i in others:
        for pid in nodes[i].worker_pids():
            os.kill(pid, signal.SIGSTOP)
    try:
        for queue, payload in (("fast", b"async"), (QUEUE, b"sync")):
            with lock:
                mids[producer.publish(f"$queue/{queue}/k", payload, qos=1).mid] = payload
        deadline = time.monotonic() + 15
        while len(outcomes) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not outcomes[b"async"].is_failure  # acknowledged: only the leader's memory has it
        assert outcomes[b"sync"].is_failure  # never acknowledged without the majority
    finally:
        for i in others:
            for pid in nodes[i].worker_pids():
                os.kill(pid, signal.SIGCONT)
        producer.loop_stop()


def test_cluster_status_and_the_admin_api_show_each_raft_group(node_factory) -> None:
    """Leader, term, commit index and per-replica lag in /cluster/status (health listener) and
    GET /cluster/status of the admin API (validated against fluxmq/http/openapi.yaml)."""
    from openapi_core import OpenAPI

    from tests.e2e.test_admin import SPEC_PATH, admin

    nodes = start_cluster(node_factory)
    leader = wait_leader(nodes)
    assert _publish_acked(nodes[leader], "vis", 5, b"v") == 5
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        groups = nodes[leader].http_get("/cluster/status")[1]["raft_groups"]
        # (delivering is the lease, which a loaded machine can let lapse for a moment)
        if groups[0]["lag"] and not any(groups[0]["lag"].values()) and groups[0]["delivering"]:
            break
        time.sleep(0.1)
    g = groups[0]
    assert g["name"] == "default" and g["leader"] == nodes[leader].raft_addr and g["delivering"]
    assert g["leader_mqtt"] == f"{nodes[leader].host}:{nodes[leader].mqtt_port}"
    assert g["term"] >= 1 and g["commit_index"] >= 1 and g["has_quorum"]
    assert sorted(g["lag"]) == sorted(n.raft_addr for i, n in enumerate(nodes) if i != leader), g
    assert set(g["lag"].values()) == {0}, g
    follower = nodes[(leader + 1) % 3]
    spec = OpenAPI.from_file_path(str(SPEC_PATH))
    status, body = admin(spec, follower, "GET", "/cluster/status", headers={})
    assert status == 200, body
    fg = body["raft_groups"][0]
    assert fg["leader"] == nodes[leader].raft_addr and fg["term"] == g["term"] and not fg["delivering"]
    assert fg["commit_index"] >= 1 and fg["lag"] == {}


def _queue_records(data_dir) -> dict:
    """Every replicated key of the LMDB ``queues`` sub-database (a stopped node): not the applied
    Raft index, and not the delivering node's own bookkeeping (delivery marks and counts, session
    memberships: storage/queue_log.py "D", "C", "M"), which is not part of the replicated log."""
    import lmdb

    env = lmdb.open(str(data_dir), readonly=True, lock=False, max_dbs=16, subdir=True)
    try:
        with env.begin() as txn:
            db = env.open_db(b"queues", txn=txn, create=False)
            return {
                bytes(k): bytes(v) for k, v in txn.cursor(db) if bytes(k)[:1] not in (b"R", b"D", b"C", b"M")
            }
    finally:
        env.close()


def test_a_replica_away_longer_than_the_compacted_log_installs_the_snapshot(node_factory) -> None:
    """Compaction bounds the Raft log (a snapshot of the queues replaces it every
    compaction_entries entries); a follower killed while many entries are committed and compacted
    away is sent the leader's snapshot and ends with the same queue log and group progress."""
    keep = 10
    nodes = start_cluster(node_factory, raft_extra=f"    compaction_entries: {keep}\n")
    leader = wait_leader(nodes)
    follower = (leader + 1) % 3
    consumer = Consumer(nodes[leader], "settler")
    try:
        assert _publish_acked(nodes[leader], "before", 50, b"a") == 50
        deadline = time.monotonic() + 20
        while len(consumer.acked) < 50 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(consumer.acked) == 50  # progress to carry: every record of the first 50 settled
    finally:
        consumer.stop()
    nodes[follower].kill()
    for i in range(25):  # about one Raft entry per round: several times the kept log
        assert _publish_acked(nodes[leader], f"away{i}", 5, b"b%d-" % i) == 5
    st = raft_status(nodes[leader])
    assert st["snapshots_written"] >= 1 and st["log_len"] <= 2 * keep + 5, st
    nodes[follower] = node_factory.restart(nodes[follower])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = [raft_status(n) for n in nodes]
        if (
            all(st is not None for st in states)
            and len({json.dumps(st["queues"], sort_keys=True) for st in states}) == 1
        ):
            break
        time.sleep(0.2)
    back = raft_status(nodes[follower])
    assert back["snapshots_installed"] >= 1, back
    from tests.e2e.test_metrics import sample, scrape

    assert sample(scrape(nodes[follower]), "fluxmq_raft_snapshots_installed_total", group="default") >= 1
    assert sample(scrape(nodes[leader]), "fluxmq_raft_log_entries", group="default") <= 2 * keep + 5
    queues = [st["queues"][QUEUE] for st in states]
    assert (
        queues[0] == queues[1] == queues[2] and queues[0]["next"] == 175 and queues[0]["groups"] == {"g": 50}
    ), queues
    # The stores themselves: the same records and settlements on every replica.
    for n in nodes:
        n.stop()
    stored = [_queue_records(n.data_dir) for n in nodes]
    # (the records the group settled are gone by retention: count, not next, is what is stored)
    assert stored[0] == stored[1] == stored[2]
    assert len([k for k in stored[0] if k.startswith(b"L")]) == queues[0]["count"] > 0
    # Each node restarts from its own snapshot and the log kept after it: the same queues again.
    nodes = [node_factory.restart(n) for n in nodes]
    leader = wait_all_know_leader(nodes)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        again = [raft_status(n)["queues"][QUEUE] for n in nodes]
        if again == queues:
            break
        time.sleep(0.2)
    assert again == queues, (again, queues)
    assert _publish_acked(nodes[leader], "after", 5, b"c") == 5


def _stop_workers(node) -> None:
    for pid in node.worker_pids():
        os.kill(pid, signal.SIGSTOP)


def _continue_workers(node) -> None:
    for pid in node.worker_pids():
        os.kill(pid, signal.SIGCONT)


def _lead_moved(nodes, old: int, among: list[int]) -> dict:
    """Stop the workers of ``nodes[old]`` (the leader) until one of ``among`` leads instead; the
    new leader's raft status."""
    _stop_workers(nodes[old])
    try:
        return raft_status(nodes[wait_leader(nodes, among=among)])
    finally:
        _continue_workers(nodes[old])


def _caught_up(node, leader_st: dict, timeout: float = 20.0) -> dict | None:
    """``node``'s raft status once it follows the leader of ``leader_st`` and applied as far (or
    its last status when ``timeout`` passed first)."""
    deadline = time.monotonic() + timeout
    st = None
    while time.monotonic() < deadline:
        st = raft_status(node)
        if st is not None and st["leader"] == leader_st["self"] and st["applied"] >= leader_st["applied"]:
            break
        time.sleep(0.05)
    return st


def test_local_policy_acknowledges_on_a_follower_before_any_replica_has_it(node_factory) -> None:
    """write_policy local: a follower acknowledges at once (documented as not durable across
    nodes). Healthy, the entry still reaches every replica; with the leader and the other follower
    stopped, the follower that still believes in its leader acknowledges what nobody stores."""
    nodes = start_cluster(node_factory, write_policy="local")
    leader = wait_all_know_leader(nodes)  # a follower that knows no leader refuses
    follower = (leader + 1) % 3
    assert _publish_acked(nodes[follower], "local-ok", 3, b"l") == 3
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        counts = [raft_status(n)["queues"][QUEUE]["count"] for n in nodes]
        if counts == [3, 3, 3]:
            break
        time.sleep(0.1)
    assert counts == [3, 3, 3], counts
    producer = client5(nodes[follower], "local-lost")
    outcomes: list = []
    producer.on_publish = lambda c, u, mid, rc, props: outcomes.append(rc)
    others = [i for i in range(3) if i != follower]
    for i in others:
        _stop_workers(nodes[i])
    try:
        producer.publish(f"$queue/{QUEUE}/k", b"acked-by-nobody", qos=1)
        deadline = time.monotonic() + 10
        while not outcomes and time.monotonic() < deadline:
            time.sleep(0.02)
        assert outcomes and not outcomes[0].is_failure, outcomes  # acknowledged, stored nowhere yet
    finally:
        for i in others:
            _continue_workers(nodes[i])
        producer.loop_stop()


def test_a_leader_cut_off_from_its_majority_stops_delivering_before_it_steps_down(node_factory) -> None:
    """The leader lease: with both followers stopped, the leader still believes it leads (it steps
    down after 1.5 s) but stops delivering within 0.3 s of its last majority answer, before the
    others could have elected a new leader that delivers too."""
    nodes = start_cluster(node_factory)
    leader = wait_leader(nodes)
    others = [i for i in range(3) if i != leader]
    for i in others:
        _stop_workers(nodes[i])
    seen = []
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            st = raft_status(nodes[leader])
            seen.append((st["leader"], st["delivering"]))
            if st["leader"] == nodes[leader].raft_addr and not st["delivering"]:
                break
            if st["leader"] != nodes[leader].raft_addr:
                break  # stepped down without the lease having stopped it first
            time.sleep(0.02)
    finally:
        for i in others:
            _continue_workers(nodes[i])
    assert seen[-1] == (nodes[leader].raft_addr, False), seen


def test_a_replicated_stream_cursor_moved_back_survives_the_leader(node_factory) -> None:
    """A stream group's cursor is replicated, a seek back included (a work queue's floor only
    rises; a stream's may move back), so a reader on the next leader resumes where the group was
    moved to, not where it had read up to."""
    extra = (
        "  - name: events\n    type: stream\n    auto_commit_interval: 1h\n"
        "    replication: {enabled: true, mode: sync, ack_timeout: 10s}\n"
    )
    nodes = start_cluster(node_factory, queue_extra=extra)
    leader = wait_leader(nodes)
    follower = nodes[(leader + 1) % 3]
    # The publishes are forwarded by the follower: wait (bounded) until it knows the leader, as a
    # loaded machine may elect before every follower has heard of it.
    leader_addr = raft_status(nodes[leader])["self"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (raft_status(follower) or {}).get("leader") != leader_addr:
        time.sleep(0.1)
    assert _publish_acked(follower, "stream-prod", 10, b"e", "events") == 10

    def reader(node, name: str, start: str | None) -> tuple[mqtt.Client, list]:
        got: list = []
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        c.on_message = lambda cl, u, m: got.append(dict(m.properties.UserProperty)["x-stream-offset"])
        subscribed = threading.Event()
        c.on_subscribe = lambda *a: subscribed.set()
        c.connect(node.host, node.mqtt_port)
        c.loop_start()
        props = Properties(PacketTypes.SUBSCRIBE)
        props.UserProperty = [("consumer-group", "r")] + ([("stream-offset", start)] if start else [])
        c.subscribe("$queue/events", qos=1, properties=props)
        assert subscribed.wait(10)
        return c, got

    def cursors() -> list:
        return [
            (raft_status(n) or {}).get("queues", {}).get("events", {}).get("groups", {}).get("r")
            for n in nodes
            if n.returncode is None
        ]

    def wait_cursors(value: int) -> list:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and set(cursors()) != {value}:
            time.sleep(0.1)
        return cursors()

    c, got = reader(nodes[leader], "r-next", "next")  # the group's cursor at 10, on every replica
    assert wait_cursors(10) == [10, 10, 10]
    c.loop_stop()
    c.disconnect()
    time.sleep(0.5)
    c, got = reader(nodes[leader], "r-first", "first")  # moved back to 0 (replayed, never acked)
    assert wait_cursors(0) == [0, 0, 0]
    deadline = time.monotonic() + 10
    while len(got) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    nodes[leader].kill()
    c.loop_stop()
    survivors = [i for i in range(3) if i != leader]
    new = wait_leader(nodes, among=survivors)
    c, got = reader(nodes[new], "r-resume", None)  # resumes at the replicated cursor
    deadline = time.monotonic() + 15
    while len(got) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    c.loop_stop()
    assert got[:10] == [str(i) for i in range(10)], got


def _group_floors(nodes, group: str = "g") -> list:
    return [
        ((raft_status(n) or {}).get("queues", {}).get(QUEUE, {}).get("groups") or {}).get(group)
        for n in nodes
    ]


@pytest.mark.parametrize("distribution", DISTRIBUTION_MODES)
def test_consumers_on_followers_receive_and_each_message_is_settled_once(
    node_factory, distribution: str
) -> None:
    """Consumers only on the two followers: each gets deliveries from its own node's replica,
    no message goes to two consumers (nothing fails, so nothing is delivered twice), and the
    group's replicated progress on every replica says everything is settled."""
    total = 400
    nodes = start_cluster(node_factory, raft_extra=_mode(distribution))
    leader = wait_all_know_leader(nodes)
    followers = [i for i in range(3) if i != leader]
    consumers = {i: Consumer(nodes[i], f"f-cons{i}") for i in followers}
    try:
        assert _publish_acked(nodes[leader], "to-followers", total, b"f") == total
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            acked = sum(len(c.acked_ids) for c in consumers.values())
            if acked >= total and _group_floors(nodes) == [total] * 3:
                break
            time.sleep(0.1)
        time.sleep(1.0)  # room for a wrong second delivery to show up
        ids = [r for c in consumers.values() for r, _ in list(c.received_ids)]
        assert len(ids) == total and len(set(ids)) == total, (
            len(ids),
            len(set(ids)),
            [raft_status(n) for n in nodes],
            [n.http_get("/queues")[1] if False else None for n in nodes],
        )
        assert all(len(c.received) > 0 for c in consumers.values()), {
            i: len(c.received) for i, c in consumers.items()
        }
        assert _group_floors(nodes) == [total] * 3
    finally:
        for c in consumers.values():
            c.stop()


class _Holder:
    """A 5.0 member of group ``g`` that records its deliveries' user properties and settles
    only when told."""

    def __init__(self, node, name: str) -> None:
        self.got: list[dict] = []
        self.lock = threading.Lock()
        self.client = c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        c.on_message = self._on_message
        subscribed = threading.Event()
        c.on_subscribe = lambda *a: subscribed.set()
        c.connect(node.host, node.mqtt_port)
        c.loop_start()
        props = Properties(PacketTypes.SUBSCRIBE)
        props.UserProperty = [("consumer-group", "g")]
        c.subscribe(f"$queue/{QUEUE}", qos=1, properties=props)
        assert subscribed.wait(10)

    def _on_message(self, cl, u, m) -> None:
        with self.lock:
            self.got.append(dict(m.properties.UserProperty))

    def wait_for(self, n: int, timeout: float = 20.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.got) >= n:
                    return list(self.got)
            time.sleep(0.05)
        with self.lock:
            return list(self.got)

    def nack(self, message_id: str) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("message-id", message_id), ("group-id", "g")]
        self.client.publish(f"$queue/{QUEUE}/$nack", b"", qos=1, properties=props).wait_for_publish(10)

    def ack(self, message_id: str, timeout: float = 10.0) -> int | None:
        """Publish the ``$ack`` of ``message_id``; its PUBACK's reason code (None: no PUBACK)."""
        codes: list[int] = []
        done = threading.Event()

        def on_publish(cl, u, mid, rc, props) -> None:
            codes.append(rc.value)
            done.set()

        self.client.on_publish = on_publish
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("message-id", message_id), ("group-id", "g")]
        self.client.publish(f"$queue/{QUEUE}/$ack", b"", qos=1, properties=props)
        done.wait(timeout)
        return codes[0] if codes else None

    def stop(self) -> None:
        self.client.loop_stop()


def test_a_nack_on_a_follower_redelivers_and_the_count_survives_a_leader_kill(node_factory) -> None:
    """forward: a consumer on a follower nacks; the message comes again with delivery-count 2. It
    holds that delivery unsettled; the leader is killed; the new leader delivers it with count 3
    (the counts are replicated, not the delivering node's own)."""
    nodes = start_cluster(node_factory, raft_extra=_mode("forward"))
    leader = wait_all_know_leader(nodes)
    follower = (leader + 1) % 3
    holder = _Holder(nodes[follower], "nacker")
    wait_for = holder.wait_for
    try:
        assert _publish_acked(nodes[leader], "nack-prod", 1, b"n") == 1
        first = wait_for(1)
        assert first and first[0]["delivery-count"] == "1", first
        holder.nack(first[0]["message-id"])
        second = wait_for(2)  # after the default backoff (1 s)
        assert len(second) == 2 and second[1]["delivery-count"] == "2", second
        assert second[1]["message-id"] == first[0]["message-id"]
        nodes[leader].kill()
        third = wait_for(3, 30.0)  # the new leader delivers the unsettled message again
        assert len(third) >= 3 and third[2]["message-id"] == first[0]["message-id"], third
        assert third[2]["delivery-count"] == "3", third
    finally:
        holder.stop()


def test_replicate_a_lease_of_a_killed_node_expires_and_the_count_goes_on(node_factory) -> None:
    """replicate: a consumer on follower A nacks; A leases the message again and delivers it with
    delivery-count 2, and holds it. A is killed: its lease expires (visibility_timeout, in log
    time), node B leases the message and its consumer gets it with count 3."""
    nodes = start_cluster(
        node_factory, queue_extra="    visibility_timeout: 8s\n", raft_extra=_mode("replicate")
    )
    leader = wait_all_know_leader(nodes)
    a, b = [i for i in range(3) if i != leader]
    x = _Holder(nodes[a], "x-on-a")
    y = None
    try:
        assert _publish_acked(nodes[leader], "lease-prod", 1, b"n") == 1
        first = x.wait_for(1)
        assert first and first[0]["delivery-count"] == "1", first
        x.nack(first[0]["message-id"])
        second = x.wait_for(2)  # after the default backoff (1 s), leased to A again
        assert len(second) == 2 and second[1]["delivery-count"] == "2", second
        assert second[1]["message-id"] == first[0]["message-id"]
        y = _Holder(nodes[b], "y-on-b")
        time.sleep(1.0)
        assert not y.got  # A's lease holds: B delivers nothing meanwhile
        nodes[a].kill()
        third = y.wait_for(1, 30.0)
        assert third and third[0]["message-id"] == first[0]["message-id"], third
        assert third[0]["delivery-count"] == "3", third
    finally:
        x.stop()
        if y is not None:
            y.stop()


def test_an_ack_of_a_delivery_made_before_a_failover_is_not_confirmed_once_the_record_went_out_again(
    node_factory,
) -> None:
    """forward: Y, on the leader, holds a message unsettled; the leader is stopped (SIGSTOP) and the
    new leader hands the message to its own consumer X (whose client is not reading yet). The old
    leader comes back as a follower and applies the new claim; only then does Y send its $ack.
    That ack must not be confirmed: the record has gone out again, so a confirmed ack would be
    followed by a delivery of the record (X reads it after Y's PUBACK). Before the fix the old
    leader still held Y's delivery and confirmed the ack (the window docs/replication.rst had)."""
    nodes = start_cluster(node_factory, raft_extra=_mode("forward"))
    old = wait_all_know_leader(nodes)
    survivors = [i for i in range(3) if i != old]
    y = _Holder(nodes[old], "y-on-old-leader")
    xs = {}
    try:
        assert _publish_acked(nodes[old], "window-prod", 1, b"w") == 1
        first = y.wait_for(1)
        assert first, "the leader's own consumer got nothing"
        message_id = first[0]["message-id"]
        for i in survivors:  # members on both survivors; whichever leads next has one of its own
            xs[i] = _Holder(nodes[i], f"x-on-{i}")
            xs[i].client.loop_stop()  # not reading: what is sent to it waits in its socket
        # their registrations are applied on every node (the leader's group: remote), so whichever
        # leads next knows them
        ids = {"y-on-old-leader", *(f"x-on-{i}" for i in survivors)}
        assert wait_until(lambda: all(ids <= registered(n) for n in nodes), 20), [
            registered(n) for n in nodes
        ]
        new_st = _lead_moved(nodes, old, survivors)
        st = _caught_up(nodes[old], new_st)  # the old leader follows and has applied the new claim
        assert st is not None and st["leader"] == new_st["self"], (st, new_st)
        code = y.ack(message_id)
        acked_at = time.monotonic()
        for x in xs.values():
            x.client.loop_start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(x.got for x in xs.values()):
            time.sleep(0.05)
        again = [g for x in xs.values() for g in x.got if g["message-id"] == message_id]
        assert again, "the new leader never delivered the unsettled message again"
        # an ack whose PUBACK said success is never followed by another delivery of the record:
        # Y's is answered, not confirmed (0x10: the old leader dropped that delivery at the claim)
        assert code is not None, "no PUBACK for Y's $ack"
        assert code != 0, (
            f"Y's $ack was confirmed at {acked_at:.3f} and the message was delivered "
            f"again afterwards: {again}"
        )
    finally:
        y.stop()
        for x in xs.values():
            x.stop()


@pytest.mark.parametrize("on", ["leader", "follower"])
def test_replicate_spreads_records_over_the_consumers_of_every_node(node_factory, on: str) -> None:
    """replicate: one consumer on each node, all with room (the queue's window, 100); a stream of
    appends from a producer on the leader or a follower. Every consumer gets a fair part of the
    records wherever it is connected: the leader's own lease requests need no network hop, and
    first come first served gave its consumer nearly every record while it had room."""
    total = 600
    nodes = start_cluster(node_factory, raft_extra=_mode("replicate"))
    leader = wait_all_know_leader(nodes)
    consumers = [Consumer(nodes[i], f"spread{i}") for i in range(3)]
    at = leader if on == "leader" else (leader + 1) % 3
    producer = Producer(nodes[at], f"spread-prod-{on}", total)
    try:
        deadline = time.monotonic() + 60
        while len(producer.acked) < total and time.monotonic() < deadline:
            producer.pump(20)
            time.sleep(0.01)
        assert len(producer.acked) == total, f"{len(producer.acked)} of {total} acknowledged"
        while time.monotonic() < deadline and sum(len(c.acked) for c in consumers) < total:
            time.sleep(0.1)
        got = {i: len(c.received) for i, c in enumerate(consumers)}
        assert sum(len(c.acked) for c in consumers) == total, got
        # a fair part is a third; at least half of it on each node (the leader's included)
        assert min(got.values()) >= total // 6, f"{got} (leader {leader})"
    finally:
        producer.stop()
        for c in consumers:
            c.stop()
