"""Durable queues across the workers of one node, and across the nodes of a cluster: each queue
has one owner, the others reach it.

``fluxmq.queues.placement`` names the owning worker of each queue (on a cluster, a worker of its
owning node: ``fluxmq.cluster.queue_nodes``). The owner holds the queue as a single worker does
(log, consumer groups, pending deliveries, visibility timeouts, redelivery, DLQ, retention, in its
storage shard); ``RemoteQueues`` is what the others use to reach it, over the cluster transport
(control calls on the same Unix sockets as the forwarded batches between the workers of a node,
gRPC between nodes; "worker" below is any such member):

* **Appends and settlements.** A ``$queue/...`` PUBLISH on a worker that does not own the queue
  (an append, or a ``$ack``/``$nack``/``$reject``) is an op to the owner; ``Broker.publish``
  returns a ``HeldAck`` that resolves once the owner has *committed* it (``Broker.wait_committed``
  there), so the publisher's PUBACK/PUBREC means stored. A refusal comes back as the owner's
  QueueRefused (5.0: its reason code; 3.1.1: disconnected); an owner that does not answer (down,
  restarting) is a refusal too, never an acknowledgement.
* **Remote members.** A consumer subscribing on a worker that does not own the queue is joined to
  the owner's group as a member whose session is a ``WorkerMemberSession`` (as
  ``fluxmq.replication.distribution.RemoteSession`` is for a Raft leader's members on other nodes).
  The owner's group decides what goes to it, with the usual windows; each delivery (the record's
  topic, payload and properties with the delivery's user properties: message-id, group-id, queue,
  offset, delivery-count) is sent to the member's worker, which sends the PUBLISH to its client.
  The client's PUBACK (an auto-ack, or a 5.0 negative one), its ``$ack``/``$nack``/``$reject``, its
  UNSUBSCRIBE and its connection's end go back to the owner as ops. A delivery the member's worker
  could not send comes back in its answer: not now (the client's window; the member is passed
  over for BACK_OFF), or never (``REFUSED``: over the client's Maximum Packet Size; the group
  offers it to another member or sets it aside, as for a member of its own).
* **Liveness.** Every RECONCILE seconds a worker tells each owner the memberships it holds there;
  the owner makes that worker's members match (a member lost when the owner restarted joins again;
  one the worker no longer has leaves). Members of a worker not heard from for SILENCE seconds, or
  whose worker cannot be reached with a delivery, leave: what they held is delivered again (at
  least once). A worker restarted under its index comes back with a new epoch: its old members
  leave at its first op.

Everything waiting is bounded: ops per owner (MAX_OPS, MAX_OP_BYTES; past them an append is
refused with 0x97) and deliveries per member (its window, the queue's ``max_inflight``).
"""

from __future__ import annotations

import json
import logging
import struct
import time
from collections import deque

import gevent
from gevent.event import AsyncResult

from fluxmq._core.codec import Decoder
from fluxmq.auth.limits import LogGate
from fluxmq.broker.held import HeldAck, wait_held
from fluxmq.broker.message import WIRE_V5_QOS1, Message, TrackedMessage
from fluxmq.broker.prefixes import is_settlement
from fluxmq.broker.session import REFUSED
from fluxmq.errors import QueueRefused, StorageError
from fluxmq.queues.remote import RemoteMemberSession
from fluxmq.storage.records import decode_message, encode_message

log = logging.getLogger("fluxmq.cluster.queues")

OPS_KIND = "queue.ops"  # a worker -> the owner: appends, settlements, joins, leaves, PUBACKs
DELIVER_KIND = "queue.deliver"  # the owner -> a member's worker: deliveries
#: ops waiting for one owner (past them an append is refused with 0x97 "quota exceeded")
MAX_OPS = 10_000
MAX_OP_BYTES = 64 << 20
#: ops sent in one call
BATCH_OPS = 1024
#: seconds an op call may take before its ops are refused (the owner is down or hung)
CALL_TIMEOUT = 5.0
#: how often a worker sends each owner the memberships it holds there
RECONCILE = 1.0
#: an owner drops the members of a worker it has not heard from for this long
SILENCE = 3.5
#: a member whose worker could not take a delivery (its client's window) is passed over this long
BACK_OFF = 0.2
#: while a stranded queue's owner is away, its wait is logged once per queue this often (seconds)
WAIT_LOG_INTERVAL = 30.0
_LEN = struct.Struct(">I")


def _encode_ops(ops) -> bytes:
    """A batch of ops: their headers as one JSON list, then each op's blob length-prefixed."""
    headers = []
    out = bytearray()
    for header, blob in ops:
        headers.append(header)
        out += _LEN.pack(len(blob))
        out += blob
    h = json.dumps(headers, separators=(",", ":")).encode()
    return _LEN.pack(len(h)) + h + out


