"""Retry delay for tasks whose attempt failed: exponential, capped, with jitter."""

from __future__ import annotations

import random
from collections.abc import Callable


class RetryBackoff:
    """``delay_ms(attempts)`` = min(cap, base × 2^(attempts-1)) plus up to ``jitter`` of it.

    The random source is injectable so tests can assert exact delays.
    """

    def __init__(
        self,
        base_ms: int = 1000,
        cap_ms: int = 60_000,
        jitter: float = 0.2,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.base_ms = base_ms
        self.cap_ms = cap_ms
        self.jitter = jitter
        self._rand = rand

    def delay_ms(self, attempts: int) -> int:
        exp = min(max(attempts - 1, 0), 30)
        delay = min(self.cap_ms, self.base_ms * (2**exp))
        return int(delay + delay * self.jitter * self._rand())

    __call__ = delay_ms
