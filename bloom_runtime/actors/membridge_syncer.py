"""MembridgeSyncer: polls membridge ``GET /agents`` and merges the agents it lists into the registry.

The HTTP calls (up to the client's timeout times its retries) never run on the
actor thread: a tick hands them to a one-thread executor and the outcome comes
back as a ``SyncDone`` message, so the inbox stays responsive. A tick that
finds a sync still running is skipped, so syncs never pile up. The registry is
told (never asked) to upsert; leases are never touched. A failed or malformed
sync changes nothing, is counted and is logged as one line.

The control plane knows little: ``/agents`` says ``unknown`` and ``last_seen:
null`` until it calls an agent itself, and agents' heartbeats show only under
``/projects/{cid}/nodes``. So a sync merges rather than overwrites: a new agent
becomes a worker (its URL vouched for), and for one the registry knows, from
any source, the sync brings its URL and only signs of life (the freshest
``last_seen`` of both lists, which may bring it online). It never lowers a
status, takes over a worker's source or capabilities, or writes when nothing
changed; staleness and the runtime's own probes take workers offline.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pykka

from bloom_runtime.actors.base import JobHealth, Record, Tick, _fail, audit
from bloom_runtime.actors.messages import UpsertWorkers
from bloom_runtime.engine.clock import Clock
from bloom_runtime.engine.errors import (
    BloomError,
    EngineStopped,
    InvalidInput,
    MembridgeError,
)
from bloom_runtime.engine.models import AuditEntry, Worker, WorkerUpsert, validate
from bloom_runtime.engine.urls import validate_outgoing_url

log = logging.getLogger(__name__)

ACTOR = "membridge-sync"

# membridge agent status → our worker status; anything else is "unknown".
STATUS_MAP: Mapping[str, str] = {
    "online": "online", "active": "online", "healthy": "online", "ready": "online", "idle": "online", "busy": "online",
    "offline": "offline", "stopped": "offline", "dead": "offline", "disconnected": "offline", "inactive": "offline",
    "syncing": "syncing", "starting": "syncing",
    "error": "error", "failed": "error", "unhealthy": "error",
}
_OPTIONAL_TEXT = ("agent_version", "os_info", "install_method", "db_sha")


@dataclass
class SyncDone:
    """Told by the fetch thread: the answer (or the error) of one ``GET /agents``."""

    agents: list[dict[str, Any]] | None
    known: dict[str, Worker] | None  # every worker in the store at fetch time
    error: BaseException | None
    started: float  # time.monotonic() when the fetch began
    reply: pykka.ThreadingFuture | None
    nodes: dict[str, float] = field(default_factory=dict)  # node id → last heartbeat (float seconds)


def seconds_to_ms(value: Any) -> int | None:
    """Membridge sends float seconds; we store integer milliseconds."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return round(value * 1000)


def map_status(value: Any) -> str:
    return STATUS_MAP.get(value.strip().lower(), "unknown") if isinstance(value, str) else "unknown"


def describe(error: BaseException) -> str:
    """A one-line, secret-free reason (our errors never carry keys; others show their type)."""
    if isinstance(error, BloomError):
        reason = error.details.get("reason")
        return f"{error.message} ({reason})" if reason else error.message
    return type(error).__name__


