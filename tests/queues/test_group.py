"""fluxmq/queues/group.py over a real Broker and LMDB store (no network): settlement, backoff,
the DLQ append that fails, and what a restart brings back."""

from __future__ import annotations

import time
from pathlib import Path

import gevent
import pytest

from fluxmq.broker.broker import Broker
from fluxmq.broker.message import USER_PROPERTY, Message
from fluxmq.queues import QueueManager
from fluxmq.queues.config import QueueConfig, RetryConfig
from fluxmq.storage.lmdb import INFLIGHT, LMDBStorage


class Delivery:
    """A connected client that takes every PUBLISH (records them)."""

    version = 5
    closed = False

    def __init__(self) -> None:
        self.sent: list[tuple[int, Message]] = []

    def send_publish(self, message, qos, retain, packet_id, dup, subscription_ids) -> bool:
        self.sent.append((packet_id, message))
        return True

    def is_congested(self) -> bool:
        return False

    def close(self, reason_code: int, reason: str = "") -> None:
        self.closed = True


def node(path: Path, configs: list[QueueConfig]):
    storage = LMDBStorage(path, map_size=64 << 20)
    broker = Broker(storage=storage)
    broker.queues = QueueManager(storage, configs)
    return storage, broker


def member(broker: Broker, cid: str, filter: str, group: str, auto_ack: bool = False):
    session, _ = broker.open_session(cid, True, 0)
    d = Delivery()
    broker.attach(session, d, 100)
    user = [("consumer-group", group)] + ([("auto-ack", "true")] if auto_ack else [])
    assert broker.subscribe(session, filter, 1, user_properties=user).granted_qos == 1
    return session, d


def end_of_turn() -> None:
    """Let the loop turn end: a turn's appends and settlements are dispatched once, at its end."""
    gevent.sleep(0)


def up(message: Message) -> dict[str, str]:
    return dict(message.properties[USER_PROPERTY])


def settle(broker: Broker, name: str, action: str, delivered: Message) -> int:
    p = up(delivered)
    props = {USER_PROPERTY: [("message-id", p["message-id"]), ("group-id", p["group-id"])]}
    return broker.publish(Message(f"$queue/{name}/{action}", b"", 1, properties=props))


