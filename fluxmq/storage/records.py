"""Binary record formats of the storage layer: stable, versioned, compact; never pickle.

Every value starts with a one-byte format version (``FORMAT``); a reader refuses a version it does
not know. Multi-byte integers are little-endian, except in keys, where they are big-endian so that
LMDB's byte order is numeric order.

Message blob (retained messages, wills, queue and inflight entries)::

    u8 version | u8 flags | f64 expires_at (wall clock, 0 = none) | u16 topic_len | u16 origin_len
    | u32 props_len | u32 payload_len | topic | origin | properties | payload

``flags``: bits 0-1 the message QoS, bit 2 retain, bit 3 has expiry, bit 4 has origin. Properties
(the forwardable MQTT 5.0 ones a ``Message`` carries) are a sequence of ``u8 id | u8 kind | value``:
kind 0 int (u32), 1 str (u32 length + UTF-8), 2 bytes (u32 length + data), 3 list of (str, str)
pairs (u32 count, then length-prefixed pairs), 4 list of int (u32 count + u32 each).

The storage layer sits below the broker, so decoders return plain tuples; the broker builds its
``Message`` objects from them (``message_factory``).
"""

from __future__ import annotations

import struct
import sys
import time
from array import array
from typing import Any

from fluxmq._core import entry as _entry
from fluxmq._core import sent as _sent
from fluxmq.errors import StorageError

FORMAT = 1

_U32 = struct.Struct("<I")
_MSG = struct.Struct("<BBdHHII")
_ENTRY = struct.Struct("<BBBH")  # version, delivery qos, flags (retain, released), n subscription ids
# _ENTRY then _MSG for a message without properties or expiry: the constant part up to the topic
# length, by delivery QoS, delivery retain and message flags; then the lengths
_PLAIN_HEADS = tuple(
    tuple(
        tuple(_ENTRY.pack(FORMAT, q, r, 0) + struct.pack("<BBd", FORMAT, f, 0.0) for f in range(32))
        for r in range(2)
    )
    for q in range(3)
)
_PLAIN_LENS = struct.Struct("<HH4xI")  # topic, origin, properties (0) and payload lengths
_SESSION = struct.Struct("<BIdBH")  # version, expiry, disconnected_at (wall), flags, username length
_SUB = struct.Struct("<BBBBBI")  # version, qos, no_local, retain_as_published, retain_handling, sub id
_WILL = struct.Struct("<BI")  # version, delay
_SEQ = struct.Struct(">Q")
_PID = struct.Struct(">H")

_K_INT, _K_STR, _K_BYTES, _K_PAIRS, _K_INTS = range(5)

#: key under which an encoded message is cached in ``Message.wire_cache`` (fan-out encodes once)
CACHE_KEY = "storage.v1"
# keys of cached queue/inflight entries, by delivery QoS then retain flag
_ENTRY_CACHE_KEYS = tuple((("storage.entry", q, False), ("storage.entry", q, True)) for q in range(3))
_entry.configure(_PLAIN_HEADS, _ENTRY_CACHE_KEYS)
#: ``plain_entry(message, qos, retain)``: ``encode_entry`` without subscription ids or release, in
#: Cython; None when the message has properties or an expiry (then call ``encode_entry``)
plain_entry = _entry.plain_entry


class RecordError(StorageError):
    """A stored value cannot be decoded (damaged, or written by an unknown format version)."""


def _check_version(buf, what: str) -> None:
    if not buf or buf[0] != FORMAT:
        got = buf[0] if buf else "empty"
        raise RecordError(f"{what} record has format version {got}, this build reads {FORMAT}")


# -- keys ------------------------------------------------------------------------------------------


def client_prefix(client_id: str) -> bytes:
    """Key prefix of everything one client owns (client ids and filters never contain U+0000)."""
    return client_id.encode() + b"\x00"


def seq_key(prefix: bytes, seq: int) -> bytes:
    return prefix + _SEQ.pack(seq)


def sent_key(prefix: bytes, bucket: int) -> bytes:
    return prefix + _PID.pack(bucket)


def pid_key(prefix: bytes, packet_id: int) -> bytes:
    return prefix + _PID.pack(packet_id)


def split_key(key: bytes) -> tuple[str, bytes]:
    """``client_id + NUL + suffix`` -> (client_id, suffix)."""
    cid, _, rest = bytes(key).partition(b"\x00")
    return cid.decode(), rest


def key_seq(suffix: bytes) -> int:
    return _SEQ.unpack(suffix)[0]


def key_pid(suffix: bytes) -> int:
    return _PID.unpack(suffix)[0]


# -- properties ------------------------------------------------------------------------------------


