"""cluster.enabled, cluster.node_id and cluster.transport.*: strict, one line per problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from fluxmq.cluster.config import cluster_settings
from fluxmq.config import load_config
from fluxmq.errors import ConfigError


def load(tmp_path: Path, text: str):
    path = tmp_path / "fluxmq.yaml"
    path.write_text(text)
    return load_config(path, env={})


def test_transport_keys_are_read(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        "cluster:\n  enabled: true\n  node_id: a\n  transport:\n"
        "    bind_addr: 127.0.0.1:7000\n    peers:\n      a: 127.0.0.1:7000\n      b: 127.0.0.1:7001\n"
        "    route_batch_max_size: 64\n    route_batch_max_delay: 2ms\n",
    )
    s = cluster_settings(cfg)
    assert s.enabled and s.node_id == "a"
    t = s.transport
    assert t.peers == {"a": "127.0.0.1:7000", "b": "127.0.0.1:7001"}
    assert (t.batch_max_size, t.batch_max_delay, t.batches_in_flight) == (64, 0.002, 4)


def test_enabled_without_node_id_is_one_line(tmp_path: Path) -> None:
    cfg = load(tmp_path, "cluster:\n  enabled: true\n")
    with pytest.raises(ConfigError) as info:
        cluster_settings(cfg)
    assert "cluster.node_id" in str(info.value) and "\n" not in str(info.value)


def test_unknown_transport_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "cluster:\n  transport:\n    peeers: {}\n")
    assert "cluster.transport.peeers" in str(info.value)


def test_bad_peer_address_is_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(
            tmp_path, "cluster:\n  enabled: true\n  node_id: a\n  transport:\n    peers:\n      b: nowhere\n"
        )
    assert "cluster.transport.peers" in str(info.value) and "nowhere" in str(info.value)


def test_a_wildcard_peer_address_names_the_peer(tmp_path: Path) -> None:
    cfg = load(
        tmp_path, "cluster:\n  enabled: true\n  node_id: a\n  transport:\n    peers:\n      b: 0.0.0.0:7000\n"
    )
    with pytest.raises(ConfigError, match=r"cluster\.transport\.peers\.b"):
        cluster_settings(cfg)


def test_peers_from_the_environment() -> None:
    cfg = load_config(env={"FLUXMQ_CLUSTER_TRANSPORT_PEERS": "b=127.0.0.1:7001, c=127.0.0.1:7002"})
    assert dict(cfg.cluster.transport.peers) == {"b": "127.0.0.1:7001", "c": "127.0.0.1:7002"}


def test_tls_needs_readable_files(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        "cluster:\n  enabled: true\n  node_id: a\n  transport:\n    tls_enabled: true\n"
        f"    cert_file: {tmp_path}/missing.crt\n",
    )
    with pytest.raises(ConfigError, match=r"cluster\.transport\.cert_file"):
        cluster_settings(cfg)


def test_check_reports_a_missing_node_id(tmp_path: Path, capsys) -> None:
    from fluxmq.node.cli import main

    conf = tmp_path / "node.yaml"
    conf.write_text("cluster:\n  enabled: true\n")
    assert main(["--check", "--config", str(conf)]) != 0
    assert "cluster.node_id" in capsys.readouterr().err


def test_routes_beside_the_grpc_cluster_are_refused(tmp_path: Path) -> None:
    """cluster.routes mirrors every topic to its peers; the gRPC cluster routes between the same nodes
    too, so a message would reach a subscriber once per path. Refused at start, with the key named."""
    cfg = load(
        tmp_path,
        "cluster:\n  enabled: true\n  node_id: a\n"
        "  routes:\n    - {name: b, host: 127.0.0.1, port: 1884, node_id: b}\n",
    )
    with pytest.raises(ConfigError) as info:
        cluster_settings(cfg)
    msg = str(info.value)
    assert "cluster.routes" in msg and "bridges" in msg and "\n" not in msg
    # Routes alone (reference 001's cluster of routes, no gRPC cluster) stay allowed.
    alone = load(tmp_path, "cluster:\n  routes:\n    - {name: b, host: 127.0.0.1, port: 1884, node_id: b}\n")
    assert not cluster_settings(alone).enabled
