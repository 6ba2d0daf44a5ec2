"""What a refused state change tells its caller, for every store alike.

A store decides whether an operation may run (PostgreSQL in its statements,
SQLite in Python) and names the outcome with one of the verdicts below; this
module turns a verdict into the error, so both stores refuse in the same words.
"""

from __future__ import annotations

from typing import Any

from bloom_runtime.engine.errors import BloomError, Conflict, NoCapacity, NotFound, StaleLease
from bloom_runtime.engine.models import Fence

OK = "ok"

# An operation on a task: the task must exist.
TASK_NOT_FOUND = "task_not_found"
ID_TAKEN = "id_taken"  # a create whose id (not its idempotency key) is used
# Leasing: the task must be queued, past its backoff, with attempts left; the worker known, with room.
NOT_QUEUED = "not_queued"
BACKOFF = "backoff"
NO_ATTEMPTS = "no_attempts"
WORKER_NOT_FOUND = "worker_not_found"
NO_CAPACITY = "no_capacity"
# Under a lease (heartbeat, complete): the fence must name the task's active lease and worker.
NO_LEASE = "no_lease"  # the task holds none, and the caller named none
LEASE_GONE = "lease_gone"  # the caller named a lease, and the task holds none now
STALE_LEASE = "stale_lease"
STALE_WORKER = "stale_worker"
LEASE_INACTIVE = "lease_inactive"  # the task names a lease that is not active (should not happen)
# Failing a lease: it must exist, be active, and be its task's.
LEASE_NOT_FOUND = "lease_not_found"
LEASE_NOT_ACTIVE = "lease_not_active"
# Requeue and cancel: the task must be in a state they start from.
NOT_REQUEUEABLE = "not_requeueable"
NOT_CANCELLABLE = "not_cancellable"


def lease_verdict(status: str | None, not_before: int | None, attempts: int, max_attempts: int, now: int) -> str:
    """Whether a task in this state may be leased at ``now`` (``status`` None: no such
    task). PostgreSQL states the same rule in ``grant_leases``."""
    if status is None:
        return TASK_NOT_FOUND
    if status != "queued":
        return NOT_QUEUED
    if not_before is not None and not_before > now:
        return BACKOFF
    if attempts >= max_attempts:
        return NO_ATTEMPTS
    return OK


def fence_verdict(status: str | None, lease_id: str | None, worker_id: str | None, fence: Fence) -> str:
    """The fence rule of heartbeat and complete, on the task as it is (``status`` None:
    no such task). PostgreSQL states the same rule in ``fenced_writes``."""
    if status is None:
        return TASK_NOT_FOUND
    if status not in ("leased", "running"):
        return LEASE_GONE if fence.lease_id is not None else NO_LEASE
    if fence.lease_id is not None and fence.lease_id != lease_id:
        return STALE_LEASE
    if fence.worker_id is not None and fence.worker_id != worker_id:
        return STALE_WORKER
    return OK


def refusal(
    verdict: str,
    *,
    task_id: str | None = None,
    lease_id: str | None = None,
    worker_id: str | None = None,
    fence: Fence | None = None,
    status: str | None = None,
    not_before: int | None = None,
) -> BloomError:
    """The error for ``verdict``, given what the operation named and the state it met."""
    f = fence or Fence()
    made: dict[str, Any] = {
        TASK_NOT_FOUND: lambda: NotFound("task not found", task_id=task_id),
        ID_TAKEN: lambda: Conflict("task id already exists", task_id=task_id),
        NOT_QUEUED: lambda: Conflict(f"task is {status}, not queued", task_id=task_id, status=status),
        BACKOFF: lambda: Conflict("task is waiting for its retry backoff", task_id=task_id, not_before=not_before),
        NO_ATTEMPTS: lambda: Conflict("task has no attempts left", task_id=task_id),
        WORKER_NOT_FOUND: lambda: NotFound("worker not found", worker_id=worker_id),
        NO_CAPACITY: lambda: NoCapacity("no worker has free capacity", task_id=task_id),
        NO_LEASE: lambda: Conflict(f"task is {status}, it holds no lease", task_id=task_id, status=status),
        LEASE_GONE: lambda: StaleLease("lease is no longer active", task_id=task_id, lease_id=f.lease_id),
        STALE_LEASE: lambda: StaleLease("lease is not the task's active lease", task_id=task_id, lease_id=f.lease_id),
        STALE_WORKER: lambda: StaleLease("worker does not hold the task's lease", task_id=task_id, worker_id=f.worker_id),
        LEASE_INACTIVE: lambda: Conflict("task's lease is not active", task_id=task_id),
        LEASE_NOT_FOUND: lambda: NotFound("lease not found", lease_id=lease_id),
        LEASE_NOT_ACTIVE: lambda: Conflict("lease is not active", lease_id=lease_id),
        NOT_REQUEUEABLE: lambda: Conflict(
            f"task is {status}, only failed or dead tasks can be requeued", task_id=task_id, status=status
        ),
        NOT_CANCELLABLE: lambda: Conflict(f"task is {status}, it cannot be cancelled", task_id=task_id, status=status),
    }
    return made[verdict]()
