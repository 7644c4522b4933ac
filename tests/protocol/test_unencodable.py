"""A message one subscriber's protocol cannot encode (a property value the codec refuses: a string no
UTF-8 encoder takes, a value out of range) is dropped for that subscriber and counted
(``unencodable``); the subscriber keeps its connection and its session, and nothing stays in flight.

The message comes in through ``Broker.publish`` with its edge check (``check_message``, which
refuses such a message from a front end: tests/storage/test_publish_ranges.py) turned off, as a
stored message from an older version or a peer's forwarded one brings it past that check; the
subscribers are real MQTT clients over TCP.
"""

from __future__ import annotations

import logging
import uuid

import pytest

from fluxmq._core import codec as c
from fluxmq.broker import publishing
from fluxmq.broker.message import CONTENT_TYPE, MESSAGE_EXPIRY_INTERVAL, PAYLOAD_FORMAT_INDICATOR, Message
from fluxmq.broker.session import PersistentSession
from fluxmq.storage.lmdb import LMDBStorage
from tests.transport.harness import InProcessListener, MQTTPeer, SocketTransport, tcp_connect

BAD_PROPERTIES = [
    {CONTENT_TYPE: "\ud800"},  # JSON's escape of a lone surrogate: no UTF-8 encoder takes it
    {MESSAGE_EXPIRY_INTERVAL: 1 << 40},  # over the four-byte integer
    {PAYLOAD_FORMAT_INDICATOR: 300},  # over the byte (the store takes it: a four-byte integer there)
]


@pytest.fixture(autouse=True)
def no_edge_check(monkeypatch):
    """These messages reach delivery past the public API's check (see the module docstring)."""
    monkeypatch.setattr(publishing, "check_message", lambda message: None)


@pytest.fixture
def server():
    with InProcessListener() as server:
        yield server


@pytest.fixture(params=["memory", "lmdb"])
def stored(request, tmp_path):
    """A broker in memory, or over LMDB (its sessions are ``PersistentSession``: queue and in-flight
    entries on disk); with a property value its store takes and no MQTT 5.0 encoder does."""
    if request.param == "memory":
        with InProcessListener() as server:
            yield server, BAD_PROPERTIES[0]
        return
    storage = LMDBStorage(tmp_path / "data", map_size=16 << 20)
    try:
        with InProcessListener(storage=storage) as server:
            yield server, BAD_PROPERTIES[2]
    finally:
        storage.close()


def client(server: InProcessListener, client_id: str, version: int = 5, resume: bool = False) -> MQTTPeer:
    """A connected client; ``resume``: clean start off, and a session that outlives the connection."""
    peer = MQTTPeer(SocketTransport(tcp_connect(server.port)), version)
    props = {c.SESSION_EXPIRY_INTERVAL: 300} if version == 5 else None
    peer.send(c.Connect(client_id, not resume, 60, version, properties=props))
    assert peer.expect(c.Connack).reason_code == 0
    return peer


def still_connected(peer: MQTTPeer) -> None:
    peer.send(c.Pingreq())
    peer.expect(c.Pingresp)


def bad(topic: str, qos: int, properties: dict, retain: bool = False) -> Message:
    return Message(topic, b"bad", qos, retain, dict(properties))


@pytest.mark.parametrize("properties", BAD_PROPERTIES)
@pytest.mark.parametrize("qos", [0, 1])
def test_a_live_delivery_the_codec_refuses_is_dropped_for_that_subscriber_only(
    server: InProcessListener, properties: dict, qos: int
) -> None:
    """The publish reaches the others (a 3.1.1 subscriber, which carries no properties), the 5.0
    subscriber keeps its connection and gets the next message; the drop is counted."""
    v5, v4 = client(server, "v5"), client(server, "v4", 4)
    for peer in (v5, v4):
        peer.send(c.Subscribe(1, [c.Subscription("u/#", 1)]))
        peer.expect(c.Suback)
    assert server.broker.publish(bad("u/bad", qos, properties)) == 2
    server.broker.publish(Message("u/good", b"good", qos))
    got = v5.expect(c.Publish)
    assert (got.topic, got.payload) == ("u/good", b"good")
    assert [v4.expect(c.Publish).payload for _ in range(2)] == [b"bad", b"good"]
    still_connected(v5)
    assert server.broker.stats.drops == {"unencodable": 1}
    session = server.broker.sessions["v5"]
    assert list(session.inflight) == ([got.packet_id] if qos else [])


