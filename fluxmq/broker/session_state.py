"""SessionState: the complete state of one session as a versioned binary blob (never pickle).

A session that moves to another node of a cluster (``Broker.export_session`` there,
``Broker.import_session`` here) travels in this format. It sits beside the broker rather than in
``fluxmq.cluster`` because the broker encodes and decodes it and never imports the cluster package;
``fluxmq.cluster.handover`` re-exports it. Messages reuse the storage record formats
(``storage/records.py``: ``encode_entry`` for queue and inflight entries, ``encode_message`` for
the will), so a message keeps every property, its expiry and its origin.

Layout (integers little-endian)::

    b"FXSS" | u8 version | u8 flags | u32 expiry_interval | f64 disconnected_at (wall, 0 = online)
    | u16 next_packet_id | u32 will_delay | str16 client_id | [str16 username]
    | u32 n_subs   { str16 filter | u8 qos | u8 options | u32 subscription_id | str16+1 share_group }
    | u32 n_inflight { u16 packet_id | u32 len | entry (released flag inside) }
    | u32 n_inbound  { u16 packet_id }
    | u32 n_queued   { u32 len | entry }
    | [u32 len | will message]
    | [u32 n_queue_members { str16 filter | str16 group | u8 auto_ack }]

``flags``: bit 0 has username, bit 1 has will, bit 2 a connection was attached at export, bit 3
has durable-queue memberships (a persistent session's, rejoined when its client attaches).
``options``: bit 0 No Local, bit 1 Retain As Published, bits 2-3 Retain Handling. ``str16+1``: a
u16 length plus one (0 = None) then UTF-8. A reader refuses a version it does not know and any
trailing or missing byte.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from fluxmq.errors import FluxMQError
from fluxmq.storage import records as r

from .message import Message

MAGIC = b"FXSS"
VERSION = 1

_HEAD = struct.Struct("<4sBBIdHI")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_SUB = struct.Struct("<BBI")

_F_USERNAME, _F_WILL, _F_CONNECTED, _F_QUEUES = 1, 2, 4, 8


class SessionStateError(FluxMQError):
    """A session state blob cannot be decoded (damaged, or written by an unknown version)."""


@dataclass
class SubscriptionState:
    """One subscription with every option."""

    filter: str
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0
    subscription_id: int = 0
    share_group: str | None = None


@dataclass
class InflightState:
    """One outbound QoS 1/2 message awaiting its acknowledgement (``released``: PUBREL sent)."""

    packet_id: int
    message: Message
    qos: int
    retain: bool
    subscription_ids: tuple | None = None
    released: bool = False


@dataclass
class QueuedState:
    """One queued delivery, in queue order."""

    message: Message
    qos: int
    retain: bool
    subscription_ids: tuple | None = None


@dataclass
class SessionState:
    """Everything a session holds that must survive a move to another node."""

    client_id: str
    username: str | None = None
    expiry_interval: int = 0
    disconnected_at: float = 0.0  # wall-clock time it went offline; 0.0 when it was online
    connected: bool = False  # a connection was attached when the state was taken
    next_packet_id: int = 1
    subscriptions: list[SubscriptionState] = field(default_factory=list)
    inflight: list[InflightState] = field(default_factory=list)  # in resend order
    inbound_qos2: list[int] = field(default_factory=list)  # received, PUBREC sent, PUBREL pending
    # in queue order; an item may also be an encoded entry (bytes, ``records.encode_entry``) as a
    # persistent session's queue stores it: passed through without decoding (``raw_queue``)
    queued: list[QueuedState | bytes] = field(default_factory=list)
    will: tuple[Message, int] | None = None  # (message, delay)
    # durable-queue memberships (filter, consumer group, auto-ack) it rejoins when it attaches
    queue_members: list[tuple[str, str, bool]] = field(default_factory=list)


def _str16(text: str) -> bytes:
    data = text.encode()
    if len(data) > 0xFFFF:
        raise ValueError("string longer than 65,535 bytes")
    return _U16.pack(len(data)) + data


def encode_session_state(state: SessionState) -> bytes:
    """The blob of ``state`` (see the module docstring)."""
    flags = 0
    if state.username is not None:
        flags |= _F_USERNAME
    if state.will is not None:
        flags |= _F_WILL
    if state.connected:
        flags |= _F_CONNECTED
    if state.queue_members:
        flags |= _F_QUEUES
    will_delay = state.will[1] if state.will is not None else 0
    out = [
        _HEAD.pack(
            MAGIC,
            VERSION,
            flags,
            state.expiry_interval,
            state.disconnected_at,
            state.next_packet_id,
            will_delay,
        ),
        _str16(state.client_id),
    ]
    if state.username is not None:
        out.append(_str16(state.username))
    out.append(_U32.pack(len(state.subscriptions)))
    for sub in state.subscriptions:
        options = (
            (1 if sub.no_local else 0)
            | (2 if sub.retain_as_published else 0)
            | ((sub.retain_handling & 3) << 2)
        )
        out.append(_str16(sub.filter))
        out.append(_SUB.pack(sub.qos, options, sub.subscription_id))
        if sub.share_group is None:
            out.append(_U16.pack(0))
        else:
            group = sub.share_group.encode()
            out.append(_U16.pack(len(group) + 1) + group)
    out.append(_U32.pack(len(state.inflight)))
    for entry in state.inflight:
        blob = r.encode_entry(entry.message, entry.qos, entry.retain, entry.subscription_ids, entry.released)
        out.append(_U16.pack(entry.packet_id) + _U32.pack(len(blob)))
        out.append(blob)
    out.append(_U32.pack(len(state.inbound_qos2)))
    out.extend(_U16.pack(pid) for pid in state.inbound_qos2)
    out.append(_U32.pack(len(state.queued)))
    for item in state.queued:
        if isinstance(item, bytes):
            blob = item
        else:
            blob = r.encode_entry(item.message, item.qos, item.retain, item.subscription_ids)
        out.append(_U32.pack(len(blob)))
        out.append(blob)
    if state.will is not None:
        blob = r.encode_message(state.will[0])
        out.append(_U32.pack(len(blob)))
        out.append(blob)
    if state.queue_members:
        out.append(_U32.pack(len(state.queue_members)))
        for filter, group, auto_ack in state.queue_members:
            out.append(_str16(filter) + _str16(group) + (b"\x01" if auto_ack else b"\x00"))
    return b"".join(out)


class _Reader:
    __slots__ = ("buf", "i")

    def __init__(self, buf) -> None:
        self.buf = memoryview(buf)
        self.i = 0

    def take(self, n: int) -> memoryview:
        i = self.i
        if n < 0 or i + n > len(self.buf):
            raise SessionStateError("session state is truncated")
        self.i = i + n
        return self.buf[i : i + n]

    def unpack(self, st: struct.Struct) -> tuple:
        return st.unpack(self.take(st.size))

    def u16(self) -> int:
        return _U16.unpack(self.take(2))[0]

    def u32(self) -> int:
        return _U32.unpack(self.take(4))[0]

    def str16(self) -> str:
        return bytes(self.take(self.u16())).decode()

    def count(self, item_size: int) -> int:
        """A u32 item count, checked against the bytes left (a damaged count never allocates)."""
        n = self.u32()
        if n * item_size > len(self.buf) - self.i:
            raise SessionStateError("session state is truncated")
        return n


def _message(fields: tuple) -> Message:
    return Message(*fields)


def queued_item(item: QueuedState | bytes) -> QueuedState:
    """A queued item decoded (an encoded entry of ``raw_queue`` is decoded now)."""
    if isinstance(item, QueuedState):
        return item
    try:
        fields, qos, retain, ids, _ = r.decode_entry(item)
    except (struct.error, UnicodeDecodeError, r.RecordError, IndexError, ValueError) as exc:
        raise SessionStateError(f"session state is damaged: {exc}") from None
    return QueuedState(_message(fields), qos, retain, ids)


def decode_session_state(buf, raw_queue: bool = False) -> SessionState:
    """The ``SessionState`` of a blob; raises SessionStateError when it is not a valid one.

    With ``raw_queue`` the queued messages stay encoded entries (bytes, framing checked): a
    persistent session stores them as they are, without decoding and encoding each again."""
    try:
        return _decode(buf, raw_queue)
    except SessionStateError:
        raise
    except (struct.error, UnicodeDecodeError, r.RecordError, IndexError, ValueError) as exc:
        raise SessionStateError(f"session state is damaged: {exc}") from None


def _decode(buf, raw_queue: bool) -> SessionState:
    rd = _Reader(buf)
    if len(rd.buf) < _HEAD.size:
        raise SessionStateError("session state is truncated")
    magic, version, flags, expiry, disconnected_at, next_pid, will_delay = rd.unpack(_HEAD)
    if magic != MAGIC:
        raise SessionStateError("not a session state")
    if version != VERSION:
        raise SessionStateError(f"session state has version {version}, this build reads {VERSION}")
    state = SessionState(
        rd.str16(),
        expiry_interval=expiry,
        disconnected_at=disconnected_at,
        connected=bool(flags & _F_CONNECTED),
        next_packet_id=next_pid,
    )
    if flags & _F_USERNAME:
        state.username = rd.str16()
    for _ in range(rd.count(2 + _SUB.size + 2)):
        filter = rd.str16()
        qos, options, sub_id = rd.unpack(_SUB)
        glen = rd.u16()
        group = bytes(rd.take(glen - 1)).decode() if glen else None
        state.subscriptions.append(
            SubscriptionState(
                filter, qos, bool(options & 1), bool(options & 2), (options >> 2) & 3, sub_id, group
            )
        )
    for _ in range(rd.count(6)):
        pid = rd.u16()
        fields, qos, retain, ids, released = r.decode_entry(bytes(rd.take(rd.u32())))
        state.inflight.append(InflightState(pid, _message(fields), qos, retain, ids, released))
    state.inbound_qos2 = [rd.u16() for _ in range(rd.count(2))]
    queued = state.queued
    for _ in range(rd.count(4)):
        entry = bytes(rd.take(rd.u32()))
        if raw_queue:
            r.check_entry(entry)
            queued.append(entry)
        else:
            fields, qos, retain, ids, _ = r.decode_entry(entry)
            queued.append(QueuedState(_message(fields), qos, retain, ids))
    if flags & _F_WILL:
        state.will = (_message(r.decode_message(bytes(rd.take(rd.u32())))), will_delay)
    if flags & _F_QUEUES:
        for _ in range(rd.count(5)):
            filter, group = rd.str16(), rd.str16()
            state.queue_members.append((filter, group, bool(rd.take(1)[0])))
    if rd.i != len(rd.buf):
        raise SessionStateError("session state has trailing bytes")
    return state
