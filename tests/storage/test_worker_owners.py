"""The workers' shared registry of client-id owners (``fluxmq.storage.worker_owners``), on a real
LMDB environment shared by real processes."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

from fluxmq.storage.worker_owners import LocalOwnership

_OTHER_WORKER = """
import sys
import time
from fluxmq.storage.worker_owners import LocalOwnership
owners = LocalOwnership(sys.argv[1], "n1/w1")
assert owners.acquire_session("c-dead") is None
owners.close()
"""


_LIVE_WORKER = """
import sys
import time
from fluxmq.storage.worker_owners import LocalOwnership
owners = LocalOwnership(sys.argv[1], "n1/w1")
assert owners.acquire_session("c1") is None
print("claimed", flush=True)
sys.stdin.readline()  # the other worker took it over meanwhile
owners.release_session("c1")  # no longer w1's: must leave w0's entry alone
print("released", flush=True)
sys.stdin.readline()
"""


def worker(script: str, *args: str) -> subprocess.Popen:
    """A worker process running ``script`` with ``args`` (told to go on through its stdin)."""
    return subprocess.Popen(
        [sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def live_w1(path: str, w0: LocalOwnership) -> subprocess.Popen:
    """w1 (``_LIVE_WORKER``) once it owns c1."""
    w1 = worker(_LIVE_WORKER, path)
    assert w1.stdout.readline().strip() == "claimed"
    assert w0.owned_by("c1") == "n1/w1"
    return w1


def test_a_claim_is_refused_while_another_live_worker_owns_the_id_and_taken_when_it_hands_it_over(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "owners")
    w0 = LocalOwnership(path, "n1/w0")
    w1 = live_w1(path, w0)
    try:
        assert w0.acquire_session("c1") == "n1/w1"  # it must ask w1 to hand the session over
        assert w0.acquire_session("c1", take_from="n1/w1") is None
        w1.stdin.write("\n")
        w1.stdin.flush()
        assert w1.stdout.readline().strip() == "released"
        assert w0.owned_by("c1") == "n1/w0"
        w0.release_session("c1")
        assert w0.owned_by("c1") is None
    finally:
        w0.close()
        w1.stdin.close()
        w1.wait(timeout=30)


def test_an_id_owned_by_a_worker_that_died_belongs_to_nobody_and_is_adopted(tmp_path: Path) -> None:
    path = str(tmp_path / "owners")
    subprocess.run([sys.executable, "-c", _OTHER_WORKER, path], check=True)
    owners = LocalOwnership(path, "n1/w0")
    try:
        assert owners.owned_by("c-dead") is None  # its process is gone (a worker killed with -9)
        assert owners.acquire_session("c-dead") is None
        assert owners.adopt(["c-dead", "c-new"]) == []
        assert owners.owned_by("c-new") == "n1/w0"
    finally:
        owners.close()


# A worker that owned ``argv[2:]`` (its record written by its adoption at start) and was killed -9.
_KILLED_WORKER = """
import sys
import time
from fluxmq.storage.worker_owners import LocalOwnership
owners = LocalOwnership(sys.argv[1], "n1/w1")
assert owners.adopt([]) == []
for client_id in sys.argv[2:]:
    assert owners.acquire_session(client_id) is None
owners.close()
"""

# The arbiter's new w1: adopts its restored sessions (``argv[2:]``), then lives until told.
_RESTARTED = """
import sys
import time
from fluxmq.storage.worker_owners import LocalOwnership
owners = LocalOwnership(sys.argv[1], "n1/w1")
print("dropped", owners.adopt(sys.argv[2:]), flush=True)
sys.stdin.readline()
"""


@contextlib.contextmanager
def restarted_w1(path: str, *restored: str):
    """The arbiter's new w1 (``_RESTARTED``) while the block runs; yields the ids its adoption
    dropped (another live worker owns them), as printed."""
    w1 = worker(_RESTARTED, path, *restored)
    try:
        yield w1.stdout.readline().split()[1:]
    finally:
        w1.stdin.close()
        w1.wait(timeout=30)


def test_an_id_of_a_killed_worker_being_restarted_is_nobodys_only_once_it_is_back_without_it(
    tmp_path: Path,
) -> None:
    """The arbiter restarts the killed w1: until the new w1 adopted its restored sessions, its ids
    are refused as restarting (their copy may come back), or taken by a Clean Start naming w1; once
    back, an id it restored is its own (a takeover), one it did not is nobody's."""
    import pytest

    from fluxmq.errors import OwnerRestarting

    path = str(tmp_path / "owners")
    subprocess.run([sys.executable, "-c", _KILLED_WORKER, path, "c-kept", "c-lost", "c-clean"], check=True)
    w0 = LocalOwnership(path, "n1/w0", restarts=lambda member: member == "n1/w1")
    try:
        for client_id in ("c-kept", "c-lost", "c-clean"):
            with pytest.raises(OwnerRestarting) as refused:
                w0.acquire_session(client_id)
            assert refused.value.owner == "n1/w1" and refused.value.reason_code == 0x88
        assert w0.acquire_session("c-clean", take_from="n1/w1") is None  # a Clean Start
        with restarted_w1(path, "c-kept", "c-clean") as dropped:
            assert dropped == ["['c-clean']"]
            assert w0.acquire_session("c-kept") == "n1/w1"  # back with its copy: taken over there
            assert w0.acquire_session("c-lost") is None  # back without it: nobody's
            assert w0.owned_by("c-clean") == "n1/w0"
    finally:
        w0.close()


def test_an_id_of_a_killed_worker_that_is_not_restarted_is_nobodys(tmp_path: Path) -> None:
    """The member is no other worker of this node's run (``restarts`` False): nothing comes back."""
    path = str(tmp_path / "owners")
    subprocess.run([sys.executable, "-c", _KILLED_WORKER, path, "c1"], check=True)
    w0 = LocalOwnership(path, "n1/w0", restarts=lambda member: False)
    try:
        assert w0.acquire_session("c1") is None
    finally:
        w0.close()


def test_a_killed_worker_not_reaped_yet_owns_nothing(tmp_path: Path) -> None:
    """A process killed -9 is a zombie until its parent (the arbiter) reaps it: ``kill(pid, 0)``
    still succeeds, yet it answers no call; its ids are not a live worker's."""
    import signal

    path = str(tmp_path / "owners")
    w0 = LocalOwnership(path, "n1/w0")
    w1 = live_w1(path, w0)
    try:
        w1.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{w1.pid}/stat").read_text().split(") ")[1][0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert w0.owned_by("c1") is None
    finally:
        w0.close()
        w1.wait(timeout=30)


def test_an_id_of_a_killed_worker_is_refused_while_the_node_stops(tmp_path: Path) -> None:
    """The arbiter stops the node: the killed worker is not started again, its copy comes back at
    the node's next start only, so the claim is refused at once (0x88), not waited for."""
    import pytest

    from fluxmq.errors import OwnerRestarting, ServerUnavailable

    path = str(tmp_path / "owners")
    subprocess.run([sys.executable, "-c", _KILLED_WORKER, path, "c1"], check=True)
    w0 = LocalOwnership(path, "n1/w0", restarts=lambda member: True, stopping=lambda: True)
    try:
        with pytest.raises(ServerUnavailable, match="stopping") as refused:
            w0.acquire_session("c1")
        assert not isinstance(refused.value, OwnerRestarting)
        assert w0.owned_by("c1") is None
    finally:
        w0.close()
