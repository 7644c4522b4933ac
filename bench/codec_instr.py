"""The codec's hot paths at a fixed count, for instruction counts (callgrind).

``bench/codec_micro.py`` times the same four operations in wall-clock time, which other load on the
machine moves by a factor of two or three; this runs one of them a fixed number of times, for each
of the four cases of ``codec_micro`` (3.1.1 and 5.0, QoS 0 and 1, 64-byte payload), so that under
``valgrind --tool=callgrind`` the difference of two runs with different counts, divided by the
difference of the operations, is the instructions per operation (the interpreter's start cancels).
The loops run in a function (fast locals) and ``PYTHONHASHSEED=0`` keeps dict probing the same
from run to run.

Usage (from the repository root), for each OP of decode, encode_publish, encode, append::

    PYTHONHASHSEED=0 valgrind --tool=callgrind python -m bench.codec_instr OP 2000
    PYTHONHASHSEED=0 valgrind --tool=callgrind python -m bench.codec_instr OP 12000

(instructions per operation = difference / (4 * 10,000)).
"""

from __future__ import annotations

import argparse

from fluxmq._core.codec import Decoder, append_publish, encode, encode_publish

PAYLOAD = bytes(range(64))
TOPIC = "sensors/building-1/floor-2/temperature"
BATCH = 100
CASES = ((0, 0, 4), (1, 1234, 4), (0, 0, 5), (1, 1234, 5))  # qos, packet id, version
OPS = ("decode", "encode_publish", "encode", "append")


def run(op: str, count: int) -> None:
    """Run ``op`` ``count`` times for each case (decode: ``count`` packets, ``BATCH`` per feed)."""
    for qos, packet_id, version in CASES:
        packet = encode_publish(TOPIC, PAYLOAD, qos, False, False, packet_id, None, version)
        stream = packet * BATCH
        decoder = Decoder(version=version)
        message = decoder.feed(packet)[0]
        out = bytearray()
        topic, payload = TOPIC, PAYLOAD
        if op == "decode":
            for _ in range(count // BATCH):
                decoder.feed(stream)
        elif op == "encode_publish":
            for _ in range(count):
                encode_publish(topic, payload, qos, False, False, packet_id, None, version)
        elif op == "encode":
            for _ in range(count):
                encode(message, version)
        else:
            for _ in range(count):
                append_publish(out, packet, 77, False)
                if len(out) > 65536:
                    out.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("op", choices=OPS)
    parser.add_argument("count", type=int)
    args = parser.parse_args()
    run(args.op, args.count)


if __name__ == "__main__":
    main()
