"""EtcdSettings: the ``cluster.etcd.*`` keys as plain settings (docs/cluster.rst, "Metadata: etcd")."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field

from fluxmq.config.values import parse_addr

__all__ = ["EtcdSettings", "connect_host"]


@dataclass
class EtcdSettings:
    """What the metadata plane needs to run or join etcd. Durations are seconds."""

    binary: str = ""  # "" = ``etcd`` on PATH
    data_dir: str = "./data/etcd"
    bind_addr: str = "127.0.0.1:2380"  # peer URL this member listens on
    client_addr: str = "127.0.0.1:2379"  # client URL this member listens on (the node connects here)
    initial_cluster: str = ""  # "name=http://host:port,..."; "" = this member alone
    bootstrap: bool = True  # True: a new cluster (--initial-cluster-state new); False: join an existing one
    endpoints: list[str] = field(default_factory=list)  # set = join this external etcd, run no member
    prefix: str = "/fluxmq/"
    hybrid_retained_size_threshold: int = 1024
    lease_ttl: float = 10.0
    request_timeout: float = 5.0
    start_timeout: float = 60.0
    tls_enabled: bool = False
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""

    @classmethod
    def from_config(cls, config) -> EtcdSettings:
        """From a loaded Config (``config.cluster.etcd``) or that section itself."""
        section = config.cluster.etcd if hasattr(config, "cluster") else config
        tls = section.tls
        return cls(binary=section.binary, data_dir=section.data_dir, bind_addr=section.bind_addr,
                   client_addr=section.client_addr, initial_cluster=section.initial_cluster,
                   bootstrap=section.bootstrap, endpoints=list(section.endpoints), prefix=section.prefix,
                   hybrid_retained_size_threshold=section.hybrid_retained_size_threshold,
                   lease_ttl=section.lease_ttl, request_timeout=section.request_timeout,
                   start_timeout=section.start_timeout, tls_enabled=tls.enabled, tls_ca_file=tls.ca_file,
                   tls_cert_file=tls.cert_file, tls_key_file=tls.key_file)

    @property
    def scheme(self) -> str:
        return "https" if self.tls_enabled else "http"

    @property
    def supervised(self) -> bool:
        """True when this node runs its own etcd member (no external ``endpoints``)."""
        return not self.endpoints

    def client_endpoints(self) -> list[str]:
        """The URLs the node's client talks to: the external ones, or its own member's."""
        if self.endpoints:
            return [e if "://" in e else f"{self.scheme}://{e}" for e in self.endpoints]
        host, port = parse_addr(self.client_addr)
        return [f"{self.scheme}://{_url_host(connect_host(host))}:{port}"]

    def etcd_binary(self) -> str | None:
        return self.binary or shutil.which("etcd")


def connect_host(host: str) -> str:
    """The address to connect to for a listener bound to ``host`` (a wildcard means this machine)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
