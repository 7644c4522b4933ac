"""Periodic background work that waits behind input: a sleep whose wake-up is served after I/O.

``gevent.sleep`` wakes its greenlet from a libev timer of the default priority, the same as a
connection's I/O watcher; when the timer expires in the poll that brings a message, libev runs the
timer's greenlet first (timers before I/O within one priority), and the message waits for it: the
worker's heartbeat (cold Python, ~120-150 us with its ``utimensat``) delayed a message in 85 % of
its turns, because the loop's poll timeout (whole milliseconds) lets the timer expire with the next
message at 1,000 msg/s (bench/RESULTS.md, "The heartbeat and the arbiter's look"). A timer of the
lowest priority is invoked after every I/O watcher made pending by the same poll; a message's write
may still be a loop callback that the read queued (the flush scheduler), so the sleeper then queues
itself behind the callbacks already queued; and as the scheduler often lets the waker run on, a
reader woken on this CPU would still wait for the turn: the sleeper yields the CPU once first.

The expired timer does not switch to the sleeper itself: it only queues that switch as a loop callback
(C code, no Python frame of the sleeper). Switched to at once, the sleeper's greenlet (idle for
seconds: cold stack, cold code) ran 60-90 us before the write that a read of the same poll had queued;
one lone message per heartbeat waited for it (bench/RESULTS.md, "The heartbeat's wake before the
write").
"""

from __future__ import annotations

import os

import gevent
from gevent.hub import Waiter

#: libev's lowest priority (EV_MINPRI): invoked after the pending watchers of every other priority
LOWEST_PRIORITY = -2


def sleep_behind_io(seconds: float) -> None:
    """``gevent.sleep(seconds)``, but input that arrives in the poll where the sleep ends is served
    first (read, routed, written) before this greenlet resumes."""
    hub = gevent.get_hub()
    loop = hub.loop
    timer = loop.timer(seconds, 0.0, True, LOWEST_PRIORITY)
    waiter = Waiter(hub)
    # The timer queues the switch behind the loop callbacks those reads queued (their writes). A
    # switch still queued when this greenlet is killed finds the waiter idle and only stores None.
    timer.start(loop.run_callback, waiter.switch, None)
    try:
        waiter.get()
    finally:
        timer.close()
    # The writes woke their readers; one on this CPU (a client beside the broker) would otherwise
    # wait for the rest of this turn, as the scheduler lets the waker run on.
    os.sched_yield()
