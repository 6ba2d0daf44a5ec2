"""The audit entries each state change records: one per change, naming both the task
and its lease, worded alike whoever writes them.

SQLite's store and the actors (when entries go through the ``AuditWriter``) word
them here; PostgreSQL's statements word the same entries in SQL (see
``queries/postgres.sql``), and a test holds the two to one log.
"""

from __future__ import annotations

from typing import Any

from bloom_runtime.engine.models import AuditEntry, CompletionOutcome, Expiry, Lease, LeaseGrant, Task, new_id
from bloom_runtime.sql.store import (
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
)

FINISHED_ACTIONS = {"completed": "task_completed", "queued": "task_retry", "failed": "task_failed"}
MAX_DETAIL = 1000


def entry(now: int, action: str, entity_type: str, entity_id: str, actor: str, detail: str | None = None) -> AuditEntry:
    return AuditEntry(
        id=new_id(), timestamp=now, action=action, entity_type=entity_type, entity_id=entity_id, actor=actor,
        detail=detail[:MAX_DETAIL] if detail is not None else None,
    )


def _leased(now: int, grant: LeaseGrant, actor: str, how: str = "") -> AuditEntry:
    lease = grant.lease
    detail = f"lease={lease.id} worker={lease.worker_id} ttl={lease.ttl_seconds}s attempt={grant.task.attempts}{how}"
    return entry(now, "task_leased", "task", grant.task.id, actor, detail)


def entries(op: Op, answer: Any, now: int, actor: str) -> list[AuditEntry]:
    """What ``op``, answered ``answer`` (not a refusal), records as done by ``actor``."""
    if isinstance(op, CreateOp):
        task, created = answer
        if not created:
            return []
        return [entry(now, "task_created", "task", task.id, actor, f"agent={task.agent_slug} context={task.context_id}")]
    if isinstance(op, AcquireOp):
        return [_leased(now, answer, actor)]
    if isinstance(op, ClaimOp):
        return [_leased(now, grant, actor, " claimed") for grant in answer]
    if isinstance(op, HeartbeatOp):
        task, lease = answer
        return [entry(now, "lease_renewed", "lease", lease.id, actor, f"task={task.id} expires_at={lease.expires_at}")]
    if isinstance(op, CompleteOp):
        out: CompletionOutcome = answer
        t = out.task
        detail = f"result={out.result.status} attempts={t.attempts}/{t.max_attempts}"
        if t.status == "queued":
            detail += f" not_before={t.not_before}"
        if out.lease is not None:
            detail += f" lease={out.lease.id}"
        return [entry(now, FINISHED_ACTIONS[t.status], "task", t.id, actor, detail)]
    if isinstance(op, FailOp):
        task, lease = answer
        given_back = " (attempt given back)" if op.refund else ""
        detail = f"lease={lease.id} {task.status} attempts={task.attempts}/{task.max_attempts}{given_back}: {op.reason}"
        return [entry(now, "lease_failed", "task", task.id, actor, detail)]
    if isinstance(op, RequeueOp):
        requeued: Task = answer
        return [entry(now, "task_requeued", "task", requeued.id, actor, "attempts reset")]
    if isinstance(op, CancelOp):
        cancelled, released = answer
        return [entry(now, "task_cancelled", "task", cancelled.id, actor, _released(released))]
    if isinstance(op, ExpireOp):
        return [_expired(now, e, actor) for e in answer]
    raise TypeError(f"not an operation: {op!r}")


def _released(lease: Lease | None) -> str | None:
    return f"lease={lease.id} released" if lease is not None else None


def _expired(now: int, e: Expiry, actor: str) -> AuditEntry:
    fate = "queued" if e.task.status == "queued" else "dead"
    detail = f"lease={e.lease.id} worker={e.lease.worker_id} {fate} attempts={e.task.attempts}/{e.task.max_attempts}"
    return entry(now, "lease_expired", "task", e.task.id, actor, detail)
