"""QueueOwners: ``queues/{name}/owner`` = the cluster node holding a durable queue (no Raft).

A queue that is not replicated through Raft lives on one node: its log, consumer groups and
pending deliveries are in that node's storage (``fluxmq.cluster.queue_nodes``). The record is
permanent, bound to no lease: the queue's data stays on that node's disk, so a node that is down
makes its queues unavailable until it is back, and they are never moved silently.

* claim: ``if create_revision == 0 then put(owner=me)``, else the transaction reads the key: the
  first node that needs the queue (a publish, a subscribe, a configured queue or stored records at
  start) owns it, and every other claim returns that owner. Two nodes racing: one wins.
* The owners are read at start (one range read) and kept current by a watch on ``queues/``
  (``PrefixMirror``): a name not cached is claimed, which also reads an owner another node recorded
  meanwhile; a change reaches every node's cache, and ``on_change`` callbacks hear of it.
* reassign (an operator, through the admin API): a queue whose owning node is gone for good (no
  live registration under ``nodes/``) goes to a live node, ``if mod_revision == read and the old
  owner has no registration then put``, so two operators racing cannot both win, nor can a reassign
  race the old owner's restart. Refused while the recorded owner is registered (two nodes would
  serve the queue at once) and to a node that is not (checked before the transaction: a target
  that goes meanwhile makes its queues wait for it, as any owner that is down).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fluxmq.errors import ClusterError

from .client import EtcdClient, PrefixMirror, cmp_create, cmp_mod, op_get, op_put, range_kvs

__all__ = ["OwnerChangeRefused", "QueueOwners"]

log = logging.getLogger("fluxmq.cluster.queue_owners")

#: transactions tried before giving up (a key deleted between the compare and the read)
MAX_ATTEMPTS = 8


class OwnerChangeRefused(ClusterError):
    """A reassign that cannot be made: ``status`` is the HTTP status the admin API answers (404 no
    owner recorded, 409 the owner is live, the target is not, or the record changed meanwhile)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def no_owners_here() -> OwnerChangeRefused:
    """The refusal of a reassign on a node without etcd (no queue has an owning node there)."""
    return OwnerChangeRefused(404, "durable queues have no owning node here (cluster.enabled with etcd)")


def node_of(member: str) -> str:
    """The node of a registration's member id: ``n1`` for ``n1`` and for a worker's ``n1/w0``."""
    node, sep, index = member.rpartition("/w")
    return node if sep and node and index.isdigit() else member


