"""The Raft transport: pysyncobj's, over connections of ours, plain TCP or TLS / mutual TLS
(``cluster.raft.tls.*``), inside pysyncobj's own poller.

pysyncobj's ``TCPTransport`` makes its connections with ``TcpConnection`` and its listener with
``TcpServer``: plain TCP, and every frame is unpickled. ``RaftTransport`` is that transport with both
replaced (``RaftConnection``, ``RaftServer``); everything else (which side dials, the first message
naming the sender's Raft address, reconnects, pysyncobj's optional password layer) is pysyncobj's.

The frame is pysyncobj's (a length, a zlib stream, a pickle: either kind of node reads the other's),
written for less: pickle protocol 5 where pysyncobj writes 2 (whose bytes objects, every entry of
the log, are latin-1 texts to encode and decode again), at zlib level ``cluster.raft.compression``
(default 0, a stored stream: the bytes as they are) where pysyncobj compresses at 3. For an
append_entries of 200 records on loopback: 36 + 72 us to write against 2 + 17, 15 + 30 us to read
against 2 + 14 (bench/RESULTS.md, "Raft frames and commands").

How it stays off the hub's back. The sockets stay non-blocking and are polled by pysyncobj's poller
(whose ``select`` is gevent's), as before. TLS runs sans-IO: an ``ssl.SSLObject`` over two
``MemoryBIO``s, fed with what the socket gave and drained into the socket's write buffer. So a TLS
read or write never waits: the handshake advances on each readiness event, encrypted output is
queued like plain output, and a partial TLS record waits in the incoming BIO for the next event.

What is refused before anything is unpickled. A connection's bytes reach pysyncobj's framing only
after the handshake succeeded on this side: under ``client_auth: require`` that means the peer
presented a certificate that verifies against ``ca_file``. A plain-TCP client, a client without a
certificate or with one from another CA fails the handshake; that is one log line
(``raft_tls_handshake_failed``, at most one per peer host and reason every 30 s) and the
connection is closed. The dialling side verifies the listener's certificate against ``ca_file``
and its name (``server_name``, else the host of the peer's Raft address) before it sends anything.
"""

from __future__ import annotations

import functools
import logging
import pickle
import socket
import ssl
import struct
import time
import zlib
from dataclasses import dataclass

import pysyncobj.pickle as pysyncobj_pickle
from pysyncobj.dns_resolver import globalDnsResolver
from pysyncobj.monotonic import monotonic
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import CONNECTION_STATE, _getAddrType, set_keepalive
from pysyncobj.transport import TCPTransport

log = logging.getLogger("fluxmq.replication")

__all__ = ["HubPoller", "RaftTLS", "RaftConnection", "RaftServer", "RaftTransport", "raft_tls"]

SECTION = "cluster.raft.tls"
#: plaintext handed to the SSLObject per write: one TLS record at most (16 KiB)
RECORD = 16384
#: a connection that has not finished its handshake by then is closed (a silent stranger)
HANDSHAKE_TIMEOUT = 5.0
#: one handshake failure log line per (peer host, reason) per this many seconds
LOG_EVERY = 30.0

#: pickle protocol of the frames written (pickle.loads reads any: pysyncobj's nodes read them)
FRAME_PICKLE = 5
#: bytes asked of the socket per recv; a read that returns fewer emptied the kernel's buffer
READ_SIZE = 65536

_EAGAIN = (socket.errno.EAGAIN, socket.errno.EWOULDBLOCK)
_failures_logged: dict[tuple[str, str], float] = {}


@dataclass(frozen=True)
class RaftTLS:
    """The node's TLS contexts for every Raft group: one to accept peers, one to dial them."""

    server: ssl.SSLContext
    client: ssl.SSLContext
    server_name: str  # "" = verify each peer's certificate against its Raft address's host
    client_auth: str  # require | none


