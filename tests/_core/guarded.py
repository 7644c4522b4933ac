"""Bytes that end at an unreadable page: a C reader that goes past their end faults at once.

A bytes object has a NUL after its last byte and its allocation some slack, so a parser reading a
byte or a few past the end of its input reads valid memory, crashes nothing, and (under
AddressSanitizer too) goes unseen. ``guarded(data)`` copies ``data`` to the end of an anonymous
mapping whose next page is ``PROT_NONE`` and yields a ``memoryview`` of exactly those bytes: a
read past them is a SIGSEGV in any build (scripts/asan reports it with the C stack). The codec's
fuzz tests feed the decoder through it.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterator
from contextlib import contextmanager

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mprotect.restype = ctypes.c_int
_PROT_NONE = 0


@contextmanager
def guarded(data: bytes) -> Iterator[memoryview]:
    """A view of ``data``'s bytes (a copy) ending where an unreadable page starts."""
    n = len(data)
    pages = -(-n // PAGE)
    area = mmap.mmap(-1, (pages + 1) * PAGE)
    try:
        anchor = ctypes.c_char.from_buffer(area)
        end = ctypes.addressof(anchor) + pages * PAGE
        del anchor  # (its export of the mapping: released before the mapping is closed)
        if _libc.mprotect(end, PAGE, _PROT_NONE) != 0:
            raise OSError(ctypes.get_errno(), "mprotect of the guard page failed")
        area[pages * PAGE - n : pages * PAGE] = data
        with memoryview(area) as whole:
            view = whole[pages * PAGE - n : pages * PAGE]
            try:
                yield view
            finally:
                view.release()
    finally:
        area.close()
