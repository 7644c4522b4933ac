"""The C fast path of the common PUBLISH (``fluxmq._core.relay``) against the Python handlers.

Each scenario runs three times on a fresh broker: with the fast path served from the hub's I/O
callback (``HUB_READS.enabled``: a connected reader waits on a watcher whose callback relays what it
reads), with the fast path run by the reader greenlet, and with every packet going through
``MQTTConnection._on_publish``. All runs must put the same bytes on every client's socket and leave
the same counters; ``RELAY.served`` says which path handled each PUBLISH, so a case the fast path
must cover fails if it fell back, and a case it must leave to the Python path fails if it did not;
``HUB_READS.served`` says whether the hub callback served the read or handed it to the reader. A
mis-routed, mis-encoded or mis-acknowledged message changes the bytes some client reads.
"""

from __future__ import annotations

import contextlib

import gevent
import pytest
from gevent import socket

from fluxmq._core import codec as c
from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.broker.message import Message
from fluxmq.broker.session import EXPIRY_NEVER
from fluxmq.protocol import connection as connection_module
from fluxmq.protocol.connection import HUB_READS, RELAY, MQTTConnection
from fluxmq.protocol.flush import FlushScheduler
from fluxmq.protocol.settings import ProtocolSettings
from fluxmq.storage.lmdb import LMDBStorage
from fluxmq.storage.memory import MemoryStorage
from fluxmq.transport.tcp import SocketStream

MARK = "relay/mark"  # every client subscribes; the publisher's last packet: all has been read once it arrives


def encode(packet, version: int) -> bytes:
    return c.encode(packet, version)


class Net:
    """A broker (memory storage) and clients attached over socket pairs, each served by its reader."""

    def __init__(self, settings: ProtocolSettings | None = None, storage=None) -> None:
        storage = storage if storage is not None else MemoryStorage()
        self.storage = storage
        self.broker = Broker(BrokerSettings(), storage)
        self.broker.restore(storage.load())
        self.flusher = FlushScheduler(storage)
        self.settings = settings or ProtocolSettings(park_after=0)
        self.clients: dict[str, tuple[MQTTConnection, object, socket.socket]] = {}

    def client(
        self,
        client_id: str,
        version: int = 4,
        quota: int = 100,
        clean: bool = True,
        expiry: int = EXPIRY_NEVER,
    ):
        server_side, client_side = socket.socketpair()
        conn = MQTTConnection(
            self.broker, SocketStream(server_side, ("127.0.0.1", 1)), self.settings, self.flusher
        )
        conn.decoder.version = version
        session, _ = self.broker.open_session(client_id, clean, expiry)
        conn.version = version
        conn.client_id = client_id
        conn.session = session
        self.broker.attach(session, conn, quota)
        self.broker.subscribe(session, MARK, 0)
        self.clients[client_id] = (conn, gevent.spawn(conn.run), client_side)
        # A first exchange, so the reader has emptied its socket and waits for input (on the hub's
        # watcher when HUB_READS is on) before the scenario sends.
        client_side.sendall(encode(c.Pingreq(), version))
        with gevent.Timeout(10):
            assert client_side.recv(2) == b"\xd0\x00"
        return conn

    def subscribe(self, client_id: str, filter: str, qos: int, **kw) -> None:
        self.broker.subscribe(self.clients[client_id][0].session, filter, qos, **kw)

    def send(self, client_id: str, packets: list) -> None:
        """Send ``packets`` (then the mark) in one write: they are decoded by one ``feed``."""
        conn, _, sock = self.clients[client_id]
        data = b"".join(encode(p, conn.version) for p in packets) + encode(
            c.Publish(MARK, b"end"), conn.version
        )
        sock.sendall(data)

    def read_to_mark(self, cid: str) -> bytes:
        """What client ``cid`` read up to (and without) the next mark."""
        conn, _, sock = self.clients[cid]
        mark = encode(c.Publish(MARK, b"end"), conn.version)
        data = b""
        with gevent.Timeout(10):
            while not data.endswith(mark):
                chunk = sock.recv(65536)
                assert chunk, f"{cid}: closed"
                data += chunk
        return data[: -len(mark)]

    def read_all(self) -> dict[str, bytes]:
        """What each client read up to (and without) the mark."""
        return {cid: self.read_to_mark(cid) for cid in self.clients}

    def counters(self) -> dict:
        st = self.broker.stats
        return {
            "received": list(st.received_qos),
            "received_bytes": list(st.received_bytes_qos),
            "sent": list(st.sent_qos),
            "sent_bytes": list(st.sent_bytes_qos),
            "drops": dict(st.drops),
            "retained": len(self.broker.retained),
            "inflight": {cid: sorted(conn.session.inflight) for cid, (conn, _, _) in self.clients.items()},
            "queued": {cid: len(conn.session.queue) for cid, (conn, _, _) in self.clients.items()},
        }

    def close(self) -> None:
        for _conn, reader, sock in self.clients.values():
            sock.close()
            reader.join(timeout=5)


def run_both(scenario, hub_reads: int | None = None, states=None, state=None) -> tuple[dict, dict, int]:
    """Run ``scenario(net)`` with the fast path from the hub, with it from the reader and without
    it; returns (bytes read, counters) of the first and how many PUBLISHes the fast path served in
    it (the marks not counted). ``hub_reads``: how many reads the hub callback must have served
    whole in the first run (the others hand every read to the reader). ``state(net)``, when given,
    is appended to ``states`` after each run."""
    results = []
    served = hub_served = 0
    for relay, hub in ((True, True), (True, False), (False, False)):
        RELAY.enabled = relay
        HUB_READS.enabled = hub
        try:
            net = Net()
            before, hub_before = RELAY.served, HUB_READS.served
            publishes = scenario(net)
            got = net.read_all()
            if hub:
                served = RELAY.served - before - publishes
                hub_served = HUB_READS.served - hub_before
            else:
                assert HUB_READS.served == hub_before
            results.append((got, net.counters()))
            if state is not None:
                states.append(state(net))
            net.close()
        finally:
            RELAY.enabled = True
            HUB_READS.enabled = True
    (fast_got, fast_counters), *others = results
    for got, counters in others:
        assert fast_got == got
        assert fast_counters == counters
    if hub_reads is not None:
        assert hub_served == hub_reads
    return fast_got, fast_counters, served


