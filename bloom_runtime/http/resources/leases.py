"""Leases: the read side (grants and renewals go through tasks and workers)."""

from __future__ import annotations

import falcon

from bloom_runtime.engine.engine import Engine
from bloom_runtime.http.util import query_ids, query_int, query_str, send_page


class Leases:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = query_int(req, "limit")
        page = self.engine.leases.list(
            query_str(req, "status"), limit, query_str(req, "cursor"), task_ids=query_ids(req, "task_id", "task")
        )
        send_page(req, resp, page, limit)


class ExpiredLeases:
    """Recent expiries: the latest expiry first."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = query_int(req, "limit")
        send_page(req, resp, self.engine.leases.expired(limit, query_str(req, "cursor")), limit)
