"""The PostgreSQL store: psycopg 3, a connection pool, every statement by name.

Several engine processes may share one database, so every transition is a short
transaction of conditional statements under row locks.

Lock order (one operation takes its row locks in this order, never backwards):

    task row  ->  worker rows (ascending id)  ->  lease rows

- Every task transition (acquire_lease, heartbeat, complete, fail_lease, cancel)
  starts with ``lock_task`` (``SELECT ... FOR UPDATE``); its later statements run
  in a fresh READ COMMITTED snapshot taken after the lock, so they see everything
  the previous holder committed. Lease rows are only written by a holder of their
  task's lock, so the lease statements never wait.
- acquire_lease: task -> candidate workers (``lock_workers``, ascending id, so two
  acquirers with overlapping candidate lists cannot cross) -> lease insert.
- heartbeat: task -> lease -> worker (the worker update runs last in its statement).
- claim_next: worker -> tasks with ``FOR UPDATE SKIP LOCKED``. This is the one
  operation that takes a worker before a task, and it is safe because it never
  *waits* for a task lock: an edge worker->task cannot close a cycle.
- expire_due: tasks with ``SKIP LOCKED`` (never waits) -> leases.
- requeue: the task row only. mark_stale_workers_offline and lock_workers lock
  workers in ascending id; set_settings locks settings keys in sorted order.
- Worker capacity is exact because every lease insert for a worker happens under
  that worker's row lock, and the count is taken in a statement after the lock.

The order holds within one operation. A transaction that batches several
operations holds earlier locks while taking later ones, so two processes batching
the same rows in different orders can deadlock; PostgreSQL aborts one, which
surfaces as ``TransientConflict`` (retry the batch).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import select
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import msgspec
import psycopg
import psycopg.errors
from psycopg import pq
from psycopg.abc import RV, PQGen
from psycopg.adapt import Loader
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from bloom_runtime.engine.errors import (
    BloomError,
    ConfigError,
    Conflict,
    InvalidInput,
    NoCapacity,
    NotFound,
    StaleLease,
    StoreFull,
    StoreRefused,
    StoreTimeout,
    StoreUnavailable,
)
from bloom_runtime.engine.models import (
    CANCELLABLE,
    DEFAULT_TIMEOUT_SEC,
    HOLDING_LEASE,
    LEASE_GRACE_S,
    LEASE_STATUSES,
    MAX_ATTEMPTS_LIMIT,
    TASK_STATUSES,
    UNFINISHED_STATUSES,
    WORKER_STATUSES,
    Artifact,
    AuditEntry,
    Capabilities,
    Completion,
    CompletionOutcome,
    Delivery,
    Expiry,
    Fence,
    HistoryPoint,
    Lease,
    LeaseGrant,
    NewTask,
    Page,
    Policy,
    Result,
    Task,
    Worker,
    WorkerUpsert,
    check_leasable,
    new_worker,
    or_default,
)
from bloom_runtime.sql import adopt
from bloom_runtime.sql import cursor as cursors
from bloom_runtime.sql import migrate as migrations
from bloom_runtime.sql.queries import AUDIT_QUERIES, SEARCH_QUERIES, load
from bloom_runtime.sql.store import (
    MAX_PAGE,
    AcquireOp,
    CompleteOp,
    CreateOp,
    HeartbeatOp,
    Op,
    RetryDelay,
    Store,
    Transaction,
    TransientConflict,
    artifact_content,
    history_params,
    history_point,
)

log = logging.getLogger(__name__)

Q: dict[str, str] = load("postgres")

NOTIFY_CHANNEL = "bloom_tasks"
POOL_GETCONN_TIMEOUT_S = 10.0  # how long a write waits for a free pooled connection
READ_POOL_WAIT_S = 2.0  # how long a read waits for one: a busy or hung database answers 503 soon
PING_TIMEOUT_S = 0.5  # /health's ping, pool wait included: /health answers within a second
CHECK_TIMEOUT_S = 1.0  # the pool's check of an idle connection before lending it
IO_GRACE_S = 1.0  # a round trip may take the statement timeout plus this before we give up on it
# TCP keepalives and tcp_user_timeout end a connection whose path to the server is gone
# (packets dropped, nothing acknowledged) even while no statement runs.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 10, 5, 3
MIN_TCP_USER_TIMEOUT_MS = 10_000
APPLICATION_NAME = "bloom-runtime"  # what pg_stat_activity shows for our sessions
# A connection handed back less than this long ago is lent out again unchecked: it
# answered moments ago, and a check is one more round trip on every batch and read.
POOL_CHECK_IDLE_S = 1.0
OPEN_RETRY_INITIAL_S = 0.05  # first pause between connection attempts in open()
OPEN_RETRY_MAX_S = 1.0
POOL_FILL_MIN_S = 0.2  # filling the pool after a successful probe gets at least this
# The pool retries a lost connection with doubling pauses until this long has passed,
# then leaves the slot to the next caller that needs one (which tries at once). Its
# default (5 min) let the pauses grow past a minute: the pool refilled long after
# the database was back.
RECONNECT_TIMEOUT_S = 10.0
# First page of a keyset listing: every real row sorts below this bound.
_FIRST_PAGE = (2**63 - 1, "")
DEFAULT_ARTIFACT_TYPE = "llm_output"

# --- statements sent several to a message ---------------------------------------
#
# A message of several statements cannot carry bound parameters, so these run as
# EXECUTE of statements prepared once per connection, their arguments quoted by psycopg:
# one round trip for the lot, and no re-planning.

_SCRIPT_PARAM_TYPES = {"now": "bigint", "rows": "json", "ids": "text[]", "default_timeout": "integer", "grace": "integer"}
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
        "create_tasks", "lock_tasks", "lock_workers", "grant_leases", "renew_leases", "finish_tasks",
        "insert_audit", "notify_tasks",
    )
}

# --- decoding rows into records -----------------------------------------------
#
# JSONB columns arrive as raw bytes (see _RawJsonbLoader) and are decoded straight
# into their typed field by msgspec: one C call per field, no dict in between.

class _StoredPolicy(msgspec.Struct):
    """What a stored policy holds, without the request-time limits: reads stay lenient
    (rows written by the first version, or before a limit changed, still load)."""

    timeout_sec: int = DEFAULT_TIMEOUT_SEC
    budget: float = 0


class _StoredCapabilities(msgspec.Struct):
    claude_cli: bool = True
    max_concurrency: int = 1
    labels: list[str] = []


_strs = msgspec.json.Decoder(list[str]).decode
_policy_dec = msgspec.json.Decoder(_StoredPolicy).decode
_caps_dec = msgspec.json.Decoder(_StoredCapabilities).decode


def _policy(raw: bytes) -> Policy:
    p = _policy_dec(raw)
    return Policy(timeout_sec=p.timeout_sec, budget=p.budget)


def _caps(raw: bytes) -> Capabilities:
    c = _caps_dec(raw)
    return Capabilities(claude_cli=c.claude_cli, max_concurrency=c.max_concurrency, labels=c.labels)


_obj = msgspec.json.Decoder(dict[str, Any]).decode
_encode = msgspec.json.Encoder().encode


def _json(value: Any) -> str:
    return _encode(value).decode()


class _RawJsonbLoader(Loader):
    """Hand JSONB over as bytes; the record builders decode it with its type."""

    def load(self, data: Any) -> bytes:
        return bytes(data)


def _task(r: Sequence[Any], o: int = 0) -> Task:
    return Task(
        id=r[o],
        context_id=r[o + 1],
        agent_slug=r[o + 2],
        prompt=r[o + 3],
        context_hints=_strs(r[o + 4]),
        policy=_policy(r[o + 5]),
        desired_format=r[o + 6],
        status=r[o + 7],
        created_at=r[o + 8],
        updated_at=r[o + 9],
        lease_id=r[o + 10],
        worker_id=r[o + 11],
        attempts=r[o + 12],
        max_attempts=r[o + 13],
        labels=_strs(r[o + 14]),
        not_before=r[o + 15],
        idempotency_key=r[o + 16],
    )


_TASK_N = 17


def _lease(r: Sequence[Any], o: int = 0) -> Lease:
    return Lease(
        id=r[o],
        task_id=r[o + 1],
        worker_id=r[o + 2],
        started_at=r[o + 3],
        expires_at=r[o + 4],
        ttl_seconds=r[o + 5],
        status=r[o + 6],
        last_heartbeat=r[o + 7],
        context_id=r[o + 8],
    )


_LEASE_N = 9


def _worker(r: Sequence[Any], active: int, o: int = 0) -> Worker:
    return Worker(
        id=r[o],
        node_id=r[o + 1],
        url=or_default(r[o + 2], "url"),
        status=r[o + 3],
        capabilities=_caps(r[o + 4]),
        last_heartbeat=r[o + 5] if r[o + 5] is not None else r[o + 9],
        ip_addrs=_strs(r[o + 6]),
        obs_count=r[o + 7],
        db_sha=or_default(r[o + 8], "db_sha"),
        registered_at=r[o + 9],
        active_leases=active,
        agent_version=or_default(r[o + 10], "agent_version"),
        os_info=or_default(r[o + 11], "os_info"),
        install_method=or_default(r[o + 12], "install_method"),
        source=r[o + 13],
    )


_WORKER_N = 14  # stored columns; the active-lease count follows them


def _worker_columns(w: WorkerUpsert) -> dict[str, Any]:
    """A fully populated upsert (``new_worker``) as column values."""
    return {
        "node_id": w.node_id, "url": w.url, "status": w.status, "capabilities": _json(w.capabilities),
        "last_heartbeat": w.last_heartbeat, "ip_addrs": _json(w.ip_addrs), "obs_count": w.obs_count,
        "db_sha": w.db_sha, "agent_version": w.agent_version, "os_info": w.os_info,
        "install_method": w.install_method, "source": w.source,
    }


def _worker_row(r: Sequence[Any]) -> Worker:
    return _worker(r, r[_WORKER_N])


def _artifact(r: Sequence[Any], o: int = 0) -> Artifact:
    return Artifact(
        id=r[o],
        task_id=r[o + 1],
        job_id=r[o + 2],
        type=r[o + 3],
        created_at=r[o + 4],
        finalized=r[o + 5],
        url=r[o + 6],
        entity_refs=_strs(r[o + 7]),
        tags=_strs(r[o + 8]),
        content=r[o + 9],
    )


_ARTIFACT_N = 10


def _result(r: Sequence[Any], o: int = 0) -> Result:
    return Result(
        id=r[o],
        task_id=r[o + 1],
        worker_id=r[o + 2],
        artifact_id=r[o + 3],
        status=r[o + 4],
        output=r[o + 5],
        error_message=r[o + 6],
        metrics=_obj(r[o + 7]),
        completed_at=r[o + 8],
    )


_RESULT_N = 9


def _delivery(r: Sequence[Any]) -> Delivery:
    return Delivery(id=r[0], task_id=r[1], lease_id=r[2], worker_id=r[3], url=r[4], state=r[5], agent_status=r[6],
                    detail=r[7], actor=r[8], created_at=r[9], deadline_at=r[10], finished_at=r[11])


def _audit(r: Sequence[Any]) -> AuditEntry:
    return AuditEntry(
        id=r[0], timestamp=r[1], action=r[2], entity_type=r[3], entity_id=r[4], actor=r[5], detail=r[6]
    )


# --- errors -------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    """One line saying what went wrong, without SQL text."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    text = primary or str(exc) or type(exc).__name__
    # Connection errors repeat the target before the reason; the caller names it already.
    for prefix in ("connection failed: ",):
        if text.startswith(prefix):
            text = text[len(prefix):]
    if " failed: " in text and text.startswith("connection to server"):
        text = text.split(" failed: ", 1)[1]
    text = text.replace("FATAL:  ", "")
    return " ".join(text.split())


