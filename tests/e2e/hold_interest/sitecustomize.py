"""Test-only: a worker applies a peer's interest change in filters under a prefix late
(tests/e2e/test_workers_join_then_publish.py).

Put on a node's ``PYTHONPATH`` with ``HOLD_INTEREST`` set to ``{prefix} {seconds}``, this runs in
each of its processes: ``ClusterPeers._apply`` (a peer's batch) first sleeps ``seconds`` (its
greenlet only) when the batch adds a filter that starts with ``prefix``, so the peer's
acknowledgement of that interest comes that much later, as on a loaded machine. Nothing else of the
node changes; without ``HOLD_INTEREST`` this file does nothing.
"""

from __future__ import annotations

import os

_HOLD = os.environ.get("HOLD_INTEREST")


def _install(prefix: str, seconds: float) -> None:
    """Wrap ``ClusterPeers._apply`` as ``fluxmq.cluster.peers`` is imported."""
    from tests.e2e.import_hook import after_import

    def patch(module) -> None:
        apply = module.ClusterPeers._apply

        def _apply(peers, batch):
            if not batch.snapshot and any(c.added and c.filter.startswith(prefix) for c in batch.interest):
                import gevent

                gevent.sleep(seconds)
            return apply(peers, batch)

        module.ClusterPeers._apply = _apply

    after_import("fluxmq.cluster.peers", patch)


if _HOLD:
    _prefix, _, _seconds = _HOLD.rpartition(" ")
    _install(_prefix, float(_seconds))
