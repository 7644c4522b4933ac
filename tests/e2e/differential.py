"""Raw MQTT wire helpers for the differential test against Mosquitto (test_differential_mosquitto.py).

Packets are written byte by byte (``tests._core.wire_builders``) and the broker's answers are
parsed here, independently of fluxmq's codec: a decoder shared with the broker under test could
hide the very differences the comparison looks for. Each answer is normalised to a tuple that keeps
what both brokers must agree on (packet type, flags, reason codes, packet ids, topic, payload,
QoS, retain, subscription identifiers) and drops what legitimately differs (assigned client ids,
reason strings, server keep alive and the CONNACK properties that announce capabilities).

A ``Wire`` reads up to a fence: after the packets of a step it sends PINGREQ and collects what
comes before the PINGRESP, or up to the close. Nothing waits for a fixed time.
"""

from __future__ import annotations

import contextlib
import socket
import time

from tests._core.wire_builders import frame, s, vbi

WAIT = 10.0
CLOSED = ("CLOSED",)

# -- builders (5.0 properties by identifier) ------------------------------------------------------

PAYLOAD_FORMAT = 0x01
CORRELATION = 0x09
SUBSCRIPTION_ID = 0x0B
SESSION_EXPIRY = 0x11
ASSIGNED_CLIENT_ID = 0x12
RECEIVE_MAXIMUM = 0x21
TOPIC_ALIAS_MAXIMUM = 0x22
TOPIC_ALIAS = 0x23
USER_PROPERTY = 0x26


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def props(*items: bytes) -> bytes:
    """A 5.0 property block (its length, then the properties built with ``prop``)."""
    data = b"".join(items)
    return vbi(len(data)) + data


def connect(
    client_id: str | bytes,
    version: int = 4,
    clean: bool = True,
    keepalive: int = 60,
    will: tuple | None = None,
    username: bytes | None = None,
    password: bytes | None = None,
    properties: bytes = b"",
    flags: int | None = None,
    name: bytes | None = None,
    will_properties: bytes = b"",
) -> bytes:
    """CONNECT; ``will`` is (topic, payload, qos, retain); ``flags`` overrides the computed byte."""
    cid = client_id.encode() if isinstance(client_id, str) else client_id
    if flags is None:
        flags = (0x02 if clean else 0) | (0x80 if username is not None else 0)
        flags |= 0x40 if password is not None else 0
        if will is not None:
            flags |= 0x04 | (will[2] << 3) | (0x20 if will[3] else 0)
    if name is None:
        name = b"MQIsdp" if version == 3 else b"MQTT"
    body = s(name) + bytes([version, flags]) + u16(keepalive)
    if version == 5:
        body += properties or b"\x00"
    body += s(cid)
    if will is not None:
        if version == 5:
            body += will_properties or b"\x00"
        body += s(will[0].encode()) + s(will[1])
    if username is not None:
        body += s(username)
    if password is not None:
        body += s(password)
    return frame(0x10, body)


def publish(
    topic: str | bytes,
    payload: bytes = b"",
    qos: int = 0,
    retain: bool = False,
    packet_id: int = 0,
    dup: bool = False,
    version: int = 4,
    properties: bytes = b"",
) -> bytes:
    """PUBLISH (the packet id field is written for QoS > 0, whatever its value)."""
    t = topic.encode() if isinstance(topic, str) else topic
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
    body = s(t) + (u16(packet_id) if qos else b"")
    if version == 5:
        body += properties or b"\x00"
    return frame(first, body + payload)


def ack(kind: int, packet_id: int, version: int = 4, reason: int | None = None) -> bytes:
    """PUBACK (4), PUBREC (5), PUBREL (6) or PUBCOMP (7)."""
    first = (kind << 4) | (0x02 if kind == 6 else 0)
    body = u16(packet_id)
    if version == 5 and reason is not None:
        body += bytes([reason])
    return frame(first, body)


def subscribe(
    packet_id: int, *subs: tuple, version: int = 4, properties: bytes = b"", first: int = 0x82
) -> bytes:
    """SUBSCRIBE; each of ``subs`` is (filter, options byte)."""
    body = u16(packet_id)
    if version == 5:
        body += properties or b"\x00"
    for filt, options in subs:
        body += s(filt.encode() if isinstance(filt, str) else filt) + bytes([options])
    return frame(first, body)


