"""Write transactions on PostgreSQL find their rows through an index, whatever the statistics say.

An analysed empty table is the case where the planner likes a sequential scan best,
and a generic plan cached then keeps scanning as the table grows. Each test asks the
planner, inside a real store transaction, how it would run a statement of the batch
path, and expects an index.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from bloom_runtime.engine.models import Fence
from bloom_runtime.sql.postgres import PostgresStore, Q
from bloom_runtime.sql.store import HeartbeatOp

from .test_contract import T0

IDS = ["task-a", "task-b", "task-c"]


@pytest.fixture
def analysed_empty(pg_store: PostgresStore, pg_url: str) -> PostgresStore:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("ANALYZE llm_tasks, leases, workers")
    return pg_store


def _scans(cur: psycopg.Cursor[Any], name: str, params: dict[str, Any]) -> set[str]:
    plan = cur.execute(f"EXPLAIN (FORMAT JSON) {Q[name]}", params).fetchone()[0]
    found: set[str] = set()

    def walk(node: dict[str, Any]) -> None:
        if "Relation Name" in node:
            found.add(f"{node['Node Type']} on {node['Relation Name']}")
        for child in node.get("Plans", []):
            walk(child)

    walk(plan[0]["Plan"])  # psycopg has parsed the JSON
    return found


def test_sequential_scan_is_what_the_planner_would_pick_otherwise(analysed_empty: PostgresStore, pg_url: str) -> None:
    # The premise of the tests below: without the transaction's setting, this is a seq scan.
    with psycopg.connect(pg_url) as conn:
        scans = _scans(conn.cursor(), "lock_tasks", {"ids": IDS, "leases": []})
    assert "Seq Scan on llm_tasks" in scans


def test_lock_of_a_batch_uses_the_primary_key(analysed_empty: PostgresStore) -> None:
    with analysed_empty.transaction() as tx:
        tx._messages.begin()
        scans = _scans(tx._messages.cur, "lock_tasks", {"ids": IDS, "leases": ["lease-a"]})
    assert not any(s.startswith("Seq Scan") for s in scans), scans
    assert any("llm_tasks" in s for s in scans)


def test_set_statements_of_a_batch_use_indexes(analysed_empty: PostgresStore) -> None:
    # apply() opens the transaction through its own message: the setting must ride in it.
    with analysed_empty.transaction() as tx:
        tx.apply([HeartbeatOp("task-a", Fence())], T0)
        rows = json.dumps([{"ord": n, "finish": False, "task_id": t} for n, t in enumerate(IDS)])
        scans = _scans(tx._messages.cur, "fenced_writes", {"rows": rows, "now": T0})
    assert not any(s.startswith("Seq Scan") for s in scans), scans
    assert {"llm_tasks", "leases"} <= {s.rsplit(" on ", 1)[1] for s in scans}


def _claim_plan(cur: psycopg.Cursor[Any]) -> set[str]:
    params = {"worker_id": "w-1", "want": 1, "ttl": None, "lease_ids": json.dumps(["lease-x"]), "actor": None,
              "audit_ids": "[]", "grace": 30, "now": T0}
    return _scans(cur, "claim_tasks", params)


@pytest.fixture
def queue_grown_since_analyse(pg_store: PostgresStore, pg_url: str) -> Iterator[PostgresStore]:
    # Statistics that say the queue is empty, and 3 000 queued tasks; autovacuum kept
    # away, or its ANALYZE could arrive in between and fix the estimate itself.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE llm_tasks SET (autovacuum_enabled = false)")
        conn.execute("ANALYZE llm_tasks, leases, workers")
        conn.execute(
            "INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, created_at, updated_at) "
            "SELECT 'q-' || n, 'c', 'a', 'p', %(t)s::bigint + n, %(t)s::bigint + n FROM generate_series(1, 3000) n",
            {"t": T0},
        )
        conn.execute("INSERT INTO workers (id, node_id, status, capabilities, registered_at) VALUES ('w-1', 'w-1', 'online', '{}'::jsonb, %(t)s)",
                     {"t": T0})
    try:
        yield pg_store
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("ALTER TABLE llm_tasks RESET (autovacuum_enabled)")


def test_a_claim_walks_the_queue_index_in_order(queue_grown_since_analyse: PostgresStore) -> None:
    # Left to its estimates, the planner may read every queued task through a bitmap scan
    # and sort them all to take the oldest (seen with 3 000 queued; whether it does
    # depends on the server's statistics and costs, so only the fixed plan is asserted).
    with queue_grown_since_analyse.transaction() as tx:
        tx._messages.begin()
        scans = _claim_plan(tx._messages.cur)
    assert "Index Scan on llm_tasks" in scans and not any(s.startswith(("Seq Scan", "Bitmap")) for s in scans), scans
