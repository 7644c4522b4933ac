"""BrokerService: one broker and its listeners, hosted inside the node's gevent worker."""

from __future__ import annotations

import gc
import ipaddress
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import gevent

from fluxmq.auth.limits import PublishLimits
from fluxmq.auth.service import AuthService, AuthSettings
from fluxmq.bridge import Bridges, bridges_from_config
from fluxmq.broker.auth_enhanced import authenticators_from_config
from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.broker.sys_topics import SysTopics
from fluxmq.coap.bridge import CoapBridge
from fluxmq.coap.dtls import CoapDTLSListener, server_context
from fluxmq.coap.listener import CoapUDPListener
from fluxmq.coap.settings import CoapSettings
from fluxmq.config import SCHEMA, parse_addr
from fluxmq.log import setup_logging
from fluxmq.node.heap_trim import HeapTrim
from fluxmq.protocol.connection import RELAY
from fluxmq.protocol.flush import FlushScheduler
from fluxmq.protocol.settings import ProtocolSettings
from fluxmq.storage import Storage, open_storage
from fluxmq.transport.tcp import TCPListener
from fluxmq.transport.tls import TLSHandshake
from fluxmq.transport.websocket import WebSocketUpgrade
from fluxmq.webhook import WebhookDispatcher, WebhookSettings

log = logging.getLogger("fluxmq.node")

# broker.* keys of the shared SessionLimits: every session reads them per message, so they apply at once.
RELOADABLE_LIMITS = frozenset(
    {"broker.max_queued_messages", "broker.max_queued_bytes", "broker.queue_overflow"}
)


#: the call to worker 0 (the node's Raft member) for its groups' status (several workers)
RAFT_STATUS_KIND = "raft.status"
#: ... and for a member change (admin API); answered once committed (MEMBER_CHANGE_TIMEOUT, 10 s),
#: an add through etcd after the joining node answers too (forming.JOIN_WAIT, 20 s)
RAFT_MEMBER_KIND = "raft.member"
MEMBER_CALL_TIMEOUT = 35.0

#: sessions (and retained messages) restored between two yields to the hub: about 10 ms of work
RESTORE_SLICE = 500


def load_and_restore(storage: Storage, broker: Broker) -> None:
    """Load the store in the hub's threadpool and rebuild it in the broker in slices, yielding to
    the hub between them: however large the store, the hub keeps running (above all the worker's
    heartbeat to the arbiter, which would otherwise kill and restart the worker in a loop)."""
    # Start-up creates millions of long-lived objects: a cyclic collection meanwhile finds no
    # garbage and holds the GIL (and so the hub) for hundreds of milliseconds each time.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        if storage.durable:
            state = gevent.get_hub().threadpool.apply(storage.load)
        else:
            state = storage.load()
        broker.restore(state, pause=_yield_to_hub, slice_size=RESTORE_SLICE)
        del state
    finally:
        # What start-up built (modules, classes, the restored store) lives as long as the node or its
        # sessions: out of the collector's generations (still freed by reference counting), so neither
        # re-enabling the collector nor a later full collection walks it while the hub waits. Even with
        # an empty store a full collection of the node walks ~20 ms of objects, and messages that live
        # a while (a durable queue's in-flight window) trigger one every ~10,000 messages: frozen,
        # 1 ms (bench/RESULTS.md, "Queue hot path, fourth pass").
        gc.freeze()
        if was_enabled:
            gc.enable()


def _yield_to_hub() -> None:
    # Not sleep(0): that only runs callbacks, and the loop would not run due timers (the heartbeat).
    gevent.sleep(0.001)


def _flat(config) -> dict[str, Any]:
    """Every schema key of ``config`` -> its value."""
    return {name: config.get(name) for name in SCHEMA.keys}


