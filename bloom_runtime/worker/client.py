"""The worker's side of the runtime HTTP API: register, claim, heartbeat, complete.

The client classifies every answer so the loop can decide what to do without
looking at status codes: transient trouble (network, 5xx, 429) raises
``Transient``; a stale lease is a return value; anything retrying cannot fix
(wrong key, a request the runtime refuses) raises ``WorkerError``.
"""

from __future__ import annotations

import http.cookiejar
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests
import requests.adapters

from bloom_runtime.engine.errors import BloomError

API_PREFIX = "/api/runtime"
API_KEY_HEADER = "X-Runtime-API-Key"
REQUEST_TIMEOUT_S = 10.0  # every call but the long poll
LONG_POLL_SLACK_S = 15.0  # a claim may take wait_seconds plus this before we give up on it
RETRY_AFTER_CAP_S = 60.0  # never trust a Retry-After longer than this


class WorkerError(BloomError):
    """The runtime refused the worker in a way retrying cannot fix (bad key, bad request)."""


class Transient(Exception):
    """The runtime could not be reached or asked us to come back later."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Busy(Transient):
    """The runtime answered a claim at once and asked us to wait before the next (Retry-After on 204)."""


class UnknownWorker(Exception):
    """The runtime does not know this worker (it lost its registry, or the worker was deleted)."""


class Unbatched(Exception):
    """The runtime did not take a batch of results as a whole; send them one by one.
    ``supported`` False: it takes no batch at all (an older runtime)."""

    def __init__(self, message: str, supported: bool) -> None:
        super().__init__(message)
        self.supported = supported


class Rejected(Exception):
    """The runtime refused a completion body (400 / 413); another body might pass."""


@dataclass(frozen=True)
class Grant:
    """A claimed task and the lease under which the worker runs it."""

    task: dict[str, Any]
    lease: dict[str, Any]
    token: str | None = None  # the lease's token: presented with every heartbeat and completion


class Backoff:
    """Capped exponential delay with jitter: base × 2^n, at most ``cap``, plus up to ``jitter`` of it.

    Class constants are the defaults; tests build instances with small values and
    a fixed ``rand`` so they can assert exact delays.
    """

    BASE_S = 0.5
    CAP_S = 30.0
    JITTER = 0.3  # fraction of the delay added at random, so restarted workers do not stampede

    def __init__(
        self,
        base_s: float | None = None,
        cap_s: float | None = None,
        jitter: float | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.base_s = self.BASE_S if base_s is None else base_s
        self.cap_s = self.CAP_S if cap_s is None else cap_s
        self.jitter = self.JITTER if jitter is None else jitter
        self._rand = rand
        self._failures = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; each call doubles the following one."""
        delay = min(self.cap_s, self.base_s * (2 ** min(self._failures, 30)))
        self._failures += 1
        return delay + delay * self.jitter * self._rand()

    def reset(self) -> None:
        self._failures = 0


