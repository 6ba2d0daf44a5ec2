"""OpenAPI 3.1 document generated from the route table and the msgspec structs."""

from __future__ import annotations

import re
from typing import Any

import falcon
import msgspec

from bloom_runtime import __version__
from bloom_runtime.engine.models import ID_PATTERN
from bloom_runtime.http import schemas
from bloom_runtime.http.auth import HEADER
from bloom_runtime.http.routes import ROUTES, Route

REF = "#/components/schemas/{name}"
ERROR_STATUSES = {
    400: "invalid input",
    401: "missing or wrong API key",
    403: "admin key required",
    404: "unknown id or route",
    409: "wrong state or stale lease",
    413: "body too large",
    429: "rate limited (Retry-After, RateLimit-* headers)",
    503: "overloaded, no capacity or store down (Retry-After); a write answered 503 was not applied",
    504: "a write was under way when its time ran out or the database connection failed: it may or may not have been applied",
}
WRITE_ONLY = {504}  # a read never answers these


def _path_params(path: str) -> list[dict[str, Any]]:
    return [
        {"name": name, "in": "path", "required": True,
         "schema": {"type": "string", "maxLength": 128, "pattern": ID_PATTERN}}
        for name in re.findall(r"{(\w+)}", path)
    ]


def build_document() -> dict[str, Any]:
    types: list[Any] = [schemas.ErrorBody]
    for route in ROUTES:
        for op in route.ops.values():
            if op.body is not None:
                types.append(op.body)
            types.extend(t for t, _ in op.responses.values() if t is not None)
    found, components = msgspec.json.schema_components(types, ref_template=REF)
    schema_of = {id(t): s for t, s in zip(types, found, strict=True)}
    error_ref = schema_of[id(schemas.ErrorBody)]

    paths: dict[str, Any] = {}
    for route in ROUTES:
        item: dict[str, Any] = {}
        for method, op in route.ops.items():
            responses: dict[str, Any] = {}
            for status, (kind, description) in sorted(op.responses.items()):
                entry: dict[str, Any] = {"description": description}
                if kind is not None:
                    entry["content"] = {op.content if status < 300 else "application/json": {"schema": schema_of[id(kind)]}}
                elif op.content != "application/json" and status < 300:
                    entry["content"] = {op.content: {"schema": {"type": "string"}}}
                responses[str(status)] = entry
            relevant = set(ERROR_STATUSES) - {401, 403} if op.access == "open" else set(ERROR_STATUSES)
            if op.access != "admin":
                relevant.discard(403)
            if method == "GET":
                relevant -= WRITE_ONLY
            for status in sorted(relevant):
                responses.setdefault(str(status), {
                    "description": ERROR_STATUSES[status],
                    "content": {"application/json": {"schema": error_ref}},
                })
            spec: dict[str, Any] = {
                "operationId": _operation_id(method, route),
                "summary": op.summary,
                "parameters": _path_params(route.path) + [
                    {"name": p.name, "in": p.where, "required": False, "description": p.description, "schema": p.schema}
                    for p in op.params
                ],
                "responses": responses,
            }
            if op.body is not None:
                spec["requestBody"] = {
                    "required": not op.body_optional,
                    "description": "JSON; unknown fields are ignored" + ("; an empty body means {}" if op.body_optional else ""),
                    "content": {"application/json": {"schema": schema_of[id(op.body)]}},
                }
            if op.access == "open":
                spec["security"] = []
            elif op.access == "admin":
                spec["description"] = "Admin operation: needs a key from RUNTIME_ADMIN_KEY when that is set."
            item[method.lower()] = spec
        paths[route.path] = item
    return {
        "openapi": "3.1.0",
        "info": {"title": "bloom-runtime", "version": __version__,
                 "description": "Leases LLM tasks to worker nodes. Errors are JSON {\"error\": …}."},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": HEADER}},
        },
        "security": [{"apiKey": []}],
    }


def _operation_id(method: str, route: Route) -> str:
    words = re.sub(r"[{}]", "", route.path.split("/api/", 1)[-1].strip("/") or "console").replace(".", "_")
    return method.lower() + "_" + re.sub(r"[^A-Za-z0-9]+", "_", words).strip("_")


class OpenApiResource:
    def __init__(self) -> None:
        self._data = msgspec.json.encode(build_document())  # built once: the routes are fixed

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self._data
