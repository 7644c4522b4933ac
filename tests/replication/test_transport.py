"""The Raft TLS transport (fluxmq/replication/transport.py) in one process: a RaftServer and a
dialling RaftConnection on real loopback sockets, driven by pysyncobj's own select poller."""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
import zlib
from types import SimpleNamespace

import pytest
from pysyncobj.poller import createPoller
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection
from pysyncobj.tcp_server import TcpServer

from fluxmq.errors import ConfigError
from fluxmq.replication.transport import RaftConnection, RaftServer, RaftTLS, raft_tls
from tests.certs import CertAuthority
from tests.conftest import free_port


def _raft(cert=None, ca_file: str = "", client_auth: str = "require", **over) -> SimpleNamespace:
    tls = SimpleNamespace(
        enabled=True,
        cert_file=cert.cert_file if cert else "",
        key_file=cert.key_file if cert else "",
        ca_file=ca_file,
        client_auth=client_auth,
        min_version="TLS1.2",
        cipher_suites=[],
        server_name="",
    )
    tls.__dict__.update(over)
    return SimpleNamespace(tls=tls, password="")


@pytest.fixture
def pki(tmp_path):
    ca = CertAuthority(tmp_path / "pki")
    return ca, ca.issue_node("n1", hosts=("127.0.0.1",))


def _pump(poller, until, limit: float = 10.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        poller.poll(0.01)
        if until():
            return True
    return False


def _server(tls: RaftTLS | None):
    """A bound ``RaftServer`` on a free port of 127.0.0.1 with its own poller: (poller, server,
    port, the connections it accepted, the messages they received)."""
    poller = createPoller("select")
    port = free_port()
    accepted: list = []
    received: list = []

    def on_new(conn) -> None:
        accepted.append(conn)
        conn.setOnMessageReceivedCallback(received.append)

    server = RaftServer(poller, "127.0.0.1", port, on_new, tls=tls)
    server.bind()
    return poller, server, port, accepted, received


def _pair(tls_server: RaftTLS, tls_client: RaftTLS):
    poller, server, port, accepted, received = _server(tls_server)
    client = RaftConnection(poller, timeout=10.0, tls=tls_client, server_hostname="127.0.0.1")
    connected: list = []
    replies: list = []
    client.setOnConnectedCallback(lambda: connected.append(True))
    client.setOnMessageReceivedCallback(replies.append)
    assert client.connect("127.0.0.1", port)
    return poller, server, client, accepted, received, connected, replies


def test_frames_of_any_size_cross_both_ways_intact(pki) -> None:
    ca, node = pki
    tls = raft_tls(_raft(node, ca.cert_file))
    poller, server, client, accepted, received, connected, replies = _pair(tls, tls)
    try:
        assert _pump(poller, lambda: connected)
        big = bytes(range(256)) * 8192  # 2 MiB: many TLS records, several socket writes
        messages = ["127.0.0.1:7100", {"type": "append_entries", "entries": [big]}, 42]
        for m in messages:
            client.send(m)
        assert _pump(poller, lambda: len(received) == 3)
        assert received == messages
        accepted[0].send(("pong", big))
        assert _pump(poller, lambda: replies)
        assert replies == [("pong", big)]
    finally:
        client.disconnect()
        server.unbind()


def test_a_client_without_a_certificate_is_refused_and_nothing_it_sends_is_read(pki) -> None:
    ca, node = pki
    tls = raft_tls(_raft(node, ca.cert_file))
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.load_verify_locations(ca.cert_file)  # trusts the server, presents nothing
    stranger = RaftTLS(tls.server, bare, "", "require")
    poller, server, client, accepted, received, connected, replies = _pair(tls, stranger)
    try:
        client.send("127.0.0.1:7100")  # queued until the handshake, then sent if TLS 1.3 lets it
        _pump(poller, lambda: accepted and accepted[0].state == CONNECTION_STATE.DISCONNECTED)
        assert accepted and accepted[0].state == CONNECTION_STATE.DISCONNECTED
        _pump(poller, lambda: client.state == CONNECTION_STATE.DISCONNECTED, 3.0)
        assert received == []
    finally:
        client.disconnect()
        server.unbind()


def test_a_listener_with_a_certificate_from_another_ca_gets_nothing_sent(pki, tmp_path) -> None:
    ca, node = pki
    other = CertAuthority(tmp_path / "other", "another CA")
    impostor = raft_tls(
        _raft(other.issue_node("x", hosts=("127.0.0.1",)), other.cert_file, client_auth="none")
    )
    tls = raft_tls(_raft(node, ca.cert_file))
    poller, server, client, accepted, received, connected, replies = _pair(impostor, tls)
    try:
        client.send("127.0.0.1:7100")
        assert _pump(poller, lambda: client.state == CONNECTION_STATE.DISCONNECTED)
        assert not connected and received == []
    finally:
        client.disconnect()
        server.unbind()


def test_disabled_is_none_and_bad_files_name_the_key_and_the_file(pki, tmp_path) -> None:
    ca, node = pki
    off = _raft(node, ca.cert_file)
    off.tls.enabled = False
    assert raft_tls(off) is None
    missing = str(tmp_path / "gone.pem")
    with pytest.raises(ConfigError) as err:
        raft_tls(_raft(node, missing), lambda key: f"conf.yaml ({key})")
    assert err.value.key == "cluster.raft.tls.ca_file" and missing in str(err.value)
    assert "conf.yaml" in str(err.value)
    wrong_key = ca.issue_node("other", hosts=("127.0.0.1",))
    mixed = SimpleNamespace(cert_file=node.cert_file, key_file=wrong_key.key_file)
    with pytest.raises(ConfigError) as err:
        raft_tls(_raft(mixed, ca.cert_file))
    assert err.value.key == "cluster.raft.tls.cert_file"


class _Relay:
    """A TCP relay on loopback that keeps a copy of every byte it forwards (the wire)."""

    def __init__(self, target_port: int) -> None:
        self.wire = bytearray()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = target_port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        a, _ = self.listener.accept()
        b = socket.create_connection(("127.0.0.1", self.target))
        for src, dst in ((a, b), (b, a)):
            threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src, dst) -> None:
        try:
            while data := src.recv(65536):
                self.wire += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            dst.close()