class MembridgeSyncer(pykka.ThreadingActor):
    def __init__(
        self,
        clock: Clock,
        *,
        health: JobHealth,
        registry: Callable[[], Any],
        audit_sink: Callable[[Record], None],
        client: Callable[[], Any],
        offline_after_ms: int,
    ) -> None:
        super().__init__()
        self.clock = clock
        self.health = health
        self._registry = registry
        self._audit_sink = audit_sink
        self._client = client  # → the MembridgeService (engine.membridge), or None
        self.offline_after_ms = offline_after_ms
        self._executor: ThreadPoolExecutor | None = None
        self._running = False
        self._failures_in_row = 0

    # --- lifecycle ---------------------------------------------------------------

    def on_start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="membridge-sync")

    def on_stop(self) -> None:
        self._shutdown()

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        if self._executor is not None:
            # A fetch in flight ends by its own timeout; its SyncDone finds the actor gone.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # --- messages --------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Tick):
            self._tick(message.reply)
        elif isinstance(message, SyncDone):
            self._done(message)
        return None

    def _tick(self, reply: pykka.ThreadingFuture | None) -> None:
        service = self._client()
        if service is None or not service.configured or self._executor is None:
            if reply is not None:
                reply.set(None)
            return
        if self._running:
            service.sync_stats.skip()
            log.debug("membridge sync still running; tick skipped")
            if reply is not None:
                reply.set(None)
            return
        self._running = True
        self._executor.submit(self._fetch, service, time.monotonic(), reply)

    def _fetch(self, service: Any, started: float, reply: pykka.ThreadingFuture | None) -> None:
        """Runs on the executor thread: the blocking HTTP call and a store read, then tell."""
        try:
            agents = service.fetch_agents()
            nodes = service.fetch_node_sightings([a["name"] for a in agents])
            known = {w.id: w for w in service.known_workers()}
            done = SyncDone(agents, known, None, started, reply, nodes)
        except Exception as exc:
            done = SyncDone(None, None, exc, started, reply)
        try:
            self.actor_ref.tell(done)
        except pykka.ActorDeadError:
            _fail(reply, EngineStopped("membridge syncer stopped"))

    def _done(self, done: SyncDone) -> None:
        self._running = False
        service = self._client()
        duration_ms = int((time.monotonic() - done.started) * 1000)
        now = self.clock.now_ms()
        error = done.error
        upserts: list[WorkerUpsert] = []
        entries: list[AuditEntry] = []
        if error is None:
            assert done.agents is not None and done.known is not None
            try:
                upserts, entries, vouch = self.plan(done.agents, done.known, now, done.nodes)
            except InvalidInput as exc:
                error = MembridgeError("malformed /agents response", reason=exc.message[:200])
        if error is not None:
            self._failures_in_row += 1
            self.health.failed(error)
            if service is not None:
                service.sync_stats.failure(duration_ms)
            log.warning("membridge sync failed (%d in a row): %s", self._failures_in_row, describe(error))
            _fail(done.reply, error)
            return
        if self._failures_in_row:
            log.info("membridge sync succeeded again after %d failed syncs", self._failures_in_row)
        self._failures_in_row = 0
        self.health.succeeded(now)
        if service is not None:
            service.sync_stats.success(len(done.agents or ()), duration_ms)
        if not upserts:
            if done.reply is not None:
                done.reply.set([])
            return
        try:
            # The entries commit with the changes they record.
            self._registry().tell(UpsertWorkers(upserts, ACTOR, done.reply, entries, vouch))
        except (BloomError, pykka.ActorDeadError) as exc:
            log.warning("membridge sync: registry unavailable: %s", describe(exc))
            _fail(done.reply, exc)

    # --- planning (pure; tests call it directly) ----------------------------------

    def plan(
        self, agents: list[dict[str, Any]], known: Mapping[str, Worker], now: int, nodes: Mapping[str, float] | None = None,
    ) -> tuple[list[WorkerUpsert], list[AuditEntry], dict[str, str]]:
        """The upserts, audit entries and URLs to vouch for that one answer calls for;
        raises ``InvalidInput`` when any agent cannot be a worker (then nothing is applied)."""
        nodes = nodes or {}
        upserts: list[WorkerUpsert] = []
        entries: list[AuditEntry] = []
        vouch: dict[str, str] = {}
        seen: set[str] = set()
        for agent in agents:
            name = agent["name"]
            if name in seen:
                raise InvalidInput(f"agent {name!r} listed twice")
            seen.add(name)
            last_seen = max(filter(None, (seconds_to_ms(agent.get("last_seen")), seconds_to_ms(nodes.get(name)))), default=None)
            url = self._url(agent.get("url"))
            old = known.get(name)
            upsert = validate(self._new(agent, url, last_seen, now) if old is None else self._merge(old, agent, url, last_seen, now, entries))
            if url is not None and (old is None or old.url != url or not old.url_verified):
                vouch[name] = url
                if old is not None:
                    entries.append(audit(now, "worker_updated", "worker", name, ACTOR, f"url={url} vouched for (membridge /agents)"))
            if old is None or name in vouch or upsert != WorkerUpsert(id=name):
                upserts.append(upsert)
        return upserts, entries, vouch

    def _new(self, agent: dict[str, Any], url: str | None, last_seen: int | None, now: int) -> WorkerUpsert:
        fresh = last_seen is not None and now - last_seen <= self.offline_after_ms
        status = map_status(agent.get("status"))
        if status == "online" and not fresh:
            status = "offline" if last_seen is not None else "unknown"  # said online, but has gone quiet
        elif status == "unknown" and fresh:
            status = "online"  # never called by the control plane, but its heartbeats are recent
        raw = agent.get("url")
        shown = url or (raw if isinstance(raw, str) and raw.strip() else None)  # kept, but never vouched for
        return WorkerUpsert(id=agent["name"], url=shown, status=status,  # type: ignore[arg-type]
                            last_heartbeat=last_seen, source="membridge", **self._extra(agent))

    def _merge(
        self, old: Worker, agent: dict[str, Any], url: str | None, last_seen: int | None, now: int, entries: list[AuditEntry],
    ) -> WorkerUpsert:
        """Only what the control plane adds: its URL, a fresher sighting, optional fields it has."""
        fields: dict[str, Any] = {k: v for k, v in self._extra(agent).items() if getattr(old, k) != v}
        if url is not None and url != old.url:
            fields["url"] = url
        if last_seen is not None and last_seen > old.last_heartbeat:
            fields["last_heartbeat"] = last_seen
            if old.status != "online" and now - last_seen <= self.offline_after_ms:
                fields["status"] = "online"
                entries.append(audit(now, "worker_online", "worker", old.id, ACTOR,
                                     f"{old.status} -> online: membridge last_seen {(now - last_seen) // 1000} s ago"))
        return WorkerUpsert(id=old.id, **fields)

    @staticmethod
    def _url(value: Any) -> str | None:
        """The agent's URL in the form the registry stores, or None if it has none that
        passes the outgoing-URL check (such a URL is shown on a new worker, never vouched for)."""
        if not isinstance(value, str) or not value.strip():
            return None
        try:
            return validate_outgoing_url(value, None)
        except InvalidInput:
            return None  # refused by the transport anyway; never vouched for

    @staticmethod
    def _extra(agent: dict[str, Any]) -> dict[str, Any]:
        extra: dict[str, Any] = {k: agent[k] for k in _OPTIONAL_TEXT if isinstance(agent.get(k), str)}
        if isinstance(agent.get("ip_addrs"), list) and all(isinstance(a, str) for a in agent["ip_addrs"]):
            extra["ip_addrs"] = agent["ip_addrs"]
        if isinstance(agent.get("obs_count"), int) and not isinstance(agent.get("obs_count"), bool):
            extra["obs_count"] = agent["obs_count"]
        return extra
