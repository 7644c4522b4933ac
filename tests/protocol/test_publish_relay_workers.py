"""The C fast path (``fluxmq._core.relay``) across two workers: what ``test_publish_relay`` checks on
one broker, with the subscribers spread over two workers of one node.

Each worker is a real broker with its real ``WorkerNode`` (``fluxmq.cluster.workers``: ``WorkerPeers``,
``PeerLink``, the Unix-socket transport, the ownership table) in this process; clients are attached
over socket pairs and served by their readers, as in ``test_publish_relay``. Every scenario runs
with the fast path from the hub, from the reader, and off (every PUBLISH through
``MQTTConnection._on_publish``, ``ClusterPeers.forward``, ``decode_items`` and
``publish_from_peer``): each client must read the same bytes and each worker keep the same
counters. ``RELAY.served`` and ``RELAY.forwarded`` say which path handled the PUBLISHes on the
publishing worker and the forwarded messages on the receiving one.
"""

from __future__ import annotations

import dataclasses
import os
import time

import gevent
import pytest

from fluxmq._core import codec as c
from fluxmq.broker.message import Message
from fluxmq.cluster.workers import WorkerNode
from fluxmq.config.loader import load_config
from fluxmq.node.workers import WorkerContext
from fluxmq.protocol.connection import HUB_READS, RELAY
from fluxmq.storage.lmdb import LMDBStorage
from tests.protocol.frames import raw_publish
from tests.protocol.test_publish_relay import Net, encode


@dataclasses.dataclass
class Context(WorkerContext):
    """A worker's context whose sockets are in a directory shared by both workers while its
    ownership table is its own (one LMDB environment may be open once per process)."""

    sockets_dir: str = ""

    def socket_path(self, index: int) -> str:
        return os.path.join(self.sockets_dir, f"w{index}.sock")


class Workers:
    """Two workers (``w0``, ``w1``) of one node, each a ``Net``, linked by their WorkerNodes."""

    def __init__(self, tmp, lmdb: bool = False) -> None:
        """``lmdb``: each worker stores sessions in its own LMDB store (persistent sessions)."""
        config = load_config(env={}, overrides=["server.workers=2"])
        self.stores = (
            [LMDBStorage(tmp / f"db{i}", map_size=16 << 20, verify=False) for i in range(2)] if lmdb else []
        )
        self.nets = [Net(storage=store) for store in self.stores] or [Net(), Net()]
        self.nodes = []
        sockets = tmp / "sockets"
        sockets.mkdir(exist_ok=True)
        for i, net in enumerate(self.nets):
            net.broker.relay = RELAY
            run = tmp / f"run{i}"
            run.mkdir(exist_ok=True)
            self.nodes.append(
                WorkerNode(Context(i, 2, str(run), sockets_dir=str(sockets)), net.broker, config)
            )
        for node in self.nodes:
            node.start()
        deadline = time.monotonic() + 10
        while not all(n.transport.reachable() for n in self.nodes):
            assert time.monotonic() < deadline, "the workers' links did not come up"
            gevent.sleep(0.01)
        self.where: dict[str, int] = {}

    def client(self, client_id: str, worker: int, version: int = 4, **kw):
        self.where[client_id] = worker
        return self.nets[worker].client(client_id, version, **kw)

    def subscribe(self, client_id: str, filter: str, qos: int, **kw) -> None:
        self.nets[self.where[client_id]].subscribe(client_id, filter, qos, **kw)

    def send(self, client_id: str, packets: list) -> None:
        self.nets[self.where[client_id]].send(client_id, packets)

    def read_all(self) -> dict[str, bytes]:
        got = {}
        for net in self.nets:
            got.update(net.read_all())
        return got

    def counters(self) -> list[dict]:
        return [net.counters() for net in self.nets]

    def wait_acknowledged(self) -> None:
        """Until every batch between the workers is acknowledged: applied by its receiver."""
        deadline = time.monotonic() + 10
        while any(link.unacked for node in self.nodes for link in node.transport.links.values()):
            assert time.monotonic() < deadline, "a batch between the workers was not acknowledged"
            gevent.sleep(0.01)

    def close(self) -> None:
        for node in self.nodes:
            node.stop(0.5)
        for net in self.nets:
            net.close()
        for store in self.stores:
            store.close()


def run_three(tmp_path, scenario, lmdb: bool = False) -> tuple[list[dict], list, int, int]:
    """``scenario(workers)`` with the fast path from the hub, from the reader, and off; then reads
    what every client got up to the next mark (a scenario that reads itself returns its reads).
    Returns the reads and the counters of the first run, and how many PUBLISHes the relay served
    and how many forwarded messages it delivered in it (marks included)."""
    results = []
    served = forwarded = 0
    for n, (relay, hub) in enumerate(((True, True), (True, False), (False, False))):
        RELAY.enabled = relay
        HUB_READS.enabled = hub
        tmp = tmp_path / f"run{n}"
        tmp.mkdir()
        workers = Workers(tmp, lmdb)
        try:
            before, fwd_before = RELAY.served, RELAY.forwarded
            got = scenario(workers) or [workers.read_all()]
            if n == 0:
                served, forwarded = RELAY.served - before, RELAY.forwarded - fwd_before
            else:
                assert n == 1 or (RELAY.served, RELAY.forwarded) == (before, fwd_before)
            results.append((got, workers.counters()))
        finally:
            workers.close()
            RELAY.enabled = True
            HUB_READS.enabled = True
    (first_got, first_counters), *others = results
    for got, counters in others:
        assert got == first_got
        assert counters == first_counters
    return first_got, first_counters, served, forwarded


@pytest.fixture(autouse=True)
def _relay_on():
    yield
    RELAY.enabled = True
    HUB_READS.enabled = True


def test_fan_out_to_both_workers_is_forwarded_and_delivered_in_c(tmp_path) -> None:
    def scenario(w: Workers) -> None:
        w.client("pub", 0)
        w.client("local", 0)
        w.client("remote", 1)
        w.client("remote5", 1, version=5)
        w.client("wild", 1)
        w.client("other", 1)
        w.subscribe("local", "a/b", 1)
        w.subscribe("remote", "a/b", 1)
        w.subscribe("remote5", "a/+", 1)
        w.subscribe("wild", "a/#", 0)
        w.subscribe("other", "x/y", 0)  # must get nothing
        w.send(
            "pub",
            [
                c.Publish("a/b", b"one"),
                c.Publish("a/b", b"two", qos=1, packet_id=5),
                c.Publish("a/c", b"three", qos=1, packet_id=6),
                c.Publish("z", b"none"),
            ],
        )

    [got], counters, served, forwarded = run_three(tmp_path, scenario)
    assert served == 5  # and the mark
    # w1 wants a/b, a/c and the mark (not z): each forwarded once, however many subscribers there
    assert forwarded == 4
    assert got["local"] == encode(c.Publish("a/b", b"one"), 4) + encode(
        c.Publish("a/b", b"two", qos=1, packet_id=1), 4
    )
    assert got["remote"] == got["local"]
    assert got["remote5"] == (
        encode(c.Publish("a/b", b"one"), 5)
        + encode(c.Publish("a/b", b"two", qos=1, packet_id=1), 5)
        + encode(c.Publish("a/c", b"three", qos=1, packet_id=2), 5)
    )
    assert got["wild"] == (
        encode(c.Publish("a/b", b"one"), 4)
        + encode(c.Publish("a/b", b"two"), 4)
        + encode(c.Publish("a/c", b"three"), 4)
    )
    assert got["other"] == b""
    assert got["pub"] == encode(c.Puback(5), 4) + encode(c.Puback(6), 4)
    assert counters[0]["received"] == [3, 2, 0] and counters[1]["received"] == [0, 0, 0]
    assert counters[1]["inflight"]["remote5"] == [1, 2]


