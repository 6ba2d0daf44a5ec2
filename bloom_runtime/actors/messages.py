"""Command messages the engine facade sends to the actors.

Each carries the ``actor`` to record in the audit log (who acted) and a
``reply`` future the facade waits on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pykka

from bloom_runtime.engine.models import AuditEntry, Completion, Fence, NewTask, WorkerUpsert


@dataclass
class CreateTasks:
    """Queue tasks in one transaction; ``many``: answer the list (refusals as values), else the one."""

    new: Sequence[NewTask]
    actor: str
    reply: pykka.ThreadingFuture
    many: bool = False


@dataclass
class CompleteTask:
    task_id: str
    fence: Fence
    completion: Completion
    actor: str
    reply: pykka.ThreadingFuture


@dataclass
class CompleteTasks:
    """Record several results in one transaction; answers the list, refusals as values."""

    items: Sequence[tuple[str, Fence, Completion]]  # (task_id, fence, completion)
    actor: str
    reply: pykka.ThreadingFuture


@dataclass
class RequeueTask:
    task_id: str
    actor: str
    reply: pykka.ThreadingFuture


@dataclass
class CancelTask:
    task_id: str
    actor: str
    reply: pykka.ThreadingFuture


@dataclass
class ClaimNext:
    """Lease up to ``max_tasks`` tasks to a pulling worker; answers the list of grants."""

    worker_id: str
    ttl_seconds: int | None
    actor: str
    reply: pykka.ThreadingFuture
    max_tasks: int = 1


@dataclass
class AcquireLease:
    task_id: str
    worker_ids: Sequence[str]
    ttl_seconds: int | None  # None: the task's default
    actor: str
    reply: pykka.ThreadingFuture


@dataclass
class Heartbeat:
    task_id: str
    fence: Fence
    actor: str
    reply: pykka.ThreadingFuture


@dataclass
class FailLease:
    lease_id: str
    reason: str
    actor: str
    reply: pykka.ThreadingFuture
    refund: bool = False  # the dispatch never reached the worker: give the attempt back


@dataclass
class RegisterWorker:
    upsert: WorkerUpsert
    actor: str
    reply: pykka.ThreadingFuture
    vouch: bool = False  # an admin key set the URL: record it as verified


@dataclass
class UpsertWorkers:
    upserts: Sequence[WorkerUpsert]
    actor: str
    reply: pykka.ThreadingFuture | None = None
    entries: Sequence[AuditEntry] = ()  # recorded in the same transaction as the upserts
    vouch: Mapping[str, str] = field(default_factory=dict)  # worker id → URL the sync vouches for


@dataclass
class RefreshWorker:
    """Store what a known worker's agent reported (never creates one); audited only when
    a field the fleet views show changed. ``cause`` says what reported it."""

    upsert: WorkerUpsert
    cause: str
    actor: str
    reply: pykka.ThreadingFuture


@dataclass
class RemoveWorker:
    worker_id: str
    actor: str
    reply: pykka.ThreadingFuture


@dataclass
class PickWorkers:
    """Ask the registry for candidate worker ids, best first."""

    context_id: str
    labels: Sequence[str]
    reply: pykka.ThreadingFuture
    fresh: bool = False  # reload the routing snapshot first
    push: bool = False  # only workers tasks can be pushed to (a verified URL)
    exclude: frozenset[str] = frozenset()  # e.g. workers whose circuit breaker is open



@dataclass(frozen=True)
class Sighting:
    """The runtime's own observation of a worker: alive (a probe or delivery got an answer) at ``at``,
    or not (``cause`` says why)."""

    worker_id: str
    alive: bool
    at: int
    cause: str


@dataclass
class RecordLiveness:
    """Tell the registry what probes and deliveries saw; only real status changes are audited."""

    sightings: Sequence[Sighting]
    actor: str
    reply: pykka.ThreadingFuture | None = None
