"""A large output emptied by its send: its allocation goes to the process's spares, not back to the
C library, and the next large output is written into it (``_core/outbuf``, ``_hub_read._clear``).

A fan-in subscriber's output fills ~180 KB per send; glibc maps such a block afresh and the send
that emptied it shrank it to a byte, so nearly every byte written to the subscriber landed on a
newly faulted page (~22 page faults and ~2 ``mremap`` per 1,000 deliveries, bench/RESULTS.md
"fmem"). The memory bound still holds: the connection holds no output allocation once its output
is sent, and the process holds a few spares, bounded (``_core/outbuf.pxd``).
"""

from __future__ import annotations

import os
import resource
import socket as pysocket
import subprocess
import sys
from pathlib import Path

import gevent
import pytest

from fluxmq._core import outbuf
from fluxmq._core import publish_frame as pf
from fluxmq._core.encoder import append_publish
from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.protocol.flush import FlushScheduler
from fluxmq.storage.memory import MemoryStorage
from tests.protocol.test_connection_flush import read_exactly, serve

FRAME = pf.frame(b"fan/in/topic/17", b"x" * 64, 0, 0, 4)  # 83 bytes
ROOT = Path(__file__).resolve().parents[2]
PER_SEND = 2_300  # ~190 KB: a fan-in subscriber's send at full speed (one worker)
# Under scripts/asan every allocation is AddressSanitizer's (its realloc always moves, its frees
# wait in a quarantine): page faults say nothing about glibc's reuse there.
glibc_pages = pytest.mark.skipif(
    bool(os.environ.get("ASAN_FLUXMQ_LIB")), reason="page faults of ASan's allocator (scripts/asan)"
)


def _round(conn) -> None:
    """One send's worth of deliveries written into ``conn``'s output."""
    out = conn.out
    for _ in range(PER_SEND):
        append_publish(out, FRAME, 0, False)


def _send(conn, client) -> None:
    """The connection's flush sends them (all at once), the client reads them."""
    conn.flush_nowait()
    assert len(conn.out) == 0  # all of it sent at once (the socket's buffer is large enough)
    assert read_exactly(client, PER_SEND * len(FRAME)) == FRAME * PER_SEND


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _broker() -> Broker:
    storage = MemoryStorage()
    broker = Broker(BrokerSettings(), storage)
    broker.restore(storage.load())
    return broker


def _connected(broker: Broker, client_id: str = "sub"):
    conn, reader, client = serve(broker, FlushScheduler(broker.storage), client_id)
    conn.stream.sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_SNDBUF, 1 << 20)
    client.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_RCVBUF, 1 << 20)
    gevent.sleep(0.05)  # the reader waits in recv (its descriptor set: the C send path)
    return conn, reader, client


def faults_of_nine_sends(conns: int = 1) -> int:
    """The minor page faults of writing nine sends' deliveries into each of ``conns`` connections'
    outputs (all of them written, then each sent by its connection's flush, as a worker's read
    and flush do; after a first send)."""
    broker = _broker()
    served = [_connected(broker, f"sub{i}") for i in range(conns)]
    try:
        for conn, _reader, _client in served:
            _round(conn)
        for conn, _reader, client in served:
            _send(conn, client)
        faults = 0
        for _ in range(9):
            before = _minor_faults()
            for conn, _reader, _client in served:
                _round(conn)
            faults += _minor_faults() - before
            for conn, _reader, client in served:
                _send(conn, client)
        return faults
    finally:
        for _conn, _reader, client in served:
            client.close()
        gevent.joinall([reader for _conn, reader, _client in served], timeout=5)


def _faults_in_a_worker_like_process(conns: int) -> int:
    """``faults_of_nine_sends(conns)`` in a process of its own with glibc's mmap threshold at its
    default, fixed (``MALLOC_MMAP_THRESHOLD_``), as in a worker, where nothing frees a large block
    and the threshold stays there (a test process frees many, which raises it, and the output then
    comes from the heap)."""
    code = f"from tests.protocol.test_output_spare import faults_of_nine_sends as f; print(f({conns}))"
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@glibc_pages
def test_refilling_a_sent_large_output_faults_no_fresh_pages() -> None:
    """Nine sends of ~190 KB through the connection's flush: the writes of each send's deliveries
    fault almost no page (before: ~46 per send, every page of the output)."""
    faults = _faults_in_a_worker_like_process(1)
    assert faults < 9 * 8, faults


@glibc_pages
def test_several_busy_outputs_each_refill_without_fresh_pages() -> None:
    """Four subscribers' outputs of ~190 KB, all written, then all sent, nine times: each takes a
    spare back, so none faults its pages in afresh (with one spare per process, three of the four
    did, ~46 faults each per send: ~1,240)."""
    faults = _faults_in_a_worker_like_process(4)
    assert faults < 4 * 9 * 8, faults


def test_a_connection_whose_large_output_was_sent_holds_no_output_allocation() -> None:
    """The memory bound: once sent, the output holds nothing (its block is the process's one spare,
    which a second connection's large output then takes); a small output keeps its small block."""
    outbuf.release()
    broker = _broker()
    conn, reader, client = _connected(broker)
    other, other_reader, other_client = _connected(broker, "sub2")
    try:
        _round(conn)
        alloc = conn.out.__alloc__()
        _send(conn, client)
        assert conn.out.__alloc__() == 0
        assert outbuf.spare_size() == alloc
        _round(other)
        assert outbuf.spare_size() == 0  # the other's output took it
        assert other.out.__alloc__() == alloc
        _send(other, other_client)
        assert other.out.__alloc__() == 0 and outbuf.spare_size() == alloc
        append_publish(conn.out, FRAME, 0, False)
        conn.flush_nowait()
        assert read_exactly(client, len(FRAME)) == FRAME
        assert 0 < conn.out.__alloc__() <= 512
    finally:
        for c in (client, other_client):
            c.close()
        gevent.joinall([reader, other_reader], timeout=5)
        outbuf.release()
