"""Runtime configuration: membridge URL and admin key (shown masked), persisted in runtime_settings."""

from __future__ import annotations

import falcon

from bloom_runtime.engine.engine import Engine
from bloom_runtime.engine.models import AuditEntry, new_id
from bloom_runtime.engine.settings import Settings, mask
from bloom_runtime.engine.urls import AllowList, validate_outgoing_url
from bloom_runtime.http import schemas
from bloom_runtime.http.util import actor, body, send

URL_KEY = "membridge_server_url"
ADMIN_KEY = "membridge_admin_key"


class Config:
    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings

    def _view(self) -> schemas.ConfigView:
        stored = self.engine.store.get_settings()
        url = stored.get(URL_KEY) or self.settings.membridge_server_url
        key = stored.get(ADMIN_KEY)
        if key is None and self.settings.membridge_admin_key is not None:
            key = self.settings.membridge_admin_key.reveal()
        return schemas.ConfigView(membridge_server_url=url, admin_key=mask(key), configured=bool(url))

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        send(resp, self._view())

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        update: schemas.ConfigUpdate = body(req, schemas.ConfigUpdate)
        values: dict[str, str] = {}
        if update.membridge_server_url is not None:
            allowed = AllowList.parse(self.settings.membridge_allowed_hosts) if self.settings.membridge_allowed_hosts else None
            values[URL_KEY] = validate_outgoing_url(update.membridge_server_url, allowed)
        if update.admin_key is not None:
            values[ADMIN_KEY] = update.admin_key
        if values:
            self.engine.store.run(lambda tx: tx.set_settings(values))
            changed = ",".join(sorted(values))  # names only: never the key itself
            self.engine.record([
                AuditEntry(
                    id=new_id(), timestamp=self.engine.clock.now_ms(), action="config_updated",
                    entity_type="config", entity_id="runtime", actor=actor(req), detail=f"changed={changed}",
                )
            ])
        send(resp, self._view())


class TestConnection:
    """GET membridge /health through the hardened client (stub until the client is wired)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        client = self.engine.membridge
        test = getattr(client, "test_connection", None)
        if not callable(test):
            send(resp, {"error": "membridge not configured"}, 503)
            return
        send(resp, test())
