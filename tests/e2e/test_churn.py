"""A node that served many client lifetimes holds none of their state (bounded memory under churn).

Each lifetime is a new client id, all from 127.0.0.1: connect (3.1.1 and 5.0, clean and persistent
with a short session expiry, some with a will), subscribe to a filter of its own, a shared group
and a wildcard, publish QoS 0/1/2 to topics of its own (a 5.0 one through a topic alias), set a
retained message and clear it, unsubscribe, disconnect or drop (the will goes). Besides: HTTP
bridge publishes, ``/subscribe`` streams and admin monitor streams whose reader closes the
connection, a durable queue consumer that joins a group and leaves (on one worker, after appending
a record, getting it and settling it), CoAP observations (registered, then deregistered) and Block1
uploads (done, or refused), ``/metrics`` scrapes. The node runs with an ACL file (a compiled ACL
per client) and per-client rate limits, on one worker and on two (sessions move between them).

What the node holds is counted in its workers by ``tests/e2e/state_probe`` (real objects: every
``fluxmq`` class's live instances and every container an attribute of one holds). After a warm-up,
then after the churn, once the node settled (stand-ins of moved sessions end, sessions expire),
every count is back where it was (within ``SLACK``), but for the caches bounded by design listed
in ``BOUNDED``."""

from __future__ import annotations

import json
import random
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from fluxmq._core import codec as c
from fluxmq.coap import codec as coap
from fluxmq.coap.codec import CoapMessage
from tests.conftest import REPO_ROOT, NodeFactory, RunningNode, free_port
from tests.e2e.mqttraw import RawClient

pytestmark = pytest.mark.e2e

PROBE = Path(__file__).resolve().parent / "state_probe"
WARM_UP = 100
LIFETIMES = 300  # per run: ~10 s on one worker
SETTLE = 25.0  # seconds the node may take to end what outlives a client by design (grace, expiry)
ACL = """\
topic readwrite churn/#
topic readwrite $queue/#
topic read $SYS/#
pattern readwrite clients/%c/#
"""

# A few objects per worker may stay that no lifetime of the churn owns alone: the last ended
# session in the route cache until the next publish refreshes it, a ``$SYS`` topic for a drop reason
# seen for the first time. Anything a lifetime leaves (even one in 25 of them) is far more.
SLACK = 3

# Caches bounded by design that hold what gone clients left for a while: not counted.
BOUNDED = {
    # the route cache, per topic published: _ROUTE_CACHE_MAX topics, then cleared
    "fluxmq.broker.router.Router._routes",
    "N fluxmq.broker.router.Route",
    # a subscription trie's match cache, per topic (the cluster's interest tables'): its cache_size
    "N fluxmq._core.trie.Match",
    # CoAP de-duplication (RFC 7252 §4.5): each exchange's answer for EXCHANGE_LIFETIME, MAX_EXCHANGES
    "fluxmq.coap.bridge.CoapBridge.exchanges",
    "fluxmq.auth.acl.ClientAcl._read",  # an ACL's decisions per topic: CACHE_MAX, then cleared
    "fluxmq.auth.acl.ClientAcl._write",  # (the HTTP bridge's publishes check as one client id)
}


class Probe:
    """Asks the node's workers what they hold (``state_probe``) and waits for their answers."""

    def __init__(self, directory: Path, workers: int) -> None:
        self.dir = directory
        self.workers = workers
        self.asked = 0

    def state(self) -> dict[str, int]:
        """Every worker's counts, summed: ``objects`` as ``"N Class"`` and containers as
        ``"Class.attribute"``."""
        self.asked += 1
        tag = str(self.asked)
        (self.dir / f"ask-{tag}").write_text("")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            answers = sorted(self.dir.glob(f"state-{tag}-*.json"))
            if len(answers) >= self.workers:
                total: dict[str, int] = {}
                for path in answers:
                    doc = json.loads(path.read_text())
                    for name, n in doc["objects"].items():
                        total["N " + name] = total.get("N " + name, 0) + n
                    for name, n in doc["held"].items():
                        total[name] = total.get(name, 0) + n
                return total
            time.sleep(0.1)
        raise AssertionError(f"{self.workers} workers did not answer the probe within 30 s")


def grown(before: dict[str, int], after: dict[str, int], slack: int) -> dict[str, tuple[int, int]]:
    """What ``after`` holds more of than ``before`` plus ``slack``, but for ``BOUNDED``."""
    return {
        k: (before.get(k, 0), n)
        for k, n in sorted(after.items())
        if n > before.get(k, 0) + slack and k not in BOUNDED
    }


