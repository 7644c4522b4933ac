"""BrokerStats: plain counters the broker bumps on its hot path and exporters read."""

from __future__ import annotations

import time

from fluxmq._core.stats_core import LATENCY_BUCKETS, StatsCore

# One publish in LATENCY_SAMPLE_MASK + 1 is timed from ``Broker.publish`` until its deliveries are
# flushed (a power of two minus one: the check is one bit-and on a counter the broker keeps anyway).
LATENCY_SAMPLE_MASK = 63
# LATENCY_BUCKETS: the upper bounds (seconds) of the publish-to-delivery latency histogram, whose
# counts (``latency_counts``, a last bucket +Inf) and sum (``latency_sum``) StatsCore keeps and
# ``observe_delivery_latency`` adds to, in C.
__all__ = ["LATENCY_BUCKETS", "LATENCY_SAMPLE_MASK", "BrokerStats", "OutputBudget"]


class OutputBudget:
    """The node-wide memory that connections' pending output may take beyond their base allowance.

    Every connection may buffer ``broker.write_buffer_high`` bytes of output for its client before it
    counts as congested. A connection whose client keeps reading (its socket took bytes since the
    last grant) may grow that allowance, doubling it, while the budget has room; at most an eighth
    of the budget goes to one client, so one heavy reader cannot starve the others. The extra is
    given back when the output drains. Only threshold crossings touch it, never each message.
    """

    __slots__ = ("limit", "in_use", "peak", "grants", "refusals")

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit  # bytes; 0 = no growth: every connection keeps its base allowance
        self.in_use = 0  # bytes granted to connections beyond their base allowance
        self.peak = 0
        self.grants = 0  # allowance grows granted
        self.refusals = 0  # grows refused because the budget (or the client's share) was full

    def grow(self, allowance: int, base: int) -> int:
        """The new allowance of a connection at ``allowance`` (its base ``base``), or ``allowance``
        when the budget has no room."""
        cap = max(base, self.limit >> 3)
        extra = min(allowance, cap - allowance)
        if extra <= 0 or self.in_use + extra > self.limit:
            self.refusals += 1
            return allowance
        self.in_use += extra
        if self.in_use > self.peak:
            self.peak = self.in_use
        self.grants += 1
        return allowance + extra

    def release(self, extra: int) -> None:
        self.in_use -= extra


class BrokerStats(StatsCore):
    """The broker's counters; exporters ($SYS topics, Prometheus, the admin API) read them, nothing
    here does I/O.

    The per-message ones are C integers of ``StatsCore`` (``fluxmq/_core/stats_core.pyx``), added to
    by the relay and the connection's C read and flush without an ``int`` object per add:
    ``messages_received``, ``messages_sent``, ``bytes_received``, ``bytes_sent`` (``int``
    attributes) and the ``*_qos`` counts (``QosCounts``: indexed by QoS 0, 1, 2 like a list of
    three), application messages and their payload bytes received by the broker and delivered to
    subscribers. The rest are plain attributes.
    """

    __slots__ = (
        "started",
        "connections_total",
        "drops",
        "output_budget",
    )

    def __init__(self) -> None:
        self.started = time.time()
        self.connections_total = 0
        self.drops: dict[str, int] = {}
        self.output_budget = OutputBudget()  # the limit is set from broker.output_memory_limit

    def dropped(self, reason: str, n: int = 1) -> None:
        """Count messages dropped for ``reason`` (offline_qos0, queue_full, expired, ...)."""
        self.drops[reason] = self.drops.get(reason, 0) + n

    @property
    def publish_received(self) -> int:
        """Application messages published to the broker."""
        return sum(self.received_qos)

    @property
    def publish_sent(self) -> int:
        """Application messages delivered to clients."""
        return sum(self.sent_qos)

    @property
    def dropped_total(self) -> int:
        return sum(self.drops.values())

    def uptime(self) -> int:
        return int(time.time() - self.started)