def test_backoff_grows_and_is_capped() -> None:
    r = RetryConfig(max_retries=5, initial_backoff=1.0, max_backoff=5.0, multiplier=2.0)
    assert [r.backoff(n) for n in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_a_failed_dlq_append_keeps_the_message_and_is_retried(tmp_path: Path) -> None:
    storage, broker = node(tmp_path / "d", [QueueConfig("jobs")])
    _, d = member(broker, "c1", "$queue/jobs/#", "g")
    broker.publish(Message("$queue/jobs/a", b"poison", 1))
    end_of_turn()
    storage.commit()
    ((_, delivered),) = d.sent
    storage.refusing = True  # the store is full: the DLQ append cannot be stored
    assert settle(broker, "jobs", "$reject", delivered) == 1
    group = broker.queues.queues["jobs"].groups["g"]
    assert group.dead_pending == {0: "rejected"} and not group.is_settled(0)  # kept, not dropped
    broker.queues.tick()
    assert group.dead_pending  # still failing
    storage.refusing = False
    broker.queues.tick()
    assert not group.dead_pending and group.is_settled(0)
    dlq = broker.queues.queues["jobs.dlq"]
    rec = dlq.log.get(0)
    assert rec.message.payload == b"poison" and up(rec.message)["x-death-reason"] == "rejected"
    storage.close()


def test_a_restart_brings_back_exactly_the_unsettled(tmp_path: Path) -> None:
    storage, broker = node(tmp_path / "d", [QueueConfig("jobs")])
    _, d = member(broker, "c1", "$queue/jobs/#", "g", auto_ack=False)
    for i in range(6):
        broker.publish(Message("$queue/jobs/x", f"m{i}".encode(), 1))
    end_of_turn()
    for _pid, delivered in d.sent:
        if int(up(delivered)["offset"]) in (0, 2, 3, 5):  # out of order: 2, 3 and 5 above the floor
            settle(broker, "jobs", "$ack", delivered)
    storage.commit()
    storage.abort()  # like a crash: nothing more is written

    storage, broker = node(tmp_path / "d", [QueueConfig("jobs")])
    _, d = member(broker, "c2", "$queue/jobs/#", "g")
    assert sorted(m.payload for _, m in d.sent) == [b"m1", b"m4"]
    storage.close()


@pytest.mark.parametrize("action", ["$nack", "$reject"])
def test_settling_an_unknown_message_changes_nothing(tmp_path: Path, action: str) -> None:
    storage, broker = node(tmp_path / "d", [QueueConfig("jobs")])
    props = {USER_PROPERTY: [("message-id", "jobs:99"), ("group-id", "g")]}
    assert broker.publish(Message(f"$queue/jobs/{action}", b"", 1, properties=props)) == 0
    storage.close()


def test_delivery_counts_go_on_after_a_restart(tmp_path: Path) -> None:
    """Stored once per dispatch: a redelivered record goes on counting after a crash, and a record
    passed over (no member's filter matched it) still counts as never delivered."""
    storage, broker = node(tmp_path / "d", [QueueConfig("jobs")])
    a, d = member(broker, "c1", "$queue/jobs/a/#", "g")
    broker.publish(Message("$queue/jobs/b/1", b"passed over", 1))  # offset 0: no member for it
    broker.publish(Message("$queue/jobs/a/1", b"again", 1))  # offset 1
    end_of_turn()
    assert [up(m)["delivery-count"] for _, m in d.sent] == ["1"]
    broker.close_session(a, a.delivery, False)  # leaves: offset 1 goes to the next member
    _, d2 = member(broker, "c2", "$queue/jobs/a/#", "g")
    assert [(m.payload, up(m)["delivery-count"]) for _, m in d2.sent] == [(b"again", "2")]
    storage.commit()
    storage.abort()  # a crash: nothing more is written

    storage, broker = node(tmp_path / "d", [QueueConfig("jobs")])
    _, d3 = member(broker, "c3", "$queue/jobs/#", "g")
    got = sorted((m.payload, up(m)["delivery-count"]) for _, m in d3.sent)
    assert got == [(b"again", "3"), (b"passed over", "1")]
    for _, m in d3.sent:
        settle(broker, "jobs", "$ack", m)
    storage.commit()
    group = broker.queues.queues["jobs"].groups["g"]
    assert not group.stored_counts  # settled: their count records are deleted
    storage.close()
    found = LMDBStorage(tmp_path / "d", map_size=64 << 20)
    assert found.queue_log().load_queues()["jobs"].groups["g"].counts == {}
    found.close()


def test_a_filter_with_plus_and_hash_is_applied_to_the_routing_key(tmp_path: Path) -> None:
    storage, broker = node(tmp_path / "d", [QueueConfig("jobs")])
    _, plus = member(broker, "c1", "$queue/jobs/+/paid", "p", auto_ack=True)
    _, hash_ = member(broker, "c2", "$queue/jobs/eu/#", "h", auto_ack=True)
    for key in ("eu/paid", "eu/new", "us/paid", "eu/x/paid", "eu"):
        broker.publish(Message(f"$queue/jobs/{key}", key.encode(), 1))
    end_of_turn()
    assert [m.payload for _, m in plus.sent] == [b"eu/paid", b"us/paid"]
    assert [m.payload for _, m in hash_.sent] == [b"eu/paid", b"eu/new", b"eu/x/paid", b"eu"]
    storage.close()


def test_a_consumers_receive_maximum_bounds_its_unsettled_deliveries(tmp_path: Path) -> None:
    """5.0 Receive Maximum 2 (the session's window) under a queue max_inflight of 100."""
    storage, broker = node(tmp_path / "d", [QueueConfig("jobs", max_inflight=100)])
    session, _ = broker.open_session("c1", True, 0)
    d = Delivery()
    broker.attach(session, d, 2)
    broker.subscribe(
        session, "$queue/jobs", 1, user_properties=[("consumer-group", "g"), ("auto-ack", "true")]
    )
    for i in range(5):
        broker.publish(Message("$queue/jobs", b"%d" % i, 1))
    end_of_turn()
    assert [m.payload for _, m in d.sent] == [b"0", b"1"]
    session.on_puback(d.sent[0][0], 0)  # one settled: one more
    end_of_turn()
    assert [m.payload for _, m in d.sent] == [b"0", b"1", b"2"]
    storage.close()


def test_unsettled_work_is_kept_until_every_group_settled_it_unless_a_limit_forces_it(tmp_path: Path) -> None:
    from fluxmq.queues.config import RetentionConfig

    storage, broker = node(
        tmp_path / "d",
        [QueueConfig("kept"), QueueConfig("capped", retention=RetentionConfig(max_length_messages=2))],
    )
    _, fast = member(broker, "c1", "$queue/kept", "fast", auto_ack=True)
    member(broker, "c2", "$queue/kept", "slow")  # never settles
    for i in range(5):
        broker.publish(Message("$queue/kept", b"%d" % i, 1))
        broker.publish(Message("$queue/capped", b"%d" % i, 1))
    end_of_turn()
    for pid, _ in fast.sent:
        broker.sessions["c1"].on_puback(pid, 0)
    end_of_turn()
    broker.queues.tick()
    kept, capped = broker.queues.queues["kept"], broker.queues.queues["capped"]
    assert kept.log.count == 5 and kept.stats["retention_dropped"] == 0  # "slow" has settled none
    assert capped.log.count == 2 and capped.stats["retention_dropped"] == 3  # forced out: counted
    storage.close()


def test_a_stream_group_commits_what_was_acknowledged_every_auto_commit_interval(tmp_path: Path) -> None:
    configs = [QueueConfig("events", type="stream", auto_commit_interval=0.01)]
    storage, broker = node(tmp_path / "d", configs)
    session, d = member(broker, "c1", "$queue/events", "readers")  # not auto-ack: no commit per ack
    for i in range(4):
        broker.publish(Message("$queue/events", b"%d" % i, 1))
    end_of_turn()
    for pid, _ in d.sent[:3]:
        session.on_puback(pid, 0)  # acknowledged on the wire; the 4th is not
    gevent.sleep(0.02)
    broker.queues.tick()
    assert broker.queues.queues["events"].groups["readers"].floor == 3
    storage.commit()
    storage.abort()

    storage, broker = node(tmp_path / "d", configs)
    _, d = member(broker, "c2", "$queue/events", "readers")
    assert [m.payload for _, m in d.sent] == [b"3"]  # resumes after the commit
    storage.close()


def test_a_stream_groups_first_auto_commit_waits_one_interval_from_its_start(tmp_path: Path) -> None:
    """The interval counts from the group's start, not from the host's boot (the monotonic
    clock's zero): records acknowledged on the wire at once are not committed on the next tick
    of a host up longer than the interval, as any host soon is."""
    assert time.monotonic() > 5
    configs = [QueueConfig("events", type="stream", auto_commit_interval=5.0)]
    storage, broker = node(tmp_path / "d", configs)
    session, d = member(broker, "c1", "$queue/events", "readers")
    for i in range(4):
        broker.publish(Message("$queue/events", b"%d" % i, 1))
    end_of_turn()
    group = broker.queues.queues["events"].groups["readers"]
    for pid, _ in d.sent:
        session.on_puback(pid, 0)
    broker.queues.tick()
    assert group.floor == 0  # acknowledged on the wire, not committed yet
    broker.queues.tick(time.monotonic() + 5.1)
    assert group.floor == 4
    storage.close()


def test_a_resumed_persistent_consumer_gets_what_it_held_from_its_group_not_a_stale_resend(
    tmp_path: Path,
) -> None:
    """A persistent consumer that disconnects with an unsettled delivery: the delivery goes back
    to its group and comes again (count 2) when it reconnects; the session does not also resend
    the old one from its in-flight window, and its PUBACKs write nothing for them."""
    storage, broker = node(tmp_path / "d", [QueueConfig("jobs")])
    session, _ = broker.open_session("p1", False, 300)
    d = Delivery()
    broker.attach(session, d, 100)
    broker.subscribe(session, "$queue/jobs", 1, user_properties=[("consumer-group", "g")])
    broker.publish(Message("$queue/jobs", b"held", 1))
    end_of_turn()
    storage.commit()
    assert [up(m)["delivery-count"] for _, m in d.sent] == ["1"]
    broker.close_session(session, d, False)
    session, present = broker.open_session("p1", False, 300)
    assert present
    d2 = Delivery()
    broker.attach(session, d2, 100)
    end_of_turn()
    assert [(m.payload, up(m)["delivery-count"]) for _, m in d2.sent] == [(b"held", "2")]
    storage.commit()
    session.on_puback(d2.sent[0][0], 0)
    assert not [
        k for k in storage._batch.ops[INFLIGHT] if k.startswith(b"p1\x00")
    ]  # no in-flight delete written
    storage.close()


def test_out_of_order_puback_settlements_are_durable_by_the_next_tick(tmp_path: Path) -> None:
    """PUBACK settlements above the floor wait at most for the 100 ms tick to be written (at the
    end of a turn only the floor is): after the tick's commit a crash redelivers only the unsettled."""
    storage, broker = node(tmp_path / "d", [QueueConfig("jobs")])
    session, d = member(broker, "c1", "$queue/jobs", "g", auto_ack=True)
    for i in range(3):
        broker.publish(Message("$queue/jobs", b"m%d" % i, 1))
    end_of_turn()
    storage.commit()
    for pid, m in d.sent:
        if up(m)["offset"] != "0":
            session.on_puback(pid, 0)  # 1 and 2 settled, 0 not: above the floor
    end_of_turn()
    broker.queues.tick()
    storage.commit()
    storage.abort()  # a crash

    storage, broker = node(tmp_path / "d", [QueueConfig("jobs")])
    _, d = member(broker, "c2", "$queue/jobs", "g")
    assert [m.payload for _, m in d.sent] == [b"m0"]
    storage.close()


def test_stream_offset_next_starts_after_what_is_stored(tmp_path: Path) -> None:
    storage, broker = node(tmp_path / "d", [QueueConfig("events", type="stream")])
    for i in range(3):
        broker.publish(Message("$queue/events", b"old%d" % i, 1))
    session, _ = broker.open_session("c1", True, 0)
    d = Delivery()
    broker.attach(session, d, 100)
    broker.subscribe(
        session, "$queue/events", 1, user_properties=[("consumer-group", "g"), ("stream-offset", "next")]
    )
    end_of_turn()
    assert d.sent == []
    broker.publish(Message("$queue/events", b"new", 1))
    end_of_turn()
    assert [(m.payload, up(m)["x-stream-offset"]) for _, m in d.sent] == [(b"new", "3")]
    storage.close()


def test_a_delivery_is_its_own_pending_and_in_flight_entry(tmp_path: Path) -> None:
    """One object per work-queue delivery: the group's pending entry and the session's in-flight
    entry are the delivered message itself, and its PUBACK (auto-ack) settles it through them."""
    storage, broker = node(tmp_path / "d", [QueueConfig("jobs")])
    try:
        session, d = member(broker, "c1", "$queue/jobs/#", "g", auto_ack=True)
        broker.publish(Message("$queue/jobs/a", b"x", 1))
        end_of_turn()
        ((pid, delivered),) = d.sent
        group = broker.queues.queue("jobs").groups["g"]
        assert group.pending[0] is delivered
        assert session.inflight[pid] is delivered
        assert (delivered.member.session, delivered.offset, delivered.attempt) == (session, 0, 1)
        assert session.on_puback(pid, 0)
        assert not group.pending and not session.inflight and group.floor == 1
    finally:
        storage.close()


def _run_scenario(path: Path, members: int) -> list:
    """Members with a window of 2 each: records 0..8 appended, record 1 deleted (compaction-like)
    before any dispatch, record 4 settled above the floor by a restart's progress; what each gets,
    before and after one settles one."""
    storage, broker = node(path, [QueueConfig("jobs", max_inflight=2)])
    try:
        q = broker.queues.queue("jobs")
        for i in range(9):
            broker.publish(Message(f"$queue/jobs/k{i}", f"m{i}".encode(), 1))
        q.log.delete(1)
        sessions = [member(broker, f"c{i}", "$queue/jobs/#", "g") for i in range(members)]
        group = q.groups["g"]
        group.settled.add(4)
        end_of_turn()

        def got() -> list:
            return [
                [(pid, m.payload, up(m)["delivery-count"], up(m)["message-id"]) for pid, m in d.sent]
                for _, d in sessions
            ]

        before = got()
        assert settle(broker, "jobs", "$ack", sessions[-1][1].sent[0][1]) == 1  # room for one more
        end_of_turn()
        return [
            before,
            got(),
            group.cursor,
            group.floor,
            sorted(group.settled),
            sorted(group.pending),
            group.mark,
            [m.pending for m in group.members],
            q.stats["delivered"],
            group._rr,
        ]
    finally:
        storage.close()


@pytest.mark.parametrize("members", [1, 2, 3])
def test_the_run_from_the_cursor_delivers_what_the_general_loop_does(
    tmp_path: Path, monkeypatch, members
) -> None:
    from fluxmq.queues import group as group_module

    fast = _run_scenario(tmp_path / "fast", members)
    monkeypatch.setattr(group_module, "RUN_FAST_PATH", False)
    general = _run_scenario(tmp_path / "general", members)
    assert fast == general
    delivered = [p for each in fast[1] for _, p, _, _ in each]
    assert len(delivered) == len(set(delivered)) == 2 * members + 1  # every window full, then one more
    assert b"m1" not in delivered  # deleted before any dispatch
