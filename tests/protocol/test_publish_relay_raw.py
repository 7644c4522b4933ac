"""The relay's raw path (``PublishRelay._forward_buf``): a read's plain QoS 0 PUBLISHes written
into ready local subscribers' output straight from the read's bytes, no ``Publish`` decoded.

Each scenario runs as in ``test_publish_relay`` (the fast path from the hub, from the reader,
off): every run must put the same bytes on every socket and leave the same counters.
``RELAY.raw_served`` says how many PUBLISHes the raw path consumed in each run, so a case it must
cover fails if it fell back and a case it must leave to the decoder fails if it did not.
"""

from __future__ import annotations

import gevent
import pytest

from fluxmq._core import codec as c
from fluxmq.broker.broker import Broker
from fluxmq.broker.stats import LATENCY_SAMPLE_MASK
from fluxmq.protocol.connection import HUB_READS, RELAY
from fluxmq.storage.lmdb import LMDBStorage
from tests.protocol.frames import raw_publish
from tests.protocol.test_publish_relay import MARK, Net, encode, run_both


def stats(net: Net) -> tuple:
    """What $SYS and /metrics report of the traffic (beside ``Net.counters``' per-QoS figures)."""
    st = net.broker.stats
    return (st.messages_received, st.messages_sent, st.bytes_received, st.bytes_sent)


def run_raw(scenario, hub_reads: int | None = None, extra=None):
    """``run_both`` with the PUBLISHes the raw path consumed in each run (hub, reader, off) and
    ``stats`` (and ``extra(net)``) of each run, which must be the same in all three."""
    before: list[int] = []
    states: list = []

    def counted(net: Net) -> int:
        before.append(RELAY.raw_served)
        return scenario(net)

    def state(net: Net):
        return (RELAY.raw_served, stats(net), extra(net) if extra is not None else None)

    got, counters, served = run_both(counted, hub_reads=hub_reads, states=states, state=state)
    raw = [after - b for b, (after, _, _) in zip(before, states, strict=True)]
    assert states[0][1:] == states[1][1:] == states[2][1:]
    return got, counters, raw, states[0][2]


def test_qos0_runs_reach_31_311_and_50_subscribers_from_the_read() -> None:
    """3.1.1 and 5.0 publishers, subscribers of 3.1, 3.1.1 and 5.0: each gets the frame of its own
    version (the 3.x frame without the 5.0 property byte, and with it), Remaining Lengths of one
    and two bytes on either side of 127, an empty payload; the counters are exact."""
    payloads = [b"", b"x", b"y" * 121, b"z" * 122, b"w" * 123, b"v" * 400]

    def scenario(net: Net) -> int:
        net.client("pub4")
        net.client("pub5", version=5)
        for cid, version in (("s3", 3), ("s4", 4), ("s5", 5)):
            net.client(cid, version=version)
            net.subscribe(cid, "t/#", 0)
        net.send("pub4", [c.Publish("t/4", p) for p in payloads])
        net.send("pub5", [c.Publish("t/5", p) for p in payloads])
        return 2  # the marks

    got, counters, raw, _ = run_raw(scenario, hub_reads=2)
    assert raw == [2 * len(payloads) + 2, 2 * len(payloads) + 2, 0]
    for cid, version in (("s3", 4), ("s4", 4), ("s5", 5)):
        want = {encode(c.Publish(t, p), version) for t in ("t/4", "t/5") for p in payloads}
        packets = [p for p in c.Decoder(version=version).feed(got[cid]) if p.topic != MARK]
        assert len(packets) == 2 * len(payloads)
        assert {encode(p, version) for p in packets} == want
        # in order within each publisher's run
        assert got[cid].find(encode(c.Publish("t/4", b"x"), version)) < got[cid].find(
            encode(c.Publish("t/4", b"v" * 400), version)
        )
    assert counters["sent"][0] == 3 * 2 * len(payloads) + 2 * 5  # and the marks to five clients
    assert counters["sent_bytes"][0] == 3 * 2 * sum(map(len, payloads)) + 2 * 5 * 3
    assert counters["received"][0] == 2 * len(payloads) + 2


def test_no_local_is_kept_on_the_raw_path() -> None:
    """A 5.0 publisher subscribed with No Local to what it publishes does not get it back
    [MQTT-3.8.3-3]; the other subscriber does, from the read."""

    def scenario(net: Net) -> int:
        net.client("pub", version=5)
        net.client("sub", version=4)
        net.subscribe("pub", "t", 0, no_local=True)
        net.subscribe("sub", "t", 0)
        net.send("pub", [c.Publish("t", b"one"), c.Publish("t", b"two")])
        return 1

    got, counters, raw, _ = run_raw(scenario, hub_reads=1)
    assert raw == [3, 3, 0]
    assert got["pub"] == b""
    assert got["sub"] == encode(c.Publish("t", b"one"), 4) + encode(c.Publish("t", b"two"), 4)
    assert counters["sent"][0] == 2 + 2


