"""bench.procinfo: CPU of a process tree counts every process once."""

from __future__ import annotations

import subprocess
import sys
import time

from bench import procinfo

# A parent that starts a child which burns ~0.3 s of CPU, then both sleep.
_TREE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.3: pass\\nprint('burnt', flush=True)\\ntime.sleep(30)"],
    stdout=sys.stdout)
time.sleep(30)
"""


def test_tree_cpu_counts_a_root_that_is_also_a_descendant_once() -> None:
    parent = subprocess.Popen([sys.executable, "-c", _TREE], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "burnt"  # the child has burnt its CPU and sleeps
        pids = []
        deadline = time.monotonic() + 10
        while len(pids) < 2 and time.monotonic() < deadline:
            pids = procinfo.tree(parent.pid)  # [parent, child], as bench.lone_cost once passed them
            time.sleep(0.05)
        assert len(pids) == 2
        once = procinfo.tree_cpu_s([parent.pid])
        assert once >= 0.25
        assert procinfo.tree_cpu_s(pids) == once
        user, sys_ = procinfo.tree_cpu_user_sys_s(pids)
        assert abs(user + sys_ - once) < 1e-9
    finally:
        for pid in procinfo.tree(parent.pid)[1:]:
            subprocess.run(["kill", str(pid)], check=False)
        parent.kill()
        parent.wait(timeout=10)
