"""Delivery leases of one consumer group (``distribution_mode: replicate``): which node may deliver
each offset, as the Raft log decided.

Every node with members of a group delivers from its own replica, but only offsets it holds a
lease on. A node asks for up to ``want`` offsets with a request command; every replica applies the
same requests in the same order to the same table, so each computes the same grant, and only the
node named in it delivers. Each offset is leased to one node at a time:

- a grant takes, in order, released offsets whose backoff is due, leases that expired, then
  offsets never leased (``next`` up to the end of the log);
- a lease expires ``visibility_timeout`` after its grant, in *log time*: the largest wall-clock
  time a request carried so far (the requester's clock, written in the log), never a replica's
  own clock, so every replica expires the same leases at the same entry;
- a settlement (the group's progress commit) ends the lease; a nack, a visibility timeout on the
  holder or a member leaving with no other member to take it releases it (due after the backoff);
- the delivery count of an offset is the number of grants it had (in the grant: it goes on when
  another node takes the offset over).

A request also leaves a **standing demand**: what it asked for and did not get (less what was
granted to that node between its staging and its application: the request names how many grants
its node had seen), with the count of the node's members that have room as its weight. Offsets
appended while demands stand are granted at once, when the append is applied, spread over the
nodes by smooth weighted round robin (node-blind: the leader's own node has no advantage, its
requests need no network hop but every node's demand is already in the table). A demand lapses
DEMAND_TTL seconds of log time after its request (a node that died or was cut off stops taking
new offsets); a node with members refreshes it before then. Appends move the log time too (their
records' wall-clock time), once any demand stands; requests of the earlier form (no demand)
leave the table as it was, so a log written before standing demands replays to the same grants.

The table is in memory on every replica and rebuilt the way the log builds it: the Raft snapshot
holds it, and a restart replays the entries after the snapshot into it (also those whose queue
writes were applied before the restart), so a restarted replica computes the same grants.
"""

from __future__ import annotations

import heapq

#: a standing demand lapses this long (log time) after its request: above NODE_SILENCE
#: (distribution.py), so a node only slow for an election's span keeps it; nodes refresh theirs
#: when half of it has passed
DEMAND_TTL = 4.0


