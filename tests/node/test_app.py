"""Gunicorn settings the node derives from its config (the process itself: tests/e2e/test_node.py)."""

from __future__ import annotations

import os

import pytest

from fluxmq.config import load_config
from fluxmq.errors import ConfigError
from fluxmq.node.app import WORKER_TIMEOUT, NodeApplication, NodeLogger, gunicorn_bind, stop_margins
from fluxmq.node.worker import BrokerWorker


@pytest.mark.parametrize(("addr", "bind"), [
    (":8081", "0.0.0.0:8081"),
    ("127.0.0.1:9000", "127.0.0.1:9000"),
    ("[::1]:8081", "[::1]:8081"),
    ("localhost:80", "localhost:80"),
])
def test_gunicorn_bind(addr: str, bind: str) -> None:
    assert gunicorn_bind(addr) == bind


@pytest.mark.parametrize("timeout", [0.0, 0.5, 1.0, 2.0, 10.0, 30.0, 600.0])
def test_stop_margins_fit_inside_shutdown_timeout(timeout: float) -> None:
    grace, budget = stop_margins(timeout)
    assert 0.0 <= budget <= grace <= timeout
    if timeout >= 1.0:
        assert budget > 0.0 and grace < timeout


def test_application_settings_from_config() -> None:
    cfg = load_config(None, env={}, overrides=["server.health_addr=127.0.0.1:9181",
                                               "server.shutdown_timeout=2.5s"])
    app = NodeApplication(cfg)
    assert app.cfg.address[0] == ("127.0.0.1", 9181)
    assert app.cfg.workers == 1
    assert app.cfg.worker_class is BrokerWorker
    assert app.cfg.logger_class is NodeLogger
    assert app.cfg.timeout == WORKER_TIMEOUT
    grace, budget = stop_margins(2.5)
    assert app.cfg.graceful_timeout == grace  # exact, not rounded to gunicorn's int
    assert app.stop_budget == budget
    assert app.cfg.accesslog is None


@pytest.mark.parametrize(("value", "timeout"), [("2.5s", 2.5), ("0", 0.0), ("90s", 90.0)])
def test_worker_timeout_from_config(value: str, timeout: float) -> None:
    cfg = load_config(None, env={}, overrides=[f"server.worker_timeout={value}", "server.health_addr=127.0.0.1:9182"])
    assert NodeApplication(cfg).cfg.timeout == timeout  # exact: gunicorn only compares it with a time


def test_worker_timeout_shorter_than_two_heartbeats_is_refused() -> None:
    cfg = load_config(None, env={}, overrides=["server.worker_timeout=1s", "server.health_addr=127.0.0.1:9183"])
    with pytest.raises(ConfigError, match="server.worker_timeout"):
        NodeApplication(cfg)


def test_health_disabled_binds_private_unix_socket() -> None:
    cfg = load_config(None, env={}, overrides=["server.health_enabled=false", "server.http.plain.addr=",
                                               "server.admin.addr="])
    app = NodeApplication(cfg)
    (bind,) = app.cfg.bind
    assert bind.startswith("unix:")
    path = bind[len("unix:"):]
    directory = os.path.dirname(path)
    assert os.path.isdir(directory)
    assert oct(os.stat(directory).st_mode & 0o777) == oct(0o700)
    os.rmdir(directory)
