"""Tests of fluxmq._core.buffer: WriteBuffer (against a bytearray model) and BufferPool."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxmq._core.buffer import BufferPool, WriteBuffer
from fluxmq._core.codec import Decoder, Publish, append_publish, encode_publish

REPO = Path(__file__).resolve().parents[2]

# -- WriteBuffer ----------------------------------------------------------------------------


def test_write_peek_consume_clear():
    buf = WriteBuffer()
    assert len(buf) == 0 and bytes(buf.peek()) == b""
    buf.write(b"hello ")
    buf.write(bytearray(b"wor"))
    buf.write(memoryview(b"ld!")[:2])
    assert len(buf) == 11
    assert bytes(buf.peek()) == b"hello world"
    buf.consume(6)
    assert bytes(buf.peek()) == b"world"
    buf.write(b"?")
    assert bytes(buf.peek()) == b"world?"
    buf.clear()
    assert len(buf) == 0 and bytes(buf.peek()) == b""
    buf.write(b"again")
    assert bytes(buf.peek()) == b"again"


def test_consume_more_than_pending_or_negative_is_an_error():
    buf = WriteBuffer()
    buf.write(b"abc")
    with pytest.raises(ValueError):
        buf.consume(4)
    with pytest.raises(ValueError):
        buf.consume(-1)
    buf.consume(3)
    assert len(buf) == 0


def test_peek_is_read_only():
    buf = WriteBuffer()
    buf.write(b"abc")
    view = buf.peek()
    assert view.readonly
    with pytest.raises(TypeError):
        view[0] = 0


def test_a_view_is_unchanged_by_later_writes_growth_consume_and_clear():
    """The writer greenlet may be blocked sending a view while others write: the view must hold."""
    buf = WriteBuffer(initial_size=16)
    buf.write(b"0123456789")
    view = buf.peek()
    buf.consume(4)
    buf.write(b"x" * 10_000)  # forces growth while the view is alive
    buf.clear()
    buf.write(b"y" * 100)
    assert bytes(view) == b"0123456789"
    view.release()
    assert bytes(buf.peek()) == b"y" * 100


@st.composite
def operations(draw):
    return draw(st.lists(st.one_of(
        st.tuples(st.just("write"), st.binary(max_size=300)),
        st.tuples(st.just("consume"), st.floats(0, 1)),
        st.tuples(st.just("peek"), st.just(None)),
        st.tuples(st.just("release"), st.integers(0, 10)),
        st.tuples(st.just("clear"), st.just(None)),
        st.tuples(st.just("publish"), st.tuples(st.integers(0, 2), st.integers(1, 65535), st.booleans())),
    ), max_size=60))


@settings(max_examples=300, deadline=None)
@given(ops=operations(), initial=st.sampled_from([1, 16, 4096]))
def test_matches_a_bytearray_model_and_views_never_change(ops, initial):
    """Any interleaving of writes, partial consumes, peeks and clears behaves like a bytearray,
    and every view keeps the bytes it was taken with until released."""
    buf = WriteBuffer(initial_size=initial)
    model = bytearray()
    views: list[tuple[memoryview, bytes]] = []
    for op, arg in ops:
        if op == "write":
            buf.write(arg)
            model += arg
        elif op == "consume":
            n = int(len(model) * arg)
            buf.consume(n)
            del model[:n]
        elif op == "peek":
            view = buf.peek()
            views.append((view, bytes(model)))
        elif op == "release" and views:
            view, _ = views.pop(arg % len(views))
            view.release()
        elif op == "clear":
            buf.clear()
            model.clear()
        elif op == "publish":
            qos, packet_id, dup = arg
            template = encode_publish("t/x", b"payload", qos, False, False, 0, None, 4)
            buf.write_publish(template, packet_id, dup)
            append_publish(model, template, packet_id, dup)
        assert len(buf) == len(model)
        assert bytes(buf.peek()) == bytes(model)
        for view, snapshot in views:
            assert bytes(view) == snapshot


@settings(max_examples=100, deadline=None)
@given(qos=st.integers(0, 2), version=st.sampled_from([3, 4, 5]), packet_id=st.integers(1, 65535),
       dup=st.booleans(), topic=st.text(min_size=1, max_size=300).filter(lambda t: not set(t) & set("+#\0")),
       payload=st.binary(max_size=200))
def test_write_publish_agrees_with_the_codec(qos, version, packet_id, dup, topic, payload):
    """write_publish patches the same bytes as codec.append_publish (long topics included)."""
    template = encode_publish(topic, payload, qos, True, False, 0,
                              {0x26: [("k", "v")]} if version == 5 else None, version)
    buf = WriteBuffer()
    buf.write_publish(template, packet_id, dup)
    expected = bytearray()
    append_publish(expected, template, packet_id, dup)
    assert bytes(buf.peek()) == bytes(expected)
    (packet,) = Decoder(version=version).feed(buf.peek())
    assert (packet.packet_id, packet.dup) == ((packet_id, dup) if qos else (0, False))


def test_write_publish_rejects_what_is_not_a_publish():
    buf = WriteBuffer()
    with pytest.raises(ValueError):
        buf.write_publish(b"\x40\x02\x00\x01", 1, False)
    with pytest.raises(ValueError):
        buf.write_publish(encode_publish("t", b"", 1, False, False, 0, None, 4), 0, False)
    assert len(buf) == 0


def test_capacity_returns_to_small_after_a_burst_drains():
    buf = WriteBuffer()
    buf.write(b"z" * 2_000_000)
    assert "capacity=2000000" in repr(buf)
    buf.consume(len(buf))
    assert "capacity=0" in repr(buf)
    buf.write(b"ok")
    assert bytes(buf.peek()) == b"ok"


def test_partial_socket_sends_deliver_every_byte_in_order():
    """Real socket: non-blocking sends take part of a view while more is written behind it."""
    sender, receiver = socket.socketpair()
    sender.setblocking(False)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    buf = WriteBuffer(initial_size=64)
    expected = bytearray()
    received = bytearray()
    try:
        for i in range(200):
            chunk = bytes([i % 251]) * (500 + i)
            buf.write(chunk)
            expected += chunk
            view = buf.peek()
            try:
                sent = sender.send(view)
            except BlockingIOError:
                sent = 0
            buf.write(b"!")  # written while the view is alive, before consume
            expected += b"!"
            view.release()
            buf.consume(sent)
            receiver.setblocking(False)
            try:
                while True:
                    received += receiver.recv(65536)
            except BlockingIOError:
                pass
        sender.setblocking(True)
        while len(buf):
            view = buf.peek()
            sent = sender.send(view)
            view.release()
            buf.consume(sent)
        sender.shutdown(socket.SHUT_WR)
        receiver.setblocking(True)
        while data := receiver.recv(65536):
            received += data
    finally:
        sender.close()
        receiver.close()
    assert received == expected


# -- BufferPool ----------------------------------------------------------------------------

def test_pool_reuses_released_buffers_up_to_its_bound():
    pool = BufferPool(1024, 2)
    a, b, c = pool.acquire(), pool.acquire(), pool.acquire()
    assert all(isinstance(x, bytearray) and len(x) == 1024 for x in (a, b, c))
    assert len({id(a), id(b), id(c)}) == 3
    pool.release(a)
    pool.release(b)
    pool.release(c)  # over the bound: dropped
    assert len(pool) == 2
    again = {id(pool.acquire()), id(pool.acquire())}
    assert again == {id(a), id(b)}
    assert len(pool) == 0
    assert pool.acquire() is not c
    assert (pool.size, pool.count) == (1024, 2)


def test_pool_rejects_double_release_and_foreign_buffers():
    pool = BufferPool(64, 4)
    buf = pool.acquire()
    pool.release(buf)
    with pytest.raises(ValueError):
        pool.release(buf)
    with pytest.raises(ValueError):
        pool.release(bytearray(10))
    with pytest.raises(ValueError):
        BufferPool(0, 1)


def test_pool_buffers_receive_from_a_socket():
    pool = BufferPool(16, 1)
    left, right = socket.socketpair()
    try:
        left.sendall(b"mqtt bytes")
        buf = pool.acquire()
        n = right.recv_into(buf)
        assert bytes(buf[:n]) == b"mqtt bytes"
        pool.release(buf)
    finally:
        left.close()
        right.close()


# -- C-level API ---------------------------------------------------------------------------

def test_pxd_declarations_let_another_cython_module_call_at_c_speed(tmp_path):
    """A module that cimports the .pxd files compiles and drives the cdef/cpdef methods."""
    source = tmp_path / "cimport_check.pyx"
    source.write_text(textwrap.dedent("""
        # cython: language_level=3
        from fluxmq._core.buffer cimport WriteBuffer, BufferPool
        from fluxmq._core.codec cimport Publish, encode_publish

        def run():
            cdef WriteBuffer buf = WriteBuffer()
            cdef BufferPool pool = BufferPool(8, 1)
            cdef Publish p = Publish("a/b", b"x", 1, packet_id=5)
            buf.write_raw(b"ab", 2)
            buf.write(b"cd")
            buf.write_publish(encode_publish(p.topic, p.payload, p.qos, False, False, 0, None, 4), 9, True)
            pool.release(pool.acquire())
            return buf.pending(), bytes(buf.peek()), p.packet_id, len(pool)
    """))
    build = subprocess.run(
        [sys.executable, "-m", "Cython.Build.Cythonize", "-3", "-i", str(source)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},  # .pxd files are found on sys.path
    )
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run(
        [sys.executable, "-c", "import cimport_check; print(cimport_check.run())"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": f"{tmp_path}:{REPO}", "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr
    expected_publish = bytearray()
    append_publish(expected_publish, encode_publish("a/b", b"x", 1, False, False, 0, None, 4), 9, True)
    assert run.stdout.strip() == repr((4 + len(expected_publish), b"abcd" + bytes(expected_publish), 5, 1))
    assert Decoder().feed(bytes(expected_publish)) == [Publish("a/b", b"x", 1, False, True, 9)]
