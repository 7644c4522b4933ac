"""When the turn's last reader writes its output (``_hub_read.ConnectionCore._on_input`` ->
``FlushCore.release``), with two workers of one node in this process (real brokers, ``WorkerNode``s,
the Unix-socket transport; clients on socket pairs, as in ``test_publish_relay_workers``).

- A read whose messages go to local subscribers only is written by the read itself, before the hub
  runs anything else: a lone message's flush stays immediate.
- A read that starts a batch for the other worker (the link's wake, a loop callback) leaves its
  local subscribers' writes to the flush callback, after that callback: the batch leaves first and
  the other worker writes its share while this one writes its own (fan-out 1 -> 100 over two
  workers: ~8 % fewer system calls per delivery, bench/RESULTS.md "wfan").
"""

from __future__ import annotations

import time

import gevent

from fluxmq._core import codec as c
from fluxmq.protocol.connection import HUB_READS, RELAY
from fluxmq.protocol.flush import FlushScheduler
from tests.protocol.test_publish_relay import MARK, encode
from tests.protocol.test_publish_relay_workers import Workers


class _RecordingFlusher(FlushScheduler):
    """``FlushScheduler`` noting each flush in ``events`` (set on the instance's class, below)."""

    __slots__ = ()
    events: list = []

    def _flush(self) -> None:  # (FlushCore.release finds this override: _own_flush)
        self.events.append(("flush", self.scheduled))
        super()._flush()


def _record(workers: Workers) -> list:
    """Worker 0's flushes (``("flush", True)`` from the loop callback, ``("flush", False)`` from the
    read itself) and batches sent to worker 1 (``"batch"``), in order."""
    events: list = []
    flusher = workers.nets[0].flusher
    flusher.__class__ = type("Recording", (_RecordingFlusher,), {"__slots__": (), "events": events})
    link = next(iter(workers.nodes[0].transport.links.values()))
    take = link._take_and_send

    def recorded_take() -> None:
        events.append("batch")
        take()

    link._take_and_send = recorded_take
    return events


def _wait_for_interest(workers: Workers, topic: str) -> None:
    """Until worker 0 routes ``topic`` (and the mark) to worker 1."""
    remote = workers.nodes[0].peers.remote
    deadline = time.monotonic() + 10
    while not (remote.match(topic)[0] and remote.match(MARK)[0]):
        assert time.monotonic() < deadline, "worker 1's interest did not reach worker 0"
        gevent.sleep(0.01)


def test_a_lone_message_for_local_subscribers_is_written_by_its_read(tmp_path) -> None:
    RELAY.enabled = HUB_READS.enabled = True
    workers = Workers(tmp_path)
    try:
        workers.client("pub", 0)
        workers.client("near", 0)
        workers.subscribe("near", "t/#", 0)
        events = _record(workers)
        workers.send("pub", [c.Publish("t/1", b"lone")])
        got = workers.read_all()
        assert got["near"] == encode(c.Publish("t/1", b"lone"), 4)
        assert events == [("flush", False)]  # no callback, no batch: written in the read's callback
    finally:
        workers.close()


def test_a_read_that_starts_a_batch_sends_it_before_the_local_subscribers_writes(tmp_path) -> None:
    RELAY.enabled = HUB_READS.enabled = True
    workers = Workers(tmp_path)
    try:
        workers.client("pub", 0)
        workers.client("near", 0)
        workers.client("far", 1)
        workers.subscribe("near", "t/#", 0)
        workers.subscribe("far", "t/#", 0)
        _wait_for_interest(workers, "t/1")
        events = _record(workers)
        workers.send("pub", [c.Publish("t/1", b"both")])
        got = workers.read_all()
        want = encode(c.Publish("t/1", b"both"), 4)
        assert got["near"] == want and got["far"] == want
        # the batch first (the link's greenlet, woken by the read), then the local writes from
        # the flush callback (before: ("flush", False) first, the batch after it)
        assert events[:2] == ["batch", ("flush", True)]
    finally:
        workers.close()
