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
    cfg = _load(tmp_path, """
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
""")
    s = EtcdSettings.from_config(cfg)
    assert s.initial_cluster == "broker-1=http://10.0.0.1:2380,broker-2=http://10.0.0.2:2380"
    assert (s.bootstrap, s.endpoints, s.hybrid_retained_size_threshold) == (False, ["https://10.0.0.9:2379"], 4096)
    assert (s.lease_ttl, s.request_timeout, s.start_timeout) == (5.0, 2.0, 30.0)
    assert (s.tls_enabled, s.tls_ca_file, s.tls_cert_file, s.tls_key_file) == (True, "ca.pem", "c.pem", "k.pem")
    assert not s.supervised
    assert s.client_endpoints() == ["https://10.0.0.9:2379"]


@pytest.mark.parametrize(("text", "key"), [
    ("cluster: {etcd: {initial_cluster: 'broker-1:2380'}}", "cluster.etcd.initial_cluster"),
    ("cluster: {etcd: {endpoints: ['10.0.0.1:2379']}}", "cluster.etcd.endpoints"),
    ("cluster: {etcd: {lease_ttl: 1s}}", "cluster.etcd.lease_ttl"),
    ("cluster: {etcd: {bind_addr: 'nowhere'}}", "cluster.etcd.bind_addr"),
    ("cluster: {etcd: {bootstrapp: true}}", "cluster.etcd.bootstrapp"),
])
def test_a_bad_value_is_one_line_naming_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text + "\n")
    assert str(info.value).startswith(f"config error: {key} (")
    assert "\n" not in str(info.value)
