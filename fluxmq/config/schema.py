"""The declared configuration keys: name, type, default and one line of documentation each.

Adding a key is one line in ``KEYS`` (and, for a new section, optionally one line in
``SECTION_DOCS``); then regenerate the two files made from this schema::

    python -m fluxmq.config.schema --yaml > conf/fluxmq.yaml
    python -m fluxmq.config.schema --rst > docs/config-keys.rst

The tests check both files are current. A key declared ``secret=True`` may only be set from the
environment (``FLUXMQ_`` + the key uppercased, dots as underscores); the file and ``--set`` refuse it,
and the generated files name its variable instead of a value.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fluxmq.config.values import (
    Addr,
    Bool,
    Duration,
    Enum,
    Field,
    Fields,
    FieldsList,
    Float,
    Int,
    ItemError,
    Size,
    Str,
    StrList,
    StrMap,
    Url,
    ValueType,
    parse_addr,
)

__all__ = ["ENV_ALLOWED", "ENV_PREFIX", "KEYS", "SCHEMA", "SECTION_DOCS", "Key", "Schema", "main"]

ENV_PREFIX = "FLUXMQ_"

# FLUXMQ_ variables that are not config keys, so the loader lets them pass: the config file path
# (read by fluxmq-node), the admin token (read by the admin API until it becomes a secret key), the
# log level overrides of reference 004 (FLUXMQ_DEBUG/FLUXMQ_TRACE set log.debug/log.trace) and the
# list of other FLUXMQ_ variables to ignore (fluxmq.config.compat.ENV_IGNORE).
ENV_ALLOWED = frozenset(
    {"FLUXMQ_CONFIG", "FLUXMQ_ADMIN_TOKEN", "FLUXMQ_DEBUG", "FLUXMQ_TRACE", "FLUXMQ_ENV_IGNORE"}
)

# Names a config Section object uses for itself; a key or section may not be called these.
RESERVED_NAMES = frozenset({"get", "origin", "to_dict"})

# Keys are section.key; a top-level key (``bridges``) is allowed only for a structured list.
_NAME = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*")


@dataclass(frozen=True)
class Key:
    """One configuration key. ``default`` is written as in YAML (``"10s"``, ``"16MiB"``, ``true``)."""

    name: str
    type: ValueType
    default: object
    doc: str
    secret: bool = False

    @property
    def env(self) -> str:
        """The environment variable that sets this key."""
        return ENV_PREFIX + self.name.upper().replace(".", "_")

    @property
    def section(self) -> str:
        return self.name.rpartition(".")[0]

    @property
    def leaf(self) -> str:
        return self.name.rpartition(".")[2]


SECTION_DOCS: dict[str, str] = {
    "server": "Listeners and connection handling.",
    "server.tcp": "MQTT over TCP.",
    "server.tcp.plain": "The plain (non-TLS) MQTT TCP listener.",
    "server.tcp.tls": "MQTT over TLS (conventionally :8883); needs cert_file and key_file.",
    "server.tcp.mtls": "MQTT over TLS with client certificates (conventionally :8884); needs ca_file too.",
    "server.websocket": "MQTT over WebSocket (subprotocol mqtt or mqttv3.1, binary frames).",
    "server.websocket.plain": "The plain WebSocket listener (ws://).",
    "server.websocket.tls": "The WebSocket listener over TLS (wss://); the same TLS keys as server.tcp.tls.",
    "server.http": "HTTP bridge: publish, read retained messages, subscribe as server-sent events.",
    "server.http.plain": "The plain (non-TLS) HTTP bridge listener; its body and SSE limits apply to every bridge listener.",
    "server.http.tls": "The HTTP bridge over TLS (https://); the same TLS keys as server.tcp.tls.",
    "server.http.mtls": "The HTTP bridge over TLS with client certificates; needs ca_file too.",
    "server.coap": "CoAP bridge (RFC 7252): publish, read retained messages, observe topics (README.rst, CoAP).",
    "server.coap.plain": "The plain CoAP listener (UDP).",
    "server.coap.dtls": "CoAP over DTLS 1.2 (python-mbedtls): certificates and/or pre-shared keys.",
    "server.coap.mdtls": "CoAP over DTLS 1.2 with a client certificate required (needs ca_file).",
    "server.admin": "Admin API; bearer token from server.admin.token_file or FLUXMQ_ADMIN_TOKEN.",
    "broker": "Protocol-independent broker limits and policies.",
    "storage": "Where sessions, retained messages and queues are kept.",
    "queue_manager": "Durable queues ($queue/...; docs/queues.rst).",
    "auth": "Client authentication and authorization (docs/security.rst).",
    "auth.enhanced": "MQTT 5.0 enhanced authentication (AUTH packets) and re-authentication.",
    "auth.http": "HTTP authentication (and optional ACL) service with a decision cache (docs/security.rst).",
    "limits": "Per-address and per-client abuse limits (docs/security.rst); 0 = no limit.",
    "log": "Logging: format, destination, rotation and throttling.",
    "log.throttling": "Per-logger token bucket that drops excess lines and reports how many.",
    "cluster": "Cluster of nodes acting as one broker (docs/cluster.rst), and reference 001 MQTT cluster routes "
    "(cluster.routes; docs/bridges.rst).",
    "cluster.transport": "gRPC between cluster nodes: forwarded publishes, interest, control calls (docs/cluster.rst).",
    "cluster.etcd": "The metadata plane: this node's etcd member or an external etcd (docs/cluster.rst).",
    "cluster.etcd.tls": "TLS between the node and etcd, and for the member's listeners.",
    "cluster.raft": "Raft replication of durable queues (pysyncobj; docs/replication.rst).",
    "cluster.raft.tls": "TLS / mutual TLS between the Raft members of every group (docs/replication.rst).",
    "webhook": "Broker events POSTed to HTTP endpoints off the hot path (docs/webhooks.rst).",
    "webhook.defaults": "Per-endpoint settings an endpoint does not set itself.",
    "webhook.defaults.retry": "Exponential backoff between attempts of one event to one endpoint.",
    "webhook.defaults.circuit_breaker": "Per-endpoint breaker: open after consecutive failures, retry after a pause.",
}

# The event types a webhook endpoint may subscribe to (docs/webhooks.rst describes their fields).
WEBHOOK_EVENTS = (
    "client.connected",
    "client.disconnected",
    "client.session_takeover",
    "message.published",
    "message.delivered",
    "message.retained",
    "subscription.created",
    "subscription.removed",
    "auth.success",
    "auth.failure",
    "authz.publish_denied",
    "authz.subscribe_denied",
)


class EventList(StrList):
    """A list of webhook event types (``*`` = all of them)."""

    summary = "list of event types"
    expected = "a list of event types (" + ", ".join(WEBHOOK_EVENTS) + ') or ["*"]'

    def from_yaml(self, value: object) -> list[str]:
        items = super().from_yaml(value)
        unknown = [item for item in items if item != "*" and item not in WEBHOOK_EVENTS]
        if unknown:
            raise ValueError(f"unknown event type {unknown[0]!r}")
        return items


# Unset fields (None) take webhook.defaults.retry.*.
_WEBHOOK_RETRY = Fields(
    {
        "max_attempts": Field(Int(1, 100), doc="Attempts per event, the first included."),
        "initial_interval": Field(Duration(), doc="Pause before the second attempt."),
        "max_interval": Field(Duration(), doc="Longest pause."),
        "multiplier": Field(Float(1.0), doc="Each pause is the previous one times this."),
    }
)

WEBHOOK_ENDPOINT = Fields(
    {
        "name": Field(Str(allow_empty=False), required=True, doc="Unique; the endpoint label on /metrics."),
        "url": Field(Url("http", "https"), required=True, doc="Where events are POSTed."),
        "events": Field(EventList(), ["*"], doc="Event types sent to it."),
        "topic_filters": Field(
            StrList(), [], doc="MQTT filters choosing the message.* events; [] = every topic."
        ),
        "headers": Field(StrMap(), {}, doc="Extra request headers."),
        "timeout": Field(Duration(), doc="Time to answer one request; unset = webhook.defaults.timeout."),
        "retry": Field(_WEBHOOK_RETRY, doc="Backoff; unset fields = webhook.defaults.retry.*."),
        "secret_env": Field(Str(), "", doc="Environment variable holding the HMAC-SHA256 signing secret."),
        "secret_file": Field(Str(), "", doc="File whose first line is the signing secret."),
        "secret": Field(
            Str(),
            refuse="a signing secret is not written in the config file: "
            "name its environment variable (secret_env) or a file (secret_file)",
        ),
        "ca_file": Field(
            Str(), "", doc='https: the CA bundle its certificate is verified against; "" = system CAs.'
        ),
    }
)


class AutoBool(ValueType):
    """``"auto"`` (the node decides) or a boolean; the typed value is ``"auto"``, True or False."""

    summary = "auto | boolean"
    expected = '"auto", true or false'

    def from_yaml(self, value: object) -> object:
        if isinstance(value, bool) or value == "auto":
            return value
        raise ValueError("")

    def from_text(self, text: str) -> object:
        from fluxmq.config.values import parse_bool

        return "auto" if text.strip() == "auto" else parse_bool(text)


class Workers(Int):
    """``"auto"`` (the number of cores) or a number of worker processes; the typed value is ``"auto"`` or an int."""

    def __init__(self) -> None:
        super().__init__(1, 64)
        self.summary = '"auto" | integer 1..64'
        self.expected = '"auto" or an integer from 1 to 64'

    def from_yaml(self, value: object) -> object:
        return "auto" if value == "auto" else super().from_yaml(value)

    def from_text(self, text: str) -> object:
        return "auto" if text.strip() == "auto" else super().from_text(text)


class PeerMap(StrMap):
    """``node_id: host:port`` of cluster peers; from the environment as JSON or ``id=host:port,...``.

    The typed value is a list of ``[node_id, addr]`` pairs (a dict would be read as a section)."""

    summary = "mapping of node id to host:port"
    expected = 'a mapping of node ids to host:port such as {"broker-2": "127.0.0.1:7949"}'

    def from_yaml(self, value: object) -> list[list[str]]:
        peers = super().from_yaml(value)
        for node_id, addr in peers.items():
            try:
                parse_addr(addr)
            except ValueError as exc:
                raise ValueError(f"peer {node_id}: {addr!r}: {exc}") from None
            if not addr.rpartition(":")[0]:
                raise ValueError(f"peer {node_id}: {addr!r} has no host")
        return [[node_id, addr] for node_id, addr in peers.items()]

    def from_text(self, text: str) -> list[list[str]]:
        import json

        text = text.strip()
        if text.startswith("{"):
            return self.from_yaml(json.loads(text))
        pairs = [item.partition("=") for item in text.split(",") if item.strip()]
        return self.from_yaml({k.strip(): v.strip() for k, _, v in pairs})


class ProtocolVersion(ValueType):
    """An MQTT protocol version of a bridge link: ``"3.1.1"`` or ``"5.0"`` (YAML may read 5.0 as a number)."""

    summary = '"3.1.1" | "5.0"'
    expected = '"3.1.1" or "5.0"'

    def from_yaml(self, value: object) -> str:
        text = (
            str(value).strip() if isinstance(value, str | int | float) and not isinstance(value, bool) else ""
        )
        if text in ("5", "5.0"):
            return "5.0"
        if text in ("3.1.1", "4"):
            return "3.1.1"
        raise ValueError("")

    def from_text(self, text: str) -> str:
        return self.from_yaml(text)


class InitialCluster(ValueType):
    """etcd's ``--initial-cluster``: ``name=http://host:port`` members, comma-separated (or ``""``)."""

    summary = "etcd initial cluster"
    expected = 'members as "node1=http://127.0.0.1:2380,node2=http://127.0.0.1:2390" or ""'

    def from_yaml(self, value: object) -> str:
        from urllib.parse import urlsplit

        if not isinstance(value, str):
            raise ValueError("")
        for part in filter(None, (p.strip() for p in value.split(","))):
            name, sep, url = part.partition("=")
            parts = urlsplit(url)
            if (
                not sep
                or not name
                or parts.scheme not in ("http", "https")
                or not parts.hostname
                or not parts.port
            ):
                raise ValueError(f"{part!r} is not name=http://host:port")
        return ",".join(p.strip() for p in value.split(",") if p.strip())


