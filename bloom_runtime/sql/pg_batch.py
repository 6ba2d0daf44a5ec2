"""A PostgreSQL batch: its operations sorted by the set statement that applies them,
the JSON rows each statement takes, and how each statement's rows answer them."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from bloom_runtime.engine.errors import InvalidInput
from bloom_runtime.engine.models import (
    DEFAULT_TIMEOUT_SEC,
    LEASE_GRACE_S,
    MAX_ATTEMPTS_LIMIT,
    Completion,
    Expiry,
    LeaseGrant,
    new_id,
)
from bloom_runtime.sql import refusals
from bloom_runtime.sql.pg_records import (
    LEASE_N,
    TASK_N,
    WORKER_N,
    lease_record,
    outcome_record,
    task_record,
    to_json,
    worker_record,
)
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
    RetryDelay,
    artifact_content,
)

DEFAULT_ARTIFACT_TYPE = "llm_output"
SET_STATEMENT_MAX_BYTES = 4 << 20  # text one set statement carries; prompts and outputs may be 1 MiB each

Statement = tuple[str, dict[str, Any]]
Reader = Callable[[list[Any]], None]
Answer = Callable[[int, Any], None]


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


# --- a batch sorted by the statement that applies each operation -----------------------


class Batch:
    """Positions of a batch's operations by set statement, and those that run after it."""

    def __init__(self, ops: Sequence[Op], out: list[Any]) -> None:
        self.creates: list[int] = []
        self.acquires: list[int] = []
        self.claims: list[int] = []
        self.fenced: list[int] = []  # heartbeats and completes
        self.cancels: list[int] = []
        self.requeues: list[int] = []
        self.fails: list[int] = []
        self.expires: list[int] = []
        self.later: list[int] = []
        tasks: set[str] = set()
        new_ids: set[str] = set()
        claimers: set[str] = set()
        failed: set[str] = set()
        for i, op in enumerate(ops):
            bad = _invalid(op)
            if bad is not None:
                out[i] = bad
            elif isinstance(op, CreateOp):
                # Created rows are matched to creates by id: a repeated id waits its turn.
                (self.later if op.task_id in new_ids else self.creates).append(i)
                new_ids.add(op.task_id)
            elif isinstance(op, ClaimOp):
                (self.later if op.worker_id in claimers else self.claims).append(i)
                claimers.add(op.worker_id)
            elif isinstance(op, FailOp):
                (self.later if op.lease_id in failed else self.fails).append(i)
                failed.add(op.lease_id)
            elif isinstance(op, ExpireOp):
                (self.later if self.expires else self.expires).append(i)
            elif op.task_id in tasks or (isinstance(op, AcquireOp) and len(op.worker_ids) != 1):
                self.later.append(i)
            else:
                tasks.add(op.task_id)
                kind = {AcquireOp: self.acquires, HeartbeatOp: self.fenced, CompleteOp: self.fenced,
                        CancelOp: self.cancels, RequeueOp: self.requeues}[type(op)]
                kind.append(i)
        self.tasks = sorted(tasks)
        self.failed = sorted(failed)
        # Whether a task may become claimable: worth a NOTIFY to claimers in other processes.
        self.queues = bool(self.creates or self.requeues or self.fails or self.expires) or any(
            op.completion.status == "error" for op in (ops[i] for i in self.fenced) if isinstance(op, CompleteOp)
        )


def _invalid(op: Op) -> InvalidInput | None:
    """Arguments no state can make valid, refused before any statement (a violated CHECK
    constraint would abort the whole transaction)."""
    ttl = getattr(op, "ttl_seconds", None)
    if ttl is not None and ttl < 1:
        return InvalidInput("ttl_seconds must be at least 1", ttl_seconds=ttl)
    if isinstance(op, ClaimOp) and not 1 <= op.max_tasks <= len(op.lease_ids):
        return InvalidInput("max_tasks must be at least 1, with a lease id for each", max_tasks=op.max_tasks)
    if isinstance(op, ExpireOp) and op.limit < 1:
        return InvalidInput("limit must be at least 1", limit=op.limit)
    return None


# --- the rows each set statement takes ---------------------------------------------------


def _audit_id(op: Op) -> str | None:
    return new_id() if op.actor is not None else None


def _retry_delays(retry_delay: RetryDelay) -> list[int]:
    """The wait before a retry after each possible number of attempts; the statement
    indexes it by the task's attempts."""
    return [retry_delay(n) for n in range(MAX_ATTEMPTS_LIMIT + 1)]


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
            "actor": op.actor,
            "audit_id": _audit_id(op),
        }
        for op in ops
    ]
    return {"rows": to_json(rows), "now": now}