def test_qos0_to_exact_and_wildcard_subscribers_is_served_in_c() -> None:
    def scenario(net: Net) -> int:
        net.client("pub")
        net.client("exact")
        net.client("wild")
        net.client("other")
        net.subscribe("exact", "a/b", 0)
        net.subscribe("wild", "a/#", 0)
        net.subscribe("other", "x/y", 0)  # must get nothing
        net.send("pub", [c.Publish("a/b", b"one"), c.Publish("a/c", b"two"), c.Publish("z", b"none")])
        return 1  # the mark

    got, counters, served = run_both(scenario, hub_reads=1)
    assert served == 3
    assert got["exact"] == encode(c.Publish("a/b", b"one"), 4)
    assert got["wild"] == encode(c.Publish("a/b", b"one"), 4) + encode(c.Publish("a/c", b"two"), 4)
    assert got["other"] == b""
    assert counters["sent"][0] == 3 + 4  # and the mark to four clients


def test_qos1_publish_acks_first_and_downgrades_per_subscription() -> None:
    def scenario(net: Net) -> int:
        net.client("pub")
        net.client("q1")
        net.client("q0")
        net.subscribe("q1", "t", 1)
        net.subscribe("q0", "t", 0)
        net.subscribe("pub", "t", 1)  # its own message comes after its PUBACK
        net.send(
            "pub",
            [
                c.Publish("t", b"m1", qos=1, packet_id=7),
                c.Publish("t", b"m2", qos=0),
                c.Publish("t", b"m3", qos=1, packet_id=8),
            ],
        )
        return 1

    got, counters, served = run_both(scenario, hub_reads=1)
    assert served == 3
    assert got["q1"] == (
        encode(c.Publish("t", b"m1", qos=1, packet_id=1), 4)
        + encode(c.Publish("t", b"m2"), 4)
        + encode(c.Publish("t", b"m3", qos=1, packet_id=2), 4)
    )
    assert got["q0"] == encode(c.Publish("t", b"m1"), 4) + encode(c.Publish("t", b"m2"), 4) + encode(
        c.Publish("t", b"m3"), 4
    )
    assert got["pub"] == (
        encode(c.Puback(7), 4)
        + encode(c.Publish("t", b"m1", qos=1, packet_id=1), 4)
        + encode(c.Publish("t", b"m2"), 4)
        + encode(c.Puback(8), 4)
        + encode(c.Publish("t", b"m3", qos=1, packet_id=2), 4)
    )
    assert counters["inflight"]["q1"] == [1, 2]


def test_mqtt5_no_local_and_no_subscribers_reason() -> None:
    def scenario(net: Net) -> int:
        net.client("pub", version=5)
        net.client("sub5", version=5)
        net.subscribe("pub", "t", 1, no_local=True)
        net.subscribe("sub5", "t", 1)
        net.send(
            "pub", [c.Publish("t", b"m", qos=1, packet_id=3), c.Publish("nobody", b"m", qos=1, packet_id=4)]
        )
        return 1

    got, _counters, served = run_both(scenario, hub_reads=1)
    assert served == 2
    assert got["sub5"] == encode(c.Publish("t", b"m", qos=1, packet_id=1), 5)
    # its own message is not sent back [MQTT-3.8.3-3]; no subscribers: 0x10 [MQTT 5.0 3.4.2.1]
    acks = c.Decoder(version=5).feed(got["pub"])
    assert [(a.type, a.packet_id, a.reason_code) for a in acks] == [(c.PUBACK, 3, 0), (c.PUBACK, 4, 0x10)]


def test_cases_left_to_the_python_path() -> None:
    def scenario(net: Net) -> int:
        net.client("pub")
        net.client("sub")
        net.subscribe("sub", "#", 1)
        net.subscribe("sub", "$share/g/s", 0)
        net.send(
            "pub",
            [
                c.Publish("r", b"retained", retain=True),  # retained store
                c.Publish("q2", b"x", qos=2, packet_id=9),  # QoS 2
                c.Publish("$SYS/x", b"x"),  # refused: $SYS belongs to the broker
                c.Publish("s", b"shared"),  # a shared group
            ],
        )
        return 1

    got, counters, served = run_both(scenario, hub_reads=0)
    assert served == 0
    assert counters["retained"] == 1
    assert encode(c.Publish("s", b"shared"), 4) in got["sub"]


def test_per_target_fallback_subscription_id_and_queued_session() -> None:
    def scenario(net: Net) -> int:
        net.client("pub")
        net.client("ids", version=5)
        queued = net.client("queued")
        net.client("fast")
        net.subscribe("ids", "t", 0, subscription_id=5)  # 5.0 subscription identifier: Python per target
        net.subscribe("queued", "t", 1)
        net.subscribe("fast", "t", 0)
        # A message waiting in the session queue: the new one must go behind it (Python per target).
        queued.session._enqueue(Message("t", b"waiting", 1), 1, False, None)
        net.send("pub", [c.Publish("t", b"m", qos=1, packet_id=2)])
        return 1

    got, _counters, served = run_both(scenario, hub_reads=1)
    assert served == 1
    assert got["fast"] == encode(c.Publish("t", b"m"), 4)
    assert got["ids"] == encode(c.Publish("t", b"m", properties={c.SUBSCRIPTION_IDENTIFIER: [5]}), 5)
    assert got["queued"] == (
        encode(c.Publish("t", b"waiting", qos=1, packet_id=1), 4)
        + encode(c.Publish("t", b"m", qos=1, packet_id=2), 4)
    )


