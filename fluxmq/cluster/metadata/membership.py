"""Membership: this node's lease and its ``/nodes/{node_id}`` registration; the live member list.

The node holds one etcd lease (``cluster.etcd.lease_ttl``) renewed by a greenlet every third of the
TTL. Everything this node owns in etcd hangs on it (its registration, the sessions it owns, the
leader key when it leads): when the node dies the lease expires and all of it goes at once, and a
graceful stop revokes it. When renewals fail for longer than the TTL (etcd down or unreachable) the
lease is counted lost: ``ready`` turns false, and once etcd answers again a new lease is granted and
the registration, the sessions and the campaign are made again under it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import gevent

from fluxmq.errors import ClusterError

from .client import EtcdClient, PrefixMirror, cmp_create, cmp_value, op_get, op_put, range_kvs

__all__ = ["Membership", "NodeLease"]

log = logging.getLogger("fluxmq.cluster.membership")


class NodeLease:
    """One lease kept alive in the background; ``on_lost``/``on_renewed`` tell the owner."""

    def __init__(self, client: EtcdClient, ttl: float) -> None:
        self.client = client
        self.ttl = ttl
        self.id = 0
        self.alive = False
        self.last_renewed = 0.0
        self.error = ""
        self.on_lost: Callable[[], None] | None = None
        self.on_replaced: Callable[[int], None] | None = None  # a new lease after a loss (its id)
        self._greenlet: gevent.Greenlet | None = None

    def grant(self) -> int:
        self.id = self.client.lease_grant(self.ttl)
        self.alive = True
        self.last_renewed = time.monotonic()
        self.error = ""
        return self.id

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._keep_alive)

    def stop(self, revoke: bool = True) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=True, timeout=5)
            self._greenlet = None
        if revoke and self.id and self.alive:
            try:
                self.client.lease_revoke(self.id, timeout=min(self.client.timeout, 3.0))
            except ClusterError as exc:
                log.warning("lease_revoke_failed", extra={"lease": self.id, "error": str(exc)})
        self.alive = False

    def _lost(self, why: str) -> None:
        if self.alive:
            self.alive = False
            self.error = why
            log.error("lease_lost", extra={"lease": self.id, "why": why})
            if self.on_lost is not None:
                self.on_lost()

    def _keep_alive(self) -> None:
        interval = max(0.2, self.ttl / 3)
        while True:
            gevent.sleep(interval)
            if not self.alive:
                self._regain()
                continue
            try:
                left = self.client.lease_keepalive(self.id, timeout=interval)
            except ClusterError as exc:
                self.error = str(exc)
                if time.monotonic() - self.last_renewed >= self.ttl:
                    self._lost(f"not renewed for {self.ttl:g}s (lease TTL): {exc}")
                continue
            if left <= 0:
                self._lost("etcd says the lease expired")
                continue
            self.last_renewed = time.monotonic()
            if self.error:  # etcd answers again: the watches' streams may be stale (client.py)
                self.client.rewatch()
            self.error = ""

    def _regain(self) -> None:
        try:
            self.grant()
        except ClusterError as exc:
            self.error = f"lease lost; etcd: {exc}"
            return
        log.warning("lease_regained", extra={"lease": self.id})
        self.client.rewatch()
        if self.on_replaced is not None:
            try:
                self.on_replaced(self.id)
            except Exception as exc:
                log.exception("lease_replaced_handler_failed")
                self.error = f"re-registration failed: {exc}"


class Membership:
    """``/nodes/{node_id}`` under the node lease, and a watched view of every live node."""

    def __init__(
        self,
        client: EtcdClient,
        prefix: str,
        node_id: str,
        transport_addr: str,
        state_file: Path | None = None,
        announce: dict[str, str] | None = None,
    ) -> None:
        self.client = client
        self.prefix = prefix + "nodes/"
        self.node_id = node_id
        self.transport_addr = transport_addr
        # More addresses the record carries (``{"raft": host:port}``): what the others learn of this
        # node from etcd besides its transport (``announced``).
        self.announce = dict(announce or {})
        self.state_file = state_file  # the lease of our last registration, to tell a restart from a twin
        self.started_at = time.time()
        self.registered = False
        self._callbacks: list[Callable[[dict[str, str]], None]] = []
        self._members: dict[str, str] = {}
        self._announced: dict[str, dict] = {}  # node id -> its record's announced addresses
        # Nodes seen live since this node started that went without saying they leave (killed, cut
        # off): health counts them as unreachable peers. A graceful stop marks its record "leaving".
        self._lost: dict[str, str] = {}
        # monotonic: when a lost node last came back, or when this node began watching (it cannot
        # know of nodes lost before)
        self._lost_until = time.monotonic()
        self._record = b""
        self._lease_id = 0
        self._mirror: PrefixMirror | None = None

    @property
    def key(self) -> str:
        return self.prefix + self.node_id

    def register(self, lease_id: int) -> None:
        """Put ``/nodes/{node_id}`` under ``lease_id``; ClusterError (one line) when another live
        process holds this node id. A registration left by this node's previous run (its lease is
        the one recorded in ``state_file``) is revoked first, so a restart need not wait for the TTL."""
        record = json.dumps(
            {
                "addr": self.transport_addr,
                "started_at": self.started_at,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "lease": lease_id,
                **self.announce,
            }
        ).encode()
        for _ in range(3):
            ok, responses = self.client.txn(
                [cmp_create(self.key, 0)], [op_put(self.key, record, lease_id)], [op_get(self.key)]
            )
            if ok:
                self.registered = True
                self._record, self._lease_id = record, lease_id
                self._remember(lease_id)
                log.info("node_registered", extra={"node_id": self.node_id, "lease": lease_id})
                return
            kvs = range_kvs(responses[0]) if responses else []
            if not kvs:
                continue  # it expired meanwhile: try again
            current = kvs[0]
            if current["lease"] == lease_id:
                self.registered = True
                return
            if current["lease"] and current["lease"] == self._previous_lease():
                log.warning(
                    "previous_registration_revoked",
                    extra={"node_id": self.node_id, "lease": current["lease"]},
                )
                self.client.lease_revoke(current["lease"])
                continue
            try:
                other = json.loads(current["value"])
            except ValueError:
                other = {}
            raise ClusterError(
                f"cluster.node_id: {self.node_id!r} is already live in the cluster (registered by pid "
                f"{other.get('pid', '?')} on {other.get('host', '?')}, transport {other.get('addr', '?')}); "
                "give this node another node_id, or stop the other one"
            )
        raise ClusterError(f"cluster.node_id: could not register {self.node_id!r} in etcd (it kept changing)")

    def read_state(self) -> dict:
        """What this node recorded about itself (``lease``, ``retained_joined``); {} when nothing."""
        if self.state_file is None:
            return {}
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def write_state(self, **values) -> None:
        if self.state_file is None:
            return
        state = {**self.read_state(), "node_id": self.node_id, **values}
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            tmp.replace(self.state_file)
        except OSError as exc:
            log.warning("node_state_not_written", extra={"file": str(self.state_file), "error": str(exc)})

    def _previous_lease(self) -> int:
        try:
            return int(self.read_state().get("lease", 0))
        except (TypeError, ValueError):
            return 0

    def _remember(self, lease_id: int) -> None:
        self.write_state(lease=lease_id)

    def watch(self) -> None:
        self._lost_until = time.monotonic()
        self._mirror = PrefixMirror(self.client, self.prefix, self._changed, name="nodes")
        self._mirror.start()

    def stop(self) -> None:
        if self._mirror is not None:
            self._mirror.stop()

    def leave(self) -> None:
        """Mark our record "leaving" (the others then do not count us as a lost peer); the caller
        revokes the lease next, which deletes it."""
        if not self._record:
            return
        record = json.loads(self._record)
        record["leaving"] = True
        try:
            self.client.txn(
                [cmp_value(self.key, self._record)],
                [op_put(self.key, json.dumps(record).encode(), self._lease_id)],
            )
        except ClusterError as exc:
            log.warning("leave_not_marked", extra={"error": str(exc)})

    def _changed(self, key: str, kv: dict | None, old: dict | None) -> None:
        node = key[len(self.prefix) :]
        if kv is None:
            addr = self._members.pop(node, None)
            self._announced.pop(node, None)
            if addr is None:
                return
            if not (old is not None and _leaving(old["value"])) and node != self.node_id:
                self._lost[node] = addr
        else:
            try:
                record = json.loads(kv["value"])
                addr = record.get("addr", "")
            except (ValueError, AttributeError):
                record, addr = {}, ""
            if self._lost.pop(node, None) is not None:
                self._lost_until = time.monotonic()
            if record.get("leaving"):
                return  # the delete follows; it is not reported as lost
            self._announced[node] = {k: v for k, v in record.items() if isinstance(v, str)}
            if self._members.get(node) == addr:
                return
            self._members[node] = addr
        members = dict(self._members)
        log.info("members_changed", extra={"members": ",".join(sorted(members))})
        for callback in list(self._callbacks):
            try:
                callback(members)
            except Exception:
                log.exception("members_callback_failed")

    def members(self) -> dict[str, str]:
        return dict(self._members)

    def announced(self, name: str) -> dict[str, str]:
        """Live node id -> the address it announces as ``name`` (e.g. ``raft``); nodes without one
        are left out."""
        return {
            node: rec[name]
            for node, rec in self._announced.items()
            if rec.get(name) and node in self._members
        }

    def lost(self) -> dict[str, str]:
        """Nodes seen live since this node started that went without leaving (node id -> addr)."""
        return dict(self._lost)

    def none_lost_for(self) -> float:
        """Seconds since a node last counted lost (0 while one is; since this node began watching when
        none was since)."""
        return 0.0 if self._lost else time.monotonic() - self._lost_until

    def on_members(self, callback: Callable[[dict[str, str]], None]) -> None:
        self._callbacks.append(callback)


def _leaving(value: bytes) -> bool:
    try:
        return bool(json.loads(value).get("leaving"))
    except (ValueError, AttributeError):
        return False
