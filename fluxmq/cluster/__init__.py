"""The cluster (issue 11): etcd metadata, gRPC between nodes, sessions that move between nodes.

Imported only when ``cluster.enabled`` is true; the broker reaches it through
``fluxmq.broker.peers.Peers``.
"""
