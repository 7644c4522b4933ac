"""Acknowledged, then published on the other worker: delivered (``server.workers: 2``).

A subscriber holding its acknowledgement (an MQTT SUBACK, a durable queue membership's SUBACK, a
CoAP Observe's 2.05, an SSE stream's first line) gets what is published afterwards on either
worker. Each round has a fresh subscriber: it joins on one worker, then a publisher on the other
publishes at once, and the delivery is waited for (bounded). Real ``fluxmq-node``, clients placed
on a chosen worker (``tests.e2e.test_workers.on_worker``).

The second part holds the interest in ``held/...`` on its way (``tests/e2e/hold_interest``: the
receiving worker applies it HOLD s late, as a loaded one may): a subscription made meanwhile to the
same filter on the same worker (MQTT, SSE, CoAP) is acknowledged only once the other worker has it.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from pathlib import Path

import pytest

from fluxmq.coap import codec as coap
from fluxmq.coap.codec import CoapMessage
from tests.conftest import REPO_ROOT, NodeFactory, free_port
from tests.e2e.mqtt5raw import unique
from tests.e2e.test_http_bridge import SSEReader
from tests.e2e.test_workers import on_worker, start
from tests.e2e.test_workers_queues import consumer_on, other, queue_on

pytestmark = pytest.mark.e2e

WAIT = 10.0
ROUNDS = 20  # fresh subscribers per test (~1 s each on an idle machine)


def two_workers(tmp_path_factory, name: str, env: dict | None = None):
    """A node of two workers with CoAP (on worker 0 only), the workers' links up."""
    factory = NodeFactory(tmp_path_factory.mktemp(name))
    try:
        yield start(factory, {"server.coap.plain.addr": f"127.0.0.1:{free_port()}"}, env)
    finally:
        factory.close()


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    yield from two_workers(tmp_path_factory, "jp")


@pytest.fixture(scope="module")
def publishers(node):
    """A connected publisher on each worker."""
    pubs = {w: on_worker(node, w, "jpub") for w in ("w0", "w1")}
    yield pubs
    for p in pubs.values():
        p.disconnect()


@pytest.mark.parametrize("worker", ["w0", "w1"])
def test_mqtt_subscriber_gets_a_publish_made_after_its_suback_on_the_other_worker(
    node, publishers, worker
) -> None:
    """The publisher's worker has routed the topic before (to nobody): what it cached of that route
    does not outlive the new interest."""
    for _ in range(ROUNDS):
        topic = unique("jp/mqtt")
        with on_worker(node, worker, "jsub") as sub:
            publishers[other(worker)].publish(topic, b"before", 1)
            assert sub.subscribe(topic, 1)[0].value == 1
            publishers[other(worker)].publish(topic, b"after", 1)
            assert sub.get(WAIT).payload == b"after"


@pytest.mark.parametrize("appender", ["other", "member"])
@pytest.mark.parametrize("owner,member", [("w0", "w1"), ("w1", "w0"), ("w0", "w0"), ("w1", "w1")])
def test_queue_member_gets_an_append_made_after_its_suback(node, publishers, owner, member, appender) -> None:
    """A fresh member of one group each round (the last one left); the append on the other worker,
    or by the member itself (through its worker: forwarded to the owner when that is the other)."""
    name = queue_on(owner, "jq")
    for i in range(ROUNDS):
        c = consumer_on(node, member, f"$queue/{name}/#", "g", auto_ack=True)
        try:
            by = publishers[other(member)] if appender == "other" else c
            by.publish(f"$queue/{name}/k", f"r{i}".encode(), 1)
            # (an earlier record may come first: paho's PUBACK of it can follow its DISCONNECT)
            deadline = time.monotonic() + WAIT
            while c.get(max(0.01, deadline - time.monotonic())).payload != f"r{i}".encode():
                pass
        finally:
            c.disconnect()


