"""The Raft transport over TLS and mutual TLS (``cluster.raft.tls.*``, issue 12): three real nodes.

Certificates are made in the test (``tests.certs``): a CA and one node certificate per node (server
and client use, SAN 127.0.0.1). pysyncobj unpickles what a peer sends, so the probes below send a
pysyncobj frame whose pickle, once loaded, creates a marker file: the marker proves a message was
unpickled (it is created on a plain-TCP Raft port; see ``_unpickle_probe``).
"""

from __future__ import annotations

import pickle
import signal
import socket
import ssl
import struct
import time
import zlib
from pathlib import Path

import pytest

from tests.certs import CertAuthority
from tests.conftest import free_port
from tests.e2e.test_replication import (
    QUEUE,
    _publish_acked,
    _raft_config,
    raft_status,
    wait_count,
    wait_leader,
)


def _tls_extra(node, ca_file: str, client_auth: str = "require") -> str:
    return (
        f'    tls:\n      enabled: true\n      cert_file: "{node.cert_file}"\n'
        f'      key_file: "{node.key_file}"\n      ca_file: "{ca_file}"\n'
        f"      client_auth: {client_auth}\n"
    )


def _start(
    node_factory, certs: list, cas: list[str], queue_extra: str = "", client_auth: str = "require"
) -> list:
    peers = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    nodes = [
        node_factory(
            config_text=_raft_config(
                peers[i], peers, queue_extra=queue_extra, raft_extra=_tls_extra(certs[i], cas[i], client_auth)
            ),
            wait_ready=False,
        )
        for i in range(3)
    ]
    for n in nodes:
        n.wait_ready()
    for n, addr in zip(nodes, peers, strict=True):
        n.raft_addr = addr
    return nodes


def _groups(node) -> dict:
    try:
        return {g["name"]: g for g in node.http_get("/cluster/raft")[1]["groups"]}
    except (OSError, ValueError, KeyError):
        return {}


def _group_leader(nodes, group: str, timeout: float = 30.0) -> int:
    """Index of the node delivering ``group`` once every node knows it as the leader."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [_groups(n).get(group) or {} for n in nodes]
        delivering = [i for i, st in enumerate(states) if st.get("delivering")]
        if delivering and all(st.get("leader") == states[delivering[0]]["self"] for st in states):
            return delivering[0]
        time.sleep(0.1)
    raise AssertionError(
        f"no leader of group {group} known to all: {[_groups(n).get(group) for n in nodes]!r}"
    )


def _wait_counts(nodes, group: str, queue: str, count: int, timeout: float = 30.0) -> list:
    deadline = time.monotonic() + timeout
    while True:
        counts = [(_groups(n).get(group) or {}).get("queues", {}).get(queue, {}).get("count") for n in nodes]
        if all(c == count for c in counts) or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


class _Marker:
    """Pickled, creates ``path`` when loaded: proof that the node unpickled what a stranger sent."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _unpickle_probe(marker: str, claim: str) -> bytes:
    """pysyncobj's first message of a connection (the sender's Raft address), framed as its
    TcpConnection frames it (length, zlib of the pickle), carrying the marker."""
    data = zlib.compress(pickle.dumps((claim, _Marker(marker))), 3)
    return struct.pack("i", len(data)) + data


def _read_some(sock, limit: float = 3.0) -> bytes:
    """What the node sends within ``limit`` seconds (until it closes)."""
    sock.settimeout(0.5)
    got = b""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except (OSError, ssl.SSLError):
            break
        if not chunk:
            break
        got += chunk
    return got


def _closed_within(sock, limit: float) -> bool:
    """True when the node closes ``sock`` within ``limit`` seconds without sending anything."""
    sock.settimeout(0.5)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return True
        return not chunk
    return False


