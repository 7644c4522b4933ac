"""The bridge route model (fluxmq/bridge/config.py) and the strict ``bridges`` / ``cluster.routes`` keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from fluxmq.bridge.config import TopicRoute, bridges_from_config, filter_matches
from fluxmq.config import load_config
from fluxmq.errors import ConfigError


def load(tmp_path: Path, text: str, env: dict | None = None):
    path = tmp_path / "fluxmq.yaml"
    path.write_text(text)
    return load_config(path, env=env or {}), path


BRIDGE = """
bridges:
  - name: cloud
    address: broker.example:8883
    protocol_version: 5.0
    password_env: CLOUD_PW
    tls: {ca_file: /etc/ca.pem}
    message_validity: 30s
    reconnect: {initial: 500ms, max: 2m}
    topics:
      - {pattern: "sensors/#", direction: out, qos: 1, local_prefix: "edge/", remote_prefix: "site1/"}
      - {pattern: "cmd/+", direction: in, qos: 2}
    max_queued_messages: 500
"""


def test_bridge_item_is_read_with_defaults_and_typed(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUD_PW", "s3cret")
    cfg, _ = load(tmp_path, BRIDGE)
    [b] = bridges_from_config(cfg)
    assert (b.name, b.host, b.port, b.version, b.client_id) == (
        "cloud",
        "broker.example",
        8883,
        5,
        "fluxmq-bridge-cloud",
    )
    assert b.password == b"s3cret" and "s3cret" not in repr(b)  # never logged
    assert (b.message_validity, b.reconnect_initial, b.reconnect_max, b.max_queued_messages) == (
        30,
        0.5,
        120,
        500,
    )
    assert b.tls == {"ca_file": "/etc/ca.pem", "cert_file": "", "key_file": "", "insecure": False}
    assert b.topics[0] == TopicRoute("sensors/#", "out", 1, "edge/", "site1/")
    assert b.topics[1].direction == "in" and b.topics[1].qos == 2


def test_clear_password_in_the_file_is_refused_naming_key_file_and_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "bridges:\n  - name: x\n    address: h:1\n    password: hunter2\n")
    message = str(info.value)
    assert "bridges[0].password" in message and "fluxmq.yaml:4" in message and "password_env" in message
    assert "hunter2" not in message


@pytest.mark.parametrize(
    ("text", "where", "line"),
    [
        (
            "bridges:\n  - name: x\n    address: h:1\n    topics:\n      - {pattern: a, direction: sideways}\n",
            "bridges[0].topics[0].direction",
            5,
        ),
        ("bridges:\n  - name: x\n    address: h:1\n    colour: red\n", "bridges[0].colour", 4),
        ("bridges:\n  - name: x\n    address: h:1\n  - address: h:2\n", "bridges[1]", 4),
        (
            "bridges:\n  - name: x\n    address: h:1\n    topics:\n      - {pattern: a, qos: 3}\n",
            "bridges[0].topics[0].qos",
            5,
        ),
        ("cluster:\n  routes:\n    - {host: h}\n", "cluster.routes[0]", 3),
    ],
)
def test_bad_items_name_their_path_and_line(tmp_path, text, where, line):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    message = str(info.value)
    assert f"config error: {where} " in message and f"fluxmq.yaml:{line})" in message, message


def test_password_from_a_file_and_missing_env(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    cfg, _ = load(tmp_path, f"bridges:\n  - {{name: a, address: 'h:1', password_file: {secret}}}\n")
    assert bridges_from_config(cfg)[0].password == b"from-file"
    cfg, _ = load(tmp_path, "bridges:\n  - {name: a, address: 'h:1', password_env: NOT_SET_ANYWHERE}\n")
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE is not set"):
        bridges_from_config(cfg)


def test_cluster_routes_in_the_reference_001_spelling_mirror_everything(tmp_path):
    cfg, _ = load(
        tmp_path,
        "cluster:\n  routes:\n    - {host: 10.0.0.2, port: 1883, node_id: node-1, "
        "username: cluster, message_validity: 60}\n",
    )
    [r] = bridges_from_config(cfg)
    assert (r.name, r.client_id, r.username, r.message_validity, r.mesh, r.version) == (
        "10.0.0.2:1883",
        "node-1",
        "cluster",
        60,
        True,
        5,
    )
    assert r.topics == (TopicRoute("#", "out", 2),)


def test_bridges_from_the_environment_as_json(tmp_path):
    cfg = load_config(env={"FLUXMQ_BRIDGES": '[{"name": "e", "address": "h:1883"}]'})
    assert bridges_from_config(cfg)[0].name == "e"


def test_duplicate_names_are_refused(tmp_path):
    cfg, _ = load(tmp_path, "bridges:\n  - {name: a, address: 'h:1'}\n  - {name: a, address: 'h:2'}\n")
    with pytest.raises(ConfigError, match="two bridges are named 'a'"):
        bridges_from_config(cfg)


@pytest.mark.parametrize(
    ("flt", "topic", "hit"),
    [
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("#", "$SYS/x", False),
        ("+/x", "$q/x", False),
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
    ],
)
def test_filter_matches(flt, topic, hit):
    assert filter_matches(flt, topic) is hit


def test_prefix_mapping_both_ways():
    r = TopicRoute("s/#", "both", 1, "edge/", "cloud/")
    assert r.to_remote("edge/s/1") == "cloud/s/1" and r.to_local("cloud/s/1") == "edge/s/1"
