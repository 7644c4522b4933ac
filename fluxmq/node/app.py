"""The node process: a gunicorn arbiter supervising ``server.workers`` ``BrokerWorker``s (gevent), each
hosting a broker; several workers act as one broker (``fluxmq.node.workers``, docs/cluster.rst).

The arbiter restarts a worker that dies or whose hub hangs (no heartbeat for
``server.worker_timeout``), halts when the worker cannot boot (the broker could not start), and on
SIGTERM, SIGINT or SIGQUIT tells the worker to stop and exits 0 within ``server.shutdown_timeout``;
SIGHUP reloads the configuration into the running worker.

The HTTP surfaces (health with ``/metrics``, the HTTP bridge, the admin API) are gunicorn binds, one
socket each, made by the arbiter; the worker serves each socket with its own WSGI app. Binding in
the arbiter keeps "the arbiter restarts a dead worker" true: the sockets outlive a crashed worker,
so its replacement serves the same ports at once (connections wait in the backlog meanwhile) and
cannot fail to boot because another process took a port in the gap, which would halt the node.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from gunicorn import glogging
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter

from fluxmq.config import parse_addr
from fluxmq.errors import ConfigError
from fluxmq.http.admin import AdminAPI, admin_token, check_admin_exposure
from fluxmq.http.bridge import BridgeSettings, HTTPBridge
from fluxmq.http.health import make_health_app
from fluxmq.http.metrics import make_metrics_app, make_registry
from fluxmq.http.router import json_response
from fluxmq.log import setup_logging
from fluxmq.node.worker import BrokerWorker, liveness_interval
from fluxmq.transport.tls import TLSHandshake, server_context

log = logging.getLogger("fluxmq.node")

# Seconds without a heartbeat before the arbiter kills the worker (its hub is blocked).
WORKER_TIMEOUT = 30  # the default of server.worker_timeout (seconds)


def stop_margins(shutdown_timeout: float) -> tuple[float, float]:
    """(arbiter grace, worker stop budget) for a shutdown that must end within ``shutdown_timeout``.

    The arbiter kills a worker still alive after its grace; the worker gets a little less, so it
    exits on its own first and the arbiter has time left to reap it and exit.
    """
    margin = min(0.5, shutdown_timeout * 0.1)
    grace = max(shutdown_timeout - margin, 0.0)
    return grace, max(grace - margin, 0.0)


def gunicorn_bind(addr: str) -> str:
    """A ``server.health_addr`` value (``":8081"``, ``"[::1]:8081"``) as a gunicorn bind string."""
    host, port = parse_addr(addr)
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


def http_surfaces(config: Any) -> list[tuple[str, str]]:
    """``(name, addr)`` of each enabled HTTP listener, in bind order: health (with /metrics), the
    HTTP bridge (plain, TLS, mTLS), the admin API. Two on one port are a ``ConfigError`` (the second
    bind would fail)."""
    server = config.server
    surfaces = []
    if server.health_enabled:
        surfaces.append(("health", "server.health_addr", server.health_addr))
    if server.http.plain.addr:
        surfaces.append(("http", "server.http.plain.addr", server.http.plain.addr))
    if server.http.tls.addr:
        surfaces.append(("http_tls", "server.http.tls.addr", server.http.tls.addr))
    if server.http.mtls.addr:
        surfaces.append(("http_mtls", "server.http.mtls.addr", server.http.mtls.addr))
    if server.admin.addr:
        surfaces.append(("admin", "server.admin.addr", server.admin.addr))
    seen: dict[int, str] = {}
    for _, key, addr in surfaces:
        port = parse_addr(addr)[1]
        if port and port in seen:
            raise ConfigError(key, f"a port other than {seen[port]}'s", got=addr)
        seen[port] = key
    return [(name, addr) for name, _, addr in surfaces]


def _https_handshake(config: Any, surface: str) -> TLSHandshake | None:
    """The TLS handshake of an HTTPS bridge surface (``http_tls``, ``http_mtls``), else None."""
    if surface not in ("http_tls", "http_mtls"):
        return None
    section = "server.http." + surface.partition("_")[2]
    context = server_context(
        section,
        config.get(section),
        lambda leaf: config.origin(f"{section}.{leaf}"),
        require_client_cert=surface == "http_mtls",
    )
    return TLSHandshake(context, config.server.connect_timeout, surface)


class _Starting:
    """The health source while the store loads: alive, not ready."""

    @staticmethod
    def is_ready() -> dict[str, tuple[bool, str]]:
        return {"broker": (False, "starting"), "storage": (False, "loading")}

    @staticmethod
    def session_count() -> int:
        return 0


def _starting_app(environ: dict, start_response: Callable) -> list[bytes]:
    return json_response(
        start_response, 503, {"error": "the node is starting: its store is loading"}, {"Retry-After": "1"}
    )


class NodeLogger(glogging.Logger):
    """Routes gunicorn's log lines into fluxmq's logging (``fluxmq.gunicorn``; access log off).

    Handlers, format and level come from ``fluxmq.log.setup_logging``; this class adds none.
    The access log is on when gunicorn's ``accesslog`` setting is set (logger ``fluxmq.http.access``).
    """

    def __init__(self, cfg) -> None:
        self.error_log = logging.getLogger("fluxmq.gunicorn")
        self.access_log = logging.getLogger("fluxmq.http.access")
        self.error_handlers: list = []
        self.access_handlers: list = []
        self.logfile = None
        self.lock = threading.Lock()
        self.setup(cfg)

    def setup(self, cfg) -> None:
        self.cfg = cfg
        self._access_log_enabled = cfg.accesslog is not None

    def _compute_access_log_enabled(self) -> bool:
        return self.cfg.accesslog is not None

    def reopen_files(self) -> None:
        """Log files belong to fluxmq's logging, which reopens its own."""

    def close_on_exec(self) -> None:
        """Nothing to do: gunicorn opens no log file of its own here."""


