"""``fluxmq-node --check``: every problem the node would hit at start, found without starting it.

The config loader checks keys and values; this loads what the values name (the password, ACL and
SCRAM credentials files, each enabled TLS listener's certificate, key and CA) with the same code the
node uses at start, and checks the node-level rules (two HTTP listeners on one port, an exposed admin
API without a token). Each check that fails adds its ``ConfigError``; none stops the others.
``start_warnings`` lists what the node starts with but an operator should know: a listener on a
network address that refuses anonymous clients (Mosquitto 2's default).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from fluxmq.errors import ConfigError

__all__ = ["start_problems", "start_warnings"]


def start_problems(config: Any) -> list[ConfigError]:
    """The problems (one ``ConfigError`` each) the node would stop on at start with ``config``."""
    from fluxmq.auth.acl import AclFile
    from fluxmq.auth.password_file import PasswordFile
    from fluxmq.broker.auth_enhanced import authenticators_from_config
    from fluxmq.http.admin import TOKEN_ENV, check_admin_exposure
    from fluxmq.node.app import _https_handshake, http_surfaces
    from fluxmq.node.service import MQTT_LISTENERS, stream_factory

    problems: list[ConfigError] = []

    def attempt(check: Callable[[], object]) -> None:
        try:
            check()
        except ConfigError as exc:
            problems.append(exc)

    auth = config.auth
    if auth.password_file:
        attempt(lambda: PasswordFile.load(auth.password_file))
    if auth.acl_file:
        attempt(lambda: AclFile.load(auth.acl_file))
    if auth.enhanced.method:
        attempt(lambda: authenticators_from_config(auth.enhanced.method, auth.enhanced.credentials_file))
    for name, section in MQTT_LISTENERS:
        if config.get(section).addr:
            attempt(lambda name=name, section=section: stream_factory(config, name, section))
    surfaces: list[tuple[str, str]] = []
    attempt(lambda: surfaces.extend(http_surfaces(config)))
    for surface, _ in surfaces:
        attempt(lambda surface=surface: _https_handshake(config, surface))
    attempt(lambda: check_admin_exposure(config.server.admin.addr, os.environ.get(TOKEN_ENV) or None))
    from fluxmq.node.workers import check_workers

    attempt(lambda: check_workers(config))
    if config.cluster.enabled:
        from fluxmq.cluster.config import cluster_settings  # plain config code: grpc is not imported
        from fluxmq.cluster.metadata.config import cluster_config_problems

        attempt(lambda: cluster_settings(config))  # node_id, peers, transport TLS
        problems.extend(p for p in cluster_config_problems(config) if p.key != "cluster.node_id")  # etcd
    from fluxmq.replication.config import replication_problems

    problems.extend(replication_problems(config))
    return problems


def start_warnings(config: Any) -> list[str]:
    """What the node would warn about at start (one line each); none stops it."""
    from fluxmq.node.service import anonymous_exposure_warnings

    return anonymous_exposure_warnings(config)