def test_fan_in_from_both_workers_reaches_one_subscriber_in_order(tmp_path) -> None:
    def scenario(w: Workers) -> list[dict]:
        w.client("sub", 0)
        w.client("near", 0)
        w.client("far", 1)
        w.subscribe("sub", "in/#", 1)
        w.send(
            "far", [c.Publish(f"in/{i}", f"far{i}".encode(), qos=i % 2, packet_id=i + 1) for i in range(20)]
        )
        first = w.read_all()
        w.send(
            "near", [c.Publish(f"in/{i}", f"near{i}".encode(), qos=i % 2, packet_id=i + 1) for i in range(20)]
        )
        return [first, w.read_all()]

    (first, second), _counters, served, forwarded = run_three(tmp_path, scenario)
    assert served == 42
    assert forwarded == 21 + 1  # far's 20 and its mark; near's mark to far's worker

    def want(name: str, first_pid: int) -> bytes:
        return b"".join(
            encode(
                c.Publish(
                    f"in/{i}", f"{name}{i}".encode(), qos=i % 2, packet_id=first_pid + i // 2 if i % 2 else 0
                ),
                4,
            )
            for i in range(20)
        )

    assert first["sub"] == want("far", 1)
    assert second["sub"] == want("near", 11)


def test_what_the_fast_path_leaves_keeps_its_place_between_workers(tmp_path) -> None:
    """Retained, QoS 2, 5.0 properties, a shared group with a member on the other worker and a
    message expiry go through ``ClusterPeers.forward`` and ``publish_from_peer``; the plain
    PUBLISHes around them in the same read still go through C on both sides, and the subscriber
    on the other worker reads all of them in the order they were published."""

    def scenario(w: Workers) -> None:
        w.client("pub", 0, version=5)
        w.client("sub", 1, version=5)
        w.client("member", 1)
        w.subscribe("sub", "t/#", 2)
        w.subscribe("member", "$share/g/s/#", 0)
        w.send(
            "pub",
            [
                c.Publish("t/1", b"plain"),
                c.Publish("t/r", b"retained", retain=True),
                c.Publish("t/2", b"plain"),
                c.Publish("t/q2", b"x", qos=2, packet_id=9),
                c.Publish("t/3", b"plain", qos=1, packet_id=10),
                c.Publish("t/p", b"props", properties={c.USER_PROPERTY: [("k", "v")]}),
                c.Publish("t/e", b"expiry", properties={c.MESSAGE_EXPIRY_INTERVAL: 60}),
                c.Publish("s/x", b"shared"),
                c.Publish("t/4", b"plain"),
            ],
        )

    [got], counters, served, forwarded = run_three(tmp_path, scenario)
    assert served == 4 + 1
    assert forwarded == 4 + 1
    packets = c.Decoder(version=5).feed(got["sub"])
    assert [(p.topic, p.payload) for p in packets if p.type == c.PUBLISH] == [
        ("t/1", b"plain"),
        ("t/r", b"retained"),
        ("t/2", b"plain"),
        ("t/q2", b"x"),
        ("t/3", b"plain"),
        ("t/p", b"props"),
        ("t/e", b"expiry"),
        ("t/4", b"plain"),
    ]
    assert got["member"] == encode(c.Publish("s/x", b"shared"), 4)
    assert counters[1]["retained"] == 1  # every worker keeps every retained message


def test_per_target_fallback_on_the_receiving_worker(tmp_path) -> None:
    """On the receiving worker a target the fast path cannot write (a subscription identifier, a
    session with messages queued) goes through ``Session.deliver`` per target, as on one broker."""

    def scenario(w: Workers) -> None:
        w.client("pub", 0)
        w.client("ids", 1, version=5)
        queued = w.client("queued", 1)
        w.client("fast", 1)
        w.subscribe("ids", "t", 0, subscription_id=5)
        w.subscribe("queued", "t", 1)
        w.subscribe("fast", "t", 0)
        queued.session._enqueue(Message("t", b"waiting", 1), 1, False, None)
        w.send("pub", [c.Publish("t", b"m", qos=1, packet_id=2)])

    [got], _counters, served, forwarded = run_three(tmp_path, scenario)
    assert served == 2 and forwarded == 2
    assert got["fast"] == encode(c.Publish("t", b"m"), 4)
    assert got["ids"] == encode(c.Publish("t", b"m", properties={c.SUBSCRIPTION_IDENTIFIER: [5]}), 5)
    assert got["queued"] == (
        encode(c.Publish("t", b"waiting", qos=1, packet_id=1), 4)
        + encode(c.Publish("t", b"m", qos=1, packet_id=2), 4)
    )