class EtcdEndpoints(StrList):
    """External etcd client URLs (``http://host:2379`` / ``https://...``)."""

    summary = "list of etcd URLs"
    expected = (
        'a list of etcd client URLs such as ["http://10.0.0.1:2379"] (comma-separated from the environment)'
    )

    def from_yaml(self, value: object) -> list[str]:
        from urllib.parse import urlsplit

        items = super().from_yaml(value)
        for item in items:
            parts = urlsplit(item)
            if parts.scheme not in ("http", "https") or not parts.hostname or not parts.port:
                raise ValueError(f"{item!r} is not http(s)://host:port")
        return items


class LeaseTTL(Duration):
    """A lease TTL: etcd grants whole seconds, at least about its election timeout."""

    summary = "duration of 2s or more"
    expected = 'a duration of at least 2s such as "10s"'

    def from_yaml(self, value: object) -> float:
        seconds = super().from_yaml(value)
        if seconds < 2:
            raise ValueError("below 2s")
        return seconds

    def from_text(self, text: str) -> float:
        return self.from_yaml(text)


_NO_CLEAR_PASSWORD = (
    "bridge passwords are never read from the config file: use password_env (an environment "
    "variable name) or password_file (a file holding the password)"
)

_BRIDGE_TLS = Fields(
    {
        "ca_file": Field(
            Str(), "", doc='PEM CA bundle the peer certificate is verified against; "" = system CAs.'
        ),
        "cert_file": Field(Str(), "", doc="PEM client certificate (mutual TLS)."),
        "key_file": Field(Str(), "", doc="Private key of cert_file."),
        "insecure": Field(
            Bool(), False, doc="Skip verifying the peer certificate and host name (tests only)."
        ),
    },
    summary="tls mapping",
)

_BRIDGE_RECONNECT = Fields(
    {
        "initial": Field(Duration(), "1s", doc="First reconnect delay."),
        "max": Field(Duration(), "60s", doc="Longest reconnect delay (doubling, with jitter)."),
    },
    summary="reconnect mapping",
)

_BRIDGE_TOPIC = Fields(
    {
        "pattern": Field(Str(allow_empty=False), required=True, doc="Topic filter, without the prefixes."),
        "direction": Field(
            Enum("in", "out", "both"), "both", doc="in: peer to here; out: here to peer; both."
        ),
        "qos": Field(Int(0, 2), 1, doc="Highest QoS forwarded on this route."),
        "local_prefix": Field(Str(), "", doc="Prepended to the pattern on this broker."),
        "remote_prefix": Field(Str(), "", doc="Prepended to the pattern on the peer."),
    },
    summary="topic mapping",
)

_LINK_COMMON = {
    "username": Field(Str(), "", doc="User name sent to the peer."),
    "password": Field(Str(), refuse=_NO_CLEAR_PASSWORD),
    "password_env": Field(Str(), "", doc="Environment variable holding the password."),
    "password_file": Field(Str(), "", doc="File holding the password (trailing newline stripped)."),
    "tls": Field(_BRIDGE_TLS, None, doc="TLS to the peer (verified by default); absent = plain TCP."),
    "message_validity": Field(
        Duration(), "0s", doc="A queued message older than this when its turn comes is dropped; 0 = none."
    ),
    "reconnect": Field(_BRIDGE_RECONNECT, {}, doc="Reconnect backoff."),
    "max_queued_messages": Field(
        Int(1), 10000, doc="Outbound messages kept (on disk) while the peer is away."
    ),
    "keepalive": Field(Duration(), "60s", doc="Keep alive sent in CONNECT."),
}

BRIDGE_ITEM = Fields(
    {
        "name": Field(Str(allow_empty=False), required=True, doc="Unique name (status, metrics, logs)."),
        "address": Field(Addr(), required=True, doc="Peer host:port."),
        "protocol_version": Field(ProtocolVersion(), "5.0", doc="MQTT version of the link."),
        "client_id": Field(Str(), "", doc='Client id at the peer; "" = fluxmq-bridge-NAME.'),
        "clean_start": Field(Bool(), False, doc="Start a new session at the peer on every connect."),
        **_LINK_COMMON,
        "topics": Field(FieldsList(_BRIDGE_TOPIC), [], doc="Forwarded topics."),
    },
    summary="bridge mapping",
)

CLUSTER_ROUTE_ITEM = Fields(
    {
        "name": Field(Str(), "", doc='Route name; "" = HOST:PORT.'),
        "host": Field(Str(allow_empty=False), required=True, doc="Peer host name or address."),
        "port": Field(Int(1, 65535), 1883, doc="Peer MQTT port (8883 with tls)."),
        "node_id": Field(
            Str(allow_empty=False), required=True, doc="This node's unique client id at the peer."
        ),
        **_LINK_COMMON,
    },
    summary="route mapping",
)


class QueueName(ValueType):
    """A durable queue's name: one topic level, no wildcards."""

    summary = "queue name"
    expected = "a queue name (one topic level: no /, + or #)"

    def from_yaml(self, value: object) -> str:
        if not isinstance(value, str) or not value or any(ch in value for ch in "/+#\x00"):
            raise ValueError("")
        return str(value)


class GroupsMap(ValueType):
    """``cluster.raft.groups``: group name -> {bind_addr, peers} (reference 000 names groups by key)."""

    summary = "mapping of groups"
    expected = "a mapping of group name -> {bind_addr, peers}"

    def __init__(self, item: Fields) -> None:
        self.item = item

    def from_yaml(self, value: object, path: str = "") -> list[dict]:
        # A list of {name, fields...}, not a dict: the loader would read a dict value as a section.
        if value is None:
            return []
        if not isinstance(value, dict):
            raise ItemError(path, None, "expected a mapping of group name -> {bind_addr, peers}")
        out = {}
        for name, item in value.items():
            if not isinstance(name, str) or not name or any(ch in name for ch in "/+#\x00"):
                raise ItemError(f"{path}.{name}", None, "a group name is one topic level (no /, + or #)")
            out[str(name)] = self.item.from_yaml(item, f"{path}.{name}")
        return [{"name": name, **fields} for name, fields in out.items()]

    def from_text(self, text: str) -> list[dict]:
        import json

        try:
            return self.from_yaml(json.loads(text) if text.strip() else {})
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc.msg}") from None


