"""PostgreSQL statements by name, and the messages a write transaction sends them in.

A batch's statements travel several to a message, one round trip for the lot: a
message of several statements cannot carry bound parameters, so they run as
EXECUTE of statements each connection prepares once, their arguments quoted by
psycopg. What a failed message proves (committed or not) is worked out here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import psycopg
import psycopg.errors

from bloom_runtime.engine.errors import OutcomeUnknown
from bloom_runtime.sql.pg_errors import reason
from bloom_runtime.sql.queries import load

Q: dict[str, str] = load("postgres")

_SCRIPT_PARAM_TYPES = {
    "now": "bigint", "rows": "json", "ids": "text[]", "leases": "text[]", "keys": "text[]",
    "default_timeout": "integer", "grace": "integer", "worker_id": "text", "want": "integer",
    "ttl": "integer", "lease_ids": "jsonb", "audit_ids": "jsonb", "actor": "text", "limit": "integer",
    "id": "text", "task_id": "text", "key": "text", "context_id": "text", "status": "text", "labels": "jsonb",
}
_PARAM = re.compile(r"%\((\w+)\)s")


class _Scripted(NamedTuple):
    prepare: bytes  # PREPARE bloom_<name> (types) AS <statement with $n>
    execute: str  # EXECUTE bloom_<name>(%(param)s, ...), for client-side binding


def _scripted(name: str) -> _Scripted:
    order: list[str] = []

    def positional(m: re.Match[str]) -> str:
        if m.group(1) not in order:
            order.append(m.group(1))
        return f"${order.index(m.group(1)) + 1}"

    body = _PARAM.sub(positional, Q[name])
    types = ", ".join(_SCRIPT_PARAM_TYPES[p] for p in order)
    server = f"bloom_{name}"
    prepare = f"PREPARE {server}" + (f" ({types})" if order else "") + f" AS {body}"
    execute = f"EXECUTE {server}" + ("(" + ", ".join(f"%({p})s" for p in order) + ")" if order else "")
    return _Scripted(prepare.encode(), execute)


SCRIPTED = {
    name: _scripted(name)
    for name in (
        "lock_tasks", "lock_workers", "create_tasks", "tasks_by_keys", "grant_leases", "claim_tasks",
        "fenced_writes", "cancel_tasks", "requeue_tasks", "fail_leases", "expire_leases", "insert_audit",
        "notify_tasks",
    )
}

# The reads the write path and the workers' calls make on every operation, prepared as
# the writes are: parsing and planning one cost the server more than running it. Each
# finds its rows by key or reads the small workers table.
PREPARED_READS = frozenset({
    "get_task", "get_lease", "get_worker", "latest_result", "latest_delivery", "get_task_by_idempotency_key",
    "due_tasks", "sticky_workers", "worker_candidates", "list_workers", "list_workers_by_status", "worker_trust",
    "worker_leases",
})
SCRIPTED.update({name: _scripted(name) for name in PREPARED_READS})

# Every statement a write transaction runs finds its rows by key. On a young table
# (empty, or grown since its last ANALYZE) the planner prices a sequential scan as
# cheaper, and a connection's cached generic plan keeps scanning the whole table until
# the next ANALYZE invalidates it: a batch's lock of ten tasks by id came to cost more
# than the rest of its work. Planned with sequential scans off, they always use an index.
# Bitmap scans off as well: with statistics that still say the queue is nearly empty, a
# claim read every queued task through a bitmap scan and sorted them all to take the
# oldest one (16 ms with 5 000 queued), instead of walking the queue index in order.
# Generic plans always: with these scans off every statement's plan is the same index
# walk whatever its arguments, and a custom plan cost a lock of tasks by id more to plan
# (0.2-0.3 ms, on every batch) than to run.
BEGIN_STATEMENTS = (b"BEGIN", b"SET LOCAL enable_seqscan = off", b"SET LOCAL enable_bitmapscan = off",
                    b"SET LOCAL plan_cache_mode = force_generic_plan")
BEGIN = b";\n".join(BEGIN_STATEMENTS)

# A prepared read on an autocommit connection runs after BEGIN: the scan settings above
# hold for it too. Its rows are the result after BEGIN's.
READ_SKIP = len(BEGIN_STATEMENTS)

SCRIPT_MAX_BYTES = 8 << 20  # text one message of several statements carries

_OK_STATUSES = frozenset({psycopg.pq.ExecStatus.COMMAND_OK, psycopg.pq.ExecStatus.TUPLES_OK})


class _ScriptCursor(psycopg.ClientCursor[Any]):
    """A client-side cursor that remembers, for its last message of several statements,
    how many completed before the one that failed (None: the driver failed before any
    answer was read). Statements run in order and the server stops at the first error,
    so an error answered for a statement before COMMIT proves COMMIT never ran."""

    failed_at: int | None = None

    def _check_results(self, results: list[Any]) -> None:
        self.failed_at = next((i for i, r in enumerate(results) if r.status not in _OK_STATUSES), None)
        super()._check_results(results)


def fetched(cur: psycopg.Cursor[Any]) -> list[Any]:
    """The rows of the cursor's current result; [] for a statement that returns none."""
    result = cur.pgresult
    return cur.fetchall() if result is not None and result.nfields else []


