"""Pass-through to the membridge control plane, and the answer shaping the membridge routes share.

502 with a JSON error when membridge cannot be reached or answers badly, 503
with ``Retry-After`` while its breaker is open or when it is not configured.
An upstream 4xx is passed on as a 4xx with a JSON error, except 401/403: those
mean membridge refused *our* admin key, which is a gateway problem (502), not
the caller's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import falcon

from bloom_runtime.engine.engine import Engine
from bloom_runtime.engine.errors import InvalidInput, MembridgeError, MembridgeUnavailable
from bloom_runtime.engine.outgoing import MembridgeResponse, upstream_reason
from bloom_runtime.http.errors import write_error
from bloom_runtime.http.util import actor, body, send

MAX_UPSTREAM_ERROR_CHARS = 200


def guarded(resp: falcon.Response, call: Callable[[], Any]) -> Any:
    """Run ``call``; on ``MembridgeUnavailable`` answer 503 with a precise ``Retry-After``."""
    try:
        return call()
    except MembridgeUnavailable as exc:
        retry_after = exc.details.get("retry_after_s", 1)
        details = {k: v for k, v in exc.details.items() if k != "retry_after_s"}
        write_error(resp, 503, exc.message, details)
        resp.set_header("Retry-After", str(max(1, math.ceil(float(retry_after)))))
        return None


def relay(resp: falcon.Response, answer: MembridgeResponse, what: str) -> None:
    """Send membridge's answer on: 2xx JSON as it is, 4xx as a JSON error, anything else 502."""
    if answer.ok:
        if answer.malformed:
            raise MembridgeError(f"malformed JSON from membridge for {what}")
        send(resp, answer.data, answer.status)
        return
    if answer.status in (401, 403):
        raise MembridgeError(f"membridge refused the runtime's admin key ({answer.status}) for {what}", status=answer.status)
    if 400 <= answer.status < 500:
        message = upstream_reason(answer.data) or f"membridge answered {answer.status}"
        write_error(resp, answer.status, message[:MAX_UPSTREAM_ERROR_CHARS], {"upstream_status": answer.status})
        return
    raise MembridgeError(f"membridge answered {answer.status} for {what}", status=answer.status)


def _segments(req: falcon.Request, params: dict[str, str]) -> list[str]:
    # The route template names the fixed segments; only {cid} comes from the client.
    template = (req.uri_template or "").split("/api/membridge/", 1)[-1]
    return [params[part[1:-1]] if part.startswith("{") else part for part in template.split("/")]


class MembridgeRead:
    """GET pass-through: /health, /projects, /projects/{cid}/leadership, /projects/{cid}/nodes."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_get(self, req: falcon.Request, resp: falcon.Response, **params: str) -> None:
        segments = _segments(req, params)
        answer = guarded(resp, lambda: self.engine.membridge.proxy("GET", segments))
        if answer is not None:
            relay(resp, answer, "GET /" + "/".join(segments))


class MembridgeWrite:
    """POST /projects/{cid}/leadership/select (admin; audited)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def on_post(self, req: falcon.Request, resp: falcon.Response, cid: str) -> None:
        payload = body(req, dict[str, Any])
        if not isinstance(payload, dict):
            raise InvalidInput("body must be a JSON object")
        answer = guarded(resp, lambda: self.engine.membridge.select_leader(cid, payload, actor(req)))
        if answer is not None:
            relay(resp, answer, "POST leadership/select")
