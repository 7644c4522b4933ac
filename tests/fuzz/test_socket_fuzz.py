"""The 100,000-input raw-socket fuzz run against a real node (bounded to 90 s).

While ``socket_fuzz.SocketFuzzer`` sends mutated packets, random bytes, huge remaining lengths and
truncated packets on hundreds of connections, a well-behaved paho client publishes and receives
its own QoS 1 messages. Afterwards: the broker decoded at least 100,000 fuzz packets (its own
``fluxmq_packets_received`` counter), no connection raised an unexpected exception, the
well-behaved client got every message and was never disconnected, the worker's open file
descriptors are back to their baseline and its memory stayed bounded, and every offending
connection was logged at most once.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tests.conftest import NodeFactory, RunningNode
from tests.e2e.mqttraw import paho_connected, raw_connected, unique, wait_until
from tests.fuzz.socket_fuzz import SocketFuzzer

pytestmark = pytest.mark.e2e

INPUTS = 100_000
BUDGET = 90.0  # seconds for the fuzz run itself
RSS_SLACK = 96 << 20  # growth allowed during the run (retained topics, route caches, allocator slack)


def worker_pid(node: RunningNode) -> int:
    pids = node.worker_pids()
    assert len(pids) == 1, pids
    return pids[0]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    factory = NodeFactory(tmp_path_factory.mktemp("fuzz"))
    try:
        yield factory({"storage.type": "memory", "server.connect_timeout": "2s"})
    finally:
        factory.close()


class SteadyClient:
    """A paho client publishing QoS 1 messages to its own topic and receiving them, in a thread."""

    def __init__(self, node: RunningNode) -> None:
        self.client = paho_connected(node, unique("steady"), mqtt.MQTTv311)
        self.topic = unique("steady/t")
        assert self.client.subscribe(self.topic, 1) == [1]
        self.sent = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.client.publish(self.topic, b"%d" % self.sent, 1)  # waits for the PUBACK (bounded)
            self.sent += 1
            time.sleep(0.01)

    def received(self) -> list[int]:
        got = []
        while not self.client.messages.empty():
            msg = self.client.messages.get()
            if msg.topic == self.topic:
                got.append(int(msg.payload))
        return got


def test_100k_fuzz_inputs_no_crash_no_leak(node: RunningNode) -> None:
    pid = worker_pid(node)
    steady = SteadyClient(node)
    fd_base = open_fds(pid)
    rss_base = rss(pid)
    packets_before = node.metric("fluxmq_packets_received_total")
    assert packets_before is not None, "fluxmq_packets_received_total not in /metrics"
    steady.thread.start()
    fuzzer = SocketFuzzer(node.mqtt_port, INPUTS, seed=int(os.environ.get("FLUXMQ_FUZZ_SEED", "1")))
    try:
        stats = fuzzer.run(time.monotonic() + BUDGET)
    finally:
        steady.stop.set()
        steady.thread.join(30)
    assert stats.errors == [], stats.errors
    assert stats.read_timeouts == 0, "the broker left a fuzz connection open after its input ended"
    assert stats.inputs >= INPUTS, f"only {stats.inputs} inputs in {BUDGET}s"
    decoded = node.metric("fluxmq_packets_received_total") - packets_before
    assert decoded >= INPUTS, f"the broker decoded {decoded:.0f} packets"

    # The well-behaved client was served throughout: every message back, in order, never dropped.
    assert steady.client.is_connected
    got = []
    deadline = time.monotonic() + 10
    while len(got) < steady.sent and time.monotonic() < deadline:
        got += steady.received()
        time.sleep(0.02)
    assert steady.sent > 0 and got == list(range(steady.sent))

    # Nothing leaked: descriptors back to the baseline, memory bounded; a new client is served.
    assert wait_until(lambda: open_fds(pid) <= fd_base, timeout=20), (open_fds(pid), fd_base)
    assert rss(pid) - rss_base < RSS_SLACK, (rss(pid), rss_base)
    raw_connected(node, unique("after")).disconnect()

    log = node.log_text()
    assert "connection_error" not in log and "Traceback" not in log
    errors = log.count("event=protocol_error")
    assert 0 < errors <= stats.connections  # at most one line per offending connection
    steady.client.disconnect()
    assert worker_pid(node) == pid  # the same worker served it all (no crash and restart)
