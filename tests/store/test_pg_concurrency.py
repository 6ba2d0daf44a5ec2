"""PostgresStore under real concurrency: many threads, one connection each, one database.

Threads stand in for engine processes: each transaction runs on its own pooled
connection, so the database (row locks, SKIP LOCKED, the unique partial index)
is all that keeps them apart. Every test ends by checking the invariants in SQL.
"""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest

from bloom_runtime.engine.errors import Conflict, NoCapacity, StaleLease
from bloom_runtime.engine.models import (
    Capabilities,
    Completion,
    Fence,
    LeaseGrant,
    NewTask,
    WorkerUpsert,
    new_id,
)
from bloom_runtime.sql.pg_listener import TaskListener
from bloom_runtime.sql.postgres import PostgresStore

from ..conftest import run_together

pytestmark = pytest.mark.postgres

NOW = 1_700_000_000_000
THREADS = 16
MAX_CAPACITY = 32  # the largest max_concurrency a worker may declare


def add_workers(store: PostgresStore, ids: list[str], max_concurrency: int, labels: list[str] | None = None) -> None:
    caps = Capabilities(max_concurrency=max_concurrency, labels=labels or [])
    with store.transaction() as tx:
        for wid in ids:
            tx.upsert_worker(WorkerUpsert(id=wid, capabilities=caps), NOW)


def add_tasks(store: PostgresStore, n: int, max_attempts: int = 3) -> list[str]:
    ids = []
    with store.transaction() as tx:
        for i in range(n):
            task, _ = tx.create_task(
                NewTask(context_id=f"ctx-{i % 7}", agent_slug="agent", prompt=f"p{i}", max_attempts=max_attempts),
                new_id(),
                NOW + i,  # distinct created_at: a definite queue order
            )
            ids.append(task.id)
    return ids