def unsubscribe(packet_id: int, *filters: str, version: int = 4, properties: bytes = b"") -> bytes:
    body = u16(packet_id)
    if version == 5:
        body += properties or b"\x00"
    for filt in filters:
        body += s(filt.encode())
    return frame(0xA2, body)


def disconnect(version: int = 4, reason: int = 0, properties: bytes = b"") -> bytes:
    if version < 5:
        return b"\xe0\x00"
    return frame(0xE0, bytes([reason]) + (properties or b"\x00"))


PINGREQ = b"\xc0\x00"

# -- the parser of the broker's answers ------------------------------------------------------------


def _read_vbi(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def _properties(data: bytes, at: int) -> tuple[list, int]:
    """The 5.0 properties at ``at`` as (identifier, value) pairs, and the offset after them."""
    length, at = _read_vbi(data, at)
    end = at + length
    out = []
    while at < end:
        pid = data[at]
        at += 1
        if pid in (0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A):
            value, at = data[at], at + 1
        elif pid in (0x13, 0x21, 0x22, 0x23):
            value, at = int.from_bytes(data[at : at + 2], "big"), at + 2
        elif pid in (0x02, 0x11, 0x18, 0x27):
            value, at = int.from_bytes(data[at : at + 4], "big"), at + 4
        elif pid == 0x0B:
            value, at = _read_vbi(data, at)
        elif pid == 0x26:
            n = int.from_bytes(data[at : at + 2], "big")
            k = data[at + 2 : at + 2 + n]
            at += 2 + n
            m = int.from_bytes(data[at : at + 2], "big")
            value, at = (k, data[at + 2 : at + 2 + m]), at + 2 + m
        else:  # strings and binary data
            n = int.from_bytes(data[at : at + 2], "big")
            value, at = data[at + 2 : at + 2 + n], at + 2 + n
        out.append((pid, value))
    return out, end


# Properties compared on a PUBLISH the broker sends (the others are timing or capability dependent).
COMPARED_PUBLISH_PROPERTIES = {PAYLOAD_FORMAT, 0x03, 0x08, CORRELATION, SUBSCRIPTION_ID, USER_PROPERTY}


def _strings(found: list, strings: bool) -> tuple:
    """With ``strings``: whether an acknowledgement carries a Reason String or User Property."""
    return (("strings", any(pid in (0x1F, USER_PROPERTY) for pid, _ in found)),) if strings else ()


def parse(first: int, body: bytes, version: int, strings: bool = False) -> tuple:
    """One packet from the broker as a normalised tuple (``strings``: see ``_strings``)."""
    kind = first >> 4
    v5 = version == 5
    if kind == 2:
        return ("CONNACK", body[0], body[1])
    if kind == 3:
        qos = (first >> 1) & 3
        n = int.from_bytes(body[:2], "big")
        topic = body[2 : 2 + n].decode("utf-8", "replace")
        at = 2 + n
        pid = None
        if qos:
            pid, at = int.from_bytes(body[at : at + 2], "big"), at + 2
        kept: tuple = ()
        if v5:
            found, at = _properties(body, at)
            kept = tuple(sorted(p for p in found if p[0] in COMPARED_PUBLISH_PROPERTIES))
            if any(p[0] == TOPIC_ALIAS for p in found):
                kept += (("alias",),)
        return ("PUBLISH", topic, body[at:], qos, bool(first & 1), bool(first & 8), pid, kept)
    if kind in (4, 5, 6, 7):
        name = {4: "PUBACK", 5: "PUBREC", 6: "PUBREL", 7: "PUBCOMP"}[kind]
        reason = body[2] if v5 and len(body) > 2 else 0
        found = _properties(body, 3)[0] if v5 and len(body) > 3 else []
        return (name, int.from_bytes(body[:2], "big"), reason, first & 0x0F, *_strings(found, strings))
    if kind in (9, 11):
        at = 2
        found = []
        if v5:
            found, at = _properties(body, at)
        codes = tuple(body[at:])
        name = "SUBACK" if kind == 9 else "UNSUBACK"
        return (name, int.from_bytes(body[:2], "big"), codes, *_strings(found, strings))
    if kind == 13:
        return ("PINGRESP",)
    if kind == 14:
        return ("DISCONNECT", body[0] if body else 0)
    return ("TYPE", kind, first & 0x0F, body)


class Wire:
    """One TCP connection to a broker: sends bytes, returns the normalised packets it answers."""

    def __init__(self, host: str, port: int, version: int = 4) -> None:
        self.version = version
        self.sock = socket.create_connection((host, port), timeout=WAIT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.closed = False
        self.connack: dict = {}  # the CONNACK properties by identifier (alias maximum, ...)
        self.pending: list = []  # parsed packets after a fence's PINGRESP
        self.strings = False  # record whether acknowledgements carry reason strings
        self.auto_ack = True  # acknowledge the PUBLISH / PUBREL packets the broker sends
        self._ordinal: dict[int, int] = {}  # broker-chosen packet id -> order of first use

    def send(self, *chunks: bytes) -> None:
        try:
            self.sock.sendall(b"".join(chunks))
        except OSError:
            self.closed = True

    def _packets(self) -> list:
        out = []
        while len(self.buffer) >= 2:
            try:
                length, at = _read_vbi(self.buffer, 1)
            except IndexError:
                break
            if len(self.buffer) < at + length:
                break
            first, body = self.buffer[0], self.buffer[at : at + length]
            self.buffer = self.buffer[at + length :]
            if first >> 4 == 2 and self.version == 5 and len(body) > 2:
                self.connack = dict(_properties(body, 2)[0])
            packet = self._normalise(parse(first, body, self.version, self.strings))
            if packet != ("AUTO",):
                out.append(packet)
        return out

    def _normalise(self, packet: tuple) -> tuple:
        """Acknowledge what the broker sends (when ``auto_ack``) and replace the packet ids the
        broker chose by their order of first use (each broker numbers its own way)."""
        kind = packet[0]
        if kind == "PUBLISH" and packet[3]:
            pid = packet[6]
            if self.auto_ack:
                self.send(ack(4 if packet[3] == 1 else 5, pid))
            ordinal = self._ordinal.setdefault(pid, len(self._ordinal) + 1)
            return (*packet[:6], f"#{ordinal}", packet[7])
        if kind == "PUBREL" and packet[1] in self._ordinal:
            if self.auto_ack:  # the answer to an automatic PUBREC: not recorded (its timing varies)
                self.send(ack(7, packet[1]))
                return ("AUTO",)
            return (kind, f"#{self._ordinal[packet[1]]}", *packet[2:])
        return packet

    def _read(self, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no answer from the broker within {WAIT}s")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if not data:
            self.closed = True
            return False
        self.buffer += data
        return True

    def step(self, *chunks: bytes, fence: bool = True) -> list:
        """Send ``chunks`` (then a PINGREQ fence) and return the packets answered before the
        PINGRESP, or all of them then CLOSED when the broker closes the connection."""
        if self.closed:
            return [CLOSED]
        self.send(*chunks, PINGREQ if fence else b"")
        deadline = time.monotonic() + WAIT
        got: list = []
        while True:
            self.pending.extend(self._packets())
            while self.pending:
                packet = self.pending.pop(0)
                if packet == ("PINGRESP",) and fence:
                    return got
                got.append(packet)
            if not self._read(deadline):
                got.extend(self._packets())
                return [*got, CLOSED]

    def until_closed(self) -> list:
        """Every packet until the broker closes the connection."""
        deadline = time.monotonic() + WAIT
        got: list = self.pending
        self.pending = []
        while not self.closed:
            got.extend(self._packets())
            if not self._read(deadline):
                break
        return [*got, *self._packets(), CLOSED]

    def drop(self) -> list:
        """End the connection without DISCONNECT (end of stream) and wait until the broker closed
        its side: by then it has handled the loss (will published, session kept or ended)."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        return self.until_closed()

    def real_id(self, ordinal: str) -> int:
        """The broker's packet id behind an ordinal (``#1``) of the transcript."""
        return next(pid for pid, n in self._ordinal.items() if f"#{n}" == ordinal)

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()
