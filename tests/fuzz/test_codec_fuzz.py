"""Hypothesis fuzzing of the codec and of the protocol state machine behind it.

Codec (``Decoder.feed``): random bytes, mutated valid streams cut at random places and huge
remaining lengths raise only ``MQTTError`` subclasses, whatever the split; a packet announced over
the maximum size is refused from its fixed header, before its body is buffered.

Protocol: the same hostile streams, behind a valid CONNECT, go through a real ``MQTTConnection``
over a real ``Broker`` (an in-memory stream instead of a socket): the connection ends by closing,
never with an unexpected exception (the ``connection_error`` log line), and the broker is left with
no session for it.
"""

from __future__ import annotations

import logging

import gevent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fluxmq._core import codec as c
from fluxmq.broker.broker import Broker
from fluxmq.errors import MQTTError, PacketTooLarge
from fluxmq.protocol.connection import MQTTConnection
from fluxmq.protocol.flush import FlushScheduler
from fluxmq.protocol.settings import ProtocolSettings
from tests._core.codec_strategies import any_packet, connects, fuzz_examples
from tests._core.guarded import guarded

FUZZ = settings(max_examples=fuzz_examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
VERSIONS = st.sampled_from([3, 4, 5])


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def feed_in_pieces(data: bytes, cuts: list[int], version: int = 0, max_packet_size: int = 0) -> tuple:
    """(packets, error type or None) of feeding ``data`` cut at ``cuts``, each piece ending at an
    unreadable page (``guarded``: a read past it faults)."""
    decoder = c.Decoder(max_packet_size=max_packet_size, version=version)
    packets: list = []
    bounds = sorted({0, len(data), *[min(x, len(data)) for x in cuts]})
    try:
        for a, b in zip(bounds, bounds[1:], strict=False):
            with guarded(data[a:b]) as piece:
                packets.extend(decoder.feed(piece))
    except MQTTError as exc:
        return packets + list(getattr(exc, "packets", None) or ()), type(exc)
    return packets, None


@st.composite
def mutated(draw, version_strategy=VERSIONS, with_connect: bool = False):
    version = draw(version_strategy)
    packets = draw(st.lists(any_packet(version), min_size=1, max_size=5))
    data = bytearray(b"".join(c.encode(p, version) for p in packets))
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "length"]))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.sampled_from([0, 0x7F, 0x80, 0xFF, 0x23, 0x2B, 0x2F]))
        elif op == "insert":
            data.insert(pos, draw(st.integers(0, 255)))
        elif op == "delete" and len(data) > 1:
            del data[pos]
        elif op == "truncate":
            del data[max(1, pos) :]
        elif op == "length":
            data[pos : pos + 1] = varint(draw(st.integers(0, 268_435_455)))
    prefix = c.encode(draw(connects(version)), version) if with_connect else b""
    return version, prefix, bytes(data)


@FUZZ
@given(
    data=st.binary(max_size=512),
    cuts=st.lists(st.integers(0, 512), max_size=4),
    version=st.sampled_from([0, 3, 4, 5]),
)
def test_random_bytes_in_any_pieces_raise_only_mqtt_errors(data, cuts, version) -> None:
    whole = feed_in_pieces(data, [], version)
    assert feed_in_pieces(data, cuts, version) == whole  # the split never changes the outcome


@FUZZ
@given(case=mutated(), cuts=st.lists(st.integers(0, 600), max_size=4))
def test_mutated_streams_in_any_pieces_raise_only_mqtt_errors(case, cuts) -> None:
    version, _, data = case
    assert feed_in_pieces(data, cuts, version) == feed_in_pieces(data, [], version)


@FUZZ
@given(
    ptype=st.integers(0, 15),
    flags=st.integers(0, 15),
    length=st.integers(1025, 268_435_455),
    version=st.sampled_from([0, 4, 5]),
)
def test_huge_remaining_length_refused_from_the_fixed_header(ptype, flags, length, version) -> None:
    """With a maximum packet size, a larger announced packet fails on its header alone (or the
    header is malformed): the body is never waited for, so no memory is held for it."""
    header = bytes([ptype << 4 | flags]) + varint(length)
    packets, error = feed_in_pieces(header, [], version, max_packet_size=1024)
    assert packets == [] and error is not None and issubclass(error, MQTTError)
    if ptype not in (0,) and error is not PacketTooLarge:
        assert error.__name__ in ("MalformedPacket", "ProtocolError", "UnsupportedProtocolVersion")


def test_oversized_packet_refused_before_its_body() -> None:
    decoder = c.Decoder(max_packet_size=2 << 20)
    try:
        decoder.feed(b"\x30" + varint(3 << 20))
    except PacketTooLarge:
        return
    raise AssertionError("a 3 MiB PUBLISH header was accepted under a 2 MiB maximum")


# -- through the protocol state machine ---------------------------------------------------------------


class MemoryStream:
    """The stream interface MQTTConnection uses, over a list of chunks to read and a byte sink."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.sent = bytearray()
        self.peer = "fuzz:0"
        self.closed = False

    def recv(self, n: int) -> bytes:
        return self.chunks.pop(0) if self.chunks and not self.closed else b""

    def settimeout(self, timeout) -> None:
        pass

    def send_nowait(self, data) -> int:
        self.sent += data
        return len(data)

    def send_all(self, data, timeout) -> None:
        self.sent += data

    def shutdown(self) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True


BROKER_SETTINGS = ProtocolSettings(connect_timeout=0, park_after=0, max_topic_alias=10)


class _ErrorLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@settings(max_examples=fuzz_examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mutated(with_connect=True), cuts=st.lists(st.integers(0, 600), max_size=3))
def test_hostile_streams_through_a_connection_only_close_it(case, cuts) -> None:
    version, connect, data = case
    stream_bytes = connect + data
    bounds = sorted({0, len(stream_bytes), *[min(x, len(stream_bytes)) for x in cuts]})
    chunks = [stream_bytes[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    broker = Broker()
    errors = _ErrorLines()
    logger = logging.getLogger("fluxmq.protocol")
    logger.addHandler(errors)
    try:
        conn = MQTTConnection(broker, MemoryStream(chunks), BROKER_SETTINGS, FlushScheduler())
        conn.run()  # returns at end of stream or on the first fatal error
        gevent.sleep(0)  # let the flush callback run
    finally:
        logger.removeHandler(errors)
    assert conn.closed
    assert errors.lines == [], errors.lines  # "connection_error": an unexpected exception
    assert broker.connected == 0
    assert all(s.delivery is None for s in broker.sessions.values())
