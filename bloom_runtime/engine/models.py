"""Domain records and their state machines.

Records are ``msgspec.Struct``s: typed, cheap to build from database rows and
encoded to JSON directly by the HTTP layer. Ids are UUID strings, times are
epoch milliseconds.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

import msgspec

TaskStatus = Literal["queued", "leased", "running", "completed", "failed", "dead", "cancelled"]
LeaseStatus = Literal["active", "released", "expired", "failed"]
WorkerStatus = Literal["online", "offline", "syncing", "error", "unknown"]
ResultStatus = Literal["success", "error"]
DesiredFormat = Literal["json", "text"]
# Who keeps a worker's status fresh: `api` push targets keep what they were
# given; `pull` and `membridge` workers go offline when they stop showing up.
WorkerSource = Literal["api", "pull", "membridge"]

TASK_STATUSES: tuple[str, ...] = ("queued", "leased", "running", "completed", "failed", "dead", "cancelled")
LEASE_STATUSES: tuple[str, ...] = ("active", "released", "expired", "failed")
WORKER_STATUSES: tuple[str, ...] = ("online", "offline", "syncing", "error", "unknown")

# Task transitions (DESIGN §5): the states each operation may start from.
LEASABLE: frozenset[str] = frozenset({"queued"})
HOLDING_LEASE: frozenset[str] = frozenset({"leased", "running"})
REQUEUEABLE: frozenset[str] = frozenset({"failed", "dead"})
CANCELLABLE: frozenset[str] = frozenset({"queued", "leased", "running"})
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "dead", "cancelled"})

DEFAULT_TIMEOUT_SEC = 120
DEFAULT_MAX_ATTEMPTS = 3
LEASE_GRACE_S = 30  # default lease TTL = policy.timeout_sec + this


def new_id() -> str:
    return str(uuid.uuid4())


class Policy(msgspec.Struct, frozen=True, kw_only=True):
    timeout_sec: int = DEFAULT_TIMEOUT_SEC
    budget: float = 0


class Capabilities(msgspec.Struct, frozen=True, kw_only=True):
    claude_cli: bool = True
    max_concurrency: int = 1
    labels: list[str] = []


class Task(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    context_id: str
    agent_slug: str
    prompt: str
    context_hints: list[str]
    policy: Policy
    desired_format: DesiredFormat
    status: TaskStatus
    created_at: int
    updated_at: int
    lease_id: str | None
    worker_id: str | None
    attempts: int
    max_attempts: int
    labels: list[str]
    not_before: int | None
    idempotency_key: str | None

    @property
    def default_ttl_seconds(self) -> int:
        return self.policy.timeout_sec + LEASE_GRACE_S


class Lease(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    task_id: str
    worker_id: str
    started_at: int
    expires_at: int
    ttl_seconds: int
    status: LeaseStatus
    last_heartbeat: int
    context_id: str


class Worker(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    node_id: str
    url: str | None
    status: WorkerStatus
    capabilities: Capabilities
    last_heartbeat: int | None
    ip_addrs: list[str]
    obs_count: int
    db_sha: str | None
    registered_at: int
    active_leases: int
    agent_version: str | None
    os_info: str | None
    install_method: str | None
    source: WorkerSource = "api"

    @property
    def free_capacity(self) -> int:
        return self.capabilities.max_concurrency - self.active_leases


class Metrics(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=False):
    duration_ms: float | None = None
    tokens_used: int | None = None


class Result(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    task_id: str
    worker_id: str | None
    artifact_id: str | None
    status: ResultStatus
    output: str | None
    error_message: str | None
    metrics: dict[str, Any]
    completed_at: int


class Artifact(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    task_id: str
    job_id: str | None
    type: str
    created_at: int
    finalized: bool
    url: str | None
    entity_refs: list[str]
    tags: list[str]
    content: str | None


class AuditEntry(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    timestamp: int
    action: str
    entity_type: str
    entity_id: str
    actor: str
    detail: str | None = None


# --- inputs -----------------------------------------------------------------


class NewTask(msgspec.Struct, frozen=True, kw_only=True):
    """A validated request to create a task (ids and times assigned by the store caller)."""

    context_id: str
    agent_slug: str
    prompt: str
    context_hints: list[str] = []
    policy: Policy = Policy()
    desired_format: DesiredFormat = "text"
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    labels: list[str] = []
    idempotency_key: str | None = None


class WorkerUpsert(msgspec.Struct, frozen=True, kw_only=True):
    """Fields to create or update a worker by id; ``None`` keeps the stored value on update."""

    id: str
    node_id: str | None = None
    url: str | None = None
    status: WorkerStatus | None = None
    capabilities: Capabilities | None = None
    last_heartbeat: int | None = None
    ip_addrs: list[str] | None = None
    obs_count: int | None = None
    db_sha: str | None = None
    agent_version: str | None = None
    os_info: str | None = None
    install_method: str | None = None
    source: WorkerSource | None = None


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    """A worker's report that a task finished."""

    status: ResultStatus
    output: str | None = None
    error_message: str | None = None
    metrics: dict[str, Any] = {}
    artifact_type: str | None = None
    artifact_tags: list[str] = []
    retryable: bool = True


class Fence(msgspec.Struct, frozen=True, kw_only=True):
    """What a worker call names to prove it holds the active lease (either may be absent)."""

    lease_id: str | None = None
    worker_id: str | None = None


class LeaseGrant(msgspec.Struct, frozen=True, kw_only=True):
    task: Task
    lease: Lease
    worker: Worker


class CompletionOutcome(msgspec.Struct, frozen=True, kw_only=True):
    task: Task
    result: Result
    artifact: Artifact
    lease: Lease | None


class Expiry(msgspec.Struct, frozen=True, kw_only=True):
    """One lease the sweep expired and what became of its task."""

    lease: Lease
    task: Task


class Page(msgspec.Struct, frozen=True, kw_only=True):
    items: list[Any]
    next_cursor: str | None