class Messages:
    """The statements of one transaction on one pooled connection: BEGIN goes out with
    the first of them, and the last message may carry COMMIT."""

    def __init__(self, conn: psycopg.Connection[Any], where: str, prepared: set[str]) -> None:
        self.conn = conn
        self.cur = conn.cursor()
        self._script_cur = _ScriptCursor(conn)
        self._prepared = prepared  # the SCRIPTED statements this connection has prepared
        self.where = where
        self.begun = False

    def begin(self) -> None:
        if not self.begun:
            self.cur.execute(BEGIN, prepare=False)  # two statements: simple protocol
            self.begun = True

    def fetch_one(self, name: str, params: dict[str, Any]) -> Any:
        self.begin()
        return self.cur.execute(Q[name], params).fetchone()

    def fetch_all(self, name: str, params: dict[str, Any]) -> list[Any]:
        self.begin()
        return fetched(self.cur.execute(Q[name], params))

    def send(
        self, statements: Sequence[tuple[str, dict[str, Any]]], *, begin: bool = True, end: bytes | None = None
    ) -> list[list[Any]]:
        """Run named statements in as few round trips as their size allows (one message
        each up to ``SCRIPT_MAX_BYTES``), BEGIN first if ``begin`` and not yet begun,
        ``end`` last; return the rows of each statement. The statements run as
        EXECUTEs of the prepared ``SCRIPTED`` ones, their arguments quoted by psycopg
        (a message of several statements cannot carry bound parameters)."""
        missing = [name for name, _ in statements if name not in self._prepared]
        if missing:
            # A prepared statement belongs to the session: a rollback does not undo it.
            self._script_cur.execute(b";\n".join(SCRIPTED[name].prepare for name in dict.fromkeys(missing)))
            self._prepared.update(missing)
        texts = [self._script_cur.mogrify(SCRIPTED[name].execute, params).encode() for name, params in statements]
        head = [] if self.begun or not begin else list(BEGIN_STATEMENTS)
        tail = [end] if end is not None else []
        messages: list[list[bytes]] = [[]]
        size = 0
        for text in texts:
            if messages[-1] and size + len(text) > SCRIPT_MAX_BYTES:
                messages.append([])
                size = 0
            messages[-1].append(text)
            size += len(text)
        if len(messages) > 1 and not head and not self.begun:
            # Several messages are several implicit transactions: make them one.
            head, tail = list(BEGIN_STATEMENTS), [b"COMMIT"]
        rows: list[list[Any]] = []
        cur = self._script_cur
        for n, message in enumerate(messages):
            parts = (head if n == 0 else []) + message + (tail if n == len(messages) - 1 else [])
            if not parts:
                continue
            # Where this message commits, if it does: at its COMMIT, or after its last
            # statement when it is a transaction by itself (no BEGIN before or in it).
            commit_at = None
            if n == len(messages) - 1 and tail:
                commit_at = len(parts) - 1
            elif not self.begun and not head:
                commit_at = len(parts)
            cur.failed_at = None
            try:
                cur.execute(b";\n".join(parts))
            except psycopg.Error as exc:
                if isinstance(exc, psycopg.errors.InvalidSqlStatementName):
                    # The session lost its prepared statements (DISCARD ALL, a pooler):
                    # prepare them again on its next transaction.
                    self._prepared.clear()
                if commit_at is not None and not self._refused_before_commit(exc, cur.failed_at, commit_at):
                    raise OutcomeUnknown(
                        f"the connection to PostgreSQL at {self.where} failed while a commit was in flight "
                        f"({reason(exc)}); whether it was applied is unknown"
                    ) from exc
                raise
            self.begun = self.begun or bool(head)
            skip = len(head) if n == 0 else 0
            for k in range(len(parts)):
                if k >= skip and k - skip < len(message):
                    rows.append(fetched(cur))
                cur.nextset()
        return rows

    def _refused_before_commit(self, exc: psycopg.Error, failed_at: int | None, commit_at: int) -> bool:
        """Whether the server's own answer proves a failed message did not commit: it
        reported an error (a SQLSTATE, not a lost connection) for a statement before
        the commit, or for the COMMIT itself on a session that lives on."""
        if getattr(exc, "sqlstate", None) is None or failed_at is None:
            return False
        return failed_at < commit_at or not self.conn.broken


def read_prepared(conn: psycopg.Connection[Any], prepared: set[str], name: str, params: dict[str, Any]) -> psycopg.Cursor[Any]:
    """Run one of ``PREPARED_READS`` in a message of its own; the cursor is left on its rows.

    ``prepared`` is the connection's set of prepared statements (see ``Messages``); a
    session that lost them (``InvalidSqlStatementName``) prepares them again next time."""
    cur = psycopg.ClientCursor(conn)
    statement = SCRIPTED[name]
    try:
        if name not in prepared:
            cur.execute(statement.prepare)
            prepared.add(name)
        cur.execute(BEGIN + b";\n" + cur.mogrify(statement.execute, params).encode() + b";\nCOMMIT")
    except psycopg.errors.InvalidSqlStatementName:
        prepared.clear()
        raise
    for _ in range(READ_SKIP):
        cur.nextset()
    return cur
