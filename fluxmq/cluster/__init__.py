"""The cluster (issue 11): nodes that act as one broker. Imported only with ``cluster.enabled: true``."""