def test_forwarded_messages_are_written_from_the_batch_bytes_where_nothing_special_applies(
    tmp_path,
) -> None:
    """On the receiving worker a plain forwarded message is written into a ready subscriber's output
    straight from the batch's bytes (``RELAY.written_direct``: no payload or encoded PUBLISH made),
    at QoS 0 and 1, to 3.1.1 and 5.0 subscribers; a 5.0 subscriber's maximum packet size is checked
    against the frame's size (over it: the Python path drops it for that client); a subscriber over
    its high-water mark (then with messages queued behind it) and a persistent one go through
    ``Session.deliver``. Each run reads the same bytes and keeps the same counters (sent by QoS and
    bytes, drops, in-flight ids)."""
    written = []

    def scenario(w: Workers) -> list:
        before = RELAY.written_direct
        w.client("pub", 0, expiry=0)  # (expiry 0: a session that is not stored)
        w.client("s4", 1, expiry=0)
        w.client("s5", 1, version=5, expiry=0)
        small = w.client("small5", 1, version=5, expiry=0)
        high = w.client("high", 1, expiry=0)
        w.client("dur", 1, clean=False)
        for cid in ("s4", "s5", "small5", "high", "dur"):
            w.subscribe(cid, "t/#", 1)
        small._client_max_packet = 20  # a 5.0 CONNECT's Maximum Packet Size
        high._high = 0  # over its mark once anything waits in its output
        w.send(
            "pub",
            [
                c.Publish("t/a", b"zero"),
                c.Publish("t/a", b"one", qos=1, packet_id=1),
                c.Publish("t/b", b"x" * 40),
                c.Publish("t/b", b"two", qos=1, packet_id=2),
            ],
        )
        got = w.read_all()
        written.append(RELAY.written_direct - before)
        return [got]

    [got], counters, served, forwarded = run_three(tmp_path, scenario, lmdb=True)
    assert served == 5 and forwarded == 5  # the four and the mark, each forwarded once
    # s4, s5: all four and the mark; small5: all but the 40-byte payload's, and the mark; high: the
    # first (then queued behind its mark); dur: none (pub's own mark on w0 is the read's raw path's,
    # ``raw_served``, not a _fan_out write)
    assert written == [5 + 5 + 4 + 1, 5 + 5 + 4 + 1, 0]
    q0 = [c.Publish("t/a", b"zero"), c.Publish("t/b", b"x" * 40)]

    def want(version: int, first_pid: int = 1, big: bool = True) -> bytes:
        return b"".join(
            encode(p, version)
            for p in (
                q0[0],
                c.Publish("t/a", b"one", qos=1, packet_id=first_pid),
                *(q0[1:] if big else []),
                c.Publish("t/b", b"two", qos=1, packet_id=first_pid + 1),
            )
        )

    assert got["s4"] == want(4)
    assert got["s5"] == want(5)
    assert got["small5"] == want(5, big=False)
    assert got["high"] == want(4)
    assert got["dur"] == want(4)
    # five subscribers of each (small5's dropped one counted as publish_from_peer counts it)
    assert counters[1]["sent"] == [5 * 3, 5 * 2, 0]
    assert counters[1]["sent_bytes"] == [5 * (4 + 40 + len(b"end")), 5 * (3 + 3), 0]
    assert counters[1]["drops"] == {"packet_too_large": 1}
    assert counters[1]["inflight"] == {cid: [1, 2] for cid in ("s4", "s5", "small5", "high", "dur")}


def test_a_run_of_forwarded_messages_is_written_to_all_its_targets_at_once_until_one_is_not_ready(
    tmp_path,
) -> None:
    """While every target of a run of one topic takes the plain write (plain sessions, QoS 0
    deliveries, nothing queued, outputs within their mark and the message within a 5.0 client's
    maximum packet size), the receiving worker writes each message to all of them at once
    (``RELAY.written_routes``); a QoS 1 delivery, a message over a client's maximum packet size or
    an output over its mark sends that message (and, for the last two, the rest of the run) through
    the per-target fan-out, where each target that can still be written is (``written_direct``).
    Every run reads the same bytes and keeps the same counters."""
    written = []

    def counted(w: Workers, packets: list) -> dict:
        direct, routes = RELAY.written_direct, RELAY.written_routes
        w.send("pub", packets)
        got = w.read_all()
        written.append((RELAY.written_direct - direct, RELAY.written_routes - routes))
        return got

    def scenario(w: Workers) -> list:
        w.client("pub", 0)
        a = w.client("a", 1)
        b5 = w.client("b5", 1, version=5)
        w.subscribe("a", "r/#", 0)
        w.subscribe("b5", "r/#", 1)
        b5._client_max_packet = 60
        first = counted(
            w,
            [
                c.Publish("r/1", b"m1"),  # all at once
                c.Publish("r/1", b"m2"),  # all at once
                c.Publish("r/1", b"m3", qos=1, packet_id=1),  # b5 at QoS 1: per target
                c.Publish("r/1", b"m4"),  # all at once
                c.Publish("r/2", b"x" * 100),  # over b5's maximum: per target (b5's dropped)
                c.Publish("r/2", b"m6"),  # the rest of the run per target
            ],
        )  # (then the mark: all at once)
        a._high = 0  # over its mark once anything waits in its output
        second = counted(w, [c.Publish("r/3", b"n1"), c.Publish("r/3", b"n2"), c.Publish("r/3", b"n3")])
        return [first, second]

    (first, second), counters, _served, forwarded = run_three(tmp_path, scenario)
    assert forwarded == 6 + 1 + 3 + 1
    # (pub's own mark on w0 is the read's raw path's, ``raw_served``, not a direct write)
    fast = [(2 + 2 + 2 + 2 + 1 + 2 + 2, 4), (2 + 1 + 1 + 1, 1)]
    assert written == [*fast, *fast, (0, 0), (0, 0)]  # from the hub, from the reader, off
    small = [c.Publish("r/1", b"m1"), c.Publish("r/1", b"m2")]
    assert first["a"] == b"".join(
        encode(p, 4)
        for p in [*small, c.Publish("r/1", b"m3"), c.Publish("r/1", b"m4"), c.Publish("r/2", b"x" * 100)]
        + [c.Publish("r/2", b"m6")]
    )
    assert first["b5"] == b"".join(
        encode(p, 5)
        for p in [*small, c.Publish("r/1", b"m3", qos=1, packet_id=1), c.Publish("r/1", b"m4")]
        + [c.Publish("r/2", b"m6")]
    )
    n = [c.Publish("r/3", b"n1"), c.Publish("r/3", b"n2"), c.Publish("r/3", b"n3")]
    assert second["a"] == b"".join(encode(p, 4) for p in n)  # n2, n3 and the mark queued, then sent
    assert second["b5"] == b"".join(encode(p, 5) for p in n)
    assert counters[1]["drops"] == {"packet_too_large": 1}
    assert counters[1]["sent"] == [2 * 5 + 2 * 3 + 2 * 2 + 1, 1, 0]


def test_a_forwarded_topic_with_u0000_is_skipped_not_written(tmp_path) -> None:
    """A peer's item whose topic holds U+0000 (MQTT-1.5.4-2; no client's PUBLISH passes the decoder
    with one) is refused as ``encode_publish`` refused it before the frame was written from the
    batch's bytes: that item fails alone (``ForwardedItemFailed``), the rest is delivered."""
    from fluxmq.cluster.batch import Outgoing, build_batch
    from fluxmq.errors import ForwardedItemFailed
    from fluxmq.storage.records import encode_message

    net = Net()
    net.broker.relay = RELAY
    try:
        net.client("sub")
        net.subscribe("sub", "#", 0)
        messages = [Message("a", b"1"), Message("a\x00b", b"2"), Message("c", b"3")]
        items = build_batch("w0", 1, 1, [Outgoing(encode_message(m), (), True, None) for m in messages])[
            0
        ].items
        with pytest.raises(ForwardedItemFailed) as failed:
            net.broker.publish_relayed_from_peer(items, 0)
        assert failed.value.delivered == 1
        assert net.broker.publish_relayed_from_peer(items, failed.value.end) == (len(items), 1)
        want = encode(c.Publish("a", b"1"), 4) + encode(c.Publish("c", b"3"), 4)
        _conn, _, sock = net.clients["sub"]
        got = b""
        with gevent.Timeout(10):
            while len(got) < len(want):
                got += sock.recv(65536)
        assert got == want
    finally:
        net.close()


