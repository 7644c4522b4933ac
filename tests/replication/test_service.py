"""Planning of Raft groups from the configuration (fluxmq/replication/service.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fluxmq.errors import ConfigError
from fluxmq.queues.config import QueueConfig, ReplicationConfig
from fluxmq.replication.service import plan

PEERS = ["127.0.0.1:7100", "127.0.0.1:7200", "127.0.0.1:7300", "127.0.0.1:7400", "127.0.0.1:7500"]


def raft(me: str = PEERS[0], peers=PEERS, groups=None, auto: bool = True):
    return SimpleNamespace(
        bind_addr=me,
        peers=list(peers),
        groups=groups or {},
        auto_provision_groups=auto,
        write_policy="forward",
        distribution_mode="replicate",
    )


def queue(name: str, rf: int = 3, isr: int = 2, group: str = "default") -> QueueConfig:
    return QueueConfig(name, replication=ReplicationConfig(True, group, "sync", rf, isr, 5.0))


def test_replication_factor_picks_that_many_members_the_same_on_every_node() -> None:
    picks = []
    for me in PEERS:
        groups, queues = plan(raft(me), [queue("orders", rf=3)])
        picks.append(queues["orders"])
    held = [p for p in picks if p is not None]
    assert len(held) == 3  # three of the five nodes hold the log, the others none
    assert len({p.members for p in held}) == 1 and len(held[0].members) == 3
    assert {p.self_addr for p in held} == set(held[0].members)


def test_replication_factor_equal_to_the_group_uses_the_group_itself() -> None:
    groups, queues = plan(raft(PEERS[1], PEERS[:3]), [queue("orders", rf=3)])
    assert queues["orders"].key == "default" and queues["orders"].self_addr == PEERS[1]
    assert queues["orders"].members == tuple(sorted(PEERS[:3]))


def test_replication_factor_above_the_group_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"replication_factor 4 but group 'default' has 3 members"):
        plan(raft(PEERS[0], PEERS[:3]), [queue("orders", rf=4)])


def test_min_in_sync_replicas_above_the_majority_is_refused_not_ignored() -> None:
    with pytest.raises(ConfigError, match=r"min_in_sync_replicas.*above the Raft majority 2"):
        plan(raft(PEERS[0], PEERS[:3]), [queue("orders", rf=3, isr=3)])


def test_a_group_not_listed_is_provisioned_on_shifted_ports_or_refused() -> None:
    groups, queues = plan(raft(PEERS[0], PEERS[:3]), [queue("orders", group="g1")])
    assert queues["orders"].self_addr == "127.0.0.1:7101"
    assert queues["orders"].members == ("127.0.0.1:7101", "127.0.0.1:7201", "127.0.0.1:7301")
    with pytest.raises(ConfigError, match="auto_provision_groups is false"):
        plan(raft(PEERS[0], PEERS[:3], auto=False), [queue("orders", group="g1")])


def test_a_declared_group_is_used_as_written() -> None:
    declared = [
        {
            "name": "g1",
            "bind_addr": "127.0.0.1:9001",
            "peers": ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"],
        }
    ]
    groups, queues = plan(raft(groups=declared), [queue("orders", group="g1")])
    assert queues["orders"].key == "g1" and queues["orders"].self_addr == "127.0.0.1:9001"
    assert set(groups) == {"g1"}
