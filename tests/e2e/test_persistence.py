"""Persistence end to end: a node killed with SIGKILL loses nothing it acknowledged (issue 4).

The node runs with the default ``storage.type: lmdb``; "restart" is a new node process on the same
``storage.path``.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fluxmq._core import codec as c
from tests.conftest import NodeFactory, RunningNode
from tests.e2e.mqttraw import PahoClient, RawClient, raw_connected, unique

pytestmark = pytest.mark.e2e

N_QOS1 = 2000
N_QOS2 = 500
WAIT = 30.0


def persistent_client(node: RunningNode, cid: str, v5: bool) -> PahoClient:
    """Connect with a persistent session: 5.0 Session Expiry 3600, or 3.1.1 clean session 0."""
    if v5:
        c = PahoClient(node, cid, protocol=mqtt.MQTTv5)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        c.connect(clean_start=False, properties=props)
    else:
        c = PahoClient(node, cid, protocol=mqtt.MQTTv311, clean_session=False)
        c.connect()
    return c


def publish_all(node: RunningNode, prefix: str) -> None:
    """2,000 QoS 1 and 500 QoS 2 messages, each waited for until its PUBACK / PUBCOMP."""
    pub = PahoClient(node, unique("pub"), protocol=mqtt.MQTTv5)
    pub.client.max_inflight_messages_set(100)  # the broker announces Receive Maximum 100
    pub.client.max_queued_messages_set(0)
    pub.connect()
    infos = [pub.client.publish(f"{prefix}/q1", f"q1-{i}".encode(), qos=1) for i in range(N_QOS1)]
    infos += [pub.client.publish(f"{prefix}/q2", f"q2-{i}".encode(), qos=2) for i in range(N_QOS2)]
    for info in infos:
        info.wait_for_publish(WAIT)
        assert info.is_published()
    info = pub.client.publish("kept/retained", b"retained before the kill", qos=1, retain=True)
    info.wait_for_publish(WAIT)
    assert info.is_published()
    pub.stop()


def receive_everything(c: PahoClient, prefix: str, node: RunningNode) -> list[bytes]:
    """Every payload the reconnected subscriber gets, up to a marker published after them all.

    Deliveries to one session keep their order, so a duplicate of an earlier message would arrive
    before the marker.
    """
    got = []
    deadline = time.monotonic() + WAIT * 2
    while len(got) < N_QOS1 + N_QOS2:
        assert time.monotonic() < deadline, f"only {len(got)} messages arrived"
        got.append(c.get(WAIT).payload)
    marker = PahoClient(node, unique("marker"), protocol=mqtt.MQTTv5)
    marker.connect()
    marker.client.publish(f"{prefix}/q2", b"marker", qos=2).wait_for_publish(WAIT)
    marker.stop()
    while True:
        payload = c.get(WAIT).payload
        if payload == b"marker":
            return got
        got.append(payload)


@pytest.mark.parametrize("sync", ["batch", "always"])
def test_acknowledged_messages_survive_sigkill(node_factory: NodeFactory, sync: str) -> None:
    """Done-when of issue 4: 2,000 QoS 1 + 500 QoS 2 to offline persistent sessions (5.0 expiry 3600
    and 3.1.1 clean=false), SIGKILL, restart: every message arrives, QoS 2 exactly once, and the
    retained message set before the kill is served after it. ``always`` commits in the threadpool."""
    node = node_factory({"storage.sync": sync})
    prefix = unique("persist")
    subs = {True: unique("sub5"), False: unique("sub311")}
    for v5, cid in subs.items():
        c = persistent_client(node, cid, v5)
        c.subscribe(f"{prefix}/#", 2)
        c.disconnect()
        c.stop()
    publish_all(node, prefix)
    node.kill()  # SIGKILL to the arbiter and the worker: nothing gets to flush or close
    assert node.returncode is not None

    again = node_factory({"storage.path": str(node.data_dir), "storage.sync": sync})
    for v5, cid in subs.items():
        c = persistent_client(again, cid, v5)
        assert c.connack[1], "session not present after the restart"
        got = receive_everything(c, prefix, again)
        c.stop()
        q1 = [p for p in got if p.startswith(b"q1-")]
        q2 = [p for p in got if p.startswith(b"q2-")]
        assert set(q1) == {f"q1-{i}".encode() for i in range(N_QOS1)}, f"v5={v5}: QoS 1 lost"
        assert sorted(q2) == sorted(f"q2-{i}".encode() for i in range(N_QOS2)), (
            f"v5={v5}: QoS 2 not exactly once"
        )
    viewer = PahoClient(again, unique("viewer"), protocol=mqtt.MQTTv5)
    viewer.connect()
    viewer.subscribe("kept/retained", 1)
    msg = viewer.get(WAIT)
    assert (msg.topic, msg.payload, msg.retain) == ("kept/retained", b"retained before the kill", True)
    viewer.stop()


# -- bad storage: one clear line, a non-zero exit, no restart loop ---------------------------------


def _boot_fails(node_factory: NodeFactory, data: Path, expect: str, **overrides: str) -> None:
    node = node_factory({"storage.path": str(data), **overrides}, wait_ready=False)
    code = node.wait(30)
    assert code not in (None, 0), f"node did not exit: {node.log_tail()}"
    log = node.log_text()
    assert expect in log, log
    assert log.count("broker_start_failed") == 1, "the worker was restarted"


def test_newer_schema_version_stops_the_node(node_factory: NodeFactory, tmp_path: Path) -> None:
    from fluxmq.storage.lmdb import SCHEMA_VERSION, LMDBStorage

    data = tmp_path / "newer"
    s = LMDBStorage(data, map_size=16 << 20)
    with s.env.begin(write=True) as txn:
        txn.put(b"schema_version", struct.pack("<I", SCHEMA_VERSION + 5), db=s._dbs[0])
    s.close()
    _boot_fails(node_factory, data, "written by a newer fluxmq")


def test_damaged_data_file_stops_the_node_and_is_kept(node_factory: NodeFactory, tmp_path: Path) -> None:
    data = tmp_path / "damaged"
    data.mkdir()
    junk = b"not an lmdb file " * 1000
    (data / "data.mdb").write_bytes(junk)
    _boot_fails(node_factory, data, "data.mdb is not an LMDB file")
    assert (data / "data.mdb").read_bytes() == junk


def test_foreign_lmdb_directory_stops_the_node(node_factory: NodeFactory, tmp_path: Path) -> None:
    import lmdb

    data = tmp_path / "foreign"
    env = lmdb.open(str(data))
    with env.begin(write=True) as txn:
        txn.put(b"their", b"data")
    env.close()
    _boot_fails(node_factory, data, "not a fluxmq store")


def test_data_larger_than_map_size_starts_refusing_and_names_the_key(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    """A store over ``storage.map_size`` (filled by clients, or the key lowered) must not keep the
    node from starting: it starts, serves, refuses new stored messages (5.0: 0x97) and logs which
    key to raise and to what. Before: "does not fit storage.map_size" and the node halted."""
    from fluxmq.storage.lmdb import LMDBStorage

    data = tmp_path / "big"
    s = LMDBStorage(data, map_size=64 << 20)
    for i in range(50):
        s.queue_append("c", i, b"z" * 100_000)
    s.close()
    node = node_factory({"storage.path": str(data), "storage.map_size": "2MiB"}, wait_ready=False)
    deadline = time.monotonic() + WAIT
    while not node.mqtt_accepts() and node.returncode is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert node.returncode is None and node.mqtt_accepts(), node.log_tail()
    log_text = node.log_text()
    assert "storage_over_map_size" in log_text and "storage.map_size" in log_text
    sub = PahoClient(node, unique("sub"))
    sub.connect()
    sub.subscribe("live/#", 0)
    pub = PahoClient(node, unique("pub"), protocol=mqtt.MQTTv5)
    codes = []
    pub.client.on_publish = lambda client, userdata, mid, rc, props: codes.append(rc.value)
    pub.connect()
    pub.client.publish("live/1", b"served", qos=0)
    assert sub.get().payload == b"served"
    info = pub.client.publish("kept", b"v", qos=1, retain=True)
    info.wait_for_publish(WAIT)
    assert codes[-1] == 0x97  # quota exceeded: it would have to be stored
    pub.stop()
    sub.stop()


def test_a_store_slower_to_load_than_the_worker_timeout_starts_once(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    """Start-up loads and restores a large store without starving the arbiter's heartbeat: with
    ``server.worker_timeout`` 1s and a store whose load and restore take longer than that, the
    worker boots once and the node gets ready. Before: load and restore ran in the hub, the
    arbiter killed the worker ("WORKER TIMEOUT") and the replacement did the same, a restart loop.

    On a loaded machine the beats come late (a restore slice, the threadpool's hand-back, other
    processes on the CPU); here every one is 0.15 s late (TEST-ONLY ``FLUXMQTEST_HEARTBEAT_LATE``),
    and the worker is still not killed. Before, the worker beat every second with a 1 s timeout:
    each late beat moved the beats 0.15 s against the arbiter's looks, so within eight beats a look
    came in the 0.15 s a beat was over the timeout, and the worker was killed (in CI it was, once,
    with no hook: 88 ms after ``storage_loaded``, under the full suite's load)."""
    from bench.bigstore import build
    from fluxmq.node.worker import LATE_HEARTBEAT_ENV

    data = tmp_path / "store"
    build(data, 50_000, 500_000, 64)
    node = node_factory(
        {"storage.path": str(data), "storage.map_size": "2GiB", "server.worker_timeout": "1s"},
        wait_ready=False,
        env={LATE_HEARTBEAT_ENV: "0.15"},
    )
    # While it loads, the node answers its probes: alive, not ready.
    seen_loading = seen_alive = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and node.returncode is None:
        try:
            status, body = node.http_get("/ready", timeout=1.0)
        except OSError:
            time.sleep(0.05)
            continue
        if status == 200:
            break
        if status == 503 and body["checks"]["storage"].get("details") == "loading":
            seen_loading = True
            try:
                seen_alive = seen_alive or node.http_get("/health", timeout=1.0)[0] == 200
            except OSError:
                pass  # not answered in time on a loaded machine (as /ready above): asked again
        time.sleep(0.05)
    node.wait_ready(120)
    assert seen_loading and seen_alive
    # Enough late beats that, a beat a second, one would have met a look (8 at 0.15 s late each).
    deadline = time.monotonic() + 120
    text = node.log_text()
    while text.count("heartbeat_late") < LATE_BEATS and "WORKER TIMEOUT" not in text:
        assert time.monotonic() < deadline and node.returncode is None, node.log_tail()
        time.sleep(0.1)
        text = node.log_text()
    assert "WORKER TIMEOUT" not in text, node.log_tail()
    assert text.count("Booting worker") == 1, node.log_tail()
    # Precondition of the test, not a performance claim: the start really outlasted the timeout.
    took = _logged_start_seconds(text)
    if took is not None and took < 1.0:
        pytest.skip(f"the store loaded in {took:.2f}s, within the worker timeout: nothing shown")


#: late beats the store-load test waits for: more than a full second of lateness at 0.15 s each
LATE_BEATS = 12


def _logged_start_seconds(text: str) -> float | None:
    import json
    import re

    for line in text.splitlines():
        if "start_took" in line:
            m = re.search(r'"?start_took"?[=:]\s*([0-9.]+)', line)
            if m:
                return float(m.group(1))
            try:
                return float(json.loads(line)["start_took"])
            except (ValueError, KeyError):
                return None
    return None


def _publish_frame(topic: bytes, payload: bytes, pid: int) -> bytes:
    body = struct.pack(">H", len(topic)) + topic + struct.pack(">H", pid) + payload
    n, rl = len(body), b""
    while True:
        byte, n = n % 128, n // 128
        rl += bytes([byte | (0x80 if n else 0)])
        if not n:
            break
    return b"\x32" + rl + body


def test_map_size_reached_refuses_with_quota_exceeded(node_factory: NodeFactory) -> None:
    """A full store refuses a QoS 1 message it would have to store: 5.0 PUBACK 0x97, a log line;
    a 3.1.1 publisher is disconnected without an ack."""
    node = node_factory({"storage.map_size": "2MiB", "storage.max_queued_bytes": "1GiB"})
    sub = persistent_client(node, unique("offline"), True)
    sub.subscribe("fill/#", 1)
    sub.disconnect()
    sub.stop()
    pub = PahoClient(node, unique("filler"), protocol=mqtt.MQTTv5)
    refused = []
    pub.client.on_publish = lambda client, userdata, mid, rc, props: (
        refused.append(rc) if rc.value == 0x97 else None
    )
    pub.connect()
    payload = b"x" * 60_000
    for i in range(400):
        pub.client.publish(f"fill/{i}", payload, qos=1).wait_for_publish(WAIT)
        if refused:
            break
    assert refused, "the store never filled up"
    pub.stop()
    assert "storage_full" in node.log_text()
    status, body = node.http_get("/ready")
    assert status == 503 and body["checks"]["storage"]["status"] == "down"
    # 3.1.1: no negative PUBACK exists, so the connection closes without one.
    with socket.create_connection((node.host, node.mqtt_port), timeout=10) as s:
        cid = unique("v311").encode()
        body = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack(">H", len(cid)) + cid
        s.sendall(bytes([0x10, len(body)]) + body)
        assert s.recv(4) == b"\x20\x02\x00\x00"
        s.sendall(_publish_frame(b"fill/x", b"y" * 100, 1))
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        assert b"\x40\x02\x00\x01" not in data


# -- memory stays bounded ---------------------------------------------------------------------------


def _rss_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


def test_100k_queued_messages_do_not_live_in_memory(node_factory: NodeFactory) -> None:
    """100,000 x 1 KB QoS 1 messages for an offline session: the worker's anonymous memory grows
    by far less than the ~100 MB of payload (only the queue's index is in memory)."""
    node = node_factory({"storage.max_queued_bytes": "200MiB"})
    cid = unique("offline")
    sub = persistent_client(node, cid, True)
    sub.subscribe("mem/#", 1)
    sub.disconnect()
    sub.stop()
    (worker,) = node.worker_pids()
    before = _rss_kib(worker)
    n, size = 100_000, 1000
    payload = b"m" * size
    with socket.create_connection((node.host, node.mqtt_port), timeout=30) as s:
        pcid = unique("blaster").encode()
        body = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack(">H", len(pcid)) + pcid
        s.sendall(bytes([0x10, len(body)]) + body)
        assert s.recv(4) == b"\x20\x02\x00\x00"
        acked = 0
        buf = b""
        window = 2000
        sent = 0
        while acked < n:
            if sent < n and sent - acked < window:
                batch = min(500, n - sent)
                s.sendall(
                    b"".join(_publish_frame(b"mem/t", payload, (sent + k) % 65535 + 1) for k in range(batch))
                )
                sent += batch
                continue
            chunk = s.recv(65536)
            assert chunk, "connection closed"
            buf += chunk
            whole = len(buf) // 4 * 4
            assert buf[:whole].count(b"\x40\x02") >= whole // 4
            acked += whole // 4
            buf = buf[whole:]
    after = _rss_kib(worker)
    grown_kib = after["RssAnon"] - before["RssAnon"]
    payload_kib = n * size // 1024
    print(f"RSS before {before} after {after}: anonymous +{grown_kib} KiB for {payload_kib} KiB of payload")
    assert grown_kib < payload_kib / 5, (before, after)
    # Still all there: reconnect and check the count the broker reports through the first messages.
    c = persistent_client(node, cid, True)
    assert c.connack[1]
    first = c.get(WAIT)
    assert first.payload == payload
    c.stop()


# -- a commit that fails (a full disk) --------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """An 8 MiB tmpfs for the store (needs root and mount; skipped where the test cannot mount)."""
    import subprocess

    mnt = tmp_path / "tiny-disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(path: Path) -> None:
    """Write ``path`` until the file system is full (bounded by its 8 MiB)."""
    chunk = b"f" * 65536
    with open(path, "wb", buffering=0) as f:
        for _ in range(1000):
            try:
                f.write(chunk)
            except OSError:
                break


def _acknowledged(info: mqtt.MQTTMessageInfo) -> bool:
    """Whether paho got the PUBACK. When the broker closes the connection while paho is still writing
    a large PUBLISH, paho marks the message as never sent and ``is_published`` raises instead of
    answering False; either way no acknowledgement came."""
    try:
        return info.is_published()
    except RuntimeError:
        return False


def test_a_failed_commit_is_retried_and_spares_clients_with_nothing_at_stake(
    node_factory: NodeFactory, tiny_disk: Path
) -> None:
    """A full disk fails the commit of a retained QoS 1 message (issue 17 item 3). Its publisher
    gets no PUBACK and is disconnected (5.0: 0x97); a clean QoS 0 subscriber that received the
    message in the same turn keeps its connection. Once disk space is freed the kept batch commits,
    so after a restart the retained message is there: memory and disk never disagree. Before: every
    connection with output in that turn was closed and the batch was thrown away."""
    data = tiny_disk / "data"
    node = node_factory({"storage.path": str(data), "storage.sync_interval": "0.2s"})
    sub = PahoClient(node, unique("qos0"))
    sub.connect()
    sub.subscribe("live/#", 0)
    pub = PahoClient(node, unique("pub"), protocol=mqtt.MQTTv5)
    pub.connect()
    pub.publish("live/warm", b"w", qos=1)
    assert sub.get().topic == "live/warm"
    filler = tiny_disk / "filler"
    _fill(filler)
    info = pub.client.publish("live/big", b"B" * 300_000, qos=1, retain=True)
    assert pub.wait_disconnected(WAIT), "the publisher of the failed batch was not disconnected"
    assert not _acknowledged(info)  # no PUBACK for a message that is not stored
    assert pub.disconnect_reason is not None and pub.disconnect_reason.value == 0x97
    got = sub.get()
    assert got.topic == "live/big" and len(got.payload) == 300_000
    assert sub.is_connected  # nothing at stake: not closed
    assert "storage_commit_failed" in node.log_text()
    filler.unlink()
    deadline = time.monotonic() + WAIT
    while "storage_commit_recovered" not in node.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "storage_commit_recovered" in node.log_text(), node.log_tail()
    pub.stop()
    sub.disconnect()
    node.stop()
    again = node_factory({"storage.path": str(data)})
    late = PahoClient(again, unique("late"))
    late.connect()
    late.subscribe("live/big", 0)
    kept = late.get()
    assert kept.retain and len(kept.payload) == 300_000
    late.disconnect()


def test_in_flight_and_queued_messages_come_back_exact_after_sigkill(node_factory: NodeFactory) -> None:
    """A 3.1.1 persistent subscriber with a window of 10 has acknowledged some messages, holds 10
    in flight (some sent at once, some from its queue) and has the rest queued when the node is
    killed: after the restart it gets exactly the 10 in flight again, with DUP and their packet
    ids, then the queued ones in order, and none it acknowledged."""
    node = node_factory({"broker.max_inflight": 10, "storage.sync": "batch"})
    topic = unique("exact")
    sub = raw_connected(node, "exact-sub", clean=False)
    sub.subscribe(1, (topic, 1))
    pub = raw_connected(node, unique("pub"))
    for i in range(30):
        pub.publish_qos1(topic, f"m{i:02d}".encode(), i + 1)  # PUBACKed: stored
    first = [sub.expect(c.Publish) for _ in range(10)]  # the window
    assert [p.payload for p in first] == [f"m{i:02d}".encode() for i in range(10)]
    for p in first[:4]:
        sub.send(c.Puback(p.packet_id))
    more = [sub.expect(c.Publish) for _ in range(4)]  # sent after the acks' commit
    assert [p.payload for p in more] == [f"m{i:02d}".encode() for i in range(10, 14)]
    in_flight = {p.packet_id: p.payload for p in first[4:] + more}
    node.kill()
    sub.close()
    pub.close()

    again = node_factory({"storage.path": str(node.data_dir), "broker.max_inflight": 10})
    sub = RawClient.to(again)
    connack = sub.connect("exact-sub", clean=False)
    assert connack.session_present
    resent = [sub.expect(c.Publish) for _ in range(10)]
    assert {p.packet_id: p.payload for p in resent} == in_flight
    assert [p.payload for p in resent] == sorted(in_flight.values())  # in their order
    assert all(p.dup for p in resent)
    for p in resent:
        sub.send(c.Puback(p.packet_id))
    rest = []
    while len(rest) < 16:
        p = sub.expect(c.Publish)
        assert not p.dup
        rest.append(p.payload)
        sub.send(c.Puback(p.packet_id))
    assert rest == [f"m{i:02d}".encode() for i in range(14, 30)]
    marker = raw_connected(again, unique("marker"))
    marker.publish_qos1(topic, b"marker", 1)
    assert sub.expect(c.Publish).payload == b"marker"  # nothing else was left
    marker.close()
    sub.close()


@pytest.mark.parametrize("seed", [1, 2])
def test_out_of_order_acks_then_sigkill_nothing_acknowledged_lost_or_back(
    node_factory: NodeFactory, seed: int
) -> None:
    """A 3.1.1 persistent subscriber (window 20) acknowledges random subsets of its window in random
    order over several rounds while the publisher keeps publishing, each round closed by a PINGREQ
    (its PINGRESP leaves only after the commit of the acks before it); then SIGKILL. After the
    restart it gets exactly what was in flight (DUP, same ids) and then every unacknowledged
    message in order: nothing the publisher had PUBACKed is lost, nothing the subscriber
    acknowledged comes back. (The common deliveries and PUBACKs here are the C relay's.)"""
    import random

    rnd = random.Random(seed)
    node = node_factory({"broker.max_inflight": 20, "storage.sync": "batch"})
    topic = unique("ooo")
    sub = raw_connected(node, f"ooo-sub-{seed}", clean=False)
    sub.subscribe(1, (topic, 1))
    pub = raw_connected(node, unique("pub"))
    published = 0

    def publish(n: int) -> None:
        nonlocal published
        pub.send(*[c.Publish(topic, b"m%04d" % (published + i), qos=1, packet_id=1 + i) for i in range(n)])
        for _ in range(n):
            pub.expect(c.Puback)  # acknowledged: stored
        published += n

    publish(60)
    in_flight = {}
    for p in [sub.expect(c.Publish) for _ in range(20)]:
        in_flight[p.packet_id] = p.payload
    acked: set[bytes] = set()
    for _ in range(6):
        take = rnd.sample(sorted(in_flight), rnd.randint(1, len(in_flight)))
        sub.send(*[c.Puback(pid) for pid in take], c.Pingreq())
        for pid in take:
            acked.add(in_flight.pop(pid))
        got, _ = sub.collect_until(lambda p: p.type == c.PINGRESP)
        for p in got:
            assert p.type == c.PUBLISH and not p.dup
            in_flight[p.packet_id] = p.payload
        publish(rnd.randint(0, 15))
    assert len(in_flight) == 20
    node.kill()
    sub.close()
    pub.close()

    again = node_factory({"storage.path": str(node.data_dir), "broker.max_inflight": 20})
    sub = RawClient.to(again)
    assert sub.connect(f"ooo-sub-{seed}", clean=False).session_present
    resent = [sub.expect(c.Publish) for _ in range(20)]
    assert {p.packet_id: p.payload for p in resent} == in_flight
    assert all(p.dup for p in resent)
    for p in resent:
        sub.send(c.Puback(p.packet_id))
    rest = []
    expected_rest = [
        b"m%04d" % i
        for i in range(published)
        if b"m%04d" % i not in acked and b"m%04d" % i not in in_flight.values()
    ]
    while len(rest) < len(expected_rest):
        p = sub.expect(c.Publish)
        rest.append(p.payload)
        sub.send(c.Puback(p.packet_id))
    assert rest == expected_rest
    assert not acked & set(rest) and not acked & set(in_flight.values())
    marker = raw_connected(again, unique("marker"))
    marker.publish_qos1(topic, b"marker", 1)
    assert sub.expect(c.Publish).payload == b"marker"  # nothing else was left
    marker.close()
    sub.close()
