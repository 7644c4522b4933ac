"""Raft snapshots of a group: what pysyncobj's log compaction writes, and what a replica that was
away longer than the compacted log installs.

pysyncobj compacts its log by writing a "full dump" and dropping the entries before it; a follower
whose next entry was dropped is sent that dump file, chunk by chunk, and loads it. By default the
dump pickles the SyncObj; here the queue state lives in LMDB, not in the object, so the group gives
pysyncobj its own ``serializer``/``deserializer`` (``RaftGroup.start``):

- ``Writing(path, group, raft_data)`` (on compaction, begun in the hub at the applied index): a
  header (format, the applied Raft index, the two log entries and cluster pysyncobj keeps, the
  delivery owner and epoch, the announced MQTT addresses, each queue's first/next/count/bytes, every
  consumer group's floor, settled offsets and delivery counts, and the members each node
  registered), then the records of every queue of the group, in chunks. So the dump carries the
  queue-log state a replica lacks, not only a marker: a replica that missed compacted entries gets
  the records themselves. The records are read from a view of the store taken with the header and
  written a chunk at a time, the hub running between two (``RaftGroup._write_snapshot`` drives it,
  pausing between chunks, and tells pysyncobj when it is complete). Written in one go, a snapshot
  of tens of thousands of records held the hub, and every publish of the node, ~1-3 ms per 1,000
  records (bench/RESULTS.md).
- ``read(path, group)`` (at start, and when a dump from the leader is complete): when the dump is
  ahead of what this replica applied, its queue state replaces the local one (records, groups,
  applied index, in one storage batch); otherwise (the node's own dump at restart) nothing is
  touched. Returns the entries pysyncobj needs to continue its log after the dump.

File format: a sequence of pickles: the header dict, then ``(queue, [(offset, blob), ...])`` chunks,
then ``None``. Like pysyncobj's own messages it is unpickled, so it must come from a member (use
``cluster.raft.password``).
"""

from __future__ import annotations

import logging
import os
import pickle
import time

log = logging.getLogger("fluxmq.replication")

FORMAT = 1
CHUNK = 250  # records per pickle, and per slice of the hub (~0.3 ms)


