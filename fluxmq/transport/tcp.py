"""TCP listener: a gevent StreamServer whose handler runs one MQTTConnection per socket."""

from __future__ import annotations

import errno
import logging
import socket

import gevent
from gevent.server import StreamServer
from gevent.socket import wait_write

from fluxmq.broker.broker import Broker
from fluxmq.protocol.connection import MQTTConnection
from fluxmq.protocol.flush import FlushScheduler
from fluxmq.protocol.settings import ProtocolSettings

from .fdlimit import CLOSE, SERVE, FdBudget

log = logging.getLogger("fluxmq.transport")


class SocketStream:
    """The stream interface MQTTConnection reads and writes, over a plain gevent socket."""

    __slots__ = ("sock", "raw", "peer", "drained")

    # The connection bounds recv with its own timer: a TimeoutError thrown into recv's wait is safe.
    deadline_by_caller = True
    # The socket's bytes are the MQTT stream itself: the connection's C path may recv and send on
    # its descriptor directly (protocol/_hub_read.pyx). Not so for TLS or WebSocket streams.
    plain_socket = True

    def __init__(self, sock, address) -> None:
        self.sock = sock
        self.raw = sock._sock  # the OS socket, non-blocking: used for sends that must never switch
        host, port = address[:2]
        self.peer = f"{host}:{port}"
        self.drained = (
            False  # the last recv took less than asked: the kernel had nothing more (read by the connection)
        )

    def recv(self, n: int) -> bytes:
        sock = self.sock
        if self.drained and sock.timeout is None:
            # The last read emptied the kernel's buffer, so a read now would most likely fail:
            # wait for readability first (one wait either way) and save the failing syscall and
            # its BlockingIOError. A lone message costs one recv instead of two.
            sock._wait(sock._read_event)
        while True:
            try:
                data = self.raw.recv(n)
                break
            except BlockingIOError:
                if sock.timeout == 0.0:
                    raise  # the try to park: no wait
                sock._wait(sock._read_event)  # TimeoutError at the socket's timeout, if it has one
        self.drained = len(data) < n
        return data

    def recv_nowait(self, n: int) -> bytes:
        """What the kernel holds now (b"" at end of stream); BlockingIOError when nothing. Never switches."""
        data = self.raw.recv(n)
        self.drained = len(data) < n
        return data

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def send_nowait(self, data) -> int:
        """Write what the kernel takes now; 0 when its buffer is full. Never blocks or switches."""
        try:
            return self.raw.send(data)
        except BlockingIOError:
            return 0

    def send_all(self, data: bytes, timeout: float | None) -> None:
        """Write everything, waiting for writability (at most ``timeout`` s per wait)."""
        view = memoryview(data)
        fd = self.sock.fileno()
        while view:
            try:
                n = self.raw.send(view)
            except BlockingIOError:
                n = 0
            if n:
                view = view[n:]
            else:
                wait_write(fd, timeout=timeout, timeout_exc=TimeoutError("write timeout"))

    def fileno(self) -> int:
        return self.sock.fileno()

    def has_buffered(self) -> bool:
        """Bytes already read from the socket but not yet returned by recv (none for plain TCP)."""
        return False

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


#: seconds a listener stops accepting after an accept failed for want of a file descriptor
ACCEPT_PAUSE = 0.5


class _ConnectionServer(StreamServer):
    """A StreamServer that leaves closing to the connection: a parked connection outlives the
    greenlet that accepted it (StreamServer would close the socket when its handler returns)."""

    #: set by the listener: counts and logs an accept that failed for want of a descriptor
    fd_budget: FdBudget | None = None

    def do_close(self, sock, *args) -> None:
        pass

    def do_read(self):
        try:
            return super().do_read()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE) or self.fd_budget is None:
                raise
        # Out of descriptors (the budget's reserve spent): one log line instead of gevent's
        # traceback per retry, and a pause before the next accept; connections held are untouched.
        self.fd_budget.note_accept_failed()
        self.stop_accepting()
        gevent.spawn_later(ACCEPT_PAUSE, self._resume_accepting)
        return None

    def _resume_accepting(self) -> None:
        if self.started and not self.closed:
            self.start_accepting()


class TCPListener:
    """Accepts MQTT clients on one address; counts them against ``max_connections``.

    ``stream_factory(sock, address)``, when given, makes the connection's stream in the connection's
    own greenlet (the TLS and WebSocket handshakes); it returns None, having closed the socket, when
    the handshake fails. Without it the stream is a plain SocketStream. ``sock``, when given, is a
    listening socket bound already (``host``/``port`` are then only for logs).
    """

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        broker: Broker,
        settings: ProtocolSettings,
        flusher: FlushScheduler,
        max_connections: int = 10000,
        backlog: int = 1024,
        stream_factory=None,
        sock=None,
    ) -> None:
        self.name = name
        self.stream_factory = stream_factory
        self.broker = broker
        self.settings = settings
        self.flusher = flusher
        self.max_connections = max_connections
        self.connections: set[MQTTConnection] = set()
        self._forget = self.connections.discard  # every connection's on_close: one bound method, not one each
        self.fd_budget: FdBudget | None = None  # made at start(), under the process's final fd limit
        if sock is not None:  # bound already (by the arbiter: one socket per worker, SO_REUSEPORT)
            self._server = _ConnectionServer(sock, self._handle)
        else:
            self._server = _ConnectionServer((host, port), self._handle, backlog=backlog)
            self._server.reuse_addr = 1

    @property
    def address(self) -> tuple[str, int]:
        return self._server.address[:2]

    def start(self) -> None:
        """Bind and start accepting (raises OSError when the address is in use)."""
        self.fd_budget = self._server.fd_budget = FdBudget(self.name)
        if self.max_connections > self.fd_budget.budget:
            log.warning("max_connections_above_fd_limit", extra={
                "listener": self.name, "max_connections": self.max_connections,
                "fd_limit": self.fd_budget.limit, "fd_budget": self.fd_budget.budget})  # fmt: skip
        self._server.start()
        log.info("listening", extra={"listener": self.name, "addr": "{}:{}".format(*self.address)})

    def stop_accepting(self) -> None:
        self._server.close()

    def _handle(self, sock, address) -> None:
        verdict = self.fd_budget.verdict(sock.fileno())
        if verdict == CLOSE:
            sock.close()  # the process's last descriptors: no room even to read a CONNECT
            return
        auth = self.broker.auth
        gate = auth.connect_gate if auth is not None else None
        if gate is not None and not gate(address[0]):
            sock.close()  # over limits.connect_rate for its address: closed before a byte is read
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            sock.close()
            return
        if self.stream_factory is None:
            stream = SocketStream(sock, address)
        else:
            stream = self.stream_factory(sock, address)
            if stream is None:
                return
        conn = MQTTConnection(
            self.broker,
            stream,
            self.settings,
            self.flusher,
            self.name,
            over_limit=verdict != SERVE or len(self.connections) >= self.max_connections,
        )
        conn.on_close = self._forget
        self.connections.add(conn)
        conn.run()  # returns when the connection ends or parks; on_close tells the listener it ended

    def wait_closed(self, timeout: float) -> bool:
        """Wait until every connection of this listener has ended; False on timeout."""
        with gevent.Timeout(timeout, False):
            while self.connections:
                gevent.sleep(0.05)
            return True
        return False