class QueueOwners:
    """The owning node of each queue, as recorded in etcd under ``{prefix}queues/``."""

    def __init__(self, client: EtcdClient, prefix: str, node: str) -> None:
        self.client = client
        self.nodes_prefix = prefix + "nodes/"
        self.prefix = prefix + "queues/"
        self.node = node  # this node's name (cluster.node_id: every worker of the node claims for it)
        self.owners: dict[str, str] = {}
        self.claimed = 0  # claims this process won
        self.revisions: dict[str, int] = {}  # queue -> mod_revision of the owner cached
        self.changed = 0  # owners seen to change (a reassign, here or on another node)
        # on_change(queue, old owner, new owner or None: deleted), in the watch's greenlet
        self.on_change: list[Callable[[str, str, str | None], None]] = []
        self._mirror: PrefixMirror | None = None

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}/owner"

    def load(self) -> dict[str, str]:
        """Read every recorded owner again (one range read; a change found goes to ``on_change`` as
        the watch's would); returns them."""
        _revision, kvs = self.client.range(self.prefix, prefix=True)
        out = {}
        for kv in kvs:
            name, _, rest = kv["key"][len(self.prefix) :].rpartition("/")
            if rest == "owner" and name:
                out[name] = kv["value"].decode(errors="replace")
                self._set(name, out[name], kv["mod_revision"])
        return out

    def start(self) -> None:
        """Read every recorded owner (ClusterError when etcd does not answer) and watch them."""
        self._mirror = PrefixMirror(self.client, self.prefix, self._changed, name="queue_owners")
        self._mirror.start()

    def stop(self) -> None:
        if self._mirror is not None:
            self._mirror.stop()
            self._mirror = None

    def _changed(self, key: str, kv: dict | None, _old: dict | None) -> None:
        name, _, rest = key[len(self.prefix) :].rpartition("/")
        if rest != "owner" or not name:
            return
        if kv is None:
            self._set(name, None)
        else:
            self._set(name, kv["value"].decode(errors="replace"), kv["mod_revision"])

    def _set(self, name: str, new: str | None, revision: int = 0) -> None:
        """The owner of ``name`` is ``new`` (None: its record was deleted) as of etcd ``revision``
        (0: unknown): cached, unless a later revision is already; a change from the owner cached
        before goes to the ``on_change`` callbacks."""
        if revision:
            if revision < self.revisions.get(name, 0):
                return  # older than what this node knows (a reassign made here, then a lagging read)
            self.revisions[name] = revision
        old = self.owners.pop(name, None) if new is None else self.owners.get(name)
        if new is not None:
            self.owners[name] = new
        if old is None or old == new:
            return  # first seen (a claim, or read at start): nothing changed
        self.changed += 1
        log.warning("queue_owner_changed", extra={"queue": name, "was": old, "owner": new or "-"})
        for callback in list(self.on_change):
            try:
                callback(name, old, new)
            except Exception:
                log.exception("queue_owner_callback_failed", extra={"queue": name})

    def owner(self, name: str) -> str | None:
        """The cached owner of ``name`` (None: not known here yet; ``claim`` finds or makes it)."""
        return self.owners.get(name)

    def claim(self, name: str) -> str:
        """The owner of ``name``: this node when no node owned it (recorded now), else the node that
        does. ClusterError when etcd does not answer."""
        known = self.owners.get(name)
        if known is not None:
            return known
        key = self.key(name)
        for _ in range(MAX_ATTEMPTS):
            ok, responses = self.client.txn([cmp_create(key, 0)], [op_put(key, self.node)], [op_get(key)])
            if ok:
                self.claimed += 1
                log.info("queue_owner_claimed", extra={"queue": name, "node": self.node})
                owner = self.node
            else:
                kvs = range_kvs(responses[0]) if responses else []
                if not kvs:
                    continue  # deleted between the compare and the read (an operator): again
                owner = kvs[0]["value"].decode(errors="replace")
            self.owners[name] = owner
            return owner
        raise ClusterError(f"queue {name!r}: its owner record kept changing for {MAX_ATTEMPTS} attempts")

    # -- an operator's reassign (the node that owned a queue is gone for good) ----------------------

    def live_nodes(self) -> set[str]:
        """The nodes registered in etcd now (one quorum read; a node of several workers once)."""
        _revision, kvs = self.client.range(self.nodes_prefix, prefix=True, keys_only=True)
        return {node_of(kv["key"][len(self.nodes_prefix) :]) for kv in kvs}

    def reassign(self, name: str, to: str, live: set[str] | None = None) -> tuple[str, str]:
        """Make ``to`` (a live node) the owner of queue ``name`` in place of a node that is not
        registered; returns (old owner, new owner). OwnerChangeRefused when it cannot be done (see
        the class), ClusterError when etcd does not answer."""
        key = self.key(name)
        kv = self.client.get(key)
        if kv is None:
            raise OwnerChangeRefused(
                404, f"queue {name!r} has no owning node recorded (the first node that needs it claims it)"
            )
        old = kv["value"].decode(errors="replace")
        if live is None:
            live = self.live_nodes()
        self._check(name, old, to, live)
        if old == to:
            return old, to
        # ... and still not registered: a node that registered again since ``live`` was read (it
        # restarted) fails the compare as a changed record does (``nodes/{old}``, ``nodes/{old}/w{i}``)
        registration = self.nodes_prefix + old
        ok, responses = self.client.txn(
            [
                cmp_mod(key, kv["mod_revision"]),
                cmp_create(registration, 0),
                cmp_create(registration + "/", 0, True),
            ],
            [op_put(key, to), op_get(key)],
            [op_get(key)],
        )
        if not ok:
            kvs = range_kvs(responses[0]) if responses else []
            if kvs and kvs[0]["mod_revision"] == kv["mod_revision"]:
                raise OwnerChangeRefused(
                    409,
                    f"queue {name!r}: its owning node {old!r} registered in etcd meanwhile (it is live: "
                    "two owners would split it); nothing was changed",
                )
            now = kvs[0]["value"].decode(errors="replace") if kvs else "none"
            raise OwnerChangeRefused(
                409, f"queue {name!r}: its owner record changed meanwhile (now {now}); nothing was changed"
            )
        # known here at once (the watch's report of it then changes nothing)
        kvs = range_kvs(responses[1]) if len(responses) > 1 else []
        self._set(name, to, kvs[0]["mod_revision"] if kvs else 0)
        log.warning("queue_owner_reassigned", extra={"queue": name, "was": old, "owner": to})
        return old, to

    @staticmethod
    def _check(name: str, old: str, to: str, live: set[str]) -> None:
        if to not in live:
            raise OwnerChangeRefused(
                409, f"node {to!r} is not live (not registered in etcd): a queue goes to a live node only"
            )
        if old != to and old in live:
            raise OwnerChangeRefused(
                409,
                f"queue {name!r}: its owning node {old!r} is live (registered in etcd); a queue moves "
                "only from a node that is gone (two owners would split it)",
            )

    def reassign_node(self, gone: str, to: str) -> dict[str, list]:
        """Every queue recorded for node ``gone`` (not registered) goes to ``to`` (a live node), one
        compare-and-swap each: {"moved": [names], "failed": [{"queue", "error"}]}."""
        live = self.live_nodes()
        if gone in live:
            raise OwnerChangeRefused(
                409,
                f"node {gone!r} is live (registered in etcd); its queues move only once it is gone "
                "(two owners would split them)",
            )
        self._check("*", gone, to, live)
        _revision, kvs = self.client.range(self.prefix, prefix=True)
        moved: list[str] = []
        failed: list[dict] = []
        for kv in kvs:
            name, _, rest = kv["key"][len(self.prefix) :].rpartition("/")
            if rest != "owner" or not name or kv["value"].decode(errors="replace") != gone:
                continue
            try:
                self.reassign(name, to, live)
                moved.append(name)
            except OwnerChangeRefused as exc:
                failed.append({"queue": name, "error": str(exc)})
        return {"moved": sorted(moved), "failed": failed}
