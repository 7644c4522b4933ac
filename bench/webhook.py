"""Publish throughput with webhooks: none, an endpoint that wants only connection events, and dead
endpoints that want every event (message.published and message.delivered included).

The promise measured: webhooks never slow the broker down, even when their endpoint is dead. Each
scenario starts a fresh fluxmq node (pinned to CPU 1), runs ``bench.loadgen`` QoS 0 1 -> 1 against
it (pinned to CPU 0, bounded by count and time), reads the node's webhook counters from /metrics,
and stops it. Scenarios alternate run by run so machine noise hits them alike; the table shows the
median per scenario.

Dead endpoints:
- ``refused``: nothing listens on the port (every attempt fails at once; the breaker opens).
- ``silent``: a socket that accepts connections (kernel backlog) and never answers, so every
  attempt waits for the endpoint's timeout: the workers are all stuck and the queue overflows.

``--micro`` measures the broker alone instead, in this process: ``Broker.publish`` of a QoS 0
message to one subscriber (a delivery that only counts), in CPU time per publish (process time,
less sensitive to other work on a shared machine than a rate), rounds alternating between the
scenarios, median of the rounds.

Usage (from the repository root)::

    .venv/bin/python -m bench.webhook                 # 3 runs per scenario (~3-4 minutes)
    .venv/bin/python -m bench.webhook --runs 1 --count 100000
    .venv/bin/python -m bench.webhook --micro         # ~20 s
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

if __package__ in (None, ""):  # run as a script: python bench/webhook.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"  # noqa: A001

from bench.brokers import FluxmqNode, free_port  # noqa: E402
from bench.loadgen import parse_result_line  # noqa: E402


def endpoint_set(url: str, events: list[str], timeout: str = "2s") -> list[str]:
    endpoint = {"name": "rx", "url": url, "events": events, "timeout": timeout}
    return ["webhook.enabled=true", f"webhook.endpoints={json.dumps([endpoint])}"]


def scenarios(refused_url: str, silent_url: str) -> dict[str, tuple[list[str], float]]:
    """name -> (--set options of the node, seconds of warm-up traffic and wait before the measured run)."""
    return {
        "no webhooks": ([], 0.0),
        "endpoint wants client.* only": (
            endpoint_set(silent_url, ["client.connected", "client.disconnected"]),
            0.0,
        ),
        "dead endpoint (refused), every event": (endpoint_set(refused_url, ["*"]), 0.0),
        # The worst case: a silent endpoint with a 30 s timeout, so its breaker stays closed for the
        # whole run: every message makes two events and the full queue drops the oldest each time.
        "dead endpoint (silent), every event, breaker still closed": (
            endpoint_set(silent_url, ["*"], timeout="30s"),
            0.0,
        ),
        # The same endpoint (2 s timeout) once its breaker opened during a warm-up.
        "dead endpoint (silent), every event, breaker open": (endpoint_set(silent_url, ["*"]), 3.0),
    }


def webhook_counters(node: FluxmqNode) -> dict[str, float]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.health_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("fluxmq_webhook_") and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def loadgen(node: FluxmqNode, args: argparse.Namespace, count: int) -> dict[str, str]:
    pin = ["taskset", "-c", args.gen_cpus] if args.gen_cpus and shutil.which("taskset") else []
    cmd = pin + [
        sys.executable,
        "-m",
        "bench.loadgen",
        "--mode",
        "throughput",
        "--pubs",
        "1",
        "--subs",
        "1",
        "--qos",
        "0",
        "--count",
        str(count),
        "--duration",
        str(args.duration),
        "--timeout",
        str(args.duration + 30),
        "--port",
        str(node.port),
        "--procs",
        "1",
        "--pid",
        str(node.pid),
    ]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=args.duration + 60,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT")), None)
    if line is None:
        raise RuntimeError(f"loadgen gave no RESULT: {out.stderr[-2000:]}")
    return parse_result_line(line)


def run_one(sets: list[str], warm: float, args: argparse.Namespace) -> tuple[float, float, dict[str, float]]:
    """(deliveries/s, deliveries per second of broker CPU, webhook counters); rates 0 if the run failed."""
    node = FluxmqNode(cpus=args.broker_cpus or None, sets=sets)
    try:
        node.start()
        if warm:
            loadgen(node, args, 2000)
            time.sleep(warm)
        result = loadgen(node, args, args.count)
        if "rate" not in result:
            print(f"run failed: {result}", file=sys.stderr)
            return 0.0, 0.0, webhook_counters(node)
        rate = float(result["rate"])
        cpu = float(result.get("broker_cpu", "-1%").rstrip("%")) / 100
        return rate, rate / cpu if cpu > 0 else 0.0, webhook_counters(node)
    finally:
        node.cleanup()


def micro(rounds: int, n: int) -> int:
    """CPU microseconds per ``Broker.publish`` with each kind of webhook sink (see the module doc)."""
    import gevent

    from fluxmq.broker.broker import Broker
    from fluxmq.broker.message import Message
    from fluxmq.config.schema import WEBHOOK_EVENTS
    from fluxmq.webhook import EndpointSettings, RetryPolicy, WebhookDispatcher, WebhookSettings

    class CountingDelivery:
        def send_publish(self, *args) -> bool:
            return True

        def close(self, *args) -> None:
            pass

        def is_congested(self) -> bool:
            return False

    broker = Broker()
    session, _ = broker.open_session("sub", True, 0)
    broker.attach(session, CountingDelivery(), 100)
    broker.subscribe(session, "bench/#", 0)

    def sink(events, url: str = "http://127.0.0.1:9/", open_breaker: bool = False) -> WebhookDispatcher:
        endpoint = EndpointSettings(
            "rx",
            url,
            frozenset(events),
            retry=RetryPolicy(1, 0.0, 0.0, 1.0),
            failure_threshold=1,
            reset_timeout=3600.0,
        )
        d = WebhookDispatcher(WebhookSettings((endpoint,), queue_size=10000), "bench")
        d.on_wants_changed = lambda: broker.set_events(d)
        d.accepting = True  # no workers: the queue stays full, the worst case for producing events
        if open_breaker:
            d.endpoints[0].breaker.failure()
            d._route_events()
        return d

    every = WEBHOOK_EVENTS
    sinks = {
        "no webhooks": None,
        "endpoint wants client.* only": sink(["client.connected", "client.disconnected"]),
        "dead endpoint, every event, breaker open": sink(every, open_breaker=True),
        "endpoint wants every event, queue full (drop oldest)": sink(every),
    }
    message = Message("bench/a", b"x" * 64)
    results: dict[str, list[float]] = {name: [] for name in sinks}
    for _ in range(rounds):
        for name, d in sinks.items():
            broker.set_events(d)
            for _ in range(2000):  # warm the route cache and fill the queue
                broker.publish(message)
            gevent.sleep(0)
            started = time.process_time()
            for _ in range(n):
                broker.publish(message)
            results[name].append((time.process_time() - started) / n * 1e6)
    base = statistics.median(results["no webhooks"])
    print(
        f"\nBroker.publish, QoS 0 to 1 subscriber, CPU us per publish, median of {rounds} rounds of {n:,} "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n"
    )
    print("| sink | us per publish | vs none | rounds |")
    print("|---|---:|---:|---|")
    for name, values in results.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.2f} | {med / base:.2f}x | {', '.join(f'{v:.2f}' for v in values)} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.webhook", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--count", type=int, default=300_000, help="messages per run")
    p.add_argument("--duration", type=float, default=15.0, help="max seconds of publishing per run")
    p.add_argument("--broker-cpus", default="1")
    p.add_argument("--gen-cpus", default="0")
    p.add_argument("--micro", action="store_true", help="in-process Broker.publish CPU cost instead")
    p.add_argument("--rounds", type=int, default=7, help="--micro: rounds per sink")
    args = p.parse_args(argv)
    if args.micro:
        return micro(args.rounds, min(args.count, 100_000))
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4096)  # never accepted: connections sit in the backlog, requests get no answer
    try:
        table = scenarios(
            f"http://127.0.0.1:{free_port()}/hook", f"http://127.0.0.1:{silent.getsockname()[1]}/hook"
        )
        rates: dict[str, list[float]] = {name: [] for name in table}
        per_cpu: dict[str, list[float]] = {name: [] for name in table}
        counters: dict[str, dict[str, float]] = {}
        for run in range(args.runs):
            for name, (sets, warm) in table.items():
                rate, rate_cpu, seen = run_one(sets, warm, args)
                if not rate:
                    continue
                rates[name].append(rate)
                per_cpu[name].append(rate_cpu)
                counters[name] = seen
                print(f"run {run + 1}: {name}: {rate:,.0f} deliveries/s", file=sys.stderr)
    finally:
        silent.close()
    base = statistics.median(rates["no webhooks"] or [1.0])
    base_cpu = statistics.median(per_cpu["no webhooks"] or [1.0])
    print(
        f"\nQoS 0, 1 publisher -> 1 subscriber, {args.count:,} messages, median of {args.runs} "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n"
    )
    print(
        "| scenario | deliveries/s (median) | vs none | per broker CPU-s (median) | vs none | runs (deliveries/s) "
        "| webhook counters at the end (last run) |"
    )
    print("|---|---:|---:|---:|---:|---|---|")
    for name, values in rates.items():
        if not values:
            print(f"| {name} | failed | | | | | |")
            continue
        med = statistics.median(values)
        seen = counters.get(name, {})
        shown = (
            ", ".join(
                f"{k.split('{')[0].removeprefix('fluxmq_webhook_')}"
                f"{'[' + k.split('reason=')[1].rstrip('}').strip(chr(34)) + ']' if 'reason=' in k else ''}"
                f"={v:,.0f}"
                for k, v in seen.items()
                if v and "created" not in k and "breaker_state" not in k
            )
            or "-"
        )
        state = next((v for k, v in seen.items() if "breaker_state" in k), None)
        if state is not None:
            shown += f", breaker={('closed', 'half-open', 'open')[int(state)]}"
        med_cpu = statistics.median(per_cpu[name])
        print(
            f"| {name} | {med:,.0f} | {med / base:.2f}x | {med_cpu:,.0f} | {med_cpu / base_cpu:.2f}x "
            f"| {', '.join(f'{v:,.0f}' for v in values)} | {shown} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
