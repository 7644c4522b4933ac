"""Real fluxmq-node processes with cluster.enabled: the metadata plane starts with the node, a live
node id refuses a second node with one line, each node's own etcd member forms one etcd cluster with
the others', and a killed node leaves the others ready but degraded until it is back."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.cluster.metadata.conftest import wait_for
from tests.conftest import HOST, free_port


def _cluster(node_id: str, endpoint: str, prefix: str, ttl: str = "2s") -> dict:
    return {
        "cluster.enabled": True,
        "cluster.node_id": node_id,
        "cluster.transport.bind_addr": f"{HOST}:{free_port()}",
        "cluster.etcd.endpoints": [endpoint],
        "cluster.etcd.prefix": prefix,
        "cluster.etcd.lease_ttl": ttl,
    }


def test_a_second_node_with_a_live_node_id_exits_with_one_line(node_factory, etcd_server, etcd_prefix):
    first = node_factory(_cluster("dup", etcd_server.endpoint, etcd_prefix))
    # The election campaign runs after /ready: the lone node becomes leader a moment later.
    assert wait_for(lambda: first.http_get("/cluster/status")[1]["is_leader"])
    status, body = first.http_get("/cluster/status")
    assert (status, body["node_id"], body["cluster_mode"], body["is_leader"]) == (200, "dup", True, True)
    assert first.http_get("/ready") == (
        200,
        {
            "status": "ready",
            "mode": "nominal",
            "checks": {"broker": {"status": "up"}, "storage": {"status": "up"}, "cluster": {"status": "up"}},
        },
    )

    second = node_factory(_cluster("dup", etcd_server.endpoint, etcd_prefix), wait_ready=False)
    code = second.wait(60)
    assert code not in (None, 0)
    lines = [line for line in second.log_text().splitlines() if "already live" in line]
    assert len(lines) == 1, second.log_tail()
    assert "cluster.node_id: 'dup' is already live in the cluster" in lines[0]
    assert first.is_ready()


def _members_config(tmp_path: Path, count: int) -> list[dict]:
    ports = [(free_port(), free_port()) for _ in range(count)]
    initial = ",".join(f"n{i}=http://{HOST}:{peer}" for i, (peer, _) in enumerate(ports))
    return [
        {
            "cluster.enabled": True,
            "cluster.node_id": f"n{i}",
            "cluster.transport.bind_addr": f"{HOST}:{free_port()}",
            "cluster.etcd.lease_ttl": "2s",
            "cluster.etcd.data_dir": str(tmp_path / f"etcd-n{i}"),
            "cluster.etcd.bind_addr": f"{HOST}:{peer}",
            "cluster.etcd.client_addr": f"{HOST}:{client}",
            "cluster.etcd.initial_cluster": initial,
            # its own data across restarts: a node started again is the same node (its state file
            # names its last lease, which it revokes instead of waiting for the TTL)
            "storage.path": str(tmp_path / f"data-n{i}"),
        }
        for i, (peer, client) in enumerate(ports)
    ]


def _etcd_pid(tmp_path: Path, node: int) -> int | None:
    try:
        pid = int((tmp_path / f"etcd-n{node}.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def test_three_nodes_with_their_own_etcd_members_act_as_one_cluster(node_factory, tmp_path):
    configs = _members_config(tmp_path, 3)
    nodes = [node_factory(cfg, wait_ready=False) for cfg in configs]  # a new etcd needs a quorum: start all
    for node in nodes:
        node.wait_ready(90)

    def all_members(node) -> bool:  # each node sees the others through its etcd watch (asynchronous)
        body = node.http_get("/cluster/status")[1]
        return [m["node_id"] for m in body["members"]] == [body["node_id"]] + sorted(
            {"n0", "n1", "n2"} - {body["node_id"]}
        )

    for node in nodes:
        assert wait_for(lambda node=node: all_members(node), timeout=15), node.http_get("/cluster/status")[1]
    assert sum(node.http_get("/cluster/status")[1]["is_leader"] for node in nodes) == 1

    victim_etcd = _etcd_pid(tmp_path, 2)
    nodes[2].kill()  # SIGKILL: its etcd member goes with it, the other two keep a quorum
    assert wait_for(lambda: victim_etcd is None or _etcd_pid(tmp_path, 2) is None, timeout=15)
    for node in nodes[:2]:
        assert wait_for(
            lambda node=node: (
                node.http_get("/ready")[1].get("checks", {}).get("cluster")
                == {"status": "up", "details": "1/2 peers reachable"}
            ),
            timeout=30,
        )
        assert node.http_get("/ready")[0] == 200
    assert wait_for(
        lambda: sum(n.http_get("/cluster/status")[1]["is_leader"] for n in nodes[:2]) == 1, timeout=30
    )

    back = node_factory(configs[2], wait_ready=False)  # the same node again: same id, data and member
    back.wait_ready(90)
    for node in (*nodes[:2], back):
        assert wait_for(lambda node=node: node.http_get("/ready")[1].get("mode") == "nominal", timeout=30)

    etcd_pids = [_etcd_pid(tmp_path, i) for i in range(3)]
    assert all(etcd_pids)
    for node in (*nodes[:2], back):
        node.stop(signal.SIGTERM)
    for pid in etcd_pids:  # every member stopped with its node
        assert wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists() or _zombie(pid), timeout=15)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True
