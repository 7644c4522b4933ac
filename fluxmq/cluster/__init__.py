"""fluxmq cluster: imported only when ``cluster.enabled`` is true (docs/cluster.rst)."""
