"""Session delivery rules: inflight window, bounded queue and its overflow policies, resend on attach."""

from __future__ import annotations

from fluxmq.broker.message import Message
from fluxmq.broker.session import DISCONNECT, DROP_NEW, DROP_OLDEST, Session, SessionLimits
from fluxmq.broker.stats import BrokerStats


class RecordingDelivery:
    """A Delivery that records what the session sends; congestion and size refusals are switchable."""

    version = 4

    def __init__(self) -> None:
        self.sent: list[tuple] = []
        self.pubrels: list[int] = []
        self.congested = False
        self.refuse_larger_than = 0
        self.closed_with: int | None = None
        self.closed = False  # closing: the session is still attached, but the client takes nothing more

    def send_publish(self, message, qos, retain, packet_id, dup, subscription_ids) -> bool:
        if self.refuse_larger_than and len(message.payload) > self.refuse_larger_than:
            return False
        self.sent.append((message.topic, qos, retain, packet_id, dup, subscription_ids))
        return True

    def send_pubrel(self, packet_id: int) -> None:
        self.pubrels.append(packet_id)

    def is_congested(self) -> bool:
        return self.congested

    def close(self, reason_code: int, reason: str = "") -> None:
        self.closed_with = reason_code


def make(limits: SessionLimits | None = None) -> tuple[Session, BrokerStats]:
    stats = BrokerStats()
    return Session("c1", limits or SessionLimits(), stats), stats


def msg(topic: str = "t", qos: int = 1, payload: bytes = b"x") -> Message:
    return Message(topic, payload, qos)


def test_qos0_online_is_sent_without_packet_id():
    s, _ = make()
    d = RecordingDelivery()
    s.attach(d, 10)
    s.deliver(msg(qos=0), 0, False, None)
    assert d.sent == [("t", 0, False, 0, False, None)]
    assert not s.inflight


def test_qos0_offline_is_dropped_and_counted():
    s, stats = make()
    s.deliver(msg(qos=0), 0, False, None)
    assert not s.queue
    assert stats.drops == {"offline_qos0": 1}


def test_qos1_gets_distinct_nonzero_packet_ids_MQTT_2_2_1_3():
    s, _ = make()
    d = RecordingDelivery()
    s.attach(d, 100)
    for _ in range(5):
        s.deliver(msg(), 1, False, None)
    ids = [sent[3] for sent in d.sent]
    assert len(set(ids)) == 5 and 0 not in ids
    assert set(s.inflight) == set(ids)


def test_packet_ids_skip_ids_still_in_flight_after_wrap():
    s, _ = make(SessionLimits(max_inflight=65535))
    d = RecordingDelivery()
    s.attach(d, 65535)
    s._next_pid = 65534
    s.deliver(msg(), 1, False, None)  # 65534
    s.deliver(msg(), 1, False, None)  # 65535
    s.deliver(msg(), 1, False, None)  # wraps to 1
    assert [x[3] for x in d.sent] == [65534, 65535, 1]
    s._next_pid = 65534  # 65534 and 65535 are still in flight: the next free id is 2
    s.deliver(msg(), 1, False, None)
    assert d.sent[-1][3] == 2


def test_window_full_queues_then_puback_releases_in_order():
    s, _ = make()
    d = RecordingDelivery()
    s.attach(d, 2)
    for i in range(4):
        s.deliver(msg(f"t{i}"), 1, False, None)
    assert [x[0] for x in d.sent] == ["t0", "t1"]
    assert len(s.queue) == 2
    assert s.on_puback(d.sent[0][3])
    assert [x[0] for x in d.sent] == ["t0", "t1", "t2"]
    assert not s.on_puback(999)  # unknown id is ignored


def test_qos2_exchange_pubrec_then_pubcomp():
    s, _ = make()
    d = RecordingDelivery()
    s.attach(d, 10)
    s.deliver(msg(qos=2), 2, False, None)
    pid = d.sent[0][3]
    assert not s.on_pubcomp(pid)  # PUBCOMP before PUBREC is not accepted
    assert s.on_pubrec(pid)
    assert s.inflight[pid].released
    assert s.on_pubcomp(pid)
    assert not s.inflight


def test_reattach_resends_inflight_with_dup_and_pubrel_MQTT_4_4_0_1():
    s, _ = make()
    d1 = RecordingDelivery()
    s.attach(d1, 10)
    s.deliver(msg("a", qos=1), 1, False, None)
    s.deliver(msg("b", qos=2), 2, False, None)
    s.deliver(msg("c", qos=2), 2, False, None)
    pid_c = d1.sent[2][3]
    s.on_pubrec(pid_c)
    s.detach()
    d2 = RecordingDelivery()
    s.attach(d2, 10)
    assert [(x[0], x[3], x[4]) for x in d2.sent] == [("a", d1.sent[0][3], True), ("b", d1.sent[1][3], True)]
    assert d2.pubrels == [pid_c]


