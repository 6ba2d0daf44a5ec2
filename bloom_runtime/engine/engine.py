"""The engine: composition root and the typed facade callers use.

``Engine.start(settings)`` opens the store, starts the actors dependency-first
and their tickers; ``engine.stop()`` stops taking work, drains pending writes
and audit entries, stops the actors in reverse order and closes the store.

Writes go to the owning actor as a message with a reply future; the caller
waits on it with the ask timeout. Reads go straight to the store, which is safe
from any thread, so they never queue behind writes.
"""

from __future__ import annotations

import builtins
import functools
import logging
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, overload

import msgspec
import pykka

from bloom_runtime import __version__
from bloom_runtime.actors.audit_writer import AuditBacklog, AuditWriter
from bloom_runtime.actors.base import JobHealth, Record, Reply, Tick, Ticker, not_applied
from bloom_runtime.actors.dispatcher import Dispatcher, PlanNow
from bloom_runtime.actors.history_sampler import HistorySampler
from bloom_runtime.actors.lease_supervisor import LeaseSupervisor
from bloom_runtime.actors.membridge_syncer import MembridgeSyncer
from bloom_runtime.actors.messages import (
    AcquireLease,
    CancelTask,
    ClaimNext,
    CompleteTask,
    CompleteTasks,
    CreateTasks,
    FailLease,
    Heartbeat,
    PickWorkers,
    RecordLiveness,
    RefreshWorker,
    RegisterWorker,
    RemoveWorker,
    RequeueTask,
    Sighting,
    UpsertWorkers,
)
from bloom_runtime.actors.task_queue import TaskQueue
from bloom_runtime.actors.worker_registry import WorkerRegistry
from bloom_runtime.engine.agent_admin import AgentAdmin
from bloom_runtime.engine.backoff import RetryBackoff
from bloom_runtime.engine.clock import Clock, SystemClock
from bloom_runtime.engine.dispatch import DispatchService
from bloom_runtime.engine.errors import (
    BloomError,
    EngineStopped,
    EngineTimeout,
    InvalidInput,
    NoCapacity,
    NotFound,
    OutcomeUnknown,
    StoreUnavailable,
    Unauthorized,
)
from bloom_runtime.engine.health import health_report
from bloom_runtime.engine.history import HistoryService
from bloom_runtime.engine.lease_tokens import LeaseTokens
from bloom_runtime.engine.membridge_service import MembridgeService
from bloom_runtime.engine.models import (
    MAX_CLAIM_TASKS,
    MAX_COMPLETE_BATCH,
    MAX_CREATE_BATCH,
    MAX_TTL_SECONDS,
    TASK_STATUSES,
    Completion,
    CompletionOutcome,
    Fence,
    Lease,
    LeaseGrant,
    NewTask,
    Page,
    Result,
    Task,
    Worker,
    WorkerUpsert,
    clean_text,
    new_id,
    validate,
)
from bloom_runtime.engine.routing_keys import RoutingKeys
from bloom_runtime.engine.settings import Settings
from bloom_runtime.engine.stats_cache import StatsCache, summarize
from bloom_runtime.engine.urls import AllowList
from bloom_runtime.engine.wakeup import ClaimWakeup
from bloom_runtime.engine.worker_trust import checked_registration, with_verification
from bloom_runtime.sql import refusals, store_from_url
from bloom_runtime.sql.store import MAX_PAGE, Store

log = logging.getLogger(__name__)

T = TypeVar("T")

WATCHDOG_INTERVAL_S = 1.0
AUDIT_RETRY_INTERVAL_S = 0.5
MAX_CLAIM_WAIT_S = 30.0
# A claimer re-checks at least this often, so tasks whose retry backoff ends
# (not_before) are found without a notification.
CLAIM_RECHECK_S = 1.0
MAX_HEARTBEAT_SKEW_MS = 60_000  # how far a registration's last_heartbeat may run ahead of our clock
DELIVERY_EXPIRY_INTERVAL_S = 10.0  # how often deliveries left unanswered are looked for, with probes off
MAX_TASK_FILTER = 100  # task ids one lease listing may name


def _json_refusal(output: str | None) -> str | None:
    """Why ``output`` is not a JSON document (None when it is)."""
    if output is None:
        return "no output"
    try:
        msgspec.json.decode(output)
    except msgspec.DecodeError as exc:
        return str(exc)[:200]
    return None


def check_limit(limit: int | None) -> int:
    if limit is None:
        return 100
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}")
    return limit


def check_ttl(ttl_seconds: int | None) -> int | None:
    if ttl_seconds is None:
        return None
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or not 1 <= ttl_seconds <= MAX_TTL_SECONDS:
        raise InvalidInput(f"ttl_seconds must be an integer between 1 and {MAX_TTL_SECONDS}")
    return ttl_seconds


