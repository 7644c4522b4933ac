"""A raw-socket fuzzer for an MQTT broker: mutated valid packets, random bytes, huge remaining lengths
and truncated packets, many inputs per connection.

Inputs are made from a corpus of valid packets (every client packet type, MQTT 3.1, 3.1.1 and 5.0,
with and without properties) by seeded mutations: bit flips, byte sets, inserts, deletes,
truncation, splices of two packets, remaining lengths set up to the 4-byte maximum. Each input is
classified with fluxmq's own decoder: one that still decodes to a single client packet the broker
answers without closing (PUBLISH, PUBACK..PUBCOMP, SUBSCRIBE, UNSUBSCRIBE, PINGREQ) is *batchable*;
any other is *terminal*. A connection sends a valid CONNECT, a batch of batchable inputs and at most
one terminal input last (the broker closes on it), then half-closes and reads until the broker
closes: so one connection carries up to ``batch`` inputs and every byte the broker writes is read.
Some connections are a mutated CONNECT or random bytes alone.

Usable as a script for longer runs against any broker on 127.0.0.1::

    python -m tests.fuzz.socket_fuzz --port 1883 --inputs 1000000 --seed 7
"""

from __future__ import annotations

import argparse
import random
import socket
import threading
import time
from dataclasses import dataclass, field

from fluxmq._core import codec as c
from fluxmq.errors import MQTTError

HOST = "127.0.0.1"
_PINGREQ = b"\xc0\x00"
_BATCHABLE = {c.PUBLISH, c.PUBACK, c.PUBREC, c.PUBREL, c.PUBCOMP, c.SUBSCRIBE, c.UNSUBSCRIBE, c.PINGREQ}
# 5.0 properties a client may put on a PUBLISH (Topic Alias and Subscription Identifier left out: the
# broker closes on a bad alias, and clients may not send subscription ids)
_PUBLISH_PROPS = [
    {},
    {c.PAYLOAD_FORMAT_INDICATOR: 1},
    {c.MESSAGE_EXPIRY_INTERVAL: 60},
    {c.CONTENT_TYPE: "text/plain"},
    {c.RESPONSE_TOPIC: "fuzz/reply", c.CORRELATION_DATA: b"\x01\x02"},
    {c.USER_PROPERTY: [("k", "v"), ("k", "w")]},
]


def corpus(version: int) -> list[bytes]:
    """Valid client packets of ``version`` (the CONNECT excluded)."""
    v5 = version == 5
    packets: list = []
    for qos in (0, 1, 2):
        for topic in ("fuzz/a", "fuzz/b/c", "fuzz/" + "x" * 40, "fuzz/ü/€", "fuzz/a/b/c/d/e/f"):
            for props in _PUBLISH_PROPS if v5 else [None]:
                packets.append(
                    c.Publish(
                        topic,
                        b"payload-" + topic.encode()[:8],
                        qos,
                        qos == 1,
                        False,
                        7 if qos else 0,
                        props or None,
                    )
                )
    for cls in (c.Puback, c.Pubrec, c.Pubrel, c.Pubcomp):
        packets.append(cls(7, 0x10 if v5 and cls is c.Puback else 0, {c.REASON_STRING: "r"} if v5 else None))
    for filters in (["fuzz/#"], ["fuzz/+/c", "fuzz/a"], ["$share/g/fuzz/a"], ["fuzz/" + "y" * 30 + "/#"]):
        if v5:
            subs = [c.Subscription(f, 1, False, True, 1) for f in filters]
            props = {c.SUBSCRIPTION_IDENTIFIER: [5], c.USER_PROPERTY: [("a", "b")]}
        else:
            subs = [c.Subscription(f, 2) for f in filters]
            props = None
        packets.append(c.Subscribe(9, subs, props))
        packets.append(c.Unsubscribe(10, filters, {c.USER_PROPERTY: [("a", "b")]} if v5 else None))
    packets.append(c.Pingreq())
    return [c.encode(p, version) for p in packets]