def broker_settings(config) -> BrokerSettings:
    """The broker's settings from the ``broker`` config section."""
    b = config.broker
    return BrokerSettings(
        max_inflight=b.max_inflight,
        max_queued_messages=b.max_queued_messages,
        max_queued_bytes=b.max_queued_bytes,
        queue_overflow=b.queue_overflow,
        max_retained_messages=b.max_retained_messages,
        shared_subscription_strategy=b.shared_subscription_strategy,
        max_qos=b.max_qos,
        retain_available=b.retain_available,
        persistent_max_queued_messages=config.storage.max_queued_messages,
        persistent_max_queued_bytes=config.storage.max_queued_bytes,
        max_sessions=b.max_sessions,
        max_session_expiry=math.ceil(b.max_session_expiry),
    )


def protocol_settings(config, listener, refuse_anonymous: bool = False) -> ProtocolSettings:
    """The MQTT protocol settings of one listener."""
    b = config.broker
    return ProtocolSettings(
        max_packet_size=b.max_packet_size,
        max_message_size=b.max_message_size,
        connect_timeout=config.server.connect_timeout,
        read_timeout=listener.read_timeout,
        write_timeout=listener.write_timeout,
        max_keepalive=b.max_keepalive,
        allow_zero_keepalive=b.allow_zero_keepalive,
        park_after=b.park_after,
        write_buffer_high=b.write_buffer_high,
        max_inflight=b.max_inflight,
        max_qos=b.max_qos,
        retain_available=b.retain_available,
        max_topic_alias=b.max_topic_alias,
        topic_alias_policy=b.topic_alias_policy,
        response_information=b.response_information,
        authenticators=authenticators_from_config(
            config.auth.enhanced.method, config.auth.enhanced.credentials_file
        ),
        refuse_anonymous=refuse_anonymous,
    )


# The MQTT listeners: (name in logs, config section). Each is off when its addr is "".
MQTT_LISTENERS = (
    ("tcp", "server.tcp.plain"),
    ("tls", "server.tcp.tls"),
    ("mtls", "server.tcp.mtls"),
    ("ws", "server.websocket.plain"),
    ("wss", "server.websocket.tls"),
)


# Listeners a client reaches without an MQTT or HTTP user name (every MQTT and HTTP bridge listener
# but the mTLS ones, whose certificate identifies the client).
ANONYMOUS_SURFACES = (
    *(section for name, section in MQTT_LISTENERS if name != "mtls"),
    "server.http.plain",
    "server.http.tls",
    "server.coap.plain",
    "server.coap.dtls",
)


def _is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name may resolve anywhere


def anonymous_exposure(config) -> list[str]:
    """The address keys of listeners bound to a non-loopback address that refuse anonymous clients
    because nobody decided otherwise (``auth.allow_anonymous`` left at ``auto``, no password file and
    no HTTP auth service): Mosquitto 2's rule. The node starts; ``warn_anonymous_exposure`` says so
    at start, and each of these listeners refuses clients it cannot identify (``refuse_anonymous``
    of its ProtocolSettings, ``HTTPBridge.exposed`` for the bridge). The bind address decides, not
    the peer's: a loopback client of a ``0.0.0.0`` listener is refused too."""
    a = config.auth
    if a.allow_anonymous != "auto" or a.password_file or a.http.url:
        return []  # anonymous is decided explicitly, or refused because credentials are configured
    exposed = []
    for section in ANONYMOUS_SURFACES:
        lc = _section(config, section)
        if not lc.addr:
            continue
        if "ca_file" in lc and lc.ca_file and lc.client_auth in ("", "require"):
            continue  # a verified client certificate is required: not anonymous
        if "psk_file" in lc and lc.psk_file and not lc.cert_file:
            continue  # pre-shared keys only: every DTLS client has an identity
        if not _is_loopback(parse_addr(lc.addr)[0]):
            exposed.append(f"{section}.addr")
    return exposed


# What an operator sets to let clients in on a network listener (the warning, --check, the refusals).
ANONYMOUS_FIX = (
    "set auth.allow_anonymous: true to accept them, or auth.password_file "
    "or auth.http.url to check user names"
)


def anonymous_exposure_warnings(config) -> list[str]:
    """One line per ``anonymous_exposure`` listener (``--check`` prints them as warnings)."""
    return [
        f"{key}: {config.get(key)!r} is a network address: anonymous clients are refused there "
        f"(Mosquitto 2's default); {ANONYMOUS_FIX}"
        for key in anonymous_exposure(config)
    ]


