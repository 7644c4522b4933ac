"""Instructions per batch of a link between two workers, both sides, on fan-in's steady-state path:
two ``UnixTransport``s in one process, one batch in flight, the next one queued meanwhile (by the
receiver's ``on_batch``: ``N`` relay-appended 64-byte messages) and taken and written by the
sender's ack reader when the ack arrives (``PeerLink._send_from_ack``), as between two workers of a
fan-in. Per batch: the ack reader's and the receiving stream's greenlet wakes, the batch's take,
build and write, its read and apply, the ack's write and read. Run it with two batch counts under
callgrind and divide the difference in instructions by the difference in batches::

    for b in 1000 3000; do valgrind --tool=callgrind --callgrind-out-file=/tmp/lb.$b \\
        .venv/bin/python -m bench.link_batch_instr $b 10; done

``on_batch`` stands in for ``ClusterPeers.receive`` (its Python and appends are in the figure: run
it alone with ``--harness`` to subtract them); ``--ack-message`` answers a ``BatchAck`` instead of
the sequence id (what ``ClusterPeers`` answered before the Unix transport framed plain acks).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import deque

PAYLOAD = b"p" * 64


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("batches", type=int)
    p.add_argument("messages", type=int, nargs="?", default=10, help="messages per batch")
    p.add_argument("--ack-message", action="store_true", help="on_batch answers a BatchAck")
    p.add_argument("--harness", action="store_true", help="only on_batch's own work, no link")
    args = p.parse_args(argv)

    import gevent
    from gevent.event import Event

    from fluxmq._core.forward import ForwardQueue
    from fluxmq.cluster.config import TransportSettings
    from fluxmq.cluster.proto import cluster_pb2 as pb
    from fluxmq.cluster.unix import UnixTransport

    n = args.messages
    left = [0]
    done = Event()
    queue: list = []  # [the sender's ForwardQueue]

    def on_batch(batch):
        if left[0] > 0:
            left[0] -= 1
            append = queue[0].append
            for _ in range(n):
                append("in/1", "pub", 0, PAYLOAD)
        elif left[0] == 0:
            left[0] = -1
            done.set()
        return pb.BatchAck(seq=batch.seq) if args.ack_message else batch.seq

    if args.harness:
        runs: deque = deque()
        fq = ForwardQueue(runs, 1 << 30, 1 << 40, 2048, 4 << 20, lambda: None)
        queue.append(fq)
        left[0] = args.batches

        class Head:
            seq = 1

        for _ in range(args.batches):
            on_batch(Head)
            fq.seal()
            runs.clear()
            fq.queued = fq.queued_bytes = 0
        return 0

    tmp = tempfile.mkdtemp()
    addrs = {"w0": f"unix:{tmp}/w0.sock", "w1": f"unix:{tmp}/w1.sock"}
    sender = UnixTransport(
        "w0", 1, TransportSettings(bind_addr=addrs["w0"], batch_max_size=2048), on_batch, list
    )
    receiver = UnixTransport(
        "w1", 1, TransportSettings(bind_addr=addrs["w1"], batch_max_size=2048), on_batch, list
    )
    sender.start()
    receiver.start()
    sender.set_peers(addrs)
    link = sender.links["w1"]
    queue.append(link.forward_queue)
    with gevent.Timeout(60):
        while not link.connected:
            gevent.sleep(0.01)

        def run(batches: int) -> None:
            done.clear()
            left[0] = batches
            for _ in range(n):
                link.forward_queue.append("in/1", "pub", 0, PAYLOAD)
            done.wait()
            while link.unacked:
                gevent.sleep(0.001)

        run(20)  # warm-up
        start = link.stats.batches
        run(args.batches)
    print("batches", link.stats.batches - start, file=sys.stderr)
    sys.stdout.flush()
    os._exit(0)  # (no orderly stop: its instructions would be in the figure)


if __name__ == "__main__":
    sys.exit(main())