def _encode_properties(props: dict) -> bytes:
    out = bytearray()
    for pid, value in props.items():
        if isinstance(value, bool) or isinstance(value, int):
            out += bytes((pid, _K_INT)) + _U32.pack(int(value))
        elif isinstance(value, str):
            data = value.encode()
            out += bytes((pid, _K_STR)) + _U32.pack(len(data)) + data
        elif isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
            out += bytes((pid, _K_BYTES)) + _U32.pack(len(data)) + data
        elif isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
            out += bytes((pid, _K_INTS)) + _U32.pack(len(value))
            for v in value:
                out += _U32.pack(v)
        elif isinstance(value, (list, tuple)):
            out += bytes((pid, _K_PAIRS)) + _U32.pack(len(value))
            for k, v in value:
                kb, vb = k.encode(), v.encode()
                out += _U32.pack(len(kb)) + kb + _U32.pack(len(vb)) + vb
        else:
            raise TypeError(f"property {pid:#x}: cannot store a {type(value).__name__}")
    return bytes(out)


def _decode_properties(buf) -> dict:
    props: dict[int, Any] = {}
    i, end = 0, len(buf)
    u32 = _U32.unpack_from
    while i < end:
        pid, kind = buf[i], buf[i + 1]
        i += 2
        if kind == _K_INT:
            props[pid] = u32(buf, i)[0]
            i += 4
        elif kind in (_K_STR, _K_BYTES):
            n = u32(buf, i)[0]
            data = bytes(buf[i + 4 : i + 4 + n])
            props[pid] = data.decode() if kind == _K_STR else data
            i += 4 + n
        elif kind == _K_INTS:
            n = u32(buf, i)[0]
            props[pid] = [u32(buf, i + 4 + 4 * j)[0] for j in range(n)]
            i += 4 + 4 * n
        elif kind == _K_PAIRS:
            n = u32(buf, i)[0]
            i += 4
            pairs = []
            for _ in range(n):
                kn = u32(buf, i)[0]
                k = bytes(buf[i + 4 : i + 4 + kn]).decode()
                i += 4 + kn
                vn = u32(buf, i)[0]
                v = bytes(buf[i + 4 : i + 4 + vn]).decode()
                i += 4 + vn
                pairs.append((k, v))
            props[pid] = pairs
        else:
            raise RecordError(f"unknown property kind {kind}")
    if i != end:
        raise RecordError("truncated properties")
    return props


# -- messages --------------------------------------------------------------------------------------


def encode_message(message) -> bytes:
    """The blob of a message-like object (``topic payload qos retain properties expires_at origin``).

    The monotonic expiry deadline is stored as wall-clock time, so it keeps counting across a
    restart. The result is cached in ``message.wire_cache`` when the message has one.
    """
    cache = message.wire_cache
    if cache is not None:
        blob = cache.get(CACHE_KEY)
        if blob is not None:
            return blob
    topic = message.topic.encode()
    origin = message.origin.encode() if message.origin else b""
    props = _encode_properties(message.properties) if message.properties else b""
    payload = message.payload
    flags = message.qos | (4 if message.retain else 0) | (16 if message.origin else 0)
    expires = 0.0
    if message.expires_at is not None:
        flags |= 8
        expires = time.time() + (message.expires_at - time.monotonic())
    blob = b"".join(
        (
            _MSG.pack(FORMAT, flags, expires, len(topic), len(origin), len(props), len(payload)),
            topic,
            origin,
            props,
            payload,
        )
    )
    if cache is None:
        message.wire_cache = {CACHE_KEY: blob}
    else:
        cache[CACHE_KEY] = blob
    return blob


def decode_message(buf, offset: int = 0) -> tuple:
    """(topic, payload, qos, retain, properties, expires_at, origin) from a blob; ``expires_at`` is
    a monotonic deadline again (possibly already passed)."""
    if len(buf) - offset < _MSG.size or buf[offset] != FORMAT:
        raise RecordError("message record is truncated or has an unknown format version")
    _, flags, expires, tlen, olen, plen, paylen = _MSG.unpack_from(buf, offset)
    i = offset + _MSG.size
    if i + tlen + olen + plen + paylen != len(buf):
        raise RecordError("message record length does not match its header")
    topic = bytes(buf[i : i + tlen]).decode()
    i += tlen
    origin = bytes(buf[i : i + olen]).decode() if flags & 16 else None
    i += olen
    props = _decode_properties(buf[i : i + plen]) if plen else None
    i += plen
    payload = bytes(buf[i : i + paylen])
    expires_at = time.monotonic() + (expires - time.time()) if flags & 8 else None
    return topic, payload, flags & 3, bool(flags & 4), props, expires_at, origin


# -- queue and inflight entries --------------------------------------------------------------------


