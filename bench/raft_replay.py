"""Journal replay at restart (issue 12): how long the first Raft tick holds the hub.

One node with a single-member Raft group (``peers: [itself]``, ``replication_factor: 1``) takes
``--count`` QoS 1 messages, is stopped (SIGTERM) and started again on its data directory; prints the
entries applied, the journal size, the time to ready and the node's ``raft_tick_slow`` lines (a tick
that held the hub over 50 ms).

    .venv/bin/python -m bench.raft_replay --count 50000
    .venv/bin/python -m bench.raft_replay --count 50000 --compaction-entries 100

With ``--compaction-entries`` the group snapshots its queue every that many entries: the output
adds the snapshots written (records and how long each held the hub) and the journal left.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"  # noqa: A001

from bench.raft_queue import produce  # noqa: E402
from tests.conftest import NodeFactory, free_port  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=50000)
    ap.add_argument("--compaction-entries", type=int, default=5000)
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="bench-replay-"))
    factory = NodeFactory(base)
    out: dict = {}
    try:
        me = f"127.0.0.1:{free_port()}"
        node = factory(
            config_text=f"""
cluster:
  raft: {{enabled: true, bind_addr: "{me}", peers: ["{me}"], compaction_entries: {args.compaction_entries}}}
queues:
  - name: bench
    replication: {{enabled: true, mode: sync, replication_factor: 1, min_in_sync_replicas: 1}}
"""
        )
        time.sleep(1)
        out["produce"] = produce(node.mqtt_port, args.count, 100)
        out["entries"] = node.http_get("/cluster/raft")[1]["groups"][0]["applied"]
        node.stop()
        out["journal_bytes"] = sum(p.stat().st_size for p in (node.data_dir / "raft").glob("*.journal"))
        started = time.monotonic()
        again = factory.restart(node, 60)
        out["ready_after_s"] = round(time.monotonic() - started, 2)
        time.sleep(3)
        out["snapshots"] = [
            line.split(" event=")[1]
            for line in node.log_text().splitlines()
            if "raft_snapshot_written" in line
        ][-3:]
        out["slow_ticks"] = [
            line.split(" event=")[1] for line in again.log_text().splitlines() if "raft_tick_slow" in line
        ]
    finally:
        factory.close()
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