def test_a_three_node_mtls_group_replicates_on_every_group_and_survives_a_replica_restart(
    node_factory, tmp_path
):
    ca = CertAuthority(tmp_path / "pki")
    certs = [ca.issue_node(f"node{i}", hosts=("127.0.0.1",)) for i in range(3)]
    # a second queue in a group not in cluster.raft.groups: provisioned on shifted ports, TLS too
    extra = (
        "  - name: other\n    replication: {enabled: true, group: extra, mode: sync, "
        "replication_factor: 3, min_in_sync_replicas: 2, ack_timeout: 3s}\n"
    )
    nodes = _start(node_factory, certs, [ca.cert_file] * 3, queue_extra=extra)
    leader = _group_leader(nodes, "default")
    assert _publish_acked(nodes[leader], "tls-before", 50, b"a") == 50
    assert _wait_counts(nodes, "default", QUEUE, 50) == [50, 50, 50]

    # the provisioned group (its own leader, on ports shifted from the default group's)
    assert _publish_acked(nodes[_group_leader(nodes, "extra")], "tls-extra", 10, b"x", "other") == 10
    assert _wait_counts(nodes, "extra", "other", 10) == [10, 10, 10]
    assert all(_groups(n)["extra"]["self"] != n.raft_addr for n in nodes)  # shifted ports

    # a replica killed and restarted reconnects over TLS and catches up
    follower = (leader + 1) % 3
    nodes[follower].kill()
    assert _publish_acked(nodes[leader], "tls-away", 50, b"b") == 50
    nodes[follower] = node_factory.restart(nodes[follower])
    assert _wait_counts(nodes, "default", QUEUE, 100) == [100, 100, 100]


