"""Client for the membridge control plane, and the retry/breaker machinery it shares
with the worker-agent client (``agent_client.py``).

One logical request is up to ``1 + retries`` HTTP attempts. Only connection
errors, timeouts and 5xx answers are retried (a 4xx is returned at once); each
attempt passes a circuit breaker, so a dead control plane costs one fast failure
instead of a retry storm. Keys travel only in headers and are never put in a
log line, an exception message, a repr or the state dict.
"""

from __future__ import annotations

import json as jsonlib
import logging
import math
import random
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Self

import pybreaker
import requests
from urllib3.exceptions import NewConnectionError

from .errors import InvalidInput, MembridgeError, MembridgeUnavailable
from .urls import AllowList, validate_outgoing_url

log = logging.getLogger("bloom_runtime.membridge")

ADMIN_HEADER = "X-MEMBRIDGE-ADMIN"
AGENT_HEADER = "X-MEMBRIDGE-AGENT"
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_RETRIES = 3
CONNECT_TIMEOUT_MAX_S = 5.0  # a TCP connect that takes longer than this will not succeed
MAX_BODY_BYTES = 8 * 1024 * 1024  # answers we parse are small; cap what a broken peer can make us buffer

BreakerState = Literal["closed", "open", "half-open"]

# Methods whose repetition has the same effect as one call (RFC 9110 §9.2.2). Other
# methods are retried only when the request provably never left this host.
_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_KEPT_HEADERS = ("content-type", "retry-after", "location")
# Keys must be visible ASCII: requests quotes a bad header value back in its
# InvalidHeader message, which would put the key in an exception.
_KEY_RE = re.compile(r"[\x21-\x7e]{1,4096}")
# A path relative to the base URL: plain segments, escapes allowed (join() makes them).
_PATH_RE = re.compile(r"(?:/[A-Za-z0-9._~:%-]+)+/?|/")
_ERRNO_RE = re.compile(r"\[Errno -?\d+\] ([^'\")\]]{1,80})")


# --- backoff -----------------------------------------------------------------


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


# --- circuit breaker -----------------------------------------------------------


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
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.breaker_failure = breaker_failure
        self.status = status
        self.cause = cause


def new_session() -> requests.Session:
    """A pooled session that ignores proxy variables and ~/.netrc.

    ``trust_env`` off: an environment proxy would see our keys, and netrc could
    add an Authorization header we did not mean to send.
    """
    session = requests.Session()
    session.trust_env = False
    return session


def key_header(header: str, key: str | None, what: str) -> dict[str, str]:
    """``{header: key}`` (empty when no key), validated without ever echoing the key."""
    if key is None or key == "":
        return {}
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise MembridgeError(f"{what} is malformed (must be 1-4096 visible ASCII characters)")
    return {header: key}


def _fmt_s(seconds: float) -> str:
    return f"{math.ceil(max(seconds, 0.0) * 10) / 10:g}"


def _short_reason(exc: BaseException, timeout_s: float) -> str:
    """A short, secret-free reason for a transport failure."""
    text = str(exc)
    if isinstance(exc, requests.ConnectTimeout):
        return f"connect timed out after {_fmt_s(timeout_s)} s"
    if isinstance(exc, requests.Timeout) or "timed out" in text.lower():
        return f"timed out after {_fmt_s(timeout_s)} s"
    match = _ERRNO_RE.search(text)
    if match:
        return match.group(1).strip().lower()
    if "RemoteDisconnected" in text or "Connection aborted" in text:
        return "connection closed by peer"
    return type(exc).__name__


def _request_not_sent(exc: BaseException) -> bool:
    """True when the connection was never made, so even a POST is safe to repeat."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    if isinstance(exc, requests.ConnectionError) and exc.args:
        reason = getattr(exc.args[0], "reason", None)
        return isinstance(reason, NewConnectionError)
    return False


def _loads_strict(body: bytes) -> Any:
    def reject(constant: str) -> Any:
        raise ValueError(f"non-finite number {constant}")

    return jsonlib.loads(body, parse_constant=reject)


class RetryingCaller:
    """Send one logical request: attempts through a breaker, retries with backoff,
    counters in ``stats``. Shared by the membridge and worker-agent clients.
    """

    def __init__(
        self,
        service: str,
        session: requests.Session,
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
        self.session = session
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff = backoff or Backoff()
        self.max_body_bytes = max_body_bytes
        self.stats = CallStats(clock)

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
        """Return the first non-5xx answer, or raise ``MembridgeError``/``MembridgeUnavailable``."""
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
                message = f"{self.service} circuit open, retry after {_fmt_s(refused.retry_after_s)} s"
                self.stats.failed(message, rejected=True)
                raise MembridgeUnavailable(message, retry_after_s=round(refused.retry_after_s, 3), **extra) from None
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
        raise MembridgeError(message, **extra) from failure.cause

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
        deadline = time.monotonic() + timeout_s
        try:
            with self.session.request(
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
                # Read the body ourselves: bounded in size, and in total time (the
                # read timeout alone restarts with every byte a slow peer sends).
                body = bytearray()
                for chunk in resp.iter_content(64 * 1024):
                    body += chunk
                    if len(body) > self.max_body_bytes:
                        raise _AttemptError("response too large", retryable=False,
                                            breaker_failure=False, status=status)
                    if time.monotonic() > deadline:
                        raise _AttemptError(f"timed out after {_fmt_s(timeout_s)} s reading the response",
                                            retryable=idempotent, breaker_failure=True)
                kept = {name: resp.headers[name] for name in _KEPT_HEADERS if name in resp.headers}
        except _AttemptError:
            raise
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            not_sent = _request_not_sent(exc)
            reason = _short_reason(exc, timeout_s)
            # "timed out" only when the request may have reached the peer; a connect
            # failure of any kind is "unreachable".
            message = reason if "timed out" in reason and not not_sent else f"unreachable: {reason}"
            raise _AttemptError(message, retryable=idempotent or not_sent,
                                breaker_failure=True, cause=exc) from None
        except requests.RequestException as exc:
            # Not a transport failure (bad header, bad URL): our bug, not the peer's.
            # No cause kept: requests' message may quote a header value.
            raise _AttemptError(f"request failed: {type(exc).__name__}", retryable=False,
                                breaker_failure=False) from None

        data: Any = None
        malformed = False
        if bytes(body).strip():
            try:
                data = _loads_strict(bytes(body))
            except ValueError:
                malformed = True
        return MembridgeResponse(status=status, data=data, headers=kept, malformed=malformed)


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


class PooledClient:
    """Closes the session it created; usable as a context manager."""

    _owns_session: bool
    _caller: RetryingCaller

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool if this client created it (idempotent)."""
        if self._owns_session:
            self._caller.session.close()


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
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self._base_url_provider = base_url_provider
        self._admin_key_provider = admin_key_provider
        self._allowed = allowed
        self._breaker_fail_max = breaker_fail_max
        self._breaker_reset_s = breaker_reset_s
        self._owns_session = session is None
        self._caller = RetryingCaller(
            "membridge", session or new_session(), timeout_s=timeout_s, retries=retries,
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
