"""Hostile bytes on a real node, case by case: random bytes, huge remaining lengths, truncated packets,
a 5.0 client told why with DISCONNECT, each offending connection closed and logged exactly once, and
10,000 half-open connections (silent or half a CONNECT) all closed by ``server.connect_timeout``
while a well-behaved client keeps publishing and receiving, with descriptors back to their baseline.
"""

from __future__ import annotations

import os
import random
import re
import resource
import selectors
import socket
import threading
import time
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest

from fluxmq._core import codec as c
from tests.conftest import NodeFactory, RunningNode
from tests.e2e.mqttraw import RawClient, paho_connected, raw_connected, unique, wait_until

pytestmark = pytest.mark.e2e

HALF_OPEN = 10_000


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    # This process holds the half-open sockets and the node's worker accepts them: both need more
    # descriptors than a default soft limit of 1024 (the node inherits the limit set here).
    need = HALF_OPEN + 2048
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"open-files hard limit {hard} < {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    factory = NodeFactory(tmp_path_factory.mktemp("hostile"))
    try:
        yield factory(
            {
                "storage.type": "memory",
                "server.connect_timeout": "1s",
                "server.tcp.plain.max_connections": HALF_OPEN + 1000,
            }
        )
    finally:
        factory.close()


def lines_for(node: RunningNode, port: int) -> list[str]:
    return [line for line in node.log_text().splitlines() if re.search(rf"peer=127\.0\.0\.1:{port}\b", line)]


def send_and_wait_closed(node: RunningNode, data: bytes, half_close: bool = False) -> tuple[int, bytes]:
    """Send ``data`` on a new connection; return (local port, everything the broker wrote before closing)."""
    with socket.create_connection((node.host, node.mqtt_port), timeout=15) as s:
        port = s.getsockname()[1]
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
    return port, got


def test_random_bytes_before_connect_closed_and_logged_once(node) -> None:
    rng = random.Random(3)
    for _ in range(5):
        data = bytes([rng.choice([0x00, 0x20, 0x30, 0xF0, 0x11])]) + rng.randbytes(200)
        port, got = send_and_wait_closed(node, data)
        assert got == b""  # no CONNACK for something that is not a CONNECT
        assert wait_until(lambda port=port: len(lines_for(node, port)) == 1), lines_for(node, port)


def test_huge_remaining_length_refused_from_the_header(node) -> None:
    """268,435,455 announced: refused at once (PacketTooLarge before the body is buffered)."""
    port, got = send_and_wait_closed(node, b"\x10\xff\xff\xff\x7f" + b"x" * 100)
    assert got == b""
    assert wait_until(lambda: len(lines_for(node, port)) == 1)
    assert "0x95" in lines_for(node, port)[0]


def test_huge_remaining_length_after_connect_5_0_gets_disconnect_0x95(node) -> None:
    raw = raw_connected(node, unique("huge5"), version=5)
    raw.send_bytes(b"\x30\xff\xff\xff\x7f" + b"y" * 50)
    assert [p.reason_code for p in raw.wait_closed() if isinstance(p, c.Disconnect)] == [0x95]


def test_five_byte_remaining_length_is_malformed(node) -> None:
    raw = raw_connected(node, unique("len5"), version=5)
    raw.send_bytes(b"\x30\xff\xff\xff\xff\x01")
    assert [p.reason_code for p in raw.wait_closed() if isinstance(p, c.Disconnect)] == [0x81]


def test_truncated_packet_then_end_of_stream(node) -> None:
    connect = c.encode(c.Connect(client_id=unique("trunc")), 4)
    publish = c.encode(c.Publish("t/x", b"z" * 100, 1, packet_id=1), 4)
    port, got = send_and_wait_closed(node, connect + publish[:40], half_close=True)
    assert got == b"\x20\x02\x00\x00"  # CONNACK, then the broker closed on end of stream


def test_mutated_packet_after_connect_logged_once(node) -> None:
    good = raw_connected(node, unique("mut"))
    port = good.sock.getsockname()[1]
    good.send_bytes(b"\x62\x02\x00")  # PUBREL cut short ...
    good.send_bytes(b"\x01\x30\x00\xff")  # ... and garbage after it
    good.wait_closed()
    assert wait_until(lambda: any("protocol_error" in line for line in lines_for(node, port)))
    assert sum("protocol_error" in line for line in lines_for(node, port)) == 1


def test_10000_half_open_connections_closed_by_connect_timeout(node) -> None:
    """10,000 sockets that send nothing or half a CONNECT: all closed after connect_timeout (1 s),
    a well-behaved client keeps working meanwhile, and the worker's descriptors return to baseline."""
    pid = node.worker_pids()[0]
    steady = paho_connected(node, unique("steady"), mqtt.MQTTv311)
    topic = unique("steady/t")
    assert steady.subscribe(topic, 1) == [1]
    fd_base = len(os.listdir(f"/proc/{pid}/fd"))
    half_connect = c.encode(c.Connect(client_id="half-open-client-id"), 4)[:9]
    socks: list[socket.socket] = []
    sent = 0
    stop = threading.Event()

    def publish_steadily() -> None:
        nonlocal sent
        while not stop.is_set():
            steady.publish(topic, b"%d" % sent, 1)
            sent += 1
            time.sleep(0.01)

    publisher = threading.Thread(target=publish_steadily, daemon=True)
    publisher.start()
    sel = selectors.DefaultSelector()
    try:
        for i in range(HALF_OPEN):
            s = socket.socket()
            s.settimeout(10)
            s.connect((node.host, node.mqtt_port))
            if i % 2:
                s.sendall(half_connect)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            socks.append(s)
        open_left = set(socks)
        deadline = time.monotonic() + 60
        while open_left and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1.0):
                s = key.fileobj
                try:
                    data = s.recv(16)
                except (BlockingIOError, InterruptedError):
                    continue
                except ConnectionResetError:
                    data = b""
                assert data == b"", data  # the broker never answers a half CONNECT
                sel.unregister(s)
                open_left.discard(s)
        assert not open_left, f"{len(open_left)} half-open connections still open"
    finally:
        stop.set()
        publisher.join(30)
        sel.close()
        for s in socks:
            s.close()
    got = []
    deadline = time.monotonic() + 10
    while len(got) < sent and time.monotonic() < deadline:
        try:
            msg = steady.get(0.5)
        except AssertionError:
            continue
        got.append(int(msg.payload))
    assert steady.is_connected and sent > 0 and got == list(range(sent))
    assert wait_until(lambda: len(os.listdir(f"/proc/{pid}/fd")) <= fd_base, timeout=20)
    steady.disconnect()
    log = node.log_text()
    # One connect_timeout line per socket, less what the per-logger throttle dropped (and counted;
    # the last few drops are summarized only with the logger's next line).
    suppressed = sum(int(n) for n in re.findall(r"event=log_throttled suppressed=(\d+)", log))
    assert HALF_OPEN - 50 <= log.count("event=connect_timeout") + suppressed <= HALF_OPEN + 50
    with RawClient.to(node) as after:
        assert after.connect(unique("after")).reason_code == 0