def coap_addr(node) -> tuple[str, int]:
    return ("127.0.0.1", int(node.config["server"]["coap"]["plain"]["addr"].rpartition(":")[2]))


def test_coap_observer_gets_a_publish_made_after_its_2_05_on_the_other_worker(node, publishers) -> None:
    """CoAP runs on worker 0: the publish is made on worker 1."""
    addr = coap_addr(node)
    for i in range(ROUNDS):
        topic = unique("jp/coap")
        path = [(coap.URI_PATH, p.encode()) for p in topic.split("/")]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(WAIT)
            # RFC 7252 §4.4: a random first MID. A fixed one from a source port used before (the
            # kernel reuses them) is a duplicate of that exchange (§4.5): answered again, not done again.
            mid = random.randrange(1 << 16)
            observe = CoapMessage(coap.CON, coap.GET, mid, b"ob", [(coap.OBSERVE, b""), *path])
            sock.sendto(coap.serialize(observe), addr)
            got = coap.parse(sock.recv(65535))
            assert got.code in (coap.CONTENT, coap.NOT_FOUND), got
            publishers["w1"].publish(topic, f"n{i}".encode(), 1)
            note = coap.parse(sock.recv(65535))
            assert note.payload == f"n{i}".encode()
            sock.sendto(coap.empty(coap.RST, note.mid), addr)  # ends it


def test_sse_stream_gets_publishes_made_after_it_opened_on_either_worker(node, publishers) -> None:
    """The stream's worker is gunicorn's choice: a publish on each worker reaches it."""
    for _ in range(ROUNDS):
        topic = unique("jp/sse")
        stream = SSEReader(node, topic, timeout=WAIT)
        try:
            publishers["w0"].publish(topic, b"from-w0", 1)
            publishers["w1"].publish(topic, b"from-w1", 1)
            got = sorted(stream.event()[1]["payload"] for _ in range(2))
            assert got == ["from-w0", "from-w1"]
        finally:
            stream.close()


# -- a filter whose interest is on its way to the other worker -------------------------------------
# A worker that applies the interest in ``held/...`` HOLD seconds late (``tests/e2e/hold_interest``):
# the first subscription to such a filter waits that long for its acknowledgement; one more made
# meanwhile on the same worker (by any path) is acknowledged only once the other worker has it too.

HOLD = 1.0  # below the default interest_sync_timeout (2 s): the first subscription's wait ends in time
HOOK = Path(__file__).resolve().parent / "hold_interest"


@pytest.fixture(scope="module")
def held_node(tmp_path_factory):
    hold = {"PYTHONPATH": f"{HOOK}:{REPO_ROOT}", "HOLD_INTEREST": f"held/ {HOLD}"}
    yield from two_workers(tmp_path_factory, "jph", hold)


class FirstSubscribers:
    """A client on each of ``workers``; ``subscribe`` makes them subscribe to a held filter (the
    other worker applies it HOLD s late), each SUBACK waited for in a thread."""

    def __init__(self, node, workers: tuple[str, ...]) -> None:
        self.clients = [on_worker(node, w, "first") for w in workers]
        self.acked: list = []
        self.threads: list[threading.Thread] = []

    def subscribe(self, topic: str) -> None:
        """Returns once the SUBSCRIBEs have reached their workers (their SUBACKs wait out the hold)."""
        self.threads = [
            threading.Thread(target=self._subscribe, args=(c, topic), daemon=True) for c in self.clients
        ]
        for t in self.threads:
            t.start()
        time.sleep(HOLD / 4)

    def _subscribe(self, client, topic: str) -> None:
        self.acked.append(client.subscribe(topic, 1)[0].value)

    def close(self) -> None:
        for t in self.threads:
            t.join(WAIT)
        for c in self.clients:
            c.disconnect()
        assert self.acked == [1] * len(self.threads)


