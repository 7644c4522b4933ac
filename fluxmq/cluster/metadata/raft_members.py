"""RaftMembers: the initial members of the Raft group, agreed once through etcd.

pysyncobj needs the same initial peer set on every node. Without static ``cluster.raft.peers`` each
node announces its Raft address in its ``nodes/{node_id}`` record (``announce={"raft": ...}``) and
the set is written once to ``raft/members`` (no lease: it outlives every node, like the Raft
journals) by the first node that sees it complete, with a compare-and-swap on the key's creation;
every other node, and every later start, reads that key. So:

- with ``names`` (the members of ``cluster.etcd.initial_cluster``) the set is exactly those nodes,
  written once all of them are live with a Raft address;
- with a ``count`` (``cluster.raft.expected_members``, or the largest replication_factor) it is the
  first ``count`` live nodes by node id, whoever writes it first; a node that starts later reads
  the set and is not in it;
- a node that restarts while the others are down still finds its group (the key is there), so a
  majority that comes back forms the group again without waiting for the rest.

Value: ``{"members": {node_id: "host:port"}, "joining": {node_id: "host:port"}, "by": node_id,
"at": unix time}`` (``joining`` only while a node is being added).

A member change made at run time (the admin API, ``RaftGroup.change_member``) is written here by
the leader once it is committed (``change``), so a node started later forms with the new set. A node
added by its node id through etcd alone is first written to ``joining`` (``begin_join``): seeing
itself there it starts its replica, the leader then commits the add and ``change`` moves it to
``members``. The leader re-writes ``members`` from its committed configuration whenever they differ
(``rewrite``): the Raft change is the truth, the record is repaired from it. A ``joining`` entry no
add waits for any more (its leader died before the add was committed) is taken out by the leader
(``end_join``): the joining node then stops its replica.
"""

from __future__ import annotations

import json
import logging
import time

from fluxmq.errors import ClusterError

from .client import cmp_create, cmp_mod, op_get, op_put, range_kvs
from .health import node_of

__all__ = ["RaftMembers"]

log = logging.getLogger("fluxmq.cluster.raft_members")


