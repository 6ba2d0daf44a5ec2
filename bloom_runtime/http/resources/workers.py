"""The worker registry, and pull-mode claims."""

from __future__ import annotations

import falcon
import msgspec

from bloom_runtime.engine.engine import Engine
from bloom_runtime.engine.models import LeaseGrant, WorkerUpsert
from bloom_runtime.http import schemas
from bloom_runtime.http.util import actor, body, is_admin, path_id, query_str, send


class WorkerCollection:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        send(resp, self.engine.workers.list(query_str(req, "status")))

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        reg: schemas.WorkerRegistration = body(req, schemas.WorkerRegistration)
        fields = {f: getattr(reg, f) for f in schemas.WorkerRegistration.__struct_fields__ if f != "name"}
        worker, created = self.engine.workers.register(WorkerUpsert(id=reg.name, **fields), actor=actor(req), admin=is_admin(req))
        send(resp, worker, 201 if created else 200)


class WorkerItem:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_get(self, req: falcon.Request, resp: falcon.Response, worker_id: str) -> None:
        worker_id = path_id(worker_id, "worker")
        worker = self.engine.workers.get(worker_id)
        send(resp, schemas.WorkerDetail(**msgspec.structs.asdict(worker), leases=self.engine.workers.leases(worker_id)))

    def on_delete(self, req: falcon.Request, resp: falcon.Response, worker_id: str) -> None:
        worker = self.engine.workers.remove(path_id(worker_id, "worker"), actor=actor(req))
        send(resp, schemas.RemovedWorker(**msgspec.structs.asdict(worker)))


class WorkerClaim:
    """Long poll: 200 {task, lease, lease_token} (a list of them with ``max_tasks``) as soon as
    a task is leased to this worker, 204 after the wait."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_post(self, req: falcon.Request, resp: falcon.Response, worker_id: str) -> None:
        worker_id = path_id(worker_id, "worker")
        ask: schemas.ClaimRequest = body(req, schemas.ClaimRequest)
        wait_s = ask.wait_seconds
        if getattr(req.context, "short_poll", False):
            # Over the long-poll budget: answer at once so threads stay free for heartbeats.
            wait_s = 0
            resp.set_header("Retry-After", "1")
        if ask.max_tasks is not None:
            grants = self.engine.leases.claim(worker_id, wait_s, ask.ttl_seconds, actor=worker_id, max_tasks=ask.max_tasks)
            if not grants:
                resp.status = 204
                return
            send(resp, [self._answer(g) for g in grants])
            return
        grant = self.engine.leases.claim(worker_id, wait_s, ask.ttl_seconds, actor=worker_id)
        if grant is None:
            resp.status = 204
            return
        send(resp, self._answer(grant))

    def _answer(self, grant: LeaseGrant) -> schemas.TaskLease:
        """A grant as the worker gets it: with its lease's token."""
        return schemas.TaskLease(task=grant.task, lease=grant.lease, lease_token=self.engine.leases.token(grant.lease.id))
