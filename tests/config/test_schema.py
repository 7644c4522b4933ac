"""The key schema, and the two files generated from it (conf/fluxmq.yaml, docs/config-keys.rst)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fluxmq.config import load_config
from fluxmq.config.schema import ENV_ALLOWED, KEYS, SCHEMA, SECTION_DOCS, Key, Schema, render_default
from fluxmq.config.values import Bool, Duration, Enum, Int, Size, Str

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf" / "fluxmq.yaml"
RST = ROOT / "docs" / "config-keys.rst"

# The keys this issue asked for, with their typed defaults; later issues add keys, never drop these.
ISSUE_DEFAULTS = {
    "server.tcp.plain.addr": "127.0.0.1:1883",  # loopback until configured (issue 17 item 11)
    "server.tcp.plain.max_connections": 10000,
    "server.tcp.plain.read_timeout": 0.0,
    "server.tcp.plain.write_timeout": 60.0,
    "server.connect_timeout": 10.0,
    "server.health_enabled": True,
    "server.health_addr": "127.0.0.1:8081",
    "server.shutdown_timeout": 10.0,
    "broker.max_message_size": 1048576,
    "broker.max_packet_size": 2097152,
    "broker.max_retained_messages": 10000,
    "broker.max_inflight": 100,
    "broker.max_queued_messages": 1000,
    "broker.max_queued_bytes": 16 * 1024 * 1024,
    "broker.queue_overflow": "drop_new",
    "broker.write_buffer_high": 1024 * 1024,
    "broker.max_keepalive": 65535,
    "broker.allow_zero_keepalive": True,
    "broker.shared_subscription_strategy": "round_robin",
    "broker.sys_interval": 10.0,
    "storage.type": "lmdb",
    "storage.path": "./data",
    "log.level": "info",
    "log.format": "text",
    "log.file": "",
    "log.max_size_mb": 100,
    "log.max_backups": 7,
    "log.compress": True,
    "log.throttling.enabled": True,
    "log.throttling.rate": 500.0,
    "log.throttling.burst": 50,
}


def test_issue_keys_have_their_defaults() -> None:
    for name, value in ISSUE_DEFAULTS.items():
        assert SCHEMA.defaults[name] == value, name
        assert type(SCHEMA.defaults[name]) is type(value), name


def test_enums_offer_the_documented_choices() -> None:
    assert SCHEMA.keys["broker.queue_overflow"].type.choices == ("drop_new", "drop_oldest", "disconnect")
    assert SCHEMA.keys["broker.shared_subscription_strategy"].type.choices == (
        "round_robin",
        "random",
        "least_inflight",
    )
    assert SCHEMA.keys["storage.type"].type.choices == ("memory", "lmdb")
    assert SCHEMA.keys["log.level"].type.choices == ("trace", "debug", "info", "warn", "warning", "error")
    assert SCHEMA.keys["log.format"].type.choices == ("text", "json")


def test_every_key_is_documented_and_maps_to_its_env_name() -> None:
    for key in KEYS:
        assert key.doc.strip(), key.name
        assert key.env == "FLUXMQ_" + key.name.upper().replace(".", "_")
        assert SCHEMA.env[key.env] is key
    for section in SCHEMA.sections:
        assert section in SECTION_DOCS, f"section {section} has no line in SECTION_DOCS"


def test_conf_file_gives_exactly_the_defaults_and_names_every_key() -> None:
    """conf/fluxmq.yaml and the schema cannot drift: same values, and every key set in the file."""
    cfg = load_config(CONF, env={})
    assert cfg.to_dict() == load_config(env={}).to_dict()
    for name, value in SCHEMA.defaults.items():
        assert cfg.get(name) == value
        if not SCHEMA.keys[name].secret:
            assert cfg.origin(name).startswith(f"{CONF}:"), f"{name} is not set in {CONF}"


def test_conf_file_is_the_generated_one() -> None:
    assert CONF.read_text(encoding="utf-8") == SCHEMA.yaml(), (
        "regenerate: python -m fluxmq.config.schema --yaml > conf/fluxmq.yaml"
    )


def test_conf_file_comments_every_key() -> None:
    lines = CONF.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert lines[i - 1].strip().startswith("#"), f"no comment above {stripped!r}"


def test_rst_reference_is_current() -> None:
    assert RST.read_text(encoding="utf-8") == SCHEMA.rst(), (
        "regenerate: python -m fluxmq.config.schema --rst > docs/config-keys.rst"
    )


def test_rst_entry_point_prints_the_reference() -> None:
    out = subprocess.run(
        [sys.executable, "-W", "error", "-m", "fluxmq.config.schema", "--rst"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert out.stderr == ""
    assert out.stdout == RST.read_text(encoding="utf-8")
    for key in KEYS:
        assert f"``{key.name}``" in out.stdout
        assert f"``{key.env}``" in out.stdout


def test_yaml_entry_point_prints_the_conf_file() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fluxmq.config.schema", "--yaml"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert out.stdout == CONF.read_text(encoding="utf-8")


def test_env_allow_list_is_small_and_documented() -> None:
    assert {"FLUXMQ_CONFIG", "FLUXMQ_ADMIN_TOKEN"} <= ENV_ALLOWED
    assert len(ENV_ALLOWED) <= 5
    rst = SCHEMA.rst()
    for name in ENV_ALLOWED:
        assert f"``{name}``" in rst


def test_render_default() -> None:
    assert render_default(True) == "true"
    assert render_default(":1883") == '":1883"'
    assert render_default(500.0) == "500.0"
    assert render_default(7) == "7"


def test_adding_a_key_is_one_line() -> None:
    schema = Schema(KEYS + (Key("broker.new_limit", Int(0), 5, "A new limit."),), SECTION_DOCS)
    assert schema.defaults["broker.new_limit"] == 5
    assert "FLUXMQ_BROKER_NEW_LIMIT" in schema.env
    assert "new_limit: 5" in schema.yaml()
    assert "``broker.new_limit``" in schema.rst()


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ([Key("a.b_c", Int(), 1, "x"), Key("a_b.c", Int(), 1, "y")], "both map to FLUXMQ_A_B_C"),
        ([Key("a.b", Int(), 1, "x"), Key("a.b.c", Int(), 1, "y")], "both a key and a section"),
        ([Key("a.b", Int(), 1, "x"), Key("a.b", Int(), 2, "y")], "duplicate key"),
        ([Key("a.b", Int(1), 0, "x")], "default of a.b"),
        ([Key("a.get", Int(), 1, "x")], "reserved name"),
        ([Key("A.b", Int(), 1, "x")], "bad key name"),
        ([Key("toplevel", Int(), 1, "x")], "bad key name"),
        ([Key("config.x", Str(), "", "x"), Key("config", Str(), "", "y")], "bad key name"),
        ([Key("admin.token", Str(), "", "x", secret=True)], "allow-list"),
    ],
)
def test_schema_refuses_inconsistent_keys(keys: list[Key], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Schema(keys)


def test_env_names_are_unambiguous_despite_underscores() -> None:
    """Keys with underscores map one way: the map is built from the keys, never by splitting names."""
    schema = Schema([Key("a.b_c", Int(), 1, "x"), Key("a.d", Int(), 2, "y")])
    assert schema.env["FLUXMQ_A_B_C"].name == "a.b_c"
    assert SCHEMA.env["FLUXMQ_SERVER_TCP_PLAIN_MAX_CONNECTIONS"].name == "server.tcp.plain.max_connections"
    assert (
        SCHEMA.env["FLUXMQ_BROKER_SHARED_SUBSCRIPTION_STRATEGY"].name == "broker.shared_subscription_strategy"
    )


def test_secret_keys_appear_in_the_generated_files_without_values() -> None:
    schema = Schema(
        [
            Key("auth.db_password", Str(), "", "Password of the auth database.", secret=True),
            Key("auth.enabled", Bool(), False, "Check passwords."),
        ]
    )
    yaml = schema.yaml()
    assert "db_password:" not in yaml.replace("# db_password:", "")
    assert "FLUXMQ_AUTH_DB_PASSWORD" in yaml
    rst = schema.rst()
    assert "secret: set only from the environment" in rst


def test_suggestions() -> None:
    assert SCHEMA.suggest("broker.max_inflite") == "broker.max_inflight"
    assert SCHEMA.suggest("brokr") == "broker"
    assert SCHEMA.suggest("server.max_inflight") == "broker.max_inflight"
    assert SCHEMA.suggest("zzzz.qqqq") is None
    assert SCHEMA.suggest_env("FLUXMQ_LOG_LEVL") == "FLUXMQ_LOG_LEVEL"


def test_types_used_for_units() -> None:
    """Durations come out as float seconds and sizes as int bytes."""
    for key in KEYS:
        if isinstance(key.type, Duration):
            assert isinstance(SCHEMA.defaults[key.name], float), key.name
        if isinstance(key.type, Size):
            assert isinstance(SCHEMA.defaults[key.name], int), key.name
        if isinstance(key.type, Enum):
            assert key.default in key.type.choices