class _ActorSlot:
    """Holds the current ref of one actor, so the watchdog can replace a dead one."""

    def __init__(self, name: str, factory: Callable[[], pykka.ActorRef[Any]]) -> None:
        self.name = name
        self.factory = factory
        self.ref: pykka.ActorRef[Any] = factory()
        self.restarts = 0

    def tell(self, message: Any) -> None:
        try:
            self.ref.tell(message)
        except pykka.ActorDeadError:
            raise EngineStopped(f"{self.name} is not running") from None


class Engine:
    """The runtime engine. Use ``Engine.start(settings)``; stop with ``stop()`` or a ``with`` block."""

    def __init__(self, settings: Settings, store: Store, clock: Clock) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.started_at = time.monotonic()
        self.started_ms = clock.now_ms()
        self.version = __version__
        self.retry_backoff = RetryBackoff(settings.retry_backoff_base_ms, settings.retry_backoff_cap_ms)
        self.wakeup = ClaimWakeup()
        self._stats = StatsCache(lambda: summarize(store.stats()))
        self.routing_keys = RoutingKeys()
        self.writes = JobHealth("writes", 0.0)  # every write the facade asks an actor for
        self.audit_backlog = AuditBacklog()
        self.lease_tokens = LeaseTokens.load(store, clock)
        self.allowed = AllowList.from_env(settings.membridge_allowed_hosts)  # ConfigError at boot if malformed
        self.jobs = {
            "lease_sweep": JobHealth("lease_sweep", settings.lease_sweep_interval_s),
            "audit_flush": JobHealth("audit_flush", AUDIT_RETRY_INTERVAL_S),
            "worker_liveness": JobHealth("worker_liveness", self._liveness_interval()),
            "membridge_sync": JobHealth("membridge_sync", settings.membridge_sync_interval_s),
            "history_sample": JobHealth("history_sample", settings.history_tick_s),
        }
        self.sweep_fault: Callable[[], None] | None = None  # tests inject sweep failures here
        self._slots: dict[str, _ActorSlot] = {}
        self._shards: dict[str, list[str]] = {"queue": [], "leases": []}
        self._tickers: list[Ticker] = []
        self._stopping = threading.Event()
        self._stopped = False
        self._stop_lock = threading.Lock()
        self._watchdog: threading.Thread | None = None
        self._listener: threading.Thread | None = None
        self.tasks = TaskService(self)
        self.leases = LeaseService(self)
        self.workers = WorkerService(self)
        self.audit = AuditService(self)
        self.history = HistoryService(self)
        # Membridge config (read from the store), clients, test-connection, pass-through; no network I/O here.
        self.membridge: MembridgeService = MembridgeService(self)
        self.dispatch = DispatchService(self)
        self.agent_admin = AgentAdmin(self)

    # --- lifecycle -------------------------------------------------------------

    @classmethod
    def start(
        cls,
        settings: Settings | None = None,
        *,
        store: Store | None = None,
        clock: Clock | None = None,
        migrate: bool = True,
    ) -> Engine:
        """Open the store (migrating it unless told not to), start actors and timers."""
        settings = settings or Settings.from_env()
        if store is None:
            store = store_from_url(
                settings.database_url,
                pool_min=settings.pool_min,
                pool_max=settings.pool_max,
                connect_timeout_s=settings.db_connect_timeout_s,
                statement_timeout_s=settings.db_statement_timeout_s,
            )
            store.open(wait_s=settings.db_open_wait_s)
        try:
            if migrate:
                store.migrate()
            else:
                store.check_schema()
            engine = cls(settings, store, clock or SystemClock())
        except BaseException:
            store.close()
            raise
        try:
            engine._start_actors()
        except BaseException:
            engine.stop()  # tears down whatever started, then closes the store
            raise
        return engine

    def _dispatcher_interval(self) -> float:
        """The dispatcher's tick: its agent probes, at most half the silence that offlines a worker."""
        probe = self.settings.agent_probe_interval_s or DELIVERY_EXPIRY_INTERVAL_S
        return max(0.05, min(probe, self.settings.worker_offline_after_s / 2))

    def _liveness_interval(self) -> float:
        return max(0.05, min(5.0, self.settings.worker_offline_after_s / 4))

    def _start_actors(self) -> None:
        s = self.settings
        store, clock = self.store, self.clock

        self._slots["audit"] = _ActorSlot(
            "audit-writer",
            lambda: AuditWriter.start(
                store, clock, self.jobs["audit_flush"], group_commit=s.audit_group_commit, batch_max=s.audit_batch_max,
                backlog=self.audit_backlog,
            ),
        )
        sink = self._audit_sink
        self._slots["registry"] = _ActorSlot(
            "worker-registry",
            lambda: WorkerRegistry.start(
                store, clock, sink, health=self.jobs["worker_liveness"],
                offline_after_ms=int(s.worker_offline_after_s * 1000), batch_max=s.write_batch_max,
                inline_audit=s.audit_group_commit, allowed=self.allowed, probed=bool(s.agent_probe_interval_s),
                on_change=lambda: self.dispatch.workers_changed(),
            ),
        )
        # Writes may be spread over shards so several transactions run at once: task
        # writes and heartbeats by task id, grants (acquire, claim) by worker id, each
        # grant naming one worker, so shards never wait on each other's worker rows.
        # The sweep and failed dispatches stay on shard 0. One of each is the default:
        # a batch is applied with a few set statements, so one big batch costs less
        # than several small ones in parallel (measured in bench/engine_lifecycle.py).
        shards = s.actor_shards if s.actor_shards > 0 else 1
        for i in range(shards):
            name = "queue" if i == 0 else f"queue.{i}"
            self._slots[name] = _ActorSlot(
                f"task-queue-{i}",
                lambda: TaskQueue.start(
                    store, clock, sink, retry_delay=self.retry_backoff, on_queued=self._task_queued,
                    batch_max=s.write_batch_max, inline_audit=s.audit_group_commit,
                ),
            )
            lname = "leases" if i == 0 else f"leases.{i}"
            self._slots[lname] = _ActorSlot(
                f"lease-supervisor-{i}",
                lambda: LeaseSupervisor.start(
                    store, clock, sink, health=self.jobs["lease_sweep"], retry_delay=self.retry_backoff,
                    on_queued=self._task_queued, batch_max=s.write_batch_max, inline_audit=s.audit_group_commit,
                    fault=self._sweep_fault,
                ),
            )
            self._shards["queue"].append(name)
            self._shards["leases"].append(lname)
        self._slots["membridge"] = _ActorSlot(
            "membridge-syncer",
            lambda: MembridgeSyncer.start(
                clock, health=self.jobs["membridge_sync"], registry=lambda: self._slots["registry"],
                audit_sink=sink, client=lambda: self.membridge, offline_after_ms=int(s.worker_offline_after_s * 1000),
            ),
        )
        self._slots["dispatcher"] = _ActorSlot(
            "dispatcher",
            lambda: Dispatcher.start(
                store, clock, sink, send=self.dispatch.send, on_finished=self.dispatch.finished,
                pool_size=s.dispatch_max_in_flight, plan=self.dispatch.plan_once if s.auto_dispatch else None,
                targets=self.dispatch.probe_targets if s.agent_probe_interval_s else None, probe=self.dispatch.probe,
                sightings=self._sightings, refresh_ms=int(s.worker_offline_after_s * 500),
                batch_max=s.write_batch_max, inline_audit=s.audit_group_commit,
            ),
        )
        self._slots["history"] = _ActorSlot(
            "history-sampler",
            lambda: HistorySampler.start(
                store, clock, self.jobs["history_sample"], retention_ms=int(s.history_retention_days * 86_400_000)
            ),
        )
        self._tickers = [
            Ticker("dispatcher", self._dispatcher_interval(), lambda: self._slots["dispatcher"].ref),
            # Retries whose backoff ended queue no event: look for them every CLAIM_RECHECK_S.
            *([Ticker("auto-dispatch", CLAIM_RECHECK_S, lambda: self._slots["dispatcher"].ref, message=PlanNow)]
              if s.auto_dispatch else []),
            Ticker("lease-sweep", s.lease_sweep_interval_s, lambda: self._slots["leases"].ref),
            Ticker("audit-flush", AUDIT_RETRY_INTERVAL_S, lambda: self._slots["audit"].ref),
            Ticker("worker-liveness", self._liveness_interval(), lambda: self._slots["registry"].ref),
            Ticker("membridge-sync", s.membridge_sync_interval_s, lambda: self._slots["membridge"].ref),
            Ticker("history-sample", s.history_tick_s, lambda: self._slots["history"].ref),
        ]
        for t in self._tickers:
            t.start()
        if hasattr(self.store, "listen"):
            self._start_listener()
        self._watchdog = threading.Thread(target=self._watch, name="engine-watchdog", daemon=False)
        self._watchdog.start()

    def _start_listener(self) -> None:
        """Wake claimers when another engine process queues a task (LISTEN/NOTIFY)."""
        self._listener = threading.Thread(
            target=self.store.listen,  # type: ignore[attr-defined]
            args=(self._task_queued, self._stopping),
            name="task-listener",
            daemon=False,
        )
        self._listener.start()

    def _sightings(self, sightings: list[Sighting]) -> None:
        """What the dispatcher's probes and deliveries saw, for the registry (a tell)."""
        try:
            self._slots["registry"].tell(RecordLiveness(sightings, "dispatcher"))
        except EngineStopped:
            pass

    def _task_queued(self, tasks: Sequence[Task] | None = None) -> None:
        """Tasks became claimable (None: an unknown number, queued by another process): wake
        long-polling claimers, and automatic dispatch."""
        if tasks is None:
            self.wakeup.notify()
        else:
            self.wakeup.queued(tasks)
        if self.settings.auto_dispatch:
            slot = self._slots.get("dispatcher")
            if slot is not None:
                try:
                    slot.ref.tell(PlanNow())
                except pykka.ActorDeadError:
                    pass  # the watchdog restarts it; its start plans anyway

    def _sweep_fault(self) -> None:
        if self.sweep_fault is not None:
            self.sweep_fault()

    def _watch(self) -> None:
        """Restart any actor that died, and log it."""
        while not self._stopping.wait(WATCHDOG_INTERVAL_S):
            for slot in self._slots.values():
                if not slot.ref.is_alive() and not self._stopping.is_set():
                    slot.restarts += 1
                    log.error("actor %s died; restarting it (restart #%d)", slot.name, slot.restarts)
                    try:
                        slot.ref = slot.factory()
                    except Exception:
                        log.exception("could not restart %s", slot.name)

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop taking work, drain writes and audit entries, stop actors, close the store. Idempotent."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self._stopping.set()
        self.wakeup.close()
        for t in self._tickers:
            t.stop()
        if self._listener is not None:
            self._listener.join()
        if self._watchdog is not None:
            self._watchdog.join()
        # Producers first, the audit writer last, so it writes what they sent while stopping.
        order = ["history", "dispatcher", "membridge", *self._shards["leases"], *self._shards["queue"], "registry", "audit"]
        for name in order:
            slot = self._slots.get(name)
            if slot is None:
                continue
            try:
                slot.ref.stop(block=True, timeout=timeout_s)
            except pykka.Timeout:
                log.error("actor %s did not stop within %.0f s", slot.name, timeout_s)
            except pykka.ActorDeadError:
                pass
            if name == "dispatcher":
                # Deliveries in flight may wait an hour for their answer: end them now (their
                # runs go on at the agents, whose results arrive on the callback URL).
                self.membridge.agents.abort_all()
        if self.membridge is not None and hasattr(self.membridge, "close"):
            self.membridge.close()
        self.store.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return not self._stopping.is_set()

    # --- plumbing --------------------------------------------------------------

    def _audit_sink(self, record: Record) -> None:
        self.audit_backlog.added(len(record.entries), self.clock.now_ms())
        self._slots["audit"].ref.tell(record)

    def call(
        self,
        slot: str,
        make: Callable[[pykka.ThreadingFuture], Any],
        timeout_s: float | None = None,
        key: str | None = None,
        write: bool = True,
    ) -> Any:
        """Send a command built around a fresh reply future; wait for the answer.

        ``key`` (a task id) picks the shard of a sharded actor; without it, shard 0.
        The outcome of a ``write`` tells ``/health`` whether writes succeed."""
        if self._stopping.is_set():
            raise EngineStopped("the engine is stopping")
        if key is not None and slot in self._shards:
            names = self._shards[slot]
            slot = names[zlib.crc32(key.encode()) % len(names)]
        timeout = timeout_s or self.settings.ask_timeout_s
        reply = Reply(time.monotonic() + timeout)
        self._slots[slot].tell(make(reply))
        try:
            value = _answer(reply, timeout, self._slots[slot].name)
        except (StoreUnavailable, EngineTimeout, OutcomeUnknown) as exc:
            if write:
                self.writes.failed(exc, self.clock.now_ms())
            raise
        except BloomError:
            if write:
                self.writes.succeeded(self.clock.now_ms())  # the store answered, and refused
            raise
        if write:
            self.writes.succeeded(self.clock.now_ms())
        return value

    def record(self, entries: list[Any], wait: bool = True) -> None:
        """Write audit entries not tied to another write (e.g. configuration changes)."""
        if not wait:
            self._audit_sink(Record(entries))
            return
        timeout = self.settings.ask_timeout_s
        reply = Reply(time.monotonic() + timeout)
        self._audit_sink(Record(entries, reply, None))
        _answer(reply, timeout, "audit writer")

    # --- health ----------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """Liveness of the store, the writes, the audit backlog, the actors and the periodic jobs."""
        return health_report(self)

    def actor_states(self) -> dict[str, dict[str, Any]]:
        return {slot.name: {"alive": slot.ref.is_alive(), "restarts": slot.restarts} for slot in self._slots.values()}

    def stats(self) -> dict[str, Any]:
        """Counts by status of tasks, leases and workers, with totals (``summarize``);
        see ``StatsCache`` for freshness."""
        return self._stats.get()


