"""SysTopics: periodic retained ``$SYS/broker/...`` messages, so a new subscriber gets them at once."""

from __future__ import annotations

import logging

import gevent

from fluxmq import __version__

from .behind_io import sleep_behind_io
from .broker import Broker
from .message import Message

log = logging.getLogger("fluxmq.broker.sys")


class SysTopics:
    """Publishes broker figures under ``$SYS/broker/`` every ``interval`` seconds (0 disables)."""

    def __init__(self, broker: Broker, interval: float, totals=None) -> None:
        self.broker = broker
        self.interval = interval
        # Several workers: ``totals(values) -> values`` turns this worker's figures into the node's
        # (installed by the node; the broker never imports what computes them).
        self.totals = totals
        self._greenlet = None

    def values(self) -> dict[str, str]:
        """The current $SYS figures, topic suffix -> text payload."""
        b = self.broker
        st = b.stats
        return {
            "version": f"fluxmq version {__version__}",
            "uptime": f"{st.uptime()} seconds",
            "clients/connected": str(b.connected),
            "clients/total": str(b.session_count()),
            "clients/disconnected": str(b.session_count() - b.connected),
            "messages/received": str(st.messages_received),
            "messages/sent": str(st.messages_sent),
            "publish/messages/received": str(st.publish_received),
            "publish/messages/sent": str(st.publish_sent),
            "publish/messages/dropped": str(st.dropped_total),
            **{f"publish/messages/dropped/{reason}": str(n) for reason, n in st.drops.items()},
            "bytes/received": str(st.bytes_received),
            "bytes/sent": str(st.bytes_sent),
            "subscriptions/count": str(b.subscription_count()),
            "retained messages/count": str(len(b.retained)),
        }

    def queue_values(self) -> dict[str, str]:
        """``queues/{name}/depth|consumers|appended|delivered|acked|dead_lettered`` per durable queue."""
        manager = self.broker.queues
        if manager is None:
            return {}
        out = {"queues/count": str(len(manager.queues))}
        for q in manager.describe():
            base = f"queues/{q['name']}/"
            out[base + "depth"] = str(q["depth"])
            out[base + "consumers"] = str(q["consumers"])
            for name in ("appended", "delivered", "acked", "nacked", "rejected", "dead_lettered", "expired"):
                out[base + name] = str(q["counters"].get(name, 0))
        return out

    def publish_once(self) -> None:
        values = {**self.values(), **self.queue_values()}
        if self.totals is not None:  # several workers: each queue's figures come from its owner
            values = self.totals(values)
        for suffix, text in values.items():
            self.broker.publish(Message(f"$SYS/broker/{suffix}", text.encode(), 0, True))

    def start(self) -> None:
        if self.interval > 0:
            self.publish_once()
            self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            sleep_behind_io(self.interval)
            try:
                self.publish_once()
            except Exception:  # a bug here must not end $SYS for the life of the node
                log.exception("sys_publish_failed")

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None
