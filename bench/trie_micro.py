"""Micro-benchmark of the topic tries: match rates (cache hit and miss) and subscribe/unsubscribe rates.

Run: ``PYTHONPATH=. .venv/bin/python bench/trie_micro.py [--seconds 1.5] [--subscriptions 10000]``.

The subscription set is IoT-shaped: topics ``site/{s}/dev/{d}/{metric}`` and filters that are literal,
end in ``+`` or ``#``, have ``+`` in the middle or at the site level, plus shared groups and one
``#`` monitor. A cache miss is measured on a stream of distinct topics longer than the cache, so
every lookup walks the trie and pays the cache insert (and the periodic clear), as a topic-heavy
broker would; "walk only" is the same with the cache disabled.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from fluxmq._core.trie import RetainedTrie, SubscriptionTrie, validate_topic

SITES = 100
METRICS = ("temp", "hum", "co2")


def subscription_set(n: int) -> list[tuple[str, str]]:
    """``n`` (filter, key) pairs with a mix of wildcards."""
    subs = []
    for i in range(n):
        site = i % SITES
        shape = i % 6
        if shape == 0:
            f = f"site/{site}/dev/{i}/temp"
        elif shape == 1:
            f = f"site/{site}/dev/{i}/+"
        elif shape == 2:
            f = f"site/{site}/dev/+/temp"
        elif shape == 3:
            f = f"site/+/dev/{i}/#"
        elif shape == 4:
            f = f"$share/workers{i % 10}/site/{site}/dev/{i}/#"
        else:
            f = f"site/{site}/dev/{i}/{METRICS[i % 3]}"
        subs.append((f, f"client-{i}"))
    subs.append(("#", "monitor"))
    return subs


def topic_for(device: int, metric: int) -> str:
    return f"site/{device % SITES}/dev/{device}/{METRICS[metric % 3]}"


def rate(func: Callable[[], object], seconds: float, per_call: int = 1, batch: int = 1) -> float:
    """Calls of ``func`` per second (times ``per_call``), best of three runs of ``seconds / 3``; the
    clock is read every ``batch`` calls (bench/codec_micro.py times calls too short for one read each)."""
    best = 0.0
    for _ in range(3):
        calls = 0
        start = time.perf_counter()
        deadline = start + seconds / 3
        while True:
            for _ in range(batch):
                func()
            calls += batch
            now = time.perf_counter()
            if now >= deadline:
                break
        best = max(best, calls * per_call / (now - start))
    return best


def main() -> None:
    """Print the rates."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=1.5, help="time per measurement")
    parser.add_argument("--subscriptions", type=int, default=10_000)
    args = parser.parse_args()
    n = args.subscriptions
    subs = subscription_set(n)

    trie = SubscriptionTrie()
    for f, key in subs:
        trie.add(f, key, key)
    walk_only = SubscriptionTrie(cache_size=0)
    for f, key in subs:
        walk_only.add(f, key, key)

    hot = [topic_for(d, d) for d in range(0, n, max(1, n // 1000))][:1000]  # fits the cache
    distinct = [topic_for(d, m) for m in range(3) for d in range(n)] * 2  # 3n topics > cache size
    distinct += [f"other/{i}/x" for i in range(n)]  # matched only by '#'
    sample = [len(trie.match(t).subscribers) + len(trie.match(t).groups) for t in distinct[: 3 * n]]

    def batch(match: Callable[[str], object], topics: list[str]) -> Callable[[], None]:
        def run() -> None:
            for t in topics:
                match(t)

        return run

    print(
        f"subscriptions: {len(trie)} entries, {trie.node_count()} nodes; "
        f"mean matches per topic {sum(sample) / len(sample):.1f}"
    )
    print(f"{'operation':<42}{'ops/s':>14}{'us/op':>10}")

    def show(name: str, ops: float) -> None:
        print(f"{name:<42}{ops:>14,.0f}{1e6 / ops:>10.2f}")

    for t in hot:
        trie.match(t)
    show("match, cache hit (1k hot topics)", rate(batch(trie.match, hot), args.seconds, len(hot)))
    chunk = distinct[:20_000]
    show("match, cache miss (distinct topics)", rate(batch(trie.match, chunk), args.seconds, len(chunk)))
    show("match, walk only (cache disabled)", rate(batch(walk_only.match, chunk), args.seconds, len(chunk)))
    no_sub = [f"nobody/{i}/listens" for i in range(20_000)]
    empty = SubscriptionTrie(cache_size=0)
    empty.add("site/+/dev/+/temp", "k", "k")
    show("match, walk only, no subscriber", rate(batch(empty.match, no_sub), args.seconds, len(no_sub)))
    show("validate_topic", rate(batch(validate_topic, chunk), args.seconds, len(chunk)))

    churn = [
        (f"site/{i % SITES}/dev/{i}/+" if i % 2 else f"$share/g/site/+/dev/{i}/#", f"new-{i}")
        for i in range(n)
    ]

    def subscribe_all() -> None:
        for f, key in churn:
            trie.add(f, key, key)

    def unsubscribe_all() -> None:
        for f, key in churn:
            trie.remove(f, key)

    # Alternate so each measurement starts from the same trie.
    best_add = best_remove = 0.0
    for _ in range(3):
        start = time.perf_counter()
        subscribe_all()
        best_add = max(best_add, len(churn) / (time.perf_counter() - start))
        start = time.perf_counter()
        unsubscribe_all()
        best_remove = max(best_remove, len(churn) / (time.perf_counter() - start))
    show("subscribe (add, 10k into the 10k set)", best_add)
    show("unsubscribe (remove, with pruning)", best_remove)
    assert len(trie) == len(subs)

    retained = RetainedTrie()
    for d in range(n):
        for m in range(3):
            retained.set(topic_for(d, m), d)
    show(
        "retained set (replace existing)",
        rate(batch(lambda t: retained.set(t, 0), distinct[: 3 * n]), args.seconds, 3 * n),
    )
    one_site = "site/7/dev/+/temp"
    show(
        f"retained match {one_site!r} ({len(retained.match(one_site))} hits)",
        rate(lambda: retained.match(one_site), args.seconds),
    )
    show(
        f"retained match 'site/7/#' ({len(retained.match('site/7/#'))} hits)",
        rate(lambda: retained.match("site/7/#"), args.seconds),
    )


if __name__ == "__main__":
    main()
