"""Engines on both stores, with a manual clock and timers slowed so tests drive them."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from bloom_runtime.engine.clock import ManualClock
from bloom_runtime.engine.engine import Engine
from bloom_runtime.engine.models import Capabilities, NewTask, WorkerUpsert
from bloom_runtime.engine.settings import Settings

from ..conftest import STORE_FIXTURE

SLOW = 3600.0  # timer intervals long enough that only the test triggers the jobs


def settings(**over: Any) -> Settings:
    base = {
        "lease_sweep_interval_s": SLOW,
        "membridge_sync_interval_s": SLOW,
        "history_tick_s": SLOW,
        "worker_offline_after_s": 60.0,
        "ask_timeout_s": 30.0,
        "retry_backoff_base_ms": 1000,
        "retry_backoff_cap_ms": 8000,
    }
    base.update(over)
    return Settings(**base)


@pytest.fixture(params=["sqlite", "postgres"])
def dialect(request) -> str:
    return request.param


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def raw_sql(request, dialect: str, tmp_path) -> Callable[[str], list[tuple]]:
    """Run a query straight against the test database (for invariant checks)."""
    if dialect == "sqlite":
        path = str(tmp_path / "bloom.db")

        def run(query: str) -> list[tuple]:
            conn = sqlite3.connect(path)
            try:
                return conn.execute(query).fetchall()
            finally:
                conn.close()

        return run
    url = request.getfixturevalue("pg_url")

    def run_pg(query: str) -> list[tuple]:
        with psycopg.connect(url) as conn:
            return conn.execute(query).fetchall()

    return run_pg


@pytest.fixture
def make_engine(request, dialect: str, clock: ManualClock) -> Iterator[Callable[..., Engine]]:
    """Start engines on this test's database (several may share it); all stopped at the end."""
    started: list[Engine] = []
    store_fixture = request.getfixturevalue(STORE_FIXTURE[dialect])

    def make(shared_store: bool = True, **over: Any) -> Engine:
        engine_clock = over.pop("clock", clock)
        if shared_store and not started:
            store = store_fixture
        else:
            store = _second_store(request, dialect)
        engine = Engine.start(settings(**over), store=store, clock=engine_clock)
        started.append(engine)
        return engine

    yield make
    for e in started:
        e.stop()


def _second_store(request, dialect: str):
    """Another store on the same database, as a second engine process would have."""
    if dialect == "sqlite":
        from bloom_runtime.sql.sqlite import SqliteStore

        store = SqliteStore(str(request.getfixturevalue("tmp_path") / "bloom.db"))
    else:
        from bloom_runtime.sql.postgres import PostgresStore

        store = PostgresStore(request.getfixturevalue("pg_url"), pool_min=2, pool_max=20)
    store.open()
    return store


@pytest.fixture
def engine(make_engine) -> Engine:
    return make_engine()


def new_task(**over: Any) -> NewTask:
    base: dict[str, Any] = {"context_id": "ctx-1", "agent_slug": "writer", "prompt": "say hi"}
    base.update(over)
    return NewTask(**base)


def worker(wid: str = "w1", max_concurrency: int = 4, labels: tuple[str, ...] = (), **over: Any) -> WorkerUpsert:
    over.setdefault("status", "online")
    return WorkerUpsert(id=wid, capabilities=Capabilities(max_concurrency=max_concurrency, labels=list(labels)), **over)


def check_invariants(raw_sql: Callable[[str], list[tuple]]) -> None:
    """The lease invariants every concurrency test ends with."""
    two_active = raw_sql(
        "SELECT task_id, COUNT(*) FROM leases WHERE status = 'active' GROUP BY task_id HAVING COUNT(*) > 1"
    )
    assert two_active == [], f"tasks with several active leases: {two_active}"
    held_wrong = raw_sql(
        "SELECT t.id FROM llm_tasks t WHERE t.status IN ('leased', 'running') AND "
        "(SELECT COUNT(*) FROM leases l WHERE l.task_id = t.id AND l.status = 'active' AND l.id = t.lease_id) != 1"
    )
    assert held_wrong == [], f"leased/running tasks without exactly one active lease: {held_wrong}"
    orphan = raw_sql(
        "SELECT l.id FROM leases l JOIN llm_tasks t ON t.id = l.task_id "
        "WHERE l.status = 'active' AND t.status NOT IN ('leased', 'running')"
    )
    assert orphan == [], f"active leases on tasks that hold none: {orphan}"
    over = raw_sql("SELECT id FROM llm_tasks WHERE attempts > max_attempts")
    assert over == [], f"tasks over max_attempts: {over}"
