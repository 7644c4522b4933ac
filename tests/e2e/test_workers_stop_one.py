"""One worker of a 2-worker node stopped alone with SIGTERM (an operator's ``kill <worker pid>``, the
node going on): its graceful stop keeps the client ids of its persistent sessions for its restart, as
a killed worker's are kept, so a client reconnecting meanwhile on the other worker waits for the
arbiter's restart and takes the restored session over (Session Present 1, nothing acknowledged
lost), and a stop of the whole node still ends at once. ``/ready`` names the workers that are up.

Placement as in ``tests/e2e/test_workers_restart_claim.py``: a source address and port that lands
on the live worker lands there again while the other's socket waits in the arbiter.
"""

from __future__ import annotations

import os
import signal

import pytest

from fluxmq._core import codec as c
from tests.conftest import NodeFactory, RunningNode
from tests.e2e.mqtt5raw import Raw5, unique
from tests.e2e.mqttraw import wait_until
from tests.e2e.test_workers import start, wait_restarted, worker_pid
from tests.e2e.test_workers_restart_claim import (
    one_in_flight,
    outage_resumes_the_session,
    payloads,
    persistent,
    reset,
    session_on_w1,
    source_on,
)

pytestmark = pytest.mark.e2e

#: seconds the restarted worker is held before it joins (``FLUXMQTEST_WORKER_RESTART_DELAY``): a
#: reconnect on the other worker lands while it is down, within the claim's 10 s wait
HELD = "4"
#: held past the node's stop (a node stop ends the hold at once)
HELD_LONG = "60"
WAIT = 30.0


def exited(node: RunningNode, pid: int) -> None:
    """Until worker ``pid`` has exited (its graceful stop is over: what it released, it released)."""
    assert wait_until(lambda: pid not in node.worker_pids(), WAIT), node.log_tail()


def test_a_worker_stopped_alone_keeps_its_sessions_for_its_restart(tmp_path) -> None:
    """SIGTERM to the worker holding a persistent session with QoS 1 messages in flight, the client
    back on the other worker once the stopped one has exited (and before the arbiter's restart is
    in): Session Present 1, and every message published before the stop and while the worker is
    down arrives. Before, the graceful stop gave the ids up: the reconnect got a new session and
    the restarted worker dropped its restored copy (the subscription and the messages lost)."""
    factory = NodeFactory(tmp_path)
    try:
        node = start(factory, {"storage.type": "lmdb"}, env={"FLUXMQTEST_WORKER_RESTART_DELAY": HELD})

        def stop_alone(pid: int) -> None:
            os.kill(pid, signal.SIGTERM)
            exited(node, pid)

        outage_resumes_the_session(node, stop_alone)
    finally:
        factory.close()


def claim_waiting(node: RunningNode) -> tuple[str, Raw5]:
    """A persistent session on w1 with a QoS 1 message in flight; w1 stopped alone (SIGTERM) and
    exited; its client's claim sent from a source that lands on w0, waiting for w1's restart (held)."""
    client_id, sub, on_w0, pid = one_in_flight(node, unique("xw/nodestop"))
    os.kill(pid, signal.SIGTERM)
    exited(node, pid)
    reset(sub)
    claim = Raw5(node, source=on_w0)
    claim.send(c.Connect(client_id, False, 60, 5, None, None, None, None, {c.SESSION_EXPIRY_INTERVAL: 300}))

    def waits() -> bool:
        return any(
            "claim_waits_for_restart" in line and client_id in line for line in node.log_text().splitlines()
        )

    assert wait_until(waits, WAIT), f"not waiting for w1's restart:\n{node.log_tail()}"
    return client_id, claim


