"""tests/conftest.py's ``free_port`` across test sessions running at once on one host."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT

# A session that hands out ports and holds them (the moment before its nodes bind them), printed.
_HOLDER = (
    "import sys\n"
    "from tests.conftest import free_port\n"
    "print(' '.join(str(free_port()) for _ in range(int(sys.argv[1]))), flush=True)\n"
    "sys.stdin.read()\n"
)


def _session(n: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(n)],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
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
