"""Gunicorn settings the node derives from its config (the process itself: tests/e2e/test_node.py)."""

from __future__ import annotations

import logging
import os
import queue
import signal

import pytest

from fluxmq.config import SCHEMA, load_config, parse_addr
from fluxmq.node.app import (
    WORKER_TIMEOUT,
    NodeApplication,
    NodeArbiter,
    NodeLogger,
    gunicorn_bind,
    stop_margins,
)
from fluxmq.node.service import anonymous_exposure
from fluxmq.node.worker import BrokerWorker


@pytest.mark.parametrize(
    ("addr", "bind"),
    [
        (":8081", "0.0.0.0:8081"),
        ("127.0.0.1:9000", "127.0.0.1:9000"),
        ("[::1]:8081", "[::1]:8081"),
        ("localhost:80", "localhost:80"),
    ],
)
def test_gunicorn_bind(addr: str, bind: str) -> None:
    assert gunicorn_bind(addr) == bind


@pytest.mark.parametrize("timeout", [0.0, 0.5, 1.0, 2.0, 10.0, 30.0, 600.0])
def test_stop_margins_fit_inside_shutdown_timeout(timeout: float) -> None:
    grace, budget = stop_margins(timeout)
    assert 0.0 <= budget <= grace <= timeout
    if timeout >= 1.0:
        assert budget > 0.0 and grace < timeout


def test_application_settings_from_config() -> None:
    cfg = load_config(
        None, env={}, overrides=["server.health_addr=127.0.0.1:9181", "server.shutdown_timeout=2.5s"]
    )
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


def test_health_disabled_binds_private_unix_socket() -> None:
    cfg = load_config(
        None,
        env={},
        overrides=["server.health_enabled=false", "server.http.plain.addr=", "server.admin.addr="],
    )
    app = NodeApplication(cfg)
    (bind,) = app.cfg.bind
    assert bind.startswith("unix:")
    path = bind[len("unix:") :]
    directory = os.path.dirname(path)
    assert os.path.isdir(directory)
    assert oct(os.stat(directory).st_mode & 0o777) == oct(0o700)
    os.rmdir(directory)


# -- safe by default (issue 17 item 11) ------------------------------------------------------------


def test_every_default_listener_binds_loopback() -> None:
    """As Mosquitto 2: with no configuration nothing is reachable from the network."""
    cfg = load_config(None, env={})
    for key in SCHEMA.keys:
        if key.endswith(".addr") or key == "server.health_addr":
            addr = cfg.get(key)
            assert not addr or parse_addr(addr)[0] == "127.0.0.1", key
    assert anonymous_exposure(cfg) == []
    NodeApplication(cfg)  # the quick start (scripts/run, conf/fluxmq.yaml) starts


@pytest.mark.parametrize(
    "key",
    [
        "server.tcp.plain.addr",
        "server.websocket.plain.addr",
        "server.http.plain.addr",
        "server.coap.plain.addr",
    ],
)
@pytest.mark.parametrize("addr", [":1", "0.0.0.0:1", "192.168.1.5:1", "broker.example:1"])
def test_anonymous_listener_on_the_network_starts_with_a_warning(key: str, addr: str, caplog) -> None:
    """As Mosquitto 2: the node starts and that listener refuses anonymous clients (a config copied
    from the reference documents, ``addr: ":1883"`` without auth, starts: issue 15)."""
    cfg = load_config(None, env={}, overrides=[f"{key}={addr}"])
    assert anonymous_exposure(cfg) == [key]
    with caplog.at_level(logging.WARNING, logger="fluxmq"):
        NodeApplication(cfg)
    warned = [r for r in caplog.records if r.getMessage() == "anonymous_refused_on_network_listener"]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    fields = warned[0].__dict__
    assert fields["key"] == key and fields["addr"] == addr and "auth.allow_anonymous: true" in fields["fix"]


@pytest.mark.parametrize(
    "opened_by",
    ["auth.allow_anonymous=true", "auth.allow_anonymous=false", "auth.http.url=http://127.0.0.1:1/auth"],
)
def test_network_listener_starts_when_anonymous_is_decided(opened_by: str) -> None:
    cfg = load_config(None, env={}, overrides=["server.tcp.plain.addr=:1", opened_by])
    assert anonymous_exposure(cfg) == []


