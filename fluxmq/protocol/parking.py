"""Parking: an idle connection without a greenlet, and its wake-up.

An idle client (nothing received for ``settings.park_after`` seconds) parks: its greenlet ends and a
libev I/O watcher plus a keep-alive timer wake it with a new greenlet when bytes arrive. Keep-alive
traffic (PINGREQs only) is answered from the hub and the connection stays parked. A mixin of
``fluxmq.protocol.connection.MQTTConnection``, which holds its state.
"""

from __future__ import annotations

import gevent

_PINGRESP = b"\xd0\x00"
_PINGREQ = b"\xc0\x00"  # the only form of a PINGREQ (remaining length 0) in every protocol version

# libev priority of a parked connection's wake-up watcher (libev's range is -2..2; gevent's own
# watchers, a reading connection's included, have 0).
_WAKE_PRIORITY = 1


class Parking:
    """Park (``_park``), wake (``_unpark``, ``_wake_in_hub``) and resume (``_resume``)."""

    __slots__ = ()

    @property
    def parked(self) -> bool:
        """True while the connection is parked (no greenlet; a watcher waits for its input)."""
        return self._parked is not None

    def _idle_timeout(self) -> float | None:
        """The recv timeout once connected: the park threshold, or the keep-alive limit if shorter."""
        limit = self._keepalive_limit
        park_after = self.settings.park_after
        if park_after and self._can_park and (not limit or park_after < limit):
            self._parking = True
            self._idle_spent = park_after
            return park_after
        self._parking = False
        return limit or None

    def _park(self) -> bool:
        """End this greenlet and wait for input on a bare watcher; False if input is buffered already."""
        stream = self.stream
        if stream.has_buffered():
            return False
        loop = gevent.get_hub().loop
        # Above the default priority: when a poll finds input on a parked connection and on one
        # that is reading, libev serves the parked one first (within one priority it serves them in
        # the reverse of the kernel's readiness order), so a packet that wakes a parked client is
        # not overtaken by one sent after it on an active connection.
        watcher = loop.io(stream.fileno(), 1, True, _WAKE_PRIORITY)
        watcher.start(self._unpark, False)
        timer = None
        if self._keepalive_limit:
            # The idle time already spent counts against keep alive.
            timer = loop.timer(max(0.001, self._keepalive_limit - self._idle_spent))
            timer.start(self._unpark, True)
        self._parked = (watcher, timer, loop.now())
        return True

    def _unpark(self, timed_out: bool) -> None:
        # Hub callback: the work continues in a new greenlet, switched to at once (as gevent wakes a
        # greenlet waiting in recv), not scheduled for the next loop turn: a woken connection's
        # input takes effect in the turn it arrived, like an active connection's. When the greenlet
        # blocks or ends, the hub carries on from here.
        first = None
        if not timed_out and not self.closed:
            recv_nowait = getattr(self.stream, "recv_nowait", None)
            if recv_nowait is not None:
                first = self._wake_in_hub(recv_nowait)
                if first is None:
                    return  # answered (PINGREQ) or nothing to read: still parked
        watcher, timer, parked_at = self._parked
        self._parked = None
        watcher.stop()
        watcher.close()
        if timer is not None:
            timer.stop()
            timer.close()
        # A client that was quiet for park_after or longer (a sensor that reports now and then) is
        # served and parks again at the first recv that finds nothing, as after CONNECT: its
        # greenlet lives for the input, not for park_after more seconds. One woken sooner after
        # parking (a client that turned busy) reads as usual.
        long_quiet = watcher.loop.now() - parked_at >= self.settings.park_after
        gevent.Greenlet(self._resume, timed_out, first, long_quiet).switch()

    def _wake_in_hub(self, recv_nowait) -> bytes | None:
        """Read what woke a parked connection, in the hub. Keep-alive traffic (PINGREQs only) is
        answered here and the connection stays parked: a client that only pings never costs a
        greenlet, its stack or a receive buffer. Anything else is returned for a greenlet to serve
        (b"" at end of stream); None when the connection stays parked."""
        try:
            data = recv_nowait(65536)
        except BlockingIOError:
            return None  # a spurious wake-up
        except OSError:
            return b""  # reset: the greenlet tears down
        n = len(data)
        if not n or len(self.decoder) or data.count(_PINGREQ) * 2 != n:
            return data
        stats = self.broker.stats
        stats.bytes_received += n
        stats.messages_received += n >> 1
        for _ in range(n >> 1):
            self._write(_PINGRESP)
        watcher, timer, parked_at = self._parked
        if timer is not None:  # input arrived: keep alive counts from now
            self._idle_spent = 0.0
            timer.stop()
            timer.close()
            timer = watcher.loop.timer(self._keepalive_limit)
            timer.start(self._unpark, True)
            self._parked = (watcher, timer, parked_at)
        return None

    def _resume(self, timed_out: bool, first: bytes | None = None, repark: bool = False) -> None:
        if not timed_out:
            self.run(first, repark)
            return
        try:
            self._on_timeout()
        finally:
            self._teardown()
