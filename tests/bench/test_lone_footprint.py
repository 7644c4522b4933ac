"""bench.lone_footprint's reading of /proc/PID/smaps after clear_refs (the brokers' runs need Mosquitto and a node)."""

from __future__ import annotations

import ctypes
import mmap
import os

from bench.lone_footprint import clear_refs, group_of, smaps


def test_a_mapping_is_grouped_by_what_it_is_and_text_apart_from_data() -> None:
    lib = "/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0"
    assert group_of(lib, "r-xp") == "python/libpython text"
    assert group_of(lib, "rw-p") == "python/libpython data"
    assert group_of("/w/fluxmq/_core/relay.cpython-311-x86_64-linux-gnu.so", "r-xp") == "fluxmq relay text"
    assert group_of("/v/site-packages/gevent/libev/corecext.cpython-311-x86_64-linux-gnu.so", "rw-p") == (
        "gevent corecext data"
    )
    assert group_of("/usr/lib/x86_64-linux-gnu/libc.so.6", "r-xp") == "libc text"
    assert group_of("/usr/sbin/mosquitto", "r-xp") == "mosquitto text"
    assert group_of("[heap]", "rw-p") == "[heap]"
    assert group_of("", "rw-p").startswith("anon")


def test_referenced_counts_the_pages_touched_since_the_clear_and_only_those() -> None:
    """Eight of sixteen fresh pages written after ``clear_refs``: the mapping shows 32 KiB referenced."""
    m = mmap.mmap(-1, 16 * 4096)
    try:
        start = ctypes.addressof(ctypes.c_char.from_buffer(m))
        for i in range(16):  # fault every page in first, so that only the clear decides what counts
            m[i * 4096] = 1
        clear_refs(os.getpid())
        for i in range(0, 16, 2):
            m[i * 4096] = 2
        refs = [
            ref for _path, _perms, _size, ref, _ahp, s in smaps(os.getpid()) if s <= start < s + _size * 1024
        ]
        assert refs == [32]
    finally:
        m.close()
