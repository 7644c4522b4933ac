"""Abuse limits: token buckets, a per-IP connection rate gate, topic caps, and log-once gates.

Nothing here blocks or sleeps: a bucket answers "take now or not", and the caller refuses or
closes. Clocks are ``time.monotonic``; tests pass ``now`` explicitly.
"""

from __future__ import annotations

import time
from collections import OrderedDict

# MQTT 5.0 reason codes of a limit
MESSAGE_RATE_TOO_HIGH = 0x96
QUOTA_EXCEEDED = 0x97
CONNECTION_RATE_EXCEEDED = 0x9F


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float | None = None) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = time.monotonic() if now is None else now

    def take(self, n: float = 1.0, now: float | None = None) -> bool:
        """Take ``n`` tokens if there are that many; False (nothing taken) otherwise."""
        if now is None:
            now = time.monotonic()
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self.stamp = now
        if tokens >= n:
            self.tokens = tokens - n
            return True
        self.tokens = tokens
        return False

    def spend(self, n: float, now: float | None = None) -> bool:
        """Like ``take`` for a cost that may exceed the burst: allowed when the bucket holds
        ``min(n, burst)``, and then all ``n`` is taken (the bucket may go into debt)."""
        if not self.take(min(n, self.burst), now):
            return False
        if n > self.burst:
            self.tokens -= n - self.burst
        return True

    def full_at(self) -> float:
        """When the bucket will be full again (its state is then the same as a new bucket's)."""
        return self.stamp + (self.burst - self.tokens) / self.rate if self.rate > 0 else float("inf")


class ConnectRateLimiter:
    """Connections per second per source address (``limits.connect_rate`` / ``connect_burst``).

    At most ``max_addresses`` buckets are kept (least recently used dropped first); a dropped
    address starts again with a full bucket, which only ever errs toward letting a client in.
    """

    def __init__(self, rate: float, burst: int, max_addresses: int = 65536) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.max_addresses = max_addresses
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self.refused = 0

    def allow(self, address: str, now: float | None = None) -> bool:
        """True when a connection from ``address`` is within its rate (and counts it)."""
        if now is None:
            now = time.monotonic()
        buckets = self._buckets
        bucket = buckets.get(address)
        if bucket is None:
            bucket = buckets[address] = TokenBucket(self.rate, self.burst, now)
            if len(buckets) > self.max_addresses:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(address)
        if bucket.take(1.0, now):
            return True
        self.refused += 1
        return False

    def __len__(self) -> int:
        return len(self._buckets)


class PublishLimits:
    """Per-client caps shared by every connection (plain settings; 0 means no limit)."""

    __slots__ = (
        "publish_rate",
        "publish_burst",
        "publish_bytes_rate",
        "publish_bytes_burst",
        "max_subscriptions",
        "max_topic_levels",
        "max_topic_length",
    )

    def __init__(
        self,
        publish_rate: float = 0.0,
        publish_burst: int = 0,
        publish_bytes_rate: int = 0,
        publish_bytes_burst: int = 0,
        max_subscriptions: int = 0,
        max_topic_levels: int = 0,
        max_topic_length: int = 0,
    ) -> None:
        self.publish_rate = publish_rate
        self.publish_burst = publish_burst or max(1, int(publish_rate))
        self.publish_bytes_rate = publish_bytes_rate
        self.publish_bytes_burst = publish_bytes_burst or publish_bytes_rate
        self.max_subscriptions = max_subscriptions
        self.max_topic_levels = max_topic_levels
        self.max_topic_length = max_topic_length

    @property
    def any_publish_check(self) -> bool:
        """True when some per-PUBLISH check (rate, bytes, topic caps) is configured."""
        return bool(
            self.publish_rate or self.publish_bytes_rate or self.max_topic_levels or self.max_topic_length
        )

    @property
    def active(self) -> bool:
        return self.any_publish_check or bool(self.max_subscriptions)

    def topic_problem(self, topic: str) -> str | None:
        """Why ``topic`` (a name or a filter) is over the caps, or None."""
        if self.max_topic_length and len(topic.encode("utf-8")) > self.max_topic_length:
            return f"topic longer than {self.max_topic_length} bytes"
        if self.max_topic_levels and topic.count("/") + 1 > self.max_topic_levels:
            return f"topic with more than {self.max_topic_levels} levels"
        return None


class LogGate:
    """Lets one log line per key through per ``interval`` seconds (bounded: oldest keys forgotten)."""

    def __init__(self, interval: float = 60.0, max_keys: int = 10000) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._last: OrderedDict[object, float] = OrderedDict()
        self._held: dict[object, int] = {}  # key -> lines held back since its last one let through
        self.suppressed = 0

    def allow(self, key: object, now: float | None = None) -> bool:
        if now is None:
            now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self.suppressed += 1
            return False
        self._last[key] = now
        self._last.move_to_end(key)
        if len(self._last) > self.max_keys:
            self._held.pop(self._last.popitem(last=False)[0], None)
        return True

    def let_through(self, key: object, now: float | None = None) -> int | None:
        """``allow`` that counts: None when the line is held back, else how many lines of ``key``
        were held back since its last one let through (0 the first time)."""
        if not self.allow(key, now):
            self._held[key] = self._held.get(key, 0) + 1
            return None
        return self._held.pop(key, 0)
