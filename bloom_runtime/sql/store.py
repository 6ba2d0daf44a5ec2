"""The one storage interface the engine uses.

A ``Store`` hands out ``Transaction``s. Every change of a task or lease is an
operation (``CreateOp``, ``ClaimOp``, …) handed to ``Transaction.apply``, which
takes any number of them at once: a single operation is a batch of one, so each
store states each transition once. Workers, audit entries and settings have
their own methods on the transaction. Reads are on the ``Store`` and run on
their own connections, never waiting for a writer.

Contract for every write:
- the current state decides, under row locks; a refusal (``NotFound`` /
  ``Conflict`` / ``StaleLease`` / ``NoCapacity``, worded in ``refusals.py``)
  **leaves nothing written**, so the transaction stays usable for the rest;
- driver errors are translated to ``StoreUnavailable`` (nothing was applied),
  ``SessionLost`` (the connection failed before anything could commit: retry on
  another connection), ``TransientConflict`` (deadlock / serialisation failure:
  retry in a new transaction) or ``OutcomeUnknown`` (the connection failed while
  the commit was in flight), original on ``__cause__``.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bloom_runtime.engine.errors import BloomError, StoreUnavailable
from bloom_runtime.engine.models import (
    Artifact,
    AuditEntry,
    Completion,
    CompletionOutcome,
    Delivery,
    Expiry,
    Fence,
    HistoryPoint,
    Lease,
    LeaseGrant,
    NewTask,
    Page,
    Result,
    Task,
    Worker,
    WorkerUpsert,
)

# Task ids, worker ids and lease ids the stores are handed are already
# validated; lists are bounded by the callers.
MAX_PAGE = 1000

RetryDelay = Callable[[int], int]
"""Given the attempts a task has used, the ms to wait before it may be leased again."""


class TransientConflict(StoreUnavailable):
    """A deadlock or serialisation failure: the transaction was rolled back; retry it."""


class SessionLost(StoreUnavailable):
    """The database session failed before anything of the transaction could commit:
    nothing was written, and the same work may run again on another connection."""


# --- state changes (see ``Transaction.apply``) -------------------------------------
#
# Every change of a task or lease is one of these operations. An operation naming an
# ``actor`` gets its audit entry written by the store, in the same transaction (one
# entry per change, naming both the task and its lease); without one the caller
# records what happened.


@dataclass(frozen=True, slots=True)
class CreateOp:
    """Queue a task: answers ``(task, created)``; with a used idempotency key the task
    created first and False."""

    new: NewTask
    task_id: str
    actor: str | None = None


@dataclass(frozen=True, slots=True)
class AcquireOp:
    """Lease a queued task to the first of ``worker_ids`` with room: answers a ``LeaseGrant``."""

    task_id: str
    worker_ids: tuple[str, ...]
    ttl_seconds: int | None  # None: the task's default
    lease_id: str
    actor: str | None = None


@dataclass(frozen=True, slots=True)
class ClaimOp:
    """Lease up to ``max_tasks`` of the oldest queued tasks a worker can take, within its
    free capacity: answers a list of ``LeaseGrant`` (empty: none, or no room). Counts as
    the worker's heartbeat."""

    worker_id: str
    max_tasks: int
    ttl_seconds: int | None  # None: each task's default
    lease_ids: tuple[str, ...]  # one per task it may lease, in order
    actor: str | None = None


@dataclass(frozen=True, slots=True)
class HeartbeatOp:
    """Renew the task's active lease; answers ``(task, lease)``."""

    task_id: str
    fence: Fence
    actor: str | None = None


@dataclass(frozen=True, slots=True)
class CompleteOp:
    """Finish the task's active lease with a result; answers a ``CompletionOutcome``."""

    task_id: str
    fence: Fence
    completion: Completion
    result_id: str
    artifact_id: str
    retry_delay: RetryDelay
    actor: str | None = None


@dataclass(frozen=True, slots=True)
class FailOp:
    """Fail an active lease (its worker could not be reached); answers ``(task, lease)``."""

    lease_id: str
    reason: str
    retry_delay: RetryDelay
    actor: str | None = None
    refund: bool = False  # the dispatch provably never reached the worker: give the attempt back


@dataclass(frozen=True, slots=True)
class RequeueOp:
    """``failed``/``dead`` → ``queued``, attempts reset; answers the task."""

    task_id: str
    actor: str | None = None


@dataclass(frozen=True, slots=True)
class CancelOp:
    """``queued``/``leased``/``running`` → ``cancelled``; answers ``(task, released lease or None)``."""

    task_id: str
    actor: str | None = None


