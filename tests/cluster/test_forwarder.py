"""PeerLink (``fluxmq.cluster.forwarder``) over real Unix-socket transports under gevent: what a
link keeps unacknowledged while its peer is down."""

from __future__ import annotations

import gevent

from fluxmq.cluster.config import TransportSettings
from fluxmq.cluster.proto import cluster_pb2 as pb
from fluxmq.cluster.unix import UnixTransport


def test_a_peer_down_keeps_at_most_one_interest_snapshot_unacknowledged(tmp_path) -> None:
    """Each failed reconnect to a dead peer sent a new interest snapshot and kept the earlier ones
    unacknowledged: over a long outage ``unacked`` grew without bound (and took the in-flight
    slots). A newer snapshot holds all the interest, so it replaces the unacknowledged one: one is
    kept, and the peer that comes back gets that one."""
    addrs = {"w0": f"unix:{tmp_path}/w0.sock", "w1": f"unix:{tmp_path}/w1.sock"}
    got: list = []

    def on_batch(batch):
        got.append((batch.seq, batch.snapshot, [(c.filter, c.added) for c in batch.interest]))
        return pb.BatchAck(seq=batch.seq)

    sender = UnixTransport("w0", 1, TransportSettings(bind_addr=addrs["w0"]), on_batch, lambda: ["a/#"])
    receiver = UnixTransport("w1", 1, TransportSettings(bind_addr=addrs["w1"]), on_batch, lambda: [])
    sender.start()
    try:
        sender.set_peers(addrs)
        link = sender.links["w1"]
        with gevent.Timeout(30):
            while link.stats.failures < 5:  # five reconnects to the dead peer (backoff to ~1.6 s)
                gevent.sleep(0.02)
        assert len(link.unacked) == 1
        receiver.start()  # the peer comes back
        with gevent.Timeout(30):
            while not link.connected or link.unacked:
                gevent.sleep(0.01)
        assert len(got) == 1
        seq, snapshot, interest = got[0]
        assert snapshot and interest == [("a/#", True)] and seq == link.seq
    finally:
        sender.stop(0.5)
        receiver.stop(0.5)
