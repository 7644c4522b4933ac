"""fluxmq.coap.bridge with a real Broker (memory or LMDB) and a transport that records datagrams.

No sockets: the bridge is transport-independent, so these drive ``CoapBridge.datagram`` directly and
read what it would have sent. gevent runs the notifier and commit-wait greenlets.
"""

from __future__ import annotations

import time
from pathlib import Path

import gevent
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.broker.message import Message
from fluxmq.coap import codec
from fluxmq.coap.bridge import CON_EVERY, EXCHANGE_LIFETIME, MAX_REPRESENTATIONS_PER_PEER, CoapBridge
from fluxmq.coap.codec import CoapMessage
from fluxmq.coap.settings import CoapSettings
from fluxmq.protocol.flush import FlushScheduler
from fluxmq.storage.lmdb import LMDBStorage

MiB = 1 << 20
PEER = ("192.0.2.1", 5683)


class RecordingTransport:
    """A transport that keeps what the bridge sends; ``on_send`` sees each datagram as it goes."""

    name = "test"

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, object]] = []
        self.on_send = None

    def sendto(self, data: bytes, peer: object) -> None:
        if self.on_send is not None:
            self.on_send(data)
        self.sent.append((data, peer))

    def messages(self) -> list[CoapMessage]:
        return [codec.parse(d) for d, _ in self.sent]

    def take(self) -> list[CoapMessage]:
        out = self.messages()
        self.sent.clear()
        return out