def run_three_raw(tmp_path, scenario) -> tuple[list, list, int]:
    """``run_three`` with what each run's scenario returns, plus the PUBLISHes the hub run framed
    for the other worker from the read's bytes (``RELAY.raw_forwarded``)."""
    raw = []

    def counted(w: Workers):
        before = RELAY.raw_forwarded
        got = scenario(w)
        raw.append(RELAY.raw_forwarded - before)
        return got

    got, counters, _served, _forwarded = run_three(tmp_path, counted)
    assert raw[2] == 0  # the fast path off
    return got, counters, raw[0]


def test_forward_only_publishes_are_framed_from_the_read_in_order(tmp_path) -> None:
    """A QoS 0 or 1 PUBLISH with nothing local to deliver to is framed for the other worker from the
    read's bytes (a plain local subscriber's copy written from them too); whatever it does not
    cover in the same read (retained, 5.0 properties, a "$" or non-ASCII topic) goes through the decoder and ``serve`` where it
    stands, and the rest of the read with it: the subscriber on the other worker reads everything in
    the order published, and each worker counts what it counted before."""

    def scenario(w: Workers) -> list:
        w.client("pub", 0)
        w.client("pub5", 0, version=5)
        w.client("near", 0)
        w.client("sub", 1)
        w.subscribe("near", "l/#", 0)
        w.subscribe("sub", "t/#", 1)
        w.subscribe("sub", "l/#", 1)
        w.send(
            "pub",
            [
                c.Publish("t/1", b"a"),
                c.Publish("t/1", b"b"),
                c.Publish("t/2", b"c" * 300),
                c.Publish("t/1", b"q1", qos=1, packet_id=3),
                c.Publish("t/1", b"d"),
                c.Publish("l/1", b"local"),
                c.Publish("t/1", b"e"),
                c.Publish("t/1", b"retained", retain=True),
                c.Publish("t/ü", b"utf8"),
                c.Publish("t/1", b"f"),
                c.Publish("nobody", b"dropped"),
                c.Publish("t/1", b"g"),
            ],
        )
        first = w.read_all()
        w.send(
            "pub5",
            [
                c.Publish("t/5", b"h"),
                c.Publish("t/5", b"props", properties={c.USER_PROPERTY: [("k", "v")]}),
                c.Publish("t/5", b"i"),
                c.Publish("t/5", b"expiry", properties={c.MESSAGE_EXPIRY_INTERVAL: 60}),
                c.Publish("t/5", b"j"),
            ],
        )
        second = w.read_all()
        return [first, second, [net.broker.stats.messages_received for net in w.nets]]

    (first, second, received), counters, raw = run_three_raw(tmp_path, scenario)
    # the run at the start of each read: t/1 a b, t/2 c, q1 (its PUBACK), d, l/1 (also written
    # into the local subscriber's output from the read), e (then the retained one); t/5 h (then
    # properties)
    assert raw == 8
    packets = c.Decoder(version=4).feed(first["sub"] + second["sub"])
    assert [(p.topic, p.payload) for p in packets] == [
        ("t/1", b"a"),
        ("t/1", b"b"),
        ("t/2", b"c" * 300),
        ("t/1", b"q1"),
        ("t/1", b"d"),
        ("l/1", b"local"),
        ("t/1", b"e"),
        ("t/1", b"retained"),
        ("t/ü", b"utf8"),
        ("t/1", b"f"),
        ("t/1", b"g"),
        ("t/5", b"h"),
        ("t/5", b"props"),
        ("t/5", b"i"),
        ("t/5", b"expiry"),
        ("t/5", b"j"),
    ]
    assert first["near"] == encode(c.Publish("l/1", b"local"), 4)
    assert counters[0]["received"][0] == 12 - 1 + 5 + 2  # (and the marks)


def test_a_packet_split_across_reads_is_framed_when_its_end_arrives(tmp_path) -> None:
    """Reads that end inside a packet (its fixed header, its Remaining Length, its topic, its
    payload): the decoder keeps the start, the next read completes it and the run goes on from
    there; nothing lost, nothing reordered, nothing counted twice."""
    payloads = [bytes([65 + i % 26]) * (i * 37 % 400) for i in range(40)]
    data = b"".join(
        encode(c.Publish(f"t/{i % 3}", p, qos=i % 2, packet_id=i + 1 if i % 2 else 0), 4)
        for i, p in enumerate(payloads)
    )
    cuts = [1, 2, 3, 7, 200, 201, 1000, 1003, len(data) - 2]

    def scenario(w: Workers) -> list:
        w.client("pub", 0)
        w.client("sub", 1)
        w.subscribe("sub", "t/#", 0)
        _conn, _, sock = w.nets[0].clients["pub"]
        at = 0
        for cut in [*cuts, len(data)]:
            sock.sendall(data[at:cut])
            at = cut
            gevent.sleep(0.02)  # its own read
        w.send("pub", [])
        return [w.read_all(), [net.broker.stats.messages_received for net in w.nets]]

    (got, received), _counters, raw = run_three_raw(tmp_path, scenario)
    assert raw == 40 + 1  # and the mark (to its local subscribers, written from the read too)
    assert got["sub"] == b"".join(encode(c.Publish(f"t/{i % 3}", p), 4) for i, p in enumerate(payloads))
    assert got["pub"] == b"".join(encode(c.Puback(i + 1), 4) for i in range(1, 40, 2))
    assert received[0] == 40 + 1 + 1  # the PUBLISHes, the mark and the PINGREQ of start-up


@pytest.mark.parametrize(
    "bad",
    [
        raw_publish(b"t/+", b"bad"),  # a wildcard in a topic name
        b"\x32\x09\x00\x03t/1\x00\x00ab",  # QoS 1 with packet identifier 0
    ],
)
def test_a_malformed_publish_in_a_forwarded_run_closes_as_before(tmp_path, bad) -> None:
    """A malformed PUBLISH after forward-only PUBLISHes of the same read: those before it reach
    the other worker, the connection is closed at it, and nothing after it is routed."""

    def scenario(w: Workers) -> list:
        w.client("pub", 0)
        w.client("sub", 1)
        w.subscribe("sub", "t/#", 0)
        conn, _, sock = w.nets[0].clients["pub"]
        sock.sendall(raw_publish(b"t/1", b"a") + bad + raw_publish(b"t/1", b"b"))
        with gevent.Timeout(10):
            while not conn.closed:
                gevent.sleep(0.01)
        w.nets[1].send("sub", [])  # a mark from the subscriber's own worker ends its read
        got = w.nets[1].read_all()
        # the mark also went to worker 0 (for the closed publisher): the counters once it is applied
        w.wait_acknowledged()
        return [got, [net.broker.stats.messages_received for net in w.nets]]

    (got, received), _counters, raw = run_three_raw(tmp_path, scenario)
    assert raw == 1 + 1  # and the subscriber's mark (to its own worker's subscribers)
    assert got["sub"] == encode(c.Publish("t/1", b"a"), 4)


