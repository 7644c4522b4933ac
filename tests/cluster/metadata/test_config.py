"""The cluster.etcd.* keys: strict values, defaults on loopback, read into EtcdSettings
(fluxmq/cluster/metadata/config.py)."""

from __future__ import annotations

import pytest

from fluxmq.cluster.metadata import EtcdSettings
from fluxmq.config import load_config
from fluxmq.errors import ConfigError


def _load(tmp_path, text: str):
    path = tmp_path / "fluxmq.yaml"
    path.write_text(text)
    return load_config(str(path), env={})


def test_defaults_bind_loopback_and_run_a_member(tmp_path):
    s = EtcdSettings.from_config(_load(tmp_path, "{}\n"))
    assert (s.bind_addr, s.client_addr) == ("127.0.0.1:2380", "127.0.0.1:2379")
    assert s.supervised and s.bootstrap
    assert s.client_endpoints() == ["http://127.0.0.1:2379"]
    assert (s.lease_ttl, s.hybrid_retained_size_threshold) == (10.0, 1024)


def test_every_key_is_read(tmp_path):
    cfg = _load(
        tmp_path,
        """
cluster:
  etcd:
    binary: /usr/bin/etcd
    data_dir: /var/lib/fluxmq/etcd
    bind_addr: "0.0.0.0:2380"
    client_addr: "0.0.0.0:2379"
    initial_cluster: "broker-1=http://10.0.0.1:2380, broker-2=http://10.0.0.2:2380"
    bootstrap: false
    endpoints: ["https://10.0.0.9:2379"]
    hybrid_retained_size_threshold: 4KiB
    lease_ttl: 5s
    request_timeout: 2s
    start_timeout: 30s
    tls: {enabled: true, ca_file: ca.pem, cert_file: c.pem, key_file: k.pem}
""",
    )
    s = EtcdSettings.from_config(cfg)
    assert s.initial_cluster == "broker-1=http://10.0.0.1:2380,broker-2=http://10.0.0.2:2380"
    assert (s.bootstrap, s.endpoints, s.hybrid_retained_size_threshold) == (
        False,
        ["https://10.0.0.9:2379"],
        4096,
    )
    assert (s.lease_ttl, s.request_timeout, s.start_timeout) == (5.0, 2.0, 30.0)
    assert (s.tls_enabled, s.tls_ca_file, s.tls_cert_file, s.tls_key_file) == (
        True,
        "ca.pem",
        "c.pem",
        "k.pem",
    )
    assert not s.supervised
    assert s.client_endpoints() == ["https://10.0.0.9:2379"]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("cluster: {etcd: {initial_cluster: 'broker-1:2380'}}", "cluster.etcd.initial_cluster"),
        ("cluster: {etcd: {endpoints: ['10.0.0.1:2379']}}", "cluster.etcd.endpoints"),
        ("cluster: {etcd: {lease_ttl: 1s}}", "cluster.etcd.lease_ttl"),
        ("cluster: {etcd: {bind_addr: 'nowhere'}}", "cluster.etcd.bind_addr"),
        ("cluster: {etcd: {bootstrapp: true}}", "cluster.etcd.bootstrapp"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text + "\n")
    assert str(info.value).startswith(f"config error: {key} (")
    assert "\n" not in str(info.value)


def test_check_reports_cluster_values_that_cannot_work_together(tmp_path):
    from fluxmq.cluster.metadata.config import cluster_config_problems

    cfg = _load(
        tmp_path,
        """
cluster:
  enabled: true
  etcd:
    initial_cluster: "node1=http://127.0.0.1:2380"
    tls: {enabled: true}
""",
    )
    lines = [str(p) for p in cluster_config_problems(cfg)]
    path = tmp_path / "fluxmq.yaml"
    assert lines == [
        "config error: cluster.node_id (default): is required when cluster.enabled is true",
        f"config error: cluster.etcd.tls.cert_file ({path}:6): and key_file are required for the node's etcd "
        "member when cluster.etcd.tls.enabled is true",
    ]
    cfg = _load(
        tmp_path,
        """
cluster:
  enabled: true
  node_id: node4
  etcd:
    initial_cluster: "node1=http://127.0.0.1:2380,node2=http://127.0.0.1:2382"
""",
    )
    assert [str(p) for p in cluster_config_problems(cfg)] == [
        f"config error: cluster.etcd.initial_cluster ({path}:6): lists node1, node2 but not this node ('node4', "
        "its cluster.node_id)"
    ]
    assert cluster_config_problems(_load(tmp_path, "cluster: {node_id: ''}\n")) == []  # clustering off


def test_node_check_prints_the_cluster_problem(tmp_path, capsys):
    from fluxmq.node.cli import main

    conf = tmp_path / "node.yaml"
    conf.write_text("cluster:\n  enabled: true\n")
    assert main(["--check", "--config", str(conf)]) == 2
    assert (
        "config error: cluster.node_id (default): is required when cluster.enabled is true"
        in capsys.readouterr().err
    )
