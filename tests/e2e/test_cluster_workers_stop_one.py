"""One worker of a clustered node of two workers (``server.workers: 2`` with ``cluster.enabled`` on
etcd) stopped alone with SIGTERM (an operator's ``kill <worker pid>``; its node goes on, the arbiter
restarts it) while it holds a persistent session: its client reconnects at once on its node, on the
other node, or once the worker is back, and gets Session Present 1 with every message published on
the other node before, during and after the outage (QoS 1 at least once, QoS 2 exactly once); the
restarted worker is a member of the cluster again (etcd, interest) and ``/ready``.

The two nodes share the session's etcd under a prefix of this module (as
``tests/e2e/test_cluster_workers.py``) and are shared by its tests; each test uses its own topic
and client id. Placement as in ``tests/e2e/test_workers_restart_claim.py``.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time

import pytest

from fluxmq._core import codec as c
from tests.conftest import RunningNode
from tests.e2e.mqtt5raw import Raw5, paho5, unique
from tests.e2e.mqttraw import wait_until
from tests.e2e.test_cluster_workers import logs, owner, two_nodes_of_two_workers, wait_for, whole
from tests.e2e.test_workers import on_worker, worker_pid
from tests.e2e.test_workers_restart_claim import persistent, reset, source_on

pytestmark = pytest.mark.e2e

WAIT = 30.0
#: messages published on c2 before the stop (delivered on c1/w1, not acknowledged), while the
#: worker stops and is down, and after the reconnect
BEFORE = 5
#: at most this many published during the outage
MAX_DURING = 500


@pytest.fixture(scope="module")
def nodes(etcd_server, tmp_path_factory):
    yield from two_nodes_of_two_workers(etcd_server, tmp_path_factory.mktemp("cwstop"))


def restarted(node: RunningNode, pid: int) -> None:
    """Until the arbiter replaced worker ``pid`` and the node answers ready."""
    assert wait_until(lambda: len(node.worker_pids()) == 2 and pid not in node.worker_pids(), WAIT)
    node.wait_ready()


def received(client: Raw5, want: set[bytes], timeout: float = 15.0) -> collections.Counter:
    """Each payload received (acknowledged) until ``want`` are all in and a moment passed with
    nothing more (a duplicate would come then), or ``timeout``."""
    got: collections.Counter = collections.Counter()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        wait = 1.0 if want <= set(got) else max(0.0, deadline - time.monotonic())
        try:
            packet = client.recv(wait)
        except AssertionError:
            if want <= set(got):
                break
            continue
        if isinstance(packet, c.Publish):
            client.ack(packet)
            got[bytes(packet.payload)] += 1
    return got


class Publisher:
    """Publishes ``{tag}{i}`` on ``pub`` one after the other, each acknowledged before the next,
    until ``stop`` (at most ``limit``): what the broker acknowledged is in ``acked``, what it
    refused or never answered (not acknowledged) in ``failed``."""

    def __init__(self, pub, topic: str, qos: int, tag: str = "during", limit: int = MAX_DURING) -> None:
        self.pub, self.topic, self.qos, self.tag, self.limit = pub, topic, qos, tag, limit
        self.acked: set[bytes] = set()
        self.failed: list[tuple[bytes, str]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._done.is_set() and i < self.limit:
            payload = f"{self.tag}{i}".encode()
            try:
                self.pub.publish(self.topic, payload, self.qos)
                self.acked.add(payload)
            except Exception as exc:  # refused or not answered: not acknowledged
                self.failed.append((payload, repr(exc)))
            i += 1
            time.sleep(0.01)

    def stop(self) -> set[bytes]:
        self._done.set()
        self._thread.join(WAIT)
        return self.acked


@pytest.mark.parametrize("qos", [1, 2])
@pytest.mark.parametrize("back", ["at once on c1", "on c2", "after the restart"])
@pytest.mark.parametrize("worker", ["w0", "w1"])
def test_a_worker_stopped_alone_on_a_cluster_node_loses_nothing(
    nodes, worker: str, back: str, qos: int
) -> None:
    """A persistent session on c1's ``worker`` with QoS ``qos`` messages in flight (published on c2,
    never acknowledged), a publisher on c2 going on while the worker is stopped alone (SIGTERM) and
    has exited: the client back ``back`` gets Session Present 1 and every message acknowledged to
    the publisher (QoS 2: each once); the restarted worker is in /cluster/status of both nodes, a
    client on it gets what c2 publishes, and both nodes answer /ready 200. (The stopping worker
    hands the session to c2, as a node's stop does: docs/reliability.rst.)"""
    started, endpoint, prefix = nodes
    c1, c2 = started["c1"], started["c2"]
    other = "w1" if worker == "w0" else "w0"
    topic = unique("cws/t")
    on_it, on_other = source_on(c1, f"c1/{worker}"), source_on(c1, f"c1/{other}")
    client_id = unique("cws")
    sub = persistent(c1, client_id, on_it)
    assert sub.connack.reason_code == 0 and not sub.connack.session_present
    assert sub.subscribe(1, (topic, qos)).reason_codes == [qos]
    assert wait_for(lambda: owner(endpoint, prefix, client_id) == f"c1/{worker}", WAIT)
    pid = worker_pid(c1, f"c1/{worker}")
    pub = paho5(c2, unique("cwspub"))
    try:
        before = {f"before{i}".encode() for i in range(BEFORE)}
        for payload in sorted(before):
            pub.publish(topic, payload, qos)
        got = set()
        while len(got) < BEFORE:  # in flight on the worker, never acknowledged
            packet = sub.recv()
            if isinstance(packet, c.Publish):
                got.add(bytes(packet.payload))
        publisher = Publisher(pub, topic, qos)
        assert wait_until(lambda: len(publisher.acked) >= 3, WAIT)
        os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: pid not in c1.worker_pids(), WAIT), logs(started)
        exited_at = len(publisher.acked)
        assert wait_until(lambda: len(publisher.acked) >= exited_at + 3, WAIT)  # some while it is down
        during = publisher.stop()
        reset(sub)
        if back == "at once on c1":
            sub = persistent(c1, client_id, on_other)
        elif back == "on c2":
            sub = persistent(c2, client_id, None)
        else:
            restarted(c1, pid)
            sub = persistent(c1, client_id, None)
        assert sub.connack.reason_code == 0, (sub.connack, logs(started))
        assert sub.connack.session_present, f"a fresh session\n{logs(started)}"
        pub.publish(topic, b"after", qos)
        want = before | during | {b"after"}
        got = received(sub, want)
        assert want - set(got) == set(), f"lost: {sorted(want - set(got))}\n{logs(started)}"
        if qos == 2:
            assert {p: n for p, n in got.items() if n > 1} == {}, "QoS 2 delivered twice"
        sub.disconnect()
    finally:
        pub.disconnect()
    restarted(c1, pid)
    # the restarted worker is a member again: etcd names it, and its interest reaches c2
    assert wait_for(lambda: all(whole(c1) for _ in range(4)), WAIT), logs(started)
    assert wait_for(lambda: all(whole(c2) for _ in range(4)), WAIT), logs(started)
    with on_worker(c1, f"c1/{worker}", "cwsback") as back_sub, paho5(c2, unique("cwspub")) as pub2:
        t2 = unique("cws/back")
        back_sub.subscribe(t2, 1)
        assert wait_for(lambda: _crosses(pub2, back_sub, t2), WAIT), logs(started)
    for node in (c1, c2):
        for _ in range(4):
            assert node.http_get("/ready")[0] == 200, node.http_get("/ready")


def _crosses(pub, sub, topic: str) -> bool:
    """A publish of ``pub`` reached ``sub`` (within half a second)."""
    pub.publish(topic, b"x", 1)
    try:
        return sub.get(0.5).topic == topic
    except AssertionError:
        return False
