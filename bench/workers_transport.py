"""The transport between the workers of one node (issue 16): gRPC over TCP, gRPC over a Unix socket
(``unix:`` target, what ``server.workers`` uses) and a plain Unix socket carrying the same ``Batch``
messages with a 4-byte length prefix (one framing per batch, no HTTP/2).

Two gevent processes; the server parses every batch and decodes every message blob
(``fluxmq.storage.records``, 64-byte payloads) and acknowledges it, as ``ClusterPeers.apply_batch``
does before routing; the client keeps ``--window`` batches unacknowledged, as ``PeerLink`` does.

Usage::

    python -m bench.workers_transport [--seconds 2] [--batches 16,256] [--window 4]

Prints one line per (transport, batch size): messages/s and batch round trip p50/p99 (ms).
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time

if __name__ == "__main__" or os.environ.get("FLUXMQ_BENCH_WT_SERVER"):
    from gevent import monkey

    monkey.patch_all()
    from grpc.experimental import gevent as grpc_gevent

    grpc_gevent.init_gevent()

import gevent  # noqa: E402
import gevent.lock  # noqa: E402
import grpc  # noqa: E402

from bench.cluster_grpc import apply_batch, make_batch, pct_ms, run_stream  # noqa: E402
from fluxmq.broker.message import Message  # noqa: E402
from fluxmq.cluster.proto import cluster_pb2 as pb  # noqa: E402
from fluxmq.cluster.proto import cluster_pb2_grpc as pb_grpc  # noqa: E402
from fluxmq.storage.records import encode_message  # noqa: E402

HEADER = struct.Struct(">I")


class _Sink(pb_grpc.ClusterTransportServicer):
    def Route(self, request_iterator, context):  # noqa: N802 (gRPC's name)
        for batch in request_iterator:
            yield apply_batch(batch)


def _recv_exact(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _raw_conn(sock) -> None:
    try:
        while True:
            (n,) = HEADER.unpack(_recv_exact(sock, 4))
            ack = apply_batch(pb.Batch.FromString(_recv_exact(sock, n))).SerializeToString()
            sock.sendall(HEADER.pack(len(ack)) + ack)
    except (EOFError, OSError):
        sock.close()


def serve(kind: str, addr: str) -> None:
    if kind == "raw":
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(addr)
        listener.listen(16)
        print("ready", flush=True)
        while True:
            conn, _ = listener.accept()
            gevent.spawn(_raw_conn, conn)
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_ClusterTransportServicer_to_server(_Sink(), server)
    server.add_insecure_port(addr)
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def run_grpc(addr: str, size: int, seconds: float, blob: bytes, window: int) -> tuple[int, list[float]]:
    channel = grpc.insecure_channel(addr)
    grpc.channel_ready_future(channel).result(timeout=10)
    stub = pb_grpc.ClusterTransportStub(channel)
    acked, _, rtts = run_stream(stub, size, seconds, blob, window)
    channel.close()
    return acked, rtts


def run_raw(path: str, size: int, seconds: float, blob: bytes, window: int) -> tuple[int, list[float]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sent_at: dict[int, float] = {}
    rtts: list[float] = []
    acked = [0]
    room = gevent.lock.Semaphore(window)

    def read_acks():
        try:
            while True:
                (n,) = HEADER.unpack(_recv_exact(sock, 4))
                ack = pb.BatchAck.FromString(_recv_exact(sock, n))
                rtts.append(time.perf_counter() - sent_at.pop(ack.seq))
                acked[0] += 1
                room.release()
        except (EOFError, OSError):
            return

    reader = gevent.spawn(read_acks)
    end = time.perf_counter() + seconds
    seq = 0
    while time.perf_counter() < end:
        room.acquire()
        seq += 1
        sent_at[seq] = time.perf_counter()
        data = make_batch(seq, size, blob).SerializeToString()
        sock.sendall(HEADER.pack(len(data)) + data)
    deadline = time.perf_counter() + 10
    while acked[0] < seq and time.perf_counter() < deadline:
        gevent.sleep(0.001)
    sock.close()
    reader.kill()
    return acked[0] * size, rtts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--batches", default="16,256")
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(*args.serve)
        return 0
    tmp = tempfile.mkdtemp(prefix="fluxmq-wt-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    transports = [
        ("grpc-tcp", "grpc", f"127.0.0.1:{port}"),
        ("grpc-unix", "grpc", f"unix:{tmp}/g.sock"),
        ("raw-unix", "raw", f"{tmp}/r.sock"),
    ]
    blob = encode_message(Message("bench/topic/1", b"x" * 64, 1, False, {0x26: [("k", "v")]}))
    print(f"{'transport':<12}{'batch':>6}{'msg/s':>12}{'rtt p50 ms':>12}{'rtt p99 ms':>12}")
    env = dict(os.environ, FLUXMQ_BENCH_WT_SERVER="1")
    for name, kind, addr in transports:
        server = subprocess.Popen(
            [sys.executable, "-m", "bench.workers_transport", "--serve", kind, addr],
            stdout=subprocess.PIPE,
            env=env,
        )
        try:
            assert server.stdout.readline().strip() == b"ready"
            for size in [int(b) for b in args.batches.split(",")]:
                run = run_raw if kind == "raw" else run_grpc
                n, rtts = run(addr, size, args.seconds, blob, args.window)
                print(
                    f"{name:<12}{size:>6}{n / args.seconds:>12,.0f}{pct_ms(rtts, 0.5):>12.3f}{pct_ms(rtts, 0.99):>12.3f}",
                    flush=True,
                )
        finally:
            server.terminate()
            server.wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
