"""A publisher that never pauses must not starve the other clients or the worker's heartbeat.

gevent's ``recv`` returns without switching greenlets while data is ready, so a connection whose
socket is never empty would keep the hub to itself: no flush (no acks, no deliveries to anyone),
no heartbeat, and the arbiter kills the worker after ``server.worker_timeout``. The read loop
yields after a bounded amount of input (``fluxmq.protocol.connection``), so the others keep going.
"""

from __future__ import annotations

import socket
import threading
import time

from fluxmq._core import codec as c
from tests.conftest import NodeFactory

from .mqttraw import raw_connected, unique

WORKER_TIMEOUT = 3  # seconds; the flood lasts several times longer
FLOOD_SECONDS = 4 * WORKER_TIMEOUT
ROUND_TRIP_DEADLINE = 5.0  # each QoS 1 ping-pong must complete within this (an event, not a timing claim)


def _flood(port: int, stop: threading.Event, sent: list[int]) -> None:
    """Blast pre-encoded QoS 0 PUBLISH packets on a raw socket until ``stop`` or FLOOD_SECONDS."""
    chunk = c.encode(c.Publish(unique("flood") + "/x", b"p" * 32, 0, False, False, 0, None), 4) * 4096
    deadline = time.monotonic() + FLOOD_SECONDS
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(c.encode(c.Connect(unique("flooder"), True, 0, 4, None, None, None, None, None), 4))
        while not stop.is_set() and time.monotonic() < deadline:
            sock.sendall(chunk)
            sent[0] += 1
    except OSError:
        pass  # the broker closed the flooder: the ping-pong assertions tell whether that is fine
    finally:
        sock.close()


def test_qos0_flood_does_not_starve_others_or_the_worker_heartbeat(node_factory: NodeFactory) -> None:
    node = node_factory({"server.worker_timeout": f"{WORKER_TIMEOUT}s"})
    workers = node.worker_pids()
    assert len(workers) == 1, workers
    topic = unique("pingpong")
    client = raw_connected(node, unique("pinger"))
    client.subscribe(1, (topic, 1))
    stop = threading.Event()
    sent = [0]
    flooder = threading.Thread(target=_flood, args=(node.mqtt_port, stop, sent), daemon=True)
    flooder.start()
    round_trips = 0
    try:
        while sent[0] == 0 and flooder.is_alive():  # the flood is under way before the first ping
            time.sleep(0.01)
        pid = 0
        while flooder.is_alive() and round_trips < 10_000:
            pid = pid % 65535 + 1
            client.publish(topic, b"ping", 1, packet_id=pid)
            client.wait_for(
                lambda p, pid=pid: isinstance(p, c.Puback) and p.packet_id == pid, ROUND_TRIP_DEADLINE
            )
            echo = client.wait_for(lambda p: isinstance(p, c.Publish), ROUND_TRIP_DEADLINE)
            assert echo.payload == b"ping"
            client.ack(echo)
            round_trips += 1
    finally:
        stop.set()
        flooder.join(FLOOD_SECONDS + 10)
        client.close()
    assert round_trips > 0
    assert sent[0] > 0
    assert node.worker_pids() == workers, "the worker was restarted during the flood"
    assert "WORKER TIMEOUT" not in node.log_text()
