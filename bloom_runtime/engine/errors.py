"""Error types of bloom-runtime.

Every error the engine, the stores and the membridge client raise is a
``BloomError``. The HTTP layer maps each subclass to one status in one place;
driver and library exceptions never cross the public API (the original stays on
``__cause__``).
"""

from __future__ import annotations

from typing import Any


class BloomError(Exception):
    """Root of every error bloom-runtime raises on purpose."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.message, **self.details}


class InvalidInput(BloomError):
    """The caller sent something malformed or out of range (HTTP 400)."""


class Unauthorized(BloomError):
    """The caller's credential (a lease token) is not valid for this (HTTP 401)."""


class Forbidden(BloomError):
    """The caller's key may not do this (HTTP 403)."""


class NotFound(BloomError):
    """The named task, worker, lease or result does not exist (HTTP 404)."""


class Conflict(BloomError):
    """The entity is not in a state that allows the operation (HTTP 409)."""


class StaleLease(Conflict):
    """The caller named a lease or worker that is not the task's active one (HTTP 409)."""


class NoCapacity(BloomError):
    """No worker can take the task right now (HTTP 503)."""


class StoreUnavailable(BloomError):
    """The database cannot be reached or failed mid-transaction (HTTP 503)."""


class StoreRefused(StoreUnavailable):
    """The database refused a value of the write (retrying it as it is cannot succeed) (HTTP 503)."""


class StoreFull(StoreUnavailable):
    """The database has no room left to write (a full disk, a size limit) (HTTP 503)."""


class StoreTimeout(StoreUnavailable):
    """The database did not answer in time (HTTP 503). Nothing of a write was applied:
    one whose commit went unanswered is ``OutcomeUnknown``."""


class SchemaTooNew(BloomError):
    """The database was migrated by a newer bloom-runtime than this one."""


class NotAdoptable(BloomError):
    """The database holds tables named as ours that are neither ours nor the first version's
    as bloom-runtime can adopt them; nothing was changed."""


class ConfigError(BloomError):
    """A setting is missing or malformed (exit status 2 at start)."""


class EngineTimeout(BloomError):
    """A write was not started within the ask timeout, and now never will be: nothing
    changed (HTTP 503)."""


class OutcomeUnknown(BloomError):
    """A write was under way when its time ran out, or the database connection failed
    while its commit was in flight: it may or may not have been applied (HTTP 504)."""


class EngineStopped(BloomError):
    """The engine is stopping or stopped and takes no new work (HTTP 503)."""


class MembridgeError(BloomError):
    """The membridge control plane or a worker agent failed (HTTP 502)."""


class MembridgeUnavailable(MembridgeError):
    """Membridge is known to be down: its circuit breaker is open (HTTP 503)."""


class UnsafeURL(InvalidInput):
    """An outgoing URL failed validation (scheme, credentials, allow-list)."""


# What an open endpoint (/health) may say about an error: its kind, never its message,
# which can name database hosts, ports and names or outgoing URLs (those go to the log).
_PUBLIC_SUMMARIES: tuple[tuple[type[BaseException], str], ...] = (
    (StoreTimeout, "storage did not answer in time"),
    (StoreFull, "storage is full"),
    (StoreUnavailable, "storage unavailable"),
    (EngineTimeout, "did not answer in time"),
    (OutcomeUnknown, "a write's outcome is unknown"),
    (MembridgeUnavailable, "membridge circuit open"),
    (MembridgeError, "membridge request failed"),
)


def public_message(exc: BaseException) -> str | None:
    """What ``exc`` means, in words safe to show to anyone (None: no more than its kind)."""
    for cls, summary in _PUBLIC_SUMMARIES:
        if isinstance(exc, cls):
            return summary
    return None


def public_summary(exc: BaseException) -> str:
    """``"Kind: what it means"`` for ``exc``, safe to show to anyone."""
    message = public_message(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
