"""Client for worker agents: ``POST {worker_url}/execute-task``, and the agent's own
``GET /health`` and ``POST /self-update|/restart|/uninstall``.

Same retry loop and breaker rules as the membridge client (``RetryingCaller``),
but one breaker per worker base URL, so one dead node cannot make the others
look down.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import requests

from .errors import MembridgeError
from .membridge import (
    AGENT_HEADER,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT_S,
    MAX_BODY_BYTES,
    Backoff,
    BreakerRegistry,
    BreakerState,
    MembridgeResponse,
    PooledClient,
    RetryingCaller,
    key_header,
    new_session,
)
from .urls import AllowList, join, validate_outgoing_url

CONTROL_ACTIONS = frozenset({"self-update", "restart", "uninstall"})  # the agent's POST routes that change it


class AgentClient(PooledClient):
    """Posts tasks to worker agents; thread-safe, one pooled session for all workers."""

    def __init__(
        self,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        backoff: Backoff | None = None,
        breaker_fail_max: int = 5,
        breaker_reset_s: float = 30.0,
        allowed: AllowList | None = None,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
        breakers: BreakerRegistry | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self._allowed = allowed
        self._owns_session = session is None
        self.breakers = breakers or BreakerRegistry(fail_max=breaker_fail_max, reset_s=breaker_reset_s)
        self._caller = RetryingCaller(
            "worker agent", session or new_session(), timeout_s=timeout_s, retries=retries,
            backoff=backoff, clock=clock, max_body_bytes=max_body_bytes,
        )

    def __repr__(self) -> str:
        return f"AgentClient(workers={len(self.breakers)})"

    def post_execute_task(
        self,
        worker_url: str,
        payload: Mapping[str, Any],
        agent_key: str | None,
        *,
        timeout_s: float | None = None,
        idempotent: bool = False,
    ) -> MembridgeResponse:
        """POST ``payload`` to ``{worker_url}/execute-task`` with ``X-MEMBRIDGE-AGENT``.

        Returns any non-5xx answer (a 4xx means the worker refused). Raises
        ``UnsafeURL`` for a bad worker URL, ``MembridgeUnavailable`` while that
        worker's breaker is open and ``MembridgeError`` otherwise; errors carry
        ``url`` (the validated base URL) in their details. The POST is retried
        only when it provably never reached the worker (so a task is not started
        twice), unless ``idempotent=True``.
        """
        base = validate_outgoing_url(worker_url, self._allowed)
        headers = self._agent_headers(agent_key)
        return self._caller.call(
            self.breakers.get(base), "POST", join(base, "execute-task"), label=f"POST {base}/execute-task",
            headers=headers, json=dict(payload), timeout_s=timeout_s, idempotent=idempotent,
            details={"url": base},
        )

    def get_health(self, worker_url: str, *, timeout_s: float | None = None) -> MembridgeResponse:
        """GET ``{worker_url}/health``; the agent serves it without a key, so none is sent.

        Returns any non-5xx answer; raises as ``post_execute_task`` does. Retried like any GET."""
        base = validate_outgoing_url(worker_url, self._allowed)
        return self._caller.call(
            self.breakers.get(base), "GET", join(base, "health"), label=f"GET {base}/health",
            headers={}, timeout_s=timeout_s, details={"url": base},
        )

    def post_control(
        self,
        worker_url: str,
        action: str,
        payload: Mapping[str, Any],
        agent_key: str | None,
        *,
        timeout_s: float | None = None,
    ) -> MembridgeResponse:
        """POST ``payload`` to ``{worker_url}/{action}`` (one of ``CONTROL_ACTIONS``) with ``X-MEMBRIDGE-AGENT``.

        Returns any non-5xx answer; raises as ``post_execute_task`` does. Never repeated
        unless it provably never reached the agent: updating or uninstalling twice is not
        the same as once."""
        if action not in CONTROL_ACTIONS:
            raise ValueError(f"not an agent control action: {action!r}")
        base = validate_outgoing_url(worker_url, self._allowed)
        headers = self._agent_headers(agent_key)
        return self._caller.call(
            self.breakers.get(base), "POST", join(base, action), label=f"POST {base}/{action}",
            headers=headers, json=dict(payload), timeout_s=timeout_s, idempotent=False, details={"url": base},
        )

    def _agent_headers(self, agent_key: str | None) -> dict[str, str]:
        """``X-MEMBRIDGE-AGENT`` (none without a key); a malformed key fails the call before it is sent."""
        try:
            return key_header(AGENT_HEADER, agent_key, "membridge agent key")
        except MembridgeError as exc:
            raise self._caller.fail_early(exc) from None

    def breaker_state(self, worker_url: str) -> BreakerState:
        """The breaker state for a worker URL (``closed`` for one never called)."""
        return self.breakers.get(validate_outgoing_url(worker_url, self._allowed)).state

    def state(self) -> dict[str, Any]:
        """Counters over all workers plus each worker URL's breaker state."""
        snapshot = self._caller.stats.snapshot()
        snapshot["breakers"] = self.breakers.states()
        return snapshot
