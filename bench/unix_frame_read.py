"""A fan-in batch's read on the receiving worker, in one process: ``count`` batches of ``messages``
relay-framed messages (64-byte payloads; 1,900: ~230 KB, a fan-in batch between workers) written to
a Unix socket pair by a greenlet (``write_raw_batch``) and read back (``FrameReader.read`` and
``read_batch``), each dropped once read, as the stream drops a batch it applied. Run it twice with
two counts under callgrind (instructions) or ``perf stat`` (page faults, system calls) and divide
the difference by the difference in batches. ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment
fixes glibc's mmap threshold at its default, as a worker has it (a freed mapping raises it in a
process such as this one)::

    MALLOC_MMAP_THRESHOLD_=131072 perf stat -e page-faults,raw_syscalls:sys_enter \\
        .venv/bin/python -m bench.unix_frame_read 250
"""

from __future__ import annotations

import sys
from collections import deque

import gevent
from gevent import socket

from fluxmq._core.forward import ForwardQueue
from fluxmq.cluster.batch import build_raw_batch
from fluxmq.cluster.unix import FrameReader, read_batch, write_raw_batch


def main(argv: list[str]) -> int:
    count = int(argv[0])
    messages = int(argv[1]) if len(argv) > 1 else 1900
    runs: deque = deque()
    fq = ForwardQueue(runs, 1 << 30, 1 << 40, messages, 1 << 40)
    for i in range(messages):
        fq.append(f"in/{i % 100}", "pub", 0, b"p" * 60 + i.to_bytes(4, "big"))
    fq.seal()
    batch = build_raw_batch("w0", 1, 1, list(runs))[0]
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    reader = FrameReader(b)
    writer = gevent.spawn(lambda: [write_raw_batch(a, batch) for _ in range(count)])
    size = 0
    for _ in range(count):
        got = read_batch(reader.read())
        size += len(got.items)
        del got  # (applied)
    writer.get()
    frames = getattr(reader, "frames", None)
    reuse = f", frames allocated {frames.allocated}, reused {frames.reused}" if frames is not None else ""
    print(f"{count} batches of {messages} messages, {size // count} bytes each{reuse}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
