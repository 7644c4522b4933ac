"""ClusterTransport: the control call (``call``/``handle``), the interest sync wait, a dead peer's
bounded queue; two real transports on loopback in a gevent-patched child process
(tests/cluster/transport_driver.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def observed() -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.cluster.transport_driver"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_peers_connect_and_send_their_interest_snapshot(observed) -> None:
    assert observed["reachable"]
    assert observed["snapshot"] == [["a", 1, ["x/#"], True]]


def test_control_call_reaches_the_handler_of_its_kind(observed) -> None:
    assert observed["echo"] == "a:hi"  # fn(from_node, payload)


def test_control_call_failures_raise_peer_unavailable(observed) -> None:
    errors = observed["errors"]
    assert "no handler for 'nope'" in errors["unknown_kind"]
    assert "ValueError: no such session" in errors["handler_error"]
    assert "no peer 'zz'" in errors["unknown_peer"]
    assert "UNAVAILABLE" in errors["dead_peer"] or "DEADLINE" in errors["dead_peer"]


def test_interest_change_is_waited_for_until_the_peer_applied_it(observed) -> None:
    assert observed["interest_synced"] and observed["interest_at_b"]


def test_dead_peer_queue_is_bounded_and_drops_are_counted(observed) -> None:
    assert observed["b_down_seen"]
    assert observed["accepted"] == 3  # max_queued_messages
    state = observed["state"]
    assert state["dropped"] == 7 and state["queued"] == 3 and not state["reachable"]
    assert state["failures"] >= 1


def test_a_peer_removed_and_added_again_gets_the_new_links_batches(observed) -> None:
    assert observed["readded"] == ["t", "t", "dup=0"]


def test_a_batch_retried_after_an_ack_timeout_is_delivered_once(observed) -> None:
    slow = observed["slow_ack"]
    assert slow["resent"] >= 1 and slow["failures"] >= 1  # the stream was dropped and the batch sent again
    assert slow["duplicates_skipped"] >= 1
    assert slow["delivered"] == 1


def test_routes_acks_are_batchack_messages_when_on_batch_answers_with_the_seq_alone() -> None:
    # ClusterPeers answers a plain batch with its sequence id (the Unix transport frames it without a
    # message): gRPC's Route makes the BatchAck it serializes; a BatchAck answered passes as it is
    from fluxmq.cluster.proto import cluster_pb2 as pb
    from fluxmq.cluster.transport import _Servicer

    class Receiving:
        def on_batch(self, batch):
            return batch.seq if batch.seq % 2 else pb.BatchAck(seq=batch.seq, busy_groups=["g"])

    acks = list(_Servicer(Receiving()).Route(iter([pb.Batch(seq=s) for s in (1, 2, 3)]), None))
    assert [type(a) for a in acks] == [pb.BatchAck] * 3
    assert [(a.seq, list(a.busy_groups)) for a in acks] == [(1, []), (2, ["g"]), (3, [])]