RAFT_GROUP = Fields(
    {
        "bind_addr": Field(
            Addr(),
            required=True,
            doc="host:port this node's member of the group listens on (and the peers dial).",
        ),
        "peers": Field(StrList(), [], doc="host:port of every member (this node's may be listed too)."),
    },
    summary="group mapping",
)

REPLICATION_ITEM = Fields(
    {
        "enabled": Field(
            Bool(), False, doc="Replicate this queue's log through a Raft group (cluster.raft.enabled)."
        ),
        "group": Field(Str(), "default", doc="The cluster.raft.groups entry whose members hold the log."),
        "mode": Field(
            Enum("sync", "async"),
            "sync",
            doc="sync: PUBACK once the Raft quorum has the entry; async: after the local hand-off "
            "(docs/replication.rst: the loss window).",
        ),
        "replication_factor": Field(
            Int(1, 15), 3, doc="Members of the group that hold this queue's log (picked by name hash)."
        ),
        "min_in_sync_replicas": Field(
            Int(1, 15),
            2,
            doc="Replicas that must have an entry before a sync PUBACK; at most the "
            "Raft majority of replication_factor.",
        ),
        "ack_timeout": Field(
            Duration(), 5.0, doc="A sync append not replicated within this is refused (never acknowledged)."
        ),
    },
    summary="replication mapping",
)


QUEUE_ITEM = Fields(
    {
        "name": Field(QueueName(), required=True, doc="Queue name: PUBLISH/SUBSCRIBE $queue/{name}[/...]."),
        "topics": Field(
            StrList(), [], doc="Ordinary topic filters whose publishes are copied into the queue."
        ),
        "type": Field(
            Enum("classic", "stream"),
            "classic",
            doc="classic: a work queue; stream: a replayable log read by group cursors.",
        ),
        "partitions": Field(
            Int(1, 1024),
            1,
            doc="Partitions by key (user property partition-key, else the routing key): one owner "
            "per partition per group, so order per key holds.",
        ),
        "max_inflight": Field(
            Int(1, 65535), 100, doc="Unsettled deliveries per consumer (and its Receive Maximum)."
        ),
        "visibility_timeout": Field(
            Duration(), 30.0, doc="Unsettled this long: delivered again, to another member."
        ),
        "auto_commit_interval": Field(
            Duration(), 5.0, doc="Streams: how often a group's cursor is committed."
        ),
        "retention": Field(
            Fields(
                {
                    "max_age": Field(
                        Duration(), 0.0, doc="Records older than this are deleted; 0 = no limit."
                    ),
                    "max_length_messages": Field(Int(0), 0, doc="Most records kept; 0 = no limit."),
                    "max_length_bytes": Field(Size(), 0, doc="Most bytes kept; 0 = no limit."),
                    "compact": Field(
                        Bool(),
                        False,
                        doc="Keep only the newest record per key (partition-key, else the routing key).",
                    ),
                },
                summary="retention mapping",
            ),
            {},
            doc="Background deletion of old records.",
        ),
        "limits": Field(
            Fields(
                {
                    "max_message_size": Field(
                        Size(), 0, doc="Largest payload appended; 0 = broker.max_message_size."
                    ),
                    "max_depth": Field(
                        Int(0), 0, doc="Most stored records; a full queue refuses publishes (0x97)."
                    ),
                    "message_ttl": Field(
                        Duration(), 0.0, doc="Records older than this expire at delivery; 0 = never."
                    ),
                },
                summary="limits mapping",
            ),
            {},
            doc="Queue limits.",
        ),
        "retry": Field(
            Fields(
                {
                    "max_retries": Field(Int(1), 10, doc="Deliveries before the message goes to the DLQ."),
                    "initial_backoff": Field(Duration(), 1.0, doc="Redelivery delay after the first nack."),
                    "max_backoff": Field(Duration(), 60.0, doc="Longest redelivery delay."),
                    "multiplier": Field(Float(1.0), 2.0, doc="Backoff growth per delivery."),
                },
                summary="retry mapping",
            ),
            {},
            doc="Redelivery after nack or visibility timeout.",
        ),
        "dlq": Field(
            Fields(
                {
                    "enabled": Field(
                        Bool(), True, doc="Move messages past max_retries or rejected to the DLQ."
                    ),
                    "topic": Field(Str(), "", doc='DLQ topic; "" = $queue/{name}.dlq.'),
                },
                summary="dlq mapping",
            ),
            {},
            doc="Dead-letter queue.",
        ),
        "replication": Field(
            REPLICATION_ITEM, {}, doc="Raft replication of the queue's log (docs/replication.rst)."
        ),
    },
    summary="queue mapping",
)


def _limit_keys(section: str) -> tuple[Key, ...]:
    """max_connections, read_timeout and write_timeout: the keys every MQTT listener has."""
    return (
        Key(
            f"{section}.max_connections",
            Int(1),
            10000,
            "Most concurrent connections on this listener; more are refused.",
        ),
        Key(
            f"{section}.read_timeout",
            Duration(),
            "0s",
            "Idle limit for a client that set keep alive 0; 0 = none.",
        ),
        Key(
            f"{section}.write_timeout",
            Duration(),
            "60s",
            "A client whose pending output cannot drain for this long is dropped.",
        ),
    )


def _tls_keys(section: str) -> tuple[Key, ...]:
    """The TLS keys of a listener (fluxmq.transport.tls builds the SSLContext from them)."""
    return (
        Key(
            f"{section}.cert_file",
            Str(),
            "",
            "PEM certificate (chain) of the server; needed when addr is set.",
        ),
        Key(f"{section}.key_file", Str(), "", "PEM private key of cert_file; needed when addr is set."),
        Key(
            f"{section}.ca_file",
            Str(),
            "",
            "PEM CA bundle client certificates are verified against; alone it means client_auth require.",
        ),
        Key(
            f"{section}.client_auth",
            Enum("", "none", "request", "require_any", "verify_if_given", "require"),
            "",
            'Client certificates: "" = require when ca_file is set, else none (docs/listeners.rst).',
        ),
        Key(
            f"{section}.min_version",
            Enum("TLS1.0", "TLS1.1", "TLS1.2", "TLS1.3"),
            "TLS1.2",
            "Oldest TLS version accepted (OpenSSL may refuse 1.0/1.1 at its security level).",
        ),
        Key(
            f"{section}.cipher_suites",
            StrList(),
            [],
            "TLS 1.2 suites by IANA/Go or OpenSSL name; [] = OpenSSL defaults; TLS 1.3 suites are not settable.",
        ),
        Key(
            f"{section}.use_cert_cn_as_username",
            Bool(),
            False,
            "The verified client certificate's CN becomes the session's username.",
        ),
    )


def _http_tls_keys(section: str) -> tuple[Key, ...]:
    """The TLS keys of an HTTP bridge listener (no username from the certificate: HTTP has no auth yet)."""
    return tuple(key for key in _tls_keys(section) if key.leaf != "use_cert_cn_as_username")


def _dtls_keys(section: str) -> tuple[Key, ...]:
    """The DTLS keys of a CoAP listener (fluxmq.coap.dtls builds the Mbed TLS context from them)."""
    return (
        Key(
            f"{section}.cert_file",
            Str(),
            "",
            'PEM certificate (chain) of the DTLS server; "" = pre-shared keys only (psk_file).',
        ),
        Key(f"{section}.key_file", Str(), "", "PEM private key (EC or RSA) of cert_file."),
        Key(
            f"{section}.ca_file",
            Str(),
            "",
            "PEM CA bundle client certificates are verified against; alone it means client_auth require.",
        ),
        Key(
            f"{section}.client_auth",
            Enum("", "none", "require"),
            "",
            'Client certificates: "" = require when ca_file is set, else none; the CN becomes the user name.',
        ),
        Key(
            f"{section}.psk_file",
            Str(),
            "",
            'Pre-shared keys, one "identity:hexkey" per line; the identity becomes the user name.',
        ),
    )


def _websocket_keys(section: str) -> tuple[Key, ...]:
    """The WebSocket keys of a listener (fluxmq.transport.websocket)."""
    return (
        Key(
            f"{section}.path",
            Str(allow_empty=False),
            "/mqtt",
            "Request path of the upgrade; another path gets 404.",
        ),
        Key(
            f"{section}.allowed_origins",
            StrList(),
            [],
            'Origin values accepted ("https://app.example.com", "*.example.com", "*"); [] = any.',
        ),
    )


