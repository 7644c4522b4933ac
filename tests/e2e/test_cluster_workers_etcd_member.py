"""Worker 0 of a cluster node that runs the node's own etcd member (``cluster.etcd.initial_cluster``),
alone: stopped with SIGTERM, killed with SIGKILL, or its etcd member (the supervised child) killed
or hung (SIGSTOP).

Three nodes of two workers each, every node supervising its own etcd member from worker 0, shared
by the module's tests (each uses its own topics and client ids). Expected (docs/cluster.rst,
"Several workers on a cluster node", "etcd member"): the arbiter restarts worker 0, the member
comes back on its data dir and rejoins, the node keeps its registration and lease, worker 1 serves
its clients throughout, a persistent session on worker 0 comes back with every acknowledged QoS 1
message, and ``/ready`` and ``/cluster/status`` say the truth meanwhile and recover. Every wait is
bounded.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import HOST, NodeFactory, RunningNode, free_port
from tests.e2e.mqtt5raw import paho5, unique
from tests.e2e.mqttraw import wait_until
from tests.e2e.test_cluster_workers import two_free_ports
from tests.e2e.test_cluster_workers_stop_one import Publisher, _crosses, received
from tests.e2e.test_workers import on_worker, worker_pid
from tests.e2e.test_workers_restart_claim import persistent, reset, source_on

pytestmark = pytest.mark.e2e

NAMES = ("n0", "n1", "n2")
WAIT = 60.0
#: at most this many published by each publisher while the fault lasts
MAX_DURING = 2000


class Members:
    """The three nodes and where their etcd members keep their pid files."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.factory = NodeFactory(base / "nodes")
        (base / "nodes").mkdir()
        ports = [(free_port(), free_port()) for _ in NAMES]
        initial = ",".join(f"{n}=http://{HOST}:{peer}" for n, (peer, _) in zip(NAMES, ports, strict=True))
        self.configs = {
            name: {
                "server.workers": 2,
                "broker.sys_interval": "1s",
                "storage.type": "lmdb",
                "cluster.enabled": True,
                "cluster.node_id": name,
                "cluster.drain_timeout": "5s",
                "cluster.transport.bind_addr": f"{HOST}:{two_free_ports()}",
                "cluster.etcd.lease_ttl": "3s",
                "cluster.etcd.data_dir": str(base / f"etcd-{name}"),
                "cluster.etcd.bind_addr": f"{HOST}:{peer}",
                "cluster.etcd.client_addr": f"{HOST}:{client}",
                "cluster.etcd.initial_cluster": initial,
            }
            for name, (peer, client) in zip(NAMES, ports, strict=True)
        }
        self.nodes: dict[str, RunningNode] = {}

    def start(self) -> None:
        for name in NAMES:  # a new etcd cluster needs a quorum: start them all, then wait
            self.nodes[name] = self.factory(self.configs[name], wait_ready=False)
        for node in self.nodes.values():
            node.wait_ready(90)
        for node in self.nodes.values():
            assert wait_until(lambda node=node: whole(node), WAIT), node.http_get("/cluster/status")

    def etcd_pid(self, name: str) -> int | None:
        try:
            pid = int((self.base / f"etcd-{name}.pid").read_text())
        except (OSError, ValueError):
            return None
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except OSError:
            return None
        return None if state == "Z" else pid

    def lead(self, name: str) -> bool:
        """Make ``name``'s member the etcd cluster's leader (asked of the current one); True once it is."""
        url = f"http://{self.configs[name]['cluster.etcd.client_addr']}/v3/maintenance/status"
        try:
            status = _post(url, {})
            me, leader = status["header"]["member_id"], status["leader"]
            if me == leader:
                return True
            for other in NAMES:
                addr = self.configs[other]["cluster.etcd.client_addr"]
                there = _post(f"http://{addr}/v3/maintenance/status", {})
                if there["header"]["member_id"] == leader:
                    _post(f"http://{addr}/v3/maintenance/transfer-leadership", {"targetID": me})
        except (OSError, ValueError, KeyError):
            pass
        return False

    def logs(self) -> str:
        out = []
        for name, node in self.nodes.items():
            out.append(f"--- {name} ---\n{node.log_tail(80)}")
            log = self.base / f"etcd-{name}.log"
            if log.exists():
                out.append(f"--- etcd {name} ---\n" + "\n".join(log.read_text().splitlines()[-15:]))
        return "\n".join(out)


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def whole(node: RunningNode, answers: int = 4) -> bool:
    """``/ready`` 200 nominal and ``/cluster/status`` lists the three nodes reachable with both
    their workers, ``answers`` times in a row (whichever worker accepts answers)."""
    for _ in range(answers):
        try:
            status, body = node.http_get("/cluster/status")
            ready, rbody = node.http_get("/ready")
        except (OSError, ValueError):
            return False
        members = body.get("members", []) if isinstance(body, dict) else []
        if not (
            status == 200
            and ready == 200
            and rbody.get("mode") == "nominal"
            and sorted(m["node_id"] for m in members) == list(NAMES)
            and all(m["reachable"] and len(m.get("workers", [])) == 2 for m in members)
        ):
            return False
    return True


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    cl = Members(tmp_path_factory.mktemp("wetcd"))
    try:
        cl.start()
        yield cl
    finally:
        cl.factory.close()


