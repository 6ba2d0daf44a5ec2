"""Deadlines of writes while the database does not answer: "not applied" must be true.

Another session holds the database (a table lock on PostgreSQL, the write lock on
SQLite) so the engine's first write hangs inside its transaction. That write was
under way when its time ran out: its outcome is unknown to the caller. The writes
queued behind it never started: their callers are told nothing changed, and it
must stay so once the database answers again.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from bloom_runtime.engine.engine import Engine
from bloom_runtime.engine.errors import EngineTimeout, OutcomeUnknown
from bloom_runtime.engine.models import WorkerUpsert
from bloom_runtime.sql.store import Store

from ..agent_standin import Run
from ..http.conftest import wait_for
from .conftest import new_task, worker

ASK_TIMEOUT_S = 0.5


class Hold:
    """Keeps the engine's writes waiting while open; ``writer_waiting()`` says when the
    engine's own write transaction is stuck behind it."""

    def __init__(self, store: Store, pg_url: str | None = None, table: str = "llm_tasks") -> None:
        self.store = store
        self.pg_url = pg_url
        self.table = table  # PostgreSQL: the table whose writers wait (SQLite holds them all)
        self._conn: Any = None

    def __enter__(self) -> Hold:
        if self.pg_url is not None:
            self._conn = psycopg.connect(self.pg_url)
            self._conn.execute(f"LOCK TABLE {self.table} IN EXCLUSIVE MODE")  # reads go on, writes wait
        else:
            self._conn = sqlite3.connect(self.store.path, isolation_level=None)  # type: ignore[attr-defined]
            self._conn.execute("BEGIN IMMEDIATE")
        return self

    def writer_waiting(self) -> bool:
        if self.pg_url is not None:
            with psycopg.connect(self.pg_url) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
                ).fetchone()
            return row is not None and row[0] > 0
        # the store takes its write lock before BEGIN IMMEDIATE, which then waits on ours
        return bool(self.store._write_lock.locked())  # type: ignore[attr-defined]

    def __exit__(self, *exc: object) -> None:
        if self.pg_url is not None:
            self._conn.rollback()
        else:
            self._conn.execute("ROLLBACK")
        self._conn.close()


def in_thread(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Start ``fn`` on a thread; the returned function joins it and gives its result or exception."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # handed to the test
            out.append(exc)

    t = threading.Thread(target=run)
    t.start()

    def join() -> Any:
        t.join(30)
        assert not t.is_alive()
        return out[0]

    return join


@pytest.fixture
def slow_engine(make_engine: Callable[..., Engine], request: pytest.FixtureRequest, dialect: str) -> tuple[Engine, Hold]:
    # (SQLite: the hold lasts a second or two, well inside the store's busy timeout.)
    engine = make_engine(ask_timeout_s=ASK_TIMEOUT_S)
    return engine, Hold(engine.store, request.getfixturevalue("pg_url") if dialect == "postgres" else None)


def test_a_503_means_not_applied_and_a_504_that_the_outcome_is_unknown(slow_engine: tuple[Engine, Hold]) -> None:
    engine, hold = slow_engine
    key = {n: f"key-{n}" for n in range(6)}
    with hold:
        first = in_thread(lambda: engine.tasks.create(new_task(idempotency_key=key[0])))
        wait_for(hold.writer_waiting)
        queued = [in_thread(lambda n=n: engine.tasks.create(new_task(idempotency_key=key[n]))) for n in range(1, 5)]
        answers = [first(), *(join() for join in queued)]
    assert isinstance(answers[0], OutcomeUnknown), answers[0]
    assert all(isinstance(a, EngineTimeout) for a in answers[1:]), answers
    # The database answers again: the write under way goes through, the others never run.
    _, created = engine.tasks.create(new_task(idempotency_key=key[5]))
    assert created
    store = engine.store
    assert store.get_task_by_idempotency_key(key[0]) is not None
    assert [store.get_task_by_idempotency_key(key[n]) for n in range(1, 5)] == [None] * 4
    assert {t.idempotency_key for t in engine.tasks.list().items} == {key[0], key[5]}
    # Retrying with the same key is safe either way.
    task, created = engine.tasks.create(new_task(idempotency_key=key[0]))
    assert not created and task.id == store.get_task_by_idempotency_key(key[0]).id  # type: ignore[union-attr]
    _, created = engine.tasks.create(new_task(idempotency_key=key[1]))
    assert created


def test_a_claim_that_never_started_leases_nothing(slow_engine: tuple[Engine, Hold]) -> None:
    engine, hold = slow_engine
    engine.workers.register(worker("w1", max_concurrency=4))
    for _ in range(2):
        engine.tasks.create(new_task())
    with hold:
        first = in_thread(lambda: engine.leases.claim("w1"))
        wait_for(hold.writer_waiting)
        second = in_thread(lambda: engine.leases.claim("w1"))
        assert isinstance(second(), EngineTimeout)
        assert isinstance(first(), OutcomeUnknown)
    # The first claim went through once the database answered; the second never ran.
    assert engine.leases.claim("w1") is not None
    assert len(engine.leases.list().items) == 2
    assert sorted(t.attempts for t in engine.tasks.list().items) == [1, 1]


def test_a_delivery_still_being_recorded_at_its_deadline_keeps_its_lease(
    slow_engine: tuple[Engine, Hold], agents: Callable[..., Any]
) -> None:
    engine, hold = slow_engine
    hold.table = "dispatch_deliveries"  # the lease writes go on; the delivery record waits
    agent = agents("node-1", run=Run(seconds=30))  # still running when the test ends (and kills it)
    engine.workers.register(WorkerUpsert(id="node-1", url=agent.url, status="online"))
    task, _ = engine.tasks.create(new_task())
    grant = engine.leases.acquire(task.id, worker_id="node-1")
    with hold:
        deliver = in_thread(lambda: engine.dispatch.deliver(grant, actor="api"))
        wait_for(hold.writer_waiting)
        assert isinstance(deliver(), OutcomeUnknown)
        # It may yet be sent: the lease is not given to anyone else meanwhile.
        assert engine.leases.get(grant.lease.id).status == "active"
    # Once the database answers, the delivery is recorded and sent, under the lease it was granted.
    assert agent.wait_for_runs(1)
    assert engine.dispatch.latest(task.id) is not None
    assert engine.leases.get(grant.lease.id).status == "active"
    current = engine.tasks.get(task.id)
    assert (current.lease_id, current.attempts) == (grant.lease.id, 1)
    agent.kill()