KEYS: tuple[Key, ...] = (
    Key(
        "server.tcp.plain.addr",
        Addr(allow_empty=True),
        "127.0.0.1:1883",
        'Listener address host:port (":1883" = every interface); "" disables the listener.',
    ),
    Key(
        "server.tcp.plain.max_connections",
        Int(1),
        10000,
        "Most concurrent connections on this listener; more are refused.",
    ),
    Key(
        "server.tcp.plain.read_timeout",
        Duration(),
        "0s",
        "Idle limit for a client that set keep alive 0; 0 = none.",
    ),
    Key(
        "server.tcp.plain.write_timeout",
        Duration(),
        "60s",
        "A client whose pending output cannot drain for this long is dropped.",
    ),
    Key(
        "server.tcp.tls.addr",
        Addr(allow_empty=True),
        "",
        'TLS listener address host:port (e.g. ":8883"); "" disables it.',
    ),
    *_tls_keys("server.tcp.tls"),
    *_limit_keys("server.tcp.tls"),
    Key(
        "server.tcp.mtls.addr",
        Addr(allow_empty=True),
        "",
        'mTLS listener address host:port (e.g. ":8884"); "" disables it.',
    ),
    *_tls_keys("server.tcp.mtls"),
    *_limit_keys("server.tcp.mtls"),
    Key(
        "server.websocket.plain.addr",
        Addr(allow_empty=True),
        "127.0.0.1:8083",
        'WebSocket listener address host:port (":8083" = every interface); "" disables it.',
    ),
    *_websocket_keys("server.websocket.plain"),
    *_limit_keys("server.websocket.plain"),
    Key(
        "server.websocket.tls.addr",
        Addr(allow_empty=True),
        "",
        'WebSocket-over-TLS listener address host:port (e.g. ":8084"); "" disables it.',
    ),
    *_websocket_keys("server.websocket.tls"),
    *_tls_keys("server.websocket.tls"),
    *_limit_keys("server.websocket.tls"),
    Key(
        "server.http.plain.addr",
        Addr(allow_empty=True),
        "127.0.0.1:8080",
        'HTTP bridge address host:port (":8080" = every interface); "" disables the listener.',
    ),
    Key(
        "server.http.plain.max_body_size",
        Size(1),
        "1MiB",
        "Largest request body accepted, in bytes; a larger one gets 413.",
    ),
    Key(
        "server.http.plain.sse_heartbeat",
        Duration(),
        "15s",
        "Comment line sent on an idle /subscribe stream so a dead client is noticed; 0 = none.",
    ),
    Key(
        "server.http.plain.sse_queue_size",
        Int(1),
        1000,
        "Messages buffered per /subscribe stream; when full the oldest is dropped and counted.",
    ),
    Key(
        "server.http.plain.max_streams",
        Int(1),
        1000,
        "Most /subscribe streams open at once on the bridge; more get 429 (the pool keeps room for requests).",
    ),
    Key(
        "server.http.plain.max_streams_per_user",
        Int(1),
        100,
        "Most /subscribe streams of one user name (anonymous: one IP address); more get 429.",
    ),
    Key(
        "server.http.tls.addr",
        Addr(allow_empty=True),
        "",
        'HTTPS bridge address host:port (e.g. ":8443"); "" disables it.',
    ),
    *_http_tls_keys("server.http.tls"),
    Key(
        "server.http.mtls.addr",
        Addr(allow_empty=True),
        "",
        'HTTPS bridge with client certificates, address host:port (e.g. ":8444"); "" disables it.',
    ),
    *_http_tls_keys("server.http.mtls"),
    Key(
        "server.coap.plain.addr",
        Addr(allow_empty=True),
        "",
        'CoAP UDP listener address host:port (e.g. "127.0.0.1:5683"); "" disables it.',
    ),
    Key(
        "server.coap.dtls.addr",
        Addr(allow_empty=True),
        "",
        'CoAP over DTLS listener address host:port (e.g. "127.0.0.1:5684"); "" disables it.',
    ),
    *_dtls_keys("server.coap.dtls"),
    Key(
        "server.coap.mdtls.addr",
        Addr(allow_empty=True),
        "",
        'CoAP over DTLS with client certificates required, host:port (e.g. "127.0.0.1:5685"); "" disables it.',
    ),
    *_dtls_keys("server.coap.mdtls"),
    Key(
        "server.coap.observe_queue_size",
        Int(1),
        100,
        "Notifications buffered per observation; when full the oldest is dropped and counted.",
    ),
    Key(
        "server.coap.max_observations",
        Int(0),
        10000,
        "Most observations open at once on the node; more get 5.03.",
    ),
    Key(
        "server.coap.max_observations_per_peer",
        Int(0),
        16,
        "Most observations of one peer (address and port); more get 5.03.",
    ),
    Key(
        "server.coap.block_size",
        Int(16, 1024),
        1024,
        "Largest response body per datagram (rounded down to a power of two); larger ones go block-wise (Block2).",
    ),
    Key(
        "server.coap.max_reassembly_bytes",
        Size(1),
        "1MiB",
        "Block1 request bodies held per peer while they arrive; past it 4.13.",
    ),
    Key(
        "server.admin.addr",
        Addr(allow_empty=True),
        "127.0.0.1:8082",
        'Admin API address host:port; "" disables it; a non-loopback address needs a token.',
    ),
    Key(
        "server.admin.token_file",
        Str(),
        "",
        "File whose first line is the admin bearer token; re-read on reload (SIGHUP rotates it); "
        '"" = FLUXMQ_ADMIN_TOKEN, or no token (reads only, loopback only).',
    ),
    Key(
        "server.admin.allowed_hosts",
        StrList(),
        [],
        "Host names the admin API answers to besides IP addresses and localhost (DNS rebinding guard).",
    ),
    Key("server.metrics_enabled", Bool(), True, "Serve Prometheus /metrics on server.health_addr."),
    Key(
        "server.connect_timeout",
        Duration(),
        "10s",
        "A socket that sends no complete CONNECT within this is closed.",
    ),
    Key(
        "server.health_enabled",
        Bool(),
        True,
        "Serve /health, /ready and /cluster/status on server.health_addr.",
    ),
    Key(
        "server.health_addr",
        Addr(),
        "127.0.0.1:8081",
        'Health HTTP listener address host:port (":8081" = every interface).',
    ),
    Key("server.shutdown_timeout", Duration(), "10s", "Graceful shutdown budget on SIGTERM/SIGINT."),
    Key(
        "server.worker_timeout",
        Duration(),
        "30s",
        "The arbiter restarts the worker when its event loop sends no heartbeat for this long (min 1s).",
    ),
    Key(
        "server.workers",
        Workers(),
        1,
        'Worker processes of this node, acting as one broker (docs/cluster.rst "Several workers"); '
        '"auto" = the number of cores. They share every port; each worker owns a storage shard. '
        "With cluster.enabled each worker is an etcd member {node_id}/w{i}; with cluster.raft.enabled "
        "worker 0 is the node's Raft member and owns the replicated queues.",
    ),
    Key(
        "server.workers_transport",
        Enum("unix", "grpc"),
        "unix",
        "What carries batches between the workers: unix = length-prefixed frames on Unix sockets, a "
        "batch's items as the relay framed them, through a shared-memory ring per stream (docs/cluster.rst); "
        "grpc = C1's gRPC transport on unix: sockets (bench/workers_transport.py compares them).",
    ),
    Key(
        "server.workers_batch_max_size",
        Int(1, 65536),
        2048,
        "Most messages in one batch between the workers of this node (cluster.transport."
        "route_batch_max_size is the bound between nodes; on a node with cluster.enabled this one "
        "still bounds the batches between its own workers). A batch costs ~50 us of both workers' CPU whatever it holds; at 256 that "
        "was a third of what a forwarded message cost (bench/RESULTS.md).",
    ),
    Key("broker.max_message_size", Size(1), 1048576, "Largest PUBLISH payload accepted, in bytes."),
    Key(
        "broker.max_packet_size",
        Size(2),
        2097152,
        "Largest inbound packet, in bytes (checked from the fixed header).",
    ),
    Key(
        "broker.max_retained_messages",
        Int(0),
        10000,
        "Most retained topics, 0 = unlimited; when full, new retained topics are refused (logged), "
        "updates are allowed.",
    ),
    Key(
        "broker.max_inflight",
        Int(1, 65535),
        100,
        "Unacknowledged outbound QoS 1/2 messages per client; also the MQTT 5.0 Receive Maximum we announce.",
    ),
    Key("broker.max_queued_messages", Int(1), 1000, "Per-session queue bound, in messages."),
    Key("broker.max_queued_bytes", Size(1), "16MiB", "Per-session queue bound, in bytes."),
    Key(
        "broker.max_sessions",
        Int(0),
        100000,
        "Most sessions the node holds, online and offline, 0 = unlimited; past it a new client id is "
        "refused (3.1.1 CONNACK 3, 5.0 CONNACK 0x97) while known ids still reconnect. Reloadable.",
    ),
    Key(
        "broker.max_session_expiry",
        Duration(),
        "168h",
        "Cap of every session's expiry, 0 = no cap: 5.0 clients asking more are told the cap in CONNACK, "
        "3.1.1 clean session 0 sessions expire this long after their client left.",
    ),
    Key(
        "broker.queue_overflow",
        Enum("drop_new", "drop_oldest", "disconnect"),
        "drop_new",
        "What a full session queue does (drop_new evicts queued QoS 0 messages first).",
    ),
    Key(
        "broker.write_buffer_high",
        Size(1),
        "1MiB",
        "Base allowance of pending output per connection, in bytes: above it a client counts as slow "
        "unless it keeps reading and broker.output_memory_limit has room.",
    ),
    Key(
        "broker.output_memory_limit",
        Size(0),
        "256MiB",
        "Node-wide pending output connections may hold beyond broker.write_buffer_high while their "
        "clients keep reading (one client takes at most an eighth), 0 = none; a client that stops "
        "reading stays at its allowance, then its session queue policy applies.",
    ),
    Key("broker.max_keepalive", Int(0, 65535), 65535, "Largest keep alive a client may use, in seconds."),
    Key("broker.allow_zero_keepalive", Bool(), True, "Accept clients that set keep alive 0 (none)."),
    Key(
        "broker.park_after",
        Duration(),
        "5s",
        "Silence after which a connection parks: its greenlet ends and a bare I/O watcher waits for "
        "input, which keeps an idle connection under ~3 KB; when not 0 a connection also parks right "
        "after CONNECT (unless its keep-alive limit is shorter). 0 = never park: every connection "
        "keeps a greenlet (its stack and buffers). "
        "Shorter parks busy-then-quiet clients sooner (less memory per idle connection); the first "
        "packet after each pause is then served through the hub's parked path (a wake-up and a new "
        "greenlet) instead of by a waiting greenlet.",
    ),
    Key(
        "broker.shared_subscription_strategy",
        Enum("round_robin", "random", "least_inflight"),
        "round_robin",
        "How a $share group picks the member that gets a message.",
    ),
    Key("broker.sys_interval", Duration(), "10s", "$SYS/broker/... publish interval; 0 disables."),
    Key(
        "broker.max_qos",
        Int(0, 2),
        2,
        "Highest QoS accepted and granted (MQTT 5.0 Maximum QoS); a 5.0 PUBLISH above it gets DISCONNECT 0x9B.",
    ),
    Key(
        "broker.retain_available",
        Bool(),
        True,
        "Accept retained messages (MQTT 5.0 Retain Available); when false a retained PUBLISH gets 0x9A.",
    ),
    Key(
        "broker.max_topic_alias",
        Int(0, 65535),
        100,
        "Topic aliases a 5.0 client may define toward the broker (CONNACK Topic Alias Maximum); 0 = none.",
    ),
    Key(
        "broker.topic_alias_policy",
        Enum("none", "first_n", "lru"),
        "lru",
        "Outbound topic aliases to 5.0 clients that allow them: none, first_n (the first topics keep "
        "theirs) or lru (the least recently used alias is reassigned).",
    ),
    Key(
        "broker.response_information",
        Str(),
        "$response/%c",
        'MQTT 5.0 Response Information for clients that request it (%c = client id); "" = never sent.',
    ),
    Key(
        "auth.enhanced.method",
        Enum("", "SCRAM-SHA-256"),
        "",
        'MQTT 5.0 enhanced authentication method offered; "" = none (CONNECT with a method gets 0x8C).',
    ),
    Key(
        "auth.enhanced.credentials_file",
        Str(),
        "",
        "SCRAM credentials, one user:iterations:salt:stored_key:server_key line each "
        "(python -m fluxmq.broker.auth_enhanced USER).",
    ),
    Key(
        "auth.allow_anonymous",
        AutoBool(),
        "auto",
        'Accept clients without a user name; "auto" = only when neither auth.password_file nor auth.http.url is '
        "set, and then only on loopback listeners (a non-loopback MQTT or HTTP bridge listener refuses them "
        "with CONNACK 5/0x87 or 401 and a warning at start, as Mosquitto 2; true opens it).",
    ),
    Key(
        "auth.bind_client_id_to_username",
        AutoBool(),
        "auto",
        "A client id belongs to the user whose session holds it: another user (or an anonymous client) "
        "connecting with it is refused (CONNACK 0x87 / return code 5) instead of taking the session over; "
        '"auto" = on when auth.password_file or auth.http.url is set. Off: the session\'s queued messages '
        "are re-checked against the new user's read rules.",
    ),
    Key(
        "auth.password_file",
        Str(),
        "",
        'Mosquitto password file ($6$/$7$ hashes from mosquitto_passwd or fluxmq-passwd); re-read on reload; "" = none.',
    ),
    Key(
        "auth.acl_file",
        Str(),
        "",
        "Mosquitto ACL file (user, topic [read|write|readwrite|deny], pattern with %c/%u); re-read on reload; "
        '"" = none (everything allowed).',
    ),
    Key(
        "auth.http.url",
        Str(),
        "",
        'HTTP service asked (JSON POST) whether a client may connect; errors refuse (fail closed); "" = none. '
        "Plain http:// to a host that is not loopback sends passwords in clear (warned about at start).",
    ),
    Key(
        "auth.http.ca_file",
        Str(),
        "",
        'PEM CA bundle the https service\'s certificate is verified against; "" = the system CAs.',
    ),
    Key(
        "auth.http.cert_file",
        Str(),
        "",
        'PEM client certificate presented to the https service (mutual TLS); "" = none.',
    ),
    Key("auth.http.key_file", Str(), "", 'Private key of auth.http.cert_file; "" = in the certificate file.'),
    Key(
        "auth.http.timeout",
        Duration(),
        "2s",
        "Time the HTTP service has to answer before the request is refused.",
    ),
    Key(
        "auth.http.acl",
        Bool(),
        False,
        "Also ask the HTTP service whether a client may publish to a topic or subscribe to a filter (cached).",
    ),
    Key(
        "auth.http.cache_ttl", Duration(), "60s", "How long an allow decision of the HTTP service is reused."
    ),
    Key(
        "auth.http.cache_negative_ttl",
        Duration(),
        "5s",
        "How long a deny decision of the HTTP service is reused; 0 = not cached.",
    ),
    Key(
        "auth.http.cache_size",
        Int(0),
        10000,
        "Most HTTP decisions cached (least recently used dropped first); 0 = none.",
    ),
    Key(
        "limits.connect_rate",
        Float(0.0),
        0.0,
        "New connections per second from one IP address; more are closed at accept; 0 = no limit.",
    ),
    Key(
        "limits.connect_burst",
        Int(0),
        0,
        "Connections one IP address may open at once above limits.connect_rate; 0 = one second's worth.",
    ),
    Key(
        "limits.publish_rate",
        Float(0.0),
        0.0,
        "PUBLISH packets per second per client (over it: 5.0 DISCONNECT 0x96, 3.x disconnect); 0 = no limit.",
    ),
    Key(
        "limits.publish_burst",
        Int(0),
        0,
        "PUBLISH packets a client may send at once above limits.publish_rate; 0 = one second's worth.",
    ),
    Key(
        "limits.publish_bytes_rate",
        Size(0),
        0,
        "Payload bytes per second per client (over it: as limits.publish_rate); 0 = no limit.",
    ),
    Key(
        "limits.max_subscriptions",
        Int(0),
        0,
        "Subscriptions per client; more get SUBACK 0x97 (5.0) or 0x80 (3.x); 0 = no limit.",
    ),
    Key(
        "limits.max_topic_levels",
        Int(0),
        128,
        "Most levels in a topic name or filter, a guard against topics that are costly to match (over it: "
        "5.0 0x97, 3.x disconnect or SUBACK 0x80; HTTP bridge 400); 0 = no limit.",
    ),
    Key(
        "limits.max_topic_length",
        Int(0),
        0,
        "Longest topic name or filter in UTF-8 bytes (over it: as limits.max_topic_levels); 0 = no limit.",
    ),
    Key(
        "storage.type",
        Enum("memory", "lmdb"),
        "lmdb",
        "Storage backend: lmdb writes persistent sessions, queues, retained messages and wills through "
        "to disk; memory keeps them only in the process.",
    ),
    Key("storage.path", Str(allow_empty=False), "./data", "Data directory of the lmdb backend."),
    Key(
        "storage.sync",
        Enum("always", "batch", "none"),
        "batch",
        "always: fsync each group commit before its acks are sent; batch: commit per loop turn, fsync "
        "every storage.sync_interval (a killed process loses nothing, an OS crash the last interval); "
        "none: never fsync.",
    ),
    Key("storage.sync_interval", Duration(), "1s", "How often storage.sync batch fsyncs."),
    Key(
        "storage.map_size",
        Size(1 << 20),
        "1GiB",
        "Most bytes the lmdb store may hold; when reached, new stored messages are refused (0x97).",
    ),
    Key(
        "storage.max_queued_messages",
        Int(1),
        100000,
        "Offline queue bound of a persistent session (kept on disk), in messages.",
    ),
    Key(
        "storage.max_queued_bytes",
        Size(1),
        "100MiB",
        "Offline queue bound of a persistent session (kept on disk), in bytes; when full the oldest "
        "queued QoS 0 message is dropped, else the new message is (counted as queue_full).",
    ),
    Key(
        "queue_manager.auto_create",
        Bool(),
        True,
        "A $queue/{name} that matches no configured queue creates one with the defaults; false refuses "
        "it (PUBACK 0x90, SUBACK 0x8F).",
    ),
    Key(
        "queues",
        FieldsList(QUEUE_ITEM, "list of queues", unique="name"),
        [],
        "Durable queues: {name, topics, type, partitions, max_inflight, visibility_timeout, retention{max_age, "
        "max_length_messages, max_length_bytes, compact}, limits{max_message_size, max_depth, message_ttl}, "
        "retry{max_retries, initial_backoff, max_backoff, multiplier}, dlq{enabled, topic}, replication{enabled, group, "
        "mode, replication_factor, min_in_sync_replicas, ack_timeout}} (docs/queues.rst, docs/replication.rst).",
    ),
    Key(
        "log.level",
        Enum("trace", "debug", "info", "warn", "warning", "error", ignore_case=True),
        "info",
        "Least severe level written (warn = warning; trace is below debug).",
    ),
    Key(
        "log.debug",
        Bool(),
        False,
        "Hard override: log at debug whatever log.level says (also FLUXMQ_DEBUG=true).",
    ),
    Key("log.trace", Bool(), False, "Hard override: log at trace, above log.debug (also FLUXMQ_TRACE=true)."),
    Key(
        "log.format",
        Enum("text", "json"),
        "text",
        "text: timestamp, level, logger and key=value fields; json: one JSON object per line.",
    ),
    Key("log.file", Str(), "", 'Log file path; "" = stderr.'),
    Key("log.max_size_mb", Int(1), 100, "Rotate the log file when it reaches this size, in MiB."),
    Key("log.max_backups", Int(0), 7, "Rotated files kept; 0 keeps none (the file is truncated)."),
    Key("log.compress", Bool(), True, "gzip rotated log files."),
    Key(
        "log.throttling.enabled",
        Bool(),
        True,
        "Drop the lines a logger writes beyond rate/burst, then log how many were dropped.",
    ),
    Key(
        "log.throttling.rate",
        Float(0.0, exclusive_minimum=True),
        500.0,
        "Lines per second per logger, sustained.",
    ),
    Key("log.throttling.burst", Int(1), 50, "Lines a logger may write at once above the rate."),
    Key(
        "bridges",
        FieldsList(BRIDGE_ITEM, "list of bridges"),
        [],
        "MQTT bridges to peer brokers: {name, address, protocol_version, client_id, clean_start, keepalive, "
        "username, password_env | password_file, tls{ca_file, cert_file, key_file, insecure}, message_validity, "
        "reconnect{initial, max}, topics[{pattern, direction, qos, local_prefix, remote_prefix}], "
        "max_queued_messages} (docs/bridges.rst).",
    ),
    Key(
        "cluster.enabled",
        Bool(),
        False,
        "Run as a node of a cluster (docs/cluster.rst); false: nothing of the cluster is loaded.",
    ),
    Key("cluster.node_id", Str(), "", "This node's unique id in the cluster; required when cluster.enabled."),
    Key(
        "cluster.drain_timeout",
        Duration(),
        "5s",
        "Graceful stop (SIGTERM): how long the node keeps handing its sessions to the nodes its clients "
        "reconnect to, and the rest to live peers, before it releases what is left (within server.shutdown_timeout); "
        "a worker stopped alone (server.workers) stays up at most this long for the sessions taken over from it.",
    ),
    Key(
        "cluster.transport.bind_addr",
        Addr(),
        "127.0.0.1:7948",
        "gRPC listener other nodes connect to (they learn it from etcd membership or their static peers); "
        "with server.workers N, worker i listens on this port + i.",
    ),
    Key(
        "cluster.transport.peers",
        PeerMap(),
        {},
        "Static peers, node_id: host:port of their bind_addr (this node's own id may be listed; it is skipped).",
    ),
    Key(
        "cluster.transport.route_batch_max_size", Int(1, 65536), 256, "Most messages in one batch to a peer."
    ),
    Key(
        "cluster.transport.route_batch_max_delay",
        Duration(),
        "5ms",
        "Longest a forwarded message waits for its batch to fill (0 = send at the end of the loop turn).",
    ),
    Key(
        "cluster.transport.route_batch_flush_workers",
        Int(1, 1024),
        4,
        "Batches in flight to one peer (sent, not acknowledged yet).",
    ),
    Key(
        "cluster.transport.route_publish_timeout",
        Duration(),
        "15s",
        "A batch not acknowledged within this: the peer's stream is dropped and re-opened, unacknowledged "
        "batches sent again (the peer skips those it applied).",
    ),
    Key(
        "cluster.transport.interest_sync_timeout",
        Duration(),
        "2s",
        "SUBSCRIBE with a filter new to this node: longest wait for connected peers to acknowledge it "
        "before the SUBACK (0 = do not wait).",
    ),
    Key(
        "cluster.transport.max_queued_messages",
        Int(1),
        100000,
        "Messages waiting for one peer; past it (or max_queued_bytes) new ones to that peer are dropped and counted.",
    ),
    Key(
        "cluster.transport.max_queued_bytes",
        Size(1),
        67108864,
        "Bytes of encoded messages waiting for one peer (see max_queued_messages).",
    ),
    Key(
        "cluster.transport.tls_enabled",
        Bool(),
        False,
        "Mutual TLS between nodes: cert_file, key_file and ca_file are required.",
    ),
    Key(
        "cluster.transport.cert_file", Str(), "", "PEM certificate this node presents (as server and client)."
    ),
    Key("cluster.transport.key_file", Str(), "", "Private key of cert_file."),
    Key(
        "cluster.transport.ca_file", Str(), "", "PEM CA bundle the peers' certificates are verified against."
    ),
    Key(
        "cluster.etcd.binary",
        Str(),
        "",
        'The etcd 3.4+ server the node runs as its member; "" = etcd on PATH (Debian\'s etcd-server).',
    ),
    Key(
        "cluster.etcd.data_dir",
        Str(allow_empty=False),
        "./data/etcd",
        "Data directory of this node's etcd member (its PID file and log sit beside it).",
    ),
    Key(
        "cluster.etcd.bind_addr",
        Addr(),
        "127.0.0.1:2380",
        "Peer address of this node's etcd member (etcd to etcd).",
    ),
    Key(
        "cluster.etcd.client_addr",
        Addr(),
        "127.0.0.1:2379",
        "Client address of this node's etcd member; the node connects to it there.",
    ),
    Key(
        "cluster.etcd.initial_cluster",
        InitialCluster(),
        "",
        'Every member as node_id=http://host:peer_port, comma-separated, this node included; "" = this member alone.',
    ),
    Key(
        "cluster.etcd.bootstrap",
        Bool(),
        True,
        "true: the members of initial_cluster form a new etcd cluster; false: join an existing one.",
    ),
    Key(
        "cluster.etcd.endpoints",
        EtcdEndpoints(),
        [],
        "Client URLs of an external etcd cluster; when set the node runs no etcd member of its own.",
    ),
    Key(
        "cluster.etcd.prefix",
        Str(allow_empty=False),
        "/fluxmq/",
        "Key prefix of this cluster's data in etcd (several clusters may share one etcd under different prefixes).",
    ),
    Key(
        "cluster.etcd.hybrid_retained_size_threshold",
        Size(),
        "1KiB",
        "Retained payloads up to this size are replicated through etcd; larger ones stay on their node "
        "and are fetched over the transport.",
    ),
    Key(
        "cluster.etcd.lease_ttl",
        LeaseTTL(),
        "10s",
        "TTL of the node's etcd lease (renewed every third of it): a dead node's sessions and leadership "
        "are released this long after it stops renewing.",
    ),
    Key(
        "cluster.etcd.request_timeout",
        Duration(),
        "5s",
        "Time one etcd request may take, retries on the other endpoints included.",
    ),
    Key(
        "cluster.etcd.start_timeout",
        Duration(),
        "60s",
        "Time the node waits at start for etcd to answer (a new cluster needs a quorum of its members up).",
    ),
    Key(
        "cluster.etcd.tls.enabled",
        Bool(),
        False,
        "https between the node and etcd, and for the member's client and peer listeners.",
    ),
    Key(
        "cluster.etcd.tls.ca_file",
        Str(),
        "",
        "PEM CA bundle etcd's certificate is verified against (and, for the member, client certificates).",
    ),
    Key(
        "cluster.etcd.tls.cert_file",
        Str(),
        "",
        "PEM certificate the node presents to etcd (and the member serves).",
    ),
    Key("cluster.etcd.tls.key_file", Str(), "", "PEM private key of cert_file."),
    Key(
        "cluster.routes",
        FieldsList(CLUSTER_ROUTE_ITEM, "list of routes"),
        [],
        "Reference 001 cluster routes to peer fluxmq nodes, mirroring every topic: {host, port, node_id, "
        "username, password_env | password_file, message_validity, tls, ...} (docs/bridges.rst).",
    ),
    Key(
        "cluster.raft.enabled",
        Bool(),
        False,
        "Start the Raft groups that replicate durable queues whose replication.enabled is true "
        "(docs/replication.rst); a replicated queue with this off is a config error.",
    ),
    Key(
        "cluster.raft.bind_addr",
        Addr(),
        "127.0.0.1:7100",
        "host:port of this node's member of the default group; the peers dial it as written. Not set "
        "and the members come from etcd: cluster.transport.bind_addr's host, port 7100.",
    ),
    Key(
        "cluster.raft.peers",
        StrList(),
        [],
        "host:port of every member of the default group (this node's may be listed too); [] with etcd: "
        "each node announces its bind_addr in etcd and the members are agreed there (docs/replication.rst).",
    ),
    Key(
        "cluster.raft.expected_members",
        Int(0, 15),
        0,
        "Members from etcd (no peers): how many nodes form the Raft group, the first by node id once "
        "that many are live; 0 = the nodes named in cluster.etcd.initial_cluster, else the largest "
        "replication_factor. Agreed once and kept in etcd.",
    ),
    Key(
        "cluster.raft.auto_provision_groups",
        Bool(),
        True,
        "A queue naming a group not in cluster.raft.groups gets one on derived ports (bind_addr's and "
        "the peers' ports + n); false makes it a config error.",
    ),
    Key(
        "cluster.raft.write_policy",
        Enum("forward", "reject", "local"),
        "forward",
        "A publish to a replicated queue on a follower: forward it to the leader (acknowledged once "
        "committed), reject it (5.0 PUBACK 0x83 with a leader user property; 3.1.1 disconnect), or "
        "local (acknowledged at once, not durable across nodes).",
    ),
    Key(
        "cluster.raft.distribution_mode",
        Enum("replicate", "forward"),
        "forward",
        "How a replicated queue reaches consumers on any replica: forward (the leader decides who gets "
        "what; a delivery to a member on another node is a lease in the Raft log, delivered by that node "
        "from its replica) or replicate (docs/replication.rst). Settlements are replicated either way.",
    ),
    Key(
        "cluster.raft.groups",
        GroupsMap(RAFT_GROUP),
        {},
        "Replication groups: {name: {bind_addr, peers}}; 'default' overrides bind_addr/peers above.",
    ),
    Key(
        "cluster.raft.compaction_entries",
        Int(2),
        5000,
        "Raft log entries (each a batch of a loop turn's writes) a group keeps before a snapshot of its "
        "queues replaces them: bounds the journal and the restart replay; a replica behind the "
        "snapshot is sent it (docs/replication.rst).",
    ),
    Key(
        "cluster.raft.compression",
        Int(0, 9),
        0,
        "zlib level of the Raft frames this node sends (every peer reads any level): 0 = stored, the "
        "bytes as they are, the least CPU (members on a LAN); 1-9 = fewer bytes for more CPU per "
        "entry on every member (slow links between members; docs/replication.rst).",
    ),
    Key(
        "cluster.raft.advertise_mqtt_addr",
        Str(),
        "",
        "host:port MQTT clients reach this node at, named by the leader user property of a "
        'write_policy reject refusal; "" = server.tcp.plain.addr (else tls.addr), its host replaced by '
        "bind_addr's when it is a wildcard. The leader announces it in its delivery claim.",
    ),
    Key(
        "cluster.raft.password",
        Str(),
        "",
        "Shared secret of the Raft transport: pysyncobj then encrypts and authenticates every message "
        "(Fernet: AES-CBC + HMAC-SHA256, key from PBKDF2); a peer without it cannot join. Combines "
        "with cluster.raft.tls (runs inside it; docs/replication.rst). Environment only.",
        secret=True,
    ),
    Key(
        "cluster.raft.tls.enabled",
        Bool(),
        False,
        "TLS on every Raft connection of every group (provisioned groups' shifted ports too); needs "
        'cert_file, key_file and ca_file (docs/replication.rst, "Security of the Raft transport").',
    ),
    Key(
        "cluster.raft.tls.cert_file",
        Str(),
        "",
        "PEM certificate (chain) this node presents, as listener and when it dials a peer: it needs the "
        "serverAuth and clientAuth uses if it lists extended key usages.",
    ),
    Key("cluster.raft.tls.key_file", Str(), "", "PEM private key of cert_file."),
    Key(
        "cluster.raft.tls.ca_file",
        Str(),
        "",
        "PEM CA bundle the peers' certificates are verified against (both directions); use a CA that "
        "signs only this cluster's nodes: any certificate it signed is a trusted member.",
    ),
    Key(
        "cluster.raft.tls.client_auth",
        Enum("require", "none"),
        "require",
        "require: a dialling peer must present a certificate verified against ca_file before anything it "
        "sends is read (mutual TLS); none: any TLS client is read (then set cluster.raft.password).",
    ),
    Key(
        "cluster.raft.tls.min_version",
        Enum("TLS1.2", "TLS1.3"),
        "TLS1.2",
        "Oldest TLS version accepted and offered.",
    ),
    Key(
        "cluster.raft.tls.cipher_suites",
        StrList(),
        [],
        "TLS 1.2 suites by IANA/Go or OpenSSL name; [] = OpenSSL defaults; TLS 1.3 suites are not settable.",
    ),
    Key(
        "cluster.raft.tls.server_name",
        Str(),
        "",
        "Name every peer's certificate must carry (SAN); \"\" = the host of the peer's Raft address as written "
        "in peers (an IP address must then be an IP SAN).",
    ),
    Key("webhook.enabled", Bool(), False, "POST broker events to webhook.endpoints."),
    Key(
        "webhook.queue_size",
        Int(1),
        10000,
        "Events waiting for delivery (all endpoints); when full, drop_policy decides and the drop is counted.",
    ),
    Key(
        "webhook.drop_policy",
        Enum("oldest", "newest"),
        "oldest",
        "What a full queue drops: the oldest waiting event or the new one.",
    ),
    Key("webhook.workers", Int(1, 1000), 8, "Greenlets sending requests (one request each at a time)."),
    Key(
        "webhook.include_payload",
        Bool(),
        False,
        "message.published carries the payload (base64) besides its size.",
    ),
    Key(
        "webhook.shutdown_timeout",
        Duration(),
        "5s",
        "How long a stopping node keeps sending queued events before it drops the rest (counted).",
    ),
    Key("webhook.defaults.timeout", Duration(), "5s", "Time an endpoint has to answer one request."),
    Key(
        "webhook.defaults.retry.max_attempts",
        Int(1, 100),
        3,
        "Attempts per event and endpoint, the first included.",
    ),
    Key("webhook.defaults.retry.initial_interval", Duration(), "1s", "Pause before the second attempt."),
    Key("webhook.defaults.retry.max_interval", Duration(), "30s", "Longest pause between attempts."),
    Key("webhook.defaults.retry.multiplier", Float(1.0), 2.0, "Each pause is the previous one times this."),
    Key(
        "webhook.defaults.circuit_breaker.failure_threshold",
        Int(1),
        5,
        "Consecutive failed requests that open an endpoint's breaker (it then gets no events until reset_timeout).",
    ),
    Key(
        "webhook.defaults.circuit_breaker.reset_timeout",
        Duration(),
        "60s",
        "How long a breaker stays open before one trial request (half-open) may close it.",
    ),
    Key(
        "webhook.endpoints",
        FieldsList(WEBHOOK_ENDPOINT, "list of endpoints"),
        [],
        "Receivers: [{name, url, events, topic_filters, headers, timeout, retry, secret_env | secret_file, "
        "ca_file}] (docs/webhooks.rst); from the environment as JSON.",
    ),
)