def test_what_a_subscriber_cannot_take_from_the_read_goes_to_serve() -> None:
    """The run stops, before any effect, at a message with a target the raw path does not write:
    a subscriber over its output's high-water mark (queued by ``Session.deliver``), a 5.0 one with
    a subscription identifier or a Maximum Packet Size the message exceeds; QoS 1 to a local
    subscriber, a retained message. The rest of the read follows in order through the decoder."""

    def scenario(net: Net) -> int:
        net.client("pub")
        net.client("fast")
        slow = net.client("slow")
        net.client("ids", version=5)
        small = net.client("small", version=5)
        small._client_max_packet = 20
        net.subscribe("fast", "#", 0)
        net.subscribe("slow", "slow", 0)
        net.subscribe("ids", "ids", 0, subscription_id=3)
        net.subscribe("small", "small", 0)
        net.subscribe("fast", "$share/g/shared", 0)
        net.slow = (slow, net.clients.pop("slow"))  # it never reads: out of read_all
        slow._high = -1  # over its high-water mark
        net.send(
            "pub",
            [
                c.Publish("a", b"1"),
                c.Publish("slow", b"2"),  # the run stops here; the rest is the decoder's
                c.Publish("a", b"3"),
            ],
        )
        return 1

    def slow_state(net: Net):
        slow, (_conn, reader, sock) = net.slow
        queued = len(slow.session.queue)
        sock.close()
        reader.join(timeout=5)
        return queued

    got, _counters, raw, queued = run_raw(scenario, hub_reads=1, extra=slow_state)
    assert raw == [1, 1, 0]
    assert queued == 2  # "2" and the mark, queued behind the congestion
    assert got["fast"] == b"".join(
        encode(c.Publish(t, p), 4) for t, p in (("a", b"1"), ("slow", b"2"), ("a", b"3"))
    )


@pytest.mark.parametrize(
    "first,served,hub_reads",
    [
        (c.Publish("ids", b"x" * 10), 0, 1),  # a subscription identifier
        (c.Publish("small", b"x" * 20), 0, 1),  # over the 5.0 client's Maximum Packet Size: dropped for it
        (c.Publish("small", b"x"), 1 + 1, 1),  # within it (and the mark)
        (c.Publish("shared", b"x"), 0, 0),  # a shared group (the reader's)
        (c.Publish("a", b"x", qos=1, packet_id=5), 0, 1),  # QoS 1 with a local subscriber
        (c.Publish("a", b"x", retain=True), 0, 0),  # retained (the reader's)
    ],
)
def test_targets_and_packets_left_to_serve(first, served: int, hub_reads: int) -> None:
    def scenario(net: Net) -> int:
        net.client("pub")
        net.client("fast")
        net.client("ids", version=5)
        small = net.client("small", version=5)
        small._client_max_packet = 20
        net.subscribe("fast", "#", 0)
        net.subscribe("ids", "ids", 0, subscription_id=3)
        net.subscribe("small", "small", 0)
        net.subscribe("fast", "$share/g/shared", 0)
        net.send("pub", [first])
        return 1

    got, counters, raw, _ = run_raw(scenario, hub_reads=hub_reads)
    assert raw == [served, served, 0]
    assert encode(c.Publish(first.topic, first.payload), 4) in got["fast"]


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize(
    "bad,reason",
    [
        (b"t/+", 0x90),  # a wildcard in a topic name [MQTT-3.3.2-2]: Topic Name invalid
        (b"t/\xff", 0x81),  # ill-formed UTF-8 [MQTT-1.5.4-1]: Malformed Packet
        (b"t/\x00", 0x81),  # U+0000 [MQTT-1.5.4-2]
        (b"t/\xed\xa0\x80", 0x81),  # an encoded surrogate
    ],
)
def test_a_bad_topic_in_a_raw_run_closes_with_the_decoders_reason(
    version: int, bad: bytes, reason: int
) -> None:
    """The PUBLISHes before it are delivered from the read, the bad one goes to the decoder, which
    closes the connection as it always did (5.0: a DISCONNECT with its reason code), and nothing
    after it is routed."""
    results = []
    for relay, hub in ((True, True), (True, False), (False, False)):
        RELAY.enabled = relay
        HUB_READS.enabled = hub
        net = Net()
        try:
            net.client("pub", version=version)
            net.client("sub")
            net.subscribe("sub", "t/#", 0)
            before = RELAY.raw_served
            _conn, reader, sock = net.clients["pub"]
            sock.sendall(
                raw_publish(b"t/1", b"a", version)
                + raw_publish(bad, b"bad", version)
                + raw_publish(b"t/1", b"b", version)
            )
            reader.join(timeout=10)
            assert reader.dead
            closed = b""
            with gevent.Timeout(10):
                while chunk := sock.recv(100):
                    closed += chunk
            del net.clients["pub"]
            net.send("sub", [])  # the subscriber's own mark ends what it reads
            got = net.read_all()["sub"]
            results.append((closed, got, stats(net), RELAY.raw_served - before))
        finally:
            RELAY.enabled = True
            HUB_READS.enabled = True
            net.close()
    closed, got, _stats, raw = results[0]
    assert [r[:3] for r in results] == [results[0][:3]] * 3
    # "a" (the mark after: also to the closed publisher's session, the Python path's)
    assert [r[3] for r in results] == [1, 1, 0]
    assert got == encode(c.Publish("t/1", b"a"), 4)
    if version == 5:
        assert [(type(p), p.reason_code) for p in c.Decoder(version=5).feed(closed)] == [
            (c.Disconnect, reason)
        ]
    else:
        assert closed == b""


