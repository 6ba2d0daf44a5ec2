"""The runtime's history for charts: recorded minutes, plus the current one counted live.

The ``HistorySampler`` actor records each minute once it closes; this facade reads
them, adds the minute in progress and groups minutes into buckets. Depths of a
bucket are the largest seen in it (peaks matter more than averages on a queue);
counts are summed.
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING

from bloom_runtime.actors.base import Tick
from bloom_runtime.actors.history_sampler import MINUTE_MS, closed_minutes, minute_of
from bloom_runtime.engine.errors import InvalidInput
from bloom_runtime.engine.models import UNFINISHED_STATUSES, HistoryPoint, HistoryWindow, OldestQueued, QueueState
from bloom_runtime.sql.store import HISTORY_COLUMNS

if TYPE_CHECKING:
    from bloom_runtime.engine.engine import Engine

MAX_POINTS = 1440  # buckets one answer may hold
DEFAULT_POINTS = 120  # when the caller names no bucket size
LIVE_MAX_AGE_MS = 2000  # the current minute is counted at most this often


class HistoryService:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._live: tuple[int, HistoryPoint] | None = None  # (counted at, the current minute so far)

    @property
    def max_minutes(self) -> int:
        return int(self._engine.settings.history_retention_days * 1440)

    def sample_now(self) -> int:
        """Record the closed minutes now; returns the rows written (0: already recorded)."""
        return self._engine.call("history", lambda r: Tick(r))

    def window(self, minutes: int = 60, bucket_minutes: int | None = None) -> HistoryWindow:
        """The last ``minutes`` (the current one included) in buckets of ``bucket_minutes``."""
        if not 1 <= minutes <= self.max_minutes:
            raise InvalidInput(f"minutes must be between 1 and {self.max_minutes} (the retention)")
        bucket = bucket_minutes if bucket_minutes is not None else max(1, math.ceil(minutes / DEFAULT_POINTS))
        if not 1 <= bucket <= minutes:
            raise InvalidInput("bucket_minutes must be between 1 and minutes")
        count = math.ceil(minutes / bucket)
        if count > MAX_POINTS:
            raise InvalidInput(f"at most {MAX_POINTS} buckets: raise bucket_minutes")
        now = self._engine.clock.now_ms()
        current = minute_of(now)
        end = current + MINUTE_MS
        start = end - count * bucket * MINUTE_MS
        by_minute = {p.at: p for p in self._engine.store.history(start, current)}
        by_minute[current] = self._current(now, current)
        points = []
        for k in range(count):
            at = start + k * bucket * MINUTE_MS
            members = [p for m in range(at, at + bucket * MINUTE_MS, MINUTE_MS) if (p := by_minute.get(m)) is not None]
            points.append(_bucket(at, members))
        return HistoryWindow(minutes=minutes, bucket_minutes=bucket, start=start, end=end, points=points)

    def _current(self, now: int, current: int) -> HistoryPoint:
        with self._lock:
            cached = self._live
        if cached is not None and cached[1].at == current and now - cached[0] < LIVE_MAX_AGE_MS:
            return cached[1]
        store = self._engine.store
        point = closed_minutes(store, current, current + MINUTE_MS, store.live_depth())[0]
        with self._lock:
            self._live = (now, point)
        return point

    def queue(self) -> QueueState:
        """The unfinished tasks by status, and the oldest queued one with its age."""
        store = self._engine.store
        depth = store.live_depth()
        oldest = store.oldest_queued()
        head = None
        if oldest is not None:
            head = OldestQueued(id=oldest[0], created_at=oldest[1], age_ms=max(0, self._engine.clock.now_ms() - oldest[1]))
        return QueueState(**depth, oldest_queued=head)


def _bucket(at: int, members: list[HistoryPoint]) -> HistoryPoint:
    values: dict[str, int | None] = {}
    for column in HISTORY_COLUMNS:
        seen = [v for p in members if (v := getattr(p, column)) is not None]
        if column in UNFINISHED_STATUSES:
            values[column] = max(seen) if seen else None
        else:
            values[column] = sum(seen)
    return HistoryPoint(at=at, **values)  # type: ignore[arg-type]