@pytest.mark.parametrize("tls_on", [True, False])
def test_the_wire_carries_no_plaintext(pki, tls_on) -> None:
    """The same message through a relay: in the TLS transport's bytes the secret does not appear;
    through pysyncobj's plain TcpConnection it does (so the check can fail)."""
    ca, node = pki
    tls = raft_tls(_raft(node, ca.cert_file))
    poller = createPoller("select")
    port = free_port()
    received: list = []

    def on_new(conn) -> None:
        conn.setOnMessageReceivedCallback(received.append)

    if tls_on:
        server = RaftServer(poller, "127.0.0.1", port, on_new, tls=tls)
        client = RaftConnection(poller, timeout=10.0, tls=tls, server_hostname="127.0.0.1")
    else:
        server = TcpServer(poller, "127.0.0.1", port, on_new)
        client = TcpConnection(poller, timeout=10.0)
    server.bind()
    relay = _Relay(port)
    secret = b"order-4711-card-4242424242424242" * 4
    try:
        client.connect("127.0.0.1", relay.port)
        client.send({"entries": [secret]})
        assert _pump(poller, lambda: received)
        assert received == [{"entries": [secret]}]
        found = secret[:32] in bytes(relay.wire) or secret[:32] in _inflated(relay.wire)
        assert found is not tls_on
    finally:
        client.disconnect()
        server.unbind()


def _inflated(wire: bytearray) -> bytes:
    """pysyncobj compresses each frame: the plain wire's frames, decompressed."""
    out, buf = b"", bytes(wire)
    while len(buf) >= 4:
        (n,) = struct.unpack("i", buf[:4])
        try:
            out += zlib.decompress(buf[4 : 4 + n])
        except zlib.error:
            break
        buf = buf[4 + n :]
    return out


