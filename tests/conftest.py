"""Shared test fixtures: free ports and real fluxmq nodes for end-to-end tests.

A node is the real ``fluxmq-node`` process (``python -m fluxmq.node.cli`` with this interpreter)
listening on free 127.0.0.1 ports, with its own data directory, config file and log file::

    def test_shared(node):                    # one default node per test module
        sock = socket.create_connection((node.host, node.mqtt_port))

    def test_own(node_factory):               # a node per call, stopped after the test
        n = node_factory({"storage.type": "lmdb", "server.shutdown_timeout": "5s"})
        status, body = n.http_get("/ready")
        assert n.stop() == 0                  # SIGTERM, returns the exit code

``node_factory(overrides, config_text)``: ``config_text`` is YAML merged over the fixture's
defaults (free MQTT, health, HTTP bridge and admin ports on 127.0.0.1, ``storage.path`` in the test's tmp dir), then
``overrides`` (dotted keys -> values) over that. The call returns once ``/ready`` answers 200 and
the MQTT port accepts a TCP connection (20 s bound; on failure it raises with the log tail). Pass
``wait_ready=False`` for a node expected to fail. When a test fails, the tails of the logs of the
nodes it used are added to its report. Helpers import as ``from tests.conftest import free_port``.
"""

from __future__ import annotations

import atexit
import collections
import fcntl
import functools
import io
import json
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from ruamel.yaml import YAML

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
LOG_TAIL_LINES = 60


_HANDED_OUT: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


# Ports are handed out below the kernel's ephemeral range: a port taken from that range (bind to
# port 0) is free only until the next outgoing connection, so a node restarted on its old port
# after a kill could find it taken as the local port of some client's or peer's connection
# ("Address already in use" in the queue-restart and Raft snapshot tests under load).
_EPHEMERAL_LOW = _ephemeral_range()[0]
_PICK = random.Random(os.getpid() ^ time.monotonic_ns())

# Test sessions running at once on one host (several worktrees, a lead's run beside a helper's)
# draw from the same range: the bind check cannot see a port another session handed out whose node
# has not bound it yet, so both nodes get it and one fails with "Address already in use" (seen in
# test_replication's start_cluster under load). A port handed out is reserved for the others by a
# lock file held while the last RESERVED ports handed out here are (a node binds its ports within
# its start, long before that many more are handed out; a bound port fails the others' bind check).
# A released reservation's file is removed while its lock is still held (and this session's at its
# end, and those of a killed session by the next session): the directory holds the files of the
# reservations held now, not one per port ever handed out. A lock taken on a file removed meanwhile
# (opened before its holder removed it) reserves nothing: the lock counts only while the path
# still names the file locked.
_RESERVATIONS = Path(
    os.environ.get("FLUXMQ_TEST_PORTS_DIR") or Path(tempfile.gettempdir()) / "fluxmq-test-ports"
)
RESERVED = 256
_HELD: collections.deque[tuple[int, Path]] = collections.deque()  # this session's reservations
_SWEPT = False


def _lock(path: Path, create: bool) -> int | None:
    """An fd of ``path`` holding its exclusive lock, or None (held elsewhere, or gone)."""
    fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            raise FileNotFoundError(path)  # removed (and maybe made again) since it was opened
    except OSError:
        os.close(fd)
        return None
    return fd


def _release(fd: int, path: Path) -> None:
    """End a reservation: its file removed while its lock is held (no one else holds it), then
    the lock released with the file."""
    try:
        os.unlink(path)
    except OSError:
        pass
    os.close(fd)


def _release_all() -> None:
    while _HELD:
        _release(*_HELD.popleft())


def _sweep() -> None:
    """Remove the files whose lock nobody holds (a session killed before its end left them)."""
    for path in list(_RESERVATIONS.iterdir()):
        try:
            fd = _lock(path, False)
        except OSError:
            continue
        if fd is not None:
            _release(fd, path)


