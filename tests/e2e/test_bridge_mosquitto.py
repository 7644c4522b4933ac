"""Bridges against a real Mosquitto (Debian's ``mosquitto``, started per module on a free port).

Issue 14 "Bridges": in, out and both directions at QoS 0/1/2 with prefixes; 5.0 properties and
the retain flag; a Mosquitto restart mid-stream (QoS 1/2 queued during the outage arrive once);
``message_validity``; TLS to Mosquitto (verified by default).
"""

from __future__ import annotations

import json
import queue
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.certs import CertAuthority
from tests.conftest import NodeFactory, free_port
from tests.e2e.listener_clients import PahoTransportClient
from tests.e2e.mosquitto import MOSQUITTO, Mosquitto
from tests.e2e.mqttraw import wait_until

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="Debian's mosquitto broker is needed")

WAIT = 15.0
V5 = mqtt.MQTTv5


def bridge_yaml(
    port: int, name: str = "cloud", version: str = "5.0", extra: str = "", topics: str = ""
) -> str:
    topics = (
        topics
        or """
      - {pattern: "out/#", direction: out, qos: 2, local_prefix: "edge/", remote_prefix: "cloud/"}
      - {pattern: "in/#", direction: in, qos: 2, local_prefix: "edge/", remote_prefix: "cloud/"}
      - {pattern: "both/#", direction: both, qos: 2, local_prefix: "edge/", remote_prefix: "cloud/"}
      - {pattern: "capped/#", direction: both, qos: 0, local_prefix: "edge/", remote_prefix: "cloud/"}
"""
    )
    return f"""
bridges:
  - name: {name}
    address: 127.0.0.1:{port}
    protocol_version: "{version}"
    reconnect: {{initial: 0.2s, max: 1s}}
{extra}
    topics:{topics}
broker:
  sys_interval: 1s
"""


def client(port: int, name: str, protocol: int = V5) -> PahoTransportClient:
    c = PahoTransportClient(name, protocol=protocol)
    c.connect(port)
    return c


def wait_status(node, expected: str, timeout: float = WAIT) -> dict:
    """Wait until the node's $SYS/broker/cluster/status says ``expected``; returns /sync."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        with client(node.mqtt_port, f"status-{time.monotonic_ns()}") as c:
            c.subscribe("$SYS/broker/cluster/#", 0)
            got = {}
            try:
                while len(got) < 3:
                    m = c.get(2.0)
                    got[m.topic.rsplit("/", 1)[1]] = m.payload
            except AssertionError:
                pass
        last = got
        if got.get("status") == expected.encode():
            return json.loads(got["sync"])
        time.sleep(0.2)
    raise AssertionError(f"cluster status never became {expected}: {last}")


def drain(c: PahoTransportClient, quiet: float = 1.0, want: int = 0) -> list:
    """``c``'s messages: the ``want`` expected ones (a bounded wait of WAIT: a loaded machine may hold
    one back longer than any quiet period), then any more until none came for ``quiet`` seconds (the
    extras a test asserting on the list must see)."""
    return drain_each([c], quiet, want)[0]


def drain_each(clients: list[PahoTransportClient], quiet: float = 1.0, want: int = 0) -> list[list]:
    """``drain`` of each client, side by side: each one's messages until it has ``want`` and was
    quiet for ``quiet`` seconds after its last one (drained one after the other, the quiet
    periods added up). A client still short of ``want`` after WAIT is done with what it got."""
    outs: list[list] = [[] for _ in clients]
    start = time.monotonic()
    last = [start] * len(clients)

    def waiting(i: int) -> bool:
        now = time.monotonic()
        return now - last[i] < quiet or (len(outs[i]) < want and now - start < WAIT)

    while True:
        busy = [i for i in range(len(clients)) if waiting(i)]
        if not busy:
            return outs
        for i in busy:
            try:
                outs[i].append(clients[i].get(0.02))
                last[i] = time.monotonic()
            except AssertionError:
                pass


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    m = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield m
    m.stop()


@pytest.fixture(scope="module")
def edge(cloud, tmp_path_factory):
    factory = NodeFactory(tmp_path_factory.mktemp("edge"))
    try:
        node = factory(config_text=bridge_yaml(cloud.port))
        wait_status(node, "ok")
        yield node
    finally:
        factory.close()


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_out_direction_with_prefixes(edge, cloud, qos):
    """A local publish on edge/out/... reaches Mosquitto as cloud/out/... at its QoS."""
    with (
        client(cloud.port, f"remote-sub-out{qos}") as remote,
        client(edge.mqtt_port, f"local-pub-out{qos}") as local,
    ):
        remote.subscribe("cloud/out/#", 2)
        local.publish(f"edge/out/q{qos}", f"hello {qos}".encode(), qos)
        m = remote.get(WAIT)
        assert (m.topic, m.payload, m.qos) == (f"cloud/out/q{qos}", f"hello {qos}".encode(), qos)
        assert drain(remote) == []


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_in_direction_with_prefixes(edge, cloud, qos):
    """A publish at Mosquitto on cloud/in/... reaches local subscribers as edge/in/... at its QoS."""
    with (
        client(edge.mqtt_port, f"local-sub-in{qos}") as local,
        client(cloud.port, f"remote-pub-in{qos}") as remote,
    ):
        local.subscribe("edge/in/#", 2)
        remote.publish(f"cloud/in/q{qos}", f"hi {qos}".encode(), qos)
        m = local.get(WAIT)
        assert (m.topic, m.payload, m.qos) == (f"edge/in/q{qos}", f"hi {qos}".encode(), qos)
        assert drain(local) == []


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_both_directions_no_echo(edge, cloud, qos):
    """both: each side's publish reaches the other once and never comes back to its own side."""
    with client(edge.mqtt_port, f"l{qos}") as local, client(cloud.port, f"r{qos}") as remote:
        local.subscribe("edge/both/#", 2)
        remote.subscribe("cloud/both/#", 2)
        local.publish(f"edge/both/from-edge{qos}", b"e", qos)
        remote.publish(f"cloud/both/from-cloud{qos}", b"c", qos)
        got_local, got_remote = (
            sorted(m.topic for m in got) for got in drain_each([local, remote], 2.0, want=2)
        )
        assert got_local == sorted([f"edge/both/from-edge{qos}", f"edge/both/from-cloud{qos}"])
        assert got_remote == sorted([f"cloud/both/from-edge{qos}", f"cloud/both/from-cloud{qos}"])


