"""What one fan-in batch costs to cross between two workers, without the broker: the Unix socket's
copies (``ring 0``: the batch's frame written with ``sendmsg``, read into a reused ``bytes``) against
the shared-memory ring (``fluxmq.cluster.ring``: the frame copied into the ring, a 13-byte
descriptor on the socket, copied out on the other side). Issue 16, session 13 (xshm).

Two processes: a receiver (``fluxmq.cluster.unix``'s server, its Route stream applying nothing: an
ack per batch) and a sender (a ``UnixChannel`` Route stream writing ``RawBatch`` es of ``--messages``
relay-framed items, one at a time: the next once the previous one's ack is in, as a fan-in between
workers mostly runs). Each process's user and system CPU time (``getrusage``) over ``--batches``
batches after a warm-up, per batch, and its page faults and context switches.

Usage::

    python -m bench.workers_batch_copy [--batches 5000] [--messages 1900] [--payload 64] [--cpus 1]

One line per ring size (0 and ``RING_SIZE``), alternating ``--rounds`` times.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import gevent

from fluxmq.cluster import unix
from fluxmq.cluster.batch import ack_seq, build_raw_batch
from fluxmq.cluster.proto import cluster_pb2 as pb


def _usage() -> dict:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "user": r.ru_utime,
        "sys": r.ru_stime,
        "faults": r.ru_minflt,
        "switches": r.ru_nvcsw + r.ru_nivcsw,
    }


def _diff(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in a}


class _Receiver:
    """The part of a ``ClusterTransport`` the Unix server's Route stream uses: an ack per batch."""

    def __init__(self, batches: int) -> None:
        self.seen = 0
        self.start = None
        self.target = batches

    def on_batch(self, batch):
        self.seen += 1
        if self.seen == WARMUP:
            self.start = _usage()
        elif self.seen == WARMUP + self.target:
            print(json.dumps(_diff(self.start, _usage())), flush=True)
        return pb.BatchAck(seq=batch.seq)


WARMUP = 200


def serve(path: str, batches: int) -> None:
    server = unix._unix_server(_Receiver(batches), path)
    print("ready", flush=True)
    gevent.sleep(600)  # (the hub serves meanwhile; the parent ends this process)
    server.stop(timeout=0)


def send(path: str, batches: int, messages: int, payload: int, ring_size: int) -> dict:
    from collections import deque

    from fluxmq._core.forward import ForwardQueue

    runs: deque = deque()
    fq = ForwardQueue(runs, 1 << 30, 1 << 40, messages, 1 << 40)
    for i in range(messages):
        fq.append(f"in/{i % 100}", "pub", 0, b"p" * payload)
    fq.seal()
    channel = unix.UnixChannel(path)
    channel.ring_size = ring_size
    call = channel.stream_stream("/Route", None, pb.BatchAck.FromString)(iter(()))
    start = None
    for seq in range(1, WARMUP + batches + 1):
        if seq == WARMUP + 1:
            start = _usage()
        # (plain after the first, which names the stream's sender: as a link sends them)
        call.write(build_raw_batch("w0", 1, seq, list(runs), plain=seq > 1)[0])
        assert ack_seq(next(call)) == seq  # (a plain ack arrives as its seq alone)
    used = _diff(start, _usage())
    ring = call.ring
    used["ring_frames"] = ring.ring_frames if ring is not None else 0
    call.cancel()
    return used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=5000)
    ap.add_argument("--messages", type=int, default=1900)
    ap.add_argument("--payload", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpus", default="1", help="CPUs of both processes (taskset)")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--ring-size", type=int, default=-1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.batches)
        return
    if args.ring_size >= 0:
        print(
            json.dumps(
                send(os.environ["WBC_PATH"], args.batches, args.messages, args.payload, args.ring_size)
            )
        )
        return
    common = [
        "--batches",
        str(args.batches),
        "--messages",
        str(args.messages),
        "--payload",
        str(args.payload),
    ]
    py = [sys.executable, "-m", "bench.workers_batch_copy"]
    print(
        f"# {os.uname().nodename} load {os.getloadavg()[0]:.2f}, batches of {args.messages} x {args.payload} B"
    )
    print("| ring | side | user us/batch | sys us/batch | total | faults/batch | switches/batch |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for _ in range(args.rounds):
        for ring_size in (0, unix.RING_SIZE):
            with tempfile.TemporaryDirectory() as tmp:
                path = f"{tmp}/r.sock"
                server = subprocess.Popen(
                    ["taskset", "-c", args.cpus, *py, "--serve", path, *common],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                try:
                    assert server.stdout.readline().strip() == "ready"
                    out = subprocess.run(
                        ["taskset", "-c", args.cpus, *py, "--ring-size", str(ring_size), *common],
                        capture_output=True,
                        text=True,
                        timeout=120,
                        env={**os.environ, "WBC_PATH": path},
                        check=True,
                    ).stdout
                    sender = json.loads(out.strip().splitlines()[-1])
                    receiver = json.loads(server.stdout.readline())
                finally:
                    server.kill()
                    server.wait(10)
            for side, u in (("sender", sender), ("receiver", receiver)):
                n = args.batches
                print(
                    f"| {ring_size} | {side} | {u['user'] / n * 1e6:.1f} | {u['sys'] / n * 1e6:.1f} | "
                    f"{(u['user'] + u['sys']) / n * 1e6:.1f} | {u['faults'] / n:.2f} | {u['switches'] / n:.2f} |"
                )
            if ring_size:
                # (all but the stream's first batch, written before the receiver answered the
                # ring's offer and so inline: every measured one went through the ring)
                assert sender["ring_frames"] == args.batches + WARMUP - 1, sender
    print(f"# load {os.getloadavg()[0]:.2f} at the end, {time.strftime('%H:%M:%S', time.gmtime())} UTC")
    gevent.sleep(0)


if __name__ == "__main__":
    main()
