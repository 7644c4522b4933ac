"""EtcdMember: this node's own etcd member, started, supervised and stopped by the node.

The member is named after the node id and uses ``cluster.etcd.{data_dir, bind_addr, client_addr,
initial_cluster, bootstrap}`` as reference 000 describes: three nodes whose ``initial_cluster`` lists
the three members form one etcd cluster. It is restarted with backoff if it dies, and stopped (by its
PID) with the node. Its PID is written to ``{data_dir}.pid`` so a node killed with SIGKILL stops the
member it left behind at its next start; on Linux the member also gets SIGTERM when the node dies.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import gevent
from gevent import subprocess

from fluxmq.config.values import parse_addr
from fluxmq.errors import ClusterError

from .config import EtcdSettings, connect_host

__all__ = ["EtcdMember"]

log = logging.getLogger("fluxmq.cluster.etcd.member")

#: first pause before restarting a member that died; doubled per death, reset after a long run
RESTART_BACKOFF = (0.5, 30.0)
#: a member that ran this long before dying restarts after the first pause again
STABLE_RUN = 60.0
STOP_TIMEOUT = 10.0
#: a stopping member still running this long after its SIGTERM (seconds) is killed as soon as no other
#: member's peer port accepts a connection: a leader hands its leadership over before it exits, and
#: when the other members stop at the same moment that hand-over waits out etcd's request timeout
#: (7 s, "leader transfer took too long") with nobody left to take it
LONE_STOP_GRACE = 1.0
#: how often a stopping member's peers are looked at, and how long one connect may take (seconds)
PEER_CHECK = 0.25
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def _url(scheme: str, addr: str) -> str:
    host, port = parse_addr(addr)
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port}"


class EtcdMember:
    """One supervised ``etcd`` process (``start``/``stop``; ``restarts`` counts deaths)."""

    def __init__(self, settings: EtcdSettings, name: str) -> None:
        self.settings = settings
        self.name = name
        self.data_dir = Path(settings.data_dir).absolute()
        self.pid_file = self.data_dir.with_name(self.data_dir.name + ".pid")
        self.log_path = self.data_dir.with_name(self.data_dir.name + ".log")
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._supervisor: gevent.Greenlet | None = None
        self._stopping = False

    def command(self) -> list[str]:
        """The etcd command line of this member."""
        s = self.settings
        binary = s.etcd_binary()
        if not binary:
            raise ClusterError(
                "cluster.etcd.binary: etcd not found on PATH; install Debian's etcd-server "
                "or set cluster.etcd.binary"
            )
        scheme = s.scheme
        peer_listen = _url(scheme, s.bind_addr)
        client_listen = _url(scheme, s.client_addr)
        advertise_client = _url(
            scheme, f"{connect_host(parse_addr(s.client_addr)[0])}:{parse_addr(s.client_addr)[1]}"
        )
        initial = s.initial_cluster or f"{self.name}={peer_listen}"
        members = dict(part.split("=", 1) for part in initial.split(",") if "=" in part)
        if self.name not in members:
            raise ClusterError(
                f"cluster.etcd.initial_cluster: {initial!r} has no member named {self.name!r} "
                "(the node id); list this node as node_id=http://host:port"
            )
        args = [
            binary,
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-peer-urls",
            peer_listen,
            "--initial-advertise-peer-urls",
            members[self.name],
            "--listen-client-urls",
            client_listen,
            "--advertise-client-urls",
            advertise_client,
            "--initial-cluster",
            initial,
            "--initial-cluster-token",
            "fluxmq",
            "--initial-cluster-state",
            "new" if s.bootstrap else "existing",
            "--log-level",
            "warn",
            "--logger",
            "zap",
            # Every retained change, claim and registration is a revision: keep one hour of history (a
            # watch that falls further behind reads its keys again), not all of it.
            "--auto-compaction-mode",
            "periodic",
            "--auto-compaction-retention",
            "1h",
            # A member cut off from the others (a partition) campaigns in vain, raising its term at
            # every election timeout; without pre-vote it comes back with that term, deposes the
            # majority's leader and stalls every request through the election it forces: the
            # majority's nodes then lost their leases at the heal. With it, a member first asks
            # whether it could win and raises no term while it cannot (etcd 3.5's default).
            "--pre-vote",
        ]
        if s.tls_enabled:
            args += [
                "--cert-file",
                s.tls_cert_file,
                "--key-file",
                s.tls_key_file,
                "--peer-cert-file",
                s.tls_cert_file,
                "--peer-key-file",
                s.tls_key_file,
            ]
            if s.tls_ca_file:
                args += [
                    "--trusted-ca-file",
                    s.tls_ca_file,
                    "--client-cert-auth",
                    "--peer-trusted-ca-file",
                    s.tls_ca_file,
                    "--peer-client-cert-auth",
                ]
        return args

    def start(self) -> None:
        """Start the member (returns at once; the metadata client waits for it to answer)."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._stop_leftover()
        self._spawn()
        self._supervisor = gevent.spawn(self._supervise)

    def _spawn(self) -> None:
        args = self.command()
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        self.pid_file.write_text(f"{self.proc.pid}\n")
        log.info(
            "etcd_member_started",
            extra={
                "pid": self.proc.pid,
                "member": self.name,
                "client": self.settings.client_addr,
                "log": str(self.log_path),
            },
        )

    def _supervise(self) -> None:
        pause = RESTART_BACKOFF[0]
        while not self._stopping:
            proc = self.proc
            started = time.monotonic()
            code = proc.wait()
            if self._stopping:
                return
            self.restarts += 1
            if time.monotonic() - started >= STABLE_RUN:
                pause = RESTART_BACKOFF[0]
            log.warning(
                "etcd_member_died",
                extra={
                    "pid": proc.pid,
                    "code": code,
                    "restart_in": pause,
                    "restarts": self.restarts,
                    "log": str(self.log_path),
                },
            )
            gevent.sleep(pause)
            pause = min(pause * 2, RESTART_BACKOFF[1])
            if self._stopping:
                return
            try:
                self._spawn()
            except (OSError, ClusterError) as exc:
                log.error("etcd_member_restart_failed", extra={"error": str(exc)})

    def _wait_stopped(self, proc) -> bool:
        """Wait (STOP_TIMEOUT at most) for the member to exit after its SIGTERM; False when it is to
        be killed: out of time, or, in a cluster of several members, past LONE_STOP_GRACE with no
        other member left to hand anything to (the data is etcd's write-ahead log's: a kill loses
        nothing it acknowledged)."""
        started = time.monotonic()
        alone = not self.peer_addrs()  # a single member hands nothing over: its whole STOP_TIMEOUT
        while True:
            left = STOP_TIMEOUT - (time.monotonic() - started)
            if left <= 0:
                return False
            try:
                proc.wait(min(PEER_CHECK, left))
                return True
            except subprocess.TimeoutExpired:
                pass
            if not alone and time.monotonic() - started >= LONE_STOP_GRACE and not self._peers_listening():
                log.info(
                    "etcd_member_killed",
                    extra={"member": self.name, "reason": "no other member left to hand the leadership to"},
                )
                return False

    def peer_addrs(self) -> list[tuple[str, int]]:
        """(host, port) of the other members' peer URLs (``initial_cluster``)."""
        addrs = []
        for part in self.settings.initial_cluster.split(","):
            name, _, url = part.partition("=")
            if url and name != self.name:
                try:
                    addrs.append(parse_addr(url.split("://", 1)[-1].rstrip("/")))
                except ValueError:  # (refused at the start: command())
                    continue
        return addrs

    def _peers_listening(self) -> bool:
        """Some other member's peer port accepts a connection."""
        for host, port in self.peer_addrs():
            try:
                with socket.create_connection((connect_host(host), port), timeout=PEER_CHECK):
                    return True
            except OSError:
                continue
        return False

    def _stop_leftover(self) -> None:
        """Stop a member a previous run of this node left behind (its PID file names an etcd on our
        data dir), so its ports are free; any other process is left alone."""
        try:
            pid = int(self.pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return
        if not cmdline or not cmdline[0].endswith(b"etcd") or str(self.data_dir).encode() not in cmdline:
            return
        log.warning("etcd_member_leftover_stopped", extra={"pid": pid})
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            gevent.sleep(0.05)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)

    @property
    def pid(self) -> int | None:
        proc = self.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def stop(self) -> None:
        """Stop the member by its PID: SIGTERM, SIGKILL after STOP_TIMEOUT."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.kill(block=True, timeout=1)
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            if not self._wait_stopped(proc):
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        try:
            self.pid_file.unlink()
        except OSError:
            pass
        log.info("etcd_member_stopped", extra={"member": self.name})