def _decode_ops(data: bytes):
    (hl,) = _LEN.unpack_from(data, 0)
    headers = json.loads(data[4 : 4 + hl])
    i = 4 + hl
    for header in headers:
        (bl,) = _LEN.unpack_from(data, i)
        yield header, data[i + 4 : i + 4 + bl]
        i += 4 + bl


class ForwardedDelivery(TrackedMessage):
    """A delivery of another worker's queue, as its owner encoded it for MQTT 5.0 (the PUBLISH a
    5.0 consumer gets as it is; a 3.1.1 one gets topic and payload): its ``properties`` are decoded
    from that encoding only when something asks for them (a consumer with topic aliases)."""

    __slots__ = ()

    @property
    def properties(self) -> dict | None:
        try:
            return _PROPERTIES.__get__(self)
        except AttributeError:
            props = Decoder(0, 5).feed(self.wire_cache[WIRE_V5_QOS1])[0].properties or None
            _PROPERTIES.__set__(self, props)
            return props

    @properties.setter
    def properties(self, value) -> None:
        _PROPERTIES.__set__(self, value)


_PROPERTIES = Message.__dict__["properties"]


def forwarded_delivery(topic: str, data: bytes, payload_len: int, settle, ticket) -> ForwardedDelivery:
    d = object.__new__(ForwardedDelivery)
    d.topic = topic
    d.payload = data[len(data) - payload_len :] if payload_len else b""
    d.qos = 1
    d.retain = False
    d.expires_at = None
    d.origin = None
    d.wire_cache = {WIRE_V5_QOS1: data}
    d.settle = settle
    d.ticket = ticket
    return d


#: the owner's answer to a publish it took without effect (a settlement that found nothing)
NOT_ROUTED = {"ok": 0}


def _refusal(result) -> QueueRefused | None:
    if isinstance(result, dict) and "err" in result:
        exc = QueueRefused(result["err"], result.get("code", 0x80))
        exc.unreachable = bool(result.get("down"))  # the owner did not answer (not its refusal)
        if result.get("user"):  # e.g. a replicated queue's ``leader`` under write_policy reject
            exc.user_properties = [tuple(p) for p in result["user"]]
        return exc
    return None


def _refused(exc: QueueRefused) -> dict:
    """The owner's refusal as an op result (its user properties go with it)."""
    out = {"err": str(exc), "code": exc.reason_code}
    user = getattr(exc, "user_properties", None)
    if user:
        out["user"] = [list(p) for p in user]
    return out


class OpLink:
    """The ops from this worker to one other worker, sent in order with one call in flight; each
    op's callback gets the other side's result (or a refusal when the call failed)."""

    def __init__(self, transport, node: str, kind: str) -> None:
        self.transport = transport
        self.node = node
        self.kind = kind
        self.ops: deque = deque()  # (header, blob, callback or None)
        self.bytes = 0
        self._sender = None
        self.refused = 0  # ops refused at the bounds (MAX_OPS, MAX_OP_BYTES)
        self.failed = 0  # ops whose call failed (the other worker down, restarting or hung)

    def submit(self, header: list, blob: bytes = b"", callback=None, bounded: bool = True) -> bool:
        """Queue one op; False (nothing queued) when the bounds are reached and ``bounded``."""
        if bounded and (len(self.ops) >= MAX_OPS or self.bytes + len(blob) > MAX_OP_BYTES):
            self.refused += 1
            return False
        self.ops.append((header, blob, callback))
        self.bytes += len(blob)
        if self._sender is None:
            self._sender = gevent.spawn(self._run)
        return True

    def request(self, header: list, blob: bytes = b"", timeout: float = CALL_TIMEOUT + 1.0):
        """Send one op and wait for its result (in a greenlet, never the hub)."""
        done = AsyncResult()
        if not self.submit(header, blob, done.set):
            raise QueueRefused(f"worker {self.node}: too many queue operations waiting", 0x97)
        try:
            return done.get(timeout=timeout)
        except gevent.Timeout:
            exc = QueueRefused(f"worker {self.node} did not answer within {timeout}s", 0x80)
            exc.unreachable = True
            raise exc from None

    def _run(self) -> None:
        try:
            while self.ops:
                batch = []
                size = 0
                while self.ops and len(batch) < BATCH_OPS and size < (4 << 20):
                    op = self.ops.popleft()
                    batch.append(op)
                    size += len(op[1])
                self.bytes -= size
                try:
                    reply = self.transport.call(
                        self.node, self.kind, _encode_ops((h, b) for h, b, _cb in batch), CALL_TIMEOUT
                    )
                    results = json.loads(reply)
                except Exception as exc:
                    log.info(
                        "queue_ops_not_delivered",
                        extra={"peer": self.node, "ops": len(batch), "error": str(exc)},
                    )
                    self.failed += len(batch)
                    results = [
                        {"err": f"worker {self.node} is not reachable: {exc}", "code": 0x80, "down": 1}
                    ] * len(batch)
                for (_h, _b, cb), result in zip(batch, results, strict=False):
                    if cb is not None:
                        try:
                            cb(result)
                        except Exception:
                            log.exception("queue_op_callback_failed")
        finally:
            self._sender = None


