"""A persistent session that moves between the workers of a node, while messages are published
continuously, loses none of its QoS 1 messages (docs/cluster.rst, "Session takeover": the move's
window; docs/reliability.rst).

The window: the old owner exports the session (its subscriptions leave its router and its interest
is withdrawn from the peers) before the new owner has imported it and its interest has reached the
peers. A message published meanwhile on either worker, or forwarded to the old owner before it knew,
found no subscriber anywhere. The test reconnects one persistent QoS 1 subscriber over and over (the
kernel spreads the connections over the two workers, so its session moves about every other time)
while a publisher sends numbered QoS 1 messages one after the other; every number must arrive
(duplicates are allowed at QoS 1, gaps are not).
"""

from __future__ import annotations

import queue
import re
import threading
import time
import uuid

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.conftest import NodeFactory
from tests.e2e.mqtt5raw import Paho5, paho5, unique
from tests.e2e.test_cluster_etcd import Cluster, nominal, wait_for
from tests.e2e.test_workers import start

pytestmark = pytest.mark.e2e

ROUNDS = 30  # reconnects of the subscriber (about half of them move its session)
HOLD = 0.15  # seconds each connection of the subscriber stays
MAX_MESSAGES = 20000  # the publisher's bound
DRAIN = 15.0  # seconds the last connection waits for the missing numbers


def _session_props() -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 300
    return props


class Counter:
    """A publisher thread sending ``0, 1, 2, ...`` at QoS 1, each acknowledged before the next."""

    def __init__(self, node, topic: str) -> None:
        self.client = paho5(node, unique("pub"))
        self.topic = topic
        self.sent = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set() and self.sent < MAX_MESSAGES:
                self.client.publish(self.topic, str(self.sent).encode(), 1)
                self.sent += 1
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self) -> int:
        self.stop.set()
        self.thread.join(30)
        self.client.disconnect()
        assert self.error is None, self.error
        return self.sent


def _collect(client: Paho5, got: set[int], topic: str, seconds: float) -> None:
    """Add the numbers ``client`` received within ``seconds`` (0: those it holds now) to ``got``."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        try:
            msg = client.messages.get(timeout=left) if left > 0 else client.messages.get_nowait()
        except queue.Empty:
            return
        if msg.topic == topic:
            got.add(int(msg.payload))


def run_moves(subscriber_node, publisher_node, moves_in) -> tuple[int, int, list[int]]:
    """A persistent QoS 1 subscriber reconnecting ``ROUNDS`` times (to ``subscriber_node(round)``)
    while a publisher on ``publisher_node`` counts; returns (sent, moves, missing numbers), the
    moves counted in the log texts ``moves_in()`` returns."""
    cid = unique("mover")
    topic = unique("move/count")
    props = _session_props()
    sub = paho5(subscriber_node(-1), cid, props, clean_start=True)
    assert sub.subscribe(topic, 1)[0].value == 1
    got: set[int] = set()
    publisher = Counter(publisher_node, topic)
    try:
        for round_ in range(ROUNDS):
            _collect(sub, got, topic, HOLD)
            sub.disconnect()
            _collect(sub, got, topic, 0)  # what arrived before the DISCONNECT went
            sub = Paho5(subscriber_node(round_), cid, False, 60)
            rc, present, _ = sub.connect(props)
            assert not rc.is_failure and present, f"round {round_}: {rc}, present={present}"
    finally:
        sent = publisher.finish()
    deadline = time.monotonic() + DRAIN
    while len(got) < sent and time.monotonic() < deadline:
        _collect(sub, got, topic, 0.5)
    sub.disconnect()
    moves = sum(len(re.findall(rf"session_imported.*{re.escape(cid)}", text)) for text in moves_in())
    return sent, moves, sorted(set(range(sent)) - got)


def test_a_session_moving_between_workers_loses_no_qos1_message(tmp_path) -> None:
    """Two workers of one node: the kernel places each connection, so about every other reconnect
    moves the session; the publisher is on either worker (the old owner or the new one)."""
    factory = NodeFactory(tmp_path)
    try:
        node = start(factory)
        sent, moves, missing = run_moves(lambda _round: node, node, lambda: [node.log_text()])
        assert moves >= 2, f"the session moved {moves} times in {ROUNDS} reconnects"
        assert not missing, f"{len(missing)} of {sent} lost over {moves} moves: {missing[:20]}"
    finally:
        factory.close()


def test_a_session_moving_between_nodes_loses_no_qos1_message(etcd_server, tmp_path) -> None:
    """Three nodes on etcd: the subscriber alternates between e1 and e2 (every reconnect moves its
    session), the publisher is on e3 (a third party: its messages reach the moving session through
    the interest e3 holds of e1 and e2)."""
    factory = NodeFactory(tmp_path / "nodes")
    (tmp_path / "nodes").mkdir()
    cl = Cluster(factory, tmp_path, etcd_server.endpoint, f"/t-{uuid.uuid4().hex[:8]}/", ["e1", "e2", "e3"])
    try:
        for name in cl.configs:
            cl.start(name)
        for node in cl.nodes.values():
            assert wait_for(lambda node=node: nominal(node, 2)), node.http_get("/cluster/status")
        e1, e2, e3 = cl.nodes["e1"], cl.nodes["e2"], cl.nodes["e3"]
        sent, moves, missing = run_moves(
            lambda round_: e1 if round_ % 2 else e2, e3, lambda: [e1.log_text(), e2.log_text()]
        )
        assert moves >= ROUNDS, f"the session moved {moves} times in {ROUNDS} reconnects"
        assert not missing, f"{len(missing)} of {sent} lost over {moves} moves: {missing[:20]}"
    finally:
        factory.close()
