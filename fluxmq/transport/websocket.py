"""MQTT over WebSocket: the upgrade handshake and a WebSocket stream, with wsproto on gevent sockets.

``WebSocketUpgrade`` is a listener's stream factory: in the connection's own greenlet, and within a
deadline, it reads the HTTP upgrade request from the inner stream (plain TCP, or TLS for wss://),
refuses a wrong path with 404, a request without the ``mqtt`` (or ``mqttv3.1``) subprotocol with
400 and a refused ``Origin`` with 403, and otherwise answers 101 and returns a ``WebSocketStream``.

``WebSocketStream`` gives MQTTConnection the same interface as the plain ``SocketStream``: ``recv``
returns the payload bytes of binary frames as one byte stream (an MQTT packet may span frames and
a frame may carry several packets), answers pings and the close handshake; ``send_nowait`` and
``send_all`` frame the connection's output as binary frames. A text frame closes the connection
[MQTT-6.0.0-1]. wsproto parses the handshake and the client's frames; the server's own data frames
are built here (a header and the unmasked payload), which lets a frame be written in parts.

Writes keep the plain stream's contract: ``send_nowait(data)`` returns how many bytes of ``data`` are
written (whole frames or part of one), and the caller presents the unwritten rest, first, to the
next call. A frame started but not finished is remembered (header bytes still owed, payload bytes
still due) and completed from the caller's next bytes; control frames (pong, close) wait for a
frame boundary. Over TLS the inner stream writes all or nothing and needs the same bytes again after
a refusal, which this bookkeeping also guarantees.
"""

from __future__ import annotations

import logging
import struct
import time

import gevent
import h11
from gevent.lock import Semaphore
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from fluxmq.errors import ConfigError
from fluxmq.transport.tcp import SocketStream

log = logging.getLogger("fluxmq.transport")

__all__ = ["SUBPROTOCOLS", "OriginPolicy", "WebSocketStream", "WebSocketUpgrade"]

# MQTT 3.1.1/5.0 register "mqtt" [MQTT-6.0.0-3]; MQTT 3.1 clients offer "mqttv3.1".
SUBPROTOCOLS = ("mqtt", "mqttv3.1")

MAX_REQUEST_HEAD = 16384  # bytes of HTTP request line and headers accepted before refusing
CONTROL_TIMEOUT = 10.0  # bound on the reader's own write of a pong or close frame
_CONCAT_LIMIT = 65536  # below this a frame header and its payload go out in one write


def frame_header(length: int) -> bytes:
    """The header of a final, unmasked binary frame with ``length`` payload bytes (RFC 6455 5.2)."""
    if length < 126:
        return bytes((0x82, length))
    if length < 65536:
        return struct.pack("!BBH", 0x82, 126, length)
    return struct.pack("!BBQ", 0x82, 127, length)


