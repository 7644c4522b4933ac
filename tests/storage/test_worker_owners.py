"""The workers' shared registry of client-id owners (``fluxmq.storage.worker_owners``), on a real
LMDB environment shared by real processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fluxmq.storage.worker_owners import LocalOwnership

_OTHER_WORKER = """
import sys
from fluxmq.storage.worker_owners import LocalOwnership
owners = LocalOwnership(sys.argv[1], "n1/w1")
assert owners.acquire_session("c-dead") is None
owners.close()
"""


_LIVE_WORKER = """
import sys
from fluxmq.storage.worker_owners import LocalOwnership
owners = LocalOwnership(sys.argv[1], "n1/w1")
assert owners.acquire_session("c1") is None
print("claimed", flush=True)
sys.stdin.readline()  # the other worker took it over meanwhile
owners.release_session("c1")  # no longer w1's: must leave w0's entry alone
print("released", flush=True)
sys.stdin.readline()
"""


def test_a_claim_is_refused_while_another_live_worker_owns_the_id_and_taken_when_it_hands_it_over(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "owners")
    w1 = subprocess.Popen(
        [sys.executable, "-c", _LIVE_WORKER, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    w0 = LocalOwnership(path, "n1/w0")
    try:
        assert w1.stdout.readline().strip() == "claimed"
        assert w0.owned_by("c1") == "n1/w1"
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
