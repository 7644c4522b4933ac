"""The file descriptors of this process: how many of them client connections may take.

A process at its ``RLIMIT_NOFILE`` can neither accept (``EMFILE``: the client waits in the kernel's
backlog, unanswered) nor open anything else: storage files, HTTP requests, the workers' links. So
client connections stop short of the limit. The kernel gives an accepted socket the lowest free
descriptor number, so a socket numbered N means descriptors 0..N-1 are all in use: comparing the
number with the budget costs nothing per connection.

* below ``budget`` (the soft limit less a reserve): the client is served;
* from ``budget``: it is refused like one over ``max_connections`` (CONNACK "server unavailable",
  5.0: 0x97) and closed, so its descriptor comes back;
* from ``hard_stop`` (the last few descriptors, only reached while many refusals wait for their
  CONNECT): closed at once, without a CONNACK.

Refusals (``connection_refused_fd_limit``) and accepts that failed for want of a descriptor
(``accept_failed_fd_limit``: the listener then pauses accepting) are each logged as one warning line
per listener every ``LOG_EVERY`` seconds, with their count.
"""

from __future__ import annotations

import logging
import os
import resource
import time

log = logging.getLogger("fluxmq.transport")

#: descriptors kept for the process's own work, at least this many ...
RESERVE_MIN = 32
#: ... or this share of the limit (1/50: 400 of 20,000)
RESERVE_DIVISOR = 50
#: the last descriptors: a socket numbered this close to the limit is closed without a CONNACK
CLOSE_AT_ONCE = 8
#: seconds between two refusal log lines of one listener
LOG_EVERY = 10.0
#: the soft limit counted when it is unlimited
UNLIMITED = 1 << 20

SERVE, REFUSE, CLOSE = 0, 1, 2


def nofile_limit() -> int:
    """This process's soft ``RLIMIT_NOFILE``."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return UNLIMITED if soft == resource.RLIM_INFINITY else soft


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (as the Go runtime does at start); returns
    (soft, hard) as they are after. Workers forked later inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


class FdBudget:
    """What a listener does with an accepted socket, by its descriptor number; logs refusals."""

    __slots__ = ("listener", "limit", "budget", "hard_stop", "_pending", "_logged_at")

    def __init__(self, listener: str, limit: int | None = None) -> None:
        self.listener = listener
        self.limit = nofile_limit() if limit is None else limit
        self.budget = self.limit - max(RESERVE_MIN, self.limit // RESERVE_DIVISOR)
        self.hard_stop = self.limit - CLOSE_AT_ONCE
        self._pending = [0, 0]  # refusals, failed accepts since their last log line
        self._logged_at = [-LOG_EVERY, -LOG_EVERY]

    def verdict(self, fd: int) -> int:
        """SERVE, REFUSE or CLOSE the socket numbered ``fd`` (refusals are counted for the log)."""
        if fd < self.budget:
            return SERVE
        self.note_refusal(fd)
        return CLOSE if fd >= self.hard_stop else REFUSE

    def note_refusal(self, fd: int) -> None:
        """Count one client refused on descriptor ``fd``; log at most every LOG_EVERY s."""
        self._pending[0] += 1
        self._log(0, "connection_refused_fd_limit", {"refused": self._pending[0], "fd": fd})

    def note_accept_failed(self) -> None:
        """Count one accept that failed for want of a descriptor; log at most every LOG_EVERY s."""
        self._pending[1] += 1
        self._log(1, "accept_failed_fd_limit", {"failed": self._pending[1]})

    def _log(self, kind: int, event: str, figures: dict) -> None:
        now = time.monotonic()
        if now - self._logged_at[kind] >= LOG_EVERY:
            log.warning(event, extra={"listener": self.listener, "pid": os.getpid(), **figures,
                                      "fd_limit": self.limit, "fd_budget": self.budget})  # fmt: skip
            self._logged_at[kind] = now
            self._pending[kind] = 0