class LeaseTable:
    """The leases of one consumer group (see the module docstring)."""

    __slots__ = ("next", "held", "expiry", "released", "due", "wants", "given", "visibility")

    def __init__(self, start: int = 0) -> None:
        self.next = start  # first offset never leased
        self.held: dict[int, tuple[str, float, int]] = {}  # offset -> (node, deadline, grants)
        self.expiry: list[tuple[float, int]] = []  # heap (deadline, offset), checked against held
        self.released: dict[int, tuple[float, int]] = {}  # offset -> (due, grants)
        self.due: list[tuple[float, int]] = []  # heap (due, offset), checked against released
        # standing demands: node -> [still wanted, weight, lapses at (log time), round-robin credit]
        self.wants: dict[str, list] = {}
        self.given: dict[str, int] = {}  # node -> offsets granted to it so far (requests name it)
        self.visibility = 0.0  # the latest request's visibility_timeout (the lease of a push)

    def request(
        self,
        node: str,
        want: int,
        clock: float,
        log_next: int,
        visibility: float,
        seen: int | None = None,
        weight: int = 1,
    ) -> tuple[list, list]:
        """A node's request at log time ``clock``: what ``grant`` gives, and (``seen``: the grants
        its node had seen when it asked) what it did not get stands as its demand."""
        if seen is None:
            return self.grant(node, want, clock, log_next, visibility)
        want = max(0, want - (self.given.get(node, 0) - seen))
        self.visibility = visibility
        offsets, counts = self.grant(node, want, clock, log_next, visibility)
        rest = want - len(offsets)
        w = self.wants.get(node)
        if w is None:
            if rest > 0:
                self.wants[node] = [rest, max(1, weight), clock + DEMAND_TTL, 0]
        else:
            w[0], w[1], w[2] = rest, max(1, weight), clock + DEMAND_TTL
        return offsets, counts

    def standing(self, node: str, clock: float) -> tuple[int, float]:
        """(still wanted, lapses at) of ``node``'s demand; (0, 0.0) when none stands."""
        w = self.wants.get(node)
        if w is None or w[2] <= clock:
            return 0, 0.0
        return w[0], w[2]

    def push(self, log_end: int, clock: float) -> dict[str, tuple[list, list]]:
        """Offsets never leased up to ``log_end`` (just appended) granted to the standing demands:
        node -> (offsets, counts). Smooth weighted round robin over the nodes in name order, in
        whole rounds where the demands allow (contiguous runs), one offset at a time otherwise."""
        wants = self.wants
        if not wants or self.next >= log_end:
            return {}
        for node in [n for n, w in wants.items() if w[2] <= clock]:
            del wants[node]  # lapsed: that node did not ask again in time
        active = sorted(n for n, w in wants.items() if w[0] > 0)
        out: dict[str, tuple[list, list]] = {}
        deadline = clock + self.visibility
        left = log_end - self.next
        while left > 0 and active:
            total = sum(wants[n][1] for n in active)
            rounds = min(left // total, min(wants[n][0] // wants[n][1] for n in active))
            if rounds:
                for n in active:
                    w = wants[n]
                    self._give(n, rounds * w[1], deadline, out)
                    w[0] -= rounds * w[1]
                left -= rounds * total
            else:
                pick = None
                for n in active:
                    w = wants[n]
                    w[3] += w[1]
                    if pick is None or w[3] > wants[pick][3]:
                        pick = n
                w = wants[pick]
                w[3] -= total
                self._give(pick, 1, deadline, out)
                w[0] -= 1
                left -= 1
            active = [n for n in active if wants[n][0] > 0]
        return out

    def _give(self, node: str, k: int, deadline: float, out: dict) -> None:
        offsets, counts = out.get(node) or out.setdefault(node, ([], []))
        for off in range(self.next, self.next + k):
            self._hold(off, node, deadline, 1, offsets, counts)
        self.next += k

    def grant(
        self, node: str, want: int, clock: float, log_next: int, visibility: float
    ) -> tuple[list, list]:
        """Lease up to ``want`` offsets to ``node`` at log time ``clock``: (offsets, counts)."""
        offsets: list[int] = []
        counts: list[int] = []
        deadline = clock + visibility
        held = self.held
        due, released = self.due, self.released
        while want > 0 and due and due[0][0] <= clock:
            at, off = heapq.heappop(due)
            r = released.get(off)
            if r is None or r[0] != at:
                continue  # settled or released again since
            del released[off]
            self._hold(off, node, deadline, r[1] + 1, offsets, counts)
            want -= 1
        expiry = self.expiry
        while want > 0 and expiry and expiry[0][0] <= clock:
            at, off = heapq.heappop(expiry)
            h = held.get(off)
            if h is None or h[1] != at:
                continue
            self._hold(off, node, deadline, h[2] + 1, offsets, counts)
            want -= 1
        while want > 0 and self.next < log_next:
            self._hold(self.next, node, deadline, 1, offsets, counts)
            self.next += 1
            want -= 1
        return offsets, counts

    def _hold(self, off: int, node: str, deadline: float, n: int, offsets: list, counts: list) -> None:
        self.given[node] = self.given.get(node, 0) + 1
        self.held[off] = (node, deadline, n)
        heapq.heappush(self.expiry, (deadline, off))
        offsets.append(off)
        counts.append(n)

    def release(self, node: str, off: int, due: float) -> bool:
        """``node`` gives ``off`` back, to be leased again from ``due`` (log time)."""
        h = self.held.get(off)
        if h is None or h[0] != node:
            return False  # not its lease (expired and taken over): nothing to give back
        del self.held[off]
        self.released[off] = (due, h[2])
        heapq.heappush(self.due, (due, off))
        return True

    def settled(self, off: int) -> None:
        self.held.pop(off, None)
        self.released.pop(off, None)

    def leasable(self, log_next: int, now: float) -> bool:
        """Whether a request made at wall time ``now`` could get anything (stale heap tops are
        dropped: they never change a grant)."""
        if self.next < log_next:
            return True
        due, released = self.due, self.released
        while due and released.get(due[0][1], (None,))[0] != due[0][0]:
            heapq.heappop(due)
        if due and due[0][0] <= now:
            return True
        expiry, held = self.expiry, self.held
        while expiry and (held.get(expiry[0][1]) or (None, None))[1] != expiry[0][0]:
            heapq.heappop(expiry)
        return bool(expiry) and expiry[0][0] <= now

    def dump(self) -> tuple:
        return (
            self.next,
            dict(self.held),
            dict(self.released),
            {n: list(w) for n, w in self.wants.items()},
            dict(self.given),
            self.visibility,
        )

    @classmethod
    def load(cls, data: tuple) -> LeaseTable:
        table = cls(data[0])
        table.held = dict(data[1])
        table.released = dict(data[2])
        if len(data) > 3:  # a dump from before standing demands has none
            table.wants = {n: list(w) for n, w in data[3].items()}
            table.given = dict(data[4])
            table.visibility = data[5]
        table.expiry = [(h[1], off) for off, h in table.held.items()]
        heapq.heapify(table.expiry)
        table.due = [(r[0], off) for off, r in table.released.items()]
        heapq.heapify(table.due)
        return table
