"""A bounded fault-injection run (Jepsen-lite) that checks the delivery promises end to end.

Starts real nodes on free 127.0.0.1 ports in temp dirs, LMDB storage (``storage.sync: batch``):

``workers``
    one node with ``server.workers: 2``; every client connects to its one MQTT port (the kernel
    spreads connections over the workers, so reconnects also move sessions between them).
``cluster``
    three nodes of one worker (``--workers``: more) on a private etcd
    (``bench.cluster_cross.start_etcd``); each client has a home node and reconnects to it.
``raft``
    the ``cluster`` setup with ``cluster.raft.enabled`` (static peers) and the chaos queue
    replicated on the three nodes (docs/replication.rst: ``mode: sync``, ``replication_factor`` 3,
    ``visibility_timeout`` 8 s; ``--write-policy`` forward or reject, ``--distribution`` forward or
    replicate, ``--compaction`` entries kept before a snapshot, 200). The producer moves to the
    next node when its node is down; with ``reject`` it follows a 0x83 refusal's ``leader``
    property (the message is sent again there, not counted as refused). A third member of the
    group, ``queue-c3``, settles with ``$queue/chaos/$ack`` (QoS 1) instead of auto-ack. Faults go to
    the Raft leader (read from ``/cluster/raft``) 60 % of the time; ``lag-restart`` kills a follower
    (or stops it: SIGSTOP), keeps it down 12-18 s under load (several compactions), restarts (or
    continues) it and waits until it caught up (the leader's snapshot installed: shown in the
    fault's line).

Clients (raw MQTT 5.0 over ``fluxmq._core.codec``, each in a thread, persistent sessions: Session
Expiry 1 h, Clean Start only on the first connect):

- subscribers to ``chaos/d/#`` at QoS 1 and QoS 2, spread over the workers / nodes; a QoS 2
  subscriber counts a PUBLISH once per packet id until its PUBREL (the receiver's side of
  exactly once), so a DUP resend of an unreleased packet id is not a duplicate;
- publishers (QoS 1 and QoS 2) numbering their messages ``name:seq``, one in flight at a time,
  recording which were acknowledged (PUBACK < 0x80, PUBCOMP); after a reconnect with the session
  present the message in flight is sent again with DUP (or its PUBREL), as the protocol says;
- a durable queue ``$queue/chaos`` (configured, ``max_inflight`` 100): one producer, two auto-ack
  members of consumer group ``g`` (the PUBACK of a delivery settles it);
- a retained topic ``chaos/retained`` overwritten with increasing numbers (QoS 1).

Faults, at random intervals from a printed seed: ``worker-kill`` (kill -9 of one worker, the
arbiter restarts it; nodes of several workers only), ``worker-term`` (SIGTERM to one worker alone:
its graceful stop, the arbiter restarts it; the same nodes; it explains no loss: docs/reliability.rst,
"stopped alone"), ``node-kill`` (kill -9 of the whole process tree, restart on
its data dir), ``node-term`` (SIGTERM, wait, restart), ``stop-cont`` (SIGSTOP of the tree for 2-4 s,
then SIGCONT), ``partition`` (cluster: the node cut off from its peers and from etcd for 1.5-2
lease TTLs, its clients still connected, then healed; docs/cluster.rst, "Partitions"). Each fault
waits until the node answers ``/ready`` again before the next interval (a partition: every node).
Only the processes this tool started are signalled, by PID.

With ``partition`` among the faults (the default for ``--setup cluster``) each node runs in a network
namespace of its own (``tests/netns.py``: made and removed by this tool; needs root, else the fault
is skipped with one line), bound to its address there, and the etcd in the root namespace on the
lab's ``service`` address, which the cut-off node loses with its peers; the clients connect from
the root namespace and are never cut off.

At the end (publishers stopped, everything up, subscribers drained until nothing new arrives): per
subscriber, every acknowledged message arrived (QoS 1 at least once, QoS 2 exactly once), first
arrivals in each publisher's order; the queue got every acknowledged append, counting deliveries
seen more than once (and whether a fault or a reconnect of that consumer came between); retained
agrees on every node / worker and is the last acknowledged value (or a later one whose
acknowledgement the fault cut off). Each loss is listed with the faults and session losses
(CONNACK session present 0 on a reconnect) around it, so it can be set against what the docs
promise (docs/cluster.rst, docs/queues.rst). With ``raft``, after the drain (consumers still
running, up to ``--drain`` s): the three replicas agree (``/cluster/raft``: commit index = applied
index, the queue's first/next/count and group floor, the same on each), group ``g`` settled every
record (floor = next), and no record was delivered again after ``queue-c3``'s ``$ack`` of it was
confirmed (0x00) unless a fault hit ``queue-c3``'s node meanwhile (its members dropped as silent:
the documented visibility-timeout case). Each client's longest (re)connect (first attempt to
CONNACK) and its refused CONNECTs by reason code are listed too (``connects``): a client stuck
longer than a claim's wait for a restart (10 s) shows there.

Usage::

    python -m bench.chaos --setup workers --rounds 10 --seed 1
    python -m bench.chaos --setup cluster --rounds 10 --seed 1
    python -m bench.chaos --setup cluster --workers 2 --rounds 4 --seed 1   # + the worker faults
    python -m bench.chaos --setup raft --rounds 8 --seed 1 --distribution replicate
    python -m bench.chaos --setup raft --rounds 8 --seed 1 --write-policy reject
    python -m bench.chaos --setup workers --rounds 0 --run-for 5     # no fault: must report zero loss

Exit status 0 when nothing was lost or doubled beyond what MQTT allows (QoS 1 duplicates), else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"  # noqa: A001

from bench import procinfo  # noqa: E402
from bench.brokers import FluxmqNode, free_port  # noqa: E402
from bench.cluster_takeover import Client as OneConnection  # noqa: E402
from fluxmq._core import codec as c  # noqa: E402

EXPIRY = {c.SESSION_EXPIRY_INTERVAL: 3600}
DATA = "chaos/d/"
RETAINED = "chaos/retained"
QUEUE = "chaos"
READY_TIMEOUT = 90.0
ACK_TIMEOUT = 10.0  # a publisher waiting longer for its ack drops the connection and resumes
# a CONNACK may wait for a killed worker's restart (fluxmq.cluster.workers.RESTART_WAIT, 10 s)
CLAIM_WAIT = 15.0
FAULTS = {"workers": ("worker-kill", "worker-term", "node-kill", "node-term", "stop-cont"),
          "cluster": ("node-kill", "node-term", "stop-cont", "partition"),
          "raft": ("node-kill", "node-term", "stop-cont", "lag-restart")}  # fmt: skip
#: a partition lasts this many lease TTLs (cluster.etcd.lease_ttl: 10 s by default), at random
PARTITION_TTLS = (1.5, 2.0)
LEASE_TTL = 10.0
#: the address a node's port is reached at (its namespace's address with a partition fault)
HOSTS: dict[int, str] = {}
#: raft: the share of faults aimed at the Raft leader (the others at a random node)
LEADER_SHARE = 0.6
#: the faults of one worker of a node (its node goes on): offered on nodes of several workers
WORKER_FAULTS = frozenset({"worker-kill", "worker-term"})

T0 = time.monotonic()


def now() -> float:
    return time.monotonic() - T0


def say(msg: str) -> None:
    print(f"[{now():7.1f}s] {msg}", flush=True)


# -- nodes -------------------------------------------------------------------------------------


class Node:
    """One fluxmq-node on its own data dir; restarted on the same ports and data."""

    def __init__(self, name: str, workdir: Path, sets: list[str], host: str = "127.0.0.1",
                 prefix: tuple[str, ...] = ()) -> None:  # fmt: skip
        workdir.mkdir(parents=True)
        self.name = name
        self.node = FluxmqNode(workdir=str(workdir), max_inflight=100, sets=sets, host=host, prefix=prefix)
        self.port = self.node.port
        HOSTS[self.port] = host
        self.starts = 0
        self.lab = None  # the NetnsLab the node runs in (partition fault), its index there
        self.index = 0
        self.cluster = [self]  # every node of the run (a partition waits for all of them)
        self.raft_addr = ""  # setup raft: its cluster.raft.bind_addr

    def start(self) -> None:
        self.starts += 1
        self.node.log_path = Path(self.node.workdir) / f"fluxmq-{self.starts}.log"
        self.node.start(timeout=READY_TIMEOUT)

    def pids(self) -> list[int]:
        return procinfo.tree(self.node.pid) if self.node.proc is not None else []

    def workers(self) -> list[int]:
        return self.pids()[1:]

    def signal_tree(self, sig: int) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except OSError:
                pass

    def kill(self) -> float:
        """kill -9 of every process of the node at once, then reap the arbiter; when the signals
        were sent (``now()``)."""
        tree = self.pids()
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        killed = now()
        self.node.proc.wait(30)
        for pid in tree[1:]:  # the workers were the arbiter's children: gone with it, wait for /proc
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.05)
        self.node.stop()
        return killed

    def wait_ready(self, workers: int | None = None) -> None:
        """Until ``/ready`` answers 200 and, with ``workers``, that many run and every one serves:
        ``/ready`` stays 200 (``degraded``) while one restarts, its ``workers`` check naming it."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if (
                workers is None or (len(self.workers()) == workers and self.workers_up())
            ) and self.node.ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready again within {READY_TIMEOUT:.0f}s: {self.node.log_tail()}")

    def workers_up(self) -> bool:
        """``/ready``'s ``workers`` check names no worker down."""
        try:
            with urllib.request.urlopen(
                f"http://{self.node.host}:{self.node.health_port}/ready", timeout=1
            ) as r:
                body = json.loads(r.read())
        except (OSError, ValueError):
            return False
        return not body.get("checks", {}).get("workers", {}).get("details")


