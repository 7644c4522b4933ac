"""The admin topic monitor: ``GET /monitor?filter=F`` on the admin API, a server-sent events stream.

The dashboard's live view. It is the HTTP bridge's ``SSEStream`` (the same bounded, drop-oldest
queue and the same event format as ``/subscribe``) with the admin's authority instead of a broker
user's: the admin token already allowed the request, so no ACL applies, and the stream works when
the HTTP bridge is off. Streams are few (``MAX_STREAMS``), each a session ``admin-monitor-...``
with QoS 0 subscriptions that ends with the response. A browser that stops watching closes its
connection; a greenlet per stream notices at once (the socket turns readable at EOF), so a stopped
monitor frees its slot without waiting for a heartbeat write to fail.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from fluxmq.errors import TopicFilterInvalid
from fluxmq.http.bridge import (
    HTTPError,
    SSEStream,
    StreamBody,
    allow_methods,
    check_filters,
    one_param,
    query,
)
from fluxmq.http.router import HEAD_REQUEST, json_response

log = logging.getLogger("fluxmq.http.monitor")

CLIENT_PREFIX = "admin-monitor-"
MAX_STREAMS = 8  # a dashboard holds one; each holds a greenlet of the admin listener while open
MAX_FILTERS = 8
QUEUE_SIZE = 1000  # messages waiting for a slow browser before the oldest are dropped
HEARTBEAT = 15.0  # seconds; a comment line that makes a gone browser fail a write
LISTENER = "admin_monitor"


class MonitorStream(SSEStream):
    """An ``SSEStream`` shown as the admin monitor's in session lists."""

    listener = LISTENER


class TopicMonitor:
    """Opens and bounds the monitor streams of one admin API."""

    def __init__(self, max_streams: int = MAX_STREAMS) -> None:
        self.max_streams = max_streams
        self.streams: set[MonitorStream] = set()

    def __call__(self, broker: Any, environ: dict, start_response: Callable) -> Iterable[bytes]:
        """Answer ``GET /monitor?filter=F[&filter=G]`` (the caller authenticated the request)."""
        try:
            allow_methods(environ, ("GET",))
            if not broker.accepting:
                raise HTTPError(503, "the broker is shutting down")
            params = query(environ)
            unknown = sorted(set(params) - {"filter", "retained"})
            if unknown:
                raise HTTPError(400, f"unknown parameter {unknown[0]!r}")
            filters = params.get("filter") or []
            if not filters or len(filters) > MAX_FILTERS:
                raise HTTPError(400, f"1 to {MAX_FILTERS} filter parameters are required")
            retained = (one_param(params, "retained", "false") or "").lower()
            if retained not in ("true", "false"):
                raise HTTPError(400, "retained must be true or false")
            if len(self.streams) >= self.max_streams:
                raise HTTPError(
                    429, f"too many monitor streams ({self.max_streams}) are open", {"Retry-After": "5"}
                )
            peer = f"{environ.get('REMOTE_ADDR', '')}:{environ.get('REMOTE_PORT', '')}"
            if HEAD_REQUEST in environ:  # the GET's checks and headers, no stream
                check_filters(filters)
                body = []
            else:
                body = self.open(broker, filters, peer, retained == "true", environ.get("gunicorn.socket"))
        except HTTPError as err:
            return json_response(start_response, *err.response())
        start_response(
            "200 OK",
            [
                ("Content-Type", "text/event-stream; charset=utf-8"),
                ("Cache-Control", "no-store"),
                ("X-Accel-Buffering", "no"),
            ],
        )
        return body

    def open(
        self, broker: Any, filters: list[str], peer: str, with_retained: bool, sock: Any = None
    ) -> StreamBody:
        """A stream subscribed to ``filters`` (QoS 0); retained messages first when asked. ``sock``:
        the client's connection, watched so the stream ends as soon as the client goes."""
        client_id = CLIENT_PREFIX + uuid.uuid4().hex
        stream = MonitorStream(client_id, QUEUE_SIZE, broker, peer, "admin")
        session, _ = broker.open_session(client_id, True, 0, None, None)
        broker.attach(session, stream, 0)
        self.streams.add(stream)
        try:
            results = [broker.subscribe(session, f, 0) for f in filters]
        except TopicFilterInvalid as exc:
            self.end(stream, session)
            raise HTTPError(400, f"invalid topic filter: {exc.reason}") from None
        if with_retained:
            for result in results:
                if result.retained:
                    broker.deliver_retained(session, result)
        log.info(
            "admin_monitor_open", extra={"client_id": client_id, "peer": peer, "filters": ",".join(filters)}
        )
        return StreamBody(self.end, stream, session, HEARTBEAT, sock)

    def end(self, stream: MonitorStream, session: Any) -> None:
        if stream not in self.streams:
            return
        self.streams.discard(stream)
        stream.closed = True
        stream.broker.close_session(session, stream, False)
        log.info("admin_monitor_closed", extra={"client_id": stream.client_id, "dropped": stream.dropped})