@dataclass(frozen=True, slots=True)
class ExpireOp:
    """Expire up to ``limit`` active leases past their deadline; answers ``list[Expiry]``."""

    limit: int
    actor: str | None = None


Op = CreateOp | AcquireOp | ClaimOp | HeartbeatOp | CompleteOp | FailOp | RequeueOp | CancelOp | ExpireOp
"""One state change of a task or a lease."""


class Transaction(abc.ABC):
    """One open database transaction. Obtain from ``Store.transaction()``."""

    # --- the one write path of tasks and leases -------------------------------

    @abc.abstractmethod
    def apply(self, ops: Sequence[Op], now: int, commit: bool = False) -> list[Any]:
        """Apply ``ops`` in this transaction; answer each, position for position, with its
        value or the ``BloomError`` it was refused with.

        The operations of one call are concurrent requests: the answers are those of
        applying them one at a time in an order the store chooses (SQLite: list order;
        PostgreSQL documents its own), so a caller must not rely on one operation of a
        call seeing another. A refusal writes nothing and does not stop the others;
        ``StoreUnavailable`` and ``OutcomeUnknown`` propagate. With ``commit`` the store
        commits the transaction (where it can, in the same round trip); later
        statements on it open a new one."""

    def _one(self, op: Op, now: int) -> Any:
        answer = self.apply([op], now)[0]
        if isinstance(answer, BloomError):
            raise answer
        return answer

    # One operation at a time: a batch of one, its refusal raised.

    def create_task(self, new: NewTask, task_id: str, now: int) -> tuple[Task, bool]:
        """Insert a queued task. With an idempotency key already used, return that
        task instead and ``False``; otherwise the new task and ``True``."""
        return self._one(CreateOp(new, task_id), now)

    def acquire_lease(
        self, task_id: str, worker_ids: Sequence[str], ttl_seconds: int | None, lease_id: str, now: int
    ) -> LeaseGrant:
        """Lease a ``queued`` task to the first of ``worker_ids`` with free capacity.

        ``ttl_seconds`` None means the task's default (policy.timeout_sec + 30).
        Capacity holds across processes: grants to a worker are counted under its row
        lock. Moves the task to ``leased``, increments ``attempts``, sets
        ``lease_id``/``worker_id``, inserts the lease (``expires_at = now + ttl``).
        Raises ``NotFound`` (task, or a single named worker that does not exist),
        ``Conflict`` (task not queued, or its ``not_before`` is in the future),
        ``NoCapacity`` (no candidate has room)."""
        return self._one(AcquireOp(task_id, tuple(worker_ids), ttl_seconds, lease_id), now)

    def claim_next(self, worker_id: str, ttl_seconds: int | None, lease_id: str, now: int) -> LeaseGrant | None:
        """Lease the oldest ``queued`` task this worker can take, or ``None``.

        A task can be taken when ``not_before`` is null or <= now, it has attempts
        left and its ``labels`` are all among the worker's labels; tasks other
        transactions hold are skipped. Also records the claim as the worker's
        heartbeat (status online, source ``pull``). Returns ``None`` when the worker
        is at capacity. Raises ``NotFound`` for an unknown worker."""
        grants = self._one(ClaimOp(worker_id, 1, ttl_seconds, (lease_id,)), now)
        return grants[0] if grants else None

    def claim(self, worker_id: str, max_tasks: int, ttl_seconds: int | None, lease_ids: Sequence[str], now: int) -> list[LeaseGrant]:
        """Like ``claim_next``, up to ``max_tasks`` tasks (and the worker's free capacity), oldest first."""
        return self._one(ClaimOp(worker_id, max_tasks, ttl_seconds, tuple(lease_ids)), now)

    def heartbeat(self, task_id: str, fence: Fence, now: int) -> tuple[Task, Lease]:
        """Renew the task's active lease to ``now + ttl`` and move ``leased`` → ``running``.

        Also sets the lease's ``last_heartbeat``, and the worker's when it is more
        than 5 s old (finer grain buys nothing and would serialise a busy
        worker's heartbeats on its row). Raises
        ``NotFound`` (task), ``Conflict`` (task holds no lease), ``StaleLease``
        (fence names another lease or worker)."""
        return self._one(HeartbeatOp(task_id, fence), now)

    def complete(
        self,
        task_id: str,
        fence: Fence,
        completion: Completion,
        result_id: str,
        artifact_id: str,
        retry_delay: RetryDelay,
        now: int,
    ) -> CompletionOutcome:
        """Finish the task's active lease with a result, in one transaction.

        Inserts the artifact (content = output, or the error message) and the
        result, releases the lease, and moves the task: success → ``completed``;
        error → ``queued`` with ``not_before = now + retry_delay(attempts)`` when
        ``completion.retryable`` and attempts < max_attempts, else ``failed``.
        Clears ``lease_id``/``worker_id`` unless completed (kept for the record).
        Raises ``NotFound``, ``Conflict`` (no lease held), ``StaleLease``."""
        return self._one(CompleteOp(task_id, fence, completion, result_id, artifact_id, retry_delay), now)

    def fail_lease(
        self, lease_id: str, reason: str, retry_delay: RetryDelay, now: int, refund: bool = False
    ) -> tuple[Task, Lease]:
        """Mark an active lease ``failed`` (dispatch to its worker failed) and send
        its task back to ``queued`` (attempts left, after ``retry_delay``) or
        ``failed``. With ``refund`` (the dispatch provably never reached the worker)
        the lease's attempt is given back, so the task is always queued again.
        Raises ``NotFound`` / ``Conflict`` (lease not active)."""
        return self._one(FailOp(lease_id, reason, retry_delay, refund=refund), now)

    def requeue(self, task_id: str, now: int) -> Task:
        """``failed``/``dead`` → ``queued`` with attempts reset to 0 and no ``not_before``."""
        return self._one(RequeueOp(task_id), now)

    def cancel(self, task_id: str, now: int) -> tuple[Task, Lease | None]:
        """``queued``/``leased``/``running`` → ``cancelled``; its active lease is released."""
        return self._one(CancelOp(task_id), now)

    def expire_due(self, now: int, limit: int) -> list[Expiry]:
        """Expire up to ``limit`` active leases with ``expires_at <= now``.

        Their tasks (``leased`` or ``running`` under that lease) go back to
        ``queued`` while attempts < max_attempts, else to ``dead``; ``lease_id``
        and ``worker_id`` are cleared. Returns what changed, oldest expiry first."""
        return self._one(ExpireOp(limit), now)

    # --- workers -------------------------------------------------------------

    @abc.abstractmethod
    def upsert_worker(self, upsert: WorkerUpsert, now: int) -> tuple[Worker, bool]:
        """Create or update a worker by id; returns it and whether it was created.

        On create, missing fields take defaults (node_id = id, status online,
        capabilities default, registered_at = now). On update only non-None fields
        change."""

    @abc.abstractmethod
    def lock_worker(self, worker_id: str) -> Worker:
        """The worker as it is now, its row locked until the transaction ends; ``NotFound`` if absent."""

    @abc.abstractmethod
    def remove_worker(self, worker_id: str) -> Worker:
        """Delete a worker; raises ``NotFound``. Its leases stay and expire normally."""

    @abc.abstractmethod
    def touch_worker(self, worker_id: str, now: int) -> None:
        """Record contact from a worker (``last_heartbeat = now``); a ``pull`` or
        ``membridge`` worker that was offline comes back online."""

    @abc.abstractmethod
    def mark_stale_workers_offline(self, seen_before: int, now: int, vouched: bool = False) -> list[Worker]:
        """Set ``offline`` every worker neither offline nor ``unknown`` (never heard
        from) whose ``last_heartbeat`` (or, without one, ``registered_at``) is older
        than ``seen_before`` and that something keeps fresh: source ``pull`` or
        ``membridge``, or with ``vouched`` a URL vouched for in ``worker_trust``
        (the runtime probes those). Returns those changed."""

    @abc.abstractmethod
    def worker_liveness(self, worker_id: str, alive: bool, at: int) -> tuple[str, str] | None:
        """Record the runtime's own observation of a worker: ``alive`` sets it online with
        ``last_heartbeat`` at least ``at``, otherwise offline. Returns the status before
        and after, or None for an unknown worker."""

    # --- push dispatch -------------------------------------------------------

    @abc.abstractmethod
    def vouch_worker_url(self, worker_id: str, url: str, by: str, now: int) -> None:
        """Record that ``url`` was set for the worker by an admin key or the membridge sync."""

    @abc.abstractmethod
    def forget_worker_url(self, worker_id: str) -> str | None:
        """Drop the worker's vouched URL (the worker was removed); returns it, if there was one."""

    @abc.abstractmethod
    def insert_delivery(self, delivery: Delivery) -> None:
        """Record a delivery (state ``sent``); one per lease."""

    @abc.abstractmethod
    def finish_delivery(self, delivery_id: str, state: str, agent_status: int | None, detail: str | None, now: int) -> Delivery | None:
        """Record a ``sent`` delivery's outcome; None when it already has one."""

    @abc.abstractmethod
    def expire_deliveries(self, now: int, detail: str, limit: int) -> list[Delivery]:
        """Mark ``unknown`` up to ``limit`` deliveries still ``sent`` past their deadline."""

    # --- audit and settings --------------------------------------------------

    @abc.abstractmethod
    def insert_audit(self, entries: Sequence[AuditEntry]) -> None:
        """Insert audit entries (one multi-row statement)."""

    @abc.abstractmethod
    def set_settings(self, values: dict[str, str]) -> None:
        """Upsert runtime settings by key."""

    @abc.abstractmethod
    def add_settings_if_absent(self, values: dict[str, str], now: int) -> None:
        """Insert runtime settings whose key is not set yet; existing values stay."""

    # --- history (runtime_history, the sampler's own table) -------------------

    @abc.abstractmethod
    def record_history(self, points: Sequence[HistoryPoint], now: int) -> int:
        """Insert one row per minute; a minute already recorded (by any process) is kept
        as it is. Returns how many rows were new."""

    @abc.abstractmethod
    def prune_history(self, before: int) -> None:
        """Delete the minutes that start before ``before``."""

    def savepoint(self) -> contextlib.AbstractContextManager[None]:
        """Isolate one operation: on an exception, undo only what it wrote."""
        return contextlib.nullcontext()