class Churn:
    """Client lifetimes against one node (each a new client id, a new source port)."""

    def __init__(self, node: RunningNode, other: RunningNode | None = None) -> None:
        self.node = node
        self.other = other or node  # where a 3.1.1 persistent session is ended by a clean connect
        self.coap = ("127.0.0.1", int(node.config["server"]["coap"]["plain"]["addr"].rpartition(":")[2]))
        self.run_id = time.time_ns()

    def http(self, port: int, method: str, path: str, body: bytes | None = None) -> int:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                resp.read()
                return resp.status
        except urllib.error.HTTPError as err:
            return err.code

    def mqtt(self, i: int) -> None:
        version = 5 if i % 2 else 4
        persistent = i % 4 >= 2
        client = RawClient(self.node.host, self.node.mqtt_port, version)
        cid = f"churn-{self.run_id}-{i}"
        props = {0x11: 1} if persistent and version == 5 else None  # Session Expiry Interval 1 s
        will = c.Will(f"churn/will/{i}", b"gone", i % 2) if i % 3 == 0 else None
        assert client.connect(cid, clean=not persistent, will=will, properties=props).reason_code == 0
        client.subscribe(
            1, (f"churn/{i}/#", 2), (f"$share/g{i % 3}/churn/shared/{i}", 1), (f"churn/+/x{i}", 0)
        )
        client.publish(f"churn/{i}/q0", b"zero", 0)
        client.publish_qos1(f"churn/{i}/q1", b"one", 2)
        client.publish_qos2(f"churn/{i}/q2", b"two", 3)
        client.publish_qos1(f"churn/retained/{i}", b"kept", 4, retain=True)
        client.publish_qos1(f"churn/retained/{i}", b"", 5, retain=True)  # cleared
        client.publish_qos1(f"clients/{cid}/own", b"mine", 6)
        expected = 3
        if version == 5:
            client.publish(f"churn/{i}/alias", b"a", 1, packet_id=7, properties={0x23: 1})  # Topic Alias
            client.wait_for(lambda p: isinstance(p, c.Puback) and p.packet_id == 7)
            expected += 1
        for _ in range(expected):  # its own messages back: acknowledged
            client.ack(client.wait_for(lambda p: isinstance(p, c.Publish)))
        if i % 5 == 0:
            client.send(c.Unsubscribe(8, [f"churn/{i}/#"]))
            client.wait_for(lambda p: isinstance(p, c.Unsuback))
        if i % 6 == 0:
            client.drop()  # no DISCONNECT: the will goes
        else:
            client.disconnect()
        if persistent and version == 4:  # a 3.1.1 session never expires: ended by a clean connect
            again = RawClient(self.other.host, self.other.mqtt_port, 4)  # (a takeover there)
            again.connect(cid, clean=True)
            again.disconnect()

    def sse(self, i: int) -> None:
        """A ``/subscribe`` stream whose reader closes the connection once it is open."""
        with socket.create_connection(("127.0.0.1", self.node.http_port), timeout=10) as sock:
            sock.sendall(f"GET /subscribe?filter=churn/sse/{i}/%23 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = b""
            while b": fluxmq stream" not in data:
                chunk = sock.recv(4096)
                assert chunk, data
                data += chunk

    def monitor(self, i: int) -> None:
        with socket.create_connection(("127.0.0.1", self.node.admin_port), timeout=10) as sock:
            sock.sendall(f"GET /monitor?filter=churn/mon/{i} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")

    def queue(self, i: int, settle: bool) -> None:
        """A member of the one group: joins, leaves; with ``settle`` it appends a record first, gets
        it and settles it (auto-ack)."""
        client = RawClient(self.node.host, self.node.mqtt_port, 5)
        client.connect(f"churn-q-{self.run_id}-{i}")
        up = {0x26: [("consumer-group", "churners"), ("auto-ack", "true")]}
        client.subscribe(1, ("$queue/churn/#", 1), properties=up)
        if settle:
            client.publish_qos1(f"$queue/churn/k{i}", b"job", 2)
            client.ack(client.wait_for(lambda p: isinstance(p, c.Publish)))
        client.disconnect()

    def coap_peer(self, i: int) -> None:
        """One UDP peer: an observation cancelled by a RST, a Block1 upload done or refused (one
        abandoned is dropped after EXCHANGE_LIFETIME: ``tests/coap/test_bridge.py``)."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(10)

            # RFC 7252 §4.4: a random first message id. Fixed ids from a source port the kernel
            # reused within EXCHANGE_LIFETIME would be duplicates: answered again, not done again.
            base = random.randrange(1 << 16)

            def ask(msg: CoapMessage) -> CoapMessage:
                msg.mid = (base + msg.mid) & 0xFFFF
                sock.sendto(coap.serialize(msg), self.coap)
                return coap.parse(sock.recv(65535))

            path = [(coap.URI_PATH, p.encode()) for p in ("churn", "coap", str(i))]
            got = ask(CoapMessage(coap.CON, coap.GET, 1, b"ob", [(coap.OBSERVE, b""), *path]))
            assert got.code in (coap.CONTENT, coap.NOT_FOUND)
            cancel = ask(CoapMessage(coap.CON, coap.GET, 4, b"ob", [(coap.OBSERVE, b"\x01"), *path]))
            assert cancel.code in (coap.CONTENT, coap.NOT_FOUND)  # deregistered (RFC 7641 §3.6)

            def block(mid: int, num: int, more: bool) -> CoapMessage:
                up = [*path[:2], (coap.URI_PATH, b"up"), (coap.BLOCK1, coap.encode_block(num, more, 2))]
                return CoapMessage(coap.CON, coap.POST, mid, b"b%d" % mid, up, b"x" * 64 if more else b"y")

            assert ask(block(2, 0, True)).code == coap.CONTINUE
            if i % 20 == 0:
                assert ask(block(3, 1, False)).code == coap.CHANGED
            else:  # out of order: refused
                assert ask(block(3, 5, True)).code == coap.REQUEST_ENTITY_INCOMPLETE

    def run(self, first: int, count: int, settle_queue: bool) -> None:
        for i in range(first, first + count):
            self.mqtt(i)
            if i % 10 == 0:
                status = self.http(
                    self.node.http_port,
                    "POST",
                    "/publish",
                    json.dumps({"topic": f"churn/http/{i}", "payload": "p", "qos": 1}).encode(),
                )
                assert status == 200
                self.sse(i)
                self.queue(i, settle_queue)
                self.coap_peer(i)
            if i % 25 == 0:
                self.monitor(i)
                assert self.http(self.node.health_port, "GET", "/metrics") == 200


def node_settings(tmp_path: Path) -> dict[str, Any]:
    acl = tmp_path / "acl"
    acl.write_text(ACL)
    return {
        "server.coap.plain.addr": f"127.0.0.1:{free_port()}",
        "auth.acl_file": str(acl),
        "limits.publish_rate": 10000.0,
        "limits.max_subscriptions": 100,
        "server.http.plain.sse_heartbeat": "0s",  # a stream ends by its reader's close alone
        "broker.sys_interval": "1s",  # the $SYS topics are all retained before the first count
    }


def churned(churns: list[Churn], probe: Probe, settle_queue: bool) -> None:
    """Warm up, count, churn (the lifetimes spread over ``churns``), count again once settled."""
    share = len(churns)
    for n, churn in enumerate(churns):  # what the first clients create once (each worker, node)
        churn.run(n * WARM_UP, WARM_UP // share, settle_queue)
    before = settled(probe, {})
    for n, churn in enumerate(churns):
        churn.run((share + n) * LIFETIMES, LIFETIMES // share, settle_queue)
    after = settled(probe, before)
    more = grown(before, after, SLACK * probe.workers)
    assert not more, "held after the churn (before -> after):\n" + "\n".join(
        f"  {name}: {was} -> {now}" for name, (was, now) in more.items()
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_a_node_that_served_many_client_lifetimes_holds_none_of_their_state(
    tmp_path: Path, workers: int
) -> None:
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    factory = NodeFactory(tmp_path / "nodes")
    try:
        node = factory(
            {"server.workers": workers, **node_settings(tmp_path)},
            env={"PYTHONPATH": f"{PROBE}:{REPO_ROOT}", "STATE_PROBE_DIR": str(probe_dir)},
        )
        # Appends and settlements only on one worker: there a delivery across workers may take
        # longer than a wait here (the queue's owner is either worker), which this test is not about.
        churned([Churn(node)], Probe(probe_dir, workers), settle_queue=workers == 1)
    finally:
        factory.close()


def test_two_nodes_on_etcd_that_served_many_client_lifetimes_hold_none_of_their_state(
    tmp_path: Path, etcd_server, etcd_prefix: str
) -> None:
    """The cluster path: sessions owned through etcd, persistent ones taken over by the other node
    for their clean end, retained messages and wills across nodes."""
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    factory = NodeFactory(tmp_path / "nodes")
    try:
        nodes = [
            factory(
                {
                    **node_settings(tmp_path),
                    "cluster.enabled": True,
                    "cluster.node_id": name,
                    "cluster.transport.bind_addr": f"127.0.0.1:{free_port()}",
                    "cluster.etcd.endpoints": [etcd_server.endpoint],
                    "cluster.etcd.prefix": etcd_prefix,
                    "cluster.etcd.lease_ttl": "2s",
                },
                env={"PYTHONPATH": f"{PROBE}:{REPO_ROOT}", "STATE_PROBE_DIR": str(probe_dir)},
            )
            for name in ("a", "b")
        ]
        a, b = nodes
        churned([Churn(a, b), Churn(b, a)], Probe(probe_dir, 2), settle_queue=False)
    finally:
        factory.close()


def settled(probe: Probe, before: dict[str, int]) -> dict[str, Any]:
    """The node's counts once nothing more has gone for a second (what outlives a client by design,
    a moved session's stand-in, an expiring session, ends), or is back to ``before``; bounded."""
    deadline = time.monotonic() + SETTLE
    last = probe.state()
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = probe.state()
        if before and not grown(before, now, SLACK * probe.workers):
            return now
        if not before and now == last:
            return now
        last = now
    return last
