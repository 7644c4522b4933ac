"""tests/conftest.py's ``free_port`` across test sessions running at once on one host."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT, RESERVED

# A session that hands out ports and holds them (the moment before its nodes bind them), printed.
_HOLDER = (
    "import sys\n"
    "from tests.conftest import free_port\n"
    "print(' '.join(str(free_port()) for _ in range(int(sys.argv[1]))), flush=True)\n"
    "sys.stdin.read()\n"
)


def _session(n: int, reservations: Path | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    if reservations is not None:
        env["FLUXMQ_TEST_PORTS_DIR"] = str(reservations)
    return subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(n)],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_a_port_another_session_handed_out_is_not_handed_out_again() -> None:
    """Two sessions draw from the same range: a port one of them handed out and its node has not
    bound yet is skipped by the other (else its node fails with "Address already in use")."""
    first = _session(200)
    try:
        theirs = set(map(int, first.stdout.readline().split()))
        second = _session(1000)
        try:
            mine = set(map(int, second.stdout.readline().split()))
        finally:
            second.communicate("", timeout=30)
    finally:
        first.communicate("", timeout=30)
    assert len(theirs) == 200 and len(mine) == 1000
    assert not theirs & mine


def test_a_reservation_released_or_ended_leaves_no_lock_file(tmp_path) -> None:
    """A session holds a lock file per port it reserves; it removes the file when it releases the
    port (while it still holds the lock) and at its end, so the shared directory does not keep one
    empty file per port ever handed out. A file left by a session that was killed is removed by
    the next session (when nobody holds its lock)."""
    reservations = tmp_path / "ports"
    n = RESERVED + 44
    first = _session(n, reservations)
    try:
        ports = list(map(int, first.stdout.readline().split()))
        held = {int(p.name) for p in reservations.iterdir()}
        # the last RESERVED are held; the 44 released since have no file left
        assert held == set(ports[-RESERVED:]), (len(held), len(ports))
    finally:
        first.communicate("", timeout=30)
    assert not list(reservations.iterdir())
    killed = _session(10, reservations)
    killed.stdout.readline()
    killed.kill()
    killed.wait(30)
    assert len(list(reservations.iterdir())) == 10  # its locks died with it, its files did not
    after = _session(1, reservations)
    try:
        mine = after.stdout.readline().split()
        assert [p.name for p in reservations.iterdir()] == mine  # the dead session's files are gone
    finally:
        after.communicate("", timeout=30)
    assert not list(reservations.iterdir())
