"""Webhook settings from the ``webhook`` config section: what each endpoint gets and how it is sent."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field

from fluxmq._core.trie import parse_shared, validate_filter
from fluxmq.config.schema import WEBHOOK_EVENTS
from fluxmq.errors import ConfigError, TopicFilterInvalid

__all__ = ["EndpointSettings", "RetryPolicy", "WebhookSettings"]

# Events about one application message: endpoints choose them by topic (topic_filters).
MESSAGE_EVENTS = ("message.published", "message.delivered", "message.retained")


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts of one event to one endpoint, with exponential backoff between them."""

    max_attempts: int = 3
    initial_interval: float = 1.0
    max_interval: float = 30.0
    multiplier: float = 2.0

    def pause(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return min(self.max_interval, self.initial_interval * self.multiplier ** (attempt - 1))


@dataclass(frozen=True)
class EndpointSettings:
    """One receiver of events."""

    name: str
    url: str
    events: frozenset[str]
    topic_filters: tuple[str, ...] = ("#",)
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float = 5.0
    retry: RetryPolicy = RetryPolicy()
    secret: bytes = b""
    failure_threshold: int = 5
    reset_timeout: float = 60.0
    ca_file: str = ""  # https: the CA bundle the endpoint's certificate is verified against ("" = system CAs)


@dataclass(frozen=True)
class WebhookSettings:
    """The whole ``webhook`` section, checked."""

    endpoints: tuple[EndpointSettings, ...]
    queue_size: int = 10000
    drop_policy: str = "oldest"
    workers: int = 8
    include_payload: bool = False
    shutdown_timeout: float = 5.0

    @classmethod
    def from_config(cls, config) -> WebhookSettings:
        """Raises ConfigError naming ``webhook.endpoints[i].field`` for what the loader cannot check
        (duplicate names, topic filters, a secret file that cannot be read)."""
        w = config.webhook
        d = w.defaults
        where = config.origin("webhook.endpoints")
        source, _, line = where.rpartition(":")
        source, line = (source, int(line)) if line.isdigit() else (where, None)
        default_retry = RetryPolicy(
            d.retry.max_attempts, d.retry.initial_interval, d.retry.max_interval, d.retry.multiplier
        )
        endpoints = []
        names: set[str] = set()
        for i, item in enumerate(w.endpoints):
            key = f"webhook.endpoints[{i}]"
            if item["name"] in names:
                raise ConfigError(
                    f"{key}.name", "a name no other endpoint has", source, line, got=item["name"]
                )
            names.add(item["name"])
            filters = tuple(item["topic_filters"]) or ("#",)
            for f in filters:
                try:
                    validate_filter(f)
                except TopicFilterInvalid as exc:
                    raise ConfigError(
                        f"{key}.topic_filters",
                        "MQTT topic filters",
                        source,
                        line,
                        got=f,
                        problem=f"expected MQTT topic filters, got {f!r} ({exc.reason})",
                    ) from None
                if parse_shared(f) is not None:
                    raise ConfigError(
                        f"{key}.topic_filters", "topic filters without $share", source, line, got=f
                    )
            secret = b""
            if item["secret_env"]:
                if item["secret_file"]:
                    raise ConfigError(
                        f"{key}.secret_file",
                        "secret_env or secret_file, not both",
                        source,
                        line,
                        got=item["secret_file"],
                    )
                secret = os.environ.get(item["secret_env"], "").encode("utf-8")
                if not secret:
                    raise ConfigError(
                        f"{key}.secret_env",
                        "the name of a set, non-empty environment variable",
                        source,
                        line,
                        got=item["secret_env"],
                    )
            if item["secret_file"]:
                try:
                    with open(item["secret_file"], "rb") as f:
                        secret = f.readline().strip()
                except OSError as exc:
                    raise ConfigError(
                        f"{key}.secret_file",
                        "a readable file",
                        source,
                        line,
                        got=f"{item['secret_file']} ({exc.strerror or exc})",
                    ) from None
                if not secret:
                    raise ConfigError(
                        f"{key}.secret_file",
                        "a file whose first line is the secret",
                        source,
                        line,
                        got=item["secret_file"],
                    )
            retry = default_retry
            if item["retry"] is not None:
                own = {k: v for k, v in item["retry"].items() if v is not None}
                retry = RetryPolicy(**{**default_retry.__dict__, **own})
            events = frozenset(WEBHOOK_EVENTS if "*" in item["events"] else item["events"])
            if item["ca_file"]:
                if not item["url"].startswith("https://"):
                    raise ConfigError(
                        f"{key}.ca_file",
                        "an https:// url (it would be ignored)",
                        source,
                        line,
                        got=item["url"],
                    )
                try:
                    ssl.create_default_context(cafile=item["ca_file"])
                except (OSError, ssl.SSLError) as exc:
                    raise ConfigError(
                        f"{key}.ca_file",
                        "a readable PEM CA bundle",
                        source,
                        line,
                        got=f"{item['ca_file']} ({' '.join(str(exc).split())})",
                    ) from None
            endpoints.append(
                EndpointSettings(
                    name=item["name"],
                    url=item["url"],
                    events=events,
                    topic_filters=filters,
                    headers=dict(item["headers"]),
                    timeout=item["timeout"] if item["timeout"] is not None else d.timeout,
                    retry=retry,
                    secret=secret,
                    failure_threshold=d.circuit_breaker.failure_threshold,
                    reset_timeout=d.circuit_breaker.reset_timeout,
                    ca_file=item["ca_file"],
                )
            )
        return cls(
            tuple(endpoints), w.queue_size, w.drop_policy, w.workers, w.include_payload, w.shutdown_timeout
        )
