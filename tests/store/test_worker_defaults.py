"""Worker rows stored before the first version's defaults applied (NULLs) read as new ones do."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest

from bloom_runtime.sql.store import Store

from .test_contract import T0

LEGACY_ROW = (
    "INSERT INTO workers (id, node_id, url, status, capabilities, last_heartbeat, ip_addrs, obs_count, db_sha,"
    " registered_at, agent_version, os_info, install_method, source)"
    " VALUES ('{id}', '{id}', NULL, 'online', '{{}}', NULL, '[]', 0, NULL, {registered}, NULL, NULL, NULL, '{source}')"
)


@pytest.fixture
def legacy(store: Store, request: pytest.FixtureRequest):
    """Insert a worker row the way code before the defaults did: NULL where nothing was given."""

    def insert(worker_id: str, registered: int, source: str = "api") -> None:
        sql = LEGACY_ROW.format(id=worker_id, registered=registered, source=source)
        if store.kind == "postgresql":
            with psycopg.connect(request.getfixturevalue("pg_url"), autocommit=True) as conn:
                conn.execute(sql.encode())  # built from this test's own literals
            return
        conn = sqlite3.connect(store.path)  # type: ignore[attr-defined]
        try:
            with conn:
                conn.execute(sql)
        finally:
            conn.close()

    return insert


def test_null_fields_read_as_the_defaults(store: Store, legacy) -> None:
    legacy("w-old", T0)
    worker = store.get_worker("w-old")
    assert (worker.url, worker.db_sha, worker.agent_version, worker.os_info, worker.install_method) == (
        "", "", "unknown", "", "manual")
    assert worker.last_heartbeat == T0 == worker.registered_at
    assert store.list_workers() == [worker]


def test_liveness_judges_a_row_without_heartbeat_from_its_registration(store: Store, legacy) -> None:
    legacy("w-long-ago", T0 - 61_000, source="membridge")
    legacy("w-recent", T0 - 1000, source="pull")
    changed = store.run(lambda tx: tx.mark_stale_workers_offline(T0 - 60_000, T0))
    assert [w.id for w in changed] == ["w-long-ago"]
    assert store.get_worker("w-recent").status == "online"
