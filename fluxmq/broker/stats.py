"""BrokerStats: plain counters the broker bumps on its hot path and exporters read."""

from __future__ import annotations

import time


class BrokerStats:
    """Counters kept as plain attributes (an attribute add is the cheapest thing Python does).

    Exporters ($SYS topics, Prometheus, the admin API) read them; nothing here does I/O.
    """

    __slots__ = ("started", "messages_received", "messages_sent", "bytes_received", "bytes_sent",
                 "publish_received", "publish_sent", "connections_total", "drops")

    def __init__(self) -> None:
        self.started = time.time()
        self.messages_received = 0  # every MQTT packet received
        self.messages_sent = 0  # every MQTT packet sent
        self.bytes_received = 0
        self.bytes_sent = 0
        self.publish_received = 0  # application messages published to the broker
        self.publish_sent = 0  # application messages delivered to clients
        self.connections_total = 0
        self.drops: dict[str, int] = {}

    def dropped(self, reason: str, n: int = 1) -> None:
        """Count messages dropped for ``reason`` (offline_qos0, queue_full, expired, ...)."""
        self.drops[reason] = self.drops.get(reason, 0) + n

    @property
    def dropped_total(self) -> int:
        return sum(self.drops.values())

    def uptime(self) -> int:
        return int(time.time() - self.started)
