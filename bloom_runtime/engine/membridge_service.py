"""Membridge wiring: runtime configuration, test-connection, pass-through, sync fetch and dispatch.

``MembridgeService`` is what ``engine.membridge`` holds. It owns the two
hardened clients (``MembridgeClient`` for the control plane, ``AgentClient``
for worker agents) and the membridge configuration:

- The URL and admin key are persisted in ``runtime_settings``; the environment
  values are the defaults. The clients read them through providers on every
  call, so a change takes effect on the next call without a restart.
- Keys never leave this module except in the outgoing headers: views mask
  them, audit details name only what changed, errors come from the clients,
  which never echo them.
- Everything that does network I/O here runs on the caller's thread (an API
  request thread, or the syncer's fetch thread), never inside an actor's
  message handler.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from .agent_client import AgentClient
from .errors import BloomError, InvalidInput, MembridgeError, MembridgeUnavailable, StoreUnavailable
from .membridge import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT_S,
    Backoff,
    MembridgeClient,
    MembridgeResponse,
    key_header,
)
from .models import AuditEntry, Lease, LeaseGrant, Task, Worker, new_id
from .settings import mask, mask_ends
from .urls import AllowList, join, safe_path_segment, validate_outgoing_url

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("bloom_runtime.membridge")

URL_KEY = "membridge_server_url"
ADMIN_KEY = "membridge_admin_key"
# The outcome of the last test-connection, under the first version's keys so an adopted
# database keeps its own: "true"/"false", and epoch ms ("" once the configuration changed).
CONNECTED_KEY = "connected"
LAST_TEST_KEY = "last_test"
LEASE_PREFIX = "/api/leases"  # runtime_url = callback base + /api/leases/{lease_id}
MAX_FIELD_CHARS = 256  # parsed /health fields are shown, bounded; raw bodies never are
MAX_FIELDS = 32
NOT_CONFIGURED_RETRY_AFTER_S = 60
HIDDEN = "****"  # a set key, as callers that may not see its ends are shown it


@dataclass(frozen=True)
class MembridgeTuning:
    """Client constants; tests shrink them through ``Settings.extra`` (same names)."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    retries: int = DEFAULT_RETRIES
    backoff_base_s: float = 0.5
    breaker_fail_max: int = 5
    breaker_reset_s: float = 30.0
    agent_timeout_s: float = DEFAULT_TIMEOUT_S
    agent_retries: int = DEFAULT_RETRIES
    agent_breaker_fail_max: int = 5
    agent_breaker_reset_s: float = 30.0

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any]) -> MembridgeTuning:
        """Read ``membridge_<field>`` entries (e.g. ``membridge_breaker_fail_max``)."""
        values = {f: extra[f"membridge_{f}"] for f in cls.__dataclass_fields__ if f"membridge_{f}" in extra}
        return cls(**values)


class SyncStats:
    """Counters of the membridge sync for /health and metrics (written by the syncer)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.successes = 0
        self.failures = 0
        self.skipped = 0  # ticks that found a sync still running
        self.agents_seen = 0
        self.last_duration_ms: int | None = None

    def success(self, agents: int, duration_ms: int) -> None:
        with self._lock:
            self.successes += 1
            self.agents_seen = agents
            self.last_duration_ms = duration_ms

    def failure(self, duration_ms: int) -> None:
        with self._lock:
            self.failures += 1
            self.last_duration_ms = duration_ms

    def skip(self) -> None:
        with self._lock:
            self.skipped += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "successes": self.successes,
                "failures": self.failures,
                "skipped": self.skipped,
                "agents_seen": self.agents_seen,
                "last_duration_ms": self.last_duration_ms,
            }


class DispatchResult(msgspec.Struct, frozen=True, kw_only=True):
    task: Task
    lease: Lease
    worker: Worker
    dispatched: bool
    worker_status: int | None = None


def scalar_fields(data: Any, depth: int = 0) -> dict[str, Any]:
    """The scalar fields of a JSON object, bounded, and of the objects in it down to
    ``depth`` levels: what a peer's /health may show a client (raw bodies never)."""
    if not isinstance(data, dict):
        return {}
    out: dict[str, Any] = {}
    for key, value in list(data.items())[:MAX_FIELDS]:
        if not isinstance(key, str) or len(key) > 64:
            continue
        if isinstance(value, str):
            out[key] = value[:MAX_FIELD_CHARS]
        elif value is None or isinstance(value, bool | int) or (isinstance(value, float) and math.isfinite(value)):
            out[key] = value
        elif isinstance(value, dict) and depth > 0:
            out[key] = scalar_fields(value, depth - 1)
    return out


