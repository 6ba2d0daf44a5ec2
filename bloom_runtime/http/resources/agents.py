"""A worker's membridge agent: health, self-update, restart, uninstall (``engine.agent_admin``)."""

from __future__ import annotations

import falcon
import msgspec

from bloom_runtime.engine.engine import Engine
from bloom_runtime.http import schemas
from bloom_runtime.http.resources.membridge import guarded
from bloom_runtime.http.util import actor, body, path_id, send


class AgentHealth:
    """Always 200 once the worker has a URL: ``reachable`` says how the agent answered."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_get(self, req: falcon.Request, resp: falcon.Response, worker_id: str) -> None:
        send(resp, self.engine.agent_admin.health(path_id(worker_id, "worker"), actor=actor(req)))


class AgentControl:
    """POST agent-update | agent-restart | agent-uninstall: the agent's answer, 502 if it gave none."""

    def __init__(self, engine: Engine, name: str) -> None:
        self.engine = engine
        self.name = name

    def on_post(self, req: falcon.Request, resp: falcon.Response, worker_id: str) -> None:
        worker_id = path_id(worker_id, "worker")
        payload = {}
        if self.name == "update":
            payload = msgspec.to_builtins(body(req, schemas.AgentUpdateRequest))
        out = guarded(resp, lambda: self.engine.agent_admin.control(worker_id, self.name, payload, actor(req)))
        if out is not None:
            send(resp, out)
