"""Small helpers the resources share: JSON out, body in, ids, query parameters, pagination."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode

import falcon
import msgspec

from bloom_runtime.engine.errors import InvalidInput
from bloom_runtime.engine.models import ID_PATTERN, Page
from bloom_runtime.http import schemas

_encoder = msgspec.json.Encoder()
_ID_RE = re.compile(ID_PATTERN)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
MAX_ID_LEN = 128
MAX_QUERY_LEN = 512
# A dispatched agent's callback path carries its lease token (routes.TOKEN_BASE).
_TOKEN_PATH = re.compile(r"^(/api/leases/[^/]+/)[^/]+(/api/runtime/.*)$")


def send(resp: falcon.Response, value: Any, status: int = 200) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = _encoder.encode(value)


def body(req: falcon.Request, kind: Any) -> Any:
    """Decode the request body (read and size-checked by the middleware) into ``kind``."""
    raw = getattr(req.context, "body", None)
    if raw is None:
        raw = req.bounded_stream.read()
    return schemas.decode(raw, kind)


def path_id(value: str, what: str) -> str:
    """Reject malformed ids before they reach the store."""
    if len(value) > MAX_ID_LEN or not _ID_RE.match(value):
        raise InvalidInput(f"invalid {what} id")
    return value


def query_str(req: falcon.Request, name: str) -> str | None:
    value = req.get_param(name)
    if value is None or value == "":
        return None
    if len(value) > MAX_QUERY_LEN:
        raise InvalidInput(f"{name} is too long")
    return value


def query_ids(req: falcon.Request, name: str, what: str) -> list[str] | None:
    """A parameter naming ids, repeated or comma-separated; each one checked like a path id."""
    values = req.get_param_as_list(name, delimiter=",")
    if not values:
        return None
    return [path_id(v.strip(), what) for v in values if v.strip()] or None


def query_name(req: falcon.Request, name: str) -> str | None:
    """A free-text name (context id, agent slug, audit action): bounded, no control characters."""
    value = query_str(req, name)
    if value is not None and (len(value) > MAX_ID_LEN or _CONTROL_RE.search(value)):
        raise InvalidInput(f"{name} must be at most {MAX_ID_LEN} printable characters")
    return value


def query_int(req: falcon.Request, name: str) -> int | None:
    value = query_str(req, name)
    if value is None:
        return None
    if not re.fullmatch(r"-?[0-9]{1,12}", value):
        raise InvalidInput(f"{name} must be an integer")
    return int(value)


def send_page(req: falcon.Request, resp: falcon.Response, page: Page, limit: int | None) -> None:
    """The items as a JSON array; the next page's URL in ``Link: <…>; rel="next"``."""
    if page.next_cursor:
        params = {k: v for k, v in req.params.items() if k not in ("cursor", "limit") and isinstance(v, str)}
        params["cursor"] = page.next_cursor
        params["limit"] = str(limit or 100)
        resp.set_header("Link", f'<{req.path}?{urlencode(params)}>; rel="next"')
    send(resp, page.items)


def loggable_path(path: str) -> str:
    """``path`` fit for a log line: a callback URL's lease token masked."""
    return _TOKEN_PATH.sub(r"\1****\2", path)


def actor(req: falcon.Request) -> str:
    principal = getattr(req.context, "principal", None)
    return principal.name if principal is not None else "api"


def is_admin(req: falcon.Request) -> bool:
    """The caller's key may do admin operations (an admin key, or auth is off: see ``Authenticator``)."""
    principal = getattr(req.context, "principal", None)
    return principal is not None and principal.admin
