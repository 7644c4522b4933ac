"""Start and stop the brokers under test (Mosquitto and fluxmq-node) on free 127.0.0.1 ports.

Each broker runs from a generated config in a temporary directory, optionally pinned to CPUs with
``taskset``, with RLIMIT_NOFILE raised as far as this process may.  Only the processes started here
are ever signalled, by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench import procinfo

REPO = Path(__file__).resolve().parent.parent


class BrokerError(RuntimeError):
    """A broker could not be started or did not become ready."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def taskset_prefix(cpus: str | None) -> list[str]:
    """``["taskset", "-c", cpus]`` when pinning is asked for and possible, else ``[]``."""
    if not cpus:
        return []
    if shutil.which("taskset") is None:
        raise BrokerError("taskset not found (util-linux); run with --no-pin")
    return ["taskset", "-c", cpus]


class BrokerProcess:
    """Base class: a broker child process with a port, a log file and a clean stop."""

    name = "broker"

    def __init__(self, cpus: str | None = None, workdir: str | None = None) -> None:
        self.cpus = cpus
        self.port = free_port()
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"bench-{self.name}-"))
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / f"{self.name}.log"
        self._log = None

    @property
    def pid(self) -> int:
        """PID of the broker process (the root of its process tree)."""
        assert self.proc is not None
        return self.proc.pid

    @property
    def cpu_pid(self) -> int:
        """The one process whose CPU is the broker's (what a generator that reads one PID is given)."""
        return self.pid

    def command(self) -> list[str]:
        """The command line, without the taskset prefix."""
        raise NotImplementedError

    def version(self) -> str:
        """A short version string for reports."""
        return "?"

    def env(self) -> dict[str, str] | None:
        """Environment of the broker process (None = inherit)."""
        return None

    def ready(self) -> bool:
        """True once the broker serves MQTT."""
        return port_open(self.port)

    def start(self, timeout: float = 30.0) -> BrokerProcess:
        """Start the broker and wait until :meth:`ready`; raises :class:`BrokerError`."""
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        cmd = taskset_prefix(self.cpus) + self.command()
        self.proc = subprocess.Popen(
            cmd, cwd=self.workdir, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=procinfo.raise_nofile, env=self.env(),
        )  # fmt: skip
        limit = time.monotonic() + timeout
        while time.monotonic() < limit:
            if self.proc.poll() is not None:
                raise BrokerError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise BrokerError(f"{self.name} not ready within {timeout:.0f}s: {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        """The last ``n`` characters of the broker's output."""
        try:
            return self.log_path.read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the broker (our child, by PID), then SIGKILL what is left of its tree."""
        if self.proc is not None:
            tree = [(p, procinfo.start_time(p)) for p in procinfo.tree(self.proc.pid)]
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            for pid, started in tree[1:]:  # descendants we caused to exist (e.g. a gunicorn worker)
                if started >= 0 and procinfo.start_time(pid) == started:  # still that process
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        """Stop and remove the working directory if we created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class Mosquitto(BrokerProcess):
    """Debian's ``mosquitto`` with a generated config: one 127.0.0.1 listener, no persistence,
    ``max_queued_messages`` big enough not to drop, ``max_inflight_messages`` 100."""

    name = "mosquitto"

    def __init__(self, cpus: str | None = None, workdir: str | None = None, max_queued: int = 1_000_000,
                 max_inflight: int = 100, binary: str | None = None) -> None:  # fmt: skip
        super().__init__(cpus, workdir)
        self.binary = binary or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.conf = self.workdir / "mosquitto.conf"
        self.conf.write_text(
            f"# generated by bench/brokers.py\n"
            f"listener {self.port} 127.0.0.1\n"
            f"allow_anonymous true\n"
            f"persistence false\n"
            f"max_queued_messages {max_queued}\n"
            f"max_queued_bytes 0\n"
            f"max_inflight_messages {max_inflight}\n"
            f"max_connections -1\n"
            f"log_dest stderr\n"
            f"log_type error\n"
            f"log_type warning\n"
        )

    @staticmethod
    def available(binary: str | None = None) -> bool:
        """True if the mosquitto binary exists."""
        b = binary or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        return os.access(b, os.X_OK)

    def command(self) -> list[str]:
        """``mosquitto -c <generated conf>``."""
        return [self.binary, "-c", str(self.conf)]

    def version(self) -> str:
        """e.g. ``2.0.11``."""
        try:
            out = subprocess.run([self.binary, "-h"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return "?"
        for word in out.split():
            if word[:1].isdigit() and "." in word:
                return word
        return "?"


def fluxmq_node_command(python: str | None = None) -> list[str]:
    """How to run fluxmq-node: the venv's console script if installed, else via the module."""
    py = Path(python or sys.executable)
    script = py.parent / "fluxmq-node"
    if script.exists():
        return [str(script)]
    return [str(py), "-c", "import sys; from fluxmq.node.cli import main; sys.exit(main())"]


_EXTRA_LISTENERS: dict[str, list[str]] = {}


def other_listener_keys(python: str | None = None) -> list[str]:
    """Config keys of fluxmq listeners enabled by default besides MQTT/TCP and health (HTTP bridge,
    admin, WebSocket, ...), found with ``fluxmq-node --check``: the benchmark turns them off so that
    they neither take CPU nor collide on their default ports.  Cached per interpreter."""
    key = python or sys.executable
    if key in _EXTRA_LISTENERS:
        return _EXTRA_LISTENERS[key]
    from ruamel.yaml import YAML  # noqa: PLC0415 - a dependency of fluxmq itself

    p = subprocess.run(fluxmq_node_command(python) + ["--check", "--set", "server.tcp.plain.addr=127.0.0.1:1"],
                       capture_output=True, text=True, timeout=120, cwd=REPO, env=_fluxmq_env())  # fmt: skip
    if p.returncode != 0:
        raise BrokerError(f"fluxmq-node --check failed: {(p.stderr or p.stdout).strip()[-500:]}")
    found: list[str] = []

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif path.endswith(".addr") and node and path not in ("server.tcp.plain.addr",):
            found.append(path)

    walk((YAML(typ="safe", pure=True).load(p.stdout) or {}).get("server", {}), "server")
    _EXTRA_LISTENERS[key] = found
    return found


def _fluxmq_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


class FluxmqNode(BrokerProcess):
    """``fluxmq-node --config <generated yaml> --set ...`` on free ports; ready when GET /ready is 200."""

    name = "fluxmq"

    def __init__(self, cpus: str | None = None, workdir: str | None = None, max_queued: int = 1_000_000,
                 max_inflight: int = 100, max_connections: int = 60000, sets: list[str] | None = None,
                 python: str | None = None, host: str = "127.0.0.1",
                 prefix: tuple[str, ...] = ()) -> None:  # fmt: skip
        """``host``: the address its listeners bind (and are reached at); ``prefix``: a command that
        execs the node (``ip netns exec NS``: bench/chaos.py's partition fault)."""
        super().__init__(cpus, workdir)
        self.health_port = free_port()
        self.python = python
        self.host = host
        self.prefix = tuple(prefix)
        self.sets = list(sets or [])
        self.config = self.workdir / "fluxmq.yaml"
        self.config.write_text(
            "# generated by bench/brokers.py\n"
            "server:\n"
            "  tcp:\n"
            "    plain:\n"
            f'      addr: "{host}:{self.port}"\n'
            f"      max_connections: {max_connections}\n"
            f'  health_addr: "{host}:{self.health_port}"\n'
            "broker:\n"
            f"  max_inflight: {max_inflight}\n"
            f"  max_queued_messages: {max_queued}\n"
            '  max_queued_bytes: "1GiB"\n'
            "storage:\n"
            '  type: "memory"\n'
            f'  path: "{self.workdir / "data"}"\n'
            "log:\n"
            '  level: "warning"\n'
        )

    @property
    def cpu_pid(self) -> int:
        """The gunicorn worker when there is one (the arbiter only supervises: its CPU is ~0), else the
        root; with several workers no single PID is the broker, and callers sum the tree instead."""
        below = procinfo.tree(self.pid)[1:]
        return below[0] if len(below) == 1 else self.pid

    @staticmethod
    def available(python: str | None = None) -> bool:
        """True if the fluxmq node can be imported by the interpreter that would run it."""
        cmd = fluxmq_node_command(python)
        if len(cmd) == 1:
            return True
        r = subprocess.run([cmd[0], "-c", "import fluxmq.node.cli"], capture_output=True, timeout=60,
                           cwd=REPO)  # fmt: skip
        return r.returncode == 0

    def command(self) -> list[str]:
        """``fluxmq-node --config <yaml> --set ...`` (other listeners off)."""
        cmd = [*self.prefix, *fluxmq_node_command(self.python), "--config", str(self.config)]
        for k in other_listener_keys(self.python):
            cmd += ["--set", f"{k}="]
        for kv in self.sets:
            cmd += ["--set", kv]
        return cmd

    def env(self) -> dict[str, str] | None:
        """Inherit, with the repository on PYTHONPATH when fluxmq is not installed in the venv."""
        return _fluxmq_env()

    def ready(self) -> bool:
        """GET /ready on the health port returns 200 (and the MQTT port accepts)."""
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.health_port}/ready", timeout=1) as r:
                if r.status != 200:
                    return False
        except (OSError, urllib.error.URLError):
            return False
        return port_open(self.port, self.host)

    def version(self) -> str:
        """The fluxmq package version."""
        py = self.python or sys.executable
        try:
            out = subprocess.run([py, "-c", "import fluxmq; print(fluxmq.__version__)"], capture_output=True,
                                 text=True, timeout=30, cwd=REPO).stdout.strip()  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return "?"
        return out or "?"