def _translate(exc: BaseException, where: str) -> BloomError:
    """Map a driver error onto our taxonomy (the caller chains the original)."""
    if isinstance(exc, (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)):
        return TransientConflict(f"PostgreSQL rolled the transaction back ({_reason(exc)}); retry it")
    if isinstance(exc, Unanswered):
        return StoreTimeout(f"PostgreSQL at {where} {exc}")
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return StoreTimeout(f"PostgreSQL at {where} cancelled a statement: {_reason(exc)}")
    if isinstance(exc, PoolTimeout):
        return StoreTimeout(f"no PostgreSQL connection available at {where} in time")
    if isinstance(exc, psycopg.errors.DiskFull):
        return StoreFull(f"PostgreSQL at {where} cannot write: {_reason(exc)}")
    if isinstance(exc, (psycopg.DataError, psycopg.IntegrityError)):
        sqlstate = getattr(exc, "sqlstate", None)
        return StoreRefused(f"PostgreSQL at {where} refused a value: {_reason(exc)}" + (f" (sqlstate {sqlstate})" if sqlstate else ""))
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        return StoreUnavailable(f"PostgreSQL at {where} is unavailable: {_reason(exc)}")
    sqlstate = getattr(exc, "sqlstate", None)
    return StoreUnavailable(
        f"PostgreSQL at {where} failed: {_reason(exc)}" + (f" (sqlstate {sqlstate})" if sqlstate else "")
    )


