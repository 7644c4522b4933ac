"""What the loader accepts so that a config written from the reference documents starts.

The Go FluxMQ documents (README, clustering, health) and the fluxrig platform configuration (reference
004) spell some things fluxmq does not implement, or implements under another value. Refusing them
would make a copied config fail to start for a feature the operator may not even use; accepting them
silently would hide that the setting has no effect. So they are accepted and each one becomes a
notice (``Config.notices``) that ``fluxmq-node`` logs at start and ``--check`` prints:

- ``NOT_IMPLEMENTED``: documented sections and keys fluxmq does not have yet; their values are
  ignored (not validated, since fluxmq does not know their types yet).
- ``VALUE_ALIASES``: reference values of a known key, mapped to fluxmq's value.
- ``ENV_ALIASES``: reference 004's top-level override variables, mapped to keys.

Anything else unknown is still an error: a typo must not be mistaken for a roadmap feature.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

__all__ = ["ENV_ALIASES", "ENV_IGNORE", "NOT_IMPLEMENTED", "VALUE_ALIASES", "env_ignored", "not_implemented"]

# Whole sections (any keys below them) and single keys; ``*`` matches one name.
NOT_IMPLEMENTED: tuple[str, ...] = (
    # reference 000: every cluster key is implemented (cluster.routes, enabled, node_id, etcd,
    # transport, raft)
    "queue",  # reference 002: durable queues with retention and replication
    "server.*.*.prefer_server_cipher_suites",  # Go's crypto/tls knob; OpenSSL's server order applies
)

# key -> {reference value: fluxmq value}
VALUE_ALIASES: dict[str, dict[str, str]] = {
    "storage.type": {"badger": "lmdb"},  # the Go broker's persistent store; lmdb is fluxmq's
}

# Reference 004: FLUXRIG_DEBUG=true / FLUXRIG_TRACE=true force the level, whatever the file says.
ENV_ALIASES: dict[str, str] = {"FLUXMQ_DEBUG": "log.debug", "FLUXMQ_TRACE": "log.trace"}

# Comma-separated names (a trailing * matches a prefix) of FLUXMQ_ variables that are not meant for
# fluxmq, e.g. those Kubernetes injects for a Service named fluxmq (FLUXMQ_SERVICE_HOST, FLUXMQ_PORT*).
ENV_IGNORE = "FLUXMQ_ENV_IGNORE"


def not_implemented(dotted: str) -> bool:
    """True when ``dotted`` is, or lies under, a documented-but-not-implemented section or key."""
    parts = dotted.split(".")
    for pattern in NOT_IMPLEMENTED:
        want = pattern.split(".")
        if len(parts) >= len(want) and all(
            fnmatch.fnmatchcase(p, w) for p, w in zip(parts, want, strict=False)
        ):
            return True
    return False


def env_ignored(name: str, env: Mapping[str, str]) -> bool:
    """True when ``name`` is listed in ``FLUXMQ_ENV_IGNORE`` (exactly, or by a ``PREFIX*`` entry)."""
    for entry in env.get(ENV_IGNORE, "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        if entry.endswith("*") and name.startswith(entry[:-1]):
            return True
        if name == entry:
            return True
    return False