class RecordingLoop:
    """A gevent loop that records the functions of the callbacks registered with it."""

    def __init__(self, loop, registered: list) -> None:
        self._loop = loop
        self._registered = registered

    def run_callback(self, fn, *args):
        self._registered.append(fn)
        return self._loop.run_callback(fn, *args)

    def __getattr__(self, name):
        return getattr(self._loop, name)


@pytest.mark.parametrize("hub", [True, False], ids=["raw-from-hub", "serve-from-reader"])
def test_a_sampled_publish_is_observed_without_python_code(monkeypatch, hub: bool) -> None:
    """1 publish in 64 is timed for the latency histogram. On the relay's paths (the raw one from
    the hub, ``serve`` from the reader) the flush scheduler observes it in C after its writes: the
    Python ``Broker._observe_latency`` (whose interpreter code is cold when no other message runs
    any: ~26 us more for that message, bench/RESULTS.md) is not called, no loop callback is
    registered for it (~5 us more: its set-up), and the histogram still counts each sample once."""
    calls: list[float] = []
    monkeypatch.setattr(Broker, "_observe_latency", lambda self, started: calls.append(started))
    HUB_READS.enabled = hub
    try:
        net = Net()
        registered: list = []
        net.flusher._loop = RecordingLoop(net.flusher._loop, registered)
        net.client("pub")
        net.client("sub")
        net.subscribe("sub", "t", 0)
        st = net.broker.stats
        before = st.received_qos[0]
        raw_before, served_before = RELAY.raw_served, RELAY.served
        n = 2 * (LATENCY_SAMPLE_MASK + 1)
        net.send("pub", [c.Publish("t", b"%d" % i) for i in range(n)])
        got = net.read_all()
        gevent.sleep(0)  # the loop callbacks of the samples
        assert len(c.Decoder(version=4).feed(got["sub"])) == n
        if hub:
            assert RELAY.raw_served - raw_before == n + 1  # and the mark
        else:
            assert RELAY.served - served_before == n + 1
        samples = sum(1 for k in range(before + 1, before + n + 2) if not k & LATENCY_SAMPLE_MASK)
        assert calls == []
        assert registered and all(fn == net.flusher._flush for fn in registered)  # flushes only
        assert net.flusher.pending_samples == 0
        assert sum(st.latency_counts) == samples >= 2
        assert 0 < st.latency_sum < 10
        net.close()
    finally:
        HUB_READS.enabled = True


@pytest.mark.parametrize("sync", [None, "batch", "always"], ids=["memory", "lmdb-batch", "lmdb-always"])
def test_a_sampled_publish_with_no_subscriber_is_observed_once(tmp_path, sync: str | None) -> None:
    """A sampled publish that matches nothing marks no connection: noting its sample schedules the
    flush that observes it (after the commit, with a durable storage), and each sample is counted
    once."""
    store = None
    if sync is not None:
        store = LMDBStorage(tmp_path / "data", map_size=16 << 20, sync=sync, verify=False)
    net = Net(storage=store)
    try:
        net.client("pub")
        st = net.broker.stats
        before = st.received_qos[0]
        counted = sum(st.latency_counts)
        n = 2 * (LATENCY_SAMPLE_MASK + 1)
        net.send("pub", [c.Publish("nobody", b"%d" % i) for i in range(n)])  # and the mark
        with gevent.Timeout(10):
            while st.received_qos[0] - before < n + 1:
                gevent.sleep(0.001)
        gevent.sleep(0)  # the flush after the read
        samples = sum(1 for k in range(before + 1, before + n + 2) if not k & LATENCY_SAMPLE_MASK)
        assert st.received_qos[0] - before == n + 1
        assert net.flusher.pending_samples == 0
        assert sum(st.latency_counts) - counted == samples >= 2
    finally:
        net.close()
