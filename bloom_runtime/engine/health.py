"""The engine's health report, as ``GET /health`` shows it (open: public words only)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from bloom_runtime.engine.errors import BloomError, public_message

if TYPE_CHECKING:
    from bloom_runtime.engine.engine import Engine

SWEEP_UNHEALTHY_AFTER_INTERVALS = 3


def health_report(engine: Engine) -> dict[str, Any]:
    """Healthy when the store answers, writes succeed, no audit entry waits too long,
    the lease sweep runs and every actor is alive."""
    store_ok, store_error = True, None
    try:
        engine.store.ping()  # bounded: a database that does not answer is reported as such
    except BloomError as exc:
        store_ok, store_error = False, public_message(exc) or "storage unavailable"
    now = engine.clock.now_ms()
    jobs = {name: job.snapshot() for name, job in engine.jobs.items()}
    limit_ms = SWEEP_UNHEALTHY_AFTER_INTERVALS * engine.settings.lease_sweep_interval_s * 1000
    # Judged on the engine clock; a sweep that never succeeded counts from start.
    sweep_ok = (jobs["lease_sweep"]["last_success"] or engine.started_ms) >= now - limit_ms - 1000
    writes = _writes(engine.writes.snapshot(), jobs["audit_flush"], now)
    audit = engine.audit_backlog.snapshot(now)
    audit_ok = audit["oldest_age_s"] is None or audit["oldest_age_s"] <= engine.settings.audit_backlog_max_s
    actors = engine.actor_states()
    healthy = (
        store_ok and writes["ok"] and audit_ok and sweep_ok and all(a["alive"] for a in actors.values()) and engine.running
    )
    return {
        "status": "ok" if healthy else "unhealthy",
        "service": "bloom-runtime",
        "version": engine.version,
        "uptime": round(time.monotonic() - engine.started_at, 3),
        "storage": engine.store.kind,
        "storage_ok": store_ok,
        "storage_error": store_error,
        "writes": writes,
        "audit": audit,
        "jobs": jobs,
        "actors": actors,
    }


def _writes(writes: dict[str, Any], audit_flush: dict[str, Any], now_ms: int) -> dict[str, Any]:
    """Whether the latest write (the audit writer's included) failed, with the last error and its age."""
    failed = writes if writes["last_error"] else audit_flush if audit_flush["last_error"] else None
    last_failure = max((w["last_failure"] for w in (writes, audit_flush) if w["last_failure"] is not None), default=None)
    return {
        "ok": failed is None,
        "last_success": writes["last_success"],
        "last_error": failed["last_error"] if failed else None,
        "last_failure": last_failure,
        "last_error_age_s": None if failed is None or failed["last_failure"] is None else max(0, now_ms - failed["last_failure"]) / 1000,
        "failures": writes["failures"],
    }
