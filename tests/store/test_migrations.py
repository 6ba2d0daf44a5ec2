"""Migrations: what they build is what the stores read and write, on both dialects."""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator

import msgspec
import psycopg
import pytest

from bloom_runtime.engine.errors import ConfigError, SchemaTooNew, StoreUnavailable
from bloom_runtime.engine.models import Artifact, AuditEntry, Delivery, HistoryPoint, Lease, Result, Task, Worker
from bloom_runtime.sql import migrate as migrations
from bloom_runtime.sql.postgres import PostgresStore


def _names(struct: type) -> set[str]:
    return {f.name for f in msgspec.structs.fields(struct)}


# What the code expects of each table: the records' fields (computed ones left out)
# plus the tables no record maps.
EXPECTED: dict[str, set[str]] = {
    "llm_tasks": _names(Task),
    "leases": _names(Lease),
    "workers": _names(Worker) - {"active_leases", "url_verified"},  # counted from leases and worker_trust
    "dispatch_deliveries": _names(Delivery),
    "worker_trust": {"worker_id", "url", "vouched_by", "updated_at"},
    "runtime_artifacts": _names(Artifact),
    "llm_results": _names(Result),
    "audit_logs": _names(AuditEntry),
    "runtime_settings": {"key", "value", "updated_at"},
    "users": {"id", "username", "password"},
    "runtime_history": (_names(HistoryPoint) - {"at"}) | {"minute", "sampled_at"},
    "schema_migrations": {"version", "applied_at"},
}
ALL_MIGRATIONS = {dialect: [m.version for m in migrations.available(dialect)] for dialect in ("postgres", "sqlite")}


