"""Request pipeline: request id, logging and metrics; load shedding; auth, rate limit, body limit."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import falcon

from bloom_runtime.engine.models import new_id
from bloom_runtime.engine.settings import Settings
from bloom_runtime.http.auth import HEADER, Authenticator
from bloom_runtime.http.metrics import Metrics
from bloom_runtime.http.ratelimit import RateLimiter
from bloom_runtime.http.routes import op_for
from bloom_runtime.http.util import loggable_path

access_log = logging.getLogger("bloom_runtime.http.access")

REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SHED_RETRY_AFTER_S = 1
WORKER_RESERVE_DIVISOR = 8  # an eighth of MAX_IN_FLIGHT (at least one slot) is kept for heartbeats and completions


class RequestTracking:
    """Outermost: request id (echoed back), one log line and the metrics for every request."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started = time.perf_counter()
        given = req.get_header(REQUEST_ID_HEADER)
        req.context.request_id = given if given and _REQUEST_ID_RE.match(given) else new_id().replace("-", "")

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool) -> None:
        rid = getattr(req.context, "request_id", None) or new_id().replace("-", "")
        resp.set_header(REQUEST_ID_HEADER, rid)
        elapsed = time.perf_counter() - getattr(req.context, "started", time.perf_counter())
        status = resp.status_code
        self.metrics.observe(req.method, req.uri_template or "unmatched", status, elapsed)
        # The path only: query strings carry cursors and ids, never keys, but keep lines short.
        access_log.info("%s %s %d %.1fms rid=%s", req.method, loggable_path(req.path), status, elapsed * 1000, rid)


class LoadShedder:
    """Refuse at once (503) past ``max_in_flight``, keeping a reserve for worker calls.

    Waitress queues requests without bound, so ``backlog`` (requests accepted but
    not yet running, given by the server) counts toward the limit too. Heartbeats
    and completions (the route table's ``worker`` calls) keep their leases alive:
    client calls may not use the last ``worker_reserve`` in-flight slots, nor more
    than ``client_threads`` threads, so slow client calls cannot make them wait or
    fail. Long polls hold a thread for up to 30 s: they may use at most
    ``long_poll_budget`` threads; a claim over that budget is answered as a short
    poll (no wait) instead of being refused.
    """

    def __init__(self, max_in_flight: int, long_poll_budget: int, metrics: Metrics, *, client_threads: int | None = None) -> None:
        self.max_in_flight = max_in_flight
        self.worker_reserve = min(max(1, max_in_flight // WORKER_RESERVE_DIVISOR), max_in_flight - 1)
        self.long_poll_budget = long_poll_budget
        self.client_threads = client_threads if client_threads is not None else max_in_flight
        self.metrics = metrics
        self.backlog: Callable[[], int] = lambda: 0
        self.draining = False
        self._lock = threading.Lock()
        self.in_flight = 0  # client and worker calls in the app (long polls not counted)
        self.client_in_flight = 0
        self.long_polls = 0

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if self.draining:
            # (Connection is a hop-by-hop header a WSGI app may not set; waitress closes
            # idle connections itself when it shuts down.)
            raise falcon.HTTPServiceUnavailable(description="server is shutting down", retry_after=SHED_RETRY_AFTER_S)

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: object, params: dict[str, Any]) -> None:
        op = op_for(req.uri_template, req.method)
        kind = op.kind if op is not None else "client"
        long_poll = op is not None and op.long_poll  # a claim, or a dispatch that may wait
        backlog = self.backlog()
        with self._lock:
            if long_poll and self.long_polls < self.long_poll_budget:
                self.long_polls += 1
                req.context.slot = "long"
                return
            if kind == "worker":
                shed = self.in_flight + backlog >= self.max_in_flight
            else:
                shed = (self.in_flight + backlog >= self.max_in_flight - self.worker_reserve
                        or self.client_in_flight >= self.client_threads)
            if not shed:
                self.in_flight += 1
                if kind == "worker":
                    req.context.slot = "worker"
                else:
                    self.client_in_flight += 1
                    req.context.slot = "client"
        if shed:
            self.metrics.shed.inc()
            raise falcon.HTTPServiceUnavailable(description="overloaded, retry later", retry_after=SHED_RETRY_AFTER_S)
        if long_poll:
            req.context.short_poll = True

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool) -> None:
        slot = getattr(req.context, "slot", None)
        if slot is None:
            return
        req.context.slot = None
        with self._lock:
            if slot == "long":
                self.long_polls -= 1
            else:
                self.in_flight -= 1
                if slot == "client":
                    self.client_in_flight -= 1

    @property
    def busy(self) -> int:
        with self._lock:
            return self.in_flight + self.long_polls


