"""The bridge route model: one ``BridgeConfig`` per ``bridges`` item or ``cluster.routes`` item.

Topic mapping: a route ``{pattern, local_prefix, remote_prefix}`` subscribes ``local_prefix +
pattern`` here (out) and ``remote_prefix + pattern`` at the peer (in); a forwarded topic has the one
prefix replaced by the other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from fluxmq.broker.broker import BRIDGE_SESSION_PREFIX
from fluxmq.config.values import parse_addr
from fluxmq.errors import ConfigError

# The user property a 5.0 link adds to what it forwards: its value names the sending node.
BRIDGE_MARKER = "fluxmq-bridge"
# The same for a cluster route: a message carrying it came from a peer of the mesh and is never
# forwarded to another peer (each node pushes its own messages to every peer itself).
ROUTE_MARKER = "fluxmq-route"


@dataclass(frozen=True)
class TopicRoute:
    """One forwarded topic pattern of a bridge."""

    pattern: str
    direction: str = "both"  # in | out | both
    qos: int = 1
    local_prefix: str = ""
    remote_prefix: str = ""

    @property
    def local_filter(self) -> str:
        return self.local_prefix + self.pattern

    @property
    def remote_filter(self) -> str:
        return self.remote_prefix + self.pattern

    @property
    def inbound(self) -> bool:
        return self.direction in ("in", "both")

    @property
    def outbound(self) -> bool:
        return self.direction in ("out", "both")

    def to_local(self, remote_topic: str) -> str:
        return self.local_prefix + remote_topic[len(self.remote_prefix) :]

    def to_remote(self, local_topic: str) -> str:
        return self.remote_prefix + local_topic[len(self.local_prefix) :]


@dataclass
class BridgeConfig:
    """Everything one link needs; ``password`` is resolved from the environment or a file."""

    name: str
    host: str
    port: int
    protocol_version: str = "5.0"
    client_id: str = ""
    clean_start: bool = False
    keepalive: float = 60.0
    username: str = ""
    password: bytes | None = field(default=None, repr=False)  # never logged
    tls: dict | None = None
    message_validity: float = 0.0
    reconnect_initial: float = 1.0
    reconnect_max: float = 60.0
    topics: tuple[TopicRoute, ...] = ()
    max_queued_messages: int = 10000
    mesh: bool = False  # a cluster route: mirrors everything, never relays a peer's message

    @property
    def version(self) -> int:
        """The protocol level (4 or 5)."""
        return 5 if self.protocol_version == "5.0" else 4

    @property
    def local_client_id(self) -> str:
        """The broker session holding this link's outbound store."""
        return f"{BRIDGE_SESSION_PREFIX}{self.name}"


def _password(item: dict, where: str) -> bytes | None:
    env_name = item.get("password_env") or ""
    path = item.get("password_file") or ""
    if env_name and path:
        raise ConfigError(f"{where}.password_env", "only one of password_env and password_file")
    if env_name:
        value = os.environ.get(env_name)
        if value is None:
            raise ConfigError(
                f"{where}.password_env",
                "a set environment variable",
                problem=f"environment variable {env_name} is not set",
            )
        return value.encode()
    if path:
        try:
            with open(path, "rb") as f:
                return f.read().rstrip(b"\r\n")
        except OSError as exc:
            raise ConfigError(
                f"{where}.password_file",
                "a readable file",
                problem=f"cannot read {path}: {exc.strerror or exc}",
            ) from None
    return None


def _common(item: dict, where: str) -> dict:
    reconnect = item.get("reconnect") or {}
    return {
        "username": item.get("username", ""),
        "password": _password(item, where),
        "tls": item.get("tls"),
        "message_validity": item.get("message_validity", 0.0),
        "reconnect_initial": max(0.01, reconnect.get("initial", 1.0)),
        "reconnect_max": max(0.01, reconnect.get("max", 60.0)),
        "max_queued_messages": item.get("max_queued_messages", 10000),
        "keepalive": item.get("keepalive", 60.0),
    }


def bridges_from_config(config) -> list[BridgeConfig]:
    """The links of ``bridges`` and ``cluster.routes``; raises ConfigError for a duplicate name or
    a password that cannot be read."""
    out: list[BridgeConfig] = []
    for i, item in enumerate(config.get("bridges") or []):
        where = f"bridges[{i}]"
        host, port = parse_addr(item["address"])
        name = item["name"]
        out.append(
            BridgeConfig(
                name=name,
                host=host or "127.0.0.1",
                port=port,
                protocol_version=item.get("protocol_version", "5.0"),
                client_id=item.get("client_id") or f"fluxmq-bridge-{name}",
                clean_start=item.get("clean_start", False),
                topics=tuple(TopicRoute(**t) for t in item.get("topics") or ()),
                **_common(item, where),
            )
        )
    for i, item in enumerate(config.get("cluster.routes") or []):
        where = f"cluster.routes[{i}]"
        name = item.get("name") or f"{item['host']}:{item['port']}"
        out.append(
            BridgeConfig(
                name=name,
                host=item["host"],
                port=item["port"],
                protocol_version="5.0",
                client_id=item["node_id"],
                clean_start=False,
                topics=(TopicRoute("#", "out", 2),),
                mesh=True,
                **_common(item, where),
            )
        )
    seen: set[str] = set()
    for b in out:
        if b.name in seen:
            raise ConfigError("bridges", "unique bridge names", problem=f"two bridges are named {b.name!r}")
        seen.add(b.name)
    return out


def filter_matches(filter: str, topic: str) -> bool:
    """MQTT topic filter matching (``+``, ``#``; ``$`` topics not matched by a leading wildcard)."""
    if topic.startswith("$") and filter[:1] in ("+", "#"):
        return False
    f_parts = filter.split("/")
    t_parts = topic.split("/")
    for i, part in enumerate(f_parts):
        if part == "#":
            return True
        if i >= len(t_parts):
            return False
        if part != "+" and part != t_parts[i]:
            return False
    return len(f_parts) == len(t_parts)