def test_a_forwarded_qos1_publish_from_a_5_0_client_is_decoded(tmp_path) -> None:
    """A 5.0 client's QoS 1 PUBLISH with no local subscriber: its PUBACK carries a reason code
    (``serve``'s), so it is not framed from the read; the QoS 0 ones before it are."""

    def scenario(w: Workers) -> list:
        w.client("pub", 0, version=5)
        w.client("sub", 1, version=5)
        w.subscribe("sub", "t/#", 1)
        w.send(
            "pub",
            [c.Publish("t/1", b"a"), c.Publish("t/1", b"b", qos=1, packet_id=7), c.Publish("t/1", b"c")],
        )
        return [w.read_all()]

    [got], counters, raw = run_three_raw(tmp_path, scenario)
    assert raw == 1
    packets = c.Decoder(version=5).feed(got["sub"])
    assert [(p.payload, p.qos) for p in packets] == [(b"a", 0), (b"b", 1), (b"c", 0)]
    assert counters[0]["received"][:2] == [3, 1]


def test_a_topic_whose_shared_group_left_is_framed_from_the_read_again(tmp_path) -> None:
    """A topic found with a local shared group goes to the decoder at once on the next reads; once
    that group's member unsubscribes (the routes change) its PUBLISHes are framed from the read."""

    def scenario(w: Workers) -> list:
        w.client("pub", 0)
        near = w.client("near", 0)
        w.client("sub", 1)
        w.subscribe("near", "$share/g/t/#", 0)
        w.subscribe("sub", "t/#", 0)
        w.send("pub", [c.Publish("t/1", b"a")])
        first = w.read_all()
        w.send("pub", [c.Publish("t/1", b"b")])
        second = w.read_all()
        w.nets[0].broker.unsubscribe(near.session, "$share/g/t/#")
        w.send("pub", [c.Publish("t/1", b"c")])
        return [first, second, w.read_all()]

    (first, second, third), _counters, raw = run_three_raw(tmp_path, scenario)
    assert raw == 1 + 1  # c, and the mark after it (the marks after a and b: the decoder's)
    assert first["near"] == first["sub"] == encode(c.Publish("t/1", b"a"), 4)
    assert second["near"] == second["sub"] == encode(c.Publish("t/1", b"b"), 4)
    assert third["near"] == b"" and third["sub"] == encode(c.Publish("t/1", b"c"), 4)


def relay_nets():
    """``(True, net)`` then ``(False, net)``: a ``Net`` served with the relay on, then one with it
    off, each closed (and the relay on again) when the loop moves on."""
    for on in (True, False):
        RELAY.enabled = on
        net = Net()
        net.broker.relay = RELAY
        try:
            yield on, net
        finally:
            net.close()
            RELAY.enabled = True


class CountedRoutes(dict):
    """A peers' ``relay_routes`` that records each topic looked up in it (the relay's ``get``)."""

    def __init__(self) -> None:
        super().__init__()
        self.looked: list[str] = []

    def get(self, topic, default=None):
        self.looked.append(topic)
        return super().get(topic, default)


def count_link_reads(monkeypatch) -> list:
    """The ``ClusterPeers`` objects whose ``relay_links`` is read from now on (one entry per read)."""
    from fluxmq.cluster.peers import ClusterPeers

    reads: list = []
    relay_links = ClusterPeers.relay_links
    monkeypatch.setattr(
        ClusterPeers, "relay_links", property(lambda self: reads.append(self) or relay_links.fget(self))
    )
    return reads


def count_looks(peers) -> list[str]:
    """The topics the relay looks up in ``peers``' table from now on (the table is emptied)."""
    routes = peers.remote.plain_routes = peers.relay_routes = CountedRoutes()
    return routes.looked


def test_a_publisher_with_a_local_subscriber_skips_the_forward_set_up_after_another_topic(tmp_path) -> None:
    """Between workers each read of a publisher goes to the raw path first (``forward_raw``). A
    publisher whose topic has a subscriber on its own worker, read after another publisher's topic
    came in between, used to pay that path's whole set-up (the peers' tables, the topic's ``str``, the
    route: ~5,000 instructions) and then be decoded and served, so the tables were looked at twice
    per read. Now the raw path serves the read itself (one look per read, none in ``serve``); what
    everyone reads is unchanged."""
    w = Workers(tmp_path)
    try:
        looked = count_looks(w.nodes[0].peers)
        w.client("a", 0)
        w.client("b", 0)
        w.client("near", 0)
        w.subscribe("near", "a/#", 0)
        w.subscribe("near", "b/#", 0)

        def publish(client_id: str, topic: str, payload: bytes, readers: list[str]) -> None:
            net = w.nets[w.where[client_id]]
            net.clients[client_id][2].sendall(encode(c.Publish(topic, payload), 4))
            want = encode(c.Publish(topic, payload), 4)
            for reader in readers:
                sock = w.nets[w.where[reader]].clients[reader][2]
                got = b""
                with gevent.Timeout(10):
                    while len(got) < len(want):
                        got += sock.recv(65536)
                assert got == want

        publish("a", "a/1", b"first", ["near"])  # serve's route of a: a/1, with a local target
        publish("b", "b/1", b"other", ["near"])  # the relay's remembered topic is b/1 now
        del looked[:]
        publish("a", "a/1", b"again", ["near"])
        publish("a", "a/1", b"and again", ["near"])
        publish("b", "b/1", b"other again", ["near"])  # (b's own route: b/1, local target)
        # one look at the peer's table per read: the raw path's, which serves it (the worker's
        # peers have no interest in these topics)
        assert looked == ["a/1", "a/1", "b/1"]
    finally:
        w.close()


def test_a_read_its_local_subscriber_cannot_take_raw_skips_the_forward_set_up(tmp_path, monkeypatch) -> None:
    """A publisher whose last route has a local subscriber over its output's high-water mark: the raw
    path stops at the read's first PUBLISH (``_raw_ready`` says no) and the decoder and ``serve``
    take it. The raw path now checks the local targets with the route (the connection's own last
    one), before the peers' table: one look at that table per read (``serve``'s), not two; and the
    peers' links are not read at all (no peer wants the topic). Once the subscriber is below its
    mark again it gets every message in order."""
    links = count_link_reads(monkeypatch)
    w = Workers(tmp_path)
    try:
        looked = count_looks(w.nodes[0].peers)
        w.client("a", 0)
        near = w.client("near", 0)
        w.subscribe("near", "a/#", 0)
        pub = w.nets[0].clients["a"][2]
        sub = w.nets[0].clients["near"][2]
        sent = [encode(c.Publish("a/1", b"first"), 4)]
        pub.sendall(sent[0])  # the publisher's route: a/1, with a local target
        got = b""
        with gevent.Timeout(10):
            while len(got) < len(sent[0]):
                got += sub.recv(65536)
        high = near._high
        near._high = -1  # over its high-water mark whatever it holds
        served = RELAY.raw_served
        del looked[:]
        for i in range(3):
            sent.append(encode(c.Publish("a/1", b"over %d" % i), 4))
            pub.sendall(sent[-1])
            with gevent.Timeout(10):
                while w.nets[0].broker.stats.received_qos[0] < 2 + i:
                    gevent.sleep(0.01)
        assert looked == ["a/1"] * 3  # serve's
        assert RELAY.raw_served == served
        near._high = high
        for i in range(2):
            sent.append(encode(c.Publish("a/1", b"below %d" % i), 4))
            pub.sendall(sent[-1])
        want = b"".join(sent)
        with gevent.Timeout(10):
            while len(got) < len(want):
                got += sub.recv(65536)
        assert got == want
        assert links == []
    finally:
        w.close()