def encode_entry(message, qos: int, retain: bool, subscription_ids, released: bool = False) -> bytes:
    """A delivery of a message to one session: its QoS, retain flag and subscription ids.

    Without subscription ids the entry is cached in ``message.wire_cache`` per (QoS, retain), so a
    fan-out to many persistent sessions encodes it once."""
    if not subscription_ids and not released:
        entry = plain_entry(message, qos, retain)  # cached, or a plain message (Cython)
        if entry is not None:
            return entry
        key = _ENTRY_CACHE_KEYS[qos][1 if retain else 0]
        cache = message.wire_cache
        if cache is None:
            cache = message.wire_cache = {}
        else:
            entry = cache.get(key)
            if entry is not None:
                return entry
        if message.properties or message.expires_at is not None:
            entry = _ENTRY.pack(FORMAT, qos, 1 if retain else 0, 0) + encode_message(message)
        else:  # the common message: the headers up to the lengths are constants
            topic = message.topic.encode()
            payload = message.payload
            origin = message.origin
            flags = message.qos | (4 if message.retain else 0)
            if origin:
                origin = origin.encode()
                flags |= 16
            else:
                origin = b""
            entry = b"".join(
                (
                    _PLAIN_HEADS[qos][1 if retain else 0][flags],
                    _PLAIN_LENS.pack(len(topic), len(origin), len(payload)),
                    topic,
                    origin,
                    payload,
                )
            )
        cache[key] = entry
        return entry
    ids = subscription_ids or ()
    head = _ENTRY.pack(FORMAT, qos, (1 if retain else 0) | (2 if released else 0), len(ids))
    if ids:
        head += struct.pack(f"<{len(ids)}I", *ids)
    return head + encode_message(message)


def entry_qos(buf) -> int:
    """The delivery QoS of an entry, read without decoding the rest."""
    return buf[1]


def decode_entry(buf) -> tuple:
    """(message_fields, qos, retain, subscription_ids or None, released)."""
    _check_version(buf, "queue/inflight")
    _, qos, flags, n = _ENTRY.unpack_from(buf, 0)
    i = _ENTRY.size
    ids = struct.unpack_from(f"<{n}I", buf, i) if n else None
    i += 4 * n
    return decode_message(memoryview(buf)[i:]), qos, bool(flags & 1), ids, bool(flags & 2)


def check_entry(buf) -> int:
    """Check an entry's framing (versions, lengths) without decoding its strings or properties; returns
    its delivery QoS. Raises RecordError. A session hand-over passes stored entries on this way."""
    n_buf = len(buf)
    if n_buf < _ENTRY.size or buf[0] != FORMAT:
        raise RecordError("queue/inflight record is truncated or has an unknown format version")
    _, qos, _flags, n = _ENTRY.unpack_from(buf, 0)
    i = _ENTRY.size + 4 * n
    if qos > 2 or n_buf - i < _MSG.size or buf[i] != FORMAT:
        raise RecordError("queue/inflight record is damaged")
    _, _, _, tlen, olen, plen, paylen = _MSG.unpack_from(buf, i)
    if i + _MSG.size + tlen + olen + plen + paylen != n_buf:
        raise RecordError("message record length does not match its header")
    return qos


def mark_released(buf) -> bytes:
    """The same entry with its QoS 2 released flag set (PUBREC received, PUBREL sent)."""
    data = bytearray(buf)
    data[2] |= 2
    return bytes(data)


# -- sent marks: queue entries in flight ---------------------------------------------------------

#: packet ids per ``sent`` record (key ``client_id NUL u16 packet_id // SENT_SLOTS``)
SENT_SLOTS = 16
_SENT_SIZE = 1 + 8 * SENT_SLOTS
_SWAP = sys.byteorder != "little"


def sent_slots() -> array:
    """The in-memory form of one ``sent`` record: SENT_SLOTS u64, 0 = free, else
    ``(seq + 1) << 1 | released``."""
    return array("Q", bytes(8 * SENT_SLOTS))


def encode_sent(slots: array) -> bytes:
    """``u8 version | SENT_SLOTS x u64 little-endian`` (see ``sent_slots``)."""
    if _SWAP:
        slots = array("Q", slots)
        slots.byteswap()
    return bytes((FORMAT,)) + slots.tobytes()


def decode_sent(buf) -> array:
    _check_version(buf, "sent")
    if len(buf) != _SENT_SIZE:
        raise RecordError("sent record has the wrong length")
    slots = array("Q")
    slots.frombytes(bytes(buf[1:]))
    if _SWAP:
        slots.byteswap()
    return slots


# -- segments and done marks: a session's queue entries, one record per commit (schema 4) --------

