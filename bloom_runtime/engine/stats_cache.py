"""Counts by status, exact while they are cheap and from a recent snapshot once they are not.

Counting a million tasks by status takes a PostgreSQL scan of tens of
milliseconds; a dashboard polling /stats must not pay that on every request.
While one count costs less than ``CHEAP_MS`` it is taken on every call; past
that, callers get the latest snapshot (at most ``MAX_AGE_S`` old) while one
thread at a time refreshes it in the background.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

CHEAP_MS = 5.0
MAX_AGE_S = 2.0


def summarize(counts: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, Any]]:
    """The /stats answer from counts by status: totals and ``by_status`` (the first
    version's structure, with its ``leases.active`` and ``workers.online``), the same
    counts also flat beside them."""

    def entity(by_status: Mapping[str, int], **highlights: int) -> dict[str, Any]:
        return {"total": sum(by_status.values()), **highlights, "by_status": dict(by_status), **by_status}

    tasks, leases, workers = counts["tasks"], counts["leases"], counts["workers"]
    return {
        "tasks": entity(tasks),
        "leases": entity(leases, active=leases.get("active", 0)),
        "workers": entity(workers, online=workers.get("online", 0)),
    }


class StatsCache:
    def __init__(self, compute: Callable[[], dict[str, Any]], *, cheap_ms: float = CHEAP_MS, max_age_s: float = MAX_AGE_S) -> None:
        self._compute = compute
        self.cheap_ms = cheap_ms
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._snapshot: dict[str, Any] | None = None
        self._taken_at = 0.0
        self._cost_ms = 0.0
        self._refreshing = False

    def _take(self) -> dict[str, Any]:
        started = time.perf_counter()
        value = self._compute()
        cost = (time.perf_counter() - started) * 1000
        with self._lock:
            self._snapshot, self._taken_at, self._cost_ms = value, time.monotonic(), cost
        return value

    def get(self) -> dict[str, Any]:
        with self._lock:
            snapshot, age, cost = self._snapshot, time.monotonic() - self._taken_at, self._cost_ms
            if snapshot is None or cost < self.cheap_ms:
                refresh_inline, refresh_behind = True, False
            else:
                refresh_inline = False
                refresh_behind = age > self.max_age_s and not self._refreshing
                if refresh_behind:
                    self._refreshing = True
        if refresh_inline:
            return self._take()
        if refresh_behind:
            threading.Thread(target=self._refresh_behind, name="stats-refresh", daemon=False).start()
        return snapshot  # type: ignore[return-value]

    def _refresh_behind(self) -> None:
        try:
            self._take()
        except Exception as exc:  # the next call tries again; callers keep the last snapshot
            log.warning("stats refresh failed: %s", exc)
        finally:
            with self._lock:
                self._refreshing = False
