"""``fluxmq-node``: load the configuration, set up logging and run the node (arbiter + broker worker)."""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Sequence

import fluxmq
from fluxmq.errors import ConfigError

EXIT_CONFIG_ERROR = 2

DESCRIPTION = """\
Run one fluxmq node: a gunicorn arbiter supervising server.workers gevent workers (default 1)
that host the MQTT broker, acting as one, and serve HTTP: /health, /ready, /cluster/status and
/metrics on server.health_addr, the HTTP bridge on server.http.*.addr and the admin API on
server.admin.addr.

Configuration precedence: --set > FLUXMQ_* environment variables > the --config file > built-in
defaults. FLUXMQ_DEBUG=true / FLUXMQ_TRACE=true force the log level; an unknown FLUXMQ_* variable
is an error unless FLUXMQ_ENV_IGNORE lists it (comma-separated, PREFIX* allowed).

SIGTERM or SIGINT stop the node gracefully within server.shutdown_timeout (exit 0);
SIGHUP reloads the configuration into the running broker (docs/http.rst lists what applies).
"""

EPILOG = """\
exit status: 0 clean stop (or --check passed), 2 invalid configuration or usage,
3 the broker could not start (e.g. its port is in use).
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fluxmq-node`` (every flag documented in ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="fluxmq-node",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        "-c",
        metavar="PATH",
        help="YAML configuration file (default: $FLUXMQ_CONFIG if set, else the built-in defaults; "
        "see conf/fluxmq.yaml for every key)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=_key_value,
        help="override one configuration key, e.g. --set server.tcp.plain.addr=:1884; repeatable; "
        "wins over the environment and the file",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the configuration and load the files it names (password, ACL and credentials "
        "files, certificates, keys); print the effective configuration as YAML and exit 0, or "
        "every problem, one line each, and exit 2",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the default configuration, every key commented, and exit (a starting point for --config)",
    )
    commands = parser.add_subparsers(
        dest="command",
        metavar="COMMAND",
        help="raft-member: add or remove a Raft group member through a node's admin API "
        "(fluxmq-node raft-member --help); without a command, run the node",
    )
    from fluxmq.node import raft_member

    raft_member.add_parser(commands)
    parser.add_argument(
        "--version",
        action="version",
        version=f"fluxmq-node {fluxmq.__version__}",
        help="print the version and exit",
    )
    return parser


def _key_value(text: str) -> str:
    key, sep, _ = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return text


def config_to_yaml(config) -> str:
    """The effective configuration as YAML text, secret values redacted."""
    from ruamel.yaml import YAML

    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    out = io.StringIO()
    yaml.dump(config.to_dict(redact_secrets=True), out)
    return out.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fluxmq-node``; returns (or exits with) the process exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "raft-member":
        from fluxmq.node import raft_member

        return raft_member.run(args)
    if args.print_config:
        from fluxmq.config.schema import SCHEMA

        sys.stdout.write(SCHEMA.yaml())  # the same text as conf/fluxmq.yaml in a source checkout
        return 0
    from fluxmq.config import load_config

    path = args.config or os.environ.get("FLUXMQ_CONFIG") or None
    try:
        config = load_config(path, env=os.environ, overrides=tuple(args.overrides), all_errors=args.check)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)  # ConfigErrors: one line per problem
        return EXIT_CONFIG_ERROR
    if args.check:
        from fluxmq.node.check import start_problems, start_warnings

        problems = start_problems(config)
        for warning in start_warnings(config):
            print(f"warning: {warning}", file=sys.stderr)
        if problems:
            for problem in problems:
                print(str(problem), file=sys.stderr)
            return EXIT_CONFIG_ERROR
        for notice in config.notices:
            print(f"notice: {notice}", file=sys.stderr)
        sys.stdout.write(config_to_yaml(config))
        return 0

    from fluxmq.log import setup_logging
    from fluxmq.node.app import NodeApplication

    def reload_config():
        return load_config(path, env=os.environ, overrides=tuple(args.overrides))

    try:
        setup_logging(config.log)
        app = NodeApplication(config, config_loader=reload_config)
    except ConfigError as exc:  # e.g. a log file that cannot be opened, an exposed admin API
        print(str(exc), file=sys.stderr)  # alone: a node that refuses to start says only why
        return EXIT_CONFIG_ERROR
    from fluxmq.transport.fdlimit import raise_nofile_limit

    fd_limit, _ = raise_nofile_limit()  # a worker holds a descriptor per client: take what the system allows
    log_start(config, path, fd_limit)
    app.run()  # exits the process with the arbiter's status
    return 0


def log_start(config, path: str | None, fd_limit: int = -1) -> None:
    """The node's first log line (its config and where its data lives), then one line per notice."""
    import logging

    log = logging.getLogger("fluxmq.node")
    storage = config.storage
    data = os.path.abspath(storage.path) if storage.type == "lmdb" else "memory (not kept across restarts)"
    log.info(
        "node_starting",
        extra={
            "version": fluxmq.__version__,
            "config": path or "built-in defaults",
            "storage": storage.type,
            "data": data,
            "fd_limit": fd_limit,
        },
    )
    for notice in config.notices:
        log.warning("config_not_implemented", extra={"detail": notice})


if __name__ == "__main__":
    sys.exit(main())
