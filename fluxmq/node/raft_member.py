"""``fluxmq-node raft-member add|remove``: a Raft member change through a node's admin API.

The API is the contract (docs/replication.rst, "Changing members"); this only makes the request
(``POST``/``DELETE /cluster/raft/groups/{group}/members``) and prints the answer: the members on
success (exit 0), else the node's reason, and for a follower the leader to ask (exit 1).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import urllib.parse

DEFAULT_ADMIN = "http://127.0.0.1:8082"
#: the node answers once the change is committed: up to ~30 s for an add through etcd
TIMEOUT = 45.0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "raft-member",
        help="add or remove a Raft group member through a node's admin API (on the group's leader)",
        description="Add or remove a member of a Raft group through the admin API of the group's "
        "leader (docs/replication.rst, Changing members); answered once the change is committed. "
        "The bearer token is read from $FLUXMQ_ADMIN_TOKEN.",
    )
    p.add_argument("action", choices=["add", "remove"], help="add a member, or remove one")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--node", metavar="NODE_ID", help="add: the node id of a node registered in etcd (members from etcd)"
    )
    who.add_argument(
        "--addr", metavar="HOST:PORT", help="the member's Raft address (its cluster.raft.bind_addr)"
    )
    p.add_argument("--group", default="default", help="the Raft group (default: %(default)s)")
    p.add_argument(
        "--admin", default=DEFAULT_ADMIN, metavar="URL", help="the leader's admin API (default: %(default)s)"
    )


def run(args: argparse.Namespace) -> int:
    """Make the request; print the answer (stdout on success, stderr otherwise)."""
    if args.action == "remove" and not args.addr:
        print("raft-member remove: give the member's --addr", file=sys.stderr)
        return 2
    group = urllib.parse.quote(args.group, safe="")
    path = f"/cluster/raft/groups/{group}/members"
    if args.action == "add":
        method, body = "POST", json.dumps({"node": args.node} if args.node else {"addr": args.addr}).encode()
    else:
        method, body = "DELETE", None
        path += "/" + urllib.parse.quote(args.addr, safe=":")
    url = urllib.parse.urlsplit(args.admin)
    conn_class = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    headers = {"Content-Type": "application/json"}
    token = os.environ.get("FLUXMQ_ADMIN_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn = conn_class(url.hostname or "127.0.0.1", url.port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        status, raw = resp.status, resp.read()
    except OSError as exc:
        print(f"raft-member: {args.admin}: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = {"error": raw.decode(errors="replace")}
    if status == 200:
        print(json.dumps(doc))
        return 0
    error = doc.get("error", doc) if isinstance(doc, dict) else doc
    print(f"raft-member: {status}: {error}", file=sys.stderr)
    if isinstance(doc, dict) and doc.get("leader"):
        print(f"raft-member: ask the leader's admin API (its Raft address: {doc['leader']})", file=sys.stderr)
    return 1
