"""The etcd3gw wrapper: cooperative with the gevent hub without monkey patching, one ClusterError
per failure, watches that survive compaction (fluxmq/cluster/metadata/client.py)."""

from __future__ import annotations

import socket

import gevent
import pytest

from fluxmq.cluster.metadata.client import EtcdClient, PrefixMirror
from fluxmq.errors import ClusterError
from tests.cluster.metadata.conftest import wait_for
from tests.conftest import HOST, free_port


def test_an_unreachable_etcd_is_one_cluster_error_naming_it():
    port = free_port()
    client = EtcdClient([f"http://{HOST}:{port}"], timeout=0.5)
    with pytest.raises(ClusterError) as info:
        client.get("/k")
    message = str(info.value)
    assert message.startswith(f"etcd unreachable at http://{HOST}:{port} for 0.5s")
    assert "\n" not in message
    assert client.retries >= 1


def test_a_watch_and_requests_leave_the_hub_running(etcd_server, etcd_prefix):
    """Without monkey patching: a greenlet keeps ticking while a watch waits on its stream and while
    requests are in flight (etcd3gw's own Watcher would block in a thread and call back from it)."""
    assert not gevent.monkey.is_module_patched("socket")
    client = EtcdClient([etcd_server.endpoint])
    seen = []
    mirror = PrefixMirror(client, etcd_prefix, lambda key, kv, old: seen.append((key, kv and kv["value"])))
    mirror.start()
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(1000)])
    try:
        gevent.sleep(0.3)  # the watch greenlet is parked on its stream meanwhile
        assert len(ticks) >= 10
        for i in range(10):
            client.put(f"{etcd_prefix}k{i}", str(i))
        assert wait_for(lambda: len(seen) == 10)
        assert seen[-1] == (f"{etcd_prefix}k9", b"9")
    finally:
        ticker.kill()
        mirror.stop()


def test_a_watch_resyncs_after_its_revision_was_compacted(etcd_server, etcd_prefix):
    client = EtcdClient([etcd_server.endpoint])
    changes = []
    mirror = PrefixMirror(client, etcd_prefix, lambda key, kv, old: changes.append((key, kv is not None)))
    client.put(etcd_prefix + "gone", "1")
    mirror.start()
    mirror.stop()  # the mirror misses what follows
    client.delete(etcd_prefix + "gone")
    client.put(etcd_prefix + "new", "2")
    revision = client.put(etcd_prefix + "new", "3")
    client.post("kv/compaction", {"revision": str(revision), "physical": True})
    changes.clear()
    mirror._stopped = False
    mirror._greenlet = gevent.spawn(mirror._run)  # resume from the (now compacted) revision
    try:
        assert wait_for(lambda: mirror.resyncs >= 1)
        assert wait_for(lambda: set(mirror.items) == {etcd_prefix + "new"})
        assert (etcd_prefix + "gone", False) in changes
        assert mirror.items[etcd_prefix + "new"]["value"] == b"3"
    finally:
        mirror.stop()


def test_requests_retry_on_the_next_endpoint(etcd_server, etcd_prefix):
    dead = f"http://{HOST}:{free_port()}"
    client = EtcdClient([dead, etcd_server.endpoint], timeout=3.0)
    client.put(etcd_prefix + "x", "1")
    assert client.get(etcd_prefix + "x")["value"] == b"1"
    assert client.retries == 1


def test_rewatch_opens_a_new_stream_from_the_last_revision_and_misses_nothing(etcd_server, etcd_prefix):
    """``EtcdClient.rewatch`` (etcd answers again after failing) ends each mirror's stream while its
    greenlet reads it: the greenlet opens a new one from the revision it applied, and every change
    made around it arrives once. Closing the response under the reading greenlet instead raised
    "reentrant call" in the caller, the lease's keep-alive, and ended it."""
    client = EtcdClient([etcd_server.endpoint])
    seen = []
    mirror = PrefixMirror(client, etcd_prefix, lambda key, kv, old: seen.append(kv and kv["value"]))
    mirror.start()
    try:
        assert wait_for(lambda: mirror.connected)
        client.put(f"{etcd_prefix}k", "0")
        assert wait_for(lambda: seen == [b"0"])
        streams = []
        for i in range(1, 4):
            streams.append(mirror._response)
            client.rewatch()  # the greenlet is parked reading the stream
            client.put(f"{etcd_prefix}k", str(i))
            assert wait_for(lambda i=i: len(seen) == i + 1)
        assert seen == [b"0", b"1", b"2", b"3"]
        assert wait_for(lambda: mirror._response is not None and mirror._response not in streams)
    finally:
        mirror.stop()
    assert mirror not in client.mirrors


def test_a_request_goes_on_to_the_next_endpoint_within_its_time_when_one_never_answers(
    etcd_server, etcd_prefix
):
    """The first endpoint accepts connections and never answers (a hung etcd member: its process
    stopped, its listener's backlog still accepting). A request with several endpoints is answered
    by the next one within its own time (a lease renewal within its interval): before, the first
    attempt spent all of it and the request failed."""
    silent = socket.socket()
    silent.bind((HOST, 0))
    silent.listen(16)
    try:
        client = EtcdClient([f"http://{HOST}:{silent.getsockname()[1]}", etcd_server.endpoint], timeout=5.0)
        lease = client.lease_grant(10)
        assert client.lease_keepalive(lease, timeout=1.0) > 0
        client.put(etcd_prefix + "hung", "1")
        assert client.get(etcd_prefix + "hung")["value"] == b"1"
    finally:
        silent.close()