def test_strangers_on_the_raft_port_get_no_raft_data_and_nothing_they_send_is_unpickled(
    node_factory, tmp_path
):
    ca = CertAuthority(tmp_path / "pki")
    certs = [ca.issue_node(f"node{i}", hosts=("127.0.0.1",)) for i in range(3)]
    nodes = _start(node_factory, certs, [ca.cert_file] * 3)
    leader = wait_leader(nodes)
    assert _publish_acked(nodes[leader], "first", 5, b"a") == 5
    host, port = nodes[leader].raft_addr.rsplit(":", 1)
    # the claimed address is a member's (the smallest connects to nobody, so it is always accepted)
    claim = min(n.raft_addr for n in nodes)

    # 0. a stranger that connects and says nothing is closed (no socket held for ever)
    silent = socket.create_connection((host, int(port)), timeout=5)

    # 1. plain TCP: the pysyncobj hello, as a member would send it over plain TCP
    plain_marker = tmp_path / "unpickled-plain"
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(_unpickle_probe(str(plain_marker), claim))
        got = _read_some(raw)
    # at most a TLS alert (content type 21), never a pysyncobj frame (4-byte length + zlib)
    assert not got or got[0] == 0x15, got[:16]

    # 2. TLS, trusting the CA, without a client certificate (refused under mTLS)
    nocert_marker = tmp_path / "unpickled-nocert"
    ctx = ssl.create_default_context(cafile=ca.cert_file)
    refused = False
    try:
        with (
            socket.create_connection((host, int(port)), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(_unpickle_probe(str(nocert_marker), claim))
            got = _read_some(tls)
            refused = not got
    except (ssl.SSLError, OSError):
        refused = True
    assert refused

    time.sleep(1.0)
    assert not plain_marker.exists() and not nocert_marker.exists()
    assert _closed_within(silent, 20.0)  # by the node (HANDSHAKE_TIMEOUT), nothing sent
    silent.close()
    # the node keeps serving: still the group's leader (or a member of a group with a leader)
    assert nodes[leader].returncode is None
    leader = wait_leader(nodes)
    assert _publish_acked(nodes[leader], "after", 5, b"b") == 5
    assert "raft_tls_handshake_failed" in nodes[leader].log_text() or any(
        "raft_tls_handshake_failed" in n.log_text() for n in nodes
    )


def test_the_unpickle_probe_works_on_a_plain_raft_port(node_factory, tmp_path):
    """The check above can fail: on a plain-TCP Raft port the same frame is unpickled."""
    peers = [f"127.0.0.1:{free_port()}"]
    node = node_factory(
        config_text=_raft_config(peers[0], peers)
        .replace("replication_factor: 3", "replication_factor: 1")
        .replace("min_in_sync_replicas: 2", "min_in_sync_replicas: 1")
    )
    host, port = peers[0].rsplit(":", 1)
    marker = tmp_path / "unpickled"
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(_unpickle_probe(str(marker), peers[0]))
        _read_some(raw, 1.0)
    deadline = time.monotonic() + 5
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists()
    assert node.returncode is None


def test_a_peer_with_a_certificate_from_another_ca_cannot_join(node_factory, tmp_path):
    ca = CertAuthority(tmp_path / "pki", "cluster CA")
    other = CertAuthority(tmp_path / "other", "another CA")
    certs = [
        ca.issue_node("node0", hosts=("127.0.0.1",)),
        ca.issue_node("node1", hosts=("127.0.0.1",)),
        other.issue_node("node2", hosts=("127.0.0.1",)),
    ]
    nodes = _start(node_factory, certs, [ca.cert_file, ca.cert_file, other.cert_file])
    leader = wait_leader(nodes, among=[0, 1])
    assert _publish_acked(nodes[leader], "with-ca", 20, b"p") == 20
    follower = nodes[1 - leader]
    assert wait_count(follower, 20), raft_status(follower)

    def refused() -> bool:
        return any("raft_tls_handshake_failed" in n.log_text() for n in nodes)

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not refused():
        time.sleep(0.1)
    assert refused()
    time.sleep(1.0)  # room for a wrong join to show up
    outsider = raft_status(nodes[2])
    assert outsider is not None and outsider["leader"] is None, outsider
    assert outsider["queues"][QUEUE]["count"] == 0, outsider
    # without the outsider the two cannot lose one more: stop the follower, no quorum
    nodes[1 - leader].stop(signal.SIGTERM)
    assert _publish_acked(nodes[leader], "no-quorum", 1, b"q") == 0


@pytest.mark.parametrize(
    "leaf, missing", [("cert_file", True), ("key_file", True), ("ca_file", True), ("cert_file", False)]
)
def test_bad_raft_tls_config_is_one_line_naming_the_key_and_the_file(node_factory, tmp_path, leaf, missing):
    ca = CertAuthority(tmp_path / "pki")
    cert = ca.issue_node("node0", hosts=("127.0.0.1",))
    files = {"cert_file": cert.cert_file, "key_file": cert.key_file, "ca_file": ca.cert_file}
    files[leaf] = str(tmp_path / "nowhere" / f"{leaf}.pem") if missing else ""
    peers = [f"127.0.0.1:{free_port()}"]
    tls = "".join(f'      {k}: "{v}"\n' for k, v in files.items())
    text = _raft_config(peers[0], peers, raft_extra=f"    tls:\n      enabled: true\n{tls}")
    node = node_factory(config_text=text, wait_ready=False)
    assert node.wait(20) not in (None, 0)
    lines = [line for line in node.log_text().splitlines() if f"cluster.raft.tls.{leaf}" in line]
    assert lines, node.log_tail()
    assert str(node.config_path) in lines[0]
    if missing:
        assert files[leaf] in lines[0]


@pytest.mark.parametrize("tls", [False, True])
def test_a_raft_member_listens_only_on_its_bind_address(node_factory, tmp_path, tls):
    """pysyncobj binds 0.0.0.0 unless told otherwise: the member must listen on bind_addr's host
    only (127.0.0.2 is loopback too, and reaches a 0.0.0.0 listener, not a 127.0.0.1 one)."""
    peers = [f"127.0.0.1:{free_port()}"]
    extra = ""
    if tls:
        ca = CertAuthority(tmp_path / "pki")
        extra = _tls_extra(ca.issue_node("node0", hosts=("127.0.0.1",)), ca.cert_file)
    text = (
        _raft_config(peers[0], peers, raft_extra=extra)
        .replace("replication_factor: 3", "replication_factor: 1")
        .replace("min_in_sync_replicas: 2", "min_in_sync_replicas: 1")
    )
    node_factory(config_text=text)
    port = int(peers[0].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", port), timeout=5).close()


def test_server_only_tls_combined_with_the_password_replicates(node_factory, tmp_path):
    """client_auth none (the listener's certificate verified, none asked of the dialler) with
    cluster.raft.password inside TLS: the documented combination elects and replicates."""
    ca = CertAuthority(tmp_path / "pki")
    certs = [ca.issue_node(f"node{i}", hosts=("127.0.0.1",)) for i in range(3)]
    peers = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    nodes = [
        node_factory(
            config_text=_raft_config(peers[i], peers, raft_extra=_tls_extra(certs[i], ca.cert_file, "none")),
            wait_ready=False,
            env={"FLUXMQ_CLUSTER_RAFT_PASSWORD": "s3cret"},
        )
        for i in range(3)
    ]
    for n in nodes:
        n.wait_ready()
    leader = _group_leader(nodes, "default")
    assert _publish_acked(nodes[leader], "server-only", 20, b"s") == 20
    assert _wait_counts(nodes, "default", QUEUE, 20) == [20, 20, 20]
    assert "raft_tls_without_client_certificates" not in nodes[0].log_text()  # the password is set