def _answer(reply: Reply, timeout_s: float, name: str) -> Any:
    """Wait for the reply until its deadline. Then either the write never started (and
    now never will: nothing changed) or it was under way, and its outcome is unknown."""
    try:
        return reply.get(timeout=timeout_s)
    except pykka.Timeout:
        pass
    if reply.abandon():
        raise not_applied(name)
    try:
        return reply.get(timeout=0)  # it may have finished just now
    except pykka.Timeout:
        raise OutcomeUnknown(
            f"{name} was still writing when the {timeout_s:g} s ask timeout ran out; whether it was applied is unknown"
        ) from None


def _pick_message(
    context_id: str, labels: list[str], reply: pykka.ThreadingFuture, *, fresh: bool, push: bool = False,
    exclude: frozenset[str] = frozenset(),
) -> PickWorkers:
    return PickWorkers(context_id, labels, reply, fresh, push, exclude)


def _acquire_message(task_id: str, worker_id: str, ttl: int | None, actor: str, reply: pykka.ThreadingFuture) -> AcquireLease:
    return AcquireLease(task_id, [worker_id], ttl, actor, reply)


class _Service:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine


class TaskService(_Service):
    """Tasks: create, read, complete, requeue, cancel; their results and artifacts."""

    def create(self, new: NewTask, actor: str = "api") -> tuple[Task, bool]:
        """Queue a task; returns it and whether it is new (False: its idempotency key was used before)."""
        new = validate(new)
        # Creates with one idempotency key share a shard, so they serialise in-process.
        key = new.idempotency_key or new_id()
        task, created = self._engine.call("queue", lambda r: CreateTasks([new], actor, r), key=key)
        self._engine.routing_keys.remember(task)
        return task, created

    def create_many(self, news: Sequence[NewTask], actor: str = "api") -> builtins.list[tuple[Task, bool]]:
        """Queue up to ``MAX_CREATE_BATCH`` tasks in one transaction; for each, in order, the
        task and whether it is new (False: its idempotency key was used before, by an
        earlier call or earlier in this list). All are validated before any is queued."""
        if not 1 <= len(news) <= MAX_CREATE_BATCH:
            raise InvalidInput(f"a batch holds 1 to {MAX_CREATE_BATCH} tasks")
        checked = []
        for n, new in enumerate(news):
            try:
                checked.append(validate(new))
            except InvalidInput as exc:
                raise InvalidInput(f"task {n}: {exc.message}", index=n) from None
        key = next((t.idempotency_key for t in checked if t.idempotency_key), None) or new_id()
        answers = self._engine.call("queue", lambda r: CreateTasks(checked, actor, r, many=True), key=key)
        for answer in answers:
            if isinstance(answer, BloomError):
                raise answer  # only an id already taken, which fresh ids never are
        for task, _ in answers:
            self._engine.routing_keys.remember(task)
        return answers

    def get(self, task_id: str) -> Task:
        return self._engine.store.get_task(task_id)

    def list(
        self,
        status: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
        *,
        context_id: str | None = None,
        agent_slug: str | None = None,
    ) -> Page:
        """Newest first; optionally of one status, and of one context or one agent."""
        if status is not None and status not in TASK_STATUSES:
            raise InvalidInput(f"unknown status {status!r}", allowed=list(TASK_STATUSES))
        if context_id is not None and agent_slug is not None:
            raise InvalidInput("search by context_id or by agent_slug, not both")
        field, value = ("context_id", context_id) if context_id is not None else ("agent_slug", agent_slug)
        if value is not None:
            statuses = [status] if status is not None else list(TASK_STATUSES)
            return self._engine.store.search_tasks(field, value, statuses, check_limit(limit), cursor)
        return self._engine.store.list_tasks(status, check_limit(limit), cursor)

    def complete(self, task_id: str, completion: Completion, fence: Fence = Fence(), actor: str | None = None) -> CompletionOutcome:
        """Record the result of the task's active lease (see DESIGN §5).

        For a task that wants ``desired_format: json``, a success whose output is not
        valid JSON is recorded as a retryable error saying why, whichever worker sent it."""
        completion = validate(completion)
        fence = self._engine.leases.prove(task_id, validate(fence))
        completion = self._checked_format(task_id, completion)
        return self._engine.call(
            "queue", lambda r: CompleteTask(task_id, fence, completion, actor or fence.worker_id or "api", r), key=task_id
        )

    def complete_many(
        self, items: Sequence[tuple[str, Completion, Fence]], actor: str = "api"
    ) -> builtins.list[CompletionOutcome | BloomError]:
        """Record up to ``MAX_COMPLETE_BATCH`` results in one transaction, each as ``complete``
        would; for each, in order, its outcome or why it was refused (a value, not raised:
        one stale lease does not hold up the others). A completion or fence no request could
        make valid raises ``InvalidInput`` naming its index, before anything is recorded."""
        if not 1 <= len(items) <= MAX_COMPLETE_BATCH:
            raise InvalidInput(f"a batch holds 1 to {MAX_COMPLETE_BATCH} completions")
        checked: builtins.list[tuple[str, Fence, Completion] | BloomError] = []
        for n, (task_id, completion, fence) in enumerate(items):
            try:
                completion, fence = validate(completion), validate(fence)
            except InvalidInput as exc:
                raise InvalidInput(f"completion {n}: {exc.message}", index=n) from None
            try:
                checked.append((task_id, self._engine.leases.prove(task_id, fence), self._checked_format(task_id, completion)))
            except BloomError as exc:
                if isinstance(exc, (StoreUnavailable, OutcomeUnknown)):
                    raise
                checked.append(exc)  # a token that is not this lease's, or an unknown task
        runnable = [c for c in checked if not isinstance(c, BloomError)]
        answers = iter(self._engine.call("queue", lambda r: CompleteTasks(runnable, actor, r),
                                         key=min(t for t, _, _ in runnable)) if runnable else [])
        return [c if isinstance(c, BloomError) else next(answers) for c in checked]

    def _checked_format(self, task_id: str, completion: Completion) -> Completion:
        if completion.status != "success":
            return completion
        reason = _json_refusal(completion.output)
        if reason is None or self._engine.routing_keys.of(task_id, self._engine.store.get_task).desired_format != "json":
            return completion  # valid JSON needs no look at the task; text is anything
        return msgspec.structs.replace(
            completion, status="error", retryable=True,
            error_message=f"desired_format is json but the output is not valid JSON ({reason})",
        )

    def requeue(self, task_id: str, actor: str = "api") -> Task:
        return self._engine.call("queue", lambda r: RequeueTask(task_id, actor, r), key=task_id)

    def cancel(self, task_id: str, actor: str = "api") -> Task:
        """queued/leased/running → cancelled; the lease it held is released."""
        task, _released = self._engine.call("queue", lambda r: CancelTask(task_id, actor, r), key=task_id)
        return task

    def result(self, task_id: str) -> Result:
        self._engine.store.get_task(task_id)  # 404 for an unknown task, not just "no result"
        return self._engine.store.get_result(task_id)

    def results(self, task_id: str | None = None, limit: int | None = None, cursor: str | None = None) -> Page:
        return self._engine.store.list_results(task_id, check_limit(limit), cursor)

    def artifacts(self, task_id: str | None = None, limit: int | None = None, cursor: str | None = None) -> Page:
        return self._engine.store.list_artifacts(task_id, check_limit(limit), cursor)


