"""$SYS/broker/cluster/{status,nodes,sync} of a cluster node (fluxmq/cluster/status.py): from the
node's peers, with the MQTT bridges of the same node merged in (one publisher of the three topics).

The cluster node is a small stand-in (its health and transport answers); the broker and the
bridge status are real."""

from __future__ import annotations

import json

from fluxmq.bridge.config import BridgeConfig, TopicRoute
from fluxmq.bridge.link import BridgeLink
from fluxmq.bridge.status import BridgeStatus
from fluxmq.broker.broker import Broker
from fluxmq.cluster.status import ClusterTopics


class _Health:
    def __init__(self, reachable: bool) -> None:
        self.reachable = reachable

    def check(self):
        return True, "" if self.reachable else "0/1 peers reachable"

    def status(self, sessions: int) -> dict:
        return {
            "members": [
                {
                    "node_id": "n1",
                    "addr": "127.0.0.1:1",
                    "self": True,
                    "live": True,
                    "reachable": True,
                    "leader": True,
                },
                {
                    "node_id": "n2",
                    "addr": "127.0.0.1:2",
                    "self": False,
                    "live": True,
                    "reachable": self.reachable,
                    "leader": False,
                },
            ]
        }


class _Transport:
    def peer_state(self) -> dict:
        return {
            "n2": {
                "addr": "127.0.0.1:2",
                "reachable": True,
                "queued": 3,
                "forwarded_batches": 2,
                "forwarded_messages": 7,
                "failures": 0,
                "dropped": 1,
                "in_flight": 0,
            }
        }


class _Node:
    def __init__(self, broker: Broker, reachable: bool = True) -> None:
        self.broker = broker
        self.health = _Health(reachable)
        self.transport = _Transport()


def _topics(broker: Broker) -> dict[str, bytes]:
    return {
        suffix: broker.retained.get(f"$SYS/broker/cluster/{suffix}").payload
        for suffix in ("status", "nodes", "sync")
    }


def test_status_nodes_and_sync_come_from_the_peers():
    broker = Broker()
    ClusterTopics(_Node(broker)).publish()
    got = _topics(broker)
    assert got["status"] == b"ok"
    assert json.loads(got["nodes"]) == [
        {"node_id": "n2", "addr": "127.0.0.1:2", "live": True, "reachable": True, "leader": False}
    ]
    assert json.loads(got["sync"]) == {
        "n2": {"queued": 3, "forwarded_batches": 2, "forwarded_messages": 7, "failures": 0, "dropped": 1}
    }
    ClusterTopics(_Node(broker, reachable=False)).publish()
    assert _topics(broker)["status"] == b"down"


def test_bridges_of_a_cluster_node_are_merged_into_the_same_topics():
    broker = Broker()
    link = BridgeLink(BridgeConfig("cloud", "127.0.0.1", 1, topics=(TopicRoute("a/#", "out", 1),)), broker)
    bridges = BridgeStatus(broker, [link])
    topics = ClusterTopics(_Node(broker))
    topics.bridges = bridges
    bridges.delegate = topics.publish  # as the node service wires it
    bridges.publish()  # a bridge link changed state
    got = _topics(broker)
    assert got["status"] == b"degraded"  # the peer is up, the bridge down
    assert [n.get("node_id", n.get("name")) for n in json.loads(got["nodes"])] == ["n2", "cloud"]
    assert set(json.loads(got["sync"])) == {"n2", "cloud"}
