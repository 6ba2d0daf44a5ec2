"""The audit log, newest first."""

from __future__ import annotations

import falcon

from bloom_runtime.engine.engine import Engine
from bloom_runtime.http.util import path_id, query_int, query_name, query_str, send_page


class Audit:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = query_int(req, "limit")
        entity = query_str(req, "entity_id")
        if entity is not None:
            path_id(entity, "entity")
        page = self.engine.audit.list(limit, query_str(req, "cursor"), entity, query_name(req, "action"))
        send_page(req, resp, page, limit)