class NodeArbiter(Arbiter):
    """Gunicorn's arbiter for the node's ``server.workers`` broker workers (a fixed number).

    SIGINT is as graceful as SIGTERM (gunicorn's SIGINT is a quick stop). Signals that would start
    a second worker next to the running one (SIGTTIN, SIGUSR2 re-exec) are ignored: the new worker
    could not bind the MQTT ports the old one holds, and its boot failure would halt the node.
    SIGHUP does not replace the worker as in gunicorn (that would drop every in-memory session): the
    arbiter re-reads the configuration, applies its ``log`` section to itself and forwards SIGHUP to
    the worker, which applies what can change at run time (``BrokerService.reload``).
    """

    def wait_for_signals(self, timeout: float = 1.0) -> list:
        """gunicorn's wait, every ``liveness_interval`` of the timeout instead of every second (the look
        at the heartbeat, ``murder_workers``, follows each wait). A signal (SIGCHLD of a dead worker,
        SIGTERM, SIGHUP) still ends the wait at once."""
        return super().wait_for_signals(timeout=max(timeout, liveness_interval(self.timeout)))

    def handle_int(self) -> None:
        self.handle_term()

    def _ignore(self, name: str) -> None:
        log.warning(
            "signal_ignored", extra={"signal": name, "reason": "the node runs server.workers workers"}
        )

    def handle_hup(self) -> None:
        log.info("reload_requested", extra={"signal": "SIGHUP"})
        try:
            config = self.app.load_fresh_config()
            setup_logging(config.log)
        except ConfigError as exc:  # the worker would fail the same way: keep everything as it is
            log.error("reload_failed", extra={"error": str(exc)})
            return
        for pid in list(self.WORKERS):
            self.kill_worker(pid, signal.SIGHUP)

    def stop(self, graceful: bool = True) -> None:
        """gunicorn's stop, after marking the run directory: from here on no dead worker is started
        again (a claim of an id it owned does not wait for it: ``fluxmq.node.workers``)."""
        from fluxmq.node.workers import mark_stopping

        mark_stopping(getattr(self.app, "run_dir", None))
        super().stop(graceful)

    def handle_ttin(self) -> None:
        self._ignore("SIGTTIN")

    def handle_ttou(self) -> None:
        self._ignore("SIGTTOU")

    def handle_usr2(self) -> None:
        self._ignore("SIGUSR2")