# -- clients -----------------------------------------------------------------------------------


class Conn(OneConnection):
    """One MQTT 5.0 connection whose reads give up after 1 s (``recv`` returns None then)."""

    def __init__(self, port: int) -> None:
        super().__init__(port, HOSTS.get(port, "127.0.0.1"))
        self.sock.settimeout(1.0)

    def recv(self):
        """The next packet, or None after a 1 s read without one; ConnectionError when closed."""
        try:
            return super().recv()
        except TimeoutError:
            return None


@dataclass
class Events:
    """What one client saw: its connects, session losses and errors (times from ``now()``)."""

    connects: int = 0
    connected: list[tuple[float, bool]] = field(default_factory=list)  # (when, session present)
    session_lost: list[float] = field(default_factory=list)
    drops: list[float] = field(default_factory=list)
    refused: Counter = field(default_factory=Counter)  # CONNECT answers other than success (or none)
    longest_connect: float = 0.0  # the longest (re)connect, from the first attempt to the CONNACK


class Client(threading.Thread):
    """A persistent-session client that reconnects (same client id) to its port until stopped."""

    def __init__(self, name: str, port: int, stop: threading.Event) -> None:
        super().__init__(name=name, daemon=True)
        self.cid = name
        self.port = port
        self.home = ""  # the node's name (set by start_clients)
        self.stop_event = stop
        self.ev = Events()
        self.conn: Conn | None = None
        self.error: str | None = None

    def local_port(self) -> int | None:
        """The port of this client's side of its connection now; None while it has none."""
        conn = self.conn
        try:
            return conn.sock.getsockname()[1] if conn is not None else None
        except OSError:
            return None

    def connect(self) -> bool:
        """(Re)connect; True when the session was present. Retries until it works or stop."""
        first = self.ev.connects == 0
        began = now()
        while not self.stop_event.is_set():
            try:
                conn = Conn(self.port)
                conn.send(c.Connect(self.cid, first, 30, 5, None, None, None, None, dict(EXPIRY)))
                ack = None
                deadline = time.monotonic() + CLAIM_WAIT
                while ack is None and time.monotonic() < deadline:
                    ack = conn.recv()
                if not isinstance(ack, c.Connack) or ack.reason_code != 0:
                    self.ev.refused[f"0x{ack.reason_code:02x}" if isinstance(ack, c.Connack) else "none"] += 1
                    conn.close()
                    raise ConnectionError(f"connect answered {ack!r}")
            except (OSError, ConnectionError, ValueError):
                self.connect_failed()
                time.sleep(0.2)
                continue
            self.conn = conn
            self.ev.longest_connect = max(self.ev.longest_connect, round(now() - began, 2))
            self.ev.connects += 1
            self.ev.connected.append((round(now(), 2), bool(ack.session_present)))
            if not first and not ack.session_present:
                self.ev.session_lost.append(now())
                say(f"{self.cid}: session not present on reconnect")
            return bool(ack.session_present)
        return False

    def connect_failed(self) -> None:
        """A (re)connect attempt failed (the next one goes to ``self.port`` again)."""

    def dropped(self) -> None:
        self.ev.drops.append(now())
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def run(self) -> None:
        try:
            self.body()
        except Exception as exc:  # noqa: BLE001 - reported in the summary, the run goes on
            self.error = f"{type(exc).__name__}: {exc}"
            say(f"{self.cid} failed: {self.error}")

    def body(self) -> None:
        raise NotImplementedError