class Writing:
    """One dump being written. Begun in the hub at the applied index: the header and a view of the
    records (``QueueLogStore.view``: the appends, truncations and deletes applied after it do not
    show) are taken at once, so the dump is the state at that index however long the rest takes;
    the records are then written ``CHUNK`` at a time (``steps``, the caller letting the hub run
    between two), to a file of its own, moved onto ``path`` when complete (``finish``): until then
    ``path`` is the previous dump, whole."""

    def __init__(self, path: str, group, raft_data) -> None:
        self.path = path
        self.part = path + ".writing"
        self.group = group
        self.started = time.perf_counter()
        self.records = 0
        queues = {}
        for name, qlog in group.logs.items():
            queues[name] = {
                "first": qlog.first,
                "next": qlog.next,
                "count": qlog.count,
                "bytes": qlog.bytes,
                "progress": {g: (floor, sorted(settled)) for g, (floor, settled) in qlog.progress.items()},
                # replicated delivery counts and member registrations (distribution_mode forward)
                "marks": dict(qlog.marks),
                "counts": {g: dict(c) for g, c in qlog.counts.items()},
                "registered": {g: dict(r) for g, r in qlog.registered.items()},
                # delivery leases (distribution_mode replicate)
                "leases": {g: t.dump() for g, t in qlog.leases.items()},
                "log_next": qlog.log_next,
                "clock": qlog.clock,
            }
        header = {
            "format": FORMAT,
            "index": raft_data[0][1],
            "raft": tuple(raft_data),
            "owner": group.owner,
            "epoch": group.epoch,
            "claim_term": getattr(group, "claim_term", None),
            "mqtt_of": dict(group.mqtt_of),
            "queues": queues,
        }
        self.index = header["index"]
        self._ranges = [(name, qlog.first, qlog.next) for name, qlog in group.logs.items()]
        self._view = group.store.view(list(group.logs))
        try:
            self._file = open(self.part, "wb")  # noqa: SIM115 (closed by finish or discard)
            pickle.dump(header, self._file, protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException:
            self._view.close()
            raise

    def steps(self):
        """Write the records, one chunk per step (a generator: the hub may run between two)."""
        f, view = self._file, self._view
        for name, offset, stop in self._ranges:
            while offset < stop:
                n = min(CHUNK, stop - offset)
                chunk = view.read(name, offset, n)
                if chunk:
                    pickle.dump((name, chunk), f, protocol=pickle.HIGHEST_PROTOCOL)
                    self.records += len(chunk)
                offset += n
                yield
        pickle.dump(None, f, protocol=pickle.HIGHEST_PROTOCOL)

    def finish(self, fsync=os.fsync) -> None:
        """Sync the complete dump (``fsync(fd)``: the caller may run it off the hub) and move it onto
        ``path``."""
        self._view.close()
        f = self._file
        f.flush()
        fsync(f.fileno())
        f.close()
        os.replace(self.part, self.path)
        group = self.group
        group.stats["snapshots_written"] += 1
        log.info(
            "raft_snapshot_written",
            extra={
                "group": group.name,
                "index": self.index,
                "records": self.records,
                "took_s": round(time.perf_counter() - self.started, 3),
            },
        )

    def discard(self) -> None:
        """Give up: the partial file is removed, ``path`` keeps the previous dump."""
        self._view.close()
        self._file.close()
        try:
            os.unlink(self.part)
        except FileNotFoundError:
            pass


def read(path: str, group) -> tuple:
    """Load the dump at ``path`` into ``group`` when it is ahead of the group's applied index;
    returns (last applied entry, the one before, cluster) for pysyncobj."""
    with open(path, "rb") as f:
        header = pickle.load(f)
        if header.get("format") != FORMAT:
            raise ValueError(f"Raft snapshot {path}: unknown format {header.get('format')!r}")
        index = header["index"]
        group.mqtt_of.update(header["mqtt_of"])
        # in memory, as the claims of the entries after the dump set it when replayed (a dump
        # written before the epoch existed: 0, as a replica that never applied a claim)
        group.epoch = header.get("epoch", 0)
        group.claim_term = header.get("claim_term")
        for name, meta in header["queues"].items():  # in memory only: learned from every dump read
            qlog = group.logs.get(name)
            if qlog is not None and "registered" in meta:
                qlog.registered = {g: dict(r) for g, r in meta["registered"].items()}
            if qlog is not None and "leases" in meta:
                from .lease import LeaseTable

                qlog.leases = {g: LeaseTable.load(t) for g, t in meta["leases"].items()}
                qlog.log_next, qlog.clock = meta["log_next"], meta["clock"]
        if index > group.applied:
            _install(f, header, group)
    return header["raft"]


def _install(f, header: dict, group) -> None:
    """Replace the local state of the group's queues with the dump's (this replica missed entries
    the leader compacted away)."""
    started = time.perf_counter()
    store = group.store
    logs = {}
    for name, meta in header["queues"].items():
        qlog = group.logs.get(name)
        if qlog is None and group.on_unknown is not None:
            qlog = group.on_unknown(name)
        if qlog is None:
            log.warning("raft_snapshot_unknown_queue", extra={"group": group.name, "queue": name})
            continue
        # what this replica holds is replaced, not merged: records, then groups
        if qlog.next > qlog.first:
            store.truncate(name, range(qlog.first, qlog.next))
        for gname in list(qlog.progress):
            store.delete_group(name, gname)
        qlog._cache.clear()
        qlog.first, qlog.next, qlog.count, qlog.bytes = (
            meta["first"],
            meta["next"],
            meta["count"],
            meta["bytes"],
        )
        qlog.progress = {}
        for gname, (floor, settled) in meta["progress"].items():
            qlog.progress[gname] = [floor, set(settled)]
            store.put_group(name, gname, floor)
            for off in settled:
                store.settle(name, gname, off, True)
        qlog.marks, qlog.counts = (
            dict(meta.get("marks", {})),
            {g: dict(c) for g, c in meta.get("counts", {}).items()},
        )
        for gname, mark in qlog.marks.items():
            store.put_mark(name, gname, mark)
        for gname, counts in qlog.counts.items():
            for off, n in counts.items():
                store.put_count(name, gname, off, n)
        qlog.registered = {g: dict(r) for g, r in meta.get("registered", {}).items()}
        qlog._truncating = 0
        logs[name] = qlog
    records = 0
    while True:
        item = pickle.load(f)
        if item is None:
            break
        name, chunk = item
        if name not in logs:
            continue
        for offset, blob in chunk:
            store.append(name, offset, blob)
        records += len(chunk)
    group.owner = header["owner"]
    group.applied = header["index"]
    store.put_applied(group.name, group.applied)
    if group.owner != group.self_addr and getattr(group, "on_superseded", None) is not None:
        # the entries it missed may hold another node's claim: its deliveries are void as when
        # it applies one (RaftGroup.epoch)
        group.on_superseded(group)
    group.stats["snapshots_installed"] += 1
    log.info(
        "raft_snapshot_installed",
        extra={
            "group": group.name,
            "index": group.applied,
            "records": records,
            "took_s": round(time.perf_counter() - started, 3),
        },
    )
    if group.on_applied is not None:
        for qlog in logs.values():
            group.on_applied(qlog)