def test_psk_only_dtls_coap_listener_is_not_anonymous(tmp_path) -> None:
    """Every DTLS client of a PSK-only listener has an identity; with a certificate it may have none."""
    psk = tmp_path / "psk"
    psk.write_text("dev:00ff\n")
    cfg = load_config(
        None, env={}, overrides=["server.coap.dtls.addr=:1", f"server.coap.dtls.psk_file={psk}"]
    )
    assert anonymous_exposure(cfg) == []
    cfg = load_config(
        None,
        env={},
        overrides=[
            "server.coap.dtls.addr=:1",
            f"server.coap.dtls.psk_file={psk}",
            "server.coap.dtls.cert_file=/x.crt",
        ],
    )
    assert anonymous_exposure(cfg) == ["server.coap.dtls.addr"]


def test_loopback_listeners_stay_anonymous() -> None:
    cfg = load_config(
        None, env={}, overrides=["server.tcp.plain.addr=[::1]:1", "server.http.plain.addr=localhost:2"]
    )
    assert anonymous_exposure(cfg) == []


@pytest.mark.parametrize(("value", "gunicorn"), [("1s", 1), ("2.5s", 3), ("90s", 90)])
def test_worker_timeout_from_config(value: str, gunicorn: int) -> None:
    cfg = load_config(None, env={}, overrides=[f"server.worker_timeout={value}"])
    assert NodeApplication(cfg).cfg.timeout == gunicorn  # gunicorn takes whole seconds


def test_starting_apps_say_alive_not_ready_and_503_elsewhere() -> None:
    """Served while the worker loads its store (BrokerWorker.load_wsgi)."""
    import json

    from tests.http.test_bridge import wsgi_call

    cfg = load_config(
        None,
        env={},
        overrides=[
            "server.health_addr=127.0.0.1:9181",
            "server.http.plain.addr=127.0.0.1:9180",
            "server.admin.addr=127.0.0.1:9182",
        ],
    )
    app = NodeApplication(cfg)
    names = [name for name, _ in app.surfaces]
    apps = dict(zip(names, app.make_starting_apps(), strict=True))
    health = apps["health"]
    assert wsgi_call(health, "GET", "/health").status == 200
    ready = wsgi_call(health, "GET", "/ready")
    assert ready.status == 503
    assert json.loads(b"".join(ready.body))["checks"]["storage"] == {"status": "down", "details": "loading"}
    assert wsgi_call(health, "GET", "/metrics").status == 503
    for name in ("http", "admin"):
        resp = wsgi_call(apps[name], "POST", "/publish")
        assert resp.status == 503 and resp.headers["Retry-After"] == "1"


class _RecordingQueue:
    """The arbiter's signal queue: records how long each wait may take, and has no signal."""

    def __init__(self) -> None:
        self.waits: list[float | None] = []

    def get(self, block: bool = True, timeout: float | None = None):
        self.waits.append(timeout)
        raise queue.Empty

    def get_nowait(self):
        raise queue.Empty


def _arbiter(timeout: int) -> NodeArbiter:
    arbiter = NodeArbiter.__new__(NodeArbiter)
    arbiter.timeout = timeout
    return arbiter


@pytest.mark.parametrize(("timeout", "wait"), [(30, 3.0), (90, 9.0), (5, 1.0)])
def test_the_arbiter_looks_at_the_heartbeat_every_tenth_of_the_worker_timeout(
    timeout: int, wait: float
) -> None:
    """gunicorn's arbiter wakes every second to look at the worker's heartbeat file (a turn of cold
    Python on the node's CPU); the node's looks as often as its worker beats, at least every second."""
    arbiter = _arbiter(timeout)
    arbiter.SIG_QUEUE = _RecordingQueue()
    assert arbiter.wait_for_signals(timeout=1.0) == []
    assert arbiter.SIG_QUEUE.waits == [wait]


def test_a_signal_still_ends_the_arbiters_wait_at_once() -> None:
    arbiter = _arbiter(30)
    arbiter.SIG_QUEUE = queue.SimpleQueue()
    arbiter.SIG_QUEUE.put(signal.SIGCHLD)
    arbiter.SIG_QUEUE.put(signal.SIGTERM)
    assert arbiter.wait_for_signals(timeout=1.0) == [signal.SIGCHLD, signal.SIGTERM]
