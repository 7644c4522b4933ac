"""MQTT bridges to peer brokers (``bridges``) and reference 001 cluster routes (``cluster.routes``).

``config`` holds the route model, ``link`` the MQTT client side of one bridge (its local side is a
broker session whose persistent queue is the outbound store), ``status`` the ``$SYS/broker/cluster``
topics. ``Bridges`` starts and stops them for the node; it calls the broker's public API only.
"""

from __future__ import annotations

from fluxmq.broker.broker import Broker

from .config import BridgeConfig, bridges_from_config
from .link import BridgeLink
from .status import BridgeStatus

__all__ = ["BridgeConfig", "BridgeLink", "BridgeStatus", "Bridges", "bridges_from_config"]


class Bridges:
    """Every configured bridge of a node, with their status publisher."""

    def __init__(
        self,
        configs: list[BridgeConfig],
        broker: Broker,
        flusher=None,
        node_id: str = "",
        status_interval: float = 10.0,
        max_packet_size: int = 2 << 20,
    ) -> None:
        self.links: list[BridgeLink] = []
        self.status = BridgeStatus(broker, self.links, status_interval)
        for cfg in configs:
            self.links.append(
                BridgeLink(
                    cfg,
                    broker,
                    flusher,
                    node_id,
                    on_change=self.status.changed,
                    max_packet_size=max_packet_size,
                )
            )

    def start(self) -> None:
        for link in self.links:
            link.start()
        self.status.start()

    def stop(self) -> None:
        self.status.stop()
        for link in self.links:
            link.stop()

    def __len__(self) -> int:
        return len(self.links)