def _with_dbname(url: str, dbname: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo(**params)


@pytest.fixture
def fresh_pg_url(pg_server_url: str) -> Iterator[str]:
    """An empty database of its own (not the suite's migrated one)."""
    name = f"bloom_mig_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # name is ours, not input
    try:
        yield _with_dbname(pg_server_url, name)
    finally:
        with psycopg.connect(pg_server_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def fresh_pg(fresh_pg_url: str) -> Iterator[PostgresStore]:
    store = PostgresStore(fresh_pg_url, pool_min=1, pool_max=4)
    store.open(wait_s=10)
    try:
        yield store
    finally:
        store.close()


def _pg_columns(url: str) -> dict[str, set[str]]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public'"
        ).fetchall()
    out: dict[str, set[str]] = {}
    for table, column in rows:
        out.setdefault(table, set()).add(column)
    return out


def _sqlite_columns(path: str) -> dict[str, set[str]]:
    conn = sqlite3.connect(path)
    try:
        tables = [
            r[0]
            for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        ]
        return {t: {r[1] for r in conn.execute("SELECT * FROM pragma_table_info(?)", (t,))} for t in tables}
    finally:
        conn.close()


# --- PostgreSQL ---------------------------------------------------------------


@pytest.mark.postgres
def test_pg_migrations_build_what_the_code_expects(fresh_pg: PostgresStore, fresh_pg_url: str) -> None:
    assert fresh_pg.migrate() == ALL_MIGRATIONS["postgres"]
    assert _pg_columns(fresh_pg_url) == EXPECTED
    fresh_pg.check_schema()


@pytest.mark.postgres
def test_pg_migrate_twice_applies_nothing_the_second_time(fresh_pg: PostgresStore) -> None:
    assert fresh_pg.migrate() != []
    assert fresh_pg.migrate() == []


@pytest.mark.postgres
def test_pg_concurrent_migrators_apply_each_migration_once(fresh_pg: PostgresStore, fresh_pg_url: str) -> None:
    other = PostgresStore(fresh_pg_url, pool_min=1, pool_max=2)
    other.open(wait_s=10)
    barrier = threading.Barrier(2)
    applied: list[list[str]] = []

    def run(store: PostgresStore) -> None:
        barrier.wait()
        applied.append(store.migrate())

    try:
        threads = [threading.Thread(target=run, args=(s,)) for s in (fresh_pg, other)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        other.close()
    # Each migration once, in order, whichever migrator got to it first.
    assert sorted(v for a in applied for v in a) == ALL_MIGRATIONS["postgres"]
    assert all(a == sorted(a) for a in applied)


@pytest.mark.postgres
def test_pg_unknown_newer_migration_is_schema_too_new(fresh_pg: PostgresStore, fresh_pg_url: str) -> None:
    fresh_pg.migrate()
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES ('9999_from_the_future', 0)")
    with pytest.raises(SchemaTooNew):
        fresh_pg.migrate()
    with pytest.raises(SchemaTooNew):
        fresh_pg.check_schema()


@pytest.mark.postgres
def test_pg_check_schema_reports_pending_migrations(fresh_pg: PostgresStore) -> None:
    with pytest.raises(StoreUnavailable, match="pending"):
        fresh_pg.check_schema()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens here once the socket closes


def test_pg_store_at_closed_port_fails_within_its_wait() -> None:
    port = _closed_port()
    store = PostgresStore(f"postgresql://bloom:s3cret-pw@127.0.0.1:{port}/bloom", connect_timeout_s=2)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        store.open(wait_s=1.0)
    assert time.monotonic() - started < 3.0
    message = str(info.value)
    assert f"127.0.0.1:{port}/bloom" in message and "\n" not in message
    assert "s3cret-pw" not in message
    assert info.value.__cause__ is not None
    store.close()
    store.close()  # idempotent


@pytest.mark.parametrize(
    "url", ["postgresql://bloom@[::1/x", "postgresql://bloom@host:notaport/db", "mysql://bloom@host/db"]
)
def test_pg_store_rejects_malformed_url(url: str) -> None:
    with pytest.raises(ConfigError):
        PostgresStore(url)


# --- SQLite -------------------------------------------------------------------


def test_sqlite_migrations_build_what_the_code_expects(tmp_path) -> None:
    from bloom_runtime.sql.sqlite import SqliteStore

    path = str(tmp_path / "fresh.db")
    store = SqliteStore(path)
    store.open()
    try:
        assert store.migrate() == ALL_MIGRATIONS["sqlite"]
        assert store.migrate() == []
        store.check_schema()
    finally:
        store.close()
    assert _sqlite_columns(path) == EXPECTED


def test_sqlite_unknown_newer_migration_is_schema_too_new(tmp_path) -> None:
    from bloom_runtime.sql.sqlite import SqliteStore

    path = str(tmp_path / "fresh.db")
    store = SqliteStore(path)
    store.open()
    try:
        store.migrate()
        conn = sqlite3.connect(path)
        with conn:
            conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES ('9999_from_the_future', 0)")
        conn.close()
        with pytest.raises(SchemaTooNew):
            store.migrate()
        with pytest.raises(SchemaTooNew):
            store.check_schema()
    finally:
        store.close()


def test_both_dialects_ship_the_same_migrations() -> None:
    assert ALL_MIGRATIONS["postgres"] == ALL_MIGRATIONS["sqlite"]


@pytest.mark.postgres
def test_pg_upgrade_from_the_first_schema_keeps_idempotency_keys(fresh_pg: PostgresStore, fresh_pg_url: str) -> None:
    """A database written under 0001 alone takes 0002 with its rows in place, and a used
    key still answers with its task (the unique constraint became a partial index)."""
    from bloom_runtime.engine.models import NewTask

    first = migrations.available("postgres")[0]
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_migrations (version text PRIMARY KEY, applied_at bigint NOT NULL)")
        conn.execute(first.sql.encode())
        conn.execute("INSERT INTO schema_migrations VALUES (%s, 0)", (first.version,))
    keyed = NewTask(context_id="c", agent_slug="a", prompt="p", idempotency_key="k-1")
    _task, created = fresh_pg.run(lambda tx: tx.create_task(keyed, "t-old", 1))
    assert created
    fresh_pg.run(lambda tx: tx.create_task(NewTask(context_id="c", agent_slug="a", prompt="p"), "t-nokey", 1))

    assert fresh_pg.migrate() == ALL_MIGRATIONS["postgres"][1:]
    again, created = fresh_pg.run(lambda tx: tx.create_task(keyed, "t-new", 2))
    assert (again.id, created) == ("t-old", False)
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")}
    assert "llm_tasks_idempotency_key_idx" in indexes
    assert not {"llm_tasks_idempotency_key_key", "leases_task_idx", "leases_context_active_idx"} & indexes
