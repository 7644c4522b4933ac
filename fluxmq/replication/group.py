"""RaftGroup: one Raft group (a pysyncobj node) replicating the logs of the queues it holds.

Driving. pysyncobj's own tick thread is not used (``autoTick=False``), nor its poller: the Raft
sockets are watched by persistent watchers of the gevent hub (``transport.HubPoller``), whose
callbacks read a message, hand it to pysyncobj and then do, in the same hub turn, what pysyncobj's
tick did after its poll (``_RaftNode.turn``: the leader's commit index advanced from the answers
just read, the committed entries applied, their PUBACKs released). A greenlet ticks every
TICK_WAIT for pysyncobj's timers only (elections, heartbeats, reconnects, log compaction). So the
Raft code runs in the hub thread, between other greenlets, and its callbacks may touch the broker
directly.

Commands. Everything a loop turn writes to the group's queues (appends, settlements, cursor commits,
truncations, deletes, a group's removal) is one Raft entry (``stage`` -> ``_submit`` at the end of
the turn): the appends of one turn travel as one batch. A ``claim`` entry makes the current leader
the node that delivers (``delivering``); when it is applied on the leader, every entry before it is
applied too, so the leader delivers from a complete replica and rebuilds its consumer groups from
the replicated progress. The claim's index is the delivery ``epoch``: what a node staged before a
claim about a delivery (a settlement, a lease, a give-back, a nack) changes nothing when applied
after it, and its $ack is refused, so a confirmed $ack is never followed by the new owner's
delivery of the record again.

State. pysyncobj does not own the queue state: every replica applies committed entries to its local
queue log store (LMDB), with the Raft index applied in the same commit (``put_applied``), so a
restart that replays the Raft journal skips what is already applied. The SyncObj holds no state of
its own (its attributes are set before ``SyncObj.__init__``, which leaves them out of snapshots) and
log compaction writes a snapshot of the queue state of our own (``snapshot``): every
``compaction_entries`` entries the log before the applied index is replaced by the group's records
and consumer-group progress, and a replica that was away longer than the kept log is sent that
snapshot and installs it. See docs/replication.rst.
"""

from __future__ import annotations

import logging
import os
import pickle
import time

import gevent
from pysyncobj import syncobj as pysyncobj_clock

from fluxmq.broker.held import HeldAck

from . import snapshot
from .log import refused

log = logging.getLogger("fluxmq.replication")

#: period of the driver's tick, pysyncobj's timers (elections, heartbeats, reconnects); messages
#: are served as they come (``transport.HubPoller``); bench/RESULTS.md
TICK_WAIT = 0.01
#: pysyncobj settings chosen by bench/raft.py (bench/RESULTS.md, "Raft replication")
APPEND_ENTRIES_PERIOD = 0.05
RAFT_MIN_TIMEOUT = 0.4
RAFT_MAX_TIMEOUT = 1.2
CONNECTION_TIMEOUT = 2.0
LEADER_FALLBACK_TIMEOUT = 1.5  # a leader cut off from the majority steps down after this
#: a leader delivers only while a majority answered it within this (below RAFT_MIN_TIMEOUT, the
#: silence after which a follower may start an election)
DELIVERY_LEASE = 0.3
#: a tick that holds the hub longer than this is logged (raft_tick_slow)
SLOW_TICK = 0.05
#: client ids of a group's registered members shown in ``status`` (``queues.{name}.registered``)
REGISTERED_SHOWN = 1000
#: entries submitted and not yet committed before the next one waits (adaptive batching)
MAX_IN_FLIGHT = 2
#: an entry without an answer for this long no longer holds the next ones back
IN_FLIGHT_PATIENCE = 1.0
#: how long the leader's new commit index waits for the next entry's append_entries, which carries
#: it, before it is sent alone (``_RaftNode._apply_entries``); bench/RESULTS.md
COMMIT_NOTICE_DELAY = 0.002
#: committed entries a follower gathers before it applies them (one store commit for all), unless
#: one of its own (forwarded) entries waits to be applied; the driver's tick applies what is left
FOLLOWER_APPLY_BATCH = 2
#: entries of its own a leader keeps to apply without unpickling them (a few are in flight; more
#: means a leadership was lost with entries never applied: dropped)
OWN_KEPT = 64
#: what ``_apply`` returns for an entry whose settlements were refused as stale (``STALE``)
STALE = "stale"
#: shortest pause between two chunks of a snapshot being written (snapshot.CHUNK records, ~0.3-1 ms
#: each; the pause is twice the chunk's time)
SNAPSHOT_PAUSE = 0.001
#: pickle protocol of the commands (the entries of the log): pysyncobj's @replicated pickles with
#: protocol 2, where every bytes object (each record) is a latin-1 text to encode, and decode again on
#: every replica: 90 + 79 us for an entry of 200 records against 8 + 8.5 us (bench/RESULTS.md)
COMMAND_PICKLE = 5
#: what a serializeChecker returns (pysyncobj.config.SERIALIZER_STATE)
_NOT_SERIALIZING, _SERIALIZING, _SUCCESS, _FAILED = 0, 1, 2, 3