class Watch:
    """Until ``stop``: n0's ``/ready`` and how n1's ``/cluster/status`` shows n0, every 0.2 s."""

    def __init__(self, n0: RunningNode, n1: RunningNode) -> None:
        self.n0, self.n1 = n0, n1
        self.ready: list[tuple[int, object]] = []
        self.seen: list[dict] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.2):
            try:
                self.ready.append(self.n0.http_get("/ready"))
                members = self.n1.http_get("/cluster/status")[1].get("members", [])
            except (OSError, ValueError) as exc:
                self.ready.append((0, repr(exc)))
                continue
            self.seen.extend(m for m in members if m["node_id"] == "n0")

    def stop(self) -> None:
        self._done.set()
        self._thread.join(WAIT)


#: the faults, each on n0 while the publishers go on; "etcd member hung" stops the member (SIGSTOP,
#: as a stalled disk would) for twice the lease TTL, then lets it go on. It is made a follower
#: first: etcd before 3.4.25/3.5.8 (Debian's is 3.4.23) has a leader back from such a hang revoke
#: every lease it thinks expired (etcd-io/etcd#15247), the nodes' too, whoever they renewed with
FAULTS = ["worker 0 SIGTERM", "worker 0 SIGKILL", "etcd member SIGKILL", "etcd member hung"]
HUNG = 6.0