def test_reconnect_with_smaller_receive_maximum_resends_within_it_MQTT_4_9_0_2():
    """Five in flight, reconnect with Receive Maximum 2: two resent now, one more per acknowledgement,
    in the original order, before anything new."""
    s, _ = make()
    d1 = RecordingDelivery()
    s.attach(d1, 10)
    for t in "abcde":
        s.deliver(msg(t), 1, False, None)
    pids = [x[3] for x in d1.sent]
    s.detach()
    s.deliver(msg("new"), 1, False, None)
    d2 = RecordingDelivery()
    s.attach(d2, 2)
    assert [(x[0], x[4]) for x in d2.sent] == [("a", True), ("b", True)]
    s.on_puback(pids[0])
    assert [x[0] for x in d2.sent] == ["a", "b", "c"]
    for pid in pids[1:]:
        s.on_puback(pid)
    assert [x[0] for x in d2.sent] == ["a", "b", "c", "d", "e", "new"]
    assert [x[4] for x in d2.sent] == [True] * 5 + [False]
    assert not s.held


def test_offline_qos1_is_queued_and_sent_on_attach():
    s, _ = make()
    s.deliver(msg("a"), 1, False, None)
    s.deliver(msg("b"), 1, False, None)
    d = RecordingDelivery()
    s.attach(d, 10)
    assert [(x[0], x[4]) for x in d.sent] == [("a", False), ("b", False)]


def test_congested_client_queues_and_drains_on_writable():
    s, _ = make()
    d = RecordingDelivery()
    s.attach(d, 10)
    d.congested = True
    s.deliver(msg("a", qos=0), 0, False, None)
    s.deliver(msg("b"), 1, False, None)
    assert not d.sent and len(s.queue) == 2
    d.congested = False
    s.on_writable()
    assert [x[0] for x in d.sent] == ["a", "b"]


def test_drop_new_evicts_oldest_qos0_first_then_refuses():
    s, stats = make(SessionLimits(max_queued_messages=3, queue_overflow=DROP_NEW))
    s.deliver(msg("q1"), 1, False, None)
    # offline QoS 0 is not queued; use a congested online client to queue QoS 0
    d = RecordingDelivery()
    d.congested = True
    s.attach(d, 10)
    s.deliver(msg("z1", qos=0), 0, False, None)
    s.deliver(msg("q2"), 1, False, None)
    assert [m.topic for m, *_ in s.queue] == ["q1", "z1", "q2"]
    s.deliver(msg("q3"), 1, False, None)  # full: evicts z1
    assert [m.topic for m, *_ in s.queue] == ["q1", "q2", "q3"]
    s.deliver(msg("q4"), 1, False, None)  # full, no QoS 0 left: q4 refused
    assert [m.topic for m, *_ in s.queue] == ["q1", "q2", "q3"]
    s.deliver(msg("z2", qos=0), 0, False, None)  # a new QoS 0 never evicts
    assert [m.topic for m, *_ in s.queue] == ["q1", "q2", "q3"]
    assert stats.drops == {"queue_full": 3}


def test_drop_oldest_policy():
    s, stats = make(SessionLimits(max_queued_messages=2, queue_overflow=DROP_OLDEST))
    for t in ("a", "b", "c"):
        s.deliver(msg(t), 1, False, None)
    assert [m.topic for m, *_ in s.queue] == ["b", "c"]
    assert stats.drops == {"queue_full": 1}


def test_disconnect_policy_closes_with_quota_exceeded():
    s, _ = make(SessionLimits(max_queued_messages=1, queue_overflow=DISCONNECT))
    d = RecordingDelivery()
    d.congested = True
    s.attach(d, 10)
    s.deliver(msg("a"), 1, False, None)
    s.deliver(msg("b"), 1, False, None)
    assert d.closed_with == 0x97


def test_queue_byte_bound():
    s, stats = make(SessionLimits(max_queued_messages=100, max_queued_bytes=250))
    for i in range(5):
        s.deliver(msg(f"t{i}", payload=b"x" * 99), 1, False, None)
    assert len(s.queue) == 2 and s.queue_bytes <= 250
    assert stats.drops["queue_full"] == 3


def test_too_large_for_client_is_dropped_for_that_client_only():
    s, stats = make()
    d = RecordingDelivery()
    d.refuse_larger_than = 10
    s.attach(d, 10)
    s.deliver(msg(payload=b"x" * 50), 1, False, None)
    s.deliver(msg(payload=b"y"), 1, False, None)
    assert len(d.sent) == 1 and len(s.inflight) == 1
    assert stats.drops == {"packet_too_large": 1}