class LeaseService(_Service):
    """Leases: acquire (push), claim (pull), heartbeat, fail; and the read side."""

    def acquire(
        self, task_id: str, worker_id: str | None = None, ttl_seconds: int | None = None, actor: str = "api",
        *, push: bool = False, exclude: frozenset[str] = frozenset(),
    ) -> LeaseGrant:
        """Lease a queued task to ``worker_id`` or to the best worker ``pick`` finds (with
        ``push`` among workers with a verified URL, never one in ``exclude``).

        Raises ``NotFound``, ``Conflict`` (not queued), ``NoCapacity``."""
        engine = self._engine
        ttl = check_ttl(ttl_seconds)  # None: the store takes the task's default under its lock
        # Grants for one worker go to one lease shard (keyed by worker), and each names a
        # single worker, so no two shards ever wait on each other's worker rows.
        if worker_id is not None:
            return engine.call("leases", lambda r: AcquireLease(task_id, [worker_id], ttl, actor, r), key=worker_id)
        context_id, labels, _ = engine.routing_keys.of(task_id, engine.store.get_task)
        for fresh in (False, True):
            pick = functools.partial(_pick_message, context_id, list(labels), fresh=fresh, push=push, exclude=exclude)
            candidates = engine.call("registry", pick, write=False)
            if not candidates:
                break
            best = candidates[0]
            try:
                return engine.call("leases", functools.partial(_acquire_message, task_id, best, ttl, actor), key=best)
            except NoCapacity:
                if fresh:
                    raise  # the store checked the task under its lock: the fleet really is full
        # No worker was asked, so nothing checked the task: a task that can never be
        # leased must not read as "retry later".
        task = engine.store.get_task(task_id)
        verdict = refusals.lease_verdict(task.status, task.not_before, task.attempts, task.max_attempts, engine.clock.now_ms())
        if verdict != refusals.OK:
            raise refusals.refusal(verdict, task_id=task_id, status=task.status, not_before=task.not_before)
        raise NoCapacity("no online worker with free capacity can take this task", task_id=task_id)

    @overload
    def claim(
        self, worker_id: str, wait_seconds: float = 0.0, ttl_seconds: int | None = None, actor: str | None = None,
        max_tasks: None = None,
    ) -> LeaseGrant | None: ...

    @overload
    def claim(
        self, worker_id: str, wait_seconds: float = 0.0, ttl_seconds: int | None = None, actor: str | None = None,
        *, max_tasks: int,
    ) -> builtins.list[LeaseGrant]: ...

    def claim(
        self, worker_id: str, wait_seconds: float = 0.0, ttl_seconds: int | None = None, actor: str | None = None,
        max_tasks: int | None = None,
    ) -> LeaseGrant | builtins.list[LeaseGrant] | None:
        """Lease the oldest task this worker can take, waiting up to ``wait_seconds`` for one.

        With ``max_tasks``, lease up to that many (and up to the worker's free capacity)
        in one transaction, oldest first, and answer the list (empty if nothing arrived
        in time). Counts as the worker's heartbeat. Without, the one grant or ``None``."""
        engine = self._engine
        if isinstance(wait_seconds, bool) or not isinstance(wait_seconds, (int, float)) or not 0 <= wait_seconds <= MAX_CLAIM_WAIT_S:
            raise InvalidInput(f"wait_seconds must be between 0 and {MAX_CLAIM_WAIT_S:g}")
        if max_tasks is not None and (isinstance(max_tasks, bool) or not isinstance(max_tasks, int)
                                      or not 1 <= max_tasks <= MAX_CLAIM_TASKS):
            raise InvalidInput(f"max_tasks must be an integer between 1 and {MAX_CLAIM_TASKS}")
        ttl = check_ttl(ttl_seconds)
        want = max_tasks or 1
        deadline = time.monotonic() + wait_seconds
        while True:
            seen = engine.wakeup.generation
            grants = engine.call(
                "leases", lambda r: ClaimNext(worker_id, ttl, actor or worker_id, r, want), key=worker_id
            )
            if grants:
                return grants if max_tasks is not None else grants[0]
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not engine.running:
                break
            engine.wakeup.wait(seen, min(remaining, CLAIM_RECHECK_S))
            if not engine.running:
                break  # shutting down: the poll ends empty, not with an error
        return [] if max_tasks is not None else None

    def heartbeat(self, task_id: str, fence: Fence = Fence(), actor: str | None = None) -> tuple[Task, Lease]:
        """Renew the task's active lease (now + TTL) and move the task to running."""
        fence = self.prove(task_id, validate(fence))
        return self._engine.call(
            "leases", lambda r: Heartbeat(task_id, fence, actor or fence.worker_id or "api", r), key=task_id
        )

    def fail(self, lease_id: str, reason: str, actor: str = "dispatch", refund: bool = False) -> tuple[Task, Lease]:
        """Mark an active lease failed (its worker could not be reached) and requeue its task;
        ``refund``: the dispatch provably never reached the worker, so the attempt is given back."""
        reason = clean_text(reason)  # free text, often an agent's answer: stored in the audit entry with the change
        return self._engine.call("leases", lambda r: FailLease(lease_id, reason, actor, r, refund))

    # --- lease tokens ----------------------------------------------------------------

    def token(self, lease_id: str) -> str:
        """The lease's callback token (grant answers carry it; never log or store it)."""
        return self._engine.lease_tokens.token(lease_id)

    def prove(self, task_id: str, fence: Fence) -> Fence:
        """The fence a heartbeat or completion hands the store, its ``lease_token`` checked
        (see ``LeaseTokens.prove``); ``LEASE_FENCING=strict`` requires a token."""
        engine = self._engine
        return engine.lease_tokens.prove(fence, strict=engine.settings.lease_fencing == "strict",
                                         held=lambda: engine.store.get_task(task_id).lease_id, task_id=task_id)

    def callback(self, lease_id: str, token: str) -> Lease:
        """The lease a dispatched agent's callback URL names, once its token is checked
        (``Unauthorized`` before anything is read when it is wrong)."""
        if not self._engine.lease_tokens.matches(lease_id, token):
            raise Unauthorized("invalid lease token")
        return self._engine.store.get_lease(lease_id)

    def get(self, lease_id: str) -> Lease:
        return self._engine.store.get_lease(lease_id)

    def list(
        self,
        status: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
        *,
        task_ids: Sequence[str] | None = None,
    ) -> Page:
        """Newest first; optionally of one status, and only the leases of ``task_ids``."""
        from bloom_runtime.engine.models import LEASE_STATUSES

        if status is not None and status not in LEASE_STATUSES:
            raise InvalidInput(f"unknown status {status!r}", allowed=list(LEASE_STATUSES))
        if task_ids is not None:
            if not 1 <= len(task_ids) <= MAX_TASK_FILTER:
                raise InvalidInput(f"name 1 to {MAX_TASK_FILTER} task ids")
            return self._engine.store.list_task_leases(list(task_ids), status, check_limit(limit), cursor)
        return self._engine.store.list_leases(status, check_limit(limit), cursor)

    def expired(self, limit: int | None = None, cursor: str | None = None) -> Page:
        """Expired leases, the latest expiry first."""
        return self._engine.store.list_expired_leases(check_limit(limit), cursor)

    def sweep_now(self) -> int:
        """Run the expiry sweep now; returns how many leases expired, once their audit entries are written."""
        return self._engine.call("leases", lambda r: Tick(r))