def _several_workers(service) -> bool:
    """True when the service is one worker of several: its ``cluster`` is then the node's local
    cluster of workers (``fluxmq.cluster.workers.WorkerNode``)."""
    return getattr(service, "workers", None) is not None and service.cluster is not None


class NodeApplication(BaseApplication):
    """The gunicorn application of one node: settings from the fluxmq Config, one BrokerWorker."""

    def __init__(
        self,
        config: Any,
        service_factory: Callable[[Any], Any] | None = None,
        config_loader: Callable[[], Any] | None = None,
    ) -> None:
        if service_factory is None:
            from fluxmq.node.service import BrokerService

            service_factory = BrokerService
        self.node_config = config
        self.service_factory = service_factory
        # Loads the configuration again from the same sources (reload); None: the start config.
        self.config_loader = config_loader
        self.admin_token = admin_token(config, os.environ)
        check_admin_exposure(config.server.admin.addr, self.admin_token)
        from fluxmq.node.service import anonymous_exposure, warn_anonymous_exposure

        warn_anonymous_exposure(config)  # the node starts; those listeners refuse anonymous clients
        self.exposed = set(anonymous_exposure(config))
        self.surfaces = http_surfaces(config)
        # TLS of the HTTPS bridge listeners, built here so a bad certificate stops the node at once.
        self.handshakes = [_https_handshake(config, name) for name, _ in self.surfaces]
        self.shutdown_timeout = float(config.server.shutdown_timeout)
        self.worker_timeout = float(config.server.worker_timeout)
        self.grace, self.stop_budget = stop_margins(self.shutdown_timeout)
        self._private_dir: str | None = None
        self._owner_pid = os.getpid()
        from fluxmq.node.workers import check_workers

        self.workers = check_workers(config)  # ConfigError: several workers with Raft or static peers
        self.run_dir: str | None = None  # several workers: their Unix sockets and ownership table
        self.worker_sockets: dict = {}  # several workers: MQTT section -> one socket per worker index
        super().__init__(prog="fluxmq-node")

    def _bind(self) -> list[str]:
        if self.surfaces:
            return [gunicorn_bind(addr) for _, addr in self.surfaces]
        # gunicorn needs a bind: a private unix socket nobody else can reach.
        if self._private_dir is None:
            self._private_dir = tempfile.mkdtemp(prefix="fluxmq-node-")
        return ["unix:" + os.path.join(self._private_dir, "health.sock")]

    def load_config(self) -> None:
        settings = {
            "bind": self._bind(),
            "workers": self.workers,
            "pre_fork": self._pre_fork,
            "worker_class": BrokerWorker,
            "timeout": max(1, math.ceil(self.worker_timeout)),
            "graceful_timeout": max(1, math.ceil(self.grace)),
            "keepalive": 2,
            "logger_class": NodeLogger,
            "accesslog": None,
            "proc_name": "fluxmq-node",
            "control_socket_disable": True,
        }
        for key, value in settings.items():
            self.cfg.set(key, value)
        # gunicorn validates graceful_timeout as an int but only ever adds it to time.time(), so
        # keep the exact grace: the node must be gone within server.shutdown_timeout.
        self.cfg.settings["graceful_timeout"].value = self.grace

    @staticmethod
    def _pre_fork(arbiter, worker) -> None:
        # The lowest index no live worker holds: a restarted worker takes over the shard and the
        # socket path of the one it replaces.
        taken = {getattr(w, "worker_index", None) for w in arbiter.WORKERS.values()}
        worker.worker_index = next(i for i in range(len(taken) + 1) if i not in taken)

    def worker_context(self, index: int):
        """What worker ``index`` needs to join the node's other workers (None with one worker)."""
        if self.workers <= 1:
            return None
        from fluxmq.node.workers import WorkerContext

        return WorkerContext(
            index,
            self.workers,
            self.run_dir,
            {section: socks[index] for section, socks in self.worker_sockets.items()},
            self.node_config.cluster.node_id if self.node_config.cluster.enabled else "",
        )

    def prepare_workers(self) -> None:
        """Several workers: the run directory and the MQTT sockets, made by the arbiter before it
        forks (raises OSError when a port cannot be bound)."""
        if self.workers <= 1 or self.run_dir is not None:
            return
        from fluxmq.node.service import MQTT_LISTENERS
        from fluxmq.node.workers import bind_mqtt, make_run_dir

        self.worker_sockets = bind_mqtt(
            self.node_config, [section for _, section in MQTT_LISTENERS], self.workers
        )
        self.run_dir = make_run_dir()

    def load(self) -> Callable:
        raise RuntimeError("BrokerWorker builds the WSGI apps around its BrokerService (make_wsgi_apps)")

    def make_wsgi_apps(self, service: Any) -> list[Callable]:
        """The WSGI app of each bound socket (in bind order), around the worker's running service."""
        config = self.node_config
        bridge = None
        if any(name.startswith("http") for name, _ in self.surfaces):
            bridge = HTTPBridge(service.broker, BridgeSettings.from_config(config))
            service.reload_hooks.append(bridge.reload)
        apps: list[Callable] = []
        for name, _ in self.surfaces:
            if name == "health":
                health = make_health_app(service, getattr(service, "cluster_health", None))
                if config.server.metrics_enabled:
                    registry = make_registry(service, bridge)
                    if _several_workers(service):
                        from fluxmq.node.worker_totals import metrics_totals

                        registry = metrics_totals(service.cluster, registry)
                    health.mount("/metrics", make_metrics_app(registry))
                apps.append(health)
            elif name.startswith("http"):
                # One bridge (and one SSE stream registry) for plain and TLS; a network listener
                # without a decision about anonymous clients refuses them (anonymous_exposure).
                section = "server.http." + (name.partition("_")[2] or "plain")
                apps.append(bridge.exposed() if f"{section}.addr" in self.exposed else bridge)
            else:
                admin = AdminAPI(
                    service,
                    self.admin_token,
                    lambda: self.reload_node(service),
                    bridge,
                    config.server.admin.allowed_hosts,
                    config.server.admin.addr,
                )
                # SIGHUP and POST /reload re-read the token file: rotation without a restart
                service.reload_hooks.append(admin.reload_hook)
                if _several_workers(service):  # the node's /stats, sessions and queues
                    from fluxmq.node.worker_totals import admin_totals

                    admin_totals(service.cluster, admin)
                # a cluster with etcd: the owning node of each durable queue (listing, errors)
                admin.queue_owners = getattr(service.cluster, "queue_owners", None)
                admin.queue_reassign = getattr(service.cluster, "reassign_queues", None)
                apps.append(admin)
        return apps or [make_health_app(service)]  # the private unix socket

    def make_starting_apps(self) -> list[Callable]:
        """The apps served while the worker loads the store (before ``make_wsgi_apps``): health
        says alive (``/health`` 200) and not ready (``/ready`` 503, storage "loading"), the other
        surfaces answer 503 with ``Retry-After``."""

        def health() -> Callable:
            app = make_health_app(_Starting())
            app.mount("/metrics", _starting_app)
            return app

        apps: list[Callable] = [health() if name == "health" else _starting_app for name, _ in self.surfaces]
        return apps or [health()]

    def load_fresh_config(self) -> Any:
        """The configuration loaded again from the node's sources (the start config without a loader)."""
        return self.config_loader() if self.config_loader is not None else self.node_config

    def reload_node(self, service: Any) -> dict[str, list[str]]:
        """Reload the configuration into the running service (raises ``ConfigError``)."""
        return service.reload(self.load_fresh_config())

    def run(self) -> None:
        """Run the arbiter until shutdown; exits the process (0 on a clean stop)."""
        try:
            try:
                self.prepare_workers()
            except OSError as exc:
                log.error("broker_start_failed", extra={"pid": os.getpid(), "error": str(exc)})
                raise SystemExit(Arbiter.WORKER_BOOT_ERROR) from None
            NodeArbiter(self).run()
        finally:
            # A forked worker unwinds through here too; only the arbiter removes the directories.
            if os.getpid() == self._owner_pid:
                for path in (self._private_dir, self.run_dir):
                    if path is not None:
                        shutil.rmtree(path, ignore_errors=True)
