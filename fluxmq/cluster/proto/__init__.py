"""The gRPC service between cluster nodes (cluster.proto) and its generated code."""
