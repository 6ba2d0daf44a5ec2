"""Stats are exact while cheap, and served from a snapshot refreshed behind once expensive."""

from __future__ import annotations

import threading

from bloom_runtime.engine.stats_cache import StatsCache


def test_cheap_counts_are_taken_every_time():
    calls = iter(range(100))
    cache = StatsCache(lambda: {"n": next(calls)}, cheap_ms=1e9)
    assert [cache.get()["n"] for _ in range(3)] == [0, 1, 2]


def test_expensive_counts_come_from_a_snapshot_refreshed_behind():
    release = threading.Event()
    refreshed = threading.Event()
    n = {"v": 0}

    def compute() -> dict:
        n["v"] += 1
        if n["v"] > 1:
            release.wait(10)
            refreshed.set()
        return {"n": n["v"]}

    cache = StatsCache(compute, cheap_ms=-1, max_age_s=0)
    assert cache.get() == {"n": 1}  # first call computes
    # Stale and expensive: the caller gets the snapshot at once; one refresh runs behind.
    for _ in range(20):
        assert cache.get() == {"n": 1}
    assert n["v"] == 2  # one refresh in flight, not one per caller
    release.set()
    assert refreshed.wait(10)
    deadline = threading.Event()
    for _ in range(1000):
        if cache.get()["n"] == 2:
            break
        deadline.wait(0.01)
    assert cache.get()["n"] >= 2
