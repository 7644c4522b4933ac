"""Fixtures of the metadata-plane tests: ClusterMetadata instances on the session's shared etcd,
each test under its own key prefix; every instance is stopped after the test."""

from __future__ import annotations

import time

import gevent
import pytest

from fluxmq.cluster.metadata import ClusterMetadata, EtcdSettings

#: the shortest lease etcd grants (it rounds shorter ones up to ~1.5 s)
SHORT_TTL = 2.0


def wait_for(predicate, timeout: float = 15.0, step: float = 0.05) -> bool:
    """Poll ``predicate`` (bounded in time) while the hub runs the watches; True once it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        gevent.sleep(step)
    return bool(predicate())


def crash(meta: ClusterMetadata) -> None:
    """Stop a metadata instance the way a killed node stops: nothing revoked, its lease left to expire."""
    if meta.election is not None:
        meta.election.stop()
    if meta.membership is not None:
        meta.membership.stop()
    meta.lease.stop(revoke=False)
    meta._started = False


@pytest.fixture
def meta_factory(etcd_server, etcd_prefix, tmp_path):
    made: list[ClusterMetadata] = []

    def make(
        node_id: str,
        ttl: float = SHORT_TTL,
        start: bool = True,
        endpoint: str | None = None,
        state_dir=None,
        prefix: str | None = None,
    ) -> ClusterMetadata:
        settings = EtcdSettings(
            endpoints=[endpoint or etcd_server.endpoint],
            lease_ttl=ttl,
            request_timeout=3.0,
            start_timeout=10.0,
        )
        meta = ClusterMetadata(
            settings,
            node_id,
            f"127.0.0.1:{7000 + len(made)}",
            prefix=prefix or etcd_prefix,
            state_dir=state_dir or tmp_path / f"state-{node_id}-{len(made)}",
        )
        made.append(meta)
        if start:
            meta.start()
        return meta

    yield make
    for meta in made:
        try:
            meta.stop()
        except Exception:
            pass