class Gatekeeper:
    """Per route (from the route table): API key, admin check, rate limit, then the body (bounded)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.auth = Authenticator(settings)
        self.limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
        # A key's worker calls in total. Its own limiter, so a flood of per-worker buckets
        # (a new path id per request) cannot evict the totals from the LRU.
        factor = settings.rate_limit_fleet_factor
        self.fleet_limiter = RateLimiter(settings.rate_limit_per_s * factor, round(settings.rate_limit_burst * factor))
        self.max_body = settings.max_body_bytes
        self.metrics = metrics

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        # Refuse an announced oversized body before routing, auth or reading anything.
        length = req.content_length
        if length is not None and length > self.max_body:
            self._too_large(resp)

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: object, params: dict[str, Any]) -> None:
        op = op_for(req.uri_template, req.method)
        access = op.access if op is not None else "client"
        principal = None
        if access != "open":
            principal = self.auth.authenticate(req.get_header(HEADER))
            if principal is None:
                raise falcon.HTTPUnauthorized(description=f"missing or wrong {HEADER}", challenges=[f'ApiKey header="{HEADER}"'])
            if access == "admin" and not principal.admin:
                raise falcon.HTTPForbidden(description="this operation needs an admin key")
        req.context.principal = principal
        self._rate_limit(req, op.kind if op is not None else "client", principal, params)
        if req.method in BODY_METHODS:
            req.context.body = self._read_body(req, resp)

    def _rate_limit(self, req: falcon.Request, kind: str, principal: Any, params: dict[str, Any]) -> None:
        if not self.limiter.enabled:
            return
        who = principal.name if principal is not None and self.auth.enabled else f"addr:{req.remote_addr}"
        if kind == "client":
            decision = self.limiter.take(who)
        else:
            # Worker calls get a bucket per worker (or task), so one shared fleet key
            # never throttles its workers' heartbeats and claims; the key's total is
            # bounded too, or a new path id per request would never be throttled.
            decision = self.limiter.take(who + "|" + str(params.get("worker_id") or params.get("task_id") or ""))
            if decision.allowed:
                decision = self.fleet_limiter.take(who)
        if decision.allowed:
            return
        self.metrics.throttled.inc()
        raise falcon.HTTPTooManyRequests(
            description="rate limit exceeded",
            retry_after=decision.retry_after_s,
            headers={
                "RateLimit-Limit": str(decision.limit),
                "RateLimit-Remaining": str(decision.remaining),
                "RateLimit-Reset": str(decision.reset_s),
            },
        )

    def _read_body(self, req: falcon.Request, resp: falcon.Response) -> bytes:
        length = req.content_length
        if length == 0:
            return b""
        ctype = req.content_type
        if ctype and not _is_json(ctype):
            raise _unsupported()
        # At most limit + 1 bytes, so a body without Content-Length cannot make us read it
        # all. (Waitress de-chunks and sets Content-Length; other servers may not.)
        if length is None and req.env.get("wsgi.input_terminated"):
            data = req.stream.read(self.max_body + 1)
        else:
            data = req.bounded_stream.read(self.max_body + 1)
        if len(data) > self.max_body:
            self._too_large(resp)
        if data and not ctype:
            # Only a body with no bytes may come without a type (the membridge agent's heartbeat).
            raise _unsupported()
        return data

    def _too_large(self, resp: falcon.Response) -> None:
        # Waitress has already bounded and buffered the body (its own limit is a multiple
        # of ours), so leaving the rest unread is safe.
        raise falcon.HTTPContentTooLarge(description=f"request body exceeds {self.max_body} bytes")


def _unsupported() -> falcon.HTTPUnsupportedMediaType:
    return falcon.HTTPUnsupportedMediaType(description="request bodies must be sent as Content-Type: application/json")


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")
