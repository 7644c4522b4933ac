"""A config written the way the reference documents spell it (Go FluxMQ README, reference 004) loads.

Reference 004 (fluxrig platform configuration): ``level`` is one of debug, info, warn, error;
``trace``/``debug`` booleans are hard overrides; ``FLUXRIG_TRACE=true``/``FLUXRIG_DEBUG=true`` force the
level from the environment (here ``FLUXMQ_TRACE``/``FLUXMQ_DEBUG``); durations are Go strings ("15s",
"720h", "100ms"); sizes are plain integers. Reference 002 (Go FluxMQ README) and 000 (clustering)
give the file layout, including sections fluxmq does not implement yet.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fluxmq.config import load_config
from fluxmq.errors import ConfigError
from fluxmq.log import TRACE, effective_level, setup_logging

# The Go FluxMQ README's configuration example, its TLS/mTLS example, the health keys (reference 003),
# the clustering example (reference 000) and the queue example from its README, with reference 004's
# logging fields under log: as one file.
REFERENCE_CONFIG = """\
server:
  tcp:
    plain:
      addr: ":1883"
      max_connections: 10000
      read_timeout: "60s"
      write_timeout: "60s"
    tls:
      addr: ":8883"
      cert_file: "/path/to/server.crt"
      key_file: "/path/to/server.key"
      min_version: "TLS1.2"
      prefer_server_cipher_suites: true
      cipher_suites:
        - TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        - TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
    mtls:
      addr: ":8884"
      cert_file: "/path/to/server.crt"
      key_file: "/path/to/server.key"
      ca_file: "/path/to/ca.crt"
      client_auth: "require"
  websocket:
    plain:
      addr: ":8083"
      path: "/mqtt"
  http:
    plain:
      addr: ":8080"
  health_enabled: true
  health_addr: ":8081"

broker:
  max_message_size: 1048576
  max_retained_messages: 10000

storage:
  type: badger
  path: "./data"

log:
  level: warn
  max_size_mb: 100
  max_backups: 7
  compress: true
  trace: false
  debug: false
  throttling:
    enabled: true
    rate: 500.0
    burst: 50

cluster:
  enabled: true
  node_id: "broker-1"
  etcd:
    data_dir: "/tmp/fluxmq/etcd"
    bind_addr: "0.0.0.0:2380"
    client_addr: "0.0.0.0:2379"
    initial_cluster: "broker-1=http://0.0.0.0:2380"
    bootstrap: true
    hybrid_retained_size_threshold: 1024
  transport:
    bind_addr: "0.0.0.0:7948"
    peers: {}
    route_batch_max_size: 256
    route_batch_max_delay: "5ms"
    route_batch_flush_workers: 4
    route_publish_timeout: "15s"
    tls_enabled: false
  raft:
    enabled: false
    auto_provision_groups: true
    write_policy: "forward"
    distribution_mode: "replicate"

queue:
  ordering: partition
  partitions: 50-100
  retention:
    retention_time: 168h