def test_fast_path_serves_a_read_that_mixes_packets() -> None:
    """PUBLISHes around a SUBSCRIBE in one read: the SUBSCRIBE takes effect between them."""

    def scenario(net: Net) -> int:
        net.client("pub")
        net.client("sub")
        net.send(
            "pub",
            [
                c.Publish("t", b"before"),
                c.Subscribe(1, [c.Subscription("t", 0)]),
                c.Publish("t", b"after"),
                c.Pingreq(),
                c.Publish("t", b"again"),
            ],
        )
        return 1

    got, _counters, served = run_both(scenario, hub_reads=0)
    assert served == 3
    assert got["pub"] == (
        encode(c.Suback(1, [0]), 4)
        + encode(c.Publish("t", b"after"), 4)
        + b"\xd0\x00"
        + encode(c.Publish("t", b"again"), 4)
    )


def test_durable_queue_appends_are_served_in_c_and_the_rest_left_to_python() -> None:
    """A QoS 1 append to an existing local queue is appended by the fast path
    (``QueueManager.append_relayed``); a settlement, an unknown queue, a full queue, QoS 0 and
    QoS 2 go to the Python path. Same bytes (acks, deliveries) and counters either way."""
    from fluxmq.queues import QueueManager
    from fluxmq.queues.config import LimitsConfig, QueueConfig

    logs = []

    def scenario(net: Net) -> int:
        net.broker.queues = QueueManager(
            net.broker.storage, [QueueConfig("jobs"), QueueConfig("full", limits=LimitsConfig(max_depth=1))]
        )
        net.client("pub", version=5)  # (no consumer: its deliveries would follow the mark)
        settle = {c.USER_PROPERTY: [("message-id", "jobs:99"), ("group-id", "g")]}
        net.send(
            "pub",
            [
                c.Publish("$queue/jobs/a", b"1", qos=1, packet_id=1),  # fast
                c.Publish("$queue/jobs", b"2", qos=1, packet_id=2),  # fast
                c.Publish("$queue/jobs/$ack", b"", qos=1, packet_id=3, properties=settle),  # properties
                c.Publish("$queue/jobs/$nack", b"", qos=1, packet_id=4),  # a settlement
                c.Publish("$queue/new/a", b"3", qos=1, packet_id=5),  # not a queue yet: auto-created
                c.Publish("$queue/full/a", b"4", qos=1, packet_id=6),  # fast (room for one)
                c.Publish("$queue/full/a", b"5", qos=1, packet_id=7),  # full: refused (0x97)
                c.Publish("$queue/jobs/b", b"6", qos=0),  # QoS 0
                c.Publish("$queue/jobs/c", b"7", qos=2, packet_id=8),  # QoS 2
                c.Publish("$queue/jobs/d", b"8", qos=1, packet_id=9),  # fast: a run of three
                c.Publish("$queue/jobs/d", b"9", qos=1, packet_id=10),
                c.Publish("$queue/jobs/d", b"10", qos=1, packet_id=11),
            ],
        )
        return 1

    def appended(net: Net) -> dict:
        return {
            name: [
                (r.message.topic, r.message.payload, r.message.qos, r.message.origin)
                for r in q.log.read(0, 10)
            ]
            for name, q in net.broker.queues.queues.items()
        }

    got, counters, served = run_both(scenario, states=logs, state=appended)
    assert served == 6
    assert logs[0] == logs[1] == logs[2]
    assert [p for _t, p, _q, _o in logs[0]["jobs"]] == [b"1", b"2", b"6", b"7", b"8", b"9", b"10"]
    assert logs[0]["jobs"][0] == ("$queue/jobs/a", b"1", 1, "pub")
    assert len(logs[0]["full"]) == len(logs[0]["new"]) == 1
    acks = [p for p in c.Decoder(version=5).feed(got["pub"]) if p.type == c.PUBACK]
    assert [(a.packet_id, a.reason_code) for a in acks] == [
        (1, 0),
        (2, 0),
        (3, 0x10),
        (4, 0x10),
        (5, 0),
        (6, 0),
        (7, 0x97),
        (9, 0),
        (10, 0),
        (11, 0),
    ]


def test_pingreqs_between_publishes_are_answered_in_the_hub() -> None:
    def scenario(net: Net) -> int:
        net.client("pub")
        net.client("sub")
        net.subscribe("sub", "t", 0)
        net.send("pub", [c.Publish("t", b"1"), c.Pingreq(), c.Pingreq(), c.Publish("t", b"2")])
        return 1

    got, _counters, served = run_both(scenario, hub_reads=1)
    assert served == 2
    assert got["pub"] == b"\xd0\x00\xd0\x00"
    assert got["sub"] == encode(c.Publish("t", b"1"), 4) + encode(c.Publish("t", b"2"), 4)


@pytest.mark.parametrize("relay,hub", [(True, True), (True, False), (False, False)])
def test_a_malformed_packet_after_publishes_serves_them_then_closes(relay: bool, hub: bool) -> None:
    """The PUBLISHes decoded before a malformed packet in the same read are delivered, then the
    publisher's connection closes, whichever path read it [MQTT-4.8.0-1]."""
    RELAY.enabled = relay
    HUB_READS.enabled = hub
    net = Net()
    try:
        net.client("pub")
        net.client("sub")
        net.subscribe("sub", "t", 0)
        _, reader, sock = net.clients["pub"]
        # A PUBLISH whose topic holds a wildcard: malformed for a PUBLISH [MQTT-3.3.2-2].
        bad = bytes((0x30, 5, 0, 3)) + b"t/#"
        sock.sendall(encode(c.Publish("t", b"one"), 4) + encode(c.Publish("t", b"two"), 4) + bad)
        reader.join(timeout=10)
        assert reader.dead
        with gevent.Timeout(10):
            assert sock.recv(100) == b""  # closed, nothing written to it
        _, _, sub_sock = net.clients["sub"]
        want = encode(c.Publish("t", b"one"), 4) + encode(c.Publish("t", b"two"), 4)
        got = b""
        with gevent.Timeout(10):
            while len(got) < len(want):
                got += sub_sock.recv(100)
        assert got == want
    finally:
        net.close()


@pytest.fixture(autouse=True)
def _relay_on():
    yield
    connection_module.RELAY.enabled = True
    connection_module.HUB_READS.enabled = True


