"""Adopting a first-version database: its tables as drizzle made them, with its rows, become ours.

The first version's DDL and rows are written here from its shared/schema.ts and
storage.ts (``first_version/tables.sql``, ``first_version/rows.sql``); ``bloom-runtime
migrate`` runs on them as an operator would, and the rows are then read through the API
and carry a new lifecycle.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import falcon.testing
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from bloom_runtime.engine.engine import Engine
from bloom_runtime.engine.errors import NotAdoptable
from bloom_runtime.engine.settings import Settings
from bloom_runtime.http import create_app
from bloom_runtime.sql import migrate as migrations
from bloom_runtime.sql.adopt import ADOPTED_AS
from bloom_runtime.sql.postgres import PostgresStore

from ..conftest import _with_dbname, run_together
from .test_migrations import ALL_MIGRATIONS, fresh_pg_url  # noqa: F401

pytestmark = pytest.mark.postgres

HERE = Path(__file__).parent / "first_version"
REPO = Path(__file__).resolve().parents[2]
TABLES = (HERE / "tables.sql").read_text()
ROWS = (HERE / "rows.sql").read_text()
# A database from before the first version managed nodes: its workers lack the agent columns.
WITHOUT_AGENT_COLUMNS = "ALTER TABLE workers DROP COLUMN agent_version, DROP COLUMN os_info, DROP COLUMN install_method"
API = "/api/runtime"
T = "6f1c0a52-0000-4000-8000-00000000000"  # + 1..6: the first version's tasks
L = "7a2d0b63-0000-4000-8000-00000000000"  # + 2..6: their leases


def sql(url: str, *statements: str) -> list[Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            cur = conn.execute(statement.encode())
        return cur.fetchall() if cur.description else []


def layout(url: str) -> dict[str, list[Any]]:
    """Our tables as the catalog describes them: columns in order, constraints, indexes."""
    ours = ("llm_tasks", "leases", "workers", "runtime_artifacts", "llm_results", "audit_logs", "runtime_settings",
            "users", "schema_migrations")
    tables = "(" + ", ".join(f"'{t}'" for t in ours) + ")"
    return {
        "columns": sql(url, "SELECT table_name, column_name, data_type, is_nullable, column_default"
                            f" FROM information_schema.columns WHERE table_schema = 'public' AND table_name IN {tables}"
                            " ORDER BY table_name, ordinal_position"),
        "constraints": sql(url, "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
                                f" WHERE connamespace = 'public'::regnamespace AND conrelid::regclass::text IN {tables}"
                                " ORDER BY 1, 2"),
        "indexes": sql(url, "SELECT tablename, indexname, indexdef FROM pg_indexes"
                            f" WHERE schemaname = 'public' AND tablename IN {tables} ORDER BY 1, 2"),
    }


def migrate_cli(url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return subprocess.run([sys.executable, "-m", "bloom_runtime.cli", "migrate", "--database-url", url],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def other_pg_url(pg_server_url: str) -> Iterator[str]:
    """A second empty database, migrated by bloom-runtime from nothing, to compare with."""
    name = f"bloom_cmp_{uuid.uuid4().hex[:12]}"
    sql(pg_server_url, f'DROP DATABASE IF EXISTS "{name}"', f'CREATE DATABASE "{name}"')
    try:
        yield _with_dbname(pg_server_url, name)
    finally:
        sql(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _store(url: str) -> PostgresStore:
    store = PostgresStore(url, pool_min=1, pool_max=2)
    store.open(wait_s=10)
    return store


def test_adopted_as_names_the_first_migration() -> None:
    assert migrations.available("postgres")[0].version == ADOPTED_AS


@pytest.mark.parametrize("older", [False, True], ids=["with-agent-columns", "before-node-management"])
def test_adoption_builds_the_layout_the_migrations_build(fresh_pg_url: str, other_pg_url: str, older: bool) -> None:  # noqa: F811
    sql(fresh_pg_url, TABLES, ROWS, *([WITHOUT_AGENT_COLUMNS] if older else []))
    store = _store(fresh_pg_url)
    try:
        assert store.migrate() == [f"{ADOPTED_AS} (adopted from the first version's tables)", *ALL_MIGRATIONS["postgres"][1:]]
        assert store.migrate() == []
        store.check_schema()
    finally:
        store.close()
    fresh = _store(other_pg_url)
    try:
        fresh.migrate()
    finally:
        fresh.close()
    assert layout(fresh_pg_url) == layout(other_pg_url)
    # Its own tables stay as they were, rows and all.
    assert sql(fresh_pg_url, "SELECT name, canonical_id FROM managed_projects") == [("garden", "c0ffee")]


def _refused(url: str, *breakage: str) -> NotAdoptable:
    sql(url, TABLES, ROWS, *breakage)
    before = layout(url), sql(url, "SELECT count(*) FROM llm_tasks"), sql(url, "SELECT * FROM runtime_settings ORDER BY 1")
    store = _store(url)
    try:
        with pytest.raises(NotAdoptable) as info:
            store.migrate()
    finally:
        store.close()
    after = layout(url), sql(url, "SELECT count(*) FROM llm_tasks"), sql(url, "SELECT * FROM runtime_settings ORDER BY 1")
    assert after == before  # nothing changed
    assert "Nothing was changed" in info.value.message
    return info.value


@pytest.mark.parametrize("breakage, says", [
    ("DROP TABLE llm_results", "table llm_results is missing"),
    ("ALTER TABLE llm_tasks ADD COLUMN priority integer", "llm_tasks.priority is not a column of the first version"),
    ("ALTER TABLE leases DROP COLUMN context_id", "leases.context_id is missing"),
    ("ALTER TABLE workers ALTER COLUMN registered_at TYPE text", "workers.registered_at is text, the first version's is bigint"),
    (f"UPDATE llm_tasks SET status = 'paused' WHERE id = '{T}1'", "1 row(s) with llm_tasks.status 'paused'"),
    ("UPDATE workers SET status = 'gone'", "3 row(s) with workers.status 'gone'"),
])
def test_what_cannot_be_adopted_is_refused_naming_why(fresh_pg_url: str, breakage: str, says: str) -> None:  # noqa: F811
    assert says in _refused(fresh_pg_url, breakage).message


def test_our_own_tables_without_schema_migrations_are_refused(fresh_pg_url: str) -> None:  # noqa: F811
    sql(fresh_pg_url, migrations.available("postgres")[0].sql)
    store = _store(fresh_pg_url)
    try:
        with pytest.raises(NotAdoptable, match=r"llm_tasks\.labels is not a column of the first version"):
            store.migrate()
    finally:
        store.close()


def test_two_migrators_adopt_once(fresh_pg_url: str) -> None:  # noqa: F811
    sql(fresh_pg_url, TABLES, ROWS)
    stores = [_store(fresh_pg_url), _store(fresh_pg_url)]
    try:
        applied = run_together(2, lambda i: stores[i].migrate())
    finally:
        for s in stores:
            s.close()
    # Adopted once, each migration after it once, whichever migrator got to each first.
    assert sorted(v for a in applied for v in a) == [f"{ADOPTED_AS} (adopted from the first version's tables)",
                                                     *ALL_MIGRATIONS["postgres"][1:]]
    assert sql(fresh_pg_url, "SELECT count(*) FROM audit_logs WHERE action = 'database_adopted'") == [(1,)]


# --- the rows, through the API --------------------------------------------------------------


def test_migrate_adopts_and_the_api_serves_the_first_versions_rows(fresh_pg_url: str, pg_server_url: str) -> None:  # noqa: F811
    sql(fresh_pg_url, TABLES, ROWS)
    url = _with_dbname(pg_server_url, conninfo_to_dict(fresh_pg_url)["dbname"])  # as an operator writes it
    done = migrate_cli(url)
    assert done.returncode == 0, done.stderr
    assert f"applied {ADOPTED_AS} (adopted from the first version's tables)" in done.stdout
    assert "tasks_without_lease=1" in done.stderr and "'my laptop'" in done.stderr  # what it repaired, and warns of
    assert "nothing to apply" in migrate_cli(url).stdout

    settings = Settings(database_url=url, lease_sweep_interval_s=3600.0, membridge_sync_interval_s=3600.0)
    with Engine.start(settings) as engine:
        c = falcon.testing.TestClient(create_app(engine, settings))
        _served_as_the_first_version_left_them(c)
        _a_new_lifecycle_runs_on_them(c)


def _served_as_the_first_version_left_them(c: falcon.testing.TestClient) -> None:
    tasks = {t["id"]: t for t in c.simulate_get(f"{API}/llm-tasks").json}
    assert len(tasks) == 6
    leased = tasks[f"{T}2"]
    assert (leased["status"], leased["lease_id"], leased["worker_id"], leased["attempts"]) == ("leased", f"{L}2", "node-a", 1)
    assert leased["policy"] == {"timeout_sec": 60, "budget": 0.5} and leased["desired_format"] == "json"
    assert (leased["labels"], leased["not_before"], leased["idempotency_key"]) == ([], None, None)
    assert tasks[f"{T}1"]["context_hints"] == ["notes/a.md"] and tasks[f"{T}1"]["created_at"] == 1700000001000
    # The task the first version left running under an expired lease is back in the queue.
    stuck = tasks[f"{T}3"]
    assert (stuck["status"], stuck["lease_id"], stuck["worker_id"], stuck["attempts"]) == ("queued", None, None, 1)
    assert [tasks[f"{T}{n}"]["status"] for n in (4, 5, 6)] == ["completed", "failed", "dead"]
    assert [t["id"] for t in c.simulate_get(f"{API}/runs").json] == [f"{T}{n}" for n in range(6, 0, -1)]

    workers = {w["id"]: w for w in c.simulate_get(f"{API}/workers").json}
    assert set(workers) == {"node-a", "node-b", "my laptop"}
    a = c.simulate_get(f"{API}/workers/node-a").json
    assert (a["url"], a["status"], a["agent_version"], a["os_info"], a["install_method"], a["db_sha"], a["obs_count"]) == (
        "http://10.0.0.11:8001", "online", "0.4.0", "node-a / Debian GNU/Linux 12 (bookworm)", "script", "sha-1f2e", 42)
    assert a["capabilities"] == {"claude_cli": True, "max_concurrency": 2, "labels": ["systemd", "aarch64"]}
    assert a["active_leases"] == 1 and [lease["id"] for lease in a["leases"]] == [f"{L}2"]
    # The first version trusted any URL; here nobody has vouched for it yet (worker_trust is new).
    assert a["url_verified"] is False
    b = workers["node-b"]
    assert (b["url"], b["db_sha"], b["agent_version"], b["last_heartbeat"]) == ("", "", "unknown", b["registered_at"])
    assert workers["my laptop"]["capabilities"]["labels"] == []  # completed from the first version's partial JSON

    active = c.simulate_get(f"{API}/leases", params={"status": "active"}).json
    assert [(x["id"], x["context_id"], x["ttl_seconds"]) for x in active] == [(f"{L}2", "garden", 300)]
    expired = {x["id"]: x for x in c.simulate_get(f"{API}/leases", params={"status": "expired"}).json}
    assert expired[f"{L}3"]["context_id"] == "orchard"  # filled in from its task

    result = c.simulate_get(f"{API}/llm-tasks/{T}4/result").json
    assert (result["output"], result["worker_id"], result["metrics"]) == ("the answer", "node-a",
                                                                          {"duration_ms": 1200, "tokens_used": 321})
    assert [r["status"] for r in c.simulate_get(f"{API}/results").json] == ["error", "success"]
    [artifact] = c.simulate_get(f"{API}/artifacts", params={"task_id": f"{T}4"}).json
    assert (artifact["type"], artifact["content"], artifact["tags"], artifact["finalized"]) == ("LLM_RESULT", "the answer",
                                                                                               ["draft"], True)
    audit = c.simulate_get(f"{API}/audit").json
    actions = [(e["action"], e["actor"]) for e in audit]
    assert ("task_created", "api") in actions and ("config_updated", "admin") in actions
    assert ("database_adopted", "migrate") in actions
    requeued = next(e for e in audit if e["action"] == "task_requeued")
    assert requeued["entity_id"] == f"{T}3" and "no active lease" in requeued["detail"]

    # Its settings: the membridge URL and key (kept under its old name there), and the last test.
    config = c.simulate_get(f"{API}/config").json
    assert config == {"membridge_server_url": "http://127.0.0.1:8000", "admin_key_masked": "adm-****cdef",
                      "admin_key": "****cdef", "configured": True, "connected": True, "last_test": 1700000095000}
    stats = c.simulate_get(f"{API}/stats").json
    assert (stats["tasks"]["total"], stats["leases"]["active"], stats["workers"]["online"]) == (6, 1, 1)


def _a_new_lifecycle_runs_on_them(c: falcon.testing.TestClient) -> None:
    # The lease the first version granted is renewed and completed under our fencing.
    r = c.simulate_post(f"{API}/llm-tasks/{T}2/heartbeat", json={"lease_id": f"{L}2"})
    assert r.status_code == 200 and r.json["task"]["status"] == "running"
    r = c.simulate_post(f"{API}/llm-tasks/{T}2/complete", json={"status": "success", "output": "{}", "lease_id": f"{L}2"})
    assert r.status_code == 200 and r.json["task"]["status"] == "completed"
    # A new task goes to the adopted worker; a failed one of the first version is requeued.
    new = c.simulate_post(f"{API}/llm-tasks", json={"context_id": "garden", "agent_slug": "writer", "prompt": "again"}).json
    grant = c.simulate_post(f"{API}/llm-tasks/{new['id']}/lease", json={"worker_id": "node-a"})
    assert grant.status_code == 201 and grant.json["worker"]["id"] == "node-a"
    assert c.simulate_post(f"{API}/llm-tasks/{T}5/requeue").json["status"] == "queued"
    r = c.simulate_post(f"{API}/llm-tasks/{new['id']}/complete", json={"status": "success", "output": "done"})
    assert r.status_code == 200 and r.json["result"]["output"] == "done"
    # A pull worker registers and claims the oldest queued task: the first version's own.
    assert c.simulate_post(f"{API}/workers", json={"name": "puller"}).status_code == 201
    claimed = c.simulate_post(f"{API}/workers/puller/claim", json={"wait_seconds": 0}).json
    assert claimed["task"]["id"] == f"{T}1" and claimed["lease"]["context_id"] == "garden"
    assert c.simulate_delete(f"{API}/workers/my laptop").status_code == 400  # the id the API cannot address


def test_serve_adopts_on_start(fresh_pg_url: str, pg_server_url: str) -> None:  # noqa: F811
    sql(fresh_pg_url, TABLES, ROWS, WITHOUT_AGENT_COLUMNS)
    url = _with_dbname(pg_server_url, conninfo_to_dict(fresh_pg_url)["dbname"])
    settings = Settings(database_url=url, lease_sweep_interval_s=3600.0, membridge_sync_interval_s=3600.0)
    with Engine.start(settings) as engine:
        assert engine.workers.get("node-a").agent_version == "unknown"  # the older layout had none
        assert len(engine.tasks.list().items) == 6
