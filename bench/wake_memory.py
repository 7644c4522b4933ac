"""Broker RSS per connection: idle, right after one PINGREQ each, and parked again (issue 16).

Usage: python -m bench.wake_memory N PORT WORKER_PID [ping|publish]
(a node on 127.0.0.1:PORT; N < the fd limit), or
python -m bench.wake_memory --node TREE N [ping|publish]: a fresh node from checkout TREE (the
``bench/compare`` configuration, pinned to CPU 1; the client pinned to CPU 0), stopped after. ``ping`` (default): each connection sends one PINGREQ
and reads the PINGRESP. ``publish``: each sends one QoS 1 PUBLISH (to a topic nobody subscribes to)
and reads the PUBACK: a wake-up that needs a greenlet.
"""

from __future__ import annotations

import resource
import socket
import sys
import time

PARK_WAIT = 7.0  # seconds: more than the 5 s park_after


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def with_node(tree: str, n: int, wake: str) -> None:
    """Run this benchmark as a pinned child against a fresh node from checkout ``tree``."""
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from bench import procinfo  # noqa: PLC0415
    from bench.lone_cost import _TreeNode  # noqa: PLC0415

    node = _TreeNode(Path(tree).resolve(), cpus="1")
    node.start(timeout=60)
    try:
        worker = procinfo.tree(node.pid)[-1]
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        subprocess.run(
            [
                "taskset",
                "-c",
                "0",
                sys.executable,
                "-m",
                "bench.wake_memory",
                str(n),
                str(node.port),
                str(worker),
                wake,
            ],
            cwd=here,
            check=True,
            timeout=600,
        )
    finally:
        node.cleanup()


def main() -> None:
    if sys.argv[1] == "--node":
        with_node(sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "ping")
        return
    n, port, pid = (int(a) for a in sys.argv[1:4])
    wake = sys.argv[4] if len(sys.argv) > 4 else "ping"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 100)), hard))
    base = rss_kb(pid)
    socks = []
    for i in range(n):
        sock = socket.create_connection(("127.0.0.1", port))
        cid = b"wake%06d" % i
        sock.sendall(
            bytes([0x10, 12 + len(cid)]) + b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
        )
        socks.append(sock)
    for sock in socks:
        assert sock.recv(4)[:1] == b"\x20"
    time.sleep(PARK_WAIT)
    idle = rss_kb(pid)
    if wake == "ping":
        request, reply = b"\xc0\x00", b"\xd0\x00"  # PINGREQ, PINGRESP
    else:  # PUBLISH QoS 1, topic "wake/x", packet id 1, 8-byte payload; PUBACK
        request, reply = b"\x32\x12\x00\x06wake/x\x00\x01" + b"p" * 8, b"\x40\x02\x00\x01"
    for sock in socks:
        sock.sendall(request)
    for sock in socks:
        assert sock.recv(len(reply)) == reply
    time.sleep(1)
    woken = rss_kb(pid)
    time.sleep(PARK_WAIT)
    parked = rss_kb(pid)
    for label, kb in (("idle", idle), (f"after_{wake}", woken), ("parked_again", parked)):
        print(f"{label}: {kb} kB, {(kb - base) * 1024 // n} B per connection")


if __name__ == "__main__":
    main()
