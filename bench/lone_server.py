"""The server side of lone messages, in one process, for instruction counts (callgrind).

A Broker (memory storage) and a TCPListener with the node's default protocol settings run in this
process; ``bench.loadgen --mode latency`` runs as a child process against it (one publisher, one
subscriber, paced messages that travel alone). Under ``valgrind --tool=callgrind`` (which traces
this process only) run it twice with the same ``--duration`` and two ``--rate``s low enough that
every message is still alone at valgrind's speed, and divide the difference of the instruction
counts by the difference of the messages: the idle work (timers, the loop) cancels, and what is
left is the server's own cost per lone message (read, decode, route, write, the event loop's turn),
without the clients'.

Usage (from the repository root)::

    valgrind --tool=callgrind python -m bench.lone_server --rate 50 --duration 20
    valgrind --tool=callgrind python -m bench.lone_server --rate 100 --duration 20
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"  # noqa: A001


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=50)
    ap.add_argument("--duration", type=float, default=20)
    args = ap.parse_args(argv)

    from gevent import subprocess

    from fluxmq.broker.broker import Broker, BrokerSettings
    from fluxmq.protocol.flush import FlushScheduler
    from fluxmq.protocol.settings import ProtocolSettings
    from fluxmq.storage.memory import MemoryStorage
    from fluxmq.transport.tcp import TCPListener

    storage = MemoryStorage()
    broker = Broker(BrokerSettings(), storage)
    broker.restore(storage.load())
    listener = TCPListener("tcp", "127.0.0.1", 0, broker, ProtocolSettings(), FlushScheduler(storage))
    listener.start()
    cmd = [sys.executable, "-m", "bench.loadgen", "--mode", "latency", "--rate", str(args.rate),
           "--duration", str(args.duration), "--host", "127.0.0.1", "--port", str(listener.address[1]),
           "--timeout", str(args.duration * 4 + 60)]  # fmt: skip
    out = subprocess.run(
        cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)) or "."
    )
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            print(line, flush=True)
    if out.returncode:
        print(out.stderr[-500:], file=sys.stderr)
    listener.stop_accepting()
    return out.returncode


if __name__ == "__main__":
    sys.exit(main())
