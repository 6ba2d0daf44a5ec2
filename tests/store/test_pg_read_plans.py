"""The read side's statements reach their rows through indexes on a large, analysed table.

A plan, not a timing: each statement is EXPLAINed against 20 000 tasks (with leases,
results and five audit entries each) and must not scan a table sequentially.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from bloom_runtime.engine.models import TASK_STATUSES

from .test_pg_plans import _scans

pytestmark = pytest.mark.postgres

ROWS = 20_000
T0 = 1_700_000_000_000
LAST = 2**63 - 1
PAGE = {"after_at": LAST, "after_id": "", "limit": 51}


@pytest.fixture(scope="module")
def big(pg_url: str) -> Iterator[psycopg.Connection[Any]]:
    from ..conftest import truncate_pg

    truncate_pg(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, status, created_at, updated_at, attempts, max_attempts)
               SELECT 't-' || g, 'ctx-' || (g %% 2000), 'agent-' || (g %% 7), 'p',
                      CASE WHEN g %% 100 = 0 THEN 'queued' WHEN g %% 50 = 1 THEN 'failed' ELSE 'completed' END,
                      %(t0)s + g * 100, %(t0)s + g * 100, 1, 3
               FROM generate_series(1, %(rows)s) g""",
            {"t0": T0, "rows": ROWS},
        )
        conn.execute(
            """INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id)
               SELECT 'l-' || g, 't-' || g, 'w', %(t0)s + g * 100, %(t0)s + g * 100 + 60000, 60,
                      CASE WHEN g %% 97 = 0 THEN 'expired' WHEN g %% 100 = 3 THEN 'active' ELSE 'released' END,
                      %(t0)s, 'ctx'
               FROM generate_series(1, %(rows)s) g""",
            {"t0": T0, "rows": ROWS},
        )
        conn.execute(
            """INSERT INTO llm_results (id, task_id, status, completed_at)
               SELECT 'r-' || g, 't-' || g, CASE WHEN g %% 50 = 1 THEN 'error' ELSE 'success' END, %(t0)s + g * 100
               FROM generate_series(1, %(rows)s) g""",
            {"t0": T0, "rows": ROWS},
        )
        conn.execute(
            """INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor)
               SELECT 'a-' || g, %(t0)s + g * 20, CASE WHEN g %% 1000 = 0 THEN 'task_cancelled' ELSE 'lease_renewed' END,
                      'task', 't-' || (g / 5), 'ops'
               FROM generate_series(1, %(rows)s * 5) g""",
            {"t0": T0, "rows": ROWS},
        )
        conn.execute("ANALYZE")
        yield conn
    truncate_pg(pg_url)


END = T0 + ROWS * 100
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "search by context": ("search_tasks_by_context", {**PAGE, "value": "ctx-42", "statuses": list(TASK_STATUSES)}),
    "search by context and status": ("search_tasks_by_context", {**PAGE, "value": "ctx-42", "statuses": ["failed"]}),
    "search by agent": ("search_tasks_by_agent", {**PAGE, "value": "agent-3", "statuses": list(TASK_STATUSES)}),
    "search by agent and status": ("search_tasks_by_agent", {**PAGE, "value": "agent-3", "statuses": ["queued"]}),
    "leases of tasks": ("leases_of_tasks", {**PAGE, "task_ids": ["t-5", "t-103"], "status": None}),
    "recent expiries": ("list_expired_leases", PAGE),
    "audit by action": ("list_audit_by_action", {**PAGE, "action": "task_cancelled"}),
    "audit by entity and action": ("list_audit_by_entity_action", {**PAGE, "entity_id": "t-77", "action": "task_cancelled"}),
    "live depth": ("live_depth", {}),
    "oldest queued": ("oldest_queued", {}),
    "activity of a minute": ("activity", {"since": END - 60_000, "until": END}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_read_uses_an_index(big: psycopg.Connection[Any], case: str) -> None:
    name, params = CASES[case]
    scans = _scans(big.cursor(), name, params)
    assert scans, scans
    assert not any(s.startswith("Seq Scan") for s in scans), scans
