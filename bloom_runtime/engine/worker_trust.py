"""Which worker URLs may receive pushed tasks, prompts and the agent key.

A worker's URL is verified when it equals the URL an admin key or the membridge
sync vouched for (``worker_trust``), or when ``MEMBRIDGE_ALLOWED_HOSTS`` is set
and lists its host. A URL a worker registered for itself with a client key is
kept and shown, but unverified: nothing is sent to it until one of those vouches
for it, so no client key can steer prompts or the agent key to a host it chose.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from .errors import UnsafeURL
from .models import Worker
from .urls import AllowList, validate_outgoing_url

VOUCHED_BY_SYNC = "membridge-sync"


def url_verified(worker: Worker, vouched: Mapping[str, str], allowed: AllowList | None) -> bool:
    if not worker.url:
        return False
    if vouched.get(worker.id) == worker.url:
        return True
    if allowed is None:
        return False
    try:
        validate_outgoing_url(worker.url, allowed)
    except UnsafeURL:
        return False
    return True


def with_verification(worker: Worker, vouched: Mapping[str, str], allowed: AllowList | None) -> Worker:
    """``worker`` with ``url_verified`` filled in."""
    verified = url_verified(worker, vouched, allowed)
    return worker if worker.url_verified == verified else msgspec.structs.replace(worker, url_verified=verified)