def test_a_second_subscriber_while_the_filter_is_on_its_way_gets_what_the_other_worker_publishes(
    held_node,
) -> None:
    topic = unique("held/mqtt")
    firsts = FirstSubscribers(held_node, ("w0",))
    try:
        with on_worker(held_node, "w0", "second") as second, on_worker(held_node, "w1", "pub") as pub:
            firsts.subscribe(topic)
            assert second.subscribe(topic, 1)[0].value == 1
            pub.publish(topic, b"after", 1)
            assert second.get(WAIT).payload == b"after"
    finally:
        firsts.close()


def test_an_sse_stream_opened_while_its_filter_is_on_its_way_gets_what_either_worker_publishes(
    held_node,
) -> None:
    """Its worker is gunicorn's choice: the filter is on its way from both."""
    topic = unique("held/sse")
    firsts = FirstSubscribers(held_node, ("w0", "w1"))
    pubs = [on_worker(held_node, w, "pub") for w in ("w0", "w1")]
    try:
        firsts.subscribe(topic)
        stream = SSEReader(held_node, topic, timeout=WAIT)
        try:
            for w, pub in zip(("w0", "w1"), pubs, strict=True):
                pub.publish(topic, f"from-{w}".encode(), 1)
            assert sorted(stream.event()[1]["payload"] for _ in range(2)) == ["from-w0", "from-w1"]
        finally:
            stream.close()
    finally:
        for pub in pubs:
            pub.disconnect()
        firsts.close()


def test_a_coap_observation_made_while_its_filter_is_on_its_way_gets_what_the_other_worker_publishes(
    held_node,
) -> None:
    """CoAP runs on worker 0: the first subscriber is there, the publish on worker 1."""
    topic = unique("held/coap")
    path = [(coap.URI_PATH, p.encode()) for p in topic.split("/")]
    observe = CoapMessage(coap.CON, coap.GET, random.randrange(1 << 16), b"ob", [(coap.OBSERVE, b""), *path])
    firsts = FirstSubscribers(held_node, ("w0",))
    try:
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
            on_worker(held_node, "w1", "pub") as pub,
        ):
            sock.settimeout(WAIT)
            firsts.subscribe(topic)
            sock.sendto(coap.serialize(observe), coap_addr(held_node))
            assert coap.parse(sock.recv(65535)).code in (coap.CONTENT, coap.NOT_FOUND)
            pub.publish(topic, b"after", 1)
            assert coap.parse(sock.recv(65535)).payload == b"after"
    finally:
        firsts.close()


def test_a_coap_observation_waiting_for_its_filter_does_not_stall_other_coap_peers(held_node) -> None:
    """The first observation of a held filter waits HOLD s for the other worker's acknowledgement;
    meanwhile another peer's request is answered (the wait runs in the bridge's pool, not in the
    one reader greenlet every CoAP datagram goes through): its answer comes first."""
    topic = unique("held/coap-stall")
    path = [(coap.URI_PATH, p.encode()) for p in topic.split("/")]
    observe = CoapMessage(coap.CON, coap.GET, random.randrange(1 << 16), b"os", [(coap.OBSERVE, b""), *path])
    other_path = [(coap.URI_PATH, p.encode()) for p in unique("jp/coap-other").split("/")]
    publish = CoapMessage(coap.CON, coap.POST, random.randrange(1 << 16), b"pp", other_path, b"x")
    addr = coap_addr(held_node)
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as observer,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other,
    ):
        observer.settimeout(WAIT)
        other.settimeout(WAIT)
        observer.sendto(coap.serialize(observe), addr)
        other.sendto(coap.serialize(publish), addr)
        assert coap.parse(other.recv(65535)).code == coap.CHANGED
        observer.setblocking(False)
        with pytest.raises(BlockingIOError):  # still waiting for the other worker (HOLD s)
            observer.recv(65535)
        observer.settimeout(WAIT)
        answer = coap.parse(observer.recv(65535))
        assert answer.code == coap.CONTENT and answer.option(coap.OBSERVE) is not None