def test_a_queued_message_the_codec_refuses_does_not_cost_the_reconnect(stored) -> None:
    """Queued while the subscriber was away: on its return the session is resumed, the message is
    dropped (acknowledged and dropped: never left in flight, nor on disk) and the next one delivered."""
    server, properties = stored
    sub = client(server, "away")
    sub.send(c.Subscribe(1, [c.Subscription("q/#", 1)]))
    sub.expect(c.Suback)
    sub.send(c.Disconnect(0))
    assert sub.wait_closed()
    server.broker.publish(bad("q/bad", 1, properties))
    server.broker.publish(bad("q/bad0", 0, properties))  # (QoS 0: not queued for an offline client)
    server.broker.publish(Message("q/good", b"good", 1))
    sub = client(server, "away", resume=True)
    got = sub.expect(c.Publish)
    assert (got.topic, got.payload) == ("q/good", b"good")
    sub.send(c.Puback(got.packet_id))
    still_connected(sub)
    session = server.broker.sessions["away"]
    assert not session.inflight and not session.queue
    assert server.broker.stats.drops == {"unencodable": 1, "offline_qos0": 1}
    assert_nothing_stored(server, "away")


def assert_nothing_stored(server: InProcessListener, client_id: str) -> None:
    """A persistent session's store holds no queue or in-flight entry of the client any more."""
    session = server.broker.sessions[client_id]
    if isinstance(session, PersistentSession):
        server.broker.wait_committed()
        stored = session.store.load().sessions[client_id]
        assert not stored.inflight and not stored.queue.count


def test_an_in_flight_message_a_5_0_resume_cannot_encode_is_dropped_not_kept_in_flight(stored) -> None:
    """A 3.1.1 connection got the message (no properties on its wire) and left it unacknowledged;
    the session resumed over 5.0 cannot resend it: dropped and forgotten, the connection kept."""
    server, properties = stored
    old = client(server, "moved", 4, resume=True)
    old.send(c.Subscribe(1, [c.Subscription("m/#", 1)]))
    old.expect(c.Suback)
    server.broker.publish(bad("m/bad", 1, properties))
    assert old.expect(c.Publish).payload == b"bad"
    old.transport.close()
    assert server.wait_no_connections()
    new = client(server, "moved", resume=True)
    still_connected(new)
    assert not server.broker.sessions["moved"].inflight
    server.broker.publish(Message("m/good", b"good", 1))
    got = new.expect(c.Publish)
    assert got.payload == b"good"
    new.send(c.Puback(got.packet_id))
    still_connected(new)
    assert server.broker.stats.drops == {"unencodable": 1}
    assert_nothing_stored(server, "moved")


def test_a_retained_message_the_codec_refuses_does_not_cost_the_subscribe(server: InProcessListener) -> None:
    """The retained message is dropped for the new subscriber (after its SUBACK), which stays."""
    server.broker.publish(bad("r/bad", 1, BAD_PROPERTIES[0], retain=True))
    sub = client(server, "late")
    sub.send(c.Subscribe(1, [c.Subscription("r/#", 1)]))
    sub.expect(c.Suback)
    still_connected(sub)
    server.broker.publish(Message("r/good", b"good", 0))
    assert sub.expect(c.Publish).payload == b"good"
    assert server.broker.stats.drops == {"unencodable": 1}


def test_each_drop_is_counted_and_logged_at_most_once_a_minute_per_client(
    server: InProcessListener, caplog: pytest.LogCaptureFixture
) -> None:
    client_id = f"logged-{uuid.uuid4().hex}"  # the log gate is per client id, for the process
    sub = client(server, client_id)
    sub.send(c.Subscribe(1, [c.Subscription("l/#", 0)]))
    sub.expect(c.Suback)
    with caplog.at_level(logging.WARNING, "fluxmq.protocol"):
        for _ in range(3):
            server.broker.publish(bad("l/bad", 0, BAD_PROPERTIES[0]))
    still_connected(sub)
    assert server.broker.stats.drops == {"unencodable": 3}
    assert server.broker.sessions[client_id].dropped == 3
    (record,) = [r for r in caplog.records if r.getMessage() == "unencodable"]
    assert record.client_id == client_id and record.topic == "l/bad" and "surrogates" in record.error
