"""Runtime configuration: membridge URL and admin key (shown masked), persisted in runtime_settings,
and the connection test whose outcome it shows.

The logic lives in ``MembridgeService`` (engine.membridge): these resources only
decode and encode.
"""

from __future__ import annotations

import falcon

from bloom_runtime.engine.engine import Engine
from bloom_runtime.engine.settings import Settings
from bloom_runtime.http import schemas
from bloom_runtime.http.util import actor, body, is_admin, send


class Config:
    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        send(resp, schemas.ConfigView(**self.engine.membridge.get_config(show_key=is_admin(req))))

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        update: schemas.ConfigUpdate = body(req, schemas.ConfigUpdate)
        view = self.engine.membridge.update_config(update.membridge_server_url, update.admin_key, actor=actor(req))
        send(resp, schemas.ConfigView(**view))


class TestConnection:
    """GET membridge /health through the hardened client; 200 whether it answered or not."""

    __test__ = False  # a resource, not a pytest class

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        send(resp, schemas.ConnectionTestResult(**self.engine.membridge.test_connection()))