def _grant_rows(ops: Sequence[tuple[int, AcquireOp]], now: int) -> dict[str, Any]:
    rows = [
        {"ord": i, "task_id": op.task_id, "lease_id": op.lease_id, "worker_id": op.worker_ids[0],
         "ttl": op.ttl_seconds, "actor": op.actor, "audit_id": _audit_id(op)}
        for i, op in ops
    ]
    return {"rows": to_json(rows), "default_timeout": DEFAULT_TIMEOUT_SEC, "grace": LEASE_GRACE_S, "now": now}


def _claim_params(op: ClaimOp, now: int) -> dict[str, Any]:
    return {
        "worker_id": op.worker_id,
        "want": op.max_tasks,
        "ttl": op.ttl_seconds,
        "lease_ids": to_json(op.lease_ids[: op.max_tasks]),
        "actor": op.actor,
        "audit_ids": to_json([new_id() for _ in range(op.max_tasks)] if op.actor is not None else []),
        "grace": LEASE_GRACE_S,
        "now": now,
    }


def _fenced_row(i: int, op: HeartbeatOp | CompleteOp) -> dict[str, Any]:
    row: dict[str, Any] = {
        "ord": i,
        "finish": isinstance(op, CompleteOp),
        "task_id": op.task_id,
        "fence_lease_id": op.fence.lease_id,
        "fence_worker_id": op.fence.worker_id,
        "actor": op.actor,
        "audit_id": _audit_id(op),
    }
    if isinstance(op, CompleteOp):
        c = op.completion
        row.update(
            retryable=c.retryable,
            delays=_retry_delays(op.retry_delay) if c.status == "error" and c.retryable else None,
            artifact_id=op.artifact_id,
            artifact_type=c.artifact_type or DEFAULT_ARTIFACT_TYPE,
            tags=c.artifact_tags,
            content=artifact_content(c),
            result_id=op.result_id,
            result_status=c.status,
            output=c.output,
            error_message=c.error_message,
            metrics=c.metrics,
        )
    return row


def _fenced_size(op: Op) -> int:
    if not isinstance(op, CompleteOp):
        return 256
    c: Completion = op.completion
    return 2 * len(c.output or "") + 2 * len(c.error_message or "") + 256


def _task_rows(ops: Sequence[tuple[int, CancelOp | RequeueOp]]) -> list[dict[str, Any]]:
    return [{"ord": i, "task_id": op.task_id, "actor": op.actor, "audit_id": _audit_id(op)} for i, op in ops]


def _fail_rows(ops: Sequence[tuple[int, FailOp]]) -> list[dict[str, Any]]:
    return [
        {"ord": i, "lease_id": op.lease_id, "delays": _retry_delays(op.retry_delay), "reason": op.reason,
         "refund": op.refund, "actor": op.actor, "audit_id": _audit_id(op)}
        for i, op in ops
    ]


def statements(ops: Sequence[Any], batch: Batch, now: int, answer: Answer) -> tuple[list[Statement], list[Reader]]:
    """The batch's statements, and for each the reader that turns its rows into answers."""
    statements: list[Statement] = []
    readers: list[Reader] = []

    def add(name: str, params: dict[str, Any], read: Reader | None = None) -> None:
        statements.append((name, params))
        readers.append(read or _ignore)

    for chunk in _chunks(batch.creates, lambda i: len(ops[i].new.prompt)):
        add("create_tasks", _create_rows([ops[i] for i in chunk], now),
            functools.partial(_read_creates, ops, chunk, answer))
    if batch.tasks or batch.failed:
        add("lock_tasks", {"ids": batch.tasks, "leases": batch.failed})
    workers = {ops[i].worker_ids[0] for i in batch.acquires} | {ops[i].worker_id for i in batch.claims}
    if workers:
        add("lock_workers", {"ids": sorted(workers)})
    if batch.acquires:
        add("grant_leases", _grant_rows([(i, ops[i]) for i in batch.acquires], now),
            functools.partial(_read_grants, ops, answer))
    for i in batch.claims:
        add("claim_tasks", _claim_params(ops[i], now), functools.partial(_read_claim, ops, i, answer))
    for chunk in _chunks(batch.fenced, lambda i: _fenced_size(ops[i])):
        rows = [_fenced_row(i, ops[i]) for i in chunk]
        add("fenced_writes", {"rows": to_json(rows), "now": now}, functools.partial(_read_fenced, ops, answer))
    if batch.cancels:
        add("cancel_tasks", {"rows": to_json(_task_rows([(i, ops[i]) for i in batch.cancels])), "now": now},
            functools.partial(_read_cancels, ops, answer))
    if batch.requeues:
        add("requeue_tasks", {"rows": to_json(_task_rows([(i, ops[i]) for i in batch.requeues])), "now": now},
            functools.partial(_read_requeues, ops, answer))
    if batch.fails:
        add("fail_leases", {"rows": to_json(_fail_rows([(i, ops[i]) for i in batch.fails])), "now": now},
            functools.partial(_read_fails, ops, answer))
    for i in batch.expires:
        add("expire_leases", {"now": now, "limit": ops[i].limit, "actor": ops[i].actor},
            functools.partial(_read_expired, i, answer))
    keys = sorted({k for i in batch.creates if (k := ops[i].new.idempotency_key) is not None})
    if keys:
        # After every change: a create whose key was used answers with the task as
        # the batch left it. Its insert's snapshot predates a concurrent insert it
        # waited for; this statement's fresh snapshot sees it.
        add("tasks_by_keys", {"keys": keys}, functools.partial(_read_keyed, ops, batch.creates, answer))
    if batch.queues:
        add("notify_tasks", {})  # a task may have become claimable
    return statements, readers


