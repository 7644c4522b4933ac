"""EtcdSettings: the ``cluster.etcd.*`` keys as plain settings (docs/cluster.rst, "Metadata: etcd")."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field

from fluxmq.config.values import parse_addr
from fluxmq.errors import ConfigError

__all__ = ["EtcdSettings", "cluster_config_problems", "connect_host"]


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
    # True for a member of several (``initial_cluster`` without ``endpoints``): the client also
    # reaches the other members, learned from the member list, when the node's own does not answer
    sync_endpoints: bool = False
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
        return cls(
            binary=section.binary,
            data_dir=section.data_dir,
            bind_addr=section.bind_addr,
            client_addr=section.client_addr,
            initial_cluster=section.initial_cluster,
            bootstrap=section.bootstrap,
            endpoints=list(section.endpoints),
            sync_endpoints=bool(section.initial_cluster) and not section.endpoints,
            prefix=section.prefix,
            hybrid_retained_size_threshold=section.hybrid_retained_size_threshold,
            lease_ttl=section.lease_ttl,
            request_timeout=section.request_timeout,
            start_timeout=section.start_timeout,
            tls_enabled=tls.enabled,
            tls_ca_file=tls.ca_file,
            tls_cert_file=tls.cert_file,
            tls_key_file=tls.key_file,
        )

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


def cluster_config_problems(config) -> list[ConfigError]:
    """What ``cluster.*`` values cannot work together (``--check`` and the node's start report them,
    one line each naming the key and where it was set); [] when clustering is off."""
    if not config.cluster.enabled:
        return []
    problems = []
    node_id = config.cluster.node_id
    if not node_id:
        problems.append(
            ConfigError(
                "cluster.node_id",
                "a node id unique in the cluster",
                config.origin("cluster.node_id"),
                problem="is required when cluster.enabled is true",
            )
        )
    etcd = config.cluster.etcd
    if not etcd.endpoints:
        names = [part.split("=", 1)[0] for part in etcd.initial_cluster.split(",") if part]
        if node_id and names and node_id not in names:
            problems.append(
                ConfigError(
                    "cluster.etcd.initial_cluster",
                    f"a member named {node_id!r} (cluster.node_id)",
                    config.origin("cluster.etcd.initial_cluster"),
                    problem=f"lists {', '.join(names)} but not this node ({node_id!r}, its cluster.node_id)",
                )
            )
        if etcd.tls.enabled and not (etcd.tls.cert_file and etcd.tls.key_file):
            problems.append(
                ConfigError(
                    "cluster.etcd.tls.cert_file",
                    "a certificate and key file",
                    config.origin("cluster.etcd.tls.enabled"),
                    problem="and key_file are required for the node's etcd member when "
                    "cluster.etcd.tls.enabled is true",
                )
            )
    return problems
