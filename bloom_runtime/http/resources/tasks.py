"""Tasks: create (idempotent), list, read, and the worker-side lease lifecycle calls."""

from __future__ import annotations

import falcon
import msgspec

from bloom_runtime.engine.engine import Engine
from bloom_runtime.engine.errors import BloomError, InvalidInput
from bloom_runtime.engine.models import CompletionOutcome, Fence, NewTask
from bloom_runtime.http import schemas
from bloom_runtime.http.errors import status_for
from bloom_runtime.http.util import actor, body, path_id, query_int, query_name, query_str, send, send_page

IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY_LEN = 255


class TaskCollection:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        new: NewTask | list[NewTask] = body(req, schemas.CreateBody)
        key = req.get_header(IDEMPOTENCY_HEADER)
        if isinstance(new, list):
            if key is not None:
                raise InvalidInput(f"a list of tasks takes idempotency_key per task, not an {IDEMPOTENCY_HEADER} header")
            answers = self.engine.tasks.create_many(new, actor=actor(req))
            made = [schemas.CreatedTask(task=task, created=created) for task, created in answers]
            send(resp, made, 201 if any(m.created for m in made) else 200)
            return
        if key is not None:
            key = key.strip()
            if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LEN:
                raise InvalidInput(f"{IDEMPOTENCY_HEADER} must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters")
            if new.idempotency_key is not None and new.idempotency_key != key:
                raise InvalidInput(f"{IDEMPOTENCY_HEADER} header and idempotency_key field differ")
            new = msgspec.structs.replace(new, idempotency_key=key)
        task, created = self.engine.tasks.create(new, actor=actor(req))
        send(resp, task, 201 if created else 200)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = query_int(req, "limit")
        page = self.engine.tasks.list(
            query_str(req, "status"), limit, query_str(req, "cursor"),
            context_id=query_name(req, "context_id"), agent_slug=query_name(req, "agent_slug"),
        )
        send_page(req, resp, page, limit)


class TaskItem:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_get(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        task = self.engine.tasks.get(path_id(task_id, "task"))
        delivery = self.engine.dispatch.latest(task.id)
        send(resp, schemas.TaskView(**msgspec.structs.asdict(task), delivery=delivery))


class TaskLease:
    """Push mode: lease a queued task to a named or picked worker."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_post(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        task_id = path_id(task_id, "task")
        ask: schemas.LeaseRequest = body(req, schemas.LeaseRequest)
        grant = self.engine.leases.acquire(task_id, ask.worker_id, ask.ttl_seconds, actor=actor(req))
        worker = self.engine.workers.vouched(grant.worker)
        send(resp, schemas.LeaseResponse(lease=grant.lease, worker=worker, lease_token=self.engine.leases.token(grant.lease.id)), 201)


class TaskHeartbeat:
    """The membridge agent sends no body: then the task's active lease is renewed."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_post(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        task_id = path_id(task_id, "task")
        fence: Fence = body(req, Fence)
        task, lease = self.engine.leases.heartbeat(task_id, fence, actor=fence.worker_id or actor(req))
        send(resp, schemas.HeartbeatAnswer.of(task, lease))


class TaskComplete:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_post(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        task_id = path_id(task_id, "task")
        done: schemas.CompleteRequest = body(req, schemas.CompleteRequest)
        out = self.engine.tasks.complete(task_id, done.completion(), done.fence(), actor=done.worker_id or actor(req))
        send(resp, schemas.CompleteResponse(task=out.task, result=out.result, artifact=out.artifact))


class Completions:
    """Several results in one transaction: one answer per item, in order."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        batch: schemas.CompletionBatch = body(req, schemas.CompletionBatch)
        items = batch.items()
        answers = self.engine.tasks.complete_many(items, actor=batch.worker_id or actor(req))
        send(resp, [_completion_answer(task_id, answer) for (task_id, _, _), answer in zip(items, answers, strict=True)])


def _completion_answer(task_id: str, answer: CompletionOutcome | BloomError) -> schemas.CompletionAnswer:
    if isinstance(answer, BloomError):
        details = {k: v for k, v in answer.details.items() if k != "fence"}  # the item names its own lease
        return schemas.CompletionAnswer(task_id=task_id, ok=False, status=status_for(answer), error=answer.message,
                                        details=details or None)
    return schemas.CompletionAnswer(task_id=task_id, ok=True, status=200, task=answer.task, result=answer.result, artifact=answer.artifact)


class TaskRequeue:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_post(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        send(resp, self.engine.tasks.requeue(path_id(task_id, "task"), actor=actor(req)))


class TaskCancel:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_post(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        send(resp, self.engine.tasks.cancel(path_id(task_id, "task"), actor=actor(req)))


class TaskResult:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_get(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        send(resp, self.engine.tasks.result(path_id(task_id, "task")))