def raft_tls(raft, origin=lambda key: "", warn: bool = True) -> RaftTLS | None:
    """The contexts from ``cluster.raft.tls`` (None when not enabled). A missing or unreadable
    file, a key that does not match its certificate, an unknown cipher suite is one ``ConfigError``
    naming the key, the file it was set in and the file it names."""
    tls = raft.tls
    if not tls.enabled:
        return None
    from fluxmq.transport.tls import TLS_VERSIONS, load_ca_file, readable_file, server_context

    def source(leaf: str) -> str:
        return origin(f"{SECTION}.{leaf}")

    for leaf, what in (
        ("cert_file", "a readable PEM certificate file"),
        ("key_file", "a readable PEM private key file"),
        ("ca_file", "a readable PEM CA file (peers' certificates are verified against it)"),
    ):
        readable_file(SECTION, leaf, getattr(tls, leaf), source, what, f"{SECTION}.enabled is true")
    # The accepting side: the listeners' context builder (same keys, same errors).
    server = server_context(SECTION, tls, source)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = TLS_VERSIONS[tls.min_version]
    client.load_cert_chain(tls.cert_file, tls.key_file)  # loaded above already: no error left here
    load_ca_file(client, SECTION, tls.ca_file, source)
    client.check_hostname = True
    client.verify_mode = ssl.CERT_REQUIRED
    if tls.cipher_suites:
        from fluxmq.transport.tls import TLS12_SUITES, TLS13_SUITES

        client.set_ciphers(
            ":".join(TLS12_SUITES.get(n, n) for n in tls.cipher_suites if n not in TLS13_SUITES) or "DEFAULT"
        )
    if warn and tls.client_auth == "none" and not getattr(raft, "password", ""):
        log.warning(
            "raft_tls_without_client_certificates",
            extra={
                "detail": "any host that reaches a Raft port and completes TLS can send what the node unpickles; "
                "set client_auth require or cluster.raft.password"
            },
        )
    return RaftTLS(server, client, tls.server_name, tls.client_auth)


def _log_failure(peer: str, side: str, reason: str) -> None:
    host = peer.rsplit(":", 1)[0]
    now = time.monotonic()
    key = (host, reason)
    if now - _failures_logged.get(key, -LOG_EVERY) >= LOG_EVERY:
        _failures_logged[key] = now
        if len(_failures_logged) > 1000:
            _failures_logged.clear()
        log.warning("raft_tls_handshake_failed", extra={"peer": peer, "side": side, "reason": reason})


def encode_frame(conn, message, level: int) -> bytes:
    """pysyncobj's frame of ``message`` (its connection key and password layer included), pickled
    with FRAME_PICKLE and compressed at zlib ``level`` (0: ``_stored``)."""
    if conn.sendRandKey:
        message = (conn.sendRandKey, message)
    data = pickle.dumps(message, FRAME_PICKLE)
    if conn.encryptor:
        data = zlib.compress(data, level) if level else b"".join(_stored(data))
        data = conn.encryptor.encrypt_at_time(data, int(monotonic()))
        return struct.pack("i", len(data)) + data
    if level:
        data = zlib.compress(data, level)
        return struct.pack("i", len(data)) + data
    parts = _stored(data)
    parts[0] = struct.pack("i", sum(map(len, parts))) + parts[0]
    return b"".join(parts)


_BLOCK = 0xFFFF  # the longest stored block of a deflate stream


def _stored(data) -> list:
    """The pieces of a zlib stream of ``data`` in stored deflate blocks (what zlib writes at level
    0), written without zlib's compressor: that one allocates ~256 KiB of state per call, paged in
    afresh each time (~80 us a frame against ~2; bench/RESULTS.md). Any zlib reader reads it."""
    n = len(data)
    adler = struct.pack(">I", zlib.adler32(data))
    if n <= _BLOCK:
        return [b"\x78\x01" + struct.pack("<BHH", 1, n, n ^ 0xFFFF), data, adler]
    view = memoryview(data)
    parts = [b"\x78\x01"]
    for start in range(0, n, _BLOCK):
        block = view[start : start + _BLOCK]
        size = len(block)
        parts.append(struct.pack("<BHH", start + _BLOCK >= n, size, size ^ 0xFFFF))
        parts.append(block)
    parts.append(adler)
    return parts


def _inflate(data: bytes):
    """The bytes of the zlib stream ``data``: a stream of one stored block (ours at compression
    0) by its header and Adler-32, a view of ``data`` (zlib's decompressor allocates its state and
    a 32 KiB window per call); any other by zlib. A stream that does not check raises."""
    n = len(data) - 11
    if n >= 0 and data[0] == 0x78 and data[1] == 0x01 and data[2] == 1:
        size, check = struct.unpack_from("<HH", data, 3)
        if size == n and size ^ check == 0xFFFF:
            body = memoryview(data)[7 : 7 + n]
            if zlib.adler32(body) != struct.unpack_from(">I", data, 7 + n)[0]:
                raise zlib.error("incorrect data check")
            return body
    return zlib.decompress(data)


