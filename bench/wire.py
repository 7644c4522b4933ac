"""MQTT 3.1.1 wire helpers for the load generator: pre-encoded packets and stream readers.

The generator needs very little of MQTT: it encodes CONNECT, SUBSCRIBE, PINGREQ, DISCONNECT and
PUBACK once, builds one PUBLISH template per publisher (only packet id, sequence number and send
time are patched per message), and reads PUBLISH, PUBACK, CONNACK, SUBACK and PINGRESP.

Reading is the generator's hot path, so it is isolated behind :func:`make_reader`: ``"python"``
is a pure-Python scanner with a fast path for runs of same-shaped PUBLISH packets, ``"codec"``
drives the project's Cython ``fluxmq._core.codec.Decoder``.  Both return the same events (see
:class:`PythonReader`), so switching is one argument.

Payload layout (shared with ``shared/tools/mqttload.c``, so either tool can read the other's
messages): ``u32 publisher id | u32 seq | u64 send time (ns, CLOCK_MONOTONIC)`` little-endian,
then filler up to the payload size (>= 16 bytes).
"""

from __future__ import annotations

import struct
from typing import Any

CONNECT, CONNACK, PUBLISH, PUBACK, SUBACK, PINGRESP = 1, 2, 3, 4, 9, 13

PAYLOAD_HEAD = struct.Struct("<IIQ")  # publisher id, seq, send time ns
MIN_PAYLOAD = PAYLOAD_HEAD.size
PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"
_PUBACK_HEAD = b"\x40\x02"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        if n:
            out.append(b | 128)
        else:
            out.append(b)
            return bytes(out)


def _str(s: str) -> bytes:
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


def encode_connect(client_id: str, keepalive: int = 60, clean: bool = True) -> bytes:
    """A 3.1.1 CONNECT packet without will, username or password."""
    body = _str("MQTT") + bytes([4, 0x02 if clean else 0]) + keepalive.to_bytes(2, "big") + _str(client_id)
    return b"\x10" + _varint(len(body)) + body


def encode_subscribe(packet_id: int, topic_filter: str, qos: int) -> bytes:
    """A SUBSCRIBE packet with one filter."""
    body = packet_id.to_bytes(2, "big") + _str(topic_filter) + bytes([qos])
    return b"\x82" + _varint(len(body)) + body


def encode_puback(packet_id: int) -> bytes:
    """A PUBACK packet."""
    return _PUBACK_HEAD + packet_id.to_bytes(2, "big")


