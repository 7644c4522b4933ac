"""A coverage-guided fuzzer of ``Decoder.feed`` (atheris, libFuzzer): not a test, a tool for a campaign.

Each input is a stream of bytes after two control bytes: the protocol version the decoder starts
with (0: until a CONNECT, 3, 4 or 5) and whether it has a maximum packet size, then where the stream
is cut in two. The stream is fed whole and in two pieces, each piece ending at an unreadable page
(``tests._core.guarded``): anything but packets or an ``MQTTError``, a different outcome for the
two feeds, a read past a piece (SIGSEGV) or an ASan report is a crash, which libFuzzer saves. The
corpus starts from every client packet of tests/fuzz/socket_fuzz.py and its CONNECTs.

Needs atheris 3 (``pip install --target DIR atheris``) and the Cython core built with clang's
``-fsanitize=address,fuzzer-no-link`` so libFuzzer sees the C decoder's edges (docs/development.rst,
"Sanitizer build")::

    CC=clang LDSHARED="clang -shared" CFLAGS="-fsanitize=address,fuzzer-no-link -g" \\
        LDFLAGS="-fsanitize=address,fuzzer-no-link" python setup.py build_ext --force \\
        --build-lib build/fuzz/lib --build-temp build/fuzz/tmp
    LD_PRELOAD=DIR/asan_with_fuzzer.so ASAN_OPTIONS=detect_leaks=0 PYTHONMALLOC=malloc \\
        PYTHONPATH=DIR:scripts/asan_site ASAN_FLUXMQ_LIB=build/fuzz/lib \\
        python -m tests.fuzz.atheris_decoder build/fuzz/corpus -max_total_time=600
"""

from __future__ import annotations

import os
import sys

import atheris

with atheris.instrument_imports(include=["fluxmq"]):
    from fluxmq._core.codec import Decoder
    from fluxmq.errors import MQTTError

from tests._core.guarded import guarded
from tests.fuzz.socket_fuzz import connect_packet, corpus


def _feed(pieces: list[bytes], version: int, max_packet_size: int) -> tuple:
    decoder = Decoder(max_packet_size=max_packet_size, version=version)
    packets: list = []
    try:
        for piece in pieces:
            with guarded(piece) as view:
                packets.extend(decoder.feed(view))
    except MQTTError as exc:
        return packets + list(getattr(exc, "packets", None) or ()), type(exc)
    return packets, None


def one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    version = (0, 3, 4, 5)[data[0] & 3]
    max_packet_size = 256 if data[0] & 4 else 0
    stream = data[2:]
    cut = data[1] * len(stream) // 255
    whole = _feed([stream], version, max_packet_size)
    split = _feed([stream[:cut], stream[cut:]], version, max_packet_size)
    if split != whole:
        raise AssertionError(f"cut at {cut} changed the outcome: {whole!r} != {split!r}")


def seed(directory: str) -> None:
    """Write the seed corpus (a file per packet, version byte first) into ``directory``."""
    os.makedirs(directory, exist_ok=True)
    n = 0
    for version, code in ((3, 1), (4, 2), (5, 3)):
        packets = [connect_packet(version, "fuzz")] + corpus(version)
        packets.append(connect_packet(version, "fuzz") + b"".join(corpus(version)[:5]))
        for packet in packets:
            with open(os.path.join(directory, f"seed-{n:04d}"), "wb") as f:
                f.write(bytes([code, 128]) + packet)
            n += 1


def main() -> None:
    dirs = [a for a in sys.argv[1:] if not a.startswith("-")]
    if dirs and (not os.path.isdir(dirs[0]) or not os.listdir(dirs[0])):
        seed(dirs[0])  # (an empty or new corpus directory)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