def test_qos_capped_by_route(edge, cloud):
    """The route's qos caps what is forwarded (capped/# is QoS 0 both ways)."""
    with client(cloud.port, "cap-sub") as remote, client(edge.mqtt_port, "cap-pub") as local:
        remote.subscribe("cloud/capped/#", 2)
        local.publish("edge/capped/x", b"x", 2)
        m = remote.get(WAIT)
        assert (m.topic, m.qos) == ("cloud/capped/x", 0)


def test_properties_and_retain_forwarded(edge, cloud):
    """5.0: user properties, content type, response topic and correlation data travel with the
    message; the retain flag is kept (Mosquitto stores it as retained)."""
    with client(edge.mqtt_port, "prop-pub") as local:
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("k", "v")]
        props.ContentType = "text/plain"
        props.ResponseTopic = "edge/reply"
        props.CorrelationData = b"corr"
        info = local.client.publish("edge/out/props", b"p", 1, retain=True, properties=props)
        info.wait_for_publish(WAIT)
    deadline = time.monotonic() + WAIT
    while True:  # subscribe after the fact: Mosquitto must have it retained
        with client(cloud.port, f"prop-sub-{time.monotonic_ns()}") as remote:
            remote.subscribe("cloud/out/props", 1)
            try:
                m = remote.get(1.0)
                if m.retain:
                    break
                # Forwarded live while this subscriber was already there (retain 0 on a live
                # delivery, MQTT-3.3.1-9): the next subscriber gets Mosquitto's retained copy.
            except AssertionError:
                pass
            assert time.monotonic() < deadline, "the retained message never reached Mosquitto"
    assert m.retain and m.payload == b"p"
    p = m.properties
    assert ("k", "v") in p.UserProperty
    assert any(k == "fluxmq-bridge" for k, _ in p.UserProperty)
    assert (p.ContentType, p.ResponseTopic, p.CorrelationData) == ("text/plain", "edge/reply", b"corr")


class PersistentSubscriber:
    """A paho 5.0 subscriber with a session that outlives the connection (expiry 1 h)."""

    def __init__(self, port: int, client_id: str, topic: str) -> None:
        self.port = port
        self.client_id = client_id
        self.topic = topic
        self.messages: queue.Queue = queue.Queue()
        self._client = None
        self.connect()

    def connect(self) -> None:
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=V5,
            reconnect_on_failure=False,
        )
        ready = threading.Event()
        c.on_message = lambda cl, u, msg: self.messages.put((msg.topic, msg.payload, msg.qos))
        c.on_subscribe = lambda *a: ready.set()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        c.connect("127.0.0.1", self.port, keepalive=30, clean_start=False, properties=props)
        c.loop_start()
        c.subscribe(self.topic, 2)
        assert ready.wait(WAIT), "no SUBACK"
        self._client = c

    def close(self) -> None:
        c, self._client = self._client, None
        if c is not None:
            c.disconnect()
            c.loop_stop()

    def collect(self, want: int, timeout: float = 30.0) -> list:
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < want and time.monotonic() < deadline:
            try:
                out.append(self.messages.get(timeout=0.2))
            except queue.Empty:
                pass
        out.extend(drain_queue(self.messages, 1.0))
        return out


