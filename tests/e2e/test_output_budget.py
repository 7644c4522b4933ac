"""A subscriber that keeps reading loses no QoS 0 message to a fan-in burst (issue 16).

Many publishers pipeline QoS 0 messages at one wildcard subscriber whose reader thread drains its
socket the whole time. The broker produces faster than one socket drains, so the subscriber's pending
output passes ``broker.write_buffer_high`` (1 MiB); before the node-wide output budget
(``broker.output_memory_limit``) that made it "congested", its 1,000-message queue overflowed and
QoS 0 messages were dropped although the client never stopped reading. The count is exact; every wait
is bounded; nothing is timed.
"""

from __future__ import annotations

import threading
import urllib.request

import pytest

from fluxmq._core import codec as c
from tests.e2e.mqttraw import RawClient, raw_connected, unique

pytestmark = pytest.mark.e2e

PUBLISHERS = 20
PER_PUBLISHER = 20_000  # 400,000 messages, ~29 MiB aimed at one subscriber
PAYLOAD = b"p" * 64
DEADLINE = 60.0  # seconds for the whole burst to arrive (a bound, not an assertion)


def test_reading_subscriber_gets_every_qos0_message_of_a_fan_in(node) -> None:
    prefix = unique("fanin")
    topics = [f"{prefix}/{i:03d}" for i in range(PUBLISHERS)]  # equal lengths: equal PUBLISH sizes
    packets = [c.encode_publish(t, PAYLOAD, 0, False, False, 0, None, 4) for t in topics]
    packet_size = len(packets[0])
    assert all(len(p) == packet_size for p in packets)
    expected = PUBLISHERS * PER_PUBLISHER

    sub = raw_connected(node, unique("fanin-sub"), keepalive=0)  # it only reads
    assert sub.subscribe(1, (f"{prefix}/#", 0)).reason_codes == [0]
    received_bytes = 0
    stop = threading.Event()

    def read_steadily() -> None:
        # Reads as fast as it can; counts bytes (every PUBLISH has the same size, nothing else comes).
        nonlocal received_bytes
        sub.sock.settimeout(0.5)
        while not stop.is_set() and received_bytes < expected * packet_size:
            try:
                data = sub.sock.recv(1 << 20)
            except TimeoutError:
                continue
            if not data:
                return
            received_bytes += len(data)

    reader = threading.Thread(target=read_steadily, daemon=True)
    reader.start()
    publishers = []
    for i in range(PUBLISHERS):
        pub = RawClient.to(node)
        assert pub.connect(unique(f"fanin-pub{i}")).reason_code == 0
        publishers.append(pub)

    def publish(pub: RawClient, packet: bytes) -> None:
        burst = packet * 1000
        for _ in range(PER_PUBLISHER // 1000):
            pub.sock.sendall(burst)

    senders = [
        threading.Thread(target=publish, args=(p, packets[i]), daemon=True) for i, p in enumerate(publishers)
    ]
    for s in senders:
        s.start()
    for s in senders:
        s.join(DEADLINE)
    reader.join(DEADLINE)
    stop.set()
    reader.join(5)
    with urllib.request.urlopen(f"http://{node.host}:{node.health_port}/metrics", timeout=10) as resp:
        drops = [
            line
            for line in resp.read().decode().splitlines()
            if line.startswith(("fluxmq_messages_dropped", "fluxmq_output_budget"))
        ]
    for p in publishers:
        p.sock.close()
    sub.sock.close()
    assert received_bytes == expected * packet_size, (
        f"received {received_bytes // packet_size} of {expected} QoS 0 messages; {sorted(drops)}"
    )
