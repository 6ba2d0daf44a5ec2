"""Opaque pagination cursors: the sort key of the last row of a page."""

from __future__ import annotations

import base64
import binascii
import json

from bloom_runtime.engine.errors import InvalidInput

MAX_CURSOR_LEN = 512
# Sort values are BIGINT (epoch ms); anything outside would overflow the query's parameter.
MIN_SORT_VALUE, MAX_SORT_VALUE = -(2**63), 2**63 - 1


def encode(sort_value: int, row_id: str) -> str:
    raw = json.dumps([sort_value, row_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(cursor: str) -> tuple[int, str]:
    """Return ``(sort_value, id)``; anything malformed raises ``InvalidInput``."""
    if not cursor or len(cursor) > MAX_CURSOR_LEN:
        raise InvalidInput("invalid cursor")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise InvalidInput("invalid cursor") from None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or type(value[0]) is not int
        or not MIN_SORT_VALUE <= value[0] <= MAX_SORT_VALUE
        or not isinstance(value[1], str)
        or len(value[1]) > 256
        or "\x00" in value[1]
    ):
        raise InvalidInput("invalid cursor")
    return value[0], value[1]