def test_pubacks_of_queue_deliveries_are_settled_in_c() -> None:
    """A consumer's PUBACKs of durable-queue deliveries (auto-ack) are settled by the fast path
    (no Python ``_on_puback``), and so is a PUBACK of an ordinary QoS 1 delivery in the same read.
    Either way the group ends in the same state and the consumer reads the same."""
    from fluxmq.queues import QueueManager
    from fluxmq.queues.config import QueueConfig

    python_acks = []
    original = connection_module._HANDLERS[c.PUBACK]

    def counted(conn, p):
        python_acks.append(p.packet_id)
        original(conn, p)

    outcomes = []
    connection_module._HANDLERS[c.PUBACK] = counted  # the connection's handler table
    try:
        for enabled in (True, False):
            RELAY.enabled = enabled
            python_acks.clear()
            net = Net()
            try:
                net.broker.queues = QueueManager(net.broker.storage, [QueueConfig("jobs")])
                cons = net.client("cons", version=5)
                net.subscribe(
                    "cons", "$queue/jobs", 1, user_properties=[("consumer-group", "g"), ("auto-ack", "true")]
                )
                net.subscribe("cons", "plain", 1)
                for i in range(3):
                    net.broker.publish(Message("$queue/jobs", f"q{i}".encode(), 1))
                net.broker.publish(Message("plain", b"p", 1))
                sock = net.clients["cons"][2]
                decoder = c.Decoder(version=5)
                got = []
                with gevent.Timeout(10):  # the end of the turn: the dispatch, then the flush
                    while len([p for p in got if p.type == c.PUBLISH and p.topic != MARK]) < 4:
                        got += decoder.feed(sock.recv(65536))
                delivered = {p.topic: p.packet_id for p in got if p.type == c.PUBLISH and p.topic != MARK}
                pids = [p.packet_id for p in got if p.type == c.PUBLISH and p.topic != MARK]
                net.send("cons", [c.Puback(pid) for pid in pids])
                data = net.read_all()["cons"]
                group = net.broker.queues.queue("jobs").groups["g"]
                outcomes.append(
                    (
                        group.floor,
                        sorted(group.pending),
                        sorted(cons.session.inflight),
                        data,
                        sorted(python_acks),
                        delivered["plain"],
                        sorted(pids),
                    )
                )
            finally:
                net.close()
    finally:
        RELAY.enabled = True
        connection_module._HANDLERS[c.PUBACK] = original
    fast, slow = outcomes
    assert fast[:4] == slow[:4] == (3, [], [], b"")
    assert slow[4] == slow[6] == [1, 2, 3, 4]  # every PUBACK through the Python handler
    assert fast[4] == []  # the ordinary delivery's too


def _read_phase(net: Net, decoders: dict, want: dict) -> dict:
    """Read each client's socket until it has ``(marks, publishes)`` more MARK and other PUBLISH
    packets (``want[cid]``); returns what each read, raw bytes (a persistent session's window and
    queue hold marks back until acknowledgements free it, so a phase names what must arrive)."""
    got = {}
    for cid, (marks, publishes) in want.items():
        _conn, _, sock = net.clients[cid]
        decoder = decoders[cid]
        data = b""
        m = k = 0
        with gevent.Timeout(10):
            while m < marks or k < publishes:
                chunk = sock.recv(65536)
                assert chunk, f"{cid}: closed"
                data += chunk
                for p in decoder.feed(chunk):
                    if p.type == c.PUBLISH:
                        if p.topic == MARK:
                            m += 1
                        else:
                            k += 1
        assert (m, k) == (marks, publishes), cid
        got[cid] = data
    return got


def _publishes(data: bytes, version: int) -> list:
    return [p for p in c.Decoder(version=version).feed(data) if p.type == c.PUBLISH and p.topic != MARK]


