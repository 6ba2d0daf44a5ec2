"""Wakes long-polling claimers when a task becomes available."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from bloom_runtime.engine.models import Task


class ClaimWakeup:
    """A generation counter under a condition variable.

    A claimer reads the generation, tries to claim, and if nothing was there
    waits for the generation to move; so a task queued between its try and its
    wait is never missed.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0
        self._closed = False

    @property
    def generation(self) -> int:
        with self._cond:
            return self._generation

    def notify(self, count: int | None = None) -> None:
        """Tasks became claimable: wake ``count`` waiting claimers (None: an unknown
        number, wake them all). One that is not woken sees the moved generation the
        next time it looks, at its next re-check at the latest."""
        with self._cond:
            self._generation += 1
            if count is None:
                self._cond.notify_all()
            else:
                self._cond.notify(count)

    def queued(self, tasks: Sequence[Task]) -> None:
        """These tasks became claimable. One claimer per task is woken, not every idle one;
        all of them when a task needs labels, since a claimer woken might not have them."""
        self.notify(None if any(t.labels for t in tasks) else len(tasks))

    def wait(self, seen: int, timeout_s: float) -> bool:
        """Wait until the generation differs from ``seen``; False on timeout or close."""
        with self._cond:
            self._cond.wait_for(lambda: self._generation != seen or self._closed, timeout=max(timeout_s, 0))
            return self._generation != seen and not self._closed

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed
