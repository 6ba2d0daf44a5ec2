"""Client for worker agents (membridge agents): ``POST /execute-task``, the agent's open
``GET /health``, and the ``POST /self-update|/restart|/uninstall`` that change it.

Same retry loop, deadline and breaker rules as the membridge client
(``outgoing.RetryingCaller``), but one breaker per worker base URL, so one dead
node cannot make the others look down. Every call goes through ``call``, so
each gets the URL check, the wall-clock deadline and the breaker.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from .breaker import BreakerRegistry, BreakerState
from .errors import MembridgeError
from .outgoing import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT_S,
    MAX_BODY_BYTES,
    Backoff,
    MembridgeResponse,
    PooledClient,
    RetryingCaller,
    key_header,
)
from .transport import Transport
from .urls import AllowList, join, validate_outgoing_url

AGENT_HEADER = "X-MEMBRIDGE-AGENT"
CONTROL_ACTIONS = frozenset({"self-update", "restart", "uninstall"})  # the agent's POST routes that change it


class AgentClient(PooledClient):
    """Calls worker agents; thread-safe, one pooled transport for all workers."""

    def __init__(
        self,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        backoff: Backoff | None = None,
        breaker_fail_max: int = 5,
        breaker_reset_s: float = 30.0,
        allowed: AllowList | None = None,
        transport: Transport | None = None,
        clock: Callable[[], float] = time.time,
        breakers: BreakerRegistry | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self._allowed = allowed
        self.breakers = breakers or BreakerRegistry(fail_max=breaker_fail_max, reset_s=breaker_reset_s)
        self._caller = RetryingCaller(
            "worker agent", transport or Transport(allowed), timeout_s=timeout_s, retries=retries,
            backoff=backoff, clock=clock, max_body_bytes=max_body_bytes,
        )

    def __repr__(self) -> str:
        return f"AgentClient(workers={len(self.breakers)})"

    def call(
        self,
        worker_url: str,
        method: str,
        path: str,
        *,
        agent_key: str | None = None,
        json: Any = None,
        timeout_s: float | None = None,
        retries: bool = True,
        idempotent: bool | None = None,
    ) -> MembridgeResponse:
        """``method {worker_url}/{path}``; ``X-MEMBRIDGE-AGENT`` only when ``agent_key`` is set.

        Returns any non-5xx answer (a 4xx means the agent refused). Raises
        ``UnsafeURL`` for a bad worker URL, ``MembridgeUnavailable`` while that
        worker's breaker is open and ``MembridgeError`` otherwise (details:
        ``url``, the validated base URL, and ``reached``). A POST is retried only
        when it provably never reached the agent (so a task is not started
        twice), unless ``idempotent=True``; ``retries=False`` makes one attempt.
        """
        base = validate_outgoing_url(worker_url, self._allowed)
        try:
            headers = key_header(AGENT_HEADER, agent_key, "membridge agent key")
        except MembridgeError as exc:
            raise self._caller.fail_early(exc) from None
        caller = self._caller if retries else self._caller.single()
        return caller.call(
            self.breakers.get(base), method, join(base, path), label=f"{method.upper()} {base}/{path}",
            headers=headers, json=None if json is None else dict(json), timeout_s=timeout_s,
            idempotent=idempotent, details={"url": base},
        )

    def post_execute_task(
        self,
        worker_url: str,
        payload: Mapping[str, Any],
        agent_key: str | None,
        *,
        timeout_s: float | None = None,
    ) -> MembridgeResponse:
        """POST a task to ``{worker_url}/execute-task`` (the real agent answers once the run is over)."""
        return self.call(worker_url, "POST", "execute-task", agent_key=agent_key, json=payload, timeout_s=timeout_s)

    def health(self, worker_url: str, *, timeout_s: float | None = None, retries: bool = False) -> MembridgeResponse:
        """``GET {worker_url}/health`` (the agent's open route; no key is sent). One attempt
        unless ``retries`` (a probe asks again at its next round; an operator's question
        is retried as any GET)."""
        return self.call(worker_url, "GET", "health", timeout_s=timeout_s, retries=retries)

    def post_control(
        self,
        worker_url: str,
        action: str,
        payload: Mapping[str, Any],
        agent_key: str | None,
        *,
        timeout_s: float | None = None,
    ) -> MembridgeResponse:
        """POST ``payload`` to ``{worker_url}/{action}`` (one of ``CONTROL_ACTIONS``).

        Never repeated unless it provably never reached the agent: updating or
        uninstalling twice is not the same as once."""
        if action not in CONTROL_ACTIONS:
            raise ValueError(f"not an agent control action: {action!r}")
        return self.call(worker_url, "POST", action, agent_key=agent_key, json=payload, timeout_s=timeout_s, idempotent=False)

    def breaker_state(self, worker_url: str) -> BreakerState:
        """The breaker state for a worker URL (``closed`` for one never called)."""
        return self.breakers.get(validate_outgoing_url(worker_url, self._allowed)).state

    def breaker_retry_after(self, worker_url: str) -> float | None:
        """Seconds until the worker's open breaker lets a trial through; None unless open."""
        return self.breakers.get(validate_outgoing_url(worker_url, self._allowed)).retry_after_s()

    def abort_all(self) -> None:
        """Fail every call in flight at once (engine stop)."""
        self._caller.transport.abort_all()

    def state(self) -> dict[str, Any]:
        """Counters over all workers plus each worker URL's breaker state."""
        snapshot = self._caller.stats.snapshot()
        snapshot["breakers"] = self.breakers.states()
        return snapshot
