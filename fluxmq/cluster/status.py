"""``$SYS/broker/cluster/{status,nodes,sync}`` (reference 001) from the cluster's real state.

- ``status``: ``ok`` when every peer is reachable (and etcd ready), ``degraded`` when some are not,
  ``down`` when this node is not ready (etcd or its lease lost) or no peer answers;
- ``nodes``: one JSON object per peer: node_id, addr, live (in etcd), reachable (its stream answers),
  leader;
- ``sync``: per peer, what the forwarder did: queued, forwarded batches and messages, failures,
  drops.

Retained, QoS 0, published when a value changes (checked every ``interval`` seconds and at every
membership change); never forwarded to other nodes (each node has its own ``$SYS`` tree). When the
node also runs MQTT bridges (``cluster.routes``), their entries are merged into the same three
topics (the bridges' own publisher hands its values here instead of publishing them).
"""

from __future__ import annotations

import json
import logging

import gevent

from fluxmq.broker.message import Message

log = logging.getLogger("fluxmq.cluster.status")

TOPIC_ROOT = "$SYS/broker/cluster/"
SYNC_FIELDS = ("queued", "forwarded_batches", "forwarded_messages", "failures", "dropped")


class ClusterTopics:
    def __init__(self, node, interval: float = 2.0) -> None:
        self.node = node
        self.interval = interval
        self.bridges = None  # fluxmq.bridge.status.BridgeStatus whose values are merged here
        self._last: dict[str, bytes] = {}
        self._greenlet = None

    def values(self) -> dict[str, bytes]:
        node = self.node
        up, _details = node.health.check()
        members = node.health.status(0).get("members", [])
        states = node.transport.peer_state()
        peers = [
            {
                "node_id": m["node_id"],
                "addr": m["addr"],
                "live": m["live"],
                "reachable": m["reachable"],
                "leader": m["leader"],
            }
            for m in members
            if not m["self"]
        ]
        reachable = sum(1 for p in peers if p["reachable"])
        status = "ok" if reachable == len(peers) else "degraded" if reachable else "down"
        if not up:
            status = "down"
        sync = {
            peer: {k: v for k, v in state.items() if k in SYNC_FIELDS}
            for peer, state in sorted(states.items())
        }
        if self.bridges is not None:
            bridge = self.bridges.values()
            extra = bridge["status"].decode()
            if extra != "ok" and status == "ok":
                status = "degraded"
            peers.extend(json.loads(bridge["nodes"]))
            sync.update(json.loads(bridge["sync"]))
        return {
            "status": status.encode(),
            "nodes": json.dumps(peers, separators=(",", ":")).encode(),
            "sync": json.dumps(sync, separators=(",", ":")).encode(),
        }

    def publish(self) -> None:
        for suffix, payload in self.values().items():
            if self._last.get(suffix) == payload:
                continue
            self._last[suffix] = payload
            self.node.broker.publish(Message(TOPIC_ROOT + suffix, payload, 0, True))

    def changed(self, *_args) -> None:
        gevent.spawn(self._publish_safely)

    def _publish_safely(self) -> None:
        try:
            self.publish()
        except Exception:
            log.exception("cluster_status_publish_failed")

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            self._publish_safely()
            gevent.sleep(self.interval)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None
