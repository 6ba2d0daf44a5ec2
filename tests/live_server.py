"""``serve``'s engine, app and waitress server in the test process, on a free loopback port.

Tests that are about the HTTP edge (what waitress itself refuses, real sockets,
real threads filling up) talk to this over real HTTP; unlike a ``serve``
subprocess it lets the test reach the engine and the app.
"""

from __future__ import annotations

import threading
from typing import Any

from bloom_runtime.engine.engine import Engine
from bloom_runtime.engine.settings import Settings
from bloom_runtime.http.server import close_connections, make_server

STOP_TIMEOUT_S = 10.0


class LiveServer:
    """Start with ``LiveServer(settings)``; ``url`` is the API base; ``close()`` stops everything."""

    def __init__(self, settings: Settings, *, engine: Engine | None = None) -> None:
        settings = settings.replace(host="127.0.0.1", port=0)
        self.engine = engine or Engine.start(settings)
        try:
            self.server, self.app = make_server(self.engine, settings)
        except BaseException:
            self.engine.stop()
            raise
        self.port: int = self.server.effective_port
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + "/api/runtime"
        self._loop = threading.Thread(target=self.server.run, name=f"live-server-{self.port}", daemon=True)
        self._loop.start()

    def close(self) -> None:
        try:
            if self._loop.is_alive():
                close_connections(self.server)
                self._loop.join(STOP_TIMEOUT_S)
            self.server.task_dispatcher.shutdown(timeout=STOP_TIMEOUT_S)
            if not self._loop.is_alive():
                self.server.trigger.close()
        finally:
            self.engine.stop()
        assert not self._loop.is_alive(), "waitress loop did not stop"

    def __enter__(self) -> LiveServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