class WorkerMemberSession(RemoteMemberSession):
    """The session side of a member connected to another worker, as the owner's groups see it:
    ``send_tracked`` sends the delivery to that worker (``RemoteQueues._deliver``). One per client
    of that worker: the manager keeps its memberships as a local session's."""

    __slots__ = ("rq", "epoch", "outstanding", "inflight", "on_room", "blocked_until", "filters")

    def __init__(self, rq: RemoteQueues, node: str, epoch: int, client_id: str, send_quota: int) -> None:
        super().__init__(node, client_id, send_quota)
        self.rq = rq
        self.epoch = epoch
        self.outstanding: dict[tuple[str, str, int], tuple] = {}  # (queue, group, offset) -> (settle, ticket)
        self.inflight: dict = {}  # the manager's session_gone looks (nothing of it is here)
        self.on_room = None
        self.blocked_until = 0.0
        self.filters: dict[str, tuple] = {}  # filter -> (qos, user properties, version) as joined

    def can_take_tracked(self) -> bool:
        return (
            self.alive
            and len(self.outstanding) < self.send_quota
            and (not self.blocked_until or time.monotonic() >= self.blocked_until)
        )

    def send_tracked(self, message) -> int:
        if not self.can_take_tracked():
            return 0
        return self.rq._deliver(self, message)

    def __repr__(self) -> str:
        return f"WorkerMemberSession({self.client_id!r} on {self.node})"