# --- answers from the set statements' rows ----------------------------------------------
#
# Each reader takes the rows of one statement and answers the operations it applied.


def _ignore(rows: list[Any]) -> None:
    pass


def _read_creates(ops: Sequence[Any], chunk: list[int], answer: Answer, rows: list[Any]) -> None:
    """Created tasks, matched to their creates by id; the others wait for ``_read_keyed``."""
    made = {r[0]: r for r in rows}
    for i in chunk:
        row = made.get(ops[i].task_id)
        if row is not None:
            answer(i, (task_record(row), True))


def _read_keyed(ops: Sequence[Any], creates: list[int], answer: Answer, rows: list[Any]) -> None:
    by_key = {r[16]: r for r in rows}
    for i in creates:
        op: CreateOp = ops[i]
        row = by_key.get(op.new.idempotency_key)
        if row is not None and row[0] != op.task_id:
            answer(i, (task_record(row), False))


def _read_grants(ops: Sequence[Any], answer: Answer, rows: list[Any]) -> None:
    worker_at = 4 + TASK_N + LEASE_N
    for r in rows:
        i, verdict = r[0], r[1]
        op: AcquireOp = ops[i]
        if verdict == refusals.OK:
            worker = worker_record(r, r[worker_at + WORKER_N], worker_at)
            answer(i, LeaseGrant(task=task_record(r, 4), lease=lease_record(r, 4 + TASK_N), worker=worker))
        else:
            answer(i, refusals.refusal(verdict, task_id=op.task_id, worker_id=op.worker_ids[0], status=r[2], not_before=r[3]))


def _read_claim(ops: Sequence[Any], i: int, answer: Answer, rows: list[Any]) -> None:
    """A claim's rows: the worker (and its load after each grant), then each grant's task and lease."""
    op: ClaimOp = ops[i]
    if rows[0][0] != refusals.OK:
        answer(i, refusals.refusal(rows[0][0], worker_id=op.worker_id))
        return
    task_at = 2 + WORKER_N
    answer(i, [
        LeaseGrant(task=task_record(r, task_at), lease=lease_record(r, task_at + TASK_N), worker=worker_record(r, r[1 + WORKER_N], 1))
        for r in rows
        if r[task_at] is not None
    ])


def _read_fenced(ops: Sequence[Any], answer: Answer, rows: list[Any]) -> None:
    for r in rows:
        i, verdict = r[0], r[1]
        op = ops[i]
        if verdict != refusals.OK:
            answer(i, refusals.refusal(verdict, task_id=op.task_id, fence=op.fence, status=r[2]))
        elif isinstance(op, CompleteOp):
            answer(i, outcome_record(r, 3))
        else:
            answer(i, (task_record(r, 3), lease_record(r, 3 + TASK_N)))


def _read_cancels(ops: Sequence[Any], answer: Answer, rows: list[Any]) -> None:
    for r in rows:
        i, verdict = r[0], r[1]
        if verdict != refusals.OK:
            answer(i, refusals.refusal(verdict, task_id=ops[i].task_id, status=r[2]))
        else:
            lease_at = 3 + TASK_N
            answer(i, (task_record(r, 3), lease_record(r, lease_at) if r[lease_at] is not None else None))


def _read_requeues(ops: Sequence[Any], answer: Answer, rows: list[Any]) -> None:
    for r in rows:
        i, verdict = r[0], r[1]
        answer(i, task_record(r, 3) if verdict == refusals.OK else refusals.refusal(verdict, task_id=ops[i].task_id, status=r[2]))


def _read_fails(ops: Sequence[Any], answer: Answer, rows: list[Any]) -> None:
    for r in rows:
        i, verdict = r[0], r[1]
        if verdict != refusals.OK:
            answer(i, refusals.refusal(verdict, lease_id=ops[i].lease_id))
        else:
            answer(i, (task_record(r, 2), lease_record(r, 2 + TASK_N)))


def _read_expired(i: int, answer: Answer, rows: list[Any]) -> None:
    expired = [Expiry(lease=lease_record(r), task=task_record(r, LEASE_N)) for r in rows]
    expired.sort(key=lambda e: (e.lease.expires_at, e.lease.id))  # oldest expiry first
    answer(i, expired)
