"""Several worker processes of one node (``server.workers``): what the arbiter prepares before it forks.

Each worker is one gevent process hosting a whole broker; together they act as one broker, each a
member of a local cluster (``fluxmq.cluster.workers``, imported only inside a worker). The arbiter:

* gives each worker an **index** (0..N-1, the lowest free one: a worker restarted after a crash gets
  the index, so the storage shard and socket path, of the one it replaces);
* makes the **run directory** (a private temporary directory: the workers' Unix sockets, their
  shared client-id ownership table, each serving worker's up mark (its pid: the ``workers`` check of
  ``/ready``) and, once the node stops, the mark that no dead worker is restarted any more), removed
  when the arbiter exits;
* binds the **MQTT ports**: for each MQTT listener one socket per worker index, all bound to the same
  address with ``SO_REUSEPORT``, so the kernel spreads new connections over the workers; a dead
  worker's socket stays open in the arbiter (its connections wait in the backlog for the restarted
  worker, and no other process can take the port meanwhile). The HTTP ports are gunicorn's binds,
  one socket shared by every worker.
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass, field

from fluxmq.config import parse_addr

BACKLOG = 1024


def worker_count(config) -> int:
    """``server.workers`` as a number (``"auto"`` = the cores this process may run on)."""
    n = config.server.workers
    if n == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return os.cpu_count() or 1
    return int(n)


def check_workers(config) -> int:
    """The worker count, or ConfigError when the configuration cannot run several workers."""
    from fluxmq.errors import ConfigError

    n = worker_count(config)
    c = config.cluster
    if n > 1 and c.enabled and c.transport.peers and not (c.etcd.endpoints or c.etcd.initial_cluster):
        # Each worker is a member of the cluster (n1/w0, n1/w1): only etcd tells the others about them.
        raise ConfigError(
            "server.workers",
            "1 while cluster.transport.peers is set without etcd (several workers on a cluster node "
            "register in etcd: set cluster.etcd.endpoints or initial_cluster)",
            config.origin("server.workers"),
            got=config.server.workers,
        )
    return n


@dataclass
class WorkerContext:
    """What one worker gets from the arbiter: its index, the worker count, the run directory, its
    own socket of each MQTT listener (section -> listening socket) and, on a cluster node, the node's
    id."""

    index: int
    count: int
    run_dir: str
    sockets: dict[str, socket.socket] = field(default_factory=dict)
    node_name: str = ""  # cluster.node_id on a cluster node: the workers are members n1/w0, n1/w1, ...

    @property
    def node_id(self) -> str:
        return self.member(self.index)

    def member(self, index: int) -> str:
        """The member id of worker ``index``: ``w{index}``, or ``{node}/w{index}`` on a cluster node."""
        return f"{self.node_name}/{worker_id(index)}" if self.node_name else worker_id(index)

    def socket_path(self, index: int) -> str:
        return os.path.join(self.run_dir, f"w{index}.sock")

    def restarts(self, member: str) -> bool:
        """True when ``member``, dead, comes back with its shard: another worker of this node (the
        indexes are fixed for the arbiter's run, as is the run directory), started again by the
        arbiter unless the node is stopping (``stopping``), else at the node's next start."""
        return member in (self.member(i) for i in range(self.count) if i != self.index)

    def stopping(self) -> bool:
        """True once the arbiter stops the node: no dead worker is started again (``mark_stopping``)."""
        return os.path.exists(stopping_path(self.run_dir))

    # -- which workers serve: each worker's up mark, read by every worker's /ready ------------------

    def mark_up(self) -> None:
        """This worker serves (its broker started): its mark names this process; and its mark of
        having served once since the node started (``started_path``, never removed)."""
        path = up_path(self.run_dir, self.index)
        try:
            with open(path + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(path + ".tmp", path)
            with open(started_path(self.run_dir, self.index), "w"):
                pass
        except OSError:  # the run directory is gone: the arbiter has exited, this worker stops
            pass

    def mark_down(self) -> None:
        """This worker stops serving (its stop began)."""
        try:
            os.unlink(up_path(self.run_dir, self.index))
        except OSError:
            pass

    def up(self) -> list[int]:
        """The indexes of the workers that serve: marked up by a process still running (a worker
        killed -9 leaves its mark naming a dead one)."""
        from fluxmq.storage.worker_owners import process_alive  # (lmdb: inside a worker only)

        marked = (_marked_pid(up_path(self.run_dir, i)) for i in range(self.count))
        return [i for i, pid in enumerate(marked) if pid > 0 and process_alive(pid)]

    def others_up(self) -> bool:
        """True when another worker of the node serves (a restarted worker, not the node's start)."""
        return any(i != self.index for i in self.up())

    def readiness(self) -> tuple[bool, str]:
        """The ``workers`` check of ``/ready``: up (the node serves through this worker), with details
        naming those down while one is (stopped or killed, restarting): mode ``degraded``, not 503.
        Down (503) while the node starts: until every worker has served once, a request could land
        on one still loading its store (its "starting" apps answer 503). Every worker answers the
        same, whichever one the load balancer's probe lands on."""
        never = [i for i in range(self.count) if not os.path.exists(started_path(self.run_dir, i))]
        if never:
            return False, "starting: " + ", ".join(worker_id(i) for i in never)
        up = set(self.up()) | {self.index}
        if len(up) == self.count:
            return True, ""
        down = ", ".join(worker_id(i) for i in range(self.count) if i not in up)
        return True, f"{len(up)}/{self.count} workers up; down: {down}"


def worker_id(index: int) -> str:
    """The member id of worker ``index`` in the node's local cluster."""
    return f"w{index}"


def shard_path(path: str, index: int) -> str:
    """The LMDB directory of worker ``index``: ``storage.path`` itself for worker 0 (a node going from
    one worker to several keeps its data), ``{storage.path}-w{index}`` for the others."""
    return path if index == 0 else f"{path.rstrip(os.sep)}-w{index}"


def make_run_dir() -> str:
    return tempfile.mkdtemp(prefix="fluxmq-workers-")


def up_path(run_dir: str, index: int) -> str:
    """The mark of worker ``index`` while it serves: the pid of its process."""
    return os.path.join(run_dir, f"w{index}.up")


def started_path(run_dir: str, index: int) -> str:
    """The mark of worker ``index`` having served once since the node started (never removed)."""
    return os.path.join(run_dir, f"w{index}.started")


def _marked_pid(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def stopping_path(run_dir: str) -> str:
    """The mark the arbiter leaves in the run directory once it stops restarting dead workers."""
    return os.path.join(run_dir, "stopping")


def mark_stopping(run_dir: str | None) -> None:
    """The node is stopping (the arbiter's stop, or a worker that found its arbiter gone): a dead
    worker is not started again, so a claim of an id it owned does not wait for it
    (``WorkerContext.stopping``), and a worker that lost its SIGTERM stops too
    (``BrokerWorker._node_stopping``)."""
    if run_dir is not None:
        try:
            with open(stopping_path(run_dir), "x"):
                pass
        except OSError:  # there already, or the directory is gone
            pass


def bind_reuseport(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on one address (SO_REUSEPORT); port 0 = one port the system picks."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((host, port))
            if port == 0:
                port = s.getsockname()[1]
            s.listen(BACKLOG)
    except OSError:
        for s in socks:
            s.close()
        raise
    return socks


def bind_mqtt(config, sections, count: int) -> dict[str, list[socket.socket]]:
    """section -> one socket per worker, for every enabled MQTT listener (raises OSError)."""
    bound: dict[str, list[socket.socket]] = {}
    try:
        for section in sections:
            addr = config.get(section).addr
            if addr:
                host, port = parse_addr(addr)
                bound[section] = bind_reuseport(host or "0.0.0.0", port, count)
    except OSError as exc:
        for socks in bound.values():
            for s in socks:
                s.close()
        raise OSError(f"{section}.addr {config.get(section).addr}: {exc.strerror or exc}") from None
    return bound