def req(
    mtype: int,
    method: int,
    mid: int,
    path: str,
    query: tuple[str, ...] = (),
    payload: bytes = b"",
    token: bytes = b"t1",
    extra: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    options = [(codec.URI_PATH, p.encode()) for p in path.split("/")] if path else []
    options += [(codec.URI_QUERY, q.encode()) for q in query]
    return codec.serialize(CoapMessage(mtype, method, mid, token, options + list(extra), payload))


@pytest.fixture
def bridge() -> CoapBridge:
    b = CoapBridge(Broker(BrokerSettings()), CoapSettings())
    b.start()
    yield b
    b.stop()


def settle() -> None:
    for _ in range(5):
        gevent.sleep(0)


# -- acknowledged means stored ------------------------------------------------------------------------


def test_qos1_publish_is_answered_only_after_the_commit_holding_it(tmp_path: Path) -> None:
    """A 2.04 for a QoS 1 publish leaves after the LMDB commit that holds the (retained) message."""
    store = LMDBStorage(tmp_path / "data", map_size=64 * MiB, sync="batch")
    FlushScheduler(store)
    b = CoapBridge(Broker(BrokerSettings(), store), CoapSettings())
    t = RecordingTransport()
    committed_when_answered: list[bool] = []

    def on_send(data: bytes) -> None:
        with store.env.begin() as txn:
            committed_when_answered.append(txn.get(b"kept/1", db=store._dbs[6]) is not None)

    t.on_send = on_send
    try:
        b.datagram(req(codec.CON, codec.POST, 1, "kept/1", ("qos=1", "retain=true"), b"v"), PEER, t)
        assert store.has_pending
        deadline = 100
        while not t.sent and deadline:
            gevent.sleep(0.01)
            deadline -= 1
        (answer,) = t.messages()
        assert (answer.mtype, answer.code, answer.mid) == (codec.ACK, codec.CHANGED, 1)
        assert committed_when_answered == [True]
    finally:
        b.stop()
        store.close()


def test_a_failed_commit_is_answered_5_03_not_2_04(tmp_path: Path) -> None:
    from tests.storage.test_lmdb import FailingStorage

    store = FailingStorage(tmp_path / "data", map_size=64 * MiB)
    FlushScheduler(store)
    b = CoapBridge(Broker(BrokerSettings(), store), CoapSettings())
    t = RecordingTransport()
    try:
        store.fail = 1000  # every commit (and retry) fails while the answer waits
        b.datagram(req(codec.CON, codec.POST, 1, "kept/1", ("qos=1", "retain=true"), b"v"), PEER, t)
        for _ in range(300):
            if t.sent:
                break
            gevent.sleep(0.01)
        assert [m.code for m in t.messages()] == [codec.SERVICE_UNAVAILABLE]
    finally:
        store.fail = 0
        b.stop()
        store.close()


def test_duplicate_con_while_waiting_for_the_commit_is_answered_once(tmp_path: Path) -> None:
    """RFC 7252 §4.5: the retransmission is recognised; one publish, one answer (then the cached one)."""
    store = LMDBStorage(tmp_path / "data", map_size=64 * MiB, sync="batch")
    FlushScheduler(store)
    broker = Broker(BrokerSettings(), store)
    b = CoapBridge(broker, CoapSettings())
    t = RecordingTransport()
    try:
        data = req(codec.CON, codec.POST, 9, "dup/1", ("qos=1", "retain=true"), b"v")
        b.datagram(data, PEER, t)
        b.datagram(data, PEER, t)  # before the commit: ignored
        for _ in range(300):
            if t.sent:
                break
            gevent.sleep(0.01)
        b.datagram(data, PEER, t)  # after: the cached answer again
        assert [m.code for m in t.messages()] == [codec.CHANGED, codec.CHANGED]
        assert broker.stats.received_qos[1] == 1
        assert b.retransmissions == 2
    finally:
        b.stop()
        store.close()


# -- observe -----------------------------------------------------------------------------------------


def observe(b: CoapBridge, t: RecordingTransport, path: str, token: bytes = b"ob", mid: int = 100) -> None:
    b.datagram(req(codec.CON, codec.GET, mid, path, token=token, extra=((codec.OBSERVE, b""),)), PEER, t)
    settle()  # (answered from the pool once subscribed: the wait for peers never holds the reader)
    (first,) = t.take()
    assert first.code == codec.CONTENT and first.option(codec.OBSERVE) is not None


def test_notifications_are_con_every_24_and_while_a_con_is_unanswered(bridge: CoapBridge) -> None:
    """RFC 7641 §4.5: a CON at least every 24 notifications; the one after an unanswered CON is CON."""
    t = RecordingTransport()
    observe(bridge, t, "s/1")
    bridge.broker.publish(Message("s/1", b"first"))
    settle()
    (first,) = t.take()
    assert first.mtype == codec.CON  # an unverified observer's first notification
    bridge.datagram(codec.empty(codec.ACK, first.mid), PEER, t)
    for i in range(CON_EVERY):
        bridge.broker.publish(Message("s/1", str(i).encode()))
    settle()
    notes = t.take()
    assert [n.mtype for n in notes] == [codec.NON] * (CON_EVERY - 1) + [codec.CON]
    numbers = [codec.decode_uint(n.option(codec.OBSERVE)) for n in notes]
    assert numbers == sorted(numbers)
    bridge.broker.publish(Message("s/1", b"next"))
    settle()
    (after_unanswered,) = t.take()
    assert after_unanswered.mtype == codec.CON  # the previous CON went unanswered
    bridge.datagram(codec.empty(codec.ACK, after_unanswered.mid), PEER, t)
    bridge.broker.publish(Message("s/1", b"acked"))
    settle()
    assert [n.mtype for n in t.take()] == [codec.NON]


def test_rst_and_observe_1_end_the_observation_and_its_session(bridge: CoapBridge) -> None:
    t = RecordingTransport()
    observe(bridge, t, "s/2", b"a")
    observe(bridge, t, "s/2", b"b", mid=101)
    assert len(bridge.observations) == 2 and bridge.broker.session_count() == 2
    bridge.broker.publish(Message("s/2", b"x"))
    settle()
    notes = {n.token: n for n in t.take()}
    bridge.datagram(codec.empty(codec.RST, notes[b"a"].mid), PEER, t)  # RFC 7641 §3.6
    assert len(bridge.observations) == 1
    bridge.datagram(
        req(codec.CON, codec.GET, 102, "s/2", token=b"b", extra=((codec.OBSERVE, b"\x01"),)), PEER, t
    )
    assert bridge.observations == {} and bridge.broker.session_count() == 0
    assert [m.code for m in t.take()] == [codec.NOT_FOUND]  # answered as a plain GET (nothing retained)


def test_an_unacknowledged_con_notification_ends_the_observation() -> None:
    """RFC 7641 §4.5: a CON that exhausts MAX_RETRANSMIT means the client is gone."""
    b = CoapBridge(Broker(BrokerSettings()), CoapSettings(ack_timeout=0.02, max_retransmit=2))
    b.start()
    t = RecordingTransport()
    try:
        observe(b, t, "s/3")
        for i in range(CON_EVERY):
            b.broker.publish(Message("s/3", b"%d" % i))
        for _ in range(200):
            if not b.observations:
                break
            gevent.sleep(0.02)
        assert b.observations == {} and b.broker.session_count() == 0
        cons = [m for m in t.messages() if m.mtype == codec.CON]
        assert len(cons) == 3 and len({m.mid for m in cons}) == 1  # first send and 2 retransmissions
    finally:
        b.stop()


def test_observations_are_bounded_per_peer_and_in_total() -> None:
    b = CoapBridge(Broker(BrokerSettings()), CoapSettings(max_observations=3, max_observations_per_peer=2))
    t = RecordingTransport()
    observe(b, t, "a", b"1", 1)
    observe(b, t, "a", b"2", 2)
    b.datagram(req(codec.CON, codec.GET, 3, "a", token=b"3", extra=((codec.OBSERVE, b""),)), PEER, t)
    assert t.take()[0].code == codec.SERVICE_UNAVAILABLE
    other = ("192.0.2.2", 5683)
    b.datagram(req(codec.CON, codec.GET, 4, "a", token=b"4", extra=((codec.OBSERVE, b""),)), other, t)
    b.datagram(req(codec.CON, codec.GET, 5, "a", token=b"5", extra=((codec.OBSERVE, b""),)), other, t)
    settle()  # (the refusal is answered at once, the registration once subscribed)
    assert sorted(m.code for m in t.take()) == sorted([codec.CONTENT, codec.SERVICE_UNAVAILABLE])
    assert len(b.observations) == 3 and b.broker.session_count() == 3
    b.stop()


def test_a_slow_observer_queue_drops_the_oldest() -> None:
    b = CoapBridge(Broker(BrokerSettings()), CoapSettings(observe_queue_size=5))
    t = RecordingTransport()
    observe(b, t, "q")
    for i in range(20):  # the notifier has not run: everything queues
        b.broker.publish(Message("q", b"%d" % i))
    (obs,) = b.observations.values()
    assert [m.payload for m in obs.queue] == [b"15", b"16", b"17", b"18", b"19"]
    assert obs.dropped == 15 and b.broker.stats.drops["coap_queue_full"] == 15
    b.stop()


# -- abuse -------------------------------------------------------------------------------------------


def test_unverified_answers_stay_within_the_amplification_bound(bridge: CoapBridge) -> None:
    bridge.broker.publish(Message("big", b"z" * 5000, 0, True))
    t = RecordingTransport()
    data = req(codec.CON, codec.GET, 1, "big")
    bridge.datagram(data, PEER, t)
    ((sent, _),) = t.sent
    assert len(sent) <= 3 * len(data)
    # the client follows with Block2 requests and gets the whole body, each answer bounded too
    body = bytearray(codec.parse(sent).payload)
    num, more, szx = codec.decode_block(codec.parse(sent).option(codec.BLOCK2))
    mid = 2
    while more:
        t.sent.clear()
        data = req(
            codec.CON, codec.GET, mid, "big", extra=((codec.BLOCK2, codec.encode_block(num + 1, False, szx)),)
        )
        bridge.datagram(data, PEER, t)
        ((sent, _),) = t.sent
        assert len(sent) <= 3 * len(data)
        answer = codec.parse(sent)
        num, more, szx = codec.decode_block(answer.option(codec.BLOCK2))
        body += answer.payload
        mid += 1
    assert bytes(body) == b"z" * 5000


def test_requests_over_the_per_ip_rate_get_4_29() -> None:
    b = CoapBridge(Broker(BrokerSettings()), CoapSettings(request_rate=1.0, request_burst=3))
    t = RecordingTransport()
    for mid in range(5):
        b.datagram(req(codec.CON, codec.GET, mid, "health"), ("192.0.2.9", 1000 + mid), t)
    assert [m.code for m in t.messages()] == [codec.CONTENT] * 3 + [codec.TOO_MANY_REQUESTS] * 2
    b.datagram(req(codec.NON, codec.GET, 99, "health"), ("192.0.2.9", 1), t)
    assert len(t.sent) == 5 and b.dropped["rate_limited"] == 3  # a NON over the rate is dropped


def test_block1_reassembly_is_bounded_per_peer() -> None:
    b = CoapBridge(Broker(BrokerSettings()), CoapSettings(max_reassembly_bytes=2048))
    t = RecordingTransport()
    for num in range(2):  # two 1 KiB blocks are held
        b.datagram(
            req(
                codec.CON,
                codec.POST,
                num,
                "r",
                payload=b"x" * 1024,
                extra=((codec.BLOCK1, codec.encode_block(num, True, 6)),),
            ),
            PEER,
            t,
        )
    b.datagram(
        req(
            codec.CON,
            codec.POST,
            5,
            "r",
            payload=b"x" * 1024,
            extra=((codec.BLOCK1, codec.encode_block(2, True, 6)),),
        ),
        PEER,
        t,
    )
    assert [m.code for m in t.messages()] == [codec.CONTINUE, codec.CONTINUE, codec.REQUEST_ENTITY_TOO_LARGE]
    assert ("test", PEER) not in b.reassembly and b.reassembly.bytes == 0
    b.datagram(
        req(
            codec.CON,
            codec.POST,
            6,
            "r",
            payload=b"x" * 10,
            extra=((codec.BLOCK1, codec.encode_block(3, False, 6)),),
        ),
        PEER,
        t,
    )
    assert t.messages()[-1].code == codec.REQUEST_ENTITY_INCOMPLETE  # RFC 7959 §2.9.2


def block1(mid: int, num: int, more: bool, payload: bytes = b"x" * 1024) -> bytes:
    return req(
        codec.CON,
        codec.POST,
        mid,
        "r",
        payload=payload,
        extra=((codec.BLOCK1, codec.encode_block(num, more, 6)),),
    )


def test_block1_transfers_of_gone_peers_are_not_kept() -> None:
    """Each peer (a CoAP client's address and port) that starts a Block1 transfer and goes away, or
    whose transfer is refused or done, leaves nothing behind once it is over, abandoned past
    ``EXCHANGE_LIFETIME``, or pushed out by the bound on every peer's bodies together."""
    b = CoapBridge(Broker(BrokerSettings()), CoapSettings())
    t = RecordingTransport()
    for port in range(100):
        peer = ("192.0.2.7", 20000 + port)
        b.datagram(block1(1, 0, True), peer, t)  # started
        if port % 3 == 0:
            b.datagram(block1(2, 1, False, b"end"), peer, t)  # done: published
        elif port % 3 == 1:
            b.datagram(block1(2, 5, True), peer, t)  # out of order: refused (4.08)
    codes = [m.code for m in t.messages()]
    assert codes.count(codec.CHANGED) == 34 and codes.count(codec.REQUEST_ENTITY_INCOMPLETE) == 33
    assert len(b.reassembly) == 33 and b.reassembly.bytes == 33 * 1024  # the abandoned ones, for now
    b.reassembly.bound(time.monotonic() + EXCHANGE_LIFETIME + 1)
    assert len(b.reassembly) == 0 and b.reassembly.bytes == 0
    b.reassembly.max_bytes = 10 * 1024
    for port in range(30):
        b.datagram(block1(1, 0, True), ("192.0.2.8", 20000 + port), t)
    assert len(b.reassembly) == 10 and b.reassembly.bytes == 10 * 1024  # the 10 most recent
    assert ("test", ("192.0.2.8", 20029)) in b.reassembly


def block2(mid: int, num: int, path: str = "rep") -> bytes:
    return req(codec.CON, codec.GET, mid, path, extra=((codec.BLOCK2, codec.encode_block(num, False, 2)),))


def test_block2_representations_are_bounded_and_expire() -> None:
    """Later Block2 blocks are served from the representation the first block was cut from (a new
    retained message meanwhile does not mix in), per peer at most ``MAX_REPRESENTATIONS_PER_PEER``,
    every peer's together bounded like Block1's bodies, and a peer silent for the lifetime (the
    object's, ``EXCHANGE_LIFETIME`` by default) loses them: a reader that went away after the first
    block leaves nothing behind."""
    b = CoapBridge(Broker(BrokerSettings()), CoapSettings())
    t = RecordingTransport()
    b.broker.publish(Message("rep", b"a" * 1000, 0, True))
    b.datagram(block2(1, 0), PEER, t)  # 16-byte blocks (the amplification bound): the body kept
    b.broker.publish(Message("rep", b"b" * 1000, 0, True))
    b.datagram(block2(2, 1), PEER, t)
    assert [m.payload for m in t.take()] == [b"a" * 16, b"a" * 16]
    b.representations.lifetime = 0.0  # the peer has been silent for longer than that
    b.datagram(block2(3, 1), PEER, t)  # its representation is gone: the current retained message
    assert [m.payload for m in t.take()] == [b"b" * 16]
    b.representations.lifetime = EXCHANGE_LIFETIME
    b.datagram(block2(4, 0), PEER, t)
    assert len(b.representations) == 1 and b.representations.bytes == 1000
    b.representations.bound(time.monotonic() + EXCHANGE_LIFETIME + 1)  # what the bridge's timer does
    assert len(b.representations) == 0 and b.representations.bytes == 0
    t.take()
    # gone readers: each left its first block's body, until the lifetime passes
    b.representations.lifetime = 60.0
    for port in range(100):
        b.datagram(block2(1, 0), ("192.0.2.7", 20000 + port), t)
    assert len(b.representations) == 100 and b.representations.bytes == 100 * 1000
    b.representations.bound(time.monotonic() + 61)
    assert len(b.representations) == 0 and b.representations.bytes == 0
    # bounded per peer, and in all (the least recently used peers go first)
    for i in range(MAX_REPRESENTATIONS_PER_PEER + 3):
        b.broker.publish(Message(f"rep/{i}", b"c" * 1000, 0, True))
        b.datagram(block2(10 + i, 0, f"rep/{i}"), PEER, t)
    assert b.representations.bytes == MAX_REPRESENTATIONS_PER_PEER * 1000
    b.representations.max_bytes = 10 * 1000
    for port in range(30):
        b.datagram(block2(1, 0), ("192.0.2.8", 20000 + port), t)
    assert len(b.representations) == 10 and b.representations.bytes == 10 * 1000
    assert ("test", ("192.0.2.8", 20029)) in b.representations


def test_malformed_datagrams_never_raise(bridge: CoapBridge) -> None:
    t = RecordingTransport()
    for data in (b"", b"\x40", b"\xff" * 10, b"\x4f\x01\x00\x01", b"\x40\x01\x00\x01\xff"):
        bridge.datagram(data, PEER, t)
    assert bridge.dropped["malformed"] == 5
    assert [m.mtype for m in t.messages()] == [codec.RST, codec.RST]  # the two CONs with a readable header


def test_no_response_suppresses_the_2_xx_of_a_non_request(bridge: CoapBridge) -> None:
    """RFC 7967 §2.1: No-Response 2 suppresses 2.xx answers (a fire-and-forget sensor reading)."""
    t = RecordingTransport()
    quiet = ((codec.NO_RESPONSE, b"\x02"),)
    bridge.datagram(req(codec.NON, codec.POST, 1, "nr/a", payload=b"x", extra=quiet), PEER, t)
    bridge.datagram(
        req(codec.NON, codec.POST, 2, "nr/+", payload=b"x", extra=quiet), PEER, t
    )  # 4.00 still sent
    assert [m.code for m in t.messages()] == [codec.BAD_REQUEST]
    assert bridge.broker.stats.received_qos[0] == 1


_BRIDGE = CoapBridge(Broker(BrokerSettings()), CoapSettings(block_size=64))
_BRIDGE.broker.publish(Message("f/r", b"r" * 300, 0, True))


def _fuzz_request() -> st.SearchStrategy[bytes]:
    option = st.tuples(
        st.sampled_from(
            [
                codec.URI_PATH,
                codec.URI_QUERY,
                codec.OBSERVE,
                codec.BLOCK1,
                codec.BLOCK2,
                codec.SIZE1,
                codec.CONTENT_FORMAT,
                codec.NO_RESPONSE,
                codec.ACCEPT,
                2049,
                2048,
            ]
        ),
        st.one_of(
            st.sampled_from(
                [
                    b"f",
                    b"r",
                    b"+",
                    b"#",
                    b"qos=1",
                    b"retain=true",
                    b"",
                    b"\x00",
                    b"\x06",
                    b"\x0e",
                    b"mqtt",
                    b"publish",
                    b"health",
                    b"$SYS",
                ]
            ),
            st.binary(max_size=4),
        ),
    )
    return st.builds(
        lambda mtype, method, mid, token, options, payload: codec.serialize(
            CoapMessage(mtype, method, mid, token, options, payload)
        ),
        st.integers(0, 3),
        st.sampled_from([0, 1, 2, 3, 4, 5, 69, 68]),
        st.integers(0, 0xFFFF),
        st.binary(max_size=8),
        st.lists(option, max_size=6),
        st.binary(max_size=200),
    )


@settings(max_examples=1500, deadline=None)
@given(st.one_of(_fuzz_request(), st.binary(max_size=100)), st.integers(1, 3))
def test_fuzz_requests_never_raise_in_the_bridge(data: bytes, port: int) -> None:
    """Well-formed but arbitrary requests (and random bytes) are answered or dropped; no handler
    exception (the bridge would count it as dropped "error")."""
    t = RecordingTransport()
    _BRIDGE.datagram(data, ("192.0.2.50", port), t)
    assert "error" not in _BRIDGE.dropped
    for sent, _ in t.sent:
        codec.parse(sent)  # everything it sends is well formed


def test_a_broker_close_ends_the_observation_from_the_notifier(bridge: CoapBridge) -> None:
    """Admin kick / shutdown: ``close`` may come while the broker routes a message to the session,
    so the observation and its session end on the notifier's next turn, not inside the call."""
    t = RecordingTransport()
    observe(bridge, t, "k/1")
    (obs,) = bridge.observations.values()
    assert bridge.broker.kick(obs.client_id)
    assert obs.session.delivery is obs  # nothing removed inside the call
    settle()
    assert bridge.observations == {} and bridge.broker.session_count() == 0


def test_deregistering_a_filter_observation_is_answered_2_05(bridge: CoapBridge) -> None:
    """RFC 7641 §3.6: GET with Observe=1 ends the observation; on a filter there is nothing to read."""
    t = RecordingTransport()
    observe(bridge, t, "f/+/x", b"fl")
    bridge.datagram(
        req(codec.CON, codec.GET, 7, "f/+/x", token=b"fl", extra=((codec.OBSERVE, b"\x01"),)), PEER, t
    )
    (answer,) = t.take()
    assert answer.code == codec.CONTENT and answer.option(codec.OBSERVE) is None
    assert bridge.observations == {}


def test_a_spoofed_observe_registration_gets_one_notification_until_acknowledged(bridge: CoapBridge) -> None:
    """Amplification through Observe (RFC 7641 §7): an unverified observer gets its first
    notification as CON and nothing more until that CON is ACKed (a spoofed address never ACKs);
    what waits is bounded by the drop-oldest queue. After the ACK the rest follows in order."""
    t = RecordingTransport()
    observe(bridge, t, "sp/1")
    for i in range(50):
        bridge.broker.publish(Message("sp/1", b"%d" % i))
    settle()
    (first,) = t.take()
    assert first.mtype == codec.CON and first.payload == b"0"
    (obs,) = bridge.observations.values()
    assert len(obs.queue) == 49
    bridge.datagram(codec.empty(codec.ACK, first.mid), PEER, t)
    settle()
    assert [n.payload for n in t.take()] == [b"%d" % i for i in range(1, 50)]


def test_an_authenticated_observer_gets_notifications_at_once() -> None:
    """A peer that logged in (or came over DTLS) has shown its address: no first-CON wait."""
    b = CoapBridge(Broker(BrokerSettings()))
    b.start()
    t = RecordingTransport()
    try:
        b.datagram(
            req(codec.CON, codec.GET, 1, "v/1", token=b"v", extra=((codec.OBSERVE, b""),)),
            PEER,
            t,
            identity="dev",
            verified=True,
        )
        settle()
        t.take()
        for i in range(3):
            b.broker.publish(Message("v/1", b"%d" % i))
        settle()
        assert [(n.mtype, n.payload) for n in t.take()] == [
            (codec.NON, b"0"),
            (codec.NON, b"1"),
            (codec.NON, b"2"),
        ]
    finally:
        b.stop()


def test_queue_topics_append_or_are_refused_with_a_code(bridge: CoapBridge) -> None:
    """Durable queues (issue 10): a POST to $queue/... appends; unknown queue 4.04; Observe 4.00."""
    t = RecordingTransport()
    bridge.datagram(req(codec.CON, codec.POST, 1, "$queue/orders/1", payload=b"x"), PEER, t)
    settle()
    (answer,) = t.take()
    assert answer.code == codec.NOT_FOUND  # this broker has no queue manager: like auto_create off
    from fluxmq.queues import QueueManager

    bridge.broker.queues = QueueManager(bridge.broker.storage)
    bridge.datagram(req(codec.CON, codec.POST, 2, "$queue/orders/1", payload=b"x"), PEER, t)
    settle()
    (answer,) = t.take()
    assert answer.code == codec.CHANGED and bridge.broker.queues.queues["orders"].log.count == 1
    bridge.datagram(req(codec.CON, codec.GET, 3, "$queue/orders", extra=((codec.OBSERVE, b""),)), PEER, t)
    settle()
    (answer,) = t.take()
    assert answer.code == codec.BAD_REQUEST and not bridge.observations


def test_a_settlement_that_settles_nothing_is_4_04_never_2_04(tmp_path: Path) -> None:
    """``$queue/{name}/$ack`` (``$nack``, ``$reject``; ``message_id`` and ``group_id`` in the query
    name the delivery): 2.04 when it settled it, 4.04 when it settled nothing (settled already,
    unknown, not named), at QoS 0 too, as an MQTT 5.0 PUBACK says 0x10 and never 0x00. Before:
    2.04 either way (and the bridge could not name a delivery: every settlement settled nothing)."""
    from fluxmq.queues import QueueManager
    from fluxmq.queues.config import QueueConfig
    from tests.queues.test_group import end_of_turn, member, up

    store = LMDBStorage(tmp_path / "data", map_size=64 * MiB)
    FlushScheduler(store)
    broker = Broker(BrokerSettings(), store)
    broker.queues = QueueManager(store, [QueueConfig("w")])
    b = CoapBridge(broker, CoapSettings())
    b.start()
    t = RecordingTransport()
    mids = iter(range(1, 100))

    def answer(path: str, *query: str) -> CoapMessage:
        mid = next(mids)
        b.datagram(req(codec.CON, codec.POST, mid, path, query), PEER, t)
        for _ in range(200):
            got = [m for m in t.messages() if m.mid == mid]
            if got:
                return got[0]
            gevent.sleep(0.01)
        raise AssertionError(f"no answer to {path} {query}")

    try:
        _, consumer = member(broker, "c", "$queue/w/#", "g")
        broker.publish(Message("$queue/w", b"job", 1))
        end_of_turn()
        props = up(consumer.sent[-1][1])
        named = (f"message_id={props['message-id']}", f"group_id={props['group-id']}")
        assert answer("$queue/w/$ack", "qos=1", *named).code == codec.CHANGED
        again = answer("$queue/w/$ack", "qos=1", *named)
        assert again.code == codec.NOT_FOUND and b"settle" in again.payload
        assert answer("$queue/w/$nack", "qos=1", "message_id=w:99", "group_id=g").code == codec.NOT_FOUND
        assert answer("$queue/w/$reject", "message_id=w:99", "group_id=g").code == codec.NOT_FOUND  # QoS 0
        assert answer("$queue/w/$ack", "qos=1").code == codec.NOT_FOUND  # names nothing
        assert answer("plain/topic", "message_id=w:0").code == codec.BAD_REQUEST
    finally:
        b.stop()
        store.close()
