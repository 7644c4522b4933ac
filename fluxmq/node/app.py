"""The node process: a gunicorn arbiter supervising one ``BrokerWorker`` (gevent) that hosts the broker.

The arbiter restarts a worker that dies or whose hub hangs (no heartbeat for ``WORKER_TIMEOUT``
seconds), halts when the worker cannot boot (the broker could not start), and on SIGTERM, SIGINT
or SIGQUIT tells the worker to stop and exits 0 within ``server.shutdown_timeout``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from gunicorn import glogging
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter

from fluxmq.config import parse_addr
from fluxmq.http.health import make_health_app
from fluxmq.node.worker import BrokerWorker

log = logging.getLogger("fluxmq.node")

# Seconds without a heartbeat before the arbiter kills the worker (its hub is blocked).
WORKER_TIMEOUT = 30


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
    """Gunicorn's arbiter for exactly one broker worker.

    SIGINT is as graceful as SIGTERM (gunicorn's SIGINT is a quick stop). Signals that would start
    a second worker next to the running one (SIGHUP reload, SIGTTIN, SIGUSR2 re-exec) are ignored:
    the new worker could not bind the MQTT ports the old one holds, and its boot failure would halt
    the node. Reloading configuration on SIGHUP belongs to the running worker (not done yet).
    """

    def handle_int(self) -> None:
        self.handle_term()

    def _ignore(self, name: str) -> None:
        log.warning("signal_ignored", extra={"signal": name, "reason": "the node runs exactly one worker"})

    def handle_hup(self) -> None:
        self._ignore("SIGHUP")

    def handle_ttin(self) -> None:
        self._ignore("SIGTTIN")

    def handle_ttou(self) -> None:
        self._ignore("SIGTTOU")

    def handle_usr2(self) -> None:
        self._ignore("SIGUSR2")


class NodeApplication(BaseApplication):
    """The gunicorn application of one node: settings from the fluxmq Config, one BrokerWorker."""

    def __init__(self, config: Any, service_factory: Callable[[Any], Any] | None = None) -> None:
        if service_factory is None:
            from fluxmq.node.service import BrokerService
            service_factory = BrokerService
        self.node_config = config
        self.service_factory = service_factory
        self.shutdown_timeout = float(config.server.shutdown_timeout)
        self.grace, self.stop_budget = stop_margins(self.shutdown_timeout)
        self._private_dir: str | None = None
        self._owner_pid = os.getpid()
        super().__init__(prog="fluxmq-node")

    def _bind(self) -> str:
        server = self.node_config.server
        if server.health_enabled:
            return gunicorn_bind(server.health_addr)
        # gunicorn needs a bind: a private unix socket nobody else can reach.
        if self._private_dir is None:
            self._private_dir = tempfile.mkdtemp(prefix="fluxmq-node-")
        return "unix:" + os.path.join(self._private_dir, "health.sock")

    def load_config(self) -> None:
        settings = {
            "bind": [self._bind()],
            "workers": 1,
            "worker_class": BrokerWorker,
            "timeout": WORKER_TIMEOUT,
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

    def load(self) -> Callable:
        raise RuntimeError("BrokerWorker builds the WSGI app around its BrokerService (make_wsgi)")

    def make_wsgi(self, service: Any) -> Callable:
        """The WSGI app the worker serves on ``server.health_addr``, around its running service."""
        return make_health_app(service)

    def run(self) -> None:
        """Run the arbiter until shutdown; exits the process (0 on a clean stop)."""
        try:
            NodeArbiter(self).run()
        finally:
            # A forked worker unwinds through here too; only the arbiter removes the directory.
            if self._private_dir is not None and os.getpid() == self._owner_pid:
                shutil.rmtree(self._private_dir, ignore_errors=True)
