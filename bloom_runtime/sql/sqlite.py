"""The embedded store: one SQLite file in WAL mode, standard library ``sqlite3`` only.

One writer, many readers. Every write transaction runs on a single connection
guarded by a lock and opened with ``BEGIN IMMEDIATE``, so transactions of this
process are serialised and those of another process wait in ``busy_timeout``.
Reads run on per-thread connections; in WAL mode they see the last commit and
never wait for the writer.

Every statement is a named query in ``queries/sqlite.sql``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import msgspec

from bloom_runtime.engine.errors import (
    BloomError,
    InvalidInput,
    NotFound,
    OutcomeUnknown,
    StoreFull,
    StoreRefused,
    StoreUnavailable,
)
from bloom_runtime.engine.models import (
    LEASE_STATUSES,
    TASK_STATUSES,
    UNFINISHED_STATUSES,
    WORKER_STATUSES,
    Artifact,
    AuditEntry,
    CompletionOutcome,
    Delivery,
    Expiry,
    HistoryPoint,
    Lease,
    LeaseGrant,
    Page,
    Result,
    Task,
    Worker,
    WorkerUpsert,
    new_worker,
    or_default,
)
from bloom_runtime.sql import audit_trail, queries, refusals, stored_json
from bloom_runtime.sql import cursor as cursors
from bloom_runtime.sql import migrate as migrations
from bloom_runtime.sql.queries import AUDIT_QUERIES, SEARCH_QUERIES
from bloom_runtime.sql.store import (
    MAX_PAGE,
    AcquireOp,
    CancelOp,
    ClaimOp,
    CompleteOp,
    CreateOp,
    ExpireOp,
    FailOp,
    HeartbeatOp,
    Op,
    RequeueOp,
    Store,
    Transaction,
    TransientConflict,
    artifact_content,
    history_params,
    history_point,
)

Q = queries.load("sqlite")

BUSY_TIMEOUT_S = 5.0  # how long a write waits for another process's write lock
DEFAULT_ARTIFACT_TYPE = "llm_output"  # when a completion names none
_NO_CURSOR_TS = 2**63 - 1  # keyset start when no cursor: after every row
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_FULL = 13  # the disk (or max_page_count) has no room left

if sqlite3.sqlite_version_info < (3, 35, 0):  # pragma: no cover - depends on the platform
    raise ImportError(f"bloom-runtime needs SQLite >= 3.35 (RETURNING); this Python has {sqlite3.sqlite_version}")

# --- row decoding ------------------------------------------------------------

_str_list = stored_json.strings
_dict = stored_json.json_object
_encode = stored_json.encode
_policy = stored_json.policy
_capabilities = stored_json.capabilities


_json = stored_json.to_json


def _task(r: Sequence[Any]) -> Task:
    return Task(
        id=r[0],
        context_id=r[1],
        agent_slug=r[2],
        prompt=r[3],
        context_hints=_str_list(r[4]),
        policy=_policy(r[5]),
        desired_format=r[6],
        status=r[7],
        created_at=r[8],
        updated_at=r[9],
        lease_id=r[10],
        worker_id=r[11],
        attempts=r[12],
        max_attempts=r[13],
        labels=_str_list(r[14]),
        not_before=r[15],
        idempotency_key=r[16],
    )


def _lease(r: Sequence[Any]) -> Lease:
    return Lease(
        id=r[0],
        task_id=r[1],
        worker_id=r[2],
        started_at=r[3],
        expires_at=r[4],
        ttl_seconds=r[5],
        status=r[6],
        last_heartbeat=r[7],
        context_id=r[8],
    )


def _worker(r: Sequence[Any]) -> Worker:
    return Worker(
        id=r[0],
        node_id=r[1],
        url=or_default(r[2], "url"),
        status=r[3],
        capabilities=_capabilities(r[4]),
        last_heartbeat=r[5] if r[5] is not None else r[9],
        ip_addrs=_str_list(r[6]),
        obs_count=r[7],
        db_sha=or_default(r[8], "db_sha"),
        registered_at=r[9],
        active_leases=r[10],
        agent_version=or_default(r[11], "agent_version"),
        os_info=or_default(r[12], "os_info"),
        install_method=or_default(r[13], "install_method"),
        source=r[14],
    )


def _artifact(r: Sequence[Any]) -> Artifact:
    return Artifact(
        id=r[0],
        task_id=r[1],
        job_id=r[2],
        type=r[3],
        created_at=r[4],
        finalized=bool(r[5]),
        url=r[6],
        entity_refs=_str_list(r[7]),
        tags=_str_list(r[8]),
        content=r[9],
    )


def _result(r: Sequence[Any]) -> Result:
    return Result(
        id=r[0],
        task_id=r[1],
        worker_id=r[2],
        artifact_id=r[3],
        status=r[4],
        output=r[5],
        error_message=r[6],
        metrics=_dict(r[7]),
        completed_at=r[8],
    )


def _delivery(r: Sequence[Any]) -> Delivery:
    return Delivery(id=r[0], task_id=r[1], lease_id=r[2], worker_id=r[3], url=r[4], state=r[5], agent_status=r[6],
                    detail=r[7], actor=r[8], created_at=r[9], deadline_at=r[10], finished_at=r[11])


def _audit(r: Sequence[Any]) -> AuditEntry:
    return AuditEntry(id=r[0], timestamp=r[1], action=r[2], entity_type=r[3], entity_id=r[4], actor=r[5], detail=r[6])


# --- errors ------------------------------------------------------------------


def _translate(exc: sqlite3.Error) -> StoreUnavailable:
    """Our error for a driver error: busy/locked is retryable, a full disk says so, anything else is an outage."""
    code = getattr(exc, "sqlite_errorcode", None)
    if (code is not None and (code & 0xFF) in (_SQLITE_BUSY, _SQLITE_LOCKED)) or "database is locked" in str(exc):
        return TransientConflict(f"SQLite database is locked: {exc}")
    if code is not None and (code & 0xFF) == _SQLITE_FULL:
        return StoreFull(f"SQLite cannot write: {exc}")
    if isinstance(exc, (sqlite3.DataError, sqlite3.IntegrityError)):
        return StoreRefused(f"SQLite refused a value: {exc}")
    return StoreUnavailable(f"SQLite error: {exc}")


def _run(conn: sqlite3.Connection, name: str, params: dict[str, Any] | None = None) -> list[Any]:
    """Execute a named query and fetch every row (stepping RETURNING statements to completion)."""
    try:
        return conn.execute(Q[name], params or {}).fetchall()
    except sqlite3.Error as exc:
        raise _translate(exc) from exc


def _one(conn: sqlite3.Connection, name: str, params: dict[str, Any] | None = None) -> Any | None:
    rows = _run(conn, name, params)
    return rows[0] if rows else None


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}", limit=limit)


def _after(cursor: str | None) -> dict[str, Any]:
    if cursor is None:
        return {"after_ts": _NO_CURSOR_TS, "after_id": ""}
    ts, row_id = cursors.decode(cursor)
    return {"after_ts": ts, "after_id": row_id}


_F = TypeVar("_F", bound=Callable[..., Any])


def _atomic(method: _F) -> _F:
    """Run a write operation inside a savepoint so that any error leaves nothing it wrote."""

    @functools.wraps(method)
    def wrapper(self: SqliteTransaction, *args: Any, **kwargs: Any) -> Any:
        with self.savepoint():
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


# --- the transaction ---------------------------------------------------------


class SqliteTransaction(Transaction):
    """A ``BEGIN IMMEDIATE`` transaction on the store's write connection (lock held)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._open = True

    def _q(self, name: str, params: dict[str, Any] | None = None) -> list[Any]:
        if not self._open:
            raise StoreUnavailable("transaction is finished")
        return _run(self._conn, name, params)

    def _q1(self, name: str, params: dict[str, Any] | None = None) -> Any | None:
        rows = self._q(name, params)
        return rows[0] if rows else None

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        """Isolate one operation: on an exception, undo only what it wrote."""
        self._q("savepoint")
        try:
            yield
        except BaseException:
            # A failed rollback must not mask the error that caused it.
            with contextlib.suppress(StoreUnavailable):
                self._q("rollback_to_savepoint")
                self._q("release_savepoint")
            raise
        self._q("release_savepoint")

    def _worker_by_id(self, worker_id: str) -> Worker | None:
        row = self._q1("worker_by_id", {"id": worker_id})
        return _worker(row) if row else None

    # --- the state changes -------------------------------------------------------

    def apply(self, ops: Sequence[Op], now: int, commit: bool = False) -> list[Any]:
        """Each operation in list order, in a savepoint of its own: a refusal or a failure
        undoes only what it wrote. Operations naming an actor get their audit entries
        in the same transaction. (It commits when the transaction ends: with no round
        trips to save, ``commit`` changes nothing here.)"""
        out: list[Any] = []
        for op in ops:
            try:
                with self.savepoint():
                    answer = self._apply(op, now)
                    if isinstance(answer, BloomError):
                        raise answer
                    if op.actor is not None:
                        self.insert_audit(audit_trail.entries(op, answer, now, op.actor))
            except (StoreUnavailable, OutcomeUnknown):
                raise
            except BloomError as exc:
                answer = exc
            out.append(answer)
        return out

    def _apply(self, op: Op, now: int) -> Any:
        """The operation's answer, or the refusal it meets (as a value)."""
        if isinstance(op, CreateOp):
            return self._create(op, now)
        if isinstance(op, AcquireOp):
            return self._acquire(op, now)
        if isinstance(op, ClaimOp):
            return self._claim(op, now)
        if isinstance(op, (HeartbeatOp, CompleteOp)):
            return self._fenced(op, now)
        if isinstance(op, FailOp):
            return self._fail(op, now)
        if isinstance(op, RequeueOp):
            return self._requeue(op, now)
        if isinstance(op, CancelOp):
            return self._cancel(op, now)
        if isinstance(op, ExpireOp):
            return self._expire(op, now)
        raise TypeError(f"not an operation: {op!r}")

    def _create(self, op: CreateOp, now: int) -> Any:
        new = op.new
        if new.idempotency_key is not None:
            row = self._q1("task_by_idempotency_key", {"key": new.idempotency_key})
            if row:
                return _task(row), False
        row = self._q1(
            "insert_task",
            {
                "id": op.task_id,
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
        if row is None:
            return refusals.refusal(refusals.ID_TAKEN, task_id=op.task_id)
        return _task(row), True

    def _task_state(self, task_id: str) -> tuple[Any, ...] | None:
        """The task's status, not_before, lease_id, worker_id, attempts, max_attempts and its lease's status."""
        return self._q1("task_state", {"id": task_id})

    def _acquire(self, op: AcquireOp, now: int) -> Any:
        if op.ttl_seconds is not None and op.ttl_seconds < 1:
            return InvalidInput("ttl_seconds must be at least 1", ttl_seconds=op.ttl_seconds)
        state = self._task_state(op.task_id)
        verdict = _lease_verdict(state, now)
        if verdict != refusals.OK:
            assert state is None or state[0] is not None
            return refusals.refusal(
                verdict, task_id=op.task_id, status=state[0] if state else None, not_before=state[1] if state else None
            )
        chosen = None
        for worker_id in op.worker_ids:
            cap = self._q1("worker_capacity", {"id": worker_id})
            if cap is None:
                if len(op.worker_ids) == 1:
                    return refusals.refusal(refusals.WORKER_NOT_FOUND, worker_id=worker_id)
                continue  # one of several candidates: skip it
            max_concurrency, _labels, active = cap
            if active < max_concurrency:
                chosen = worker_id
                break
        if chosen is None:
            return refusals.refusal(refusals.NO_CAPACITY, task_id=op.task_id)
        row = self._q1("lease_task", {"id": op.task_id, "lease_id": op.lease_id, "worker_id": chosen, "now": now})
        if row is None:  # cannot happen under the write lock; refuse rather than write half
            return refusals.refusal(refusals.NOT_QUEUED, task_id=op.task_id, status=state[0] if state else None)
        task = _task(row)
        lease = self._insert_lease(task, op.lease_id, chosen, op.ttl_seconds or task.default_ttl_seconds, now)
        worker = self._worker_by_id(chosen)
        assert worker is not None
        return LeaseGrant(task=task, lease=lease, worker=worker)

    def _insert_lease(self, task: Task, lease_id: str, worker_id: str, ttl_seconds: int, now: int) -> Lease:
        row = self._q1(
            "insert_lease",
            {
                "id": lease_id,
                "task_id": task.id,
                "worker_id": worker_id,
                "now": now,
                "ttl_seconds": ttl_seconds,
                "context_id": task.context_id,
            },
        )
        assert row is not None  # an INSERT … RETURNING returns its row
        return _lease(row)

    def _claim(self, op: ClaimOp, now: int) -> Any:
        if op.ttl_seconds is not None and op.ttl_seconds < 1:
            return InvalidInput("ttl_seconds must be at least 1", ttl_seconds=op.ttl_seconds)
        if not 1 <= op.max_tasks <= len(op.lease_ids):
            return InvalidInput("max_tasks must be at least 1, with a lease id for each", max_tasks=op.max_tasks)
        cap = self._q1("worker_capacity", {"id": op.worker_id})
        if cap is None:
            return refusals.refusal(refusals.WORKER_NOT_FOUND, worker_id=op.worker_id)
        max_concurrency, labels, active = cap
        # Polling is contact, whether or not there is work: an idle pull worker stays online.
        self._q("claim_touch_worker", {"id": op.worker_id, "now": now})
        grants: list[LeaseGrant] = []
        for lease_id in op.lease_ids[: max(0, min(op.max_tasks, max_concurrency - active))]:
            row = self._q1("claim_task", {"worker_labels": labels, "lease_id": lease_id, "worker_id": op.worker_id, "now": now})
            if row is None:
                break
            task = _task(row)
            ttl = op.ttl_seconds if op.ttl_seconds is not None else task.default_ttl_seconds
            lease = self._insert_lease(task, lease_id, op.worker_id, ttl, now)
            worker = self._worker_by_id(op.worker_id)
            assert worker is not None
            grants.append(LeaseGrant(task=task, lease=lease, worker=worker))
        return grants

    def _fenced(self, op: HeartbeatOp | CompleteOp, now: int) -> Any:
        """Heartbeat and complete: the fence rule (``refusals.fence_verdict``) first."""
        state = self._task_state(op.task_id)
        status, _not_before, lease_id, worker_id, attempts, max_attempts, lease_status = state or (None,) * 7
        verdict = refusals.fence_verdict(status, lease_id, worker_id, op.fence)
        if verdict == refusals.OK and (lease_id is None or lease_status != "active"):
            verdict = refusals.LEASE_INACTIVE
        if verdict != refusals.OK:
            return refusals.refusal(verdict, task_id=op.task_id, fence=op.fence, status=status)
        if isinstance(op, HeartbeatOp):
            row = self._q1("run_task", {"id": op.task_id, "lease_id": lease_id, "now": now})
            lease_row = self._q1("renew_lease", {"id": lease_id, "now": now})
            assert row is not None and lease_row is not None  # under the write lock, the state above holds
            self._q("heartbeat_worker", {"id": worker_id, "now": now})
            return _task(row), _lease(lease_row)
        return self._finish(op, lease_id, worker_id, attempts, max_attempts, now)

    def _finish(self, op: CompleteOp, lease_id: str, worker_id: Any, attempts: int, max_attempts: int, now: int) -> CompletionOutcome:
        completion = op.completion
        not_before = None
        if completion.status == "success":
            status = "completed"
        elif completion.retryable and attempts < max_attempts:
            status = "queued"
            not_before = now + op.retry_delay(attempts)
        else:
            status = "failed"
        row = self._q1(
            "finish_task",
            {"id": op.task_id, "lease_id": lease_id, "status": status, "not_before": not_before,
             "keep_lease": status == "completed", "now": now},
        )
        lease_row = self._q1("end_lease", {"id": lease_id, "status": "released"})
        artifact_row = self._q1(
            "insert_artifact",
            {
                "id": op.artifact_id,
                "task_id": op.task_id,
                "type": completion.artifact_type or DEFAULT_ARTIFACT_TYPE,
                "now": now,
                "tags": _json(completion.artifact_tags),
                "content": artifact_content(completion),
            },
        )
        result_row = self._q1(
            "insert_result",
            {
                "id": op.result_id,
                "task_id": op.task_id,
                "worker_id": worker_id,
                "artifact_id": op.artifact_id,
                "status": completion.status,
                "output": completion.output,
                "error_message": completion.error_message,
                "metrics": _json(completion.metrics),
                "now": now,
            },
        )
        assert row is not None and lease_row is not None and result_row is not None and artifact_row is not None
        return CompletionOutcome(
            task=_task(row), result=_result(result_row), artifact=_artifact(artifact_row), lease=_lease(lease_row)
        )

    def _fail(self, op: FailOp, now: int) -> Any:
        row = self._q1("lease_by_id", {"id": op.lease_id})
        if row is None:
            return refusals.refusal(refusals.LEASE_NOT_FOUND, lease_id=op.lease_id)
        lease = _lease(row)
        state = self._task_state(lease.task_id)
        if lease.status != "active" or state is None or state[2] != op.lease_id or state[0] not in ("leased", "running"):
            return refusals.refusal(refusals.LEASE_NOT_ACTIVE, lease_id=op.lease_id)
        attempts, max_attempts = state[4], state[5]
        if op.refund:  # the dispatch never reached the worker: the attempt is given back
            attempts = max(attempts - 1, 0)
            self._q("refund_attempt", {"id": lease.task_id})
        queued = op.refund or attempts < max_attempts
        delay_for = max(attempts, 1) if op.refund else attempts
        task_row = self._q1(
            "finish_task",
            {"id": lease.task_id, "lease_id": op.lease_id, "status": "queued" if queued else "failed",
             "not_before": now + op.retry_delay(delay_for) if queued else None, "keep_lease": False, "now": now},
        )
        lease_row = self._q1("end_lease", {"id": op.lease_id, "status": "failed"})
        assert task_row is not None and lease_row is not None  # under the write lock, the checks above hold
        return _task(task_row), _lease(lease_row)

    def _requeue(self, op: RequeueOp, now: int) -> Any:
        row = self._q1("requeue_task", {"id": op.task_id, "now": now})
        if row is not None:
            return _task(row)
        state = self._task_state(op.task_id)
        if state is None:
            return refusals.refusal(refusals.TASK_NOT_FOUND, task_id=op.task_id)
        return refusals.refusal(refusals.NOT_REQUEUEABLE, task_id=op.task_id, status=state[0])

    def _cancel(self, op: CancelOp, now: int) -> Any:
        row = self._q1("cancel_task", {"id": op.task_id, "now": now})
        if row is None:
            state = self._task_state(op.task_id)
            if state is None:
                return refusals.refusal(refusals.TASK_NOT_FOUND, task_id=op.task_id)
            return refusals.refusal(refusals.NOT_CANCELLABLE, task_id=op.task_id, status=state[0])
        lease_row = self._q1("release_task_lease", {"task_id": op.task_id})
        return _task(row), _lease(lease_row) if lease_row else None

    def _expire(self, op: ExpireOp, now: int) -> Any:
        if op.limit < 1:
            return InvalidInput("limit must be at least 1", limit=op.limit)
        rows = self._q("expire_due_leases", {"now": now, "limit": op.limit})
        # RETURNING gives no order: report oldest expiry first.
        leases = sorted((_lease(r) for r in rows), key=lambda lease: (lease.expires_at, lease.id))
        out = []
        for lease in leases:
            row = self._q1("expire_task", {"id": lease.task_id, "lease_id": lease.id, "now": now})
            if row is None:
                # The task already left this lease (should not happen: every exit releases it);
                # report it as it is.
                row = self._q1("task_by_id", {"id": lease.task_id})
                if row is None:
                    continue
            out.append(Expiry(lease=lease, task=_task(row)))
        return out

    # --- workers ---------------------------------------------------------------

    @_atomic
    def upsert_worker(self, upsert: WorkerUpsert, now: int) -> tuple[Worker, bool]:
        existing = self._q1("worker_by_id", {"id": upsert.id})
        if existing is None:
            fresh = new_worker(upsert, now)
            self._q(
                "insert_worker",
                {
                    "id": fresh.id,
                    "node_id": fresh.node_id,
                    "url": fresh.url,
                    "status": fresh.status,
                    "capabilities": _json(fresh.capabilities),
                    "last_heartbeat": fresh.last_heartbeat,
                    "ip_addrs": _json(fresh.ip_addrs),
                    "obs_count": fresh.obs_count,
                    "db_sha": fresh.db_sha,
                    "now": now,
                    "agent_version": fresh.agent_version,
                    "os_info": fresh.os_info,
                    "install_method": fresh.install_method,
                    "source": fresh.source,
                },
            )
            created = True
        else:
            self._q(
                "update_worker",
                {
                    "id": upsert.id,
                    "node_id": upsert.node_id,
                    "url": upsert.url,
                    "status": upsert.status,
                    "capabilities": _json(upsert.capabilities) if upsert.capabilities is not None else None,
                    "last_heartbeat": upsert.last_heartbeat,
                    "ip_addrs": _json(upsert.ip_addrs) if upsert.ip_addrs is not None else None,
                    "obs_count": upsert.obs_count,
                    "db_sha": upsert.db_sha,
                    "agent_version": upsert.agent_version,
                    "os_info": upsert.os_info,
                    "install_method": upsert.install_method,
                    "source": upsert.source,
                },
            )
            created = False
        worker = self._worker_by_id(upsert.id)
        assert worker is not None
        return worker, created

    def lock_worker(self, worker_id: str) -> Worker:
        # The transaction holds SQLite's write lock: no other writer can change the row.
        worker = self._worker_by_id(worker_id)
        if worker is None:
            raise NotFound("worker not found", worker_id=worker_id)
        return worker

    @_atomic
    def remove_worker(self, worker_id: str) -> Worker:
        worker = self._worker_by_id(worker_id)
        if worker is None:
            raise NotFound("worker not found", worker_id=worker_id)
        self._q("delete_worker", {"id": worker_id})
        return worker

    def touch_worker(self, worker_id: str, now: int) -> None:
        if not self._q("touch_worker", {"id": worker_id, "now": now}):
            raise NotFound("worker not found", worker_id=worker_id)

    def mark_stale_workers_offline(self, seen_before: int, now: int, vouched: bool = False) -> list[Worker]:
        rows = self._q("mark_stale_workers_offline", {"seen_before": seen_before, "vouched": vouched})
        return sorted((_worker(r) for r in rows), key=lambda w: w.id)

    @_atomic
    def worker_liveness(self, worker_id: str, alive: bool, at: int) -> tuple[str, str] | None:
        old = self._q1("worker_status", {"id": worker_id})  # the write lock is held: nothing moves meanwhile
        if old is None:
            return None
        new = self._q1("worker_liveness", {"id": worker_id, "alive": alive, "at": at})
        assert new is not None
        return old[0], new[0]

    # --- push dispatch ---------------------------------------------------------

    def vouch_worker_url(self, worker_id: str, url: str, by: str, now: int) -> None:
        self._q("vouch_worker_url", {"worker_id": worker_id, "url": url, "by": by, "now": now})

    def forget_worker_url(self, worker_id: str) -> str | None:
        row = self._q1("forget_worker_url", {"worker_id": worker_id})
        return row[0] if row else None

    def insert_delivery(self, delivery: Delivery) -> None:
        self._q("insert_delivery", msgspec.structs.asdict(delivery))

    def finish_delivery(self, delivery_id: str, state: str, agent_status: int | None, detail: str | None, now: int) -> Delivery | None:
        row = self._q1("finish_delivery", {"id": delivery_id, "state": state, "agent_status": agent_status,
                                           "detail": detail, "now": now})
        return _delivery(row) if row is not None else None

    def expire_deliveries(self, now: int, detail: str, limit: int) -> list[Delivery]:
        return [_delivery(r) for r in self._q("expire_deliveries", {"now": now, "detail": detail, "limit": limit})]

    # --- audit and settings ----------------------------------------------------

    def insert_audit(self, entries: Sequence[AuditEntry]) -> None:
        if entries:
            self._q("insert_audit", {"entries": _encode(list(entries)).decode()})

    def set_settings(self, values: dict[str, str]) -> None:
        # The interface passes no ``now``; updated_at is informational, so the wall clock will do.
        if values:
            self._q("upsert_settings", {"values": _json(values), "now": time.time_ns() // 1_000_000})

    def add_settings_if_absent(self, values: dict[str, str], now: int) -> None:
        if values:
            self._q("add_settings_if_absent", {"values": _json(values), "now": now})

    # --- history ---------------------------------------------------------------

    def record_history(self, points: Sequence[HistoryPoint], now: int) -> int:
        return sum(len(self._q("record_history", {**history_params(p), "now": now})) for p in points)

    def prune_history(self, before: int) -> None:
        self._q("prune_history", {"before": before})


def _lease_verdict(state: tuple[Any, ...] | None, now: int) -> str:
    """Whether a task (its ``task_state`` row; None: none) may be leased now."""
    if state is None:
        return refusals.TASK_NOT_FOUND
    return refusals.lease_verdict(state[0], state[1], state[4], state[5], now)


# --- the store ---------------------------------------------------------------


class SqliteStore(Store):
    """A SQLite file: one locked write connection, one read connection per thread."""

    kind = "sqlite"

    def __init__(self, path: str, *, busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        self._write_lock = threading.Lock()
        self._writer_thread: int | None = None  # ident of the thread inside transaction()
        self._writer: sqlite3.Connection | None = None
        self._local = threading.local()
        # Every reader we opened, with its thread, so close() can close them all
        # and a new reader can close those whose thread has ended.
        self._readers: dict[sqlite3.Connection, threading.Thread] = {}
        self._readers_lock = threading.Lock()
        self._closed = True

    # --- lifecycle -------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves. check_same_thread=False:
        # the writer serves whichever thread holds the lock; close() may run on any thread.
        return sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False)

    def open(self, wait_s: float = 10.0) -> None:
        """Open the write connection (creating the file) and switch it to WAL."""
        if not self._closed:
            return
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise StoreUnavailable(f"cannot open SQLite database {self.path}: directory {directory} does not exist")
        if os.path.isdir(self.path):
            raise StoreUnavailable(f"cannot open SQLite database {self.path}: it is a directory")
        conn = None
        try:
            conn = self._connect()
            mode = conn.execute(Q["pragma_wal"]).fetchone()[0]
            conn.execute(Q["pragma_synchronous"])
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, sqlite3.DatabaseError) and "not a database" in str(exc):
                raise StoreUnavailable(f"cannot open SQLite database {self.path}: the file is not a SQLite database") from exc
            raise StoreUnavailable(f"cannot open SQLite database {self.path}: {exc}") from exc
        if str(mode).lower() != "wal":
            conn.close()
            raise StoreUnavailable(f"cannot open SQLite database {self.path}: WAL mode unavailable (got {mode})")
        self._writer = conn
        self._local = threading.local()
        self._closed = False

    def close(self) -> None:
        """Close the writer and every reader. Idempotent."""
        self._closed = True
        with self._readers_lock:
            readers, self._readers = list(self._readers), {}
        for conn in readers:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()
        # Wait for a running transaction to finish rather than pull its connection away.
        with self._write_lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(sqlite3.Error):
                # Keeps planner statistics current so the partial indexes get chosen.
                writer.execute(Q["pragma_optimize"])
            with contextlib.suppress(sqlite3.Error):
                writer.close()

    def _reader(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreUnavailable("SQLite store is closed")
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is not None:
            return conn
        try:
            conn = self._connect()
            conn.execute(Q["pragma_query_only"])
        except sqlite3.Error as exc:
            raise _translate(exc) from exc
        with self._readers_lock:
            for old, thread in list(self._readers.items()):
                if not thread.is_alive():
                    del self._readers[old]
                    old.close()
            self._readers[conn] = threading.current_thread()
        local.conn = conn
        return conn

    def _read(self, name: str, params: dict[str, Any] | None = None) -> list[Any]:
        return _run(self._reader(), name, params)

    def _read1(self, name: str, params: dict[str, Any] | None = None) -> Any | None:
        rows = self._read(name, params)
        return rows[0] if rows else None

    def ping(self) -> None:
        self._read("ping")

    def _applied(self, conn: sqlite3.Connection) -> set[str]:
        if not _run(conn, "schema_migrations_exists"):
            return set()
        return {r[0] for r in _run(conn, "applied_migrations")}

    def migrate(self) -> list[str]:
        """Apply pending migrations, each in its own transaction; return their names."""
        done: list[str] = []
        with self._write_lock:
            conn = self._writer_conn()
            _run(conn, "create_schema_migrations")
            for migration in migrations.pending("sqlite", self._applied(conn)):
                _run(conn, "begin_immediate")
                try:
                    # Another process may have applied it while we waited for the lock.
                    if migration.version not in self._applied(conn):
                        for statement in _statements(migration.sql):
                            conn.execute(statement)
                        _run(conn, "record_migration", {"version": migration.version, "applied_at": time.time_ns() // 1_000_000})
                        done.append(migration.version)
                    _run(conn, "commit")
                except BaseException as exc:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute(Q["rollback"])
                    if isinstance(exc, sqlite3.Error):
                        raise StoreUnavailable(f"migration {migration.version} failed: {exc}") from exc
                    raise
        return done

    def check_schema(self) -> None:
        pending = migrations.pending("sqlite", self._applied(self._reader()))
        if pending:
            raise StoreUnavailable(
                f"SQLite database {self.path} has pending migrations ({', '.join(m.version for m in pending)}); "
                "run bloom-runtime migrate"
            )

    def _writer_conn(self) -> sqlite3.Connection:
        if self._closed or self._writer is None:
            raise StoreUnavailable("SQLite store is closed")
        return self._writer

    @contextlib.contextmanager
    def transaction(self) -> Iterator[SqliteTransaction]:
        """Take the write lock and ``BEGIN IMMEDIATE``; commit on normal exit, roll back on error."""
        me = threading.get_ident()
        if self._writer_thread == me:
            # The lock is not reentrant: fail loudly instead of deadlocking.
            raise RuntimeError("SqliteStore.transaction() called inside a transaction on the same thread")
        with self._write_lock:
            conn = self._writer_conn()
            _run(conn, "begin_immediate")
            self._writer_thread = me
            tx = SqliteTransaction(conn)
            try:
                yield tx
            except BaseException:
                tx._open = False
                with contextlib.suppress(StoreUnavailable):
                    _run(conn, "rollback")
                raise
            else:
                tx._open = False
                try:
                    _run(conn, "commit")
                except StoreUnavailable:
                    with contextlib.suppress(StoreUnavailable):
                        _run(conn, "rollback")
                    raise
            finally:
                self._writer_thread = None

    # --- reads -----------------------------------------------------------------

    def get_task(self, task_id: str) -> Task:
        row = self._read1("task_by_id", {"id": task_id})
        if row is None:
            raise NotFound("task not found", task_id=task_id)
        return _task(row)

    def get_task_by_idempotency_key(self, key: str) -> Task | None:
        row = self._read1("task_by_idempotency_key", {"key": key})
        return _task(row) if row else None

    def _page(
        self,
        name: str,
        params: dict[str, Any],
        limit: int,
        cursor: str | None,
        build: Callable[[Sequence[Any]], Any],
        sort_col: int,
    ) -> Page:
        _check_limit(limit)
        params.update(_after(cursor), limit=limit + 1)  # one extra row says whether a next page exists
        rows = self._read(name, params)
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = cursors.encode(rows[-1][sort_col], rows[-1][0]) if more else None
        return Page(items=[build(r) for r in rows], next_cursor=next_cursor)

    def list_tasks(self, status: str | None, limit: int, cursor: str | None) -> Page:
        if status is None:
            return self._page("list_tasks", {}, limit, cursor, _task, 8)
        return self._page("list_tasks_by_status", {"status": status}, limit, cursor, _task, 8)

    def get_lease(self, lease_id: str) -> Lease:
        row = self._read1("lease_by_id", {"id": lease_id})
        if row is None:
            raise NotFound("lease not found", lease_id=lease_id)
        return _lease(row)

    def list_leases(self, status: str | None, limit: int, cursor: str | None) -> Page:
        if status is None:
            return self._page("list_leases", {}, limit, cursor, _lease, 3)
        return self._page("list_leases_by_status", {"status": status}, limit, cursor, _lease, 3)

    def get_worker(self, worker_id: str) -> Worker:
        row = self._read1("worker_by_id", {"id": worker_id})
        if row is None:
            raise NotFound("worker not found", worker_id=worker_id)
        return _worker(row)

    def list_workers(self, status: str | None = None) -> list[Worker]:
        if status is None:
            return [_worker(r) for r in self._read("list_workers")]
        return [_worker(r) for r in self._read("list_workers_by_status", {"status": status})]

    def worker_candidates(self, labels: Sequence[str]) -> list[Worker]:
        return [_worker(r) for r in self._read("worker_candidates", {"labels": _json(list(labels))})]

    def worker_leases(self, worker_id: str) -> list[Lease]:
        return [_lease(r) for r in self._read("worker_leases", {"worker_id": worker_id, "limit": MAX_PAGE})]

    def active_lease_owners(self) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in self._read("active_lease_owners")]

    def sticky_workers(self, context_id: str) -> set[str]:
        return {r[0] for r in self._read("sticky_workers", {"context_id": context_id})}

    def list_artifacts(self, task_id: str | None, limit: int, cursor: str | None) -> Page:
        if task_id is None:
            return self._page("list_artifacts", {}, limit, cursor, _artifact, 4)
        return self._page("list_artifacts_by_task", {"task_id": task_id}, limit, cursor, _artifact, 4)

    def list_results(self, task_id: str | None, limit: int, cursor: str | None) -> Page:
        if task_id is None:
            return self._page("list_results", {}, limit, cursor, _result, 8)
        return self._page("list_results_by_task", {"task_id": task_id}, limit, cursor, _result, 8)

    def get_result(self, task_id: str) -> Result:
        row = self._read1("latest_result", {"task_id": task_id})
        if row is None:
            raise NotFound("no result for task", task_id=task_id)
        return _result(row)

    def list_audit(self, limit: int, cursor: str | None, entity_id: str | None = None, action: str | None = None) -> Page:
        name = AUDIT_QUERIES[entity_id is not None, action is not None]
        return self._page(name, {"entity_id": entity_id, "action": action}, limit, cursor, _audit, 1)

    def get_settings(self) -> dict[str, str]:
        return dict(self._read("get_settings"))

    def due_tasks(self, now: int, limit: int) -> list[Task]:
        return [_task(r) for r in self._read("due_tasks", {"now": now, "limit": limit})]

    def latest_delivery(self, task_id: str) -> Delivery | None:
        row = self._read1("latest_delivery", {"task_id": task_id})
        return _delivery(row) if row is not None else None

    def worker_trust(self) -> dict[str, str]:
        return dict(self._read("worker_trust"))

    def stats(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {
            "tasks": dict.fromkeys(TASK_STATUSES, 0),
            "leases": dict.fromkeys(LEASE_STATUSES, 0),
            "workers": dict.fromkeys(WORKER_STATUSES, 0),
        }
        for kind, status, count in self._read("stats"):
            out[kind][status] = count
        return out

    # --- the read side of operators' tools --------------------------------------

    def search_tasks(self, field: str, value: str, statuses: Sequence[str], limit: int, cursor: str | None) -> Page:
        # One index range per status, merged here: in-process reads cost no round trip.
        _check_limit(limit)
        params = {"value": value, **_after(cursor), "limit": limit + 1}
        rows = [r for status in statuses for r in self._read(SEARCH_QUERIES[field], {**params, "status": status})]
        rows.sort(key=lambda r: (r[8], r[0]), reverse=True)
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = cursors.encode(rows[-1][8], rows[-1][0]) if more else None
        return Page(items=[_task(r) for r in rows], next_cursor=next_cursor)

    def list_task_leases(self, task_ids: Sequence[str], status: str | None, limit: int, cursor: str | None) -> Page:
        return self._page("leases_of_tasks", {"task_ids": _json(list(task_ids)), "status": status}, limit, cursor, _lease, 3)

    def list_expired_leases(self, limit: int, cursor: str | None) -> Page:
        return self._page("list_expired_leases", {}, limit, cursor, _lease, 4)

    def live_depth(self) -> dict[str, int]:
        return {**dict.fromkeys(UNFINISHED_STATUSES, 0), **dict(self._read("live_depth"))}

    def oldest_queued(self) -> tuple[str, int] | None:
        row = self._read1("oldest_queued")
        return (row[0], row[1]) if row is not None else None

    def activity(self, since: int, until: int) -> dict[int, dict[str, int]]:
        out: dict[int, dict[str, int]] = {}
        for kind, minute, count in self._read("activity", {"since": since, "until": until}):
            out.setdefault(minute, {})[kind] = count
        return out

    def last_history_minute(self) -> int | None:
        row = self._read1("last_history_minute")
        return row[0] if row is not None else None

    def history(self, since: int, until: int) -> list[HistoryPoint]:
        return [history_point(r) for r in self._read("history", {"since": since, "until": until})]


def _statements(script: str) -> Iterator[str]:
    """Split a migration script into statements, using SQLite's own notion of a complete one
    (so semicolons inside strings or trigger bodies do not split)."""
    buf = ""
    for piece in script.split(";"):
        buf += piece + ";"
        if sqlite3.complete_statement(buf):
            if _has_code(buf):
                yield buf
            buf = ""


def _has_code(sql: str) -> bool:
    return any(line.strip() and not line.strip().startswith("--") for line in sql.rstrip(";").splitlines())


__all__ = ["SqliteStore", "SqliteTransaction"]