def _translating(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Translate driver errors raised by a store or transaction method."""

    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except psycopg.Error as exc:
            raise _translate(exc, self._where) from exc
        except msgspec.DecodeError as exc:
            raise StoreUnavailable(f"PostgreSQL at {self._where} holds a malformed JSON value: {exc}") from exc

    wrapper.__name__ = fn.__name__
    wrapper.__qualname__ = fn.__qualname__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _check_fence(task: Task, fence: Fence) -> None:
    """The stale-lease rule shared by heartbeat and complete (NotFound checked before)."""
    if task.status not in HOLDING_LEASE:
        if fence.lease_id is not None:
            # A late callback for a lease that has already ended.
            raise StaleLease("lease is no longer active", task_id=task.id, lease_id=fence.lease_id)
        raise Conflict(f"task is {task.status}, it holds no lease", task_id=task.id, status=task.status)
    if fence.lease_id is not None and fence.lease_id != task.lease_id:
        raise StaleLease("lease is not the task's active lease", task_id=task.id, lease_id=fence.lease_id)
    if fence.worker_id is not None and fence.worker_id != task.worker_id:
        raise StaleLease("worker does not hold the task's lease", task_id=task.id, worker_id=fence.worker_id)


def _finish_params(
    task: Task, completion: Completion, result_id: str, artifact_id: str, retry_delay: RetryDelay, now: int
) -> dict[str, Any]:
    """What finishing ``task`` (locked, fence checked) with ``completion`` writes."""
    not_before = None
    if completion.status == "success":
        status = "completed"
    elif completion.retryable and task.attempts < task.max_attempts:
        status = "queued"
        not_before = now + retry_delay(task.attempts)
    else:
        status = "failed"
    keep = status == "completed"  # a completed task keeps who ran it, for the record
    return {
        "task_id": task.id,
        "lease_id": task.lease_id,
        "status": status,
        "not_before": not_before,
        "keep_lease_id": task.lease_id if keep else None,
        "keep_worker_id": task.worker_id if keep else None,
        "artifact_id": artifact_id,
        "artifact_type": completion.artifact_type or DEFAULT_ARTIFACT_TYPE,
        "tags": _json(completion.artifact_tags),
        "content": artifact_content(completion),
        "result_id": result_id,
        "worker_id": task.worker_id,
        "result_status": completion.status,
        "output": completion.output,
        "error_message": completion.error_message,
        "metrics": _json(completion.metrics),
    }


def _fetched(cur: psycopg.Cursor[Any]) -> list[Any]:
    """The rows of the cursor's current result; [] for a statement that returns none."""
    result = cur.pgresult
    return cur.fetchall() if result is not None and result.nfields else []


class _TaskState(NamedTuple):
    """A task row as ``lock_tasks`` returns it: enough to say why an operation was refused."""

    id: str
    status: str
    lease_id: str | None
    worker_id: str | None
    not_before: int | None
    attempts: int
    max_attempts: int


def _refusal(task_id: str, locked: dict[str, _TaskState], check: Callable[[Any], None]) -> BloomError | None:
    """Why a set statement left an operation out: the task is missing or ``check`` refuses
    it. None: it passes the check (the caller names what else went wrong)."""
    task = locked.get(task_id)
    if task is None:
        return NotFound("task not found", task_id=task_id)
    try:
        check(task)
    except BloomError as exc:
        return exc
    return None


# Rows for the set statements, encoded as one JSON array each (see queries/postgres.sql).


def _audit_fields(op: Op) -> dict[str, Any]:
    """Who acted and the ids of the audit entries the statement writes for ``op``
    (none without an actor)."""
    if op.actor is None:
        return {"actor": None}
    ids = op.audit_ids
    return {"actor": op.actor, "audit_id": ids[0], "audit_id2": ids[1] if len(ids) > 1 else None}


def _create_rows(ops: Sequence[CreateOp], now: int) -> dict[str, Any]:
    rows = [
        {
            "id": op.task_id,
            "context_id": op.new.context_id,
            "agent_slug": op.new.agent_slug,
            "prompt": op.new.prompt,
            "context_hints": op.new.context_hints,
            "policy": op.new.policy,
            "desired_format": op.new.desired_format,
            "max_attempts": op.new.max_attempts,
            "labels": op.new.labels,
            "idempotency_key": op.new.idempotency_key,
            **_audit_fields(op),
        }
        for op in ops
    ]
    return {"rows": _json(rows), "now": now}


def _grant_rows(ops: Sequence[AcquireOp], now: int) -> dict[str, Any]:
    rows = [
        {
            "ord": n,
            "task_id": op.task_id,
            "lease_id": op.lease_id,
            "worker_id": op.worker_ids[0],
            "ttl": op.ttl_seconds,
            **_audit_fields(op),
        }
        for n, op in enumerate(ops)
    ]
    return {"rows": _json(rows), "default_timeout": DEFAULT_TIMEOUT_SEC, "grace": LEASE_GRACE_S, "now": now}


def _renew_rows(ops: Sequence[HeartbeatOp], now: int) -> dict[str, Any]:
    rows = [
        {
            "task_id": op.task_id,
            "fence_lease_id": op.fence.lease_id,
            "fence_worker_id": op.fence.worker_id,
            **_audit_fields(op),
        }
        for op in ops
    ]
    return {"rows": _json(rows), "now": now}


def _retry_delays(op: CompleteOp) -> list[int] | None:
    """The wait before a retry after each possible number of attempts, which the
    statement indexes by the task's attempts; None when no retry can follow."""
    c = op.completion
    if c.status == "success" or not c.retryable:
        return None
    return [op.retry_delay(n) for n in range(MAX_ATTEMPTS_LIMIT + 1)]


def _finish_rows(ops: Sequence[CompleteOp], now: int) -> dict[str, Any]:
    rows = [
        {
            "task_id": op.task_id,
            "fence_lease_id": op.fence.lease_id,
            "fence_worker_id": op.fence.worker_id,
            "retryable": op.completion.retryable,
            "delays": _retry_delays(op),
            "artifact_id": op.artifact_id,
            "artifact_type": op.completion.artifact_type or DEFAULT_ARTIFACT_TYPE,
            "tags": op.completion.artifact_tags,
            "content": artifact_content(op.completion),
            "result_id": op.result_id,
            "result_status": op.completion.status,
            "output": op.completion.output,
            "error_message": op.completion.error_message,
            "metrics": op.completion.metrics,
            **_audit_fields(op),
        }
        for op in ops
    ]
    return {"rows": _json(rows), "now": now}


def _completion_size(c: Completion) -> int:
    return 2 * len(c.output or "") + 2 * len(c.error_message or "") + 256


SET_STATEMENT_MAX_BYTES = 4 << 20  # text one set statement carries; prompts and outputs may be 1 MiB each
SCRIPT_MAX_BYTES = 8 << 20  # text one message of several statements carries


def _chunks(items: Iterable[int], size: Callable[[int], int]) -> Iterator[list[int]]:
    """Split ``items`` so the text each chunk carries stays near ``SET_STATEMENT_MAX_BYTES``."""
    chunk: list[int] = []
    total = 0
    for i in items:
        n = size(i)
        if chunk and total + n > SET_STATEMENT_MAX_BYTES:
            yield chunk
            chunk, total = [], 0
        chunk.append(i)
        total += n
    if chunk:
        yield chunk


def _outcome(row: Sequence[Any]) -> CompletionOutcome:
    """A ``finish_task(s)`` row: task, artifact, result, then the released lease (maybe null)."""
    o = _TASK_N + _ARTIFACT_N + _RESULT_N
    return CompletionOutcome(
        task=_task(row),
        artifact=_artifact(row, _TASK_N),
        result=_result(row, _TASK_N + _ARTIFACT_N),
        lease=_lease(row, o) if row[o] is not None else None,
    )


def _check_ttl(ttl_seconds: int) -> None:
    # Checked here: a violated CHECK constraint would abort the whole transaction.
    if ttl_seconds < 1:
        raise InvalidInput("ttl_seconds must be at least 1", ttl_seconds=ttl_seconds)


def _page_args(limit: int, cursor: str | None) -> dict[str, Any]:
    if type(limit) is not int or not 1 <= limit <= MAX_PAGE:
        raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}")
    after_at, after_id = cursors.decode(cursor) if cursor is not None else _FIRST_PAGE
    return {"after_at": after_at, "after_id": after_id, "limit": limit + 1}


def _page(items: list[Any], limit: int, key: Callable[[Any], int]) -> Page:
    if len(items) > limit:
        del items[limit:]
        last = items[-1]
        return Page(items=items, next_cursor=cursors.encode(key(last), last.id))
    return Page(items=items, next_cursor=None)


# --- transactions ---------------------------------------------------------------


# Every statement a write transaction runs finds its rows by key. On a young table
# (empty, or grown since its last ANALYZE) the planner prices a sequential scan as
# cheaper, and a connection's cached generic plan keeps scanning the whole table until
# the next ANALYZE invalidates it: a batch's lock of ten tasks by id came to cost more
# than the rest of its work. Planned with sequential scans off, they always use an index.
BEGIN_STATEMENTS = (b"BEGIN", b"SET LOCAL enable_seqscan = off")
BEGIN = b";\n".join(BEGIN_STATEMENTS)


