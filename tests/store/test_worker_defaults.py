"""Worker rows stored before the first version's defaults applied (NULLs) read as new ones do."""

from __future__ import annotations

import json

import psycopg
import pytest

from bloom_runtime.sql.store import Store

from .test_contract import OK, T0, acquire, add_task, add_worker, complete, execute_raw  # noqa: F401

LEGACY_ROW = (
    "INSERT INTO workers (id, node_id, url, status, capabilities, last_heartbeat, ip_addrs, obs_count, db_sha,"
    " registered_at, agent_version, os_info, install_method, source)"
    " VALUES ('{id}', '{id}', NULL, 'online', '{{}}', NULL, '[]', 0, NULL, {registered}, NULL, NULL, NULL, '{source}')"
)


@pytest.fixture
def legacy(execute_raw):  # noqa: F811
    """Insert a worker row the way code before the defaults did: NULL where nothing was given."""

    def insert(worker_id: str, registered: int, source: str = "api") -> None:
        execute_raw(LEGACY_ROW.format(id=worker_id, registered=registered, source=source))

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


def test_worker_leases_are_its_active_ones_newest_first(store: Store) -> None:
    add_worker(store, "w-1", max_concurrency=3)
    add_worker(store, "w-2")
    first = acquire(store, add_task(store).id, ["w-1"], now=T0)
    second = acquire(store, add_task(store).id, ["w-1"], now=T0 + 1)
    done = acquire(store, add_task(store).id, ["w-1"], now=T0 + 2)
    other = acquire(store, add_task(store).id, ["w-2"], now=T0)
    complete(store, done.task.id, OK)
    assert store.worker_leases("w-1") == [second.lease, first.lease]
    assert store.worker_leases("w-2") == [other.lease]
    assert store.worker_leases("nobody") == []


@pytest.mark.postgres
def test_worker_leases_read_by_the_active_lease_index(pg_store: Store, pg_url: str) -> None:
    from bloom_runtime.sql.postgres import Q

    with psycopg.connect(pg_url, autocommit=True) as conn:
        # Many finished leases over many workers, a few active: the index is the cheap way in.
        conn.execute(
            "INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id)"
            " SELECT 'l-' || n, 't-' || n, 'w-' || (n % 500), n, n + 1000, 60,"
            " CASE WHEN n % 1000 = 0 THEN 'active' ELSE 'released' END, n, 'c' FROM generate_series(1, 50000) AS n"
        )
        conn.execute("ANALYZE leases")
        plan = conn.execute(f"EXPLAIN (FORMAT JSON) {Q['worker_leases']}".encode(),
                            {"worker_id": "w-0", "limit": 1000}).fetchone()[0]
    text = json.dumps(plan)
    assert "leases_worker_active_idx" in text and "Seq Scan" not in text, text
    assert len(pg_store.worker_leases("w-0")) == 50
