"""How long a persistent shared-subscription member's disconnect stalls the event loop.

A member ``a`` of ``$share/g/t/#`` holds ``--messages`` queued QoS 1 messages on disk (real LMDB in a
temp dir, commits by the node's FlushScheduler). It disconnects while:

- ``online``: another member ``b`` (persistent) is online: the messages are handed over to it;
- ``offline``: no other member is online: they stay with ``a``;
- ``ending``: ``b`` is online and ``a``'s session ends with the connection (DISCONNECT with Session
  Expiry 0): they go to ``b`` before ``a``'s state is deleted.

A ticker greenlet asks to wake every millisecond; the longest it waited beyond that is the longest
hub stall (every other greenlet and connection waited as long). Also printed: the time spent in
``close_session`` itself and until the hand-over finished.

    .venv/bin/python -m bench.shared_handover --messages 100000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import gevent

from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.broker.message import Message
from fluxmq.protocol.flush import FlushScheduler
from fluxmq.storage.lmdb import LMDBStorage
from tests.broker.test_session import RecordingDelivery

TICK = 0.001


class StallMeter:
    """A greenlet that sleeps TICK at a time and records the longest extra wait (a hub stall)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.longest_cpu = 0.0  # CPU time of this process in that longest wait: immune to other load
        self._running = True
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while self._running:
            started = time.perf_counter()
            cpu = time.process_time()
            gevent.sleep(TICK)
            late = time.perf_counter() - started - TICK
            if late > self.longest:
                self.longest = late
            self.longest_cpu = max(self.longest_cpu, time.process_time() - cpu)

    def stop(self) -> tuple[float, float]:
        self._running = False
        self._greenlet.join()
        return self.longest, self.longest_cpu


def run(scenario: str, messages: int, payload: int, path: Path) -> dict:
    storage = LMDBStorage(path, map_size=4 << 30)
    broker = Broker(
        BrokerSettings(persistent_max_queued_messages=messages, persistent_max_queued_bytes=1 << 31), storage
    )
    FlushScheduler(storage)  # commits each loop turn's writes, as in the node
    a, _ = broker.open_session("a", False, 3600)
    da = RecordingDelivery()
    da.congested = True  # everything published below is queued on a's disk queue
    broker.attach(a, da, 100)
    broker.subscribe(a, "$share/g/t/#", 1)
    body = b"x" * payload
    for i in range(messages):
        broker.publish(Message(f"t/{i}", body, 1))
        if i % 1000 == 999:
            gevent.sleep(0)  # commit a batch
    gevent.sleep(0)
    assert len(a.queue) == messages, len(a.queue)
    b, _ = broker.open_session("b", False, 3600)
    db = RecordingDelivery()
    broker.attach(b, db, 100)
    broker.subscribe(b, "$share/g/t/#", 1)
    if scenario == "offline":
        broker.close_session(b, db, publish_will=False)
    gevent.sleep(0)

    if scenario == "ending":
        a.expiry_interval = 0  # what a DISCONNECT with Session Expiry Interval 0 sets
    meter = StallMeter()
    gevent.sleep(0.05)
    started = time.perf_counter()
    broker.close_session(a, da, publish_will=False)
    hand_over = broker.hand_overs.get(a) if hasattr(broker, "hand_overs") else None
    in_call = time.perf_counter() - started
    deadline = time.monotonic() + 600
    expect_left = messages if scenario == "offline" else 0
    while (broker.hand_overs if hasattr(broker, "hand_overs") else False) and time.monotonic() < deadline:
        gevent.sleep(0.001)
    done = time.perf_counter() - started
    gevent.sleep(0.05)
    stall, stall_cpu = meter.stop()
    moved = len(db.sent) + len(b.queue)
    left = len(a.queue) if scenario != "ending" else 0
    storage.close()
    assert left == expect_left, (left, expect_left)
    assert moved == messages - expect_left, moved
    return {
        "scenario": scenario,
        "messages": messages,
        "moved": moved,
        "left_with_a": left,
        "close_session_ms": round(in_call * 1000, 1),
        "hand_over_ms": round(done * 1000, 1),
        "longest_stall_ms": round(stall * 1000, 1),
        "longest_stall_cpu_ms": round(stall_cpu * 1000, 1),
        "turns": getattr(hand_over, "turns", 1),
        "largest_step": getattr(hand_over, "largest_step", messages),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--payload", type=int, default=64)
    parser.add_argument("--scenario", choices=("online", "offline", "ending", "all"), default="all")
    args = parser.parse_args()
    scenarios = ("online", "offline", "ending") if args.scenario == "all" else (args.scenario,)
    for scenario in scenarios:
        with tempfile.TemporaryDirectory(prefix="fluxmq-handover-") as tmp:
            print(run(scenario, args.messages, args.payload, Path(tmp)), flush=True)


if __name__ == "__main__":
    main()