def _make_node_class():
    from pysyncobj import SyncObj, replicated
    from pysyncobj.syncobj import _COMMAND_TYPE, _RAFT_STATE

    leader_state = _RAFT_STATE.LEADER

    class _RaftNode(SyncObj):
        """The pysyncobj object: one replicated method; the state lives in the RaftGroup."""

        def __init__(self, group, self_addr, peers, conf, transport_class=None):
            self._group = group  # set before SyncObj.__init__: not part of any snapshot
            if transport_class is None:
                super().__init__(self_addr, peers, conf)
            else:
                super().__init__(self_addr, peers, conf, transportClass=transport_class)
            self._apply_id = self._methodToID[self._getFuncName("apply")]
            notifier = getattr(self, "_SyncObj__pipeNotifier", None)
            if notifier is not None:
                notifier.notify = _no_wakeup  # commands are taken at once (_applyCommand)
            self._commit_told = 0  # the commit index the last append_entries carried
            self._forwarded = 0  # the last entry a follower forwarded (its producer waits for it)
            self._commit_timer = None
            # index -> (the command as the log holds it, its operations): this leader's entries,
            # applied from the operations (not unpickled) while the log still holds that command
            self._own: dict[int, tuple] = {}
            self._SyncObj__applyLogEntries = self._apply_entries  # the tick's, looked up on self
            _journal_without_stat(self._SyncObj__raftLog)
            self._SyncObj__sendAppendEntries = self._send_entries

        def _send_entries(self) -> None:
            self._commit_told = self.raftCommitIndex
            timer = self._commit_timer
            if timer is not None:  # this append_entries carries the commit index: no notice to send
                timer.close()
                self._commit_timer = None
            SyncObj._SyncObj__sendAppendEntries(self)

        def _SyncObj__onMessageReceived(self, node, message):  # noqa: N802
            """pysyncobj's handler; a follower's success answer for an entry no longer moves the
            next index the leader keeps for it back to just past that entry when later entries
            were sent meanwhile (they are on their way, in order, on the same connection):
            pysyncobj would send them again with the next one, and the follower replace them in
            its log. A failure answer (reset) still moves it back (a follower that lacks the
            entries before, after a reconnect, says so)."""
            if message["type"] == "next_node_idx" and message["success"] and not message["reset"]:
                sent = self._SyncObj__raftNextIndex.get(node)
                SyncObj._SyncObj__onMessageReceived(self, node, message)
                nxt = self._SyncObj__raftNextIndex
                if sent is not None and node in nxt and nxt[node] < sent:
                    nxt[node] = sent
                    self._group.stats["entries_not_resent"] += 1
                return
            SyncObj._SyncObj__onMessageReceived(self, node, message)

        def turn(self) -> None:
            """What pysyncobj's tick does after its poll, for the messages a hub watcher just read
            (``transport.HubPoller``): the leader's commit index advanced from its followers'
            answers (the tick's code), then the committed entries applied (a follower learns the
            commit index from the append_entries it read), their callbacks run and so the held
            PUBACKs released, in this hub turn. The rest of the tick (elections, heartbeats,
            the leader stepping down without a majority, reconnects) is the driver's, on a timer."""
            if self._SyncObj__raftState == leader_state:
                commit = self._SyncObj__raftCommitIndex
                last = self._SyncObj__raftLog[-1][1]
                if commit < last:
                    match = self._SyncObj__raftMatchIndex
                    others = self._SyncObj__otherNodes
                    majority = (len(others) + 1) / 2
                    term = self._SyncObj__raftCurrentTerm
                    get = self._SyncObj__getEntries
                    idx = new = commit
                    while idx < last:
                        idx += 1
                        count = 1
                        for node in others:
                            if match[node] >= idx:
                                count += 1
                        if count <= majority:
                            break
                        entries = get(idx, 1)
                        if entries and entries[0][2] == term:  # Raft: only an entry of this term by count
                            new = idx
                    if new != commit:
                        self._SyncObj__raftCommitIndex = new
                        self._SyncObj__raftLog.setRaftCommitIndex(new)
                        self._SyncObj__leaderCommitIndex = new
            unapplied = self._SyncObj__raftCommitIndex - self._SyncObj__raftLastApplied
            if unapplied <= 0:
                return
            if (
                unapplied < FOLLOWER_APPLY_BATCH
                and self._SyncObj__raftState != leader_state
                and not self._SyncObj__commandsWaitingCommit
            ):
                return  # a follower: with the next entry's, or at the driver's tick
            if self._apply_entries() and self._isLeader():
                self._send_entries()  # a follower forwarded one of them: tell it at once

        def _apply_entries(self) -> bool:
            """pysyncobj's ``__applyLogEntries`` (the tick applies the committed entries), whose
            answer "send append_entries now" (the leader's new commit index, to the followers) waits
            COMMIT_NOTICE_DELAY for the next entry, whose append_entries carries it: at a steady
            rate the followers no longer read, and answer, an append_entries of nothing per entry.
            Sent at once when a follower forwarded one of the entries: its producer's PUBACK waits
            for the follower to apply it."""
            before = self.raftLastApplied
            if not SyncObj._SyncObj__applyLogEntries(self):
                return False
            if not self._isLeader() or before < self._forwarded:
                return True
            if self._commit_timer is None:
                self._commit_timer = gevent.get_hub().loop.timer(COMMIT_NOTICE_DELAY)
                self._commit_timer.start(self._send_commit)
            return False

        def _send_commit(self) -> None:
            self._commit_timer.close()
            self._commit_timer = None
            if self._group._running and self._isLeader() and self._commit_told < self.raftCommitIndex:
                self._send_entries()

        @replicated
        def apply(self, ops):
            return self._group._apply(ops, self.raftLastApplied + 1)

        def submit(self, ops: list, callback) -> None:
            """``apply(ops, callback=callback)``, the command pickled with protocol 5 (see
            COMMAND_PICKLE) as @replicated would pickle it with protocol 2: the same command
            (pysyncobj's ``loads`` reads either) at a tenth of the cost on every replica. The
            leader keeps ``ops`` to apply them itself (``_SyncObj__doApplyCommand``)."""
            command = pickle.dumps((self._apply_id, (ops,)), COMMAND_PICKLE)
            log_ = self._SyncObj__raftLog
            before = log_[-1][1]
            self._applyCommand(command, callback, _COMMAND_TYPE.REGULAR)
            last = log_[-1]
            if last[1] == before + 1 and self._SyncObj__raftState == leader_state:
                if len(self._own) > OWN_KEPT:  # entries of a lost leadership, never applied
                    self._own.clear()
                self._own[last[1]] = (last[0], ops)

        def _SyncObj__doApplyCommand(self, command):  # noqa: N802
            """pysyncobj's: unpickles the command and calls ``apply``. An entry this node submitted
            as the leader, still the one the log holds at that index (the same object), is
            applied from the operations it kept: the unpickling of a command of 100 records
            (~10 us) saved on the leader."""
            index = self._SyncObj__raftLastApplied + 1
            own = self._own.pop(index, None)
            if own is not None and own[0] is command:
                return self._group._apply(own[1], index)
            return SyncObj._SyncObj__doApplyCommand(self, command)

        def _applyCommand(self, command, callback, commandType=None):  # noqa: N802
            """Every command (ours, a member change, one a follower forwards to this leader) is
            taken at once: appended and sent (the leader: append_entries to every follower; a
            follower: apply_command to the leader) in this hub turn, not at the driver's next
            tick, which pysyncobj would wake through its pipe. What the tick does with its queued
            commands, done sooner: nothing of a tick is half done while the driver waits in its
            poll (or handles a message there), so the log and the sends stay in order."""
            super()._applyCommand(command, callback, commandType)
            self._checkCommandsToApply()
            if callback.__class__ is tuple and self._isLeader():  # (follower, request id)
                self._forwarded = self._SyncObj__getCurrentLogIndex()

    return _RaftNode


