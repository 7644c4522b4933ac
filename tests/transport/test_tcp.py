"""TCPListener at the process's file-descriptor limit: the budget's tiers and a failed accept.

The listener runs in a child process with a small ``RLIMIT_NOFILE`` (this test process keeps its
own), which fills its descriptors with ``/dev/null`` on command so that the next accepted socket
lands where the test wants: past every descriptor (accept fails with EMFILE), on the last few
(closed without a CONNACK) or past the budget (CONNACK "server unavailable"). Every wait is bounded.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from fluxmq._core import codec as c
from fluxmq.transport.fdlimit import CLOSE_AT_ONCE, RESERVE_MIN

REPO = Path(__file__).resolve().parents[2]
LIMIT = 96
WAIT = 10.0

CHILD = f"""
import logging, os, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, ({LIMIT}, {LIMIT}))
logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(message)s")
import gevent
from gevent.fileobject import FileObjectPosix
from tests.transport.harness import InProcessListener

server = InProcessListener()
print("port", server.port, flush=True)
fillers = []
commands = FileObjectPosix(sys.stdin.fileno(), "r", close=False)
for line in commands:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "fill":  # every descriptor taken, then the highest ``arg`` given back
        try:
            while True:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        for _ in range(int(arg)):
            os.close(fillers.pop())
    elif cmd == "free":
        while fillers:
            os.close(fillers.pop())
    elif cmd == "quit":
        break
    print("done", cmd, flush=True)
"""


class Child:
    def __init__(self, tmp: Path) -> None:
        self.err_path = tmp / "child.err"
        self.err = open(self.err_path, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err, text=True)  # fmt: skip
        self.port = int(self.proc.stdout.readline().split()[1])

    def command(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == f"done {cmd.split()[0]}"

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.command("quit")
            except (OSError, AssertionError):
                pass
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
        self.err.close()


def client(port: int, client_id: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.sendall(c.encode(c.Connect(client_id=client_id), 4))
    return sock


def answer(sock: socket.socket, n: int = 4) -> bytes:
    """Up to ``n`` bytes the broker sent before closing or within WAIT (a CONNACK is 4 bytes)."""
    data = b""
    deadline = time.monotonic() + WAIT
    while len(data) < n and time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(n - len(data))
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    return data


def test_budget_tiers_and_a_failed_accept_are_logged_and_survived(tmp_path: Path) -> None:
    child = Child(tmp_path)
    held = []
    try:
        held.append(client(child.port, "held"))
        assert answer(held[0]) == b"\x20\x02\x00\x00"
        # Past the budget but not on the last descriptors: CONNACK "server unavailable".
        child.command(f"fill {(RESERVE_MIN + CLOSE_AT_ONCE) // 2}")
        with client(child.port, "over-budget") as sock:
            assert answer(sock) == b"\x20\x02\x00\x03"
        # On the last descriptors: closed without reading the CONNECT.
        child.command(f"fill {CLOSE_AT_ONCE // 2}")
        with client(child.port, "last-fds") as sock:
            assert answer(sock) == b""
        # No descriptor at all: the accept fails; the client waits in the backlog meanwhile and is
        # served once descriptors come back (the listener resumes accepting after its pause).
        child.command("fill 0")
        waiting = client(child.port, "waiting")
        held.append(waiting)
        deadline = time.monotonic() + WAIT
        while "accept_failed_fd_limit" not in child.stderr() and time.monotonic() < deadline:
            time.sleep(0.05)
        child.command("free")
        assert answer(waiting) == b"\x20\x02\x00\x00"
        held[0].sendall(b"\xc0\x00")  # the first client was served throughout
        assert answer(held[0], 2) == b"\xd0\x00"
        assert child.proc.poll() is None
        err = child.stderr()
        assert "connection_refused_fd_limit" in err and "accept_failed_fd_limit" in err, err
        assert "Traceback" not in err, err
    finally:
        for sock in held:
            sock.close()
        child.stop()