@pytest.mark.parametrize("ours", ["dialling", "accepting"])
def test_the_plain_connection_and_pysyncobj_s_understand_each_other(ours) -> None:
    """Plain TCP (no cluster.raft.tls) runs on RaftConnection too: it keeps pysyncobj's framing (a
    length, a zlib stream, a pickle), so it and pysyncobj's own TcpConnection (a node of an older
    fluxmq) exchange messages either way round, large ones too."""
    poller = createPoller("select")
    port = free_port()
    accepted: list = []
    received: list = []
    replies: list = []
    connected: list = []

    def on_new(conn) -> None:
        accepted.append(conn)
        conn.setOnMessageReceivedCallback(received.append)

    if ours == "accepting":
        server = RaftServer(poller, "127.0.0.1", port, on_new, tls=None)
        client = TcpConnection(poller, timeout=10.0)
    else:
        server = TcpServer(poller, "127.0.0.1", port, on_new)
        client = RaftConnection(poller, timeout=10.0, tls=None)
    server.bind()
    client.setOnConnectedCallback(lambda: connected.append(True))
    client.setOnMessageReceivedCallback(replies.append)
    try:
        assert client.connect("127.0.0.1", port)
        assert _pump(poller, lambda: connected)
        big = bytes(range(256)) * 8192  # 2 MiB: several socket writes and reads
        messages = ["127.0.0.1:7100", {"type": "append_entries", "entries": [(big, 7, 1)]}, 42]
        for m in messages:
            client.send(m)
        assert _pump(poller, lambda: len(received) == 3)
        assert received == messages
        # small: pysyncobj's TcpConnection asks for write readiness only after a write event, so a
        # reply larger than its socket buffer waits for its next event (other traffic in a group)
        accepted[0].send(("pong", big[:4096]))
        assert _pump(poller, lambda: replies)
        assert replies == [("pong", big[:4096])]
    finally:
        client.disconnect()
        server.unbind()


@pytest.mark.parametrize("level", [0, 9])
def test_frames_are_pickled_with_protocol_5_at_the_configured_compression(level) -> None:
    """pysyncobj pickles a frame with protocol 2, where each bytes object is a latin-1 text to
    encode and decode again, and compresses it at zlib level 3: ours are protocol 5 (pickle.loads
    reads any) at ``cluster.raft.compression`` (0: a stored zlib stream, the bytes as they are;
    zlib.decompress reads any level). On the wire: the record appears as it is at 0, not at 9."""
    poller = createPoller("select")
    port = free_port()
    received: list = []

    def on_new(conn) -> None:
        conn.setOnMessageReceivedCallback(received.append)

    server = TcpServer(poller, "127.0.0.1", port, on_new)  # pysyncobj's reads ours
    server.bind()
    relay = _Relay(port)
    client = RaftConnection(poller, timeout=10.0, tls=None, compression=level)
    record = b"order-4711-" * 40
    try:
        client.connect("127.0.0.1", relay.port)
        assert _pump(poller, lambda: client.state == CONNECTION_STATE.CONNECTED)
        client.send({"entries": [(record, 1, 1)]})
        assert _pump(poller, lambda: received)
        assert received == [{"entries": [(record, 1, 1)]}]
        wire = bytes(relay.wire)
        (n,) = struct.unpack("i", wire[:4])
        assert zlib.decompress(wire[4 : 4 + n])[:2] == b"\x80\x05"  # pickle protocol 5
        assert (record in wire) is (level == 0)
    finally:
        client.disconnect()
        server.unbind()


def test_a_level_0_frame_is_a_stored_stream_written_without_zlib_s_compressor(monkeypatch) -> None:
    """At compression 0 the frame's zlib stream is written as stored blocks by hand: zlib's
    compressor, even at level 0, allocates ~256 KiB of state per call (page-faulted in afresh
    each time: ~80 us per frame; bench/RESULTS.md). pysyncobj's reader (zlib.decompress) reads
    it, a frame of several stored blocks (over 64 KiB) too."""
    import fluxmq.replication.transport as transport

    def no_compressor(*args, **kwargs):
        raise AssertionError("zlib.compress called at level 0")

    monkeypatch.setattr(transport.zlib, "compress", no_compressor)
    poller = createPoller("select")
    port = free_port()
    received: list = []

    def on_new(conn) -> None:
        conn.setOnMessageReceivedCallback(received.append)

    server = TcpServer(poller, "127.0.0.1", port, on_new)  # pysyncobj's reads ours
    server.bind()
    client = RaftConnection(poller, timeout=10.0, tls=None, compression=0)
    messages = [{"entries": [(b"r" * n, 1, 1)]} for n in (0, 10, 65_000, 65_535, 200_000)]
    try:
        client.connect("127.0.0.1", port)
        assert _pump(poller, lambda: client.state == CONNECTION_STATE.CONNECTED)
        for m in messages:
            client.send(m)
        assert _pump(poller, lambda: len(received) == len(messages))
        assert received == messages
    finally:
        client.disconnect()
        server.unbind()


