"""The node process end to end: health endpoints, graceful stop, worker restart, start-up failures."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT, NodeFactory, RunningNode, free_port

pytestmark = pytest.mark.e2e

SHUTDOWN_TIMEOUT = 5.0


def connect_packet(client_id: str) -> bytes:
    """An MQTT 3.1.1 CONNECT (clean session, keep alive 60 s), built by hand."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    assert len(body) < 128
    return bytes([0x10, len(body)]) + body


def mqtt_connect(n: RunningNode, client_id: str) -> socket.socket:
    """Open a raw TCP connection, send CONNECT and check the CONNACK accepts it (3.1.1)."""
    sock = socket.create_connection((n.host, n.mqtt_port), timeout=10)
    sock.sendall(connect_packet(client_id))
    connack = b""
    while len(connack) < 4:
        chunk = sock.recv(4 - len(connack))
        assert chunk, "connection closed before CONNACK"
        connack += chunk
    assert connack == b"\x20\x02\x00\x00", connack
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> bool:
    """True if the peer closes the connection within ``timeout`` (bytes before EOF are skipped)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def wait_for(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# -- reference 003 -----------------------------------------------------------------------------


def test_health_is_reference_shape(node: RunningNode) -> None:
    assert node.http_get("/health") == (200, {"status": "healthy"})


def test_ready_is_reference_single_node_shape(node: RunningNode) -> None:
    status, body = node.http_get("/ready")
    assert status == 200
    assert body == {
        "status": "ready",
        "mode": "nominal",
        "checks": {"broker": {"status": "up"}, "storage": {"status": "up"}},
    }


def test_cluster_status_is_reference_single_node_shape(node: RunningNode) -> None:
    status, body = node.http_get("/cluster/status")
    assert status == 200
    assert set(body) == {"node_id", "is_leader", "cluster_mode", "sessions"}
    assert body["node_id"] == "single-node"
    assert body["is_leader"] is False
    assert body["cluster_mode"] is False
    assert isinstance(body["sessions"], int) and not isinstance(body["sessions"], bool)


def test_cluster_status_counts_a_connected_session(node_factory: NodeFactory) -> None:
    n = node_factory()
    assert n.http_get("/cluster/status")[1]["sessions"] == 0
    sock = mqtt_connect(n, "health-session-count")
    try:
        assert wait_for(lambda: n.http_get("/cluster/status")[1]["sessions"] == 1, 10)
    finally:
        sock.close()


def test_health_unknown_path_and_method(node: RunningNode) -> None:
    status, body = node.http_get("/nope")
    assert status == 404
    request = f"POST /health HTTP/1.1\r\nHost: {node.host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    with socket.create_connection((node.host, node.health_port), timeout=5) as sock:
        sock.sendall(request.encode())
        sock.settimeout(5)
        response = b""
        while chunk := sock.recv(4096):
            response += chunk
    assert response.startswith(b"HTTP/1.1 405 ")
    assert b"\r\nContent-Type: application/json\r\n" in response


def test_health_disabled_serves_mqtt_and_no_health_port(node_factory: NodeFactory) -> None:
    n = node_factory({"server.health_enabled": False})
    sock = mqtt_connect(n, "no-health")
    sock.close()
    with pytest.raises(OSError):
        socket.create_connection((n.host, n.health_port), timeout=2).close()
    assert n.stop() == 0


# -- shutdown ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_gracefully_closing_clients(node_factory: NodeFactory, sig: int) -> None:
    n = node_factory({"server.shutdown_timeout": f"{SHUTDOWN_TIMEOUT:g}s"})
    sock = mqtt_connect(n, f"graceful-{sig}")
    try:
        # the bound is the contract (exit within server.shutdown_timeout), not a speed measurement
        assert n.stop(sig, timeout=SHUTDOWN_TIMEOUT) == 0, n.log_tail()
        assert read_until_closed(sock, 5), "client connection left open after the node exited"
    finally:
        sock.close()
    stopping = [ln for ln in n.log_text().splitlines() if "broker_stopping" in ln]
    assert len(stopping) == 1 and "quick=false" in stopping[0], n.log_tail()  # SIGINT is graceful too


# -- supervision -------------------------------------------------------------------------------


def test_killed_worker_is_restarted_and_serves_mqtt(node_factory: NodeFactory) -> None:
    n = node_factory()
    workers = n.worker_pids()
    assert len(workers) == 1, workers
    old = workers[0]
    sock = mqtt_connect(n, "before-kill")
    os.kill(old, signal.SIGKILL)  # a child of the node this test started
    assert read_until_closed(sock, 10)
    sock.close()

    def restarted() -> bool:
        current = n.worker_pids()
        return len(current) == 1 and current[0] != old and n.is_ready()

    assert wait_for(restarted, 20), n.log_tail()
    assert n.returncode is None
    mqtt_connect(n, "after-kill").close()
    assert n.stop() == 0


def test_a_hung_worker_is_restarted_though_heartbeat_and_look_are_spaced(node_factory: NodeFactory) -> None:
    """With ``server.worker_timeout`` 12 s the worker beats and the arbiter looks every 1.2 s (a tenth
    of the timeout, ``liveness_interval``), not every second: a worker whose hub stops (SIGSTOP: no
    heartbeat) is still killed and replaced, and the new one serves."""
    n = node_factory({"server.worker_timeout": "12s"})
    (old,) = n.worker_pids()
    mqtt_connect(n, "before-hang").close()
    os.kill(old, signal.SIGSTOP)  # a child of the node this test started

    def restarted() -> bool:
        current = n.worker_pids()
        return len(current) == 1 and current[0] != old and n.is_ready()

    assert wait_for(restarted, 60), n.log_tail()
    assert "WORKER TIMEOUT" in n.log_text() or "worker_timeout" in n.log_text(), n.log_tail()
    mqtt_connect(n, "after-hang").close()
    assert n.stop() == 0


# SIGHUP reloads the configuration in the running worker: tests/e2e/test_admin.py
@pytest.mark.parametrize("sig", [signal.SIGTTIN, signal.SIGUSR2], ids=["SIGTTIN", "SIGUSR2"])
def test_signals_that_would_start_a_second_worker_are_ignored(node_factory: NodeFactory, sig: int) -> None:
    """A second worker could not bind the MQTT port and would halt the node: keep the one running."""
    n = node_factory()
    workers = n.worker_pids()
    sock = mqtt_connect(n, "stays-connected")
    try:
        os.kill(n.pid, sig)
        assert wait_for(lambda: "signal_ignored" in n.log_text(), 10), n.log_tail()
        for worker in workers:
            os.kill(worker, signal.SIGHUP)  # a terminal hangup reaches the worker too
        mqtt_connect(n, "still-serving").close()
        assert n.worker_pids() == workers
        assert n.returncode is None
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(1)  # the first client is still connected
    finally:
        sock.close()
    assert n.stop() == 0


# -- start-up failures -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ("server:\n  shutdown_timeout: 5s\n  bogus_key: 1\n", "server.bogus_key", 3),
        ("log:\n  level: info\nserver:\n  shutdown_timeout: soon\n", "server.shutdown_timeout", 4),
    ],
    ids=["unknown-key", "bad-value"],
)
def test_bad_config_exits_2_with_one_stderr_line(tmp_path, text: str, key: str, line: int) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "fluxmq.node.cli", "--config", str(bad)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert key in lines[0]
    assert f"{bad}:{line}" in lines[0] or f"bad.yaml:{line}" in lines[0]
    assert "Traceback" not in result.stderr


def test_mqtt_port_in_use_exits_nonzero_with_clear_line(node_factory: NodeFactory) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        n = node_factory({"server.tcp.plain.addr": f"127.0.0.1:{port}"}, wait_ready=False)
        code = n.wait(30)
    assert code is not None, "node still running with its MQTT port taken"
    assert code != 0
    failures = [ln for ln in n.log_text().splitlines() if "broker_start_failed" in ln]
    assert len(failures) == 1, n.log_tail()
    assert "in use" in failures[0]
    assert n.log_text().count("Booting worker") == 1  # halted, not restarted in a loop


def test_first_log_line_names_the_data_directory_and_one_line_names_every_listener(
    node_factory: NodeFactory,
) -> None:
    """Issue 15: the node says where its data lives on its first line, and where each listener is on one."""
    n = node_factory({"server.websocket.plain.addr": f"127.0.0.1:{_free_port()}"})
    lines = n.log_text().splitlines()
    assert "node_starting" in lines[0] and f"data={n.data_dir}" in lines[0], lines[0]
    summary = [line for line in lines if "event=listeners" in line]
    assert len(summary) == 1, lines
    cfg = n.config["server"]
    for url in (
        f"mqtt://{cfg['tcp']['plain']['addr']}",
        f"ws://{cfg['websocket']['plain']['addr']}/mqtt",
        f"http://{cfg['health_addr']}",
        f"http://{cfg['http']['plain']['addr']}",
        f"http://{cfg['admin']['addr']}",
    ):
        assert url in summary[0], (url, summary[0])


def _free_port() -> int:
    from tests.conftest import free_port

    return free_port()


def test_a_config_copied_from_the_reference_documents_starts(node_factory: NodeFactory, tmp_path) -> None:
    """Issue 15 "done when": the Go FluxMQ README's example config (with reference 004's logging fields,
    the clustering and queue sections) starts a node; only the port numbers (free ports, still on every
    interface as the reference writes them, ``":PORT"``) and the certificate paths are adapted. What
    fluxmq does not implement is logged as not implemented yet. The reference sets no authentication,
    so, as Mosquitto 2, its network listeners refuse anonymous clients (issue 17 item 11) with one
    warning line each; the mTLS listener (a client certificate is required) and health are exempt."""
    from fluxmq._core import codec as c
    from tests.certs import CertAuthority
    from tests.config.test_reference_compat import REFERENCE_CONFIG
    from tests.e2e.mqttraw import RawClient

    ca = CertAuthority(tmp_path / "ca")
    server = ca.issue_server()
    ports = {name: _free_port() for name in ("plain", "tls", "mtls", "ws", "http", "health")}
    text = REFERENCE_CONFIG
    for name, port in (
        ("1883", ports["plain"]),
        ("8883", ports["tls"]),
        ("8884", ports["mtls"]),
        ("8083", ports["ws"]),
        ("8080", ports["http"]),
        ("8081", ports["health"]),
    ):
        text = text.replace(f'":{name}"', f'":{port}"')
    text = (
        text.replace("/path/to/server.crt", server.cert_file)
        .replace("/path/to/server.key", server.key_file)
        .replace("/path/to/ca.crt", ca.cert_file)
    )
    # The cluster section (a one-node cluster with its own etcd member): free loopback ports and a
    # data directory of the test's own instead of the reference's 0.0.0.0:2379/2380/7948 and /tmp.
    for old, new in (
        ("0.0.0.0:2380", f"127.0.0.1:{_free_port()}"),
        ("0.0.0.0:2379", f"127.0.0.1:{_free_port()}"),
        ("0.0.0.0:7948", f"127.0.0.1:{_free_port()}"),
        ("/tmp/fluxmq/etcd", str(tmp_path / "etcd")),
    ):
        text = text.replace(old, new)
    n = node_factory(config_text=text)
    assert n.config["server"]["tcp"]["plain"]["addr"] == f":{ports['plain']}"
    log_text = n.log_text()
    # Reference 002's queue section is not fluxmq's (queues are configured under ``queues``); the
    # cluster section is implemented: the node runs as a one-node cluster.
    assert "config_not_implemented" in log_text and "queue" in log_text
    status, body = n.http_get("/cluster/status")
    assert (status, body["cluster_mode"], body["node_id"]) == (200, True, "broker-1")
    warned = [line for line in log_text.splitlines() if "anonymous_refused_on_network_listener" in line]
    assert sorted(
        key
        for line in warned
        for key in (
            "server.tcp.plain.addr",
            "server.tcp.tls.addr",
            "server.websocket.plain.addr",
            "server.http.plain.addr",
        )
        if key in line
    ) == [
        "server.http.plain.addr",
        "server.tcp.plain.addr",
        "server.tcp.tls.addr",
        "server.websocket.plain.addr",
    ], warned
    assert len(warned) == 4 and all("auth.allow_anonymous: true" in line for line in warned), warned
    with RawClient("127.0.0.1", ports["plain"], version=5) as client:  # connect to loopback only
        refused = client.connect("reference-config")
    assert refused.reason_code == 0x87 and "auth.allow_anonymous" in refused.properties[c.REASON_STRING]
    with RawClient("127.0.0.1", ports["plain"], version=4) as client:
        assert client.connect("reference-config").reason_code == 5


@pytest.mark.parametrize("clustered", [False, True], ids=["lone", "cluster"])
def test_a_worker_whose_arbiter_is_killed_stops_and_frees_its_port_and_data(
    node_factory: NodeFactory, request: pytest.FixtureRequest, clustered: bool
) -> None:
    """kill -9 of the node's main process (the arbiter) only: its worker, re-parented, stops as on
    SIGTERM (clients closed, store closed, etcd registration revoked) and exits, so a node started
    again on the same ports and data directory comes up. Before, the worker raised SystemExit from
    its heartbeat and skipped the broker's stop: a lone node's worker exited without closing its
    store; a cluster node's never exited (the interpreter waited for its gRPC server's threads)
    and kept serving MQTT, its ports, its data directory's lock and its etcd registration."""
    overrides = {}
    if clustered:
        etcd = request.getfixturevalue("etcd_server")
        overrides = {
            "cluster.enabled": True,
            "cluster.node_id": "orphan",
            "cluster.transport.bind_addr": f"127.0.0.1:{free_port()}",
            "cluster.etcd.endpoints": [etcd.endpoint],
            "cluster.etcd.prefix": f"/orphan-{os.getpid()}-{time.monotonic_ns()}/",
        }
    n = node_factory(overrides)
    workers = n.worker_pids()
    assert len(workers) == 1, workers
    worker = workers[0]
    sock = mqtt_connect(n, "arbiter-killed")
    os.kill(n.pid, signal.SIGKILL)  # the arbiter only: the process this test started
    n.wait(10)

    def gone() -> bool:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return True
        return False

    try:
        assert wait_for(gone, 30), f"the worker outlived its arbiter; log tail:\n{n.log_tail()}"
        assert read_until_closed(sock, 5), "the client's connection was left open"
    finally:
        sock.close()
    log_text = n.log_text()
    assert "arbiter_gone" in log_text and "broker_stopped" in log_text, n.log_tail()
    again = node_factory.restart(n)  # the same ports and data directory (it waits until ready)
    mqtt_connect(again, "after").close()
    assert again.stop() == 0