def drain_queue(q: queue.Queue, quiet: float) -> list:
    out = []
    while True:
        try:
            out.append(q.get(timeout=quiet))
        except queue.Empty:
            return out


def test_mosquitto_restart_mid_stream(node_factory, tmp_path):
    """Mosquitto goes away mid-stream: what was published meanwhile waits on disk and arrives once
    it is back; QoS 2 arrives exactly once, QoS 1 queued during the outage exactly once too."""
    cloud = Mosquitto(tmp_path / "cloud").start()
    try:
        edge = node_factory(config_text=bridge_yaml(cloud.port, "restart"))
        wait_status(edge, "ok")
        sub = PersistentSubscriber(cloud.port, "restart-sub", "cloud/out/#")
        pub = client(edge.mqtt_port, "restart-pub")
        sent = []

        def burst(tag: str, n: int) -> None:
            for i in range(n):
                qos = 1 + i % 2
                topic = f"edge/out/{tag}/{i}"
                pub.publish(topic, f"{tag}{i}".encode(), qos)
                sent.append((f"cloud/out/{tag}/{i}", qos))

        burst("before", 20)
        got = sub.collect(20)
        assert len(got) == 20
        sub.close()
        cloud.stop()
        wait_status(edge, "down")
        burst("during", 50)  # acknowledged by fluxmq: stored in the bridge's outbound queue
        cloud.start()
        sub.connect()
        wait_status(edge, "ok", 30)
        burst("after", 20)
        got += sub.collect(70)
        pub.close()
        sub.close()
        topics = [t for t, _, _ in got]
        for topic, qos in sent:
            n = topics.count(topic)
            if qos == 2 or "/during/" in topic:
                assert n == 1, f"{topic} (QoS {qos}) arrived {n} times"
            else:
                assert n >= 1, f"{topic} (QoS {qos}) lost"
    finally:
        cloud.stop()


def test_message_validity_drops_old_messages(node_factory, tmp_path):
    """A message older than message_validity when its turn comes is dropped and counted in /sync."""
    cloud = Mosquitto(tmp_path / "cloud").start()
    try:
        edge = node_factory(config_text=bridge_yaml(cloud.port, "valid", extra="    message_validity: 1s"))
        wait_status(edge, "ok")
        cloud.stop()
        wait_status(edge, "down")
        with client(edge.mqtt_port, "valid-pub") as pub:
            for i in range(5):
                pub.publish(f"edge/out/old/{i}", b"old", 1)
            time.sleep(1.5)  # older than message_validity before the peer is back
            cloud.start()
            sub = PersistentSubscriber(cloud.port, "valid-sub", "cloud/out/#")
            wait_status(edge, "ok", 30)
            pub.publish("edge/out/fresh", b"fresh", 1)
            got = sub.collect(1)
            sub.close()
        assert [t for t, _, _ in got] == ["cloud/out/fresh"]
        sync = wait_status(edge, "ok")
        assert sync["valid"]["dropped_validity"] == 5
    finally:
        cloud.stop()


def test_tls_to_mosquitto_verified(node_factory, tmp_path):
    """TLS to the peer: verified against the configured CA; a certificate from another CA is refused."""
    ca = CertAuthority(tmp_path / "ca")
    server = ca.issue_server("localhost", ("localhost", "127.0.0.1"))
    other = CertAuthority(tmp_path / "other", "another CA")
    tls_port = free_port()
    cloud = Mosquitto(
        tmp_path / "cloud",
        extra=(
            f"listener {tls_port} 127.0.0.1\n"
            f"cafile {ca.cert_file}\ncertfile {server.cert_file}\nkeyfile {server.key_file}\n"
        ),
    )
    cloud.start()
    try:
        good = node_factory(
            config_text=bridge_yaml(tls_port, "tls", extra=f"    tls: {{ca_file: {ca.cert_file}}}")
        )
        wait_status(good, "ok")
        with client(cloud.port, "tls-sub") as remote, client(good.mqtt_port, "tls-pub") as local:
            remote.subscribe("cloud/out/#", 1)
            local.publish("edge/out/tls", b"secret", 1)
            assert remote.get(WAIT).payload == b"secret"
        bad = node_factory(
            config_text=bridge_yaml(tls_port, "tls2", extra=f"    tls: {{ca_file: {other.cert_file}}}")
        )
        assert wait_until(lambda: "certificate verify failed" in bad.log_text()), bad.log_tail()
        assert wait_until(lambda: bad.http_get("/ready")[1].get("mode") == "degraded")
        status, body = bad.http_get("/ready")
        assert status == 200 and body["mode"] == "degraded", body
        assert "tls2" in body["checks"]["bridges"]["details"]
        assert "certificate verify failed" in bad.log_text()
    finally:
        cloud.stop()


