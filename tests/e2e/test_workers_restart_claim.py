"""A persistent session whose worker was killed (-9) while its client reconnects at once on another
worker of the node (``server.workers: 2``): the claim waits for the arbiter to restart the dead
worker and takes the session over from its restored copy (Session Present 1, nothing acknowledged
lost), refuses with 0x88 when the worker is not back in time, and does not wait under Clean Start
(docs/cluster.rst, "Client ids.").

Placement after a kill: the kernel picks the SO_REUSEPORT listener of a connection from a hash of
its addresses, and the dead worker's socket stays open in the arbiter, so a connection from a
source address and port that once landed on the live worker lands there again. Each such source is
found with a probe connection closed with a reset (no TIME_WAIT keeps the pair in use).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import time
from collections.abc import Callable

import pytest

from fluxmq._core import codec as c
from tests.conftest import NodeFactory, RunningNode
from tests.e2e.mqtt5raw import Raw5, unique
from tests.e2e.mqttraw import wait_until
from tests.e2e.test_workers import on_worker, start, wait_restarted, worker_pid

pytestmark = pytest.mark.e2e

WAIT = 10.0
WORKER_TOPIC = "$SYS/broker/worker"
MAX_TRIES = 60
#: the session's messages: published and acknowledged before the kill, and while the worker is down
BEFORE = 10
DURING = 10
#: seconds a CONNACK may take: the claim's wait for a restarting worker (10 s) and some
CLAIM_WAIT = 30.0


def reset(client: Raw5) -> None:
    """Close ``client`` with a reset: its source address and port can be used again at once."""
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


def source_on(node: RunningNode, worker: str) -> tuple[str, int]:
    """A source ``(address, port)`` whose connections land on ``worker`` (module docstring)."""
    for _ in range(MAX_TRIES):
        source = (f"127.0.{random.randint(1, 250)}.{random.randint(2, 250)}", random.randint(20000, 32000))
        try:
            probe = Raw5(node, source=source)
        except OSError:
            continue  # in use
        try:
            probe.connect(unique("probe"))
            probe.subscribe(1, (WORKER_TOPIC, 0))
            landed = probe.wait_for(lambda p: isinstance(p, c.Publish) and p.topic == WORKER_TOPIC)
        finally:
            reset(probe)
        if landed.payload.decode() == worker:
            return source
    raise AssertionError(f"no source address landed on {worker} in {MAX_TRIES} tries")


def persistent(node: RunningNode, client_id: str, source: tuple, clean_start: bool = False) -> Raw5:
    """A 5.0 client of ``client_id`` (session expiry 300 s) connected from ``source``; its CONNACK in
    ``.connack`` (whatever its reason code)."""
    client = Raw5(node, source=source)
    props = {c.SESSION_EXPIRY_INTERVAL: 300}
    client.send(c.Connect(client_id, clean_start, 60, 5, None, None, None, None, props))
    client.connack = client.expect(c.Connack, CLAIM_WAIT)  # a claim may wait for the restart
    return client


def reconnect(node: RunningNode, client_id: str, source: tuple, tries: int = 4) -> Raw5:
    """``persistent``, tried again after each 0x88 (Server unavailable: a client retries), at most
    ``tries`` times; the last answer's client."""
    for _ in range(tries - 1):
        client = persistent(node, client_id, source)
        if client.connack.reason_code != 0x88:
            return client
        reset(client)
    return persistent(node, client_id, source)


def payloads(client: Raw5, want: set[bytes], timeout: float = WAIT) -> set[bytes]:
    """The payloads received (each acknowledged) until ``want`` are all in, or ``timeout``."""
    got: set[bytes] = set()
    deadline = time.monotonic() + timeout
    while not want <= got and time.monotonic() < deadline:
        try:
            packet = client.recv(max(0.0, deadline - time.monotonic()))
        except AssertionError:
            break
        if isinstance(packet, c.Publish):
            client.ack(packet)
            got.add(bytes(packet.payload))
    return got


def session_on_w1(node: RunningNode, topic: str) -> tuple[str, Raw5, tuple, int]:
    """A persistent session on w1 subscribed to ``topic`` at QoS 1 (connected); the source that
    lands on w0, for its reconnect once w1 is killed; w1's pid."""
    on_w1, on_w0 = source_on(node, "w1"), source_on(node, "w0")
    client_id = unique("dead")
    sub = persistent(node, client_id, on_w1)
    assert sub.connack.reason_code == 0 and not sub.connack.session_present
    assert sub.subscribe(1, (topic, 1)).reason_codes == [1]
    return client_id, sub, on_w0, worker_pid(node, "w1")