def test_the_peers_links_are_read_once_for_every_forwarded_read(tmp_path, monkeypatch) -> None:
    """Each read whose topic a peer wants needs the peers' links (node -> link, whose queue the
    relay appends to). ``ClusterPeers.relay_links`` is a Python property (~700 instructions per
    read); the relay now reads it once per peers object (its transport's dict, changed in place),
    not once per read. Every forwarded read still reaches the other worker, in order."""
    looks = count_link_reads(monkeypatch)
    w = Workers(tmp_path)
    try:
        w.client("pub", 0)
        w.client("sub", 1)
        w.subscribe("sub", "t/#", 0)
        pub = w.nets[0].clients["pub"][2]
        sub = w.nets[1].clients["sub"][2]
        raw = RELAY.raw_forwarded
        want = b""
        got = b""
        for i in range(4):
            frame = encode(c.Publish(f"t/{i % 2}", b"m%d" % i), 4)
            want += frame
            pub.sendall(frame)  # (each its own read: the subscriber gets it before the next)
            with gevent.Timeout(10):
                while len(got) < len(want):
                    got += sub.recv(65536)
        assert got == want
        assert RELAY.raw_forwarded - raw == 4
        assert looks == [w.nodes[0].peers]
    finally:
        w.close()


def test_a_batch_of_interleaved_topics_reuses_each_topics_route_and_decodes_origins_when_needed(
    tmp_path,
) -> None:
    """A fan-in's batch interleaves its publishers' topics. ``deliver_items`` keeps the topics it met
    in the call (their ``str`` and route, keyed by their bytes), so a topic met again is not decoded
    and looked up again (``RELAY.topics_reused``); an origin is decoded only for a target that needs
    a message object (a QoS 1 in-flight record here). What every subscriber gets, and the in-flight
    records' origins (one not ASCII), are those of the Python path (the relay off)."""
    from fluxmq.cluster.peers import ClusterPeers
    from tests.cluster.test_peers import StandInTransport, batch

    spec = [("a/1", "p1", 0), ("b/1", "p2", 0), ("a/1", "p1", 1), ("b/1", "\u00e9t\u00e9", 1)]
    spec += [("c/1", "p1", 0), ("a/1", "p2", 1), ("b/1", "p2", 0), ("a/1", "", 0)]
    messages = [Message(t, b"m%d" % i, q, origin=o) for i, (t, o, q) in enumerate(spec)]
    results = []
    for relay, net in relay_nets():
        net.client("all")
        net.client("q1")
        net.subscribe("all", "#", 0)
        net.subscribe("q1", "a/#", 1)
        net.subscribe("q1", "b/#", 1)
        peers = ClusterPeers("n1", net.broker, StandInTransport("n2"))
        reused, forwarded = RELAY.topics_reused, RELAY.forwarded
        peers.apply_batch(batch("n2", 1, 1, messages))
        if relay:
            assert RELAY.forwarded - forwarded == len(messages)  # all in C
            assert RELAY.topics_reused - reused == 5  # a/1 twice, b/1 twice, a/1 again
        else:
            assert RELAY.forwarded == forwarded
        net.send("all", [])  # (the mark reaches every client)
        inflight = net.clients["q1"][0].session.inflight
        origins = [(f.message.topic, f.message.payload, f.message.origin) for f in inflight.values()]
        results.append((net.read_all(), origins))
    assert results[0] == results[1]
    got, origins = results[0]
    assert got["all"] == b"".join(encode(c.Publish(m.topic, m.payload), 4) for m in messages)
    assert origins == [("a/1", b"m2", "p1"), ("b/1", b"m3", "\u00e9t\u00e9"), ("a/1", b"m5", "p2")]


def test_the_peers_topics_table_lasts_across_batches_until_the_subscriptions_change(tmp_path) -> None:
    """``deliver_items``' table of the peers' topics outlives a batch (a fan-in's batch holds each
    publisher's run once: the next batch meets the same topics), and is emptied when the
    subscriptions change: a subscriber added between two batches gets the second one's message."""
    from fluxmq.cluster.peers import ClusterPeers
    from tests.cluster.test_peers import StandInTransport, batch

    net = Net()
    net.broker.relay = RELAY
    try:
        net.client("old")
        net.client("late")
        net.subscribe("old", "t/#", 0)
        peers = ClusterPeers("n1", net.broker, StandInTransport("n2"))
        peers.apply_batch(batch("n2", 1, 1, [Message("t/1", b"1"), Message("t/2", b"2")]))
        reused = RELAY.topics_reused
        peers.apply_batch(batch("n2", 1, 2, [Message("t/1", b"3"), Message("t/2", b"4")]))
        assert RELAY.topics_reused - reused == 2  # both met in the batch before
        net.subscribe("late", "t/2", 0)
        reused = RELAY.topics_reused
        peers.apply_batch(batch("n2", 1, 3, [Message("t/1", b"5"), Message("t/2", b"6")]))
        assert RELAY.topics_reused == reused  # looked up again: the routes changed
        net.send("old", [])
        got = net.read_all()
        assert got["old"] == b"".join(encode(c.Publish(f"t/{2 - i % 2}", b"%d" % i), 4) for i in range(1, 7))
        assert got["late"] == encode(c.Publish("t/2", b"6"), 4)
    finally:
        net.close()


def publish_reads(w: Workers, frames: list[bytes], got: bytes, want: bytes) -> tuple[bytes, bytes]:
    """Each of ``frames`` sent by ``pub`` (worker 0) as its own read, read back by ``sub`` (worker 1)
    before the next is sent; returns what ``sub`` read so far and what it should have read."""
    pub = w.nets[0].clients["pub"][2]
    sub = w.nets[1].clients["sub"][2]
    for frame in frames:
        want += frame
        pub.sendall(frame)
        with gevent.Timeout(10):
            while len(got) < len(want):
                got += sub.recv(65536)
    return got, want


