"""Merging defaults, the YAML file, the environment and --set overrides; the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fluxmq.config import Config, Section, load_config
from fluxmq.config.schema import SCHEMA, Key, Schema
from fluxmq.config.values import Bool, Int, Str
from fluxmq.errors import ConfigError


@pytest.fixture
def write(tmp_path: Path):
    """Write a YAML config file and return its path."""

    def _write(text: str, name: str = "fluxmq.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return _write


def error_of(*args, **kwargs) -> ConfigError:
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "config errors are one line"
    assert message.startswith("config error: ")
    return info.value


# -- merging and precedence -------------------------------------------------------------------------


def test_defaults_only() -> None:
    cfg = load_config(env={})
    assert cfg.server.tcp.plain.addr == "127.0.0.1:1883"
    assert cfg.broker.max_queued_bytes == 16 * 1024 * 1024
    assert cfg.server.connect_timeout == 10.0
    assert all(cfg.origin(name) == "default" for name in SCHEMA.keys)


def test_file_values_are_typed_and_located(write) -> None:
    path = write(
        "server:\n"
        "  tcp:\n"
        "    plain:\n"
        '      addr: "127.0.0.1:0"\n'
        "  connect_timeout: 1h30m\n"
        "broker:\n"
        "  max_queued_bytes: 64KiB\n"
        "  max_inflight: 20\n"
        "log:\n"
        "  throttling:\n"
        "    rate: 10\n"
    )
    cfg = load_config(path, env={})
    assert cfg.server.tcp.plain.addr == "127.0.0.1:0"
    assert cfg.server.connect_timeout == 5400.0
    assert cfg.broker.max_queued_bytes == 65536
    assert cfg.broker.max_inflight == 20 and type(cfg.broker.max_inflight) is int
    assert cfg.log.throttling.rate == 10.0 and type(cfg.log.throttling.rate) is float
    assert cfg.origin("server.tcp.plain.addr") == f"{path}:4"
    assert cfg.origin("broker.max_inflight") == f"{path}:8"
    assert cfg.origin("log.throttling.rate") == f"{path}:11"
    assert cfg.origin("broker.max_packet_size") == "default"


def test_precedence_cli_over_env_over_file_over_defaults(write) -> None:
    path = write("broker:\n  max_inflight: 10\n  max_queued_messages: 11\n  max_keepalive: 12\n")
    env = {"FLUXMQ_BROKER_MAX_INFLIGHT": "20", "FLUXMQ_BROKER_MAX_QUEUED_MESSAGES": "21"}
    cfg = load_config(path, env=env, overrides=["broker.max_inflight=30"])
    assert cfg.broker.max_inflight == 30
    assert cfg.origin("broker.max_inflight") == "cli --set"
    assert cfg.broker.max_queued_messages == 21
    assert cfg.origin("broker.max_queued_messages") == "env FLUXMQ_BROKER_MAX_QUEUED_MESSAGES"
    assert cfg.broker.max_keepalive == 12
    assert cfg.origin("broker.max_keepalive") == f"{path}:4"
    assert cfg.broker.max_retained_messages == 10000
    assert cfg.origin("broker.max_retained_messages") == "default"


def test_env_defaults_to_os_environ(monkeypatch) -> None:
    monkeypatch.setenv("FLUXMQ_SERVER_TCP_PLAIN_ADDR", "127.0.0.1:1999")
    cfg = load_config()
    assert cfg.server.tcp.plain.addr == "127.0.0.1:1999"
    assert cfg.origin("server.tcp.plain.addr") == "env FLUXMQ_SERVER_TCP_PLAIN_ADDR"


def test_every_key_can_be_set_from_the_environment() -> None:
    def text(value: object) -> str:
        return ("true" if value else "false") if isinstance(value, bool) else str(value)

    env = {key.env: text(key.default) for key in SCHEMA.keys.values()}
    cfg = load_config(env=env)
    assert cfg.to_dict() == load_config(env={}).to_dict()
    assert all(cfg.origin(key.name) == f"env {key.env}" for key in SCHEMA.keys.values())


def test_later_cli_override_wins() -> None:
    cfg = load_config(env={}, overrides=["broker.max_inflight=5", "broker.max_inflight=6"])
    assert cfg.broker.max_inflight == 6


@pytest.mark.parametrize(
    ("override", "key", "value"),
    [
        ("log.compress=yes", "log.compress", True),
        ("log.compress=No", "log.compress", False),
        ("log.compress=1", "log.compress", True),
        ("log.compress=0", "log.compress", False),
        ("log.compress=false", "log.compress", False),
        ("log.file=", "log.file", ""),
        ('log.file=""', "log.file", ""),
        ("log.file='/tmp/a b.log'", "log.file", "/tmp/a b.log"),
        ("log.file=123", "log.file", "123"),
        ("broker.max_inflight=0x10", "broker.max_inflight", 16),
        ("broker.max_inflight= 7 ", "broker.max_inflight", 7),
        ("broker.max_queued_bytes=1MiB", "broker.max_queued_bytes", 1048576),
        ("server.connect_timeout=250ms", "server.connect_timeout", 0.25),
        ("server.connect_timeout=3", "server.connect_timeout", 3.0),
        ("server.tcp.plain.addr=:1884", "server.tcp.plain.addr", ":1884"),
        ("server.tcp.plain.addr=[::1]:1884", "server.tcp.plain.addr", "[::1]:1884"),
        ("server.tcp.plain.addr=", "server.tcp.plain.addr", ""),
        ("log.throttling.rate=2", "log.throttling.rate", 2.0),
    ],
)
def test_cli_values_are_yaml_scalars(override: str, key: str, value: object) -> None:
    cfg = load_config(env={}, overrides=[override])
    assert cfg.get(key) == value
    assert type(cfg.get(key)) is type(value)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("YES", True),
        ("false", False),
        ("False", False),
        ("0", False),
        ("no", False),
        ("No", False),
    ],
)
def test_env_booleans_are_lenient(text: str, value: bool) -> None:
    assert load_config(env={"FLUXMQ_LOG_COMPRESS": text}).log.compress is value


def test_unrelated_and_allowed_env_vars_are_ignored() -> None:
    cfg = load_config(
        env={
            "PATH": "/bin",
            "FLUXMQ_CONFIG": "/etc/x.yaml",
            "FLUXMQ_ADMIN_TOKEN": "t",
            "fluxmq_broker_max_inflight": "3",
        }
    )
    assert cfg.to_dict() == load_config(env={}).to_dict()


def test_empty_file_and_empty_section_give_defaults(write) -> None:
    assert load_config(write(""), env={}).to_dict() == load_config(env={}).to_dict()
    assert load_config(write("# nothing\nlog:\n"), env={}).to_dict() == load_config(env={}).to_dict()


def test_path_may_be_a_pathlib_path_or_str(write) -> None:
    path = write("broker:\n  max_inflight: 9\n")
    assert load_config(str(path), env={}).broker.max_inflight == 9
    assert load_config(path, env={}).broker.max_inflight == 9


# -- the Config object ------------------------------------------------------------------------------


def test_config_access() -> None:
    cfg = load_config(env={})
    assert isinstance(cfg, Config)
    assert isinstance(cfg.log, Section)
    assert cfg.get("server.tcp.plain.addr") == cfg.server.tcp.plain.addr
    assert cfg.get("log.throttling").burst == 50
    assert cfg.log.get("throttling.burst") == 50
    assert cfg.get("no.such.key", None) is None
    assert "broker" in cfg and "max_inflight" in cfg.broker
    assert "max_inflight" in dir(cfg.broker)
    with pytest.raises(KeyError, match="no config key broker.nope"):
        cfg.get("broker.nope")
    with pytest.raises(AttributeError, match="broker.nope"):
        _ = cfg.broker.nope
    with pytest.raises(KeyError):
        cfg.origin("broker.nope")


def test_config_is_read_only() -> None:
    cfg = load_config(env={})
    with pytest.raises(AttributeError, match="read-only"):
        cfg.broker.max_inflight = 5
    with pytest.raises(AttributeError, match="read-only"):
        cfg.broker = None


def test_to_dict_is_plain_nested_data() -> None:
    cfg = load_config(env={}, overrides=["broker.max_inflight=42"])
    d = cfg.to_dict()
    assert d["broker"]["max_inflight"] == 42
    assert d["server"]["tcp"]["plain"]["addr"] == "127.0.0.1:1883"
    assert json.loads(json.dumps(d)) == d
    assert set(d) == {name.split(".")[0] for name in SCHEMA.keys}


def test_configs_compare_by_value() -> None:
    assert load_config(env={}) == load_config(env={})
    assert load_config(env={}) != load_config(env={}, overrides=["broker.max_inflight=1"])
    assert load_config(env={}).log == load_config(env={}).log


# -- errors -----------------------------------------------------------------------------------------


def test_error_line_format(write) -> None:
    path = write("broker:\n  max_retained_messages: 10\n  max_inflight: lots\n")
    err = error_of(path)
    assert (
        str(err) == f"config error: broker.max_inflight ({path}:3): expected an integer 1..65535, got 'lots'"
    )
    assert (err.key, err.source, err.line, err.got) == ("broker.max_inflight", str(path), 3, "lots")


def test_unknown_key_suggests_the_close_one(write) -> None:
    path = write("broker:\n  max_inflite: 5\n")
    assert str(error_of(path)) == (
        f"config error: broker.max_inflite ({path}:2): unknown key; did you mean broker.max_inflight?"
    )


def test_unknown_section_and_misplaced_key(write) -> None:
    assert "brokr (" in str(error_of(write("brokr:\n  max_inflight: 5\n")))
    assert "did you mean broker?" in str(error_of(write("brokr:\n  max_inflight: 5\n")))
    message = str(error_of(write("server:\n  max_inflight: 5\n")))
    assert "server.max_inflight" in message and "did you mean broker.max_inflight?" in message


def test_unknown_key_without_a_close_one(write) -> None:
    message = str(error_of(write("zzzzzz: 1\n")))
    assert message.endswith("zzzzzz (" + str(write("zzzzzz: 1\n")) + ":1): unknown key")


@pytest.mark.parametrize(
    ("yaml", "key", "line", "fragment"),
    [
        (
            "broker:\n  max_inflight: 10.0\n",
            "broker.max_inflight",
            2,
            "expected an integer 1..65535, got 10.0",
        ),
        ("broker:\n  max_inflight: 0\n", "broker.max_inflight", 2, "got 0"),
        ("broker:\n  max_inflight: true\n", "broker.max_inflight", 2, "got true"),
        ("broker:\n  max_inflight: [1, 2]\n", "broker.max_inflight", 2, "got a list"),
        ("broker:\n  max_inflight:\n", "broker.max_inflight", 2, "has no value"),
        (
            "broker:\n  queue_overflow: drop\n",
            "broker.queue_overflow",
            2,
            "expected one of drop_new, drop_oldest, disconnect, got 'drop'",
        ),
        ("broker:\n  max_queued_bytes: -5\n", "broker.max_queued_bytes", 2, "(negative size), got -5"),
        ("broker:\n  max_queued_bytes: -1MiB\n", "broker.max_queued_bytes", 2, "negative size"),
        ("broker:\n  max_queued_bytes: 10 parsecs\n", "broker.max_queued_bytes", 2, "unknown size unit"),
        (
            "server:\n  connect_timeout: 10 parsecs\n",
            "server.connect_timeout",
            2,
            "(unknown duration unit 'parsecs'), got '10 parsecs'",
        ),
        ("server:\n  connect_timeout: -1\n", "server.connect_timeout", 2, "negative duration"),
        ("broker:\n  park_after: soon\n", "broker.park_after", 2, 'expected a duration such as "250ms"'),
        ("broker:\n  park_after: -2s\n", "broker.park_after", 2, "(negative duration), got '-2s'"),
        ("server:\n  health_addr: ':70000'\n", "server.health_addr", 2, "port 70000 out of range 0..65535"),
        ("server:\n  health_addr: 'no port'\n", "server.health_addr", 2, "got 'no port'"),
        ("server:\n  health_addr: ''\n", "server.health_addr", 2, "got ''"),
        (
            "server:\n  health_enabled: maybe\n",
            "server.health_enabled",
            2,
            "expected true or false (also yes/no, on/off), got 'maybe'",
        ),
        ("log:\n  file: 5\n", "log.file", 2, "expected a string, got 5"),
        ("log:\n  throttling:\n    rate: 0\n", "log.throttling.rate", 3, "expected a number > 0, got 0"),
        ("storage:\n  path: ''\n", "storage.path", 2, "non-empty string"),
        ("broker: 5\n", "broker", 1, "expected a mapping of broker.* keys, got 5"),
        ("log:\n  throttling: on\n", "log.throttling", 2, "expected a mapping of log.throttling.* keys"),
        ("- a\n- b\n", "(top level)", 1, "expected a mapping of sections, got a list"),
        ("1: x\n", "1", 1, "unknown key"),
    ],
)
def test_bad_values_name_key_file_and_line(write, yaml: str, key: str, line: int, fragment: str) -> None:
    path = write(yaml)
    err = error_of(path)
    assert err.key == key
    assert f"config error: {key} ({path}:{line}): " in str(err)
    assert fragment in str(err)


@pytest.mark.parametrize(
    ("yaml", "line", "fragment"),
    [
        ("broker:\n  max_inflight: [1\n", 3, "YAML syntax error"),
        ("broker:\n  max_inflight: 1\n  max_inflight: 2\n", 3, 'duplicate key "max_inflight"'),
        ("broker:\n max_inflight: 1\n  max_queued_messages: 2\n", 3, "YAML syntax error"),
        ("broker: {max_inflight: 1\n", 2, "YAML syntax error"),
    ],
)
def test_yaml_syntax_errors_name_the_line(write, yaml: str, line: int, fragment: str) -> None:
    path = write(yaml)
    err = error_of(path)
    assert str(err).startswith(f"config error: yaml syntax ({path}:{line}): ")
    assert fragment in str(err)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert str(error_of(path)) == (
        f"config error: config file ({path}): cannot read the file: No such file or directory"
    )


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"log:\n  file: \xe9t\xe9\n")
    assert "not UTF-8" in str(error_of(path))


def test_env_errors_name_the_variable() -> None:
    err = error_of(env={"FLUXMQ_BROKER_MAX_INFLIGHT": "lots"})
    assert str(err) == (
        "config error: broker.max_inflight (env FLUXMQ_BROKER_MAX_INFLIGHT): "
        "expected an integer 1..65535, got 'lots'"
    )
    assert "expected true or false (also yes/no, on/off), got 'maybe'" in str(
        error_of(env={"FLUXMQ_LOG_COMPRESS": "maybe"})
    )
    assert "unknown duration unit" in str(error_of(env={"FLUXMQ_SERVER_CONNECT_TIMEOUT": "10 parsecs"}))


def test_unknown_env_var_is_an_error_naming_it() -> None:
    err = error_of(env={"FLUXMQ_BROKER_MAX_INFLIGT": "7"})
    assert str(err) == (
        "config error: FLUXMQ_BROKER_MAX_INFLIGT (env): no config key maps to this variable; "
        "did you mean FLUXMQ_BROKER_MAX_INFLIGHT? to pass it on purpose, list it in "
        "FLUXMQ_ENV_IGNORE (comma-separated, PREFIX* allowed)"
    )
    assert "maps to this variable; to pass it" in str(error_of(env={"FLUXMQ_WHATEVER_ELSE_ENTIRELY": "1"}))


def test_cli_errors() -> None:
    assert str(error_of(overrides=["broker.max_inflight"])) == (
        "config error: broker.max_inflight (cli --set): expected key=value, got 'broker.max_inflight'"
    )
    assert "=5 (cli --set): expected key=value" in str(error_of(overrides=["=5"]))
    assert str(error_of(overrides=["broker.max_inflite=5"])) == (
        "config error: broker.max_inflite (cli --set): unknown key; did you mean broker.max_inflight?"
    )
    assert "is a section" in str(error_of(overrides=["broker=5"]))
    assert str(error_of(overrides=["broker.max_inflight=70000"])) == (
        "config error: broker.max_inflight (cli --set): expected an integer 1..65535, got '70000'"
    )
    assert "got 'maybe'" in str(error_of(overrides=["log.compress=maybe"]))
    assert "expected one of text, json" in str(error_of(overrides=["log.format=xml"]))


def test_cli_error_wins_over_valid_file_and_env(write) -> None:
    path = write("broker:\n  max_inflight: 5\n")
    err = error_of(path, env={"FLUXMQ_BROKER_MAX_INFLIGHT": "6"}, overrides=["broker.max_inflight=-1"])
    assert err.source == "cli --set"


# -- secrets ----------------------------------------------------------------------------------------

SECRET_SCHEMA = Schema(
    [
        Key("auth.db_password", Str(), "", "Password of the auth database.", secret=True),
        Key("auth.enabled", Bool(), False, "Check passwords."),
        Key("auth.max_tries", Int(1), 3, "Attempts."),
    ]
)


def test_secret_from_environment() -> None:
    cfg = load_config(env={"FLUXMQ_AUTH_DB_PASSWORD": "s3cret"}, schema=SECRET_SCHEMA)
    assert cfg.auth.db_password == "s3cret"
    assert cfg.origin("auth.db_password") == "env FLUXMQ_AUTH_DB_PASSWORD"
    assert cfg.to_dict()["auth"]["db_password"] == "s3cret"
    assert cfg.to_dict(redact_secrets=True)["auth"] == {
        "db_password": "<secret>",
        "enabled": False,
        "max_tries": 3,
    }


def test_secret_in_file_is_an_error_that_says_so(write) -> None:
    path = write("auth:\n  enabled: true\n  db_password: hunter2\n")
    err = error_of(path, schema=SECRET_SCHEMA)
    assert str(err) == (
        f"config error: auth.db_password ({path}:3): is a secret and may only be set "
        "from the environment (FLUXMQ_AUTH_DB_PASSWORD)"
    )
    assert "hunter2" not in str(err)


def test_secret_on_command_line_is_an_error() -> None:
    err = error_of(overrides=["auth.db_password=hunter2"], schema=SECRET_SCHEMA)
    assert "may only be set from the environment" in str(err)
    assert "hunter2" not in str(err)


# -- queues: a list of mappings (issue 10) ----------------------------------------------------------


def test_queues_list_is_read_with_defaults(write) -> None:
    cfg = load_config(
        write("queues:\n  - name: orders\n    visibility_timeout: 5s\n    retry: {max_retries: 3}\n"), env={}
    )
    (q,) = cfg.queues
    assert q["name"] == "orders" and q["visibility_timeout"] == 5.0
    assert q["retry"]["max_retries"] == 3 and q["retry"]["initial_backoff"] == 1.0
    assert q["dlq"] == {"enabled": True, "topic": ""} and cfg.queue_manager.auto_create is True


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        ("queues:\n  - name: a\n    colour: red\n", "queues[0].colour", "unknown field"),
        ("queues:\n  - name: a\n  - name: b\n  - name: a\n", "queues[2].name", "duplicate name 'a'"),
        (
            "queues:\n  - name: a\n    retention:\n      max_age: soon\n",
            "queues[0].retention.max_age",
            "expected a duration",
        ),
        ("queues:\n  - name: a/b\n", "queues[0].name", "expected a queue name"),
    ],
)
def test_queues_errors_name_the_item_file_and_line(write, text: str, where: str, problem: str) -> None:
    path = write(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    message = str(err.value)
    assert "\n" not in message
    assert f"config error: {where} ({path}:" in message and problem in message
    line = int(message.split(f"{path}:", 1)[1].split(")", 1)[0])
    assert text.splitlines()[line - 1].strip().split(":")[0].lstrip("- ") in where
