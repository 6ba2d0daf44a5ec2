"""Wakes long-polling claimers when a task becomes available."""

from __future__ import annotations

import threading


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
        """Tasks became claimable (``count`` of them; None: an unknown number)."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

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