class MembridgeService:
    """``engine.membridge``: configuration, the clients and the calls built on them."""

    def __init__(self, engine: Engine, tuning: MembridgeTuning | None = None) -> None:
        self._engine = engine
        settings = engine.settings
        self.tuning = tuning or MembridgeTuning.from_extra(settings.extra)
        self.allowed = AllowList.from_env(settings.membridge_allowed_hosts)  # ConfigError at boot if malformed
        self.sync_stats = SyncStats()
        self._lock = threading.Lock()
        self._stored: dict[str, str] | None = None
        self._last_test: dict[str, Any] | None = None
        t = self.tuning
        self.client = MembridgeClient(
            self._url, self._admin_key, timeout_s=t.timeout_s, retries=t.retries,
            backoff=Backoff(base_s=t.backoff_base_s), breaker_fail_max=t.breaker_fail_max,
            breaker_reset_s=t.breaker_reset_s, allowed=self.allowed,
        )
        self.agents = AgentClient(
            timeout_s=t.agent_timeout_s, retries=t.agent_retries, backoff=Backoff(base_s=t.backoff_base_s),
            breaker_fail_max=t.agent_breaker_fail_max, breaker_reset_s=t.agent_breaker_reset_s, allowed=self.allowed,
        )
        try:
            self._load()
        except StoreUnavailable as exc:  # loaded on first use instead
            log.warning("membridge configuration not loaded yet: %s", exc.message)

    def __repr__(self) -> str:
        return f"MembridgeService(configured={self.configured})"

    def close(self) -> None:
        """Release both clients' connection pools (idempotent)."""
        self.client.close()
        self.agents.close()

    # --- configuration -------------------------------------------------------------

    def _load(self) -> dict[str, str]:
        stored = self._engine.store.get_settings()
        values = {k: stored[k] for k in (URL_KEY, ADMIN_KEY, CONNECTED_KEY, LAST_TEST_KEY) if stored.get(k)}
        with self._lock:
            self._stored = values
        return values

    def _values(self) -> dict[str, str]:
        with self._lock:
            stored = self._stored
        return stored if stored is not None else self._load()

    def _url(self) -> str | None:
        return self._values().get(URL_KEY) or self._engine.settings.membridge_server_url

    def _admin_key(self) -> str | None:
        key = self._values().get(ADMIN_KEY)
        if key:
            return key
        secret = self._engine.settings.membridge_admin_key
        return secret.reveal() if secret is not None else None

    def _agent_key(self) -> str | None:
        secret = self._engine.settings.membridge_agent_key
        return secret.reveal() if secret is not None else None

    @property
    def configured(self) -> bool:
        """A membridge URL is set (env or runtime config)."""
        try:
            return bool(self._url())
        except StoreUnavailable:
            return bool(self._engine.settings.membridge_server_url)

    def get_config(self, refresh: bool = True, *, show_key: bool = False) -> dict[str, Any]:
        """``{membridge_server_url, admin_key, admin_key_masked, configured, connected, last_test}``.

        The key's ends show only with ``show_key`` (admin callers): ``admin_key`` its last
        4 characters, ``admin_key_masked`` the first version's ``adm-****cdef``; others
        learn only whether a key is set. ``connected`` and ``last_test`` are the recorded
        outcome of the last test-connection since the configuration changed. Re-reads the
        store so a change made by another engine process shows (and applies) here too."""
        values = self._load() if refresh else self._values()
        url, key = self._url(), self._admin_key()
        hidden = HIDDEN if key else None
        last_test = values.get(LAST_TEST_KEY, "")
        return {
            "membridge_server_url": url,
            "admin_key": mask(key) if show_key else hidden,
            "admin_key_masked": (mask_ends(key) if show_key else hidden) or "",
            "configured": bool(url),
            "connected": values.get(CONNECTED_KEY) == "true",
            "last_test": int(last_test) if last_test.isdigit() else None,
        }

    def update_config(self, url: str | None = None, admin_key: str | None = None, actor: str = "api") -> dict[str, Any]:
        """Validate, persist and apply a new URL and/or admin key; audited by name only.

        An empty ``admin_key`` leaves the key as it is: the first version's settings form
        sends one whenever only the URL was edited."""
        values: dict[str, str] = {}
        if url is not None:
            values[URL_KEY] = validate_outgoing_url(url, self.allowed)
        if admin_key:
            try:
                key_header("X", admin_key, "admin_key")
            except MembridgeError as exc:
                raise InvalidInput(exc.message) from None
            values[ADMIN_KEY] = admin_key
        if values:
            changed = ",".join(sorted(values))  # names only: never the key itself
            # The last test described the old configuration.
            values.update({CONNECTED_KEY: "false", LAST_TEST_KEY: ""})
            self._engine.store.run(lambda tx: tx.set_settings(values))
            self._load()
            self._last_test = None
            self._engine.record([self._audit("config_updated", "config", "runtime", actor, f"changed={changed}")])
        return self.get_config(refresh=False, show_key=True)

    def _audit(self, action: str, entity_type: str, entity_id: str, actor: str, detail: str | None) -> AuditEntry:
        return AuditEntry(id=new_id(), timestamp=self._engine.clock.now_ms(), action=action,
                          entity_type=entity_type, entity_id=entity_id, actor=actor, detail=detail)

    def _require_configured(self) -> None:
        if not self.configured:
            raise MembridgeUnavailable("membridge not configured", retry_after_s=NOT_CONFIGURED_RETRY_AFTER_S)

    # --- calls -------------------------------------------------------------------------

    def test_connection(self) -> dict[str, Any]:
        """GET membridge ``/health``; record the outcome (``connected``, ``last_test``) and
        answer it, reachable or not, as the first version does.

        ``{connected: true, status, health: {parsed scalar fields}, latency_ms, tested_at}``,
        or ``{connected: false, error, …}`` (with ``status`` when membridge answered, and
        ``retry_after_s`` while its breaker is open). Not configured: ``{connected: false,
        configured: false, error}``, nothing recorded. Raises only ``StoreUnavailable``."""
        if not self.configured:
            return {"connected": False, "configured": False, "error": "membridge not configured"}
        started = time.monotonic()
        tested_at = self._engine.clock.now_ms()
        result: dict[str, Any] = {"connected": False, "tested_at": tested_at}
        try:
            response = self.client.request("GET", "/health")
            if not response.ok:
                raise MembridgeError(f"membridge answered {response.status} for GET /health", status=response.status)
            if response.malformed or not isinstance(response.data, dict):
                raise MembridgeError("malformed /health response from membridge", status=response.status)
        except StoreUnavailable:
            raise
        except BloomError as exc:  # unreachable, refused, a bad answer, the breaker open, a URL not allowed
            result["error"] = exc.message
            for detail in ("status", "retry_after_s"):
                if detail in exc.details:
                    result[detail] = exc.details[detail]
        else:
            result.update(connected=True, status=response.status, health=scalar_fields(response.data))
        result["latency_ms"] = round((time.monotonic() - started) * 1000, 1)
        self._last_test = result
        self._record_test(result["connected"], tested_at)
        return result

    def _record_test(self, connected: bool, tested_at: int) -> None:
        values = {CONNECTED_KEY: "true" if connected else "false", LAST_TEST_KEY: str(tested_at)}
        try:
            self._engine.store.run(lambda tx: tx.set_settings(values))
            self._load()
        except StoreUnavailable as exc:  # the caller still gets the outcome; /config shows the one before
            log.warning("test-connection outcome not recorded: %s", exc.message)

    def proxy(self, method: str, segments: Sequence[str], body: Any = None) -> MembridgeResponse:
        """Call membridge at ``/seg/seg/...``; each segment must be a safe path segment.

        Raises ``InvalidInput`` for a bad segment, ``MembridgeUnavailable`` when not
        configured or the breaker is open, ``MembridgeError`` when unreachable."""
        for segment in segments:
            safe_path_segment(segment, what="path parameter")
        self._require_configured()
        return self.client.request(method, join("", *segments), json=body)

    def select_leader(self, cid: str, body: dict[str, Any], actor: str) -> MembridgeResponse:
        """POST ``/projects/{cid}/leadership/select``; the attempt and its outcome are audited."""
        safe_path_segment(cid, what="project id")
        node = body.get("node")
        shown = node[:128] if isinstance(node, str) else None
        try:
            response = self.proxy("POST", ["projects", cid, "leadership", "select"], body)
        except BloomError as exc:
            self._engine.record([self._audit("leadership_select_failed", "project", cid, actor,
                                             f"node={shown}: {exc.message}"[:1000])])
            raise
        action = "leadership_selected" if response.ok else "leadership_select_refused"
        self._engine.record([self._audit(action, "project", cid, actor, f"node={shown} status={response.status}")])
        return response

    def fetch_agents(self) -> list[dict[str, Any]]:
        """``GET /agents`` (blocking; the syncer calls it off its actor thread)."""
        self._require_configured()
        return self.client.agents()

    def sync_now(self, timeout_s: float | None = None) -> list[Any] | None:
        """Run one sync now and wait until its upserts are committed.

        Returns the ``(worker, created)`` pairs, ``[]`` when nothing changed, or
        ``None`` when not configured or a sync was already running; raises the
        sync's error when it failed."""
        from bloom_runtime.actors.base import Tick

        return self._engine.call("membridge", lambda r: Tick(r), timeout_s)

    def known_workers(self) -> list[Worker]:
        """Workers the sync manages (source ``membridge``), read from the store."""
        return [w for w in self._engine.store.list_workers() if w.source == "membridge"]

    # --- dispatch ----------------------------------------------------------------------

    @property
    def dispatch_enabled(self) -> bool:
        """Dispatch is part of the membridge integration: on once a URL or an agent key is set."""
        return self.configured or self._agent_key() is not None

    def runtime_url(self, lease_id: str) -> str:
        """The callback base handed to an agent: lease-scoped, so late callbacks are fenced."""
        return self._engine.settings.callback_base_url + join(LEASE_PREFIX, lease_id)

    def dispatch(
        self, task_id: str, worker_id: str | None = None, ttl_seconds: int | None = None, actor: str = "api"
    ) -> DispatchResult:
        """Lease the task, then POST it to the worker's ``/execute-task``.

        Runs on the caller's thread. If the worker refuses or cannot be reached,
        the lease is marked failed (the task goes back to the queue or to
        failed), the outcome is audited and ``MembridgeError`` (502) is raised."""
        if not self.dispatch_enabled:
            raise MembridgeUnavailable("dispatch not available: membridge not configured",
                                       retry_after_s=NOT_CONFIGURED_RETRY_AFTER_S)
        engine = self._engine
        grant: LeaseGrant = engine.leases.acquire(task_id, worker_id, ttl_seconds, actor=actor)
        task, lease, worker = grant.task, grant.lease, grant.worker
        payload = {
            "task_id": task.id,
            "lease_id": lease.id,
            "context_id": task.context_id,
            "agent_slug": task.agent_slug,
            "prompt": task.prompt,
            "context_hints": task.context_hints,
            "policy": msgspec.to_builtins(task.policy),
            "desired_format": task.desired_format,
            "labels": task.labels,
            "attempt": task.attempts,
            "ttl_seconds": lease.ttl_seconds,
            "expires_at": lease.expires_at,
            "runtime_url": self.runtime_url(lease.id),
        }
        reason: str | None = None
        status: int | None = None
        if not worker.url:
            reason = "worker has no url"
        else:
            try:
                response = self.agents.post_execute_task(worker.url, payload, self._agent_key())
            except BloomError as exc:  # MembridgeError (unreachable, 5xx, breaker open) or UnsafeURL
                reason = exc.message
            else:
                status = response.status
                if not response.ok:
                    reason = f"worker answered {response.status}"
        if reason is None:
            engine.record([self._audit("task_dispatched", "task", task.id, actor,
                                       f"lease={lease.id} worker={worker.id} status={status}")])
            return DispatchResult(task=task, lease=lease, worker=worker, dispatched=True, worker_status=status)
        task_status = None
        try:
            failed_task, _ = engine.leases.fail(lease.id, f"dispatch failed: {reason}"[:500], actor=actor)
            task_status = failed_task.status
        except BloomError as exc:
            # The lease moved on (the agent completed it, or it expired) while we waited.
            log.warning("dispatch of task %s: could not fail lease %s: %s", task.id, lease.id, exc.message)
        log.warning("dispatch of task %s to worker %s failed: %s", task.id, worker.id, reason)
        raise MembridgeError(f"dispatch to worker {worker.id} failed: {reason}", task_id=task.id,
                             lease_id=lease.id, worker_id=worker.id, task_status=task_status,
                             worker_status=status)

    # --- state ---------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Client state, last test and sync counters for /health and metrics (never a key);
        just ``{"configured": False}`` while no membridge URL is set."""
        if not self.configured:
            return {"configured": False}
        state = self.client.state()
        breaker = state.get("breaker")
        state.update({
            "configured": self.configured,
            "breaker_state": breaker,
            "last_test": self._last_test,
            "sync": {**self._engine.jobs["membridge_sync"].snapshot(), **self.sync_stats.snapshot()},
            "agents": {
                "open_breakers": sum(1 for s in self.agents.breakers.states().values() if s != "closed"),
                "failures": self.agents.state()["failures"],
            },
        })
        return state