def gone(node: RunningNode) -> bool:
    """True once no process of the node's group is left."""
    try:
        os.killpg(node.pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("signalled", ["arbiter", "every process", "arbiter killed"])
def test_a_node_stop_ends_a_claim_waiting_for_a_stopped_worker_and_stops_every_worker_in_its_budget(
    tmp_path, signalled: str
) -> None:
    """The node stopped (SIGTERM to the arbiter, or to the node's whole process group at once as
    systemd does to its cgroup, or the arbiter killed -9: its workers stop as on SIGTERM) while a
    claim waits for the restart of a worker stopped alone a moment before: the claim ends without a
    fresh session (0x88 as the node is stopping, or the connection closed by its stopping worker),
    every worker stops on its own within its budget (none runs out of it waiting for the 10 s
    claim), and the node's next start resumes the session from the stopped worker's store with its
    message. Before, the stopped worker had given its ids up: the claim got a fresh session at once
    (Session Present 0), and the next start found the id in both shards. Also before, a worker
    forked a moment before the arbiter's SIGTERM could lose it and serve until the arbiter killed it
    at the end of its grace, and with the arbiter gone a claim waited its whole 10 s."""
    factory = NodeFactory(tmp_path)
    try:
        node = start(factory, {"storage.type": "lmdb"}, env={"FLUXMQTEST_WORKER_RESTART_DELAY": HELD_LONG})
        client_id, claim = claim_waiting(node)
        if signalled == "arbiter":
            node.process.send_signal(signal.SIGTERM)
        elif signalled == "every process":
            os.killpg(node.pid, signal.SIGTERM)
        else:
            node.process.send_signal(signal.SIGKILL)
        answer = claim.wait_closed(WAIT)
        assert all(isinstance(p, c.Connack) and p.reason_code == 0x88 for p in answer), answer
        assert node.wait() == (-signal.SIGKILL if signalled == "arbiter killed" else 0), node.log_tail()
        assert wait_until(lambda: gone(node), WAIT), node.log_tail()
        text = node.log_text()
        assert "shutdown_timeout" not in text, node.log_tail()
        # every worker booted (w1 stopped alone, then w0 and the restarted w1) stopped on its own
        assert text.count("event=broker_stopped") == text.count("Booting worker"), node.log_tail()
        refused = [line for line in text.splitlines() if "connect_refused" in line and client_id in line]
        assert all("the node is stopping" in line for line in refused), refused
        node = factory.restart(node)
        resumed = persistent(node, client_id, None)
        assert resumed.connack.reason_code == 0 and resumed.connack.session_present, resumed.connack
        assert payloads(resumed, {b"kept"}) == {b"kept"}
        resumed.disconnect()
        assert node.stop() == 0
    finally:
        factory.close()


#: /ready probes while one worker is down (each lands on whichever worker accepts it)
PROBES = 20


def test_ready_names_the_workers_up_degraded_not_503_while_one_restarts(tmp_path) -> None:
    """``/ready`` of a 2-worker node while w1, stopped alone, restarts (held 10 s): every probe, on
    whichever worker it lands, answers 200 ``degraded`` with a ``workers`` check naming w1 down;
    nominal again once w1 serves. Before, there was no ``workers`` check (a ``cluster`` check said
    "0/1 other workers reachable"), and a probe the restarting worker accepted got its "starting"
    503: the answer flapped between ready and not ready while the node served."""
    factory = NodeFactory(tmp_path)
    try:
        node = start(factory, {"storage.type": "lmdb"}, env={"FLUXMQTEST_WORKER_RESTART_DELAY": "10"})
        code, body = node.http_get("/ready")
        assert (code, body["mode"], body["checks"]["workers"]) == (200, "nominal", {"status": "up"}), body
        pid = worker_pid(node, "w1")
        os.kill(pid, signal.SIGTERM)
        exited(node, pid)
        # restarting: its broker held (it would serve its "starting" apps from before that)
        assert wait_until(lambda: node.log_text().count("worker_restart_delayed") == 1, WAIT)
        answers = [node.http_get("/ready") for _ in range(PROBES)]
        down = {"status": "up", "details": "1/2 workers up; down: w1"}
        assert all(code == 200 and body["mode"] == "degraded" for code, body in answers), answers
        assert all(body["checks"]["workers"] == down for _, body in answers), answers
        wait_restarted(node, pid)

        def nominal() -> bool:
            code, body = node.http_get("/ready")
            return code == 200 and body["mode"] == "nominal"

        assert wait_until(nominal, WAIT), node.http_get("/ready")
        assert node.stop() == 0
    finally:
        factory.close()


def test_a_worker_stopped_alone_forwards_what_reaches_it_for_a_session_taken_over_from_it(
    tmp_path,
) -> None:
    """w1 applies each batch from w0 3 s late (the test-only ``FLUXMQTEST_PEER_APPLY_DELAY``, as on a
    loaded machine): a QoS 1 message w0 acknowledged is on its way to the session on w1 when its
    client, back on w0, takes the session over, and w1 gets SIGTERM alone right after. It reaches
    the session on w0: the stopping w1 stays up (bounded by ``cluster.drain_timeout``)
    until its stand-in forwarded what reached it for the exported session, as a stopping cluster
    node does. Before, w1 exited at once: the batch was sent again to the restarted w1, which no
    longer had the session (``bench/chaos.py``'s ``worker-term``, seed 84: a QoS 2 message lost for
    the subscribers that had reconnected from the stopping worker)."""
    from fluxmq.cluster.node import APPLY_DELAY_ENV

    factory = NodeFactory(tmp_path)
    try:
        node = start(factory, {"storage.type": "lmdb"}, env={APPLY_DELAY_ENV: "3"})
        topic = unique("xw/onway")
        client_id, sub, on_w0, pid = session_on_w1(node, topic)
        pub = Raw5(node, source=source_on(node, "w0"))
        pub.connect(unique("pub"))

        def known() -> bool:  # w0 knows w1's subscription (its interest too is applied late)
            return pub.publish(topic, b"probe", 1, packet_id=9).reason_code == 0

        assert wait_until(known, WAIT)
        # applied on w1 (delivered): nothing else is on its way to w1 ahead of the batch below
        probe = sub.wait_for(lambda p: isinstance(p, c.Publish) and p.payload == b"probe", WAIT)
        sub.ack(probe)
        sent = {b"on its way"}  # (one message: one batch, applied on w1 3 s later)
        assert pub.publish(topic, b"on its way", 1, packet_id=10).reason_code == 0  # acknowledged by w0
        reset(sub)
        sub = persistent(node, client_id, on_w0)  # taken over from w1 (live, the batch not applied)
        assert sub.connack.reason_code == 0 and sub.connack.session_present, sub.connack
        os.kill(pid, signal.SIGTERM)
        got = payloads(sub, sent, WAIT)
        assert sent - got == set(), f"lost: {sorted(sent - got)}\n{node.log_tail()}"
        pub.disconnect()
        sub.disconnect()
        exited(node, pid)
        wait_restarted(node, pid)
        assert node.stop() == 0
    finally:
        factory.close()
