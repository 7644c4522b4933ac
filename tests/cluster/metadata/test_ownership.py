"""Session ownership in etcd: never two owners, clean takeover after a node's lease expired, release
only of what we own (fluxmq/cluster/metadata/ownership.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import gevent

from tests.cluster.metadata.conftest import SHORT_TTL, crash, wait_for

ROUNDS = 40


def _together(calls) -> list:
    """Run the calls in greenlets at once; their results in call order."""
    greenlets = [gevent.spawn(fn, *args) for fn, args in calls]
    gevent.joinall(greenlets, raise_error=True)
    return [g.value for g in greenlets]


def test_racing_greenlets_end_with_exactly_one_owner_each_time(meta_factory):
    metas = [meta_factory(f"n{i}") for i in range(5)]
    for r in range(ROUNDS):
        client = f"race-{r}"
        results = _together([(m.acquire_session, (client,)) for m in metas])
        winners = [m.node_id for m, res in zip(metas, results, strict=True) if res is None]
        assert len(winners) == 1, (client, results)
        owner = winners[0]
        assert all(res == owner for res in results if res is not None)
        assert metas[0].owned_by(client) == owner
        # Every loser now takes the session over from the owner at once: again exactly one wins.
        losers = [m for m in metas if m.node_id != owner]
        taken = _together([(m.acquire_session, (client, owner)) for m in losers])
        new_owners = [m.node_id for m, res in zip(losers, taken, strict=True) if res is None]
        assert len(new_owners) == 1, (client, taken)
        assert all(res == new_owners[0] for res in taken if res is not None)
        assert metas[0].owned_by(client) == new_owners[0]


CONTENDER = """
import json, sys, time
import gevent
from fluxmq.cluster.metadata import ClusterMetadata, EtcdSettings
endpoint, prefix, node, rounds, start_at, state = sys.argv[1:7]
meta = ClusterMetadata(EtcdSettings(endpoints=[endpoint], lease_ttl=10, request_timeout=5), node, "127.0.0.1:1",
                       prefix=prefix, state_dir=state)
meta.start()
out = []
for r in range(int(rounds)):
    # every process fires round r at the same wall-clock instant
    gevent.sleep(max(0.0, float(start_at) + r * 0.1 - time.time()))
    out.append(meta.acquire_session(f"proc-race-{r}"))
print(json.dumps(out), flush=True)
sys.stdin.read()  # hold the lease (and the sessions) until the test is done reading
meta.stop()
"""


def test_racing_processes_end_with_exactly_one_owner_each_time(etcd_server, etcd_prefix, tmp_path):
    rounds, nodes = 30, ["p0", "p1", "p2"]
    start_at = time.time() + 4.0  # after every process imported and registered
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CONTENDER,
                etcd_server.endpoint,
                etcd_prefix,
                node,
                str(rounds),
                str(start_at),
                str(tmp_path / node),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=Path(__file__).parents[3],
            text=True,
        )
        for node in nodes
    ]
    try:
        results = {}
        for node, proc in zip(nodes, procs, strict=True):
            line = proc.stdout.readline()
            assert line, f"contender {node} printed nothing"
            results[node] = json.loads(line)
        for r in range(rounds):
            got = {node: results[node][r] for node in nodes}
            winners = [node for node, res in got.items() if res is None]
            assert len(winners) == 1, (r, got)
            assert all(res == winners[0] for res in got.values() if res is not None), (r, got)
    finally:
        for proc in procs:
            proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def test_a_dead_nodes_session_is_taken_cleanly_once_its_lease_expired(meta_factory):
    a, b = meta_factory("a"), meta_factory("b")
    assert a.acquire_session("c") is None
    crash(a)  # killed: nothing revoked
    assert b.acquire_session("c") == "a"  # its lease still runs: a is still the owner
    assert wait_for(lambda: b.acquire_session("c") is None, timeout=SHORT_TTL * 5)
    assert b.owned_by("c") == "b"


def test_release_deletes_only_our_own_ownership(meta_factory):
    a, b = meta_factory("a"), meta_factory("b")
    assert a.acquire_session("c") is None
    assert b.acquire_session("c") == "a"
    assert b.acquire_session("c", take_from="a") is None
    assert a.release_session("c") is False  # no longer a's: b keeps it
    assert a.owned_by("c") == "b"
    assert b.release_session("c") is True
    assert a.owned_by("c") is None


def test_stop_releases_every_session_at_once(meta_factory):
    a, b = meta_factory("a"), meta_factory("b")
    for i in range(5):
        assert a.acquire_session(f"s{i}") is None
    a.stop()
    assert [b.owned_by(f"s{i}") for i in range(5)] == [None] * 5
    assert all(b.acquire_session(f"s{i}") is None for i in range(5))


def test_a_session_handed_over_to_another_node_is_no_longer_counted_as_ours(meta_factory):
    """The old owner's takeover handler tells the registry the session left: its list of owned
    client ids (taken again at each new lease) does not keep every client id that ever moved away."""
    from fluxmq.broker.broker import Broker
    from fluxmq.cluster.handover import ClusterSessions, takeover_handler

    a, b = meta_factory("a"), meta_factory("b")
    broker = Broker()
    sessions = ClusterSessions(a, call=None)
    handler = takeover_handler(broker, None, None, sessions.take_kept, sessions.handed_over)
    for i in range(5):
        cid = f"moving-{i}"
        assert a.acquire_session(cid) is None
        broker.open_session(cid, False, 3600)
        assert handler("b", cid.encode())  # the state left for b
        assert b.acquire_session(cid, take_from="a") is None  # b moves the owner key itself
    assert a.ownership.owned == set()
    assert a.ownership.reacquire_all() == []  # nothing to ask etcd for again after a new lease