class Schema:
    """A validated set of keys with the lookups the loader needs (sections, env names, defaults)."""

    def __init__(
        self,
        keys: Iterable[Key],
        section_docs: Mapping[str, str] | None = None,
        env_allowed: Iterable[str] = ENV_ALLOWED,
    ) -> None:
        self.keys: dict[str, Key] = {}
        self.section_docs = dict(section_docs or {})
        self.env_allowed = frozenset(env_allowed)
        self.sections: dict[str, None] = {}  # every section prefix, in order of first appearance
        self.env: dict[str, Key] = {}
        self.defaults: dict[str, object] = {}
        for key in keys:
            self._add(key)
        for name in self.sections:
            if name in self.keys:
                raise ValueError(f"schema: {name} is both a key and a section")

    def _add(self, key: Key) -> None:
        if not _NAME.fullmatch(key.name) or ("." not in key.name and not isinstance(key.type, FieldsList)):
            raise ValueError(
                f"schema: bad key name {key.name!r} (want section.key, lowercase; a top-level "
                "key only for a list of mappings)"
            )
        if key.name in self.keys:
            raise ValueError(f"schema: duplicate key {key.name}")
        parts = key.name.split(".")
        if RESERVED_NAMES.intersection(parts):
            raise ValueError(f"schema: {key.name} uses a reserved name {sorted(RESERVED_NAMES)}")
        clash = self.env.get(key.env)
        if clash is not None:
            raise ValueError(f"schema: {key.name} and {clash.name} both map to {key.env}")
        if key.env in self.env_allowed:
            raise ValueError(f"schema: {key.env} is in the env allow-list; remove it from there")
        try:
            value = key.type.from_yaml(key.default)
        except ValueError:
            raise ValueError(f"schema: default of {key.name} is not {key.type.expected}") from None
        for i in range(1, len(parts)):
            self.sections.setdefault(".".join(parts[:i]))
        self.keys[key.name] = key
        self.env[key.env] = key
        self.defaults[key.name] = value

    def suggest(self, name: str) -> str | None:
        """The known key or section closest to ``name`` (difflib), or None."""
        candidates = list(self.keys) + list(self.sections)
        leaf = name.rpartition(".")[2]
        found = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
        if not found and leaf:
            # A known key put under the wrong section: match on the last part alone.
            by_leaf = {k.rpartition(".")[2]: k for k in candidates}
            near = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.8)
            found = [by_leaf[near[0]]] if near else []
        return found[0] if found else None

    def suggest_env(self, name: str) -> str | None:
        """The known environment variable closest to ``name``, or None."""
        # Compare without the shared prefix, which would make every FLUXMQ_ name look close.
        strip = len(ENV_PREFIX)
        found = difflib.get_close_matches(name[strip:], [env[strip:] for env in self.env], n=1, cutoff=0.65)
        return ENV_PREFIX + found[0] if found else None

    def tree(self) -> dict[str, object]:
        """Keys nested by section, in declaration order (leaf values are the Key objects)."""
        root: dict[str, object] = {}
        for key in self.keys.values():
            node = root
            for part in key.name.split(".")[:-1]:
                node = node.setdefault(part, {})  # type: ignore[assignment]
            node[key.leaf] = key
        return root

    def yaml(self) -> str:
        """``conf/fluxmq.yaml``: every key with its default and a comment (secrets as comments)."""
        out = [
            "# fluxmq configuration: every key at its default value.",
            "# Generated by `python -m fluxmq.config.schema --yaml` from fluxmq/config/schema.py",
            "# (edit the schema, then regenerate; a test checks this file is current).",
            "#",
            "# Any key can also be set from the environment, FLUXMQ_ + the key uppercased with dots",
            "# as underscores (FLUXMQ_BROKER_MAX_INFLIGHT=50), or on the command line",
            "# (--set broker.max_inflight=50). Precedence: command line > environment > this file > defaults.",
            "# Durations: 250ms, 10s, 5m, 1h30m or a number of seconds. Sizes: bytes or 64KiB, 1MiB, 1GiB, 10MB.",
        ]

        def emit(node: dict[str, object], prefix: str, depth: int) -> None:
            indent = "  " * depth
            for name, child in node.items():
                dotted = f"{prefix}{name}"
                if isinstance(child, Key):
                    if child.secret:
                        out.append(f"{indent}# {name}: secret, set only from the environment: {child.env}")
                        continue
                    out.append(f"{indent}# {child.doc} [{child.type.summary}]")
                    out.append(f"{indent}{name}: {render_default(child.default)}")
                else:
                    doc = self.section_docs.get(dotted)
                    if depth == 0:
                        out.append("")
                    if doc:
                        out.append(f"{indent}# {doc}")
                    out.append(f"{indent}{name}:")
                    emit(child, dotted + ".", depth + 1)  # type: ignore[arg-type]

        emit(self.tree(), "", 0)
        return "\n".join(out) + "\n"

    def rst(self) -> str:
        """``docs/config-keys.rst``: the key reference, one entry per key, grouped by section."""
        title = "Configuration keys"
        out = [
            ".. Generated by ``python -m fluxmq.config.schema --rst`` from fluxmq/config/schema.py; do not edit.",
            "",
            title,
            "=" * len(title),
            "",
            "fluxmq reads a YAML file (``fluxmq-node --config FILE``; ``conf/fluxmq.yaml`` lists every key at",
            "its default), then the environment, then ``--set key=value`` options. Precedence: command line >",
            "environment > file > defaults. The loader is strict: an unknown key, a value of the wrong type",
            "or out of range, or an unknown ``FLUXMQ_`` variable stops the node with one line naming the key,",
            "the file and line, what was expected and what was found.",
            "",
            "Environment variables are ``FLUXMQ_`` followed by the key uppercased with dots as underscores",
            "(``broker.max_inflight`` is ``FLUXMQ_BROKER_MAX_INFLIGHT``). Besides those, only these",
            "may carry the prefix: " + ", ".join(f"``{name}``" for name in sorted(self.env_allowed)) + ".",
            "``FLUXMQ_DEBUG=true`` and ``FLUXMQ_TRACE=true`` set ``log.debug`` and ``log.trace`` (hard level",
            "overrides). Any other ``FLUXMQ_`` variable stops the node, so a typo is not silently ignored; to",
            "pass unrelated ones (Kubernetes injects ``FLUXMQ_SERVICE_HOST``, ``FLUXMQ_PORT_1883_TCP``... for a",
            "Service named fluxmq), list them in ``FLUXMQ_ENV_IGNORE``, comma-separated, a trailing ``*``",
            "matching a prefix: ``FLUXMQ_ENV_IGNORE='FLUXMQ_SERVICE_*,FLUXMQ_PORT*'``.",
            "Values from the environment and ``--set`` are text: booleans accept ``true``/``false``/``1``/",
            "``0``/``yes``/``no``; in the file booleans are YAML ``true``/``false``, and YAML 1.1's",
            "``yes``/``no``/``on``/``off`` as the Go FluxMQ reads them.",
            "",
            "A config written from the reference documents starts: sections and keys they document that",
            "fluxmq does not implement yet (``cluster.etcd``, ``cluster.raft``, ``queue``, a TLS listener's",
            '``prefer_server_cipher_suites``) are ignored with a "not implemented yet" warning naming the',
            "file and line, and ``storage.type: badger`` is read as ``lmdb`` (fluxmq.config.compat).",
            "``fluxmq-node --check`` reports every problem (one line each), including unreadable password,",
            "ACL and credentials files, certificates and keys the configuration names.",
            "",
            "Durations are ``250ms``, ``10s``, ``5m``, ``1h``, ``1h30m`` (units ``ns us ms s m h``) or a plain",
            "number of seconds. Sizes are plain bytes or ``64KiB``, ``1MiB``, ``1GiB`` (powers of 1024),",
            "``10MB`` (powers of 1000). Addresses are ``host:port``, ``:port`` (all IPv4 interfaces) or",
            "``[v6addr]:port``.",
        ]
        by_section: dict[str, list[Key]] = {}
        for key in self.keys.values():
            # A top-level key (a structured list such as ``bridges``) gets a heading of its own.
            by_section.setdefault(key.section or key.name, []).append(key)
        tops = list(dict.fromkeys(name.partition(".")[0] for name in by_section))
        for top in tops:
            # A top-level section's own keys first, then its sub-sections: rst headings nest.
            subs = [name for name in by_section if name.startswith(top + ".")]
            for section, underline in [(top, "-")] + [(sub, "~") for sub in subs]:
                out += ["", section, underline * len(section), ""]
                doc = self.section_docs.get(section)
                if doc:
                    out += [doc, ""]
                for key in by_section.get(section, []):
                    out += _rst_key(key)
        while out[-1] == "":
            out.pop()
        return "\n".join(out) + "\n"

    def readme_table(self) -> str:
        """The compact key table README.rst carries between its CONFIG KEYS markers."""
        out = [
            ".. list-table::",
            "   :header-rows: 1",
            "   :widths: 35 20 45",
            "",
            "   * - key",
            "     - default",
            "     - meaning",
        ]
        for key in self.keys.values():
            default = "(environment only)" if key.secret else f"``{render_default(key.default)}``"
            out += [f"   * - ``{key.name}``", f"     - {default}", f"     - {key.doc}"]
        return "\n".join(out) + "\n"