class RemoteQueues:
    """Both sides of the queues of one worker's node: the carrier to the owners of the queues this
    worker does not own (``QueueManager.remote``), and the owner's handling of the other workers'
    ops (see the module docstring)."""

    def __init__(self, broker, transport, node_id: str, epoch: int, member=None) -> None:
        """``member(index)``: the member id of worker ``index`` (``w{i}``; ``n1/w{i}`` on a cluster node)."""
        self.member = member or (lambda index: f"w{index}")
        self.broker = broker
        self.transport = transport
        self.node_id = node_id
        self.epoch = epoch
        self.placement = None  # the manager's QueuePlacement (attach)
        self.links: dict[str, OpLink] = {}  # node -> ops to it (this worker's side)
        self.deliver_links: dict[str, OpLink] = {}  # node -> deliveries to it (the owner's side)
        # this worker's side: session -> {filter: (owner, group, auto_ack, qos, user props, version)}
        self.joined: dict[object, dict[str, tuple]] = {}
        # the owner's side: (node, client id) -> its session here; node -> (epoch, last heard)
        self.members: dict[tuple[str, str], WorkerMemberSession] = {}
        self.heard: dict[str, tuple[int, float]] = {}
        self._loop = None
        self._wait_gate = LogGate(WAIT_LOG_INTERVAL, max_keys=1000)  # queue_move_waiting per queue
        transport.handle(OPS_KIND, self._serve_ops)
        transport.handle(DELIVER_KIND, self._serve_deliveries)

    def attach(self, manager) -> None:
        """This worker's QueueManager reaches the queues it does not own through here."""
        self.placement = manager.placement
        if manager.placement is not None:
            manager.remote = self
            if self.nodes is not None:
                self._place(manager)

    nodes = None  # a cluster's QueueNodes (place_on_nodes)

    def place_on_nodes(self, nodes) -> None:
        """A cluster with etcd (``fluxmq.cluster.queue_nodes``): each queue is owned by one node,
        this worker's queues included. Called once etcd answers; the queues this process loaded
        (configured, or found stored) are claimed for this node, and those another node owns are
        stranded (never served here; their records move to the owner: ``move_stranded``)."""
        self.nodes = nodes
        nodes.owners.on_change.append(self._owner_changed)
        manager = self.broker.queues
        if manager is not None:
            self.attach(manager)  # (made before the cluster started: configured or stored queues)

    def _owner_changed(self, name: str, was: str, now: str | None) -> None:
        """Queue ``name``'s owning node changed (an operator reassigned it: ``QueueOwners.reassign``,
        here or on another node; the watch tells every node). The queues of it this worker served
        are stranded as at start (never served here again, nor captured; their unsettled records
        move to the new owner, the memberships of this worker's clients join its groups). Owned
        here now: what this worker still holds stranded of it is served again (``unstrand``; by the
        mover once a batch on its way is settled), and a configured queue is made (capturing
        from now on). Memberships held here for the old owner follow (``_tick``)."""
        manager = self.broker.queues
        placement = self.placement
        if manager is None or placement is None or placement.nodes is None:
            return
        try:
            mine = [n for n in manager.queues if placement.source(n) == name and not placement.owns(n)]
            if mine:
                manager.move_away({n: now or "-" for n in mine})
                self.move_stranded()
            for n in [n for n in manager.stranded if placement.source(n) == name and placement.owns(n)]:
                manager.unstrand(n)
            for n in manager.configs:
                if (
                    placement.source(n) == name
                    and n not in manager.queues
                    and n not in manager.stranded  # (a batch on its way: the mover serves it)
                    and placement.owns(n)
                ):
                    manager.queue(n, create=True)
        except QueueRefused as exc:  # the new owner cannot be known now (etcd): the next change again
            log.warning("queue_owner_unknown", extra={"queue": name, "error": str(exc)})

    def _place(self, manager) -> None:
        placement = manager.placement
        placement.nodes = self.nodes
        elsewhere = {}
        for name in list(manager.queues):
            try:
                node = placement.owner_node(name)  # claims it for this node when nobody owns it
            except QueueRefused as exc:
                log.warning("queue_owner_unknown", extra={"queue": name, "error": str(exc)})
                continue
            if node is not None:
                elsewhere[name] = node
        if elsewhere:
            manager.strand(elsewhere)

    def start(self) -> None:
        self._loop = gevent.spawn(self._run)

    def stop(self) -> None:
        if self.nodes is not None and self._owner_changed in self.nodes.owners.on_change:
            self.nodes.owners.on_change.remove(self._owner_changed)
        if self._loop is not None:
            self._loop.kill(block=False)
            self._loop = None
        if self._moving is not None:
            self._moving.kill(block=False)
            self._moving = None

    _moving = None

    def move_stranded(self) -> None:
        """The queues of this worker's shard that another worker owns (the worker count changed
        since they were stored): their unsettled records go to the owner, each batch deleted here
        once the owner has stored it (a crash in between: moved twice, at least once)."""
        manager = self.broker.queues
        if manager is not None and manager.stranded and self._moving is None:
            self._moving = gevent.spawn(self._move, manager)

    def _waiting(self, name: str, owner: str, error: str) -> None:
        """A stranded queue's owner is away: logged at the first wait, then once per
        WAIT_LOG_INTERVAL with the waits since (the move tries again every second)."""
        waits = self._wait_gate.let_through(name)
        if waits is not None:
            log.info(
                "queue_move_waiting",
                extra={"queue": name, "owner": owner, "error": error, "waits": waits + 1},
            )

    def _move(self, manager) -> None:
        names = list(manager.stranded)
        for name in names:
            moved = 0
            owner = None
            while name in manager.stranded:
                try:
                    if manager.owns(name):  # given back to this node meanwhile: served here again
                        manager.unstrand(name)
                        break
                    owner = self._owner(name)
                except QueueRefused as exc:  # its node is down: again until it is back
                    self._waiting(name, "-", str(exc))
                    gevent.sleep(1.0)
                    continue
                records = manager.take_stranded(name)
                if not records:
                    manager.drop_stranded(name, [])
                    break
                results: list = []
                done = AsyncResult()

                def collect(result, results=results, done=done, n=len(records)) -> None:
                    results.append(result)
                    if len(results) == n:
                        done.set()

                link = self._link(owner)
                for rec in records:
                    link.submit(["m", self.epoch, name], encode_message(rec.message), collect, bounded=False)
                done.wait(CALL_TIMEOUT * 2)
                failed = [r for r in results if _refusal(r) is not None]
                if failed or len(results) < len(records):
                    manager.keep_stranded(name)
                    self._waiting(name, owner, (failed or [{}])[0].get("err", "no answer"))
                    gevent.sleep(1.0)  # the owner is not up yet: again (the same records)
                    continue
                manager.drop_stranded(name, records)
                moved += len(records)
                try:
                    self.broker.wait_committed()
                except StorageError:
                    pass
            if moved or name not in manager.queues:  # (else served here again: queue_unstranded)
                log.info("queue_moved", extra={"queue": name, "owner": owner or "-", "records": moved})
        self._moving = None
        if any(name not in names for name in manager.stranded):  # stranded meanwhile (an owner changed)
            self.move_stranded()

    def _owner(self, name: str) -> str:
        """The member id of the worker owning queue ``name`` (of another node on a cluster: raises
        QueueRefused when that node is not available)."""
        placement = self.placement
        if placement.nodes is not None:
            node = placement.owner_node(name)
            if node is not None:
                return placement.nodes.member(node, placement.dlq_of.get(name, name))
        return self.member(placement.owner(name))

    def _last_owner(self, name: str) -> str | None:
        """On a cluster, the member last known to own queue ``name`` while its node is down (its
        node id when never seen: the reconcile corrects it once the node is back); else None."""
        placement = self.placement
        if placement.nodes is None:
            return None
        try:
            node = placement.owner_node(name)
        except QueueRefused:
            return None
        if node is None:
            return None
        return placement.nodes.last_member(node, placement.dlq_of.get(name, name))

    def _link(self, node: str) -> OpLink:
        link = self.links.get(node)
        if link is None:
            link = self.links[node] = OpLink(self.transport, node, OPS_KIND)
        return link

    # -- this worker's side: QueueManager.remote ---------------------------------------------------

    def publish(self, name: str, message: Message, origin=None) -> HeldAck:
        """An append or a settlement for queue ``name``, owned by another worker."""
        held = HeldAck()

        def done(result) -> None:
            if result == NOT_ROUTED:
                # the owner's settlement found nothing to settle: answered as a local one is (5.0:
                # 0x10), never as a confirmed $ack (HeldAck: a code below 0x80 is an ack)
                held.resolve(QueueRefused(f"queue {name}: no delivery of that message to settle here", 0x10))
                return
            held.resolve(_refusal(result))

        client_id = origin.client_id if origin is not None else ""
        owner = self._owner(name)
        if not self._link(owner).submit(["p", self.epoch, client_id], encode_message(message), done):
            raise QueueRefused(f"queue {name}: too many operations waiting for its worker {owner}", 0x97)
        return held

    def subscribe(
        self, session, filter: str, qos: int, user_props: list | None, version: int, rejoin: bool = False
    ) -> int:
        """Join the owner's group (waits for its answer; raises its QueueRefused). ``rejoin``: a
        resumed session's membership (no SUBACK to refuse): while the owner does not answer it is
        kept here, and the reconcile joins it once the owner is back."""
        name = filter[len("$queue/") :].partition("/")[0]
        try:
            owner = self._owner(name)
        except QueueRefused:
            owner = self._last_owner(name) if rejoin else None
            if owner is None:
                raise
        header = [
            "j",
            self.epoch,
            session.client_id,
            filter,
            qos,
            [list(p) for p in user_props or ()],
            version,
            session.send_quota or 0,
        ]
        props = dict(user_props or ())
        group = props.get("consumer-group") or session.client_id
        auto_ack = version != 5 or props.get("auto-ack", "").lower() == "true"
        # Registered before the owner answers: its first deliveries may arrive ahead of its answer.
        mine = self.joined.setdefault(session, {})
        before = mine.get(filter)
        mine[filter] = (owner, group, auto_ack, qos, user_props, version)
        try:
            refused = _refusal(self._link(owner).request(header))
        except QueueRefused as exc:
            refused = exc
        if refused is not None and rejoin and getattr(refused, "unreachable", False):
            log.info(
                "queue_member_waiting",
                extra={"client_id": session.client_id, "filter": filter, "owner": owner},
            )
            return 1
        if refused is not None:
            if before is not None:
                mine[filter] = before
            else:
                mine.pop(filter, None)
                if not mine and self.joined.get(session) is mine:
                    del self.joined[session]
            raise refused
        return 1

    def unsubscribe(self, session, filter: str) -> bool:
        mine = self.joined.get(session)
        if not mine or filter not in mine:
            return False
        owner = mine.pop(filter)[0]
        if not mine:
            del self.joined[session]
        self._link(owner).submit(["u", self.epoch, session.client_id, filter], bounded=False)
        return True

    def session_gone(self, session) -> list[tuple]:
        """The session's connection ended: its memberships elsewhere end (what they held goes to
        other members); returns them as ``(filter, group, auto_ack)`` for a persistent session's
        rejoin."""
        mine = self.joined.pop(session, None)
        if not mine:
            return []
        for owner in {v[0] for v in mine.values()}:
            self._link(owner).submit(["g", self.epoch, session.client_id], bounded=False)
        return [(f, v[1], v[2]) for f, v in mine.items()]

    def _settled(self, session, reason_code: int, ticket) -> None:
        """The client's PUBACK of a delivery from another worker's queue: to the owner."""
        owner, queue, group, offset = ticket
        # bounded by the client's window (never refused: a lost PUBACK would hold a window slot)
        self._link(owner).submit(
            ["a", self.epoch, session.client_id, queue, group, offset, reason_code], bounded=False
        )

    def _serve_deliveries(self, from_node: str, payload: bytes) -> bytes:
        """Deliveries from an owner to this worker's clients; per delivery True (sent) or False."""
        sessions = self.broker.sessions
        results = []
        for header, blob in _decode_ops(payload):
            _kind, client_id, queue, group, offset, topic, payload_len = header
            session = sessions.get(client_id)
            mine = self.joined.get(session) if session is not None else None
            if not mine or not any(v[0] == from_node for v in mine.values()):
                results.append(False)
                continue
            message = forwarded_delivery(
                topic, blob, payload_len, self._settled, (from_node, queue, group, offset)
            )
            pid = session.send_tracked(message)
            # True sent; False not now (its window, gone); REFUSED (-1): never to this client (over
            # its Maximum Packet Size, unencodable for it), so the owner's group never offers it again
            results.append(True if pid > 0 else REFUSED if pid == REFUSED else False)
        return json.dumps(results).encode()

    # -- the owner's side ----------------------------------------------------------------------------

    def _serve_ops(self, from_node: str, payload: bytes) -> bytes:
        results = []
        stored = []  # indexes of results an acknowledgement must wait for (the commit)
        held = []  # (index, HeldAck): replicated queues' appends and settlements (the quorum)
        for header, blob in _decode_ops(payload):
            try:
                result = self._apply(from_node, header, blob)
                if header[0] in ("p", "m"):
                    stored.append(len(results))
                if result.__class__ is HeldAck:
                    held.append((len(results), result))
                    result = 1
                results.append({"ok": result})
            except QueueRefused as exc:
                results.append(_refused(exc))
            except Exception as exc:
                log.exception("queue_op_failed", extra={"peer": from_node, "op": header[0]})
                results.append({"err": f"{type(exc).__name__}: {exc}", "code": 0x80})
        for i, h in held:
            error = wait_held(h)
            if error is not None:
                if not isinstance(error, QueueRefused):
                    error = QueueRefused(str(error), 0x80)
                results[i] = _refused(error)
        if stored:
            try:
                self.broker.wait_committed()  # acknowledged means stored
            except StorageError as exc:
                for i in stored:
                    results[i] = {"err": f"not stored: {exc}", "code": 0x80}
        return json.dumps(results).encode()

    def _check_epoch(self, node: str, epoch: int) -> None:
        """A worker restarted under its index (a new epoch): its members of before leave."""
        heard = self.heard.get(node)
        if heard is not None and heard[0] != epoch:
            for key in [k for k in self.members if k[0] == node]:
                self._drop(self.members[key])
        self.heard[node] = (epoch, time.monotonic())

    def _apply(self, node: str, header: list, blob: bytes):
        kind, epoch = header[0], header[1]
        self._check_epoch(node, epoch)
        manager = self.broker._queue_manager()
        if kind == "p":
            topic, body, qos, retain, props, expires_at, origin = decode_message(blob)
            client_id = header[2]
            session = self.members.get((node, client_id)) if client_id else None
            if session is None and client_id and is_settlement(topic):
                # a client no member here (it left, or its worker's members were dropped: what they
                # held went to others): its settlement is a client's, which settles only a delivery
                # its member holds (ReplicatedGroup.ack), never one "from no client", by offset
                session = RemoteMemberSession(node, client_id, 0)
                session.alive = False
            result = manager.publish(Message(topic, body, qos, retain, props, expires_at, origin), session)
            # a replicated queue's HeldAck: waited for with the batch's others (_serve_ops), so
            # the appends of one batch travel in one Raft entry, not one entry (and commit) each.
            # 0: a settlement that found no delivery to settle (settled already, or dropped when a
            # new Raft leader's claim was applied, which delivers the record again): never answered
            # as a success, or worker 1's $ack would be confirmed and its record come back
            return result if result.__class__ is HeldAck else (1 if result else 0)
        if kind == "m":
            topic, body, qos, retain, props, expires_at, origin = decode_message(blob)
            return manager.adopt_record(
                header[2], Message(topic, body, qos, retain, props, expires_at, origin)
            )
        if kind == "a":
            _k, _e, client_id, queue, group, offset, reason_code = header
            session = self.members.get((node, client_id))
            if session is not None:
                entry = session.outstanding.pop((queue, group, offset), None)
                if entry is not None:
                    settle, ticket = entry
                    settle(session, reason_code, ticket)
            return 1
        if kind == "j":
            _k, _e, client_id, filter, qos, user_props, version, quota = header
            return self._join(
                node, epoch, client_id, filter, qos, [tuple(p) for p in user_props], version, quota
            )
        if kind == "u":
            session = self.members.get((node, header[2]))
            if session is not None:
                session.filters.pop(header[3], None)
                manager.unsubscribe(session, header[3])
                if not session.filters:
                    self._drop(session)
            return 1
        if kind == "g":
            session = self.members.get((node, header[2]))
            if session is not None:
                self._drop(session)
            return 1
        if kind == "r":
            self._reconcile(node, epoch, header[2])
            return 1
        raise QueueRefused(f"unknown queue op {kind!r}", 0x80)

    def _join(
        self,
        node: str,
        epoch: int,
        client_id: str,
        filter: str,
        qos: int,
        user_props: list,
        version: int,
        quota: int,
    ):
        manager = self.broker._queue_manager()
        key = (node, client_id)
        session = self.members.get(key)
        if session is None:
            session = self.members[key] = WorkerMemberSession(self, node, epoch, client_id, quota or 65535)
        try:
            manager.subscribe(session, filter, qos, user_props, version)
        except QueueRefused:
            if not session.filters:
                self._drop(session)
            raise
        session.filters[filter] = (qos, user_props, version)
        props = dict(user_props)
        group = props.get("consumer-group") or client_id
        auto_ack = version != 5 or props.get("auto-ack", "").lower() == "true"
        return [group, auto_ack]

    def _drop(self, session: WorkerMemberSession) -> None:
        """A member's worker no longer holds it: it leaves its groups, what it held goes again."""
        if self.members.get((session.node, session.client_id)) is session:
            del self.members[(session.node, session.client_id)]
        session.alive = False
        session.outstanding.clear()
        manager = self.broker.queues
        if manager is not None:
            manager.session_gone(session)

    def _reconcile(self, node: str, epoch: int, listed: list) -> None:
        """Make ``node``'s members here those it lists: [client id, filter, qos, user props, version, quota]."""
        want: dict[tuple[str, str], list] = {(cid, f): rest for cid, f, *rest in listed}
        for (n, cid), session in list(self.members.items()):
            if n != node:
                continue
            for f in list(session.filters):
                if (cid, f) not in want:
                    session.filters.pop(f, None)
                    self.broker.queues.unsubscribe(session, f)
            if not session.filters:
                self._drop(session)
        for (cid, f), (qos, user_props, version, quota) in want.items():
            session = self.members.get((node, cid))
            if session is not None and f in session.filters:
                continue
            try:
                self._join(node, epoch, cid, f, qos, [tuple(p) for p in user_props], version, quota)
                log.info("queue_member_rejoined", extra={"peer": node, "client_id": cid, "filter": f})
            except QueueRefused as exc:
                log.warning(
                    "queue_member_not_rejoined",
                    extra={"peer": node, "client_id": cid, "filter": f, "reason": str(exc)},
                )

    def _deliver(self, session: WorkerMemberSession, message) -> int:
        """Send one delivery of the owner's group to the member's worker."""
        queue, group, offset = message.identity()  # a fluxmq.queues.delivery.Delivery
        link = self.deliver_links.get(session.node)
        if link is None:
            link = self.deliver_links[session.node] = OpLink(self.transport, session.node, DELIVER_KIND)
        data = message.wire_cache[WIRE_V5_QOS1]  # its 5.0 PUBLISH, made once by build_delivery
        key = (queue, group, offset)

        def done(result, session=session, key=key) -> None:
            if result is not True:
                self._given_back(session, key, result)

        header = ["d", session.client_id, queue, group, offset, message.topic, len(message.payload)]
        if not link.submit(header, data, done):
            return 0
        ticket = message.ticket  # None: a work queue's delivery is its own ticket (queues.delivery)
        session.outstanding[key] = (message.settle, message if ticket is None else ticket)
        return 1

    def _given_back(self, session: WorkerMemberSession, key: tuple, result) -> None:
        """The member's worker did not send a delivery (its client has no room, it is gone, the
        worker is unreachable): the record goes to a member again. ``REFUSED``: its client can
        never take it; the group treats it as a local session's refusal (never offered to that
        member again: to another, or set aside), and the member is not backed off."""
        entry = session.outstanding.pop(key, None)
        if entry is None or not session.alive:
            return
        if isinstance(result, dict):  # the call failed: the worker is down or restarting
            log.info("queue_members_dropped", extra={"peer": session.node, "reason": result.get("err")})
            for s in [s for k, s in self.members.items() if k[0] == session.node]:
                self._drop(s)
            return
        manager = self.broker.queues
        q = manager.queues.get(key[0]) if manager is not None else None
        group = q.groups.get(key[1]) if q is not None else None
        if group is None:
            return
        offset = key[2]
        refused = result == REFUSED  # (True, False and a failed call's dict are not)
        if group.stream:
            m = group.sent.get(offset)
            if m is not None and m.session is session:
                group.sent.pop(offset)
                m.pending -= 1
                if refused:
                    group.refused_by(offset, m)
                elif offset < group.cursor:
                    group.cursor = offset
        else:
            p = group.pending.get(offset)
            if p is not None and p is entry[1]:
                group._release(offset)
                if refused:
                    group.refused_by(offset, p.member)
                    q.stats["delivered"] -= 1  # as a local refusal: never counted as delivered
                else:
                    group.avoid[offset] = p.member
                    group._push_ready(offset)
                # never reached the client: not a delivery (its count goes back)
                n = group.counts.get(offset, 0)
                if n > 0:
                    group.counts[offset] = n - 1
                    group._count_dirty.add(offset)
        if not refused:
            session.blocked_until = time.monotonic() + BACK_OFF
        manager.kick_soon(q)

    def state(self) -> dict[str, dict]:
        """Per other worker: ops waiting for it and refused or failed so far (this worker's side),
        and its clients that are members of this worker's queues (the owner's side)."""
        out: dict[str, dict] = {}
        for node in set(self.links) | set(self.deliver_links) | {k[0] for k in self.members}:
            ops, deliveries = self.links.get(node), self.deliver_links.get(node)
            out[node] = {
                "ops_waiting": len(ops.ops) if ops is not None else 0,
                "ops_refused": ops.refused if ops is not None else 0,
                "ops_failed": ops.failed if ops is not None else 0,
                "deliveries_failed": deliveries.failed if deliveries is not None else 0,
                "remote_members": sum(1 for k in self.members if k[0] == node),
            }
        return out

    # -- liveness ----------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            gevent.sleep(RECONCILE)
            try:
                self._tick()
            except Exception:
                log.exception("queue_reconcile_failed")

    def _follow_owners(self) -> None:
        """A cluster: a queue's owning node restarted with another worker count, so another of its
        workers owns the queue now, or an operator gave the queue to another node; the memberships
        held here for it go to the new owner (the reconcile joins them there), or join this worker's
        own groups when it is the owner now. A node that is down is waited for."""
        me = self.member(self.placement.index) if self.placement is not None else None
        for session, mine in list(self.joined.items()):
            for f, entry in list(mine.items()):
                name = f[len("$queue/") :].partition("/")[0]
                try:
                    owner = self._owner(name)
                except QueueRefused:
                    continue
                if owner == entry[0] or (owner == me and name in self.broker.queues.stranded):
                    continue  # (stranded still: a batch of it is on its way, then it is served here)
                log.info("queue_member_follows_owner", extra={"filter": f, "was": entry[0], "owner": owner})
                if owner != me:
                    mine[f] = (owner, *entry[1:])
                    continue
                del mine[f]
                if not mine and self.joined.get(session) is mine:
                    del self.joined[session]
                _owner, group, auto_ack, qos, _user, version = entry
                user = [("consumer-group", group), ("auto-ack", "true" if auto_ack else "false")]
                try:
                    self.broker.queues.subscribe(session, f, qos, user, version, rejoin=True)
                except QueueRefused as exc:
                    log.warning(
                        "queue_member_not_rejoined",
                        extra={"client_id": session.client_id, "filter": f, "reason": str(exc)},
                    )

    def _tick(self) -> None:
        if self.nodes is not None:
            self._follow_owners()
        # this worker's side: each owner learns the memberships held here
        by_owner: dict[str, list] = {}
        for session, mine in self.joined.items():
            for f, (owner, group, auto_ack, qos, _user, version) in mine.items():
                # a rejoin names the group and auto-ack only (never seeks a stream again)
                user = [["consumer-group", group], ["auto-ack", "true" if auto_ack else "false"]]
                by_owner.setdefault(owner, []).append(
                    [session.client_id, f, qos, user, version, session.send_quota or 0]
                )
        for owner in set(by_owner) | self._told:  # an owner told of members before hears of none now
            self._link(owner).submit(["r", self.epoch, by_owner.get(owner, [])], bounded=False)
        self._told = set(by_owner)
        # the owner's side: members of workers not heard from leave
        now = time.monotonic()
        for node, (_epoch, at) in list(self.heard.items()):
            if now - at > SILENCE:
                gone = [s for k, s in self.members.items() if k[0] == node]
                if gone:
                    log.info(
                        "queue_members_dropped",
                        extra={"peer": node, "members": len(gone), "reason": "not heard from"},
                    )
                for s in gone:
                    self._drop(s)

    _told: set = frozenset()