class PostgresTransaction(Transaction):
    """Operations on one open transaction of one pooled connection."""

    def __init__(self, conn: psycopg.Connection[Any], where: str, prepared: set[str]) -> None:
        self._conn = conn
        self._cur = conn.cursor()
        self._script_cur = psycopg.ClientCursor(conn)
        self._prepared = prepared  # the SCRIPTED statements this connection has prepared
        self._where = where
        # BEGIN goes out with the first statement, and the audit entries, the NOTIFY
        # (when a task became claimable) and COMMIT go out together at the end.
        self._begun = False
        self._audit: list[AuditEntry] = []
        self.notify = False

    def _begin(self) -> None:
        if not self._begun:
            self._cur.execute(BEGIN, prepare=False)  # two statements: simple protocol
            self._begun = True

    def _one(self, name: str, params: dict[str, Any]) -> Any:
        self._begin()
        return self._cur.execute(Q[name], params).fetchone()

    def _all(self, name: str, params: dict[str, Any]) -> list[Any]:
        self._begin()
        return self._cur.execute(Q[name], params).fetchall()

    def _script(
        self, statements: Sequence[tuple[str, dict[str, Any]]], *, begin: bool = True, end: bytes | None = None
    ) -> list[list[Any]]:
        """Run named statements in as few round trips as their size allows (one message
        each up to ``SCRIPT_MAX_BYTES``), BEGIN first if ``begin`` and not yet begun,
        ``end`` last; return the rows of each statement. The statements run as
        EXECUTEs of the prepared ``SCRIPTED`` ones, their arguments quoted by psycopg
        (a message of several statements cannot carry bound parameters)."""
        missing = [name for name, _ in statements if name not in self._prepared]
        if missing and self._begun:
            # A PREPARE inside a transaction would vanish with its rollback: run these one
            # by one this time; the connection prepares them before its next transaction.
            one_by_one = [self._rows(name, params) for name, params in statements]
            if end is not None:
                self._cur.execute(end)
            return one_by_one
        if missing:
            self._script_cur.execute(b";\n".join(SCRIPTED[name].prepare for name in dict.fromkeys(missing)))
            self._prepared.update(missing)
        texts = [self._script_cur.mogrify(SCRIPTED[name].execute, params).encode() for name, params in statements]
        head = [] if self._begun or not begin else list(BEGIN_STATEMENTS)
        tail = [end] if end is not None else []
        messages: list[list[bytes]] = [[]]
        size = 0
        for text in texts:
            if messages[-1] and size + len(text) > SCRIPT_MAX_BYTES:
                messages.append([])
                size = 0
            messages[-1].append(text)
            size += len(text)
        if len(messages) > 1 and not head and not self._begun:
            # Several messages are several implicit transactions: make them one.
            head, tail = list(BEGIN_STATEMENTS), [b"COMMIT"]
        rows: list[list[Any]] = []
        cur = self._script_cur
        for n, message in enumerate(messages):
            parts = (head if n == 0 else []) + message + (tail if n == len(messages) - 1 else [])
            if not parts:
                continue
            try:
                cur.execute(b";\n".join(parts))
            except psycopg.errors.InvalidSqlStatementName:
                # The session lost its prepared statements (DISCARD ALL, a pooler):
                # this transaction fails; the next one on this connection prepares again.
                self._prepared.clear()
                raise
            self._begun = self._begun or bool(head)
            skip = len(head) if n == 0 else 0
            for k in range(len(parts)):
                if k >= skip and k - skip < len(message):
                    rows.append(_fetched(cur))
                cur.nextset()
        return rows

    def _rows(self, name: str, params: dict[str, Any]) -> list[Any]:
        """Run one statement; its rows, or [] when it returns none."""
        self._begin()
        return _fetched(self._cur.execute(Q[name], params))

    def _take_audit(self) -> list[tuple[str, dict[str, Any]]]:
        """The statement inserting the pending audit entries (none if there are none)."""
        if not self._audit:
            return []
        rows, self._audit = _encode(self._audit).decode(), []
        return [("insert_audit", {"rows": rows})]

    def commit(self) -> None:
        """Write the pending audit entries and the NOTIFY, and commit, in one message."""
        statements = self._take_audit()
        if self.notify:
            statements.append(("notify_tasks", {}))
        if not self._begun:
            # Nothing ran yet: one message of statements is a transaction by itself.
            if statements:
                self._script(statements, begin=False)
            return
        self._script(statements, end=b"COMMIT")

    def rollback(self) -> None:
        if self._conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            self._conn.execute(b"ROLLBACK")

    def _lock_task(self, task_id: str) -> Task:
        row = self._one("lock_task", {"id": task_id})
        if row is None:
            raise NotFound("task not found", task_id=task_id)
        return _task(row)

    # --- tasks ---------------------------------------------------------------

    @_translating
    def create_task(self, new: NewTask, task_id: str, now: int) -> tuple[Task, bool]:
        row = self._one(
            "create_task",
            {
                "id": task_id,
                "context_id": new.context_id,
                "agent_slug": new.agent_slug,
                "prompt": new.prompt,
                "context_hints": _json(new.context_hints),
                "policy": _json(new.policy),
                "desired_format": new.desired_format,
                "now": now,
                "max_attempts": new.max_attempts,
                "labels": _json(new.labels),
                "idempotency_key": new.idempotency_key,
            },
        )
        if row is not None:
            self.notify = True
            return _task(row), True
        # The key was used (by a committed task, or by one whose insert we just waited
        # for: this fresh statement sees it), or the id exists.
        if new.idempotency_key is not None:
            row = self._one("get_task_by_idempotency_key", {"key": new.idempotency_key})
            if row is not None:
                return _task(row), False
        raise Conflict("task id already exists", task_id=task_id)

    @_translating
    def acquire_lease(
        self, task_id: str, worker_ids: Sequence[str], ttl_seconds: int | None, lease_id: str, now: int
    ) -> LeaseGrant:
        if ttl_seconds is not None:
            _check_ttl(ttl_seconds)
        task = self._lock_task(task_id)
        check_leasable(task, now)
        if ttl_seconds is None:
            ttl_seconds = task.default_ttl_seconds
        ids = list(worker_ids)
        locked = self._all("lock_workers", {"ids": ids})
        if not locked:
            if len(ids) == 1:
                raise NotFound("worker not found", worker_id=ids[0])
            raise NoCapacity("no worker can take the task", task_id=task_id)
        row = self._one(
            "grant_lease", {"ids": ids, "task_id": task_id, "lease_id": lease_id, "ttl": ttl_seconds, "now": now}
        )
        if row is None:
            raise NoCapacity("no worker has free capacity", task_id=task_id)
        o = _TASK_N + _LEASE_N
        return LeaseGrant(task=_task(row), lease=_lease(row, _TASK_N), worker=_worker(row, row[o + _WORKER_N], o))

    @_translating
    def claim_next(self, worker_id: str, ttl_seconds: int | None, lease_id: str, now: int) -> LeaseGrant | None:
        if ttl_seconds is not None:
            _check_ttl(ttl_seconds)
        wrow = self._one("claim_touch_worker", {"worker_id": worker_id, "now": now})
        if wrow is None:
            raise NotFound("worker not found", worker_id=worker_id)
        row = self._one(
            "claim_task",
            {"worker_id": worker_id, "lease_id": lease_id, "ttl": ttl_seconds, "grace": LEASE_GRACE_S, "now": now},
        )
        if row is None:
            return None
        return LeaseGrant(
            task=_task(row), lease=_lease(row, _TASK_N), worker=_worker(wrow, row[_TASK_N + _LEASE_N])
        )

    @_translating
    def heartbeat(self, task_id: str, fence: Fence, now: int) -> tuple[Task, Lease]:
        # The usual case, an accepted heartbeat, is one statement; a refusal reads the
        # locked task to give the same answer as the two-step path below.
        row = self._one(
            "heartbeat_fenced",
            {"task_id": task_id, "fence_lease_id": fence.lease_id, "fence_worker_id": fence.worker_id, "now": now},
        )
        if row is not None:
            return _task(row), _lease(row, _TASK_N)
        task = self._lock_task(task_id)
        _check_fence(task, fence)
        row = self._one(
            "renew_lease", {"task_id": task_id, "lease_id": task.lease_id, "worker_id": task.worker_id, "now": now}
        )
        if row is None:  # the task names a lease that is not active: nothing was written
            raise Conflict("task's lease is not active", task_id=task_id, lease_id=task.lease_id)
        return _task(row), _lease(row, _TASK_N)

    @_translating
    def complete(
        self,
        task_id: str,
        fence: Fence,
        completion: Completion,
        result_id: str,
        artifact_id: str,
        retry_delay: RetryDelay,
        now: int,
    ) -> CompletionOutcome:
        task = self._lock_task(task_id)
        _check_fence(task, fence)
        params = _finish_params(task, completion, result_id, artifact_id, retry_delay, now)
        row = self._one("finish_task", {**params, "now": now})
        if params["status"] == "queued":
            self.notify = True
        return _outcome(row)

    # --- many at once --------------------------------------------------------

    @_translating
    def apply(self, ops: Sequence[Op], now: int, commit: bool = False) -> list[Any]:
        """A batch's operations in one round trip (see ``Transaction.apply``).

        Each kind goes out as one set statement over JSON rows, after the tasks they
        name are locked together in id order; the order of application is creates,
        acquires, heartbeats, completions. Only the first operation on a task (or the
        first create of an id) joins a set statement; repeats, creates the insert
        skipped (a used idempotency key or id) and acquires offering several workers
        run one by one afterwards, in list order, and see what came before them."""
        out: list[Any] = [None] * len(ops)
        at: Sequence[Any] = ops  # each index list below holds operations of one kind
        creates: list[int] = []
        acquires: list[int] = []
        beats: list[int] = []
        completes: list[int] = []
        later: list[int] = []
        seen: set[str] = set()
        new_ids: set[str] = set()
        for i, op in enumerate(ops):
            if isinstance(op, CreateOp):
                # Created rows are matched to creates by id: a repeated id waits its turn.
                (later if op.task_id in new_ids else creates).append(i)
                new_ids.add(op.task_id)
                continue
            if op.task_id in seen or (isinstance(op, AcquireOp) and len(op.worker_ids) != 1):
                later.append(i)
                continue
            if isinstance(op, AcquireOp) and op.ttl_seconds is not None and op.ttl_seconds < 1:
                out[i] = InvalidInput("ttl_seconds must be at least 1", ttl_seconds=op.ttl_seconds)
                continue
            seen.add(op.task_id)
            {AcquireOp: acquires, HeartbeatOp: beats, CompleteOp: completes}[type(op)].append(i)

        statements: list[tuple[str, dict[str, Any]]] = []
        create_chunks = list(_chunks(creates, lambda i: len(at[i].new.prompt)))
        statements += [("create_tasks", _create_rows([at[i] for i in c], now)) for c in create_chunks]
        if seen:
            statements.append(("lock_tasks", {"ids": sorted(seen)}))
        if acquires:
            statements.append(("lock_workers", {"ids": sorted({at[i].worker_ids[0] for i in acquires})}))
            statements.append(("grant_leases", _grant_rows([at[i] for i in acquires], now)))
        if beats:
            statements.append(("renew_leases", _renew_rows([at[i] for i in beats], now)))
        complete_chunks = list(_chunks(completes, lambda i: _completion_size(at[i].completion)))
        statements += [("finish_tasks", _finish_rows([at[i] for i in c], now)) for c in complete_chunks]
        if statements and (creates or any(at[i].completion.status == "error" for i in completes)):
            statements.append(("notify_tasks", {}))  # a task may have become claimable
        if commit and statements:
            statements += self._take_audit()
        results = iter(self._script(statements, end=b"COMMIT" if commit else None) if statements else [])
        if statements and commit:
            self._begun = False  # committed: later statements open a new transaction
        audited: set[int] = set()

        for chunk in create_chunks:
            made = {r[0]: r for r in next(results)}
            for i in chunk:
                row = made.get(at[i].task_id)
                if row is None:
                    later.append(i)
                else:
                    out[i] = (_task(row), True)
                    audited.add(i)
        locked = {r[0]: _TaskState(*r) for r in next(results)} if seen else {}
        if acquires:
            held_workers = {r[0] for r in next(results)}
            granted = {r[0]: r for r in next(results)}
            o = _TASK_N + _LEASE_N
            for i in acquires:
                op, row = at[i], granted.get(at[i].task_id)
                if row is not None:
                    out[i] = LeaseGrant(task=_task(row), lease=_lease(row, _TASK_N), worker=_worker(row, row[o + _WORKER_N], o))
                    audited.add(i)
                    continue
                out[i] = _refusal(op.task_id, locked, lambda t: check_leasable(t, now))
                if out[i] is None:
                    if op.worker_ids[0] not in held_workers:
                        out[i] = NotFound("worker not found", worker_id=op.worker_ids[0])
                    else:
                        out[i] = NoCapacity("no worker has free capacity", task_id=op.task_id)
        if beats:
            renewed = {r[0]: r for r in next(results)}
            for i in beats:
                op, row = at[i], renewed.get(at[i].task_id)
                if row is not None:
                    out[i] = (_task(row), _lease(row, _TASK_N))
                    audited.add(i)
                else:
                    out[i] = _refusal(op.task_id, locked, functools.partial(_check_fence, fence=op.fence)) or Conflict(
                        "task's lease is not active", task_id=op.task_id
                    )
        for chunk in complete_chunks:
            finished = {r[0]: r for r in next(results)}
            for i in chunk:
                op, row = at[i], finished.get(at[i].task_id)
                if row is not None:
                    out[i] = _outcome(row)
                    audited.add(i)
                else:
                    out[i] = _refusal(op.task_id, locked, functools.partial(_check_fence, fence=op.fence)) or Conflict(
                        "task's lease is not active", task_id=op.task_id
                    )

        self.audited = frozenset(i for i in audited if at[i].actor is not None)
        self.committed = frozenset(range(len(ops))) - set(later) if commit and statements else frozenset()
        for i in sorted(later):
            out[i] = self.answer(at[i], now)
        return out

    @_translating
    def fail_lease(
        self, lease_id: str, reason: str, retry_delay: RetryDelay, now: int, refund: bool = False
    ) -> tuple[Task, Lease]:
        row = self._one("lease_task_id", {"id": lease_id})
        if row is None:
            raise NotFound("lease not found", lease_id=lease_id)
        task = self._lock_task(row[0])
        if task.lease_id != lease_id or task.status not in HOLDING_LEASE:
            raise Conflict("lease is not active", lease_id=lease_id)
        if refund:
            refunded = self._one("refund_attempt", {"id": task.id})  # the task row is locked above
            if refunded is not None:
                task = _task(refunded)
            status, not_before = "queued", now + retry_delay(max(task.attempts, 1))
        elif task.attempts < task.max_attempts:
            status, not_before = "queued", now + retry_delay(task.attempts)
        else:
            status, not_before = "failed", None
        row = self._one(
            "end_lease",
            {
                "task_id": task.id,
                "lease_id": lease_id,
                "lease_status": "failed",
                "status": status,
                "not_before": not_before,
                "now": now,
            },
        )
        if row[_TASK_N] is None:  # pragma: no cover - the task pointed at an inactive lease
            raise StoreUnavailable("task and lease disagree", lease_id=lease_id)
        if status == "queued":
            self.notify = True
        return _task(row), _lease(row, _TASK_N)

    @_translating
    def requeue(self, task_id: str, now: int) -> Task:
        row = self._one("requeue_task", {"id": task_id, "now": now})
        if row is None:
            status = self._one("task_status", {"id": task_id})
            if status is None:
                raise NotFound("task not found", task_id=task_id)
            raise Conflict(
                f"task is {status[0]}, only failed or dead tasks can be requeued", task_id=task_id, status=status[0]
            )
        self.notify = True
        return _task(row)

    @_translating
    def cancel(self, task_id: str, now: int) -> tuple[Task, Lease | None]:
        task = self._lock_task(task_id)
        if task.status not in CANCELLABLE:
            raise Conflict(f"task is {task.status}, it cannot be cancelled", task_id=task_id, status=task.status)
        row = self._one(
            "end_lease",
            {
                "task_id": task_id,
                "lease_id": task.lease_id,
                "lease_status": "released",
                "status": "cancelled",
                "not_before": None,
                "now": now,
            },
        )
        return _task(row), (_lease(row, _TASK_N) if row[_TASK_N] is not None else None)

    @_translating
    def expire_due(self, now: int, limit: int) -> list[Expiry]:
        if limit < 1:
            return []
        rows = self._all("expire_due", {"now": now, "limit": limit})
        out = [Expiry(lease=_lease(r), task=_task(r, _LEASE_N)) for r in rows]
        out.sort(key=lambda e: (e.lease.expires_at, e.lease.id))  # oldest expiry first
        if any(e.task.status == "queued" for e in out):
            self.notify = True
        return out

    # --- workers -------------------------------------------------------------

    @_translating
    def upsert_worker(self, upsert: WorkerUpsert, now: int) -> tuple[Worker, bool]:
        caps = upsert.capabilities
        fresh = new_worker(upsert, now)  # what an insert stores
        row = self._one(
            "upsert_worker",
            {
                "id": upsert.id,
                "node_id": upsert.node_id,
                "url": upsert.url,
                "status": upsert.status,
                "capabilities": _json(caps) if caps is not None else None,
                "last_heartbeat": upsert.last_heartbeat,
                "ip_addrs": _json(upsert.ip_addrs) if upsert.ip_addrs is not None else None,
                "obs_count": upsert.obs_count,
                "db_sha": upsert.db_sha,
                "now": now,
                "agent_version": upsert.agent_version,
                "os_info": upsert.os_info,
                "install_method": upsert.install_method,
                "source": upsert.source,
                **{f"new_{name}": value for name, value in _worker_columns(fresh).items()},
            },
        )
        return _worker_row(row), bool(row[_WORKER_N + 1])

    @_translating
    def lock_worker(self, worker_id: str) -> Worker:
        self._all("lock_workers", {"ids": [worker_id]})
        row = self._one("get_worker", {"id": worker_id})
        if row is None:
            raise NotFound("worker not found", worker_id=worker_id)
        return _worker_row(row)

    @_translating
    def remove_worker(self, worker_id: str) -> Worker:
        row = self._one("delete_worker", {"id": worker_id})
        if row is None:
            raise NotFound("worker not found", worker_id=worker_id)
        return _worker_row(row)

    @_translating
    def touch_worker(self, worker_id: str, now: int) -> None:
        if self._one("touch_worker", {"id": worker_id, "now": now}) is None:
            raise NotFound("worker not found", worker_id=worker_id)

    @_translating
    def mark_stale_workers_offline(self, seen_before: int, now: int, vouched: bool = False) -> list[Worker]:
        rows = self._all("mark_stale_workers_offline", {"seen_before": seen_before, "vouched": vouched})
        return sorted((_worker_row(r) for r in rows), key=lambda w: w.id)

    @_translating
    def worker_liveness(self, worker_id: str, alive: bool, at: int) -> tuple[str, str] | None:
        row = self._one("worker_liveness", {"id": worker_id, "alive": alive, "at": at})
        return (row[0], row[1]) if row is not None else None

    # --- push dispatch -------------------------------------------------------

    @_translating
    def vouch_worker_url(self, worker_id: str, url: str, by: str, now: int) -> None:
        self._rows("vouch_worker_url", {"worker_id": worker_id, "url": url, "by": by, "now": now})

    @_translating
    def forget_worker_url(self, worker_id: str) -> str | None:
        rows = self._rows("forget_worker_url", {"worker_id": worker_id})
        return rows[0][0] if rows else None

    @_translating
    def insert_delivery(self, delivery: Delivery) -> None:
        self._rows("insert_delivery", msgspec.structs.asdict(delivery))

    @_translating
    def finish_delivery(self, delivery_id: str, state: str, agent_status: int | None, detail: str | None, now: int) -> Delivery | None:
        row = self._one("finish_delivery", {"id": delivery_id, "state": state, "agent_status": agent_status,
                                            "detail": detail, "now": now})
        return _delivery(row) if row is not None else None

    @_translating
    def expire_deliveries(self, now: int, detail: str, limit: int) -> list[Delivery]:
        return [_delivery(r) for r in self._all("expire_deliveries", {"now": now, "detail": detail, "limit": limit})]

    # --- audit and settings --------------------------------------------------

    def insert_audit(self, entries: Sequence[AuditEntry]) -> None:
        # Written at commit, in the same message as COMMIT: one round trip fewer.
        self._audit.extend(entries)

    @_translating
    def set_settings(self, values: dict[str, str]) -> None:
        if not values:
            return
        keys = sorted(values)
        self._rows("set_settings", {"keys": keys, "values": [values[k] for k in keys], "now": time.time_ns() // 1_000_000})

    @_translating
    def add_settings_if_absent(self, values: dict[str, str], now: int) -> None:
        if values:
            keys = sorted(values)
            self._rows("add_settings_if_absent", {"keys": keys, "values": [values[k] for k in keys], "now": now})

    @_translating
    def record_history(self, points: Sequence[HistoryPoint], now: int) -> int:
        added = 0
        for p in points:
            added += len(self._rows("record_history", {**history_params(p), "now": now}))
        return added

    @_translating
    def prune_history(self, before: int) -> None:
        self._rows("prune_history", {"before": before})

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested ``conn.transaction()``: an exception undoes only this block."""
        self._begin()
        try:
            with self._conn.transaction():
                yield
        except psycopg.Error as exc:
            raise _translate(exc, self._where) from exc


# --- bounded connections -------------------------------------------------------------


class Unanswered(psycopg.OperationalError):
    """The server did not answer a round trip in time; the connection was closed."""


class BoundedConnection(psycopg.Connection[Any]):
    """A connection on which no wait for the server lasts longer than allowed.

    A server-side ``statement_timeout`` cannot help when the server, or something on
    the way to it, stops answering: the client would wait on its socket for ever.
    ``io_timeout_s`` bounds each round trip; ``deadline`` (``time.monotonic()``)
    bounds the whole of the current use. Past either, the connection is closed (its
    protocol state is unknown, so the pool replaces it) and ``Unanswered`` raised."""

    io_timeout_s: float | None = None
    deadline: float | None = None

    def wait(self, gen: PQGen[RV], interval: float = 0.1, timeout: float | None = None) -> RV:
        bound = self.io_timeout_s
        if self.deadline is not None:
            left = max(self.deadline - time.monotonic(), 0.0)
            bound = left if bound is None else min(bound, left)
        if bound is None:
            return super().wait(gen, interval, timeout)
        started = time.monotonic()
        try:
            return super().wait(gen, interval, bound if timeout is None else min(bound, timeout))
        except psycopg.OperationalError:
            waited = time.monotonic() - started
            if waited < bound or (timeout is not None and timeout <= bound):
                raise  # the server answered with an error, or the caller's own timeout passed
            self.pgconn.finish()
            raise Unanswered(f"did not answer within {bound:.1f} s") from None

    @contextlib.contextmanager
    def bounded(self, *, deadline: float | None = None, io_timeout_s: float | None = None) -> Iterator[None]:
        """Tighten the bounds for a block (``None``: keep the current one)."""
        saved = self.deadline, self.io_timeout_s
        if deadline is not None:
            self.deadline = deadline if self.deadline is None else min(deadline, self.deadline)
        if io_timeout_s is not None:
            self.io_timeout_s = io_timeout_s if self.io_timeout_s is None else min(io_timeout_s, self.io_timeout_s)
        try:
            yield
        finally:
            self.deadline, self.io_timeout_s = saved


def _session_params(params: dict[str, Any], io_timeout_s: float | None) -> dict[str, Any]:
    """libpq parameters every session of ours gets, unless the URL sets them itself."""
    defaults: dict[str, Any] = {
        "application_name": APPLICATION_NAME,
        "keepalives": 1,
        "keepalives_idle": KEEPALIVE_IDLE_S,
        "keepalives_interval": KEEPALIVE_INTERVAL_S,
        "keepalives_count": KEEPALIVE_COUNT,
        "tcp_user_timeout": max(MIN_TCP_USER_TIMEOUT_MS, round((io_timeout_s or 0) * 1000)),
    }
    return {k: v for k, v in defaults.items() if k not in params}


# --- the store ---------------------------------------------------------------------


def _parse_url(url: str) -> tuple[dict[str, Any], str]:
    """Validate a PostgreSQL URL (or libpq ``key=value`` string); return its parameters
    and a password-free label for messages."""
    if "://" in url:
        if url.split("://", 1)[0].lower() not in ("postgresql", "postgres"):
            raise ConfigError("DATABASE_URL for PostgreSQL must start with postgresql:// or postgres://")
    elif "=" not in url:
        raise ConfigError("DATABASE_URL for PostgreSQL must look like postgresql://user@host:port/dbname")
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        raise ConfigError("DATABASE_URL is not a valid PostgreSQL URL") from None
    port = params.get("port")
    if port is not None and not all(p.isdigit() and 0 < int(p) < 65536 for p in str(port).split(",")):
        raise ConfigError("DATABASE_URL has an invalid port")
    host = params.get("host") or params.get("hostaddr") or "localhost"
    where = f"{host}:{port or 5432}/{params.get('dbname') or params.get('user') or ''}"
    return params, where


class PostgresStore(Store):
    """A ``Store`` on PostgreSQL through a psycopg connection pool."""

    kind = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        pool_min: int = 2,
        pool_max: int = 10,
        connect_timeout_s: float = 5.0,
        statement_timeout_s: float | None = 5.0,
    ) -> None:
        if not 1 <= pool_min <= pool_max:
            raise ConfigError("pool sizes must satisfy 1 <= pool_min <= pool_max")
        self._params, self._where = _parse_url(url)
        self._url = url
        self._pool_min = pool_min
        self._pool_max = pool_max
        self._connect_timeout_s = connect_timeout_s
        # libpq counts connect_timeout in whole seconds and treats anything below 2 as 2.
        self._connect_timeout = max(2, round(connect_timeout_s))
        # None or 0: statements are not bounded, by the server or by us.
        self._statement_timeout_s = statement_timeout_s or None
        self._io_timeout_s = self._statement_timeout_s + IO_GRACE_S if self._statement_timeout_s else None
        self._session = _session_params(self._params, self._io_timeout_s)
        self._checkout = threading.local()  # the deadline of the caller now getting a connection
        self._pool: ConnectionPool[BoundedConnection] | None = None
        self._lock = threading.Lock()
        self._returned_at: weakref.WeakKeyDictionary[psycopg.Connection[Any], float] = weakref.WeakKeyDictionary()
        self._prepared: weakref.WeakKeyDictionary[psycopg.Connection[Any], set[str]] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"PostgresStore({self._where})"

    # --- lifecycle -----------------------------------------------------------

    def _configure(self, conn: BoundedConnection) -> None:
        conn.adapters.register_loader("jsonb", _RawJsonbLoader)
        conn.io_timeout_s = self._io_timeout_s
        if self._statement_timeout_s:
            with conn.bounded(io_timeout_s=CHECK_TIMEOUT_S + self._connect_timeout):
                conn.execute(Q["set_statement_timeout"], {"ms": str(round(self._statement_timeout_s * 1000))})

    def _check(self, conn: BoundedConnection) -> None:
        returned = self._returned_at.get(conn)
        if returned is not None and time.monotonic() - returned < POOL_CHECK_IDLE_S:
            return
        # Bounded by the caller's deadline too: /health must not wait out a full check.
        with conn.bounded(deadline=getattr(self._checkout, "deadline", None), io_timeout_s=CHECK_TIMEOUT_S):
            ConnectionPool.check_connection(conn)

    def _probe_once(self, conninfo: bytes, timeout_s: float) -> psycopg.OperationalError | None:
        """One connection attempt that gives up after ``timeout_s``; what went wrong, or None.

        Polled by hand: libpq's own connect_timeout counts whole seconds, at least 2."""
        deadline = time.monotonic() + timeout_s
        pgconn = pq.PGconn.connect_start(conninfo)
        try:
            while True:
                status = pgconn.connect_poll()
                if status == pq.PollingStatus.OK:
                    return None
                if status == pq.PollingStatus.FAILED:
                    return psycopg.OperationalError(pgconn.get_error_message())
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return Unanswered("the server did not answer in time")
                readable = [pgconn.socket] if status == pq.PollingStatus.READING else []
                writable = [] if readable else [pgconn.socket]
                select.select(readable, writable, [], remaining)
        finally:
            pgconn.finish()

    def _probe(self, deadline: float) -> None:
        """Connect directly until ``deadline`` and no later, so a failure can name its reason."""
        conninfo = make_conninfo(self._url, **self._session).encode()
        pause = OPEN_RETRY_INITIAL_S
        while True:
            remaining = deadline - time.monotonic()
            failure = self._probe_once(conninfo, min(self._connect_timeout_s, max(remaining, 0.0)))
            if failure is None:
                return
            reason = _reason(failure)
            permanent = any(
                s in reason for s in ("authentication failed", "does not exist", "no pg_hba.conf entry", "invalid")
            )
            remaining = deadline - time.monotonic()
            if permanent or remaining <= 0:
                raise StoreUnavailable(f"cannot connect to PostgreSQL at {self._where}: {reason}") from failure
            time.sleep(min(pause, remaining))  # backoff between attempts while the server may be starting
            pause = min(pause * 2, OPEN_RETRY_MAX_S)

    def open(self, wait_s: float = 10.0) -> None:
        """Connect and fill the pool; give up with ``StoreUnavailable`` after ``wait_s``."""
        with self._lock:
            if self._pool is not None:
                return
            deadline = time.monotonic() + wait_s
            self._probe(deadline)
            pool: ConnectionPool[BoundedConnection] = ConnectionPool(
                self._url,
                connection_class=BoundedConnection,
                min_size=self._pool_min,
                max_size=self._pool_max,
                open=False,
                check=self._check,
                configure=self._configure,
                # Autocommit: a read is one round trip; writes open `conn.transaction()`.
                kwargs={"connect_timeout": self._connect_timeout, "autocommit": True, **self._session},
                timeout=POOL_GETCONN_TIMEOUT_S,
                reconnect_timeout=RECONNECT_TIMEOUT_S,
                name="bloom-runtime",
            )
            try:
                # The server answered the probe: filling the pool takes moments, unless it
                # stopped answering since, and then the wait must still end on time.
                pool.open(wait=True, timeout=max(deadline - time.monotonic(), POOL_FILL_MIN_S))
            except PoolTimeout as exc:
                pool.close(timeout=0)
                raise StoreUnavailable(f"cannot connect to PostgreSQL at {self._where}: pool did not fill in time") from exc
            self._pool = pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    @contextlib.contextmanager
    def _conn(self, pool_wait_s: float | None = None, deadline: float | None = None) -> Iterator[BoundedConnection]:
        """A pooled connection, waited for up to ``pool_wait_s``; ``deadline`` bounds its whole use."""
        pool = self._pool
        if pool is None:
            raise StoreUnavailable("the PostgreSQL store is not open")
        if deadline is not None and pool_wait_s is not None:
            pool_wait_s = max(min(pool_wait_s, deadline - time.monotonic()), 0.0)
        self._checkout.deadline = deadline  # for _check, which runs inside getconn
        try:
            conn = pool.getconn(timeout=pool_wait_s)
        finally:
            self._checkout.deadline = None
        try:
            with conn, conn.bounded(deadline=deadline):  # as pool.connection(): ends a transaction left open
                yield conn
        finally:
            # Not the pool's reset hook: with one, the pool returns every connection
            # through its worker thread.
            self._returned_at[conn] = time.monotonic()
            pool.putconn(conn)

    @_translating
    def migrate(self) -> list[str]:
        applied: list[str] = []
        with self._conn() as conn:
            # A migration may take long (an index on a large table, adopting the first
            # version's tables), and so may waiting for another process's: neither is
            # bounded, by the server or by us.
            bound, conn.io_timeout_s = conn.io_timeout_s, None
            try:
                while True:
                    # One migration per transaction, each under the advisory lock; a second
                    # migrator waits here and then finds the work done.
                    with conn.transaction():
                        conn.execute(Q["no_statement_timeout"])
                        conn.execute(Q["migrations_lock"])
                        present = adopt.first_version_tables(conn)
                        if present:
                            # The first version's tables: made 0001's, recorded as 0001, in this transaction.
                            now = time.time_ns() // 1_000_000
                            report = adopt.adopt(conn, present, now)
                            conn.execute(Q["create_schema_migrations"])
                            conn.execute(Q["record_migration"], {"version": adopt.ADOPTED_AS, "now": now})
                            conn.execute(Q["insert_audit"], {"rows": _encode(report.entries).decode()})
                            applied.append(f"{adopt.ADOPTED_AS} (adopted from the first version's tables)")
                            continue
                        conn.execute(Q["create_schema_migrations"])
                        done = {r[0] for r in conn.execute(Q["applied_migrations"]).fetchall()}
                        todo = migrations.pending("postgres", done)
                        if not todo:
                            return applied
                        step = todo[0]
                        conn.execute(step.sql.encode(), prepare=False)
                        conn.execute(Q["record_migration"], {"version": step.version, "now": time.time_ns() // 1_000_000})
                    log.info("applied migration %s", step.version)
                    applied.append(step.version)
            finally:
                conn.io_timeout_s = bound

    @_translating
    def check_schema(self) -> None:
        with self._conn() as conn:
            done: set[str] = set()
            exists = conn.execute(Q["schema_migrations_exists"]).fetchone()
            if exists is not None and exists[0]:
                done = {r[0] for r in conn.execute(Q["applied_migrations"]).fetchall()}
        todo = migrations.pending("postgres", done)
        if todo:
            raise StoreUnavailable(
                f"database schema has {len(todo)} pending migration(s); run `bloom-runtime migrate`",
                pending=[m.version for m in todo],
            )

    @_translating
    def ping(self) -> None:
        """``SELECT 1``, answered within ``PING_TIMEOUT_S`` (``StoreTimeout`` otherwise)."""
        with self._conn(pool_wait_s=PING_TIMEOUT_S, deadline=time.monotonic() + PING_TIMEOUT_S) as conn:
            conn.execute(Q["ping"]).fetchone()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[PostgresTransaction]:
        try:
            with self._conn() as conn:
                prepared = self._prepared.get(conn)
                if prepared is None:
                    prepared = self._prepared[conn] = set()
                tx = PostgresTransaction(conn, self._where, prepared)
                try:
                    yield tx
                    tx.commit()
                except BaseException:
                    with contextlib.suppress(psycopg.Error):
                        tx.rollback()
                    raise
        except psycopg.Error as exc:
            raise _translate(exc, self._where) from exc

    def listen(self, callback: Callable[[], None], stop_event: threading.Event) -> None:
        """Call ``callback()`` on every ``bloom_tasks`` notification until ``stop_event`` is set.

        Blocks: run it on a thread of its own. See ``TaskListener``."""
        TaskListener(self._url, callback, connect_timeout_s=self._connect_timeout, session=self._session).run(stop_event)

    # --- reads ---------------------------------------------------------------

    def _read(self, name: str, params: dict[str, Any], fetch: Callable[[psycopg.Cursor[Any]], Any]) -> Any:
        for attempt in range(2):
            with self._conn(pool_wait_s=READ_POOL_WAIT_S) as conn:
                try:
                    return fetch(conn.execute(Q[name], params))
                except Unanswered:
                    raise  # repeated, it would only double the wait
                except psycopg.OperationalError:
                    # A connection whose session the server ended (a restart, pg_terminate_backend)
                    # is found out only when used, and its idle neighbours are likely gone too:
                    # have the pool test them, and repeat the read (always safe) once.
                    if attempt or not conn.closed:
                        raise
            if self._pool is not None:
                self._pool.check()
        raise AssertionError("unreachable")

    def _read_one(self, name: str, params: dict[str, Any]) -> Any:
        return self._read(name, params, lambda cur: cur.fetchone())

    def _read_all(self, name: str, params: dict[str, Any]) -> list[Any]:
        return self._read(name, params, lambda cur: cur.fetchall())

    @_translating
    def get_task(self, task_id: str) -> Task:
        row = self._read_one("get_task", {"id": task_id})
        if row is None:
            raise NotFound("task not found", task_id=task_id)
        return _task(row)

    @_translating
    def get_task_by_idempotency_key(self, key: str) -> Task | None:
        row = self._read_one("get_task_by_idempotency_key", {"key": key})
        return _task(row) if row is not None else None

    @_translating
    def list_tasks(self, status: str | None, limit: int, cursor: str | None) -> Page:
        args = _page_args(limit, cursor)
        if status is None:
            rows = self._read_all("list_tasks", args)
        else:
            rows = self._read_all("list_tasks_by_status", {**args, "status": status})
        return _page([_task(r) for r in rows], limit, lambda t: t.created_at)

    @_translating
    def get_lease(self, lease_id: str) -> Lease:
        row = self._read_one("get_lease", {"id": lease_id})
        if row is None:
            raise NotFound("lease not found", lease_id=lease_id)
        return _lease(row)

    @_translating
    def list_leases(self, status: str | None, limit: int, cursor: str | None) -> Page:
        args = _page_args(limit, cursor)
        if status is None:
            rows = self._read_all("list_leases", args)
        else:
            rows = self._read_all("list_leases_by_status", {**args, "status": status})
        return _page([_lease(r) for r in rows], limit, lambda lease: lease.started_at)

    @_translating
    def get_worker(self, worker_id: str) -> Worker:
        row = self._read_one("get_worker", {"id": worker_id})
        if row is None:
            raise NotFound("worker not found", worker_id=worker_id)
        return _worker_row(row)

    @_translating
    def list_workers(self, status: str | None = None) -> list[Worker]:
        if status is None:
            rows = self._read_all("list_workers", {})
        else:
            rows = self._read_all("list_workers_by_status", {"status": status})
        return [_worker_row(r) for r in rows]

    @_translating
    def worker_leases(self, worker_id: str) -> list[Lease]:
        return [_lease(r) for r in self._read_all("worker_leases", {"worker_id": worker_id, "limit": MAX_PAGE})]

    @_translating
    def worker_candidates(self, labels: Sequence[str]) -> list[Worker]:
        rows = self._read_all("worker_candidates", {"labels": _json(list(labels))})
        return [_worker_row(r) for r in rows]

    @_translating
    def active_lease_owners(self) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in self._read_all("active_lease_owners", {})]

    @_translating
    def sticky_workers(self, context_id: str) -> set[str]:
        return {r[0] for r in self._read_all("sticky_workers", {"context_id": context_id})}

    @_translating
    def list_artifacts(self, task_id: str | None, limit: int, cursor: str | None) -> Page:
        args = _page_args(limit, cursor)
        if task_id is None:
            rows = self._read_all("list_artifacts", args)
        else:
            rows = self._read_all("list_artifacts_by_task", {**args, "task_id": task_id})
        return _page([_artifact(r) for r in rows], limit, lambda a: a.created_at)

    @_translating
    def list_results(self, task_id: str | None, limit: int, cursor: str | None) -> Page:
        args = _page_args(limit, cursor)
        if task_id is None:
            rows = self._read_all("list_results", args)
        else:
            rows = self._read_all("list_results_by_task", {**args, "task_id": task_id})
        return _page([_result(r) for r in rows], limit, lambda r: r.completed_at)

    @_translating
    def get_result(self, task_id: str) -> Result:
        row = self._read_one("latest_result", {"task_id": task_id})
        if row is None:
            raise NotFound("no result for task", task_id=task_id)
        return _result(row)

    @_translating
    def list_audit(self, limit: int, cursor: str | None, entity_id: str | None = None, action: str | None = None) -> Page:
        args = {**_page_args(limit, cursor), "entity_id": entity_id, "action": action}
        rows = self._read_all(AUDIT_QUERIES[entity_id is not None, action is not None], args)
        return _page([_audit(r) for r in rows], limit, lambda e: e.timestamp)

    @_translating
    def get_settings(self) -> dict[str, str]:
        return dict(self._read_all("get_settings", {}))

    @_translating
    def due_tasks(self, now: int, limit: int) -> list[Task]:
        return [_task(r) for r in self._read_all("due_tasks", {"now": now, "limit": limit})]

    @_translating
    def latest_delivery(self, task_id: str) -> Delivery | None:
        row = self._read_one("latest_delivery", {"task_id": task_id})
        return _delivery(row) if row is not None else None

    @_translating
    def worker_trust(self) -> dict[str, str]:
        return dict(self._read_all("worker_trust", {}))

    @_translating
    def stats(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {
            "tasks": dict.fromkeys(TASK_STATUSES, 0),
            "leases": dict.fromkeys(LEASE_STATUSES, 0),
            "workers": dict.fromkeys(WORKER_STATUSES, 0),
        }
        for kind, status, count in self._read_all("stats", {}):
            out[kind][status] = count
        return out

    # --- the read side of operators' tools -----------------------------------

    @_translating
    def search_tasks(self, field: str, value: str, statuses: Sequence[str], limit: int, cursor: str | None) -> Page:
        args = {**_page_args(limit, cursor), "value": value, "statuses": list(statuses)}
        rows = self._read_all(SEARCH_QUERIES[field], args)
        return _page([_task(r) for r in rows], limit, lambda t: t.created_at)

    @_translating
    def list_task_leases(self, task_ids: Sequence[str], status: str | None, limit: int, cursor: str | None) -> Page:
        args = {**_page_args(limit, cursor), "task_ids": list(task_ids), "status": status}
        rows = self._read_all("leases_of_tasks", args)
        return _page([_lease(r) for r in rows], limit, lambda lease: lease.started_at)

    @_translating
    def list_expired_leases(self, limit: int, cursor: str | None) -> Page:
        rows = self._read_all("list_expired_leases", _page_args(limit, cursor))
        return _page([_lease(r) for r in rows], limit, lambda lease: lease.expires_at)

    @_translating
    def live_depth(self) -> dict[str, int]:
        return {**dict.fromkeys(UNFINISHED_STATUSES, 0), **dict(self._read_all("live_depth", {}))}

    @_translating
    def oldest_queued(self) -> tuple[str, int] | None:
        row = self._read_one("oldest_queued", {})
        return (row[0], row[1]) if row is not None else None

    @_translating
    def activity(self, since: int, until: int) -> dict[int, dict[str, int]]:
        out: dict[int, dict[str, int]] = {}
        for kind, minute, count in self._read_all("activity", {"since": since, "until": until}):
            out.setdefault(minute, {})[kind] = count
        return out

    @_translating
    def last_history_minute(self) -> int | None:
        row = self._read_one("last_history_minute", {})
        return row[0] if row is not None else None

    @_translating
    def history(self, since: int, until: int) -> list[HistoryPoint]:
        rows = self._read_all("history", {"since": since, "until": until})
        return [history_point(r) for r in rows]


# --- cross-process wake-ups -----------------------------------------------------------


class ListenBackoff:
    """Reconnect delays of the listener: doubling from ``initial_s`` up to ``max_s``.

    Tests shrink the constants instead of sleeping."""

    initial_s = 0.1
    max_s = 5.0

    def __init__(self) -> None:
        self._next = self.initial_s

    def reset(self) -> None:
        self._next = self.initial_s

    def next_s(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.max_s)
        return delay


class TaskListener:
    """Hold a dedicated autocommit connection doing ``LISTEN bloom_tasks``; call
    ``callback()`` on each notification (any process queued a task).

    After every (re)connect it calls ``callback()`` once as well, since
    notifications sent while disconnected are lost."""

    POLL_S = 0.2  # how often the loop looks at the stop event while idle

    def __init__(
        self,
        url: str,
        callback: Callable[[], None],
        *,
        connect_timeout_s: int = 5,
        backoff: ListenBackoff | None = None,
        session: dict[str, Any] | None = None,
    ) -> None:
        params, self._where = _parse_url(url)
        self._session = session if session is not None else _session_params(params, None)
        self._url = url
        self._callback = callback
        self._connect_timeout = max(2, int(connect_timeout_s))
        self._backoff = backoff or ListenBackoff()
        self.connected = threading.Event()  # set while LISTEN is active (tests wait on it)

    def _fire(self) -> None:
        try:
            self._callback()
        except Exception:  # a faulty callback must not stop the wake-ups
            log.exception("task listener callback failed")

    def run(self, stop_event: threading.Event) -> None:
        """Listen until ``stop_event`` is set; reconnect with backoff on errors."""
        while not stop_event.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True, connect_timeout=self._connect_timeout, **self._session) as conn:
                    conn.execute(Q["listen_tasks"])
                    self._backoff.reset()
                    self._fire()
                    self.connected.set()
                    while not stop_event.is_set():
                        for _ in conn.notifies(timeout=self.POLL_S):
                            self._fire()
                            if stop_event.is_set():
                                break
            except psycopg.Error as exc:
                self.connected.clear()
                delay = self._backoff.next_s()
                log.warning("task listener lost PostgreSQL at %s (%s); retrying in %.1f s", self._where, _reason(exc), delay)
                stop_event.wait(delay)
            finally:
                self.connected.clear()