def connect_packet(version: int, client_id: str, rng: random.Random | None = None) -> bytes:
    """A valid CONNECT (clean session; a will and credentials now and then)."""
    props = {c.SESSION_EXPIRY_INTERVAL: 0, c.RECEIVE_MAXIMUM: 50} if version == 5 else None
    will = None
    username = password = None
    if rng is not None and rng.random() < 0.3:
        will = c.Will("fuzz/will", b"gone", rng.randint(0, 2), False, {} if version == 5 else None)
    if rng is not None and rng.random() < 0.3:
        username, password = "fuzzer", b"secret"
    return c.encode(c.Connect(client_id, True, 30, version, None, username, password, will, props), version)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n % 128
        n //= 128
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def mutate(rng: random.Random, data: bytes, other: bytes) -> bytes:
    """One to four edits of ``data`` (``other``: a second packet for splices)."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        if not buf:
            buf.append(rng.randrange(256))
        pos = rng.randrange(len(buf))
        if op < 0.30:
            buf[pos] ^= 1 << rng.randrange(8)
        elif op < 0.50:
            buf[pos] = rng.choice((0x00, 0xFF, 0x7F, 0x80, 0x3F, 0x2F, 0x23, 0x2B, rng.randrange(256)))
        elif op < 0.60:
            buf.insert(pos, rng.randrange(256))
        elif op < 0.70 and len(buf) > 1:
            del buf[pos]
        elif op < 0.78:
            del buf[rng.randint(1, len(buf)) :]  # truncated
        elif op < 0.86:
            buf[rng.randrange(len(buf)) :] = other[rng.randrange(max(1, len(other))) :]  # splice
        elif op < 0.93:
            # a remaining length from small to the 4-byte maximum (268,435,455), body unchanged
            length = rng.choice(
                (0, 1, 127, 128, 16383, 16384, 2097151, 2097152, 268435455, rng.randrange(1 << 28))
            )
            body = buf[2:] if len(buf) > 2 else b""
            buf[:] = bytes([buf[0]]) + _varint(length) + body
        else:
            buf[0] = rng.randrange(256)  # any packet type and flags
    return bytes(buf)


def classify(data: bytes, version: int) -> bool:
    """True when ``data`` decodes (after a CONNECT of ``version``) to one packet the broker answers
    without closing the connection."""
    decoder = c.Decoder(version=version)
    try:
        # A PINGREQ after it must decode too: no bytes of ``data`` may be left over in the decoder
        # (they would shift every packet batched after it).
        packets = decoder.feed(data + _PINGREQ)
    except MQTTError:
        return False
    if len(packets) != 2 or packets[1].type != c.PINGREQ or packets[0].type not in _BATCHABLE:
        return False
    p = packets[0]
    if p.type == c.PUBLISH:
        props = p.properties or {}
        # the broker closes on these: an alias (unknown or out of range), a QoS above its maximum
        return not p.topic.startswith("$") and c.TOPIC_ALIAS not in props and p.topic != ""
    return True


@dataclass
class FuzzStats:
    inputs: int = 0
    connections: int = 0
    batched: int = 0
    terminal: int = 0
    random_only: int = 0
    huge_length: int = 0
    truncated: int = 0
    broker_bytes: int = 0
    read_timeouts: int = 0
    errors: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)


class SocketFuzzer:
    """Drives ``threads`` workers until ``inputs`` inputs were sent or ``deadline`` (monotonic) passed."""

    def __init__(
        self,
        port: int,
        inputs: int,
        seed: int = 1,
        batch: int = 120,
        threads: int = 4,
        read_timeout: float = 10.0,
        host: str = HOST,
    ) -> None:
        self.host = host
        self.port = port
        self.target = inputs
        self.seed = seed
        self.batch = batch
        self.threads = threads
        self.read_timeout = read_timeout
        self.stats = FuzzStats()
        self._corpora = {v: corpus(v) for v in (3, 4, 5)}
        self._pools: dict[int, tuple[list[bytes], list[bytes]]] = {}

    def _pool(self, rng: random.Random, version: int, size: int = 4000) -> tuple[list[bytes], list[bytes]]:
        """(batchable, terminal) inputs for ``version``, made once per worker and version."""
        items = self._corpora[version]
        ok: list[bytes] = []
        bad: list[bytes] = []
        while len(ok) + len(bad) < size:
            data = mutate(rng, rng.choice(items), rng.choice(items))
            (ok if classify(data, version) else bad).append(data)
        return ok, bad

    def run(self, deadline: float) -> FuzzStats:
        workers = [
            threading.Thread(target=self._worker, args=(i, deadline), daemon=True)
            for i in range(self.threads)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join(max(0.0, deadline - time.monotonic()) + self.read_timeout + 5)
        return self.stats

    def _worker(self, index: int, deadline: float) -> None:
        rng = random.Random(self.seed * 1000 + index)
        pools = {v: self._pool(rng, v) for v in (3, 4, 5)}
        n = 0
        while self.stats.inputs < self.target and time.monotonic() < deadline:
            n += 1
            kind = rng.random()
            try:
                if kind < 0.04:
                    self._session(rng.randbytes(rng.randint(1, 300)), random_only=1)
                elif kind < 0.06:
                    version = rng.choice((4, 5))
                    head = connect_packet(version, f"f{index}-{n}", rng)
                    self._session(
                        head + bytes([0x30]) + _varint(rng.randrange(1 << 28, 1 << 28 | 1)) + b"x" * 64,
                        huge_length=1,
                        extra=1,
                    )
                elif kind < 0.14:
                    version = rng.choice((3, 4, 5))
                    good = connect_packet(version, f"f{index}-{n}", rng)
                    other = rng.choice(self._corpora[version])
                    self._session(mutate(rng, good, other))
                else:
                    version = rng.choice((3, 4, 5))
                    ok, bad = pools[version]
                    count = rng.randint(self.batch // 2, self.batch)
                    body = [rng.choice(ok) for _ in range(count)]
                    tail = b""
                    if rng.random() < 0.7:
                        tail = rng.choice(bad)
                    elif rng.random() < 0.5:
                        whole = rng.choice(ok)
                        tail = whole[: rng.randint(1, max(1, len(whole) - 1))]  # truncated at the end
                    data = connect_packet(version, f"f{index}-{n}", rng) + b"".join(body) + tail
                    self._session(
                        data, batched=count, terminal=1 if tail else 0, extra=count + (1 if tail else 0)
                    )
            except Exception as exc:  # a fuzzer bug or a broker that stopped answering: report it
                with self.stats.lock:
                    self.stats.errors.append(repr(exc))
                    if len(self.stats.errors) >= 20:
                        return  # something is badly wrong: stop rather than spin until the deadline

    def _session(self, data: bytes, extra: int = 1, **counts: int) -> None:
        """One connection: send ``data``, half-close, read until the broker closes."""
        received = 0
        with socket.create_connection((self.host, self.port), timeout=self.read_timeout) as s:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the broker closed early (it may, on the first bad byte)
            try:
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    received += len(chunk)
            except ConnectionResetError:
                pass
            except TimeoutError:
                self.stats.add(read_timeouts=1)
        self.stats.add(inputs=extra, connections=1, broker_bytes=received, **counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--duration", type=float, default=600.0, help="stop after this many seconds")
    args = parser.parse_args(argv)
    fuzzer = SocketFuzzer(args.port, args.inputs, args.seed, threads=args.threads)
    started = time.monotonic()
    stats = fuzzer.run(started + args.duration)
    print(
        f"inputs={stats.inputs} connections={stats.connections} batched={stats.batched} "
        f"terminal={stats.terminal} random={stats.random_only} huge={stats.huge_length} "
        f"read_timeouts={stats.read_timeouts} errors={stats.errors} secs={time.monotonic() - started:.1f}"
    )
    return 1 if stats.errors or stats.read_timeouts else 0


if __name__ == "__main__":
    raise SystemExit(main())