class Store(abc.ABC):
    """A database: its lifecycle, migrations, transactions and reads."""

    kind: str  # "postgresql" or "sqlite"

    # --- lifecycle -----------------------------------------------------------

    @abc.abstractmethod
    def open(self, wait_s: float = 10.0) -> None:
        """Connect; raise ``StoreUnavailable`` within ``wait_s`` if the database cannot be reached."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close every connection. Idempotent."""

    @abc.abstractmethod
    def migrate(self) -> list[str]:
        """Apply pending migrations in order; return the names applied (empty: up to date).
        Raises ``SchemaTooNew`` when the database has migrations this code does not know."""

    @abc.abstractmethod
    def check_schema(self) -> None:
        """Raise ``SchemaTooNew`` if the database is ahead of this code, ``StoreUnavailable``
        if it has pending migrations."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Run a trivial query; raise ``StoreUnavailable`` if it fails."""

    @abc.abstractmethod
    def transaction(self) -> contextlib.AbstractContextManager[Transaction]:
        """Open a write transaction: committed on normal exit, rolled back on exception."""

    # --- one-shot writes (one transaction each) ------------------------------

    def run(self, op: Callable[[Transaction], Any]) -> Any:
        with self.transaction() as tx:
            return op(tx)

    # --- reads ---------------------------------------------------------------

    @abc.abstractmethod
    def get_task(self, task_id: str) -> Task:
        """Raise ``NotFound`` if absent."""

    @abc.abstractmethod
    def get_task_by_idempotency_key(self, key: str) -> Task | None: ...

    @abc.abstractmethod
    def list_tasks(self, status: str | None, limit: int, cursor: str | None) -> Page:
        """Newest first (created_at desc, id desc); ``cursor`` from a previous page's
        ``next_cursor``; a malformed cursor raises ``InvalidInput``."""

    @abc.abstractmethod
    def get_lease(self, lease_id: str) -> Lease: ...

    @abc.abstractmethod
    def list_leases(self, status: str | None, limit: int, cursor: str | None) -> Page:
        """Newest first (started_at desc, id desc)."""

    @abc.abstractmethod
    def get_worker(self, worker_id: str) -> Worker:
        """With ``active_leases`` counted from the leases table."""

    @abc.abstractmethod
    def list_workers(self, status: str | None = None) -> list[Worker]:
        """Every worker (the fleet is small), ``active_leases`` counted, ordered by id."""

    @abc.abstractmethod
    def worker_leases(self, worker_id: str) -> list[Lease]:
        """The worker's active leases, newest first (at most ``MAX_PAGE``)."""

    @abc.abstractmethod
    def worker_candidates(self, labels: Sequence[str]) -> list[Worker]:
        """Workers that may take a task needing ``labels``: online, claude_cli,
        active leases < max_concurrency, every label present. Unordered."""

    @abc.abstractmethod
    def active_lease_owners(self) -> list[tuple[str, str]]:
        """``(context_id, worker_id)`` of every active lease (routing snapshots)."""

    @abc.abstractmethod
    def sticky_workers(self, context_id: str) -> set[str]:
        """Ids of workers holding an active lease for a task of this context."""

    @abc.abstractmethod
    def list_artifacts(self, task_id: str | None, limit: int, cursor: str | None) -> Page:
        """Newest first (created_at desc, id desc)."""

    @abc.abstractmethod
    def list_results(self, task_id: str | None, limit: int, cursor: str | None) -> Page:
        """Newest first (completed_at desc, id desc)."""

    @abc.abstractmethod
    def get_result(self, task_id: str) -> Result:
        """The latest result of the task; ``NotFound`` if none."""

    @abc.abstractmethod
    def list_audit(self, limit: int, cursor: str | None, entity_id: str | None = None, action: str | None = None) -> Page:
        """Newest first (timestamp desc, id desc); optionally only one entity's, one action's, or both."""

    @abc.abstractmethod
    def get_settings(self) -> dict[str, str]: ...

    # --- the read side of operators' tools ------------------------------------

    @abc.abstractmethod
    def search_tasks(self, field: str, value: str, statuses: Sequence[str], limit: int, cursor: str | None) -> Page:
        """Tasks whose ``field`` (``context_id`` or ``agent_slug``) equals ``value`` and whose
        status is one of ``statuses``, newest first, paged as ``list_tasks``."""

    @abc.abstractmethod
    def list_task_leases(self, task_ids: Sequence[str], status: str | None, limit: int, cursor: str | None) -> Page:
        """Every lease of these tasks (optionally of one status), newest first
        (started_at desc, id desc)."""

    @abc.abstractmethod
    def list_expired_leases(self, limit: int, cursor: str | None) -> Page:
        """Expired leases, the latest expiry first (expires_at desc, id desc)."""

    @abc.abstractmethod
    def live_depth(self) -> dict[str, int]:
        """Tasks ``queued``, ``leased`` and ``running`` now (every key present)."""

    @abc.abstractmethod
    def oldest_queued(self) -> tuple[str, int] | None:
        """``(id, created_at)`` of the task that has waited longest in ``queued``, if any."""

    @abc.abstractmethod
    def activity(self, since: int, until: int) -> dict[int, dict[str, int]]:
        """Per minute start in ``[since, until)`` that saw any: tasks ``created``, results
        ``completed`` (success) and ``failed`` (error), leases ``expired``. Only keys
        with a count are present."""

    @abc.abstractmethod
    def last_history_minute(self) -> int | None:
        """The latest minute in runtime_history, if any."""

    @abc.abstractmethod
    def history(self, since: int, until: int) -> list[HistoryPoint]:
        """The recorded minutes in ``[since, until)``, oldest first."""

    @abc.abstractmethod
    def due_tasks(self, now: int, limit: int) -> list[Task]:
        """Up to ``limit`` queued tasks that may be leased at ``now``, oldest first."""

    @abc.abstractmethod
    def latest_delivery(self, task_id: str) -> Delivery | None:
        """The task's most recent delivery, if it was ever pushed to a worker agent."""

    @abc.abstractmethod
    def worker_trust(self) -> dict[str, str]:
        """Every vouched worker URL: ``{worker_id: url}``."""

    @abc.abstractmethod
    def stats(self) -> dict[str, dict[str, int]]:
        """Counts by status: ``{"tasks": {...}, "leases": {...}, "workers": {...}}``,
        every known status present (0 when none)."""


HISTORY_COLUMNS = ("queued", "leased", "running", "created", "completed", "failed", "expired")


def history_params(point: HistoryPoint) -> dict[str, Any]:
    """The parameters of ``record_history`` for one minute."""
    return {"minute": point.at, **{c: getattr(point, c) for c in HISTORY_COLUMNS}}


def history_point(row: Sequence[Any]) -> HistoryPoint:
    """A ``history`` row (minute, then HISTORY_COLUMNS) as a record."""
    return HistoryPoint(at=row[0], **dict(zip(HISTORY_COLUMNS, row[1:], strict=True)))


def artifact_content(completion: Completion) -> str | None:
    """What an artifact stores for a completion: the output, else the error."""
    return completion.output if completion.output is not None else completion.error_message


__all__ = [
    "MAX_PAGE",
    "AcquireOp",
    "Artifact",
    "CancelOp",
    "ClaimOp",
    "CompleteOp",
    "CreateOp",
    "ExpireOp",
    "FailOp",
    "HeartbeatOp",
    "Op",
    "RequeueOp",
    "Result",
    "RetryDelay",
    "SessionLost",
    "Store",
    "Transaction",
    "TransientConflict",
    "artifact_content",
    "history_params",
    "history_point",
]

