"""Which worker URLs may receive pushed tasks, prompts and the agent key.

A worker's URL is verified when it equals the URL an admin key or the membridge
sync vouched for (``worker_trust``), or when ``MEMBRIDGE_ALLOWED_HOSTS`` is set
and lists its host. A URL a worker registered for itself with a client key is
kept and shown, but unverified: nothing is sent to it until one of those vouches
for it, so no client key can steer prompts or the agent key to a host it chose.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import msgspec

from .errors import Conflict, Forbidden, UnsafeURL
from .models import Worker, WorkerUpsert
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


def require_verified(worker: Worker) -> None:
    """Raise ``Conflict`` unless ``worker``'s URL is verified (before sending it a task or the agent key)."""
    if not worker.url_verified:
        raise Conflict(
            f"worker {worker.id} has no verified URL: set it with an admin key, let the membridge sync report it, "
            "or list its host in MEMBRIDGE_ALLOWED_HOSTS", worker_id=worker.id)


def with_verification(worker: Worker, vouched: Mapping[str, str], allowed: AllowList | None) -> Worker:
    """``worker`` with ``url_verified`` filled in."""
    verified = url_verified(worker, vouched, allowed)
    return worker if worker.url_verified == verified else msgspec.structs.replace(worker, url_verified=verified)


def checked_registration(
    upsert: WorkerUpsert, admin: bool, allowed: AllowList | None, *, current_url: Callable[[str], str | None]
) -> WorkerUpsert:
    """A registration with its URL checked as every outgoing URL is (``UnsafeURL``) and normalised.

    Without ``admin`` (a client key: an agent registering itself) a URL may be set on a
    worker that has none, or repeated, but changing one raises ``Forbidden``; an admin's
    URL is vouched for by the caller. ``""`` (the first version's "no URL") changes nothing."""
    if upsert.url == "":
        return msgspec.structs.replace(upsert, url=None)
    if upsert.url is None:
        return upsert
    upsert = msgspec.structs.replace(upsert, url=validate_outgoing_url(upsert.url, allowed))
    if not admin:
        current = current_url(upsert.id)
        if current and current != upsert.url:
            raise Forbidden("changing a worker's URL needs an admin key", worker_id=upsert.id)
    return upsert
