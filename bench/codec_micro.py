"""Micro-benchmark of the MQTT codec hot paths: 64-byte-payload PUBLISH decode and encode rates.

Run: ``PYTHONPATH=. .venv/bin/python bench/codec_micro.py [--seconds 1.0]``.
Decoding feeds batches of back-to-back packets (as one socket read would deliver them), so the rate
includes the per-packet object creation the protocol layer pays.
"""

from __future__ import annotations

import argparse

from bench.trie_micro import rate
from fluxmq._core.codec import Decoder, append_publish, encode, encode_publish

PAYLOAD = bytes(range(64))
TOPIC = "sensors/building-1/floor-2/temperature"
BATCH = 100

CASES = [
    # name, qos, packet_id, version
    ("3.1.1 QoS 0", 0, 0, 4),
    ("3.1.1 QoS 1", 1, 1234, 4),
    ("5.0 QoS 0 no props", 0, 0, 5),
    ("5.0 QoS 1 no props", 1, 1234, 5),
]


def _rate(func, seconds: float, per_call: int = 1) -> float:
    return rate(func, seconds, per_call, batch=50)


def main() -> None:
    """Print decode and encode rates per case."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=1.5, help="time per measurement")
    args = parser.parse_args()

    print(f"{'case':<22}{'decode/s':>14}{'encode/s':>14}{'encode()/s':>14}{'append/s':>14}")
    for name, qos, packet_id, version in CASES:
        packet = encode_publish(TOPIC, PAYLOAD, qos, False, False, packet_id, None, version)
        stream = packet * BATCH
        decoder = Decoder(version=version)

        def decode(decoder=decoder, stream=stream) -> None:
            decoder.feed(stream)

        def encode_fast(qos=qos, packet_id=packet_id, version=version) -> None:
            encode_publish(TOPIC, PAYLOAD, qos, False, False, packet_id, None, version)

        message = decoder.feed(packet)[0]

        def encode_generic(message=message, version=version) -> None:
            encode(message, version)

        out = bytearray()

        def append(out=out, packet=packet) -> None:
            append_publish(out, packet, 77, False)
            if len(out) > 1 << 16:
                out.clear()

        rates = (
            _rate(decode, args.seconds, BATCH),
            _rate(encode_fast, args.seconds),
            _rate(encode_generic, args.seconds),
            _rate(append, args.seconds),
        )
        print(f"{name:<22}" + "".join(f"{rate:>14,.0f}" for rate in rates))


if __name__ == "__main__":
    main()
