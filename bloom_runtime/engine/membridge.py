"""Client for the membridge control plane (its retry loop and breaker: ``outgoing``, ``breaker``)."""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from .breaker import Breaker, BreakerState
from .errors import InvalidInput, MembridgeError
from .outgoing import DEFAULT_RETRIES, DEFAULT_TIMEOUT_S, MAX_BODY_BYTES, Backoff, MembridgeResponse, PooledClient, RetryingCaller, key_header
from .transport import Transport
from .urls import AllowList, validate_outgoing_url

log = logging.getLogger("bloom_runtime.membridge")

ADMIN_HEADER = "X-MEMBRIDGE-ADMIN"
# A path relative to the base URL: plain segments, escapes allowed (join() makes them).
_PATH_RE = re.compile(r"(?:/[A-Za-z0-9._~:%-]+)+/?|/")


def check_path(path: str) -> str:
    """Validate a path relative to the base URL; build it with ``urls.join("", ...)``."""
    if not isinstance(path, str) or not _PATH_RE.fullmatch(path):
        raise MembridgeError("membridge path must be '/'-separated plain segments")
    for segment in path.split("/"):
        decoded = segment.lower().replace("%2e", ".")
        if decoded in (".", "..") or "%2f" in decoded or "%5c" in decoded:
            raise MembridgeError("membridge path must not contain dot segments or encoded slashes")
    return path


# --- membridge client ------------------------------------------------------------------

_AGENT_TIME_FIELDS = ("registered_at", "last_seen")


def _check_agent(item: Any) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise ValueError("agent is not an object")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 256:
        raise ValueError("agent name missing")
    for key in ("url", "status"):
        if item.get(key) is not None and not isinstance(item[key], str):
            raise ValueError(f"agent {key} is not a string")
    for key in _AGENT_TIME_FIELDS:
        value = item.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"agent {key} is not a time in seconds")
    return item


class MembridgeClient(PooledClient):
    """Client for the membridge control plane.

    The base URL and admin key come from providers, read on every call, so a
    configuration change takes effect on the next call; a new URL also gets a
    fresh breaker. Call ``close()`` (or use ``with``) to release the pool.
    """

    def __init__(
        self,
        base_url_provider: Callable[[], str | None],
        admin_key_provider: Callable[[], str | None],
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        backoff: Backoff | None = None,
        breaker_fail_max: int = 5,
        breaker_reset_s: float = 30.0,
        allowed: AllowList | None = None,
        transport: Transport | None = None,
        clock: Callable[[], float] = time.time,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self._base_url_provider = base_url_provider
        self._admin_key_provider = admin_key_provider
        self._allowed = allowed
        self._breaker_fail_max = breaker_fail_max
        self._breaker_reset_s = breaker_reset_s
        self._caller = RetryingCaller(
            "membridge", transport or Transport(allowed), timeout_s=timeout_s, retries=retries,
            backoff=backoff, clock=clock, max_body_bytes=max_body_bytes,
        )
        self._lock = threading.Lock()
        self._base_url: str | None = None
        self._breaker = self._new_breaker()

    def __repr__(self) -> str:
        return f"MembridgeClient(breaker={self._current_breaker().state!r})"

    def _new_breaker(self) -> Breaker:
        return Breaker("membridge", fail_max=self._breaker_fail_max, reset_s=self._breaker_reset_s)

    def _current_breaker(self) -> Breaker:
        with self._lock:
            return self._breaker

    def _target(self) -> tuple[str, Breaker]:
        raw = self._base_url_provider()
        if not raw:
            raise MembridgeError("membridge server URL is not configured")
        base = validate_outgoing_url(raw, self._allowed)
        with self._lock:
            if base != self._base_url:
                if self._base_url is not None:
                    # Another server: what we learnt about the old one says nothing about it.
                    log.info("membridge URL changed; circuit breaker reset")
                    self._breaker = self._new_breaker()
                self._base_url = base
            return base, self._breaker

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
        idempotent: bool | None = None,
    ) -> MembridgeResponse:
        """Call membridge at ``path`` and return any non-5xx answer (4xx included).

        Raises ``MembridgeError`` (unreachable, timed out, 5xx after retries, not
        configured), ``MembridgeUnavailable`` (breaker open) or ``UnsafeURL``.
        POST is retried only when the request was never sent, unless
        ``idempotent=True``.
        """
        try:
            check_path(path)
            base, breaker = self._target()
            headers = key_header(ADMIN_HEADER, self._admin_key_provider(), "membridge admin key")
        except MembridgeError as exc:
            raise self._caller.fail_early(exc) from None
        except InvalidInput as exc:  # UnsafeURL: counted, raised as it is
            self._caller.fail_early(MembridgeError(exc.message))
            raise
        return self._caller.call(
            breaker, method, base + path, label=f"{method.upper()} {path}", headers=headers,
            json=json, params=params, timeout_s=timeout_s, idempotent=idempotent,
        )

    def get_json(self, path: str, *, params: Mapping[str, Any] | None = None,
                 timeout_s: float | None = None) -> Any:
        """GET ``path`` and return its JSON body; any non-2xx answer or bad JSON raises ``MembridgeError``."""
        response = self.request("GET", path, params=params, timeout_s=timeout_s)
        if not response.ok:
            raise MembridgeError(f"membridge answered {response.status} for GET {path}", status=response.status)
        if response.malformed:
            raise MembridgeError(f"malformed JSON from membridge for GET {path}")
        return response.data

    def health(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """``GET /health`` as a dict."""
        data = self.get_json("/health", timeout_s=timeout_s)
        if not isinstance(data, dict):
            raise MembridgeError("malformed /health response")
        return data

    def agents(self, *, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """``GET /agents``: agent dicts (name, url, status, registered_at, last_seen, ...).

        Times stay as membridge sends them, float seconds. The whole answer is
        refused if any entry is malformed, so a sync never acts on half of it.
        """
        try:
            data = self.get_json("/agents", timeout_s=timeout_s)
        except MembridgeError as exc:
            if exc.message.startswith("malformed JSON"):
                raise MembridgeError("malformed /agents response") from None
            raise
        if not isinstance(data, list):
            raise MembridgeError("malformed /agents response", reason="not a list")
        try:
            return [_check_agent(item) for item in data]
        except ValueError as exc:
            raise MembridgeError("malformed /agents response", reason=str(exc)) from None

    def breaker_state(self) -> BreakerState:
        """``closed``, ``open`` or ``half-open``."""
        return self._current_breaker().state

    def state(self) -> dict[str, Any]:
        """Health and metrics fields (camelCase, JSON-ready; never the key)."""
        snapshot = self._caller.stats.snapshot()
        snapshot["breaker"] = self.breaker_state()
        return snapshot