#: first byte of a segment (an entry's first byte is its FORMAT, 1): the entries a session stored in
#: one commit, seqs ``key seq .. key seq + count - 1``
SEGMENT = 0x81
_SEG = struct.Struct("<BI")  # SEGMENT, count; then count x u32 entry lengths, then the entries
_DONE = struct.Struct("<BQI")  # version, floor, number of ranges; then ranges as u64 pairs

# The C commit (``_core.sent.SentTable.take_ops``) writes sent, segment and done records as laid out here.
_sent.configure(sent_slots, FORMAT, SEGMENT, SENT_SLOTS)


def encode_segment(entries: list) -> bytes:
    """``SEGMENT | u32 count | count x u32 length | entries`` (lengths little-endian)."""
    lens = array("I", map(len, entries))
    if _SWAP:
        lens.byteswap()
    return _SEG.pack(SEGMENT, len(entries)) + lens.tobytes() + b"".join(entries)


def segment(lens: array, entries: list) -> bytes:
    """``encode_segment`` with the entries' lengths given (``array("I")``)."""
    if _SWAP:
        lens = array("I", lens)
        lens.byteswap()
    return _SEG.pack(SEGMENT, len(entries)) + lens.tobytes() + b"".join(entries)


def record_span(buf) -> int:
    """How many seqs a ``queue`` record holds: 1 for a single entry (schema 3), else its count."""
    if buf[0] != SEGMENT:
        return 1
    if len(buf) < _SEG.size:
        raise RecordError("queue segment is truncated")
    return _SEG.unpack_from(buf, 0)[1]


def record_entries(buf) -> list:
    """The entries of a ``queue`` record (a single entry or a segment), as memoryviews of ``buf``."""
    view = memoryview(buf)
    if not buf or buf[0] != SEGMENT:
        return [view]
    n = record_span(buf)
    i = _SEG.size
    end = i + 4 * n
    if len(buf) < end:
        raise RecordError("queue segment is truncated")
    lens = array("I")
    lens.frombytes(bytes(view[i:end]))
    if _SWAP:
        lens.byteswap()
    out = []
    for size in lens:
        out.append(view[end : end + size])
        end += size
    if end != len(buf):
        raise RecordError("queue segment length does not match its header")
    return out


def encode_done(floor: int, ranges: list) -> bytes:
    """A session's done queue seqs: every seq below ``floor`` and in each ``[start, end)`` range."""
    flat = array("Q", [x for rng in ranges for x in rng])
    if _SWAP:
        flat.byteswap()
    return _DONE.pack(FORMAT, floor, len(ranges)) + flat.tobytes()


def decode_done(buf) -> tuple[int, list]:
    _check_version(buf, "done")
    if len(buf) < _DONE.size:
        raise RecordError("done record is truncated")
    _, floor, n = _DONE.unpack_from(buf, 0)
    if len(buf) != _DONE.size + 16 * n:
        raise RecordError("done record has the wrong length")
    flat = array("Q")
    flat.frombytes(bytes(buf[_DONE.size :]))
    if _SWAP:
        flat.byteswap()
    return floor, [(flat[i], flat[i + 1]) for i in range(0, 2 * n, 2)]


# -- sessions, subscriptions, wills ----------------------------------------------------------------


def encode_session(expiry: int, disconnected_at: float, username: str | None) -> bytes:
    user = username.encode() if username is not None else b""
    return _SESSION.pack(FORMAT, expiry, disconnected_at, 1 if username is not None else 0, len(user)) + user


def decode_session(buf) -> tuple[int, float, str | None]:
    """(expiry_interval, disconnected_at wall time or 0 when it was online, username)."""
    _check_version(buf, "session")
    _, expiry, disconnected_at, flags, ulen = _SESSION.unpack_from(buf, 0)
    user = bytes(buf[_SESSION.size : _SESSION.size + ulen]).decode() if flags & 1 else None
    return expiry, disconnected_at, user


def encode_subscription(
    qos: int, no_local: bool, retain_as_published: bool, retain_handling: int, subscription_id: int
) -> bytes:
    return _SUB.pack(FORMAT, qos, int(no_local), int(retain_as_published), retain_handling, subscription_id)


def decode_subscription(buf) -> tuple[int, bool, bool, int, int]:
    """(qos, no_local, retain_as_published, retain_handling, subscription_id)."""
    _check_version(buf, "subscription")
    _, qos, nl, rap, rh, sid = _SUB.unpack_from(buf, 0)
    return qos, bool(nl), bool(rap), rh, sid


def encode_will(message, delay: int) -> bytes:
    return _WILL.pack(FORMAT, delay) + encode_message(message)


def decode_will(buf) -> tuple[tuple, int]:
    """(message_fields, delay)."""
    _check_version(buf, "will")
    _, delay = _WILL.unpack_from(buf, 0)
    return decode_message(memoryview(buf)[_WILL.size :]), delay
