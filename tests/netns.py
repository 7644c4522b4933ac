"""Network namespaces for real partitions of cluster nodes on one host (``NetnsLab``).

One namespace per node (``fxp{pid}{lab}-{i}``), each with a veth whose other end is in a bridge of
the root namespace (``fxb{pid}{lab}``); node ``i`` has ``10.A.B.{i + 1}/24``, the bridge (the root
namespace: the test process, the "client side", never partitioned) ``10.A.B.254``. The /24 is drawn
from the pid and checked unused (no address or route of the root namespace in it) under a lock file,
so two labs at once (pytest -n 2, another checkout's tests, bench/chaos.py) never share one. The
names carry the creating pid: a lab whose process died (kill -9) is removed by the next one
(``clean_stale``). Everything a lab made is removed in ``close()``, which also runs at exit.

A process runs in node ``i``'s namespace with ``lab.wrap(i, argv)`` (``ip netns exec``), binding
its listeners to ``lab.addr(i)`` (each namespace has its own ports, so a node's ports are fixed).
``partition(i)`` adds, in ``i``'s namespace, a blackhole route for each peer's address (and for the
root namespace's ``service`` address), in each peer's namespace one for ``i``'s, and in the root
namespace a blackhole rule for packets from ``service`` to ``i`` (dropped both ways, as by a cut
cable; the clients in the root namespace, from ``gateway``, still reach every node); ``heal(i)``
deletes them.

Needs root (CAP_NET_ADMIN) and iproute2's ``ip`` (scripts/env.sh installs it when missing);
``unavailable()`` says why a lab cannot be made, for a test's skip.
"""

from __future__ import annotations

import atexit
import fcntl
import ipaddress
import os
import re
import shutil
import subprocess
import tempfile
import weakref
from pathlib import Path