def test_persistent_sessions_qos1_deliveries_and_pubacks_are_served_in_c(tmp_path) -> None:
    """Persistent subscribers (3.1.1 clean session 0 and 5.0, over LMDB): a QoS 1 delivery sent at
    once is written to the client and stored as an in-flight queue entry by the fast path (no
    Python ``PersistentSession.deliver``), and the client's PUBACK of it is settled there (no Python
    ``_on_puback``); one behind a full window or a queue is queued there too (``QueueCore
    .append_plain``: only QoS 0 deliveries take the Python path), and the PUBACK that frees the
    window sends it on (``pump``). Every run puts the same bytes on every socket, leaves the same
    counters and, after a commit and a reopen, the same stored sessions."""
    from fluxmq.broker.session import PersistentSession

    python_acks = []
    python_delivers = []
    original_ack = connection_module._HANDLERS[c.PUBACK]
    original_deliver = PersistentSession.deliver

    def counted_ack(conn, p):
        python_acks.append((conn.client_id, p.packet_id))
        original_ack(conn, p)

    def counted_deliver(session, message, *args):
        python_delivers.append((session.client_id, message.payload))
        original_deliver(session, message, *args)

    # (sender, packets, what each client reads then: (marks, other PUBLISHes))
    phases = [
        (
            "pub",
            [c.Publish("t", b"m%d" % i, qos=1, packet_id=10 + i) for i in range(5)]
            + [c.Publish("t", b"zero"), c.Publish("z", b"q0", qos=1, packet_id=30)],
            # dur (window 3) and dur5 (window 2) queue the rest, the mark too
            {"pub": (1, 0), "mem": (1, 6), "dur": (0, 3), "dur5": (0, 2)},
        ),
        ("dur", [c.Puback(1), c.Puback(2)], {"dur": (2, 4), "mem": (1, 0), "pub": (1, 0)}),
        ("dur5", [c.Puback(2), c.Puback(1)], {"dur5": (0, 2), "mem": (1, 0), "dur": (1, 0)}),
        ("mem", [c.Puback(pid) for pid in range(1, 6)], {"mem": (1, 0), "dur": (1, 0), "pub": (2, 0)}),
        ("dur", [c.Puback(3), c.Puback(4), c.Puback(5)], {"dur": (1, 0), "mem": (1, 0), "pub": (1, 0)}),
        ("dur5", [c.Puback(3), c.Puback(4)], {"dur5": (6, 2), "mem": (1, 0), "dur": (1, 0), "pub": (1, 0)}),
        (
            "pub",
            [c.Publish("t", b"late%d" % i, qos=1, packet_id=40 + i) for i in range(2)],
            {"pub": (1, 0), "mem": (1, 2), "dur": (1, 2), "dur5": (0, 1)},  # dur5: late1 queued
        ),
    ]
    outcomes = []
    connection_module._HANDLERS[c.PUBACK] = counted_ack
    PersistentSession.deliver = counted_deliver
    try:
        for n, (relay, hub) in enumerate(((True, True), (True, False), (False, False))):
            RELAY.enabled = relay
            HUB_READS.enabled = hub
            python_acks.clear()
            python_delivers.clear()
            path = tmp_path / f"run{n}"
            store = LMDBStorage(path, map_size=16 << 20, verify=False)
            net = Net(storage=store)
            try:
                net.client("pub")
                net.client("dur", quota=3, clean=False)
                net.client("dur5", version=5, quota=2, clean=False)
                net.client("mem", expiry=0)  # a session that is not stored
                for cid in ("dur", "dur5", "mem"):
                    net.subscribe(cid, "t", 1)
                net.subscribe("dur", "z", 0)
                decoders = {cid: c.Decoder(version=conn.version) for cid, (conn, _, _) in net.clients.items()}
                got = []
                for sender, packets, want in phases:
                    net.send(sender, packets)
                    got.append(_read_phase(net, decoders, want))
                counters = net.counters()
                acks, delivers = sorted(python_acks), sorted(python_delivers)
            finally:
                net.close()
            store.commit()
            store.close()
            again = LMDBStorage(path, map_size=16 << 20, verify=False)
            try:
                loaded = again.load()
                stored = {
                    cid: (sorted(s.inflight.items()), s.queue.first, s.queue.next, s.queue.count)
                    for cid, s in loaded.sessions.items()
                }
                entries = {
                    cid: again.queue_read(cid, range(s.queue.first, s.queue.next))
                    for cid, s in loaded.sessions.items()
                }
            finally:
                again.close()
            outcomes.append((got, counters, stored, entries, acks, delivers))
    finally:
        RELAY.enabled = True
        HUB_READS.enabled = True
        connection_module._HANDLERS[c.PUBACK] = original_ack
        PersistentSession.deliver = original_deliver
    fast, reader, slow = outcomes
    for other in (reader, slow):
        assert fast[:4] == other[:4]
    got = fast[0]
    assert _publishes(got[0]["dur"], 4) == [
        c.Publish("t", b"m%d" % i, qos=1, packet_id=i + 1) for i in range(3)
    ]
    assert _publishes(got[1]["dur"], 4) == [
        c.Publish("t", b"m3", qos=1, packet_id=4),
        c.Publish("t", b"m4", qos=1, packet_id=5),
        c.Publish("t", b"zero"),
        c.Publish("z", b"q0"),
    ]
    assert _publishes(got[6]["dur"], 4) == [
        c.Publish("t", b"late%d" % i, qos=1, packet_id=i + 6) for i in range(2)
    ]
    assert _publishes(got[6]["dur5"], 5) == [c.Publish("t", b"late0", qos=1, packet_id=6)]
    stored = fast[2]
    assert [pid for pid, _ in stored["dur"][0]] == [6, 7]  # the late ones, unacknowledged
    assert [pid for pid, _ in stored["dur5"][0]] == [5, 6]
    assert stored["dur5"][3] == 2  # late1 and a mark queued
    # without the fast path every PUBACK and every delivery goes through Python
    assert len(slow[4]) == 5 + 4 + 5
    assert len({d for d in slow[5] if d[1] != b"end"}) == 9 + 8
    # with it: the PUBACKs are settled in C (the persistent sessions' and the in-memory one's)
    assert fast[4] == [] == reader[4]
    # and only deliveries that meet a full window or a queue (Python: queued) leave the fast path
    sent_at_once = {("dur", b"m0"), ("dur", b"m1"), ("dur", b"m2"), ("dur5", b"m0"), ("dur5", b"m1")}
    sent_at_once |= {("dur", b"late0"), ("dur", b"late1"), ("dur5", b"late0")}
    assert not sent_at_once & set(fast[5])
    # the QoS 1 ones queued behind a window are queued in C as well: Python sees QoS 0 only
    assert {payload for _, payload in fast[5]} == {b"end", b"zero", b"q0"}
    assert {("dur", b"m3"), ("dur", b"m4"), ("dur5", b"m2"), ("dur5", b"late1")} <= set(slow[5])


def test_a_persistent_queue_at_its_bound_is_left_to_the_python_path(tmp_path) -> None:
    """A persistent subscriber (window 1, queue bound 2 messages): of five QoS 1 messages in one
    read the first is sent at once, the next two are queued in C and the last two meet the full
    queue, which the Python path handles (dropped, counted as ``queue_full``, as is a QoS 0 mark). The bytes every
    client reads, the counters and the stored state after a reopen are those of the Python path."""
    from fluxmq.broker.session import PersistentSession, SessionLimits

    python_delivers = []
    original_deliver = PersistentSession.deliver

    def counted_deliver(session, message, *args):
        if session.client_id == "dur":
            python_delivers.append(message.payload)
        original_deliver(session, message, *args)

    outcomes = []
    PersistentSession.deliver = counted_deliver
    try:
        for n, relay in enumerate((True, False)):
            RELAY.enabled = relay
            python_delivers.clear()
            path = tmp_path / f"run{n}"
            store = LMDBStorage(path, map_size=16 << 20, verify=False)
            net = Net(storage=store)
            try:
                net.client("pub")
                dur = net.client("dur", quota=1, clean=False)
                dur.session.limits = SessionLimits(max_inflight=1, max_queued_messages=2)
                net.subscribe("dur", "t", 1)
                decoders = {cid: c.Decoder(version=4) for cid in net.clients}
                got = []
                net.send("pub", [c.Publish("t", b"m%d" % i, qos=1, packet_id=10 + i) for i in range(5)])
                got.append(_read_phase(net, decoders, {"pub": (1, 0), "dur": (0, 1)}))
                for pid, marks in ((1, 0), (2, 2)):  # (the marks queued behind m2 follow it)
                    net.send("dur", [c.Puback(pid)])
                    got.append(_read_phase(net, decoders, {"dur": (marks, 1), "pub": (1, 0)}))
                counters = net.counters()
                delivers = list(python_delivers)
            finally:
                net.close()
            store.commit()
            store.close()
            again = LMDBStorage(path, map_size=16 << 20, verify=False)
            try:
                s = again.load().sessions["dur"]
                stored = (sorted(s.inflight.items()), s.queue.first, s.queue.next, s.queue.count)
            finally:
                again.close()
            outcomes.append((got, counters, stored, delivers))
    finally:
        RELAY.enabled = True
        PersistentSession.deliver = original_deliver
    fast, slow = outcomes
    assert fast[:3] == slow[:3]
    assert [p.payload for phase in fast[0] for p in _publishes(phase["dur"], 4)] == [b"m0", b"m1", b"m2"]
    assert fast[1]["drops"].get("queue_full") == 3  # m3, m4 and the first mark
    # the full queue's and the marks that met a queue (the last one, sent at once, is served in C)
    assert fast[3] == [b"m3", b"m4", b"end", b"end"]
    assert slow[3] == [b"m%d" % i for i in range(5)] + [b"end"] * 3


