"""The workers of one host own client ids through this small shared registry (no etcd).

Layout: one LMDB environment in the node's run directory (``{run_dir}/owners``), no named
databases; key = the client id (UTF-8), value = ``"{worker member} {pid}"``; key = NUL + a worker's
member id (a client id holds no NUL [MQTT-1.5.4-2]), value = the pid of that worker's process that
last adopted its restored sessions (its record, written in the adoption's transaction). A claim is
a compare-and-swap in one write transaction.

An entry whose pid is no longer alive (its worker killed, or stopped: a graceful stop keeps its
ids too, ``fluxmq.cluster.workers.WorkerNode.stop``) belongs to nobody, unless its worker comes back
(``restarts(member)``: the arbiter starts it again) and has not adopted yet (its record names no
live process): then its restored copy is coming back, and ``acquire_session`` raises
``OwnerRestarting`` (the claim waits for it, ``fluxmq.cluster.handover.ClusterSessions``), or
ServerUnavailable once the node is stopping (``stopping()``: the copy is back at its next start).
Once the restarted worker adopted, an entry still naming the dead process names a session its
store did not hold: nobody's. ``fluxmq.cluster.workers`` runs ``ClusterSessions`` (the takeover) over it; the
layout is the storage layer's, as every other.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import lmdb

from fluxmq.errors import OwnerRestarting, ServerUnavailable

#: bytes of the shared ownership table (client ids and worker names: tens of bytes per client)
OWNERS_MAP_SIZE = 256 << 20
#: first byte of a worker's record key (no client id holds a NUL)
_RECORD = b"\x00"


def process_alive(pid: int) -> bool:
    """True while process ``pid`` runs: a worker killed -9 is a zombie until its arbiter reaps it
    (``kill(pid, 0)`` still succeeds), and dead already."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True  # no /proc: as kill() says
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X")


class LocalOwnership:
    """The ownership registry of ``ClusterSessions`` for the workers of one host (no etcd)."""

    def __init__(
        self,
        path: str,
        node_id: str,
        restarts: Callable[[str], bool] | None = None,
        stopping: Callable[[], bool] | None = None,
    ) -> None:
        """``restarts(member)``: True when that worker, dead, comes back with its store (None: never,
        every dead worker's ids are nobody's); ``stopping()``: True once the node stops (a dead
        worker comes back at the node's next start only)."""
        os.makedirs(path, exist_ok=True)
        self.env = lmdb.open(
            path, map_size=OWNERS_MAP_SIZE, sync=False, metasync=False, readahead=False, max_dbs=0
        )
        self.node_id = node_id
        self.pid = os.getpid()
        self.value = f"{node_id} {self.pid}".encode()
        self.restarts = restarts
        self.stopping = stopping

    def _owner(self, raw: bytes | None) -> str | None:
        """The live worker an entry names, or None (no entry, or its process is gone)."""
        if raw is None:
            return None
        node, _, pid = bytes(raw).decode().partition(" ")
        if node == self.node_id and int(pid) == self.pid:
            return node
        return node if process_alive(int(pid)) else None

    def _restarting(self, txn, raw: bytes) -> str | None:
        """The worker a dead entry names when its restored copy may still come back: it comes back
        and no process of it adopted since (its record names no live pid). Raises
        ServerUnavailable when the node is stopping: the copy comes back at its next start only."""
        node, _, pid = bytes(raw).decode().partition(" ")
        if node == self.node_id or self.restarts is None or not self.restarts(node):
            return None  # (this worker's own earlier process: its adoption here passed over the id)
        record = txn.get(_RECORD + node.encode())
        if record is not None and int(record) != int(pid) and process_alive(int(record)):
            return None  # back, and the id was not among the sessions it restored
        if self.stopping is not None and self.stopping():
            raise ServerUnavailable(
                f"the node is stopping: worker {node} restores the session at its next start"
            )
        return node

    def acquire_session(self, client_id: str, take_from: str | None = None) -> str | None:
        """Own ``client_id`` unless another live worker does (returned; it hands the session over,
        then the caller acquires again with ``take_from`` naming it). Raises ``OwnerRestarting``
        when a dead worker other than ``take_from`` owns it and is being restarted (not adopted
        yet); ``take_from`` naming that worker takes the id from it (a Clean Start)."""
        key = client_id.encode()
        with self.env.begin(write=True) as txn:
            raw = txn.get(key)
            owner = self._owner(raw)
            if owner is None and raw is not None:
                restarting = self._restarting(txn, raw)
                if restarting is not None and restarting != take_from:
                    raise OwnerRestarting(
                        restarting, f"worker {restarting} owning {client_id!r} is restarting"
                    )
            if owner is None or owner == self.node_id or owner == take_from:
                txn.put(key, self.value)
                return None
            return owner

    def give_to(self, client_id: str, member: str) -> bool:
        """Name ``member``'s last process (its record) as the owner of ``client_id``, which this
        worker owns or nobody does, when ``member`` comes back (``restarts``): a take-back from
        ``member`` that failed (it was killed) leaves the id to its restored copy, and a claim
        meanwhile waits for it (``OwnerRestarting``). False, nothing written, otherwise."""
        if self.restarts is None or not self.restarts(member):
            return False
        key = client_id.encode()
        with self.env.begin(write=True) as txn:
            record = txn.get(_RECORD + member.encode())
            if record is None or txn.get(key) not in (None, self.value):
                return False
            txn.put(key, f"{member} {int(record)}".encode())
        return True

    def release_session(self, client_id: str) -> None:
        key = client_id.encode()
        with self.env.begin(write=True) as txn:
            if txn.get(key) == self.value:
                txn.delete(key)

    def owned_by(self, client_id: str) -> str | None:
        with self.env.begin() as txn:
            return self._owner(txn.get(client_id.encode()))

    def adopt(self, client_ids) -> list[str]:
        """Own the restored sessions nobody else owns; returns those another live worker owns. Writes
        this worker's record in the same transaction: a claim waiting for this worker's restart
        (``OwnerRestarting``) sees every restored id owned here, the others nobody's."""
        taken = []
        with self.env.begin(write=True) as txn:
            txn.put(_RECORD + self.node_id.encode(), str(self.pid).encode())
            for client_id in client_ids:
                key = client_id.encode()
                owner = self._owner(txn.get(key))
                if owner is None or owner == self.node_id:
                    txn.put(key, self.value)
                else:
                    taken.append(client_id)
        return taken

    def adopted_before(self) -> bool:
        """True when an earlier process of this worker adopted here (this one is a restart)."""
        with self.env.begin() as txn:
            return txn.get(_RECORD + self.node_id.encode()) is not None

    def close(self) -> None:
        self.env.close()
