"""What every outgoing call shares: the retry loop, backoff, the answer, counters.

One logical request is up to ``1 + retries`` HTTP attempts. Only connection
errors, timeouts and 5xx answers are retried (a 4xx is returned at once), and a
POST only when it provably never left this host; each attempt passes a circuit
breaker, so a dead peer costs one fast failure instead of a retry storm, and
runs under one wall-clock deadline (``transport.deadline``). Keys travel only in
headers and are never put in a log line, an exception message, a repr or the
state dict.
"""

from __future__ import annotations

import copy
import json as jsonlib
import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

import requests
from urllib3.exceptions import NewConnectionError

from .breaker import Breaker, _Refused
from .errors import MembridgeError, MembridgeUnavailable
from .transport import RefusedAddress, Transport, deadline

log = logging.getLogger("bloom_runtime.membridge")

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_RETRIES = 3
CONNECT_TIMEOUT_MAX_S = 5.0  # a TCP connect that takes longer than this will not succeed
MAX_BODY_BYTES = 8 * 1024 * 1024  # answers we parse are small; cap what a broken peer can make us buffer

# Methods whose repetition has the same effect as one call (RFC 9110 §9.2.2). Other
# methods are retried only when the request provably never left this host.
_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_KEPT_HEADERS = ("content-type", "retry-after", "location")
# Keys must be visible ASCII: requests quotes a bad header value back in its
# InvalidHeader message, which would put the key in an exception.
_KEY_RE = re.compile(r"[\x21-\x7e]{1,4096}")
_ERRNO_RE = re.compile(r"\[Errno -?\d+\] ([^'\")\]]{1,80})")


@dataclass(frozen=True)
class Backoff:
    """Delay before retry ``attempt`` (0-based): ``base_s * 2**attempt`` plus up to
    ``jitter_fraction`` of that, at random. Tests shrink the constants and inject
    ``rng`` and ``sleep`` to assert exact delays instead of sleeping.
    """

    base_s: float = 0.5
    jitter_fraction: float = 0.3
    max_s: float = 30.0  # cap on the exponential part
    rng: Callable[[], float] = random.random  # uniform in [0, 1)
    sleep: Callable[[float], None] = time.sleep

    def delay(self, attempt: int) -> float:
        """Return the delay in seconds before retry number ``attempt`` (0 = first retry)."""
        exponential = min(self.base_s * 2**attempt, self.max_s)
        return exponential + self.rng() * self.jitter_fraction * exponential



# --- responses and counters ------------------------------------------------------


