"""Circuit breakers for outgoing calls: one for the control plane, one per worker agent URL."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import pybreaker

log = logging.getLogger("bloom_runtime.membridge")

BreakerState = Literal["closed", "open", "half-open"]


class _Refused(Exception):
    """The breaker refused an attempt; ``retry_after_s`` is a hint for the caller."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(retry_after_s)
        self.retry_after_s = retry_after_s


class _AttemptFailed(Exception):
    """Replayed into pybreaker to tell it an attempt failed (never escapes)."""


def _replay_success() -> None:
    return None


def _replay_failure() -> None:
    raise _AttemptFailed()


@dataclass(frozen=True)
class _Ticket:
    generation: int
    trial: bool


class _StateListener(pybreaker.CircuitBreakerListener):
    def __init__(self, owner: Breaker) -> None:
        self._owner = owner

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: Any, new_state: Any) -> None:
        self._owner._on_state_change(getattr(old_state, "name", None), new_state.name)


class Breaker:
    """A circuit breaker for one remote endpoint that never holds a lock during I/O.

    pybreaker 1.4's ``CircuitBreaker.call`` holds the breaker's single RLock for
    the whole guarded call. Wrapping a network attempt in it would serialise every
    caller behind the slowest one even while the circuit is closed, and in
    half-open state callers would queue behind a hung trial call instead of
    failing fast. So the attempt runs outside pybreaker: ``admit()`` decides under
    our own short lock whether an attempt may start (closed: yes; open before the
    reset timeout: refuse; open after it: move to half-open and let exactly one
    trial through; half-open with a trial in flight: refuse), and ``record()``
    then replays the outcome through ``CircuitBreaker.call`` with a function that
    returns or raises at once, so pybreaker's own counting and transitions (fail
    counter, fail_max, half-open -> closed/open) apply while its lock is held for
    microseconds. Outcomes of attempts admitted before the last state change are
    dropped: the breaker has already judged that period.
    """

    def __init__(
        self,
        name: str,
        *,
        fail_max: int = 5,
        reset_s: float = 30.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.fail_max = fail_max
        self.reset_s = reset_s
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._generation = 0
        self._opened_at = 0.0
        self._trial_generation: int | None = None
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max, reset_timeout=reset_s, name=name, listeners=[_StateListener(self)]
        )

    def __repr__(self) -> str:
        return f"Breaker({self.name!r}, state={self.state!r})"

    def _on_state_change(self, old: str | None, new: str) -> None:
        # Called by pybreaker inside record()/admit(), so under self._lock.
        self._generation += 1
        if new == pybreaker.STATE_OPEN:
            self._opened_at = self._monotonic()
            log.warning("%s circuit breaker open: calls fail fast for %g s", self.name, self.reset_s)
        elif new == pybreaker.STATE_CLOSED:
            log.info("%s circuit breaker closed: calls succeed again", self.name)

    def admit(self) -> _Ticket:
        """Let one attempt start or raise ``_Refused``; pair every ticket with ``record``."""
        with self._lock:
            state = self._cb.current_state
            if state == pybreaker.STATE_OPEN:
                remaining = self._opened_at + self.reset_s - self._monotonic()
                if remaining > 0:
                    raise _Refused(remaining)
                self._cb.half_open()
                state = pybreaker.STATE_HALF_OPEN
            if state == pybreaker.STATE_HALF_OPEN:
                if self._trial_generation == self._generation:
                    raise _Refused(self.reset_s)  # one trial at a time; it decides
                self._trial_generation = self._generation
                return _Ticket(self._generation, trial=True)
            return _Ticket(self._generation, trial=False)

    def record(self, ticket: _Ticket, *, ok: bool) -> None:
        """Feed the outcome of an admitted attempt to the breaker."""
        with self._lock:
            if ticket.trial and self._trial_generation == ticket.generation:
                self._trial_generation = None
            if ticket.generation != self._generation:
                return
            try:
                self._cb.call(_replay_success if ok else _replay_failure)
            except (_AttemptFailed, pybreaker.CircuitBreakerError):
                pass  # the outcome is already known; pybreaker re-raises it or reports the trip

    def retry_after_s(self) -> float | None:
        """Seconds until a trial call may start while open; None when not open."""
        with self._lock:
            if self._cb.current_state != pybreaker.STATE_OPEN:
                return None
            remaining = self._opened_at + self.reset_s - self._monotonic()
            return remaining if remaining > 0 else None

    def is_open(self) -> bool:
        """True while attempts are refused outright (open, reset timeout not elapsed)."""
        return self.state == "open"

    @property
    def state(self) -> BreakerState:
        """``closed``, ``open``, or ``half-open`` (also once the reset timeout has elapsed)."""
        with self._lock:
            state = self._cb.current_state
            if state == pybreaker.STATE_OPEN and self._monotonic() >= self._opened_at + self.reset_s:
                return "half-open"
            return state  # type: ignore[return-value]

    @property
    def fail_counter(self) -> int:
        """Consecutive failed attempts as pybreaker counts them."""
        return self._cb.fail_counter


class BreakerRegistry:
    """One ``Breaker`` per key (a worker's base URL), so one dead node cannot make
    the others look down. Bounded: beyond ``max_entries`` the oldest closed
    breakers are forgotten.
    """

    def __init__(
        self,
        *,
        fail_max: int = 5,
        reset_s: float = 30.0,
        max_entries: int = 1024,
        name_prefix: str = "worker agent",
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fail_max = fail_max
        self.reset_s = reset_s
        self.max_entries = max_entries
        self._name_prefix = name_prefix
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._breakers: OrderedDict[str, Breaker] = OrderedDict()

    def get(self, key: str) -> Breaker:
        """Return the breaker for ``key``, creating it closed on first use."""
        with self._lock:
            breaker = self._breakers.get(key)
            if breaker is not None:
                self._breakers.move_to_end(key)
                return breaker
            if len(self._breakers) >= self.max_entries:
                for old_key, old in list(self._breakers.items()):
                    if old.state == "closed":
                        del self._breakers[old_key]
                        break
            breaker = Breaker(f"{self._name_prefix} {key}", fail_max=self.fail_max,
                              reset_s=self.reset_s, monotonic=self._monotonic)
            self._breakers[key] = breaker
            return breaker

    def states(self) -> dict[str, BreakerState]:
        """Each known key's breaker state."""
        with self._lock:
            breakers = list(self._breakers.items())
        return {key: breaker.state for key, breaker in breakers}

    def __len__(self) -> int:
        with self._lock:
            return len(self._breakers)