"""


@pytest.fixture
def write(tmp_path: Path):
    def _write(text: str) -> Path:
        path = tmp_path / "fluxmq.yaml"
        path.write_text(text, encoding="utf-8")
        return path

    return _write


def error_line(path: Path, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {})
    message = str(info.value)
    assert "\n" not in message
    return message


def test_reference_config_loads_with_not_implemented_notices(write) -> None:
    path = write(REFERENCE_CONFIG)
    cfg = load_config(path, env={})
    assert cfg.log.level == "warn"
    assert cfg.server.tcp.plain.read_timeout == 60.0
    assert cfg.storage.type == "lmdb"  # badger is the Go broker's persistent store; lmdb is ours
    notices = "\n".join(cfg.notices)
    for name in ("queue", "server.tcp.tls.prefer_server_cipher_suites", "storage.type"):
        assert name in notices
    # reference 000's cluster section is implemented as a whole (etcd, transport, raft): no notice
    assert not [n for n in cfg.notices if n.startswith("cluster")]
    assert "not implemented yet" in notices
    assert f"{path}:" in notices  # each notice names where it was written


@pytest.mark.parametrize(
    "spelling, level",
    [
        ("trace", TRACE),
        ("debug", logging.DEBUG),
        ("info", logging.INFO),
        ("warn", logging.WARNING),
        ("warning", logging.WARNING),
        ("error", logging.ERROR),
    ],
)
def test_log_level_spellings(write, spelling: str, level: int) -> None:
    cfg = load_config(write(f"log:\n  level: {spelling}\n"), env={})
    assert effective_level(cfg.log) == level


def test_log_level_other_spelling_is_one_line_with_accepted_values(write) -> None:
    path = write("log:\n  format: text\n  level: verbose\n")
    message = error_line(path)
    assert "log.level" in message and f"{path}:3" in message
    for accepted in ("trace", "debug", "info", "warn", "error"):
        assert accepted in message


@pytest.mark.parametrize(
    "text, env, level",
    [
        ("log:\n  level: error\n  debug: true\n", {}, logging.DEBUG),
        ("log:\n  level: error\n  trace: true\n", {}, TRACE),
        ("log:\n  level: error\n  debug: true\n  trace: true\n", {}, TRACE),
        ("log:\n  level: error\n", {"FLUXMQ_DEBUG": "true"}, logging.DEBUG),
        ("log:\n  level: error\n", {"FLUXMQ_TRACE": "true"}, TRACE),
        ("log:\n  level: error\n", {"FLUXMQ_DEBUG": "false"}, logging.ERROR),
    ],
)
def test_debug_and_trace_are_hard_overrides(write, text: str, env: dict[str, str], level: int) -> None:
    cfg = load_config(write(text), env=env)
    assert effective_level(cfg.log) == level
    logger = logging.getLogger("fluxmq")
    saved = (logger.level, logger.propagate)  # setup_logging sets both: later tests capture records
    handler = setup_logging(cfg.log)
    try:
        assert logger.level == level
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def test_fluxmq_debug_that_is_not_a_boolean_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={"FLUXMQ_DEBUG": "loud"})
    assert "FLUXMQ_DEBUG" in str(info.value) and "true" in str(info.value)


@pytest.mark.parametrize(
    "text, seconds",
    [
        ('"60s"', 60.0),
        ('"168h"', 168 * 3600.0),
        ('"1m30s"', 90.0),
        ('"500ms"', 0.5),
        ("1h30m", 5400.0),
        ("10", 10.0),
    ],
)
def test_go_durations(write, text: str, seconds: float) -> None:
    cfg = load_config(write(f"server:\n  connect_timeout: {text}\n"), env={})
    assert cfg.server.connect_timeout == pytest.approx(seconds)


def test_duration_other_spelling_names_key_line_and_accepted_values(write) -> None:
    path = write('server:\n  connect_timeout: "10 seconds"\n')
    message = error_line(path)
    assert "server.connect_timeout" in message and f"{path}:2" in message and '"10s"' in message


def test_sizes_as_plain_integers(write) -> None:
    cfg = load_config(write("broker:\n  max_message_size: 1048576\n  max_queued_bytes: 2097152\n"), env={})
    assert cfg.broker.max_message_size == 1048576
    assert cfg.broker.max_queued_bytes == 2097152


@pytest.mark.parametrize(
    "spelling, value",
    [
        ("true", True),
        ("false", False),
        ("True", True),
        ("FALSE", False),
        ("yes", True),
        ("no", False),
        ("on", True),
        ("off", False),
    ],
)
def test_yaml_booleans(write, spelling: str, value: bool) -> None:
    # go-yaml v3 decodes YAML 1.1's yes/no/on/off into a bool field; ruamel (YAML 1.2) reads them as text.
    cfg = load_config(write(f"log:\n  compress: {spelling}\n"), env={})
    assert cfg.log.compress is value


def test_boolean_other_spelling_names_accepted_values(write) -> None:
    path = write("log:\n  compress: maybe\n")
    message = error_line(path)
    assert "log.compress" in message and f"{path}:2" in message and "true or false" in message


def test_unknown_fluxmq_variable_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={"FLUXMQ_NOT_A_KEY": "1"})
    assert "FLUXMQ_NOT_A_KEY" in str(info.value)
    assert "FLUXMQ_ENV_IGNORE" in str(info.value)  # the message says how to pass it on purpose


def test_env_ignore_lets_unrelated_fluxmq_variables_pass() -> None:
    # e.g. Kubernetes injects FLUXMQ_SERVICE_HOST, FLUXMQ_PORT_1883_TCP... for a Service named fluxmq.
    env = {
        "FLUXMQ_ENV_IGNORE": "FLUXMQ_SERVICE_HOST, FLUXMQ_PORT*",
        "FLUXMQ_SERVICE_HOST": "10.0.0.1",
        "FLUXMQ_PORT": "tcp://10.0.0.1:1883",
        "FLUXMQ_PORT_1883_TCP_ADDR": "10.0.0.1",
    }
    cfg = load_config(env=env)
    assert cfg.server.tcp.plain.addr  # loaded
    with pytest.raises(ConfigError, match="FLUXMQ_SERVCE_HOST"):
        load_config(env={**env, "FLUXMQ_SERVCE_HOST": "typo"})


@pytest.mark.parametrize("name", ["FLUXMQ_CONFIG", "FLUXMQ_ADMIN_TOKEN", "FLUXMQ_DEBUG", "FLUXMQ_TRACE"])
def test_documented_non_key_variables_pass(name: str) -> None:
    load_config(env={name: "true"})


def test_all_errors_are_collected(write) -> None:
    path = write("log:\n  level: loud\n  compress: maybe\nbroker:\n  no_such_key: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"FLUXMQ_NOPE": "1"}, overrides=["broker.max_inflight=lots"], all_errors=True)
    lines = [str(e) for e in info.value.errors]
    assert len(lines) == 5, lines
    for expected in ("log.level", "log.compress", "broker.no_such_key", "FLUXMQ_NOPE", "broker.max_inflight"):
        assert any(expected in line for line in lines), expected


@pytest.mark.parametrize("spelling, canonical", [("INFO", "info"), ("Warn", "warn"), ("DEBUG", "debug")])
def test_log_level_is_case_insensitive_like_go_slog(write, spelling: str, canonical: str) -> None:
    # The Go FluxMQ logs with slog (reference 002), whose Level.UnmarshalText ignores case.
    assert load_config(write(f"log:\n  level: {spelling}\n"), env={}).log.level == canonical
    assert load_config(env={"FLUXMQ_LOG_LEVEL": spelling}).log.level == canonical
