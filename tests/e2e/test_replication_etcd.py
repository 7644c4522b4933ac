"""Replicated durable queues whose Raft members come from etcd (issue 12 on the cluster of issue 11):
no ``cluster.raft.peers``; each node announces its Raft address in its etcd registration and the
group is formed from the members agreed there (fluxmq/cluster/metadata/raft_members.py,
fluxmq/replication/forming.py).

The nodes share the session's etcd (``etcd_server``) under a key prefix of their own, except the
test of the shipped conf/cluster files, whose nodes run their own etcd members as README.rst says.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.conftest import HOST, REPO_ROOT, free_port
from tests.e2e.test_replication import (
    QUEUE,
    _leader_kill_run,
    client5,
    queue_count,
    raft_status,
    wait_all_know_leader,
)

pytestmark = pytest.mark.e2e

EDA_QUEUE = """
queues:
  - name: {name}
    replication:
      enabled: true
      replication_factor: 3
      mode: sync
      min_in_sync_replicas: 2
      ack_timeout: 3s
"""


class EtcdRaftCluster:
    """Nodes on the shared etcd under one prefix, Raft on, no static peers."""

    def __init__(
        self,
        node_factory,
        endpoint: str,
        write_policy: str = "forward",
        raft_extra: str = "",
        env: dict[str, str] | None = None,
    ) -> None:
        self.env = env
        self.factory = node_factory
        self.raft_extra = raft_extra
        self.endpoint = endpoint
        self.prefix = f"/t-{uuid.uuid4().hex[:8]}/"
        self.write_policy = write_policy

    def node(self, i: int, wait_ready: bool = True):
        raft = f"{HOST}:{free_port()}"
        text = f"""
cluster:
  enabled: true
  node_id: "r{i}"
  transport:
    bind_addr: "{HOST}:{free_port()}"
  etcd:
    endpoints: [{json.dumps(self.endpoint)}]
    prefix: {json.dumps(self.prefix)}
    lease_ttl: 5s
  raft:
    enabled: true
    bind_addr: "{raft}"
    write_policy: {self.write_policy}
{self.raft_extra}""" + EDA_QUEUE.format(name=QUEUE)
        extra = {} if self.env is None else {"env": self.env}
        node = self.factory(config_text=text, wait_ready=wait_ready, **extra)
        node.raft_addr = raft
        return node


def etcd_start(endpoint: str):
    """A ``start`` for ``_leader_kill_run``: three ready nodes whose group forms from etcd."""

    def start(node_factory, write_policy: str = "forward", raft_extra: str = "") -> list:
        cluster = EtcdRaftCluster(node_factory, endpoint, write_policy, raft_extra)
        nodes = [cluster.node(i, wait_ready=False) for i in range(3)]
        for n in nodes:
            n.wait_ready()
        return nodes

    return start


def publish_outcomes(node, name: str, payloads: list[bytes], timeout: float = 30.0) -> list:
    """QoS 1 publishes to the queue -> each one's (reason code, properties), in order."""
    c = client5(node, name)
    out: dict[int, tuple] = {}
    lock = threading.Lock()

    def on_publish(client, userdata, mid, rc, props) -> None:
        with lock:
            out[mid] = (rc, props)

    c.on_publish = on_publish
    mids = [c.publish(f"$queue/{QUEUE}/k", p, qos=1).mid for p in payloads]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with lock:
            if len(out) == len(mids):
                break
        time.sleep(0.05)
    c.loop_stop()
    c.disconnect()
    with lock:
        return [out.get(m) for m in mids]