class RaftMembers:
    """One node's view of ``{prefix}raft/members`` (``agree`` is one attempt; the caller repeats it)."""

    def __init__(self, meta, names: list[str] | None = None, count: int = 0) -> None:
        self.meta = meta  # ClusterMetadata, started
        self.names = sorted(set(names or []))
        self.count = count if not self.names else len(self.names)
        self.agreed = 0  # the size the set was agreed with, as the record read last says (0: not said)

    @property
    def key(self) -> str:
        return self.meta.prefix + "raft/members"

    def recorded(self) -> dict[str, str] | None:
        """The agreed members (node id -> Raft address), or None while nothing is recorded."""
        kv = self.meta.client.get(self.key)
        if kv is None:
            return None
        self._note_size(kv["value"])
        return _members(kv["value"])

    def _note_size(self, value: bytes) -> None:
        try:
            self.agreed = int(json.loads(value).get("agreed", 0))
        except (ValueError, TypeError, AttributeError):
            self.agreed = 0

    def read(self) -> tuple[dict[str, str], dict[str, str]] | None:
        """(members, joining), or None while nothing is recorded. Raises ClusterError."""
        kv = self.meta.client.get(self.key)
        if kv is None:
            return None
        self._note_size(kv["value"])
        return _members(kv["value"]), _members(kv["value"], "joining")

    def registration(self, node_id: str) -> tuple[bool, str]:
        """(whether ``node_id`` is registered live in etcd (``nodes/{node_id}``, or a worker of it),
        the Raft address it announces there or "")."""
        registered = any(node_of(member) == node_id for member in self.meta.members())
        return registered, self._announced().get(node_id, "")

    def _announced(self) -> dict[str, str]:
        """Live node id -> its Raft address. A node of several workers announces it from worker 0
        (member ``n1/w0``), its Raft member: the set is keyed by node all the same, so a node can
        go from one worker to several without a member change."""
        return {node_of(member): addr for member, addr in self.meta.announced("raft").items()}

    def node_at(self, addr: str) -> str:
        """The id of the live node announcing Raft address ``addr``, else ``addr`` itself (the key
        a member without a registration is recorded under)."""
        return next((n for n, a in self._announced().items() if a == addr), addr)

    def agree(self) -> tuple[dict[str, str] | None, str]:
        """(members, "") once agreed, else (None, what it waits for). Raises ClusterError when etcd
        does not answer."""
        found = self.recorded()
        if found == {}:
            return None, f"{self.key} in etcd holds no member set; delete the key to agree on one again"
        if found is not None:
            return found, ""
        live = self._announced()
        if self.names:
            missing = [n for n in self.names if n not in live]
            if missing:
                return None, (
                    f"waiting for {', '.join(missing)} (cluster.etcd.initial_cluster) to register "
                    f"a Raft address in etcd; live with one: {', '.join(sorted(live)) or 'none'}"
                )
            chosen = {n: live[n] for n in self.names}
        else:
            if len(live) < self.count:
                return None, (
                    f"waiting for {self.count} nodes with a Raft address in etcd "
                    f"(cluster.raft.expected_members); live: {', '.join(sorted(live)) or 'none'}"
                )
            chosen = {n: live[n] for n in sorted(live)[: self.count]}
        # "agreed": the size the set was agreed with; queues of that replication_factor span the
        # whole group whatever members it has after member changes (replication.service.plan)
        value = json.dumps(
            {"members": chosen, "agreed": len(chosen), "by": self.meta.node_id, "at": time.time()}
        ).encode()
        ok, responses = self.meta.client.txn(
            [cmp_create(self.key, 0)], [op_put(self.key, value)], [op_get(self.key)]
        )
        if ok:
            self.agreed = len(chosen)
            log.info(
                "raft_members_recorded", extra={"members": ",".join(f"{n}={a}" for n, a in chosen.items())}
            )
            return chosen, ""
        kvs = range_kvs(responses[0]) if responses else []
        if kvs:
            self._note_size(kvs[0]["value"])
            return _members(kvs[0]["value"]), ""  # another node was first: its set holds
        return None, "the Raft member record changed meanwhile; trying again"

    def _modify(self, what: str, edit) -> dict[str, str]:
        """Apply ``edit(members, joining)`` (both changed in place) to the record: a compare-and-swap
        against the record read, repeated while it races another writer. Returns the members."""
        for _ in range(5):
            kv = self.meta.client.get(self.key)
            if kv is None:
                raise ClusterError(f"{self.key} holds no member set to change")
            members, joining = _members(kv["value"]), _members(kv["value"], "joining")
            before = (dict(members), dict(joining))
            edit(members, joining)
            if (members, joining) == before:
                return members  # nothing to write: made already
            doc = _doc(kv["value"])  # what else it holds ("agreed") stays
            doc.update(members=members, by=self.meta.node_id, at=time.time())
            doc.pop("joining", None)
            if joining:
                doc["joining"] = joining
            ok, _ = self.meta.client.txn(
                [cmp_mod(self.key, kv["mod_revision"])], [op_put(self.key, json.dumps(doc).encode())]
            )
            if ok:
                log.info(
                    "raft_members_changed",
                    extra={
                        "change": what,
                        "members": ",".join(f"{n}={a}" for n, a in members.items()),
                        "joining": ",".join(f"{n}={a}" for n, a in joining.items()),
                    },
                )
                return members
        raise ClusterError(f"{self.key} kept changing under this node; try again")

    def change(self, action: str, addr: str, node_id: str = "") -> dict[str, str]:
        """Add (``action`` "add") the member at Raft address ``addr``, keyed by ``node_id`` (else
        the node id that announces ``addr`` in etcd, else ``addr`` itself), or remove ("remove")
        the member at ``addr``; the address leaves ``joining`` either way. Returns the members
        recorded. Idempotent. Raises ClusterError."""

        def edit(members: dict[str, str], joining: dict[str, str]) -> None:
            nonlocal node_id
            for n in [n for n, a in joining.items() if a == addr]:
                del joining[n]
            if action == "add":
                if not node_id:
                    node_id = self.node_at(addr)
                for n in [n for n, a in members.items() if a == addr and n != node_id]:
                    del members[n]
                members[node_id] = addr
            else:
                for n in [n for n, a in members.items() if a == addr]:
                    del members[n]

        return self._modify(f"{action} {addr}", edit)

    def begin_join(self, node_id: str, addr: str) -> None:
        """Record that ``node_id`` (at ``addr``) is being added: it starts its replica on seeing
        this, with the members and itself as peers. Raises ClusterError."""

        def edit(members: dict[str, str], joining: dict[str, str]) -> None:
            joining[node_id] = addr

        self._modify(f"join {node_id}={addr}", edit)

    def end_join(self, node_id: str, unless=None) -> None:
        """``node_id``'s add was not committed: out of ``joining`` (it stops its replica).
        ``unless()``, asked against each record read just before the write is tried, True leaves
        the entry (an add of it begun meanwhile: the leader's own ``joining``). Raises ClusterError."""

        def edit(members: dict[str, str], joining: dict[str, str]) -> None:
            if unless is None or not unless():
                joining.pop(node_id, None)

        self._modify(f"join {node_id} abandoned", edit)

    def rewrite(self, addrs: list[str]) -> dict[str, str]:
        """Make ``members`` the Raft addresses ``addrs`` (the leader's committed configuration),
        each keyed by the node id the record, ``joining`` or the registrations give it, else by
        the address; the ones now members leave ``joining``. Raises ClusterError."""

        def edit(members: dict[str, str], joining: dict[str, str]) -> None:
            ids = {a: n for n, a in self._announced().items()}
            ids.update({a: n for n, a in joining.items()})
            ids.update({a: n for n, a in members.items()})
            members.clear()
            members.update({ids.get(a, a): a for a in addrs})
            for n in [n for n, a in joining.items() if a in addrs]:
                del joining[n]

        return self._modify("rewrite from the committed configuration", edit)


def _doc(value: bytes) -> dict:
    try:
        doc = json.loads(value)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _members(value: bytes, field: str = "members") -> dict[str, str]:
    try:
        members = json.loads(value).get(field, {})
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in members.items()} if isinstance(members, dict) else {}
