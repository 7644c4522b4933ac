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

TOKEN = "members-token"
ENV = {"FLUXMQ_ADMIN_TOKEN": TOKEN}
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def _admin(node, method: str, path: str, doc: dict | None = None) -> tuple[int, dict]:
    body = json.dumps(doc).encode() if doc is not None else None
    status, _, answer = http_request(node, method, path, body, AUTH, port=node.admin_port)
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
