"""A new Raft member that joins through etcd alone (docs/replication.rst, "Changing members"):
three nodes form the default group from etcd; a fourth started later, with no static peers, holds
no replica until the operator adds it by node id (``POST /cluster/raft/groups/default/members
{"node": ...}``); it then starts its replica from the record in etcd, catches up, and stays a member
across a restart; removed (``fluxmq-node raft-member remove``), it stops its replica. A join whose
leader dies between writing ``joining`` and the add is undone by the next leader (the node stops its
replica), and the operator's request made again on the new leader adds it.

The nodes share the session's etcd (``etcd_server``) under a key prefix of their own.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, free_port
from tests.e2e.test_raft_members import ENV, _admin, _wait
from tests.e2e.test_replication import _publish_acked, queue_count, raft_status, wait_all_know_leader
from tests.e2e.test_replication_etcd import EtcdRaftCluster, publish_outcomes
from tests.etcd import etcd_get, etcd_put

pytestmark = pytest.mark.e2e

PATH = "/cluster/raft/groups/default/members"


def _record(endpoint: str, prefix: str) -> dict:
    """``{prefix}raft/members`` as etcd holds it (etcd's v3 JSON gateway)."""
    value = etcd_get(endpoint, prefix + "raft/members")
    return {} if value is None else json.loads(value)


def _put_record(endpoint: str, prefix: str, doc: dict) -> None:
    """Write ``{prefix}raft/members`` (as a write that failed would have left it)."""
    etcd_put(endpoint, prefix + "raft/members", json.dumps(doc).encode())


def _raft_member(node, *args: str) -> tuple[int, str, str]:
    """``fluxmq-node raft-member ...`` against ``node``'s admin API -> (exit status, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXMQ_")}
    env.update(ENV, PYTHONPATH=str(REPO_ROOT))
    admin = f"http://{node.host}:{node.admin_port}"
    done = subprocess.run(
        [sys.executable, "-m", "fluxmq.node.cli", "raft-member", *args, "--admin", admin],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stdout, done.stderr


def test_a_later_node_added_by_node_id_joins_from_the_record_in_etcd(node_factory, etcd_server) -> None:
    cluster = EtcdRaftCluster(node_factory, etcd_server.endpoint, env=ENV)
    nodes = [cluster.node(i, wait_ready=False) for i in range(3)]
    for n in nodes:
        n.wait_ready()
    leader = wait_all_know_leader(nodes)
    assert _publish_acked(nodes[leader], "before", 50, b"a") == 50

    # A fourth node, started after the set was agreed and with no static peers, holds no replica.
    late = cluster.node(3)
    _wait(
        "the late node outside the members", lambda: "not one of the Raft members" in str(raft_status(late))
    )
    ((rc, props),) = publish_outcomes(late, "late", [b"x"])
    assert rc.is_failure and "holds no replica" in props.ReasonString, (str(rc), props)

    # By node id: one not registered in etcd is refused with the reason; a follower names the leader.
    status, body = _admin(nodes[leader], "POST", PATH, {"node": "nosuch"})
    assert status == 404 and "not registered in etcd" in body["error"], body
    follower = (leader + 1) % 3
    status, body = _admin(nodes[follower], "POST", PATH, {"node": "r3"})
    assert status == 409 and body.get("leader") == nodes[leader].raft_addr, body

    # The operator adds it by node id on the leader: its Raft address comes from its registration.
    status, body = _admin(nodes[leader], "POST", PATH, {"node": "r3"})
    assert status == 200, body
    everyone = sorted(n.raft_addr for n in [*nodes, late])
    assert sorted(body["members"]) == everyone, body
    record = _record(etcd_server.endpoint, cluster.prefix)
    assert record["members"] == {f"r{i}": n.raft_addr for i, n in enumerate([*nodes, late])}, record
    assert not record.get("joining"), record

    # It started its replica from the record and caught up; an acknowledged append (made through it,
    # forwarded to the leader) is then on its replica too.
    caught = _wait("the late node's replica caught up", lambda: queue_count(late) == 50 and raft_status(late))
    assert caught["peers"] == everyone and not caught.get("forming"), caught
    assert "record" not in raft_status(nodes[leader])  # the leader finds the record in step

    # The record as a failed write leaves it (etcd down between the commit and the write): the
    # node still joining, the members the old ones. The leader re-writes it from its committed
    # configuration; the new member keeps its replica meanwhile.
    stale = {
        **record,
        "members": {f"r{i}": n.raft_addr for i, n in enumerate(nodes)},
        "joining": {"r3": late.raft_addr},
    }
    _put_record(etcd_server.endpoint, cluster.prefix, stale)
    repaired = _wait(
        "the leader re-writing the record",
        lambda: len((r := _record(etcd_server.endpoint, cluster.prefix))["members"]) == 4 and r,
    )
    assert repaired["members"] == record["members"] and not repaired.get("joining"), repaired
    assert raft_status(late)["peers"] == everyone and not raft_status(late).get("forming")
    assert _publish_acked(late, "through-late", 30, b"b") == 30
    _wait("the late node holding every acknowledged record", lambda: queue_count(late) == 80)

    # Restarted, it is a member from the record (still no static peers): its replica runs again.
    late.stop()
    late = node_factory.restart(late)
    back = _wait(
        "the restarted node's replica",
        lambda: (st := raft_status(late)) is not None and st.get("leader") and st["queues"] and st,
    )
    assert back["peers"] == everyone and not back.get("forming"), back
    _wait("the restarted node holding every record", lambda: queue_count(late) == 80)
    assert _publish_acked(late, "after-restart", 10, b"c") == 10

    # Removed (by its address), it stops its replica and says why; the record follows.
    leader = wait_all_know_leader([*nodes, late])
    assert leader != 3  # the late node caught up last; a restart would not have made it leader here
    # through ``fluxmq-node raft-member`` (the admin API's client): the answer is printed
    code, out, err = _raft_member(nodes[leader], "add", "--node", "nosuch")
    assert code == 1 and "404" in err and "not registered in etcd" in err, (out, err)
    code, out, err = _raft_member(nodes[leader], "remove", "--addr", late.raft_addr)
    assert code == 0, err
    assert late.raft_addr not in json.loads(out)["members"], out
    gone = _wait(
        "the removed node stopping its replica",
        lambda: "removed from the Raft members" in str(raft_status(late)) and raft_status(late),
    )
    assert "stopped its replica" in gone["forming"], gone
    ((rc, props),) = publish_outcomes(late, "removed", [b"y"])
    assert rc.is_failure and "holds no replica" in props.ReasonString, (str(rc), props)
    assert sorted(_record(etcd_server.endpoint, cluster.prefix)["members"].values()) == sorted(
        n.raft_addr for n in nodes
    )


def test_a_join_whose_leader_dies_before_the_add_is_undone_by_the_next_leader(
    node_factory, etcd_server, tmp_path
) -> None:
    # the test-only hook (forming.TEST_EXIT_IN_JOIN): the leader exits once, right after it wrote
    # the late node to the record's joining and before it makes the add
    exit_file = tmp_path / "exit-in-join"
    exit_file.write_text("")
    hook = "FLUXMQ_TEST_EXIT_IN_JOIN"  # no config key: listed in FLUXMQ_ENV_IGNORE, as any such variable
    env = {**ENV, hook: str(exit_file), "FLUXMQ_ENV_IGNORE": hook}
    cluster = EtcdRaftCluster(node_factory, etcd_server.endpoint, env=env)
    nodes = [cluster.node(i, wait_ready=False) for i in range(3)]
    for n in nodes:
        n.wait_ready()
    leader = wait_all_know_leader(nodes)
    assert _publish_acked(nodes[leader], "before", 20, b"a") == 20
    three = {f"r{i}": n.raft_addr for i, n in enumerate(nodes)}
    late = cluster.node(3)
    _wait(
        "the late node outside the members", lambda: "not one of the Raft members" in str(raft_status(late))
    )

    try:
        _admin(nodes[leader], "POST", PATH, {"node": "r3"})
    except (OSError, http.client.HTTPException):
        pass  # the leader exited with the request unanswered
    _wait("the leader exiting mid-join", lambda: nodes[leader].returncode is not None)
    assert not exit_file.exists()
    record = _record(etcd_server.endpoint, cluster.prefix)
    assert record["members"] == three and record.get("joining") == {"r3": late.raft_addr}, record
    # the late node read itself in joining and runs a replica the group does not count
    _wait("the joining node's replica", lambda: "forming" not in (raft_status(late) or {"forming": 1}))

    alive = [n for i, n in enumerate(nodes) if i != leader]
    new = alive[wait_all_know_leader(alive, timeout=30)]
    # the next leader takes it out of joining (after forming.ORPHAN_WAIT, 20 s), the record's members
    # unchanged, and the late node stops its replica saying why
    undone = _wait(
        "the next leader taking the late node out of joining",
        lambda: not (r := _record(etcd_server.endpoint, cluster.prefix)).get("joining") and r,
        timeout=90,
    )
    assert undone["members"] == three, undone
    gone = _wait(
        "the late node stopping its replica",
        lambda: "its join was undone" in str(raft_status(late)) and raft_status(late),
    )
    assert "stopped its replica" in gone["forming"], gone
    assert sorted(raft_status(new)["peers"]) == sorted(three.values())
    assert _publish_acked(new, "after", 20, b"b") == 20  # appends keep working on the two left
    # an add by an address no node announces and where nothing answers is refused at once
    status, body = _admin(new, "POST", PATH, {"addr": f"127.0.0.1:{free_port()}"})
    assert status == 409 and "nothing answers at" in body["error"], body
    assert _record(etcd_server.endpoint, cluster.prefix) == undone

    # The operator's request made again on the new leader adds it: it starts its replica again
    # and catches up (a group of four, three of which answer).
    status, body = _admin(new, "POST", PATH, {"node": "r3"})
    assert status == 200, body
    assert sorted(body["members"]) == sorted([*three.values(), late.raft_addr]), body
    record = _record(etcd_server.endpoint, cluster.prefix)
    assert record["members"] == {**three, "r3": late.raft_addr} and not record.get("joining"), record
    _wait("the late node holding every acknowledged record", lambda: queue_count(late) == 40)
    assert _publish_acked(late, "through-late", 10, b"c") == 10