def test_brokers_served_in_turn_each_get_their_own_routes_and_counters() -> None:
    """The relay reads a broker's counters, router and route cache once per broker: PUBLISHes to
    two brokers in one process, in turn, are routed by each one's subscriptions and counted in each
    one's stats (a relay that kept the first broker's objects would route and count the second's
    PUBLISHes in the first)."""
    a, b = Net(), Net()
    try:
        for net, name in ((a, "a"), (b, "b")):
            net.client("pub")
            net.client("sub")
            net.subscribe("sub", f"t/{name}", 0)
        served = RELAY.served
        for net, name in ((a, "a"), (b, "b"), (a, "a")):
            net.send("pub", [c.Publish(f"t/{name}", name.encode())])
            got = net.read_all()
            assert got["sub"] == encode(c.Publish(f"t/{name}", name.encode()), 4)
        assert RELAY.served - served == 6  # three PUBLISHes and three marks, all by the relay
        # a: 2 PUBLISHes + 2 marks received, to 1 + 2 (mark to both) clients each; b: half that
        assert a.broker.stats.received_qos[0] == 4 and b.broker.stats.received_qos[0] == 2
        assert a.broker.stats.sent_qos[0] == 2 + 2 * 2 and b.broker.stats.sent_qos[0] == 1 + 2
    finally:
        a.close()
        b.close()


def test_a_qos1_publish_stored_only_as_a_persistent_delivery_stakes_its_puback(tmp_path) -> None:
    """The publisher's PUBACK acknowledges a message stored for a persistent subscriber (sent at
    once by the fast path, recorded by the store's C table, not its own methods): the publisher is
    noted as a stake of the commit, so the PUBACK leaves only after it."""
    store = LMDBStorage(tmp_path / "data", map_size=16 << 20, verify=False)
    stakes = []
    note = store.note_stake

    def noted(client_id: str) -> None:
        stakes.append(client_id)
        note(client_id)

    store.note_stake = noted
    net = Net(storage=store)
    try:
        net.client("pub")
        net.client("dur", quota=10, clean=False)
        net.subscribe("dur", "t", 1)
        stakes.clear()
        decoders = {cid: c.Decoder(version=conn.version) for cid, (conn, _, _) in net.clients.items()}
        net.send("pub", [c.Publish("t", b"m", qos=1, packet_id=7)])
        got = _read_phase(net, decoders, {"pub": (1, 0), "dur": (1, 1)})
        assert _publishes(got["dur"], 4) == [c.Publish("t", b"m", qos=1, packet_id=1)]
        assert stakes == ["pub"]
    finally:
        net.close()
        store.close()


def test_a_persistent_session_takes_queue_bounds_past_what_the_c_fields_hold(tmp_path) -> None:
    """The relay reads a persistent session's queue bounds from C fields of its disk queue: a bound
    too large for them (a configuration's "as good as none") is kept as the largest they hold."""
    from fluxmq.broker.session import SessionLimits

    store = LMDBStorage(tmp_path / "d", map_size=16 << 20, verify=False)
    net = Net(storage=store)
    try:
        dur = net.client("dur", clean=False)
        dur.session.limits = SessionLimits(max_queued_messages=10**30, max_queued_bytes=10**30)
        assert dur.session.queue.max_count == dur.session.queue.max_bytes == 1 << 62
        assert dur.session.limits.max_queued_messages == 10**30
    finally:
        net.close()
        store.close()


def test_a_publishers_kept_route_follows_subscription_and_read_rule_changes() -> None:
    """The relay keeps each publisher's last route (``ConnState._relay_route``) across reads: it
    must go stale with the router's cache, on a subscription change (the trie's generation) and on
    a read-rule change (``Router.invalidate``: the router's epoch, even once another publisher's
    ``route`` renewed the cache), never delivering by an old one."""
    RELAY.enabled = HUB_READS.enabled = True
    net = Net()
    topic = "t/x"

    def lone(payload: bytes) -> dict[str, bytes]:
        """``pub`` publishes alone (its read holds no mark: its kept route stays ``topic``'s), then
        ``other`` sends the mark."""
        served = RELAY.served
        net.clients["pub"][2].sendall(encode(c.Publish(topic, payload), 4))
        with gevent.Timeout(10):
            while RELAY.served == served:
                gevent.sleep(0.001)
        net.send("other", [])
        return net.read_all()

    try:
        for cid in ("pub", "a", "b", "other"):
            net.client(cid)
        net.subscribe("a", "t/x", 0)
        got = lone(b"1")
        assert b"1" in got["a"] and got["b"] == b""
        net.subscribe("b", "t/#", 0)  # a new subscription: a new generation
        got = lone(b"2")
        assert b"2" in got["a"] and b"2" in got["b"]
        # a read rule that hides the topic from "a": the router's cache is invalidated, no trie change
        net.broker.router.read_filter = lambda session, t: session.client_id != "a" or t != topic
        net.broker.router.invalidate()
        net.send("other", [c.Publish("other/topic", b"o")])  # its route() renews the cache first
        net.read_all()
        got = lone(b"3")
        assert b"3" not in got["a"] and b"3" in got["b"]
    finally:
        net.close()