class OriginPolicy:
    """Which ``Origin`` headers a listener accepts (as the Go broker: [] or ``*`` = any; a request
    without Origin, i.e. not from a browser, is accepted; ``*.example.com`` matches subdomains)."""

    def __init__(self, allowed: list[str] | tuple[str, ...]) -> None:
        self.allow_all = not allowed or "*" in allowed
        self.exact = {a.lower().rstrip("/") for a in allowed if not a.startswith("*.")}
        self.suffixes = tuple(a[1:].lower() for a in allowed if a.startswith("*."))  # ".example.com"

    def allows(self, origin: str | None) -> bool:
        if self.allow_all or not origin:
            return True
        origin = origin.strip().lower().rstrip("/")
        if origin in self.exact:
            return True
        scheme, sep, host = origin.partition("://")
        if not sep:
            return False
        hostname = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        return any(hostname.endswith(suffix) or hostname == suffix[1:] for suffix in self.suffixes)


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class WebSocketUpgrade:
    """Stream factory: runs the HTTP upgrade in the connection's greenlet, returns a WebSocketStream.

    ``inner`` makes the stream the WebSocket runs over (None: a plain ``SocketStream``; a
    ``TLSHandshake`` for wss://). ``timeout`` bounds the whole upgrade. A refused or failed upgrade
    is one log line (``ws_handshake_refused`` / ``ws_handshake_failed``) and returns None.
    """

    def __init__(
        self,
        path: str,
        allowed_origins: list[str] | tuple[str, ...],
        timeout: float | None,
        listener: str,
        inner=None,
    ) -> None:
        self.path = path
        self.origins = OriginPolicy(allowed_origins)
        self.timeout = timeout or None
        self.listener = listener
        self.inner = inner

    @classmethod
    def from_config(
        cls, section: str, cfg, timeout: float | None, listener: str, source=None, inner=None
    ) -> WebSocketUpgrade:
        """The upgrade of listener ``section`` from its ``path`` and ``allowed_origins`` keys."""
        if not cfg.path.startswith("/"):
            raise ConfigError(
                f"{section}.path", 'a path starting with "/"', source("path") if source else "", got=cfg.path
            )
        return cls(cfg.path, list(cfg.allowed_origins), timeout, listener, inner)

    def __call__(self, sock, address) -> WebSocketStream | None:
        if self.inner is None:
            stream = SocketStream(sock, address)
        else:
            stream = self.inner(sock, address)
            if stream is None:
                return None
        try:
            with gevent.Timeout(self.timeout, TimeoutError("websocket handshake timeout")):
                upgraded = self._upgrade(stream)
            if upgraded is not None:
                return upgraded
        except (OSError, TimeoutError, ValueError) as exc:  # ValueError: undecodable request bytes
            reason = (
                "timeout"
                if isinstance(exc, TimeoutError)
                else (" ".join(str(exc).split()) or type(exc).__name__)
            )
            log.info(
                "ws_handshake_failed", extra={"listener": self.listener, "peer": stream.peer, "error": reason}
            )
        except Exception as exc:  # a request wsproto/h11 chokes on must not print a traceback per client
            log.info(
                "ws_handshake_failed",
                extra={
                    "listener": self.listener,
                    "peer": stream.peer,
                    "error": f"{type(exc).__name__}: {exc}",
                },
            )
            log.debug("ws_handshake_failed_traceback", exc_info=True)
        stream.close()
        return None

    def _upgrade(self, stream) -> WebSocketStream | None:
        stream.settimeout(None)  # the caller's gevent.Timeout bounds the whole upgrade
        head = bytearray()
        while True:
            end = head.find(b"\r\n\r\n")
            if end >= 0 and end <= MAX_REQUEST_HEAD:
                break
            if len(head) > MAX_REQUEST_HEAD:
                self._reject(stream, WSConnection(ConnectionType.SERVER), 431, "request head too large")
                return None
            data = stream.recv(4096)
            if not data:
                raise ConnectionResetError("closed during the websocket handshake")
            head += data
        trailing = bytes(head[end + 4 :])
        ws = WSConnection(ConnectionType.SERVER)
        try:
            ws.receive_data(bytes(head[: end + 4]))
            request = next((e for e in ws.events() if isinstance(e, Request)), None)
            if request is None:
                raise _Refused(400, "not an HTTP request")
            subprotocol = self._check(request)
        except RemoteProtocolError as exc:
            hint = exc.event_hint
            status = hint.status_code if isinstance(hint, RejectConnection) else 400
            self._reject(stream, ws, status, str(exc))
            return None
        except _Refused as exc:
            self._reject(stream, ws, exc.status, exc.reason)
            return None
        stream.send_all(ws.send(AcceptConnection(subprotocol=subprotocol)), self.timeout)
        return WebSocketStream(stream, ws, trailing)

    def _check(self, request: Request) -> str:
        target = request.target.partition("?")[0]
        if target != self.path:
            raise _Refused(404, f"unknown path {target}")
        origin = None
        for name, value in request.extra_headers:
            if name.lower() == b"origin":
                origin = value.decode("latin-1")
        if not self.origins.allows(origin):
            raise _Refused(403, f"origin {origin} not allowed")
        for offered in request.subprotocols:
            if offered in SUBPROTOCOLS:
                return offered
        raise _Refused(400, "no mqtt subprotocol offered")

    def _reject(self, stream, ws: WSConnection, status: int, reason: str) -> None:
        log.info(
            "ws_handshake_refused",
            extra={"listener": self.listener, "peer": stream.peer, "status": status, "reason": reason},
        )
        body = f"{reason}\n".encode()
        try:
            data = ws.send(
                RejectConnection(
                    status_code=status,
                    has_body=True,
                    headers=[
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                    ],
                )
            )
            data += ws.send(RejectData(data=body, body_finished=True))
        except (LocalProtocolError, h11.LocalProtocolError):  # too broken a request for wsproto to answer
            data = (
                f"HTTP/1.1 {status} Refused\r\ncontent-type: text/plain; charset=utf-8\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            ).encode() + body
        try:
            stream.send_all(data, self.timeout)
        except (OSError, TimeoutError):
            pass


class WebSocketStream:
    """The MQTTConnection stream over an upgraded WebSocket (see the module docstring)."""

    def __init__(
        self, inner, ws: WSConnection, trailing: bytes = b"", control_timeout: float = CONTROL_TIMEOUT
    ) -> None:
        self.inner = inner
        self.ws = ws
        self.peer = inner.peer
        self.cert_username = getattr(inner, "cert_username", None)
        self.control_timeout = control_timeout
        self._rbuf: list[bytes] = []
        self._eof = False
        self._timeout: float | None = None
        self._owed = b""  # frame bytes that are not the caller's (a header, control frames), written first
        self._due = 0  # payload bytes of the frame being written, still to come from the caller
        self._control = bytearray()  # control frames waiting for a frame boundary
        self._closing = False  # a close frame is queued or sent: no more data frames
        self._lock = Semaphore()  # held by a writer that may block (send_all, or the reader's pong/close)
        if trailing:
            self._feed(trailing)

    # -- reading ---------------------------------------------------------------------------------

    def recv(self, n: int) -> bytes:
        """Payload bytes of the next binary frame(s); b"" at the close handshake or EOF."""
        rbuf = self._rbuf
        deadline = None
        try:
            while not rbuf:
                if self._eof:
                    return b""
                if self._timeout:
                    # Pings alone must not keep a client alive past its read timeout.
                    if deadline is None:
                        deadline = time.monotonic() + self._timeout
                    else:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise TimeoutError("read timeout")
                        self.inner.settimeout(left)
                data = self.inner.recv(n)
                if not data:
                    self._eof = True
                    return b""
                self._feed(data)
                if self._control:
                    self._flush_control()
        finally:
            if deadline is not None:
                self.inner.settimeout(self._timeout)
        data = rbuf[0] if len(rbuf) == 1 else b"".join(rbuf)
        rbuf.clear()
        return data

    def _feed(self, data: bytes) -> None:
        ws = self.ws
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, BytesMessage):
                if event.data:
                    self._rbuf.append(bytes(event.data))
            elif isinstance(event, Ping):
                if not self._closing:
                    self._control += ws.send(event.response())
            elif isinstance(event, CloseConnection):
                self._eof = True
                if ws.state is ConnectionState.REMOTE_CLOSING:
                    self._control += ws.send(event.response())  # complete the close handshake
                    self._closing = True
                elif ws.state is ConnectionState.OPEN:  # wsproto could not parse a frame
                    self._queue_close(event.code, event.reason or "")
                return
            elif isinstance(event, TextMessage):
                # MQTT packets travel in binary frames only [MQTT-6.0.0-1].
                self._queue_close(CloseReason.UNSUPPORTED_DATA, "MQTT needs binary frames")
                self._eof = True
                return

    def _queue_close(self, code: int, reason: str) -> None:
        if self.ws.state is ConnectionState.OPEN:
            self._control += self.ws.send(CloseConnection(code=code, reason=reason or None))
        self._closing = True

    def _flush_control(self) -> None:
        """Write queued control frames from the reader (the writer sends them if it is busy)."""
        if self._lock.locked() or self._due:
            return  # a writer owns the socket or a frame is half written: it sends them after
        try:
            self._push_nowait(b"")
            if self._owed or self._control:
                with self._lock:
                    self._write_all(b"", self.control_timeout)
        except TimeoutError:
            raise ConnectionError("websocket control frame write timed out") from None

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout
        self.inner.settimeout(timeout)

    def fileno(self) -> int:
        return self.inner.fileno()

    def has_buffered(self) -> bool:
        """Payload or TLS bytes already read but not yet returned by recv."""
        if self._rbuf or self._eof:
            return True
        inner_buffered = getattr(self.inner, "has_buffered", None)
        return bool(inner_buffered and inner_buffered())

    # -- writing ---------------------------------------------------------------------------------

    def _segments(self, data, done: int) -> list:
        """The writes that finish the current frame: its owed bytes and the caller's due payload."""
        due = self._due
        if due > len(data) - done:
            raise ConnectionError("websocket stream: the unsent part of a frame was not presented again")
        owed = self._owed
        if not due:
            return [owed]
        payload = data[done : done + due]
        if not owed:
            return [payload]
        if due <= _CONCAT_LIMIT:
            return [owed + payload]
        return [owed, payload]

    def _next_frame(self, data, done: int) -> bool:
        """At a frame boundary: start the next frame (control frames first); False if nothing is left."""
        if self._control:
            self._owed = bytes(self._control)
            self._control.clear()
            return True
        left = len(data) - done
        if not left:
            return False
        if self._closing:
            raise ConnectionError("websocket is closing")
        self._owed = frame_header(left)
        self._due = left
        return True

    def _account(self, n: int) -> int:
        """Record ``n`` bytes written from the head of the current frame; returns payload bytes paid."""
        owed = len(self._owed)
        if n < owed:
            self._owed = self._owed[n:]
            return 0
        self._owed = b""
        paid = n - owed
        self._due -= paid
        return paid

    def _push_nowait(self, data) -> int:
        done = 0
        inner = self.inner
        while True:
            if not self._owed and not self._due and not self._next_frame(data, done):
                return done
            for segment in self._segments(data, done):
                n = inner.send_nowait(segment)
                done += self._account(n)
                if n < len(segment):
                    return done

    def _write_all(self, data, timeout: float | None) -> None:
        done = 0
        inner = self.inner
        while True:
            if not self._owed and not self._due and not self._next_frame(data, done):
                return
            for segment in self._segments(data, done):
                inner.send_all(segment, timeout)
                done += self._account(len(segment))

    def send_nowait(self, data) -> int:
        """Frame and write what the socket takes now (see the module docstring). Never switches."""
        if self._lock.locked():
            return 0
        return self._push_nowait(data)

    def send_all(self, data, timeout: float | None) -> None:
        """Frame and write everything, waiting for writability (at most ``timeout`` s per wait)."""
        with self._lock:
            self._write_all(data, timeout)

    # -- closing ---------------------------------------------------------------------------------

    def _try_close_frame(self) -> None:
        """Best effort: a close frame now, if no frame is half written and nobody is writing."""
        if self._closing or self._lock.locked() or self._owed or self._due:
            return
        try:
            self._queue_close(CloseReason.NORMAL_CLOSURE, "")
            self._push_nowait(b"")
        except (OSError, LocalProtocolError):
            pass

    def shutdown(self) -> None:
        self._try_close_frame()
        self.inner.shutdown()

    def close(self) -> None:
        self._try_close_frame()
        self.inner.close()