def _journal_without_stat(journal) -> None:
    """pysyncobj's file journal appends an entry by writing into its file's mapping, asking the
    file's size (``mmap.size()``, an fstat) twice per entry to know whether to grow it: the
    mapping's own length (the whole file is mapped, and grown with it) tells as much. Writes
    that do not fit go to pysyncobj's write, which grows the file."""
    file = getattr(journal, "_FileJournal__journalFile", None)
    if file is None:  # a memory journal
        return
    grow = file.write

    def write(offset: int, values: bytes) -> None:
        mm = file._ResizableFile__mm
        end = offset + len(values)
        if end <= len(mm):
            mm[offset:end] = values
        else:
            grow(offset, values)

    file.write = write


def _no_wakeup() -> None:
    """pysyncobj's pipe notifier, silenced: it woke the tick for a command queued (see
    ``_RaftNode._applyCommand``); a write and a read of the pipe, and a tick, per entry."""


_NODE_CLASS = None


class MemberChangeRefused(Exception):
    """A member change that cannot be made here now: ``status`` is the HTTP status the admin API
    answers (409 not the leader, naming it in ``leader``, or a change in progress; 404 not a
    member; 503 no leader or no quorum)."""

    def __init__(self, status: int, message: str, leader: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.leader = leader


class RaftGroup:
    """One Raft group of this node (see the module docstring)."""

    def __init__(
        self,
        name: str,
        self_addr: str,
        peers: list[str],
        data_dir: str,
        store,
        write_policy: str,
        on_applied=None,
        on_delivering=None,
        password: str = "",
        mqtt_addr: str = "",
        compaction_entries: int = 5000,
        tls=None,
        distribution: str = "",
        compression: int = 0,
    ) -> None:
        self.tls = tls  # cluster.raft.tls: fluxmq.replication.transport.RaftTLS, or None (plain TCP)
        self.compression = compression  # cluster.raft.compression: zlib level of the frames sent
        # "forward": consumers on every replica, the leader deciding (distribution.py); "": the
        # leader delivers to its own consumers only
        self.distribution = distribution
        self.incarnation = os.urandom(6).hex()  # this run of the node, in its member registrations
        self.compaction_entries = compaction_entries  # log entries kept before a snapshot replaces them
        self.password = password or None  # cluster.raft.password: pysyncobj's encrypted transport
        self.name = name
        self.self_addr = self_addr
        # the members this node starts with (cluster.raft.peers, or the set agreed in etcd); the
        # members now are pysyncobj's (``peers``): changed at run time by ``change_member``
        self.configured = sorted(set(peers) | {self_addr})
        self._changing: int | None = None  # the term of the member change waiting for its commit
        self.store = store  # QueueLogStore
        self.write_policy = write_policy
        self.logs: dict[str, object] = {}  # queue name -> ReplicatedQueueLog
        self.applied = store.applied_index(name)
        self.owner: str | None = None  # node whose claim was applied last
        # The delivery epoch: the Raft index of the claim applied last (the same on every replica).
        # Every staged batch starts with an ("e", epoch) marker of the epoch it was staged in; a
        # settlement, lease, give-back or nack staged before a claim and applied after it is stale:
        # it concerns a delivery the new owner has forgotten (and may have made again), so it
        # changes nothing and the $ack that made it is refused, never confirmed.
        self.epoch = 0
        # the Raft term of the claim applied last (None: not known, e.g. a snapshot of before)
        self.claim_term: int | None = None
        self._ops_epoch: int | None = None  # the epoch of the marker last staged into _ops
        self.on_superseded = None  # (group) -> None: another node's claim was applied here
        self.mqtt_addr = mqtt_addr  # where MQTT clients reach this node (announced in its claims)
        self.mqtt_of: dict[str, str] = {}  # Raft address -> MQTT address, from the claims applied
        self.on_applied = on_applied  # (queue log) -> None: kick deliveries
        self.on_delivering = on_delivering  # (group) -> None: this node took over delivery
        self.on_unknown = None  # (queue name) -> its log or None: a queue this node has not made yet
        self._ops: list = []
        self._holds: list = []  # (HeldAck, timer) of the staged sync writes
        self._in_flight: dict[int, float] = {}  # entries submitted -> when, until their callback
        self._seq = 0
        self._hold: HeldAck | None = None
        self._settle_hold: HeldAck | None = None  # the $acks' hold of the next entry (held apart)
        self._scheduled = False
        self._claimed_term = -1
        self._reset_marks: dict = {}
        self._running = False
        self._driver = None
        self.stats = {
            "entries_submitted": 0,
            "entries_applied": 0,
            "entries_refused": 0,
            "acks_timed_out": 0,
            "snapshots_written": 0,
            "snapshots_installed": 0,
            "settlements_stale": 0,
            "appends_relayed": 0,  # appends staged by the C fast path of a PUBLISH (append_relayed)
            # a follower's answer came after later entries were sent to it: they were not sent again
            "entries_not_resent": 0,
        }
        journal = os.path.join(data_dir, f"raft-{name}.journal")
        os.makedirs(data_dir, exist_ok=True)
        self.journal = journal
        self.dump = os.path.join(data_dir, f"raft-{name}.snapshot")
        self._node = None
        self._poller = None  # transport.HubPoller, made at start
        # log compaction (snapshot.Writing): the dump being written by a greenlet, and what
        # _snapshot_progress tells pysyncobj
        self._snapshot_writer = None
        self._snapshot_state = _NOT_SERIALIZING

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        global _NODE_CLASS
        from pysyncobj import SyncObjConf

        if _NODE_CLASS is None:
            _NODE_CLASS = _make_node_class()
        conf = SyncObjConf(
            autoTick=False,
            appendEntriesUseBatch=False,
            appendEntriesPeriod=APPEND_ENTRIES_PERIOD,
            raftMinTimeout=RAFT_MIN_TIMEOUT,
            raftMaxTimeout=RAFT_MAX_TIMEOUT,
            connectionTimeout=CONNECTION_TIMEOUT,
            connectionRetryTime=0.5,
            leaderFallbackTimeout=LEADER_FALLBACK_TIMEOUT,
            commandsWaitLeader=False,
            journalFile=self.journal,
            pollerType="select",
            maxBindRetries=20,
            bindRetryTime=0.25,
            # Snapshots of our own (fluxmq.replication.snapshot): the queue state, not the pickled
            # object; taken every compaction_entries entries (never on a timer: a snapshot copies
            # every retained record), written by a greenlet a chunk at a time (_begin_snapshot).
            logCompactionMinEntries=self.compaction_entries,
            logCompactionMinTime=10**12,
            fullDumpFile=self.dump,
            serializer=self._begin_snapshot,
            serializeChecker=self._snapshot_progress,
            deserializer=self._read_snapshot,
            # members added and removed at run time through the log (change_member); the journal's
            # format is the same, and a restart applies the changes its journal holds again
            dynamicMembershipChange=True,
            # the member listens on its address as configured (pysyncobj binds 0.0.0.0 without this)
            bindAddress=self.self_addr,
            onStateChanged=self._state_changed,
            password=self.password,
        )
        from .transport import HubPoller, transport_class

        # connections of ours, plain or TLS, on watchers of the hub that serve each message and the
        # tick's work after it in the hub turn that read it (HubPoller; _RaftNode.turn)
        self._poller = HubPoller()
        transport = transport_class(self.tls, self.compression, self._poller)
        self._node = _NODE_CLASS(
            self, self.self_addr, [p for p in self.configured if p != self.self_addr], conf, transport
        )
        self._poller.on_turn = self._node.turn
        self._running = True
        self._driver = gevent.spawn(self._drive)
        log.info(
            "raft_group_started",
            extra={
                "group": self.name,
                "self": self.self_addr,
                "peers": ",".join(self.peers),
                "applied": self.applied,
            },
        )

    def stop(self) -> None:
        self._running = False
        if self._driver is not None:
            self._driver.kill(block=True, timeout=2)
            self._driver = None
        if self._snapshot_writer is not None:
            self._snapshot_writer.kill(block=True, timeout=2)  # the partial dump is removed
            self._snapshot_writer = None
        node = self._node
        if node is not None:
            try:
                node._doDestroy()
            except Exception:
                log.exception("raft_group_stop_failed", extra={"group": self.name})
        if self._poller is not None:
            self._poller.close()  # what pysyncobj left subscribed (its pipe notifier's pipe)
        for held, timer, _settlement in self._holds:
            timer.stop()
            held.resolve(refused("the node is stopping", 0x80))
        self._holds = []

    def _begin_snapshot(self, path: str, raft_data) -> None:
        """pysyncobj's serializer, called by its log compaction in the hub at the applied index:
        the dump's header and a view of the records are taken now (snapshot.Writing), the records
        are written by a greenlet a chunk at a time, and ``_snapshot_progress`` (pysyncobj's
        serializeChecker) says SERIALIZING until the dump is complete, then SUCCESS (pysyncobj then
        drops the entries before it; meanwhile it sends no dump to a replica).

        pysyncobj renames ``path`` onto the dump as soon as this returns. Nothing is written at
        ``path`` (the dump is written to a file of its own and moved onto the dump when complete,
        so a crash meanwhile leaves the previous dump whole): that rename fails, and pysyncobj
        ignores its failure when a serializeChecker is given. A dump being sent to a replica
        when this begins is sent whole, from the file it was opened on."""
        try:
            os.unlink(path)  # a leftover would be renamed onto the dump
        except FileNotFoundError:
            pass
        try:
            writing = snapshot.Writing(self.dump, self, raft_data)
        except Exception:
            self._snapshot_state = _FAILED
            log.exception("raft_snapshot_write_failed", extra={"group": self.name})
            raise
        self._snapshot_state = _SERIALIZING
        self._snapshot_writer = gevent.spawn(self._write_snapshot, writing)

    def _write_snapshot(self, writing) -> None:
        installed = self.stats["snapshots_installed"]
        state = _FAILED
        try:
            clock = time.perf_counter
            started = clock()
            for _ in writing.steps():
                # Between two chunks: a pause twice as long as the chunk took (at least
                # SNAPSHOT_PAUSE: the dump is not urgent, it takes at most a third of the hub, less
                # when the machine is busy and a chunk takes longer), then whatever is ready runs
                # first (publishes, and the Raft ticks, which wait for an idle loop too:
                # gevent.sleep(0) alone would keep them from ticking).
                gevent.sleep(max(SNAPSHOT_PAUSE, 2 * (clock() - started)))
                gevent.idle()
                started = clock()
            if self.stats["snapshots_installed"] != installed:
                # the leader's dump was installed meanwhile: it is newer than this one, keep it
                writing.discard()
                log.info("raft_snapshot_superseded", extra={"group": self.name, "index": writing.index})
            else:
                writing.finish(lambda fd: gevent.get_hub().threadpool.apply(os.fsync, (fd,)))
                state = _SUCCESS
        except gevent.GreenletExit:
            writing.discard()
            raise
        except Exception:
            log.exception("raft_snapshot_write_failed", extra={"group": self.name})
            writing.discard()
        finally:
            self._snapshot_state = state
            if self._snapshot_writer is gevent.getcurrent():
                self._snapshot_writer = None

    def _snapshot_progress(self) -> int:
        """pysyncobj's serializeChecker: SUCCESS or FAILED once when the dump being written ends."""
        state = self._snapshot_state
        if state in (_SUCCESS, _FAILED):
            self._snapshot_state = _NOT_SERIALIZING
        return state

    @property
    def snapshot_writing(self) -> bool:
        """A dump is being written (its records a chunk at a time)."""
        return self._snapshot_state == _SERIALIZING

    def _read_snapshot(self, path: str) -> tuple:
        try:
            return snapshot.read(path, self)
        except Exception:
            log.exception("raft_snapshot_read_failed", extra={"group": self.name})
            raise

    def _drive(self) -> None:
        """pysyncobj's tick every TICK_WAIT, for its timers (elections, heartbeats, the leader
        stepping down without a majority, reconnects, log compaction); its poll waits for nothing:
        messages are served by the hub's watchers as they come (``transport.HubPoller``)."""
        node = self._node
        clock = time.perf_counter
        logged = 0.0
        while self._running:
            started = clock()
            try:
                node.doTick(0)
            except Exception:
                log.exception("raft_tick_failed", extra={"group": self.name})
            # A tick that held the hub: logged at most every 10 s, with how long and what was
            # applied.
            took = clock() - started
            if took > SLOW_TICK and started - logged > 10.0:
                logged = started
                log.warning(
                    "raft_tick_slow",
                    extra={"group": self.name, "held_hub_s": round(took, 3), "applied": self.applied},
                )
            gevent.sleep(TICK_WAIT)

    # -- state -----------------------------------------------------------------------------------

    def leader(self) -> str | None:
        node = self._node
        leader = node._getLeader() if node is not None else None
        return None if leader is None else leader.id if hasattr(leader, "id") else str(leader)

    def is_leader(self) -> bool:
        return self._node is not None and self._node._isLeader()

    @property
    def peers(self) -> list[str]:
        """The group's members now (this node included), as pysyncobj has them: the configured
        ones, changed by the member changes in the log (applied when appended, as Raft does)."""
        node = self._node
        if node is None:
            return self.configured
        return sorted({self.self_addr} | {getattr(n, "id", str(n)) for n in node._SyncObj__otherNodes})

    def committed_peers(self) -> list[str] | None:
        """The members on the leader once its configuration is committed (no member change waiting,
        every entry of its log committed: pysyncobj applies a change when it is appended); None on
        a follower or meanwhile."""
        node = self._node
        if node is None or not node._isLeader() or self._changing is not None:
            return None
        if node.raftCommitIndex < node._SyncObj__getCurrentLogIndex():
            return None
        return self.peers

    # -- member changes (the admin API) ----------------------------------------------------------

    def check_change(self, action: str, addr: str):
        """Raise ``MemberChangeRefused`` when the change cannot be made here now (not the leader,
        another change not committed, no quorum, ...); else this node's pysyncobj node."""
        node = self._node
        if node is None:
            raise MemberChangeRefused(503, f"Raft group {self.name} is not running")
        if not node._isLeader():
            leader = self.leader()
            if leader is None:
                raise MemberChangeRefused(
                    503, f"Raft group {self.name} has no leader now (an election, or no quorum); try again"
                )
            raise MemberChangeRefused(
                409,
                f"this node is not the Raft leader of group {self.name}: ask the "
                f"leader, {leader} (its admin API)",
                leader=leader,
            )
        term = node.raftCurrentTerm
        if self._changing == term:
            raise MemberChangeRefused(
                409,
                f"a member change of group {self.name} is in progress (not committed "
                "yet): one change at a time",
            )
        members = self.peers
        if action == "add" and addr in members:
            raise MemberChangeRefused(409, f"{addr} is a member of group {self.name} already")
        if action == "remove":
            if addr not in members:
                raise MemberChangeRefused(
                    404, f"{addr} is not a member of group {self.name} (members: {', '.join(members)})"
                )
            if addr == self.self_addr:
                raise MemberChangeRefused(
                    409,
                    f"{addr} is the leader of group {self.name}, which cannot remove "
                    "itself: stop it (another member is elected), then remove it there",
                )
        if not node.hasQuorum:
            raise MemberChangeRefused(
                503, f"Raft group {self.name} has no quorum: a change could not be committed"
            )
        return node

    def change_member(self, action: str, addr: str, done) -> None:
        """Add (``action`` "add") or remove ("remove") the member at ``addr``: one Raft entry,
        appended on this node, the leader; ``done(error)`` is called once it is committed (error
        None) or failed. Raises ``MemberChangeRefused`` when it cannot be made here now. One change
        at a time: the next is refused until this one is committed (pysyncobj does not check it)."""
        node = self.check_change(action, addr)
        term = node.raftCurrentTerm
        self._changing = term

        def committed(res, err) -> None:
            if self._changing == term:
                self._changing = None
            if err:
                log.warning(
                    "raft_member_change_failed",
                    extra={"group": self.name, "action": action, "addr": addr, "error": _FAIL.get(err, err)},
                )
                done(f"the change was not committed ({_FAIL.get(err, err)})")
            else:
                log.info(
                    "raft_member_changed",
                    extra={
                        "group": self.name,
                        "action": action,
                        "addr": addr,
                        "members": ",".join(self.peers),
                    },
                )
                done(None)

        if action == "add":
            node.addNodeToCluster(addr, callback=committed)
        else:
            node.removeNodeFromCluster(addr, callback=committed)

    @property
    def delivering(self) -> bool:
        """True when this node delivers the group's queues: the leader, once its claim is applied,
        while a majority answered it within DELIVERY_LEASE (a leader lease: a partitioned leader
        stops delivering before the others can have elected a new one, so two nodes never deliver
        at once and an ack confirmed by the new leader is not followed by a delivery from the old)."""
        if self.owner != self.self_addr or not self.is_leader():
            return False
        # answers from other members that make a majority with this one (the members now)
        need = (len(self._node._SyncObj__otherNodes) + 1) // 2
        if not need:
            return True
        # pysyncobj keeps each member's last answer privately (read, never written), stamped by
        # its own clock: CLOCK_MONOTONIC_RAW, not time.monotonic's CLOCK_MONOTONIC. The two drift
        # apart (0.31 s on a host up six minutes, more than the lease): read the same clock.
        answered = self._node._SyncObj__lastResponseTime
        cutoff = pysyncobj_clock.monotonicTime() - DELIVERY_LEASE
        return sum(1 for t in answered.values() if t > cutoff) >= need

    def status(self) -> dict:
        node = self._node
        leader = self.leader()
        out = {
            "name": self.name,
            "self": self.self_addr,
            "peers": self.peers,
            "leader": leader,
            "leader_mqtt": self.mqtt_of.get(leader) if leader else None,
            "delivering": self.delivering,
            "applied": self.applied,
            **self.stats,
            "queues": {
                name: {
                    "first": q.first,
                    "next": q.next,
                    "count": q.count,
                    "bytes": q.bytes,
                    "groups": {g: p[0] for g, p in q.progress.items()},
                    # distribution_mode forward: the client ids of each group's members as this
                    # node applied their registrations (what a leader of the next term delivers to)
                    "registered": {
                        g: sorted({key.partition("\x00")[0] for _node, key in regs})[:REGISTERED_SHOWN]
                        for g, regs in q.registered.items()
                    },
                }
                for name, q in self.logs.items()
            },
        }
        if node is not None:
            st = node.getStatus()
            out.update(
                term=st["raft_term"],
                commit_index=st["commit_idx"],
                has_quorum=st["has_quorum"],
                log_len=st["log_len"],
                lag={
                    k[len("match_idx_server_") :]: st["commit_idx"] - v
                    for k, v in st.items()
                    if k.startswith("match_idx_server_")
                }
                if self.is_leader()
                else {},
            )
        return out

    def _state_changed(self, old: int, new: int) -> None:
        # Leader: claim delivery through the log (applied after everything before it).
        if new == 2:  # _RAFT_STATE.LEADER
            term = self._node.raftCurrentTerm if self._node is not None else 0
            if term != self._claimed_term:
                self._claimed_term = term
                gevent.get_hub().loop.run_callback(self._claim, term)
        log.info("raft_state_changed", extra={"group": self.name, "old": old, "new": new})

    def lease_superseded(self) -> bool:
        """A later Raft term began than the one of the claim applied last: the leader that made
        the leases being applied is deposed, and a claim of the new term will follow them in the
        log (every leader of a new term writes one), whose owner delivers again at once what they
        leased. A lease of the deposed leader's applied now (a follower learns that its old-term
        entries are committed only with the new leader's first entries, after that leader may have
        delivered the record again and had it acked) is not delivered: the record would reach a
        second member after the first one's ``$ack`` was confirmed."""
        node = self._node
        return node is not None and self.claim_term is not None and node.raftCurrentTerm > self.claim_term

    def _claim(self, term: int) -> None:
        if self._node is not None:
            # what pysyncobj set for every member on becoming leader (not an answer): ``answering``
            # counts a member only once it has really answered this leadership
            self._reset_marks = dict(self._node._SyncObj__lastResponseTime)
        if self.is_leader() and self._node.raftCurrentTerm == term:
            self._node.submit(
                [("o", self.self_addr, term, self.mqtt_addr)], lambda res, err: self._claim_done(term, err)
            )

    def _claim_done(self, term: int, err) -> None:
        if err:
            log.info("raft_claim_failed", extra={"group": self.name, "error": _FAIL.get(err, err)})
            if self._running:
                gevent.spawn_later(0.1, self._claim, term)  # still this term's leader: try again

    # -- writes ----------------------------------------------------------------------------------

    def check_writable(self, queue: str) -> None:
        """Raise the refusal a write to this group gets now (no quorum, reject on a follower)."""
        node = self._node
        if node is None:
            raise refused(f"queue {queue}: its Raft group {self.name} is not running", 0x80)
        if node._isLeader():
            if not node.hasQuorum:
                raise refused(f"queue {queue}: Raft group {self.name} has no quorum", 0x97)
            return
        leader = self.leader()
        if leader is None:
            raise refused(
                f"queue {queue}: Raft group {self.name} has no leader (no quorum or an election)", 0x97
            )
        if self.write_policy == "reject":
            mqtt = self.mqtt_of.get(leader)
            if mqtt is None:  # its claim is not applied here yet (just elected): retry shortly
                raise refused(
                    f"queue {queue}: this node is not the Raft leader of group {self.name} (leader "
                    f"{leader}, its MQTT address not known yet)",
                    0x83,
                )
            raise refused(f"queue {queue}: this node is not the Raft leader of group {self.name}", 0x83, mqtt)

    def _mark_epoch(self) -> None:
        """The marker of the epoch the next staged operations belong to (see ``epoch``)."""
        self._ops_epoch = self.epoch
        self._ops.append(("e", self.epoch))

    def stage(self, op: tuple) -> None:
        if self._ops_epoch != self.epoch:
            self._mark_epoch()
        self._ops.append(op)
        if not self._scheduled:
            self._scheduled = True
            gevent.get_hub().loop.run_callback(self._submit)

    def stage_append(self, queue: str, blob: bytes) -> None:
        ops = self._ops
        if self._ops_epoch != self.epoch:
            self._mark_epoch()
        elif ops[-1][0] == "a" and ops[-1][1] == queue:
            ops[-1][2].append(blob)  # one batch per queue per entry
            return
        self.stage(("a", queue, [blob]))

    def stage_appends(self, queue: str, blobs: list[bytes]) -> None:
        """``stage_append`` of a run of records (the relayed appends of one read)."""
        ops = self._ops
        if self._ops_epoch == self.epoch and ops[-1][0] == "a" and ops[-1][1] == queue:
            ops[-1][2].extend(blobs)
            return
        self.stage(("a", queue, list(blobs)))

    def stage_lease(self, queue: str, group: str, node: str, key: str, offset: int, count: int) -> None:
        """A delivery the leader hands a member on ``node`` (distribution_mode forward): one
        ``l`` command per member and turn, its offsets and delivery counts batched."""
        ops = self._ops
        if self._ops_epoch != self.epoch:
            self._mark_epoch()
        else:
            last = ops[-1]
            if (
                last[0] == "l"
                and last[1] == queue
                and last[2] == group
                and last[3] == node
                and last[4] == key
            ):
                last[5].append(offset)
                last[6].append(count)
                return
        self.stage(("l", queue, group, node, key, [offset], [count]))

    def answering(self, within: float) -> set[str]:
        """This node and the members that answered it within ``within`` seconds (the leader's
        view; a follower hears only from the leader)."""
        node = self._node
        if node is None:
            return {self.self_addr}
        cutoff = pysyncobj_clock.monotonicTime() - within  # pysyncobj's clock (as ``delivering``)
        answered = node._SyncObj__lastResponseTime  # read, never written (as ``delivering``)
        reset = self._reset_marks
        out = {getattr(n, "id", str(n)) for n, t in answered.items() if t > cutoff and reset.get(n) != t}
        out.add(self.self_addr)
        return out

    def turn_hold(self, timeout: float, settlement: bool = False) -> HeldAck:
        """The HeldAck of the next entry: resolved when it is committed (and applied here),
        refused on a failure or after ``timeout`` (counted from now). ``settlement``: the hold of
        the $acks, refused also when the entry's settlements were stale (``epoch``); the other
        writes of the entry (appends) are not refused for that."""
        held = self._settle_hold if settlement else self._hold
        if held is None:
            held = HeldAck()
            if settlement:
                self._settle_hold = held
            else:
                self._hold = held
            timer = gevent.get_hub().loop.timer(timeout)
            timer.start(self._timed_out, held, timeout)
            self._holds.append((held, timer, settlement))
            if not self._scheduled:
                self._scheduled = True
                gevent.get_hub().loop.run_callback(self._submit)
        return held

    def _submit(self) -> None:
        """Submit what is staged as one entry, unless MAX_IN_FLIGHT entries wait for their commit:
        then the staged operations wait for the next commit and travel together (the batch grows
        with the load; an idle group submits at once)."""
        self._scheduled = False
        if not self._ops:
            # Held for nothing staged (an ack of what was settled already): nothing to wait for.
            holds, self._holds = self._holds, []
            self._hold = self._settle_hold = None
            for held, timer, _settlement in holds:
                timer.stop()
                held.resolve(None)
            return
        now = time.monotonic()
        if len(self._in_flight) >= MAX_IN_FLIGHT and now - min(self._in_flight.values()) < IN_FLIGHT_PATIENCE:
            return  # _done submits them
        ops, self._ops = self._ops, []
        self._ops_epoch = None  # the next batch starts with its own marker
        holds, self._holds = self._holds, []
        self._hold = self._settle_hold = None
        if self.write_policy == "local" and not self.is_leader():
            for held, timer, _settlement in holds:
                timer.stop()
                held.resolve(None)  # write_policy local: acknowledged before replication (not durable)
            holds = []
        self.stats["entries_submitted"] += 1
        self._seq += 1
        seq = self._seq
        self._in_flight[seq] = now
        self._node.submit(ops, lambda res, err: self._done(seq, holds, err, res))

    def _done(self, seq: int, holds, err, res=None) -> None:
        self._in_flight.pop(seq, None)
        stale = None
        if err:
            self.stats["entries_refused"] += 1
            error = refused(
                f"Raft group {self.name}: the append was not replicated ({_FAIL.get(err, err)})", 0x80
            )
        else:
            error = None
            if res == STALE:
                stale = refused(
                    f"Raft group {self.name}: a new leader took over delivery before this "
                    "settlement was applied; the message will be delivered again",
                    0x80,
                )
        for held, timer, settlement in holds:
            timer.stop()
            timer.close()
            held.resolve(stale if settlement and stale is not None else error)
        if self._ops and not self._scheduled:
            self._scheduled = True
            gevent.get_hub().loop.run_callback(self._submit)

    def _timed_out(self, held: HeldAck, timeout: float) -> None:
        if not held.done:
            self.stats["acks_timed_out"] += 1
            held.resolve(
                refused(f"Raft group {self.name}: not replicated within ack_timeout ({timeout}s)", 0x80)
            )

    # -- apply (every replica, in log order) -----------------------------------------------------

    def _apply(self, ops: list, index: int):
        if index <= self.applied:
            # applied and committed before a restart (replayed from the journal); only what is
            # kept in memory is learned again: the MQTT addresses the claims announce, and the
            # members nodes registered (distribution_mode forward)
            for op in ops:
                if op[0] == "o":
                    self.epoch = index
                    self.claim_term = op[2]
                    if len(op) > 3 and op[3]:
                        self.mqtt_of[op[1]] = op[3]
                elif op[0] == "e":
                    continue
                elif op[0] == "m":
                    qlog = self.logs.get(op[1])
                    if qlog is not None:
                        qlog.apply_member(*op[2:])
                elif op[0] != "o":
                    qlog = self.logs.get(op[1])
                    if qlog is not None and qlog.leased:
                        qlog.apply_lease(op, False)
            return True
        touched = set()
        stale = False  # the operations that follow were staged before the claim applied last
        result = True
        for op in ops:
            kind = op[0]
            if kind == "e":
                stale = op[1] < self.epoch
                continue
            if kind == "o":
                if len(op) > 3 and op[3]:
                    self.mqtt_of[op[1]] = op[3]
                self._apply_claim(op[1], index, op[2])
                continue
            qlog = self.logs.get(op[1])
            if qlog is None and self.on_unknown is not None:
                qlog = self.on_unknown(op[1])  # made on another node first (a DLQ): made here too
            if qlog is None:
                log.warning(
                    "raft_op_for_unknown_queue", extra={"group": self.name, "queue": op[1], "op": kind}
                )
                continue
            if qlog.leased and qlog.apply_lease(op, True):
                touched.add(qlog)
                continue
            if stale and kind in _DELIVERY_OPS and not qlog.leased and not qlog.stream:
                # of a delivery made before the claim applied last: the new owner rebuilt its
                # groups without it (and may have delivered the record again); a settlement of
                # it would confirm an $ack of a record that is out again
                if kind == "c" and (op[4] is not None or op[3] > qlog.progress.get(op[2], (op[3],))[0]):
                    result = STALE
                    self.stats["settlements_stale"] += 1
                    continue
                if kind != "c":
                    continue
            if kind == "a":
                qlog.apply_append(op[2])
            elif kind == "c":
                qlog.apply_commit(op[2], op[3], op[4], op[5])
            elif kind == "t":
                qlog.apply_truncate(op[2])
            elif kind == "d":
                qlog.apply_delete(op[2])
            elif kind == "g":
                qlog.apply_forget(op[2])
            elif kind == "k":
                qlog.apply_counts(op[2], op[3], op[4])
            elif kind == "m":
                qlog.apply_member(*op[2:])
            elif qlog.events is not None:
                # distribution_mode forward (distribution.py): leases ("l"), given back ("b"), a
                # nack or reject from another node ("n"): no state of their own, acted on by the
                # node they concern once applied (after the appends they name)
                qlog.events.append(op)
            touched.add(qlog)
        self.applied = index
        self.store.put_applied(self.name, index)
        self.stats["entries_applied"] += 1
        if self.on_applied is not None:
            for qlog in touched:
                self.on_applied(qlog)
        return result

    def _apply_claim(self, node: str, index: int, term: int | None = None) -> None:
        before = self.owner
        self.owner = node
        self.epoch = index  # before the callbacks: what they stage belongs to the new epoch
        self.claim_term = term
        if node == self.self_addr:
            if self.on_delivering is not None:
                self.on_delivering(self)
        elif self.on_superseded is not None:
            self.on_superseded(self)
        if before != node:
            log.info("raft_delivery_owner", extra={"group": self.name, "owner": node})


#: operations about a delivery (distribution_mode forward and the leader-only default): a
#: settlement, a lease to a member on another node, a lease given back, a nack from another node
_DELIVERY_OPS = frozenset("clbn")

_FAIL = {
    1: "queue full",
    2: "no leader",
    3: "discarded",
    4: "not leader",
    5: "leader changed",
    6: "denied",
    7: "unknown outcome",
}
