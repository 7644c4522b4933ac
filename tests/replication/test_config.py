"""Raft members from etcd in the configuration (fluxmq/replication/config.py): when they apply, the
Raft address a node announces, the members the group waits for, the checks at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from fluxmq.config import load_config
from fluxmq.errors import ConfigError
from fluxmq.replication.config import etcd_membership, expected_members, raft_addr, replication_problems

ROOT = Path(__file__).parents[2]

EDA = """
queues:
  - name: events
    replication: {enabled: true, replication_factor: 3, mode: sync, min_in_sync_replicas: 2}
"""


def config(tmp_path: Path, text: str):
    path = tmp_path / "fluxmq.yaml"
    path.write_text(text)
    return load_config(path, env={})


def test_the_shipped_cluster_configs_pass_the_replication_checks_and_wait_for_their_three_nodes() -> None:
    for i in (1, 2, 3):
        cfg = load_config(ROOT / "conf" / "cluster" / f"node{i}.yaml", env={})
        assert etcd_membership(cfg)
        assert replication_problems(cfg) == []
        assert raft_addr(cfg) == f"127.0.0.1:7{i}00"
        assert expected_members(cfg) == (["node1", "node2", "node3"], 3)


def test_without_peers_a_replication_factor_of_3_is_checked_against_the_members_to_come(tmp_path) -> None:
    text = (
        """
cluster:
  enabled: true
  node_id: a
  etcd: {endpoints: ["http://127.0.0.1:2379"]}
  raft: {enabled: true}
"""
        + EDA
    )
    cfg = config(tmp_path, text)
    assert etcd_membership(cfg) and replication_problems(cfg) == []
    assert expected_members(cfg) == ([], 3)  # the largest replication_factor
    cfg = config(
        tmp_path, text.replace("raft: {enabled: true}", "raft: {enabled: true, expected_members: 2}")
    )
    problems = replication_problems(cfg)
    assert problems and "replication_factor 3 but group 'default' has 2 members" in str(problems[0])


def test_the_raft_address_defaults_to_the_transport_host(tmp_path) -> None:
    text = (
        """
cluster:
  enabled: true
  node_id: a
  transport: {bind_addr: "10.1.2.3:7948"}
  etcd: {endpoints: ["http://127.0.0.1:2379"]}
  raft: {enabled: true}
"""
        + EDA
    )
    assert raft_addr(config(tmp_path, text)) == "10.1.2.3:7100"
    set_ = text.replace("raft: {enabled: true}", 'raft: {enabled: true, bind_addr: "127.0.0.1:7300"}')
    assert raft_addr(config(tmp_path, set_)) == "127.0.0.1:7300"


def test_static_peers_keep_the_static_plan(tmp_path) -> None:
    text = (
        """
cluster:
  enabled: true
  node_id: a
  etcd: {endpoints: ["http://127.0.0.1:2379"]}
  raft: {enabled: true, bind_addr: "127.0.0.1:7100", peers: ["127.0.0.1:7100"]}
"""
        + EDA
    )
    cfg = config(tmp_path, text)
    assert not etcd_membership(cfg)
    problems = replication_problems(cfg)
    assert problems and isinstance(problems[0], ConfigError)
    assert "has 1 members" in str(problems[0])


@pytest.mark.parametrize(
    "cluster", ["enabled: false", "enabled: true\n  node_id: a\n  transport: {peers: {b: '127.0.0.1:1'}}"]
)
def test_no_etcd_means_no_etcd_membership(tmp_path, cluster: str) -> None:
    cfg = config(tmp_path, f"cluster:\n  {cluster}\n  raft: {{enabled: true}}\n")
    assert not etcd_membership(cfg)


def test_a_wildcard_raft_address_is_refused_since_the_others_could_not_dial_it(tmp_path) -> None:
    text = (
        """
cluster:
  enabled: true
  node_id: a
  transport: {bind_addr: "0.0.0.0:7948"}
  etcd: {endpoints: ["http://127.0.0.1:2379"]}
  raft: {enabled: true}
"""
        + EDA
    )
    problems = replication_problems(config(tmp_path, text))
    assert problems and "cluster.raft.bind_addr" in str(problems[0]) and "0.0.0.0:7100" in str(problems[0])
    assert "\n" not in str(problems[0])
