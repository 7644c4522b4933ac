"""Retained messages and wills shared through etcd.

Retained (``RetainedReplica``), key ``{prefix}retained/{topic}``, value JSON ``{"node", "size",
"msg"}`` where ``msg`` is the storage record of the message (``fluxmq.storage.records``: properties
and expiry included). A message whose payload is larger than
``cluster.etcd.hybrid_retained_size_threshold`` is written with an empty payload and ``"ref": true``:
its payload stays on the node that set it, and the others fetch it with ``fetch(node_id, topic)``
(the node wires it to the transport's ``retained.fetch`` call, answered by ``serve_fetch``).

* A change made on this node (``RetainedStore.on_change``) is stamped with the wall-clock time the
  node took it (ms, ``"at"``), queued and written by one greenlet, the latest value per topic, so
  publishing never waits for etcd.
* The value set last wins, also when its write comes first (a node cut off from etcd writes its
  changes at the heal): a write is a transaction that compares what etcd holds for the topic (the
  value key and its clear, below: their mod revisions) and puts only when etcd's stamp is not newer,
  retrying when etcd changed meanwhile. A write that finds a newer stamp is dropped and etcd's value
  applied here. Stamps compare as ``(at, node)``; an entry of an older version has none (``at`` 0).
* A clear deletes the value key. It puts ``{prefix}retained_cleared/{topic}`` ``{"node", "at"}`` in
  the same transaction (its time, which a later set must beat; older versions, which do not read
  it, see the delete) only when an older set may still be written: while a node counts lost
  (``Membership.lost()``), or when the clear is late itself (``_late``). Otherwise it deletes that
  key too: setting and clearing topics leaves nothing in etcd nor in the nodes' mirrors. A set
  deletes that key again. The leader deletes records older than ``clear_grace`` (a minute) once no
  node has counted lost for ``clear_grace``, and every record older than ``clear_keep`` (an hour):
  a change made on a node cut off from etcd longer than that wins over a clear made meanwhile.
* A late set that finds the value its node knew when it made it deleted with no record (a clear
  made before the clearing node counted this one lost) drops itself: the clear wins.
* A change seen in etcd is applied to ``broker.retained`` with ``apply_replicated`` (never reported
  back, so never written again). Changes are applied in etcd's order, this node's own included, so
  every node ends with the value etcd ended with.

Wills (``WillRegistry``), key ``{prefix}wills/{client}``, value JSON ``{"node", "delay", "msg"}``,
always with the payload (a will is needed precisely when its owner is gone). The key is not bound
to a lease: a lease-bound will would be deleted by etcd at the very moment it must be published.
The owner's liveness is its lease-bound ``nodes/{owner}`` key instead. When that goes, the leader
publishes each will of the dead node once its delay has passed: ``if mod_revision == seen then
delete`` in one transaction, and only the caller whose delete succeeded publishes. A live owner that
publishes a will itself calls ``claim`` first (the same delete), so a will is published once
cluster-wide (at most once if the publisher dies between its delete and its publish).
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable

import gevent
from gevent.event import Event

from fluxmq.broker.message import Message
from fluxmq.errors import ClusterError
from fluxmq.storage.records import RecordError, decode_message, encode_message

from .client import PrefixMirror, cmp_mod, cmp_value, op_delete, op_get, op_put, range_kvs

__all__ = ["RetainedReplica", "WillRegistry", "decode_entry", "encode_clear", "encode_entry", "stamp_of"]

log = logging.getLogger("fluxmq.cluster.replicated")

#: a will larger than this is not replicated (etcd refuses requests above ~1.5 MiB by default)
MAX_WILL_BYTES = 1 << 20
#: how long the leader keeps the record of a retained clear (seconds), and how often it looks
CLEAR_KEEP = 3600.0
CLEAR_SWEEP = 60.0
#: the leader sweeps a clear's record sooner, once it is this old and no node has counted lost for
#: this long (seconds): a node that regained etcd writes its waiting changes within seconds (its
#: retries back off up to 5 s)
CLEAR_GRACE = 60.0
#: a change is late (it may meet an older change of another node written after it) when a write
#: failed or stalled (took longer than ``STALL``, seconds: etcd did not answer) since it was made,
#: or it is older than ``LATE_MS``
LATE_MS = 5000
STALL = 2.0
#: transactions one retained write tries while etcd's value keeps changing under it (then it waits
#: and tries again, as after a failure)
WRITE_ATTEMPTS = 5


def now_ms() -> int:
    """The stamp of a retained change: wall-clock milliseconds (nodes' clocks assumed in sync)."""
    return int(time.time() * 1000)


def encode_entry(node_id: str, message: Message, inline: bool = True, **extra) -> bytes:
    record = encode_message(message if inline else message.copy(payload=b""))
    body = {
        "node": node_id,
        "size": len(message.payload),
        "msg": base64.b64encode(record).decode("ascii"),
        **extra,
    }
    if not inline:
        body["ref"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def encode_clear(node_id: str, at: int) -> bytes:
    """The record of a retained clear (``retained_cleared/{topic}``)."""
    return json.dumps({"node": node_id, "at": at}, separators=(",", ":")).encode()


def stamp_of(kv: dict | None) -> tuple[int, str] | None:
    """``(at, node)`` of a retained entry or clear record (``at`` 0: written by a version without
    stamps, or unreadable); None when there is none."""
    if kv is None:
        return None
    try:
        body = json.loads(kv["value"])
        return int(body.get("at", 0) or 0), str(body.get("node", ""))
    except (ValueError, TypeError, AttributeError):
        return 0, ""


def decode_entry(value: bytes) -> tuple[dict, Message]:
    """(envelope, message) of an etcd value; raises ValueError when it is not one of ours."""
    body = json.loads(value)
    try:
        topic, payload, qos, retain, props, expires_at, origin = decode_message(base64.b64decode(body["msg"]))
    except (KeyError, RecordError, TypeError) as exc:
        raise ValueError(str(exc)) from exc
    return body, Message(topic, payload, qos, retain, props, expires_at, origin)


class RetainedReplica:
    """Mirrors this node's retained changes to etcd and applies the other nodes' to ``broker.retained``."""

    def __init__(
        self,
        meta,
        broker,
        threshold: int,
        fetch: Callable[[str, str], bytes],
        clear_keep: float = CLEAR_KEEP,
        clear_sweep: float = CLEAR_SWEEP,
        clear_grace: float = CLEAR_GRACE,
    ) -> None:
        self.meta = meta
        self.store = broker.retained
        self.threshold = threshold
        self.fetch = fetch
        self.node_id = meta.node_id
        self.prefix = meta.prefix + "retained/"
        self.cleared_prefix = meta.prefix + "retained_cleared/"
        self.clear_keep = clear_keep
        self.clear_sweep = clear_sweep
        self.clear_grace = clear_grace
        # topic -> (latest local change not yet in etcd, its stamp, the value etcd held as far as this
        # node knew when it was made)
        self._pending: dict[str, tuple[Message | None, int, dict | None]] = {}
        self._stalled_at = 0  # when a write last failed or stalled (ms, as stamps)
        self._own_large: dict[str, Message] = {}  # payloads this node serves to the others
        # the change being written now
        self._writing: tuple[str, tuple[Message | None, int, dict | None]] | None = None
        # topic -> (revision, value kv, clear kv) this node wrote last, while the watches lag behind it
        self._wrote: dict[str, tuple[int, dict | None, dict | None]] = {}
        self._wake = Event()
        self._writer: gevent.Greenlet | None = None
        self._sweeper: gevent.Greenlet | None = None
        self._mirror: PrefixMirror | None = None
        self._cleared: PrefixMirror | None = None
        self._joined = False
        self.written = 0
        self.applied = 0
        self.fetched = 0
        self.fetch_failures = 0
        self.write_failures = 0
        self.superseded = 0  # local changes etcd already held a newer one of when they were written
        self.clears_swept = 0

    def start(self) -> None:
        """Read what etcd holds (applied here), then follow both ways. Local topics etcd lacks are
        written to etcd the first time this node's store joins the cluster; at later starts etcd is
        the truth and they are removed (another node cleared them while this one was down). Those
        first writes are stamped 0: any change made in the cluster since is newer."""
        self._cleared = PrefixMirror(
            self.meta.client, self.cleared_prefix, lambda k, kv, old: None, name="retained_cleared"
        )
        self._cleared.start()
        self._mirror = mirror = PrefixMirror(self.meta.client, self.prefix, self._changed, name="retained")
        mirror.start()
        membership = self.meta.membership
        self._joined = (
            bool(membership.read_state().get("retained_joined")) if membership is not None else False
        )
        for topic, message in list(self.store.items()):
            if topic.startswith("$") or self.prefix + topic in mirror.items:
                continue
            if self._joined:
                self.store.apply_replicated(topic, None)
            else:
                self._pending[topic] = (message, 0, None)
        self.store.on_change = self._local_change
        self._writer = gevent.spawn(self._write_loop)
        self._sweeper = gevent.spawn(self._sweep_loop)
        self._wake.set()

    def stop(self) -> None:
        self.store.on_change = None
        for greenlet in (self._writer, self._sweeper):
            if greenlet is not None:
                greenlet.kill(block=True, timeout=5)
        for mirror in (self._mirror, self._cleared):
            if mirror is not None:
                mirror.stop()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every local change is in etcd (tests, graceful stop); True when it is."""
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            gevent.sleep(0.01)
        return not self._pending

    # -- this node -> etcd -------------------------------------------------------------------------
    def _local_change(self, topic: str, message: Message | None) -> None:
        if topic.startswith("$"):
            return  # $SYS and other broker-internal topics are per node
        self._pending.pop(topic, None)  # re-insert: written in the order of the latest change
        self._pending[topic] = (message, now_ms(), self._seen(topic)[0])
        self._wake.set()

    def _write_loop(self) -> None:
        pause = 0.1
        while True:
            self._wake.wait()
            self._wake.clear()
            while self._pending:
                topic, entry = next(iter(self._pending.items()))
                self._writing = (topic, entry)
                started = time.monotonic()
                try:
                    newer = self._write(topic, *entry)
                    if time.monotonic() - started > STALL:
                        self._stalled_at = now_ms()
                except ClusterError as exc:
                    self.write_failures += 1
                    self._stalled_at = now_ms()
                    log.warning(
                        "retained_write_failed", extra={"topic": topic, "error": str(exc), "retry_in": pause}
                    )
                    gevent.sleep(pause)
                    pause = min(pause * 2, 5.0)
                    continue
                finally:
                    self._writing = None
                pause = 0.1
                if self._pending.get(topic) is entry:  # no newer change arrived meanwhile
                    del self._pending[topic]
                    if newer is not False:  # etcd holds a newer change: this node takes it too
                        self._changed(self.prefix + topic, newer, None)
                if newer is False:
                    self.written += 1
                else:
                    self.superseded += 1
            self._forget_seen()
            if not self._joined and self.meta.membership is not None:
                self._joined = True  # this store's topics are in etcd: from now on etcd is the truth
                self.meta.membership.write_state(retained_joined=True)

    def _late(self, at: int) -> bool:
        """Whether a change stamped ``at`` is written late: a write failed or stalled since it was
        made (this node lost etcd meanwhile), or it waited longer than ``LATE_MS``."""
        return at <= self._stalled_at or now_ms() - at > LATE_MS

    def _needs_record(self, late: bool) -> bool:
        """Whether a clear leaves a record: only when another node may hold an older change of the
        topic it writes later (a node counted lost: cut off, or killed and restarted with its
        store), or when this clear is ``late`` itself. Otherwise every node writes its changes in
        time and a plain delete orders the clear."""
        membership = self.meta.membership
        return late or (membership is not None and bool(membership.lost()))

    def _write(self, topic: str, message: Message | None, at: int, base: dict | None) -> dict | None | bool:
        """Write one change unless etcd holds a newer one: False when written, else the value etcd
        holds (None: cleared). ClusterError when etcd fails or keeps changing under it."""
        key, cleared_key = self.prefix + topic, self.cleared_prefix + topic
        late = self._late(at)
        if message is None:
            self._own_large.pop(topic, None)
            if self._needs_record(late):
                ops = [
                    op_delete(key),
                    op_put(cleared_key, encode_clear(self.node_id, at)),
                    op_get(cleared_key),
                ]
            else:
                ops = [op_delete(key), op_delete(cleared_key), op_get(cleared_key)]
        else:
            inline = len(message.payload) <= self.threshold
            if inline:
                self._own_large.pop(topic, None)
            else:
                self._own_large[topic] = message
            ops = [
                op_put(key, encode_entry(self.node_id, message, inline, at=at)),
                op_delete(cleared_key),
                op_get(key),
            ]
        mine = (at, self.node_id)
        value, cleared = self._seen(topic)  # right unless etcd changed since: one round trip
        for _ in range(WRITE_ATTEMPTS):
            # a late set that finds the value this node knew deleted without a record: a clear made
            # while no node was counted lost, during this node's outage (delete's time unknown): the
            # clear wins, as when its record is newer
            deleted = late and message is not None and base is not None and value is None and cleared is None
            if deleted or max(stamp_of(value) or (-1, ""), stamp_of(cleared) or (-1, "")) > mine:
                if message is not None and self._own_large.get(topic) is message:
                    del self._own_large[topic]
                return value
            compare = [
                cmp_mod(key, value["mod_revision"] if value else 0),
                cmp_mod(cleared_key, cleared["mod_revision"] if cleared else 0),
            ]
            ok, responses = self.meta.client.txn(compare, ops, [op_get(key), op_get(cleared_key)])
            if ok:
                # the next write of the topic may come before its echo
                written = next(iter(range_kvs(responses[-1])), None)
                if written is not None:
                    seen = (None, written) if message is None else (written, None)
                    self._wrote[topic] = (written["mod_revision"], *seen)
                else:  # a plain delete
                    revision = int(
                        responses[-1].get("response_range", {}).get("header", {}).get("revision", 0)
                    )
                    self._wrote[topic] = (revision, None, None)
                return False
            value, cleared = (next(iter(range_kvs(r)), None) for r in responses)
        raise ClusterError(f"etcd's retained {topic!r} kept changing under {WRITE_ATTEMPTS} writes")

    def _seen(self, topic: str) -> tuple[dict | None, dict | None]:
        """(value, clear record) of ``topic`` in etcd as far as this node knows: what its watches
        saw, or what it wrote itself while the watch of the key it wrote has not seen that yet."""
        wrote = self._wrote.get(topic)
        if wrote is not None:
            if not self._caught_up(wrote):
                return wrote[1], wrote[2]
            del self._wrote[topic]
        return self._mirror.items.get(self.prefix + topic), self._cleared.items.get(
            self.cleared_prefix + topic
        )

    def _caught_up(self, wrote: tuple[int, dict | None, dict | None]) -> bool:
        revision, value, cleared = wrote
        return (self._cleared if cleared is not None else self._mirror).revision >= revision

    def _forget_seen(self) -> None:
        """Drop what this node wrote once its watches have seen it (at most one per topic)."""
        self._wrote = {topic: w for topic, w in self._wrote.items() if not self._caught_up(w)}

    def _sweep_loop(self) -> None:
        while True:
            gevent.sleep(self.clear_sweep)
            if self.meta.is_leader:
                try:
                    self.sweep_cleared()
                except ClusterError as exc:
                    log.warning("retained_clear_sweep_failed", extra={"error": str(exc)})

    def sweep_cleared(self) -> int:
        """Delete the records of clears older than ``clear_keep``, or older than ``clear_grace``
        once no node has counted lost for ``clear_grace`` (each unless it changed meanwhile); how many
        went. The leader's, every ``clear_sweep`` seconds."""
        membership = self.meta.membership
        settled = membership is None or (
            not membership.lost() and membership.none_lost_for() >= self.clear_grace
        )
        keep = self.clear_grace if settled else self.clear_keep
        oldest = now_ms() - int(keep * 1000)
        done = 0
        for key, kv in list(self._cleared.items.items()):
            if stamp_of(kv)[0] < oldest:
                ok, _ = self.meta.client.txn([cmp_mod(key, kv["mod_revision"])], [op_delete(key)])
                done += ok
        self.clears_swept += done
        return done

    # -- etcd -> this node -------------------------------------------------------------------------
    def _newer_local(self, topic: str) -> bool:
        """A local change of ``topic`` waits that etcd has not seen yet (not the one being written:
        its echo may arrive before its put returns)."""
        if topic not in self._pending:
            return False
        writing = self._writing
        return writing is None or writing[0] != topic or self._pending[topic] is not writing[1]

    def _changed(self, key: str, kv: dict | None, old: dict | None) -> None:
        topic = key[len(self.prefix) :]
        if kv is None:
            if not self._newer_local(topic):
                self.store.apply_replicated(topic, None)
                self.applied += 1
            return
        try:
            body, message = decode_entry(kv["value"])
        except ValueError as exc:
            log.warning("retained_entry_unreadable", extra={"key": key, "error": str(exc)})
            return
        node = body.get("node", "")
        if node == self.node_id:
            if self._newer_local(topic):
                return  # a newer local change is on its way to etcd
            if body.get("ref"):
                own = self._own_large.get(topic)
                if own is None:
                    return  # our payload from an earlier run: the local store holds it
                message = own
        elif body.get("ref"):
            gevent.spawn(self._fetch_and_apply, node, topic, message, kv["mod_revision"])
            return
        self.store.apply_replicated(topic, message.copy(retain=True))
        self.applied += 1

    def _fetch_and_apply(self, node: str, topic: str, message: Message, revision: int) -> None:
        try:
            payload = self.fetch(node, topic)
        except Exception as exc:
            self.fetch_failures += 1
            log.warning("retained_fetch_failed", extra={"node": node, "topic": topic, "error": repr(exc)})
            return
        current = self._mirror.items.get(self.prefix + topic) if self._mirror is not None else None
        if current is None or current["mod_revision"] != revision or self._newer_local(topic):
            return  # superseded while we fetched
        if not payload:
            return  # the owner no longer has it; its clear will follow
        self.fetched += 1
        self.store.apply_replicated(topic, message.copy(payload=payload, retain=True))
        self.applied += 1

    def figures(self) -> dict[str, int]:
        """For /metrics: local changes written to etcd, and those dropped as older than etcd's
        (``superseded``); writes failed (retried); other nodes' changes applied here; large payloads
        fetched and fetches failed; clear records in etcd now (a partition's, or a lost node's)."""
        return {
            "retained_written": self.written,
            "retained_superseded": self.superseded,
            "retained_write_failures": self.write_failures,
            "retained_applied": self.applied,
            "retained_fetched": self.fetched,
            "retained_fetch_failures": self.fetch_failures,
            "retained_clear_records": len(self._cleared.items) if self._cleared is not None else 0,
        }

    def serve_fetch(self, topic: str) -> bytes:
        """The payload of a large retained message this node set (b"" when it has none)."""
        message = self._own_large.get(topic) or self.store.get(topic)
        return message.payload if message is not None else b""


class WillRegistry:
    """Pending wills in etcd; the leader publishes the wills of dead nodes exactly once."""

    def __init__(self, meta, publish: Callable[[Message], object], sweep_interval: float = 1.0) -> None:
        self.meta = meta
        self.publish = publish
        self.node_id = meta.node_id
        self.prefix = meta.prefix + "wills/"
        self.sweep_interval = sweep_interval
        self._mine: dict[str, bytes] = {}  # client -> the value this node wrote (and still holds)
        self._local_only: set[str] = set()  # wills too large to share: this node alone publishes them
        self._orphaned: dict[str, float] = {}  # key -> when its owner was first seen dead
        self._mirror: PrefixMirror | None = None
        self._sweeper: gevent.Greenlet | None = None
        self._wake = Event()
        self.published = 0
        self.lost_races = 0

    def start(self) -> None:
        self._mirror = PrefixMirror(
            self.meta.client, self.prefix, lambda k, kv, old: self._wake.set(), name="wills"
        )
        self._mirror.start()
        for key, kv in self._mirror.items.items():  # ours from before a restart: still ours to claim
            try:
                body = json.loads(kv["value"])
            except ValueError:
                continue
            if body.get("node") == self.node_id:
                self._mine[key[len(self.prefix) :]] = kv["value"]
        self.meta.on_members(lambda members: self._wake.set())
        self.meta.on_leadership(lambda leader: self._wake.set())
        self._sweeper = gevent.spawn(self._sweep_loop)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.kill(block=True, timeout=5)
        if self._mirror is not None:
            self._mirror.stop()

    def key(self, client_id: str) -> str:
        return self.prefix + client_id

    def put(self, client_id: str, message: Message, delay: float = 0.0) -> bool:
        """Record the pending will of a session this node owns; False when it is too large to share."""
        value = encode_entry(self.node_id, message, True, delay=delay)
        if len(value) > MAX_WILL_BYTES:
            log.warning("will_not_replicated", extra={"client_id": client_id, "bytes": len(value)})
            self._local_only.add(client_id)
            return False
        self.meta.client.put(self.key(client_id), value)
        self._mine[client_id] = value
        self._local_only.discard(client_id)
        return True

    def cancel(self, client_id: str) -> bool:
        """The session ended cleanly or its will changed hands: delete our entry only."""
        self._local_only.discard(client_id)
        value = self._mine.pop(client_id, None)
        if value is None:
            return False
        ok, _ = self.meta.client.txn(
            [cmp_value(self.key(client_id), value)], [op_delete(self.key(client_id))]
        )
        return ok

    def claim(self, client_id: str) -> bool:
        """Before this node publishes a will itself: True when this node may publish it (it deleted its
        own entry now, or the will was too large to share); False when it is not in etcd under this
        node any more (the leader published it while this node was taken for dead, or it never was)."""
        if client_id in self._local_only:
            self._local_only.discard(client_id)
            return True
        value = self._mine.pop(client_id, None)
        if value is None:
            return False
        ok, _ = self.meta.client.txn(
            [cmp_value(self.key(client_id), value)], [op_delete(self.key(client_id))]
        )
        if not ok:
            self.lost_races += 1
        return ok

    def _sweep_loop(self) -> None:
        while True:
            self._wake.wait(self.sweep_interval)
            self._wake.clear()
            if not self.meta.is_leader:
                self._orphaned.clear()
                continue
            try:
                self.sweep()
            except ClusterError as exc:
                log.warning("will_sweep_failed", extra={"error": str(exc)})

    def sweep(self) -> int:
        """Publish the due wills of nodes that are not live; returns how many this call published.
        Safe to run on several nodes at once: each will is published by the one delete that wins."""
        live = self.meta.members()
        now = time.monotonic()
        done = 0
        for key, kv in list(self._mirror.items.items()):
            try:
                body, message = decode_entry(kv["value"])
            except ValueError:
                continue
            if body.get("node") in live:
                self._orphaned.pop(key, None)
                continue
            since = self._orphaned.setdefault(key, now)
            if now - since < float(body.get("delay", 0) or 0):
                continue
            ok, _ = self.meta.client.txn([cmp_mod(key, kv["mod_revision"])], [op_delete(key)])
            self._orphaned.pop(key, None)
            if not ok:
                self.lost_races += 1
                continue
            log.info(
                "will_published_for_dead_node",
                extra={
                    "node": body.get("node"),
                    "client_id": key[len(self.prefix) :],
                    "topic": message.topic,
                },
            )
            self.published += 1
            done += 1
            try:
                self.publish(message)
            except Exception:
                log.exception("will_publish_failed")
        return done