def _queues(net: Net) -> dict:
    """Each client's session queue: its payloads, ``queue_bytes``, what ``Session._enqueue`` counted
    for the messages in it, and ``queue_qos0``."""
    return {
        cid: (
            [item[0].payload for item in s.queue],
            s.queue_bytes,
            sum(len(item[0].payload) + len(item[0].topic) for item in s.queue),
            s.queue_qos0,
        )
        for cid, s in ((cid, conn.session) for cid, (conn, _, _) in net.clients.items())
    }


@contextlib.contextmanager
def _python_calls(session_class, noted):
    """Within it, what reaches the Python path: the PUBACKs the connection's handler serves
    (``(client_id, packet_id)``) and the ``session_class.deliver`` calls for which
    ``noted(session, message, qos)`` gives an entry (None: not noted); yields the two lists."""
    acks, delivers = [], []
    original_ack = connection_module._HANDLERS[c.PUBACK]
    original_deliver = session_class.deliver

    def counted_ack(conn, p):
        acks.append((conn.client_id, p.packet_id))
        original_ack(conn, p)

    def counted_deliver(session, message, qos, *args):
        entry = noted(session, message, qos)
        if entry is not None:
            delivers.append(entry)
        original_deliver(session, message, qos, *args)

    connection_module._HANDLERS[c.PUBACK] = counted_ack  # the connection's handler table
    session_class.deliver = counted_deliver
    try:
        yield acks, delivers
    finally:
        connection_module._HANDLERS[c.PUBACK] = original_ack
        session_class.deliver = original_deliver


def _run_three(session_class, noted, scenario) -> list:
    """``scenario(net)`` on a fresh ``Net`` with the fast path from the hub, from the reader and
    off, the Python path's calls noted (``_python_calls``); per run: (what the scenario returns, the
    counters, ``_queues``, the PUBACKs and the deliveries that reached Python). The first three must
    be the same in every run."""
    outcomes = []
    with _python_calls(session_class, noted) as (acks, delivers):
        try:
            for relay, hub in ((True, True), (True, False), (False, False)):
                RELAY.enabled = relay
                HUB_READS.enabled = hub
                acks.clear()
                delivers.clear()
                net = Net()
                try:
                    got = scenario(net)
                    outcomes.append((got, net.counters(), _queues(net), sorted(acks), list(delivers)))
                finally:
                    net.close()
        finally:
            RELAY.enabled = True
            HUB_READS.enabled = True
    for other in outcomes[1:]:
        assert outcomes[0][:3] == other[:3]
    return outcomes


def _noted_queued(session, message, qos):
    """A subscriber's delivery of anything but a mark."""
    return (
        (session.client_id, message.payload, qos)
        if session.client_id != "pub" and message.topic != MARK
        else None
    )


def _noted_qos1(session, message, qos):
    """A subscriber's QoS 1 delivery (the payload's first three bytes)."""
    return (session.client_id, message.payload[:3]) if qos and session.client_id != "pub" else None


def test_in_memory_sessions_queued_qos1_deliveries_and_pubacks_are_served_in_c() -> None:
    """Clean subscribers (3.1.1 window 3, 5.0 window 2, 5.0 window 1 with a subscription identifier):
    a QoS 1 delivery behind a full window is queued by the fast path (no Python ``Session.deliver``;
    a QoS 0 one, and any delivery while a QoS 0 one waits, takes the Python path), every PUBACK is
    settled there (no Python ``_on_puback``), and the window it frees sends the queue's head on in
    C up to a head it does not cover (QoS 0, subscription ids), from where ``Session.pump`` goes on:
    queued messages leave before newer ones, in order. Every run puts the same bytes on every socket
    and leaves the same counters, queues and ``queue_bytes``."""
    from fluxmq.broker.session import Session

    # (sender, packets, what each client reads then: (marks, other PUBLISHes)); marks (QoS 0) that
    # meet a queue wait in it and come out after what was queued before them
    phases = [
        (
            "pub",
            [c.Publish("t", b"m%d" % i, qos=1, packet_id=10 + i) for i in range(5)]
            + [c.Publish("t", b"zero")],
            {"pub": (1, 0), "mem": (0, 3), "mem5": (0, 2), "ids": (0, 1)},
        ),
        ("mem", [c.Puback(1), c.Puback(2)], {"mem": (2, 3), "pub": (1, 0)}),
        ("mem5", [c.Puback(2), c.Puback(1)], {"mem5": (0, 2), "mem": (1, 0), "pub": (1, 0)}),
        ("ids", [c.Puback(1)], {"ids": (0, 1), "mem": (1, 0), "pub": (1, 0)}),
        ("mem5", [c.Puback(3), c.Puback(4)], {"mem5": (5, 2), "mem": (1, 0), "pub": (1, 0)}),
        (
            "pub",
            [c.Publish("t", b"late%d" % i, qos=1, packet_id=40 + i) for i in range(2)],
            {"pub": (1, 0), "mem5": (0, 1)},  # mem's window is full: both queued
        ),
        ("mem", [c.Puback(3), c.Puback(4), c.Puback(5)], {"mem": (2, 2), "pub": (1, 0)}),
    ]

    def scenario(net: Net) -> list:
        net.client("pub")
        net.client("mem", quota=3)
        net.client("mem5", version=5, quota=2)
        net.client("ids", version=5, quota=1)
        for cid in ("mem", "mem5"):
            net.subscribe(cid, "t", 1)
        net.subscribe("ids", "t", 1, subscription_id=7)
        decoders = {cid: c.Decoder(version=conn.version) for cid, (conn, _, _) in net.clients.items()}
        got = []
        for sender, packets, want in phases:
            net.send(sender, packets)
            got.append(_read_phase(net, decoders, want))
        return got

    fast, reader, slow = _run_three(Session, _noted_queued, scenario)
    got, counters, queues = fast[:3]
    payloads = {
        cid: [p.payload for phase in got if cid in phase for p in _publishes(phase[cid], v)]
        for cid, v in (("mem", 4), ("mem5", 5), ("ids", 5))
    }
    assert payloads["mem"] == [b"m0", b"m1", b"m2", b"m3", b"m4", b"zero", b"late0", b"late1"]
    assert payloads["mem5"] == [b"m0", b"m1", b"m2", b"m3", b"m4", b"zero", b"late0"]
    assert payloads["ids"] == [b"m0", b"m1"]
    assert _publishes(got[6]["mem"], 4) == [
        c.Publish("t", b"late0", qos=1, packet_id=6),
        c.Publish("t", b"late1", qos=1, packet_id=7),
    ]
    assert _publishes(got[3]["ids"], 5) == [
        c.Publish("t", b"m1", qos=1, packet_id=2, properties={c.SUBSCRIPTION_IDENTIFIER: [7]})
    ]
    # what waits is counted as it is: mem5's late1 and two marks; ids' m2-m4, zero, marks, late0-1
    assert queues["mem"] == ([], 0, 0, 0)
    size = len(b"late1") + 1 + 2 * (3 + len(MARK))
    assert queues["mem5"] == ([b"late1", b"end", b"end"], size, size, 2)
    assert queues["ids"][0][:4] == [b"m2", b"m3", b"m4", b"zero"] and queues["ids"][1] == queues["ids"][2]
    assert counters["inflight"] == {"pub": [], "mem": [6, 7], "mem5": [5, 6], "ids": [2]}
    # without the fast path every PUBACK and every delivery goes through Python
    assert len(slow[3]) == 2 + 2 + 1 + 2 + 3
    assert len(slow[4]) == 3 * 6 + 2 * 3
    # with it: no PUBACK, and of the QoS 1 deliveries only those that meet a window with room and
    # a subscription identifier (ids' m0) or a queue holding a QoS 0 message (ids' late0-1)
    assert fast[3] == [] == reader[3]
    assert {(cid, payload) for cid, payload, qos in fast[4] if qos} == {
        ("ids", b"m0"),
        ("ids", b"late0"),
        ("ids", b"late1"),
    }
    assert fast[4] == reader[4]


