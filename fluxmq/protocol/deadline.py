"""ReadDeadline: the read deadlines of a connection on one lazily re-armed libev timer.

A stream that declares ``deadline_by_caller`` (TCP, TLS) carries no socket timeout: the connect
timeout, the park threshold and keep alive are checked when the timer fires against the time the
current ``recv`` started waiting, so nothing is armed or cancelled per ``recv``. Other streams get a
socket timeout. A mixin of ``fluxmq.protocol.connection.MQTTConnection``, which holds its state.
"""

from __future__ import annotations

import gevent


class ReadDeadline:
    """Read deadlines (``_set_deadline``) and the timer behind them."""

    __slots__ = ()

    def _set_deadline(self, seconds: float | None) -> None:
        """Bound each following recv to ``seconds`` (None: unbounded; 0.0: one try, no wait); before
        CONNECT the bound is the absolute connect deadline instead."""
        if not self._by_timer:
            self.stream.settimeout(seconds)
            return
        if seconds == 0.0:
            self.stream.settimeout(0.0)  # rare: the try to park right after CONNECT
            self._period = None
            return
        self.stream.settimeout(None)
        self._period = seconds
        if seconds is None:
            return
        at = gevent.get_hub().loop.now() + seconds
        if self._timer is None or self._timer_at > at:
            self._arm(seconds)

    def _arm(self, after: float) -> None:
        self._disarm()
        timer = gevent.get_hub().loop.timer(after)
        timer.start(self._on_deadline)
        self._timer = timer
        self._timer_at = timer.loop.now() + after

    def _disarm(self) -> None:
        timer = self._timer
        if timer is not None:
            self._timer = None
            self._timer_at = 0.0  # no float kept per parked connection
            timer.stop()
            timer.close()

    def _on_deadline(self) -> None:
        # Hub callback. Raise TimeoutError in the reader if its recv has waited the whole period
        # (what a socket timeout would have done); otherwise wait for the rest of it.
        timer = self._timer
        self._timer = None
        if timer is not None:
            timer.close()
        period = self._period
        reader = self._reader
        if period is None or reader is None or self.closed:
            return
        now = gevent.get_hub().loop.now()
        wait_from = self._wait_from
        if self.session is None and self._connect_until:
            left = self._connect_until - now  # before CONNECT: one deadline for the whole exchange
            if left > 0.0 or not wait_from:
                # Past the deadline but busy in a handler (an AUTH exchange): look again shortly.
                self._arm(left if left > 0.0 else 0.05)
                return
        elif not wait_from:
            self._arm(period)  # busy in a handler: the next recv starts a new period
            return
        else:
            left = wait_from + period - now
            if left > 0.0:
                self._arm(left)
                return
        self._wait_from = 0.0
        reader.throw(TimeoutError("read timeout"))