README_BEGIN = ".. BEGIN CONFIG KEYS (generated: python -m fluxmq.config.schema --update-readme README.rst)"
README_END = ".. END CONFIG KEYS"


def readme_with_table(text: str, table: str) -> str:
    """README text with the block between the CONFIG KEYS markers replaced by ``table``."""
    begin = text.index(README_BEGIN) + len(README_BEGIN)
    end = text.index(README_END, begin)
    return text[:begin] + "\n\n" + table + "\n" + text[end:]


def _rst_key(key: Key) -> list[str]:
    default = (
        "none (secret: set only from the environment)" if key.secret else f"``{render_default(key.default)}``"
    )
    out = [
        f"``{key.name}``",
        f"   {key.doc}",
        "",
        f"   :type: {key.type.summary}",
        f"   :default: {default}",
        f"   :env: ``{key.env}``",
        "",
    ]
    if isinstance(key.type, FieldsList):
        out += ["   Fields of each item:", ""] + _rst_fields(key.type.item, "   ") + [""]
    return out


def _rst_fields(fields: Fields, indent: str) -> list[str]:
    """A bullet per field of a structured item (nested mappings and lists indented below)."""
    out = []
    for name, field in fields.fields.items():
        if field.refuse:
            out.append(f"{indent}- ``{name}``: refused ({field.refuse})")
            continue
        if field.required:
            default = "required"
        elif isinstance(field.type, FieldsList):
            default = f"default ``{render_default(field.default)}``"
        elif isinstance(field.type, Fields):
            default = "absent by default" if field.default is None else "defaults below"
        else:
            default = f"default ``{render_default(field.default)}``"
        out.append(f"{indent}- ``{name}`` ({field.type.summary}; {default}): {field.doc}")
        nested = field.type.item if isinstance(field.type, FieldsList) else field.type
        if isinstance(nested, Fields):
            out += [""] + _rst_fields(nested, indent + "  ") + [""]
    return out


def render_default(value: object) -> str:
    """A default as YAML source: strings double-quoted, booleans true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


SCHEMA = Schema(KEYS, SECTION_DOCS)


def main(argv: list[str] | None = None) -> int:
    """``python -m fluxmq.config.schema --rst|--yaml|--update-readme README.rst``: files made from the schema."""
    parser = argparse.ArgumentParser(prog="python -m fluxmq.config.schema", description=main.__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--rst", action="store_true", help="print docs/config-keys.rst")
    group.add_argument("--yaml", action="store_true", help="print conf/fluxmq.yaml")
    group.add_argument("--update-readme", metavar="README", help="rewrite the key table in README.rst")
    args = parser.parse_args(argv)
    if args.update_readme:
        with open(args.update_readme, encoding="utf-8") as f:
            text = f.read()
        with open(args.update_readme, "w", encoding="utf-8") as f:
            f.write(readme_with_table(text, SCHEMA.readme_table()))
        return 0
    sys.stdout.write(SCHEMA.rst() if args.rst else SCHEMA.yaml())
    return 0


if __name__ == "__main__":
    sys.exit(main())