def warn_anonymous_exposure(config) -> None:
    """At start: one warning log line per listener that refuses anonymous clients (not an error)."""
    for key in anonymous_exposure(config):
        log.warning(
            "anonymous_refused_on_network_listener",
            extra={
                "listener": _LISTENER_NAMES.get(key.removesuffix(".addr"), key),
                "key": key,
                "addr": config.get(key),
                "fix": ANONYMOUS_FIX,
            },
        )


# The listener names the logs use for each anonymous surface.
_LISTENER_NAMES = {
    **{section: name for name, section in MQTT_LISTENERS},
    "server.http.plain": "http",
    "server.http.tls": "http_tls",
}


def stream_factory(config, name: str, section: str):
    """The per-connection handshake of a listener: TLS, WebSocket, both (wss), or None (plain TCP).

    Builds the SSLContext now, so a bad certificate path or TLS setting is a ConfigError at start.
    """
    lc = _section(config, section)
    timeout = config.server.connect_timeout

    def origin(leaf: str) -> str:
        return config.origin(f"{section}.{leaf}")

    tls = TLSHandshake.from_config(section, lc, timeout, name, origin) if "cert_file" in lc else None
    if "path" in lc:
        return WebSocketUpgrade.from_config(section, lc, timeout, name, origin, inner=tls)
    return tls


def auth_settings(config) -> AuthSettings:
    """The ``auth.*`` and ``limits.*`` keys as the plain settings of an AuthService."""
    a, h, lim = config.auth, config.auth.http, config.limits
    return AuthSettings(
        password_file=a.password_file,
        acl_file=a.acl_file,
        allow_anonymous=None if a.allow_anonymous == "auto" else a.allow_anonymous,
        bind_client_ids=None if a.bind_client_id_to_username == "auto" else a.bind_client_id_to_username,
        http_url=h.url,
        http_timeout=h.timeout,
        http_acl=h.acl,
        http_cache_ttl=h.cache_ttl,
        http_cache_negative_ttl=h.cache_negative_ttl,
        http_cache_size=h.cache_size,
        http_ca_file=h.ca_file,
        http_cert_file=h.cert_file,
        http_key_file=h.key_file,
        connect_rate=lim.connect_rate,
        connect_burst=lim.connect_burst,
        limits=PublishLimits(
            publish_rate=lim.publish_rate,
            publish_burst=lim.publish_burst,
            publish_bytes_rate=lim.publish_bytes_rate,
            max_subscriptions=lim.max_subscriptions,
            max_topic_levels=lim.max_topic_levels,
            max_topic_length=lim.max_topic_length,
        ),
    )


def _gevent_socket(sock):
    """A listening socket the arbiter bound (before gevent patched anything) as a gevent socket."""
    from gevent import socket as gsocket

    return gsocket.socket(sock.family, sock.type, fileno=sock.detach())


def _section(config, dotted: str):
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


