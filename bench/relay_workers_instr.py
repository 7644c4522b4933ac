"""Instructions per message of the relay's paths, local and forwarded between two workers, in one
process (no scheduling, no other load): for callgrind, the figure that does not move with the
machine's load.

Two brokers, each with its real ``WorkerNode`` (Unix-socket transport, ``PeerLink``,
``WorkerPeers``), clients on socket pairs served by ``MQTTConnection`` as in the node; one
publisher sends ``count`` QoS 0 PUBLISHes (64-byte payloads, in bursts of 100 per write) to one
subscriber on the same worker (``local``; ``colocated``: the same, with the two workers running, so
that the publisher's broker has peers, and two publishers taking turns by burst, to ``in/1`` and
``in/2``) or on the other (``forwarded``); the script returns when
the subscriber has read them all. Run it twice with two counts under callgrind and divide the
difference in instructions by the difference in messages (``[burst [lockstep]]`` after the count:
PUBLISHes per write, 100, and with ``lockstep`` each burst is read by the subscriber before the next
is written, so it crosses as one batch; ``subs=N`` anywhere after the count: N subscribers, each
delivery counted, for a fan-out's cost per delivery)::

    for n in 2000 12000; do valgrind --tool=callgrind --callgrind-out-file=/tmp/ci.$n \\
        .venv/bin/python -m bench.relay_workers_instr forwarded $n; done
    callgrind_annotate /tmp/ci.2000 | head -3; callgrind_annotate /tmp/ci.12000 | head -3
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
import tempfile
import time

import gevent
import gevent.event
from gevent import socket

from fluxmq._core import codec as c
from fluxmq.broker.broker import Broker, BrokerSettings
from fluxmq.broker.session import EXPIRY_NEVER
from fluxmq.cluster.workers import WorkerNode
from fluxmq.config.loader import load_config
from fluxmq.node.workers import WorkerContext
from fluxmq.protocol.connection import RELAY, MQTTConnection
from fluxmq.protocol.flush import FlushScheduler
from fluxmq.protocol.settings import ProtocolSettings
from fluxmq.storage.memory import MemoryStorage
from fluxmq.transport.tcp import SocketStream


@dataclasses.dataclass
class _Context(WorkerContext):
    sockets_dir: str = ""

    def socket_path(self, index: int) -> str:
        return os.path.join(self.sockets_dir, f"w{index}.sock")


def _broker():
    storage = MemoryStorage()
    broker = Broker(BrokerSettings(), storage)
    broker.restore(storage.load())
    broker.relay = RELAY
    return broker, FlushScheduler(storage)


def _client(broker, flusher, client_id: str):
    server, client = socket.socketpair()
    conn = MQTTConnection(
        broker, SocketStream(server, ("127.0.0.1", 1)), ProtocolSettings(park_after=0), flusher
    )
    conn.decoder.version = conn.version = 4
    session, _ = broker.open_session(client_id, True, EXPIRY_NEVER)
    conn.client_id, conn.session = client_id, session
    broker.attach(session, conn, 100)
    gevent.spawn(conn.run)
    return conn, client


def main(argv: list[str]) -> int:
    subs = 1
    for arg in [a for a in argv if a.startswith("subs=")]:
        subs = int(arg.split("=", 1)[1])
        argv = [a for a in argv if a != arg]
    mode, count = argv[0], int(argv[1])
    # burst: PUBLISHes per write; with "lockstep" the next burst waits until the subscriber has read
    # the last one (one batch per burst between the workers: the fixed cost of a batch is the
    # difference between two burst sizes)
    burst = int(argv[2]) if len(argv) > 2 else 100
    lockstep = len(argv) > 3 and argv[3] == "lockstep"
    tmp = tempfile.mkdtemp(prefix="relay-instr-")
    brokers = [_broker(), _broker()]
    nodes = []
    if mode in ("forwarded", "colocated"):
        config = load_config(env={}, overrides=["server.workers=2"])
        for i, (broker, _f) in enumerate(brokers):
            run = os.path.join(tmp, f"run{i}")
            os.makedirs(run)
            nodes.append(WorkerNode(_Context(i, 2, run, sockets_dir=tmp), broker, config))
        for node in nodes:
            node.start()
        deadline = time.monotonic() + 60
        while not all(n.transport.reachable() for n in nodes) and time.monotonic() < deadline:
            gevent.sleep(0.01)
    sub_at = brokers[1] if mode == "forwarded" else brokers[0]
    sub_socks = []
    for k in range(subs):
        sub_conn, sub_sock = _client(*sub_at, f"sub{k}" if k else "sub")
        sub_at[0].subscribe(sub_conn.session, "in/#", 0)
        sub_socks.append(sub_sock)
    _pub_conn, pub_sock = _client(*brokers[0], "pub")
    one = c.encode(c.Publish("in/1", b"x" * 64), 4)
    # (colocated: a second publisher, to another topic of the same length, every other burst)
    pubs = [(pub_sock, one)]
    if mode == "colocated":
        pubs.append((_client(*brokers[0], "pub2")[1], c.encode(c.Publish("in/2", b"x" * 64), 4)))
    want = len(c.encode(c.Publish("in/1", b"x" * 64), 4)) * count * subs
    got = 0
    size = len(one) * subs  # read per PUBLISH sent
    target = [want]  # the readers set ``caught_up`` once they have read this much
    caught_up = gevent.event.Event()

    def read(sub_sock) -> None:
        nonlocal got
        mine = 0
        while mine < want // subs:
            data = sub_sock.recv(1 << 20)
            if not data:
                break
            mine += len(data)
            got += len(data)
            if got >= target[0]:
                caught_up.set()
        caught_up.set()

    # What start-up built out of the collector's generations, as the node does (fluxmq.node.service):
    # otherwise a full collection that walks the imports and both brokers lands in one run's count
    # and not the other's (~1,650 instructions per message of 20,000 when it does).
    gc.freeze()
    readers = [gevent.spawn(read, sock) for sock in sub_socks]
    sent = bursts = 0
    while sent < count:
        n = min(burst, count - sent)
        if lockstep:
            caught_up.clear()
            target[0] = (sent + n) * size
        sock, packet = pubs[bursts % len(pubs)]
        sock.sendall(packet * n)
        sent += n
        bursts += 1
        if lockstep:
            caught_up.wait(60)
        else:
            gevent.sleep(0)
    gevent.joinall(readers, timeout=120)
    batches = sum(link.stats.batches for node in nodes for link in node.transport.links.values())
    for node in nodes:
        node.stop(0.5)
    print(
        f"{mode} {count} subs={subs} read={got} want={want} relay_served={RELAY.served} forwarded={RELAY.forwarded}"
        f" raw_forwarded={getattr(RELAY, 'raw_forwarded', 0)} batches={batches}"
    )
    return 0 if got == want else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
