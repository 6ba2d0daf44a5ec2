"""TaskQueue: owns tasks, results and artifacts; wakes long-polling claimers when tasks queue."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from bloom_runtime.actors.base import BatchingActor, Record, Write
from bloom_runtime.actors.messages import CancelTask, CompleteTask, CompleteTasks, CreateTasks, RequeueTask
from bloom_runtime.engine.clock import Clock
from bloom_runtime.engine.errors import BloomError
from bloom_runtime.engine.models import Task, new_id
from bloom_runtime.sql.store import CancelOp, CompleteOp, CreateOp, RequeueOp, RetryDelay, Store


class TaskQueue(BatchingActor):
    def __init__(
        self,
        store: Store,
        clock: Clock,
        audit_sink: Callable[[Record], None],
        *,
        retry_delay: RetryDelay,
        on_queued: Callable[[Sequence[Task]], None],
        batch_max: int = 256,
        inline_audit: bool = True,
    ) -> None:
        super().__init__(store, clock, audit_sink, batch_max, inline_audit)
        self.retry_delay = retry_delay
        self.on_queued = on_queued  # told which tasks became claimable

    def plan(self, m: Any) -> Write | None:
        if isinstance(m, CreateTasks):

            def created(answers: Any) -> None:
                made = answers if m.many else [answers]
                queued = [a[0] for a in made if not isinstance(a, BloomError) and a[1]]
                if queued:
                    self.on_queued(queued)

            ops = [CreateOp(new, new_id()) for new in m.new]
            return self.change(m.reply, m.actor, *ops, many=m.many, after=created)

        if isinstance(m, CompleteTask):
            op = CompleteOp(m.task_id, m.fence, m.completion, new_id(), new_id(), self.retry_delay)
            return self.change(m.reply, m.actor, op, key=m.task_id, after=lambda out: out.task.status == "queued" and self.on_queued([out.task]))

        if isinstance(m, CompleteTasks):

            def retried(answers: Any) -> None:
                queued = [a.task for a in answers if not isinstance(a, BloomError) and a.task.status == "queued"]
                if queued:
                    self.on_queued(queued)

            done = [CompleteOp(task_id, fence, completion, new_id(), new_id(), self.retry_delay)
                    for task_id, fence, completion in m.items]
            return self.change(m.reply, m.actor, *done, many=True, key=min(task_id for task_id, _, _ in m.items),
                               after=retried)

        if isinstance(m, RequeueTask):
            return self.change(m.reply, m.actor, RequeueOp(m.task_id), key=m.task_id, after=lambda task: self.on_queued([task]))

        if isinstance(m, CancelTask):
            return self.change(m.reply, m.actor, CancelOp(m.task_id), key=m.task_id)

        return None
