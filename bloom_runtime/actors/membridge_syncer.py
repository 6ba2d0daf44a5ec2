"""MembridgeSyncer: polls membridge ``GET /agents`` and sends the workers it sees to the registry."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pykka

from bloom_runtime.actors.base import JobHealth, Record, Tick
from bloom_runtime.engine.clock import Clock

log = logging.getLogger(__name__)


class MembridgeSyncer(pykka.ThreadingActor):
    def __init__(
        self,
        clock: Clock,
        *,
        health: JobHealth,
        registry: Callable[[], Any],
        audit_sink: Callable[[Record], None],
        client: Callable[[], Any],
        offline_after_ms: int,
    ) -> None:
        super().__init__()
        self.clock = clock
        self.health = health
        self._registry = registry
        self._audit_sink = audit_sink
        self._client = client
        self.offline_after_ms = offline_after_ms

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Tick):
            if self._client() is None:
                return None
            try:
                self.sync()
            except Exception as exc:
                self.health.failed(exc)
                log.warning("membridge sync failed: %s", exc)
                return None
            self.health.succeeded(self.clock.now_ms())
        return None

    def sync(self) -> int:
        """One sync; returns the number of agents seen."""
        return 0