def _loads(data):
    """pysyncobj's ``loads`` (which retries a Python 2 pickle), reading a view without a copy."""
    try:
        return pickle.loads(data)
    except Exception:
        return pysyncobj_pickle.loads(bytes(data))


#: the frame encoded last (message, compression level, frame): pysyncobj builds an equal message
#: for each follower at the same index, sent one after the other; encoded once (no password layer)
_last_frame: list = [None, -1, b""]


class HubPoller:
    """pysyncobj's poller (``subscribe`` / ``unsubscribe`` / ``poll``) on persistent I/O watchers
    of the gevent hub: one per socket, made when pysyncobj subscribes it and changed only when the
    events it waits for change (a send that did not go out whole adds writability).

    A watcher's callback runs in the hub: it hands the event to the connection (which reads and
    hands each whole message to pysyncobj) and then calls ``on_turn``, the rest of what a tick did
    after its poll (the group's ``_RaftNode.turn``: the leader's commit index from the answers just
    read, the committed entries applied, their holds resolved). So an answer is read, committed
    and acknowledged in the hub turn that read it: no driver greenlet to wake, no watcher made,
    started and closed per wait (gevent's ``select`` makes them at every call), no ``select`` of
    the fds first. ``poll`` waits for nothing: the group's driver ticks on a timer for pysyncobj's
    timeouts (elections, heartbeats, reconnects)."""

    def __init__(self, on_turn=None) -> None:
        import gevent

        self._loop = gevent.get_hub().loop
        self.on_turn = on_turn
        self.watchers: dict[int, object] = {}  # fd -> its watcher
        self._callbacks: dict[int, object] = {}  # fd -> pysyncobj's callback(fd, event mask)

    def subscribe(self, descr, callback, eventMask) -> None:  # noqa: N803
        events = 1 if eventMask & POLL_EVENT_TYPE.READ else 0  # libev's READ
        if eventMask & POLL_EVENT_TYPE.WRITE:
            events |= 2  # libev's WRITE
        self._callbacks[descr] = callback
        watcher = self.watchers.get(descr)
        if watcher is not None:
            if watcher.events == events:
                return
            watcher.stop()
            watcher.close()
        watcher = self.watchers[descr] = self._loop.io(descr, events)
        watcher.start(self._on_event, descr, pass_events=True)

    def unsubscribe(self, descr) -> None:
        self._callbacks.pop(descr, None)
        watcher = self.watchers.pop(descr, None)
        if watcher is not None:
            watcher.stop()
            watcher.close()

    def poll(self, timeout) -> None:
        """Nothing to wait for: the watchers' callbacks serve the sockets as they become ready."""

    def close(self) -> None:
        for descr in list(self.watchers):
            self.unsubscribe(descr)

    def _on_event(self, revents: int, descr: int) -> None:
        callback = self._callbacks.get(descr)
        if callback is None:
            return
        try:
            # libev reports an error as readable and writable: the read or the send meets it
            callback(descr, revents & (POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.WRITE))
            if self.on_turn is not None:
                self.on_turn()
        except Exception:  # never into the hub's loop: the tick's handler would have logged it too
            log.exception("raft_io_failed", extra={"fd": descr})