class PublishTemplate:
    """One pre-encoded PUBLISH; ``block(n)`` returns ``n`` back-to-back copies to patch in place.

    Offsets: ``off_pid`` (QoS > 0 only) is the big-endian packet id, ``off_seq`` the u32 seq
    followed by the u64 send time.
    """

    __slots__ = ("data", "length", "off_pid", "off_seq", "qos", "_block")

    def __init__(self, topic: str, qos: int, size: int, publisher_id: int) -> None:
        if size < MIN_PAYLOAD:
            raise ValueError(f"payload size must be >= {MIN_PAYLOAD}")
        t = _str(topic)
        rl = len(t) + (2 if qos else 0) + size
        head = bytes([0x30 | (qos << 1)]) + _varint(rl) + t
        self.off_pid = len(head) if qos else -1
        pid = b"\x00\x01" if qos else b""
        payload = bytearray(b"x" * size)
        PAYLOAD_HEAD.pack_into(payload, 0, publisher_id, 0, 0)
        self.off_seq = len(head) + len(pid) + 4
        self.data = head + pid + bytes(payload)
        self.length = len(self.data)
        self.qos = qos
        self._block = bytearray()

    def block(self, n: int) -> bytearray:
        """A fresh bytearray holding ``n`` copies of the packet (cached prefix, sliced)."""
        need = n * self.length
        if len(self._block) < need:
            self._block = bytearray(self.data * max(n, 2 * len(self._block) // self.length))
        return self._block[:need]


class PythonReader:
    """Pure-Python MQTT stream reader; any split of the stream gives the same events.

    ``feed(data)`` returns a list of event tuples:

    - ``(PUBLISH, qos, packet_id, publisher_id, seq, send_ns)``; ``publisher_id`` is -1 when the
      payload is shorter than 16 bytes (not one of ours);
    - ``(CONNACK, return_code)``, ``(SUBACK, first_return_code)``, ``(PUBACK, packet_id)``,
      ``(PINGRESP, 0)``, and ``(type, 0)`` for anything else.

    Raises ``ValueError`` on a malformed remaining length.
    """

    __slots__ = ("_buf", "_runs")

    def __init__(self) -> None:
        self._buf = b""
        self._runs: dict[bytes, tuple[struct.Struct, int, int]] = {}

    def _run(self, buf: bytes, off: int, n: int, out: list[tuple]) -> int:
        """Fast path: a run of same-shaped PUBLISH packets (same header, topic and length, as one
        publisher's stream is) unpacked with one ``Struct.iter_unpack``; returns the new offset."""
        h = buf[off]
        rl = buf[off + 1]
        if rl >= 128 or h & 0xF9 != 0x30 or n - off < 4:  # not a short QoS 0/1 PUBLISH
            return off
        qos = (h >> 1) & 3
        tl = (buf[off + 2] << 8) | buf[off + 3]
        hl = 4 + tl  # fixed header + topic
        plen = 2 + rl
        if plen - hl - (2 if qos else 0) < 16 or n - off < 2 * plen:
            return off
        head = buf[off : off + hl]
        shape = self._runs.get(head)
        if shape is None:
            fmt = f"<{hl}s{'2s' if qos else ''}IIQ{plen - hl - (2 if qos else 0) - 16}x"
            shape = (struct.Struct(fmt), qos, plen)
            if len(self._runs) > 64:
                self._runs.clear()
            self._runs[head] = shape
        st, qos, plen = shape
        cnt = (n - off) // plen
        end = off + cnt * plen
        append = out.append
        if qos:
            for hd, pid, pub, seq, ts in st.iter_unpack(memoryview(buf)[off:end]):
                if hd != head:
                    break
                append((3, qos, (pid[0] << 8) | pid[1], pub, seq, ts))
                off += plen
        else:
            for hd, pub, seq, ts in st.iter_unpack(memoryview(buf)[off:end]):
                if hd != head:
                    break
                append((3, 0, 0, pub, seq, ts))
                off += plen
        return off

    def feed(self, data: bytes) -> list[tuple]:
        """Decode every complete packet in the buffered bytes plus ``data``."""
        buf = self._buf + data if self._buf else data
        n = len(buf)
        off = 0
        out: list[tuple] = []
        append = out.append
        unpack_from = PAYLOAD_HEAD.unpack_from
        if n >= 64:
            off = self._run(buf, 0, n, out)
        while n - off >= 2:
            h = buf[off]
            b = buf[off + 1]
            i = off + 2
            if b < 128:
                rl = b
            else:
                rl = b & 127
                mul = 128
                while True:
                    if i >= n:
                        rl = -1
                        break
                    b = buf[i]
                    i += 1
                    rl += (b & 127) * mul
                    if b < 128:
                        break
                    mul *= 128
                    if mul > 2097152:
                        raise ValueError("malformed remaining length")
                if rl < 0:
                    break
            end = i + rl
            if end > n:
                break
            t = h >> 4
            if t == 3:
                qos = (h >> 1) & 3
                p = i + 2 + ((buf[i] << 8) | buf[i + 1])
                pid = 0
                if qos:
                    pid = (buf[p] << 8) | buf[p + 1]
                    p += 2
                if end - p >= 16:
                    pub, seq, ts = unpack_from(buf, p)
                    append((3, qos, pid, pub, seq, ts))
                else:
                    append((3, qos, pid, -1, 0, 0))
            elif t == 4:
                append((4, (buf[i] << 8) | buf[i + 1]))
            elif t == 2:
                append((2, buf[i + 1] if rl >= 2 else -1))
            elif t == 9:
                append((9, buf[i + 2] if rl >= 3 else -1))
            else:
                append((t, 0))
            off = end
            if t == 3 and n - off >= 64:
                off = self._run(buf, off, n, out)
        self._buf = buf[off:] if off < n else b""
        return out


class CodecReader:
    """Reader on the project's Cython codec (``fluxmq._core.codec.Decoder``); same events."""

    __slots__ = ("_dec",)

    def __init__(self) -> None:
        from fluxmq._core.codec import Decoder  # noqa: PLC0415 - optional, only when chosen

        self._dec = Decoder(version=4)

    def feed(self, data: bytes) -> list[tuple]:
        """Decode every complete packet in the buffered bytes plus ``data``."""
        out: list[tuple] = []
        append = out.append
        unpack_from = PAYLOAD_HEAD.unpack_from
        for pkt in self._dec.feed(data):
            t = pkt.type
            if t == 3:
                pl = pkt.payload
                if len(pl) >= 16:
                    pub, seq, ts = unpack_from(pl)
                    append((3, pkt.qos, pkt.packet_id, pub, seq, ts))
                else:
                    append((3, pkt.qos, pkt.packet_id, -1, 0, 0))
            elif t == 4:
                append((4, pkt.packet_id))
            elif t == 2:
                append((2, pkt.reason_code))
            elif t == 9:
                codes = pkt.reason_codes
                append((9, codes[0] if codes else -1))
            else:
                append((t, 0))
        return out


def codec_available() -> bool:
    """True when ``fluxmq._core.codec.Decoder`` can be imported."""
    try:
        from fluxmq._core.codec import Decoder  # noqa: F401, PLC0415
    except Exception:  # ImportError, or a half-built extension
        return False
    return True


def make_reader(kind: str = "python") -> Any:
    """The stream reader for ``kind``: ``"python"`` (default) or ``"codec"``.

    This is the one switch between the pure-Python reader and the project's Cython codec.  The
    default is the pure-Python one because on the generator's streams (long runs of same-shaped
    PUBLISH packets, which its fast path unpacks with one ``Struct.iter_unpack``) it measured
    ~180 ns per message against ~490 ns through ``Decoder.feed`` (which builds a ``Publish``
    object, decodes and validates the topic, and copies the payload of each message).
    """
    if kind == "codec":
        return CodecReader()
    if kind == "python":
        return PythonReader()
    raise ValueError(f"unknown reader {kind!r} (python, codec)")


def resolve_reader_kind(kind: str) -> str:
    """The reader name as reported (validated)."""
    if kind not in ("python", "codec"):
        raise ValueError(f"unknown reader {kind!r} (python, codec)")
    return kind