N_KILL = 2000


def test_node_killed_nothing_acknowledged_is_lost(node_factory, tmp_path):
    """SIGKILL of the fluxmq node, both directions:

    - outbound: QoS 1 messages queued for an absent Mosquitto survive the kill (the bridge's
      outbound store is on disk) and arrive once Mosquitto and the node are back;
    - inbound: Mosquitto streams QoS 1 messages to the bridge while the node is killed; each one
      the node acknowledged was committed first, and the rest Mosquitto sends again, so the local
      persistent subscriber gets every message.
    """
    cloud = Mosquitto(tmp_path / "cloud").start()
    config = bridge_yaml(cloud.port, "crash")
    try:
        edge = node_factory(config_text=config)
        data = str(edge.data_dir)  # every restart below runs on this data directory
        wait_status(edge, "ok")
        cloud.stop()
        wait_status(edge, "down")
        with client(edge.mqtt_port, "crash-pub") as pub:
            for i in range(20):
                pub.publish(f"edge/out/kept/{i}", b"k", 1)
        edge.kill()
        cloud.start()
        remote = PersistentSubscriber(cloud.port, "crash-remote", "cloud/out/#")
        edge = node_factory({"storage.path": data}, config_text=config)
        got = remote.collect(20)
        remote.close()
        assert sorted(t for t, _, _ in got) == sorted(f"cloud/out/kept/{i}" for i in range(20))

        local = PersistentSubscriber(edge.mqtt_port, "crash-local", "edge/in/#")
        local.close()  # offline: what comes in over the bridge is queued on disk for it
        wait_status(edge, "ok")
        observer = client(edge.mqtt_port, "crash-observer")
        observer.subscribe("edge/in/#", 0)
        with client(cloud.port, "crash-remote-pub") as remote_pub:
            infos = [remote_pub.client.publish(f"cloud/in/k/{i}", b"i", 1) for i in range(N_KILL)]
            seen = 0
            while seen < N_KILL // 4:  # kill once the bridge is well into the stream
                observer.get(WAIT)
                seen += 1
            edge.kill()
            for info in infos:
                info.wait_for_publish(WAIT)  # Mosquitto has them all (for the bridge's session)
        observer.close()
        edge = node_factory({"storage.path": data}, config_text=config)
        local.port = edge.mqtt_port
        local.connect()
        got = local.collect(N_KILL, timeout=60)
        local.close()
        assert set(t for t, _, _ in got) == {f"edge/in/k/{i}" for i in range(N_KILL)}
    finally:
        cloud.stop()


def test_311_link_both_directions_no_echo(node_factory, cloud):
    """A 3.1.1 peer has no No Local: Mosquitto sends the bridge's own publishes back on its
    both-direction subscription, and the echo check drops them (counted as loop drops)."""
    edge = node_factory(
        config_text=bridge_yaml(cloud.port, "v311", version="3.1.1").replace(
            'local_prefix: "edge/"', 'local_prefix: "e311/"'
        )
    )
    wait_status(edge, "ok")
    with client(edge.mqtt_port, "l311", mqtt.MQTTv311) as local, client(cloud.port, "r311") as remote:
        local.subscribe("e311/both/#", 1)
        remote.subscribe("cloud/both/from-311/#", 1)
        for i in range(5):
            local.publish(f"e311/both/from-311/{i}", f"p{i}".encode(), 1)
        assert sorted(m.topic for m in drain(remote, 2.0, want=5)) == [
            f"cloud/both/from-311/{i}" for i in range(5)
        ]
        assert sorted(m.topic for m in drain(local, 1.0, want=5)) == [
            f"e311/both/from-311/{i}" for i in range(5)
        ]
    sync = wait_status(edge, "ok")
    assert sync["v311"]["forwarded_out"] >= 5


def test_peer_respects_our_maximum_packet_size(node_factory, cloud):
    """A 5.0 link announces broker.max_packet_size: Mosquitto never sends a bigger packet (it drops
    that message for the bridge), so a peer cannot make the link buffer more than the bound."""
    edge = node_factory(
        config_text=bridge_yaml(cloud.port, "small").replace(
            'local_prefix: "edge/"', 'local_prefix: "small/"'
        )
        + "  max_packet_size: 1024\n"
    )
    wait_status(edge, "ok")
    with client(edge.mqtt_port, "small-sub") as local, client(cloud.port, "small-pub") as remote:
        local.subscribe("small/in/#", 1)
        remote.publish("cloud/in/big", b"x" * 4096, 1)
        remote.publish("cloud/in/fits", b"y" * 100, 1)
        assert [m.topic for m in drain(local, 2.0, want=1)] == ["small/in/fits"]
    assert wait_status(edge, "ok")["small"]["forwarded_in"] >= 1
