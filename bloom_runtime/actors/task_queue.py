"""TaskQueue: owns tasks, results and artifacts; wakes long-polling claimers when tasks queue."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bloom_runtime.actors.base import BatchingActor, Record, Write, audit
from bloom_runtime.actors.messages import (
    CancelTask,
    CompleteTask,
    CreateTask,
    RequeueTask,
)
from bloom_runtime.engine.clock import Clock
from bloom_runtime.engine.models import CompletionOutcome, Task, new_id
from bloom_runtime.sql.store import CompleteOp, CreateOp, RetryDelay, Store, Transaction


class TaskQueue(BatchingActor):
    def __init__(
        self,
        store: Store,
        clock: Clock,
        audit_sink: Callable[[Record], None],
        *,
        retry_delay: RetryDelay,
        on_queued: Callable[[], None],
        batch_max: int = 256,
        inline_audit: bool = True,
    ) -> None:
        super().__init__(store, clock, audit_sink, batch_max, inline_audit)
        self.retry_delay = retry_delay
        self.on_queued = on_queued

    def plan(self, m: Any) -> Write | None:
        now = self.clock.now_ms
        if isinstance(m, CreateTask):

            def created(result: tuple[Task, bool], t: int) -> list:
                task, is_new = result
                if not is_new:
                    return []
                return [audit(t, "task_created", "task", task.id, m.actor, f"agent={task.agent_slug} context={task.context_id}")]

            create = CreateOp(m.new, new_id(), **self.audit_by_store(m.actor))
            return Write(None, m.reply, after=lambda v: v[1] and self.on_queued(), spec=create, entries=created)

        if isinstance(m, CompleteTask):

            def completed(out: CompletionOutcome, t: int) -> list:
                action = {"completed": "task_completed", "queued": "task_retry", "failed": "task_failed"}[out.task.status]
                detail = f"result={out.result.status} attempts={out.task.attempts}/{out.task.max_attempts}"
                if out.task.status == "queued":
                    detail += f" not_before={out.task.not_before}"
                entries = [audit(t, action, "task", m.task_id, m.actor, detail)]
                if out.lease is not None:
                    entries.append(audit(t, "lease_released", "lease", out.lease.id, m.actor, f"task={m.task_id}"))
                return entries

            spec = CompleteOp(
                m.task_id, m.fence, m.completion, new_id(), new_id(), self.retry_delay, **self.audit_by_store(m.actor, 2)
            )
            return Write(
                None, m.reply, after=lambda v: v.task.status == "queued" and self.on_queued(), key=m.task_id,
                spec=spec, entries=completed,
            )

        if isinstance(m, RequeueTask):

            def requeue(tx: Transaction) -> tuple[Task, list]:
                t = now()
                task = tx.requeue(m.task_id, t)
                return task, [audit(t, "task_requeued", "task", task.id, m.actor, "attempts reset")]

            return Write(requeue, m.reply, after=lambda v: self.on_queued(), key=m.task_id)

        if isinstance(m, CancelTask):

            def cancel(tx: Transaction) -> tuple[Task, list]:
                t = now()
                task, lease = tx.cancel(m.task_id, t)
                entries = [audit(t, "task_cancelled", "task", task.id, m.actor)]
                if lease is not None:
                    entries.append(audit(t, "lease_released", "lease", lease.id, m.actor, f"task={task.id} cancelled"))
                return task, entries

            return Write(cancel, m.reply, key=m.task_id)

        return None
