"""Instructions of one batch between two workers' transports, and nothing else: two
``UnixTransport``s in one process (the sender's ``PeerLink`` on a ``UnixChannel``, the receiver's
Route server), ``count`` batches of ``size`` plain messages (the relay's ``ForwardQueue.append``)
sent one at a time (each acknowledged before the next is queued); the receiver's ``on_batch``
only counts. Run under callgrind with two counts and divide the difference by the difference in
batches: what a batch costs the transport (sender, receiver, ack reader), without delivery::

    for n in 200 1200; do valgrind --tool=callgrind --callgrind-out-file=/tmp/wbi.$n \\
        .venv/bin/python -m bench.workers_batch_instr $n [size]; done
"""

from __future__ import annotations

import gc
import sys
import tempfile

import gevent
import gevent.event

from fluxmq.cluster.config import TransportSettings
from fluxmq.cluster.proto import cluster_pb2 as pb
from fluxmq.cluster.unix import UnixTransport


def main(argv: list[str]) -> int:
    count = int(argv[0])
    size = int(argv[1]) if len(argv) > 1 else 1
    tmp = tempfile.mkdtemp(prefix="wbi-")
    addrs = {"w0": f"unix:{tmp}/w0.sock", "w1": f"unix:{tmp}/w1.sock"}
    received = [0]

    def on_batch(batch):
        received[0] += batch.count
        return pb.BatchAck(seq=batch.seq)

    sender = UnixTransport("w0", 1, TransportSettings(bind_addr=addrs["w0"]), on_batch, lambda: [])
    receiver = UnixTransport("w1", 1, TransportSettings(bind_addr=addrs["w1"]), on_batch, lambda: [])
    sender.start()
    receiver.start()
    sender.set_peers(addrs)
    link = sender.links["w1"]
    payload = b"x" * 64
    with gevent.Timeout(120):
        while not link.connected:
            gevent.sleep(0.01)
        # woken by the ack reader once per ack (no polling loop in the count)
        acked = gevent.event.Event()
        send_from_ack = link._send_from_ack

        def on_ack() -> bool:
            acked.set()
            return send_from_ack()

        link._send_from_ack = on_ack
        gc.freeze()
        start = link.stats.batches
        for i in range(count):
            acked.clear()
            for _ in range(size):
                link.forward_queue.append("t", "pub", 0, payload)
            while link.stats.batches < start + i + 1:
                acked.wait()
                acked.clear()
    batches = link.stats.batches - start
    sender.stop(0.5)
    receiver.stop(0.5)
    print(f"batches={batches} received={received[0]}")
    return 0 if received[0] == count * size else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
