"""Runs two real ClusterTransports in one gevent-patched process (grpc needs the patching before it
starts, which a pytest process does not have): ``python -m tests.cluster.transport_driver``.

Prints one JSON object with what each scenario observed; tests/cluster/test_transport.py checks it.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

from fluxmq.cluster.config import TransportSettings  # noqa: E402
from fluxmq.cluster.node import init_grpc_for_gevent  # noqa: E402

init_grpc_for_gevent()

from fluxmq.cluster.proto import cluster_pb2 as pb  # noqa: E402
from fluxmq.cluster.transport import ClusterTransport, PeerUnavailable  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        gevent.sleep(0.01)
    return True


def main() -> int:
    pa, pb_ = free_port(), free_port()
    peers = {"a": f"127.0.0.1:{pa}", "b": f"127.0.0.1:{pb_}"}
    received: list[tuple[str, int, list[str], bool]] = []

    def on_batch_b(batch):
        received.append((batch.sender, batch.seq, [c.filter for c in batch.interest], batch.snapshot))
        return pb.BatchAck(seq=batch.seq)

    a = ClusterTransport(
        "a",
        1,
        TransportSettings(bind_addr=peers["a"], max_queued_messages=3),
        lambda batch: pb.BatchAck(seq=batch.seq),
        lambda: ["x/#"],
    )
    b = ClusterTransport("b", 1, TransportSettings(bind_addr=peers["b"]), on_batch_b, lambda: [])
    out: dict = {}
    a.start()
    b.start()
    b.handle("echo", lambda sender, payload: sender.encode() + b":" + payload)

    def boom(sender, payload):
        raise ValueError("no such session")

    b.handle("boom", boom)
    a.set_peers(peers)
    b.set_peers(peers)
    out["reachable"] = wait(lambda: a.reachable() == ["b"] and b.reachable() == ["a"])
    out["snapshot"] = [r for r in received if r[3]][:1]
    out["echo"] = a.call("b", "echo", b"hi", timeout=5).decode()
    errors = {}
    for name, args in {
        "unknown_kind": ("b", "nope", b""),
        "handler_error": ("b", "boom", b""),
        "unknown_peer": ("zz", "echo", b""),
    }.items():
        try:
            a.call(*args, timeout=5)
            errors[name] = None
        except PeerUnavailable as exc:
            errors[name] = str(exc)
    # interest change: waited for until b applied it
    pending = a.interest_changed("y/+", True)
    out["interest_synced"] = a.wait_interest(pending, 5.0)
    out["interest_at_b"] = any("y/+" in r[2] for r in received)
    b.stop(0.1)
    out["b_down_seen"] = wait(lambda: a.reachable() == [])
    try:
        a.call("b", "echo", b"hi", timeout=2)
        errors["dead_peer"] = None
    except PeerUnavailable as exc:
        errors["dead_peer"] = str(exc)
    out["errors"] = errors
    # a dead peer: its queue is bounded, the rest is dropped and counted; enqueueing never blocks
    from fluxmq.cluster.batch import Outgoing

    started = time.monotonic()
    accepted = sum(a.links["b"].enqueue(Outgoing(b"m" * 10, (), True, None)) for _ in range(10))
    out["enqueue_seconds"] = time.monotonic() - started
    out["accepted"] = accepted
    out["state"] = a.peer_state()["b"]
    a.stop(0.1)
    out["readded"] = readded_peer()
    out["slow_ack"] = slow_ack()
    print(json.dumps(out))
    return 0


def _subscribed_broker():
    """The receiving node's broker, with one client ``s`` subscribed to ``t``: (broker, its delivery)."""
    from fluxmq.broker.broker import Broker
    from tests.broker.test_session import RecordingDelivery

    broker = Broker()
    session, _ = broker.open_session("s", True, 0)
    delivery = RecordingDelivery()
    broker.attach(session, delivery, 100)
    broker.subscribe(session, "t", 0)
    return broker, delivery


def readded_peer() -> list[str]:
    """A peer removed and added again (membership): the new link's batches are applied, not taken
    for retries of the old link's. Receiver: a real ClusterPeers and Broker with one subscriber."""
    from fluxmq.broker.message import Message
    from fluxmq.cluster.batch import outgoing
    from fluxmq.cluster.peers import ClusterPeers

    peers = {"a": f"127.0.0.1:{free_port()}", "b": f"127.0.0.1:{free_port()}"}
    broker, delivery = _subscribed_broker()
    receiver = ClusterPeers("b", broker, None)
    b = ClusterTransport(
        "b", 5, TransportSettings(bind_addr=peers["b"]), receiver.apply_batch, broker.interest_filters
    )
    receiver.transport = b
    a = ClusterTransport(
        "a", 5, TransportSettings(bind_addr=peers["a"]), lambda batch: pb.BatchAck(seq=batch.seq), lambda: []
    )
    a.start()
    b.start()
    a.set_peers(peers)
    wait(lambda: a.reachable() == ["b"])
    a.links["b"].enqueue(outgoing(Message("t", b"first"), (), True))
    wait(lambda: len(delivery.sent) == 1)
    a.set_peers({"a": peers["a"]})  # b leaves the membership...
    a.set_peers(peers)  # ...and comes back
    wait(lambda: a.reachable() == ["b"])
    a.links["b"].enqueue(outgoing(Message("t", b"second"), (), True))
    wait(lambda: len(delivery.sent) == 2, timeout=3)
    a.stop(0.1)
    b.stop(0.1)
    return [f"{sent[0]}" for sent in delivery.sent] + [f"dup={receiver.duplicate_batches}"]


def slow_ack() -> dict:
    """The receiver applies a batch slower than route_publish_timeout: the sender drops the stream,
    re-opens it and sends the batch again; it is delivered once."""
    from fluxmq.broker.message import Message
    from fluxmq.cluster.batch import outgoing
    from fluxmq.cluster.peers import ClusterPeers

    peers = {"a": f"127.0.0.1:{free_port()}", "b": f"127.0.0.1:{free_port()}"}
    broker, delivery = _subscribed_broker()
    receiver = ClusterPeers("b", broker, None)
    slowed = []

    def on_batch(batch):
        if batch.count and not slowed:
            slowed.append(batch.seq)
            gevent.sleep(1.5)  # longer than the sender's route_publish_timeout
        return receiver.apply_batch(batch)

    b = ClusterTransport("b", 5, TransportSettings(bind_addr=peers["b"]), on_batch, broker.interest_filters)
    a = ClusterTransport(
        "a",
        5,
        TransportSettings(bind_addr=peers["a"], publish_timeout=0.5),
        lambda batch: pb.BatchAck(seq=batch.seq),
        lambda: [],
    )
    a.start()
    b.start()
    a.set_peers(peers)
    wait(lambda: a.reachable() == ["b"])
    a.links["b"].enqueue(outgoing(Message("t", b"once"), (), True))
    wait(lambda: a.links["b"].stats.resent >= 1 and not a.links["b"].unacked and a.reachable() == ["b"])
    gevent.sleep(1.5)  # the slowed first copy is applied by now too
    state = a.peer_state()["b"]
    a.stop(0.1)
    b.stop(0.1)
    return {
        "delivered": len(delivery.sent),
        "duplicates_skipped": receiver.duplicate_batches,
        "resent": state["resent"],
        "failures": state["failures"],
    }


if __name__ == "__main__":
    sys.exit(main())