class BrokerService:
    """Builds the broker and the MQTT listeners from a Config and runs them in this process.

    Every method is called from the gevent worker (the hub is running, monkey patching is done).
    """

    def __init__(self, config) -> None:
        self.config = config
        self.broker: Broker | None = None
        self.listeners: list[TCPListener] = []
        self.sys_topics: SysTopics | None = None
        self.storage: Storage | None = None
        self.flusher: FlushScheduler | None = None
        self.webhooks: WebhookDispatcher | None = None  # webhook.enabled with endpoints
        self.coap: CoapBridge | None = None  # the CoAP bridge when a CoAP listener is configured
        self.coap_listeners: list = []
        self.bridges: Bridges | None = None
        self.cluster = None  # fluxmq.cluster.node.ClusterNode when cluster.enabled (imported only then)
        self.raft = None  # fluxmq.replication.RaftService when cluster.raft.enabled
        # Several workers (server.workers > 1): fluxmq.node.workers.WorkerContext, set by the worker
        # before start; self.cluster is then the local cluster of the node's workers.
        self.workers = None
        # Called by reload(new_config) after the service's own keys; each returns the keys it applied.
        self.reload_hooks: list[Callable[[Any], set[str]]] = []
        self._effective = _flat(config)  # the values in force (reload updates the applied ones)
        self._started = False
        self.heap_trim: HeapTrim | None = None

    def start(self) -> None:
        """Start the broker and its listeners; returns once they accept connections."""
        cfg = self.config
        # A bad password or ACL file raises ConfigError naming the file and line, before anything opens.
        settings = auth_settings(cfg)
        auth = AuthService(settings) if settings.configured else None
        hooks = WebhookSettings.from_config(cfg) if cfg.webhook.enabled and cfg.webhook.endpoints else None
        # A foreign, damaged or newer data directory raises StorageError with one line: the worker
        # logs it and the node exits non-zero (never a silent wipe, never a restart loop).
        started = time.monotonic()
        workers = self.workers
        if workers is not None and cfg.storage.type == "lmdb":
            from fluxmq.node.workers import shard_path

            self.storage = storage = open_storage(cfg, shard_path(cfg.storage.path, workers.index))
        else:
            self.storage = storage = open_storage(cfg)
        self.broker = Broker(broker_settings(cfg), storage)
        self.broker.relay = RELAY  # the C fast path also delivers what peers forward
        self.broker.stats.output_budget.limit = cfg.broker.output_memory_limit
        self.broker.set_auth(auth)
        self.flusher = flusher = FlushScheduler(storage)
        # A cluster node publishes the wills its restore finds due once etcd tells it which are
        # still its own to publish (another node may have published them while this one was down).
        self.broker.hold_restored_wills = cfg.cluster.enabled
        load_and_restore(storage, self.broker)
        self._set_up_queues(cfg, storage)
        if hooks is not None:  # after restore: wills published at a restart are not client events
            self.webhooks = webhooks = WebhookDispatcher(hooks, self.broker.settings.node_id)
            broker = self.broker
            webhooks.on_wants_changed = lambda: broker.set_events(webhooks if webhooks.accepting else None)
            webhooks.start()
            broker.set_events(webhooks)
        if storage.durable:
            flusher.ensure_committed()  # what restore changed (expired sessions, published wills)
            storage.start_background()
        log.info("storage_restored", extra={"start_took": round(time.monotonic() - started, 3)})
        # Before the listeners: a node id already live (etcd) stops the start here, with one line.
        if workers is not None:
            self._start_workers(cfg, workers)
        else:
            self._start_cluster(cfg)
        if self.cluster is not None:  # a publish of the first clients reaches the peers' subscribers
            self.cluster.wait_interest()
        enabled = [(name, section, _section(cfg, section)) for name, section in MQTT_LISTENERS]
        enabled = [
            (name, section, lc, stream_factory(cfg, name, section))
            for name, section, lc in enabled
            if lc.addr
        ]
        exposed = anonymous_exposure(cfg)
        for name, section, lc, factory in enabled:  # every TLS setting was checked before the first bind
            host, port = parse_addr(lc.addr)
            settings = protocol_settings(cfg, lc, refuse_anonymous=f"{section}.addr" in exposed)
            sock = workers.sockets.get(section) if workers is not None else None
            listener = TCPListener(
                name,
                host,
                port,
                self.broker,
                settings,
                flusher,
                max_connections=lc.max_connections,
                stream_factory=factory,
                sock=_gevent_socket(sock) if sock is not None else None,
            )
            listener.start()
            self.listeners.append(listener)
        self._start_coap(cfg)
        self.heap_trim = HeapTrim(self.broker.stats)  # gives back what connection bursts leave in the heap
        self.heap_trim.start()
        self.sys_topics = self._sys_topics(cfg.broker.sys_interval)
        self.sys_topics.start()
        configs = bridges_from_config(cfg)  # ConfigError (unreadable password) before any link opens
        if configs and self.workers is not None and self.workers.index != 0:
            configs = []  # several workers: worker 0 runs the bridges (one link per remote, one client id)
        if configs:
            self.bridges = Bridges(
                configs,
                self.broker,
                flusher,
                status_interval=cfg.broker.sys_interval,
                max_packet_size=cfg.broker.max_packet_size,
            )
            topics = getattr(self.cluster, "topics", None)
            if topics is not None:  # one publisher of $SYS/broker/cluster/*: the cluster's, bridges merged in
                topics.bridges = self.bridges.status
                self.bridges.status.delegate = topics.publish
            self.bridges.start()
        self._started = True

    def _start_cluster(self, cfg) -> None:
        """``cluster.enabled``: the cluster node (imported only then: a single node loads nothing of
        it). A ConfigError or ClusterError (etcd not answering, the node id already live) stops the
        start with one line."""
        if not cfg.cluster.enabled:
            return
        from fluxmq.cluster.node import ClusterNode
        from fluxmq.replication.config import etcd_membership, raft_addr

        members = etcd_membership(cfg)
        announce = {"raft": raft_addr(cfg)} if members else None  # the others learn our Raft address
        node = ClusterNode.from_config(
            cfg, self.broker, announce
        )  # ConfigError (one line) before anything binds
        self.broker.settings.node_id = node.node_id
        node.start()
        self.cluster = node
        if members and node.plane is not None and hasattr(self.raft, "run"):
            self._agree_raft_members(cfg, node)

    @property
    def cluster_health(self):
        """The ``cluster`` readiness check and ``/cluster/status`` source, or None (single node)."""
        return getattr(self.cluster, "health", None)  # several workers: no etcd, no cluster check

    def _start_workers(self, cfg, workers) -> None:
        """Several workers: this one joins the others as a member of the node's local cluster and,
        with ``cluster.enabled``, as member ``{node_id}/w{index}`` of the cluster (etcd)."""
        from fluxmq.cluster.workers import WorkerMember, WorkerNode

        node = None
        members = False
        if cfg.cluster.enabled:
            from fluxmq.cluster.node import ClusterNode
            from fluxmq.node.workers import shard_path
            from fluxmq.replication.config import etcd_membership, raft_addr

            member = WorkerMember.of(cfg, workers, shard_path(cfg.storage.path, workers.index))
            # The node's Raft member is worker 0 (docs/replication.rst, "Several workers on a node"):
            # only it announces a Raft address (the member set is keyed by node: RaftMembers).
            members = self.raft is not None and etcd_membership(cfg)
            announce = {"raft": raft_addr(cfg)} if members else {}
            # the others compute which worker of this node owns a queue (fluxmq.cluster.queue_nodes)
            announce["workers"] = str(workers.count)
            node = ClusterNode.from_config(cfg, self.broker, announce, worker=member)  # ConfigError: one line
            self.broker.settings.node_id = node.node_id
        self.cluster = WorkerNode(workers, self.broker, cfg, node)
        if cfg.cluster.raft.enabled:
            self._share_raft(workers)
        self.cluster.start()
        if members and node.plane is not None and hasattr(self.raft, "run"):
            self._agree_raft_members(cfg, node)

    def _share_raft(self, workers) -> None:
        """Several workers: worker 0 answers the others' ``/cluster/raft`` and admin member changes
        (they run no Raft)."""
        import json

        from fluxmq.queues.placement import RAFT_WORKER
        from fluxmq.replication.group import MemberChangeRefused

        transport = self.cluster.transport
        if workers.index == RAFT_WORKER:

            def serve_change(_from: str, payload: bytes) -> bytes:
                group, action, addr, node_id = json.loads(payload)
                try:
                    return json.dumps(
                        {"members": self.raft.change_member(group, action, addr, node_id)}
                    ).encode()
                except MemberChangeRefused as exc:
                    return json.dumps(
                        {"status": exc.status, "error": str(exc), "leader": exc.leader}
                    ).encode()

            transport.handle(RAFT_STATUS_KIND, lambda _from, _p: json.dumps(self.raft_status()).encode())
            transport.handle(RAFT_MEMBER_KIND, serve_change)
            return
        raft_worker = workers.member(RAFT_WORKER)

        def status() -> list[dict]:
            try:
                reply = transport.call(raft_worker, RAFT_STATUS_KIND, b"", 5.0)
            except Exception as exc:
                log.info("raft_status_not_answered", extra={"error": str(exc)})
                return []
            return json.loads(reply)

        def change(group: str, action: str, addr: str, node_id: str = "") -> list[str]:
            payload = json.dumps([group, action, addr, node_id]).encode()
            try:
                reply = json.loads(
                    transport.call(raft_worker, RAFT_MEMBER_KIND, payload, MEMBER_CALL_TIMEOUT)
                )
            except Exception as exc:
                raise MemberChangeRefused(
                    503, f"worker {raft_worker} (the node's Raft member): {exc}"
                ) from None
            if "members" in reply:
                return reply["members"]
            raise MemberChangeRefused(reply["status"], reply["error"], reply.get("leader"))

        self._raft_status_elsewhere = status
        self.raft_member_change = change

    _raft_status_elsewhere = None
    #: several workers, on a worker other than 0: ``change_member`` made by worker 0 (admin API)
    raft_member_change = None

    def _agree_raft_members(self, cfg, node) -> None:
        """Members from etcd: agree on them (``fluxmq.cluster.metadata.raft_members``), then form."""
        from fluxmq.cluster.metadata.raft_members import RaftMembers
        from fluxmq.replication.config import expected_members

        names, count = expected_members(cfg)
        record = RaftMembers(node.plane.meta, names, count)
        self.raft.record = record  # member changes at run time are written to it (admin API)
        self.raft.run(record.agree)

    def _sys_topics(self, interval: float) -> SysTopics:
        totals = getattr(self.cluster, "sys_totals", None)  # several workers: the node's totals
        return SysTopics(self.broker, interval, totals=totals)

    def _set_up_queues(self, cfg, storage: Storage) -> None:
        """Durable queues: started now when configured or stored, else made on first use of a
        ``$queue/`` topic (the import is deferred until then)."""
        items = list(cfg.queues)
        auto_create = cfg.queue_manager.auto_create
        from fluxmq.replication.config import check_replication

        check_replication(cfg)  # a replicated queue with Raft off is an error, never a local queue
        raft = None
        workers = self.workers
        # Several workers: the node's Raft groups run in worker 0 alone, which owns every
        # replicated queue (fluxmq.queues.placement); the others reach them as any other owner.
        if cfg.cluster.raft.enabled and (workers is None or workers.index == 0):
            from fluxmq.queues.config import QueueConfig
            from fluxmq.replication import RaftService
            from fluxmq.replication.config import etcd_membership, raft_addr
            from fluxmq.replication.service import advertised_mqtt_addr

            configs = [QueueConfig.from_dict(item) for item in items]
            data_dir = os.path.join(cfg.storage.path, "raft")
            if etcd_membership(cfg):
                # The members come from etcd once the cluster agrees on them (_start_cluster):
                # until then the replicated queues refuse appends with the reason.
                from fluxmq.replication.forming import FormingRaft

                raft = self.raft = FormingRaft(
                    cfg.cluster.raft,
                    configs,
                    data_dir,
                    storage.queue_log(),
                    cfg.origin,
                    mqtt_addr=advertised_mqtt_addr(cfg),
                    node_id=cfg.cluster.node_id,
                    self_addr=raft_addr(cfg),
                )
            else:
                raft = self.raft = RaftService(
                    cfg.cluster.raft,
                    configs,
                    data_dir,
                    storage.queue_log(),
                    cfg.origin,
                    mqtt_addr=advertised_mqtt_addr(cfg),
                )

        def make(broker: Broker):
            from fluxmq.queues import QueueManager
            from fluxmq.queues.config import QueueConfig

            configs = [QueueConfig.from_dict(item) for item in items]
            placement = None
            workers = self.workers
            if workers is not None and workers.count > 1:
                from fluxmq.queues.placement import QueuePlacement

                # Each queue lives on one worker (its owner); the others reach it through the
                # workers' cluster (fluxmq.cluster.queues, set up by WorkerNode).
                placement = QueuePlacement(workers.index, workers.count, configs)
            elif cfg.cluster.enabled:
                from fluxmq.cluster.node import uses_etcd

                if uses_etcd(cfg):
                    from fluxmq.queues.placement import QueuePlacement

                    # A cluster with etcd: each queue lives on one node (fluxmq.cluster.queue_nodes),
                    # which the cluster node sets once etcd answers; until then every queue is here.
                    placement = QueuePlacement(0, 1, configs)
            manager = QueueManager(
                storage,
                configs,
                auto_create,
                log_factory=raft.log_factory if raft is not None else None,
                placement=placement,
            )
            if self.cluster is not None and hasattr(self.cluster, "attach_queues"):
                self.cluster.attach_queues(manager)
            if raft is not None:
                raft.attach(manager)
            manager.restore_members(broker.sessions)  # persistent sessions' memberships
            # several workers or nodes: only a queue's owner captures; the others forward it what
            # matches (the owner's interest)
            if placement is not None:
                manager.install_captures(broker.router, broker.hold_interest, broker.release_interest)
            else:
                manager.install_captures(broker.router)
            manager.start()
            return manager

        self.broker.queue_factory = make
        if items or storage.has_queue_data() or raft is not None:
            self.broker.queues = make(self.broker)
            if storage.durable:
                self.flusher.ensure_committed()  # groups of configured queues, recorded at start
        if raft is not None:
            raft.start()  # after the manager: applied entries reach its queues

    def raft_status(self) -> list[dict]:
        """Each Raft group of this node (leader, term, commit index, lag); [] when Raft is off."""
        if self.raft is not None:
            return self.raft.status()
        if self._raft_status_elsewhere is not None:  # several workers: worker 0's
            return self._raft_status_elsewhere()
        return []

    def _start_coap(self, cfg) -> None:
        coap = cfg.server.coap
        if not (coap.plain.addr or coap.dtls.addr or coap.mdtls.addr):
            return
        if self.workers is not None and self.workers.index != 0:
            return  # several workers: worker 0 serves CoAP (UDP ports are not shared); routes reach all
        # DTLS settings are checked (ConfigError naming the key) before anything binds
        secure = [
            (
                name,
                getattr(coap, name),
                server_context(
                    getattr(coap, name), f"server.coap.{name}", require_client_cert=name == "mdtls"
                ),
            )
            for name in ("dtls", "mdtls")
            if getattr(coap, name).addr
        ]
        self.coap = bridge = CoapBridge(self.broker, CoapSettings.from_config(cfg))
        bridge.start()
        self.reload_hooks.append(bridge.reload)
        if coap.plain.addr:
            host, port = parse_addr(coap.plain.addr)
            self.coap_listeners.append(CoapUDPListener("coap", host, port, bridge))
        for name, section, (context, psk) in secure:
            host, port = parse_addr(section.addr)
            self.coap_listeners.append(CoapDTLSListener(f"coap_{name}", host, port, bridge, context, psk))
        for listener in self.coap_listeners:
            listener.start()

    def stop(self, timeout: float) -> None:
        """Stop accepting, finish in-flight writes, close clients, within ``timeout`` seconds."""
        if not self._started:
            return
        deadline = time.monotonic() + timeout
        if self.cluster is not None:
            self.cluster.draining = True  # from now on this node adopts no session from a stopping peer
        for listener in self.listeners:
            listener.stop_accepting()
        for coap_listener in self.coap_listeners:
            coap_listener.stop()
        if self.coap is not None:  # publishes waiting for their commit still get their answer
            self.coap.commit_waiters.join(timeout=max(0.0, deadline - time.monotonic()))
            self.coap.stop()
        if self.sys_topics is not None:
            self.sys_topics.stop()
        if self.heap_trim is not None:
            self.heap_trim.stop()
        if self.bridges is not None:
            self.bridges.stop()
        if self.broker.queues is not None:
            self.broker.queues.stop()
        if self.raft is not None:
            self.raft.stop()
        self.broker.shutdown()
        for listener in self.listeners:
            left = max(0.0, deadline - time.monotonic())
            if not listener.wait_closed(left):
                log.warning(
                    "shutdown_timeout", extra={"listener": listener.name, "open": len(listener.connections)}
                )
        self._started = False
        if self.cluster is not None:
            # The clients closed above reconnect to other nodes, which take their sessions over from
            # here during the drain; then what is left is released, the lease revoked, and what
            # shutdown published (wills) gets a moment to reach the reachable peers.
            flush = min(1.0, max(0.0, deadline - time.monotonic()))
            drain = getattr(self.cluster, "drain", None)  # (several workers: WorkerNode.drain)
            if drain is not None:
                drain(
                    min(
                        self.config.cluster.drain_timeout, max(0.0, deadline - time.monotonic() - flush - 0.5)
                    )
                )
            self.cluster.stop(min(1.0, max(0.0, deadline - time.monotonic())))
        if self.webhooks is not None:
            self.broker.set_events(None)  # the disconnects of the shutdown are queued already
        if self.storage is not None:
            try:
                self.flusher.ensure_committed()
                self.storage.close()
            except Exception:
                log.exception("storage_close_failed")
        if self.webhooks is not None:
            # After the storage is closed (nothing acknowledged waits on HTTP endpoints), within what
            # is left of the stop budget.
            self.webhooks.stop(
                min(self.webhooks.settings.shutdown_timeout, max(0.0, deadline - time.monotonic()))
            )
        log.info("stopped", extra={"sessions": self.broker.session_count()})

    def is_ready(self) -> dict[str, tuple[bool, str]]:
        """Readiness per component: name -> (up, details); the health app renders it."""
        up = self._started
        storage = (up, "storage not initialized")
        if up and self.storage is not None:
            storage = self.storage.ping()
        checks = {"broker": (up, "" if up else "broker not initialized"), "storage": storage}
        if up and self.bridges is not None:
            checks["bridges"] = self.bridges.status.readiness()  # a down bridge: degraded, still ready
        if up and self.cluster is not None:
            cluster = self.cluster.readiness()  # peers down: degraded, still ready
            if cluster is not None:
                checks["cluster"] = cluster
        if up and self.workers is not None:
            checks["workers"] = self.workers.readiness()  # one down or restarting: degraded, still ready
        return checks

    def reload(self, config) -> dict[str, list[str]]:
        """Apply what can change at run time from a newly loaded config (SIGHUP, admin ``/reload``).

        Returns the keys whose value ``changed`` from the values in force, those ``applied`` now,
        and those that need a restart (``restart_required``; they keep their old value until then).
        """
        if self.broker is not None and self.broker.auth is not None:
            # Password and ACL files are re-read on every reload (as Mosquitto does on SIGHUP); a bad
            # one raises ConfigError before anything else changes, and the old rules stay.
            files = self.broker.auth.reload_files()
            log.info("auth_files_reloaded", extra={"files": ",".join(files) or "-"})
        new = _flat(config)
        changed = {k for k, v in new.items() if v != self._effective.get(k)}
        applied = {k for k in changed if k.startswith("log.")}
        if applied:
            setup_logging(config.log)
        broker = self.broker
        if broker is not None:
            limits = broker.limits
            for key in changed & RELOADABLE_LIMITS:
                setattr(limits, key.rpartition(".")[2], new[key])
                applied.add(key)
            if "broker.max_sessions" in changed:  # read at every new session
                broker.settings.max_sessions = new["broker.max_sessions"]
                applied.add("broker.max_sessions")
            if "broker.max_retained_messages" in changed:
                broker.retained.max_messages = new["broker.max_retained_messages"]
                applied.add("broker.max_retained_messages")
            if "broker.sys_interval" in changed and self.sys_topics is not None:
                self.sys_topics.stop()
                self.sys_topics = self._sys_topics(new["broker.sys_interval"])
                self.sys_topics.start()
                applied.add("broker.sys_interval")
        for hook in self.reload_hooks:
            applied |= hook(config) & changed
        for key in applied:
            self._effective[key] = new[key]
        result = {
            "changed": sorted(changed),
            "applied": sorted(applied),
            "restart_required": sorted(changed - applied),
        }
        log.info(
            "config_reloaded",
            extra={
                "applied": ",".join(result["applied"]) or "-",
                "restart_required": ",".join(result["restart_required"]) or "-",
            },
        )
        return result

    def session_count(self) -> int:
        """Number of sessions held by this node (live connections and persistent ones)."""
        return self.broker.session_count() if self.broker is not None else 0
