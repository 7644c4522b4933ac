"""QoS 1 messages for a persistent session whose connection is closing are kept, not dropped.

A connection is closed well before its teardown detaches its session; under ``storage.sync:
always`` an admin kick waits for the fsync of the batch in progress first. Messages routed to the
session in that window must stay with it (queued) and reach the client when it reconnects: each of
them was acknowledged to its publisher.
"""

from __future__ import annotations

import threading
import time
from urllib.parse import quote

from fluxmq._core import codec as c
from tests.conftest import NodeFactory
from tests.e2e.test_http_bridge import http_request

from .mqttraw import ConnectionClosed, RawClient, raw_connected, unique

TOKEN = "e2e-closing-token"
MESSAGES = 3000
WAIT = 20.0


def _consume(client: RawClient, received: set[bytes], done: threading.Event) -> None:
    """Read and acknowledge every PUBLISH until the broker closes the connection (bounded)."""
    deadline = time.monotonic() + WAIT
    try:
        while not done.is_set() and time.monotonic() < deadline:
            packet = client.recv(max(0.01, deadline - time.monotonic()))
            if isinstance(packet, c.Publish):
                received.add(packet.payload)
                client.send(c.Puback(packet.packet_id))
    except (ConnectionClosed, AssertionError, OSError):
        pass


def test_qos1_routed_while_the_subscriber_is_being_kicked_reaches_it_on_reconnect(
    node_factory: NodeFactory,
) -> None:
    node = node_factory({"storage.sync": "always"}, env={"FLUXMQ_ADMIN_TOKEN": TOKEN})
    cid, topic = unique("kicked"), unique("t")
    subscriber = raw_connected(node, cid, clean=False)
    subscriber.subscribe(1, (topic, 1))
    received: set[bytes] = set()
    done = threading.Event()
    reader = threading.Thread(target=_consume, args=(subscriber, received, done), daemon=True)
    reader.start()

    publisher = raw_connected(node, unique("pub"))
    # All pipelined in a few writes, so QoS 1 messages keep arriving while the kick is handled.
    batch = 100
    acked = 0
    kicked = False
    for start in range(0, MESSAGES, batch):
        publisher.send(
            *(
                c.Publish(topic, b"%d" % i, 1, False, False, i % 65535 + 1, None)
                for i in range(start, start + batch)
            )
        )
        if start >= MESSAGES // 3 and not kicked:
            status, _, _ = http_request(
                node,
                "POST",
                f"/sessions/{quote(cid, safe='')}/disconnect",
                headers={"Authorization": f"Bearer {TOKEN}"},
                port=node.admin_port,
            )
            assert status == 200
            kicked = True
    while acked < MESSAGES:
        publisher.wait_for(lambda p: isinstance(p, c.Puback), WAIT)
        acked += 1
    publisher.close()
    reader.join(WAIT)
    done.set()
    subscriber.close()

    # Reconnect: whatever the kicked connection did not get is delivered now.
    again = raw_connected(node, cid, clean=False)
    try:
        deadline = time.monotonic() + WAIT
        while len(received) < MESSAGES and time.monotonic() < deadline:
            try:
                packet = again.recv(max(0.01, deadline - time.monotonic()))
            except AssertionError:
                break
            if isinstance(packet, c.Publish):
                received.add(packet.payload)
                again.send(c.Puback(packet.packet_id))
    finally:
        again.close()
    missing = sorted(set(b"%d" % i for i in range(MESSAGES)) - received, key=int)
    assert not missing, f"{len(missing)} acknowledged messages never delivered, e.g. {missing[:5]}"
