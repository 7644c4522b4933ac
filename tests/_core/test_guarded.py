"""The fuzz tests' guarded buffers (tests/_core/guarded.py): their bytes are the data's, and the
byte after the last one is unreadable (a read there kills the process with SIGSEGV)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from fluxmq._core.codec import Decoder, Publish, encode
from tests._core.guarded import PAGE, guarded

ROOT = Path(__file__).resolve().parents[2]


def test_a_guarded_view_holds_the_data_and_decodes() -> None:
    packet = encode(Publish("a/b", b"x" * 10, 0, False, False, 0, {}), 4)
    for data in (b"", packet, b"\x01" * PAGE, b"\x02" * (PAGE + 1)):
        with guarded(data) as view:
            assert bytes(view) == data
    with guarded(packet) as view:
        assert Decoder(version=4).feed(view) == [Publish("a/b", b"x" * 10, 0, False, False, 0, {})]


def test_a_read_one_byte_past_a_guarded_view_faults() -> None:
    code = (
        "import ctypes\n"
        "from tests._core.guarded import guarded\n"
        "with guarded(b'abc') as view:\n"
        "    at = ctypes.addressof(ctypes.c_char.from_buffer(view))\n"
        "    assert ctypes.string_at(at, 3) == b'abc'\n"
        "    print('read', flush=True)\n"
        "    ctypes.string_at(at, 4)\n"
    )
    env = dict(os.environ)
    if "ASAN_OPTIONS" in env:  # (under scripts/asan: the fault itself, not ASan's report of it)
        env["ASAN_OPTIONS"] += ":handle_segv=0"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.stdout == "read\n", done.stderr
    assert done.returncode == -signal.SIGSEGV, (done.returncode, done.stderr)
