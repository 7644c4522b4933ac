"""Session takeover time over the network (issue 11): a client moving between two cluster nodes.

Starts a private etcd 3.4 (a temp data dir, loopback ports) and two fluxmq nodes on it (LMDB
storage, ``cluster.enabled``, etcd membership: no static peers), then moves one persistent client
(5.0, Session Expiry 300 s, one QoS 1 subscription) between the two nodes ``--takeovers`` times,
alternating. Timed per move: CONNECT written -> CONNACK read (session present checked) on the new
node, which includes the ownership compare-and-swaps in etcd, the ``session.takeover`` gRPC call,
the export on the old node (its connection closed with 0x8E) and the import on the new one. With
``--queued N`` the client leaves before each move and N QoS 1 messages are published for it
(published on the node it left), so the state that moves carries them; they are drained (and
counted) after each CONNACK. A same-node reconnect is timed the same way as the baseline.

Usage::

    python -m bench.cluster_takeover [--takeovers 200] [--queued 0]

Prints p50/p99/max in ms for the cross-node takeovers and the same-node reconnects.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.brokers import FluxmqNode, free_port
from bench.cluster_cross import start_etcd, wait_peers
from fluxmq._core import codec as c

SESSION = {c.SESSION_EXPIRY_INTERVAL: 300}


class Client:
    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = c.Decoder(version=5)
        self.pending: list = []

    def send(self, *packets) -> None:
        self.sock.sendall(b"".join(c.encode(p, 5) for p in packets))

    def recv(self):
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    def connect(self, client_id: str) -> float:
        t0 = time.perf_counter()
        self.send(c.Connect(client_id, False, 60, 5, None, None, None, None, SESSION))
        ack = self.recv()
        took = time.perf_counter() - t0
        if not isinstance(ack, c.Connack) or ack.reason_code != 0:
            raise RuntimeError(f"refused: {ack!r}")
        if not ack.session_present:
            raise RuntimeError("session not present after the move")
        return took

    def drain(self, count: int) -> None:
        got = 0
        while got < count:
            p = self.recv()
            if isinstance(p, c.Publish):
                got += 1
                if p.qos:
                    self.send(c.Puback(p.packet_id))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] * 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--takeovers", type=int, default=200)
    p.add_argument("--queued", type=int, default=0)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-takeover-"))
    etcd, endpoint = start_etcd(work)
    nodes: list[FluxmqNode] = []
    try:
        for name in ("t1", "t2"):
            sets = [
                "storage.type=lmdb",
                "cluster.enabled=true",
                f"cluster.node_id={name}",
                f"cluster.transport.bind_addr=127.0.0.1:{free_port()}",
                f"cluster.etcd.endpoints={endpoint}",
                "cluster.etcd.prefix=/bench/",
            ]
            nodes.append(FluxmqNode(sets=sets).start())
        for node in nodes:
            wait_peers(node)
        ports = [n.port for n in nodes]
        cid = "mover"
        cl = Client(ports[0])
        cl.send(c.Connect(cid, True, 60, 5, None, None, None, None, SESSION))
        cl.recv()
        cl.send(c.Subscribe(1, [c.Subscription("bench/tk", 1)], None))
        cl.recv()
        pub = Client(ports[0])
        pub.send(c.Connect("bench-pub", True, 60, 5, None, None, None, None, None))
        pub.recv()
        pubs = {ports[0]: pub}
        moves, same = [], []
        here = 0
        for i in range(args.takeovers):
            if args.queued:
                cl.close()
                time.sleep(0.02)  # the old node saw the close
                publisher = pubs.get(ports[here])
                if publisher is None:
                    publisher = pubs[ports[here]] = Client(ports[here])
                    publisher.send(c.Connect(f"bench-pub{here}", True, 60, 5, None, None, None, None, None))
                    publisher.recv()
                for j in range(args.queued):
                    publisher.send(c.Publish("bench/tk", b"x" * 64, 1, False, False, j + 1, None))
                    publisher.recv()  # PUBACK
            there = 1 - here
            new = Client(ports[there])
            moves.append(new.connect(cid))
            if args.queued:
                new.drain(args.queued)
            cl.close()
            cl, here = new, there
            if i % 10 == 0:  # the baseline: a reconnect to the node that holds the session
                cl.close()
                time.sleep(0.02)
                again = Client(ports[here])
                same.append(again.connect(cid))
                cl = again
        cl.close()
        for row, vals in (("cross-node takeover", moves), ("same-node reconnect", same)):
            print(
                f"{row}: n={len(vals)} p50 {pct(vals, 0.5):.2f} ms, p99 {pct(vals, 0.99):.2f} ms, "
                f"max {max(vals) * 1000:.2f} ms, mean {statistics.mean(vals) * 1000:.2f} ms "
                f"(queued per move: {args.queued})"
            )
    finally:
        for node in nodes:
            node.cleanup()
        etcd.kill()
        etcd.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