@pytest.mark.parametrize("policy", ["drop_new", "drop_oldest"])
def test_in_memory_queue_cases_left_to_the_python_path(policy: str) -> None:
    """Clean subscribers behind a window of 1: what the fast path queues and pumps it leaves to the
    Python path where ``Session`` decides: a queue at its bound (the overflow policy: the new
    message, or the oldest, dropped as ``queue_full``), a queued head over a 5.0 client's Maximum
    Packet Size (dropped as ``packet_too_large`` when its turn comes) and an expired head (dropped as
    ``expired``); the messages behind them go on in order. The bytes every client reads, the counters
    and the queues are those of the Python path."""
    import time

    from fluxmq.broker.session import Session, SessionLimits

    # the marks that meet bound's full queue: dropped (drop_new), or queued at the oldest's cost
    bound_marks = (0, 0) if policy == "drop_new" else (2, 1)
    phases = [
        ("bound", {"bound": (bound_marks[0], 1), "pub": (1, 0)}),
        ("small", {"small": (0, 1), "bound": (bound_marks[1], 0), "pub": (1, 0)}),
        ("exp", {"exp": (0, 1), "bound": (bound_marks[1], 0), "pub": (1, 0)}),
    ]

    def scenario(net: Net) -> list:
        net.client("pub")
        bound = net.client("bound", quota=1)
        bound.session.limits = SessionLimits(max_inflight=1, max_queued_messages=2, queue_overflow=policy)
        small = net.client("small", version=5, quota=1)
        small._client_max_packet = 40  # the client's Maximum Packet Size
        net.client("exp", quota=1)
        for cid in ("bound", "small", "exp"):
            net.subscribe(cid, "t", 1)
        decoders = {cid: c.Decoder(version=conn.version) for cid, (conn, _, _) in net.clients.items()}
        net.send(
            "pub",
            [c.Publish("t", b"m0", qos=1, packet_id=1), c.Publish("t", b"big" * 20, qos=1, packet_id=2)]
            + [c.Publish("t", b"m%d" % i, qos=1, packet_id=2 + i) for i in (1, 2, 3)],
        )
        got = [_read_phase(net, decoders, {"pub": (1, 0), "bound": (0, 1), "small": (0, 1), "exp": (0, 1)})]
        queue = net.clients["exp"][0].session.queue  # its head (big) expires
        queue[0] = (queue[0][0].copy(expires_at=time.monotonic() - 1), *queue[0][1:])
        for sender, want in phases:
            net.send(sender, [c.Puback(1)])
            got.append(_read_phase(net, decoders, want))
        return got

    fast, reader, slow = _run_three(Session, _noted_qos1, scenario)
    got, counters, queues = fast[:3]
    second = {
        cid: [p.payload for p in _publishes(got[k + 1][cid], v)]
        for k, cid, v in ((0, "bound", 4), (1, "small", 5), (2, "exp", 4))
    }
    assert second == {
        "bound": [b"big" * 20 if policy == "drop_new" else b"m3"],
        "small": [b"m1"],
        "exp": [b"m1"],
    }
    drops = counters["drops"]
    assert (drops["packet_too_large"], drops["expired"]) == (1, 1)
    assert drops["queue_full"] == (2 + 3 if policy == "drop_new" else 1 + 2)  # m2, m3 / big, m1; and marks
    for s in queues.values():
        assert s[1] == s[2]
    # with the fast path only the deliveries that meet bound's full queue go through Session.deliver
    assert fast[4] == reader[4] == [("bound", b"m2"), ("bound", b"m3")]
    assert len(slow[4]) == 3 * 5