class Subscriber(Client):
    """Subscribes ``filter`` at ``qos``; records every arrival (QoS 2: once per packet id until its
    PUBREL) and acknowledges it."""

    def __init__(self, name: str, port: int, stop: threading.Event, filter: str, qos: int,
                 props: dict | None = None) -> None:  # fmt: skip
        super().__init__(name, port, stop)
        self.filter, self.qos, self.props = filter, qos, props
        self.arrivals: list[tuple[bytes, float]] = []  # (payload, time), every counted arrival
        self.offsets: list[str | None] = []  # a queue consumer's: each arrival's record offset
        self.unreleased: set[int] = set()  # QoS 2 packet ids received, PUBREL not yet
        self.last_arrival = 0.0
        self.subscribed = False  # a SUBACK granted the subscription (in the session the broker holds)
        self.refusals: list[tuple[float, list]] = []  # (time, SUBACK codes) of refused subscriptions
        self.granted: list[float] = []  # when each SUBACK granted the subscription

    def subscribe(self) -> None:
        self.conn.send(c.Subscribe(1, [c.Subscription(self.filter, self.qos)], self.props))

    def body(self) -> None:
        while not self.stop_event.is_set():
            present = self.connect()
            if self.conn is None:
                return
            if not present:
                self.unreleased.clear()
                self.subscribed = False
            if not self.subscribed:
                self.subscribe()
            try:
                self.serve()
            except (OSError, ConnectionError, ValueError):
                self.dropped()

    def serve(self) -> None:
        conn = self.conn
        while not self.stop_event.is_set():
            p = conn.recv()
            if p is None:
                continue
            if isinstance(p, c.Publish):
                if p.qos == 2:
                    if p.packet_id not in self.unreleased:
                        self.unreleased.add(p.packet_id)
                        self.record(p)
                    conn.send(c.Pubrec(p.packet_id))
                else:
                    self.record(p)
                    if p.qos == 1:
                        conn.send(c.Puback(p.packet_id))
                    self.delivered(conn, p)
            elif isinstance(p, c.Puback):
                self.answered(p)
            elif isinstance(p, c.Pubrel):
                self.unreleased.discard(p.packet_id)
                conn.send(c.Pubcomp(p.packet_id))
            elif isinstance(p, c.Suback):
                if any(rc >= 0x80 for rc in p.reason_codes):
                    self.refusals.append((now(), list(p.reason_codes)))
                    say(f"{self.cid}: SUBACK {p.reason_codes}")
                    raise ConnectionError(f"SUBACK {p.reason_codes}")
                self.subscribed = True
                self.granted.append(now())
            elif isinstance(p, c.Disconnect):
                raise ConnectionError("DISCONNECT from the broker")
        conn.close()

    def delivered(self, conn: Conn, p) -> None:
        """After a QoS 0/1 arrival was recorded and acknowledged (``AckConsumer``: its ``$ack``)."""

    def answered(self, p) -> None:
        """A PUBACK to a publish of this client's own (``AckConsumer``: its ``$ack``)."""

    def record(self, p) -> None:
        self.last_arrival = now()
        self.arrivals.append((p.payload, self.last_arrival))
        # a durable queue's delivery names its record (user property ``offset``)
        self.offsets.append(dict((p.properties or {}).get(c.USER_PROPERTY, ())).get("offset"))


class Publisher(Client):
    """Publishes ``name:seq`` (or ``seq`` for retained) to ``topic`` at ``qos``, one in flight, at
    ``rate`` per second; ``acked`` holds (seq, ack time) of every acknowledged one."""

    def __init__(self, name: str, port: int, stop: threading.Event, topic: str, qos: int, rate: float,
                 retain: bool = False) -> None:  # fmt: skip
        super().__init__(name, port, stop)
        self.topic, self.qos, self.rate, self.retain = topic, qos, rate, retain
        self.acked: list[tuple[int, float]] = []
        self.sent_at: dict[int, float] = {}  # seq -> when it was first sent (routed from then on)
        self.refused: list[tuple[int, int]] = []  # (seq, reason code)
        self.sent = 0  # the highest seq sent

    def payload(self, seq: int) -> bytes:
        return str(seq).encode() if self.retain else f"{self.cid}:{seq}".encode()

    def body(self) -> None:
        self.connect()
        pid = 0
        seq = 0
        while not self.stop_event.is_set() and self.conn is not None:
            seq += 1
            pid = pid % 65535 + 1
            self.sent = seq
            self.sent_at[seq] = now()
            self.one(seq, pid)
            time.sleep(1.0 / self.rate)

    def one(self, seq: int, pid: int) -> None:
        """Publish one message until it is acknowledged (resuming after reconnects) or stop."""
        publish = c.Publish(self.topic, self.payload(seq), self.qos, self.retain, False, pid, None)
        stage = "publish"  # QoS 2: "pubrel" once PUBREC came
        resend = False
        while not self.stop_event.is_set():
            if self.conn is None:
                present = self.connect()
                if self.conn is None:
                    return
                resend = present  # a new session knows nothing of the message: send it afresh
            try:
                if stage == "publish":
                    p = publish
                    if resend:
                        p = c.Publish(self.topic, publish.payload, self.qos, self.retain, True, pid, None)
                    self.conn.send(p)
                else:
                    self.conn.send(c.Pubrel(pid))
                deadline = time.monotonic() + ACK_TIMEOUT
                while True:
                    if time.monotonic() > deadline:
                        raise ConnectionError("no acknowledgement")
                    got = self.conn.recv()
                    if got is None or getattr(got, "packet_id", None) != pid:
                        if isinstance(got, c.Disconnect):
                            raise ConnectionError("DISCONNECT from the broker")
                        continue
                    if isinstance(got, c.Puback) or (isinstance(got, c.Pubrec) and got.reason_code >= 0x80):
                        if got.reason_code >= 0x80 and self.redirect(got):
                            raise ConnectionError(f"refused 0x{got.reason_code:02x}: to {self.port}")
                        if got.reason_code >= 0x80:
                            self.refused.append((seq, got.reason_code))
                        else:
                            self.acked.append((seq, now()))
                        return
                    if isinstance(got, c.Pubrec):
                        stage = "pubrel"
                        self.conn.send(c.Pubrel(pid))
                        deadline = time.monotonic() + ACK_TIMEOUT
                    elif isinstance(got, c.Pubcomp):
                        self.acked.append((seq, now()))
                        return
            except (OSError, ConnectionError, ValueError):
                self.dropped()
                resend = True

    def redirect(self, got) -> bool:
        """A refusal ``got`` names another node to publish to: True once ``self.port`` is that
        node's (the message is then sent there again, not counted as refused)."""
        return False


class RaftProducer(Publisher):
    """The raft setup's queue producer: on a failed connect it tries the next node (its home is
    down); with ``follow`` (``write_policy: reject``) a 0x83 refusal's ``leader`` user property
    (the leader's MQTT address) is where the message goes next, and a 0x83 without one (between
    an election and the new leader's claim) the next node after a moment."""

    def __init__(self, name: str, ports: list[int], stop: threading.Event, rate: float, follow: bool) -> None:
        super().__init__(name, ports[0], stop, f"$queue/{QUEUE}", 1, rate)
        self.ports, self.follow = ports, follow
        self.moves: Counter = Counter()  # why the producer went to another node

    def next_port(self) -> None:
        self.port = self.ports[(self.ports.index(self.port) + 1) % len(self.ports)]

    def connect_failed(self) -> None:
        self.next_port()
        self.moves["connect-failed"] += 1

    def redirect(self, got) -> bool:
        if not self.follow or got.reason_code != 0x83:
            return False
        leader = dict((got.properties or {}).get(c.USER_PROPERTY, ())).get("leader", "")
        port = int(leader.rpartition(":")[2]) if leader.rpartition(":")[2].isdigit() else None
        if port in self.ports and port != self.port:
            self.port = port
            self.moves["to-leader"] += 1
        else:
            time.sleep(0.2)
            self.next_port()
            self.moves["no-leader-named"] += 1
        return True


