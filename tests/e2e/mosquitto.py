"""A real Mosquitto broker for bridge tests: started on a free 127.0.0.1 port with a temp config,
stopped (and restarted on the same port) by its PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.conftest import free_port

HOST = "127.0.0.1"
START_TIMEOUT = 10.0

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
)


class Mosquitto:
    """One Mosquitto process; ``extra`` lines are appended to its config (TLS listener, ...)."""

    def __init__(self, directory: Path, extra: str = "", port: int | None = None) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = HOST
        self.conf = directory / "mosquitto.conf"
        self.log = directory / "mosquitto.log"
        # Persistence on: a restart keeps its subscribers' sessions (the outage test needs that).
        self.conf.write_text(
            f"listener {self.port} {HOST}\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {directory}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 100000\n"
            f"log_dest file {self.log}\n"
            "log_type all\n" + ("user root\n" if os.geteuid() == 0 else "") + extra
            # As root Mosquitto drops to user "mosquitto", which cannot read the test's 0700 temp dirs.
        )
        self.process: subprocess.Popen | None = None

    def start(self) -> Mosquitto:
        self.process = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited {self.process.returncode}: {self.log_text()[-2000:]}")
            try:
                socket.create_connection((HOST, self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not listen in time")

    def stop(self) -> None:
        """SIGTERM (Mosquitto saves its persistence file), SIGKILL after a bound."""
        p = self.process
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""
