"""PostgreSQL sessions the store reuses: what a rolled-back or killed session leaves behind.

Each test pins the store to one pooled connection, so the write under test runs on
the very session the previous fault touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from bloom_runtime.engine.engine import Engine
from bloom_runtime.engine.errors import BloomError, NotFound, OutcomeUnknown
from bloom_runtime.engine.models import new_id
from bloom_runtime.engine.settings import Settings
from bloom_runtime.sql.postgres import PostgresStore
from bloom_runtime.sql.store import CreateOp, SessionLost

from ..conftest import backend_pids, fresh_pg_store, run_together, terminate, truncate_pg, wait_for
from .test_contract import T0, add_task, new_task

pytestmark = pytest.mark.postgres


@pytest.fixture
def one_conn_store(pg_url: str) -> Iterator[PostgresStore]:
    with fresh_pg_store(pg_url, pool_min=1, pool_max=1) as store:
        yield store


def create_batch(store: PostgresStore, n: int = 1) -> list[str]:
    ops = [CreateOp(new_task(), new_id()) for _ in range(n)]
    with store.transaction() as tx:
        out = tx.apply(ops, T0, commit=True)
    return [task.id for task, _created in out]


class Boom(Exception):
    pass


def test_a_write_after_a_rolled_back_one_on_the_same_connection_succeeds(one_conn_store: PostgresStore) -> None:
    store = one_conn_store
    task = add_task(store)
    for _ in range(8):  # often enough for the driver to prepare the read itself
        store.get_task(task.id)
    create_batch(store)  # the session now holds the batch statements
    for _ in range(3):
        with pytest.raises(Boom), store.transaction() as tx:
            tx.create_task(new_task(), new_id(), T0)
            raise Boom
        made = create_batch(store, 2)
        assert [store.get_task(i).status for i in made] == ["queued", "queued"]


def test_a_read_on_a_session_that_lost_its_statements_prepares_again(one_conn_store: PostgresStore) -> None:
    """A pooler or an operator's DEALLOCATE ALL empties the session: the next read says
    nothing of it (it runs once more, prepared again), and the writes after it prepare
    theirs again too."""
    store = one_conn_store
    task = add_task(store)
    assert store.get_task(task.id).id == task.id  # prepared now, on the only connection
    create_batch(store)
    for _ in range(2):
        with store._conn() as conn:
            conn.execute("DEALLOCATE ALL")
        assert store.get_task(task.id).id == task.id
        assert store.list_workers() == []
        made = create_batch(store)
        assert store.get_task(made[0]).status == "queued"


# --- terminated sessions ----------------------------------------------------------


@pytest.fixture
def pool_store(pg_url: str) -> Iterator[PostgresStore]:
    with fresh_pg_store(pg_url, pool_min=4, pool_max=4) as store:
        yield store


def test_the_requests_after_the_sessions_are_terminated_all_succeed(pool_store: PostgresStore, pg_url: str) -> None:
    engine = Engine.start(Settings(lease_sweep_interval_s=3600, membridge_sync_interval_s=3600), store=pool_store)
    try:
        run_together(4, lambda i: [engine.tasks.get(engine.tasks.create(new_task())[0].id) for _ in range(3)])
        terminate(pg_url, backend_pids(pg_url))  # every pooled session, each used moments ago
        errors: list[BaseException] = []
        for n in range(100):
            try:
                if n % 2:
                    engine.tasks.get(engine.tasks.create(new_task())[0].id)
                else:
                    engine.tasks.list(limit=10)
            except BloomError as exc:
                errors.append(exc)
        assert errors == []
    finally:
        engine.stop()


def test_a_batch_on_a_session_terminated_before_it_was_sent_is_lost_and_says_so(pool_store: PostgresStore, pg_url: str) -> None:
    store = pool_store
    task_id = new_id()
    with pytest.raises(SessionLost), store.transaction() as tx:
        terminate(pg_url, [tx._conn.info.backend_pid])  # type: ignore[attr-defined]
        tx.apply([CreateOp(new_task(), task_id)], T0, commit=True)
    with pytest.raises(NotFound):
        store.get_task(task_id)


@pytest.fixture
def commit_gate(pg_url: str) -> Iterator[psycopg.Connection[Any]]:
    """Make every commit that inserted a task wait for advisory lock 7 while the test
    holds it (a deferred constraint trigger runs at COMMIT)."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION test_commit_gate() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_advisory_xact_lock(7); RETURN NULL; END $$"
        )
        conn.execute(
            "CREATE CONSTRAINT TRIGGER test_commit_gate AFTER INSERT ON llm_tasks "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION test_commit_gate()"
        )
        conn.execute("SELECT pg_advisory_lock(7)")
        try:
            yield conn
        finally:
            conn.execute("SELECT pg_advisory_unlock(7)")
            conn.execute("DROP TRIGGER test_commit_gate ON llm_tasks")
            conn.execute("DROP FUNCTION test_commit_gate()")


def test_a_session_terminated_while_its_commit_is_in_flight_is_reported_unknown(
    pool_store: PostgresStore, pg_url: str, commit_gate: psycopg.Connection[Any]
) -> None:
    store = pool_store
    pid: list[int] = []

    def batch() -> Any:
        with store.transaction() as tx:
            pid.append(tx._conn.info.backend_pid)  # type: ignore[attr-defined]
            return tx.apply([CreateOp(new_task(), new_id())], T0, commit=True)

    def terminate_when_waiting(_: int) -> None:
        wait_for(lambda: pid and commit_gate.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'", (pid[0],)
        ).fetchone() == (1,), what="the commit waiting on the gate")
        terminate(pg_url, pid)

    result, _ = run_together(2, lambda i: batch() if i == 0 else terminate_when_waiting(i))
    assert isinstance(result, OutcomeUnknown), result


class KillsSessions(PostgresStore):
    """Terminates the session of each of its next ``kills`` write transactions as soon as
    the transaction has its connection, before anything is sent on it."""

    def __init__(self, url: str, kills: int) -> None:
        super().__init__(url, pool_min=2, pool_max=4)
        self.url = url
        self.kills = kills

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        with super().transaction() as tx:
            if self.kills > 0:
                self.kills -= 1
                terminate(self.url, [tx._conn.info.backend_pid])
            yield tx


@pytest.mark.parametrize("kills, created", [(1, True), (2, False)])
def test_a_write_whose_session_was_lost_runs_once_more_and_a_503_means_not_applied(
    pg_url: str, kills: int, created: bool
) -> None:
    truncate_pg(pg_url)
    store = KillsSessions(pg_url, 0)
    store.open(wait_s=10)
    engine = Engine.start(Settings(lease_sweep_interval_s=3600, membridge_sync_interval_s=3600), store=store)
    store.kills = kills  # once started: the start writes the lease token secret
    try:
        if created:
            task, is_new = engine.tasks.create(new_task())
            assert is_new and engine.tasks.get(task.id).status == "queued"
        else:
            with pytest.raises(SessionLost):
                engine.tasks.create(new_task())
        assert store.kills == 0
        assert len(engine.tasks.list().items) == (1 if created else 0)
    finally:
        engine.stop()
