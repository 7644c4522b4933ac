"""Packets written by hand for the protocol tests: the encoder refuses what some tests must send
(a topic with a wildcard, bad UTF-8, U+0000), and a frame built apart from the code under test
checks that code's bytes."""

from __future__ import annotations


def raw_publish(topic: bytes, payload: bytes, version: int = 4) -> bytes:
    """A QoS 0 PUBLISH (5.0: with an empty property block)."""
    body = len(topic).to_bytes(2, "big") + topic + (b"\x00" if version == 5 else b"") + payload
    n, length = len(body), b""
    while True:
        byte, n = n & 0x7F, n >> 7
        length += bytes((byte | (0x80 if n else 0),))
        if not n:
            return b"\x30" + length + body


def publish_packet(topic: str, payload: bytes, qos: int = 0, pid: int = 1) -> bytes:
    """A 3.1.1 PUBLISH of less than 128 bytes (packet id ``pid`` at QoS 1 and 2)."""
    t = topic.encode()
    body = len(t).to_bytes(2, "big") + t + (pid.to_bytes(2, "big") if qos else b"") + payload
    return bytes((0x30 | qos << 1, len(body))) + body
