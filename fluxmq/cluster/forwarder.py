"""One peer's outbound data channel: a bounded queue, batching, sequence ids and acknowledgements.

Every node opens one ``Route`` stream to each peer and sends ``Batch`` messages on it: the messages
forwarded to that peer and this node's interest changes, in order. The peer acknowledges each
batch by its sequence id once it has applied it.

* **Bounded.** Messages wait in a per-peer queue bounded by ``max_queued_messages`` and
  ``max_queued_bytes``; past either, a new message to that peer is dropped and counted. Enqueueing
  never blocks, so a dead or slow peer never stalls local delivery.
* **Two writers, one queue.** ``enqueue`` (``ClusterPeers.forward``, the Python path) queues an
  ``Outgoing``; the C relay appends plain messages to ``forward_queue`` (a
  ``fluxmq._core.forward.ForwardQueue``: framed items, sealed into the queue as ``ForwardRun``
  entries before anything else is queued and before a batch is taken), so order is kept and one
  bound counts both.
* **Batching.** The sender greenlet sends what is queued at the end of the loop turn when no batch
  is in flight (low latency at low rates); while batches are in flight, a batch smaller than
  ``batch_max_size`` fills until they are acknowledged or its oldest message has waited
  ``batch_max_delay``. At most ``batches_in_flight`` batches are unacknowledged at once; the queue
  grows (up to its bound) while the window is full. On a stream that takes writes from its caller
  (the Unix socket between workers) the sender writes each batch itself, and an ack that leaves
  nothing in flight has the filling batch sent by the ack reader (``_send_from_ack``), the two
  writers taking turns on ``_write_lock``.
* **Acknowledgements.** The stream yields a ``BatchAck`` per batch, or (a Unix channel's plain ack,
  ``batch.decode_ack``) its sequence id alone: ``_read_acks`` takes both.
* **Sequence ids.** Each batch has a sequence id per (link epoch, receiver). A broken stream is
  re-opened with backoff and the unacknowledged batches are sent again, in order; the receiver
  skips those it applied already, so a retried batch is not delivered twice. Nothing new goes into
  a stream before the peer answered it: while the peer is down, messages wait in the queue.
* **Interest.** A re-opened stream carries, after the retried batches, a snapshot of this node's
  whole interest set; changes made meanwhile follow as deltas. While no stream is open, changes are
  not kept (the next snapshot has them). A new snapshot replaces an unacknowledged earlier one
  (dropped, not sent again): however long the peer stays down, one snapshot waits in ``unacked``.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import gevent
import grpc
from gevent.event import Event
from gevent.lock import Semaphore
from gevent.queue import Queue

from fluxmq._core.forward import ForwardQueue, ForwardRun

from .batch import Outgoing, RawBatch, ack_seq, build_batch, build_raw_batch
from .proto import cluster_pb2 as pb

log = logging.getLogger("fluxmq.cluster.forwarder")

RECONNECT_MIN = 0.05
RECONNECT_MAX = 2.0
# A batch's bytes (payloads and topics) past which no further message is added to it; a larger
# message travels alone (gRPC's message size limit is set far above broker.max_message_size).
BATCH_MAX_BYTES = 4 << 20
# How often the idle sender looks at the age of its oldest unacknowledged batch.
CHECK_INTERVAL = 0.5


class LinkStats:
    """Counters of one peer link (read by ``/metrics`` and ``peer_state``)."""

    __slots__ = ("batches", "messages", "failures", "dropped", "expired", "resent", "connects")

    def __init__(self) -> None:
        self.batches = 0  # batches the peer acknowledged
        self.messages = 0  # messages in them
        self.failures = 0  # streams that broke or could not open
        self.dropped = 0  # messages refused by the full queue
        self.expired = 0  # messages whose Message Expiry passed while queued
        self.resent = 0  # batches sent again on a new stream
        self.connects = 0  # streams opened that the peer answered


class PeerLink:
    """The data channel to one peer (see the module docstring)."""

    def __init__(
        self,
        node_id: str,
        addr: str,
        local_id: str,
        epoch: int,
        settings,
        channel: grpc.Channel,
        local_filters,
        on_ack=None,
    ) -> None:
        from .proto import cluster_pb2_grpc as pb_grpc

        self.node_id = node_id
        self.addr = addr
        self.local_id = local_id
        self.epoch = epoch
        self.settings = settings
        self.channel = channel
        self.stub = pb_grpc.ClusterTransportStub(channel)
        # a channel that writes a RawBatch's items as they are (the Unix socket between workers): a
        # batch without interest changes is a plain one there (its seq and count in the frame)
        self._raw = getattr(channel, "raw_batches", False)
        self._local_filters = local_filters  # () -> iterable of this node's filters (the snapshot)
        self._on_ack = on_ack  # (node_id, BatchAck) -> None
        self.queue: deque[Outgoing | ForwardRun] = deque()
        # what is queued (entries and the relay's tail): counts, bounds, the relay's appends; never
        # replaced (the relay keeps a route's queues while the transport's ``links_version`` holds:
        # whoever replaces it must bump that)
        self.forward_queue = ForwardQueue(
            self.queue,
            settings.max_queued_messages,
            settings.max_queued_bytes,
            settings.batch_max_size,
            BATCH_MAX_BYTES,
            self._queued_first,
        )
        self.interest: list[tuple[str, bool]] = []  # changes not sent yet (only while a stream is open)
        self.interest_version = 0  # changes made so far
        self.acked_interest = 0  # changes the peer has applied
        self.seq = 0
        self._snapshot_seq = 0  # the last interest snapshot's sequence id (at most one unacknowledged)
        self.taken = 0  # messages taken from the queue into batches so far
        # (a dict keeps its keys in the order they were first set, as OrderedDict, and costs less
        # per batch to add to and pop from)
        self.unacked: dict[int, tuple[pb.Batch | RawBatch, float, int, int]] = {}
        self.stats = LinkStats()
        self.connected = False  # the current stream has been answered (an ack arrived)
        self._call = None
        self._out: Queue | None = None
        self._write = None  # the stream's own write (Unix channel), or None: batches go through _out
        self._write_lock = Semaphore()  # held while a batch is written (_put)
        self._filling = False  # the sender greenlet waits while its next batch fills
        self._wake = Event()
        self._room = Event()
        self._retry = Event()  # ends the reconnect backoff: the peer is back (retry_now)
        self._waiters: list[tuple[int, Event]] = []
        self._running = True
        self._first_at = 0.0  # when the oldest queued message was queued
        self._down_logged = False
        self._loop = gevent.get_hub().loop
        # The sender's waits have no timeout of their own (a gevent Timeout made per wait, ~10 Python
        # calls, was a good part of a batch's fixed cost): this timer wakes it every CHECK_INTERVAL
        # while a batch is unacknowledged, to look at the oldest one's age.
        self._watchdog = self._loop.timer(CHECK_INTERVAL, CHECK_INTERVAL, ref=False)
        self._watchdog.start(self._tick)
        self._greenlet = gevent.spawn(self._run)

    # -- called by the forwarding node ------------------------------------------------------------

    def enqueue(self, entry: Outgoing) -> bool:
        """Queue a message for the peer; False (counted) when the queue is full."""
        fq = self.forward_queue
        if not fq.has_room():
            self.stats.dropped += 1
            return False
        fq.seal()  # what the relay queued before this message goes before it
        first = not fq.queued
        self.queue.append(entry)
        fq.queued += 1
        fq.queued_bytes += len(entry.blob)
        if first:
            self._queued_first()
        elif not self._wake.is_set():
            self._wake.set()
        return True

    def _queued_first(self) -> None:
        """A message was queued into an empty queue (by ``enqueue`` or the relay)."""
        self._first_at = time.monotonic()
        if not self._wake.is_set():
            self._wake.set()

    @property
    def queued(self) -> int:
        """Messages waiting to be sent."""
        return self.forward_queue.queued

    def interest_changed(self, filter: str, added: bool) -> int | None:
        """Record an interest change; returns the version to wait for, or None when no stream is open
        (the snapshot of the next stream carries it)."""
        self.interest_version += 1
        if self._call is None:
            return None
        self.interest.append((filter, added))
        if not self._wake.is_set():
            self._wake.set()
        return self.interest_version

    def wait_interest(self, version: int, timeout: float) -> bool:
        """Block this greenlet until the peer applied interest ``version`` (False: timeout or the
        stream broke meanwhile)."""
        if self.acked_interest >= version:
            return True
        if not self.connected:
            return False
        done = Event()
        self._waiters.append((version, done))
        done.wait(timeout)
        return self.acked_interest >= version

    def state(self) -> dict:
        st = self.stats
        return {
            "addr": self.addr,
            "reachable": self.connected,
            "queued": self.forward_queue.queued,
            "queued_bytes": self.forward_queue.queued_bytes,
            "in_flight": len(self.unacked),
            "forwarded_batches": st.batches,
            "forwarded_messages": st.messages,
            "failures": st.failures,
            "dropped": st.dropped,
            "expired": st.expired,
            "resent": st.resent,
        }

    def close(self) -> None:
        self._running = False
        self._watchdog.close()
        self._break_stream()
        self._wake.set()
        self._room.set()
        self._retry.set()
        self._greenlet.kill(block=False)

    def flush(self, timeout: float) -> bool:
        """Wait (bounded) until the queue is empty and every batch acknowledged (graceful stop)."""
        deadline = time.monotonic() + timeout
        while (self.queued or self.unacked) and self.connected and time.monotonic() < deadline:
            gevent.sleep(0.01)
        return not self.queued and not self.unacked

    def drain(self, timeout: float) -> bool:
        """Wait (bounded) until every message queued so far is acknowledged (applied by the peer);
        what is queued meanwhile is not waited for. False: timeout, or the peer is unreachable."""
        target = self.taken + self.queued  # the messages queued now are taken by then
        deadline = time.monotonic() + timeout
        carried = None  # the last batch that may hold one of them
        while self.connected:
            if carried is None and self.taken >= target:
                carried = self.seq
            if carried is not None and (not self.unacked or next(iter(self.unacked)) > carried):
                return True
            if time.monotonic() >= deadline:
                return False
            gevent.sleep(0.002)
        return False

    # -- the sender greenlet -------------------------------------------------------------------

    def _run(self) -> None:
        backoff = RECONNECT_MIN
        while self._running:
            connects = self.stats.connects
            try:
                self._open_stream()
                while self._running and self._call is not None:
                    self._send_some()
            except gevent.GreenletExit:
                raise
            except Exception:
                log.exception("peer_link_error", extra={"peer": self.node_id})
                self._break_stream()
            if not self._running:
                return
            if self.stats.connects != connects:
                backoff = RECONNECT_MIN  # the peer answered: it went away just now
            if self._retry.wait(backoff):
                # the peer's own stream reached this node: it is back, try again now
                self._retry.clear()
                backoff = RECONNECT_MIN
            else:
                backoff = min(backoff * 2, RECONNECT_MAX)

    def retry_now(self) -> None:
        """The peer is back (a stream of its own reached this node, ``ClusterPeers`` saw its
        interest snapshot): a link waiting out its reconnect backoff tries again at once, so a
        restarted peer is reached in milliseconds, not after up to ``RECONNECT_MAX``."""
        if not self.connected:
            self._retry.set()

    def _open_stream(self) -> None:
        out: Queue = Queue()
        self._out = out

        def requests():
            while True:
                batch = out.get()
                if batch is None:
                    return
                yield batch

        self._call = call = self.stub.Route(requests())
        # A stream that takes writes from its caller (the Unix channel's) gets each batch from
        # this greenlet directly; the request iterator then only carries its end.
        self._write = getattr(call, "write", None)
        gevent.spawn(self._read_acks, call)
        # Unacknowledged batches first, in order (the peer skips those it applied), then the whole
        # interest set: the changes those batches carry are older than it. An unacknowledged earlier
        # snapshot is dropped, not sent again: the new one holds all of its interest (so a peer down
        # for long keeps one snapshot here, not one per reconnect).
        # The stream's first batch names this link's sender and epoch: a plain RawBatch, which
        # names none (the receiver takes the stream's), is sent first with a head that does.
        self.unacked.pop(self._snapshot_seq, None)
        first = True
        for seq, (batch, _sent, n, iv) in list(self.unacked.items()):
            self.unacked[seq] = (batch, time.monotonic(), n, iv)
            if first and type(batch) is RawBatch:
                batch = batch.named(self.local_id, self.epoch)
            first = False
            self._put(batch)
            self.stats.resent += 1
        self.interest.clear()
        snapshot = sorted(self._local_filters())
        self._snapshot_seq = seq = self._next_seq()
        self._send(
            build_batch(self.local_id, self.epoch, seq, [], [(f, True) for f in snapshot], snapshot=True)[0],
            0,
        )

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _send(self, batch, n: int) -> None:
        self.unacked[batch.seq] = (batch, time.monotonic(), n, self.interest_version)
        self._put(batch)

    def _put(self, batch) -> None:
        """Onto the stream, in order: written now (a stream that takes writes), else queued for
        its writer."""
        if self._write is not None:
            # One writer at a time, in the order the batches were taken: the sender greenlet and the
            # ack reader (_send_from_ack) both write, and a write the socket's buffer cannot take at
            # once waits for room (another frame must not go in the middle of it).
            with self._write_lock:
                self._write(batch)
        else:
            self._out.put(batch)

    def _send_from_ack(self) -> bool:
        """Called by the ack reader after an ack: when the sender greenlet waits while its next
        batch fills (batches in flight) and that batch may go now (nothing left in flight, or it is
        full), take and send it here instead of waking the sender, which stays parked: in steady
        streaming a batch then costs no switch to the sender greenlet and back. False: wake it."""
        if not self._filling or self._write_lock.locked() or self._write is None or not self.connected:
            return False
        s = self.settings
        fq = self.forward_queue
        if self.unacked and fq.queued < s.batch_max_size:
            return False  # still filling: the sender greenlet decides (it may be past its delay)
        if not fq.queued and not self.interest:
            return False
        self._take_and_send()
        return True

    def _tick(self) -> None:
        """The watchdog (every CHECK_INTERVAL, in the hub): while a batch is unacknowledged (or the
        stream unanswered), wake the sender so that it checks the oldest batch's age."""
        if self.unacked or not self.connected:
            self._wake.set()
            self._room.set()

    def _send_some(self) -> None:
        s = self.settings
        self._wake.wait()  # (the watchdog wakes it while a batch's age is to be checked)
        if self._call is None:
            return
        self._check_ack_age()
        if not self.connected:
            # Nothing new goes into a stream the peer has not answered yet (it may be down): the
            # messages stay in the bounded queue, and the retried batches and the snapshot go first.
            self._room.clear()
            self._room.wait()
            return
        fq = self.forward_queue
        if not fq.queued and not self.interest:
            self._wake.clear()
            return
        # (No yield here for "the rest of the turn": the wake-up is a loop callback, run after every
        # read of the turn's I/O phase, so what this turn's readers queued is in the queue already;
        # a sleep(0) cost two greenlet switches per batch and added nothing to it.)
        while len(self.unacked) >= s.batches_in_flight and self._call is not None:
            self._room.clear()
            self._room.wait()
            self._check_ack_age()
        if self._call is None:
            return
        if s.batch_max_delay > 0:
            # A batch is in flight: this one fills until it is full, the in-flight ones are
            # acknowledged, or its oldest message has waited batch_max_delay. (Meanwhile the ack
            # reader may send it itself: _send_from_ack.)
            while self.unacked and fq.queued < s.batch_max_size and self._call is not None:
                left = self._first_at + s.batch_max_delay - time.monotonic()
                if left <= 0:
                    break
                self._room.clear()
                timer = self._loop.timer(left)  # (a libev timer: no gevent Timeout per batch)
                timer.start(self._room.set)
                self._filling = True
                try:
                    self._room.wait()
                finally:
                    self._filling = False
                    timer.close()
            if self._call is None:
                return
            if not fq.queued and not self.interest:
                return  # the ack reader sent it
        self._take_and_send()

    def _take_and_send(self) -> None:
        """Take the next batch from the queue and send it."""
        fq = self.forward_queue
        # (in C: the tail sealed, the entries popped, the counters lowered; a run of the relay's
        # holds at most batch_max_size messages: a batch at most about twice)
        entries, n = fq.take(self.settings.batch_max_size, BATCH_MAX_BYTES)
        self.taken += n
        interest, self.interest = self.interest, []
        self.seq = seq = self.seq + 1
        if self._raw:
            batch, expired = build_raw_batch(self.local_id, self.epoch, seq, entries, interest, plain=True)
        else:
            batch, expired = build_batch(self.local_id, self.epoch, seq, entries, interest)
        if expired:
            self.stats.expired += expired
        self._send(batch, n - expired)
        if not fq.queued and not self.interest:
            self._wake.clear()

    def _check_ack_age(self) -> None:
        if not self.unacked:
            return
        _batch, sent, _n, _iv = next(iter(self.unacked.values()))
        if time.monotonic() - sent > self.settings.publish_timeout:
            log.warning(
                "peer_ack_timeout",
                extra={
                    "peer": self.node_id,
                    "in_flight": len(self.unacked),
                    "timeout": self.settings.publish_timeout,
                },
            )
            self.stats.failures += 1
            self._break_stream()

    def _break_stream(self) -> None:
        call, self._call = self._call, None
        if self._out is not None:
            self._out.put(None)
            self._out = None
        if call is not None:
            call.cancel()
        self.connected = False
        self.interest.clear()
        waiters, self._waiters = self._waiters, []
        for _v, done in waiters:
            done.set()
        self._wake.set()
        self._room.set()

    def _read_acks(self, call) -> None:
        try:
            for ack in call:
                if call is not self._call:
                    return
                if not self.connected:
                    self.connected = True
                    self._down_logged = False
                    self.stats.connects += 1
                    log.info(
                        "peer_connected",
                        extra={"peer": self.node_id, "addr": self.addr, "resent": len(self.unacked) - 1},
                    )
                # (a Unix channel's plain ack is its sequence id alone: batch.decode_ack)
                entry = self.unacked.pop(ack_seq(ack), None)
                if entry is not None:
                    n, iv = entry[2], entry[3]
                    # (held by nothing now: the runs' bytes of an acknowledged batch are the spares
                    # the relay's next tails are written into; kept in a local until the next ack,
                    # they were not free when those tails began, each a fresh allocation)
                    entry = None
                    self.stats.batches += 1
                    self.stats.messages += n
                    if iv > self.acked_interest:
                        self.acked_interest = iv
                        if self._waiters:
                            left = []
                            for version, done in self._waiters:
                                if version <= iv:
                                    done.set()
                                else:
                                    left.append((version, done))
                            self._waiters = left
                if self._on_ack is not None and type(ack) is not int and ack.busy_groups:
                    self._on_ack(self.node_id, ack)
                if not self._send_from_ack():
                    self._room.set()
        except grpc.RpcError as exc:
            if call is self._call:
                code = exc.code() if hasattr(exc, "code") else None
                # One warning per outage; the reconnect attempts while the peer stays away are debug.
                level = logging.DEBUG if self._down_logged and not self.connected else logging.WARNING
                self._down_logged = True
                log.log(
                    level,
                    "peer_stream_failed",
                    extra={
                        "peer": self.node_id,
                        "addr": self.addr,
                        "code": getattr(code, "name", str(code)),
                        "queued": self.queued,
                    },
                )
        except Exception:
            log.exception("peer_stream_error", extra={"peer": self.node_id})
        if call is self._call:
            self.stats.failures += 1
            self._break_stream()
