"""BridgeLink pieces that need no peer: reconnect backoff, snapshots without credentials,
the Delivery side against a real Broker (memory storage)."""

from __future__ import annotations

import gevent
import pytest

from fluxmq.bridge.config import BridgeConfig, TopicRoute
from fluxmq.bridge.link import DOWN, BridgeLink, jittered
from fluxmq.bridge.status import BridgeStatus, overall
from fluxmq.broker.broker import Broker
from fluxmq.broker.message import USER_PROPERTY, Message


def test_jitter_stays_between_half_and_all_of_the_delay():
    assert jittered(8.0, lambda: 0.0) == 4.0
    assert jittered(8.0, lambda: 1.0) == 8.0
    for _ in range(100):
        assert 2.0 <= jittered(4.0) <= 4.0


def test_backoff_doubles_up_to_the_maximum(monkeypatch):
    """Issue 14: reconnection uses exponential backoff with jitter."""
    import fluxmq.bridge.link as link_module

    waits = []
    cfg = BridgeConfig("b", "127.0.0.1", 1, reconnect_initial=0.5, reconnect_max=4.0)
    link = BridgeLink(cfg, Broker())

    def fail() -> None:
        raise OSError("refused")

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 6:
            link._stopped = True

    monkeypatch.setattr(link, "_connect_and_serve", fail)
    monkeypatch.setattr(link_module.gevent, "sleep", sleep)
    monkeypatch.setattr(link_module.random, "random", lambda: 1.0)  # no jitter: the bare delays
    link._run()
    assert waits == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert link.state == DOWN and link.last_error == "refused" and link.counters.errors == 6


def test_snapshot_and_status_never_show_the_password():
    broker = Broker()
    cfg = BridgeConfig(
        "b", "127.0.0.1", 1, username="u", password=b"hunter2", topics=(TopicRoute("a/#", "out", 1),)
    )
    link = BridgeLink(cfg, broker)
    link._open_session()
    status = BridgeStatus(broker, [link])
    text = repr(status.summary()) + repr(status.values()) + repr(cfg)
    assert "hunter2" not in text
    assert overall([link]) == "down" and status.readiness() == (True, "0/1 bridges connected; down: b")


def test_messages_queue_in_the_bridge_session_while_the_peer_is_away():
    """QoS 1/2 wait in the $bridge/NAME session (bounded by max_queued_messages); QoS 0 is dropped."""
    broker = Broker()
    cfg = BridgeConfig("b", "127.0.0.1", 1, max_queued_messages=3, topics=(TopicRoute("a/#", "out", 2),))
    link = BridgeLink(cfg, broker)
    link._open_session()
    for i in range(5):
        broker.publish(Message(f"a/{i}", b"x", 1))
    broker.publish(Message("a/q0", b"x", 0))
    assert link.queued() == 3 and broker.stats.drops["queue_full"] == 2


def test_mesh_link_never_relays_a_peer_message_and_settles_it_locally():
    """Cluster routes: a message carrying the route marker came from a peer; it is not forwarded,
    and its QoS 1 in-flight entry is settled here so the window does not fill."""
    broker = Broker()
    cfg = BridgeConfig(
        "m", "127.0.0.1", 1, client_id="node-a", mesh=True, topics=(TopicRoute("#", "out", 2),)
    )
    link = BridgeLink(cfg, broker)
    session = link._open_session()
    link._sock = object()  # pretend connected: output goes to link.out
    link._mark = lambda: None
    broker.attach(session, link, 10)
    relayed = Message("t", b"x", 1, properties={USER_PROPERTY: [("fluxmq-route", "node-b")]})
    broker.publish(relayed)
    assert link.out == bytearray() and link.counters.dropped_loop == 1
    gevent.sleep(0)  # the local settlement runs in the next loop turn
    assert session.inflight == {}
    broker.publish(Message("t", b"own", 1))
    assert b"own" in link.out and b"fluxmq-route" in link.out and b"node-a" in link.out
    link._sock = None


@pytest.mark.parametrize("version", ["3.1.1", "5.0"])
def test_prefixes_are_swapped_on_the_way_out(version):
    broker = Broker()
    cfg = BridgeConfig(
        "p",
        "127.0.0.1",
        1,
        protocol_version=version,
        topics=(TopicRoute("s/#", "out", 0, "edge/", "cloud/"),),
    )
    link = BridgeLink(cfg, broker)
    session = link._open_session()
    link._sock = object()
    link._mark = lambda: None
    broker.attach(session, link, 10)
    broker.publish(Message("edge/s/1", b"v", 0))
    assert b"cloud/s/1" in link.out and b"edge/" not in link.out
    link._sock = None