def test_a_forwarded_read_reuses_its_routes_peer_queues_until_the_links_change(tmp_path) -> None:
    """A fan-in read carries a few PUBLISHes, and the forward path made the list of the peers' queues
    (each link's ``forward_queue``) on every read (~650 instructions). The relay now keeps the list
    of the last peers' route it met while the transport's ``links_version`` is unchanged
    (``RELAY.queues_reused``). A link removed and added again (a new ``PeerLink``, a new queue)
    bumps the version: the next read finds the new link's queue, and its message arrives (the old
    queue's link is closed: a message appended there would never be sent)."""
    w = Workers(tmp_path)
    try:
        w.client("pub", 0)
        w.client("sub", 1)
        w.subscribe("sub", "t/#", 0)
        raw = RELAY.raw_forwarded
        reused = RELAY.queues_reused
        frames = [encode(c.Publish(f"t/{i % 2}", b"m%d" % i), 4) for i in range(4)]
        got, want = publish_reads(w, frames, b"", b"")
        assert RELAY.raw_forwarded - raw == 4
        assert RELAY.queues_reused - reused == 3  # the first read made the list; t/0, t/1: one peer

        transport = w.nodes[0].transport
        addrs = {node: link.addr for node, link in transport.links.items()}
        (node,) = addrs
        old = transport.links[node]
        transport._remove(node)
        transport.set_peers(addrs)
        assert transport.links[node] is not old
        deadline = time.monotonic() + 10
        while not transport.reachable():
            assert time.monotonic() < deadline, "the new link did not come up"
            gevent.sleep(0.01)
        reused = RELAY.queues_reused
        frames = [encode(c.Publish(f"t/{i % 2}", b"new %d" % i), 4) for i in range(3)]
        got, want = publish_reads(w, frames, got, want)
        assert got == want
        assert RELAY.raw_forwarded - raw == 7
        assert RELAY.queues_reused - reused == 2  # the list made again once, for the new link
        assert old.forward_queue.queued == 0
    finally:
        w.close()


def test_the_peers_routes_table_is_read_once_for_every_forwarded_read(tmp_path, monkeypatch) -> None:
    """Each forwarded read looks its topic up in the peers' ``relay_routes`` (topic -> the peers'
    ids). The relay read that attribute on every read (a ``getattr`` with a default, ~180
    instructions); it now reads it once per peers object (the table is emptied in place on every
    interest change, never replaced), like ``relay_links``. Every read still arrives."""
    from fluxmq.cluster.peers import ClusterPeers

    reads: list = []

    def get(self):
        reads.append(self)
        return self.__dict__["_relay_routes"]

    def put(self, table) -> None:
        self.__dict__["_relay_routes"] = table

    monkeypatch.setattr(ClusterPeers, "relay_routes", property(get, put), raising=False)
    w = Workers(tmp_path)
    try:
        w.client("pub", 0)
        w.client("sub", 1)
        w.subscribe("sub", "t/#", 0)
        raw = RELAY.raw_forwarded
        del reads[:]
        frames = [encode(c.Publish(f"t/{i % 2}", b"m%d" % i), 4) for i in range(4)]
        got, want = publish_reads(w, frames, b"", b"")
        assert got == want
        assert RELAY.raw_forwarded - raw == 4
        assert reads == [w.nodes[0].peers]
    finally:
        w.close()


def _deliver_batch(broker, items: bytes) -> None:
    """What ``ClusterPeers._apply`` does with a batch's items: the relay's C path while it takes
    them, the Python path (``decode_item``, ``publish_from_peer``) for each item it leaves."""
    from fluxmq.cluster.batch import decode_item

    i, end = 0, len(items)
    while i < end:
        i, _k = broker.publish_relayed_from_peer(items, i)
        if i < end:
            message, groups, match_local, i = decode_item(items, i, time.monotonic())
            broker.publish_from_peer(message, groups, match_local)


def test_a_run_of_forwarded_qos0_messages_is_written_a_block_at_a_time_exactly(tmp_path) -> None:
    """The receiving worker writes the QoS 0 items of a run (one topic, one origin) to its ready
    targets a block at a time (``RELAY.written_blocks``: one resize of each output for up to 64
    messages), checking each message against each output's high-water mark and a 5.0 client's
    maximum packet size as it did one message at a time: a message over the 5.0 subscriber's
    maximum is dropped for it alone and the rest of the run goes per target, as does the rest of a
    run after an output over its mark (queued behind it, then sent); a new origin or an item of
    another shape (QoS 1) ends a block. Every client reads the same bytes and the broker keeps the same counters as with the
    relay off (every item through ``publish_from_peer``)."""
    from fluxmq.cluster.batch import Outgoing, build_batch
    from fluxmq.storage.records import encode_message

    messages = [Message("t/a", b"a%03d" % k, origin="p1") for k in range(150)]  # blocks 64, 64, 22
    # blocks of 5 around a QoS 1 item (to QoS 0 subscriptions: written alone, _write_direct)
    messages += [Message("t/a", b"b%d" % k, origin="p2") for k in range(5)]
    messages += [Message("t/a", b"q", qos=1, origin="p2")]
    messages += [Message("t/a", b"b%d" % k, origin="p2") for k in range(5, 10)]
    messages += [Message("t/c", b"c0"), Message("t/c", b"x" * 80)]  # a block of 1 (then over s5's maximum)
    messages += [Message("t/c", b"c%d" % k) for k in range(2, 5)]  # per target
    messages += [Message("t/b", b"d%d" % k) for k in range(5)]  # a block of 1 (high over its mark)
    items = build_batch("w0", 1, 1, [Outgoing(encode_message(m), (), True, None) for m in messages])[0].items
    results = []
    for _on, net in relay_nets():
        net.client("pub")
        net.client("s4")
        net.client("s4b")  # (a second 3.1.1 output: copies s4's frames)
        s5 = net.client("s5", version=5)
        high = net.client("high")
        net.subscribe("s4", "t/#", 0)
        net.subscribe("s4b", "t/#", 0)
        net.subscribe("s5", "t/#", 0)
        net.subscribe("high", "t/b", 0)
        s5._client_max_packet = 60
        high._high = 0  # over its mark once anything waits in its output
        blocks, routes = RELAY.written_blocks, RELAY.written_routes
        _deliver_batch(net.broker, items)
        written = (RELAY.written_blocks - blocks, RELAY.written_routes - routes)
        net.send("pub", [])
        results.append((net.read_all(), net.counters(), written))
    (got, counters, written), (got_off, counters_off, written_off) = results
    assert got == got_off and counters == counters_off
    assert written == (3 + 2 + 1 + 1, 150 + 11 + 1 + 1)
    assert written_off == (0, 0)
    assert got["s4"] == got["s4b"] == b"".join(encode(c.Publish(m.topic, m.payload), 4) for m in messages)
    assert got["s5"] == b"".join(
        encode(c.Publish(m.topic, m.payload), 5) for m in messages if len(m.payload) < 80
    )
    assert got["high"] == b"".join(encode(c.Publish(m.topic, m.payload), 4) for m in messages[-5:])
    assert counters["drops"] == {"packet_too_large": 1}
    # (the one dropped for s5 counted as publish_from_peer counts it; the five clients' marks)
    assert counters["sent"] == [len(messages) * 3 + 5 + 5, 0, 0]


