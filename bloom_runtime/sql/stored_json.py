"""JSON columns as both stores keep them, decoded straight into their types.

Decoders are built once and decode a column in one C call. Stored values are read
without the request-time limits (``Policy`` and ``Capabilities`` carry constraints):
a row written by the first version, or before a limit changed, must still load.
"""

from __future__ import annotations

from typing import Any

import msgspec

from bloom_runtime.engine.models import DEFAULT_TIMEOUT_SEC, Capabilities, Policy


class _StoredPolicy(msgspec.Struct):
    timeout_sec: int = DEFAULT_TIMEOUT_SEC
    budget: float = 0


class _StoredCapabilities(msgspec.Struct):
    claude_cli: bool = True
    max_concurrency: int = 1
    labels: list[str] = []


strings = msgspec.json.Decoder(list[str]).decode
json_object = msgspec.json.Decoder(dict[str, Any]).decode
encode = msgspec.json.Encoder().encode
_policy = msgspec.json.Decoder(_StoredPolicy).decode
_capabilities = msgspec.json.Decoder(_StoredCapabilities).decode


def policy(raw: str | bytes) -> Policy:
    p = _policy(raw)
    return Policy(timeout_sec=p.timeout_sec, budget=p.budget)


def capabilities(raw: str | bytes) -> Capabilities:
    c = _capabilities(raw)
    return Capabilities(claude_cli=c.claude_cli, max_concurrency=c.max_concurrency, labels=c.labels)


def to_json(value: Any) -> str:
    return encode(value).decode()
