"""Bridge status: ``$SYS/broker/cluster/{status,nodes,sync}`` (retained), readiness and figures.

- ``status``: ``ok`` when every link is connected, ``down`` when none is, else ``degraded``;
- ``nodes``: one JSON object per peer (name, peer address, client id, state, since);
- ``sync``: per route, messages queued, forwarded each way and dropped by ``message_validity``.
"""

from __future__ import annotations

import json
import logging

import gevent

from fluxmq.broker.broker import Broker
from fluxmq.broker.message import Message

from .link import CONNECTED, BridgeLink

log = logging.getLogger("fluxmq.bridge.status")

TOPIC_ROOT = "$SYS/broker/cluster/"


def overall(links: list[BridgeLink]) -> str:
    """ok, degraded or down (``ok`` with no links at all)."""
    up = sum(1 for link in links if link.state == CONNECTED)
    if up == len(links):
        return "ok"
    return "down" if up == 0 else "degraded"


class BridgeStatus:
    """Publishes the cluster topics when a link changes state and every ``interval`` seconds."""

    def __init__(self, broker: Broker, links: list[BridgeLink], interval: float = 10.0) -> None:
        self.broker = broker
        self.links = links
        self.interval = interval if interval > 0 else 10.0
        self._greenlet = None
        self._pending = False
        self._last: dict[str, bytes] = {}
        # A cluster node publishes these topics itself, merging the bridges' values
        # (fluxmq.cluster.status): then it is called instead.
        self.delegate = None

    def summary(self) -> dict:
        """The admin API's view: overall status and one entry per link."""
        return {"status": overall(self.links), "bridges": [link.snapshot() for link in self.links]}

    def readiness(self) -> tuple[bool, str]:
        """For ``/ready``: a bridge never makes the node not ready, a down one makes it degraded."""
        down = [link.config.name for link in self.links if link.state != CONNECTED]
        if not down:
            return True, ""
        return (
            True,
            f"{len(self.links) - len(down)}/{len(self.links)} bridges connected; down: {', '.join(down)}",
        )

    def values(self) -> dict[str, bytes]:
        nodes = [
            {k: snap[k] for k in ("name", "peer", "client_id", "state", "since")}
            for snap in (link.snapshot() for link in self.links)
        ]
        sync = {
            link.config.name: {
                k: v
                for k, v in link.snapshot().items()
                if k in ("queued", "forwarded_out", "forwarded_in", "dropped_validity")
            }
            for link in self.links
        }
        return {
            "status": overall(self.links).encode(),
            "nodes": json.dumps(nodes, separators=(",", ":")).encode(),
            "sync": json.dumps(sync, separators=(",", ":")).encode(),
        }

    def publish(self) -> None:
        """Publish what changed since the last time (retained, QoS 0)."""
        self._pending = False
        if self.delegate is not None:
            self.delegate()
            return
        for suffix, payload in self.values().items():
            if self._last.get(suffix) == payload:
                continue
            self._last[suffix] = payload
            self.broker.publish(Message(TOPIC_ROOT + suffix, payload, 0, True))

    def changed(self, link: BridgeLink) -> None:
        """A link changed state: publish once this loop turn is done (several changes, one publish)."""
        if not self._pending:
            self._pending = True
            gevent.get_hub().loop.run_callback(self._publish_safely)

    def _publish_safely(self) -> None:
        try:
            self.publish()
        except Exception:
            log.exception("cluster_status_publish_failed")

    def start(self) -> None:
        self.publish()
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            gevent.sleep(self.interval)
            self._publish_safely()

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None