class WorkerService(_Service):
    """The worker registry."""

    def register(self, upsert: WorkerUpsert, actor: str = "api", admin: bool = True) -> tuple[Worker, bool]:
        """Create or update a worker by id; returns it and whether it was created.

        A URL (checked as every outgoing URL is) set with ``admin`` is vouched for:
        the worker may then be pushed tasks. Without ``admin`` (a client key: an
        agent registering itself) a new worker's URL is kept unverified, and
        changing an existing worker's URL raises ``Forbidden``."""
        upsert = validate(upsert)
        beat = upsert.last_heartbeat
        if beat is not None and beat > self._engine.clock.now_ms() + MAX_HEARTBEAT_SKEW_MS:
            # A heartbeat from the future would keep the worker online long after it went quiet.
            raise InvalidInput(
                f"last_heartbeat is more than {MAX_HEARTBEAT_SKEW_MS // 1000} s ahead of the server's clock", last_heartbeat=beat
            )
        upsert = checked_registration(upsert, admin, self._engine.allowed, current_url=self._current_url)
        worker, created = self._engine.call("registry", lambda r: RegisterWorker(upsert, actor, r, vouch=admin))
        return self.vouched(worker), created

    def _current_url(self, worker_id: str) -> str | None:
        try:
            return self._engine.store.get_worker(worker_id).url
        except NotFound:
            return None

    def vouched(self, worker: Worker) -> Worker:
        """``worker`` with ``url_verified`` filled in (see ``worker_trust``)."""
        return with_verification(worker, self._engine.store.worker_trust(), self._engine.allowed)

    def upsert_many(self, upserts: Sequence[WorkerUpsert], actor: str = "membridge-sync") -> list[tuple[Worker, bool]]:
        return self._engine.call("registry", lambda r: UpsertWorkers(list(upserts), actor, r))

    def get(self, worker_id: str) -> Worker:
        return self.vouched(self._engine.store.get_worker(worker_id))

    def leases(self, worker_id: str) -> builtins.list[Lease]:
        """The worker's active leases, newest first."""
        return self._engine.store.worker_leases(worker_id)

    def list(self, status: str | None = None) -> list[Worker]:
        from bloom_runtime.engine.models import WORKER_STATUSES

        if status is not None and status not in WORKER_STATUSES:
            raise InvalidInput(f"unknown status {status!r}", allowed=list(WORKER_STATUSES))
        workers = self._engine.store.list_workers(status)
        vouched = self._engine.store.worker_trust() if workers else {}
        return [with_verification(w, vouched, self._engine.allowed) for w in workers]

    def remove(self, worker_id: str, actor: str = "api") -> Worker:
        return self._engine.call("registry", lambda r: RemoveWorker(worker_id, actor, r))

    def refresh(self, upsert: WorkerUpsert, cause: str, actor: str = "api") -> Worker:
        """Update a known worker with what its agent reported (``NotFound`` if it is gone);
        audited only when its status, agent_version or os_info changed."""
        upsert = validate(upsert)
        return self._engine.call("registry", lambda r: RefreshWorker(upsert, cause, actor, r))

    def check_liveness_now(self) -> None:
        """Offline the workers not seen for ``worker_offline_after``; returns once done and audited."""
        self._engine.call("registry", lambda r: Tick(r))

    def pick(self, context_id: str, labels: Sequence[str] = ()) -> builtins.list[str]:
        """Worker ids that could take a task of this context and labels, best first."""
        return self._engine.call("registry", lambda r: PickWorkers(context_id, list(labels), r), write=False)


class AuditService(_Service):
    def list(
        self, limit: int | None = None, cursor: str | None = None, entity_id: str | None = None, action: str | None = None
    ) -> Page:
        """Newest first; optionally about one entity, of one action, or both."""
        return self._engine.store.list_audit(check_limit(limit), cursor, entity_id, action)


__all__ = ["AuditService", "Engine", "LeaseService", "TaskService", "WorkerService"]
