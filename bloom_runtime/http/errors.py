"""Every failure becomes a JSON body ``{"error": ..., ...details}``; statuses are mapped here only."""

from __future__ import annotations

import logging
from typing import Any

import falcon
import msgspec

from bloom_runtime.engine.errors import (
    BloomError,
    Conflict,
    EngineStopped,
    EngineTimeout,
    Forbidden,
    InvalidInput,
    MembridgeError,
    MembridgeUnavailable,
    NoCapacity,
    NotFound,
    OutcomeUnknown,
    StoreUnavailable,
    Unauthorized,
    public_message,
)
from bloom_runtime.http.util import loggable_path

log = logging.getLogger("bloom_runtime.http")


# Most specific first: StaleLease is a Conflict, MembridgeUnavailable a MembridgeError.
STATUS_BY_ERROR: tuple[tuple[type[BloomError], int], ...] = (
    (InvalidInput, 400),
    (Unauthorized, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (NoCapacity, 503),
    (StoreUnavailable, 503),
    (EngineTimeout, 503),
    (OutcomeUnknown, 504),
    (EngineStopped, 503),
    (MembridgeUnavailable, 503),
    (MembridgeError, 502),
)
OUTCOME_UNKNOWN_MESSAGE = (
    "the write was under way when its time ran out or the database connection failed: "
    "it may or may not have been applied; read the state back before retrying "
    "(a create retried with the same idempotency key is safe)"
)
RETRY_AFTER_S = 1  # what a 503 suggests; capacity and stores usually recover quickly

_encoder = msgspec.json.Encoder()


def status_for(exc: BloomError) -> int:
    for kind, status in STATUS_BY_ERROR:
        if isinstance(exc, kind):
            return status
    return 500


def _json_safe(details: dict[str, Any]) -> dict[str, Any]:
    # Details are small scalars or lists by convention; anything else is shown as text.
    out: dict[str, Any] = {}
    for k, v in details.items():
        try:
            _encoder.encode(v)
            out[k] = v
        except (TypeError, msgspec.EncodeError):
            out[k] = str(v)
    return out


def write_error(resp: falcon.Response, code: int, message: str, details: dict[str, Any] | None = None) -> None:
    resp.status = code
    resp.content_type = falcon.MEDIA_JSON
    extra = _json_safe(details or {})
    extra.pop("error", None)
    resp.data = _encoder.encode({"error": message, **extra})


def handle_bloom_error(req: falcon.Request, resp: falcon.Response, exc: BloomError, params: dict[str, Any]) -> None:
    status = status_for(exc)
    if status == 500:
        log.error("unmapped %s on %s %s: %s", type(exc).__name__, req.method, loggable_path(req.path), exc.message)
        write_error(resp, 500, "internal error")
        return
    if status in (502, 503):
        resp.set_header("Retry-After", str(RETRY_AFTER_S))
    if isinstance(exc, OutcomeUnknown):
        # The cause may name the database; the client needs to know what to do next.
        log.warning("outcome unknown on %s %s: %s", req.method, loggable_path(req.path), exc.message)
        write_error(resp, status, OUTCOME_UNKNOWN_MESSAGE)
        return
    if isinstance(exc, StoreUnavailable):
        # The driver's message may carry hosts or SQL; keep it in the server log.
        log.warning("store unavailable on %s %s: %s", req.method, loggable_path(req.path), exc.message)
        write_error(resp, status, public_message(exc) or "storage unavailable")
        return
    write_error(resp, status, exc.message, exc.details)


def handle_unexpected(req: falcon.Request, resp: falcon.Response, exc: Exception, params: dict[str, Any]) -> None:
    # falcon.HTTPError has its own (more specific) handler, so it never lands here.
    log.exception("unhandled error on %s %s", req.method, req.path)
    write_error(resp, 500, "internal error")


def serialize_http_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
    """Falcon's own errors (unknown route, 405, our 401/403/413/429) as our JSON shape."""
    message = exc.description or (exc.title or "error").split(" ", 1)[-1].lower()
    resp.content_type = falcon.MEDIA_JSON
    body: dict[str, Any] = {"error": message}
    if isinstance(exc, falcon.HTTPMethodNotAllowed):
        allowed = resp.get_header("Allow")
        if allowed:
            body["allowed"] = [m.strip() for m in allowed.split(",")]
    resp.data = _encoder.encode(body)


def install(app: falcon.App) -> None:
    app.set_error_serializer(serialize_http_error)
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(BloomError, handle_bloom_error)
