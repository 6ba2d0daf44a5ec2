"""Pass-through to the membridge control plane (stub: answers 503 until the client is wired)."""

from __future__ import annotations

import falcon

from bloom_runtime.engine.engine import Engine
from bloom_runtime.http.util import send


def _unavailable(resp: falcon.Response) -> None:
    send(resp, {"error": "membridge not configured"}, 503)
    resp.set_header("Retry-After", "60")


class MembridgeRead:
    """GET pass-through routes; the membridge engineer replaces the bodies."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_get(self, req: falcon.Request, resp: falcon.Response, **params: str) -> None:
        _unavailable(resp)


class MembridgeWrite:
    """POST pass-through routes (leadership changes: admin)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_post(self, req: falcon.Request, resp: falcon.Response, **params: str) -> None:
        _unavailable(resp)