class RaftConnection:
    """pysyncobj's ``TcpConnection`` (same interface, same framing): over TLS with ``tls``, plain
    TCP when ``tls`` is None; frames compressed at zlib level ``compression``."""

    def __init__(
        self,
        poller,
        onMessageReceived=None,
        onConnected=None,
        onDisconnected=None,
        sock=None,  # noqa: N803
        timeout=10.0,
        sendBufferSize=2**13,
        recvBufferSize=2**13,
        keepalive=None,
        *,  # noqa: N803
        tls: RaftTLS | None,
        server_hostname: str | None = None,
        peer: str = "",
        compression: int = 0,
    ) -> None:
        # pysyncobj's password layer (encryptor) works inside TLS unchanged
        self.sendRandKey = None
        self.recvRandKey = None
        self.recvLastTimestamp = 0
        self.encryptor = None
        self._tls = tls
        self._level = compression
        self._server_hostname = server_hostname
        self._poller = poller
        self._timeout = timeout
        self._keepalive = keepalive
        self._send_size = sendBufferSize
        self._recv_size = recvBufferSize
        self._on_message = onMessageReceived
        self._on_connected = onConnected
        self._on_disconnected = onDisconnected
        self._sock = sock
        self._fd = None
        self._ssl: ssl.SSLObject | None = None
        self._in: ssl.MemoryBIO | None = None
        self._out: ssl.MemoryBIO | None = None
        self._secure = False  # handshake done (plain TCP: connected)
        self._pending = bytearray()  # framed messages sent before the handshake was done
        self._wire = bytearray()  # bytes (TLS records) the socket has not taken yet
        self._read = bytearray()  # received (decrypted) bytes not yet a whole frame
        self._mask = 0
        self._last_read = monotonic()
        self._started = self._last_read
        self.peer = peer
        if sock is not None:  # accepted by RaftServer: the handshake is the client's to start
            self._fd = sock.fileno()
            self._state = CONNECTION_STATE.CONNECTED
            self._apply_keepalive()
            if tls is None:
                self._secure = True
            else:
                self._start_tls(server_side=True)
            self._subscribe()
        else:
            self._state = CONNECTION_STATE.DISCONNECTED

    # -- pysyncobj's TcpConnection interface ---------------------------------------------------

    def setOnConnectedCallback(self, onConnected):  # noqa: N802, N803
        self._on_connected = onConnected

    def setOnMessageReceivedCallback(self, onMessageReceived):  # noqa: N802, N803
        self._on_message = onMessageReceived

    def setOnDisconnectedCallback(self, onDisconnected):  # noqa: N802, N803
        self._on_disconnected = onDisconnected

    @property
    def state(self):
        return self._state

    def fileno(self):
        return self._fd

    def getSendBufferSize(self):  # noqa: N802
        return len(self._wire) + len(self._pending)

    def connect(self, host, port):
        if host is None:
            return False
        self._reset()
        sock = self._sock = socket.socket(_getAddrType(host), socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._send_size)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._recv_size)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._apply_keepalive()
        sock.setblocking(False)
        self.peer = f"{host}:{port}"
        try:
            sock.connect((host, port))
        except OSError as exc:
            if exc.errno not in (socket.errno.EINPROGRESS, *_EAGAIN):
                sock.close()
                self._sock = None
                return False
        self._fd = sock.fileno()
        self._state = CONNECTION_STATE.CONNECTING
        self._started = self._last_read = monotonic()
        self._mask = 0
        self._subscribe(write=True)  # writable: the TCP connect is done
        return True

    def send(self, message):
        if self.sendRandKey or self.encryptor:
            frame = encode_frame(self, message, self._level)
        else:
            last = _last_frame
            if last[1] == self._level and last[0] == message:
                frame = last[2]  # the same message to another follower
            else:
                frame = encode_frame(self, message, self._level)
                last[0], last[1], last[2] = message, self._level, frame
        if not self._secure:
            self._pending += frame
            return
        if self._timed_out():
            return
        if self._tls is None:
            if self._wire or self._sock is None:
                self._wire += frame
                self._flush()
                return
            try:  # straight from the frame: nothing waits before it
                sent = self._sock.send(frame)
            except OSError as exc:
                if exc.errno not in _EAGAIN:
                    self.disconnect()
                    return
                sent = 0
            if sent < len(frame):
                self._wire += memoryview(frame)[sent:]
                self._subscribe(write=True)
        elif self._encrypt(frame):
            self._flush()

    def disconnect(self):
        notify = self._on_disconnected is not None and self._state != CONNECTION_STATE.DISCONNECTED
        self.sendRandKey = None
        self.recvRandKey = None
        self.recvLastTimestamp = 0
        if self._fd is not None:
            self._poller.unsubscribe(self._fd)
            self._fd = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._reset()
        self._state = CONNECTION_STATE.DISCONNECTED
        if notify:
            self._on_disconnected()

    def check_handshake_deadline(self) -> None:
        """Close a connection whose handshake has not completed in HANDSHAKE_TIMEOUT (a stranger
        that connects and sends nothing would otherwise hold its socket: no event ever comes)."""
        if (
            self._state != CONNECTION_STATE.DISCONNECTED
            and not self._secure
            and monotonic() - self._started > HANDSHAKE_TIMEOUT
        ):
            if self._ssl is not None:  # else a TCP connect that got no answer: pysyncobj retries
                _log_failure(self.peer, self._side(), "handshake timeout")
            self.disconnect()

    # -- internals -----------------------------------------------------------------------------

    def _side(self) -> str:
        return "accepted" if self._ssl is not None and self._ssl.server_side else "dialled"

    def _reset(self) -> None:
        self._ssl = self._in = self._out = None
        self._secure = False
        self._pending = bytearray()
        self._wire = bytearray()
        self._read = bytearray()

    def _apply_keepalive(self) -> None:
        if self._sock is not None and self._keepalive is not None:
            set_keepalive(self._sock, *self._keepalive)

    def _start_tls(self, server_side: bool) -> None:
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        if server_side:
            self._ssl = self._tls.server.wrap_bio(self._in, self._out, server_side=True)
        else:
            name = self._tls.server_name or self._server_hostname
            self._ssl = self._tls.client.wrap_bio(
                self._in, self._out, server_side=False, server_hostname=name
            )

    def _subscribe(self, write: bool = False) -> None:
        mask = POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR
        if write or self._wire:
            mask |= POLL_EVENT_TYPE.WRITE
        if mask != self._mask and self._fd is not None:
            self._mask = mask
            self._poller.subscribe(self._fd, self._on_event, mask)

    def _timed_out(self) -> bool:
        if monotonic() - self._last_read > self._timeout:
            self.disconnect()
            return True
        return False

    def _on_event(self, fd, event):
        if fd != self._fd:
            self._poller.unsubscribe(fd)
            return
        if event & POLL_EVENT_TYPE.ERROR:
            self.disconnect()
            return
        if self._timed_out():
            return
        connecting = self._state == CONNECTION_STATE.CONNECTING
        if connecting and self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.disconnect()  # the connect failed (once connected, a recv or send meets an error)
            return
        if self._tls is None:
            self._on_plain_event(event)
            return
        if self._ssl is None:  # dialled: the TCP connect completed, start the handshake
            self._start_tls(server_side=False)
        readable = bool(event & POLL_EVENT_TYPE.READ)
        closed = self._receive() if readable else False
        if not self._secure:
            if not self._handshake():
                if closed and self._state != CONNECTION_STATE.DISCONNECTED:
                    _log_failure(self.peer, self._side(), "closed during the handshake")
                    self.disconnect()
                return
            readable = True  # application data may have come with the end of the handshake
        if readable and not self._decrypt():
            return
        self._settle(closed)

    def _on_plain_event(self, event) -> None:
        if not self._secure:  # dialled: the TCP connect completed
            self._secure = True
            self._last_read = monotonic()
            if self._on_connected is not None:
                self._on_connected()  # pysyncobj sends this node's address
            if self._state == CONNECTION_STATE.DISCONNECTED:
                return
            self._state = CONNECTION_STATE.CONNECTED
            if self._pending:
                self._wire += self._pending
                self._pending = bytearray()
        closed = self._receive() if event & POLL_EVENT_TYPE.READ else False
        if self._read and not self._deliver():
            return
        self._settle(closed)

    def _settle(self, closed: bool) -> None:
        """The end of an event (TLS or plain): write what is pending, then disconnect if the peer
        closed, else wait for the next event."""
        self._flush()
        if self._state == CONNECTION_STATE.DISCONNECTED:
            return
        if closed:
            self.disconnect()
            return
        self._subscribe()

    def _receive(self) -> bool:
        """Socket bytes into the incoming BIO (plain TCP: the read buffer); True when the peer
        closed."""
        put = self._read.extend if self._tls is None else self._in.write
        recv = self._sock.recv
        while True:
            try:
                data = recv(READ_SIZE)
            except OSError as exc:
                return exc.errno not in _EAGAIN
            if not data:
                return True
            put(data)
            self._last_read = monotonic()
            if len(data) < READ_SIZE:
                return False  # the kernel's buffer is empty: the next recv would only say so

    def _handshake(self) -> bool:
        """Advance the handshake; False when the connection is gone."""
        try:
            self._ssl.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            self._flush()
            if self._state != CONNECTION_STATE.DISCONNECTED:
                self._subscribe()
            return False
        except (ssl.SSLError, ssl.CertificateError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or getattr(exc, "verify_message", None) or str(exc)
            _log_failure(self.peer, self._side(), str(reason))
            self._flush()  # the alert, so the peer learns why (best effort)
            self.disconnect()
            return False
        self._secure = True
        self._last_read = monotonic()
        if self._state == CONNECTION_STATE.CONNECTING:
            # dialled: pysyncobj sends its address now; before TLS it would have sent it on connect
            if self._on_connected is not None:
                self._on_connected()
            if self._state == CONNECTION_STATE.DISCONNECTED:
                return False
            self._state = CONNECTION_STATE.CONNECTED
        if self._pending:
            pending, self._pending = self._pending, bytearray()
            if not self._encrypt(pending):
                return False
        return True

    def _encrypt(self, data) -> bool:
        """Encrypt ``data`` into the wire buffer; False (and disconnected) when TLS is closed."""
        view = memoryview(data)
        write = self._ssl.write
        try:
            for start in range(0, len(view), RECORD):
                write(view[start : start + RECORD])
        except ssl.SSLError as exc:  # the peer's close_notify or a fatal alert came first
            _log_failure(self.peer, self._side(), f"write after close: {exc.reason or exc}")
            self.disconnect()
            return False
        self._wire += self._out.read()
        return True

    def _flush(self) -> None:
        if self._out is not None and self._out.pending:
            self._wire += self._out.read()
        while self._wire and self._sock is not None:
            try:
                sent = self._sock.send(self._wire)
            except OSError as exc:
                if exc.errno not in _EAGAIN:
                    self.disconnect()
                break
            if sent <= 0:
                break
            del self._wire[:sent]
        if self._wire and self._fd is not None:
            self._subscribe(write=True)

    def _decrypt(self) -> bool:
        """Decrypt what the BIO holds, hand each whole frame to pysyncobj; False when gone."""
        read = self._ssl.read
        while True:
            try:
                chunk = read(65536)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self.disconnect()
                return False
            except ssl.SSLError as exc:
                # TLS 1.3: a dialling node learns here that the listener refused its certificate
                _log_failure(self.peer, self._side(), str(exc.reason or exc))
                self.disconnect()
                return False
            if not chunk:
                break
            self._read += chunk
        return self._deliver()

    def _deliver(self) -> bool:
        """Hand each whole frame of the read buffer to pysyncobj; False when gone."""
        while True:
            message = self._parse()
            if message is None:
                return self._state != CONNECTION_STATE.DISCONNECTED
            if self._on_message is not None:
                self._on_message(message)
            if self._state == CONNECTION_STATE.DISCONNECTED:
                return False

    def _parse(self):
        buf = self._read
        if len(buf) < 4:
            return None
        (length,) = struct.unpack_from("i", buf)
        if len(buf) - 4 < length:
            return None
        data = bytes(buf[4 : 4 + length])
        try:
            if self.encryptor:
                stamp = self.encryptor.extract_timestamp(data)
                if stamp < self.recvLastTimestamp:
                    raise ValueError("replayed")
                self.recvLastTimestamp = stamp
                data = self.encryptor.decrypt(data)
            message = _loads(_inflate(data))
            if self.recvRandKey:
                key, message = message
                if key != self.recvRandKey:
                    raise ValueError("wrong connection key")
        except Exception:
            self.disconnect()  # as pysyncobj: a frame that does not decode ends the connection
            return None
        del buf[: 4 + length]
        return message


class RaftServer:
    """pysyncobj's ``TcpServer`` accepting ``RaftConnection``s (TLS with ``tls``, else plain)."""

    def __init__(
        self,
        poller,
        host,
        port,
        onNewConnection,
        sendBufferSize=2**13,
        recvBufferSize=2**13,  # noqa: N803
        connectionTimeout=3.5,
        keepalive=None,
        *,
        tls: RaftTLS | None,
        compression: int = 0,
    ) -> None:  # noqa: N803
        self._poller = poller
        self._host = host
        self._port = int(port)
        self._family = _getAddrType(host)
        self._send_size = sendBufferSize
        self._recv_size = recvBufferSize
        self._timeout = connectionTimeout
        self._keepalive = keepalive
        self._on_new = onNewConnection
        self._tls = tls
        self._level = compression
        self._sock = None
        self._fd = None

    def bind(self):
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._send_size)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._recv_size)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setblocking(False)
            sock.bind((self._host, self._port))
            sock.listen(16)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._fd = sock.fileno()
        self._poller.subscribe(self._fd, self._on_accept, POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR)

    def unbind(self):
        if self._fd is not None:
            self._poller.unsubscribe(self._fd)
            self._fd = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _on_accept(self, descr, event):
        if event & POLL_EVENT_TYPE.READ:
            for _ in range(16):  # a burst of reconnecting peers, bounded per event
                try:
                    sock, addr = self._sock.accept()
                except OSError as exc:
                    if exc.errno not in _EAGAIN:
                        self.unbind()
                        return
                    break
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._send_size)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._recv_size)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
                conn = RaftConnection(
                    self._poller,
                    sock=sock,
                    timeout=self._timeout,
                    sendBufferSize=self._send_size,
                    recvBufferSize=self._recv_size,
                    keepalive=self._keepalive,
                    tls=self._tls,
                    peer=f"{addr[0]}:{addr[1]}",
                    compression=self._level,
                )
                self._on_new(conn)
        if event & POLL_EVENT_TYPE.ERROR:
            self.unbind()


