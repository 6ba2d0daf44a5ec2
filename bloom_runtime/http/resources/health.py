"""Liveness: the engine's health plus the membridge client state; 503 when unhealthy."""

from __future__ import annotations

from typing import Any

import falcon

from bloom_runtime.engine.engine import Engine
from bloom_runtime.http.util import send


def membridge_state(engine: Engine) -> dict[str, Any]:
    """The membridge client's state when one is wired (``state()``), else ``configured: false``."""
    client = engine.membridge
    if client is None:
        return {"configured": False}
    state = getattr(client, "state", None)
    try:
        value = state() if callable(state) else {}
    except Exception:  # a broken client must not break /health
        value = {"error": "state unavailable"}
    return {"configured": True, **(value if isinstance(value, dict) else {})}


class Health:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        report = self.engine.health()  # public words only: details stay in the server log
        report["membridge"] = membridge_state(self.engine)
        report["dispatch"] = self.engine.dispatch.state()
        send(resp, report, 200 if report["status"] == "ok" else 503)