def test_a_message_sent_to_several_peers_is_encoded_once(monkeypatch) -> None:
    """pysyncobj sends an entry to each follower as a message of its own, equal for followers at
    the same index: the frame encoded for the first is sent to the others (no password layer,
    same compression), and both peers read it."""
    import fluxmq.replication.transport as transport

    pickled = []
    dumps = transport.pickle.dumps
    monkeypatch.setattr(transport.pickle, "dumps", lambda *a, **k: pickled.append(1) or dumps(*a, **k))
    poller = createPoller("select")
    ports = [free_port(), free_port()]
    received: list = []

    def on_new(conn) -> None:
        conn.setOnMessageReceivedCallback(received.append)

    servers = [RaftServer(poller, "127.0.0.1", p, on_new, tls=None) for p in ports]
    for s in servers:
        s.bind()
    clients = [RaftConnection(poller, timeout=10.0, tls=None) for _ in ports]
    try:
        for c, p in zip(clients, ports, strict=True):
            c.connect("127.0.0.1", p)
        assert _pump(poller, lambda: all(c.state == CONNECTION_STATE.CONNECTED for c in clients))
        entry = (b"e" * 5000, 8, 2)
        pickled.clear()
        for c in clients:  # as pysyncobj builds them: a dict and a list of entries each
            c.send({"type": "append_entries", "entries": [entry], "prevLogIdx": 7, "commit_index": 6})
        assert len(pickled) == 1
        clients[1].send({"type": "append_entries", "entries": [entry], "prevLogIdx": 6, "commit_index": 6})
        assert len(pickled) == 2  # another message: encoded
        assert _pump(poller, lambda: len(received) == 3)
        assert sorted(m["prevLogIdx"] for m in received) == [6, 7, 7]
    finally:
        for c in clients:
            c.disconnect()
        for s in servers:
            s.unbind()


def test_a_stored_frame_is_read_without_zlib_s_decompressor_and_a_corrupt_one_ends_the_connection(
    monkeypatch,
) -> None:
    """A frame whose zlib stream is one stored block (ours at compression 0) is read by checking
    its header and Adler-32 and unpickling the bytes in place (zlib's decompressor allocates its
    state and window per call); others (a compressed frame, several blocks) are decompressed. A
    stored frame whose checksum does not match ends the connection, as zlib's error did."""
    import fluxmq.replication.transport as transport

    decompress = transport.zlib.decompress
    inflated: list = []
    monkeypatch.setattr(
        transport.zlib, "decompress", lambda data: inflated.append(len(data)) or decompress(data)
    )
    poller, server, port, accepted, received = _server(None)
    clients = [RaftConnection(poller, timeout=10.0, tls=None, compression=lvl) for lvl in (0, 6)]
    try:
        for c in clients:
            c.connect("127.0.0.1", port)
        assert _pump(poller, lambda: all(c.state == CONNECTION_STATE.CONNECTED for c in clients))
        small, large = {"entries": [(b"s" * 300, 1, 1)]}, {"entries": [(b"l" * 70_000, 2, 1)]}

        def len_of(message) -> int:
            return len(message["entries"][0][0])

        clients[0].send(small)
        assert _pump(poller, lambda: received == [small])
        assert inflated == []  # one stored block: not through zlib
        clients[0].send(large)
        clients[1].send(small)
        assert _pump(poller, lambda: len(received) == 3)
        assert sorted(received[1:], key=len_of) == [small, large] and len(inflated) == 2
        frame = bytearray(transport.encode_frame(clients[0], small, 0))
        frame[-1] ^= 0xFF  # its Adler-32
        clients[0]._sock.sendall(bytes(frame))
        assert _pump(poller, lambda: any(a.state == CONNECTION_STATE.DISCONNECTED for a in accepted))
        assert len(received) == 3
    finally:
        for c in clients:
            c.disconnect()
        server.unbind()