class RaftTransport(TCPTransport):
    """pysyncobj's ``TCPTransport`` whose connections and listener are ours: TLS with ``tls``, else
    plain TCP; frames compressed at zlib level ``compression`` (cluster.raft.compression)."""

    def __init__(self, syncObj, selfNode, otherNodes, tls: RaftTLS | None, compression: int = 0, poller=None):  # noqa: N803
        # before TCPTransport.__init__: it adds the nodes and makes the server
        self._tls = tls
        self._level = compression
        if poller is not None:
            # made by SyncObj just before this (nothing subscribed yet): every connection and the
            # listener subscribe to this one instead
            syncObj._poller = poller
        super().__init__(syncObj, selfNode, otherNodes)

    def tryGetReady(self):  # noqa: N802
        """Bind the listener (pysyncobj's), after waiting in the hub for what is left of
        ``bindRetryTime`` since the last attempt. With autoTick off, ``SyncObj.__init__`` calls this
        in a loop until the bind succeeds or ``maxBindRetries`` attempts failed, and pysyncobj's
        ``_maybeBind`` returns at once until that time has passed: with the port taken, a busy loop
        of ``maxBindRetries * bindRetryTime`` (~5 s) that held the worker's hub, so it answered no
        client, no HTTP request and no etcd keep-alive meanwhile."""
        if not self._ready and not self._selfIsReadonlyNode:
            wait = self._lastBindAttemptTime + self._syncObj.conf.bindRetryTime - monotonic()
            if wait > 0:
                import gevent

                gevent.sleep(wait)
        super().tryGetReady()

    def _createServer(self):  # noqa: N802
        conf = self._syncObj.conf
        addr = conf.bindAddress or self._selfNode.address
        host, port = addr.rsplit(":", 1)
        self._server = RaftServer(
            self._syncObj._poller,
            globalDnsResolver().resolve(host),
            port,
            onNewConnection=self._onNewIncomingConnection,
            sendBufferSize=conf.sendBufferSize,
            recvBufferSize=conf.recvBufferSize,
            connectionTimeout=conf.connectionTimeout,
            keepalive=conf.tcp_keepalive,
            tls=self._tls,
            compression=self._level,
        )

    def addNode(self, node):  # noqa: N802
        self._nodes.add(node)
        self._nodeAddrToNode[node.address] = node
        if self._shouldConnect(node):
            conf = self._syncObj.conf
            conn = RaftConnection(
                self._syncObj._poller,
                timeout=conf.connectionTimeout,
                sendBufferSize=conf.sendBufferSize,
                recvBufferSize=conf.recvBufferSize,
                keepalive=conf.tcp_keepalive,
                tls=self._tls,
                server_hostname=node.host,
                compression=self._level,
            )
            conn.encryptor = self._syncObj.encryptor
            conn.setOnConnectedCallback(functools.partial(self._onOutgoingConnected, conn))
            conn.setOnMessageReceivedCallback(functools.partial(self._onMessageReceived, node))
            conn.setOnDisconnectedCallback(functools.partial(self._onDisconnected, conn))
            self._connections[node] = conn

    def _onTick(self):  # noqa: N802
        super()._onTick()
        for conn in list(self._unknownConnections):
            conn.check_handshake_deadline()
        for conn in list(self._connections.values()):
            if conn.state == CONNECTION_STATE.CONNECTING:
                conn.check_handshake_deadline()


def transport_class(tls: RaftTLS | None, compression: int = 0, poller=None):
    """The ``transportClass`` argument of ``SyncObj`` for ``tls`` (None: plain TCP); ``poller``
    (a ``HubPoller``) replaces the SyncObj's own."""
    return functools.partial(RaftTransport, tls=tls, compression=compression, poller=poller)