def test_a_forwarded_run_between_two_workers_is_written_in_blocks(tmp_path) -> None:
    """A publisher's run of QoS 0 PUBLISHes on one worker reaches the other worker's 3.1.1 and 5.0
    subscribers written a block at a time there (``RELAY.written_blocks``; the second 3.1.1 output
    copies the first's frames), with the same bytes and counters as with the fast path from the
    reader and off."""
    written = []

    def scenario(w: Workers) -> list:
        w.client("pub", 0)
        w.client("s4", 1)
        w.client("s4b", 1)
        w.client("s5", 1, version=5)
        w.subscribe("s4", "f/#", 0)
        w.subscribe("s4b", "f/#", 0)
        w.subscribe("s5", "f/#", 0)
        blocks, routes = RELAY.written_blocks, RELAY.written_routes
        w.send("pub", [c.Publish("f/1", b"m%d" % k) for k in range(100)])
        got = w.read_all()
        written.append((RELAY.written_blocks - blocks, RELAY.written_routes - routes))
        return [got]

    [got], counters, _served, forwarded = run_three(tmp_path, scenario)
    assert forwarded == 100 + 1
    # from the hub, from the reader: 100 in blocks of 64 at most (a batch may end inside the run), the mark
    for blocks, routes in written[:2]:
        assert 3 <= blocks <= routes and routes == 101
    assert written[2] == (0, 0)
    want = [c.Publish("f/1", b"m%d" % k) for k in range(100)]
    assert got["s4"] == got["s4b"] == b"".join(encode(p, 4) for p in want)
    assert got["s5"] == b"".join(encode(p, 5) for p in want)
    assert counters[1]["sent"] == [3 * 100 + 3, 0, 0]  # (and the marks of s4, s4b and s5)


def _read_to_mark(w: Workers, cid: str) -> bytes:
    """What client ``cid`` read up to (and without) the next mark."""
    return w.nets[w.where[cid]].read_to_mark(cid)


def _available(sock) -> bytes:
    """What the socket holds now (after one turn of the loop)."""
    gevent.sleep(0.005)
    data = b""
    timeout = sock.gettimeout()
    sock.settimeout(0.0)  # (gevent's recv waits for data otherwise)
    try:
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except BlockingIOError:
                return data
            if not chunk:
                return data
            data += chunk
    finally:
        sock.settimeout(timeout)


def _in_order(data: bytes, parts: list[bytes]) -> bool:
    """Each of ``parts`` found in ``data``, one after the other."""
    at = 0
    for part in parts:
        at = data.find(part, at)
        if at < 0:
            return False
        at += len(part)
    return True


def test_what_a_worker_keeps_of_large_batches_survives_their_bytes_being_reused(
    tmp_path, monkeypatch
) -> None:
    """Batches over ``LARGE_FRAME`` are received into ``bytes`` that later batches are received into
    again once nothing holds them (``fluxmq._core.framebuf``). What the receiving worker keeps of a
    batch must be its own copy: QoS 1 messages in flight and queued for a client that does not
    acknowledge (the relay's stored path, and ``publish_from_peer``'s), a retained message (stored
    by every worker) and a 5.0 message's properties; checked after later batches reused the
    allocation, with the fast path from the hub, from the reader and off."""
    import fluxmq.cluster.unix as unix

    readers: list = []

    class Recorded(unix.FrameReader):
        __slots__ = ()

        def __init__(self, sock) -> None:
            super().__init__(sock)
            readers.append(self)

    monkeypatch.setattr(unix, "FrameReader", Recorded)
    size = unix.LARGE_FRAME + 4000  # (one message: a batch over LARGE_FRAME)

    def payload(r: int, k: int) -> bytes:
        return bytes([1 + 4 * r + k]) * size

    for n, (relay, hub) in enumerate(((True, True), (True, False), (False, False))):
        RELAY.enabled = relay
        HUB_READS.enabled = hub
        readers.clear()
        tmp = tmp_path / f"run{n}"
        tmp.mkdir()
        w = Workers(tmp)
        try:
            w.client("slow", 1, quota=2)  # never acknowledges until the end: in flight, then queued
            w.subscribe("slow", "big/#", 1)
            w.client("v5", 1, version=5)
            w.subscribe("v5", "big/#", 1)
            w.client("p", 0, version=5)
            got: dict[str, bytes] = {"slow": b"", "v5": b""}
            qos1: list[bytes] = []
            for r in range(6):
                packets = [
                    c.Publish(f"big/{r}", payload(r, 0), qos=1, packet_id=2 * r + 1),  # plain
                    c.Publish(
                        f"big/{r}/p",
                        payload(r, 1),
                        qos=1,
                        packet_id=2 * r + 2,
                        retain=r == 2,
                        properties={c.USER_PROPERTY: [("round", f"r{r}")]},
                    ),
                    c.Publish(f"big/{r}/0", payload(r, 2)),  # QoS 0
                ]
                qos1 += [payload(r, 0), payload(r, 1)]
                w.send("p", packets)
                w.wait_acknowledged()
                got["v5"] += _read_to_mark(w, "v5")  # ("slow": its mark waits behind its queue)
            on_w1 = [rd for rd in readers if rd.frames.allocated]
            reused = sum(rd.frames.reused for rd in on_w1)
            assert on_w1 and reused >= 3, (
                relay,
                hub,
                [(rd.frames.allocated, rd.frames.kept()) for rd in on_w1],
            )
            # the 5.0 subscriber: every message, its properties
            assert _in_order(
                got["v5"], [p for r in range(6) for p in (payload(r, 0), payload(r, 1), payload(r, 2))]
            )
            assert all(f"r{r}".encode() in got["v5"] for r in range(6))
            # the retained message every worker stores
            kept = w.nets[1].broker.retained.get("big/2/p")
            assert kept is not None and kept.payload == payload(2, 1)
            assert kept.properties.get(c.USER_PROPERTY) == [("round", "r2")]
            # the slow client: two in flight, the rest queued while later batches arrived; now it
            # acknowledges them one at a time and reads what was kept
            conn, _, sock = w.nets[1].clients["slow"]
            session = conn.session
            assert len(session.inflight) == 2 and len(session.queue) >= len(qos1) - 2
            with gevent.Timeout(20):
                while session.inflight:
                    pid = min(session.inflight)
                    entry = session.inflight[pid]
                    sock.sendall(encode(c.Puback(pid), 4))
                    while session.inflight.get(pid) is entry:
                        got["slow"] += _available(sock)
                while not _in_order(got["slow"], qos1):
                    got["slow"] += _available(sock)
            assert all(got["slow"].count(p) == 1 for p in qos1)
        finally:
            w.close()
            RELAY.enabled = True
            HUB_READS.enabled = True
