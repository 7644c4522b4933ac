"""Changing a Raft group's members at run time through the admin API (issue 12).

Three real nodes with static peers; one is killed for good, a fourth node (another address) is
added with ``POST /cluster/raft/groups/default/members`` and the dead one removed with ``DELETE``;
the replicated queue keeps every acknowledged message, the new member catches up, and the group
(the two survivors and the new node) still elects a leader once the old leader is killed too.
"""

from __future__ import annotations

import json
import time

from tests.conftest import free_port
from tests.e2e.test_http_bridge import http_request
from tests.e2e.test_replication import QUEUE, _publish_acked, _raft_config, raft_status, wait_leader
from tests.etcd import etcd_get

TOKEN = "members-token"
ENV = {"FLUXMQ_ADMIN_TOKEN": TOKEN}
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


_SPEC = None


def _admin(node, method: str, path: str, doc: dict | None = None) -> tuple[int, dict]:
    """One admin request; its response is checked against fluxmq/http/openapi.yaml."""
    global _SPEC
    from openapi_core import OpenAPI
    from openapi_core.testing import MockRequest, MockResponse

    from fluxmq.http.admin import SPEC_PATH

    if _SPEC is None:
        _SPEC = OpenAPI.from_file_path(str(SPEC_PATH))
    body = json.dumps(doc).encode() if doc is not None else None
    status, headers, answer = http_request(node, method, path, body, AUTH, port=node.admin_port)
    _SPEC.validate_response(
        MockRequest("http://127.0.0.1:8082", method.lower(), path, headers=AUTH),
        MockResponse(json.dumps(answer).encode(), status, headers, headers["content-type"]),
    )
    return status, answer


def _wait(what, check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout:.0f}s (last: {last!r})")


def test_a_dead_member_is_replaced_through_the_admin_api(node_factory) -> None:
    peers = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    nodes = [
        node_factory(config_text=_raft_config(peers[i], peers), env=ENV, wait_ready=False) for i in range(3)
    ]
    for n, addr in zip(nodes, peers, strict=True):
        n.wait_ready()
        n.raft_addr = addr
    leader = wait_leader(nodes)
    assert _publish_acked(nodes[leader], "before", 200, b"a") == 200
    dead = (leader + 1) % 3
    other = (leader + 2) % 3
    nodes[dead].kill()  # kill -9, for good

    # the new node: another address, its static peers the members after the change (the survivors)
    new_addr = f"127.0.0.1:{free_port()}"
    after = [peers[leader], peers[other], new_addr]
    new = node_factory(config_text=_raft_config(new_addr, after), env=ENV, wait_ready=False)
    new.raft_addr = new_addr
    new.wait_ready()
    path = "/cluster/raft/groups/default/members"

    # a follower refuses, naming the leader
    status, body = _admin(nodes[other], "POST", path, {"addr": new_addr})
    assert status == 409 and nodes[leader].raft_addr in body["error"], (status, body)
    assert body.get("leader") == nodes[leader].raft_addr, body
    # unknown group, unknown member, bad body
    assert _admin(nodes[leader], "POST", "/cluster/raft/groups/nope/members", {"addr": new_addr})[0] == 404
    assert _admin(nodes[leader], "DELETE", f"{path}/127.0.0.1:1")[0] == 404
    assert _admin(nodes[leader], "POST", path, {"address": new_addr})[0] == 400
    # nothing listening there: refused before the group would count it in its majority
    status, body = _admin(nodes[leader], "POST", path, {"addr": f"127.0.0.1:{free_port()}"})
    assert status == 409 and "nothing answers" in body["error"], body

    status, body = _admin(nodes[leader], "POST", path, {"addr": new_addr})
    assert status == 200, body
    assert new_addr in body["members"], body
    status, body = _admin(nodes[leader], "DELETE", f"{path}/{peers[dead]}")
    assert status == 200, body
    assert sorted(body["members"]) == sorted(after), body
    st = raft_status(nodes[leader])
    assert sorted(st["peers"]) == sorted(after), st

    assert _publish_acked(nodes[leader], "after", 200, b"b") == 200
    # the new member catches up: the queue's 400 records, at the leader's commit index
    caught = _wait(
        "the new member holding the queue's 400 records",
        lambda: (s := raft_status(new)) is not None and s["queues"].get(QUEUE, {}).get("next") == 400 and s,
    )
    assert caught["leader"] == nodes[leader].raft_addr, caught
    assert sorted(caught["peers"]) == sorted(after), caught

    # the old leader goes too: the survivor and the new member are a majority of the new set
    nodes[leader].kill()
    survivors = [nodes[other], new]
    now = wait_leader(survivors, timeout=30)
    assert _publish_acked(survivors[now], "last", 100, b"c") == 100
    for n in survivors:
        _wait(
            f"{n.raft_addr} holding all 500 acknowledged records",
            lambda n=n: (
                (s := raft_status(n)) is not None and s["queues"].get(QUEUE, {}).get("count") == 500 and s
            ),
        )

    # the old leader comes back on its config as it was (peers naming the dead node): its journal
    # holds the changes, so it rejoins the new set and catches up
    back = node_factory.restart(nodes[leader])
    caught = _wait(
        "the restarted member holding all 500 records",
        lambda: (s := raft_status(back)) is not None and s["queues"].get(QUEUE, {}).get("count") == 500 and s,
    )
    assert sorted(caught["peers"]) == sorted(after), caught


