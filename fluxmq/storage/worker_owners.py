"""The workers of one host own client ids through this small shared registry (no etcd).

Layout: one LMDB environment in the node's run directory (``{run_dir}/owners``), no named
databases; key = the client id (UTF-8), value = ``"{worker member} {pid}"``. A claim is a
compare-and-swap in one write transaction. An entry whose pid is no longer alive belongs to nobody
(a worker killed with -9 frees its ids at once). ``fluxmq.cluster.workers`` runs
``ClusterSessions`` (the takeover) over it; the layout is the storage layer's, as every other.
"""

from __future__ import annotations

import os

import lmdb

#: bytes of the shared ownership table (client ids and worker names: tens of bytes per client)
OWNERS_MAP_SIZE = 256 << 20


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalOwnership:
    """The ownership registry of ``ClusterSessions`` for the workers of one host (no etcd)."""

    def __init__(self, path: str, node_id: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.env = lmdb.open(
            path, map_size=OWNERS_MAP_SIZE, sync=False, metasync=False, readahead=False, max_dbs=0
        )
        self.node_id = node_id
        self.pid = os.getpid()
        self.value = f"{node_id} {self.pid}".encode()

    def _owner(self, raw: bytes | None) -> str | None:
        """The live worker an entry names, or None (no entry, or its process is gone)."""
        if raw is None:
            return None
        node, _, pid = bytes(raw).decode().partition(" ")
        if node == self.node_id and int(pid) == self.pid:
            return node
        return node if _alive(int(pid)) else None

    def acquire_session(self, client_id: str, take_from: str | None = None) -> str | None:
        """Own ``client_id`` unless another live worker does (returned; it hands the session over,
        then the caller acquires again with ``take_from`` naming it)."""
        key = client_id.encode()
        with self.env.begin(write=True) as txn:
            owner = self._owner(txn.get(key))
            if owner is None or owner == self.node_id or owner == take_from:
                txn.put(key, self.value)
                return None
            return owner

    def release_session(self, client_id: str) -> None:
        key = client_id.encode()
        with self.env.begin(write=True) as txn:
            if txn.get(key) == self.value:
                txn.delete(key)

    def owned_by(self, client_id: str) -> str | None:
        with self.env.begin() as txn:
            return self._owner(txn.get(client_id.encode()))

    def adopt(self, client_ids) -> list[str]:
        """Own the restored sessions nobody else owns; returns those another live worker owns."""
        taken = []
        with self.env.begin(write=True) as txn:
            for client_id in client_ids:
                key = client_id.encode()
                owner = self._owner(txn.get(key))
                if owner is None or owner == self.node_id:
                    txn.put(key, self.value)
                else:
                    taken.append(client_id)
        return taken

    def close(self) -> None:
        self.env.close()
