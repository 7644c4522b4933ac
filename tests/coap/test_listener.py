"""fluxmq.coap.listener on a real UDP socket in this process (gevent, not monkey-patched)."""

from __future__ import annotations

import socket

import gevent

from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.coap import codec
from fluxmq.coap.bridge import CoapBridge
from fluxmq.coap.codec import CoapMessage
from fluxmq.coap.listener import BATCH, CoapUDPListener


def test_a_flood_of_queued_datagrams_lets_the_hub_run_between_batches() -> None:
    """A reader that never yields while datagrams are queued would starve the flusher, every MQTT
    client and the worker's heartbeat for as long as a flood lasts."""
    bridge = CoapBridge(Broker(BrokerSettings()))
    listener = CoapUDPListener("coap", "127.0.0.1", 0, bridge)
    listener.start()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    try:
        count = 1000
        for mid in range(count):  # queued in the kernel before the reader runs at all
            sender.sendto(
                codec.serialize(CoapMessage(codec.NON, codec.POST, mid, b"", [(codec.URI_PATH, b"f")], b"x")),
                ("127.0.0.1", listener.port),
            )
        seen_by_other_greenlet: list[int] = []

        def other() -> None:
            gevent.sleep(0)  # after the reader's first turn
            seen_by_other_greenlet.append(bridge.broker.stats.received_qos[0])

        g = gevent.spawn(other)
        g.join(timeout=10)
        for _ in range(200):
            if bridge.broker.stats.received_qos[0] >= count:
                break
            gevent.sleep(0.01)
        assert bridge.broker.stats.received_qos[0] == count
        assert seen_by_other_greenlet and seen_by_other_greenlet[0] <= 2 * BATCH
    finally:
        sender.close()
        listener.stop()
