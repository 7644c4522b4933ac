"""MQTT packets written byte by byte for the decoder tests (independent of the encoder under test)."""

from __future__ import annotations

import pytest

from fluxmq._core.codec import (
    AUTH,
    CONNACK,
    CONNECT,
    DISCONNECT,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    Decoder,
)
from fluxmq.errors import MQTTError
from tests._core.codec_strategies import WILL


def vbi(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def s(text: bytes) -> bytes:
    """A length-prefixed UTF-8 string or binary field."""
    return len(text).to_bytes(2, "big") + text


def frame(first: int, body: bytes) -> bytes:
    return bytes([first]) + vbi(len(body)) + body


def block(*props: bytes) -> bytes:
    """A property block: its length, then the properties."""
    data = b"".join(props)
    return vbi(len(data)) + data


def prop(pid: int, value: bytes) -> bytes:
    return bytes([pid]) + value


def connect_v(
    level: int = 4, flags: int = 0x02, tail: bytes = s(b"cid"), name: bytes | None = None, props: bytes = b""
) -> bytes:
    if name is None:
        name = b"MQIsdp" if level == 3 else b"MQTT"
    return frame(0x10, s(name) + bytes([level, flags]) + b"\x00\x3c" + props + tail)


SAMPLE_VALUE = {
    "bool": b"\x01",
    "u16": b"\x00\x07",
    "u16nz": b"\x00\x07",
    "u32": b"\x00\x00\x00\x07",
    "u32nz": b"\x00\x00\x00\x07",
    "subid": b"\x07",
    "str": s(b"x"),
    "bin": s(b"x"),
    "pairs": s(b"k") + s(b"v"),
}


def with_properties(kind, props: bytes) -> bytes:
    """A minimal 5.0 packet of ``kind`` whose property block is ``props`` (WILL: the Will Properties)."""
    builders = {
        WILL: lambda: connect_v(5, 0x06, b"\x00" + s(b"cid") + props + s(b"w/t") + s(b"msg")),
        CONNECT: lambda: connect_v(5, 0x02, s(b"cid"), props=props),
        CONNACK: lambda: frame(0x20, b"\x00\x00" + props),
        PUBLISH: lambda: frame(0x30, s(b"t") + props + b"payload"),
        PUBACK: lambda: frame(0x40, b"\x00\x01\x10" + props),
        PUBREC: lambda: frame(0x50, b"\x00\x01\x10" + props),
        PUBREL: lambda: frame(0x62, b"\x00\x01\x92" + props),
        PUBCOMP: lambda: frame(0x70, b"\x00\x01\x92" + props),
        SUBSCRIBE: lambda: frame(0x82, b"\x00\x01" + props + s(b"a") + b"\x00"),
        SUBACK: lambda: frame(0x90, b"\x00\x01" + props + b"\x00"),
        UNSUBSCRIBE: lambda: frame(0xA2, b"\x00\x01" + props + s(b"a")),
        UNSUBACK: lambda: frame(0xB0, b"\x00\x01" + props + b"\x00"),
        DISCONNECT: lambda: frame(0xE0, b"\x04" + props),
        AUTH: lambda: frame(0xF0, b"\x18" + props),
    }
    return builders[kind]()


def decode5(kind, data: bytes) -> list:
    return Decoder(version=0 if kind in (CONNECT, WILL) else 5).feed(data)


def rejects(data: bytes, error: type[Exception], version: int = 4, **kwargs) -> MQTTError:
    """Assert the decoder rejects ``data`` with ``error`` (and fed byte by byte too)."""
    with pytest.raises(error) as info:
        Decoder(version=version, **kwargs).feed(data)
    decoder = Decoder(version=version, **kwargs)
    with pytest.raises(error):
        for i in range(len(data)):
            decoder.feed(data[i : i + 1])
    return info.value