def test_expired_queued_message_is_not_delivered():
    s, stats = make()
    m = msg("old")
    m.expires_at = 0.0  # long past
    s.deliver(m, 1, False, None)
    s.deliver(msg("new"), 1, False, None)
    d = RecordingDelivery()
    s.attach(d, 10)
    assert [x[0] for x in d.sent] == ["new"]
    assert stats.drops == {"expired": 1}


# -- message validity (a bridge's message_validity) ---------------------------------------------------


def test_validity_drops_queued_messages_older_than_it_and_counts_them(monkeypatch):
    """Issue 14: a queued message older than message_validity when its turn comes is dropped and counted."""
    import fluxmq.broker.session as session_module

    now = [1000.0]
    monkeypatch.setattr(session_module.time, "monotonic", lambda: now[0])
    monkeypatch.setattr("fluxmq.broker.message.time.monotonic", lambda: now[0])
    s, stats = make()
    s.validity = 5.0
    s.deliver(msg("old"), 1, False, None)  # offline: queued with a deadline 5 s from now
    now[0] += 6.0
    s.deliver(msg("fresh"), 1, False, None)
    d = RecordingDelivery()
    s.attach(d, 10)
    assert [t for t, *_ in d.sent] == ["fresh"]
    assert s.validity_drops == 1 and stats.drops["expired"] == 1


def test_validity_keeps_an_earlier_message_expiry(monkeypatch):
    """The deadline is the earlier of the message's own expiry and the validity."""
    s, _ = make()
    s.validity = 60.0
    m = Message("t", b"x", 1, expires_at=5.0)  # long passed on the monotonic clock
    s.deliver(m, 1, False, None)
    assert s.queue[0][0] is m


def test_session_limits_can_be_replaced():
    """A bridge's own max_queued_messages bounds its outbound store."""
    s, stats = make()
    s.limits = SessionLimits(max_queued_messages=2)
    for i in range(3):
        s.deliver(msg(f"t{i}"), 1, False, None)
    assert len(s.queue) == 2 and stats.drops["queue_full"] == 1


def test_closing_connection_keeps_qos1_and_qos2_queued_and_drops_qos0_as_offline():
    s, stats = make()
    d = RecordingDelivery()
    s.attach(d, 10)
    d.closed = d.congested = True  # what a closing MQTTConnection reports until its teardown
    s.deliver(msg("a", qos=0), 0, False, None)
    s.deliver(msg("b"), 1, False, None)
    s.deliver(msg("c", qos=2), 2, False, None)
    assert not d.sent and not s.inflight
    assert [item[0].topic for item in s.queue] == ["b", "c"]
    assert stats.drops == {"offline_qos0": 1}
    s.detach()
    d2 = RecordingDelivery()
    s.attach(d2, 10)
    assert [(x[0], x[1]) for x in d2.sent] == [("b", 1), ("c", 2)]


def test_drops_are_counted_per_session_as_well_as_by_reason():
    """Who lost what: the session's own ``dropped`` counter (shown by the admin API) follows every drop."""
    s, stats = make(SessionLimits(max_queued_messages=2, queue_overflow=DROP_NEW))
    other, _ = make()
    d = RecordingDelivery()
    d.congested = True
    s.attach(d, 10)
    for i in range(5):
        # 2 queued, 3 dropped: queue full (and a new QoS 0 never evicts a queued one: it alone is lost)
        s.deliver(msg(f"z{i}", qos=0), 0, False, None)
    assert stats.drops == {"queue_full": 3}
    assert s.dropped == 3
    assert other.dropped == 0
    assert [m.topic for m, *_ in s.queue] == ["z0", "z1"]


def test_queued_messages_move_on_as_soon_as_the_output_has_room():
    """A congested client whose output has room again (its allowance grew) gets the queue at the next
    delivery, in order, instead of the queue overflowing until the low-water mark calls on_writable."""
    s, stats = make(SessionLimits(max_queued_messages=3))
    d = RecordingDelivery()
    d.congested = True
    s.attach(d, 10)
    s.deliver(msg("a", qos=0), 0, False, None)
    s.deliver(msg("b", qos=0), 0, False, None)
    d.congested = False
    for topic in "cdef":
        s.deliver(msg(topic, qos=0), 0, False, None)
    assert [t for t, *_ in d.sent] == list("abcdef")
    assert not s.queue and not stats.drops


def test_idle_session_carries_no_qos2_id_set_until_one_is_used():
    """A set costs 216 bytes even empty: an idle client's session (most of 50,000 held connections)
    has none until an inbound QoS 2 id arrives, and clearing state does not make one."""
    import gc

    s, _ = make()
    s.clear_state()
    assert not any(isinstance(o, set) for o in gc.get_referents(s))
    assert 5 not in s.inbound_qos2
    s.inbound_qos2.add(5)
    assert 5 in s.inbound_qos2
    assert any(isinstance(o, set) for o in gc.get_referents(s))
    s.clear_state()
    assert not s.inbound_qos2