def _etcd_members(endpoint: str, prefix: str) -> dict:
    """The ``raft/members`` record in etcd (its JSON gateway)."""
    value = etcd_get(endpoint, f"{prefix}raft/members")
    return {} if value is None else json.loads(value)["members"]


def test_a_member_change_on_etcd_membership_is_recorded_for_the_next_start(node_factory, etcd_server) -> None:
    """Members agreed in etcd: the change is written to raft/members, and every node stopped and
    started again forms the new set (the old ones from the record, the new one from its peers)."""
    from tests.e2e.test_replication import wait_all_know_leader
    from tests.e2e.test_replication_etcd import EtcdRaftCluster

    cluster = EtcdRaftCluster(lambda **kw: node_factory(env=ENV, **kw), etcd_server.endpoint)
    nodes = [cluster.node(i, wait_ready=False) for i in range(3)]
    for n in nodes:
        n.wait_ready()
    leader = wait_all_know_leader(nodes)
    assert _publish_acked(nodes[leader], "before", 50, b"a") == 50
    dead, other = (leader + 1) % 3, (leader + 2) % 3
    nodes[dead].kill()
    new_addr = f"127.0.0.1:{free_port()}"
    after = [nodes[leader].raft_addr, nodes[other].raft_addr, new_addr]
    # the new node: static peers (the members after the change), no etcd needed for its Raft group
    new = node_factory(config_text=_raft_config(new_addr, after), env=ENV)
    new.raft_addr = new_addr
    path = "/cluster/raft/groups/default/members"
    status, body = _admin(nodes[leader], "POST", path, {"addr": new_addr, "node_id": "r9"})
    assert status == 200, body
    status, body = _admin(nodes[leader], "DELETE", f"{path}/{nodes[dead].raft_addr}")
    assert status == 200 and sorted(body["members"]) == sorted(after), body
    recorded = _etcd_members(etcd_server.endpoint, cluster.prefix)
    assert recorded == {
        f"r{leader}": nodes[leader].raft_addr,
        f"r{other}": nodes[other].raft_addr,
        "r9": new_addr,
    }
    assert _publish_acked(nodes[leader], "after", 50, b"b") == 50
    _wait(
        "the new member holding 100 records",
        lambda: (s := raft_status(new)) and s["queues"][QUEUE]["count"] == 100,
    )

    for n in (nodes[leader], nodes[other], new):
        n.stop()
    back = [node_factory.restart(n) for n in (nodes[leader], nodes[other], new)]
    now = wait_all_know_leader(back)
    for n in back:
        assert sorted(raft_status(n)["peers"]) == sorted(after), raft_status(n)
    assert _publish_acked(back[now], "again", 50, b"c") == 50
    for n in back:
        _wait(
            f"{n.raft_addr} holding 150 records",
            lambda n=n: (s := raft_status(n)) and s["queues"][QUEUE]["count"] == 150,
        )