def encode_body(body: Mapping[str, Any]) -> bytes:
    """The exact bytes sent: UTF-8 rather than \\u escapes, which would multiply non-ASCII output."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _json(resp: requests.Response) -> Any:
    try:
        return resp.json()
    except ValueError as exc:  # a proxy's HTML error page, a truncated answer
        raise Transient(f"{resp.status_code} with a body that is not JSON") from exc


def _error_text(resp: requests.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:200] or resp.reason or ""
    if isinstance(body, Mapping) and "error" in body:
        return str(body["error"])
    return str(body)[:200]


def _token(grant: Mapping[str, Any]) -> str | None:
    """The lease token a grant answer carries (None from a runtime that sends none)."""
    token = grant.get("lease_token")
    return token if isinstance(token, str) else None


def _retry_after(resp: requests.Response) -> float | None:
    raw = resp.headers.get("Retry-After")
    if not raw:
        return None
    try:
        return max(0.0, min(float(raw), RETRY_AFTER_CAP_S))
    except ValueError:
        return None  # an HTTP date: rare, fall back to our own backoff


class RuntimeClient:
    """A requests session bound to one runtime base URL and key."""

    def __init__(
        self,
        runtime_url: str,
        api_key: str | None = None,
        *,
        timeout_s: float = REQUEST_TIMEOUT_S,
        max_connections: int = 10,
    ) -> None:
        self.base_url = runtime_url.rstrip("/")
        self.timeout_s = timeout_s
        # One session shared by the claimer and every task thread: no cookies (the
        # only shared mutable state), and a pool large enough that none waits.
        self._session = requests.Session()
        self._session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=max_connections)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers["Accept"] = "application/json"
        if api_key:
            self._session.headers[API_KEY_HEADER] = api_key

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> RuntimeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the four calls ------------------------------------------------------

    def register(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Create or update this worker (``POST /workers`` upserts by name)."""
        resp = self._post("/workers", body)
        if resp.status_code in (200, 201):
            return _json(resp)
        raise self._refusal("register", resp)

    def claim(self, name: str, wait_s: float, ttl_seconds: int | None, max_tasks: int = 1) -> list[Grant]:
        """Long-poll for up to ``max_tasks`` tasks (one transaction on the runtime); an
        empty list when nothing arrived within ``wait_s``."""
        body: dict[str, Any] = {"wait_seconds": wait_s}
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        if max_tasks > 1:
            body["max_tasks"] = max_tasks
        resp = self._post(f"/workers/{quote(name, safe='')}/claim", body, timeout_s=wait_s + LONG_POLL_SLACK_S)
        if resp.status_code == 204:
            retry_after = _retry_after(resp)
            if retry_after:
                raise Busy("runtime is short of long-poll capacity", retry_after)
            return []
        if resp.status_code == 200:
            data = _json(resp)
            items = data if isinstance(data, list) else [data]
            if not items or not all(
                isinstance(d, dict) and isinstance(d.get("task"), dict) and isinstance(d.get("lease"), dict) for d in items
            ):
                raise Transient("claim answered 200 without a task and a lease")
            return [Grant(task=d["task"], lease=d["lease"], token=_token(d)) for d in items]
        if resp.status_code == 404:
            raise UnknownWorker(_error_text(resp))
        if resp.status_code == 409:
            # e.g. the runtime still counts a lease we just released: come back shortly
            raise Transient(f"claim refused: {_error_text(resp)}")
        raise self._refusal("claim", resp)

    def heartbeat(self, task_id: str, lease_id: str, worker_id: str, token: str | None = None) -> dict[str, Any] | None:
        """Renew the lease; None when it is stale (expired, reassigned, or the task is gone)."""
        body = {"lease_id": lease_id, "worker_id": worker_id}
        if token is not None:
            body["lease_token"] = token
        resp = self._post(f"/llm-tasks/{quote(task_id, safe='')}/heartbeat", body)
        if resp.status_code == 200:
            return _json(resp)
        if resp.status_code in (404, 409):
            return None
        raise self._refusal("heartbeat", resp)

    def complete(self, task_id: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """Report the result; None when the lease is stale and the result was not taken."""
        resp = self._post(f"/llm-tasks/{quote(task_id, safe='')}/complete", body)
        if resp.status_code == 200:
            return _json(resp)
        refusal = _completion_refusal(resp.status_code, _error_text(resp))
        if refusal is None:
            return None
        raise refusal

    def complete_many(self, worker_id: str, items: Sequence[tuple[str, Mapping[str, Any]]]) -> list[Any]:
        """Report several results in one request (``POST /completions``); for each item, in
        order, what ``complete`` returns for it, or the exception it raises, as a value.
        Raises ``Unbatched`` when the runtime takes no batch (an older one), or refused this
        one as a whole: then send each on its own."""
        completions = [{**{k: v for k, v in body.items() if k != "worker_id"}, "task_id": task_id} for task_id, body in items]
        resp = self._post("/completions", {"worker_id": worker_id, "completions": completions})
        if resp.status_code in (404, 405, 400, 413, 422):
            raise Unbatched(f"{resp.status_code} {_error_text(resp)}", supported=resp.status_code not in (404, 405))
        if resp.status_code != 200:
            raise self._refusal("complete", resp)
        answers = _json(resp)
        if not isinstance(answers, list) or len(answers) != len(items) or not all(isinstance(a, dict) for a in answers):
            raise Transient("completions answered 200 without one answer per result")
        return [a if a.get("ok") is True else _completion_refusal(a.get("status"), str(a.get("error") or "refused"))
                for a in answers]

    # --- plumbing --------------------------------------------------------------

    def _post(self, path: str, body: Mapping[str, Any], *, timeout_s: float | None = None) -> requests.Response:
        url = f"{self.base_url}{API_PREFIX}{path}"
        try:
            resp = self._session.post(
                url,
                data=encode_body(body),
                headers={"Content-Type": "application/json"},
                timeout=timeout_s or self.timeout_s,
                # Never: requests would carry the API key header to wherever Location points.
                allow_redirects=False,
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise Transient(f"{type(exc).__name__} calling {path}: {exc}") from exc
        except requests.RequestException as exc:  # e.g. a malformed answer from a proxy
            raise Transient(f"{type(exc).__name__} calling {path}: {exc}") from exc
        if 300 <= resp.status_code < 400:
            location = resp.headers.get("Location", "nowhere")
            resp.close()
            raise WorkerError(
                f"runtime answered {path} with a redirect ({resp.status_code} to {location}); "
                "the API key is not sent across redirects: set the runtime URL to the final address"
            )
        if resp.status_code >= 500 or resp.status_code == 429:
            text = _error_text(resp)
            resp.close()
            raise Transient(f"{resp.status_code} from {path}: {text}", _retry_after(resp))
        return resp

    @staticmethod
    def _refusal(call: str, resp: requests.Response) -> WorkerError:
        return _refused(call, resp.status_code, _error_text(resp))


def _refused(call: str, status: Any, text: str) -> WorkerError:
    if status in (401, 403):
        return WorkerError(f"runtime refused the API key on {call} ({status}: {text})")
    return WorkerError(f"runtime refused {call} ({status}: {text})")


def _completion_refusal(status: Any, text: str) -> Exception | None:
    """What a completion the runtime did not take means, alone or as an item of a batch:
    None when the lease is stale (the result is dropped), else the exception to raise."""
    if status in (404, 409):
        return None
    if status in (400, 413, 422):
        return Rejected(f"{status} {text}")
    if status == 429 or (isinstance(status, int) and status >= 500):
        return Transient(f"{status} from complete: {text}")
    return _refused("complete", status, text)