def outage_resumes_the_session(node: RunningNode, stop: Callable[[int], None]) -> None:
    """A persistent session on w1 with QoS 1 messages in flight (in w1's store), w1 stopped
    (``stop(pid)``: killed, or stopped alone), its client back on w0 at once, messages published
    meanwhile: Session Present 1, every message arrives, on w0; the node stops cleanly after w1's
    restart."""
    topic = unique("xw/dead")
    client_id, sub, on_w0, pid = session_on_w1(node, topic)
    pub = on_worker(node, "w0", "pub")
    before = {f"before{i}".encode() for i in range(BEFORE)}
    for payload in sorted(before):
        pub.publish(topic, payload, 1)
    # in flight on w1, not acknowledged by the client: they live in w1's store
    got = set()
    while len(got) < BEFORE:
        packet = sub.recv()
        if isinstance(packet, c.Publish):
            got.add(bytes(packet.payload))
    assert got == before
    stop(pid)
    during = {f"during{i}".encode() for i in range(DURING)}
    for payload in sorted(during):
        pub.publish(topic, payload, 1)  # acknowledged by w0
    reset(sub)
    sub = reconnect(node, client_id, on_w0)
    assert sub.connack.reason_code == 0, sub.connack
    assert sub.connack.session_present, "a fresh session while the stopped worker's copy comes back"
    pub.publish(topic, b"after", 1)
    want = before | during | {b"after"}
    got = payloads(sub, want)
    assert want - got == set(), f"lost: {sorted(want - got)}"
    sub.subscribe(2, (WORKER_TOPIC, 0))
    landed = sub.wait_for(lambda p: isinstance(p, c.Publish) and p.topic == WORKER_TOPIC)
    assert landed.payload == b"w0"
    sub.disconnect()
    pub.disconnect()
    wait_restarted(node, pid)
    assert node.stop() == 0


def one_in_flight(node: RunningNode, topic: str) -> tuple[str, Raw5, tuple, int]:
    """``session_on_w1`` with a QoS 1 message (``kept``) delivered, not acknowledged: in w1's store."""
    client_id, sub, on_w0, pid = session_on_w1(node, topic)
    with on_worker(node, "w0", "pub") as pub:
        pub.publish(topic, b"kept", 1)
        assert sub.expect(c.Publish).payload == b"kept"
    return client_id, sub, on_w0, pid


def held(factory: NodeFactory) -> RunningNode:
    """A 2-worker node whose restarted workers are held 15 s (past the claim's 10 s bound)."""
    return start(factory, {"storage.type": "lmdb"}, env={"FLUXMQTEST_WORKER_RESTART_DELAY": "15"})


def test_a_reconnect_on_the_other_worker_right_after_a_kill_resumes_the_session_from_the_restarted_one(
    tmp_path,
) -> None:
    """kill -9 of the worker holding a persistent session with QoS 1 messages in flight, the client
    back at once on the other worker: Session Present 1 (the claim waited for the arbiter's restart
    and took the restored session over), and every message published before and during the outage
    arrives. Before, the claim started a fresh session there (Session Present 0) and the restarted
    worker dropped its copy: the subscription and the acknowledged messages were lost."""
    factory = NodeFactory(tmp_path)
    try:
        node = start(factory, {"storage.type": "lmdb"})
        outage_resumes_the_session(node, lambda pid: os.kill(pid, signal.SIGKILL))
    finally:
        factory.close()


def test_a_claim_whose_killed_worker_is_not_back_in_time_is_refused_0x88_then_resumes(tmp_path) -> None:
    """The killed worker comes back later than the claim's bound (``FLUXMQTEST_WORKER_RESTART_DELAY``
    holds the restarted worker 15 s, the bound is 10 s): CONNACK 0x88 (Server unavailable), not a
    fresh session; the client's retry once the worker is back resumes the session with its message."""
    factory = NodeFactory(tmp_path)
    try:
        node = held(factory)
        client_id, sub, on_w0, pid = one_in_flight(node, unique("xw/late"))
        os.kill(pid, signal.SIGKILL)
        reset(sub)
        sub = persistent(node, client_id, on_w0)
        assert sub.connack.reason_code == 0x88, sub.connack
        reset(sub)
        wait_restarted(node, pid)
        sub = reconnect(node, client_id, on_w0)  # refused again while the restarted worker is held
        assert sub.connack.reason_code == 0 and sub.connack.session_present
        assert payloads(sub, {b"kept"}) == {b"kept"}
        sub.disconnect()
        assert node.stop() == 0
    finally:
        factory.close()


def test_a_clean_start_claim_does_not_wait_for_the_killed_worker_which_then_drops_its_copy(tmp_path) -> None:
    """Clean Start discards the old session anyway: the claim answers at once (the killed worker is
    held 15 s, past the bound a waiting claim would be refused at) with a new session, and the
    restarted worker drops its restored copy (the client's session is the new one, without the old
    subscription)."""
    factory = NodeFactory(tmp_path)
    try:
        node = held(factory)
        topic = unique("xw/clean")
        client_id, sub, on_w0, pid = session_on_w1(node, topic)
        reset(sub)
        os.kill(pid, signal.SIGKILL)
        sub = persistent(node, client_id, on_w0, clean_start=True)
        assert sub.connack.reason_code == 0 and not sub.connack.session_present
        sentinel = unique("xw/sentinel")
        assert sub.subscribe(1, (sentinel, 1)).reason_codes == [1]
        sub.disconnect()
        wait_restarted(node, pid)

        def dropped() -> bool:
            return any(
                "restored_session_dropped" in line and client_id in line
                for line in node.log_text().splitlines()
            )

        assert wait_until(dropped, 30.0), node.log_tail()
        sub = persistent(node, client_id, on_w0)
        assert sub.connack.reason_code == 0 and sub.connack.session_present
        with on_worker(node, "w1", "pub") as pub:
            pub.publish(topic, b"old subscription", 1)
            pub.publish(sentinel, b"end", 1)
        assert sub.publishes_until(sentinel) == []
        sub.disconnect()
        assert node.stop() == 0
    finally:
        factory.close()
