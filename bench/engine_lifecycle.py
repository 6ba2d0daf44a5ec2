"""Lifecycles per second through the engine facade (no HTTP).

A lifecycle is create → lease → heartbeat → complete, each acknowledged only
after its audit entry is committed. Runs with 1, 8 and 32 threads, with audit
group commit on and off, on SQLite and (given --pg) on PostgreSQL, and prints
the figures and the ratios. With --memory it also reports the resident size
after 10 000 and after --memory-n lifecycles.

    python bench/engine_lifecycle.py --pg postgresql://bloom@127.0.0.1:5432/postgres
    python bench/engine_lifecycle.py --pg URL --only postgres --memory --memory-n 200000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bloom_runtime.engine.engine import Engine
from bloom_runtime.engine.models import Capabilities, Completion, Fence, NewTask, WorkerUpsert
from bloom_runtime.engine.settings import Settings


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Database:
    """A fresh database per run: a temp SQLite file, or a new PostgreSQL database."""

    def __init__(self, kind: str, pg_admin_url: str | None) -> None:
        self.kind = kind
        self.pg_admin_url = pg_admin_url
        self.name = f"bloom_bench_{uuid.uuid4().hex[:10]}"
        self.tmp = tempfile.mkdtemp(prefix="bloom-bench-")

    def __enter__(self) -> str:
        if self.kind == "sqlite":
            return f"sqlite:///{self.tmp}/bench.db"
        from urllib.parse import urlsplit, urlunsplit

        import psycopg

        with psycopg.connect(self.pg_admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        return urlunsplit(urlsplit(self.pg_admin_url)._replace(path="/" + self.name))

    def __exit__(self, *exc: object) -> None:
        if self.kind == "postgres":
            import psycopg

            with psycopg.connect(self.pg_admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def lifecycle(engine: Engine, i: int) -> None:
    task, _ = engine.tasks.create(NewTask(context_id=f"ctx-{i % 50}", agent_slug="bench", prompt="p" * 200))
    grant = engine.leases.acquire(task.id)
    fence = Fence(lease_id=grant.lease.id)
    engine.leases.heartbeat(task.id, fence)
    engine.tasks.complete(task.id, Completion(status="success", output="o" * 200, metrics={"duration_ms": 1.0}), fence)


# The operator console's read indexes (migration 0004): each costs an entry per change of a
# task or an ended lease; --without-read-indexes drops them to measure what they cost.
READ_INDEXES = ("llm_tasks_context_idx", "llm_tasks_agent_idx", "leases_task_ended_idx", "leases_expired_idx",
                "audit_logs_action_idx")


def drop_read_indexes(url: str) -> None:
    if url.startswith("sqlite:///"):
        import sqlite3

        conn = sqlite3.connect(url[len("sqlite:///"):])
        with conn:
            for name in READ_INDEXES:
                conn.execute(f"DROP INDEX IF EXISTS {name}")  # names are ours
        conn.close()
        return
    import psycopg

    with psycopg.connect(url, autocommit=True) as pg:
        for name in READ_INDEXES:
            pg.execute(f"DROP INDEX IF EXISTS {name}")  # names are ours


def run(url: str, threads: int, n: int, group_commit: bool, without_read_indexes: bool = False) -> float:
    settings = Settings(
        database_url=url,
        audit_group_commit=group_commit,
        pool_max=max(8, threads + 8),
        lease_sweep_interval_s=2.0,
    )
    engine = Engine.start(settings)
    if without_read_indexes:
        drop_read_indexes(url)
    try:
        for w in range(8):
            engine.workers.register(WorkerUpsert(id=f"bench-w{w}", status="online", capabilities=Capabilities(max_concurrency=32)))
        counter = iter(range(n))
        lock = threading.Lock()

        def loop() -> None:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                lifecycle(engine, i)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            for f in [pool.submit(loop) for _ in range(threads)]:
                f.result()
        elapsed = time.perf_counter() - t0
    finally:
        engine.stop()
    return n / elapsed


def memory(url: str, total: int, threads: int) -> None:
    engine = Engine.start(Settings(database_url=url, pool_max=threads + 8))
    try:
        for w in range(8):
            engine.workers.register(WorkerUpsert(id=f"bench-w{w}", status="online", capabilities=Capabilities(max_concurrency=32)))
        done = 0
        marks = {10_000: None, total: None}
        with ThreadPoolExecutor(threads) as pool:
            while done < total:
                step = min(1000, total - done)
                list(pool.map(lambda i: lifecycle(engine, i), range(done, done + step)))
                done += step
                if done in marks:
                    marks[done] = rss_mib()
                    print(f"  after {done:>7} lifecycles: RSS {marks[done]:.1f} MiB", flush=True)
        growth = marks[total] / marks[10_000]
        print(f"  RSS growth 10k → {total}: ×{growth:.3f} ({'flat' if growth <= 1.2 else 'GROWS'})")
    finally:
        engine.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pg", help="PostgreSQL admin URL (a database is created and dropped per run)")
    ap.add_argument("--only", choices=["sqlite", "postgres"])
    ap.add_argument("-n", type=int, default=2000, help="lifecycles per run (default 2000)")
    ap.add_argument("--threads", default="1,8,32")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--memory-n", type=int, default=200_000)
    ap.add_argument("--without-read-indexes", action="store_true",
                    help="drop the console's read indexes (migration 0004) after migrating, to measure their write cost")
    args = ap.parse_args()
    kinds = [k for k in ("sqlite", "postgres") if (args.only in (None, k)) and (k == "sqlite" or args.pg)]
    threads = [int(t) for t in args.threads.split(",")]
    print(f"engine lifecycles/s (create → lease → heartbeat → complete, each audited), n={args.n}, {os.cpu_count()} cores")
    for kind in kinds:
        if args.memory:
            print(f"{kind}: memory over {args.memory_n} lifecycles")
            with Database(kind, args.pg) as url:
                memory(url, args.memory_n, 8)
            continue
        for t in threads:
            rates = {}
            for gc in (True, False):
                with Database(kind, args.pg) as url:
                    rates[gc] = run(url, t, args.n, gc, args.without_read_indexes)
            print(
                f"{kind:8} threads={t:>2}  group-commit {rates[True]:8.0f}/s   "
                f"no-group-commit {rates[False]:8.0f}/s   ratio ×{rates[True] / rates[False]:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
