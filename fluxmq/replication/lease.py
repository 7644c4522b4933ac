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

The table is in memory on every replica and rebuilt the way the log builds it: the Raft snapshot
holds it, and a restart replays the entries after the snapshot into it (also those whose queue
writes were applied before the restart), so a restarted replica computes the same grants.
"""

from __future__ import annotations

import heapq


class LeaseTable:
    """The leases of one consumer group (see the module docstring)."""

    __slots__ = ("next", "held", "expiry", "released", "due")

    def __init__(self, start: int = 0) -> None:
        self.next = start  # first offset never leased
        self.held: dict[int, tuple[str, float, int]] = {}  # offset -> (node, deadline, grants)
        self.expiry: list[tuple[float, int]] = []  # heap (deadline, offset), checked against held
        self.released: dict[int, tuple[float, int]] = {}  # offset -> (due, grants)
        self.due: list[tuple[float, int]] = []  # heap (due, offset), checked against released

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
        return (self.next, dict(self.held), dict(self.released))

    @classmethod
    def load(cls, data: tuple) -> LeaseTable:
        table = cls(data[0])
        table.held = dict(data[1])
        table.released = dict(data[2])
        table.expiry = [(h[1], off) for off, h in table.held.items()]
        heapq.heapify(table.expiry)
        table.due = [(r[0], off) for off, r in table.released.items()]
        heapq.heapify(table.due)
        return table