class AckConsumer(Subscriber):
    """A member of consumer group ``g`` without auto-ack: each delivery is settled by a QoS 1
    ``$queue/chaos/$ack`` publish; ``confirmed`` holds (offset, when its PUBACK said 0x00), the
    acks docs/replication.rst promises are never followed by another delivery of that record."""

    def __init__(self, name: str, port: int, stop: threading.Event) -> None:
        super().__init__(name, port, stop, f"$queue/{QUEUE}", 1, {c.USER_PROPERTY: [("consumer-group", "g")]})
        self.pending: dict[int, tuple[str, float]] = {}  # packet id -> (offset, when the $ack was sent)
        self.confirmed: list[tuple[str, float, float]] = []  # (offset, sent, confirmed)
        self.answers: Counter = Counter()  # the $acks' PUBACK reason codes (and "lost": no answer)
        self.next_pid = 0

    def delivered(self, conn: Conn, p) -> None:
        props = dict((p.properties or {}).get(c.USER_PROPERTY, ()))
        if "message-id" not in props:
            return
        self.next_pid = self.next_pid % 65535 + 1
        self.pending[self.next_pid] = (props.get("offset"), now())
        ack_props = {
            c.USER_PROPERTY: [("message-id", props["message-id"]), ("group-id", props.get("group-id", "g"))]
        }
        conn.send(c.Publish(f"$queue/{QUEUE}/$ack", b"", 1, False, False, self.next_pid, ack_props))

    def answered(self, p) -> None:
        got = self.pending.pop(p.packet_id, None)
        if got is None:
            return
        self.answers[f"0x{p.reason_code:02x}"] += 1
        if p.reason_code == 0:
            self.confirmed.append((got[0], got[1], now()))

    def dropped(self) -> None:
        self.answers["lost"] += len(self.pending)  # their outcome is unknown: settled or not
        self.pending.clear()
        super().dropped()


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Fault:
    at: float
    kind: str
    node: str
    detail: str = ""
    restored: float = 0.0
    # a kill -9 (or a worker's SIGTERM): when the signal was sent, ``at`` plus the time to find the
    # victim (a publish sent before then may have reached it)
    killed: float = 0.0
    # worker-kill, worker-term: client id -> "victim" (connected to the killed worker), "other" (to another
    # worker) or "unknown" (no connection at the kill), looked at just before the kill
    where: dict[str, str] = field(default_factory=dict)


def node_sets(setup: str, name: str, endpoint: str | None, log_level: str, workers: int = 1,
              host: str = "127.0.0.1", raft: dict | None = None) -> list[str]:  # fmt: skip
    """The ``--set`` list of node ``name``; ``host``: the address it binds (its namespace's with a
    partition fault); ``raft`` (setup raft): ``bind`` (its Raft address), ``peers``,
    ``write_policy``, ``distribution``, ``compaction`` (entries kept before a snapshot)."""
    queue: dict = {"name": QUEUE, "max_inflight": 100}
    if raft is not None:
        # a short visibility timeout: a delivery whose settlement a fault lost comes again within
        # the drain (the end check wants every record settled)
        queue["visibility_timeout"] = "8s"
        queue["replication"] = {"enabled": True, "replication_factor": 3, "mode": "sync",
                                "min_in_sync_replicas": 2, "ack_timeout": "5s"}  # fmt: skip
    queues = json.dumps([queue])
    sets = ["storage.type=lmdb", "storage.sync=batch", f"queues={queues}", "broker.sys_interval=1",
            f"log.level={log_level}"]  # fmt: skip
    if workers > 1:
        sets.append(f"server.workers={workers}")
    if host != "127.0.0.1":
        sets.append("auth.allow_anonymous=true")  # a network listener (a namespace's address)
    if setup in ("cluster", "raft"):
        sets += [
            "cluster.enabled=true",
            f"cluster.node_id={name}",
            f"cluster.transport.bind_addr={host}:{free_ports(workers)}",  # worker i: port + i
            f"cluster.etcd.endpoints={endpoint}",
            "cluster.etcd.prefix=/chaos/",
        ]
    if raft is not None:  # static peers (etcd is then not asked for the members)
        sets += [
            "cluster.raft.enabled=true",
            f"cluster.raft.bind_addr={raft['bind']}",
            f"cluster.raft.peers={json.dumps(raft['peers'])}",
            f"cluster.raft.write_policy={raft['write_policy']}",
            f"cluster.raft.distribution_mode={raft['distribution']}",
            f"cluster.raft.compaction_entries={raft['compaction']}",
        ]
    return sets


def free_ports(count: int) -> int:
    """A port p with p .. p + count - 1 free on 127.0.0.1 a moment ago."""
    import socket  # noqa: PLC0415

    for _ in range(200):
        p = free_port()
        try:
            for i in range(1, count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p + i))
        except OSError:
            continue
        return p
    raise RuntimeError(f"no {count} consecutive free ports")


def place(nodes: list[Node], i: int) -> int:
    """The port of client number ``i`` (round robin over the nodes; one node: its port)."""
    return nodes[i % len(nodes)].port


def start_clients(nodes: list[Node], stop_pub: threading.Event, stop_all: threading.Event, rate: float,
                  follow: bool | None = None):  # fmt: skip
    """The clients; ``follow`` (setup raft): the queue producer is a ``RaftProducer`` (following the
    leader's address when True) and a third member of ``g`` settles with ``$ack``."""
    group = {c.USER_PROPERTY: [("consumer-group", "g"), ("auto-ack", "true")]}
    names = {n.port: n.name for n in nodes}
    subs = [
        Subscriber("sub-q1-a", place(nodes, 0), stop_all, DATA + "#", 1),
        Subscriber("sub-q2-a", place(nodes, 1), stop_all, DATA + "#", 2),
        Subscriber("sub-q1-b", place(nodes, 2), stop_all, DATA + "#", 1),
        Subscriber("sub-q2-b", place(nodes, 0), stop_all, DATA + "#", 2),
    ]
    consumers = [
        Subscriber("queue-c1", place(nodes, 2), stop_all, f"$queue/{QUEUE}", 1, group),
        Subscriber("queue-c2", place(nodes, 0), stop_all, f"$queue/{QUEUE}", 1, group),
    ]
    if follow is not None:
        consumers.append(AckConsumer("queue-c3", place(nodes, 1), stop_all))
    for s in subs + consumers:
        s.home = names[s.port]
        s.start()
    # the subscriptions are in place before anything is published (their SUBACK is not awaited:
    # wait for their first connect, then a moment for the interest to spread)
    deadline = time.monotonic() + 30
    while any(s.ev.connects == 0 for s in subs + consumers) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(2.0)
    pubs = [
        Publisher("pub-q1", place(nodes, 1), stop_pub, DATA + "p1", 1, rate),
        Publisher("pub-q2", place(nodes, 2), stop_pub, DATA + "p2", 2, rate),
        Publisher("pub-q2-b", place(nodes, 0), stop_pub, DATA + "p3", 2, rate),
    ]
    producer = Publisher("queue-p", place(nodes, 1), stop_pub, f"$queue/{QUEUE}", 1, rate)
    if follow is not None:
        ports = [place(nodes, 1 + i) for i in range(len(nodes))]  # home first, then the others
        producer = RaftProducer("queue-p", ports, stop_pub, rate, follow)
    retainer = Publisher("retain-p", place(nodes, 2), stop_pub, RETAINED, 1, max(1.0, rate / 4), retain=True)
    for p in pubs + [producer, retainer]:
        p.home = names[p.port]
        p.start()
    return subs, consumers, pubs, producer, retainer


