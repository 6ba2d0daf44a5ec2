"""Artifacts, results, and runs (the newest tasks, as the first version lists them)."""

from __future__ import annotations

import falcon

from bloom_runtime.engine.engine import Engine
from bloom_runtime.http.util import path_id, query_int, query_str, send_page

RUNS_PAGE = 50  # what the first version's /runs returns


def _task_filter(req: falcon.Request) -> str | None:
    task_id = query_str(req, "task_id")
    return path_id(task_id, "task") if task_id is not None else None


class Artifacts:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = query_int(req, "limit")
        send_page(req, resp, self.engine.tasks.artifacts(_task_filter(req), limit, query_str(req, "cursor")), limit)


class Results:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = query_int(req, "limit")
        send_page(req, resp, self.engine.tasks.results(_task_filter(req), limit, query_str(req, "cursor")), limit)


class Runs:
    """The first version's /runs: its 50 newest tasks; here pageable as /llm-tasks is."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = query_int(req, "limit")
        limit = RUNS_PAGE if limit is None else limit
        send_page(req, resp, self.engine.tasks.list(None, limit, query_str(req, "cursor")), limit)
