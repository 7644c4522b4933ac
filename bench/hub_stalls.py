"""How long the admin API, ``/metrics`` and logging keep the gevent hub from running other greenlets.

In-process, no network: a Broker with ``--sessions`` offline persistent sessions (memory storage,
one subscription each), the admin WSGI app and the metrics registry over it. Each request runs in
its own greenlet while a monitor greenlet yields in a loop and records the longest gap between its
turns: that gap is the longest time every other client waited (the hub stall).

    .venv/bin/python -m bench.hub_stalls --sessions 100000            # admin + metrics
    .venv/bin/python -m bench.hub_stalls --log 200000                 # log records/s to a file

Run it with ``PYTHONPATH`` pointing at another tree to measure that tree's code (before/after).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import gevent  # noqa: E402
from prometheus_client import generate_latest  # noqa: E402


def build_broker(count: int):
    from fluxmq.broker.broker import Broker

    broker = Broker()
    rng = random.Random(17)  # client ids in no order, as real ones arrive
    for i in range(count):
        session, _ = broker.open_session(f"client-{rng.getrandbits(48):012x}", False, 3600)
        broker.subscribe(session, f"devices/{i}/cmd", 1)
    return broker


def wsgi_get(app, path: str, query: str = "") -> tuple[str, int]:
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "RAW_URI": path + (f"?{query}" if query else ""),
        "HTTP_HOST": "127.0.0.1",
        "wsgi.input": io.BytesIO(b""),
        "HTTP_AUTHORIZATION": "Bearer bench",
    }
    seen = {}

    def start_response(status, headers, exc_info=None):
        seen["status"] = status

    body = b"".join(app(environ, start_response))
    return seen["status"], len(body)


def measure(fn, repeat: int = 3) -> tuple[float, float]:
    """(median wall seconds, longest hub stall seconds) of ``fn()`` run in its own greenlet."""
    walls, stalls = [], []
    for _ in range(repeat):
        done = []
        worst = [0.0]

        def monitor(done: list = done, worst: list = worst) -> None:
            last = time.perf_counter()
            while not done:
                gevent.sleep(0)
                now = time.perf_counter()
                worst[0] = max(worst[0], now - last)
                last = now

        watcher = gevent.spawn(monitor)
        gevent.sleep(0)  # the monitor takes its first turn
        started = time.perf_counter()
        job = gevent.spawn(fn)
        job.join()
        walls.append(time.perf_counter() - started)
        done.append(True)
        watcher.join()
        stalls.append(worst[0])
        job.get()
    walls.sort()
    stalls.sort()
    return walls[len(walls) // 2], stalls[len(stalls) // 2]


def bench_http(count: int) -> None:
    from fluxmq.http.admin import AdminAPI
    from fluxmq.http.metrics import make_registry

    started = time.perf_counter()
    broker = build_broker(count)
    print(f"built {len(broker.sessions):,} sessions in {time.perf_counter() - started:.1f} s")
    service = SimpleNamespace(broker=broker, listeners=[])
    admin = AdminAPI(service, "bench")
    registry = make_registry(service)
    cases = [
        ("admin GET /sessions?limit=100", lambda: wsgi_get(admin, "/sessions", "limit=100")),
        (
            "admin GET /sessions?connected=false&limit=1000",
            lambda: wsgi_get(admin, "/sessions", "connected=false&limit=1000"),
        ),
        ("admin GET /subscriptions?limit=100", lambda: wsgi_get(admin, "/subscriptions", "limit=100")),
        ("admin GET /stats", lambda: wsgi_get(admin, "/stats")),
        ("GET /metrics (collect + encode)", lambda: generate_latest(registry)),
    ]
    print(f"| request ({count:,} sessions) | wall ms (median of 3) | longest hub stall ms |")
    print("|---|---:|---:|")
    for name, fn in cases:
        wall, stall = measure(fn)
        print(f"| {name} | {wall * 1000:.1f} | {stall * 1000:.1f} |")


def bench_log(records: int) -> None:
    from fluxmq.log import setup_logging

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fluxmq.log")
        cfg = SimpleNamespace(
            level="info",
            format="text",
            file=path,
            max_size_mb=1024,
            max_backups=1,
            compress=False,
            throttling=SimpleNamespace(enabled=False, rate=1.0, burst=1),
        )
        setup_logging(cfg)
        log = logging.getLogger("fluxmq.bench")
        per_turn = 100  # records logged per loop turn, as a busy worker would

        def run() -> None:
            for i in range(0, records, per_turn):
                for j in range(per_turn):
                    log.info("connect", extra={"client_id": f"c{i + j}", "peer": "127.0.0.1:5555"})
                gevent.sleep(0)

        started = time.perf_counter()
        gevent.spawn(run).join()
        gevent.sleep(0)
        logging.getLogger("fluxmq").handlers[0].flush()
        elapsed = time.perf_counter() - started
        with open(path, "rb") as f:
            lines = sum(1 for _ in f)
        print(
            f"log: {records:,} records to a file in {elapsed:.2f} s = {records / elapsed:,.0f} records/s "
            f"({lines:,} lines written)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sessions", type=int, default=0, help="measure admin and /metrics with this many sessions"
    )
    parser.add_argument("--log", type=int, default=0, help="measure logging this many records to a file")
    args = parser.parse_args()
    if args.sessions:
        bench_http(args.sessions)
    if args.log:
        bench_log(args.log)


if __name__ == "__main__":
    main()