def connected_to(pid: int, clients: list[Client]) -> dict[str, str]:
    """Which clients hold a connection to process ``pid`` now (``Fault.where``)."""
    ports = procinfo.tcp_peer_ports(pid)
    where = {}
    for cl in clients:
        port = cl.local_port()
        where[cl.cid] = "unknown" if port is None else "victim" if port in ports else "other"
    return where


def raft_status(node: Node) -> dict | None:
    """``node``'s Raft group as ``GET /cluster/raft`` (health listener) shows it; None: no answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.node.health_port}/cluster/raft", timeout=2) as r:
            return json.loads(r.read())["groups"][0]
    except (OSError, ValueError, KeyError, IndexError):
        return None


def raft_leader(nodes: list[Node]) -> Node | None:
    """The node that the first node to answer names as the Raft leader (None: none named)."""
    by_addr = {n.raft_addr: n for n in nodes}
    for n in nodes:
        st = raft_status(n)
        if st is not None and st.get("leader") in by_addr:
            return by_addr[st["leader"]]
    return None


def wait_raft(nodes: list[Node], timeout: float = 60.0) -> Node:
    """The leader once it delivers (its claim applied) and every node names it."""
    deadline = time.monotonic() + timeout
    states: list = []
    while time.monotonic() < deadline:
        states = [raft_status(n) for n in nodes]
        leaders = {st.get("leader") for st in states if st is not None}
        if all(states) and len(leaders) == 1 and any(st["delivering"] for st in states):
            return next(n for n in nodes if n.raft_addr in leaders)
        time.sleep(0.2)
    raise RuntimeError(f"no Raft leader known to every node within {timeout:.0f}s: {states}")


def caught_up(node: Node, nodes: list[Node], timeout: float = 60.0) -> str:
    """Wait until ``node`` applied what the leader had committed when asked; in words, with the
    snapshots it installed since its start."""
    began = time.monotonic()
    target = None
    st = None
    while time.monotonic() - began < timeout:
        leader = raft_leader(nodes)
        lst = raft_status(leader) if leader is not None else None
        if target is None and lst is not None and "commit_index" in lst:
            target = lst["commit_index"]
        st = raft_status(node)
        if target is not None and st is not None and st["applied"] >= target:
            return f"caught up in {time.monotonic() - began:.1f} s, snapshots installed {st['snapshots_installed']}"
        time.sleep(0.2)
    return f"NOT caught up within {timeout:.0f} s (applied {(st or {}).get('applied')}, leader's commit {target})"


def inject(kind: str, node: Node, rng: random.Random, workers: int | None, f: Fault,
           clients: list[Client], nodes: list[Node] | None = None) -> str:  # fmt: skip
    """Apply fault ``f`` of ``kind`` to ``node`` and wait until it is back; what was done, in words.
    ``lag-restart`` (setup raft): kill -9 and restart, or SIGSTOP and SIGCONT, 12-18 s away under
    load (the group's log compacts past it), and wait until it caught up (from the leader's
    snapshot)."""
    if kind in WORKER_FAULTS:
        pids = node.workers()
        victim = rng.choice(pids)
        f.where = connected_to(victim, clients)
        os.kill(victim, signal.SIGKILL if kind == "worker-kill" else signal.SIGTERM)
        f.killed = now()
        deadline = time.monotonic() + READY_TIMEOUT
        while victim in node.workers() or len(node.workers()) != workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node.name}: worker {victim} not restarted")
            time.sleep(0.05)
        node.wait_ready(workers)
        on_it = sorted(cid for cid, w in f.where.items() if w == "victim")
        return f"worker pid {victim} (of {pids}), connected to it: {', '.join(on_it) or '-'}"
    if kind == "lag-restart":
        away = rng.uniform(12.0, 18.0)
        how = rng.choice(("killed", "stopped"))
        if how == "killed":
            f.killed = node.kill()
            time.sleep(away)
            node.start()
        else:  # the replica keeps its state and its connections, and is sent the snapshot as it runs on
            node.signal_tree(signal.SIGSTOP)
            time.sleep(away)
            node.signal_tree(signal.SIGCONT)
        node.wait_ready(workers)
        return f"{how} {away:.1f} s; {caught_up(node, nodes or [node])}"
    if kind == "node-kill":
        f.killed = node.kill()
        node.start()
    elif kind == "node-term":
        node.node.stop(timeout=60)
        node.start()
    elif kind == "partition":
        hold = rng.uniform(*PARTITION_TTLS) * LEASE_TTL
        node.lab.partition(node.index)
        f.killed = now()
        lost = None  # when the cut-off node's /ready went 503 (its lease lost)
        try:
            while now() - f.killed < hold:
                if lost is None and not node.node.ready():
                    lost = now() - f.killed
                time.sleep(0.2)
        finally:
            node.lab.heal(node.index)
        for other in node.cluster:
            other.wait_ready(workers)
        return f"cut off {hold:.1f} s, " + (f"lease lost after {lost:.1f} s" if lost else "still ready")
    elif kind == "stop-cont":
        pause = rng.uniform(2.0, 4.0)
        node.signal_tree(signal.SIGSTOP)
        time.sleep(pause)
        node.signal_tree(signal.SIGCONT)
        node.wait_ready(workers)
        return f"stopped {pause:.1f} s"
    node.wait_ready(workers)
    return ""


def near(t: float, faults: list[Fault], before: float = 5.0) -> list[str]:
    """The faults that started at most ``before`` s after ``t`` or were in progress at ``t``."""
    return [
        f"{f.kind}@{f.node} {f.at:.3f}-{f.killed:.3f}s" if f.killed else f"{f.kind}@{f.node}"
        for f in faults
        if f.at - before <= t <= (f.restored or f.at) + 1.0
    ]


UNEXPLAINED = "unexplained"


def lost_window(sub: Subscriber, pub: Publisher, seq: int, t: float, faults: list[Fault]) -> str:
    """Which documented window message ``seq``, acknowledged at ``t`` and lost for ``sub``, falls in:

    ``subscriber-session-lost``: the subscriber's session was not present at a reconnect after the
    message was first sent (or the message was sent before its new subscription was granted): a
    session the stopped or killed node could not hand over. Not a kill -9 or a SIGTERM of its
    worker alone any more: a reconnect that lands on the other worker waits for the restart and
    takes the restored session over (docs/cluster.rst, "Client ids"), or finds it where the
    stopping worker handed it (a cluster node), so a session lost while worker faults are in
    progress (and no other fault) is ``unexplained``;
    ``publisher-node-killed``: the publisher's worker or node was killed -9 (its signal sent:
    ``Fault.killed``, not the fault's start, which finding the victim precedes: a publish sent
    meanwhile may have reached it) between the message's first send and 2 s after its
    acknowledgement, the forwarded copies still in its memory queues (docs/cluster.rst, "What the PUBACK means across nodes"; a QoS 2 message sent again after the
    restart is acknowledged there without being routed again). A worker kill counts only when the
    publisher was connected to the killed worker (or had no connection then): the kill of the
    receiving worker loses nothing, its batches are acknowledged once committed and sent again to
    the restarted worker otherwise (same section);
    else ``unexplained`` (a violation of a stated promise)."""
    sent = pub.sent_at.get(seq, t)
    for lost_at in sub.ev.session_lost:
        granted = next((g for g in sub.granted if g >= lost_at), lost_at + ACK_TIMEOUT)
        around = {f.kind for f in faults if f.at <= lost_at <= (f.restored or f.at) + CLAIM_WAIT}
        if sent <= granted and not (around and around <= WORKER_FAULTS):
            return "subscriber-session-lost"
    for f in faults:  # killed after the message was first sent, up to 2 s after its acknowledgement
        # (a lag-restart that killed its node, ``killed`` set, is a node kill; one that stopped it is not)
        node_kill = f.kind == "node-kill" or (f.kind == "lag-restart" and f.killed)
        if not (node_kill or f.kind == "worker-kill") or f.node != pub.home:
            continue
        on_it = node_kill or f.where.get(pub.cid, "unknown") != "other"
        if on_it and sent <= (f.killed or f.at) <= t + 2.0:
            return "publisher-node-killed"
    return UNEXPLAINED


def check(subs, consumers, pubs, producer, retainer, retained_seen, faults) -> tuple[dict, list[str]]:
    """The end checks: figures per promise and a line per finding."""
    lines: list[str] = []
    out: dict = {"subscribers": {}, "queue": {}, "retained": {}}
    bad = 0
    for s in subs:
        counts: Counter = Counter(p for p, _ in s.arrivals)
        first_order: dict[str, list[tuple[int, float]]] = defaultdict(list)
        seen: set[bytes] = set()
        for p, t in s.arrivals:
            if p not in seen:
                seen.add(p)
                name, _, seq = p.decode().rpartition(":")
                first_order[name].append((int(seq), t))
        row = {
            "received": len(s.arrivals),
            "sessions_lost": len(s.ev.session_lost),
            "reconnects": s.ev.connects - 1,
        }
        for pub in pubs:
            acked = pub.acked
            lost = [(seq, t) for seq, t in acked if counts[pub.payload(seq)] == 0]
            doubled = [(seq, t) for seq, t in acked if counts[pub.payload(seq)] > 1]
            order = first_order.get(pub.cid, [])
            below = [(a, b) for a, b in zip(order, order[1:], strict=False) if b[0] < a[0]]
            inversions = len(below)
            kinds: Counter = Counter(lost_window(s, pub, seq, t, faults) for seq, t in lost)
            row[pub.cid] = {"acked": len(acked), "lost": len(lost), "doubled": len(doubled),
                            "order_inversions": inversions, "lost_by_window": dict(kinds)}  # fmt: skip
            if kinds[UNEXPLAINED]:
                lines.append(
                    f"  {s.cid} connects (time, session present): {s.ev.connected}; drops {s.ev.drops}"
                )
            for seq, t in lost:
                window = lost_window(s, pub, seq, t, faults)
                bad += window == UNEXPLAINED
                head = "LOST" if window == UNEXPLAINED else f"lost in a documented window ({window}):"
                lines.append(
                    f"{head} {s.cid} <- {pub.cid}:{seq} (sent at {pub.sent_at.get(seq, t):.3f}s, acked at "
                    f"{t:.3f}s; faults {near(t, faults) or '-'})"
                )
            if s.qos == 2 and pub.qos == 2:
                # exactly once, unless the publisher's session was lost with the message in flight:
                # sent again to a new session, the broker cannot know it had it
                again = [
                    (seq, t)
                    for seq, t in doubled
                    if not any(t - 2 * ACK_TIMEOUT <= x <= t for x in pub.ev.session_lost)
                ]
                row[pub.cid]["doubled_unexplained"] = len(again)
                for seq, t in again:
                    bad += 1
                    lines.append(
                        f"DOUBLED (QoS 2) {s.cid} <- {pub.cid}:{seq} (acked at {t:.1f}s; faults {near(t, faults) or '-'})"
                    )
            if inversions:
                lines.append(
                    f"ORDER {s.cid} <- {pub.cid}: {inversions} first arrivals below an earlier one, e.g. "
                    f"{[f'{b[0]} at {b[1]:.1f}s after {a[0]}' for a, b in below[:3]]}; subscriber's "
                    f"connects {s.ev.connected}"
                )
        out["subscribers"][s.cid] = row
    # the durable queue: a record delivered again (same offset), or a payload appended twice (the
    # producer sent it again after a reconnect: QoS 1 is at least once on the publisher's side)
    deliveries: dict[bytes, list[tuple[float, str, str | None]]] = defaultdict(list)
    for cons in consumers:
        for (p, t), offset in zip(cons.arrivals, cons.offsets, strict=True):
            deliveries[p].append((t, cons.cid, offset))
    acked = producer.acked
    qlost = [(seq, t) for seq, t in acked if not deliveries.get(producer.payload(seq))]
    again = {p: sorted(d) for p, d in deliveries.items() if len(d) > 1}
    appended_twice = sum(1 for d in again.values() if len({o for _, _, o in d}) > 1)
    unexplained = 0
    for p, d in again.items():
        for (t1, c1, o1), (t2, _, o2) in zip(d, d[1:], strict=False):
            if o1 != o2:
                continue
            cons = next(x for x in consumers if x.cid == c1)
            # allowed: a fault around them (an auto-ack settlement not yet committed; a pause of a
            # member's node past the owner's 3.5 s: its member left, what it held went to another,
            # and the paused node delivered its copy once it ran again), or the first consumer's
            # connection dropped in between (its PUBACK may not have arrived): at least once
            around = any(f.at <= t2 and (f.restored or f.at) + 1.0 >= t1 - 1.0 for f in faults)
            if not around and not any(t1 <= x <= t2 for x in cons.ev.drops):
                unexplained += 1
                lines.append(f"QUEUE AGAIN without a fault or drop between: {p!r} {d}")
            else:  # listed, to be set against the docs' at-least-once windows
                lines.append(
                    f"queue delivered again ({'fault ' + ', '.join(near(t1, faults) or near(t2, faults)) if around else c1 + ' dropped'}"
                    f" between): {p!r} {[(round(t, 3), cid, o) for t, cid, o in d]}"
                )
    out["queue"] = {
        "acked_appends": len(acked),
        "lost": len(qlost),
        "delivered_more_than_once": len(again),
        "appended_twice": appended_twice,
        "again_unexplained": unexplained,
        "refused": len(producer.refused),
    }
    if qlost:
        bad += 1
        for seq, t in qlost[:10]:
            lines.append(f"QUEUE LOST queue-p:{seq} (acked at {t:.1f}s; faults {near(t, faults) or '-'})")
    bad += unexplained > 0
    # retained
    last = max((seq for seq, _ in retainer.acked), default=0)
    values = {where: v for where, v in retained_seen.items()}
    wrong = {w: v for w, v in values.items() if v is None or not (last <= v <= retainer.sent)}
    out["retained"] = {"last_acked": last, "last_sent": retainer.sent, "seen": values}
    if wrong or len(set(values.values())) > 1:
        bad += 1
        lines.append(f"RETAINED last acked {last}, last sent {retainer.sent}, seen {values}")
    out["bad"] = bad
    return out, lines


def raft_settled(nodes: list[Node], timeout: float) -> tuple[list, bool, bool]:
    """Wait (consumers still running) until the three replicas agree (commit index, applied index,
    the queue's admin view) and group ``g`` settled every record (its floor is the queue's next
    offset); (the last states, agreed, settled)."""
    deadline = time.monotonic() + timeout
    while True:
        states = [raft_status(n) for n in nodes]
        views = [
            (st.get("commit_index"), st["applied"], json.dumps(st["queues"], sort_keys=True)) if st else None
            for st in states
        ]
        agree = all(views) and len(set(views)) == 1 and views[0][0] == views[0][1]
        q = (states[0] or {}).get("queues", {}).get(QUEUE, {})
        settled = all(states) and q.get("groups", {}).get("g") == q.get("next")
        if (agree and settled) or time.monotonic() > deadline:
            return states, bool(agree), bool(settled)
        time.sleep(0.5)


def check_raft(states: list, agree: bool, settled: bool, consumers: list[Subscriber], producer: Publisher,
               faults: list[Fault]) -> tuple[dict, list[str], int]:  # fmt: skip
    """Setup raft's end checks: the replicas agree, everything is settled, and no record went out
    again after a confirmed ``$ack`` of it (docs/replication.rst, Durability), unless the acking
    consumer's node was faulted meanwhile (its members were dropped as silent: the documented
    visibility-timeout case)."""
    lines: list[str] = []
    bad = 0
    rows = [
        {
            k: st.get(k)
            for k in (
                "self",
                "leader",
                "term",
                "commit_index",
                "applied",
                "snapshots_installed",
                "snapshots_written",
                "settlements_stale",
                "acks_timed_out",
            )
        }  # fmt: skip
        | {"queue": {k: v for k, v in st["queues"].get(QUEUE, {}).items() if k != "registered"}}
        if st
        else None
        for st in states
    ]
    if not agree:
        bad += 1
        lines.append(f"RAFT REPLICAS DIFFER: {rows}")
    if not settled:
        bad += 1
        lines.append(f"RAFT UNSETTLED after the drain: {rows}")
    by_offset: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for cons in consumers:
        for (_, t), offset in zip(cons.arrivals, cons.offsets, strict=True):
            by_offset[offset].append((t, cons.cid))
    again_after_ack = explained = 0
    acker = next((x for x in consumers if isinstance(x, AckConsumer)), None)
    for offset, sent, at in acker.confirmed if acker else []:
        for t, cid in by_offset[offset]:
            if t <= at:
                continue
            window = [
                f
                for f in faults
                if f.node == acker.home and f.at - 1.0 <= t and (f.restored or f.at) >= sent - 1.0
            ]
            if window:
                explained += 1
                lines.append(f"acked again in a documented window (the acking node faulted): offset {offset} "
                             f"$ack {sent:.3f}-{at:.3f}s, again to {cid} at {t:.3f}s")  # fmt: skip
            else:
                again_after_ack += 1
                lines.append(f"ACKED AGAIN: offset {offset} $ack sent {sent:.3f}s confirmed {at:.3f}s, delivered "
                             f"again to {cid} at {t:.3f}s; faults {near(at, faults) or '-'}")  # fmt: skip
    bad += again_after_ack
    out = {
        "replicas": rows,
        "agree": agree,
        "settled": settled,
        "ack_answers": dict(acker.answers) if acker else {},
        "acks_confirmed": len(acker.confirmed) if acker else 0,
        "delivered_after_confirmed_ack": again_after_ack,
        "delivered_after_confirmed_ack_explained": explained,
        "producer_moves": dict(getattr(producer, "moves", {})),
    }
    return out, lines, bad


def read_retained(nodes: list[Node], workers: int | None) -> dict[str, int | None]:
    """The retained value of ``chaos/retained`` on every node (and, with workers, on each worker,
    found through ``$SYS/broker/worker``)."""
    seen: dict[str, int | None] = {}
    for node in nodes:
        want = workers or 1
        for _ in range(40):
            conn = Conn(node.port)
            try:
                conn.send(c.Connect("", True, 30, 5, None, None, None, None, None))
                conn.send(
                    c.Subscribe(
                        1, [c.Subscription(RETAINED, 0), c.Subscription("$SYS/broker/worker", 0)], None
                    )
                )
                worker, value = "w0" if not workers else None, None
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline and (worker is None or value is None):
                    p = conn.recv()
                    if isinstance(p, c.Publish):
                        if p.topic == RETAINED:
                            value = int(p.payload)
                        elif p.topic == "$SYS/broker/worker":
                            worker = p.payload.decode()
            finally:
                conn.close()
            seen[f"{node.name}/{worker}"] = value
            if sum(1 for k in seen if k.startswith(node.name + "/")) >= want:
                break
    return seen


def run(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    load0 = os.getloadavg()
    say(
        f"setup {args.setup}, seed {seed}, rounds {args.rounds}, load {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}"
    )
    lab = None
    if "partition" in args.faults:
        from tests import netns  # noqa: PLC0415

        reason = netns.unavailable()
        if reason:
            say(f"partition fault skipped: {reason}")
            args.faults = [f for f in args.faults if f != "partition"]
            if not args.faults:
                return 0
        else:
            lab = netns.NetnsLab(3)
    work = Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    etcd = endpoint = None
    nodes: list[Node] = []
    stop_pub, stop_all = threading.Event(), threading.Event()
    workers = args.workers if args.workers > 1 else None
    faults: list[Fault] = []
    clients: list[Client] = []
    try:
        if lab is not None:
            lab.start()
            say(f"partition: nodes in namespaces {', '.join(lab.names)} on {lab.network}")
        if args.setup != "workers":
            from bench.cluster_cross import start_etcd, wait_peers  # noqa: PLC0415

            etcd, endpoint = start_etcd(work, lab.service if lab else "127.0.0.1")
        names = ["n0"] if args.setup == "workers" else ["n0", "n1", "n2"]
        peers = [f"127.0.0.1:{free_port()}" for _ in names]
        for i, (name, bind) in enumerate(zip(names, peers, strict=True)):
            host = lab.addr(i) if lab else "127.0.0.1"
            raft = None
            if args.setup == "raft":
                raft = {"bind": bind, "peers": peers, "write_policy": args.write_policy,
                        "distribution": args.distribution, "compaction": args.compaction}  # fmt: skip
            sets = node_sets(args.setup, name, endpoint, args.log_level, args.workers, host, raft)
            nodes.append(Node(name, work / name, sets, host, tuple(lab.wrap(i, [])) if lab else ()))
            nodes[-1].lab, nodes[-1].index, nodes[-1].cluster = lab, i, nodes
            nodes[-1].raft_addr = bind
        for node in nodes:  # n0 first: it owns the queue
            node.start()
            if workers:
                node.wait_ready(workers)
        if args.setup != "workers":
            for node in nodes:
                wait_peers(node.node, 60)
        follow = None
        if args.setup == "raft":
            say(f"Raft leader {wait_raft(nodes).name} ({args.write_policy}, {args.distribution})")
            follow = args.write_policy == "reject"
        subs, consumers, pubs, producer, retainer = start_clients(
            nodes, stop_pub, stop_all, args.rate, follow
        )
        clients = [*subs, *consumers, *pubs, producer, retainer]
        say(f"clients up on ports {sorted({n.port for n in nodes})}")
        deadline = time.monotonic() + args.max_seconds
        if args.rounds == 0:
            time.sleep(args.run_for)
        for r in range(args.rounds):
            if time.monotonic() > deadline:
                say(f"time bound reached after {r} faults")
                break
            time.sleep(rng.uniform(args.min_gap, args.max_gap))
            kind = rng.choice(args.faults)
            node = rng.choice(nodes)
            role = ""
            if args.setup == "raft":  # towards the leader; a lagging replica is a follower
                leader = raft_leader(nodes)
                if kind == "lag-restart":
                    node = rng.choice([n for n in nodes if n is not leader])
                elif leader is not None and rng.random() < LEADER_SHARE:
                    node = leader
                role = " (leader)" if node is leader else " (follower)"
            f = Fault(now(), kind, node.name)
            faults.append(f)
            say(f"fault {r + 1}: {kind} on {node.name}{role}")
            f.detail = role.strip() + " " + inject(kind, node, rng, workers, f, clients, nodes)
            f.restored = now()
            say(f"  restored after {f.restored - f.at:.1f} s {f.detail}")
        time.sleep(args.min_gap)
        stop_pub.set()
        for p in [*pubs, producer, retainer]:
            p.join(ACK_TIMEOUT * 2)
        # drain: until every subscriber has had nothing new for `quiet` s (bounded)
        say("publishers stopped; draining")
        limit = time.monotonic() + args.drain
        while time.monotonic() < limit:
            if all(now() - s.last_arrival > args.quiet for s in [*subs, *consumers]):
                break
            time.sleep(0.5)
        raft_end = raft_settled(nodes, args.drain) if args.setup == "raft" else None
        retained_seen = read_retained(nodes, workers)
        stop_all.set()
        for s in [*subs, *consumers]:
            s.join(5)
        out, lines = check(subs, consumers, pubs, producer, retainer, retained_seen, faults)
        if raft_end is not None:
            out["raft"], more, bad = check_raft(*raft_end, consumers, producer, faults)
            lines += more
            out["bad"] += bad
    finally:
        stop_pub.set()
        stop_all.set()
        for node in nodes:
            node.node.stop(timeout=30)
        if etcd is not None:
            etcd.kill()
            etcd.wait(10)
        if lab is not None:
            lab.close()
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    load1 = os.getloadavg()
    out.update(setup=args.setup, seed=seed, faults=[f"{f.kind}@{f.node} {f.detail}".strip() for f in faults],
               load_before=[round(x, 2) for x in load0], load_after=[round(x, 2) for x in load1],
               client_errors={x.cid: x.error for x in clients if x.error},
               connects={x.cid: {"longest_s": x.ev.longest_connect, "refused": dict(x.ev.refused)}
                         for x in clients},
               publishers={p.cid: {"sent": p.sent, "acked": len(p.acked), "refused": len(p.refused),
                                   "reconnects": p.ev.connects - 1, "sessions_lost": len(p.ev.session_lost)}
                           for p in [*pubs, producer, retainer]},
               consumers={x.cid: {"received": len(x.arrivals), "reconnects": x.ev.connects - 1,
                                  "sessions_lost": len(x.ev.session_lost), "refused": x.refusals}
                          for x in consumers},
               seconds=round(now(), 1))  # fmt: skip
    for line in lines:
        print(line)
    print(json.dumps(out, indent=1, default=str))
    bad = out["bad"] + len(out["client_errors"])
    say(
        f"summary: {'OK' if not bad else f'{bad} finding(s)'} (setup {args.setup}, seed {seed}, {len(faults)} faults)"
    )
    return 1 if bad else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--setup", choices=sorted(FAULTS), default="workers")
    p.add_argument("--workers", type=int, default=None, help="workers per node (workers: 2, cluster: 1)")
    p.add_argument("--rounds", type=int, default=10, help="faults to inject (0: none, run --run-for s)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--rate", type=float, default=40.0, help="messages/s per publisher")
    p.add_argument("--min-gap", type=float, default=3.0, help="seconds between faults, at least")
    p.add_argument("--max-gap", type=float, default=8.0)
    p.add_argument("--run-for", type=float, default=5.0, help="with --rounds 0: seconds of traffic")
    p.add_argument("--max-seconds", type=float, default=240.0, help="no new fault after this")
    p.add_argument("--drain", type=float, default=60.0, help="at most this long to drain at the end")
    p.add_argument("--quiet", type=float, default=5.0, help="drained: nothing new for this long")
    p.add_argument("--faults", default="", help="a comma-separated subset of the set-up's faults")
    p.add_argument("--log-level", default="warning", help="the nodes' log.level")
    raft = p.add_argument_group("setup raft")
    raft.add_argument("--write-policy", choices=("forward", "reject"), default="forward",
                      help="cluster.raft.write_policy (reject: the producer follows the leader)")  # fmt: skip
    raft.add_argument("--distribution", choices=("forward", "replicate"), default="forward",
                      help="cluster.raft.distribution_mode")  # fmt: skip
    raft.add_argument("--compaction", type=int, default=200,
                      help="cluster.raft.compaction_entries (small: a lagging replica gets a snapshot)")  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep the nodes' data dirs and logs")
    args = p.parse_args(argv)
    if args.workers is None:
        args.workers = 2 if args.setup == "workers" else 1
    if args.setup == "workers" and args.workers < 2:
        p.error("--setup workers needs --workers 2 or more")
    allowed = FAULTS[args.setup]
    if args.setup in ("cluster", "raft") and args.workers > 1:
        allowed = (*sorted(WORKER_FAULTS), *allowed)
    args.faults = [f.strip() for f in args.faults.split(",") if f.strip()] or list(allowed)
    if set(args.faults) - set(allowed):
        p.error(f"--setup {args.setup} (--workers {args.workers}) has the faults {', '.join(allowed)}")
    return args


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