def test_a_group_forms_from_etcd_membership_and_a_sync_publish_is_acked_after_the_quorum(
    node_factory,
    etcd_server,
) -> None:
    cluster = EtcdRaftCluster(node_factory, etcd_server.endpoint)
    nodes = [cluster.node(0), cluster.node(1)]
    # Two of the three the group needs (the largest replication_factor): not formed, publishes refused.
    st = raft_status(nodes[0])
    assert "waiting for 3 nodes with a Raft address in etcd" in st["forming"], st
    assert st["delivering"] is False and st["leader"] is None
    # /cluster/status and /metrics say so too
    (group,) = nodes[0].http_get("/cluster/status")[1]["raft_groups"]
    assert group["forming"] == st["forming"] and group["lag"] == {}
    with urllib.request.urlopen(f"http://{HOST}:{nodes[0].health_port}/metrics", timeout=5) as resp:
        assert 'fluxmq_raft_is_leader{group="default"} 0.0' in resp.read().decode()
    ((rc, props),) = publish_outcomes(nodes[0], "early", [b"early"])
    assert rc.is_failure and rc.value == 0x97, str(rc)
    assert "its Raft group is not formed yet" in props.ReasonString, props.ReasonString
    # The third node completes the set; node 0's Raft port is taken meanwhile: it stays up, refuses
    # with the reason and starts its group once the port is free again.
    host, port = nodes[0].raft_addr.rsplit(":", 1)
    squatter = socket.socket()
    squatter.bind((host, int(port)))
    squatter.listen()
    try:
        nodes.append(cluster.node(2))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "starting the Raft group failed" not in str(
            raft_status(nodes[0])
        ):
            time.sleep(0.1)
        assert "starting the Raft group failed" in raft_status(nodes[0])["forming"], raft_status(nodes[0])
        ((rc, props),) = publish_outcomes(nodes[0], "port-taken", [b"x"])
        assert rc.is_failure and "starting the Raft group failed" in props.ReasonString
    finally:
        squatter.close()
    leader = wait_all_know_leader(nodes)
    addrs = sorted(n.raft_addr for n in nodes)
    for n in nodes:
        st = raft_status(n)
        assert st["peers"] == addrs and st["self"] == n.raft_addr and not st.get("forming"), st
    # A sync publish through a follower (forwarded to the leader) is acked once committed; every
    # replica then has every record.
    follower = (leader + 1) % 3
    outcomes = publish_outcomes(nodes[follower], "prod", [b"m%03d" % i for i in range(200)])
    assert all(o is not None and not o[0].is_failure for o in outcomes), [str(o and o[0]) for o in outcomes][
        :5
    ]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and [queue_count(n) for n in nodes] != [200] * 3:
        time.sleep(0.1)
    assert [queue_count(n) for n in nodes] == [200] * 3
    # Without a quorum (both followers stopped) the leader never acknowledges a sync publish.
    others = [i for i in range(3) if i != leader]
    for i in others:
        nodes[i].process.send_signal(signal.SIGSTOP)
        for pid in nodes[i].worker_pids():
            os.kill(pid, signal.SIGSTOP)
    try:
        outcomes = publish_outcomes(nodes[leader], "alone", [b"alone-%d" % i for i in range(5)])
    finally:
        for i in others:
            for pid in nodes[i].worker_pids():
                os.kill(pid, signal.SIGCONT)
            nodes[i].process.send_signal(signal.SIGCONT)
    assert all(o is not None and o[0].is_failure for o in outcomes), [str(o and o[0]) for o in outcomes]


def test_a_node_outside_the_agreed_members_refuses_with_the_reason(node_factory, etcd_server) -> None:
    cluster = EtcdRaftCluster(node_factory, etcd_server.endpoint)
    nodes = [cluster.node(i, wait_ready=False) for i in range(3)]
    for n in nodes:
        n.wait_ready()
    wait_all_know_leader(nodes)
    late = cluster.node(3)  # the members were agreed without it
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and "not one of the Raft members" not in str(raft_status(late)):
        time.sleep(0.1)
    assert "not one of the Raft members agreed in etcd" in raft_status(late)["forming"]
    ((rc, props),) = publish_outcomes(late, "late", [b"x"])
    assert rc.is_failure and "holds no replica" in props.ReasonString, (str(rc), props)


