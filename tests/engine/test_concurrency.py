"""Many threads and several engines on one database: nothing leased twice, nothing lost."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from bloom_runtime.engine.errors import BloomError, Conflict, StaleLease
from bloom_runtime.engine.models import Completion, Fence

from .conftest import check_invariants, new_task, worker


def run_threads(n: int, fn) -> list:
    barrier = threading.Barrier(n)

    def go(i: int):
        barrier.wait(timeout=30)
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(go, range(n)))


def test_32_threads_claim_1000_tasks_each_once(engine, raw_sql):
    for i in range(32):
        engine.workers.register(worker(f"w{i}", max_concurrency=32))
    ids = {engine.tasks.create(new_task(context_id=f"c{i % 7}", prompt=f"p{i}"))[0].id for i in range(1000)}
    claimed: list[str] = []
    lock = threading.Lock()

    def work(i: int) -> int:
        done = 0
        while True:
            g = engine.leases.claim(f"w{i}")
            if g is None:
                return done
            engine.tasks.complete(g.task.id, Completion(status="success", output=g.task.prompt), Fence(lease_id=g.lease.id))
            with lock:
                claimed.append(g.task.id)
            done += 1

    counts = run_threads(32, work)
    assert sum(counts) == 1000
    assert Counter(claimed).most_common(1)[0][1] == 1
    assert set(claimed) == ids
    assert raw_sql("SELECT COUNT(*) FROM llm_tasks WHERE status = 'completed'") == [(1000,)]
    assert raw_sql("SELECT COUNT(*) FROM leases") == [(1000,)]
    assert raw_sql("SELECT COUNT(*) FROM llm_results") == [(1000,)]
    check_invariants(raw_sql)


def test_capacity_never_exceeded_under_contention(engine, raw_sql):
    engine.workers.register(worker("w1", max_concurrency=2))
    tasks = [engine.tasks.create(new_task(context_id=f"c{i}"))[0].id for i in range(40)]

    def grab(i: int):
        try:
            if i % 2:
                return engine.leases.acquire(tasks[i], worker_id="w1")
            return engine.leases.claim("w1")
        except BloomError:
            return None

    results = [r for r in run_threads(16, grab) if r is not None]
    assert len(results) == 2
    assert raw_sql("SELECT COUNT(*) FROM leases WHERE status = 'active' AND worker_id = 'w1'") == [(2,)]
    check_invariants(raw_sql)


def test_20_concurrent_completions_store_one_result(engine, raw_sql):
    engine.workers.register(worker("w1"))
    task, _ = engine.tasks.create(new_task())
    g = engine.leases.acquire(task.id)

    def finish(i: int):
        try:
            return engine.tasks.complete(task.id, Completion(status="success", output=f"o{i}"), Fence(lease_id=g.lease.id))
        except (Conflict, StaleLease) as exc:
            return exc

    results = run_threads(20, finish)
    ok = [r for r in results if not isinstance(r, Exception)]
    assert len(ok) == 1 and len(results) - len(ok) == 19
    assert raw_sql("SELECT COUNT(*) FROM llm_results") == [(1,)]
    assert raw_sql("SELECT COUNT(*) FROM runtime_artifacts") == [(1,)]
    check_invariants(raw_sql)


def test_heartbeats_racing_completion_never_resurrect(engine, raw_sql):
    engine.workers.register(worker("w1", max_concurrency=32))
    tasks = [engine.tasks.create(new_task(context_id=f"c{i}"))[0] for i in range(30)]
    grants = [engine.leases.acquire(t.id, worker_id="w1") for t in tasks]

    def race(i: int):
        g = grants[i % 30]
        try:
            if i < 30:
                engine.tasks.complete(g.task.id, Completion(status="success", output="x"), Fence(lease_id=g.lease.id))
            else:
                for _ in range(3):
                    engine.leases.heartbeat(g.task.id, Fence(lease_id=g.lease.id))
        except (Conflict, StaleLease):
            pass

    run_threads(60, race)
    assert raw_sql("SELECT COUNT(*) FROM llm_tasks WHERE status = 'completed'") == [(30,)]
    check_invariants(raw_sql)


def test_two_engines_share_one_queue(make_engine, dialect, raw_sql):
    a = make_engine()
    b = make_engine(shared_store=False)
    for i in range(8):
        a.workers.register(worker(f"w{i}", max_concurrency=32))
    for i in range(300):
        (a if i % 2 else b).tasks.create(new_task(prompt=f"p{i}"))
    claimed: list[str] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        eng = a if i % 2 else b
        while True:
            g = eng.leases.claim(f"w{i % 8}")
            if g is None:
                return
            with lock:
                claimed.append(g.task.id)
            eng.tasks.complete(g.task.id, Completion(status="success", output="ok"), Fence(lease_id=g.lease.id))

    run_threads(16, work)
    assert len(claimed) == 300 and len(set(claimed)) == 300
    check_invariants(raw_sql)


def test_waiting_claimer_wakes_on_create(engine):
    engine.workers.register(worker("w1"))
    box: dict = {}
    waiting = threading.Event()

    def claimer() -> None:
        waiting.set()
        box["grant"] = engine.leases.claim("w1", wait_seconds=20)

    t = threading.Thread(target=claimer)
    t.start()
    assert waiting.wait(10)
    task, _ = engine.tasks.create(new_task())
    t.join(timeout=20)
    assert not t.is_alive()
    assert box["grant"] is not None and box["grant"].task.id == task.id


def test_claim_wakes_across_engines_on_postgres(make_engine, dialect):
    if dialect != "postgres":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's; SQLite has one process")
    a = make_engine()
    b = make_engine(shared_store=False)
    a.workers.register(worker("w1"))
    box: dict = {}
    started = threading.Event()

    def claimer() -> None:
        started.set()
        box["grant"] = a.leases.claim("w1", wait_seconds=20)

    t = threading.Thread(target=claimer)
    t.start()
    assert started.wait(10)
    # Make sure the claimer is waiting on the wakeup before B creates the task.
    gen = a.wakeup.generation
    task, _ = b.tasks.create(new_task())
    t.join(timeout=20)
    assert not t.is_alive()
    assert box["grant"] is not None and box["grant"].task.id == task.id
    assert a.wakeup.generation > gen
