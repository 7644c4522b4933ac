"""The plain CoAP listener: one gevent UDP socket read by one greenlet.

Why not ``gevent.server.DatagramServer``: it reads in the hub's callback and spawns a greenlet per
datagram (or runs the handler in the hub, where nothing may wait), and takes a lock around every
``sendto``. Here one reader greenlet calls ``recvfrom`` in a loop (a syscall per datagram and no
greenlet switch while datagrams are queued) and answers most requests inline; only a request that
must wait (a QoS 1/2 publish waiting for its commit) gets a greenlet of the bridge's bounded pool.
"""

from __future__ import annotations

import logging
import socket as stdsocket
from typing import Any

import gevent
from gevent import socket

from .bridge import CoapBridge

log = logging.getLogger("fluxmq.coap")

MAX_DATAGRAM = 65535
RECEIVE_BUFFER = 4 << 20  # absorbs bursts while the reader is busy
# Datagrams handled in a row before the reader lets the hub run (the flusher writes the deliveries
# they made, other clients get their turn): a flood must not starve the node or its heartbeat.
BATCH = 64


class CoapUDPListener:
    """Serves ``bridge`` on a UDP address; ``port`` is the bound one (0 picks a free port)."""

    def __init__(self, name: str, host: str, port: int, bridge: CoapBridge) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.bridge = bridge
        self.sock: Any = None
        self._reader: gevent.Greenlet | None = None

    def start(self) -> None:
        family = stdsocket.AF_INET6 if ":" in self.host else stdsocket.AF_INET
        sock = socket.socket(family, stdsocket.SOCK_DGRAM)
        try:
            sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_RCVBUF, RECEIVE_BUFFER)
        except OSError:
            pass  # a smaller kernel maximum is fine
        sock.bind((self.host or "0.0.0.0", self.port))
        self.port = sock.getsockname()[1]
        self.sock = sock
        self._reader = gevent.spawn(self._serve)
        log.info(
            "listener_started",
            extra={"listener": self.name, "addr": f"{self.host}:{self.port}", "transport": "udp"},
        )

    def _serve(self) -> None:
        sock = self.sock
        handle = self.bridge.datagram
        in_a_row = 0
        while True:
            in_a_row += 1
            if in_a_row >= BATCH:
                in_a_row = 0
                gevent.sleep(0)
            try:
                data, peer = sock.recvfrom(MAX_DATAGRAM)
            except OSError as exc:  # e.g. ICMP port unreachable reported on Linux: keep serving
                if self.sock is None:
                    return
                log.debug("coap_recv_error", extra={"listener": self.name, "error": str(exc)})
                continue
            handle(data, peer, self)

    def sendto(self, data: bytes, peer: Any) -> None:
        try:
            self.sock.sendto(data, peer)
        except (OSError, AttributeError):  # a peer that went away, or the socket closed at shutdown
            self.bridge.drop("send_failed")

    def stop(self) -> None:
        sock, self.sock = self.sock, None
        if self._reader is not None:
            self._reader.kill(block=False)
        if sock is not None:
            sock.close()
