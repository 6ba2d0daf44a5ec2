"""Adopting a first version's PostgreSQL database: its tables, as drizzle created them, become 0001's.

The first version (TypeScript, drizzle on PostgreSQL) used the same table names
with a stricter or older layout: varchar ids, ``NOT NULL DEFAULT ''`` text,
no labels, idempotency keys, lease fencing or worker sources, no indexes and no
``schema_migrations``. ``PostgresStore.migrate`` finds such a database (some of
our tables, no ``schema_migrations``), and in one transaction: checks that every
table and column is the first version's and that no row holds a value 0001
would refuse (else ``NotAdoptable``, nothing changed); makes the rows valid
(JSON the stores decode strictly, tasks stuck under a lease that is no longer
active, leases no task holds); brings the layout to 0001; audits what it did;
and records 0001_initial, so the numbered migrations then run as usual. The
statements are in ``migrations/postgres/first_version.sql``. SQLite needs none
of this: the first version had no SQLite store.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import psycopg

from bloom_runtime.engine.errors import NotAdoptable
from bloom_runtime.engine.models import ID_PATTERN, LEASE_STATUSES, TASK_STATUSES, WORKER_STATUSES, AuditEntry, new_id
from bloom_runtime.sql.queries import parse

log = logging.getLogger(__name__)

S: dict[str, str] = parse(
    resources.files("bloom_runtime.sql").joinpath("migrations", "postgres", "first_version.sql").read_text("utf-8")
)

ADOPTED_AS = "0001_initial"  # the migration whose layout the first version's tables are brought to
ACTOR = "migrate"
WHEN = "when the first version's database was adopted"
TEXT, BIGINT, INTEGER, JSONB, BOOLEAN = "text", "bigint", "integer", "jsonb", "boolean"
# information_schema data_type values each kind may have been created as.
ACCEPTED = {TEXT: {"text", "character varying"}, BIGINT: {"bigint"}, INTEGER: {"integer"}, JSONB: {"jsonb"},
            BOOLEAN: {"boolean"}}
# Every column of the first version's tables (its shared/schema.ts).
FIRST_VERSION: dict[str, dict[str, str]] = {
    "llm_tasks": {"id": TEXT, "context_id": TEXT, "agent_slug": TEXT, "prompt": TEXT, "context_hints": JSONB,
                  "policy": JSONB, "desired_format": TEXT, "status": TEXT, "created_at": BIGINT, "updated_at": BIGINT,
                  "lease_id": TEXT, "worker_id": TEXT, "attempts": INTEGER, "max_attempts": INTEGER},
    "leases": {"id": TEXT, "task_id": TEXT, "worker_id": TEXT, "started_at": BIGINT, "expires_at": BIGINT,
               "ttl_seconds": INTEGER, "status": TEXT, "last_heartbeat": BIGINT, "context_id": TEXT},
    "workers": {"id": TEXT, "node_id": TEXT, "url": TEXT, "status": TEXT, "capabilities": JSONB,
                "last_heartbeat": BIGINT, "ip_addrs": JSONB, "obs_count": INTEGER, "db_sha": TEXT,
                "registered_at": BIGINT, "active_leases": INTEGER},
    "runtime_artifacts": {"id": TEXT, "task_id": TEXT, "job_id": TEXT, "type": TEXT, "created_at": BIGINT,
                          "finalized": BOOLEAN, "url": TEXT, "entity_refs": JSONB, "tags": JSONB, "content": TEXT},
    "llm_results": {"id": TEXT, "task_id": TEXT, "worker_id": TEXT, "artifact_id": TEXT, "status": TEXT,
                    "output": TEXT, "error_message": TEXT, "metrics": JSONB, "completed_at": BIGINT},
    "audit_logs": {"id": TEXT, "timestamp": BIGINT, "action": TEXT, "entity_type": TEXT, "entity_id": TEXT,
                   "actor": TEXT, "detail": TEXT},
    "runtime_settings": {"key": TEXT, "value": TEXT},
    "users": {"id": TEXT, "username": TEXT, "password": TEXT},
}
# Columns its later versions added (node management); a database from before lacks them.
LATER: dict[str, dict[str, str]] = {"workers": {"agent_version": TEXT, "os_info": TEXT, "install_method": TEXT}}
REPAIRS = ("fix_task_json", "fix_task_attempts", "fix_leases", "fix_workers", "fix_artifacts", "fix_results")


@dataclass
class Adoption:
    """What an adoption found and changed (for the log and the audit entry)."""

    rows: dict[str, int]
    repaired: dict[str, int] = field(default_factory=dict)  # repair → rows it changed
    unaddressable: list[str] = field(default_factory=list)
    entries: list[AuditEntry] = field(default_factory=list)  # for the caller to insert with 0001's record

    def summary(self) -> str:
        rows = ", ".join(f"{n} {table}" for table, n in self.rows.items())
        repaired = ", ".join(f"{name}={n}" for name, n in self.repaired.items() if n) or "nothing"
        return f"adopted the first version's tables ({rows}); repaired: {repaired}"


def first_version_tables(conn: psycopg.Connection[Any]) -> set[str]:
    """Our tables present in a database without ``schema_migrations``: the ones to adopt
    (empty when there is nothing to adopt, or the database is migrated already)."""
    found = {r[0] for r in conn.execute(S["tables_present"], {"tables": [*FIRST_VERSION, "schema_migrations"]})}
    return set() if "schema_migrations" in found else found


def layout_problems(present: set[str], columns: list[tuple[str, str, str]]) -> list[str]:
    """Why tables are not the first version's, or nothing: missing tables, unknown or missing
    columns, other types."""
    problems = [f"table {t} is missing" for t in FIRST_VERSION if t not in present]
    seen: dict[str, dict[str, str]] = {}
    for table, column, data_type in columns:
        seen.setdefault(table, {})[column] = data_type
    for table, have in sorted(seen.items()):
        want = {**FIRST_VERSION[table], **LATER.get(table, {})}
        for column, data_type in sorted(have.items()):
            if column not in want:
                problems.append(f"{table}.{column} is not a column of the first version")
            elif data_type not in ACCEPTED[want[column]]:
                problems.append(f"{table}.{column} is {data_type}, the first version's is {want[column]}")
        problems += [f"{table}.{c} is missing" for c in FIRST_VERSION[table] if c not in have]
    return problems


def adopt(conn: psycopg.Connection[Any], present: set[str], now: int) -> Adoption:
    """Bring the first version's tables to 0001 inside the caller's transaction, which then
    records 0001_initial and inserts ``entries``. Raises ``NotAdoptable`` (roll back: nothing changed)."""
    columns = conn.execute(S["columns"], {"tables": list(FIRST_VERSION)}).fetchall()
    problems = layout_problems(present, columns)
    if not problems:
        values = {"task_statuses": list(TASK_STATUSES), "lease_statuses": list(LEASE_STATUSES),
                  "worker_statuses": list(WORKER_STATUSES)}
        problems = [f"{n} row(s) with {column} {value!r}"
                    for column, value, n in conn.execute(S["unknown_values"], values).fetchall()]
    if problems:
        raise NotAdoptable(
            "the database has tables named as bloom-runtime's but no schema_migrations, and they are not the "
            "first version's tables as bloom-runtime can adopt them: " + "; ".join(problems[:20]) + ". Nothing was changed.",
            problems=problems,
        )
    report = Adoption(rows=dict(conn.execute(S["row_counts"]).fetchall()))
    report.unaddressable = [f"{table} {id_!r}" for table, id_ in conn.execute(S["unaddressable_ids"], {"pattern": ID_PATTERN})]
    conn.execute(S["create_helpers"].encode(), prepare=False)
    entries: list[AuditEntry] = []
    # Leases first: a task whose lease this expires is then recovered with the other orphans.
    unheld = conn.execute(S["expire_unheld_leases"]).fetchall()
    entries += [_entry(now, "lease_expired", "lease", lease_id,
                       f"task={task_id} worker={worker_id}: not held by its task {WHEN}")
                for lease_id, task_id, worker_id in unheld]
    orphans = conn.execute(S["recover_orphaned_tasks"], {"now": now}).fetchall()
    entries += [_entry(now, "task_requeued" if status == "queued" else "task_dead", "task", task_id,
                       f"no active lease {WHEN}, attempts={attempts}/{max_attempts}")
                for task_id, status, attempts, max_attempts in orphans]
    report.repaired = {"leases_not_held": len(unheld), "tasks_without_lease": len(orphans)}
    for name in REPAIRS:
        report.repaired[name.removeprefix("fix_")] = conn.execute(S[name]).rowcount
    conn.execute(S["fix_settings"].encode(), prepare=False)
    conn.execute(S["drop_helpers"].encode(), prepare=False)
    conn.execute(S["layout"].encode(), prepare=False)
    entries.append(_entry(now, "database_adopted", "database", "first-version", report.summary()))
    report.entries = entries
    log.info("%s", report.summary())
    if report.unaddressable:
        log.warning("ids the API's paths cannot address (listed and leased, not reachable by id): %s",
                    ", ".join(report.unaddressable))
    return report


def _entry(now: int, action: str, entity_type: str, entity_id: str, detail: str) -> AuditEntry:
    return AuditEntry(id=new_id(), timestamp=now, action=action, entity_type=entity_type, entity_id=entity_id,
                      actor=ACTOR, detail=detail[:1000])