def test_a_majority_restarted_forms_its_group_from_the_recorded_members(node_factory, etcd_server) -> None:
    """The members are recorded in etcd once: two of the three restarted form the group again
    without the third (a recomputation from the live nodes would have needed all three)."""
    cluster = EtcdRaftCluster(node_factory, etcd_server.endpoint)
    nodes = [cluster.node(i, wait_ready=False) for i in range(3)]
    for n in nodes:
        n.wait_ready()
    leader = wait_all_know_leader(nodes)
    before = publish_outcomes(nodes[leader], "before", [b"a%d" % i for i in range(20)])
    assert all(o is not None and not o[0].is_failure for o in before)
    for n in nodes:
        n.stop()
    back = [node_factory.restart(nodes[i]) for i in (0, 1)]
    leader = wait_all_know_leader(back)
    for n in back:
        assert raft_status(n)["peers"] == sorted(n.raft_addr for n in nodes)
    after = publish_outcomes(back[1 - leader], "after", [b"b%d" % i for i in range(20)])
    assert all(o is not None and not o[0].is_failure for o in after), [str(o and o[0]) for o in after][:3]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and [queue_count(n) for n in back] != [40, 40]:
        time.sleep(0.1)
    assert [queue_count(n) for n in back] == [40, 40]


def test_leader_kill_on_etcd_membership_loses_no_acknowledged_message(node_factory, etcd_server) -> None:
    """tests/e2e/test_replication.py's leader kill (kill -9 under QoS 1 load; every PUBACKed message
    delivered at least once; nothing a consumer acked comes back) on a group formed from etcd."""
    _leader_kill_run(node_factory, "forward", 10000, start=etcd_start(etcd_server.endpoint))


# -- the shipped conf/cluster files and the README ---------------------------------------------------

CONF = REPO_ROOT / "conf" / "cluster"


def _queues_block(text: str) -> str:
    return text[text.index("\nqueues:\n") + 1 :]


def test_the_readme_shows_the_shipped_eda_queue_as_written() -> None:
    readme = (REPO_ROOT / "README.rst").read_text()
    blocks = {_queues_block((CONF / f"node{i}.yaml").read_text()) for i in (1, 2, 3)}
    assert len(blocks) == 1, "conf/cluster/node{1,2,3}.yaml declare different queues"
    block = blocks.pop()
    assert "replication_factor: 3" in block and "min_in_sync_replicas: 2" in block and "mode: sync" in block
    indented = "".join(f"    {line}" if line.strip() else line for line in block.splitlines(keepends=True))
    assert indented in readme, "README.rst's Cluster section must show conf/cluster's queues: block verbatim"


def test_the_shipped_cluster_configs_form_the_eda_group(node_factory, tmp_path: Path) -> None:
    """conf/cluster/node{1,2,3}.yaml as shipped (each node runs its own etcd member; the members of
    initial_cluster form the Raft group), on free ports and a temporary directory."""
    texts = [(CONF / f"node{i}.yaml").read_text() for i in (1, 2, 3)]
    ports = {int(p) for t in texts for p in re.findall(r"127\.0\.0\.1:(\d+)", t)}
    mapping = {p: free_port() for p in sorted(ports)}
    nodes = []
    for text in texts:
        for old, new in mapping.items():
            text = text.replace(f'127.0.0.1:{old}"', f'127.0.0.1:{new}"').replace(
                f"127.0.0.1:{old},", f"127.0.0.1:{new},"
            )
        text = text.replace("./run/cluster", str(tmp_path / "run"))
        assert "./run" not in text
        nodes.append(node_factory(config_text=text, wait_ready=False))
    for n in nodes:
        n.wait_ready(90)
    leader = wait_all_know_leader(nodes, timeout=60)
    for n in nodes:
        st = raft_status(n)
        assert len(st["peers"]) == 3 and "events" in st["queues"], st
    c = client5(nodes[(leader + 1) % 3], "eda-producer")
    done = threading.Event()
    got: list = []
    c.on_publish = lambda cl, u, mid, rc, props: (got.append(rc), done.set())
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("partition-key", "order-1")]
    c.publish("$queue/events/orders", b"order-1 created", qos=1, properties=props)
    assert done.wait(20)
    c.loop_stop()
    assert not got[0].is_failure, str(got[0])
    deadline = time.monotonic() + 20
    counts = []
    while time.monotonic() < deadline:
        counts = [(raft_status(n) or {}).get("queues", {}).get("events", {}).get("count") for n in nodes]
        if counts == [1, 1, 1]:
            break
        time.sleep(0.1)
    assert counts == [1, 1, 1]