def sql(url: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def assert_invariants(url: str) -> None:
    # At most one active lease per task (the unique partial index guarantees it; check anyway).
    assert sql(url, "SELECT task_id FROM leases WHERE status = 'active' GROUP BY task_id HAVING count(*) > 1") == []
    # A leased/running task has exactly one active lease, and it is task.lease_id (same worker).
    bad = sql(
        url,
        """
        SELECT t.id FROM llm_tasks t
        WHERE t.status IN ('leased', 'running')
          AND ((SELECT count(*) FROM leases l WHERE l.task_id = t.id AND l.status = 'active') <> 1
               OR NOT EXISTS (SELECT 1 FROM leases l WHERE l.id = t.lease_id AND l.task_id = t.id
                              AND l.status = 'active' AND l.worker_id = t.worker_id))
        """,
    )
    assert bad == [], f"leased tasks without their one active lease: {bad}"
    # No active lease outlives its task's hold on it.
    orphans = sql(
        url,
        """
        SELECT l.id FROM leases l JOIN llm_tasks t ON t.id = l.task_id
        WHERE l.status = 'active' AND (t.status NOT IN ('leased', 'running') OR t.lease_id <> l.id)
        """,
    )
    assert orphans == [], f"active leases their task does not hold: {orphans}"
    assert sql(url, "SELECT id FROM llm_tasks WHERE attempts > max_attempts") == []
    over = sql(
        url,
        """
        SELECT w.id FROM workers w
        WHERE (SELECT count(*) FROM leases l WHERE l.worker_id = w.id AND l.status = 'active')
              > (w.capabilities ->> 'max_concurrency')::int
        """,
    )
    assert over == [], f"workers over capacity: {over}"


def test_one_of_sixteen_acquirers_gets_the_task(pg_store: PostgresStore, pg_url: str) -> None:
    workers = [f"w{i:02d}" for i in range(THREADS)]
    add_workers(pg_store, workers, max_concurrency=1)
    (task_id,) = add_tasks(pg_store, 1)

    results = run_together(
        THREADS, lambda i: pg_store.run(lambda tx: tx.acquire_lease(task_id, [workers[i]], 60, new_id(), NOW + 10))
    )

    grants = [r for r in results if isinstance(r, LeaseGrant)]
    assert len(grants) == 1
    assert all(type(r) is Conflict for r in results if not isinstance(r, LeaseGrant)), results
    task = pg_store.get_task(task_id)
    assert (task.status, task.attempts, task.lease_id) == ("leased", 1, grants[0].lease.id)
    assert sql(pg_url, "SELECT count(*) FROM leases") == [(1,)]
    assert_invariants(pg_url)


def test_sixteen_claimers_take_every_task_exactly_once(pg_store: PostgresStore, pg_url: str) -> None:
    workers = [f"w{i:02d}" for i in range(THREADS)]
    add_workers(pg_store, workers, max_concurrency=MAX_CAPACITY)  # 16 x 32 = 512 >= 500
    task_ids = add_tasks(pg_store, 500)

    def claim_all(i: int) -> list[str]:
        got: list[str] = []
        while True:
            grant = pg_store.run(lambda tx: tx.claim_next(workers[i], None, new_id(), NOW + 1000))
            if grant is None:
                # None also means "every queued task is locked by another claimer right now":
                # stop only when full or when nothing is queued any more.
                if len(got) == MAX_CAPACITY or pg_store.stats()["tasks"]["queued"] == 0:
                    return got
                continue
            assert grant.task.worker_id == workers[i] and grant.lease.worker_id == workers[i]
            got.append(grant.task.id)

    results = run_together(THREADS, claim_all)

    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    claimed = [tid for r in results for tid in r]
    assert len(claimed) == len(task_ids)  # none twice ...
    assert set(claimed) == set(task_ids)  # ... and none missed
    assert sql(pg_url, "SELECT count(*) FROM llm_tasks WHERE status = 'leased' AND attempts = 1") == [(500,)]
    assert sql(pg_url, "SELECT count(*) FROM leases WHERE status = 'active'") == [(500,)]
    assert_invariants(pg_url)


def test_worker_capacity_holds_under_concurrent_acquire_and_claim(pg_store: PostgresStore, pg_url: str) -> None:
    add_workers(pg_store, ["busy"], max_concurrency=2)
    task_ids = add_tasks(pg_store, 50)

    def grab(i: int) -> list[Any]:
        outcomes = []
        for k in range(3):  # several attempts per thread: more interleavings
            try:
                if i % 2:
                    r = pg_store.run(lambda tx: tx.claim_next("busy", 60, new_id(), NOW + 1000))
                else:
                    tid = task_ids[(i * 3 + k) % len(task_ids)]
                    r = pg_store.run(lambda tx, tid=tid: tx.acquire_lease(tid, ["busy"], 60, new_id(), NOW + 1000))
            except (Conflict, NoCapacity) as exc:
                r = exc
            outcomes.append(r)
        return outcomes

    results = run_together(THREADS, grab)

    assert not [r for r in results if isinstance(r, BaseException)]
    grants = [r for rs in results for r in rs if isinstance(r, LeaseGrant)]
    assert len(grants) == 2  # capacity fills, and never beyond
    assert all(g.worker.active_leases <= 2 for g in grants)
    assert sql(pg_url, "SELECT count(*) FROM leases WHERE worker_id = 'busy' AND status = 'active'") == [(2,)]
    assert pg_store.get_worker("busy").active_leases == 2
    assert_invariants(pg_url)


def test_expiry_racing_completions_leaves_each_task_one_fate(pg_store: PostgresStore, pg_url: str) -> None:
    workers = [f"w{i}" for i in range(8)]
    add_workers(pg_store, workers, max_concurrency=MAX_CAPACITY)
    task_ids = add_tasks(pg_store, 200)
    leases: dict[str, str] = {}
    with pg_store.transaction() as tx:
        for i, tid in enumerate(task_ids):
            grant = tx.acquire_lease(tid, [workers[i % 8]], 60, new_id(), NOW + 1000)
            leases[tid] = grant.lease.id
    expire_at = NOW + 1000 + 60_000  # every lease is due from here on

    completers, sweepers = 12, 4

    def work(i: int) -> dict[str, Any]:
        if i < completers:
            done: dict[str, Any] = {}
            for tid in task_ids[i::completers]:
                completion = (
                    Completion(status="success", output="ok")
                    if hash(tid) % 2
                    else Completion(status="error", error_message="boom", retryable=False)
                )
                try:
                    out = pg_store.run(
                        lambda tx, tid=tid, completion=completion: tx.complete(
                            tid, Fence(lease_id=leases[tid]), completion, new_id(), new_id(), lambda a: 0, expire_at + 1
                        )
                    )
                    done[tid] = out.task.status
                except StaleLease as exc:  # the sweep got there first
                    done[tid] = exc
            return done
        expired: dict[str, Any] = {}
        while True:
            batch = pg_store.run(lambda tx: tx.expire_due(expire_at + 1, 10))
            if not batch:
                return expired
            for e in batch:
                assert e.task.id not in expired
                expired[e.task.id] = e.task.status

    results = run_together(completers + sweepers, work)
    assert not [r for r in results if isinstance(r, BaseException)], results
    # Sweep what the concurrent sweepers skipped (SKIP LOCKED) and finished before.
    tail = pg_store.run(lambda tx: tx.expire_due(expire_at + 1, 1000))

    completed = {tid: s for r in results[:completers] for tid, s in r.items() if isinstance(s, str)}
    stale = {tid for r in results[:completers] for tid, s in r.items() if isinstance(s, StaleLease)}
    expired = {tid: s for r in results[completers:] for tid, s in r.items()}
    expired.update({e.task.id: e.task.status for e in tail})

    assert set(completed) | set(expired) == set(task_ids)
    assert not set(completed) & set(expired), "a task both completed and expired"
    assert stale == set(expired)  # every expired task's completion was refused, nothing else was
    assert set(expired.values()) <= {"queued"}  # attempts left: back to the queue

    rows = sql(
        pg_url,
        """
        SELECT t.id, t.status, (SELECT count(*) FROM llm_results r WHERE r.task_id = t.id),
               (SELECT count(*) FROM runtime_artifacts a WHERE a.task_id = t.id),
               (SELECT l.status FROM leases l WHERE l.task_id = t.id)
        FROM llm_tasks t
        """,
    )
    for tid, status, results_n, artifacts_n, lease_status in rows:
        if tid in completed:
            assert (status, results_n, artifacts_n, lease_status) == (completed[tid], 1, 1, "released"), tid
            assert status in ("completed", "failed")
        else:
            assert (status, results_n, artifacts_n, lease_status) == ("queued", 0, 0, "expired"), tid
    assert_invariants(pg_url)


def test_listener_wakes_on_queued_task_and_stops_promptly(pg_store: PostgresStore, pg_url: str) -> None:
    woken = threading.Event()
    stop = threading.Event()
    listener = TaskListener(pg_url, woken.set)
    thread = threading.Thread(target=listener.run, args=(stop,), name="listener")
    thread.start()
    try:
        assert listener.connected.wait(10)
        woken.clear()  # the wake-up every (re)connect gives
        add_tasks(pg_store, 3)  # one transaction, three tasks queued
        assert woken.wait(10)
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()
    assert_invariants(pg_url)
