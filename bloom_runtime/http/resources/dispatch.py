"""Push dispatch to a worker agent, and the callback routes the agent uses.

``POST /api/runtime/llm-tasks/{task_id}/dispatch`` leases the task and hands the
delivery to the Dispatcher, answering at once (202) with the delivery and where
to watch it, or, with ``wait_seconds``, once the agent answered. The agent is
given ``runtime_url = RUNTIME_PUBLIC_URL + /api/leases/{lease_id}/{lease_token}``
and appends its usual paths (``/api/runtime/llm-tasks/{id}/heartbeat`` and
``/complete``) to it: those routes need no API key (the token is the
credential, good for that lease only), and a late callback from an agent whose
lease has expired gets 409 though the agent names no lease in its body.
"""

from __future__ import annotations

import falcon

from bloom_runtime.engine.dispatch import TAKEN
from bloom_runtime.engine.engine import Engine
from bloom_runtime.engine.errors import StaleLease
from bloom_runtime.engine.models import Fence, Lease
from bloom_runtime.http import schemas
from bloom_runtime.http.resources.membridge import guarded
from bloom_runtime.http.util import actor, body, path_id, send

BASE = "/api/runtime"

# HTTP status of a dispatch answer by delivery state: in flight, taken, not taken, unknown.
STATUS_BY_STATE = {"sent": 202, "answered": 200, "agent_error": 200, "callback_missing": 200,
                   "refused": 502, "unreachable": 502, "unknown": 504}


class TaskDispatch:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_post(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        task_id = path_id(task_id, "task")
        ask: schemas.DispatchRequest = body(req, schemas.DispatchRequest)
        wait_s = 0.0 if getattr(req.context, "short_poll", False) else ask.wait_seconds  # over the long-poll budget
        out = guarded(resp, lambda: self.engine.dispatch.dispatch(task_id, ask.worker_id, ask.ttl_seconds, wait_s=wait_s,
                                                                  actor=actor(req)))
        if out is None:
            return
        d = out.delivery
        status = STATUS_BY_STATE[d.state]
        error = None
        if status >= 500:
            error = f"dispatch to worker {d.worker_id} {d.state}" + (f": {d.detail}" if d.detail else "")
            resp.set_header("Retry-After", "1")
        watch = {"task": f"{BASE}/llm-tasks/{d.task_id}", "result": f"{BASE}/llm-tasks/{d.task_id}/result",
                 "audit": f"{BASE}/audit?entity_id={d.task_id}"}
        send(resp, schemas.DispatchResponse(
            dispatched=d.state in TAKEN, task_id=d.task_id, worker_id=d.worker_id, lease_id=d.lease_id, task=out.task,
            lease=self.engine.leases.get(d.lease_id), worker=out.worker, delivery=d, watch=watch,
            lease_token=out.lease_token, execution=out.execution, error=error,
        ), status)


def _lease_fence(lease_id: str, named_lease: str | None, worker_id: str | None) -> Fence:
    lease_id = path_id(lease_id, "lease")
    if named_lease is not None and named_lease != lease_id:
        raise StaleLease("the body names another lease than the callback URL", lease_id=lease_id)
    return Fence(lease_id=lease_id, worker_id=worker_id)


def _token_fence(lease: Lease, token: str, named_lease: str | None) -> Fence:
    """The fence of a token callback (the token was checked by ``leases.callback``)."""
    return Fence(lease_id=_lease_fence(lease.id, named_lease, None).lease_id, lease_token=token)


class TokenHeartbeat:
    """``/api/leases/{lease_id}/{lease_token}/api/runtime/llm-tasks/{task_id}/heartbeat``: no API key,
    the token is the credential and is good for this lease only (empty body allowed)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_post(self, req: falcon.Request, resp: falcon.Response, lease_id: str, lease_token: str, task_id: str) -> None:
        held = self.engine.leases.callback(path_id(lease_id, "lease"), lease_token)  # 401 before anything else
        task_id = path_id(task_id, "task")
        given: Fence = body(req, Fence)
        fence = _token_fence(held, lease_token, given.lease_id)
        task, lease = self.engine.leases.heartbeat(task_id, fence, actor=held.worker_id)
        send(resp, schemas.HeartbeatAnswer.of(task, lease))


class TokenComplete:
    """``/api/leases/{lease_id}/{lease_token}/api/runtime/llm-tasks/{task_id}/complete``: no API key."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_post(self, req: falcon.Request, resp: falcon.Response, lease_id: str, lease_token: str, task_id: str) -> None:
        held = self.engine.leases.callback(path_id(lease_id, "lease"), lease_token)  # 401 before anything else
        task_id = path_id(task_id, "task")
        done: schemas.CompleteRequest = body(req, schemas.CompleteRequest)
        fence = _token_fence(held, lease_token, done.lease_id)
        out = self.engine.tasks.complete(task_id, done.completion(), fence, actor=held.worker_id)
        send(resp, schemas.CompleteResponse(task=out.task, result=out.result, artifact=out.artifact))


class LeaseHeartbeat:
    """``/api/leases/{lease_id}/api/runtime/llm-tasks/{task_id}/heartbeat`` (empty body allowed)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_post(self, req: falcon.Request, resp: falcon.Response, lease_id: str, task_id: str) -> None:
        task_id = path_id(task_id, "task")
        given: Fence = body(req, Fence)
        fence = _lease_fence(lease_id, given.lease_id, given.worker_id)
        task, lease = self.engine.leases.heartbeat(task_id, fence, actor=fence.worker_id or actor(req))
        send(resp, schemas.HeartbeatAnswer.of(task, lease))


class LeaseComplete:
    """``/api/leases/{lease_id}/api/runtime/llm-tasks/{task_id}/complete``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_post(self, req: falcon.Request, resp: falcon.Response, lease_id: str, task_id: str) -> None:
        task_id = path_id(task_id, "task")
        done: schemas.CompleteRequest = body(req, schemas.CompleteRequest)
        fence = _lease_fence(lease_id, done.lease_id, done.worker_id)
        out = self.engine.tasks.complete(task_id, done.completion(), fence, actor=done.worker_id or actor(req))
        send(resp, schemas.CompleteResponse(task=out.task, result=out.result, artifact=out.artifact))