@pytest.mark.parametrize("fault", FAULTS)
def test_worker_0_or_its_etcd_member_alone_the_node_goes_on(members, fault: str) -> None:
    """n0's worker 0, which runs n0's etcd member, stopped or killed alone, or that member killed
    or hung alone, while a client on n0's worker 1 publishes (QoS 1) to a subscriber on n1 and a
    publisher on n2 feeds a persistent session held on n0's worker 0 (its client gone with the
    fault): the arbiter restarts worker 0 and the member comes back on its data dir (a new pid
    that stays: no data-dir lock or port loop), the three nodes are whole and nominal again;
    every publish through worker 1 was acknowledged and reached n1; the session comes back on n0
    with Session Present and every message acknowledged to the feed. Meanwhile n0 answers
    ``/ready`` 200 (worker 1 serves; a worker down, or its member hung, is ``degraded``) and n1
    shows n0 live: the node keeps its registration and lease through the other members, its own down
    (before, worker 1 reached etcd only through worker 0's member, and a member down longer than
    the lease TTL took the node out of the cluster: /ready 503 "etcd lease lost", n0 not live)."""
    n0, n1, n2 = (members.nodes[n] for n in NAMES)
    logs = members.logs
    topic = unique("w0e/t")
    client_id = unique("w0e")
    sub = persistent(n0, client_id, source_on(n0, "n0/w0"))
    assert sub.connack.reason_code == 0
    assert sub.subscribe(1, (topic, 1)).reason_codes == [1]
    cross = unique("w0e/cross")
    far = on_worker(n1, "n1/w0", "far")
    assert far.subscribe(cross, 1)[0].value == 1
    near = on_worker(n0, "n0/w1", "near")
    feed = paho5(n2, unique("feed"))
    w0 = worker_pid(n0, "n0/w0")
    etcd = members.etcd_pid("n0")
    assert etcd is not None
    watch = None
    try:
        assert wait_until(lambda: _crosses(near, far, cross), WAIT), logs()
        through_w1 = Publisher(near, cross, 1, "x", MAX_DURING)
        to_w0 = Publisher(feed, topic, 1, "s", MAX_DURING)
        assert wait_until(lambda: len(through_w1.acked) >= 3 and len(to_w0.acked) >= 3, WAIT)
        watch = Watch(n0, n1)
        if fault == "worker 0 SIGTERM":
            os.kill(w0, signal.SIGTERM)
        elif fault == "worker 0 SIGKILL":
            os.kill(w0, signal.SIGKILL)
        elif fault == "etcd member SIGKILL":
            os.kill(etcd, signal.SIGKILL)
        else:
            assert wait_until(lambda: members.lead("n1"), WAIT), logs()
            os.kill(etcd, signal.SIGSTOP)
            time.sleep(HUNG)  # the fault's length (twice the lease TTL), not a wait for a condition
            os.kill(etcd, signal.SIGCONT)
        reset(sub)
        if fault.startswith("worker 0"):
            assert wait_until(lambda: w0 not in n0.worker_pids() and len(n0.worker_pids()) == 2, WAIT), logs()
        if not fault.endswith("hung"):
            assert wait_until(lambda: members.etcd_pid("n0") not in (None, etcd), WAIT), logs()
        assert wait_until(lambda: whole(n0) and whole(n1) and whole(n2), WAIT), logs()
        member = members.etcd_pid("n0")
        watch.stop()
        at = len(through_w1.acked)
        assert wait_until(lambda: len(through_w1.acked) >= at + 3, WAIT)
        sent, fed = through_w1.stop(), to_w0.stop()
        assert not through_w1.failed and not to_w0.failed, (through_w1.failed[:5], to_w0.failed[:5])
        assert members.etcd_pid("n0") == member, "the member died again"
        got = set()
        deadline = time.monotonic() + WAIT
        while not set(sent) <= got and time.monotonic() < deadline:
            try:
                got.add(far.get(1.0).payload)
            except AssertionError:
                pass
        assert set(sent) - got == set(), f"lost through w1: {sorted(set(sent) - got)[:20]}\n{logs()}"
        back = persistent(n0, client_id, source_on(n0, "n0/w0"))
        assert back.connack.reason_code == 0 and back.connack.session_present, (back.connack, logs())
        have = received(back, set(fed), WAIT)
        assert set(fed) - set(have) == set(), f"lost to w0: {sorted(set(fed) - set(have))[:20]}\n{logs()}"
        back.disconnect()
        # the truth meanwhile: n0 served (worker 1) and stayed a live member of the cluster
        assert watch.ready and all(code == 200 for code, _ in watch.ready), (
            [r for r in watch.ready if r[0] != 200][:3],
            logs(),
        )
        assert watch.seen and all(m["live"] for m in watch.seen), [m for m in watch.seen if not m["live"]][:3]
        if fault.endswith("hung"):  # (its own member probed every second: the hang lasts 6)
            cluster = [b["checks"]["cluster"] for _, b in watch.ready if b.get("mode") == "degraded"]
            assert any("etcd member n0 not answering" in c.get("details", "") for c in cluster), watch.ready
    finally:
        if fault.endswith("hung"):
            try:
                os.kill(etcd, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if watch is not None:
            watch.stop()
        for client in (near, far, feed):
            try:
                client.disconnect()
            except Exception:
                pass