LOCK = Path(tempfile.gettempdir()) / "fluxmq-netns.lock"
_NAME = re.compile(r"^fx[pbv](\d+)l\d+")
_labs: weakref.WeakSet[NetnsLab] = weakref.WeakSet()
_count = 0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable() -> str | None:
    """Why no namespace can be made here (None: they can)."""
    if shutil.which("ip") is None:
        return "iproute2's ip not found (scripts/env.sh --system-packages installs it)"
    name = f"fxp{os.getpid()}l0-probe"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace (needs root / CAP_NET_ADMIN): {made.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (a killed test process nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def clean_stale() -> None:
    """Remove the namespaces, bridges and veths of labs whose process is gone."""
    for name in _ip("netns", "list", check=False).stdout.split():
        m = _NAME.match(name)
        if m and not _alive(int(m.group(1))):
            _ip("netns", "del", name, check=False)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@")[0]
        m = _NAME.match(name)
        if m and not _alive(int(m.group(1))):
            _ip("link", "del", name, check=False)


def _clean_stale_rules() -> None:
    """Remove the root namespace's blackhole rules of labs gone (their service address is on no
    interface any more): a lab later given that subnet must not inherit them."""
    addresses = set(re.findall(r"inet (\S+)/", _ip("-4", "-o", "addr", "show", check=False).stdout))
    for line in _ip("-4", "rule", "show", check=False).stdout.splitlines():
        m = re.search(r"from (10\.\S+) to (10\.\S+) blackhole", line)
        if m and m.group(1).split("/")[0].endswith(".253") and m.group(1).split("/")[0] not in addresses:
            _ip("rule", "del", "from", m.group(1), "to", m.group(2), "blackhole", check=False)


def _used_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    for line in _ip("-4", "-o", "addr", "show", check=False).stdout.splitlines():
        m = re.search(r"inet (\S+)", line)
        if m:
            nets.append(ipaddress.ip_interface(m.group(1)).network)
    for line in _ip("-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        first = line.split()[0] if line.split() else ""
        if first in ("default", "broadcast", "local", "unreachable", "blackhole", "prohibit"):
            first = line.split()[1] if first != "default" and len(line.split()) > 1 else ""
        try:
            nets.append(ipaddress.ip_network(first, strict=False))
        except ValueError:
            pass
    return nets


class NetnsLab:
    """``size`` namespaces on one bridge; ``close()`` (also at exit) removes them."""

    def __init__(self, size: int) -> None:
        global _count
        _count += 1
        self.size = size
        self.tag = f"{os.getpid()}l{_count}"
        self.bridge = f"fxb{self.tag}"
        self.names = [f"fxp{self.tag}-{i}" for i in range(size)]
        self.veths = [f"fxv{self.tag}-{i}" for i in range(size)]
        self.network: ipaddress.IPv4Network | None = None
        self.cut: set[int] = set()
        self._made: list[tuple[str, ...]] = []  # undo commands, last first

    def addr(self, i: int) -> str:
        """Node ``i``'s address (in its namespace, reached from the root one through the bridge)."""
        return str(self.network[i + 1])

    @property
    def gateway(self) -> str:
        """The root namespace's address on the bridge (what the nodes see the test process as)."""
        return str(self.network[254])

    @property
    def service(self) -> str:
        """A second root-namespace address on the bridge, for a shared service the nodes use (an
        external etcd: bench/chaos.py): a partitioned node loses it with its peers, while the
        clients, reaching it from ``gateway``, keep their connections."""
        return str(self.network[253])

    def wrap(self, i: int, argv: list[str]) -> list[str]:
        """``argv`` run in node ``i``'s namespace."""
        return ["ip", "netns", "exec", self.names[i], *argv]

    def start(self) -> NetnsLab:
        assert len(self.tag) + 6 <= 15, "interface names are at most 15 characters"
        _labs.add(self)
        try:
            with open(LOCK, "a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # two labs never pick one subnet
                clean_stale()
                _clean_stale_rules()
                self.network = self._free_network()
                self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _free_network(self) -> ipaddress.IPv4Network:
        used = _used_networks()
        pid = os.getpid()
        for n in range(4096):
            k = (pid * 7 + _count * 131 + n) % (200 * 256)
            net = ipaddress.ip_network(f"10.{40 + k // 256}.{k % 256}.0/24")
            if not any(net.overlaps(u) for u in used):
                return net
        raise RuntimeError("no free 10.x.y.0/24 for a netns lab")

    def _do(self, *args: str, undo: tuple[str, ...] | None = None) -> None:
        _ip(*args)
        if undo:
            self._made.append(undo)

    def _build(self) -> None:
        prefix = self.network.prefixlen
        self._do("link", "add", self.bridge, "type", "bridge", undo=("link", "del", self.bridge))
        self._do("addr", "add", f"{self.gateway}/{prefix}", "dev", self.bridge)
        self._do("addr", "add", f"{self.service}/{prefix}", "dev", self.bridge)  # secondary: not a source
        self._do("link", "set", self.bridge, "up")
        for i, (ns, veth) in enumerate(zip(self.names, self.veths, strict=True)):
            self._do("netns", "add", ns, undo=("netns", "del", ns))
            self._do(
                "link",
                "add",
                veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
                undo=("link", "del", veth),
            )
            self._do("link", "set", veth, "master", self.bridge, "up")
            self._do("-n", ns, "addr", "add", f"{self.addr(i)}/{prefix}", "dev", "eth0")
            self._do("-n", ns, "link", "set", "eth0", "up")
            self._do("-n", ns, "link", "set", "lo", "up")

    def _routes(self, i: int, verb: str) -> None:
        # the service's side: what the root namespace sends from the service address to node i is
        # dropped (a rule, not a route: the clients, from the gateway address, still reach it)
        _ip(
            "rule",
            verb,
            "from",
            f"{self.service}/32",
            "to",
            f"{self.addr(i)}/32",
            "blackhole",
            check=verb == "add",
        )
        _ip("-n", self.names[i], "route", verb, "blackhole", f"{self.service}/32", check=verb == "add")
        for j in range(self.size):
            if j != i:
                _ip(
                    "-n", self.names[i], "route", verb, "blackhole", f"{self.addr(j)}/32", check=verb == "add"
                )
                _ip(
                    "-n", self.names[j], "route", verb, "blackhole", f"{self.addr(i)}/32", check=verb == "add"
                )

    def partition(self, i: int) -> None:
        """Cut node ``i`` off from every other node (both ways); the root namespace still reaches it."""
        if i not in self.cut:
            self._routes(i, "add")
            self.cut.add(i)

    def heal(self, i: int) -> None:
        """Undo ``partition(i)``."""
        if i in self.cut:
            self._routes(i, "del")
            self.cut.discard(i)

    def close(self) -> None:
        """Remove everything this lab made (idempotent; errors ignored: a part may be gone)."""
        for i in list(self.cut):
            self.heal(i)  # the root namespace's rules
        while self._made:
            _ip(*self._made.pop(), check=False)
        self.cut.clear()
        _labs.discard(self)

    def __enter__(self) -> NetnsLab:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


@atexit.register
def _close_all() -> None:
    for lab in list(_labs):
        lab.close()
