"""A queue's settings: one item of the ``queues:`` config list, or the defaults of an auto-created queue."""

from __future__ import annotations

from dataclasses import dataclass, field

CLASSIC = "classic"
STREAM = "stream"


@dataclass
class RetentionConfig:
    max_age: float = 0.0  # seconds; 0 = no limit
    max_length_messages: int = 0
    max_length_bytes: int = 0
    compact: bool = False


@dataclass
class LimitsConfig:
    max_message_size: int = 0  # bytes; 0 = broker.max_message_size only
    max_depth: int = 0  # stored records; 0 = no limit
    message_ttl: float = 0.0  # seconds; 0 = records never expire at delivery


@dataclass
class RetryConfig:
    max_retries: int = 10  # deliveries before the message goes to the DLQ
    initial_backoff: float = 1.0
    max_backoff: float = 60.0
    multiplier: float = 2.0

    def backoff(self, deliveries: int) -> float:
        """Delay before redelivering a message nacked after ``deliveries`` deliveries."""
        return min(self.max_backoff, self.initial_backoff * self.multiplier ** max(0, deliveries - 1))


@dataclass
class DLQConfig:
    enabled: bool = True
    topic: str = ""  # "" = $queue/{name}.dlq


@dataclass
class ReplicationConfig:
    """``replication``: Raft replication of the queue's log (fluxmq.replication)."""

    enabled: bool = False
    group: str = "default"
    mode: str = "sync"  # sync | async
    replication_factor: int = 3
    min_in_sync_replicas: int = 2
    ack_timeout: float = 5.0


@dataclass
class QueueConfig:
    name: str
    topics: list[str] = field(default_factory=list)
    type: str = CLASSIC
    partitions: int = 1
    max_inflight: int = 100
    visibility_timeout: float = 30.0
    auto_commit_interval: float = 5.0
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    dlq: DLQConfig = field(default_factory=DLQConfig)
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)

    @property
    def dlq_queue(self) -> str:
        """Name of the dead-letter queue (``dlq.topic`` without ``$queue/``)."""
        topic = self.dlq.topic or f"$queue/{self.name}.dlq"
        return topic[len("$queue/") :].split("/", 1)[0] if topic.startswith("$queue/") else topic

    @classmethod
    def from_dict(cls, item: dict) -> QueueConfig:
        """From one parsed ``queues:`` item (fluxmq.config.schema QUEUE_ITEM: every field present)."""
        return cls(
            name=item["name"],
            topics=list(item.get("topics", ())),
            type=item["type"],
            partitions=item["partitions"],
            max_inflight=item["max_inflight"],
            visibility_timeout=item["visibility_timeout"],
            auto_commit_interval=item["auto_commit_interval"],
            retention=RetentionConfig(**item["retention"]),
            limits=LimitsConfig(**item["limits"]),
            retry=RetryConfig(**item["retry"]),
            dlq=DLQConfig(**item["dlq"]),
            replication=ReplicationConfig(**item.get("replication") or {}),
        )


def valid_queue_name(name: str) -> bool:
    """A queue name is one topic level without wildcards."""
    return bool(name) and not any(ch in name for ch in "/+#\x00")
