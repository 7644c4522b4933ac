"""A real etcd server for the cluster tests: ``EtcdProcess`` and ``start_etcd``.

The session's shared etcd is the ``etcd_server`` fixture (tests/conftest.py), one for the whole
run (tests/cluster and tests/e2e alike). Tests isolate themselves by key prefix (``etcd_prefix``),
never by starting their own etcd, so the suite pays for one etcd start. A test that must restart
or kill etcd starts its own with ``start_etcd(tmp_path)`` and stops it with ``EtcdProcess.stop()``.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import HOST, free_port

ETCD_START_TIMEOUT = 20.0


class EtcdProcess:
    """A real etcd member on free loopback ports, with its data dir in a temp directory."""

    def __init__(self, data_dir: Path, name: str = "test", host: str = HOST) -> None:
        self.data_dir = data_dir
        self.name = name
        self.host = host  # another address than loopback: the bridge of a netns lab (tests/netns.py)
        self.client_port = free_port()
        self.peer_port = free_port()
        self.endpoint = f"http://{host}:{self.client_port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = data_dir.parent / f"etcd-{name}.log"

    def start(self) -> EtcdProcess:
        binary = shutil.which("etcd")
        if binary is None:
            pytest.fail("etcd not found: scripts/test installs Debian's etcd-server")
        peer = f"http://{self.host}:{self.peer_port}"
        args = [
            binary,
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            self.endpoint,
            "--advertise-client-urls",
            self.endpoint,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"{self.name}={peer}",
            "--initial-cluster-state",
            "new",
            "--log-level",
            "warn",
        ]
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ETCD_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"etcd exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"etcd did not become healthy within {ETCD_START_TIMEOUT}s")

    def stop(self, sig_kill: bool = False) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill() if sig_kill else proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.proc = None
        self.log.close()


def start_etcd(tmp_path: Path, name: str = "test", host: str = HOST) -> EtcdProcess:
    """Start a private etcd (for a test that restarts or kills it); the caller stops it."""
    data = tmp_path / f"etcd-{name}-data"
    data.mkdir(parents=True, exist_ok=True)
    return EtcdProcess(data, name, host).start()


def _gateway(endpoint: str, call: str, doc: dict) -> dict:
    """One call of etcd's v3 JSON gateway (keys and values base64 in ``doc`` and the answer)."""
    req = urllib.request.Request(
        f"{endpoint}/v3/kv/{call}",
        data=json.dumps(doc).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def etcd_get(endpoint: str, key: str) -> bytes | None:
    """The value of ``key`` in the etcd at ``endpoint`` (None: no such key)."""
    kvs = _gateway(endpoint, "range", {"key": base64.b64encode(key.encode()).decode()}).get("kvs") or []
    return base64.b64decode(kvs[0]["value"]) if kvs else None


def etcd_put(endpoint: str, key: str, value: bytes) -> None:
    """Write ``key`` in the etcd at ``endpoint``."""
    _gateway(
        endpoint,
        "put",
        {"key": base64.b64encode(key.encode()).decode(), "value": base64.b64encode(value).decode()},
    )
