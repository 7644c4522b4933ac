"""The cluster's metadata plane in etcd: membership, session ownership, leader election, retained
messages and wills (docs/cluster.rst, "Metadata: etcd")."""

from .config import EtcdSettings
from .metadata import ClusterMetadata

__all__ = ["ClusterMetadata", "EtcdSettings"]
