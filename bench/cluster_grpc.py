"""gRPC under gevent, measured before the cluster's data plane was designed (issue 11).

Two processes on loopback, both gevent-patched with ``grpc.experimental.gevent.init_gevent()``: a
server running the real ``ClusterTransport`` service shape (it parses every batch and acks it), and
a client that sends ``fluxmq.storage.records`` message blobs (64-byte payloads) in three ways:

* ``unary``: one ``Call`` per batch, waiting for each reply (batch 1 = one RPC per message);
* ``stream``: one bidi ``Route`` stream, batches sent with up to ``--window`` unacknowledged;
* ``stream-rtt``: the same stream with one batch at a time: the batch round-trip time.

Usage::

    python -m bench.cluster_grpc [--seconds 2] [--batches 1,16,256] [--window 8]

Prints one line per (mode, batch size): messages/s, batches/s and batch RTT p50/p99 in ms.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

if __name__ == "__main__" or os.environ.get("FLUXMQ_BENCH_GRPC_SERVER"):
    from gevent import monkey

    monkey.patch_all()
    import grpc
    from grpc.experimental import gevent as grpc_gevent

    grpc_gevent.init_gevent()

import gevent  # noqa: E402
import grpc  # noqa: E402
from gevent.queue import Queue  # noqa: E402

from fluxmq.broker.message import Message  # noqa: E402
from fluxmq.cluster.batch import Outgoing, build_batch, decode_items  # noqa: E402
from fluxmq.cluster.proto import cluster_pb2 as pb  # noqa: E402
from fluxmq.cluster.proto import cluster_pb2_grpc as pb_grpc  # noqa: E402
from fluxmq.storage.records import encode_message  # noqa: E402


def apply_batch(batch: pb.Batch) -> pb.BatchAck:
    """Decode every item of ``batch`` (as ``ClusterPeers.apply_batch`` does, without routing) and
    acknowledge it."""
    for _ in decode_items(batch.items):
        pass
    return pb.BatchAck(seq=batch.seq)


class _Sink(pb_grpc.ClusterTransportServicer):
    def Route(self, request_iterator, context):  # noqa: N802 (gRPC's name)
        for batch in request_iterator:
            yield apply_batch(batch)

    def Call(self, request, context):  # noqa: N802
        batch = pb.Batch.FromString(request.payload)
        for _ in decode_items(batch.items):
            pass
        return pb.CallReply()


def serve(port: int) -> None:
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_ClusterTransportServicer_to_server(_Sink(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def make_batch(seq: int, size: int, blob: bytes) -> pb.Batch:
    """Batch ``seq`` of ``size`` copies of the encoded message ``blob``, as a peer link builds it."""
    return build_batch("bench", 1, seq, [Outgoing(blob, (), True, None) for _ in range(size)])[0]


def pct_ms(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (seconds) in milliseconds; 0 for none."""
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else 0.0


def run_unary(stub, size: int, seconds: float, blob: bytes) -> tuple[int, int, list[float]]:
    payload = make_batch(1, size, blob).SerializeToString()
    end = time.perf_counter() + seconds
    n = 0
    rtts = []
    while time.perf_counter() < end:
        t = time.perf_counter()
        stub.Call(pb.CallRequest(sender="bench", kind="batch", payload=payload), timeout=5)
        rtts.append(time.perf_counter() - t)
        n += 1
    return n * size, n, rtts


def run_stream(stub, size: int, seconds: float, blob: bytes, window: int) -> tuple[int, int, list[float]]:
    """Batches of ``size`` copies of ``blob`` on one ``Route`` stream, at most ``window``
    unacknowledged, for ``seconds``: (messages acknowledged, batches acknowledged, round trips).
    bench/workers_transport.py measures its gRPC side with it too."""
    out: Queue = Queue()
    sent_at: dict[int, float] = {}
    rtts: list[float] = []
    acked = [0]
    room = gevent.lock.Semaphore(window)

    def requests():
        while True:
            batch = out.get()
            if batch is None:
                return
            yield batch

    responses = stub.Route(requests())

    def read_acks():
        for ack in responses:
            rtts.append(time.perf_counter() - sent_at.pop(ack.seq))
            acked[0] += 1
            room.release()

    reader = gevent.spawn(read_acks)
    end = time.perf_counter() + seconds
    seq = 0
    while time.perf_counter() < end:
        room.acquire()
        seq += 1
        sent_at[seq] = time.perf_counter()
        out.put(make_batch(seq, size, blob))
    deadline = time.perf_counter() + 10
    while acked[0] < seq and time.perf_counter() < deadline:
        gevent.sleep(0.001)
    out.put(None)
    reader.join(timeout=5)
    return acked[0] * size, acked[0], rtts


def main(argv: list[str] | None = None) -> int:
    import gevent.lock  # noqa: F401  (Semaphore)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--batches", default="1,16,256")
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, FLUXMQ_BENCH_GRPC_SERVER="1")
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.cluster_grpc", "--serve", str(port)], stdout=subprocess.PIPE, env=env
    )
    try:
        assert server.stdout.readline().strip() == b"ready"
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=10)
        stub = pb_grpc.ClusterTransportStub(channel)
        blob = encode_message(Message("bench/topic/1", b"x" * 64, 1, False, {0x26: [("k", "v")]}))
        print(f"{'mode':<12}{'batch':>6}{'msg/s':>12}{'batches/s':>11}{'rtt p50 ms':>12}{'rtt p99 ms':>12}")
        for size in [int(b) for b in args.batches.split(",")]:
            for mode in ("unary", "stream", "stream-rtt"):
                if mode == "unary":
                    msgs, batches, rtts = run_unary(stub, size, args.seconds, blob)
                else:
                    window = args.window if mode == "stream" else 1
                    msgs, batches, rtts = run_stream(stub, size, args.seconds, blob, window)
                print(
                    f"{mode:<12}{size:>6}{msgs / args.seconds:>12.0f}{batches / args.seconds:>11.0f}"
                    f"{pct_ms(rtts, 0.5):>12.2f}{pct_ms(rtts, 0.99):>12.2f}",
                    flush=True,
                )
        channel.close()
    finally:
        server.kill()
        server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
