"""The runtime's history in time buckets, and the queue now (for overview charts and alerts)."""

from __future__ import annotations

import falcon

from bloom_runtime.engine.engine import Engine
from bloom_runtime.http.util import query_int, send


class History:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        minutes = query_int(req, "minutes")
        window = self.engine.history.window(60 if minutes is None else minutes, query_int(req, "bucket_minutes"))
        send(resp, window)


class Queue:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        send(resp, self.engine.history.queue())
