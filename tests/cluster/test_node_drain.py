"""ClusterNode.drain (a SIGTERM's graceful stop): after handing its sessions out, the node stays up
while stand-ins of the sessions it exported still forward to a reachable node, within the drain's
time (docs/reliability.rst)."""

from __future__ import annotations

import gevent
from gevent.event import Event

from fluxmq.broker.message import Message
from fluxmq.cluster.handover import MOVED_KIND
from fluxmq.cluster.node import ClusterNode
from tests.cluster.test_handover import Cluster, connect


class Transport:
    def __init__(self, reachable: list[str]) -> None:
        self._reachable = reachable

    def reachable(self) -> list[str]:
        return list(self._reachable)


class Broker:
    """No session left to hand out; stand-ins forwarding to ``to_nodes`` for ``turns`` looks."""

    def __init__(self, to_nodes: set[str], turns: int) -> None:
        self.sessions: dict = {}
        self.to_nodes = to_nodes
        self.turns = turns
        self.looks = 0

    def moved_forwarding(self) -> set[str]:
        self.looks += 1
        return self.to_nodes if self.looks <= self.turns else set()


def draining_node(broker: Broker, reachable: list[str]) -> ClusterNode:
    node = ClusterNode.__new__(ClusterNode)  # only what drain reads
    node.broker = broker
    node.transport = Transport(reachable)
    node.plane = object()
    node.draining = False
    node._stopping_peers = set()
    return node


def test_a_stopping_node_waits_for_its_stand_ins_before_it_stops() -> None:
    broker = Broker({"b"}, turns=3)
    assert draining_node(broker, ["b"]).drain(30.0) == 0
    assert broker.looks == 4  # looked until the stand-ins had ended (not cut short by the deadline)


def test_stand_ins_forwarding_only_to_unreachable_nodes_are_not_waited_for() -> None:
    broker = Broker({"gone"}, turns=1000)
    assert draining_node(broker, ["b"]).drain(30.0) == 0
    assert broker.looks == 1


def test_moved_forwarding_names_the_taking_node_until_the_stand_in_ended_and_sent_all() -> None:
    """What drain waits for (``Broker.moved_forwarding``): a stand-in in the router, then, once ended,
    until the last message it holds has been sent."""
    cluster = Cluster()
    a, b = cluster.node("A", forwarding=True), cluster.node("B", forwarding=True)
    s, _, _ = connect(a, "c1")
    a.subscribe(s, "t/#", 1)
    assert a.moved_forwarding() == set()
    _new, d, _ = connect(b, "c1")
    assert a.moved_forwarding() == {"B"}
    sent = Event()
    deliver = cluster.network.handlers["B"][MOVED_KIND]

    def slow_deliver(from_node: str, payload: bytes) -> bytes:
        sent.wait(5)
        return deliver(from_node, payload)

    cluster.network.handlers["B"][MOVED_KIND] = slow_deliver
    a.publish(Message("t/1", b"late", 1))  # reached the old node after the move: the stand-in's
    gevent.sleep(0)  # its send in progress
    a._end_moved("c1")  # (its markers in, or its grace over)
    assert "c1" not in a._moved
    assert a.moved_forwarding() == {"B"}  # out of the router, its message still on its way
    sent.set()
    gevent.sleep(0.01)
    assert a.moved_forwarding() == set()
    assert [m[0] for m in d.sent] == ["t/1"]
