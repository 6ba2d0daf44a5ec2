"""HistorySampler: owns ``runtime_history``; records each minute once it has closed.

A row holds the unfinished tasks by status seen just after its minute closed, and
what happened within it (tasks created, results by outcome, leases expired),
counted from the stored rows. Counts can be rebuilt later, depths cannot: minutes
missed while no engine ran are filled in with their counts only, up to
``BACKFILL_MINUTES`` back. Several processes may sample one database; the first row
of a minute stands. Rows past the retention are pruned as new ones are written.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import pykka

from bloom_runtime.actors.base import JobHealth, Tick
from bloom_runtime.engine.clock import Clock
from bloom_runtime.engine.models import UNFINISHED_STATUSES, HistoryPoint
from bloom_runtime.sql.store import Store

log = logging.getLogger(__name__)

MINUTE_MS = 60_000
BACKFILL_MINUTES = 60  # after downtime: how far back the counts are rebuilt


def minute_of(ms: int) -> int:
    """The start of the minute ``ms`` falls in."""
    return ms // MINUTE_MS * MINUTE_MS


def closed_minutes(store: Store, start: int, end: int, depth: dict[str, int] | None) -> list[HistoryPoint]:
    """The minutes in ``[start, end)`` with their counts; ``depth`` goes to the last one."""
    counts = store.activity(start, end)
    unsampled = dict.fromkeys(UNFINISHED_STATUSES, None)
    last = end - MINUTE_MS
    return [
        HistoryPoint(at=m, **(depth if depth is not None and m == last else unsampled), **counts.get(m, {}))
        for m in range(start, end, MINUTE_MS)
    ]


class HistorySampler(pykka.ThreadingActor):
    """Ticked every few seconds; writes the minutes closed since the last one it knows."""

    def __init__(self, store: Store, clock: Clock, health: JobHealth, *, retention_ms: int) -> None:
        super().__init__()
        self.store = store
        self.clock = clock
        self.health = health
        self.retention_ms = retention_ms
        self._last: int | None = None  # the latest minute known to be recorded

    def on_receive(self, message: Any) -> Any:
        if not isinstance(message, Tick):
            return None
        try:
            written = self.sample()
        except Exception as exc:  # a failed sample is retried next tick; the actor stays up
            self.health.failed(exc)
            log.warning("history sample failed: %s", exc)
            if message.reply is not None:
                message.reply.set_exception(sys.exc_info())
            return None
        self.health.succeeded(self.clock.now_ms())
        if message.reply is not None:
            message.reply.set(written)
        return None

    def sample(self) -> int:
        """Record every closed minute not yet recorded; returns the rows written."""
        now = self.clock.now_ms()
        current = minute_of(now)
        closed = current - MINUTE_MS
        last = self._last if self._last is not None else self.store.last_history_minute()
        start = closed - (BACKFILL_MINUTES - 1) * MINUTE_MS
        if last is not None:
            start = max(start, last + MINUTE_MS)
        if start > closed:
            return 0
        points = closed_minutes(self.store, start, current, self.store.live_depth())
        with self.store.transaction() as tx:
            written = tx.record_history(points, now)
            tx.prune_history(current - self.retention_ms)
        self._last = closed
        return written
