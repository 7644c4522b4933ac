"""The data plane's settings: ``cluster.enabled``, ``cluster.node_id`` and ``cluster.transport.*``.

The keys are declared (typed, documented) in ``fluxmq.config.schema``; this module turns them into
the plain settings the transport uses and checks what a type alone cannot: a node id when the
cluster is enabled, readable TLS files when ``tls_enabled``, peer addresses. A problem is one
``ConfigError`` line naming the key and the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from fluxmq.config.values import parse_addr
from fluxmq.errors import ConfigError


@dataclass(frozen=True)
class TransportSettings:
    """``cluster.transport.*`` (durations in seconds, sizes in bytes)."""

    bind_addr: str = "127.0.0.1:7948"
    peers: dict[str, str] = field(default_factory=dict)
    batch_max_size: int = 256
    batch_max_delay: float = 0.005
    batches_in_flight: int = 4
    publish_timeout: float = 15.0
    interest_sync_timeout: float = 2.0
    max_queued_messages: int = 100000
    max_queued_bytes: int = 64 << 20
    tls_enabled: bool = False
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""


@dataclass(frozen=True)
class ClusterSettings:
    enabled: bool
    node_id: str
    transport: TransportSettings


def _origin(config, key: str) -> str:
    origin = getattr(config, "origin", None)
    return origin(key) if origin is not None else ""


def cluster_settings(config) -> ClusterSettings:
    """The data plane's settings from a loaded Config; raises ConfigError (one line) when they cannot work."""
    c, t = config.cluster, config.cluster.transport
    peers = dict(t.peers)  # (node_id, addr) pairs
    if c.enabled and not c.node_id:
        raise ConfigError(
            "cluster.node_id",
            "a node id unique in the cluster",
            _origin(config, "cluster.node_id"),
            problem="is required when cluster.enabled is true",
        )
    if c.enabled and config.get("cluster.routes"):
        raise ConfigError(
            "cluster.routes",
            "no routes while cluster.enabled is true",
            _origin(config, "cluster.routes"),
            problem="mirrors every topic to nodes the cluster already routes to (each message would "
            "arrive once per path); with cluster.enabled use bridges for brokers outside "
            "the cluster",
        )
    for node_id, addr in peers.items():
        try:
            host, port = parse_addr(addr)
        except ValueError:
            host, port = "", 0
        if not host or host == "0.0.0.0" or not port:
            raise ConfigError(
                f"cluster.transport.peers.{node_id}",
                "host:port of the peer's cluster.transport.bind_addr",
                _origin(config, "cluster.transport.peers"),
                got=addr,
            )
    if t.tls_enabled:
        for leaf in ("cert_file", "key_file", "ca_file"):
            path = getattr(t, leaf)
            if not path or not os.access(path, os.R_OK):
                raise ConfigError(
                    f"cluster.transport.{leaf}",
                    "a readable PEM file (cluster.transport.tls_enabled is true)",
                    _origin(config, f"cluster.transport.{leaf}"),
                    got=path,
                )
    transport = TransportSettings(
        bind_addr=t.bind_addr,
        peers=peers,
        batch_max_size=t.route_batch_max_size,
        batch_max_delay=t.route_batch_max_delay,
        batches_in_flight=t.route_batch_flush_workers,
        publish_timeout=t.route_publish_timeout,
        interest_sync_timeout=t.interest_sync_timeout,
        max_queued_messages=t.max_queued_messages,
        max_queued_bytes=t.max_queued_bytes,
        tls_enabled=t.tls_enabled,
        cert_file=t.cert_file,
        key_file=t.key_file,
        ca_file=t.ca_file,
    )
    return ClusterSettings(c.enabled, c.node_id, transport)