def _reserve(port: int) -> bool:
    """Reserve ``port`` against the other test sessions of this host; False when one holds it."""
    global _SWEPT
    path = _RESERVATIONS / str(port)
    try:
        _RESERVATIONS.mkdir(mode=0o777, parents=True, exist_ok=True)
        if not _SWEPT:
            _SWEPT = True
            _sweep()
            atexit.register(_release_all)
        fd = _lock(path, True)
    except OSError:
        return True  # no shared directory: the bind check alone, as before
    if fd is None:
        return False
    _HELD.append((fd, path))
    if len(_HELD) > RESERVED:
        _release(*_HELD.popleft())
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago and that no outgoing connection can take.

    Drawn at random from 20000 up to the start of the kernel's ephemeral port range and checked by
    binding it (bind to port 0 instead when that range is too small). A port is never handed out
    twice in one test session: a node's MQTT, health, bridge and admin ports must differ.
    """
    low, high = 20000, _EPHEMERAL_LOW - 1
    for _ in range(2000 if high - low >= 1000 else 0):
        port = _PICK.randint(low, high)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
        if not _reserve(port):
            continue
        _HANDED_OUT.add(port)
        return port
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def _port_of(addr: str) -> int:
    return int(str(addr).rpartition(":")[2])


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *sections, leaf = dotted.split(".")
    for name in sections:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def _merge(base: dict, extra: Mapping) -> dict:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _get_dotted(tree: Mapping, dotted: str, default: Any = None) -> Any:
    for name in dotted.split("."):
        if not isinstance(tree, Mapping) or name not in tree:
            return default
        tree = tree[name]
    return tree


class NodeStartError(RuntimeError):
    """The node exited or did not become ready in time; the message ends with its log tail."""


class RunningNode:
    """A ``fluxmq-node`` process started by ``node_factory``."""

    host = HOST
    prefix: tuple[str, ...] = ()  # the command the node was started under (NodeFactory)

    def __init__(
        self, process: subprocess.Popen, config: dict, config_path: Path, data_dir: Path, log_path: Path
    ) -> None:
        self.process = process
        self.config = config
        self.config_path = config_path
        self.data_dir = data_dir
        self.log_path = log_path
        self.mqtt_port = _port_of(_get_dotted(config, "server.tcp.plain.addr"))
        self.health_port = _port_of(_get_dotted(config, "server.health_addr"))
        http_addr = _get_dotted(config, "server.http.plain.addr")
        admin_addr = _get_dotted(config, "server.admin.addr")
        self.http_port = _port_of(http_addr) if http_addr else None  # HTTP bridge (None: off)
        self.admin_port = _port_of(admin_addr) if admin_addr else None  # admin API (None: off)
        self.health_enabled = bool(_get_dotted(config, "server.health_enabled", True))

    @property
    def pid(self) -> int:
        """PID of the arbiter (the process started)."""
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def log_text(self) -> str:
        """Everything the node wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def worker_pids(self) -> list[int]:
        """PIDs of the arbiter's children (the broker worker), read from /proc."""
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        try:
            return [int(pid) for pid in children.read_text().split()]
        except OSError:
            return []

    def http_get(self, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        """GET ``path`` on the health listener -> (status, decoded JSON body)."""
        url = f"http://{self.host}:{self.health_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            with err:
                return err.code, json.loads(err.read())

    def metric(self, name: str, labels: str = "") -> float | None:
        """The sample ``name{labels}`` of the node's /metrics (a counter by its ``_total`` name);
        None when the node does not expose it."""
        url = f"http://{self.host}:{self.health_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        sample = re.escape(name + (f"{{{labels}}}" if labels else ""))
        found = re.search(rf"^{sample} (\S+)$", text, re.M)
        return float(found.group(1)) if found else None

    def mqtt_accepts(self) -> bool:
        """True when the MQTT port accepts a TCP connection."""
        try:
            with socket.create_connection((self.host, self.mqtt_port), timeout=1.0):
                return True
        except OSError:
            return False

    def is_ready(self) -> bool:
        """``/ready`` answers 200 (when health is enabled) and the MQTT port accepts."""
        if self.health_enabled:
            try:
                if self.http_get("/ready", timeout=1.0)[0] != 200:
                    return False
            except (OSError, ValueError):
                return False
        return self.mqtt_accepts()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait (bounded) until ready; raise NodeStartError if the node exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise NodeStartError(
                    f"node exited with {self.process.returncode} before ready; log tail:\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(0.05)
        raise NodeStartError(f"node not ready within {timeout:.0f}s; log tail:\n{self.log_tail()}")

    def wait(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Wait (bounded) for the process to exit; its exit code, or None if still running."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``sig`` and wait up to ``timeout`` s; SIGKILL the node's processes after that.

        Returns the exit code (negative: killed by that signal, as ``subprocess`` reports it).
        """
        if self.process.poll() is None:
            self.process.send_signal(sig)
            if self.wait(timeout) is None:
                self.kill()
        if self._group_alive():  # a worker outliving its arbiter (e.g. after a test killed it)
            self.kill()
        return self.process.returncode

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def kill(self) -> None:
        """SIGKILL the arbiter and its workers (the process group the node was started in)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(STOP_TIMEOUT)

    def __repr__(self) -> str:
        return f"<RunningNode pid={self.pid} mqtt={self.mqtt_port} health={self.health_port}>"


def _limit_nofile(limit: int) -> None:
    """In the node's child process before exec: at most ``limit`` file descriptors."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def _spawn(
    config_path: Path,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
    nofile: int | None = None,
    prefix: tuple[str, ...] = (),
) -> subprocess.Popen:
    """``fluxmq-node --config config_path``, its output to ``log_path``, in its own process group
    (``kill()`` reaches the workers); the test process's ``FLUXMQ_*`` variables dropped. ``prefix``
    runs it through a command that execs it (``ip netns exec NS``: the same PID)."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXMQ_")}
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    child_env["PYTHONUNBUFFERED"] = "1"
    child_env.update(env or {})
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(
            [*prefix, sys.executable, "-m", "fluxmq.node.cli", "--config", str(config_path), *args],
            cwd=REPO_ROOT,
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own group: kill() reaches the worker
            preexec_fn=None if nofile is None else functools.partial(_limit_nofile, nofile),
        )


class NodeFactory:
    """Starts nodes under ``base_dir`` (one sub-directory each) and stops them on ``close()``."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.nodes: list[RunningNode] = []

    def __call__(
        self,
        overrides: Mapping[str, Any] | None = None,
        config_text: str | None = None,
        *,
        wait_ready: bool = True,
        env: Mapping[str, str] | None = None,
        args: tuple[str, ...] = (),
        nofile: int | None = None,
        prefix: tuple[str, ...] = (),
        host: str | None = None,
    ) -> RunningNode:
        """Write a config, start ``fluxmq-node --config`` with it and (by default) wait until ready.

        ``env`` adds environment variables (the test process's ``FLUXMQ_*`` ones are dropped);
        ``args`` are extra command line arguments; ``nofile`` sets the node's RLIMIT_NOFILE (soft and
        hard, inherited by its workers); ``prefix`` and ``host``: the command the node runs under
        (``ip netns exec NS``, tests/netns.py) and the address its listeners are reached at.
        """
        node_dir = self.base_dir / f"node{len(self.nodes)}"
        data_dir = node_dir / "data"
        data_dir.mkdir(parents=True)
        config: dict = {
            "server": {
                "tcp": {"plain": {"addr": f"{HOST}:{free_port()}"}},
                "websocket": {"plain": {"addr": ""}},  # on by default (:8083); tests opt in
                "http": {"plain": {"addr": f"{HOST}:{free_port()}"}},  # HTTP bridge (default :8080)
                "admin": {"addr": f"{HOST}:{free_port()}"},  # admin API (default 127.0.0.1:8082)
                "health_addr": f"{HOST}:{free_port()}",
            },
            "storage": {"path": str(data_dir)},
        }
        if config_text:
            _merge(config, YAML(typ="safe", pure=True).load(config_text) or {})
        for key, value in (overrides or {}).items():
            _set_dotted(config, key, value)
        config_path = node_dir / "fluxmq.yaml"
        out = io.StringIO()
        YAML(typ="safe", pure=True).dump(config, out)
        config_path.write_text(out.getvalue())

        log_path = node_dir / "node.log"
        process = _spawn(config_path, log_path, env, args, nofile, prefix)
        node = RunningNode(process, config, config_path, data_dir, log_path)
        node.prefix = prefix
        if host:
            node.host = host
        self.nodes.append(node)
        if wait_ready:
            node.wait_ready()
        return node

    def restart(self, node: RunningNode, timeout: float = START_TIMEOUT) -> RunningNode:
        """Start ``node``'s config again after it stopped (same data directory, ports and node id;
        a new log file) and wait until it is ready. Its ``raft_addr``, where a test set one, goes on."""
        log_path = node.log_path.with_name(f"node-restarted-{len(self.nodes)}.log")
        again = RunningNode(
            _spawn(node.config_path, log_path, prefix=node.prefix),
            node.config,
            node.config_path,
            node.data_dir,
            log_path,
        )
        again.prefix, again.host = node.prefix, node.host
        if hasattr(node, "raft_addr"):
            again.raft_addr = node.raft_addr
        self.nodes.append(again)
        again.wait_ready(timeout)
        return again

    def close(self) -> None:
        """Stop every node still running: SIGTERM to all of them at once, then SIGKILL what is left
        after a bound. The nodes of a cluster shut down side by side: stopped one after the other,
        the last ones each waited out their lost peers (an etcd without its quorum, say) in turn."""
        running = [node for node in self.nodes if node.returncode is None]
        for node in running:
            node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for node in self.nodes:
            if node in running and node.wait(max(0.0, deadline - time.monotonic())) is None:
                node.kill()
            if node._group_alive():  # a worker outliving its arbiter (e.g. after a test killed it)
                node.kill()


_paho_loop_stop = paho.Client.loop_stop


def _loop_stop_at_once(self: paho.Client) -> paho.MQTTErrorCode:
    """paho's ``loop_stop()``: its network thread waits in ``select()`` for up to 1 s before it sees
    the request to end, and every test client stopped paid that second. Wake it with a byte on the
    socket pair paho itself uses to cut that wait short (``publish()`` does the same), then stop as
    paho does. Nothing else changes: what is queued is still written before the thread ends."""
    wake = getattr(self, "_sockpairW", None)
    if getattr(self, "_thread", None) is not None and wake is not None:
        self._thread_terminate = True
        try:
            wake.send(b"0")
        except OSError:
            pass
    return _paho_loop_stop(self)


paho.Client.loop_stop = _loop_stop_at_once


def _sigterm_as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """A run ended by SIGTERM (``timeout``, a CI runner) ends as an interrupted one: pytest then
    tears the fixtures down, so the nodes and etcd members it started (each in its own session,
    out of reach of the terminal's signals) do not outlive it. Before, they were left running,
    parented to init, holding CPU and ports."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In pytest-xdist's processes (scripts/test), the tests marked ``slow`` first: tests/packaging's
    two builds of the Cython core take ~4 min, and handed out after tests/node (or last, by xdist's
    own order: fewest tests) they started ~10 min into a run and ended it, alone. scripts/test
    hands the modules out in this order (``--no-loadscope-reorder``). The order is the same in every process
    (xdist checks), and a run in one process keeps the plain order."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[NodeFactory]:
    """Start nodes with ``node_factory(overrides=None, config_text=None)``; stopped after the test."""
    factory = NodeFactory(tmp_path)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    """One node with the default configuration, shared by the tests of a module (do not stop it)."""
    factory = NodeFactory(tmp_path_factory.mktemp("node"))
    try:
        yield factory()
    finally:
        factory.close()


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory):
    """The session's shared etcd server (``.endpoint`` is its client URL; tests/etcd.py). Defined
    here only: a module importing it would get an etcd of its own, kept until the session ends."""
    from tests.etcd import start_etcd

    proc = start_etcd(tmp_path_factory.mktemp("etcd"), "shared")
    yield proc
    proc.stop()


@pytest.fixture
def etcd_prefix() -> str:
    """A key prefix no other test uses (``/t-<uuid>/``), for tests on the shared etcd."""
    return f"/t-{uuid.uuid4().hex[:12]}/"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Add the log tails of the nodes a failed test used to its report."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    nodes: list[RunningNode] = []
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, RunningNode):
            nodes.append(value)
        elif isinstance(value, NodeFactory):
            nodes.extend(value.nodes)
    for n in nodes:
        report.sections.append((f"fluxmq node log tail ({n!r}, {n.log_path})", n.log_tail()))