@dataclass(frozen=True)
class MembridgeResponse:
    """An answer that was not a 5xx: status, parsed JSON body, a few headers."""

    status: int
    data: Any  # parsed JSON body; None when the body is empty or not JSON
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names, _KEPT_HEADERS only
    malformed: bool = False  # a body was sent but it is not valid JSON

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class CallStats:
    """Thread-safe counters and last-outcome fields for /health and Prometheus."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.requests = 0  # logical calls
        self.attempts = 0  # HTTP attempts sent
        self.retries = 0  # attempts after the first of a call
        self.failures = 0  # logical calls that raised
        self.rejected = 0  # calls refused by an open breaker (also in failures)
        self.consecutive_failures = 0  # failed attempts since the last answered one
        self.last_success_ms: int | None = None
        self.last_error: str | None = None
        self.connected = False

    def begin(self) -> None:
        with self._lock:
            self.requests += 1

    def attempt(self, retry: bool) -> None:
        with self._lock:
            self.attempts += 1
            self.retries += retry

    def attempt_failed(self, message: str) -> None:
        with self._lock:
            self.consecutive_failures += 1
            self.last_error = message
            self.connected = False

    def success(self) -> None:
        with self._lock:
            self.consecutive_failures = 0
            self.last_success_ms = int(self._clock() * 1000)
            self.connected = True

    def failed(self, message: str, *, rejected: bool = False) -> None:
        with self._lock:
            self.failures += 1
            self.rejected += rejected
            self.last_error = message
            if rejected:
                self.connected = False

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "consecutiveFailures": self.consecutive_failures,
                "lastSuccess": self.last_success_ms,
                "lastError": self.last_error,
                "connected": self.connected,
                "requests": self.requests,
                "attempts": self.attempts,
                "failures": self.failures,
                "retries": self.retries,
                "rejected": self.rejected,
            }


# --- the shared retry loop ----------------------------------------------------------


class _AttemptError(Exception):
    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        breaker_failure: bool,
        status: int | None = None,
        cause: BaseException | None = None,
        reached: bool = True,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.breaker_failure = breaker_failure
        self.status = status
        self.cause = cause
        self.reached = reached  # False: the request provably never reached the peer


def key_header(header: str, key: str | None, what: str) -> dict[str, str]:
    """``{header: key}`` (empty when no key), validated without ever echoing the key."""
    if key is None or key == "":
        return {}
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise MembridgeError(f"{what} is malformed (must be 1-4096 visible ASCII characters)")
    return {header: key}


def fmt_s(seconds: float) -> str:
    """Seconds for a message: rounded up to a tenth."""
    return f"{math.ceil(max(seconds, 0.0) * 10) / 10:g}"


def _connection_reason(exc: BaseException) -> BaseException | None:
    """The urllib3 reason inside a requests ConnectionError (MaxRetryError.reason), if any."""
    if isinstance(exc, requests.ConnectionError) and exc.args:
        return getattr(exc.args[0], "reason", None)
    return None


def _short_reason(exc: BaseException, timeout_s: float) -> str:
    """A short, secret-free reason for a transport failure."""
    text = str(exc)
    if isinstance(exc, requests.ConnectTimeout):
        return f"connect timed out after {fmt_s(timeout_s)} s"
    if isinstance(exc, requests.Timeout) or "timed out" in text.lower():
        return f"timed out after {fmt_s(timeout_s)} s"
    match = _ERRNO_RE.search(text)
    if match:
        return match.group(1).strip().lower()
    if "RemoteDisconnected" in text or "Connection aborted" in text or "Connection broken" in text:
        return "connection closed by peer"
    return type(exc).__name__


def _request_not_sent(exc: BaseException) -> bool:
    """True when the connection was never made, so even a POST is safe to repeat."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    return isinstance(_connection_reason(exc), NewConnectionError)


def upstream_reason(data: Any) -> str | None:
    """The reason in a peer's error body: FastAPI's ``{"detail": "…"}`` or its 422 list of
    ``{loc, msg}``, or ``{"error": "…"}``; None when there is none."""
    if not isinstance(data, dict):
        return None
    value = data.get("detail", data.get("error"))
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, list):
        parts = []
        for item in value[:5]:
            if isinstance(item, dict) and isinstance(item.get("msg"), str):
                loc = item.get("loc")
                where = ".".join(str(p) for p in loc[1:] if isinstance(p, str | int)) if isinstance(loc, list) else ""
                parts.append(f"{where}: {item['msg']}" if where else item["msg"])
        return "; ".join(parts) or None
    return None


def _loads_strict(body: bytes) -> Any:
    def reject(constant: str) -> Any:
        raise ValueError(f"non-finite number {constant}")

    return jsonlib.loads(body, parse_constant=reject)


