"""The runtime served for real: an engine behind waitress on a loopback port, in this process.

Push dispatch needs agents to reach the runtime over HTTP (their callbacks), so
end-to-end tests start one of these; ``public_url`` is its own address.
"""

from __future__ import annotations

import threading
from typing import Any

import requests
from waitress import create_server, wasyncore

from bloom_runtime.engine.clock import Clock
from bloom_runtime.engine.engine import Engine
from bloom_runtime.engine.settings import Settings
from bloom_runtime.http import create_app


class RuntimeServer:
    """``with RuntimeServer(settings=…) as rt:`` … ``rt.url``, ``rt.engine``, ``rt.http`` (a session with the key)."""

    def __init__(self, *, api_key: str | None = None, threads: int = 16, clock: Clock | None = None, **settings: Any) -> None:
        self._server = create_server(lambda env, start: [], host="127.0.0.1", port=0, threads=threads)  # app set below
        self.url = f"http://127.0.0.1:{self._server.effective_port}"
        self.settings = Settings(**{"public_url": self.url, "threads": threads, **settings})
        self.engine = Engine.start(self.settings, clock=clock) if clock is not None else Engine.start(self.settings)
        self._server.application = create_app(self.engine, self.settings)
        self._thread = threading.Thread(target=self._server.run, name=f"runtime-{self._server.effective_port}")
        self._thread.start()
        self.http = requests.Session()
        self.http.trust_env = False
        if api_key:
            self.http.headers["X-Runtime-API-Key"] = api_key

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 40)
        return self.http.request(method, f"{self.url}/api/runtime{path}", **kwargs)

    def close(self) -> None:
        self.http.close()
        self._server.trigger.pull_trigger(lambda: wasyncore.close_all(self._server._map, ignore_all=True))
        self._thread.join(timeout=10)
        self._server.task_dispatcher.shutdown()
        self.engine.stop()

    def __enter__(self) -> RuntimeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
