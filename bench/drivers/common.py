"""What every queue driver shares: its arguments, the signal a no-op job gives when it
has run, and the one line of JSON it prints.

Standard library only: drivers of the peer queues run in those queues' own virtual
environments and import this file by path.

Workloads (every job is a no-op that signals it ran):
- ``drain``: ``-n`` jobs queued first (not timed), then ``-c`` consumers take them all;
  the rate is jobs per second from the consumers' start to the last job run.
- ``steady``: ``-c`` producers each queue a job, wait until it has run, and queue the
  next, ``-n`` jobs in all; the rate is jobs per second, and the latencies are from
  queueing a job to its run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from typing import Any


def parse(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--url", required=True, help="PostgreSQL URL of a fresh database")
    ap.add_argument("--workload", choices=("drain", "steady"), required=True)
    ap.add_argument("-n", type=int, default=1000, help="jobs in all")
    ap.add_argument("-c", type=int, default=1, help="consumers (drain) or producers (steady)")
    ap.add_argument("--batch", type=int, default=1, help="jobs a consumer fetches at once")
    ap.add_argument("--runtime-url", help="(bloom over HTTP) a running server's base URL")
    return ap.parse_args()


class Ran:
    """Jobs that have run, by key, and when; producers wait on one key, drains on the count."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._at: dict[str, float] = {}

    def ran(self, key: str) -> None:
        with self._cond:
            self._at[key] = time.perf_counter()
            self._cond.notify_all()

    def wait_for(self, key: str, timeout_s: float = 60.0) -> float:
        with self._cond:
            if not self._cond.wait_for(lambda: key in self._at, timeout_s):
                raise TimeoutError(f"job {key} did not run within {timeout_s} s")
            return self._at[key]

    def wait_count(self, n: int, timeout_s: float = 600.0) -> float:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._at) >= n, timeout_s):
                raise TimeoutError(f"{len(self._at)} of {n} jobs ran within {timeout_s} s")
            return max(self._at.values())


def report(n: int, elapsed_s: float, latencies_s: list[float] | None = None, **extra: Any) -> None:
    out: dict[str, Any] = {"n": n, "elapsed_s": round(elapsed_s, 4), "rate": round(n / elapsed_s, 1), **extra}
    if latencies_s:
        lat = sorted(latencies_s)
        out["p50_ms"] = round(statistics.median(lat) * 1000, 2)
        out["p99_ms"] = round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 2)
    print(json.dumps(out), flush=True)


def steady_threads(n: int, c: int, producer: Any, ran: Ran) -> None:
    """The steady workload on threads: ``producer()`` gives each thread its ``enqueue(key)``
    (and optionally a ``close()``); reports the rate and latencies."""
    latencies: list[float] = []
    lock = threading.Lock()

    def produce(p: int, count: int) -> None:
        enqueue = producer()
        try:
            for k in range(count):
                key = f"{p}-{k}"
                t = time.perf_counter()
                enqueue(key)
                done = ran.wait_for(key)
                with lock:
                    latencies.append(done - t)
        finally:
            getattr(enqueue, "close", lambda: None)()

    threads = [threading.Thread(target=produce, args=(p, k)) for p, k in enumerate(shares(n, c))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report(n, time.perf_counter() - t0, latencies)


def shares(n: int, c: int) -> list[int]:
    """``n`` jobs split over ``c`` producers."""
    return [n // c + (1 if i < n % c else 0) for i in range(c)]


class AsyncRan:
    """``Ran`` for drivers on asyncio: jobs run in the event loop that waits for them."""

    def __init__(self) -> None:
        import asyncio

        self._asyncio = asyncio
        self._at: dict[str, float] = {}
        self._waiting: dict[str, Any] = {}
        self._count_waiters: list[tuple[int, Any]] = []

    def ran(self, key: str) -> None:
        self._at[key] = time.perf_counter()
        fut = self._waiting.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(None)
        for n, fut in list(self._count_waiters):
            if len(self._at) >= n and not fut.done():
                fut.set_result(None)

    async def wait_for(self, key: str, timeout_s: float = 60.0) -> float:
        if key not in self._at:
            fut = self._waiting.setdefault(key, self._asyncio.get_running_loop().create_future())
            await self._asyncio.wait_for(fut, timeout_s)
        return self._at[key]

    async def wait_count(self, n: int, watch: Any = (), timeout_s: float = 600.0) -> float:
        """Until ``n`` jobs ran; a task in ``watch`` that ends first (a consumer that
        failed) raises its error instead of leaving the wait to time out."""
        if len(self._at) < n:
            fut = self._asyncio.get_running_loop().create_future()
            self._count_waiters.append((n, fut))
            done, _ = await self._asyncio.wait([fut, *watch], timeout=timeout_s, return_when="FIRST_COMPLETED")
            if fut not in done:
                for task in done:
                    task.result()  # raises the consumer's error
                raise TimeoutError(f"{len(self._at)} of {n} jobs ran within {timeout_s} s")
        return max(self._at.values())


async def steady_async(n: int, c: int, enqueue: Any, ran: AsyncRan) -> None:
    """Run the steady workload: ``c`` producers, each ``await enqueue(producer, key)``
    then waiting for that job to run; reports the rate and latencies."""
    import asyncio

    latencies: list[float] = []

    async def produce(p: int, count: int) -> None:
        for k in range(count):
            key = f"{p}-{k}"
            t = time.perf_counter()
            await enqueue(p, key)
            latencies.append(await ran.wait_for(key) - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(produce(p, k) for p, k in enumerate(shares(n, c))))
    report(n, time.perf_counter() - t0, latencies)