class RetryingCaller:
    """Send one logical request: attempts through a breaker, retries with backoff,
    counters in ``stats``. Shared by the membridge and worker-agent clients.

    ``MembridgeError``s it raises carry ``reached`` in their details: False when
    the request provably never reached the peer (connection refused, address
    refused, breaker open), True when it may have.
    """

    def __init__(
        self,
        service: str,
        transport: Transport,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.time,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        if retries < 0 or timeout_s <= 0:
            raise ValueError("retries must be >= 0 and timeout_s > 0")
        self.service = service
        self.transport = transport
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff = backoff or Backoff()
        self.max_body_bytes = max_body_bytes
        self.stats = CallStats(clock)

    def single(self) -> RetryingCaller:
        """This caller with no retries (same transport, backoff and counters)."""
        one = copy.copy(self)
        one.retries = 0
        return one

    def fail_early(self, exc: MembridgeError) -> MembridgeError:
        """Count a call that failed before any attempt (no URL, bad key)."""
        self.stats.begin()
        self.stats.failed(exc.message)
        return exc

    def call(
        self,
        breaker: Breaker,
        method: str,
        url: str,
        *,
        label: str,
        headers: Mapping[str, str],
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
        idempotent: bool | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> MembridgeResponse:
        """Return the first non-5xx answer, or raise ``MembridgeError``/``MembridgeUnavailable``.

        ``timeout_s`` bounds each attempt in wall-clock time, connect to last byte."""
        method = method.upper()
        if idempotent is None:
            idempotent = method in _IDEMPOTENT_METHODS
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        extra = dict(details or {})
        self.stats.begin()
        failure: _AttemptError | None = None
        for attempt in range(self.retries + 1):
            try:
                ticket = breaker.admit()
            except _Refused as refused:
                message = f"{self.service} circuit open, retry after {fmt_s(refused.retry_after_s)} s"
                self.stats.failed(message, rejected=True)
                raise MembridgeUnavailable(message, retry_after_s=round(refused.retry_after_s, 3),
                                           reached=False, **extra) from None
            self.stats.attempt(retry=attempt > 0)
            try:
                response = self._attempt(method, url, headers, json, params, timeout, idempotent)
            except _AttemptError as exc:
                failure = exc
                breaker.record(ticket, ok=not exc.breaker_failure)
            except BaseException:
                breaker.record(ticket, ok=False)  # a bug or an interrupt: do not leave a trial hanging
                raise
            else:
                breaker.record(ticket, ok=True)
                self.stats.success()
                return response
            if failure.breaker_failure:
                self.stats.attempt_failed(f"{self.service} {failure.message}")
            last = attempt == self.retries
            if not failure.retryable or last or breaker.is_open():
                break
            delay = self.backoff.delay(attempt)
            log.debug("%s %s attempt %d/%d failed: %s; retrying in %.3f s",
                      self.service, label, attempt + 1, self.retries + 1, failure.message, delay)
            self.backoff.sleep(delay)
        assert failure is not None
        message = f"{self.service} {failure.message}"
        self.stats.failed(message)
        if failure.status is not None:
            extra["status"] = failure.status
        # The original requests exception stays on __cause__ (its text has the URL
        # and the OS reason, never our headers).
        raise MembridgeError(message, reached=failure.reached, **extra) from failure.cause

    def _attempt(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        json: Any,
        params: Mapping[str, Any] | None,
        timeout_s: float,
        idempotent: bool,
    ) -> MembridgeResponse:
        try:
            # The deadline bounds every socket call of this attempt, so a peer that
            # drips its headers or body cannot hold the thread past timeout_s.
            with deadline(timeout_s), self.transport.session.request(
                method,
                url,
                headers=dict(headers),
                json=json,
                params=params,
                timeout=(min(timeout_s, CONNECT_TIMEOUT_MAX_S), timeout_s),
                allow_redirects=False,
                stream=True,
            ) as resp:
                status = resp.status_code
                if status >= 500:
                    raise _AttemptError(f"answered {status}", retryable=idempotent,
                                        breaker_failure=True, status=status)
                body = bytearray()
                for chunk in resp.iter_content(64 * 1024):
                    body += chunk
                    if len(body) > self.max_body_bytes:
                        raise _AttemptError("response too large", retryable=False,
                                            breaker_failure=False, status=status)
                kept = {name: resp.headers[name] for name in _KEPT_HEADERS if name in resp.headers}
        except _AttemptError:
            raise
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            if isinstance(_connection_reason(exc), RefusedAddress):
                # The policy, not the peer: retrying cannot help, and the peer is not down.
                raise _AttemptError("refused: the host resolves only to addresses outgoing calls must not reach",
                                    retryable=False, breaker_failure=False, reached=False) from None
            not_sent = _request_not_sent(exc)
            reason = _short_reason(exc, timeout_s)
            # "timed out" only when the request may have reached the peer; a connect
            # failure of any kind is "unreachable".
            message = reason if "timed out" in reason and not not_sent else f"unreachable: {reason}"
            raise _AttemptError(message, retryable=idempotent or not_sent,
                                breaker_failure=True, cause=exc, reached=not not_sent) from None
        except requests.RequestException as exc:
            # Not a transport failure (bad header, bad URL): our bug, not the peer's.
            # No cause kept: requests' message may quote a header value.
            raise _AttemptError(f"request failed: {type(exc).__name__}", retryable=False,
                                breaker_failure=False, reached=False) from None

        data: Any = None
        malformed = False
        if bytes(body).strip():
            try:
                data = _loads_strict(bytes(body))
            except ValueError:
                malformed = True
        return MembridgeResponse(status=status, data=data, headers=kept, malformed=malformed)


class PooledClient:
    """Owns a transport (closed with the client); usable as a context manager."""

    _caller: RetryingCaller

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Abort calls in flight and close the connection pool (idempotent)."""
        self._caller.transport.close()
