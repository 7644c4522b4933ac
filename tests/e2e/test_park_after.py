"""``broker.park_after`` on a real node: when an idle connection parks (its greenlet ends until input
arrives), seen through ``/metrics``' ``fluxmq_listener_connections_parked``.

A connection parks right after CONNECT, and after ``park_after`` of silence once input woke it;
``0`` keeps a greenlet on every connection.
"""

from __future__ import annotations

import time

import pytest

from fluxmq._core import codec as c
from tests.e2e.mqttraw import raw_connected, unique, wait_until
from tests.e2e.test_metrics import sample, scrape

pytestmark = pytest.mark.e2e


def parked(node) -> float:
    return sample(scrape(node), "fluxmq_listener_connections_parked", listener="tcp")


def test_a_short_park_after_parks_a_client_that_went_quiet_and_0_never_parks(node_factory) -> None:
    short = node_factory({"broker.park_after": "300ms"})
    never = node_factory({"broker.park_after": 0})
    clients = {}
    try:
        for node in (short, never):
            client = clients[node] = raw_connected(node, unique("idle"))
            # input right after CONNECT: a connection woken this soon keeps its greenlet for
            # park_after of silence before it parks again
            client.subscribe(1, ("park/after", 0))
        assert wait_until(lambda: parked(short) == 1, 10), "the idle client never parked"
        # longer than the short node's park_after, and a round trip on each connection after it
        time.sleep(1.0)  # gives the never-parking node the time to park if it did; nothing is timed
        for client in clients.values():
            client.send(c.Pingreq())
            assert isinstance(client.recv(), c.Pingresp)
        assert parked(short) == 1  # a PINGREQ is answered from the hub: the connection stays parked
        assert parked(never) == 0
        assert sample(scrape(never), "fluxmq_listener_connections", listener="tcp") == 1
    finally:
        for client in clients.values():
            client.disconnect()
